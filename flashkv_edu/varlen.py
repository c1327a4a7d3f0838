"""Variable-length queries in one ``flash_attn_with_kvcache`` call (FlashAttention 3's ``cu_seqlens_q``).

The backends take a padded batch ``(batch, seqlen_q, nheads, headdim)``. A varlen call's packed
rows ``(total_q, nheads, headdim)`` are placed **right-aligned** in it (sequence ``b``'s rows at the
bottom of its ``seqlen_q`` rows), so the padded call's bottom-right masks are each sequence's own;
the padding rows are computed and dropped. Padding a step of 8 decode rows and a 256-token chunk
to 256 rows each would multiply the work by 8: the call is split into two **groups**, the
sequences of at most one query row (decode steps) and the others, each padded to its own
longest (``KVCacheCall.groups``, counted in the call's one device read). Each group is a
:class:`~flashkv_edu.call.KVCacheCall` of its own sequences (:func:`group_calls`).
"""

from __future__ import annotations

import dataclasses

import torch

from .call import KVCacheCall
from .validation import SCALE_PER_HEAD

__all__ = ["group_calls", "pack_rows", "packed_key_index", "padded_rows", "rows_of", "scatter_rows"]


def _starts(call: KVCacheCall) -> torch.Tensor:
    return call.cu_seqlens_q[:-1].long()


def padded_rows(starts: torch.Tensor, q_lens: torch.Tensor, seqlen_q: int) -> torch.Tensor:
    """For each padded row ``(b, i)`` the packed row it holds, -1 for padding: int64 ``(batch,
    seqlen_q)``; sequence ``b``'s ``q_lens[b]`` rows from packed row ``starts[b]`` sit at the bottom."""
    i = torch.arange(seqlen_q, device=starts.device)[None, :]
    shift = (seqlen_q - q_lens.long())[:, None]
    return torch.where(i >= shift, starts[:, None] + i - shift, -1)


def pack_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Packed ``x`` ``(total, ...)`` at ``rows`` (:func:`padded_rows`): ``(batch, seqlen_q, ...)``,
    padding rows zero."""
    out = x[rows.clamp_min(0)]
    return out.masked_fill((rows < 0).view(*rows.shape, *([1] * (x.dim() - 1))), 0)


def scatter_rows(dst: torch.Tensor, x: torch.Tensor, rows: torch.Tensor) -> None:
    """Write the padded ``x`` ``(batch, seqlen_q, ...)`` back into packed ``dst`` ``(total + 1,
    ...)`` at ``rows``; padding rows land on the spare last row of ``dst``."""
    flat = torch.where(rows < 0, dst.shape[0] - 1, rows).reshape(-1)
    dst.index_copy_(0, flat, x.reshape(-1, *x.shape[2:]).to(dst.dtype))


def packed_key_index(call: KVCacheCall, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each of the ``total`` packed new keys (``cu_seqlens_k_new``): its sequence and its index
    among that sequence's new keys, int64 ``(total,)`` each."""
    cu = call.cu_seqlens_k_new.long()
    t = torch.arange(total, device=cu.device)
    seq = torch.searchsorted(cu[1:], t, right=True)
    return seq, t - cu[seq]


def rows_of(call: KVCacheCall, index: torch.Tensor):
    """The cache rows of sequences ``index``: their ``cache_batch_idx``, or of a contiguous cache
    the rows ``index`` themselves (a paged group selects its page-table rows instead)."""
    if call.batch_rows is not None:
        return call.batch_rows.index_select(0, index)
    return None if call.block_table is not None else index.to(torch.int32)


def _select(t, index):
    return None if t is None else t.index_select(0, index)


def group_calls(call: KVCacheCall) -> list[tuple[KVCacheCall, torch.Tensor, torch.Tensor]]:
    """The attention of a varlen call (its keys already appended) as one or two padded calls:
    ``[(sub-call, padded rows (batch_g, seqlen_q_g) into the packed q, the group's q_lens)]``. Each sub-call holds its
    sequences' rows of every per-sequence tensor and its own host numbers."""
    short, first, (a_lo, a_hi), (b_lo, b_hi) = call.groups
    if short in (0, call.batch) or call.seqlen_q == 1:
        sub = dataclasses.replace(call, q_lens=None, cu_seqlens_q=None, knew=None, cu_seqlens_k_new=None, groups=None)
        return [(sub, padded_rows(_starts(call), call.q_lens, call.seqlen_q), call.q_lens)]
    per_head = call.scale_mode == SCALE_PER_HEAD  # descales per (sequence, KV head)
    is_long = (call.q_lens > 1).int()
    order = torch.argsort(is_long, stable=True)  # the short sequences first, no device read
    out = []
    groups = ((order[:short], short, 1, a_lo, a_hi), (order[short:], call.batch - short, call.seqlen_q, b_lo, b_hi))
    for g, (index, n, sq, lo, hi) in enumerate(groups):
        table = None if call.block_table is None else call.block_table.index_select(0, index)
        slopes = call.alibi_slopes
        if slopes is not None and slopes.dim() == 2:
            slopes = slopes.index_select(0, index)
        sub = dataclasses.replace(
            call,
            batch=n,
            seqlen_q=sq,
            seqlens=_select(call.seqlens, index),
            ends=_select(call.ends, index),
            leftpad=_select(call.leftpad, index),
            # decode rows that come first in a contiguous cache are its first rows: read in place
            batch_rows=None if g == 0 and first and call.batch_rows is None else rows_of(call, index),
            block_table=table,
            alibi_slopes=slopes,
            k_descale=_select(call.k_descale, index) if per_head else call.k_descale,
            v_descale=_select(call.v_descale, index) if per_head else call.v_descale,
            q_descale=_select(call.q_descale, index),
            rotary_base=_select(call.rotary_base, index),
            max_end=hi,
            min_end=lo,
            q_lens=None,
            cu_seqlens_q=None,
            knew=None,
            cu_seqlens_k_new=None,
            groups=None,
        )
        q_lens = call.q_lens.index_select(0, index)
        out.append((sub, padded_rows(_starts(call).index_select(0, index), q_lens, sq), q_lens))
    return out
