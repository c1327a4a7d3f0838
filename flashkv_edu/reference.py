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
    ArgumentError,
    check_alibi_slopes,
    check_bool,
    check_float_tensor,
    check_int,
    check_qkv_shapes,
    check_same,
    check_softcap,
    key_range,
    normalize_window,
    softmax_scale_for,
)


def visible_keys(
    seqlen_q: int, seqlen_k: int, window: tuple[int, int], start: torch.Tensor, end: torch.Tensor
) -> torch.Tensor:
    """The mask rule itself, on arguments already normalised: bool ``(batch, seqlen_q, seqlen_k)``.

    Row ``b`` has valid key columns ``[start[b], end[b])`` (int ``(batch,)``); ``window =
    (left, right)`` with -1 for infinite (causal already folded into ``right = 0``). Query row
    ``i`` sits on the diagonal ``i + sk - seqlen_q`` of the compacted keys ``j' = j - start``.
    """
    left, right = window
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


def key_visibility(
    seqlen_q: int,
    seqlen_k: int,
    *,
    causal: bool = False,
    window_size=(-1, -1),
    seqlens_k=None,
    leftpad_k=None,
    batch: int = 1,
    device=None,
) -> torch.Tensor:
    """Which keys each query may see: bool ``(batch, seqlen_q, seqlen_k)``, True = visible.

    ``seqlens_k`` / ``leftpad_k`` (int or ``(batch,)`` ints) give each row's valid key columns
    ``[leftpad_k, seqlens_k)``; by default all ``seqlen_k`` columns are valid.
    """
    seqlen_q = check_int("seqlen_q", seqlen_q, low=0)
    seqlen_k = check_int("seqlen_k", seqlen_k, low=0)
    window = normalize_window(window_size, causal)
    if isinstance(seqlens_k, torch.Tensor):
        batch = seqlens_k.shape[0] if seqlens_k.dim() == 1 else batch
        device = device or seqlens_k.device
    batch = check_int("batch", batch, low=1)
    start, end = key_range(seqlens_k, leftpad_k, batch, seqlen_k, device=device)
    return visible_keys(seqlen_q, seqlen_k, window, start, end)


def attention_mask(seqlen_q: int, seqlen_k: int, *, causal: bool = False, window_size=(-1, -1)) -> torch.Tensor:
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

    nheads = check_int("nheads", nheads, low=1)
    if math.log2(nheads).is_integer():
        slopes = power_of_two(nheads)
    else:
        closest = 2 ** math.floor(math.log2(nheads))
        slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][: nheads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_distance_bias(
    slopes: torch.Tensor, seqlen_q: int, seqlen_k: int, start: torch.Tensor, end: torch.Tensor, dtype=torch.float32
) -> torch.Tensor:
    """The ALiBi rule on normalised arguments: ``-slope * |i + sk - seqlen_q - j'|`` as
    ``(batch, nheads, seqlen_q, seqlen_k)`` in ``dtype``; ``slopes`` ``(nheads,)`` or
    ``(batch, nheads)``, ``start``/``end`` int ``(batch,)``."""
    batch = end.shape[0]
    start, end = start.long(), end.long()
    col = torch.arange(seqlen_k, device=end.device)[None, None, :]
    row = torch.arange(seqlen_q, device=end.device)[None, :, None]
    diag = row + (end - start)[:, None, None] - seqlen_q
    distance = (diag - (col - start[:, None, None])).abs().to(dtype)  # (batch, sq, sk)
    slopes = slopes.to(device=end.device, dtype=dtype)
    if slopes.dim() == 1:
        slopes = slopes[None, :].expand(batch, -1)
    return -slopes[:, :, None, None] * distance[:, None, :, :]


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


def repeat_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    """Expand ``(batch, seqlen, nheads_k, headdim)`` to ``nheads_k * group`` heads so that
    query head ``h`` meets KV head ``h // group`` (consecutive query heads share a KV head)."""
    return x.repeat_interleave(group, dim=2)


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


def check_attention_inputs(
    q, k, v, alibi_slopes=None, *, max_headdim: int | None = None, value_headdim_may_differ: bool = True
):
    """The shared checks of ``attention_ref``-style entry points: q ``(batch, seqlen_q, nheads,
    headdim)``, k ``(batch, seqlen_k, nheads_k, headdim)`` and v ``(batch, seqlen_k, nheads_k,
    headdim_v)`` floating tensors of one dtype and device, ``nheads_k`` dividing ``nheads``.
    Returns the contiguous ALiBi slopes (or None)."""
    check_float_tensor("q", q, ndim=4)
    check_float_tensor("k", k, ndim=4)
    check_float_tensor("v", v, ndim=4)
    check_same(("q", "k", "v"), (q, k, v), "dtype")
    check_same(("q", "k", "v"), (q, k, v), "device")
    b = q.shape[0]
    if b == 0:
        raise ArgumentError("q must have batch size >= 1, got 0")
    if k.shape[0] != b or v.shape[0] != b:
        raise ArgumentError(f"q, k, v must share the batch size; got {q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
    check_qkv_shapes(q, k, v, max_headdim=max_headdim, value_headdim_may_differ=value_headdim_may_differ)
    if alibi_slopes is None:
        return None
    return check_alibi_slopes(alibi_slopes, b, q.shape[2])


def _valid_rows(seqlen_k: int, start: torch.Tensor, end: torch.Tensor):
    """bool ``(batch, seqlen_k)``: which key rows lie in each sequence's ``[start, end)``; None
    when all of them do."""
    cols = torch.arange(seqlen_k, device=start.device)[None, :]
    valid = (cols >= start.long()[:, None]) & (cols < end.long()[:, None])
    return None if bool(valid.all()) else valid


def _zero_invalid_rows(v: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """``v`` ``(batch, seqlen_k, ...)`` with the rows outside each sequence's ``[start, end)``
    set to 0 (a new tensor only when some row is invalid). Masked keys get probability 0, but
    0 * NaN is NaN: rows that hold no token (a cache made with ``torch.empty``) must never
    reach the output."""
    valid = _valid_rows(v.shape[1], start, end)
    if valid is None:
        return v
    valid = valid.view(*valid.shape, *[1] * (v.dim() - 2))
    return torch.where(valid, v, torch.zeros((), dtype=v.dtype, device=v.device))


def _kv_head(x, j: int, lo: int, s: int, dtype) -> torch.Tensor:
    """KV head ``j`` of ``x`` over key columns ``[lo, lo + s)``: ``(batch, s, headdim)`` in
    ``dtype``. ``x`` is a ``(batch, seqlen_k, nheads_k, headdim)`` tensor, read in place, or an
    object with ``shape`` and ``head(j)`` that produces one head on demand (the API's paged
    pool, gathered one head at a time)."""
    part = x.head(j) if hasattr(x, "head") else x[:, :, j]
    return part[:, lo : lo + s].to(dtype)  # no copy when equal


def attention_core(
    q,
    k,
    v,
    *,
    scale: float,
    window: tuple[int, int],
    softcap: float,
    alibi_slopes,
    start: torch.Tensor,
    end: torch.Tensor,
    compute_dtype=torch.float32,
):
    """The one PyTorch attention computation, on arguments already checked and normalised.

    q ``(batch, seqlen_q, nheads, headdim)``; k ``(batch, seqlen_k, nheads_k, headdim)``, v
    ``(batch, seqlen_k, nheads_k, headdim_v)`` (any strides, or head-at-a-time readers, see
    :func:`_kv_head`); row ``b`` reads only keys ``[start[b], end[b])``; ``window`` is
    ``(left, right)`` with causal folded in. Logits ``scale * q.k``, then
    ``softcap * tanh(z / softcap)`` when ``softcap > 0``, then ALiBi ``-slope * |diag - j'|``,
    then the mask.

    Each KV head's group of query heads is one batched matmul over that head's keys, read in
    place. Only the columns ``[min start, max end)`` are touched; when every query sees every
    one of them (a plain decode step) no mask is built. Returns ``out`` (q's dtype) and ``lse``
    ``(batch, nheads, seqlen_q)`` in ``compute_dtype``; a row that sees no key gives out 0 and
    lse +inf.
    """
    b, sq, h, d = q.shape
    hk, dv = k.shape[2], v.shape[3]
    g = h // hk
    lo, hi = int(start.min()), int(end.max())
    s = max(hi - lo, 0)
    start, end = start - lo, end - lo
    sees_all = (
        s > 0
        and int(start.max()) == 0
        and int(end.min()) == s
        and (window[0] < 0 or window[0] >= s - 1)
        and (window[1] < 0 or window[1] >= sq - 1)
    )
    valid = None if sees_all else _valid_rows(s, start, end)

    def v_head(j):
        vj = _kv_head(v, j, lo, s, compute_dtype)
        return vj if valid is None else torch.where(valid[:, :, None], vj, torch.zeros((), dtype=vj.dtype))

    # Rows of one KV head's group are (query head, query token) pairs.
    qf = q.to(compute_dtype).view(b, sq, hk, g, d).permute(0, 2, 3, 1, 4).reshape(b, hk, g * sq, d)
    z = torch.stack([torch.bmm(qf[:, j], _kv_head(k, j, lo, s, compute_dtype).transpose(1, 2)) for j in range(hk)], 1)
    z = z.view(b, hk, g, sq, s) * scale
    if softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    if alibi_slopes is not None:
        bias = alibi_distance_bias(alibi_slopes, sq, s, start, end, torch.promote_types(compute_dtype, torch.float32))
        z = z + bias.to(compute_dtype).view(b, hk, g, sq, s)
    if not sees_all:
        keep = visible_keys(sq, s, window, start, end)  # (b, sq, s)
        z = z.masked_fill(~keep[:, None, None], float("-inf"))
    lse = torch.logsumexp(z, dim=-1)  # -inf where a row sees nothing
    empty = None if sees_all else torch.isneginf(lse)
    p = torch.exp(z - (lse if sees_all else lse.masked_fill(empty, 0.0))[..., None]).view(b, hk, g * sq, s)
    out = torch.stack([torch.bmm(p[:, j], v_head(j)) for j in range(hk)], 1).view(b, hk, g, sq, dv)
    out = out.permute(0, 3, 1, 2, 4).reshape(b, sq, h, dv).to(q.dtype)
    if not sees_all:
        lse = lse.masked_fill(empty, float("inf"))
    return out, lse.reshape(b, h, sq)


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

    Returns:
        ``out`` ``(batch, seqlen_q, nheads, headdim)`` in q's dtype, and with ``return_lse``
        also ``lse`` ``(batch, nheads, seqlen_q)`` (fp32, fp64 when computing in fp64). Rows
        that see no key give ``out = 0`` and ``lse = +inf``. Keys outside ``[leftpad_k,
        seqlens_k)`` are never read, so whatever they hold (NaN included) cannot matter.
    """
    slopes = check_attention_inputs(q, k, v, alibi_slopes)
    if compute_dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ArgumentError(f"compute_dtype must be a floating dtype, got {compute_dtype}")
    check_bool("return_lse", return_lse)
    b, sq, h, d = q.shape
    scale = softmax_scale_for(d, softmax_scale)
    softcap = check_softcap(softcap)
    window = normalize_window(window_size, causal)
    start, end = key_range(seqlens_k, leftpad_k, b, k.shape[1], device=q.device)
    out, lse = attention_core(
        q,
        k,
        v,
        scale=scale,
        window=window,
        softcap=softcap,
        alibi_slopes=slopes,
        start=start,
        end=end,
        compute_dtype=compute_dtype,
    )
    if not return_lse:
        return out
    return out, lse.to(torch.float64 if compute_dtype == torch.float64 else torch.float32)


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
