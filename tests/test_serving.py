"""The trained character model, paged serving with continuous batching, and the benchmark."""

import pytest

from flashkv_edu import charlm
from flashkv_edu.model import ModelConfig, TinyDecoder
from flashkv_edu.serving import Request, new_paged_cache, serve

PROMPTS = [list(range(1, 19)), list(range(1, 18)) + [40, 41], [30, 31], [5] * 9]


@pytest.mark.parametrize("backend, new", [("torch", 14), ("triton", 5)])
def test_continuous_batching_equals_uncached_generation(backend, new):
    model = TinyDecoder(ModelConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seqlen=256))
    reqs = [Request(p, new, arrival=i) for i, p in enumerate(PROMPTS)]
    cache = new_paged_cache(model, num_blocks=40, block_size=8, max_batch=3)  # 4 requests, 3 slots: one waits
    trace = serve(model, reqs, cache, backend)
    want = model.generate(PROMPTS, new, use_cache=False)
    assert [r.output for r in reqs] == want
    assert reqs[1].cached_tokens == 16  # shares two full blocks with the first prompt
    assert max(trace.running) == 3 and trace.running[-1] == 0
    assert cache.allocator.num_free == cache.allocator.num_blocks  # every block back in the pool
    assert max(trace.blocks_used) > 0 and trace.blocks_used[-1] == 0


def test_trained_checkpoint_is_small_and_generates_identically_with_the_paged_cache():
    assert charlm.CHECKPOINT.stat().st_size < 5 * 2**20
    model, meta = charlm.load()
    assert meta["val_loss"] < 2.0 and meta["steps"] > 100  # it learned something
    prompt = charlm.encode("def __init__(self, ")
    req = Request(prompt, 40)
    serve(model, [req], new_paged_cache(model, num_blocks=16, block_size=16, max_batch=1))
    assert req.output == model.generate([prompt], 40, use_cache=False)[0]
    text = charlm.decode(req.output)
    assert len(text) == 40 and set(text) <= set(charlm.VOCAB)


def test_tokenizer_round_trip_and_training_entry_point(tmp_path):
    assert charlm.decode(charlm.encode("for x in y:\n\treturn é")) == "for x in y:\n    return ?"
    meta = charlm.train(minutes=0.02, batch=2, seqlen=16, out=tmp_path / "m.pt")
    assert (tmp_path / "m.pt").exists() and meta["steps"] >= 1
    model, loaded = charlm.load(tmp_path / "m.pt")
    assert loaded["steps"] == meta["steps"] and isinstance(model, TinyDecoder)


def test_decode_benchmark_commands_run():
    from flashkv_edu.bench import bench_api

    rows = bench_api(shapes=((2, 256),), repeats=1)
    assert all(rows[0][name] > 0 for name in ("sdpa", "torch", "auto", "paged"))
