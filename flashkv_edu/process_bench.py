"""Notebook 12's measurements: moving a prompt's KV against recomputing it, and overlap scheduling.

    python -m flashkv_edu.bench transfer   # KV bytes/s between two processes vs recompute, the crossover

:func:`bench_transfer` starts two processes (gloo over loopback). For each prompt length the
sender prefills the prompt with the trained model, then sends its KV (header, then every layer
with its SHA-256, as :mod:`flashkv_edu.disagg` does) and waits for the receiver's one-byte reply
after the last layer landed, checked, in the receiver's blocks: that round trip is the transfer
time. The receiver also times prefilling the same prompt itself (what a decode worker does when
no KV comes). Transfer wins where it is faster; the crossover is the shortest prompt from which
it is. :func:`bench_overlap` times :func:`~flashkv_edu.serving.serve` serial and overlapped on a
simulated device and with the model's own arithmetic.
"""

from __future__ import annotations

import functools
import statistics
import time

import torch

from . import charlm
from .serving import Request, launch_inputs, serve
from .steps import new_paged_cache, paged_step
from .transfer import GroupChannel, KVReceiver, KVSender, header_for
from .workers import run_workers

__all__ = ["bench_overlap", "bench_transfer", "overlap_workload", "transfer_probe"]


@functools.cache
def _text() -> str:
    return charlm.stdlib_text(40_000)


def _prompt(tokens: int) -> list[int]:
    """The first ``tokens`` characters of the standard library's source, as token ids."""
    return charlm.encode(_text()[:tokens])


def transfer_probe(rank: int, world: int, job: dict, timeout: float) -> dict:
    """Rank 0 sends each length's KV ``job["repeats"]`` times; rank 1 receives and times its own
    prefill. Returns the timings (seconds) per length."""
    model, _ = charlm.load()
    peer = GroupChannel(1 - rank, timeout)
    out = {}
    for n in job["lengths"]:
        prompt = _prompt(n)
        cache = new_paged_cache(model, -(-n // 16) + 1, 16, max_batch=1)
        slot, _ = cache.add_sequence()
        ack = torch.zeros(1, dtype=torch.uint8)
        times = []
        if rank == 0:
            paged_step(model, cache, [slot], [prompt])
            for r in range(job["repeats"]):
                header = header_for(cache, cache.seqs[slot].blocks, r, n)
                start = time.perf_counter()
                sender = KVSender(peer, header)
                sender.start()
                for layer in range(cache.num_layers):
                    sender.send_layer(cache, layer)
                sender.wait()
                peer.irecv(ack, 10_000_000 + r).wait()
                times.append(time.perf_counter() - start)
            out[n] = dict(transfer=times, bytes=header.total_bytes)
        else:
            cache.reserve(slot, n)
            for r in range(job["repeats"]):
                receiver = KVReceiver(peer, r, cache.num_layers)
                receiver.header()
                receiver.start()
                for layer in range(cache.num_layers):
                    receiver.land_layer(cache, layer, cache.seqs[slot].blocks)
                peer.isend(ack, 10_000_000 + r).wait()
            fresh = new_paged_cache(model, -(-n // 16) + 1, 16, max_batch=1)
            for _ in range(job["repeats"]):
                s, _ = fresh.add_sequence()
                start = time.perf_counter()
                paged_step(model, fresh, [s], [prompt])
                times.append(time.perf_counter() - start)
                fresh.free(s)
            out[n] = dict(recompute=times)
    return out


def bench_transfer(lengths=(16, 64, 256, 1000), repeats: int = 9, quiet: bool = False) -> list[dict]:
    """Per prompt length: KV bytes, median transfer and recompute seconds, bytes/s, the ratio.
    Prints a table and the crossover unless ``quiet``."""
    results = run_workers(transfer_probe, [dict(lengths=list(lengths), repeats=repeats)] * 2)
    for r in results:
        if not r.ok:
            raise RuntimeError(f"the transfer probe's rank {r.rank} failed: {r.error}")
    rows = []
    for n in lengths:
        sent, got = results[0].value[n], results[1].value[n]
        transfer, recompute = statistics.median(sent["transfer"]), statistics.median(got["recompute"])
        rows.append(dict(tokens=n, bytes=sent["bytes"], transfer=transfer, recompute=recompute,
                         bytes_per_s=sent["bytes"] / transfer, speedup=recompute / transfer))  # fmt: skip
    if not quiet:
        heads = ("tokens", "KV bytes", "transfer ms", "MB/s", "recompute ms", "recompute/transfer")
        print(" ".join(f"{h:>{w}}" for h, w in zip(heads, (7, 10, 12, 8, 13, 19), strict=True)))
        for r in rows:
            print(f"{r['tokens']:>7} {r['bytes']:>10} {r['transfer'] * 1e3:>12.2f} {r['bytes_per_s'] / 1e6:>8.0f} "
                  f"{r['recompute'] * 1e3:>13.2f} {r['speedup']:>18.2f}x")  # fmt: skip
        wins = [r["tokens"] for r in rows if r["speedup"] > 1]
        print("transfer beats recompute from", f"{wins[0]} tokens on" if wins else "no length measured")
    return rows


def overlap_workload(n: int = 8, new_tokens: int = 32) -> list[Request]:
    """``n`` short prompts of the standard library's source, ``new_tokens`` each, all at step 0."""
    return [Request(_prompt(16 + 8 * i)[-(8 + i) :], new_tokens) for i in range(n)]


def bench_overlap(kernel_seconds=(0.0, 0.005), host_seconds: float = 0.005, quiet: bool = False) -> list[dict]:
    """Whole-run seconds of ``serve`` serial and overlapped on the same device thread: with the
    model's arithmetic alone (``kernel_seconds`` 0) and with a simulated kernel; each also with
    ``host_seconds`` of simulated host work per planned step (a heavier scheduler). Outputs are
    checked token-identical to plain ``serve``."""
    model, _ = charlm.load()
    want = overlap_workload()
    serve(model, want, new_paged_cache(model, 128, 16, max_batch=8))
    heavy = lambda cache, slots: (time.sleep(host_seconds), launch_inputs(cache, slots))[1]  # noqa: E731
    rows = []
    for kernel in kernel_seconds:
        for host, inputs in ((0.0, None), (host_seconds, heavy)):
            row = dict(kernel=kernel, host=host)
            for overlap in (False, True):
                requests = overlap_workload()
                cache = new_paged_cache(model, 128, 16, max_batch=8)
                trace = serve(model, requests, cache, overlap=overlap, kernel_seconds=kernel or 1e-9, inputs=inputs)
                if [r.output for r in requests] != [r.output for r in want]:
                    raise RuntimeError("overlap scheduling changed the tokens")
                row["overlap" if overlap else "serial"] = trace.seconds
            row["saved"] = 1 - row["overlap"] / row["serial"]
            rows.append(row)
    if not quiet:
        print(f"{'kernel ms':>9} {'host ms':>8} {'serial ms':>10} {'overlap ms':>11} {'saved':>7}")
        for r in rows:
            print(f"{r['kernel'] * 1e3:>9.1f} {r['host'] * 1e3:>8.1f} {r['serial'] * 1e3:>10.0f} "
                  f"{r['overlap'] * 1e3:>11.0f} {r['saved']:>7.0%}")  # fmt: skip
    return rows
