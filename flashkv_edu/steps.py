"""One step of a model over a paged cache (notebooks 08, 11 and 12): plan it, then run it.

* :class:`PagedContext`: the attention of :class:`~flashkv_edu.model.TinyDecoder` done by
  ``flash_attn_with_kvcache`` (new keys appended through the block table, rotary applied by
  the call, bottom-right causal mask per sequence), with :class:`LayerHooks` around each layer
  (a KV connector's loads and saves, tensor parallelism's shards).
* :func:`plan_step` does a step's bookkeeping (checks, reservations, the inputs it reads),
  :func:`run_step` its compute; :func:`paged_step` is both. Overlap scheduling (``serve``) plans
  step N+1 while step N runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .api import flash_attn_with_kvcache
from .model import TinyDecoder
from .paged import OutOfBlocksError, PagedKVCache, token_ids
from .runtime import resolve_backend
from .validation import ArgumentError, ArgumentTypeError, check_int

__all__ = [
    "NO_HOOKS",
    "LayerHooks",
    "PagedContext",
    "PlannedStep",
    "VarlenContext",
    "capacity",
    "check_step",
    "check_tokens",
    "launch_inputs",
    "new_paged_cache",
    "paged_step",
    "plan_step",
    "run_step",
    "varlen_step",
]


def check_tokens(model: TinyDecoder, name: str, tokens) -> list[int]:
    ids = token_ids(name, tokens)
    vocab = model.cfg.vocab_size
    if any(t >= vocab for t in ids):
        raise ArgumentError(f"{name} holds token ids >= the model's vocabulary size {vocab}: {ids}")
    return ids


def capacity(model: TinyDecoder, cache: PagedKVCache) -> int:
    """Tokens one sequence can hold: the block table's reach and the model's rotary table."""
    return min(cache.max_blocks_per_seq * cache.block_size, model.cfg.max_seqlen)


class LayerHooks:
    """What a step does around each layer's attention; the default does nothing. A KV connector
    loads a layer's keys before its attention (``before``) and sends them after (``after``,
    notebook 12); tensor parallelism keeps a rank's heads (``shard``) and gathers every rank's
    outputs (``gather``)."""

    def before(self, layer: int) -> None:
        """Before layer ``layer``'s attention reads the cache."""

    def after(self, layer: int) -> None:
        """After layer ``layer``'s attention wrote the step's keys and values."""

    def shard(self, q, k, v):
        """``(q, k, v)`` ``(n, s, heads, d)`` as this rank computes them (all heads by default)."""
        return q, k, v

    def gather(self, out):
        """The attention output of every head from this rank's ``out`` ``(n, s, heads, dv)``."""
        return out


NO_HOOKS = LayerHooks()


class PagedContext:
    """Attention for ``TinyDecoder.run`` through :func:`flash_attn_with_kvcache`: layer ``l``
    reads and extends ``cache.k_pools[l]`` / ``v_pools[l]`` through ``table`` (the block-table
    rows of the step's slots, ``(n, max_blocks)`` int32); ``starts`` ``(n,)`` int32 are the tokens
    each slot held before this step. ``hooks`` (:class:`LayerHooks`) run around each layer."""

    def __init__(self, cache: PagedKVCache, table, starts: torch.Tensor, rope, backend: str, hooks=NO_HOOKS):
        self.cache, self.table, self.starts, self.rope, self.backend = cache, table, starts, rope, backend
        self.hooks = hooks

    def attend(self, layer, q, k, v):
        cos, sin = self.rope if self.rope is not None else (None, None)
        if cos is not None:
            cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        self.hooks.before(layer)
        q, k, v = self.hooks.shard(q, k, v)
        out = flash_attn_with_kvcache(
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
        self.hooks.after(layer)
        return self.hooks.gather(out)


def launch_inputs(cache: PagedKVCache, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """What a step reads of the cache's bookkeeping, as copies: the block-table rows of ``slots``
    ``(n, max_blocks)`` and their lengths ``(n,)``. The scheduler rewrites both for the next step
    while an overlapped step runs (SGLang PR #1712: "we need to make a copy of seq_len")."""
    rows = torch.tensor(slots, dtype=torch.long, device=cache.block_table.device)
    return cache.block_table[rows], cache.cache_seqlens[rows].clone()


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


@dataclass
class PlannedStep:
    """A step whose bookkeeping is done (blocks reserved, lengths advanced) and whose compute is
    not: ``n`` new tokens per slot, ``tokens`` ``(len(slots), n)`` (None: each slot's last sampled
    token, read when it runs from the device-side ``next_tokens``), and what it reads of the
    cache's bookkeeping, ``table`` (block-table rows) and ``ends`` (lengths after the step), as
    :func:`launch_inputs` (or the ``inputs`` function given) took them. Positions are read from
    ``ends`` when the step runs, as a kernel reads its arguments."""

    model: TinyDecoder
    cache: PagedKVCache
    slots: list[int]
    n: int
    tokens: torch.Tensor | None
    table: torch.Tensor
    ends: torch.Tensor
    backend: str
    hooks: LayerHooks


def check_step(model: TinyDecoder, cache: PagedKVCache, slots, tokens, n: int | None = None) -> tuple[list, list]:
    """``paged_step``'s checks (nothing changed): the slots, the tokens (None: ``n`` tokens of
    ids that come later), capacities and free blocks. Returns the checked ``(slots, tokens)``."""
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
    if tokens is not None:
        if not isinstance(tokens, (list, tuple)) or len(tokens) != len(slots):
            raise ArgumentError(
                f"tokens must be a list with one list of token ids per slot ({len(slots)}), got {tokens!r}"
            )
        tokens = [check_tokens(model, f"tokens[{i}]", t) for i, t in enumerate(tokens)]
        n = len(tokens[0])
        if n == 0 or any(len(t) != n for t in tokens):
            raise ArgumentError(
                f"tokens must hold the same number (>= 1) of ids for every slot, got lengths {[len(t) for t in tokens]}"
            )
    limit = capacity(model, cache)
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
    return slots, tokens


def plan_step(
    model: TinyDecoder, cache: PagedKVCache, slots, tokens, backend: str = "torch", *, hooks=NO_HOOKS, inputs=None
) -> PlannedStep:
    """:func:`paged_step`'s bookkeeping: check, reserve the tokens, take the step's inputs
    (``inputs(cache, slots)``, default :func:`launch_inputs`). ``tokens`` None: one token per
    slot whose id the previous step samples (overlap scheduling)."""
    resolve_backend(backend, model.head.weight.device)
    slots, tokens = check_step(model, cache, slots, tokens, n=1)
    n = 1 if tokens is None else len(tokens[0])
    # Everything is checked; the reservations below cannot fail.
    for i, slot in enumerate(slots):
        cache.reserve(slot, n, None if tokens is None else tokens[i], later=tokens is None)
    table, ends = (inputs or launch_inputs)(cache, slots)
    tok = None if tokens is None else torch.tensor(tokens, device=model.head.weight.device)
    return PlannedStep(model, cache, slots, n, tok, table, ends, backend, hooks)


def run_step(step: PlannedStep, next_tokens: torch.Tensor | None = None, *, every_position: bool = False):
    """The compute of a planned step: logits of each slot's last position ``(n, vocab)`` (with
    ``every_position``: of every new position, ``(n, tokens, vocab)``, what a speculative
    verification needs). ``next_tokens`` ``(max_batch,)``: the last sampled token of every slot,
    read for a step planned without tokens and updated with this step's greedy samples."""
    model, device = step.model, step.model.head.weight.device
    tokens = step.tokens
    rows = torch.tensor(step.slots, device=device)
    if tokens is None:
        if next_tokens is None:
            raise ArgumentError("a step planned without tokens needs next_tokens (the previous step's samples)")
        tokens = next_tokens[rows][:, None]
    starts = (step.ends.to(device) - step.n).to(torch.int32)
    positions = starts.long()[:, None] + torch.arange(step.n, device=device)[None, :]
    ctx = PagedContext(step.cache, step.table, starts, model.rope(), step.backend, step.hooks)
    every = model.run(tokens, positions, ctx)
    logits = every[:, -1]
    if next_tokens is not None:
        next_tokens[rows] = logits.argmax(-1)
    return every if every_position else logits


@torch.no_grad()
def paged_step(
    model: TinyDecoder, cache: PagedKVCache, slots: list[int], tokens: list[list[int]], backend: str = "torch", *,
    hooks: LayerHooks = NO_HOOKS,
) -> torch.Tensor:  # fmt: skip
    """Run ``tokens[i]`` (equal lengths) as the next tokens of ``slots[i]``; returns logits of the
    last position of each, ``(len(slots), vocab)``. ``hooks`` run around each layer's attention."""
    if tokens is None:
        raise ArgumentError("tokens must be a list with one list of token ids per slot, got None")
    return run_step(plan_step(model, cache, slots, tokens, backend, hooks=hooks))


class VarlenContext:
    """Attention for ``TinyDecoder.run`` over packed tokens ``(1, total)`` of several sequences:
    one FlashAttention 3 varlen call per layer (``cu_seqlens_q`` and ``cu_seqlens_k_new``: each
    sequence appends its own new keys through its block-table row and attends bottom-right)."""

    def __init__(self, cache: PagedKVCache, table, starts, cu_seqlens, max_seqlen_q: int, rope, backend: str):
        self.cache, self.table, self.starts, self.cu, self.max_q = cache, table, starts, cu_seqlens, max_seqlen_q
        self.rope, self.backend = rope, backend

    def attend(self, layer, q, k, v):
        from . import fa3

        cos, sin = self.rope
        out = fa3.flash_attn_with_kvcache(
            q[0], self.cache.k_pools[layer], self.cache.v_pools[layer], k[0], v[0], rotary_cos=cos.to(q.dtype),
            rotary_sin=sin.to(q.dtype), cache_seqlens=self.starts, page_table=self.table, cu_seqlens_q=self.cu,
            cu_seqlens_k_new=self.cu, max_seqlen_q=self.max_q, causal=True, rotary_interleaved=False,
            backend=self.backend,
        )  # fmt: skip
        return out[None]


@torch.no_grad()
def varlen_step(
    model: TinyDecoder, cache: PagedKVCache, slots: list[int], tokens: list[list[int]], backend: str = "torch"
):
    """Run ``tokens[i]`` (any lengths >= 1: a decode token, a prefill chunk) as the next tokens of
    ``slots[i]`` in one forward: every layer's attention is one varlen call. Returns the logits of
    each slot's last new token ``(len(slots), vocab)``. Checks everything before it reserves."""
    resolve_backend(backend, model.head.weight.device)
    slots, _ = check_step(model, cache, slots, None, n=0)
    if not isinstance(tokens, (list, tuple)) or len(tokens) != len(slots):
        raise ArgumentError(f"tokens must be a list with one list of token ids per slot ({len(slots)}), got {tokens!r}")
    tokens = [check_tokens(model, f"tokens[{i}]", t) for i, t in enumerate(tokens)]
    if any(not t for t in tokens):
        raise ArgumentError(f"tokens must hold at least one id per slot, got lengths {[len(t) for t in tokens]}")
    limit, need = capacity(model, cache), 0
    for slot, t in zip(slots, tokens, strict=True):
        if cache.seqs[slot].length + len(t) > limit:
            raise ArgumentError(
                f"slot {slot} holds {cache.seqs[slot].length} tokens; {len(t)} more exceed the {limit} it can hold"
            )
        need += cache.blocks_needed(slot, len(t))
    if need > cache.allocator.num_free:
        raise OutOfBlocksError(f"this step needs {need} free blocks, {cache.allocator.num_free} are free")
    device = model.head.weight.device
    lens = torch.tensor([len(t) for t in tokens], dtype=torch.int32, device=device)
    starts = torch.tensor([cache.reserve(s, len(t), t) for s, t in zip(slots, tokens, strict=True)],
                          dtype=torch.int32, device=device)  # fmt: skip
    table = cache.block_table[torch.tensor(slots, dtype=torch.long, device=cache.block_table.device)]
    cu = torch.zeros(len(slots) + 1, dtype=torch.int32, device=device)
    cu[1:] = lens.cumsum(0)
    flat = torch.tensor([x for t in tokens for x in t], device=device)[None]
    positions = (starts.long().repeat_interleave(lens.long()) + torch.arange(int(cu[-1]), device=device)
                 - cu[:-1].long().repeat_interleave(lens.long()))[None]  # fmt: skip
    ctx = VarlenContext(cache, table, starts, cu, int(lens.max()), model.rope(), backend)
    logits = model.run(flat, positions, ctx)[0]
    return logits[(cu[1:] - 1).long()]
