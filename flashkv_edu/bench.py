"""Benchmarks that print ratios measured side by side in one run.

    python -m flashkv_edu.bench decode    # tokens/s with and without the KV cache
    python -m flashkv_edu.bench api       # flash_attn_with_kvcache (PyTorch path) vs SDPA; trained model
    python -m flashkv_edu.bench quant     # quantized caches: memory, attention error, model loss
    python -m flashkv_edu.bench hf        # a transformers Llama: eager, sdpa and flashkv_edu (three caches)
    python -m flashkv_edu.bench gpu       # decode on a CUDA GPU vs HBM roofline and SDPA (needs a GPU)
    python -m flashkv_edu.bench offload   # swap vs recompute, tier throughput, block hash vs radix tree
    python -m flashkv_edu.bench transfer  # KV between processes vs recompute; overlap scheduling
    python -m flashkv_edu.bench speculative  # speculative decoding against k, 1-layer and n-gram drafts
    python -m flashkv_edu.bench serve     # chunked prefill: time between tokens; cascade attention

Timings vary from run to run (and a 2-core laptop is noisy); each number is the best of a few
repeats, and the ratio compares two numbers taken in the same run.
"""

from __future__ import annotations

import argparse
import time

import torch

from . import runtime
from .cli import file_to_write, int_in
from .model import ModelConfig, TinyDecoder
from .profiling import best_time

__all__ = [
    "BENCH_CONFIG",
    "HF_SHAPE",
    "bench_api",
    "bench_decode",
    "bench_hf",
    "bench_quant",
    "bench_trained_model",
    "bench_varlen",
    "decode_tokens_per_second",
    "interleaved_medians",
]

BENCH_CONFIG = ModelConfig(vocab_size=256, dim=128, n_layers=4, n_heads=8, n_kv_heads=2, max_seqlen=4096)


def interleaved_medians(fns: dict, rounds: int, calls: int = 1) -> dict:
    """Median seconds of each function in ``fns`` (name -> callable): one warm-up call each,
    then ``rounds`` rounds that time every function in turn (best of ``calls`` calls), so a
    slow moment of the machine hits every column alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(best_time(fn, calls))
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def decode_tokens_per_second(model: TinyDecoder, context: int, steps: int = 8, repeats: int = 5) -> tuple[float, float]:
    """Tokens/s of greedy decode steps at a ``context``-token history, with the KV cache (one
    new token per step) and without (the whole sequence re-run per step through PyTorch's
    fused causal SDPA, the fastest uncached path). One warm-up run each, then the median of
    ``repeats`` runs, the two interleaved so a slow moment of the machine hits both."""
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

    t = interleaved_medians({"cached": cached, "uncached": uncached}, repeats)
    return steps / t["cached"], steps / t["uncached"]


def bench_decode(contexts=(128, 256, 512, 1024), steps: int = 8) -> list[dict]:
    """Measure :func:`decode_tokens_per_second` for each context length and print a table."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = TinyDecoder(BENCH_CONFIG)
    rows = []
    print(
        f"TinyDecoder dim={BENCH_CONFIG.dim} layers={BENCH_CONFIG.n_layers} heads={BENCH_CONFIG.n_heads} "
        f"kv_heads={BENCH_CONFIG.n_kv_heads}, {steps} greedy steps, {torch.get_num_threads()} threads"
    )
    print("uncached = the whole sequence re-run per step through causal SDPA; median of 5 after a warm-up")
    print(f"{'context':>8} {'cached tok/s':>13} {'uncached tok/s':>15} {'ratio':>7}")
    for ctx in contexts:
        with_cache, without = decode_tokens_per_second(model, ctx, steps)
        rows.append({"context": ctx, "cached": with_cache, "uncached": without, "ratio": with_cache / without})
        print(f"{ctx:>8} {with_cache:>13.1f} {without:>15.1f} {with_cache / without:>6.1f}x", flush=True)
    return rows


def _time_decode_shape(b, L, nheads, nheads_k, headdim, page, repeats):
    """Best seconds of SDPA, the PyTorch path (contiguous), ``backend="auto"`` and the paged
    PyTorch path for one decode shape: ``L - 1`` cached tokens plus the one appended."""
    import torch.nn.functional as F

    from .api import flash_attn_with_kvcache

    gen = torch.Generator().manual_seed(L)
    q = torch.randn(b, 1, nheads, headdim, generator=gen)
    k_cache = torch.randn(b, L, nheads_k, headdim, generator=gen)
    v_cache = torch.randn(b, L, nheads_k, headdim, generator=gen)
    k, v = torch.randn(b, 1, nheads_k, headdim, generator=gen), torch.randn(b, 1, nheads_k, headdim, generator=gen)
    lens = torch.full((b,), L - 1, dtype=torch.int32)
    pool_k = k_cache.reshape(-1, page, nheads_k, headdim)
    pool_v = v_cache.reshape(-1, page, nheads_k, headdim)
    table = torch.randperm(b * L // page, generator=gen).to(torch.int32).view(b, L // page)  # scattered pages
    qs, ks, vs = q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2)

    def call(backend, paged=False):
        if paged:
            return lambda: flash_attn_with_kvcache(
                q, pool_k, pool_v, k, v, cache_seqlens=lens, causal=True, block_table=table, backend=backend
            )
        return lambda: flash_attn_with_kvcache(
            q, k_cache, v_cache, k, v, cache_seqlens=lens, causal=True, backend=backend
        )

    fns = {
        "sdpa": lambda: F.scaled_dot_product_attention(qs, ks, vs, enable_gqa=True),
        "torch": call("torch"),
        "auto": call("auto"),
        "paged": call("torch", paged=True),
    }
    return interleaved_medians(fns, repeats, calls=3)


def bench_api(
    shapes=((4, 512), (4, 2048), (16, 1024), (1, 8192)),
    nheads=32,
    nheads_k=8,
    headdim=128,
    page: int = 16,
    repeats: int = 9,
) -> list[dict]:
    """Decode attention through ``flash_attn_with_kvcache`` (one new token appended, then
    attention over the cache): ``backend="auto"``, the PyTorch path over a contiguous cache,
    and the PyTorch path over a paged cache with scattered pages, against PyTorch's
    ``scaled_dot_product_attention`` over the same keys (which appends nothing), fp32 on this
    device. Each round times every column (best of 3 calls); prints the median round's
    milliseconds and the ratios, all measured in the same run."""
    rows = []
    auto = "Triton" if torch.cuda.is_available() else "PyTorch"
    print(
        f"decode attention, {nheads} query heads, {nheads_k} KV heads, d={headdim}, fp32, page {page}, "
        f"median of {repeats} rounds of best-of-3; auto = {auto} on this device"
    )
    print(
        f"{'batch x context':<16} {'SDPA ms':>8} {'torch ms':>9} {'auto ms':>8} {'paged ms':>9} "
        f"{'auto/torch':>11} {'torch/SDPA':>11} {'paged/SDPA':>11}"
    )
    for b, L in shapes:
        t = _time_decode_shape(b, L, nheads, nheads_k, headdim, page, repeats)
        rows.append(dict(batch=b, context=L, **t))
        print(
            f"{f'{b} x {L}':<16} {t['sdpa'] * 1e3:>8.2f} {t['torch'] * 1e3:>9.2f} {t['auto'] * 1e3:>8.2f} "
            f"{t['paged'] * 1e3:>9.2f} {t['auto'] / t['torch']:>10.2f}x {t['torch'] / t['sdpa']:>10.2f}x "
            f"{t['paged'] / t['sdpa']:>10.2f}x",
            flush=True,
        )
    return rows


def _varlen_case(decode_rows, context, chunk, nheads, nheads_k, headdim, backend):
    """Callables of one mixed step for :func:`bench_varlen`: ``decode_rows`` sequences of ``context
    - 1`` cached tokens with one new token each, and one sequence with ``chunk`` cached tokens and
    a ``chunk``-token prefill chunk. ``one``: a single varlen call (FA3's ``cu_seqlens_q``);
    ``two``: the decode rows batched, then the chunk; ``each``: one call per sequence."""
    from .fa3 import flash_attn_with_kvcache as fa3_call

    gen = torch.Generator().manual_seed(context + chunk)
    r = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    b = decode_rows + 1
    cap = max(context, 2 * chunk)
    kc, vc = r(b, cap, nheads_k, headdim), r(b, cap, nheads_k, headdim)
    lens = torch.tensor([context - 1] * decode_rows + [chunk], dtype=torch.int32)
    q_lens = [1] * decode_rows + [chunk]
    cu = torch.tensor([0] + [sum(q_lens[: i + 1]) for i in range(b)], dtype=torch.int32)
    q, k, v = r(int(cu[-1]), nheads, headdim), r(int(cu[-1]), nheads_k, headdim), r(int(cu[-1]), nheads_k, headdim)
    kw = dict(causal=True, backend=backend)
    d_rows = slice(0, decode_rows)

    def one():
        return fa3_call(
            q, kc, vc, k, v, cache_seqlens=lens, cu_seqlens_q=cu, max_seqlen_q=chunk, cu_seqlens_k_new=cu, **kw
        )

    def two():
        dec = fa3_call(q[d_rows, None], kc[d_rows], vc[d_rows], k[d_rows, None], v[d_rows, None],
                       cache_seqlens=lens[d_rows], **kw)  # fmt: skip
        last = slice(decode_rows, None)
        pre = fa3_call(q[None, last], kc[last], vc[last], k[None, last], v[None, last], cache_seqlens=lens[last], **kw)
        return torch.cat([dec[:, 0], pre[0]])

    def each():
        outs = []
        for i in range(b):
            rows, seq = slice(int(cu[i]), int(cu[i + 1])), slice(i, i + 1)
            outs.append(fa3_call(q[None, rows], kc[seq], vc[seq], k[None, rows], v[None, rows],
                                 cache_seqlens=lens[seq], **kw)[0])  # fmt: skip
        return torch.cat(outs)

    return dict(one=one, two=two, each=each)


def bench_varlen(
    decode_rows: int = 8,
    context: int = 1024,
    chunk: int = 256,
    nheads: int = 16,
    nheads_k: int = 4,
    headdim: int = 64,
    repeats: int = 5,
    backends=("torch", "triton"),
) -> list[dict]:
    """One varlen ``flash_attn_with_kvcache`` call mixing ``decode_rows`` decode rows and a
    ``chunk``-token prefill chunk (chunked prefill, FlashAttention 3's ``cu_seqlens_q``) against
    the same work as separate calls (the decode rows batched plus the chunk; one call per
    sequence), on each backend, fp32. Checks that the three give the same output; prints the
    median round's milliseconds and the ratios, all measured in this run. The Triton backend
    runs in the interpreter on a CPU (one round: its times say nothing about a GPU)."""
    rows = []
    print(
        f"one step: {decode_rows} decode rows at context {context} + a {chunk}-token chunk after {chunk} tokens; "
        f"{nheads} query heads, {nheads_k} KV heads, d={headdim}, fp32"
    )
    print(
        f"{'backend':<8} {'one call ms':>12} {'2 calls ms':>11} {'each ms':>9} {'one/2 calls':>12} "
        f"{'one/each':>9}  same"
    )
    for backend in backends:
        if backend == "triton" and not runtime.HAS_TRITON:
            continue
        interpreted = backend == "triton" and runtime.INTERPRET
        shape = (decode_rows, context, chunk, nheads, nheads_k, headdim)
        if interpreted:  # numpy runs the kernel: a step 16x smaller, timed once
            shape = (decode_rows, context // 4, chunk // 4, max(nheads // 2, nheads_k), nheads_k, headdim)
            print(
                f"triton runs in the interpreter here: {shape[0]} decode rows at context {shape[1]} + a "
                f"{shape[2]}-token chunk"
            )
        fns = _varlen_case(*shape, backend)
        outs = {name: fn() for name, fn in fns.items()}
        same = all(float((outs["one"] - o).abs().max()) < 1e-4 for o in outs.values())
        t = interleaved_medians(fns, 1 if interpreted else repeats, calls=1 if interpreted else 3)
        rows.append(dict(backend=backend, same=same, **t))
        print(
            f"{backend:<8} {t['one'] * 1e3:>12.2f} {t['two'] * 1e3:>11.2f} {t['each'] * 1e3:>9.2f} "
            f"{t['one'] / t['two']:>11.2f}x {t['one'] / t['each']:>8.2f}x  {'yes' if same else 'NO'}",
            flush=True,
        )
    return rows


def bench_trained_model(new_tokens: int = 48, prompt_chars: int = 600) -> dict:
    """Greedy generation of the trained character model: paged KV cache through
    ``flash_attn_with_kvcache`` (PyTorch path) against recomputing the whole text per token."""
    from . import charlm
    from .serving import Request, new_paged_cache, serve

    model, _ = charlm.load()
    prompt = charlm.encode(charlm.stdlib_text(200_000)[100_000 : 100_000 + prompt_chars])
    start = time.perf_counter()
    req = Request(prompt, new_tokens)
    serve(model, [req], new_paged_cache(model, num_blocks=64, block_size=16, max_batch=1))
    t_cached = time.perf_counter() - start
    start = time.perf_counter()
    uncached = model.generate([prompt], new_tokens, use_cache=False)[0]
    t_uncached = time.perf_counter() - start
    same = uncached == req.output
    print(
        f"trained model, {len(prompt)}-char prompt, {new_tokens} new tokens: "
        f"cached {new_tokens / t_cached:.1f} tok/s, uncached {new_tokens / t_uncached:.1f} tok/s, "
        f"ratio {t_uncached / t_cached:.1f}x; identical text: {same}"
    )
    return dict(cached=new_tokens / t_cached, uncached=new_tokens / t_uncached, identical=same)


def bench_quant(sequences: int = 16) -> list[dict]:
    """Memory, attention error and the trained model's validation loss for every scheme of
    :data:`flashkv_edu.quant.SCHEMES` (notebook 09). No timing: the numbers are deterministic."""
    from . import (
        charlm,
        quant_eval,  # notebook 09's experiments
    )
    from . import quant as Q
    from .cache import MODEL_SHAPES

    model, _ = charlm.load()
    losses = quant_eval.scheme_losses(model, sequences)
    k, v = quant_eval.outlier_keys()
    q = torch.randn(1, k.shape[1], 4, k.shape[3], generator=torch.Generator().manual_seed(1))
    layers, _, hk, d = MODEL_SHAPES["Llama-3-8B (GQA)"]
    rows, base = [], losses["fp32"]
    print(f"{'scheme':<36} {'KiB/token':>10} {'attn error':>11} {'val loss':>9} {'vs fp32':>8}")
    print(f"{'':<36} {'Llama-3-8B':>10} {'(outliers)':>11} {'nats/ch':>9}")
    for name, scheme in Q.SCHEMES.items():
        loss = losses[name]
        row = dict(
            scheme=name,
            kib_per_token=Q.bytes_per_token(scheme, layers, hk, d) / 1024,
            attention_error=quant_eval.attention_error(q, k, v, scheme),
            val_loss=loss,
        )
        rows.append(row)
        err, kib = row["attention_error"], row["kib_per_token"]
        print(f"{name:<36} {kib:>10.1f} {err:>11.2e} {loss:>9.4f} {loss - base:>+8.4f}")
    return rows


HF_SHAPE = dict(
    vocab_size=1024,
    hidden_size=512,
    intermediate_size=1024,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=4096,
)


@torch.no_grad()
def bench_hf(batch: int = 4, prompt: int = 512, new_tokens: int = 32, rounds: int = 5) -> dict:
    """A small transformers Llama (8 layers, hidden 512, 8 query / 2 KV heads, d=64, fp32) with one
    set of weights under ``attn_implementation="eager"``, ``"sdpa"`` and flashkv_edu's (with
    transformers' DynamicCache, and FlashKVCache contiguous and paged by 16): prefill of ``batch x
    prompt`` tokens, one decode step at that length, and a whole greedy ``generate`` of
    ``new_tokens``. Interleaved rounds (each the best of 3 calls per column), medians; ratios
    against sdpa from the same run."""
    from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

    from . import hf

    name = hf.register("auto")
    torch.manual_seed(0)
    models = {}
    for impl in ("eager", "sdpa", name):
        models[impl] = AutoModelForCausalLM.from_config(LlamaConfig(**HF_SHAPE), attn_implementation=impl).eval()
        if impl != "eager":
            models[impl].load_state_dict(models["eager"].state_dict())
    ids = torch.randint(3, HF_SHAPE["vocab_size"], (batch, prompt), generator=torch.Generator().manual_seed(1))
    capacity = prompt + new_tokens + 1
    columns = {
        "eager": ("eager", lambda m: DynamicCache(config=m.config)),
        "sdpa": ("sdpa", lambda m: DynamicCache(config=m.config)),
        "fkv + DynamicCache": (name, lambda m: DynamicCache(config=m.config)),
        "fkv + FlashKVCache": (name, lambda m: hf.FlashKVCache(m.config, batch, capacity)),
        "fkv + FlashKVCache paged 16": (name, lambda m: hf.FlashKVCache(m.config, batch, capacity, page_size=16)),
    }
    token = ids[:, -1:]
    fns = {}
    for label, (impl, new_cache) in columns.items():
        model = models[impl]
        warm = new_cache(model)
        model(input_ids=ids, use_cache=True, **hf.cache_kwargs(warm))  # the cache the decode steps extend

        def prefill(model=model, new_cache=new_cache):
            model(input_ids=ids, use_cache=True, **hf.cache_kwargs(new_cache(model)))

        def decode(model=model, cache=warm):
            model(input_ids=token, use_cache=True, **hf.cache_kwargs(cache))
            cache.crop(-1)  # back to the prompt: every timed step sees the same length

        def generate(model=model, new_cache=new_cache):
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
                **hf.cache_kwargs(new_cache(model)),
            )

        fns[(label, "prefill")], fns[(label, "decode")], fns[(label, "generate")] = prefill, decode, generate
    print(
        f"transformers Llama: {HF_SHAPE['num_hidden_layers']} layers, hidden {HF_SHAPE['hidden_size']}, "
        f"{HF_SHAPE['num_attention_heads']} query / {HF_SHAPE['num_key_value_heads']} KV heads, d=64, fp32; "
        f"batch {batch}, prompt {prompt}, {new_tokens} new tokens; {torch.get_num_threads()} threads; "
        f"median of {rounds} interleaved rounds of best-of-3"
    )
    times = interleaved_medians(fns, rounds, calls=3)  # each round: the best of 3 calls of every column
    head = f"{'':<30} {'prefill ms':>11} {'decode ms':>10} {'generate s':>11}"
    print(f"{head}   {'vs sdpa: prefill':>16} {'decode':>7} {'generate':>9}")
    rows = {}
    for label in columns:
        p, d, g = (times[(label, what)] for what in ("prefill", "decode", "generate"))
        sp, sd, sg = (times[("sdpa", what)] for what in ("prefill", "decode", "generate"))
        rows[label] = dict(
            prefill=p, decode=d, generate=g, prefill_ratio=p / sp, decode_ratio=d / sd, generate_ratio=g / sg
        )
        ratios = f"{p / sp:>15.2f}x {d / sd:>6.2f}x {g / sg:>8.2f}x"
        print(f"{label:<30} {p * 1e3:>11.1f} {d * 1e3:>10.2f} {g:>11.2f}   {ratios}", flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m flashkv_edu.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="what", required=True)
    dec = sub.add_parser("decode", help="tokens/s with and without the KV cache")
    longest = BENCH_CONFIG.max_seqlen
    dec.add_argument("--contexts", type=int_in(1, longest - 1), nargs="+", default=[128, 256, 512, 1024])
    dec.add_argument("--steps", type=int_in(1, 1024), default=8)
    sub.add_parser("api", help="flash_attn_with_kvcache vs SDPA, a varlen mixed step, and the trained model")
    sub.add_parser("quant", help="quantized caches: memory, attention error, trained model's loss")
    sub.add_parser("hf", help="a transformers Llama: eager, sdpa and flashkv_edu with three caches")
    sub.add_parser("offload", help="preemption by swap vs recompute, tier throughput, prefix reuse")
    sub.add_parser("transfer", help="KV moved between two processes vs recomputed; overlap scheduling")
    sub.add_parser("speculative", help="speculative decoding: speed-up and acceptance against k, both drafts")
    sub.add_parser("serve", help="chunked vs one-shot prefill: time between tokens, throughput; cascade attention")
    gpu = sub.add_parser("gpu", help="decode on a CUDA GPU: time, HBM bandwidth, roofline fraction, vs SDPA")
    gpu.add_argument(
        "--out", type=file_to_write, default=None, help="write the results JSON here (default: the package's data file)"
    )
    args = parser.parse_args(argv)
    if args.what == "decode" and max(args.contexts) + args.steps > longest:
        parser.error(f"--contexts + --steps must stay within the model's {longest} positions")
    if args.what == "decode":
        bench_decode(args.contexts, args.steps)
    elif args.what == "quant":
        bench_quant()
    elif args.what == "hf":
        bench_hf()
    elif args.what == "offload":
        from .offload_bench import bench_offload

        bench_offload()
    elif args.what == "speculative":
        from .spec_bench import bench_speculative

        bench_speculative()
    elif args.what == "serve":
        from .spec_bench import bench_cascade, bench_serve

        bench_serve()
        bench_cascade()
    elif args.what == "transfer":
        from .process_bench import bench_overlap, bench_transfer

        bench_transfer()
        bench_overlap()
    elif args.what == "gpu":
        from .gpu_bench import main as gpu_main

        raise SystemExit(gpu_main(args.out))
    else:
        bench_api()
        bench_varlen()
        bench_trained_model()


if __name__ == "__main__":
    main()
