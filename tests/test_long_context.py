"""Notebook 13's modules against the oracle and against each other: the ring cache equals dense
attention masked to sinks and window at every step, the page-summary cache at full budget is the
dense call, MLA's absorbed attention equals the naive one, and every mask of the chain written for
FlexAttention equals flashkv_edu's API."""

from __future__ import annotations

import pytest
import torch

import flashkv_edu as fk
from flashkv_edu import charlm, fa3, flex
from flashkv_edu.mla import MLAConfig, MLALayer, kv_values_per_token, memory_table
from flashkv_edu.quest import page_bounds, page_summaries, quest_attention, quest_nll, retrieval_accuracy, select_pages
from flashkv_edu.ring_cache import RingKVCache, rerotation_drift, stream_nll, visible_tokens
from flashkv_edu.rotary import apply_rotary, rotary_tables


@pytest.fixture(scope="module")
def model():
    return charlm.load()[0]


@pytest.fixture(scope="module")
def stream():
    return torch.tensor(charlm.encode(charlm.stdlib_text(60_000)[50_000:50_300]))


@pytest.mark.parametrize("positions", ["cache", "absolute"])
@pytest.mark.parametrize(("sinks", "window"), [(2, 5), (0, 4), (3, 1)])
def test_the_ring_equals_dense_attention_masked_to_sinks_and_window_at_every_step(positions, sinks, window):
    """30 tokens, batch 2, 4 query / 2 KV heads: each step's output equals attention_ref over the
    visible tokens, keys rotated at their positions in the cache (or their absolute ones); the ring
    never holds more than sinks + window slots."""
    g = torch.Generator().manual_seed(sinks * 10 + window)
    steps, b, h, hk, d = 30, 2, 4, 2, 16
    q = torch.randn(b, steps, h, d, generator=g)
    k, v = torch.randn(b, steps, hk, d, generator=g), torch.randn(b, steps, hk, d, generator=g)
    cos, sin = rotary_tables(64, d)
    ring = RingKVCache(b, sinks, window, hk, d, positions=positions)
    for t in range(steps):
        out = ring.attend(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], cos, sin)
        keep = visible_tokens(t, sinks, window)
        where = torch.arange(len(keep)) if positions == "cache" else torch.tensor(keep)
        keys = apply_rotary(k[:, keep], cos, sin, where[None].expand(b, -1))
        query = apply_rotary(q[:, t : t + 1], cos, sin, where[-1:][None].expand(b, 1))
        want = fk.attention_ref(query, keys, v[:, keep], causal=True)
        assert torch.allclose(out, want, atol=1e-5), t
        assert ring.k.shape[1] == ring.v.shape[1] == sinks + window


def test_a_bounded_cache_large_enough_is_dense_and_positions_only_matter_relatively(model, stream):
    """A ring that never evicts gives dense attention's loss; a window keeps the same loss whether
    its keys sit at positions in the cache or at absolute positions (rotary depends only on the
    distance); with sinks, absolute positions put the sinks further than the model ever saw."""
    short = stream[:40]
    dense = stream_nll(model, short, "dense")
    assert torch.allclose(stream_nll(model, short, "sinks", 4, 60), dense, atol=1e-4)
    assert torch.allclose(stream_nll(model, short, "window", 4, 60), dense, atol=1e-4)
    from flashkv_edu.ring_cache import stream_logits

    cache_pos = stream_logits(model, stream[None, :120], 0, 16, "cache")[0]
    absolute = stream_logits(model, stream[None, :120], 0, 16, "absolute")[0]
    assert torch.allclose(cache_pos, absolute, atol=1e-3)
    recompute = stream_nll(model, stream[:120], "recompute", 4, 12)
    assert recompute.shape == (119,) and torch.allclose(
        recompute[:15], stream_nll(model, stream[:120], "dense")[:15], atol=1e-4
    )


def test_rerotating_stored_keys_drifts_and_rotating_on_read_does_not():
    drift = rerotation_drift(torch.randn(4, 2, 32), steps=200)
    assert drift[-1] > drift[0] >= 0 and drift[-1] > 1e-6


def test_page_summaries_bound_every_key_and_the_full_budget_is_the_dense_call():
    """Pages scattered in the pool, two sequences of 37 and 50 tokens: no key scores above its
    page's bound; every page read gives exactly the dense call's output; fewer pages always include
    the newest."""
    g = torch.Generator().manual_seed(0)
    bs, hk, h, d = 8, 2, 4, 16
    k_pool, v_pool = torch.randn(20, bs, hk, d, generator=g), torch.randn(20, bs, hk, d, generator=g)
    table = torch.randperm(20, generator=g)[:14].view(2, 7).to(torch.int32)
    lens = torch.tensor([37, 50], dtype=torch.int32)
    q = torch.randn(2, 1, h, d, generator=g)
    for b in range(2):
        mins, maxs = page_summaries(k_pool, table[b], int(lens[b]))
        bounds = page_bounds(q[b, 0], mins, maxs)
        for p in range(mins.shape[0]):
            block = k_pool[int(table[b, p])][: min(bs, int(lens[b]) - p * bs)]
            scores = torch.einsum("hd,khd->kh", q[b, 0], block.repeat_interleave(2, dim=1))
            assert float(scores.max()) <= float(bounds[p]) + 1e-5
        assert select_pages(bounds, 2, 1)[-1] == mins.shape[0] - 1
    dense = fk.flash_attn_with_kvcache(q, k_pool, v_pool, cache_seqlens=lens, block_table=table, causal=True)
    out, pages = quest_attention(q, k_pool, v_pool, table, lens, budget=7)
    assert torch.equal(out, dense) and pages == [list(range(5)), list(range(7))]
    few, pages = quest_attention(q, k_pool, v_pool, table, lens, budget=2)
    assert [len(p) for p in pages] == [2, 2] and not torch.equal(few, dense)


def test_the_model_with_every_page_is_dense_and_fewer_pages_read_less(model, stream):
    text = stream[None, :64]
    full, read_full = quest_nll(model, text, budget=4)
    dense = torch.log_softmax(model(text)[0, :-1], -1)
    assert torch.allclose(full[0], -dense.gather(-1, text[0, 1:, None])[:, 0], atol=1e-4)
    two, read_two = quest_nll(model, text, budget=2)
    assert read_two < read_full and float(two.mean()) >= float(full.mean()) - 0.05
    rows = retrieval_accuracy([1, 32], n_keys=512, queries=64)
    assert rows[-1]["accuracy"] == 1.0 and rows[0]["accuracy"] < 0.5 and rows[0]["bytes"] < rows[0]["dense_bytes"]


@pytest.mark.parametrize(
    "cfg", [MLAConfig(), MLAConfig(dim=64, nheads=4, latent=512, nope=32, rope=64, v=32)], ids=["small", "dv512"]
)
def test_absorbed_mla_equals_naive_mla(cfg):
    """Decompressed keys and values (headdim_v != headdim) against one latent KV head with FA3's
    qv, fp32, ragged lengths, three new queries at the end."""
    layer = MLALayer(cfg)
    cos, sin = rotary_tables(64, cfg.rope)
    b, L, s = 2, 37, 3
    x = torch.randn(b, L, cfg.dim, generator=torch.Generator().manual_seed(1))
    pos = torch.arange(L)[None].expand(b, L)
    c, k_pe = layer.latents(x, pos, cos, sin)
    q_nope, q_pe = layer.queries(x[:, -s:], pos[:, -s:], cos, sin)
    lens = torch.tensor([37, 20], dtype=torch.int32)
    naive = layer.naive(q_nope, q_pe, c, k_pe, lens, causal=True)
    absorbed = layer.absorbed(q_nope, q_pe, c, k_pe, lens, causal=True)
    assert naive.shape == (b, s, cfg.nheads, cfg.v)
    assert torch.allclose(naive, absorbed, atol=1e-5 * max(1.0, float(naive.abs().max())))


def test_the_memory_table_counts_values_per_token():
    rows = {r["kind"]: r for r in memory_table()}
    assert rows["MHA"]["values"] == 32768 and rows["MQA"]["values"] == 256 and rows["MLA"]["values"] == 576
    assert rows["MLA"]["groups_equivalent"] == 2.25 and rows["GQA (8 groups)"]["bytes_per_token"] == 2048 * 60 * 2
    assert kv_values_per_token("GQA", nheads=8, headdim=64, groups=2) == 256


def _qkv(b=2, sq=5, sk=40, h=4, hk=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, sq, h, d, generator=g),
        torch.randn(b, sk, hk, d, generator=g),
        torch.randn(b, sk, hk, d, generator=g),
    )


LENS = torch.tensor([40, 23], dtype=torch.int32)
SLOPES = torch.tensor([0.5, 0.25, 0.125, 0.0625])
FLEX_CASES = {
    "causal": (lambda: flex.causal(5, LENS), None, dict(causal=True)),
    "window (7, 0)": (lambda: flex.window(5, LENS, 7, 0), None, dict(window_size=(7, 0))),
    "window (3, 2)": (lambda: flex.window(5, LENS, 3, 2), None, dict(window_size=(3, 2))),
    "chunk 8": (lambda: flex.chunked(5, LENS, 8), None, dict(causal=True, attention_chunk=8)),
    "softcap 2": (lambda: flex.causal(5, LENS), lambda: flex.softcap(2.0), dict(causal=True, softcap=2.0)),
    "alibi": (
        lambda: flex.causal(5, LENS),
        lambda: flex.alibi(SLOPES, 5, LENS),
        dict(causal=True, alibi_slopes=SLOPES),
    ),
}


@pytest.mark.parametrize("name", list(FLEX_CASES))
def test_every_mask_as_a_flex_mask_mod_equals_the_api(name):
    q, k, v = _qkv()
    mask, score, kwargs = FLEX_CASES[name]
    got = flex.flex_attend(q, k, v, mask(), score() if score else None)
    door = fa3.flash_attn_with_kvcache if "attention_chunk" in kwargs else fk.flash_attn_with_kvcache
    want = door(q, k, v, cache_seqlens=LENS, **kwargs)
    assert torch.allclose(got, want, atol=1e-5) and flex.last_path["path"] == "eager"


def test_sinks_and_window_and_documents_as_flex_masks():
    """StreamingLLM's mask equals attention over the gathered sinks and window per query; packed
    documents equal one call per document."""
    q, k, v = _qkv(b=1, sq=6, sk=30)
    lens = torch.tensor([30])
    got = flex.flex_attend(q, k, v, flex.sinks_and_window(6, lens, 3, 5))
    for i in range(6):
        keep = visible_tokens(24 + i, 3, 5)
        want = fk.flash_attn_with_kvcache(q[:, i : i + 1], k[:, keep], v[:, keep], causal=True)
        assert torch.allclose(got[:, i : i + 1], want, atol=1e-5), i
    docs = torch.tensor([0] * 7 + [1] * 12 + [2] * 11)
    q, k, v = _qkv(b=1, sq=30, sk=30, seed=3)
    got = flex.flex_attend(q, k, v, flex.documents(docs))
    for doc in range(3):
        rows = (docs == doc).nonzero()[:, 0]
        want = fk.flash_attn_with_kvcache(q[:, rows], k[:, rows], v[:, rows], causal=True)
        assert torch.allclose(got[:, rows], want, atol=1e-5), doc


def test_paged_flex_reads_the_same_block_table_as_the_api():
    """PyTorch's PagedAttention over flashkv_edu's pool and block table (pages in any order, two
    rows sharing pages) equals the paged flash_attn_with_kvcache; permuting the physical pages (and
    the table with them) changes nothing."""
    q, _, _ = _qkv()
    g = torch.Generator().manual_seed(5)
    k_pool, v_pool = torch.randn(16, 4, 2, 16, generator=g), torch.randn(16, 4, 2, 16, generator=g)
    table = torch.stack([torch.randperm(16, generator=g)[:10], torch.randperm(16, generator=g)[:10]]).to(torch.int32)
    want = fk.flash_attn_with_kvcache(q, k_pool, v_pool, cache_seqlens=LENS, block_table=table, causal=True)
    assert torch.allclose(flex.paged_flex(q, k_pool, v_pool, table, LENS), want, atol=1e-5)
    perm = torch.randperm(16, generator=g)
    inverse = torch.argsort(perm)
    moved = flex.paged_flex(q, k_pool[perm], v_pool[perm], inverse[table.long()].to(torch.int32), LENS)
    assert torch.allclose(moved, want, atol=1e-5)


def test_flex_says_why_it_ran_eagerly():
    q, k, v = _qkv()
    out, lse = flex.flex_attend(q, k, v, flex.causal(5, LENS), compiled=True, return_lse=True)
    assert flex.last_path == {"path": "eager", "why": "the compiled CPU path does not return the LSE"}
    want, want_lse = fk.flash_attn_with_kvcache(q, k, v, cache_seqlens=LENS, causal=True, return_softmax_lse=True)
    assert torch.allclose(out, want, atol=1e-5) and torch.allclose(lse, want_lse, atol=1e-5)
    assert flex._compile_refusal(q, False, (torch.float32, torch.bfloat16)).startswith("the compiled CPU path refuses")
