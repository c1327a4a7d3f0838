"""Serving a model with ``flash_attn_with_kvcache`` over a paged cache (notebook 08).

* :class:`PagedContext`: the attention of :class:`~flashkv_edu.model.TinyDecoder` done by
  ``flash_attn_with_kvcache`` (new keys appended through the block table, rotary applied by
  the call, bottom-right causal mask per sequence).
* :func:`serve`: continuous batching. Requests join when they arrive (their prompt is
  prefilled, reusing cached prefix blocks), all running requests decode together one token per
  step, each at its own length, and finished requests leave, their blocks returning to the pool.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .api import flash_attn_with_kvcache
from .model import TinyDecoder
from .paged import PagedKVCache


class PagedContext:
    """Attention for ``TinyDecoder.run`` through :func:`flash_attn_with_kvcache`: layer ``l``
    reads and extends ``cache.k_pools[l]`` / ``v_pools[l]`` through the block-table rows of
    ``slots``; ``starts`` are the tokens each slot held before this step."""

    def __init__(self, cache: PagedKVCache, slots: list[int], starts: torch.Tensor, rope, backend: str):
        self.cache, self.starts, self.rope, self.backend = cache, starts, rope, backend
        self.table = cache.block_table[torch.tensor(slots, dtype=torch.long, device=cache.block_table.device)]

    def attend(self, layer, q, k, v):
        cos, sin = self.rope if self.rope is not None else (None, None)
        if cos is not None:
            cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        return flash_attn_with_kvcache(q, self.cache.k_pools[layer], self.cache.v_pools[layer], k, v,
                                       rotary_cos=cos, rotary_sin=sin, cache_seqlens=self.starts,
                                       block_table=self.table, causal=True, rotary_interleaved=False,
                                       backend=self.backend)


def new_paged_cache(model: TinyDecoder, num_blocks: int, block_size: int = 16, max_batch: int = 8,
                    max_seqlen: int | None = None) -> PagedKVCache:
    """A multi-layer :class:`PagedKVCache` sized for ``model`` (capacity per sequence at most the
    model's rotary table length)."""
    cfg = model.cfg
    max_seqlen = max_seqlen or cfg.max_seqlen
    return PagedKVCache(num_blocks, block_size, cfg.n_kv_heads, cfg.headdim, max_batch=max_batch,
                        max_blocks_per_seq=max_seqlen // block_size, dtype=model.head.weight.dtype,
                        device=model.head.weight.device, num_layers=cfg.n_layers)


@torch.no_grad()
def paged_step(model: TinyDecoder, cache: PagedKVCache, slots: list[int], tokens: list[list[int]],
               backend: str = "torch") -> torch.Tensor:
    """Run ``tokens[i]`` (equal lengths) as the next tokens of ``slots[i]``; returns logits of the
    last position of each, ``(len(slots), vocab)``."""
    n = len(tokens[0])
    starts = cache.cache_seqlens[torch.tensor(slots)].clone()
    for slot, toks in zip(slots, tokens, strict=True):
        cache.reserve(slot, n, toks)
    device = model.head.weight.device
    tok = torch.tensor(tokens, device=device)
    positions = starts.long().to(device)[:, None] + torch.arange(n, device=device)[None, :]
    ctx = PagedContext(cache, slots, starts.to(device), model.rope(), backend)
    return model.run(tok, positions, ctx)[:, -1]


@dataclass
class Request:
    """A prompt that arrives at decode step ``arrival`` and wants ``max_new_tokens``."""

    prompt: list[int]
    max_new_tokens: int
    arrival: int = 0
    output: list[int] = field(default_factory=list)
    slot: int | None = None
    cached_tokens: int = 0


@dataclass
class ServeTrace:
    """Per step: running requests, blocks in use, free blocks, and what happened."""

    running: list[int] = field(default_factory=list)
    blocks_used: list[int] = field(default_factory=list)
    blocks_free: list[int] = field(default_factory=list)
    events: list[str] = field(default_factory=list)


@torch.no_grad()
def serve(model: TinyDecoder, requests: list[Request], cache: PagedKVCache, backend: str = "torch") -> ServeTrace:
    """Continuous batching with greedy decoding. Fills each request's ``output`` and returns a
    :class:`ServeTrace`. Requests are admitted in arrival order while a slot is free."""
    pending = sorted(requests, key=lambda r: r.arrival)
    running: list[Request] = []
    trace = ServeTrace()
    step = 0
    while pending or running:
        events = []
        while pending and pending[0].arrival <= step and len(cache.seqs) < cache.max_batch:
            r = pending.pop(0)
            r.slot, r.cached_tokens = cache.add_sequence(r.prompt)
            logits = paged_step(model, cache, [r.slot], [r.prompt[r.cached_tokens:]], backend)
            r.output.append(int(logits[0].argmax()))
            running.append(r)
            events.append(f"+{r.slot}" + (f" (prefix hit {r.cached_tokens})" if r.cached_tokens else ""))
        active = [r for r in running if len(r.output) < r.max_new_tokens]
        if active:
            logits = paged_step(model, cache, [r.slot for r in active], [[r.output[-1]] for r in active], backend)
            for r, row in zip(active, logits, strict=True):
                r.output.append(int(row.argmax()))
        for r in [r for r in running if len(r.output) >= r.max_new_tokens]:
            cache.free(r.slot)
            running.remove(r)
            events.append(f"-{r.slot}")
        used = cache.allocator.num_blocks - cache.allocator.num_free
        trace.running.append(len(running))
        trace.blocks_used.append(used)
        trace.blocks_free.append(cache.allocator.num_free)
        trace.events.append(" ".join(events))
        step += 1
    return trace


def decode_step(q, k, v, k_cache, v_cache, cache_seqlens, block_table=None, **kwargs):
    """One decode step the way a caller must drive ``flash_attn_with_kvcache``: append ``k, v``
    and attend (causal), then advance the lengths **yourself** (the call does not). Returns
    ``(out, new_cache_seqlens)``. The solution of notebook 08's exercise."""
    out = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, block_table=block_table,
                                  causal=True, **kwargs)
    return out, (cache_seqlens + k.shape[1]).to(torch.int32)
