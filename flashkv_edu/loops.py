"""The serving loops behind :func:`flashkv_edu.serving.serve` (notebooks 08, 11, 12, 14).

:class:`ServeLoop` is continuous batching with admission control and preemption (the whole prompt
prefilled when a request joins); :class:`DeviceLoop` runs the model on a device thread, one step
ahead with ``overlap``; :class:`~flashkv_edu.chunked.ChunkedLoop` (its own module) fills every step
with the running decodes and prefill chunks up to a token budget. ``serve`` checks the arguments
and picks one.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from .offload import KVLostError, StoreFullError
from .overlap import BufferVersions
from .paged import SwappedSequence
from .steps import PlannedStep, paged_step, plan_step, run_step

__all__ = ["PREEMPTION_MODES", "DeviceLoop", "Request", "ServeLoop", "ServeTrace"]


@dataclass
class Request:
    """A prompt that arrives at decode step ``arrival`` and wants ``max_new_tokens``. ``serve``
    fills ``output``, ``slot``, ``cached_tokens`` (prefix-cache hit at its first admission), the
    steps at which the request was ``admitted`` (first prefilled) and ``finished`` (left, its
    blocks freed), how often it was ``preempted``, and ``token_times`` (``time.perf_counter()``
    when each output token was sampled: the time between tokens is their difference)."""

    prompt: list[int]
    max_new_tokens: int
    arrival: int = 0
    output: list[int] = field(default_factory=list)
    slot: int | None = None
    cached_tokens: int = 0
    admitted: int | None = None
    finished: int | None = None
    preempted: int = 0
    token_times: list[float] = field(default_factory=list)

    def emit(self, token: int) -> None:
        """Append a sampled token (and when it was sampled)."""
        self.output.append(int(token))
        self.token_times.append(time.perf_counter())


@dataclass
class ServeTrace:
    """Per step: running and waiting requests, blocks in use, free blocks, and what happened
    (``request i joins``, ``request i finishes``, ``request i preempted (swap|recompute)``, then
    ``request i swapped back in`` or ``request i recomputed`` when it comes back; ``i`` is the
    request's index in ``serve``'s list; events of one step are joined by ``"; "``).
    Totals: tokens prefilled (computed) and found in the prefix cache, preemptions by kind,
    blocks swapped each way, and wall-clock seconds spent in prefill and in decode steps. Per
    step also: ``step_tokens`` (the tokens the model ran: decodes and prefill together),
    ``step_prefill_tokens`` (of which prompt tokens) and ``step_seconds`` (wall clock)."""

    running: list[int] = field(default_factory=list)
    waiting: list[int] = field(default_factory=list)
    blocks_used: list[int] = field(default_factory=list)
    blocks_free: list[int] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    step_tokens: list[int] = field(default_factory=list)
    step_prefill_tokens: list[int] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    prefill_tokens: int = 0
    cached_tokens: int = 0
    preemptions: Counter = field(default_factory=Counter)
    swapped_blocks: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    timeline: list = field(default_factory=list)
    """With a device (``overlap`` or ``kernel_seconds``): ``(lane, step, what, start, end)`` per
    interval, lane ``"device"`` (a launched prefill or decode) or ``"scheduler"`` (its work up to
    a launch, ``"plan and launch"``, and processing a step's results; waiting is not work), seconds
    from the start of the run."""
    seconds: float = 0.0
    """Wall-clock seconds of the whole run."""


PREEMPTION_MODES = ("recompute", "swap")


class ServeLoop:
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

    def close(self) -> None:
        """Stop what the loop started (nothing here; the device loop's thread)."""

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
        r.emit(logits[0].argmax())
        self.trace.prefill_tokens += len(tokens) - cached
        self.trace.cached_tokens += cached
        if r.admitted is None:
            r.admitted, r.cached_tokens = self.step, cached

    def swapped_in(self, r: Request) -> None:
        """``r`` is back on the device with its blocks; its next input is ``r.output[-1]``."""

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
                    self.swapped_in(r)
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
            started, prefilled = time.perf_counter(), trace.prefill_tokens
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
                    r.emit(row.argmax())
            self.finish(events)
            trace.step_prefill_tokens.append(trace.prefill_tokens - prefilled)
            trace.step_tokens.append(trace.step_prefill_tokens[-1] + len(active))
            trace.step_seconds.append(time.perf_counter() - started)
            self.record(events)
        return trace

    def finish(self, events: list[str]) -> None:
        """Free the requests that have all their tokens."""
        for r in [r for r in self.running if len(r.output) >= r.max_new_tokens]:
            self.cache.free(r.slot)
            self.running.remove(r)
            r.finished = self.step
            events.append(f"request {self.order[id(r)]} finishes")

    def record(self, events: list[str]) -> None:
        """The step's line of the trace; the next step begins."""
        cache, trace = self.cache, self.trace
        trace.running.append(len(self.running))
        trace.waiting.append(sum(r.arrival <= self.step for r in self.waiting))
        trace.blocks_used.append(cache.allocator.num_blocks - cache.allocator.num_free)
        trace.blocks_free.append(cache.allocator.num_free)
        trace.events.append("; ".join(events))
        self.step += 1


class DeviceLoop(ServeLoop):
    """:func:`serve` with the model on a :class:`Device` thread. ``overlap``: results of a step
    are processed while the next one runs (a lag of one step); otherwise each step's results are
    processed as soon as it is launched (the serial baseline on the same device)."""

    def __init__(self, model, requests, cache, backend, preemption, watermark_blocks, overlap, inputs, timeout):
        super().__init__(model, requests, cache, backend, preemption, watermark_blocks)
        self.overlap, self.inputs, self.timeout = overlap, inputs, timeout
        self.device = None
        self.next_tokens = torch.zeros(cache.max_batch, dtype=torch.long, device=model.head.weight.device)
        self.versions = BufferVersions()
        self.in_flight: dict[int, int] = {}  # id(request) -> tokens sampled on the device, not processed yet
        self.launched: list[tuple] = []  # (handle, kind, requests, step) not processed yet, in launch order
        self.events: list[str] = []  # the current step's
        self.mark = self.t0 = time.perf_counter()  # when the scheduler's current stretch of work began

    def close(self) -> None:
        if self.device is not None:
            self.device.close()
        self.cache.on_write = None

    def launch(self, planned: PlannedStep, kind: str, requests: list[Request]) -> None:
        live = {"block_table": self.cache.block_table, "cache_seqlens": self.cache.cache_seqlens}
        read = [name for name, t in live.items() if any(_shares(x, t) for x in (planned.table, planned.ends))]
        self.trace.timeline.append(
            ("scheduler", self.step, "plan and launch", self.mark - self.t0, time.perf_counter() - self.t0)
        )
        handle = self.device.launch(lambda: run_step(planned, self.next_tokens).argmax(-1).tolist())
        self.versions.lease(handle.number, read)
        self.launched.append((handle, kind, requests, self.step))
        for r in requests:
            self.in_flight[id(r)] = self.in_flight.get(id(r), 0) + 1
        if not self.overlap:  # the serial baseline: nothing runs while the scheduler works
            self.process(self.step + 1, self.events, "at once")
        self.mark = time.perf_counter()  # the scheduler's next stretch of work starts

    def prefill(self, r: Request, tokens: list[int]) -> None:
        r.slot, cached = self.cache.add_sequence(tokens)
        planned = plan_step(self.model, self.cache, [r.slot], [tokens[cached:]], self.backend, inputs=self.inputs)
        self.launch(planned, "prefill", [r])
        self.trace.prefill_tokens += len(tokens) - cached
        self.trace.cached_tokens += cached
        if r.admitted is None:
            r.admitted, r.cached_tokens = self.step, cached

    def process(self, upto: int, events: list[str], why: str) -> None:
        """Wait for and process the launched steps numbered below ``upto`` (their samples appended,
        finished requests freed)."""
        while self.launched and self.launched[0][3] < upto:
            handle, kind, requests, step = self.launched.pop(0)
            samples = handle.result(self.timeout)
            start = time.perf_counter()
            self.versions.release(handle.number)
            seconds = handle.ended - handle.started
            if kind == "prefill":
                self.trace.prefill_seconds += seconds
            else:
                self.trace.decode_seconds += seconds
            self.trace.timeline.append(("device", step, kind, handle.started - self.t0, handle.ended - self.t0))
            for r, token in zip(requests, samples, strict=True):
                self.in_flight[id(r)] -= 1
                r.emit(token)
                if self.cache.seqs[r.slot].pending:
                    self.cache.fill_tokens(r.slot, [int(token)])
            for r in requests:
                if len(r.output) >= r.max_new_tokens and not self.in_flight[id(r)] and r in self.running:
                    self.cache.free(r.slot)
                    self.running.remove(r)
                    r.finished = self.step
                    events.append(f"request {self.order[id(r)]} finishes")
            end = time.perf_counter()
            self.trace.timeline.append(
                ("scheduler", self.step, f"results of step {step}", start - self.t0, end - self.t0)
            )
            events.append(f"step {step} {kind} results processed {why}")

    def swapped_in(self, r: Request) -> None:
        slot, token = r.slot, r.output[-1]
        self.device.launch(lambda: self.next_tokens.__setitem__(slot, token)).result(self.timeout)

    def scheduled(self, r: Request) -> int:
        return len(r.output) + self.in_flight.get(id(r), 0)

    def run(self) -> ServeTrace:
        cache, trace = self.cache, self.trace
        cache.on_write = self.versions.write
        while self.waiting or self.running or self.launched:
            events: list[str] = []
            self.events = events
            self.mark = time.perf_counter()
            self.admit(events)
            self.versions.check()
            active = [r for r in self.running if self.scheduled(r) < r.max_new_tokens]
            if active and sum(cache.blocks_needed(r.slot, 1) for r in active) > cache.allocator.num_free:
                self.process(self.step + 1, events, "at once (this step must make room)")
                active = [r for r in self.running if self.scheduled(r) < r.max_new_tokens]
                while active and sum(cache.blocks_needed(r.slot, 1) for r in active) > cache.allocator.num_free:
                    victim = max(active, key=lambda r: (r.admitted, self.order[id(r)]))
                    self.preempt(victim, events)
                    active.remove(victim)
            if active:
                planned = plan_step(self.model, cache, [r.slot for r in active], None, self.backend, inputs=self.inputs)
                self.launch(planned, "decode", active)
                self.versions.check()
            if self.overlap:
                self.process(self.step, events, f"during step {self.step}")
                self.versions.check()
            self.record(events)
        return trace


def _shares(x: torch.Tensor, live: torch.Tensor) -> bool:
    """Whether ``x`` is (a view of) the memory of ``live``."""
    return x.untyped_storage().data_ptr() == live.untyped_storage().data_ptr()
