"""Worker processes in one ``torch.distributed`` group (notebook 12), started and always ended here.

:func:`run_workers` starts one process per job with ``spawn`` (a worker function must live in a
package module: spawn imports it by name, and cannot find a function defined in a notebook cell),
joins them into a process group on loopback (gloo; NCCL when every rank has its own GPU), collects
what each returns, and joins or kills every process it started, also when something fails: no
process outlives the call. Every wait has a timeout: gloo's default is 30 minutes; here a worker
that stops answering is given up on ``timeout`` seconds after the last sign of life of any worker.
"""

from __future__ import annotations

import datetime
import importlib
import multiprocessing
import os
import queue
import sys
import tempfile
import time
import types
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .validation import ArgumentError, ArgumentTypeError, check_positive

__all__ = ["DEFAULT_TIMEOUT", "WorkerResult", "loopback_interface", "process_group_backend", "run_workers"]

DEFAULT_TIMEOUT = 60.0
"""Seconds any wait between processes may take (gloo's own default: 30 minutes)."""
STARTUP_SECONDS = 60.0
"""Extra seconds a new process may take to import torch and join the group (2-5 s seen on 2 cores)."""


@dataclass
class WorkerResult:
    """What rank ``rank`` gave back: ``value`` (what its function returned) or ``error`` (why not:
    what it raised, how it exited, or that it did not answer), and its ``exitcode``."""

    rank: int
    value: object = None
    error: str | None = None
    exitcode: int | None = None
    pid: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def loopback_interface() -> str:
    """The loopback network interface gloo should use: ``lo0`` on macOS, ``lo`` elsewhere (gloo
    otherwise resolves the host name, which fails for mDNS ``.local`` names)."""
    return "lo0" if sys.platform == "darwin" else "lo"


def process_group_backend(world: int) -> str:
    """``"nccl"`` when CUDA gives every rank a GPU of its own, else ``"gloo"`` (CPU tensors)."""
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world else "gloo"


def _entry(target, rank: int, world: int, init_method: str, job, results, timeout: float) -> None:
    """A worker process: join the group, run ``target(rank, world, job, timeout)``, report."""
    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback_interface())
    torch.set_num_threads(1)  # ranks share the cores
    backend = process_group_backend(world)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout)
    )
    try:
        results.put((rank, target(rank, world, job, timeout), None))
    except BaseException as exc:  # reported to the parent, which decides what to recompute
        results.put((rank, None, f"{type(exc).__name__}: {exc}"))
    finally:
        dist.destroy_process_group()


def run_workers(target, jobs: list, timeout: float = DEFAULT_TIMEOUT) -> list[WorkerResult]:
    """Run ``target(rank, world, jobs[rank], timeout)`` in ``len(jobs)`` spawned processes that
    form one process group (``world = len(jobs)``; ``init_process_group`` with ``timeout``).
    ``target`` must be a function defined at the top level of a module (spawn imports it).

    Returns one :class:`WorkerResult` per rank. A worker that raised, exited (a fault, a signal)
    or did not answer has ``error`` set; when no worker has shown a sign of life (a result, an
    exit) for ``timeout`` seconds (plus start-up time), the rest are killed. Every process is
    joined or killed before this returns or raises."""
    if not callable(target) or getattr(target, "__qualname__", "").count("<"):
        raise ArgumentTypeError(f"target must be a function defined at the top level of a module, got {target!r}")
    if not isinstance(jobs, (list, tuple)) or not jobs:
        raise ArgumentError(f"jobs must be a non-empty list (one job per worker), got {jobs!r}")
    timeout = check_positive("timeout", timeout)
    target = _importable(target)
    ctx = multiprocessing.get_context("spawn")
    world = len(jobs)
    results = ctx.Queue()
    got: dict[int, WorkerResult] = {}
    with tempfile.TemporaryDirectory(prefix="flashkv-group-") as tmp:
        init_method = (Path(tmp) / "rendezvous").as_uri()
        procs = [
            ctx.Process(target=_entry, args=(target, rank, world, init_method, job, results, timeout),
                        name=f"flashkv-worker-{rank}", daemon=True)
            for rank, job in enumerate(jobs)
        ]  # fmt: skip
        try:
            with _main_module_hidden():
                for p in procs:
                    p.start()
            _collect(procs, results, got, timeout)
        finally:
            _end(procs, got)
            results.close()
            results.join_thread()
    out = []
    for rank, p in enumerate(procs):
        r = got.get(rank) or WorkerResult(rank, error=_why(p, timeout))
        r.exitcode, r.pid = p.exitcode, p.pid
        out.append(r)
    return out


def _importable(target):
    """``target`` as spawn can find it: a function of a module run with ``python -m`` is found
    under the module's own name (in ``__main__`` spawn would look in an empty module)."""
    if target.__module__ != "__main__":
        return target
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    if spec is None:
        raise ArgumentTypeError(
            f"target {target.__qualname__} is defined in a script or notebook cell: spawned workers cannot import "
            "it; define it in a module"
        )
    return getattr(importlib.import_module(spec.name), target.__qualname__)


@contextmanager
def _main_module_hidden():
    """While processes start, an empty ``__main__``: spawn then does not import the caller's script
    in every worker (a script without an ``if __name__ == "__main__"`` guard would start itself
    again); the workers' functions live in package modules and need nothing of it."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _collect(procs, results, got: dict, timeout: float) -> None:
    """Wait for every rank's result or exit; give up ``timeout`` (+ start-up) seconds after the last
    sign of life."""
    last_sign = time.monotonic()
    exited = set()
    while len(got) < len(procs):
        patience = timeout if got else timeout + STARTUP_SECONDS  # once one reported, all had started
        try:
            rank, value, error = results.get(timeout=0.1)
            got[rank] = WorkerResult(rank, value, error)
            last_sign = time.monotonic()
            continue
        except queue.Empty:
            pass
        now_exited = {rank for rank, p in enumerate(procs) if not p.is_alive()}
        if now_exited - exited:
            exited |= now_exited
            last_sign = time.monotonic()
        if all(rank in got or rank in exited for rank in range(len(procs))):
            _drain(results, got)
            return
        if time.monotonic() - last_sign > patience:
            return


def _drain(results, got: dict) -> None:
    """Results that reached the queue just before their process exited."""
    while True:
        try:
            rank, value, error = results.get(timeout=0.2)
        except queue.Empty:
            return
        got[rank] = WorkerResult(rank, value, error)


def _end(procs, got: dict) -> None:
    """Join every process that reported (it is ending); kill the others and any still running."""
    for rank, p in enumerate(procs):
        if p.pid is not None and rank in got:
            p.join(timeout=5)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


def _why(p, timeout: float) -> str:
    if p.exitcode is None or p.exitcode == -9:
        return f"did not answer within {timeout} s (killed)"
    if p.exitcode < 0:
        return f"was killed by signal {-p.exitcode}"
    return f"exited with code {p.exitcode} before reporting"
