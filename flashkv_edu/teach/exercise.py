"""How an exercise check runs: the machinery every teaching file shares.

A check takes the learner's function and runs it on a list of cases. It prints exactly one
line and returns:

* ``None`` with ``<name>: not attempted yet ...`` when the function still raises
  ``NotImplementedError`` (the stub as shipped); the notebook then goes on with the package's
  own implementation, so it runs top to bottom;
* ``True`` with ``<name>: PASS (...)``;
* ``False`` with ``<name>: FAIL on <case>: expected ..., got ...`` for the first failing case.

Triton exercises are ``@triton.jit`` functions run inside a small harness kernel through
Triton's interpreter; a ``NotImplementedError`` raised in the kernel arrives wrapped in
Triton's ``InterpreterError`` and is recognised through the exception chain.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

NOT_ATTEMPTED = "not attempted yet (write your code in the cell above; the notebook goes on with the package's own)"


class CaseFailed(Exception):
    """One case of a check failed; the message says what was expected and what came back."""


@dataclass(frozen=True)
class Exercise:
    """One exercise of a notebook, for the README table and the solutions command."""

    notebook: str  # "01"
    name: str  # the function the learner writes, e.g. "my_gqa_attention"
    check: str  # the check's name in the teaching file
    minutes: int  # an estimate for a workshop
    triton: bool = False
    bug_hunt: bool = False
    source: str = ""  # where a bug-hunt's buggy code comes from


def _not_implemented(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, NotImplementedError) or "NotImplementedError" in repr(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def run_check(name: str, fn, cases: Iterable[tuple[str, Callable]], passed: str) -> bool | None:
    """Run ``case(fn)`` for each ``(label, case)`` and print the verdict line (see the module
    docstring). ``passed`` describes what a PASS covered."""
    if not callable(fn):
        print(f"{name}: FAIL: expected a function, got {type(fn).__name__}")
        return False
    for i, (label, case) in enumerate(cases):
        try:
            case(fn)
        except CaseFailed as exc:
            print(f"{name}: FAIL on {label}: {exc}")
            return False
        except Exception as exc:  # the learner's code may raise anything
            if _not_implemented(exc):
                if i == 0:
                    print(f"{name}: {NOT_ATTEMPTED}")
                    return None
                print(f"{name}: FAIL on {label}: your function raised NotImplementedError")
                return False
            print(f"{name}: FAIL on {label}: your code raised {type(exc).__name__}: {str(exc)[:300]}")
            return False
    print(f"{name}: PASS ({passed})")
    return True


def _show(x) -> str:
    if isinstance(x, torch.Tensor):
        if x.numel() <= 12:
            return str(x.tolist())
        return f"tensor of shape {tuple(x.shape)}"
    return repr(x)


def expect_equal(what: str, expected, got) -> None:
    """Exact equality of ints, tuples, lists or tensors (dtype aside)."""
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            raise CaseFailed(f"{what}: expected a tensor, got {type(got).__name__}")
        if tuple(got.shape) != tuple(expected.shape):
            raise CaseFailed(f"{what}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}")
        same = got.to(expected.dtype) == expected
        if expected.dtype.is_floating_point:
            same = same | (torch.isnan(expected) & torch.isnan(got.to(expected.dtype)))
        if not bool(same.all()):
            idx = tuple((~same).nonzero()[0].tolist())
            raise CaseFailed(f"{what}: at index {idx} expected {expected[idx].item()}, got {got[idx].item()}")
        return
    if got != expected:
        raise CaseFailed(f"{what}: expected {_show(expected)}, got {_show(got)}")


def expect_close(what: str, expected: torch.Tensor, got, atol: float = 1e-4) -> None:
    """``got`` within ``atol`` of ``expected`` everywhere (equal infinities count as equal)."""
    if not isinstance(got, torch.Tensor):
        raise CaseFailed(f"{what}: expected a tensor, got {type(got).__name__}")
    if tuple(got.shape) != tuple(expected.shape):
        raise CaseFailed(f"{what}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}")
    e, g = expected.detach().double().cpu(), got.detach().double().cpu()
    ok = (e - g).abs() <= atol
    ok = ok | (e == g)
    if not bool(ok.all()):
        idx = tuple((~ok).nonzero()[0].tolist())
        raise CaseFailed(
            f"{what}: at index {idx} expected {e[idx].item():.6g}, got {g[idx].item():.6g} (tolerance {atol:g})"
        )


def expect_pair(what: str, got) -> tuple:
    if not isinstance(got, tuple) or len(got) != 2:
        raise CaseFailed(f"{what}: return a pair (a tuple of two), got {type(got).__name__}")
    return got


def expect_dtype(what: str, dtype: torch.dtype, got) -> None:
    """``got`` is a tensor of ``dtype``."""
    if not isinstance(got, torch.Tensor):
        raise CaseFailed(f"{what}: expected a tensor, got {type(got).__name__}")
    if got.dtype != dtype:
        raise CaseFailed(f"{what}: expected dtype {dtype}, got {got.dtype}")


def call_unchanged(f, *args, may_write: tuple = (), **kwargs):
    """``f(*args, **kwargs)``, then a check that no tensor argument was changed in place but the
    positional arguments listed in ``may_write`` (the caches a function is meant to write). The
    caller's tensors are passed as they are, not cloned: an in-place edit fails the case."""
    named = [(i, f"argument {i + 1}", a) for i, a in enumerate(args) if i not in may_write]
    named += [(None, name, a) for name, a in kwargs.items()]
    before = [(name, t, t.clone()) for _, name, t in named if isinstance(t, torch.Tensor)]
    result = f(*args, **kwargs)
    for name, t, copy in before:
        same = t.shape == copy.shape and bool(((t == copy) | (t.isnan() & copy.isnan())).all())
        if not same:
            raise CaseFailed(f"your function changed its input {name} in place; leave the caller's tensors as they are")
    return result


class MemoryRecord:
    """Every address a Triton kernel loads or stores while the record is open, read from Triton's
    interpreter (under a compiled GPU kernel nothing is recorded and :attr:`available` is False).

        with MemoryRecord() as mem:
            kernel[grid](...)
        mem.loads, mem.stores   # numpy arrays of byte addresses (masked-off lanes left out)
    """

    def __init__(self):
        self.loads: list = []
        self.stores: list = []
        self.available = False

    def __enter__(self):
        import numpy as np

        from flashkv_edu import runtime

        if not runtime.INTERPRET:
            return self
        from triton.runtime import interpreter

        builder = interpreter.InterpreterBuilder
        self._saved = (builder.create_masked_load, builder.create_masked_store)
        load, store = self._saved
        record = self

        def addresses(ptrs, mask):
            return np.asarray(ptrs.data)[np.broadcast_to(np.asarray(mask.data, dtype=bool), np.shape(ptrs.data))]

        # (ptrs, mask, ...) for loads and (ptrs, value, mask, ...) for stores in every Triton
        # release here; the trailing arguments differ between releases and are passed through.
        def create_masked_load(this, ptrs, mask, *rest, **kw):
            record.loads.append(addresses(ptrs, mask).astype(np.uint64).ravel())
            return load(this, ptrs, mask, *rest, **kw)

        def create_masked_store(this, ptrs, value, mask, *rest, **kw):
            record.stores.append(addresses(ptrs, mask).astype(np.uint64).ravel())
            return store(this, ptrs, value, mask, *rest, **kw)

        builder.create_masked_load, builder.create_masked_store = create_masked_load, create_masked_store
        self.available = True
        return self

    def __exit__(self, *exc):
        if self.available:
            from triton.runtime import interpreter

            interpreter.InterpreterBuilder.create_masked_load, interpreter.InterpreterBuilder.create_masked_store = (
                self._saved
            )
        return False

    def _all(self, which: str):
        import numpy as np

        chunks = getattr(self, which)
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint64)

    def touched(self, which: str, t: torch.Tensor) -> torch.Tensor:
        """Bool tensor of ``t``'s shape (``t`` contiguous): True where the kernel loaded
        (``which="loads"``) or stored (``"stores"``) that element."""
        addrs = self._all(which).astype("int64") - t.data_ptr()
        esz = t.element_size()
        offsets = addrs[(addrs >= 0) & (addrs < t.numel() * esz)] // esz
        hit = torch.zeros(t.numel(), dtype=torch.bool)
        hit[torch.as_tensor(offsets, dtype=torch.long)] = True
        return hit.view(t.shape)

    def strays(self, which: str, tensors) -> int:
        """How many addresses lie outside every tensor in ``tensors`` (memory the kernel had no
        business touching at all)."""
        addrs = self._all(which).astype("int64")
        inside = addrs < 0
        for t in tensors:
            lo = t.data_ptr()
            inside |= (addrs >= lo) & (addrs < lo + t.numel() * t.element_size())
        return int((~inside).sum())


def expect_within(what: str, mem: MemoryRecord, which: str, t: torch.Tensor, valid: torch.Tensor) -> None:
    """Under the interpreter: every element of ``t`` the kernel loaded or stored (``which``) is
    one that ``valid`` (bool, ``t``'s shape) allows. Under a compiled kernel this checks nothing."""
    if not mem.available:
        return
    bad = mem.touched(which, t) & ~valid
    if bool(bad.any()):
        idx = tuple(bad.nonzero()[0].tolist())
        verb = "read" if which == "loads" else "written"
        raise CaseFailed(f"{what}{list(idx)} lies outside the valid data but was {verb}: mask the {which}")
