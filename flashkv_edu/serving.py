"""Serving a model with ``flash_attn_with_kvcache`` over a paged cache (notebooks 08 and 11).

* :class:`PagedContext`: the attention of :class:`~flashkv_edu.model.TinyDecoder` done by
  ``flash_attn_with_kvcache`` (new keys appended through the block table, rotary applied by
  the call, bottom-right causal mask per sequence).
* :func:`serve`: continuous batching. Requests join when they arrive and fit (their prompt is
  prefilled, reusing cached prefix blocks), all running requests decode together one token per
  step, each at its own length, and finished requests leave, their blocks returning to the pool.
  When the pool runs out of blocks, the latest request is preempted by recompute or swap
  (notebook 11) and rejoins later with the same tokens.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from .api import flash_attn_with_kvcache
from .model import TinyDecoder
from .offload import KVLostError, StoreFullError
from .paged import OutOfBlocksError, PagedKVCache, SwappedSequence, token_ids
from .runtime import resolve_backend
from .validation import ArgumentError, ArgumentTypeError, check_int, check_positive

__all__ = [
    "PREEMPTION_MODES",
    "PagedContext",
    "Request",
    "ServeTrace",
    "decode_step",
    "new_paged_cache",
    "paged_step",
    "serve",
]


def _check_tokens(model: TinyDecoder, name: str, tokens) -> list[int]:
    ids = token_ids(name, tokens)
    vocab = model.cfg.vocab_size
    if any(t >= vocab for t in ids):
        raise ArgumentError(f"{name} holds token ids >= the model's vocabulary size {vocab}: {ids}")
    return ids


def _capacity(model: TinyDecoder, cache: PagedKVCache) -> int:
    """Tokens one sequence can hold: the block table's reach and the model's rotary table."""
    return min(cache.max_blocks_per_seq * cache.block_size, model.cfg.max_seqlen)


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
        return flash_attn_with_kvcache(
            q,
            self.cache.k_pools[layer],
            self.cache.v_pools[layer],
            k,
            v,
            rotary_cos=cos,
            rotary_sin=sin,
            cache_seqlens=self.starts,
            block_table=self.table,
            causal=True,
            rotary_interleaved=False,
            backend=self.backend,
        )


def new_paged_cache(
    model: TinyDecoder, num_blocks: int, block_size: int = 16, max_batch: int = 8, max_seqlen: int | None = None
) -> PagedKVCache:
    """A multi-layer :class:`PagedKVCache` sized for ``model`` (capacity per sequence at most the
    model's rotary table length)."""
    if not isinstance(model, TinyDecoder):
        raise ArgumentTypeError(f"model must be a TinyDecoder, got {type(model).__name__}")
    cfg = model.cfg
    num_blocks = check_int("num_blocks", num_blocks, low=1)
    block_size = check_int("block_size", block_size, low=1)
    max_batch = check_int("max_batch", max_batch, low=1)
    max_seqlen = cfg.max_seqlen if max_seqlen is None else check_int("max_seqlen", max_seqlen, low=1)
    if max_seqlen < block_size:
        raise ArgumentError(f"max_seqlen ({max_seqlen}) must hold at least one block of {block_size} tokens")
    return PagedKVCache(
        num_blocks,
        block_size,
        cfg.n_kv_heads,
        cfg.headdim,
        max_batch=max_batch,
        max_blocks_per_seq=max_seqlen // block_size,
        dtype=model.head.weight.dtype,
        device=model.head.weight.device,
        num_layers=cfg.n_layers,
    )


@torch.no_grad()
def paged_step(
    model: TinyDecoder, cache: PagedKVCache, slots: list[int], tokens: list[list[int]], backend: str = "torch"
) -> torch.Tensor:
    """Run ``tokens[i]`` (equal lengths) as the next tokens of ``slots[i]``; returns logits of the
    last position of each, ``(len(slots), vocab)``."""
    resolve_backend(backend, model.head.weight.device)
    if not isinstance(model, TinyDecoder):
        raise ArgumentTypeError(f"model must be a TinyDecoder, got {type(model).__name__}")
    if not isinstance(cache, PagedKVCache):
        raise ArgumentTypeError(f"cache must be a PagedKVCache, got {type(cache).__name__}")
    if not isinstance(slots, (list, tuple)) or not slots:
        raise ArgumentError(f"slots must be a non-empty list of open slots, got {slots!r}")
    slots = [check_int(f"slots[{i}]", s) for i, s in enumerate(slots)]
    if len(set(slots)) != len(slots):
        raise ArgumentError(f"slots must not repeat a slot, got {slots}")
    for slot in slots:
        cache.sequence(slot)
    if not isinstance(tokens, (list, tuple)) or len(tokens) != len(slots):
        raise ArgumentError(f"tokens must be a list with one list of token ids per slot ({len(slots)}), got {tokens!r}")
    tokens = [_check_tokens(model, f"tokens[{i}]", t) for i, t in enumerate(tokens)]
    n = len(tokens[0])
    if n == 0 or any(len(t) != n for t in tokens):
        raise ArgumentError(
            f"tokens must hold the same number (>= 1) of ids for every slot, got lengths {[len(t) for t in tokens]}"
        )
    limit = _capacity(model, cache)
    need = 0
    for slot in slots:
        if cache.seqs[slot].length + n > limit:
            raise ArgumentError(
                f"slot {slot} holds {cache.seqs[slot].length} tokens; {n} more exceed the "
                f"{limit} a sequence can hold (block table and the model's rotary table)"
            )
        need += cache.blocks_needed(slot, n)
    if need > cache.allocator.num_free:
        raise OutOfBlocksError(f"this step needs {need} free blocks, {cache.allocator.num_free} are free")
    # Everything is checked; the reservations below cannot fail.
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
    """A prompt that arrives at decode step ``arrival`` and wants ``max_new_tokens``. ``serve``
    fills ``output``, ``slot``, ``cached_tokens`` (prefix-cache hit at its first admission), the
    steps at which the request was ``admitted`` (first prefilled) and ``finished`` (left, its
    blocks freed), and how often it was ``preempted``."""

    prompt: list[int]
    max_new_tokens: int
    arrival: int = 0
    output: list[int] = field(default_factory=list)
    slot: int | None = None
    cached_tokens: int = 0
    admitted: int | None = None
    finished: int | None = None
    preempted: int = 0


@dataclass
class ServeTrace:
    """Per step: running and waiting requests, blocks in use, free blocks, and what happened
    (``request i joins``, ``request i finishes``, ``request i preempted (swap|recompute)``, then
    ``request i swapped back in`` or ``request i recomputed`` when it comes back; ``i`` is the
    request's index in ``serve``'s list; events of one step are joined by ``"; "``).
    Totals: tokens prefilled (computed) and found in the prefix cache, preemptions by kind,
    blocks swapped each way, and wall-clock seconds spent in prefill and in decode steps."""

    running: list[int] = field(default_factory=list)
    waiting: list[int] = field(default_factory=list)
    blocks_used: list[int] = field(default_factory=list)
    blocks_free: list[int] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    prefill_tokens: int = 0
    cached_tokens: int = 0
    preemptions: Counter = field(default_factory=Counter)
    swapped_blocks: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0


PREEMPTION_MODES = ("recompute", "swap")


@torch.no_grad()
def serve(
    model: TinyDecoder,
    requests: list[Request],
    cache: PagedKVCache,
    backend: str = "torch",
    *,
    preemption: str = "recompute",
    watermark: float = 0.01,
) -> ServeTrace:
    """Continuous batching with greedy decoding. Fills each request's ``output`` and returns a
    :class:`ServeTrace`.

    **Admission control.** Requests wait in arrival order (preempted ones first) and join while a
    slot is free and the pool keeps ``watermark`` of its blocks free after their prompt (the
    check is skipped when nothing runs, so a lone request always starts). A request that could
    not finish even alone in the whole pool is refused before anything starts.

    **Preemption.** When the next decode step needs more free blocks than there are, the request
    that joined last is preempted (vLLM's order) until the step fits: ``"recompute"`` frees its
    blocks and later prefills its prompt and generated tokens again; ``"swap"`` copies its blocks
    into the cache's store (``cache.attach_store``) and later copies them back, falling back to
    recompute when the store is full or a block comes back corrupted. Either way every output is
    what an unpressured run gives. Nothing raises :class:`~flashkv_edu.paged.OutOfBlocksError`.

    Every request is checked before anything starts; if anything fails midway, the slots and
    store rows this call used are released before the error propagates."""
    resolve_backend(backend, model.head.weight.device)
    if not isinstance(model, TinyDecoder):
        raise ArgumentTypeError(f"model must be a TinyDecoder, got {type(model).__name__}")
    if not isinstance(cache, PagedKVCache):
        raise ArgumentTypeError(f"cache must be a PagedKVCache, got {type(cache).__name__}")
    if preemption not in PREEMPTION_MODES:
        raise ArgumentError(f"preemption must be one of {PREEMPTION_MODES}, got {preemption!r}")
    if preemption == "swap" and cache.store is None:
        raise ArgumentError('preemption="swap" needs a store below the pool: cache.attach_store(TieredStore(...))')
    watermark = check_positive("watermark", watermark, allow_zero=True)
    if watermark >= 1:
        raise ArgumentError(f"watermark must be a fraction in [0, 1), got {watermark}")
    if not isinstance(requests, (list, tuple)):
        raise ArgumentTypeError(f"requests must be a list of Request, got {type(requests).__name__}")
    limit = _capacity(model, cache)
    pool = cache.allocator.num_blocks
    for i, r in enumerate(requests):
        if not isinstance(r, Request):
            raise ArgumentTypeError(f"requests[{i}] must be a Request, got {type(r).__name__}")
        prompt = _check_tokens(model, f"requests[{i}].prompt", r.prompt)
        if not prompt:
            raise ArgumentError(f"requests[{i}].prompt must hold at least one token")
        check_int(f"requests[{i}].max_new_tokens", r.max_new_tokens, low=1)
        check_int(f"requests[{i}].arrival", r.arrival, low=0)
        total = len(prompt) + r.max_new_tokens
        if total > limit:
            raise ArgumentError(
                f"requests[{i}]: prompt ({len(prompt)}) + max_new_tokens ({r.max_new_tokens}) "
                f"exceeds the {limit} tokens a sequence can hold"
            )
        if -(-total // cache.block_size) > pool:
            raise ArgumentError(
                f"requests[{i}]: prompt ({len(prompt)}) + max_new_tokens ({r.max_new_tokens}) needs "
                f"{-(-total // cache.block_size)} blocks of {cache.block_size}; the whole pool has {pool}"
            )
        if r.slot is not None or r.output or r.admitted is not None or r.preempted:
            raise ArgumentError(f"requests[{i}] has already been served (slot, output or admitted set)")
    if len({id(r) for r in requests}) != len(requests):
        raise ArgumentError("requests must not list the same Request twice")
    loop = _ServeLoop(model, requests, cache, backend, preemption, max(1, int(watermark * pool)) if watermark else 0)
    try:
        return loop.run()
    except BaseException:
        loop.release()
        raise


class _ServeLoop:
    """The state of one :func:`serve` call (inputs already checked)."""

    def __init__(self, model, requests, cache, backend, preemption, watermark_blocks):
        self.model, self.cache, self.backend = model, cache, backend
        self.preemption, self.watermark = preemption, watermark_blocks
        self.order = {id(r): i for i, r in enumerate(requests)}
        self.waiting = sorted(requests, key=lambda r: (r.arrival, self.order[id(r)]))
        self.running: list[Request] = []
        self.swapped: dict[int, SwappedSequence] = {}  # id(request) -> its blocks in the store
        self.trace = ServeTrace()
        self.step = 0

    def release(self) -> None:
        for r in self.running:
            if r.slot in self.cache.seqs:
                self.cache.free(r.slot)
        for handle in self.swapped.values():
            for key in handle.keys:
                self.cache.store.discard(key)

    def prefill(self, r: Request, tokens: list[int]) -> None:
        """Open a slot for ``tokens`` (reusing cached blocks), compute the rest, take the next token."""
        start = time.perf_counter()
        r.slot, cached = self.cache.add_sequence(tokens)
        logits = paged_step(self.model, self.cache, [r.slot], [tokens[cached:]], self.backend)
        self.trace.prefill_seconds += time.perf_counter() - start
        r.output.append(int(logits[0].argmax()))
        self.trace.prefill_tokens += len(tokens) - cached
        self.trace.cached_tokens += cached
        if r.admitted is None:
            r.admitted, r.cached_tokens = self.step, cached

    def need(self, r: Request) -> int:
        if id(r) in self.swapped:
            return len(self.swapped[id(r)].keys)
        return self.cache.blocks_to_admit(r.prompt + r.output)

    def admit(self, events: list[str]) -> None:
        cache = self.cache
        while self.waiting and self.waiting[0].arrival <= self.step and len(cache.seqs) < cache.max_batch:
            r = self.waiting[0]
            reserve = self.watermark if self.running else 0
            if self.need(r) + reserve > cache.allocator.num_free:
                break  # first come, first served: later requests wait behind it
            self.waiting.pop(0)
            handle = self.swapped.pop(id(r), None)
            if handle is not None:
                try:
                    r.slot = cache.swap_in(handle)
                    self.trace.swapped_blocks += len(handle.keys)
                    events.append(f"request {self.order[id(r)]} swapped back in")
                except KVLostError:
                    self.prefill(r, r.prompt + r.output)
                    events.append(f"request {self.order[id(r)]} recomputed (swapped blocks lost)")
            else:
                resumed = bool(r.output)
                self.prefill(r, r.prompt + r.output)
                if resumed:
                    events.append(f"request {self.order[id(r)]} recomputed")
                else:
                    hit = f" ({r.cached_tokens} prompt tokens cached)" if r.cached_tokens else ""
                    events.append(f"request {self.order[id(r)]} joins{hit}")
            self.running.append(r)

    def preempt(self, r: Request, events: list[str]) -> None:
        """Take ``r`` off the device and put it back at the head of the queue."""
        mode = self.preemption
        if mode == "swap":
            try:
                self.swapped[id(r)] = self.cache.swap_out(r.slot)
                self.trace.swapped_blocks += len(self.swapped[id(r)].keys)
            except StoreFullError:
                mode = "recompute"
        if mode == "recompute":
            self.cache.free(r.slot)
        events.append(f"request {self.order[id(r)]} preempted ({mode})")
        self.trace.preemptions[mode] += 1
        r.preempted += 1
        r.slot = None
        self.running.remove(r)
        self.waiting.insert(0, r)
        self.waiting.sort(key=lambda w: (w.preempted == 0, w.arrival, self.order[id(w)]))

    def run(self) -> ServeTrace:
        cache, trace = self.cache, self.trace
        while self.waiting or self.running:
            events: list[str] = []
            self.admit(events)
            active = [r for r in self.running if len(r.output) < r.max_new_tokens]
            while active and sum(cache.blocks_needed(r.slot, 1) for r in active) > cache.allocator.num_free:
                victim = max(active, key=lambda r: (r.admitted, self.order[id(r)]))
                self.preempt(victim, events)
                active.remove(victim)
            if active:
                start = time.perf_counter()
                logits = paged_step(
                    self.model, cache, [r.slot for r in active], [[r.output[-1]] for r in active], self.backend
                )
                trace.decode_seconds += time.perf_counter() - start
                for r, row in zip(active, logits, strict=True):
                    r.output.append(int(row.argmax()))
            for r in [r for r in self.running if len(r.output) >= r.max_new_tokens]:
                cache.free(r.slot)
                self.running.remove(r)
                r.finished = self.step
                events.append(f"request {self.order[id(r)]} finishes")
            trace.running.append(len(self.running))
            trace.waiting.append(sum(r.arrival <= self.step for r in self.waiting))
            trace.blocks_used.append(cache.allocator.num_blocks - cache.allocator.num_free)
            trace.blocks_free.append(cache.allocator.num_free)
            trace.events.append("; ".join(events))
            self.step += 1
        return trace


def decode_step(q, k, v, k_cache, v_cache, cache_seqlens, block_table=None, **kwargs):
    """One decode step the way a caller must drive ``flash_attn_with_kvcache``: append ``k, v``
    and attend (causal), then advance the lengths **yourself** (the call does not). Returns
    ``(out, new_cache_seqlens)``."""
    if k is None or v is None:
        raise ArgumentError("decode_step appends new keys: k and v are required")
    out = flash_attn_with_kvcache(
        q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, block_table=block_table, causal=True, **kwargs
    )
    return out, (cache_seqlens + k.shape[1]).to(torch.int32)
