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

Logits are ``z = scale * q.k``; with ``softcap > 0`` they become ``softcap * tanh(z / softcap)``;
ALiBi then adds ``-slope * |diag - j'|``. A row that sees no key returns output 0 and LSE +inf.
"""

from __future__ import annotations

import math

import torch

from .validation import (
    FLOAT_DTYPES,
    check_alibi_slopes,
    check_lengths,
    check_positive,
    check_same,
    check_tensor,
    check_window,
)


def key_visibility(seqlen_q: int, seqlen_k: int, *, causal: bool = False,
                   window_size=(-1, -1), seqlens_k=None, leftpad_k=None,
                   batch: int = 1, device=None) -> torch.Tensor:
    """Which keys each query may see: bool ``(batch, seqlen_q, seqlen_k)``, True = visible.

    ``seqlens_k`` / ``leftpad_k`` (int or ``(batch,)`` ints) give each row's valid key columns
    ``[leftpad_k, seqlens_k)``; by default all ``seqlen_k`` columns are valid.
    """
    left, right = check_window(window_size)
    if causal:
        right = 0
    if seqlens_k is None:
        seqlens_k = seqlen_k
    if leftpad_k is None:
        leftpad_k = 0
    if isinstance(seqlens_k, torch.Tensor):
        batch = seqlens_k.shape[0]
        device = device or seqlens_k.device
    end = check_lengths("seqlens_k", seqlens_k, batch, high=seqlen_k, device=device)
    start = check_lengths("leftpad_k", leftpad_k, batch, device=end.device)
    if bool((start > end).any()):
        raise ValueError(f"leftpad_k must be <= seqlens_k, got {start.tolist()} > {end.tolist()}")
    end = end.long()[:, None, None]
    start = start.long()[:, None, None]
    col = torch.arange(seqlen_k, device=end.device)[None, None, :]
    row = torch.arange(seqlen_q, device=end.device)[None, :, None]
    compact = col - start
    diag = row + (end - start) - seqlen_q
    keep = (col >= start) & (col < end)
    if right >= 0:
        keep = keep & (compact <= diag + right)
    if left >= 0:
        keep = keep & (compact >= diag - left)
    return keep


def attention_mask(seqlen_q: int, seqlen_k: int, *, causal: bool = False,
                   window_size=(-1, -1)) -> torch.Tensor:
    """FlashAttention's bottom-right mask for one sequence: bool ``(seqlen_q, seqlen_k)``."""
    return key_visibility(seqlen_q, seqlen_k, causal=causal, window_size=window_size)[0]


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

    if nheads <= 0:
        raise ValueError(f"nheads must be > 0, got {nheads}")
    if math.log2(nheads).is_integer():
        slopes = power_of_two(nheads)
    else:
        closest = 2 ** math.floor(math.log2(nheads))
        slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][: nheads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(alibi_slopes: torch.Tensor, seqlen_q: int, seqlen_k: int, *, seqlens_k=None,
               leftpad_k=None, batch: int = 1, dtype=torch.float32) -> torch.Tensor:
    """ALiBi's additive bias ``-slope * |i + sk - seqlen_q - j'|``, in ``dtype`` (fp32):
    ``(batch, nheads, seqlen_q, seqlen_k)``. ``alibi_slopes`` is ``(nheads,)`` or
    ``(batch, nheads)``."""
    if isinstance(seqlens_k, torch.Tensor):
        batch = seqlens_k.shape[0]
    device = alibi_slopes.device
    end = check_lengths("seqlens_k", seqlen_k if seqlens_k is None else seqlens_k, batch,
                        high=seqlen_k, device=device).long()
    start = check_lengths("leftpad_k", 0 if leftpad_k is None else leftpad_k, batch,
                          device=device).long()
    col = torch.arange(seqlen_k, device=device)[None, None, :]
    row = torch.arange(seqlen_q, device=device)[None, :, None]
    diag = row + (end - start)[:, None, None] - seqlen_q
    distance = (diag - (col - start[:, None, None])).abs().to(dtype)  # (batch, sq, sk)
    slopes = alibi_slopes.to(dtype)
    if slopes.dim() == 1:
        slopes = slopes[None, :].expand(batch, -1)
    return -slopes[:, :, None, None] * distance[:, None, :, :]


def repeat_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    """Expand ``(batch, seqlen, nheads_k, headdim)`` to ``nheads_k * group`` heads so that
    query head ``h`` meets KV head ``h // group`` (consecutive query heads share a KV head)."""
    return x.repeat_interleave(group, dim=2)


def gqa_attention(q, k, v, *, mask=None, softmax_scale=None):
    """Naive attention for GQA/MQA: repeat each KV head for its group of query heads, then
    apply :func:`naive_attention`. Shapes as in :func:`attention_ref`."""
    return naive_attention(q, repeat_kv(k, q.shape[2] // k.shape[2]),
                           repeat_kv(v, q.shape[2] // v.shape[2]), mask=mask,
                           softmax_scale=softmax_scale)


def _check_attention_inputs(q, k, v, alibi_slopes):
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("v", v, ndim=4, dtypes=FLOAT_DTYPES)
    check_same(("q", "k", "v"), (q, k, v), "dtype")
    check_same(("q", "k", "v"), (q, k, v), "device")
    b, _, h, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"q, k, v must share the batch size; got {q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError("k and v must agree in (batch, seqlen_k, nheads_k); "
                         f"got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[3] != d:
        raise ValueError(f"k must have q's head dim {d}, got {k.shape[3]}")
    hk = k.shape[2]
    if hk == 0 or h % hk != 0:
        raise ValueError(f"nheads_k ({hk}) must divide nheads ({h}) (MHA, GQA or MQA)")
    if alibi_slopes is not None:
        check_alibi_slopes(alibi_slopes, b, h)


def attention_ref(q, k, v, *, softmax_scale=None, causal=False, window_size=(-1, -1),
                  softcap=0.0, alibi_slopes=None, seqlens_k=None, leftpad_k=None,
                  return_lse=False, compute_dtype=torch.float32):
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

    Returns:
        ``out`` ``(batch, seqlen_q, nheads, headdim)`` in q's dtype, and with ``return_lse``
        also ``lse`` ``(batch, nheads, seqlen_q)`` (fp32, fp64 when computing in fp64). Rows
        that see no key give ``out = 0`` and ``lse = +inf``.
    """
    _check_attention_inputs(q, k, v, alibi_slopes)
    if compute_dtype not in FLOAT_DTYPES:
        raise TypeError(f"compute_dtype must be a floating dtype, got {compute_dtype}")
    b, sq, h, d = q.shape
    sk_cap, hk = k.shape[1], k.shape[2]
    scale = d**-0.5 if softmax_scale is None else check_positive("softmax_scale", softmax_scale)
    softcap = check_positive("softcap", softcap, allow_zero=True)
    keep = key_visibility(sq, sk_cap, causal=causal, window_size=window_size,
                          seqlens_k=seqlens_k, leftpad_k=leftpad_k, batch=b, device=q.device)
    if keep.shape[0] != b:
        raise ValueError(f"seqlens_k must have shape ({b},), got ({keep.shape[0]},)")

    qf = q.to(compute_dtype)
    kf = repeat_kv(k.to(compute_dtype), h // hk)
    vf = repeat_kv(v.to(compute_dtype), h // hk)
    logits = torch.einsum("bihd,bjhd->bhij", qf, kf) * scale
    if softcap > 0:
        logits = softcap * torch.tanh(logits / softcap)
    if alibi_slopes is not None:
        bias = alibi_bias(alibi_slopes, sq, sk_cap, seqlens_k=seqlens_k, leftpad_k=leftpad_k,
                          batch=b, dtype=torch.promote_types(compute_dtype, torch.float32))
        logits = logits + bias.to(compute_dtype)
    logits = logits.masked_fill(~keep[:, None], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # -inf where a row sees nothing
    empty = torch.isneginf(lse)
    probs = torch.exp(logits - lse.masked_fill(empty, 0.0)[..., None])
    out = torch.einsum("bhij,bjhd->bihd", probs, vf).to(q.dtype)
    if not return_lse:
        return out
    lse_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
    lse = lse.to(lse_dtype).masked_fill(empty, float("inf"))
    return out, lse


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
