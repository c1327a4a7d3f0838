"""Chunked prefill: every step fills a token budget (Sarathi-Serve, arXiv 2403.02310; notebook 14).

Without it a request that joins is prefilled whole before the running requests take their next
step: a 2,000-token prompt stalls every running decode for as long as its prefill takes. With a
budget of ``max_batched_tokens`` tokens per step, each step runs every running decode (one token
each) and fills what the budget leaves with prompt chunks, first come first served; a prompt's last
chunk yields its first token. One forward per step: every layer's attention is a single varlen call
(:func:`~flashkv_edu.steps.varlen_step`), decode rows and prefill chunks together. Outputs equal
unchunked serving's (bottom-right causal masks make a chunk attend exactly as one prefill would;
the sums run in another order, so in low precision a near tie may flip).
"""

from __future__ import annotations

import time

from .loops import Request, ServeLoop, ServeTrace
from .steps import paged_step, varlen_step

__all__ = ["ChunkedLoop"]


class ChunkedLoop(ServeLoop):
    """:class:`~flashkv_edu.loops.ServeLoop` with a token budget per step. A request joins with an
    open slot and its prompt to prefill (``todo``); requests mid-prefill are preempted by
    recompute."""

    def __init__(self, model, requests, cache, backend, preemption, watermark_blocks, budget: int):
        super().__init__(model, requests, cache, backend, preemption, watermark_blocks)
        self.budget = budget
        self.todo: dict[int, list[int]] = {}  # id(request) -> tokens still to prefill

    def prefill(self, r: Request, tokens: list[int]) -> None:
        """Open the slot (reusing cached prefix blocks); the tokens are prefilled chunk by chunk."""
        r.slot, cached = self.cache.add_sequence(tokens)
        self.todo[id(r)] = tokens[cached:]
        self.trace.cached_tokens += cached
        if r.admitted is None:
            r.admitted, r.cached_tokens = self.step, cached

    def preempt(self, r: Request, events: list[str]) -> None:
        if self.todo.pop(id(r), None) is None:
            return super().preempt(r, events)
        mode, self.preemption = self.preemption, "recompute"  # half a prompt is not worth swapping
        try:
            super().preempt(r, events)
        finally:
            self.preemption = mode

    def plan(self) -> list[tuple[Request, list[int]]]:
        """This step's rows: every running decode, then prompt chunks within the budget."""
        rows = [
            (r, [r.output[-1]]) for r in self.running if id(r) not in self.todo and len(r.output) < r.max_new_tokens
        ]
        left = self.budget - len(rows)
        for r in sorted((r for r in self.running if id(r) in self.todo), key=lambda r: (r.admitted, self.order[id(r)])):
            if left <= 0:
                break
            chunk = self.todo[id(r)][:left]
            rows.append((r, chunk))
            left -= len(chunk)
        return rows

    def run(self) -> ServeTrace:
        cache, trace = self.cache, self.trace
        while self.waiting or self.running:
            events: list[str] = []
            started = time.perf_counter()
            self.admit(events)
            rows = self.plan()
            while rows and sum(cache.blocks_needed(r.slot, len(t)) for r, t in rows) > cache.allocator.num_free:
                victim = max((r for r, _ in rows), key=lambda r: (r.admitted, self.order[id(r)]))
                self.preempt(victim, events)
                rows = self.plan()
            prompt_tokens = 0
            if rows:
                slots, tokens = [r.slot for r, _ in rows], [t for _, t in rows]
                if all(len(t) == 1 for t in tokens):  # decodes only: the plain step
                    logits = paged_step(self.model, cache, slots, tokens, self.backend)
                else:
                    logits = varlen_step(self.model, cache, slots, tokens, self.backend)
                for (r, tokens), row in zip(rows, logits, strict=True):
                    todo = self.todo.get(id(r))
                    if todo is None:
                        r.emit(row.argmax())
                        continue
                    del todo[: len(tokens)]
                    prompt_tokens += len(tokens)
                    if not todo:  # the prompt's last chunk: its logits give the first token
                        del self.todo[id(r)]
                        r.emit(row.argmax())
            seconds = time.perf_counter() - started
            trace.prefill_tokens += prompt_tokens
            trace.prefill_seconds += seconds if prompt_tokens else 0.0
            trace.decode_seconds += 0.0 if prompt_tokens else seconds
            self.finish(events)
            trace.step_prefill_tokens.append(prompt_tokens)
            trace.step_tokens.append(sum(len(t) for _, t in rows))
            trace.step_seconds.append(seconds)
            self.record(events)
        return trace
