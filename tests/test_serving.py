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


# --- memory pressure: admission control and preemption (notebook 11) ----------------------------

PRESSURE_PROMPTS = [
    "import os\n",
    "def main(",
    "class Config:\n    def __init__(self",
    "import os\nimport sys\n",
    "    return self.",
    "for key, value in ",
]


def _pressure_requests():
    return [
        Request(charlm.encode(p), n, arrival=a)
        for p, n, a in zip(PRESSURE_PROMPTS, [30, 20, 40, 25, 15, 30], [0, 0, 1, 1, 2, 2], strict=True)
    ]


@pytest.fixture(scope="module")
def unpressured():
    model, _ = charlm.load()
    reqs = _pressure_requests()
    trace = serve(model, reqs, new_paged_cache(model, num_blocks=64, block_size=8, max_batch=6))
    assert not trace.preemptions
    return model, [r.output for r in reqs]


@pytest.mark.parametrize(
    "mode, host, disk",
    [("recompute", None, None), ("swap", 8, None), ("swap", 0, "disk"), ("swap", 2, "disk"), ("swap", 1, None)],
    ids=["recompute", "swap to host", "swap to disk", "swap to host then disk", "swap falls back to recompute"],
)
def test_serving_under_memory_pressure_gives_the_unpressured_tokens(unpressured, tmp_path, mode, host, disk):
    from flashkv_edu.offload import TieredStore

    model, want = unpressured
    reqs = _pressure_requests()
    cache = new_paged_cache(model, num_blocks=14, block_size=8, max_batch=6)
    if mode == "swap":
        cache.attach_store(TieredStore.for_cache(cache, host_blocks=host, disk_dir=tmp_path if disk else None))
    trace = serve(model, reqs, cache, preemption=mode)
    assert [r.output for r in reqs] == want
    assert sum(trace.preemptions.values()) >= 3 and max(r.preempted for r in reqs) >= 1
    if (mode, host) == ("swap", 1):  # the store holds one block: most preemptions become recompute
        assert trace.preemptions["recompute"] >= 1
    elif mode == "swap":
        assert trace.preemptions["swap"] >= 3 and trace.swapped_blocks > 0
    assert max(trace.blocks_used) <= 14 and cache.allocator.num_free == 14 and not cache.seqs
    if cache.store is not None:
        assert not cache.store.pinned and not list(tmp_path.glob("swap-*"))  # every swap row released
    assert all(r.finished is not None and len(r.output) == r.max_new_tokens for r in reqs)


def test_admission_control_queues_instead_of_failing(unpressured):
    """A pool too small for the whole batch: requests wait in the queue (and running ones are
    preempted) rather than fail, and a request that could never fit is refused before anything
    starts."""
    model, want = unpressured
    reqs = _pressure_requests()
    cache = new_paged_cache(model, num_blocks=10, block_size=8, max_batch=6)
    trace = serve(model, reqs, cache)
    assert [r.output for r in reqs] == want
    assert max(trace.waiting) >= 3 and max(trace.blocks_used) <= 10
    huge = [Request(charlm.encode("x" * 70), 20)]
    with pytest.raises(ValueError, match=r"requests\[0\].*needs 12 blocks of 8; the whole pool has 10"):
        serve(model, huge, cache)
    assert huge[0].output == [] and cache.allocator.num_free == 10


def test_preemption_with_a_corrupted_swap_file_recomputes(unpressured, tmp_path, monkeypatch):
    from flashkv_edu.offload import DiskTier, TieredStore

    model, want = unpressured
    real_put = DiskTier.put

    def put_then_damage(self, key, row):  # every swap file written is damaged on disk
        written = real_put(self, key, row)
        if key.startswith(b"swap:"):
            path = self.path(key)
            path.write_bytes(path.read_bytes()[:-1])
        return written

    monkeypatch.setattr(DiskTier, "put", put_then_damage)
    reqs = _pressure_requests()
    cache = new_paged_cache(model, num_blocks=14, block_size=8, max_batch=6)
    cache.attach_store(TieredStore.for_cache(cache, host_blocks=0, disk_dir=tmp_path))
    trace = serve(model, reqs, cache, preemption="swap")
    assert [r.output for r in reqs] == want
    assert cache.store.stats["corrupt"] >= 1
    assert any("swapped blocks lost" in e for e in trace.events)
