"""The mask and head rules every attention in the package shares (notebook 01).

Which keys a query row sees (FlashAttention's bottom-right masks over each row's valid keys),
ALiBi's distance bias and how query heads meet their KV head. The oracle
(:mod:`flashkv_edu.reference`), the blockwise PyTorch attention of notebook 04 and the forward
kernel's tile schedule all read these rules from here, so that none of them imports another.

Per batch row ``b`` the valid keys are the columns ``[start[b], end[b])``; masks use the
compacted key index ``j' = j - start[b]``, and query row ``i`` sits on the diagonal
``i + sk - seqlen_q`` with ``sk = end[b] - start[b]``. ``window = (left, right)`` keeps
``diag - left <= j' <= diag + right`` (-1 = infinite on that side; causal is ``right = 0``). A
sliding window of ``W`` tokens (the current one included) is ``window_size=(W - 1, 0)``.
"""

from __future__ import annotations

import torch

from .validation import check_int, key_range, normalize_window

__all__ = ["alibi_distance_bias", "attention_mask", "key_visibility", "repeat_kv", "visible_keys"]


def visible_keys(
    seqlen_q: int,
    seqlen_k: int,
    window: tuple[int, int],
    start: torch.Tensor,
    end: torch.Tensor,
    chunk: int = 0,
) -> torch.Tensor:
    """The mask rule itself, on arguments already normalised: bool ``(batch, seqlen_q, seqlen_k)``.

    Row ``b`` has valid key columns ``[start[b], end[b])`` (int ``(batch,)``); ``window =
    (left, right)`` with -1 for infinite (causal already folded into ``right = 0``). Query row
    ``i`` sits on the diagonal ``i + sk - seqlen_q`` of the compacted keys ``j' = j - start``.
    ``chunk > 0`` (FlashAttention 3's ``attention_chunk``, Llama 4's chunked attention) also keeps
    only the keys of the diagonal's chunk: ``floor(diag / chunk) * chunk <= j' < that + chunk``.
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
    if chunk > 0:
        first = torch.div(diag, chunk, rounding_mode="floor") * chunk
        keep = keep & (compact >= first) & (compact < first + chunk)
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


def repeat_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    """Expand ``(batch, seqlen, nheads_k, headdim)`` to ``nheads_k * group`` heads so that
    query head ``h`` meets KV head ``h // group`` (consecutive query heads share a KV head)."""
    return x.repeat_interleave(group, dim=2)
