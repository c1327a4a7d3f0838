"""Benchmarks that print ratios measured side by side in one run.

    python -m flashkv_edu.bench decode    # tokens/s with and without the KV cache

Timings vary from run to run (and a 2-core laptop is noisy); each number is the best of a few
repeats, and the ratio compares two numbers taken in the same run.
"""

from __future__ import annotations

import argparse
import time

import torch

from .model import ModelConfig, TinyDecoder

BENCH_CONFIG = ModelConfig(vocab_size=256, dim=128, n_layers=4, n_heads=8, n_kv_heads=2, max_seqlen=4096)


def best_time(fn, repeats: int = 3) -> float:
    """Best wall-clock seconds of ``repeats`` calls of ``fn()``."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def decode_tokens_per_second(model: TinyDecoder, context: int, steps: int = 8,
                             repeats: int = 3) -> tuple[float, float]:
    """Tokens/s of greedy decode steps at a ``context``-token history, with the KV cache
    (one new token per step) and without (the whole sequence re-run per step)."""
    gen = torch.Generator().manual_seed(context)
    prompt = torch.randint(0, model.cfg.vocab_size, (1, context), generator=gen)

    cache = model.new_cache(1, context + steps)
    model(prompt, cache)  # prefill once; each timed run rewinds the lengths to `context`

    def cached():
        for layer in cache:
            layer.cache_seqlens.fill_(context)
        token = prompt[:, -1:]
        for _ in range(steps):
            token = model(token, cache)[:, -1:].argmax(-1)

    def uncached():
        seq = prompt
        for _ in range(steps):
            seq = torch.cat([seq, model(seq)[:, -1:].argmax(-1)], dim=1)

    t_cached = best_time(cached, repeats)
    t_uncached = best_time(uncached, max(1, repeats - 1))
    return steps / t_cached, steps / t_uncached


def bench_decode(contexts=(128, 256, 512, 1024), steps: int = 8) -> list[dict]:
    """Measure :func:`decode_tokens_per_second` for each context length and print a table."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = TinyDecoder(BENCH_CONFIG)
    rows = []
    print(f"TinyDecoder dim={BENCH_CONFIG.dim} layers={BENCH_CONFIG.n_layers} heads={BENCH_CONFIG.n_heads} "
          f"kv_heads={BENCH_CONFIG.n_kv_heads}, {steps} greedy steps, {torch.get_num_threads()} threads")
    print(f"{'context':>8} {'cached tok/s':>13} {'uncached tok/s':>15} {'ratio':>7}")
    for ctx in contexts:
        with_cache, without = decode_tokens_per_second(model, ctx, steps)
        rows.append({"context": ctx, "cached": with_cache, "uncached": without, "ratio": with_cache / without})
        print(f"{ctx:>8} {with_cache:>13.1f} {without:>15.1f} {with_cache / without:>6.1f}x", flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flashkv_edu.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    dec = sub.add_parser("decode", help="tokens/s with and without the KV cache")
    dec.add_argument("--contexts", type=int, nargs="+", default=[128, 256, 512, 1024])
    dec.add_argument("--steps", type=int, default=8)
    args = parser.parse_args(argv)
    if args.what == "decode":
        bench_decode(args.contexts, args.steps)


if __name__ == "__main__":
    main()
