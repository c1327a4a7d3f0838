"""The sliding-window cache: each historical failure reproduced, and the fix proven."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flashkv_edu.reference import attention_ref
from flashkv_edu.testing import max_abs_err
from flashkv_edu.window_cache import (
    ReplicaPre910,
    ReplicaV01,
    ReplicaV020,
    SlidingWindowCache,
    position_chunk,
    run_chunks,
)

W = 4


def keeps_last_w_tokens(trace, window=W):
    """At every step the cache holds exactly the last min(seen, W) positions, in order."""
    assert trace.error is None, trace.error
    for seen, contents in zip(trace.seen, trace.contents, strict=True):
        assert contents == list(range(max(0, seen - window), seen)), (seen, contents)


# Each regression scenario: (name, replica, check). The check must fail on the replica and pass
# on the fixed SlidingWindowCache.
def crash_on_none(cache_cls):
    cache = cache_cls()
    k = position_chunk(0, 3)
    cache.update(k, k, 0)  # cache_kwargs left out, as HF's signature allows
    assert cache.get_seq_length(0) == 3


def forgets_window_when_omitted(cache_cls):
    keeps_last_w_tokens(run_chunks(cache_cls(), [3] + [1] * 10, W, pass_window="first"))


def never_rolls_after_overshoot(cache_cls):
    keeps_last_w_tokens(run_chunks(cache_cls(), [3, 2, 1, 1, 1], W))


def roll_drops_context(cache_cls):
    keeps_last_w_tokens(run_chunks(cache_cls(), [5] + [1] * 8, W))


def stuck_at_w_plus_one(cache_cls):
    trace = run_chunks(cache_cls(), [3, 2, 1, 1], W)
    assert trace.error is None and max(trace.stored) <= W, trace.stored


SCENARIOS = {
    "crash on cache_kwargs=None": (ReplicaV01, crash_on_none),
    "None guard forgets the window": (ReplicaV020, forgets_window_when_omitted),
    "equality test never rolls again": (ReplicaV01, never_rolls_after_overshoot),
    "roll replaces the cache with the new tokens": (ReplicaV020, roll_drops_context),
    "stuck at W + 1": (ReplicaPre910, stuck_at_w_plus_one),
}


@pytest.mark.parametrize("name", SCENARIOS)
def test_regression_fails_on_replica_and_passes_on_fix(name):
    replica, check = SCENARIOS[name]
    with pytest.raises((AssertionError, AttributeError, TypeError, RuntimeError)):
        check(replica)
    check(SlidingWindowCache)


def test_reappending_caller_doubles_and_correct_caller_is_linear():
    t0, steps = 5, 6
    bad = run_chunks(SlidingWindowCache(), [t0] + [1] * steps, None, reappend=True)
    good = run_chunks(SlidingWindowCache(), [t0] + [1] * steps, None)
    assert bad.stored == [2**t * (t0 + 1) - 1 for t in range(steps + 1)]  # 5, 11, 23, 47, ...
    assert good.stored == [t0 + t for t in range(steps + 1)]


def test_replicas_reproduce_the_documented_traces():
    assert run_chunks(ReplicaV01(), [5, 1], W, pass_window="never").error.startswith("AttributeError")
    assert run_chunks(ReplicaV01(), [3, 2, 1, 1], W).stored == [3, 5, 6, 7]
    assert run_chunks(ReplicaV020(), [5, 1, 1, 1, 1, 1], W).contents == [
        [1, 2, 3, 4],
        [5],
        [5, 6],
        [5, 6, 7],
        [5, 6, 7, 8],
        [9],
    ]
    assert run_chunks(ReplicaV020(), [4, 1], W).error.startswith("TypeError")
    assert run_chunks(ReplicaPre910(), [3, 2, 1, 1], W).stored == [3, 5, 5, 5]
    fixed = run_chunks(SlidingWindowCache(), [3, 2, 1, 6], W, pass_window="first")
    assert fixed.contents == [[0, 1, 2], [1, 2, 3, 4], [2, 3, 4, 5], [8, 9, 10, 11]]
    assert fixed.seen == [3, 5, 6, 12]


@given(
    window=st.integers(1, 6), chunks=st.lists(st.integers(1, 13), min_size=1, max_size=8), seed=st.integers(0, 10_000)
)
def test_attention_through_fixed_cache_equals_full_history(window, chunks, seed):
    g = torch.Generator().manual_seed(seed)
    total = sum(chunks)
    q = torch.randn(1, total, 2, 8, generator=g)
    k = torch.randn(1, total, 1, 8, generator=g)
    v = torch.randn(1, total, 1, 8, generator=g)
    cache = SlidingWindowCache()
    pos = 0
    for step, n in enumerate(chunks):
        kwargs = {"window_size": window} if step == 0 else None  # later calls omit it
        keys, values = cache.update(k[:, pos : pos + n], v[:, pos : pos + n], 0, kwargs)
        got = attention_ref(q[:, pos : pos + n], keys, values, window_size=(window - 1, 0))
        pos += n
        want = attention_ref(q[:, :pos], k[:, :pos], v[:, :pos], window_size=(window - 1, 0))[:, -n:]
        assert max_abs_err(got, want) < 1e-5
        assert cache.stored_length(0) == min(window, pos) and cache.get_seq_length(0) == pos


def test_stored_tokens_stay_bounded_over_10k_decode_steps():
    cache = SlidingWindowCache(default_window=8)
    one = torch.zeros(1, 1, 1, 2)
    cache.update(torch.zeros(1, 20, 1, 2), torch.zeros(1, 20, 1, 2), 0)
    peak = 0
    for _ in range(10_000):
        cache.update(one, one, 0)
        peak = max(peak, cache.stored_length(0))
    assert peak == 8 and cache.get_seq_length(0) == 10_020


def test_long_prefill_is_not_kept_alive_by_a_view():
    cache = SlidingWindowCache(default_window=4)
    chunk = torch.zeros(1, 1000, 1, 2)
    cache.update(chunk, chunk, 0)
    assert cache.states[0][0].untyped_storage().nbytes() == 4 * 2 * 4


def test_layers_are_independent_and_reset_clears():
    cache = SlidingWindowCache()
    x = torch.zeros(1, 6, 1, 2)
    cache.update(x, x, 0, {"window_size": 2})
    cache.update(x, x, 1)  # layer 1: full attention
    assert (cache.stored_length(0), cache.stored_length(1)) == (2, 6)
    cache.reset()
    assert cache.stored_length(0) == 0 and cache.get_seq_length(1) == 0


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda c: c.update(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2), 0, {"window_size": 5}), "changed from 4"),
        (lambda c: c.update(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), 0), "nheads_k=1"),
        (lambda c: c.update(torch.zeros(1, 1, 1, 2), torch.zeros(1, 2, 1, 2), 0), "same shape"),
        (lambda c: c.update(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2), 1, {"window_size": 0}), "must be >= 1"),
        (lambda c: c.update(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2), -1), "layer_idx"),
        (lambda c: c.update(torch.zeros(1, 1, 2), torch.zeros(1, 1, 2), 0), "4 dimensions"),
        (lambda c: c.update(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2), 0, [4]), "cache_kwargs must be a dict"),
        (lambda c: c.update(torch.zeros(1, 1, 1, 2).half(), torch.zeros(1, 1, 1, 2).half(), 0), "dtype"),
    ],
)
def test_fixed_cache_rejects_bad_input_and_stays_unchanged(call, match):
    cache = SlidingWindowCache()
    x = position_chunk(0, 6)
    cache.update(x, x, 0, {"window_size": 4})
    before = [t.clone() for t in cache.states[0]], cache.get_seq_length(0)
    with pytest.raises((ValueError, TypeError), match=match):
        call(cache)
    assert all(torch.equal(a, b) for a, b in zip(cache.states[0], before[0], strict=True))
    assert cache.get_seq_length(0) == before[1]
