"""The combine step of split-KV decode (notebook 07): per-split states merged into one answer.

Each split of the decode kernel leaves a partial state per row, ``out`` normalised within the split
and its ``lse`` (an empty split: 0 and -inf). :func:`combine_kernel` merges them the way notebook
04's ``merge_many`` does, one program per (batch, query token, head) row.
"""

from __future__ import annotations

import torch

from .. import runtime
from ..runtime import tl, triton
from ..validation import ArgumentError, ArgumentTypeError, check_same, check_tensor
from .common import SUPPORTED_DTYPES, block_d, next_pow2, output_dtype

__all__ = ["combine_kernel", "combine_splits"]

if runtime.HAS_TRITON:

    @triton.jit
    def combine_kernel(
        OACC,
        LACC,
        O,
        LSE,
        stride_as,
        stride_ab,
        stride_aq,
        stride_ah,
        stride_ls,
        stride_lb,
        stride_lh,
        stride_ob,
        stride_oq,
        stride_oh,
        stride_fb,
        stride_fh,
        num_splits,
        nheads,
        seqlen_q,
        headdim,
        BLOCK_S: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Merge ``num_splits`` partial states of one (batch, query token, head) row:
        ``L = M + log sum_s exp(lse_s - M)``, ``out = sum_s exp(lse_s - L) out_s``; a row whose
        splits are all empty gets out 0 and LSE +inf."""
        pid = tl.program_id(0)
        b = (pid // (seqlen_q * nheads)).to(tl.int64)  # 64-bit base offsets
        t = (pid // nheads) % seqlen_q
        h = pid % nheads
        s = tl.arange(0, BLOCK_S)
        dims = tl.arange(0, BLOCK_D)
        s_ok = s < num_splits
        row_lse = LACC + b * stride_lb + h * stride_lh + t
        row_acc = OACC + b * stride_ab + t * stride_aq + h * stride_ah
        lse = tl.load(row_lse + s.to(tl.int64) * stride_ls, mask=s_ok, other=float("-inf"))
        top = tl.max(lse, 0)
        top = tl.where(top == float("-inf"), 0.0, top)
        w = tl.exp(lse - top)
        total = tl.sum(w, 0)
        parts = tl.load(
            (row_acc + s.to(tl.int64) * stride_as)[:, None] + dims[None, :],
            mask=s_ok[:, None] & (dims[None, :] < headdim),
            other=0.0,
        )
        out = tl.sum(w[:, None] * parts, 0) / tl.where(total == 0.0, 1.0, total)
        final = tl.where(total == 0.0, float("inf"), top + tl.log(tl.where(total == 0.0, 1.0, total)))
        tl.store(
            O + b * stride_ob + t * stride_oq + h * stride_oh + dims, out.to(O.dtype.element_ty), mask=dims < headdim
        )
        tl.store(LSE + b * stride_fb + h * stride_fh + t, final)


def combine_splits(out_partial: torch.Tensor, lse_partial: torch.Tensor, out_dtype=torch.float32):
    """Merge per-split states with :func:`combine_kernel`: ``out_partial`` fp32 ``(splits,
    batch, seqlen_q, nheads, headdim)``, ``lse_partial`` fp32 ``(splits, batch, nheads,
    seqlen_q)`` (-inf for empty splits). Returns ``out`` ``(batch, seqlen_q, nheads, headdim)``
    in ``out_dtype`` and ``lse`` ``(batch, nheads, seqlen_q)``; rows with no key: 0 and +inf."""
    check_tensor("out_partial", out_partial, ndim=5, dtypes=(torch.float32,))
    check_tensor("lse_partial", lse_partial, ndim=4, dtypes=(torch.float32,))
    runtime.resolve_backend("triton", out_partial.device)
    check_same(("out_partial", "lse_partial"), (out_partial, lse_partial), "device")
    if out_dtype not in SUPPORTED_DTYPES:
        raise ArgumentTypeError(f"out_dtype must be fp16, bf16 or fp32, got {out_dtype}")
    splits, b, sq, h, d = out_partial.shape
    if min(out_partial.shape) == 0:
        raise ArgumentError(f"out_partial must have no empty dimension, got {tuple(out_partial.shape)}")
    if splits > 128:
        raise ArgumentError(f"out_partial holds {splits} splits; at most 128 are combined")
    if tuple(lse_partial.shape) != (splits, b, h, sq):
        raise ArgumentError(
            f"lse_partial must have shape (splits, batch, nheads, seqlen_q) = {(splits, b, h, sq)}, "
            f"got {tuple(lse_partial.shape)}"
        )
    out_partial = out_partial if out_partial.stride(-1) == 1 else out_partial.contiguous()
    out = torch.empty(b, sq, h, d, dtype=output_dtype(out_dtype), device=out_partial.device)
    lse = torch.empty(b, h, sq, dtype=torch.float32, device=out_partial.device)
    combine_kernel[(b * sq * h,)](
        out_partial,
        lse_partial,
        out,
        lse,
        out_partial.stride(0),
        out_partial.stride(1),
        out_partial.stride(2),
        out_partial.stride(3),
        lse_partial.stride(0),
        lse_partial.stride(1),
        lse_partial.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        lse.stride(0),
        lse.stride(1),
        splits,
        h,
        sq,
        d,
        BLOCK_S=max(2, next_pow2(splits)),
        BLOCK_D=block_d(d),
    )
    return out.to(out_dtype), lse
