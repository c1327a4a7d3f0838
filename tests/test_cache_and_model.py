"""KV cache behaviour and the cached == uncached guarantee of the tiny decoder."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flashkv_edu.cache import MODEL_SHAPES, KVCache, kv_bytes_per_token
from flashkv_edu.model import ModelConfig, TinyDecoder
from flashkv_edu.reference import attention_ref
from flashkv_edu.testing import max_abs_err


def snapshot(cache):
    return cache.k_cache.clone(), cache.v_cache.clone(), cache.cache_seqlens.clone()


def same(cache, snap):
    return all(
        torch.equal(a, b) for a, b in zip((cache.k_cache, cache.v_cache, cache.cache_seqlens), snap, strict=True)
    )


def test_append_ragged_and_views():
    c = KVCache(3, 8, 2, 4)
    k = torch.arange(3 * 5 * 2 * 4, dtype=torch.float32).view(3, 5, 2, 4)
    c.append(k, -k, num_new=[5, 2, 0])
    assert c.cache_seqlens.tolist() == [5, 2, 0] and c.cache_seqlens.dtype == torch.int32
    kv, vv = c.valid(1)
    assert torch.equal(kv, k[1, :2]) and torch.equal(vv, -k[1, :2])
    c.append(k[:1, :3], k[:1, :3], seq_idx=[2])
    assert c.cache_seqlens.tolist() == [5, 2, 3]
    assert torch.equal(c.valid(2)[0], k[0, :3])
    assert torch.all(c.k_cache[1, 2:] == 0)  # nothing written past a sequence's tokens
    c.reset(0)
    assert c.cache_seqlens.tolist() == [0, 2, 3] and torch.all(c.k_cache[0] == 0)


def test_memory_accounting():
    c = KVCache(2, 10, 2, 4, dtype=torch.float16)
    c.append(torch.ones(2, 3, 2, 4, dtype=torch.float16), torch.ones(2, 3, 2, 4, dtype=torch.float16))
    m = c.memory()
    per_token = 2 * 2 * 4 * 2
    assert m.reserved_bytes == 2 * 10 * per_token and m.used_bytes == 6 * per_token
    assert m.utilization == pytest.approx(0.3)


def test_growable_doubles_and_counts_copies():
    c = KVCache(1, 4, 1, 2, growable=True)
    for step in range(9):
        c.append(torch.full((1, 1, 1, 2), float(step)), torch.zeros(1, 1, 1, 2))
    assert c.capacity == 16 and c.grow_copies == 2
    assert c.grow_bytes_copied == 2 * (4 + 8) * 2 * 4  # k and v, capacities 4 then 8, 2 floats each
    assert c.valid(0)[0][:, 0, 0].tolist() == list(range(9))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda c: c.append(torch.ones(2, 5, 2, 4), torch.ones(2, 5, 2, 4)), "cache overflow"),
        (lambda c: c.append(torch.ones(2, 1, 3, 4), torch.ones(2, 1, 3, 4)), "nheads_k=2"),
        (lambda c: c.append(torch.ones(2, 1, 2, 8), torch.ones(2, 1, 2, 8)), "k must have head dim 4"),
        (lambda c: c.append(torch.ones(2, 1, 2, 4).half(), torch.ones(2, 1, 2, 4).half()), "share one dtype"),
        (lambda c: c.append(torch.ones(2, 1, 2, 4), torch.ones(2, 2, 2, 4)), "k and v must agree"),
        (lambda c: c.append(torch.ones(1, 1, 2, 4), torch.ones(1, 1, 2, 4), seq_idx=[5]), "seq_idx entries"),
        (lambda c: c.append(torch.ones(2, 1, 2, 4), torch.ones(2, 1, 2, 4), seq_idx=[1, 1]), "must not repeat"),
        (lambda c: c.append(torch.ones(2, 1, 2, 4), torch.ones(2, 1, 2, 4), seq_idx=[1]), "selects 1"),
        (lambda c: c.append(torch.ones(2, 1, 2), torch.ones(2, 1, 2)), "4 dimensions"),
        (lambda c: c.append(torch.ones(2, 2, 2, 4), torch.ones(2, 2, 2, 4), num_new=[3, 0]), "num_new entries"),
    ],
)
def test_bad_appends_raise_and_leave_cache_unchanged(make, match):
    c = KVCache(2, 4, 2, 4)
    c.append(torch.randn(2, 2, 2, 4), torch.randn(2, 2, 2, 4))
    snap = snapshot(c)
    with pytest.raises((ValueError, TypeError), match=match):
        make(c)
    assert same(c, snap)


def test_bad_construction():
    with pytest.raises(ValueError, match="max_seqlen must be >= 1"):
        KVCache(1, 0, 1, 4)
    with pytest.raises(TypeError, match="dtype"):
        KVCache(1, 4, 1, 4, dtype=torch.int32)


@given(lens=st.lists(st.integers(1, 12), min_size=1, max_size=4), steps=st.integers(1, 4), seed=st.integers(0, 1000))
def test_cached_attention_equals_recomputed(lens, steps, seed):
    """Appending step by step and attending over the cache equals full causal attention."""
    g = torch.Generator().manual_seed(seed)
    b = len(lens)
    total = max(lens) + steps
    q = torch.randn(b, total, 4, 8, generator=g)
    k = torch.randn(b, total, 2, 8, generator=g)
    v = torch.randn(b, total, 2, 8, generator=g)
    cache = KVCache(b, total, 2, 8)
    for i, n in enumerate(lens):  # ragged prefill
        cache.append(k[i : i + 1, :n], v[i : i + 1, :n], seq_idx=[i])
    for t in range(steps):
        pos = torch.tensor(lens) + t
        idx = pos[:, None, None, None].expand(b, 1, 2, 8)
        cache.append(k.gather(1, idx), v.gather(1, idx))
        qi = q.gather(1, pos[:, None, None, None].expand(b, 1, 4, 8))
        got = attention_ref(qi, cache.k_cache, cache.v_cache, causal=True, seqlens_k=cache.cache_seqlens)
        for i in range(b):
            n = int(pos[i]) + 1
            want = attention_ref(q[i : i + 1, :n], k[i : i + 1, :n], v[i : i + 1, :n], causal=True)[:, -1:]
            assert max_abs_err(got[i : i + 1], want) < 1e-5


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["MHA", "GQA", "MQA"])
@pytest.mark.parametrize("positions", ["rotary", "learned"])
def test_cached_greedy_generation_equals_uncached(kv_heads, positions):
    model = TinyDecoder(ModelConfig(n_kv_heads=kv_heads, positions=positions), seed=kv_heads)
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]]  # ragged
    cached = model.generate(prompts, 24, use_cache=True)
    assert cached == model.generate(prompts, 24, use_cache=False)
    assert [len(x) for x in cached] == [24, 24, 24]


def test_model_rejects_bad_inputs_and_overflow_leaves_cache_unchanged():
    model = TinyDecoder(ModelConfig())
    cache = model.new_cache(1, 4)
    model(torch.tensor([[1, 2, 3]]), cache)
    snaps = [snapshot(c) for c in cache]
    with pytest.raises(ValueError, match="cache overflow"):
        model(torch.tensor([[1, 2]]), cache)
    assert all(same(c, s) for c, s in zip(cache, snaps, strict=True))
    with pytest.raises(TypeError, match="tokens"):
        model(torch.randn(1, 3))
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig(n_heads=4, n_kv_heads=3)


def test_kv_bytes_per_token_matches_published_figures():
    # Llama-3-8B 128 KiB, Llama-3-70B 320 KiB, Llama-2-7B 512 KiB, OPT-13B 800 KiB (fp16/bf16).
    kib = {name: kv_bytes_per_token(layers, hk, d) // 1024 for name, (layers, _, hk, d) in MODEL_SHAPES.items()}
    assert kib["Llama-3-8B (GQA)"] == 128 and kib["Llama-3-70B (GQA)"] == 320
    assert kib["Llama-2-7B (MHA)"] == 512 and kib["OPT-13B (MHA)"] == 800


def test_bench_decode_runs_and_cache_wins_at_long_context():
    from flashkv_edu.bench import decode_tokens_per_second

    # Wide enough and long enough that the work, not Python's per-step overhead, decides: measured
    # 8-11x here, alone or beside another busy process; at dim 32 and 1024 tokens only 1.5-2.5x.
    model = TinyDecoder(ModelConfig(dim=128, n_layers=1, n_heads=2, n_kv_heads=1))
    cached, uncached = decode_tokens_per_second(model, 2000, steps=2, repeats=3)
    assert cached > uncached  # one token against a 2000-token cache vs re-running 2000 tokens
