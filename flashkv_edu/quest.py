"""A hierarchical KV cache: per-page key summaries choose the pages a query reads (notebook 13).

Two granularities over one paged cache: the tokens themselves, and for each page of
``block_size`` tokens a summary, the smallest and the largest value of every key channel
(Quest, arXiv 2406.10774). For a query ``q`` no key ``k`` of the page can score more than

$$ u = \\sum_c \\max(q_c \\min_c, q_c \\max_c) \\ge q \\cdot k, $$

so the pages with the largest bounds are the ones worth reading. A decode step reads the
``recent`` last pages exactly (the page being written is among them) and the best
``budget - recent`` of the others, through a shorter block table: the same
``flash_attn_with_kvcache`` call, fewer pages. With a budget of every page it is the dense call.

Quest chooses pages per head; here one choice serves every head of a sequence (the block table
is per sequence): a page's score is its largest bound over the query heads.
"""

from __future__ import annotations

import torch

from .api import flash_attn_with_kvcache
from .cache import write_kv
from .paged import PagedKVCache
from .rotary import apply_rotary
from .validation import ArgumentError, check_int, check_tensor

__all__ = [
    "QuestContext",
    "page_bounds",
    "page_summaries",
    "quest_attention",
    "quest_nll",
    "retrieval_accuracy",
    "select_pages",
    "summary_bytes",
]


def page_summaries(k_pool: torch.Tensor, table: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel-wise min and max of the keys of each page of one sequence: ``k_pool`` ``(pages,
    block_size, nheads_k, headdim)``, ``table`` its block-table row, ``length`` its tokens.
    Returns ``(mins, maxs)``, each ``(n_pages, nheads_k, headdim)`` (the last page over its
    filled slots only)."""
    bs = k_pool.shape[1]
    n_pages = -(-length // bs)
    keys = k_pool[table[:n_pages].long()].float()  # (n_pages, bs, nheads_k, headdim)
    filled = (torch.arange(n_pages * bs, device=keys.device) < length).view(n_pages, bs, 1, 1)
    mins = keys.masked_fill(~filled, float("inf")).amin(1)
    maxs = keys.masked_fill(~filled, float("-inf")).amax(1)
    return mins, maxs


def page_bounds(q: torch.Tensor, mins: torch.Tensor, maxs: torch.Tensor) -> torch.Tensor:
    """Quest's upper bound of ``q . k`` over each page's keys, the largest over the query heads:
    ``q`` ``(nheads, headdim)`` (one query token), summaries ``(n_pages, nheads_k, headdim)``.
    Returns ``(n_pages,)``."""
    nheads, nheads_k = q.shape[0], mins.shape[1]
    group = nheads // nheads_k
    qf = q.float()[None]  # (1, nheads, headdim)
    lo = mins.repeat_interleave(group, dim=1)
    hi = maxs.repeat_interleave(group, dim=1)
    return torch.maximum(qf * lo, qf * hi).sum(-1).amax(-1)


def select_pages(bounds: torch.Tensor, budget: int, recent: int = 1) -> list[int]:
    """The pages to read, in order: the last ``recent`` pages always, then the others with the
    largest ``bounds`` until ``budget`` pages (all of them when ``budget`` covers every page)."""
    n = bounds.shape[0]
    budget = check_int("budget", budget, low=1)
    recent = check_int("recent", recent, low=1)
    if recent > budget:
        raise ArgumentError(f"recent ({recent}) must not exceed budget ({budget})")
    if budget >= n:
        return list(range(n))
    keep = set(range(max(n - recent, 0), n))
    rest = bounds[: max(n - recent, 0)]
    keep |= set(torch.topk(rest, budget - len(keep)).indices.tolist())
    return sorted(keep)


def summary_bytes(n_pages: int, nheads_k: int, headdim: int, itemsize: int = 4) -> int:
    """Bytes of the page summaries: a min and a max per channel, head and page."""
    return 2 * n_pages * nheads_k * headdim * itemsize


def quest_attention(q, k_pool, v_pool, block_table, cache_seqlens, budget: int, recent: int = 1, **kwargs):
    """Decode attention that reads, per sequence, only the pages :func:`select_pages` picks:
    ``q`` ``(batch, 1, nheads, headdim)`` (rotated already), the paged cache as
    ``flash_attn_with_kvcache`` takes it (every key written). Returns ``(out, pages)``: the
    output ``(batch, 1, nheads, headdim_v)`` and the pages read per sequence."""
    check_tensor("q", q, ndim=4)
    if q.shape[1] != 1:
        raise ArgumentError(f"quest_attention is a decode step: q must hold one token per sequence, got {q.shape[1]}")
    bs = k_pool.shape[1]
    lengths = [int(n) for n in cache_seqlens.tolist()]
    chosen, rows, seen = [], [], []
    for b, n in enumerate(lengths):
        if n == 0:
            raise ArgumentError(f"cache_seqlens[{b}] is 0: a step must see at least its own key")
        mins, maxs = page_summaries(k_pool, block_table[b], n)
        pages = select_pages(page_bounds(q[b, 0], mins, maxs), budget, recent)
        chosen.append(pages)
        rows.append(block_table[b][torch.tensor(pages, dtype=torch.long)])
        last = n - (-(-n // bs) - 1) * bs  # tokens on the last page (always read)
        seen.append((len(pages) - 1) * bs + last)
    width = max(len(r) for r in rows)
    table = torch.zeros(len(rows), width, dtype=torch.int32, device=block_table.device)
    for b, r in enumerate(rows):
        table[b, : len(r)] = r
    lens = torch.tensor(seen, dtype=torch.int32, device=cache_seqlens.device)
    out = flash_attn_with_kvcache(q, k_pool, v_pool, cache_seqlens=lens, block_table=table, causal=True, **kwargs)
    return out, chosen


class QuestContext:
    """Attention for ``TinyDecoder.run``, one token per sequence per step, over a multi-layer
    :class:`~flashkv_edu.paged.PagedKVCache` whose ``reserve`` for the step was done: rotary at
    the absolute positions, every key written, the pages read chosen by :func:`quest_attention`.
    ``pages_read`` counts the pages read (summed over layers and sequences)."""

    def __init__(self, cache: PagedKVCache, slots: list[int], positions, rope, budget: int, recent: int = 1):
        self.cache, self.positions, self.rope, self.budget, self.recent = cache, positions, rope, budget, recent
        index = torch.tensor(slots, dtype=torch.long)
        self.table, self.lengths = cache.block_table[index], cache.cache_seqlens[index]
        self.pages_read = 0
        self.chosen: dict[int, list[list[int]]] = {}

    def attend(self, layer, q, k, v):
        q, k = apply_rotary(q, *self.rope, self.positions), apply_rotary(k, *self.rope, self.positions)
        pools = self.cache.k_pools[layer], self.cache.v_pools[layer]
        write_kv(*pools, k, v, self.lengths - k.shape[1], block_table=self.table)
        out, pages = quest_attention(q, *pools, self.table, self.lengths, self.budget, self.recent)
        self.pages_read += sum(len(p) for p in pages)
        self.chosen[layer] = pages
        return out


@torch.no_grad()
def quest_nll(model, tokens, budget: int, recent: int = 1, block_size: int = 16) -> tuple[torch.Tensor, int]:
    """Per-token negative log-likelihood (nats) of ``tokens`` ``(batch, n)`` (tokens 1 .. n-1 of
    each row) decoded one token at a time with :class:`QuestContext` (``budget`` pages per step,
    ``recent`` of them the last), and the pages read in all. A budget of every page is dense
    decoding."""
    from .steps import new_paged_cache

    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if tokens.dim() == 1:
        tokens = tokens[None]
    b, n = tokens.shape
    cache = new_paged_cache(model, b * -(-n // block_size) + 1, block_size, max_batch=b)
    slots = [cache.add_sequence()[0] for _ in range(b)]
    rope, logits, read = model.rope(), [], 0
    for t in range(n):
        for row, slot in enumerate(slots):
            cache.reserve(slot, 1, [int(tokens[row, t])])
        pos = torch.full((b, 1), t)
        ctx = QuestContext(cache, slots, pos, rope, budget, recent)
        logits.append(model.run(tokens[:, t : t + 1], pos, ctx)[:, -1])
        read += ctx.pages_read
    logp = torch.log_softmax(torch.stack(logits[:-1], 1).float(), -1)
    return -logp.gather(-1, tokens[:, 1:, None])[..., 0], read


def retrieval_accuracy(budgets, n_keys: int = 512, headdim: int = 32, block_size: int = 16, queries: int = 256,
                       sharpness: float = 4.0, seed: int = 0) -> list[dict]:  # fmt: skip
    """A key -> value lookup through attention: ``n_keys`` random unit keys with random values in
    a paged cache; query ``i`` is ``sharpness * sqrt(headdim)`` times key ``j_i`` (a random one). It
    is answered right when the output is closest to value ``j_i``. Per budget (pages read per
    query, the last page always): accuracy, and bytes read (pages of keys and values, plus the
    summaries) against reading every page."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.nn.functional.normalize(torch.randn(n_keys, 1, headdim, generator=g), dim=-1)
    values = torch.nn.functional.normalize(torch.randn(n_keys, 1, headdim, generator=g), dim=-1)
    n_pages = -(-n_keys // block_size)
    perm = torch.randperm(n_pages, generator=g).to(torch.int32)  # pages scattered through the pool
    k_pool = torch.zeros(n_pages, block_size, 1, headdim)
    v_pool = torch.zeros_like(k_pool)
    write_kv(k_pool, v_pool, keys[None], values[None], torch.zeros(1, dtype=torch.int32), block_table=perm[None])
    targets = torch.randint(0, n_keys, (queries,), generator=g)
    q = (sharpness * headdim**0.5 * keys[targets])[:, None]  # (queries, 1, 1, headdim)
    table = perm[None].expand(queries, n_pages).contiguous()
    lens = torch.full((queries,), n_keys, dtype=torch.int32)
    page_bytes = 2 * block_size * headdim * 4
    rows = []
    for budget in budgets:
        out, pages = quest_attention(q, k_pool, v_pool, table, lens, budget)
        answer = (out[:, 0, 0] @ values[:, 0].T).argmax(-1)
        read = sum(len(p) for p in pages) * page_bytes + queries * summary_bytes(n_pages, 1, headdim)
        rows.append(dict(budget=min(budget, n_pages), accuracy=float((answer == targets).float().mean()),
                         bytes=read, dense_bytes=queries * n_pages * page_bytes))  # fmt: skip
    return rows
