"""The oracle: attention exactly as FlashAttention defines it, computed plainly in PyTorch.

Layout is FlashAttention's: ``q`` is ``(batch, seqlen_q, nheads, headdim)``, ``k`` and ``v`` are
``(batch, seqlen_k, nheads_k, headdim)``, and query head ``h`` reads KV head
``h // (nheads // nheads_k)``.

Per batch row ``b`` the valid keys are the columns ``[leftpad_k[b], seqlens_k[b])``; their count
is ``sk = seqlens_k[b] - leftpad_k[b]`` and masks use the compacted key index
``j' = j - leftpad_k[b]``. Masks are aligned bottom-right: query row ``i`` sits on the diagonal
``i + sk - seqlen_q``. ``window_size=(left, right)`` keeps
``diag - left <= j' <= diag + right`` (``-1`` = infinite on that side); ``causal`` means
``right = 0``. A sliding window of ``W`` tokens (the current one included) is
``window_size=(W - 1, 0)``.

The mask rule itself is :mod:`flashkv_edu.masks` (shared with the backends, re-exported here).

Logits are ``z = scale * q.k``; with ``softcap > 0`` they become ``softcap * tanh(z / softcap)``;
ALiBi then adds ``-slope * |diag - j'|``. A row that sees no key returns output 0 and LSE +inf.
"""

from __future__ import annotations

import math

import torch

from .masks import alibi_distance_bias, attention_mask, key_visibility, repeat_kv, visible_keys
from .validation import (
    ArgumentError,
    check_alibi_slopes,
    check_attention_inputs,
    check_bool,
    check_int,
    check_sink,
    check_softcap,
    check_tensor,
    key_range,
    normalize_window,
    softmax_scale_for,
)

# The mask rules live in masks.py (the backends need them too and never import the oracle); they
# are part of the oracle's public face, as notebook 01 teaches them.
__all__ = [
    "alibi_bias",
    "alibi_distance_bias",
    "alibi_slopes_for",
    "attention_mask",
    "attention_ref",
    "attention_varlen_ref",
    "gqa_attention",
    "key_visibility",
    "naive_attention",
    "repeat_kv",
    "top_left_causal_mask",
    "visible_keys",
]


def top_left_causal_mask(seqlen_q: int, seqlen_k: int) -> torch.Tensor:
    """The causal mask PyTorch's ``is_causal=True`` uses: query ``i`` sees keys ``j <= i``.

    It agrees with FlashAttention's bottom-right mask only when ``seqlen_q == seqlen_k``.
    """
    return torch.ones(seqlen_q, seqlen_k, dtype=torch.bool).tril()


def alibi_slopes_for(nheads: int) -> torch.Tensor:
    """The standard ALiBi slopes ``2^(-8 (h+1) / n)`` for ``n`` heads (power-of-two recipe
    extended by interleaving, as in the ALiBi paper): fp32 ``(nheads,)``."""

    def power_of_two(n):
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    nheads = check_int("nheads", nheads, low=1)
    if math.log2(nheads).is_integer():
        slopes = power_of_two(nheads)
    else:
        closest = 2 ** math.floor(math.log2(nheads))
        slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][: nheads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(
    alibi_slopes: torch.Tensor,
    seqlen_q: int,
    seqlen_k: int,
    *,
    seqlens_k=None,
    leftpad_k=None,
    batch: int = 1,
    dtype=torch.float32,
) -> torch.Tensor:
    """ALiBi's additive bias ``-slope * |i + sk - seqlen_q - j'|``, in ``dtype`` (fp32):
    ``(batch, nheads, seqlen_q, seqlen_k)``. ``alibi_slopes`` is ``(nheads,)`` or
    ``(batch, nheads)``."""
    seqlen_q = check_int("seqlen_q", seqlen_q, low=0)
    seqlen_k = check_int("seqlen_k", seqlen_k, low=0)
    if isinstance(seqlens_k, torch.Tensor) and seqlens_k.dim() == 1:
        batch = seqlens_k.shape[0]
    elif isinstance(alibi_slopes, torch.Tensor) and alibi_slopes.dim() == 2:
        batch = alibi_slopes.shape[0]
    batch = check_int("batch", batch, low=1)
    heads = alibi_slopes.shape[-1] if isinstance(alibi_slopes, torch.Tensor) and alibi_slopes.dim() else 0
    slopes = check_alibi_slopes(alibi_slopes, batch, heads)
    start, end = key_range(seqlens_k, leftpad_k, batch, seqlen_k, device=slopes.device)
    return alibi_distance_bias(slopes, seqlen_q, seqlen_k, start, end, dtype)


def gqa_attention(q, k, v, *, mask=None, softmax_scale=None):
    """Naive attention for GQA/MQA: repeat each KV head for its group of query heads, then
    apply :func:`naive_attention`. Shapes as in :func:`attention_ref`."""
    return naive_attention(
        q,
        repeat_kv(k, q.shape[2] // k.shape[2]),
        repeat_kv(v, q.shape[2] // v.shape[2]),
        mask=mask,
        softmax_scale=softmax_scale,
    )


def attention_ref(
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
    compute_dtype=torch.float32,
    learnable_sink=None,
    attention_chunk=0,
    qv=None,
):
    """Attention with FlashAttention's semantics, computed in ``compute_dtype`` (fp32 default).

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``.
        k, v: ``(batch, seqlen_k, nheads_k, headdim)``, ``nheads_k`` dividing ``nheads``.
        softmax_scale: logit scale, default ``headdim ** -0.5``.
        causal: bottom-right causal mask (same as ``window_size[1] = 0``).
        window_size: ``(left, right)``, -1 = infinite. W-token sliding window: ``(W - 1, 0)``.
        softcap: if > 0, logits become ``softcap * tanh(logits / softcap)``.
        alibi_slopes: fp32 ``(nheads,)`` or ``(batch, nheads)``; adds ``-slope * |diag - j'|``.
        seqlens_k: int or ``(batch,)`` ints, end (exclusive) of each row's valid keys.
        leftpad_k: int or ``(batch,)`` ints, start of each row's valid keys.
        return_lse: also return the natural-log LSE of the final logits.
        compute_dtype: dtype of the arithmetic: fp32 (the oracle), fp64 (a sharper oracle)
            or q's own low precision (to estimate the natural rounding error, as
            FlashAttention's tests do).
        learnable_sink: ``(nheads,)`` logits of a sink (gpt-oss, FlashAttention 4): each row's
            softmax runs over its keys and one extra column holding the sink logit, which then
            has no value (it only takes probability away).
        attention_chunk: ``> 0``: chunked local attention (Llama 4, FlashAttention 3): a query
            sees only the keys in its own chunk of that many positions, counted on the compacted
            keys from the diagonal (``floor(diag / chunk) * chunk <= j' < that + chunk``), on
            top of causal or a window.
        qv: ``(batch, seqlen_q, nheads, headdim_v)``, a second query against the values (MLA with
            its weights absorbed, FlashAttention 3): logits become ``scale * (q.k + qv.v)``, the
            default scale ``(headdim + headdim_v) ** -0.5``.

    Returns:
        ``out`` ``(batch, seqlen_q, nheads, headdim_v)`` in q's dtype, and with ``return_lse``
        also ``lse`` ``(batch, nheads, seqlen_q)`` (fp32, fp64 when computing in fp64). Rows
        that see no key give ``out = 0`` and ``lse = +inf``; with a sink the LSE includes it
        (FlashAttention 4's convention), so such a row gives ``lse = sink``. Keys outside
        ``[leftpad_k, seqlens_k)`` are never read, so whatever they hold (NaN included) cannot
        matter.
    """
    slopes = check_attention_inputs(q, k, v, alibi_slopes)
    if compute_dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ArgumentError(f"compute_dtype must be a floating dtype, got {compute_dtype}")
    check_bool("return_lse", return_lse)
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    dv = v.shape[3]
    if qv is not None:
        check_tensor("qv", qv, ndim=4)
        if tuple(qv.shape) != (b, sq, h, dv):
            raise ArgumentError(f"qv must have shape {(b, sq, h, dv)} (q's, with v's head dim), got {tuple(qv.shape)}")
    scale = softmax_scale_for(d + (dv if qv is not None else 0), softmax_scale)
    softcap = check_softcap(softcap)
    window = normalize_window(window_size, causal)
    chunk = check_int("attention_chunk", attention_chunk, low=0)
    start, end = key_range(seqlens_k, leftpad_k, b, sk, device=q.device)
    keep = visible_keys(sq, sk, window, start, end, chunk)  # (batch, seqlen_q, seqlen_k)

    # Every query head meets its KV head; rows outside [start, end) are not keys of the sequence
    # (they may hold anything, NaN included) and are zeroed before they can touch a product.
    cols = torch.arange(sk, device=q.device)[None, :]
    owned = ((cols >= start.long()[:, None]) & (cols < end.long()[:, None]))[:, :, None, None]
    k_all = torch.where(owned, repeat_kv(k, h // hk).to(compute_dtype), 0.0)
    v_all = torch.where(owned, repeat_kv(v, h // hk).to(compute_dtype), 0.0)

    scores = torch.einsum("bihd,bjhd->bhij", q.to(compute_dtype), k_all)
    if qv is not None:  # the values are keys too, for the second query
        scores = scores + torch.einsum("bihd,bjhd->bhij", qv.to(compute_dtype), v_all)
    scores = scores * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if slopes is not None:
        scores = scores + alibi_distance_bias(slopes, sq, sk, start, end, compute_dtype)
    scores = scores.masked_fill(~keep[:, None], float("-inf"))
    if learnable_sink is not None:  # one more column: the sink's logit, with no value behind it
        sink = check_sink(learnable_sink, h, q.device).to(compute_dtype)
        scores = torch.cat([scores, sink[None, :, None, None].expand(b, h, sq, 1)], dim=-1)
        keep = torch.cat([keep, torch.ones_like(keep[..., :1])], dim=-1)
        v_all = torch.cat([v_all, torch.zeros_like(v_all[:, :1])], dim=1)
    lse = torch.logsumexp(scores, dim=-1)  # (batch, nheads, seqlen_q); -inf for a row that sees nothing
    finite_lse = torch.where(torch.isneginf(lse), 0.0, lse)
    probs = torch.where(keep[:, None], torch.exp(scores - finite_lse[..., None]), 0.0)
    out = torch.einsum("bhij,bjhd->bihd", probs, v_all).to(q.dtype)
    if not return_lse:
        return out
    lse = lse.masked_fill(torch.isneginf(lse), float("inf"))
    return out, lse.to(torch.float64 if compute_dtype == torch.float64 else torch.float32)


def attention_varlen_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, *, return_lse=False, qv=None, **options):
    """:func:`attention_ref` over variable-length sequences packed one after another, as
    FlashAttention's varlen functions take them: ``q`` ``(total_q, nheads, headdim)``, ``k``/``v``
    ``(total_k, nheads_k, headdim / headdim_v)``, sequence ``i`` the rows ``cu_seqlens_q[i] ..
    cu_seqlens_q[i + 1] - 1`` of ``q`` (and ``qv``) and ``cu_seqlens_k[i] .. cu_seqlens_k[i + 1] - 1``
    of ``k``/``v``. Each sequence is attended on its own (its mask aligned bottom-right within it).

    Returns ``out`` ``(total_q, nheads, headdim_v)``, and with ``return_lse`` the LSE
    ``(nheads, total_q)`` (FlashAttention's varlen layout)."""
    outs, lses = [], []
    bounds_q, bounds_k = [int(x) for x in cu_seqlens_q], [int(x) for x in cu_seqlens_k]
    if len(bounds_q) != len(bounds_k) or len(bounds_q) < 2:
        raise ArgumentError("cu_seqlens_q and cu_seqlens_k must both hold batch + 1 >= 2 offsets")
    for i in range(len(bounds_q) - 1):
        qs, ks = slice(bounds_q[i], bounds_q[i + 1]), slice(bounds_k[i], bounds_k[i + 1])
        one = dict(options, return_lse=True)
        if qv is not None:
            one["qv"] = qv[qs][None]
        out, lse = attention_ref(q[qs][None], k[ks][None], v[ks][None], **one)
        outs.append(out[0])
        lses.append(lse[0])
    out, lse = torch.cat(outs), torch.cat(lses, dim=1)
    return (out, lse) if return_lse else out


def naive_attention(q, k, v, *, mask=None, softmax_scale=None):
    """The textbook formula ``softmax(q k^T * scale + mask) v`` for ``(batch, seqlen, nheads,
    headdim)`` tensors with equal head counts; ``mask`` is a bool ``(seqlen_q, seqlen_k)``
    (True = keep). It materialises the full ``(batch, nheads, seqlen_q, seqlen_k)`` score
    matrix, which is the point of notebook 01."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return torch.einsum("bhij,bjhd->bihd", weights, v)
