"""The error contract's check, shared by the bad-input test modules: a snapshot of everything
observable about an object (tensors as bytes, objects by their fields, files by their bytes),
taken before and after a call that must fail without changing anything."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch


def snapshot(obj, seen=None):
    """Everything observable about ``obj``: tensors as raw bytes, objects by their fields (each
    object once: caches point back at their owners), files by their bytes."""
    seen = {} if seen is None else seen
    if isinstance(obj, torch.Tensor):
        raw = obj.detach().cpu().contiguous().view(-1).view(torch.uint8).clone() if obj.numel() else None
        return ("tensor", obj.dtype, tuple(obj.shape), tuple(obj.stride()), raw)
    if isinstance(obj, Path):
        files = sorted(p for p in obj.rglob("*")) if obj.is_dir() else ([obj] if obj.exists() else [])
        return ("path", [(str(p), hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir") for p in files])
    if isinstance(obj, (str, int, float, bool, bytes, type(None), torch.dtype, torch.device)):
        return obj
    if id(obj) in seen:
        return ("seen", seen[id(obj)])
    seen[id(obj)] = len(seen)
    if isinstance(obj, (list, tuple)):
        return [snapshot(x, seen) for x in obj]
    if isinstance(obj, dict):  # in order: an LRU list's order is state too
        return [("item", repr(k), snapshot(v, seen)) for k, v in obj.items()]
    if isinstance(obj, (set, frozenset)):
        return ("set", sorted(repr(x) for x in obj))
    if hasattr(obj, "__dict__"):
        return {k: snapshot(v, seen) for k, v in vars(obj).items() if not k.startswith("__")}
    return repr(obj)


def same(a, b) -> bool:
    if isinstance(a, tuple) and a and a[0] == "tensor":
        return (
            isinstance(b, tuple)
            and a[:4] == b[:4]
            and (a[4] is None) == (b[4] is None)
            and (a[4] is None or torch.equal(a[4], b[4]))
        )
    if isinstance(a, (list, tuple)) and not (a and a[0] == "tensor"):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


@dataclass
class Case:
    """One bad input: ``build`` returns ``(call, [objects that must not change])``; the call must
    raise ``exc`` with a message naming ``arg``."""

    name: str
    build: Callable
    exc: type
    arg: str


def case_registry():
    """``(cases, bad)``: a list and the decorator factory that appends to it,
    ``bad(name, exc, arg)(build)``."""
    cases: list[Case] = []

    def bad(name, exc, arg):
        def register(build):
            cases.append(Case(name, build, exc, arg))
            return build

        return register

    return cases, bad


def call(fn, *args, state=(), **kwargs):
    """A build result: calling ``fn(*args, **kwargs)`` must leave ``state`` unchanged."""
    return (lambda: fn(*args, **kwargs)), list(state)


def refused_unchanged(case: Case, fn: Callable, state) -> None:
    """The contract: ``fn()`` raises ``case.exc``, also a ``RuntimeError``, naming ``case.arg``, and
    every object of ``state`` is as it was."""
    import pytest

    before = snapshot(state)
    with pytest.raises(case.exc) as info:
        fn()
    assert isinstance(info.value, RuntimeError), f"{type(info.value).__name__} is not a RuntimeError"
    assert case.arg in str(info.value), f"message does not name {case.arg!r}: {info.value}"
    assert same(before, snapshot(state)), "a failed call changed state"


def x4(*shape) -> torch.Tensor:
    """A seeded ``randn`` of ``shape`` (the same values in every case)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))
