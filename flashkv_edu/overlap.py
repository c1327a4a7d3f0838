"""Overlap scheduling's parts (notebook 12): a device that runs steps on its own thread, and the
check that no step in flight reads what the scheduler is rewriting.

On a GPU the scheduler launches step N+1 while step N still runs (SGLang's zero-overhead loop):
its CPU work (results of step N-1, admission, block tables) hides behind the device's. A CPU has
no asynchronous device, so :class:`Device` stands for one: a worker thread that runs launched
steps in order; ``kernel_seconds`` makes every step last at least that long (a simulated kernel:
the thread sleeps, holding no core), so what overlap saves can be measured apart from what the
model's arithmetic costs on the same cores.

The hazard of overlap: a step in flight reads buffers (block tables, lengths) that the scheduler
rewrites for the next one. :class:`BufferVersions` counts every write to such a buffer and
refuses one while a launched, not yet collected, step reads it: deterministic, whatever the
timing (the step may have finished; the host has not seen it finish, so it may not assume so).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter

from .validation import ArgumentError, check_positive

__all__ = ["BufferVersions", "Device", "DeviceTimeoutError", "HazardError", "Launched"]


class HazardError(RuntimeError):
    """The scheduler wrote a buffer that a step in flight reads (a write-after-read race)."""


class DeviceTimeoutError(RuntimeError):
    """A launched step did not finish within the timeout."""


class BufferVersions:
    """Versions of the buffers the scheduler writes (a write bumps one) and the steps in flight
    that read them. :meth:`lease` records what a launched step reads, :meth:`release` ends it
    (the scheduler collected the step's results). A :meth:`write` to a buffer a step in flight
    reads is a hazard: recorded (the write itself is part of a bookkeeping change that must
    finish, so the cache stays whole) and raised as :class:`HazardError` by :meth:`check`, which
    the scheduler calls after each of its operations."""

    def __init__(self):
        self.version: Counter = Counter()
        self.readers: dict[str, dict[int, int]] = {}  # buffer -> {step: version it read}
        self.hazards: list[str] = []

    def check(self) -> None:
        if self.hazards:
            raise HazardError(self.hazards[0])

    def lease(self, step: int, names) -> None:
        for name in names:
            self.readers.setdefault(name, {})[step] = self.version[name]

    def release(self, step: int) -> None:
        for readers in self.readers.values():
            readers.pop(step, None)

    def write(self, name: str) -> None:
        readers = self.readers.get(name) or {}
        if readers:
            step, seen = next(iter(readers.items()))
            self.hazards.append(
                f"{name} is rewritten (version {seen} -> {self.version[name] + 1}) while step {step}, in flight, "
                f"reads it: give the step its own copy when launching it"
            )
        self.version[name] += 1


class Launched:
    """A step on the device: :meth:`result` waits for it (``timeout`` seconds) and returns what
    it returned, or raises what it raised. ``started``/``ended``: ``time.perf_counter()`` stamps."""

    def __init__(self, number: int, fn):
        self.number, self.fn = number, fn
        self.done = threading.Event()
        self.value = self.error = None
        self.started = self.ended = None

    def result(self, timeout: float):
        if not self.done.wait(timeout):
            raise DeviceTimeoutError(f"step {self.number} did not finish within {timeout} s")
        if self.error is not None:
            raise self.error
        return self.value


class Device:
    """A thread that runs launched callables in launch order, one at a time; every step lasts at
    least ``kernel_seconds`` (0: as long as its arithmetic). Use as a context manager: the thread
    is stopped and joined on exit (``timeout`` seconds at most)."""

    def __init__(self, kernel_seconds: float = 0.0, timeout: float = 60.0):
        self.kernel_seconds = check_positive("kernel_seconds", kernel_seconds, allow_zero=True)
        self.timeout = check_positive("timeout", timeout)
        self.queue: queue.Queue = queue.Queue()
        self.launched = 0
        self.thread = threading.Thread(target=self._serve, name="device", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            item.started = time.perf_counter()
            try:
                item.value = item.fn()
            except BaseException as exc:  # handed to the scheduler by result()
                item.error = exc
            left = self.kernel_seconds - (time.perf_counter() - item.started)
            if left > 0:
                time.sleep(left)
            item.ended = time.perf_counter()
            item.done.set()

    def launch(self, fn) -> Launched:
        if not self.thread.is_alive():
            raise ArgumentError("the device is closed")
        item = Launched(self.launched, fn)
        self.launched += 1
        self.queue.put(item)
        return item

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(self.timeout)

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
