"""Online softmax and mergeable attention states (notebook 04).

An *attention state* over a set of keys is the pair ``(out, lse)``: the softmax-weighted
average of their values and the natural-log log-sum-exp of their logits. Two states over
disjoint key sets merge exactly::

    lse = log(exp(lse_a) + exp(lse_b))
    out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b

That single fact lets FlashAttention stream over key tiles (05), read keys through a block
table (06) and split one sequence across many programs (07). Shapes follow FlashAttention:
``out`` is ``(batch, seqlen_q, nheads, headdim)`` and ``lse`` is ``(batch, nheads, seqlen_q)``.
A state over no keys has ``out = 0`` and ``lse = -inf``; as a final answer FlashAttention
reports such a row as ``lse = +inf``, and the merges here accept either.
"""

from __future__ import annotations

import math

import torch

from .masks import alibi_distance_bias, repeat_kv, visible_keys
from .validation import (
    ArgumentError,
    check_attention_inputs,
    check_bool,
    check_float_tensor,
    check_int,
    check_softcap,
    key_range,
    normalize_window,
    softmax_scale_for,
)

__all__ = [
    "LOG2_E",
    "blockwise_attention",
    "lse_from_base2",
    "lse_to_base2",
    "merge_many",
    "merge_states",
    "naive_softmax",
    "online_normalizer",
    "online_softmax",
    "safe_softmax",
]

LOG2_E = math.log2(math.e)


# --- softmax three ways ----------------------------------------------------------------------


def naive_softmax(x: torch.Tensor) -> torch.Tensor:
    """``exp(x) / sum(exp(x))`` over the last dim, straight from the definition (overflows)."""
    e = torch.exp(x)
    return e / e.sum(-1, keepdim=True)


def safe_softmax(x: torch.Tensor) -> torch.Tensor:
    """Two passes: subtract the row max, then exponentiate and normalise. Never overflows."""
    m = x.max(-1, keepdim=True).values
    e = torch.exp(x - m)
    return e / e.sum(-1, keepdim=True)


def online_normalizer(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor, list]:
    """One streaming pass over blocks of the last dim: running max ``m`` and running sum
    ``l = sum exp(x - m)``, rescaled by ``exp(m_old - m_new)`` whenever the max grows.

    Returns the final ``(m, l)`` (shape ``x.shape[:-1]``) and the per-block history
    ``[(m, l), ...]`` for plotting. ``log(l) + m`` is the row's log-sum-exp.
    """
    check_float_tensor("x", x)
    block_size = check_int("block_size", block_size, low=1)
    m = torch.full(x.shape[:-1], float("-inf"), dtype=x.dtype, device=x.device)
    l = torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
    history = []
    for start in range(0, x.shape[-1], block_size):
        block = x[..., start : start + block_size]
        m_new = torch.maximum(m, block.max(-1).values)
        safe = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
        l = l * torch.exp(m - safe) + torch.exp(block - safe[..., None]).sum(-1)
        m = m_new
        history.append((m.clone(), l.clone()))
    return m, l, history


def online_softmax(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Softmax from :func:`online_normalizer`'s ``(m, l)``: one streaming pass for the
    statistics, one pass to write ``exp(x - m) / l``."""
    m, l, _ = online_normalizer(x, block_size)
    return torch.exp(x - m[..., None]) / l[..., None]


# --- blockwise attention ----------------------------------------------------------------------


def blockwise_attention(
    q,
    k,
    v,
    *,
    block_size: int = 16,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    seqlens_k=None,
    leftpad_k=None,
    return_history=False,
):
    """FlashAttention's forward algorithm in PyTorch: stream key/value blocks of
    ``block_size`` keys, keeping per query row a running max ``m``, running sum ``l`` and an
    unnormalised output accumulator. Same arguments and semantics as
    :func:`flashkv_edu.attention_ref`; computed in fp32.

    Returns ``(out, lse)``: out ``(batch, seqlen_q, nheads, headdim)`` in q's dtype, lse fp32
    ``(batch, nheads, seqlen_q)``; rows that see no key give 0 and +inf. With
    ``return_history`` also a list with the ``(m, l, out)`` state after each block.
    """
    slopes = check_attention_inputs(q, k, v, alibi_slopes)
    block_size = check_int("block_size", block_size, low=1)
    check_bool("return_history", return_history)
    b, sq, h, d = q.shape
    sk = k.shape[1]
    scale = softmax_scale_for(d, softmax_scale)
    softcap = check_softcap(softcap)
    window = normalize_window(window_size, causal)
    start, end = key_range(seqlens_k, leftpad_k, b, sk, device=q.device)
    keep = visible_keys(sq, sk, window, start, end)[:, None]  # (b, 1, sq, sk)
    bias = None if slopes is None else alibi_distance_bias(slopes, sq, sk, start, end)
    cols = torch.arange(sk, device=q.device)[None, :, None, None]
    owned = (cols >= start.long()[:, None, None, None]) & (cols < end.long()[:, None, None, None])
    v = torch.where(
        owned, v, torch.zeros((), dtype=v.dtype, device=v.device)
    )  # rows no sequence owns: 0 * NaN would leak
    qf = q.float().transpose(1, 2)  # (b, h, sq, d)
    kf = repeat_kv(k.float(), h // k.shape[2]).transpose(1, 2)  # (b, h, sk, d)
    vf = repeat_kv(v.float(), h // v.shape[2]).transpose(1, 2)
    m = torch.full((b, h, sq), float("-inf"), device=q.device)
    l = torch.zeros(b, h, sq, device=q.device)
    acc = torch.zeros(b, h, sq, v.shape[3], device=q.device)
    history = []
    for first in range(0, sk, block_size):
        cols = slice(first, min(first + block_size, sk))
        z = qf @ kf[:, :, cols].transpose(-1, -2) * scale  # (b, h, sq, block)
        if softcap > 0:
            z = softcap * torch.tanh(z / softcap)
        if bias is not None:
            z = z + bias[..., cols]
        z = z.masked_fill(~keep[..., cols], float("-inf"))
        m_new = torch.maximum(m, z.max(-1).values)
        safe = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
        alpha = torch.exp(m - safe)  # rescales the old state
        p = torch.exp(z - safe[..., None])
        l = l * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + p @ vf[:, :, cols]
        m = m_new
        if return_history:
            history.append((m.clone(), l.clone(), acc.clone()))
    empty = l == 0
    out = torch.where(empty[..., None], torch.zeros_like(acc), acc / l.clamp_min(1e-30)[..., None])
    lse = torch.where(empty, torch.full_like(m, float("inf")), m + torch.log(l.clamp_min(1e-30)))
    out = out.transpose(1, 2).to(q.dtype)
    return (out, lse, history) if return_history else (out, lse)


# --- merging states ---------------------------------------------------------------------------


def _check_state(name_out, out, name_lse, lse):
    check_float_tensor(name_out, out, ndim=4)
    check_float_tensor(name_lse, lse, ndim=3)
    b, s, h, _ = out.shape
    if tuple(lse.shape) != (b, h, s):
        raise ArgumentError(
            f"{name_lse} must have shape (batch, nheads, seqlen_q) = {(b, h, s)}, got {tuple(lse.shape)}"
        )
    if lse.device != out.device:
        raise ArgumentError(f"{name_out} and {name_lse} must be on one device, got {out.device} and {lse.device}")


def merge_states(out_a, lse_a, out_b, lse_b):
    """Merge two attention states over disjoint key sets into the state over their union.

    ``out_*``: ``(batch, seqlen_q, nheads, headdim)``; ``lse_*``: ``(batch, nheads, seqlen_q)``
    natural log. Empty states (``lse = ±inf``, out ignored) drop out; if both are empty the
    result is ``out = 0``, ``lse = +inf``. Returns ``(out, lse)`` with out in ``out_a``'s
    dtype and lse in fp32.
    """
    _check_state("out_a", out_a, "lse_a", lse_a)
    _check_state("out_b", out_b, "lse_b", lse_b)
    if out_a.shape != out_b.shape:
        raise ArgumentError(
            f"out_a and out_b must have the same shape, got {tuple(out_a.shape)} and {tuple(out_b.shape)}"
        )
    if out_a.device != out_b.device:
        raise ArgumentError(f"out_a and out_b must be on one device, got {out_a.device} and {out_b.device}")
    return merge_many(torch.stack([out_a, out_b.to(out_a.dtype)]), torch.stack([lse_a, lse_b.to(lse_a.dtype)]))


def merge_many(outs: torch.Tensor, lses: torch.Tensor):
    """n-way merge of states stacked on dim 0: ``outs (n, batch, seqlen_q, nheads, headdim)``,
    ``lses (n, batch, nheads, seqlen_q)``, ``n >= 1``. The result does not depend on the order
    of the n states (up to rounding): ``lse = M + log sum_s exp(lse_s - M)``, ``out = sum_s
    exp(lse_s - lse) out_s`` with ``M`` the largest finite ``lse_s``."""
    check_float_tensor("outs", outs, ndim=5)
    check_float_tensor("lses", lses, ndim=4)
    if outs.shape[0] == 0:
        raise ArgumentError("outs must hold at least one state (n >= 1 on dim 0), got 0")
    if lses.shape[0] != outs.shape[0]:
        raise ArgumentError(
            f"outs and lses must stack the same number of states, got {outs.shape[0]} and {lses.shape[0]}"
        )
    _check_state("outs[i]", outs[0], "lses[i]", lses[0])
    lse32 = lses.float()
    empty = torch.isinf(lse32)  # -inf (no keys) or +inf (FA's final form)
    lse32 = lse32.masked_fill(empty, float("-inf"))
    top = lse32.max(0).values
    all_empty = torch.isneginf(top)
    top = top.masked_fill(all_empty, 0.0)
    weights = torch.exp(lse32 - top)  # (n, b, h, s), 0 for empty states
    total = weights.sum(0)
    lse = torch.where(all_empty, torch.full_like(top, float("inf")), top + torch.log(total.clamp_min(1e-30)))
    w = (weights / total.clamp_min(1e-30)).permute(0, 1, 3, 2)[..., None]  # (n, b, s, h, 1)
    out = (w * outs.float().masked_fill(empty.permute(0, 1, 3, 2)[..., None], 0.0)).sum(0)
    return out.to(outs.dtype), lse


def lse_to_base2(lse: torch.Tensor) -> torch.Tensor:
    """Natural-log LSE (FlashAttention) to base-2 LSE (FlashInfer's default): ``lse * log2(e)``."""
    return lse * LOG2_E


def lse_from_base2(lse2: torch.Tensor) -> torch.Tensor:
    """Base-2 LSE back to natural log: ``lse2 * ln(2)``."""
    return lse2 / LOG2_E
