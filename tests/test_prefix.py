"""Prefix reuse across requests: the radix tree against brute force, block hashes against the
radix tree, and served outputs identical with and without reuse."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flashkv_edu import charlm
from flashkv_edu.offload_bench import measure_prefix_reuse
from flashkv_edu.prefix import BlockHashIndex, RadixTree, compare_reuse, replay, reusable, shared_prefix_workload

sequences = st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=14), min_size=1, max_size=8)


def common_prefix(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@given(sequences)
def test_radix_tree_finds_the_longest_prefix_seen(seqs):
    tree, seen = RadixTree(), []
    for s in seqs:
        want = max((common_prefix(s, x) for x in seen), default=0)
        assert tree.match(s) == min(want, reusable(s))
        tree.insert(s)
        seen.append(s)
        assert tree.size == len({tuple(x[:i]) for x in seen for i in range(1, len(x) + 1)})


@given(sequences, st.integers(1, 5))
def test_a_block_hash_finds_the_radix_match_rounded_down_to_whole_blocks(seqs, block_size):
    radix = replay(RadixTree(), seqs)
    hashed = replay(BlockHashIndex(block_size), seqs)
    assert hashed.hit_tokens == [h // block_size * block_size for h in radix.hit_tokens]
    assert replay(BlockHashIndex(1), seqs).hit_tokens == radix.hit_tokens


@given(sequences, st.integers(1, 20))
def test_with_a_capacity_nothing_is_found_that_was_not_inserted(seqs, capacity):
    tree, unbounded = RadixTree(capacity), RadixTree()
    for s in seqs:
        assert tree.match(s) <= unbounded.match(s)
        tree.insert(s)
        unbounded.insert(s)
        assert tree.size <= capacity


def test_never_the_whole_prompt():
    """A prompt cached in full still leaves its last token to compute (nano-vllm #144)."""
    for index in (RadixTree(), BlockHashIndex(4)):
        index.insert(list(range(8)))
        assert index.match(list(range(8))) == (7 if isinstance(index, RadixTree) else 4)


def test_the_workload_and_the_hit_rates():
    work = shared_prefix_workload()
    assert [r.kind for r in work].count("chat") == 9 and [r.kind for r in work].count("few-shot") == 4
    chat_a = [r.text for r in work if r.label.startswith("chat a")]
    assert all(later.startswith(earlier) for earlier, later in zip(chat_a, chat_a[1:], strict=False))
    results = compare_reuse([charlm.encode(r.text) for r in work], block_sizes=(1, 16, 64))
    rates = [r.hit_rate for r in results]
    assert rates[0] == rates[1] > rates[2] > rates[3] > 0.5  # radix = block 1 > 16 > 64


@pytest.fixture(scope="module")
def served():
    model, _ = charlm.load()
    return measure_prefix_reuse(model, new_tokens=6, block_sizes=(16, 1))


def test_prefix_reuse_serves_identical_outputs_and_saves_prefill(served):
    rows, reuse = served
    base, bs16, bs1 = rows
    assert all(r["outputs_equal"] and r["matches_index"] for r in rows)
    assert base["cached_tokens"] == 0 and bs16["cached_tokens"] > 0.6 * base["prefill_tokens"]
    assert bs1["cached_tokens"] == reuse[0].saved  # block 1 finds what the radix tree finds
    assert bs1["cached_tokens"] - bs16["cached_tokens"] == reuse[0].saved - reuse[2].saved
    for r in rows:
        assert r["prefill_tokens"] + r["cached_tokens"] == base["prefill_tokens"]
