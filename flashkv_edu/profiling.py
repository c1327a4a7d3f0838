"""Measure what a PyTorch computation allocates, on any device, without a profiler."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


@dataclass
class AllocationReport:
    """Bytes of the largest tensor created, of all tensors created, and how many there were."""

    largest_bytes: int = 0
    total_bytes: int = 0
    count: int = 0


class _AllocationTracker(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.report = AllocationReport()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t._is_view():
                nbytes = t.untyped_storage().nbytes()
                self.report.count += 1
                self.report.total_bytes += nbytes
                self.report.largest_bytes = max(self.report.largest_bytes, nbytes)
        return out


def measure_allocations(fn, *args, **kwargs) -> tuple[object, AllocationReport]:
    """Run ``fn(*args, **kwargs)`` and record every new (non-view) tensor it creates.

    Returns ``(result, report)``. The report's ``largest_bytes`` is the biggest single
    intermediate, e.g. the score matrix of naive attention.
    """
    with _AllocationTracker() as tracker:
        result = fn(*args, **kwargs)
    return result, tracker.report
