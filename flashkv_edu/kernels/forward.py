"""A FlashAttention-2 style forward (prefill) kernel in Triton (notebook 05).

One program per (query tile, batch x head). It streams key/value tiles with the online
softmax of notebook 04 and skips, by its loop bounds, every key tile that the causal or local
mask hides completely. Semantics are :func:`flashkv_edu.attention_ref`'s: bottom-right masks per
sequence over the valid keys ``[leftpad_k, seqlens_k)``, GQA/MQA, softcap then ALiBi, output 0
and LSE +inf for rows that see nothing.
"""

from __future__ import annotations

import torch

from .. import runtime
from ..runtime import tl, triton
from ..validation import (
    ArgumentError,
    ArgumentTypeError,
    check_attention_inputs,
    check_bool,
    check_float_tensor,
    check_int,
    check_power_of_two,
    check_softcap,
    key_range,
    normalize_window,
    softmax_scale_for,
)
from .common import (
    MAX_HEADDIM,
    SUPPORTED_DTYPES,
    block_d,
    check_row_offsets,
    default_blocks,
    default_warps,
    dot_in_fp32,
    output_dtype,
)

__all__ = [
    "attention_fwd_kernel",
    "attention_triton",
    "simple_attention",
    "simple_attention_kernel",
    "tile_schedule",
]

if runtime.HAS_TRITON:
    from .common import online_softmax_step, visible_key_range

    @triton.jit
    def attention_fwd_kernel(
        Q,
        K,
        V,
        O,
        LSE,
        SEQLENS_K,
        LEFTPAD_K,
        SLOPES,
        TILES,
        stride_qb,
        stride_qs,
        stride_qh,
        stride_kb,
        stride_ks,
        stride_kh,
        stride_vb,
        stride_vs,
        stride_vh,
        stride_ob,
        stride_os,
        stride_oh,
        stride_lb,
        stride_lh,
        stride_sb,
        nheads,
        seqlen_q,
        headdim,
        scale,
        softcap,
        window_left,
        window_right,
        GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
        HAS_ALIBI: tl.constexpr,
        DOT_FP32: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // nheads
        h = pid_bh % nheads
        kvh = h // GROUP
        # Scalar base pointers with 64-bit offsets (b * stride_kb passes 2^31 in large tensors);
        # the per-element offsets added to them stay 32-bit.
        b64 = b.to(tl.int64)
        Q_bh = Q + b64 * stride_qb + h * stride_qh
        K_bh = K + b64 * stride_kb + kvh * stride_kh
        V_bh = V + b64 * stride_vb + kvh * stride_vh
        start = tl.load(LEFTPAD_K + b)
        sk = tl.load(SEQLENS_K + b) - start  # valid keys of this sequence
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        row_ok = rows < seqlen_q
        dim_ok = dims < headdim
        q = tl.load(Q_bh + rows[:, None] * stride_qs + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        diag = rows + sk - seqlen_q  # bottom-right alignment
        # Loop bounds: key tiles entirely outside every row's window are never visited.
        lo, hi = visible_key_range(
            pid_m * BLOCK_M, pid_m * BLOCK_M + BLOCK_M - 1, sk, seqlen_q, window_left, window_right, BLOCK_N
        )
        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(SLOPES + b * stride_sb + h)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        tiles = 0
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N)  # compacted key index j'
            col_ok = cols < sk
            kv_rows = start + cols
            k = tl.load(
                K_bh + kv_rows[:, None] * stride_ks + dims[None, :], mask=col_ok[:, None] & dim_ok[None, :], other=0.0
            )
            v = tl.load(
                V_bh + kv_rows[:, None] * stride_vs + dims[None, :], mask=col_ok[:, None] & dim_ok[None, :], other=0.0
            )
            visible = row_ok[:, None] & col_ok[None, :]
            if window_right >= 0:
                visible = visible & (cols[None, :] <= diag[:, None] + window_right)
            if window_left >= 0:
                visible = visible & (cols[None, :] >= diag[:, None] - window_left)
            bias = -slope * tl.abs(diag[:, None] - cols[None, :]).to(tl.float32)
            m_i, l_i, acc = online_softmax_step(
                q, k, v, m_i, l_i, acc, visible, bias, scale, softcap, HAS_SOFTCAP, HAS_ALIBI, DOT_FP32
            )
            tiles += 1
        empty = l_i == 0.0
        out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, l_i)[:, None])
        lse = tl.where(empty, float("inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
        tl.store(
            O + b64 * stride_ob + h * stride_oh + rows[:, None] * stride_os + dims[None, :],
            out.to(O.dtype.element_ty),
            mask=row_ok[:, None] & dim_ok[None, :],
        )
        tl.store(LSE + b64 * stride_lb + h * stride_lh + rows, lse, mask=row_ok)
        tl.store(TILES + pid_bh * tl.num_programs(0) + pid_m, tiles)


def attention_triton(
    q,
    k,
    v,
    *,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    seqlens_k=None,
    leftpad_k=None,
    return_lse=False,
    block_m=None,
    block_n=None,
    return_tile_counts=False,
):
    """Attention through :func:`attention_fwd_kernel`, with :func:`flashkv_edu.attention_ref`'s
    arguments and semantics. q ``(batch, seqlen_q, nheads, headdim)``, k/v ``(batch, seqlen_k,
    nheads_k, headdim)``; fp16, bf16 or fp32; head dim up to 256.

    Returns ``out`` (q's dtype), plus ``lse`` (fp32 ``(batch, nheads, seqlen_q)``) with
    ``return_lse``, plus the int32 ``(batch * nheads, query tiles)`` count of key tiles each
    program visited with ``return_tile_counts``.
    """
    slopes = check_attention_inputs(q, k, v, alibi_slopes, max_headdim=MAX_HEADDIM, value_headdim_may_differ=False)
    runtime.resolve_backend("triton", q.device)
    if q.dtype not in SUPPORTED_DTYPES:
        raise ArgumentTypeError(f"q must be fp16, bf16 or fp32 for the Triton kernel, got {q.dtype}")
    b, sq, h, d = q.shape
    if sq == 0:
        raise ArgumentError("q must have seqlen_q >= 1, got 0")
    hk = k.shape[2]
    left, right = normalize_window(window_size, causal)
    scale = softmax_scale_for(d, softmax_scale)
    softcap = check_softcap(softcap)
    starts, ends = key_range(seqlens_k, leftpad_k, b, k.shape[1], device=q.device)
    check_bool("return_lse", return_lse)
    check_bool("return_tile_counts", return_tile_counts)
    dflt_m, dflt_n = default_blocks(d)
    bm = dflt_m if block_m is None else check_power_of_two("block_m", block_m)
    bn = dflt_n if block_n is None else check_power_of_two("block_n", block_n)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_row_offsets(name, t)
    out = torch.empty(q.shape, dtype=output_dtype(q.dtype), device=q.device)
    lse = torch.empty(b, h, sq, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(sq, bm), b * h)
    tiles = torch.zeros(b * h, grid[0], dtype=torch.int32, device=q.device)
    slopes = slopes if slopes is not None else torch.zeros(1, dtype=torch.float32, device=q.device)
    stride_sb = 0 if slopes.dim() == 1 else slopes.stride(0)
    attention_fwd_kernel[grid](
        q,
        k,
        v,
        out,
        lse,
        ends,
        starts,
        slopes,
        tiles,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        lse.stride(0),
        lse.stride(1),
        stride_sb,
        h,
        sq,
        d,
        scale,
        softcap if softcap > 0 else 1.0,
        left,
        right,
        GROUP=h // hk,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_D=block_d(d),
        HAS_SOFTCAP=softcap > 0,
        HAS_ALIBI=alibi_slopes is not None,
        DOT_FP32=dot_in_fp32(q.dtype),
        num_warps=default_warps(d),
        num_stages=2,
    )
    result = [out.to(q.dtype)]
    if return_lse:
        result.append(lse)
    if return_tile_counts:
        result.append(tiles)
    return result[0] if len(result) == 1 else tuple(result)


def tile_schedule(
    seqlen_q: int, seqlen_k: int, block_m: int, block_n: int, *, causal: bool = False, window_size=(-1, -1)
) -> torch.Tensor:
    """Which (query tile, key tile) pairs :func:`attention_fwd_kernel` visits, from the same loop
    bounds: int ``(query tiles, key tiles)`` with 0 = skipped by the loop bounds, 1 = visited
    and fully visible, 2 = visited and partly masked (ragged tail or mask edge)."""
    from ..masks import attention_mask
    from .common import key_range_kernel

    seqlen_q = check_int("seqlen_q", seqlen_q, low=1)
    seqlen_k = check_int("seqlen_k", seqlen_k, low=1)
    block_m = check_int("block_m", block_m, low=1)
    block_n = check_int("block_n", block_n, low=1)
    left, right = normalize_window(window_size, causal)
    mask = attention_mask(seqlen_q, seqlen_k, window_size=(left, right))
    n_m, n_n = -(-seqlen_q // block_m), -(-seqlen_k // block_n)
    bounds = torch.empty(2, n_m, dtype=torch.int32, device=runtime.DEVICE)
    key_range_kernel[(n_m,)](bounds[0], bounds[1], seqlen_q, seqlen_k, left, right, BLOCK_M=block_m, BLOCK_N=block_n)
    grid = torch.zeros(n_m, n_n, dtype=torch.int32)
    for m, (lo, hi) in enumerate(bounds.T.tolist()):
        for start in range(lo, max(lo, hi), block_n):
            n = start // block_n
            tile = mask[m * block_m : (m + 1) * block_m, start : start + block_n]
            full = tile.shape == (block_m, block_n) and bool(tile.all())
            grid[m, n] = 1 if full else 2
    return grid


if runtime.HAS_TRITON:

    @triton.jit
    def simple_attention_kernel(
        Q,
        K,
        V,
        O,
        seqlen_q,
        seqlen_k,
        headdim,
        scale,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        STEP: tl.constexpr,
    ):
        """The teaching version of :func:`attention_fwd_kernel`: one head, contiguous
        ``(seqlen, headdim)`` tensors, no mask but the ragged tails. ``STEP`` is the inner-loop
        function (``online_softmax_step``'s signature), so an exercise can plug in its own."""
        pid_m = tl.program_id(0)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        q = tl.load(
            Q + rows[:, None] * headdim + dims[None, :],
            mask=(rows[:, None] < seqlen_q) & (dims[None, :] < headdim),
            other=0.0,
        )
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, seqlen_k, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N)
            kv_mask = (cols[:, None] < seqlen_k) & (dims[None, :] < headdim)
            k = tl.load(K + cols[:, None] * headdim + dims[None, :], mask=kv_mask, other=0.0)
            v = tl.load(V + cols[:, None] * headdim + dims[None, :], mask=kv_mask, other=0.0)
            visible = (rows[:, None] < seqlen_q) & (cols[None, :] < seqlen_k)
            m_i, l_i, acc = STEP(q, k, v, m_i, l_i, acc, visible, acc, scale, 1.0, False, False, True)
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(
            O + rows[:, None] * headdim + dims[None, :],
            out,
            mask=(rows[:, None] < seqlen_q) & (dims[None, :] < headdim),
        )


def simple_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step=None, block_m: int = 16, block_n: int = 16
) -> torch.Tensor:
    """Single-head fp32 attention ``(seqlen, headdim)`` through :func:`simple_attention_kernel`,
    with ``step`` (default: the package's ``online_softmax_step``) as the inner loop."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(name, x, ndim=2)
    runtime.resolve_backend("triton", q.device)
    if k.shape != v.shape or k.shape[1] != q.shape[1] or q.shape[1] == 0:
        raise ArgumentError(
            f"q (seqlen_q, headdim) and k, v (seqlen_k, headdim) must share headdim >= 1, got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    block_m = check_power_of_two("block_m", block_m)
    block_n = check_power_of_two("block_n", block_n)
    from .common import online_softmax_step

    q, k, v = (x.float().contiguous() for x in (q, k, v))
    out = torch.empty_like(q)
    simple_attention_kernel[(triton.cdiv(q.shape[0], block_m),)](
        q,
        k,
        v,
        out,
        q.shape[0],
        k.shape[0],
        q.shape[1],
        q.shape[1] ** -0.5,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d(q.shape[1]),
        STEP=step or online_softmax_step,
    )
    return out
