"""Measure what a PyTorch computation allocates, on any device, without a profiler, and how long
it takes (best of a few calls)."""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = [
    "AllocationReport",
    "best_time",
    "measure_allocations",
]


@dataclass
class AllocationReport:
    """Bytes of the largest tensor created, of all tensors created, how many there were, and the
    peak of the bytes alive at once (new storages only: inputs and parameters made before the
    call do not count, as in vLLM's profile run, which measures a step's activations)."""

    largest_bytes: int = 0
    total_bytes: int = 0
    count: int = 0
    peak_live_bytes: int = 0
    live_bytes: int = 0


class _AllocationTracker(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.report = AllocationReport()
        self._counted: weakref.WeakSet = weakref.WeakSet()

    def _release(self, nbytes: int) -> None:
        self.report.live_bytes -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t._is_view():
                continue
            storage = t.untyped_storage()
            if id(storage) in inputs or storage in self._counted:
                continue  # an in-place op returned its input, or a storage seen before
            nbytes = storage.nbytes()
            self._counted.add(storage)
            weakref.finalize(storage, self._release, nbytes)
            report = self.report
            report.count += 1
            report.total_bytes += nbytes
            report.largest_bytes = max(report.largest_bytes, nbytes)
            report.live_bytes += nbytes
            report.peak_live_bytes = max(report.peak_live_bytes, report.live_bytes)
        return out


def measure_allocations(fn, *args, **kwargs) -> tuple[object, AllocationReport]:
    """Run ``fn(*args, **kwargs)`` and record every new (non-view) tensor it creates.

    Returns ``(result, report)``. The report's ``largest_bytes`` is the biggest single
    intermediate, e.g. the score matrix of naive attention; ``peak_live_bytes`` the most bytes
    of new tensors alive at one time (a step's activation peak).
    """
    with _AllocationTracker() as tracker:
        result = fn(*args, **kwargs)
    return result, tracker.report


def best_time(fn, repeats: int = 3) -> float:
    """Best wall-clock seconds of ``repeats`` calls of ``fn()``."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best
