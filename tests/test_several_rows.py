"""Notebook 14's modules: chunked prefill, speculative decoding with rollback, cascade and tree
attention, each against the plain computation it replaces."""

from __future__ import annotations

import pytest
import torch

import flashkv_edu as fk
from flashkv_edu import charlm
from flashkv_edu.cascade import TreeContext, ancestor_mask, cascade_attention, cascade_bytes
from flashkv_edu.model import TinyDecoder
from flashkv_edu.offload import TieredStore
from flashkv_edu.serving import Request, new_paged_cache, paged_step, serve
from flashkv_edu.speculative import (
    ModelCache,
    NgramDraft,
    expected_tokens_per_call,
    greedy_generate,
    rejection_sample,
    speculative_generate,
    tree_round,
)
from flashkv_edu.steps import varlen_step
from flashkv_edu.teach.nb14_several_query_rows import _chi_square, first_token_counts

TEXTS = ["def main(argv):\n", "class Cache:\n    def ", None, "    return self.", "for i in range(10):\n"]


@pytest.fixture(scope="module")
def target():
    return charlm.load()[0]


@pytest.fixture(scope="module")
def draft():
    return charlm.load(charlm.DRAFT_CHECKPOINT)[0]


def _requests(new=24):
    long = charlm.stdlib_text(50_000)[10_000:10_120]
    return [Request(charlm.encode(t if t is not None else long), new, arrival=i) for i, t in enumerate(TEXTS)]


@pytest.mark.parametrize(("blocks", "preemption"), [(120, "recompute"), (44, "recompute"), (44, "swap")])
def test_chunked_prefill_gives_unchunked_serving_s_tokens(target, blocks, preemption):
    """Budgets of 8, 64 and 256 tokens a step, with room and under preemption (recompute and
    swap): the tokens of serving without chunking; no step runs more than its budget plus the
    decodes; every block back in the pool."""

    def run(**kw):
        requests = _requests()
        cache = new_paged_cache(target, blocks, 4, max_batch=3)
        if preemption == "swap":
            cache.attach_store(TieredStore.for_cache(cache, host_blocks=64))
        trace = serve(target, requests, cache, preemption=preemption, **kw)
        assert cache.allocator.num_free == blocks and not cache.seqs
        return [r.output for r in requests], trace

    want, plain = run()
    for budget in (8, 64, 256):
        got, trace = run(max_batched_tokens=budget)
        assert got == want, budget
        assert all(p <= budget for p in trace.step_prefill_tokens)
        assert sum(trace.step_prefill_tokens) == trace.prefill_tokens
    assert (sum(plain.preemptions.values()) > 0) == (blocks == 44)


def test_a_varlen_step_equals_one_call_per_sequence(target):
    a, b = charlm.encode("def main(argv):\n    return 0\n"), charlm.encode("class X:\n")
    one = new_paged_cache(target, 16, 4, max_batch=2)
    s0, s1 = one.add_sequence()[0], one.add_sequence()[0]
    want = torch.cat([paged_step(target, one, [s0], [a]), paged_step(target, one, [s1], [b])])
    packed = new_paged_cache(target, 16, 4, max_batch=2)
    t0, t1 = packed.add_sequence()[0], packed.add_sequence()[0]
    first = varlen_step(target, packed, [t0, t1], [a[:10], b])
    second = varlen_step(target, packed, [t0], [a[10:]])
    assert torch.allclose(torch.stack([second[0], first[1]]), want, atol=1e-4)
    mixed_want = paged_step(target, one, [s0, s1], [[5], [6]])
    assert torch.allclose(varlen_step(target, packed, [t0, t1], [[5], [6]]), mixed_want, atol=1e-4)


PROMPTS = ["def main(argv):\n    ", "class KVCache:\n    def __init__(self, ", "import os\n"]


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("which", ["1-layer", "ngram", "random"])
def test_greedy_speculation_is_target_greedy_for_any_draft(target, draft, paged, which):
    """Three ragged prompts, k = 1 and 4: token for token the target's greedy output, whatever the
    draft (the trained 1-layer model, prompt lookup, a random model); the paged caches give back
    every lookahead block."""
    d = {"1-layer": draft, "ngram": NgramDraft(), "random": TinyDecoder(charlm.DRAFT_CONFIG, seed=3)}[which]
    prompts = [charlm.encode(p) for p in PROMPTS]
    want, calls = greedy_generate(target, prompts, 30, paged=paged)
    for k in (1, 4):
        got = speculative_generate(target, d, prompts, 30, k=k, paged=paged)
        assert got.tokens == want, k
        assert got.proposed == k * len(got.accepted_per_round) and 0 <= got.accepted <= got.proposed
        assert got.blocks_held == got.blocks_needed and (got.blocks_held > 0) == paged
    if which == "random":
        assert got.acceptance < 0.1 and got.target_calls >= calls - 5


def test_a_paged_rollback_returns_the_lookahead_blocks(target, draft):
    cache = ModelCache(target, 1, 128, True)
    cache.feed([0], [charlm.encode("def f(x):\n")])
    used = cache.blocks_in_use()
    cache.feed([0], [[3] * 12])  # a verification that reached into new blocks
    assert cache.blocks_in_use() > used
    cache.truncate(0, 10)
    assert cache.blocks_in_use() == used and cache.lengths[0] == 10


def test_speculative_sampling_keeps_the_target_distribution():
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.1, 0.1, 0.1, 0.7], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.1, 0.1, 0.1, 0.7], [0.7, 0.1, 0.1, 0.1]])
    counts = first_token_counts(lambda d, qq, pp, g: rejection_sample(d, qq, pp, generator=g), q, p, 3000)
    assert _chi_square(counts, p[0]) < 13.82  # 0.1 % level, 2 degrees of freedom
    assert expected_tokens_per_call(0.5, 3) == pytest.approx(1.875) and expected_tokens_per_call(1.0, 3) == 4


def test_sampled_speculation_runs_and_is_reproducible(target, draft):
    prompts = [charlm.encode(p) for p in PROMPTS[:2]]
    a = speculative_generate(
        target, draft, prompts, 20, k=3, temperature=0.8, generator=torch.Generator().manual_seed(0)
    )
    b = speculative_generate(
        target, draft, prompts, 20, k=3, temperature=0.8, generator=torch.Generator().manual_seed(0)
    )
    assert a.tokens == b.tokens and all(len(t) == 20 for t in a.tokens)


def test_cascade_attention_equals_attention_over_prefix_and_suffix():
    """32 rows sharing a 300-token prefix, suffixes of 0 to 31 tokens; the bytes model."""
    g = torch.Generator().manual_seed(0)
    b, p, s, h, hk, d = 32, 300, 31, 8, 2, 64
    pk, pv = torch.randn(1, p, hk, d, generator=g), torch.randn(1, p, hk, d, generator=g)
    sk, sv = torch.randn(b, s, hk, d, generator=g), torch.randn(b, s, hk, d, generator=g)
    lens = torch.arange(b, dtype=torch.int32) % (s + 1)
    q = torch.randn(b, 1, h, d, generator=g)
    out, lse = cascade_attention(q, pk, pv, sk, sv, lens)
    k_all, v_all = torch.cat([pk.expand(b, -1, -1, -1), sk], 1), torch.cat([pv.expand(b, -1, -1, -1), sv], 1)
    want, want_lse = fk.flash_attn_with_kvcache(
        q, k_all, v_all, cache_seqlens=lens + p, causal=True, return_softmax_lse=True
    )
    assert torch.allclose(out, want, atol=1e-5) and torch.allclose(lse, want_lse, atol=1e-5)
    assert cascade_bytes(32, 4096, 16, 1) == (32 * 4112, 4096 + 32 * 16)


def test_tree_attention_of_a_chain_is_chain_verification_and_the_tree_round_is_greedy(target, draft):
    prompt = charlm.encode("def main(argv):\n    ")
    chain = [prompt[-1], 5, 70, 3, 8]
    c1 = ModelCache(target, 1, 128, False)
    c1.feed([0], [prompt[:-1]])
    want = c1.feed([0], [chain])[0]
    c2 = ModelCache(target, 1, 128, False)
    c2.feed([0], [prompt[:-1]])
    ctx = TreeContext(c2.cache, 0, len(prompt) - 1, [-1, 0, 1, 2, 3], target.rope())
    with torch.no_grad():
        got = target.run(torch.tensor([chain]), ctx.positions, ctx)[0]
    assert torch.allclose(got, want, atol=1e-4)
    r = tree_round(target, draft, prompt, width=2, depth=3)
    assert len(r["tokens"]) == 1 + 2 * 3 and r["path"][0] == 0
    accepted = [r["tokens"][i] for i in r["path"][1:]] + [r["next"]]
    assert accepted == greedy_generate(target, [prompt], len(accepted))[0][0]
    assert int(r["cache"][0].cache_seqlens[0]) == len(prompt) - 1 + len(r["path"])
    assert ancestor_mask([-1, 0, 0, 1]).tolist() == [
        [True, False, False, False], [True, True, False, False], [True, False, True, False], [True, True, False, True],
    ]  # fmt: skip
