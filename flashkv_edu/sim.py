"""Serving-memory simulation: contiguous reservation vs paged blocks (notebook 06).

    python -m flashkv_edu.sim        # print the comparison table

A synthetic ShareGPT-like workload (log-normal prompt and output lengths with means of about
161 and 338 tokens, total at most 2048, Poisson arrivals) is served one decode step at a time
from a fixed KV budget of 16,384 token slots (OPT-13B on an A100-40GB has about 15.7K). Every
step each running request stores one more token; a request leaves when its output is done.
Requests are admitted first-come first-served while memory allows.

Contiguous schemes reserve a request's region up front, through a real allocator, so waste is
split as the vLLM paper does: slots reserved for tokens not generated yet, internal
fragmentation (reserved beyond the final length) and external fragmentation (free slots the
next request cannot use):

* ``max``: 2048 slots (the model's maximum length), buddy allocator;
* ``pow2``: the final length rounded up to a power of two, buddy allocator;
* ``oracle``: exactly the final length (unknowable in practice), first-fit allocator.

Paged schemes allocate blocks on demand; when a running request needs a block and none is
free, the most recently admitted request is preempted (its blocks freed, recomputed later).
"""

from __future__ import annotations

import argparse
import math
import random
from dataclasses import dataclass

from .cli import float_in, int_in

__all__ = [
    "CAPACITY",
    "MAX_LEN",
    "PAPER",
    "PAPER_FIG2",
    "BuddyAllocator",
    "FirstFitAllocator",
    "Request",
    "SimResult",
    "compare",
    "format_results",
    "sharegpt_like_workload",
    "simulate",
]

MAX_LEN = 2048
CAPACITY = 16384


@dataclass
class Request:
    arrival: float
    prompt: int
    output: int

    @property
    def total(self) -> int:
        return self.prompt + self.output


def sharegpt_like_workload(
    n: int, rate: float, seed: int = 0, mean_prompt: float = 161.0, mean_output: float = 338.0, sigma: float = 1.0
) -> list[Request]:
    """``n`` requests with Poisson arrivals (``rate`` per decode step) and log-normal lengths
    of the given means, clipped so that prompt + output <= 2048."""
    rng = random.Random(seed)
    t = 0.0
    reqs = []
    for _ in range(n):
        t += rng.expovariate(rate)
        p = max(1, int(rng.lognormvariate(math.log(mean_prompt) - sigma**2 / 2, sigma)))
        o = max(1, int(rng.lognormvariate(math.log(mean_output) - sigma**2 / 2, sigma)))
        p = min(p, MAX_LEN - 1)
        o = min(o, MAX_LEN - p)
        reqs.append(Request(t, p, o))
    return reqs


class BuddyAllocator:
    """Power-of-two buddy allocator over ``capacity`` slots (a power of two)."""

    def __init__(self, capacity: int):
        self.order = capacity.bit_length() - 1
        self.free = {k: set() for k in range(self.order + 1)}
        self.free[self.order].add(0)
        self.size_of = {}

    def alloc(self, n: int) -> int | None:
        k = max(0, (n - 1).bit_length())
        j = next((j for j in range(k, self.order + 1) if self.free[j]), None)
        if j is None:
            return None
        addr = min(self.free[j])
        self.free[j].remove(addr)
        while j > k:
            j -= 1
            self.free[j].add(addr + (1 << j))
        self.size_of[addr] = k
        return addr

    def release(self, addr: int) -> None:
        k = self.size_of.pop(addr)
        while k < self.order and (addr ^ (1 << k)) in self.free[k]:
            self.free[k].remove(addr ^ (1 << k))
            addr = min(addr, addr ^ (1 << k))
            k += 1
        self.free[k].add(addr)

    def reserved(self, addr: int) -> int:
        return 1 << self.size_of[addr]


class FirstFitAllocator:
    """Contiguous first-fit allocator over ``capacity`` slots (exact sizes, holes stay)."""

    def __init__(self, capacity: int):
        self.holes = [(0, capacity)]  # (start, length), sorted
        self.size_of = {}

    def alloc(self, n: int) -> int | None:
        for i, (start, length) in enumerate(self.holes):
            if length >= n:
                self.holes[i] = (start + n, length - n)
                if self.holes[i][1] == 0:
                    del self.holes[i]
                self.size_of[start] = n
                return start
        return None

    def release(self, addr: int) -> None:
        n = self.size_of.pop(addr)
        self.holes.append((addr, n))
        self.holes.sort()
        merged = []
        for start, length in self.holes:
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1] = (merged[-1][0], merged[-1][1] + length)
            else:
                merged.append((start, length))
        self.holes = merged

    def reserved(self, addr: int) -> int:
        return self.size_of[addr]


@dataclass
class SimResult:
    scheme: str
    token_share: float  # share of KV memory holding token states
    reserved_share: float  # reserved for tokens still to be generated
    internal_share: float  # reserved beyond the request's final length (incl. block tails)
    external_share: float  # free memory (unusable by the waiting request)
    concurrent: float  # average running requests
    finished: int
    preemptions: int = 0


def simulate(
    scheme: str,
    requests: list[Request],
    capacity: int = CAPACITY,
    block_size: int = 16,
    steps: int = 4000,
    warmup: int = 1000,
) -> SimResult:
    """Serve ``requests`` for ``steps`` decode steps and average memory use over the steps after
    ``warmup``. ``scheme``: ``"max"``, ``"pow2"``, ``"oracle"`` or ``"paged"``."""
    contiguous = scheme in ("max", "pow2", "oracle")
    alloc = (FirstFitAllocator(capacity) if scheme == "oracle" else BuddyAllocator(capacity)) if contiguous else None
    free_blocks = capacity // block_size
    queue = list(requests)
    queue.sort(key=lambda r: r.arrival)
    waiting: list[Request] = []
    running: list[dict] = []
    sums = dict(tokens=0.0, reserved=0.0, internal=0.0, running=0.0)
    finished = preempted = 0
    measured = 0

    def want(r: Request) -> int:
        return {"max": MAX_LEN, "pow2": 1 << max(0, (r.total - 1).bit_length()), "oracle": r.total}[scheme]

    for step in range(steps):
        while queue and queue[0].arrival <= step:
            waiting.append(queue.pop(0))
        while waiting:  # FCFS admission: the head of the line waits if memory is short
            r = waiting[0]
            if contiguous:
                addr = alloc.alloc(want(r))
                if addr is None:
                    break
                running.append(dict(req=r, stored=r.prompt, addr=addr))
            else:
                need = -(-(r.prompt + 1) // block_size)
                if need > free_blocks:
                    break
                free_blocks -= -(-r.prompt // block_size)
                running.append(dict(req=r, stored=r.prompt, blocks=-(-r.prompt // block_size)))
            waiting.pop(0)
        # one decode step: every running request stores one more token
        for state in list(running):
            if state not in running:
                continue  # preempted during this step
            if not contiguous and state["stored"] % block_size == 0:
                while free_blocks == 0 and len(running) > 1:
                    victim = running.pop()  # most recently admitted
                    free_blocks += victim["blocks"]
                    waiting.insert(0, victim["req"])
                    preempted += 1
                    if victim is state:
                        break
                if state not in running:
                    continue
                free_blocks -= 1
                state["blocks"] += 1
            state["stored"] += 1
        for state in list(running):
            if state["stored"] >= state["req"].total:
                running.remove(state)
                finished += 1
                if contiguous:
                    alloc.release(state["addr"])
                else:
                    free_blocks += state["blocks"]
        if step >= warmup:
            measured += 1
            tokens = sum(s["stored"] for s in running)
            sums["tokens"] += tokens
            sums["running"] += len(running)
            if contiguous:
                sums["reserved"] += sum(s["req"].total - s["stored"] for s in running)
                sums["internal"] += sum(alloc.reserved(s["addr"]) - s["req"].total for s in running)
            else:
                sums["internal"] += sum(s["blocks"] * block_size - s["stored"] for s in running)
    m = max(measured, 1)
    tok, res, inner = sums["tokens"] / m / capacity, sums["reserved"] / m / capacity, sums["internal"] / m / capacity
    name = f"paged, block {block_size}" if scheme == "paged" else scheme
    return SimResult(name, tok, res, inner, max(0.0, 1 - tok - res - inner), sums["running"] / m, finished, preempted)


PAPER = {"max": (20.4, 7.00), "pow2": (26.8, 9.81), "oracle": (38.2, 13.62), "paged, block 16": (96.3, 30.42)}

#: The vLLM paper's Fig. 2, per contiguous scheme: % of KV memory holding tokens, reserved for
#: future tokens, internal fragmentation, and "external fragmentation & others" (the split
#: between segments read from the figure's stacking order).
PAPER_FIG2 = {
    "max": (20.4, 13.3, 57.3, 8.9),
    "pow2": (26.8, 17.9, 13.6, 41.6),
    "oracle": (38.2, 25.2, 0.0, 36.6),
}


def compare(rate: float = 2.0, n: int = 20000, seed: int = 0, block_sizes=(16, 64, 256)) -> list[SimResult]:
    """Run every scheme on the same workload (``rate`` requests per decode step saturates the
    budget, as the vLLM paper's comparison does)."""
    reqs = sharegpt_like_workload(n, rate, seed)
    results = [simulate(s, reqs) for s in ("max", "pow2", "oracle")]
    results += [simulate("paged", reqs, block_size=b) for b in block_sizes]
    return results


def format_results(results) -> str:
    """A table of the results next to the vLLM paper's Fig. 2 and Fig. 13 figures."""
    head = (
        f"{'scheme':<16} {'tokens':>7} {'reserved':>9} {'internal':>9} {'external':>9} "
        f"{'requests':>9} {'paper tokens':>13} {'paper requests':>15}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        paper = PAPER.get(r.scheme)
        ptok = f"{paper[0]:.1f}%" if paper else ""
        preq = f"{paper[1]:.2f}" if paper else ""
        lines.append(
            f"{r.scheme:<16} {r.token_share:>7.1%} {r.reserved_share:>9.1%} {r.internal_share:>9.1%} "
            f"{r.external_share:>9.1%} {r.concurrent:>9.1f} {ptok:>13} {preq:>15}"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m flashkv_edu.sim", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rate", type=float_in(0.0, 100.0), default=2.0, help="arrivals per decode step (default 2: saturating)"
    )
    parser.add_argument("--seed", type=int_in(0), default=0)
    args = parser.parse_args(argv)
    print(format_results(compare(args.rate, seed=args.seed)))


if __name__ == "__main__":
    main()
