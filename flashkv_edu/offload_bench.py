"""Measurements behind notebook 11 and ``python -m flashkv_edu.bench offload``.

* :func:`measure_preemption`: per sequence length, what preempting one sequence costs here:
  recompute (prefill it again) against swap (blocks out to the host tier, or to disk, and back).
* :func:`measure_tiers`: read and write throughput of the host and disk tiers.
* :func:`measure_prefix_reuse`: a workload with shared prefixes served without and with prefix
  caching: tokens prefilled, time, outputs.

Timings are best-of-``repeats`` wall-clock seconds on this machine; they vary from run to run.
"""

from __future__ import annotations

import tempfile

import torch

from .memory import prefill_flops, shape_of
from .offload import TieredStore
from .paged import PagedKVCache
from .prefix import BlockHashIndex, compare_reuse, replay, shared_prefix_workload
from .profiling import best_time
from .serving import Request, new_paged_cache, paged_step, serve
from .validation import ArgumentError, check_int

__all__ = [
    "bench_offload",
    "fit_cost_model",
    "fit_line",
    "measure_preemption",
    "measure_prefix_reuse",
    "measure_tiers",
]


def _prefilled_cache(model, tokens: list[int], block_size: int) -> tuple[PagedKVCache, int]:
    cache = new_paged_cache(model, num_blocks=2 * -(-len(tokens) // block_size) + 2, block_size=block_size, max_batch=2)
    cache.prefix_caching = False
    slot, _ = cache.add_sequence(tokens)
    paged_step(model, cache, [slot], [tokens])
    return cache, slot


def measure_preemption(model, lengths=(32, 128, 512, 960), block_size: int = 16, repeats: int = 3) -> list[dict]:
    """For each length ``n``: seconds to recompute a preempted sequence (its prefill, prefix
    caching off), and to swap it out and back in through a host tier and through a disk tier
    (a temporary directory), the bytes moved, and whether the swapped bytes came back equal."""
    shape = shape_of(model)
    block_size = check_int("block_size", block_size, low=1)
    repeats = check_int("repeats", repeats, low=1)
    lengths = [check_int(f"lengths[{i}]", n, low=1, high=model.cfg.max_seqlen) for i, n in enumerate(lengths)]
    gen = torch.Generator().manual_seed(11)
    rows = []
    for n in lengths:
        tokens = torch.randint(0, model.cfg.vocab_size, (n,), generator=gen).tolist()
        cache, slot = _prefilled_cache(model, tokens, block_size)
        nblocks = len(cache.seqs[slot].blocks)

        def recompute(cache=cache, tokens=tokens):
            s, _ = cache.add_sequence(tokens)
            paged_step(model, cache, [s], [tokens])
            cache.free(s)

        row = {"tokens": n, "recompute_s": best_time(recompute, repeats)}
        expected = [pool[cache.seqs[slot].blocks].clone() for pool in cache.pools]
        same = True
        with tempfile.TemporaryDirectory() as tmp:
            for tier, store in (
                ("host", TieredStore.for_cache(cache, host_blocks=nblocks)),
                ("disk", TieredStore.for_cache(cache, host_blocks=0, disk_dir=tmp)),
            ):
                cache.attach_store(store)
                state = {"slot": slot}

                def swap(state=state, cache=cache):
                    state["slot"] = cache.swap_in(cache.swap_out(state["slot"]))

                row[f"swap_{tier}_s"] = best_time(swap, repeats)
                slot = state["slot"]
                blocks = cache.seqs[slot].blocks
                same &= all(torch.equal(pool[blocks], e) for pool, e in zip(cache.pools, expected, strict=True))
        row["bytes"] = nblocks * store.layout.nbytes
        row["prefill_flops"] = prefill_flops(shape, n)
        row["swapped_bytes_equal"] = same
        rows.append(row)
    return rows


def fit_line(xs, ys) -> tuple[float, float]:
    """Least-squares ``(intercept, slope)`` of ``ys`` against ``xs``."""
    n = len(xs)
    if n < 2 or len(ys) != n:
        raise ArgumentError(f"fit_line needs two or more (x, y) pairs, got {n} and {len(ys)}")
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ArgumentError("fit_line needs at least two different x values")
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return my - slope * mx, slope


def fit_cost_model(rows: list[dict]) -> dict:
    """The cost model's constants from :func:`measure_preemption` rows: achieved prefill FLOP/s
    and a fixed cost per prefill, host-swap bandwidth (bytes out and back in per second) and a
    fixed cost per swap. Slopes below a tiny floor are clamped so the model stays finite."""
    fixed_r, per_flop = fit_line([r["prefill_flops"] for r in rows], [r["recompute_s"] for r in rows])
    fixed_s, per_byte = fit_line([2 * r["bytes"] for r in rows], [r["swap_host_s"] for r in rows])
    return {
        "flops_per_s": 1 / max(per_flop, 1e-18),
        "recompute_overhead_s": max(fixed_r, 0.0),
        "bandwidth": 1 / max(per_byte, 1e-15),
        "swap_overhead_s": max(fixed_s, 0.0),
    }


def measure_tiers(model, blocks: int = 64, block_size: int = 16, repeats: int = 3) -> dict:
    """Bytes per second of writing ``blocks`` packed blocks to, and reading them from, the host
    tier and the disk tier (a temporary directory)."""
    blocks = check_int("blocks", blocks, low=1)
    cache = new_paged_cache(model, num_blocks=blocks, block_size=block_size, max_batch=1)
    for pool in cache.pools:
        pool.normal_()
    store = TieredStore.for_cache(cache, host_blocks=blocks)
    rows = store.layout.pack(cache.pools, range(blocks))
    keys = [bytes([i % 256, i // 256]) * 8 for i in range(blocks)]
    nbytes = rows.numel()
    out = {"block_bytes": store.layout.nbytes, "blocks": blocks}
    with tempfile.TemporaryDirectory() as tmp:
        for tier, make in (
            ("host", lambda: TieredStore.for_cache(cache, host_blocks=blocks)),
            ("disk", lambda: TieredStore.for_cache(cache, host_blocks=0, disk_dir=tmp)),
        ):
            store = make()

            def write(store=store):
                for key, row in zip(keys, rows, strict=True):
                    store.discard(key)
                    store.put(key, row)

            def read(store=store):
                for key in keys:
                    store.get(key)

            out[f"{tier}_write_Bps"] = nbytes / best_time(write, repeats)
            out[f"{tier}_read_Bps"] = nbytes / best_time(read, repeats)
            got = torch.stack([store.get(k)[1] for k in keys])
            if not torch.equal(got, rows):
                raise AssertionError(f"the {tier} tier returned different bytes")
    return out


def measure_prefix_reuse(model, new_tokens: int = 8, block_sizes=(16, 1), chats: int = 3) -> tuple[list[dict], list]:
    """Serve :func:`~flashkv_edu.prefix.shared_prefix_workload` (one request at a time, the
    cache kept between them) without prefix caching and with it at each block size. Per
    configuration: tokens prefilled and found in the cache, seconds spent prefilling, whether every output equals
    the run without reuse, and whether the tokens found equal a :class:`~flashkv_edu.prefix.
    BlockHashIndex` replay of the same prompts and outputs (the cache is large enough to evict
    nothing). Also returns :func:`~flashkv_edu.prefix.compare_reuse` over the same prompts and
    outputs (a radix tree beside block hashes of 1, 16 and 64)."""
    from . import charlm

    new_tokens = check_int("new_tokens", new_tokens, low=1)
    prompts = [charlm.encode(r.text) for r in shared_prefix_workload(chats)]
    longest = max(len(p) for p in prompts) + new_tokens
    if longest > model.cfg.max_seqlen:
        raise ArgumentError(f"the workload needs {longest} positions; the model has {model.cfg.max_seqlen}")
    results, baseline = [], None
    for bs in (None, *block_sizes):
        size = bs or 16
        cache = new_paged_cache(
            model,
            num_blocks=sum(-(-(len(p) + new_tokens) // size) for p in prompts) + 1,
            block_size=size,
            max_batch=1,
            max_seqlen=-(-longest // size) * size,
        )
        cache.prefix_caching = bs is not None
        requests = [Request(p, new_tokens) for p in prompts]
        prefilled = cached = 0
        seconds = 0.0
        for r in requests:
            trace = serve(model, [r], cache)
            prefilled += trace.prefill_tokens
            cached += trace.cached_tokens
            seconds += trace.prefill_seconds
        outputs = [r.output for r in requests]
        baseline = outputs if baseline is None else baseline
        predicted = replay(BlockHashIndex(size), prompts, outputs).hit_tokens if bs else [0] * len(prompts)
        results.append(
            {
                "config": "no prefix cache" if bs is None else f"block hash, block {bs}",
                "prefill_tokens": prefilled,
                "cached_tokens": cached,
                "prefill_s": seconds,
                "outputs_equal": outputs == baseline,
                "matches_index": [r.cached_tokens for r in requests] == predicted,
            }
        )
    return results, compare_reuse(prompts, baseline)


def bench_offload(lengths=(32, 128, 512, 960), repeats: int = 3) -> dict:
    """Print and return swap against recompute per preempted sequence, tier throughput, and
    prefix reuse (block hash against radix tree), all measured here on the trained model."""
    from . import charlm
    from .memory import crossover_tokens, recompute_seconds, swap_seconds

    model, _ = charlm.load()
    shape = shape_of(model)
    rows = measure_preemption(model, lengths, repeats=repeats)
    print("Preempting one sequence of the trained model (4 layers, 2 KV heads, d=32, fp32), block 16:")
    print(
        f"{'tokens':>7} {'KiB':>7} {'recompute ms':>13} {'swap host ms':>13} {'swap disk ms':>13} "
        f"{'recompute/swap(host)':>21}  bytes back equal"
    )
    for r in rows:
        print(
            f"{r['tokens']:>7} {r['bytes'] / 1024:>7.0f} {r['recompute_s'] * 1e3:>13.2f} "
            f"{r['swap_host_s'] * 1e3:>13.2f} "
            f"{r['swap_disk_s'] * 1e3:>13.2f} {r['recompute_s'] / r['swap_host_s']:>20.1f}x  {r['swapped_bytes_equal']}"
        )
    fit = fit_cost_model(rows)
    kv = shape.kv_bytes_per_token()
    cross = crossover_tokens(
        lambda n: swap_seconds(kv, n, fit["bandwidth"], overhead_s=fit["swap_overhead_s"]),
        lambda n: recompute_seconds(shape, n, fit["flops_per_s"], overhead_s=fit["recompute_overhead_s"]),
        model.cfg.max_seqlen,
    )
    print(
        f"fitted (least squares over the rows): prefill {fit['flops_per_s'] / 1e9:.1f} GFLOP/s + "
        f"{fit['recompute_overhead_s'] * 1e3:.2f} ms, host swap {fit['bandwidth'] / 1e9:.2f} GB/s + "
        f"{fit['swap_overhead_s'] * 1e3:.2f} ms; crossover within {model.cfg.max_seqlen} tokens: "
        + (str(cross) if cross else "none, one side is cheaper at every length")
    )
    tiers = measure_tiers(model)
    print(f"\nTier throughput ({tiers['blocks']} blocks of {tiers['block_bytes'] // 1024} KiB):")
    for tier in ("host", "disk"):
        print(
            f"  {tier}: write {tiers[f'{tier}_write_Bps'] / 1e9:.2f} GB/s, "
            f"read {tiers[f'{tier}_read_Bps'] / 1e9:.2f} GB/s"
        )
    served, reuse = measure_prefix_reuse(model)
    print("\nPrefix reuse over a shared-prefix workload (3 chats x 3 turns, a 4-request few-shot batch):")
    print(f"  {'index':<22} {'tokens found':>12} {'hit rate':>9}")
    for r in reuse:
        print(f"  {r.name:<22} {r.saved:>12} {r.hit_rate:>9.1%}")
    base = served[0]
    print(
        f"  served: {'config':<22} {'prefilled':>9} {'prefill ms':>10} {'time saved':>10}  outputs equal, found = index"
    )
    for r in served:
        saved = 1 - r["prefill_s"] / base["prefill_s"]
        print(
            f"          {r['config']:<22} {r['prefill_tokens']:>9} {r['prefill_s'] * 1e3:>10.1f} {saved:>10.0%}  "
            f"{r['outputs_equal']}, {r['matches_index']}"
        )
    return {"preemption": rows, "tiers": tiers, "served": served, "reuse": reuse}
