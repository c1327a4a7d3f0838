"""Serving a model with ``flash_attn_with_kvcache`` over a paged cache (notebooks 08, 11, 12).

* The step (:mod:`flashkv_edu.steps`, its names re-exported here): :class:`PagedContext`,
  :func:`paged_step`, and its two halves :func:`plan_step` and :func:`run_step`.
* :func:`serve`: continuous batching. Requests join when they arrive and fit (their prompt is
  prefilled, reusing cached prefix blocks), all running requests decode together one token per
  step, each at its own length, and finished requests leave, their blocks returning to the pool.
  When the pool runs out of blocks, the latest request is preempted by recompute or swap
  (notebook 11) and rejoins later with the same tokens. ``overlap=True`` schedules one step
  ahead of a device thread (notebook 12).
"""

from __future__ import annotations

import time

import torch

from .api import flash_attn_with_kvcache
from .chunked import ChunkedLoop
from .loops import PREEMPTION_MODES, DeviceLoop, Request, ServeLoop, ServeTrace
from .model import TinyDecoder
from .overlap import Device
from .paged import PagedKVCache
from .runtime import resolve_backend
from .steps import (
    NO_HOOKS,
    LayerHooks,
    PagedContext,
    PlannedStep,
    capacity,
    check_step,
    check_tokens,
    launch_inputs,
    new_paged_cache,
    paged_step,
    plan_step,
    run_step,
)
from .validation import ArgumentError, ArgumentTypeError, check_bool, check_int, check_positive

__all__ = [
    "NO_HOOKS",
    "PREEMPTION_MODES",
    "LayerHooks",
    "PagedContext",
    "PlannedStep",
    "Request",
    "ServeTrace",
    "decode_step",
    "capacity",
    "check_step",
    "check_tokens",
    "launch_inputs",
    "new_paged_cache",
    "paged_step",
    "plan_step",
    "run_step",
    "serve",
]


@torch.no_grad()
def serve(
    model: TinyDecoder,
    requests: list[Request],
    cache: PagedKVCache,
    backend: str = "torch",
    *,
    preemption: str = "recompute",
    watermark: float = 0.01,
    overlap: bool = False,
    kernel_seconds: float = 0.0,
    timeout: float = 60.0,
    inputs=None,
    max_batched_tokens: int | None = None,
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

    **Overlap** (notebook 12). ``overlap=True`` runs the model on a :class:`~flashkv_edu.overlap.Device`
    thread and schedules one step ahead of it (SGLang's zero-overhead loop): step N+1 is planned
    and launched before step N's results are processed, its input tokens read on the device from
    the samples of step N. A step that must preempt waits for everything in flight first (no
    overlap for that step). ``kernel_seconds`` makes each device step last at least that long (a
    simulated kernel; with ``overlap=False`` the same device runs one step at a time, the
    baseline). ``timeout``: seconds any wait for the device may take. ``inputs(cache, slots)``:
    what a step reads of the bookkeeping (default :func:`launch_inputs`, copies); a step in
    flight that reads a buffer the scheduler rewrites raises
    :class:`~flashkv_edu.overlap.HazardError`. Outputs are token-identical either way.

    Every request is checked before anything starts; if anything fails midway, the slots and
    store rows this call used are released before the error propagates.

    **Chunked prefill** (notebook 14). ``max_batched_tokens=N``: each step runs every running
    decode and prompt chunks up to ``N`` tokens in all, in one forward whose attention is one
    varlen call per layer (:mod:`flashkv_edu.chunked`); a request joins without being prefilled
    at once. ``ServeTrace.step_tokens`` records each step's tokens. Not with ``overlap``."""
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
    limit = capacity(model, cache)
    pool = cache.allocator.num_blocks
    for i, r in enumerate(requests):
        if not isinstance(r, Request):
            raise ArgumentTypeError(f"requests[{i}] must be a Request, got {type(r).__name__}")
        prompt = check_tokens(model, f"requests[{i}].prompt", r.prompt)
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
    overlap = check_bool("overlap", overlap)
    if max_batched_tokens is not None:
        max_batched_tokens = check_int("max_batched_tokens", max_batched_tokens, low=1)
        if overlap or kernel_seconds:
            raise ArgumentError(
                "max_batched_tokens (chunked prefill) runs without a device thread: not with overlap or kernel_seconds"
            )
    kernel_seconds = check_positive("kernel_seconds", kernel_seconds, allow_zero=True)
    timeout = check_positive("timeout", timeout)
    if inputs is not None and not callable(inputs):
        raise ArgumentTypeError(f"inputs must be a function (cache, slots) -> (table, lengths), got {inputs!r}")
    reserve = max(1, int(watermark * pool)) if watermark else 0
    started = time.perf_counter()
    if max_batched_tokens is not None:
        loop = ChunkedLoop(model, requests, cache, backend, preemption, reserve, max_batched_tokens)
    elif not overlap and not kernel_seconds:
        loop = ServeLoop(model, requests, cache, backend, preemption, reserve)
    else:
        loop = DeviceLoop(model, requests, cache, backend, preemption, reserve, overlap, inputs, timeout)
        loop.device = Device(kernel_seconds, timeout)
    try:
        trace = loop.run()
    except BaseException:
        loop.close()  # the device first: nothing may still write the blocks released below
        loop.release()
        raise
    finally:
        loop.close()
    trace.seconds = time.perf_counter() - started
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
