"""Notebook 14's measurements: speculative decoding, chunked prefill, cascade attention.

    python -m flashkv_edu.bench speculative   # speed-up and acceptance against k, both drafts
    python -m flashkv_edu.bench serve         # chunked vs one-shot prefill: time between tokens

Each compares against the fastest honest baseline measured in the same run: target-only greedy
decoding through the same caches (:func:`~flashkv_edu.speculative.greedy_generate`), serving
without chunking, per-row attention (paged with the prefix pages shared, or contiguous, whichever
is faster). Timings vary from run to run; ratios compare numbers taken side by side.
"""

from __future__ import annotations

import statistics
import time

import torch

from . import charlm
from .api import flash_attn_with_kvcache
from .cascade import cascade_attention, cascade_bytes
from .model import ModelConfig, TinyDecoder
from .profiling import best_time
from .serving import Request, serve
from .speculative import NgramDraft, expected_tokens_per_call, greedy_generate, speculative_generate
from .steps import new_paged_cache

__all__ = ["SPEC_PROMPTS", "bench_cascade", "bench_serve", "bench_speculative", "call_costs", "tbt_stats"]

SPEC_PROMPTS = ("def main(argv):\n    ", "class KVCache:\n    def __init__(self, ", "import os\nimport sys\n")
SERVE_CONFIG = ModelConfig(vocab_size=96, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seqlen=4096)
"""The trained model's shape with rotary tables of 4,096 positions (random weights): a 2,048-token
prompt fits."""


def call_costs(target: TinyDecoder, draft: TinyDecoder, k: int, repeats: int = 20) -> dict:
    """Seconds of one target call over 1 and over ``k + 1`` new tokens, and of one draft call over
    1 token, after a 64-token prompt (best of ``repeats``)."""
    from .speculative import ModelCache

    prompt = charlm.encode(SPEC_PROMPTS[0] * 4)
    out = {}
    for name, model, n in (("target_1", target, 1), (f"target_{k + 1}", target, k + 1), ("draft_1", draft, 1)):
        cache = ModelCache(model, 1, 256, False)
        cache.feed([0], [prompt])

        def call(cache=cache, n=n):
            cache.feed([0], [[3] * n])
            cache.truncate(0, len(prompt))

        with torch.no_grad():
            out[name] = best_time(call, repeats)
    return out


def bench_speculative(ks=(1, 2, 3, 4, 6, 8), new_tokens: int = 128, rounds: int = 3, quiet: bool = False) -> list[dict]:
    """Per draft and ``k``: acceptance, tokens per target call (and the i.i.d. formula's), and the
    wall-clock speed-up over target-only greedy (medians of ``rounds`` interleaved runs, one prompt
    at a time). Outputs are checked identical to target-only greedy."""
    target, _ = charlm.load()
    draft, _ = charlm.load(charlm.DRAFT_CHECKPOINT)
    prompts = [charlm.encode(p) for p in SPEC_PROMPTS]
    want, _ = greedy_generate(target, prompts, new_tokens)
    rows = []
    base_times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for p in prompts:
            greedy_generate(target, [p], new_tokens)
        base_times.append(time.perf_counter() - start)
    base = statistics.median(base_times)
    for name, d in (("1-layer model", draft), ("n-gram lookup", NgramDraft())):
        for k in ks:
            times = []
            for _ in range(rounds):
                start = time.perf_counter()
                results = [speculative_generate(target, d, [p], new_tokens, k=k) for p in prompts]
                times.append(time.perf_counter() - start)
            if [r.tokens[0] for r in results] != want:
                raise RuntimeError(f"speculative decoding ({name}, k={k}) changed the tokens")
            proposed, accepted = sum(r.proposed for r in results), sum(r.accepted for r in results)
            calls = sum(r.target_calls for r in results)
            alpha = accepted / proposed
            per_call, speedup = len(prompts) * new_tokens / calls, base / statistics.median(times)
            rows.append(dict(draft=name, k=k, acceptance=alpha, tokens_per_call=per_call,
                             formula=expected_tokens_per_call(alpha, k), speedup=speedup))  # fmt: skip
    if not quiet:
        print(f"target-only greedy: {base * 1e3:.0f} ms for {len(prompts)} x {new_tokens} tokens")
        print(f"{'draft':>14} {'k':>2} {'accepted':>8} {'tokens/call':>11} {'formula':>7} {'speed-up':>8}")
        for r in rows:
            print(f"{r['draft']:>14} {r['k']:>2} {r['acceptance']:>8.2f} {r['tokens_per_call']:>11.2f} "
                  f"{r['formula']:>7.2f} {r['speedup']:>7.2f}x")  # fmt: skip
    return rows


def tbt_stats(requests) -> dict:
    """Time between tokens (seconds) of ``requests``: all gaps, their p50 and p99."""
    gaps = [b - a for r in requests for a, b in zip(r.token_times, r.token_times[1:], strict=False)]
    gaps.sort()
    pick = lambda q: gaps[min(len(gaps) - 1, int(q * len(gaps)))]  # noqa: E731
    return dict(gaps=gaps, p50=pick(0.5), p99=pick(0.99))


def _serve_workload(long_prompt: int, running: int, new_tokens: int, arrival: int) -> list[Request]:
    g = torch.Generator().manual_seed(0)
    short = [Request(torch.randint(3, 96, (16,), generator=g).tolist(), new_tokens) for _ in range(running)]
    long = Request(torch.randint(3, 96, (long_prompt,), generator=g).tolist(), 4, arrival=arrival)
    return [*short, long]


def bench_serve(long_prompt: int = 2048, running: int = 4, new_tokens: int = 96, budgets=(None, 512, 256, 128),
                quiet: bool = False) -> list[dict]:  # fmt: skip
    """``running`` requests decode while a ``long_prompt``-token prompt arrives (at step 8): the
    time between their tokens (p50, p99) and the throughput, without chunking and with token
    budgets. The model has the trained model's shape, random weights, rotary tables of 4,096."""
    model = TinyDecoder(SERVE_CONFIG, seed=0)
    blocks = (long_prompt + 16) // 16 + running * ((16 + new_tokens) // 16 + 2) + 8
    rows, outputs = [], None
    for budget in budgets:
        requests = _serve_workload(long_prompt, running, new_tokens, 8)
        cache = new_paged_cache(model, blocks, 16, max_batch=running + 1)
        start = time.perf_counter()
        trace = serve(model, requests, cache, max_batched_tokens=budget)
        seconds = time.perf_counter() - start
        got = [r.output for r in requests]
        if outputs is not None and got != outputs:
            raise RuntimeError(f"chunked prefill (budget {budget}) changed the tokens")
        outputs = got
        stats = tbt_stats(requests[:running])
        rows.append(dict(budget=budget, p50=stats["p50"], p99=stats["p99"], gaps=stats["gaps"], seconds=seconds,
                         tokens_per_s=sum(len(r.output) for r in requests) / seconds, steps=len(trace.step_tokens),
                         step_tokens=trace.step_tokens, step_prefill=trace.step_prefill_tokens))  # fmt: skip
    if not quiet:
        print(f"{running} requests decoding while a {long_prompt}-token prompt arrives:")
        print(f"{'budget':>9} {'TBT p50 ms':>10} {'TBT p99 ms':>10} {'tokens/s':>9} {'steps':>6}")
        for r in rows:
            label = "none" if r["budget"] is None else str(r["budget"])
            print(
                f"{label:>9} {r['p50'] * 1e3:>10.2f} {r['p99'] * 1e3:>10.2f} {r['tokens_per_s']:>9.1f} {r['steps']:>6}"
            )
    return rows


def _cascade_calls(b: int, p: int, suffix: int, h: int = 8, hk: int = 2, d: int = 64, bs: int = 16):
    """Three callables over the same keys: per-row paged (prefix pages shared), per-row
    contiguous (the prefix copied per row) and cascade."""
    g = torch.Generator().manual_seed(b * 10_000 + p)
    pk, pv = torch.randn(1, p, hk, d, generator=g), torch.randn(1, p, hk, d, generator=g)
    sk, sv = torch.randn(b, suffix, hk, d, generator=g), torch.randn(b, suffix, hk, d, generator=g)
    q = torch.randn(b, 1, h, d, generator=g)
    lens = torch.full((b,), suffix, dtype=torch.int32)
    full = torch.full((b,), p + suffix, dtype=torch.int32)
    npp, nsp = p // bs, -(-suffix // bs)
    pad = (0, 0, 0, 0, 0, nsp * bs - suffix)
    pool_k = torch.cat([pk.view(npp, bs, hk, d), torch.nn.functional.pad(sk, pad).reshape(b * nsp, bs, hk, d)])
    pool_v = torch.cat([pv.view(npp, bs, hk, d), torch.nn.functional.pad(sv, pad).reshape(b * nsp, bs, hk, d)])
    table = torch.stack([torch.cat([torch.arange(npp), npp + torch.arange(i * nsp, (i + 1) * nsp)]) for i in range(b)])
    table = table.to(torch.int32)
    kfull, vfull = torch.cat([pk.expand(b, p, hk, d), sk], 1), torch.cat([pv.expand(b, p, hk, d), sv], 1)

    def paged():
        return flash_attn_with_kvcache(q, pool_k, pool_v, cache_seqlens=full, block_table=table, causal=True)

    def contiguous():
        return flash_attn_with_kvcache(q, kfull, vfull, cache_seqlens=full, causal=True)

    def cascade():
        return cascade_attention(q, pk, pv, sk, sv, lens)

    return paged, contiguous, cascade


def bench_cascade(batches=(4, 8, 32), prefixes=(512, 1024, 4096), suffix: int = 16, quiet: bool = False) -> list[dict]:
    """Decode attention of ``B`` rows sharing a prefix of ``P`` tokens (8 query / 2 KV heads, d 64,
    fp32), each with a ``suffix``-token tail: per-row attention (the faster of paged with shared
    prefix pages and contiguous copies) against cascade attention; outputs compared; the
    bytes-read model's prediction beside the measured speed-up."""
    rows = []
    for b in batches:
        for p in prefixes:
            paged, contiguous, cascade = _cascade_calls(b, p, suffix)
            if not torch.allclose(cascade()[0], contiguous(), atol=1e-5):
                raise RuntimeError(f"cascade attention differs from per-row attention at B={b}, P={p}")
            per_row = min(best_time(paged, 5), best_time(contiguous, 5))
            casc = best_time(cascade, 5)
            read_rows, read_cascade = cascade_bytes(b, p, suffix, 2 * 2 * 64 * 4)
            rows.append(dict(batch=b, prefix=p, per_row=per_row, cascade=casc, speedup=per_row / casc,
                             model=read_rows / read_cascade))  # fmt: skip
    if not quiet:
        print(f"{'B':>3} {'prefix':>6} {'per-row ms':>10} {'cascade ms':>10} {'speed-up':>8} {'bytes model':>11}")
        for r in rows:
            print(f"{r['batch']:>3} {r['prefix']:>6} {r['per_row'] * 1e3:>10.2f} {r['cascade'] * 1e3:>10.2f} "
                  f"{r['speedup']:>7.1f}x {r['model']:>10.1f}x")  # fmt: skip
    return rows
