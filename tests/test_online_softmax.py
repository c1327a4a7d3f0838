"""Online softmax, blockwise attention and state merging against the oracle."""

import random

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flashkv_edu.online_softmax import (
    blockwise_attention,
    lse_from_base2,
    lse_to_base2,
    merge_many,
    merge_states,
    naive_softmax,
    online_normalizer,
    online_softmax,
    safe_softmax,
)
from flashkv_edu.reference import attention_ref
from flashkv_edu.testing import max_abs_err


def test_naive_softmax_overflows_where_safe_and_online_do_not():
    x16 = torch.tensor([[1.0, 12.0, 3.0]], dtype=torch.float16)  # exp(12) > fp16 max 65504
    assert torch.isnan(naive_softmax(x16)).any()
    x32 = torch.tensor([[1.0, 100.0, 3.0]])  # exp(100) > fp32 max
    assert torch.isnan(naive_softmax(x32)).any()
    for x in (x16.float(), x32):
        assert torch.allclose(safe_softmax(x), torch.softmax(x, -1))
        assert torch.allclose(online_softmax(x, 2), torch.softmax(x, -1))


@given(
    n=st.integers(1, 40), block=st.integers(1, 17), scale=st.sampled_from([1.0, 100.0, 1e4]), seed=st.integers(0, 1000)
)
def test_online_normalizer_gives_the_log_sum_exp(n, block, scale, seed):
    x = (torch.rand(3, n, generator=torch.Generator().manual_seed(seed)) * 2 - 1) * scale
    m, l, history = online_normalizer(x, block)
    assert len(history) == -(-n // block)
    assert torch.allclose(m + torch.log(l), torch.logsumexp(x, -1), rtol=1e-5, atol=1e-4)
    assert torch.isfinite(online_softmax(x, block)).all()


@given(
    b=st.integers(1, 2),
    sq=st.integers(1, 7),
    sk=st.integers(1, 20),
    block=st.integers(1, 9),
    heads=st.sampled_from([(2, 2), (4, 2), (3, 1)]),
    causal=st.booleans(),
    wl=st.integers(-1, 6),
    wr=st.integers(-1, 6),
    softcap=st.sampled_from([0.0, 3.0]),
    alibi=st.booleans(),
    ragged=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_blockwise_attention_equals_oracle(b, sq, sk, block, heads, causal, wl, wr, softcap, alibi, ragged, seed):
    g = torch.Generator().manual_seed(seed)
    h, hk = heads
    q = torch.randn(b, sq, h, 8, generator=g)
    k, v = torch.randn(b, sk, hk, 8, generator=g), torch.randn(b, sk, hk, 8, generator=g)
    ends = torch.randint(0, sk + 1, (b,), generator=g).int() if ragged else None
    slopes = torch.rand(h, generator=g) if alibi else None
    kw = dict(causal=causal, window_size=(wl, wr), softcap=softcap, alibi_slopes=slopes, seqlens_k=ends)
    out, lse = blockwise_attention(q, k, v, block_size=block, **kw)
    ref_out, ref_lse = attention_ref(q, k, v, return_lse=True, **kw)
    assert max_abs_err(out, ref_out) < 1e-5
    assert max_abs_err(lse, ref_lse) < 1e-4
    assert torch.equal(torch.isposinf(lse), torch.isposinf(ref_lse))


@given(
    cuts=st.lists(st.integers(0, 24), min_size=0, max_size=6),
    order_seed=st.integers(0, 1000),
    seed=st.integers(0, 1000),
)
def test_n_way_merge_any_split_points_any_order(cuts, order_seed, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, 4, 8, generator=g)
    k, v = torch.randn(2, 24, 2, 8, generator=g), torch.randn(2, 24, 2, 8, generator=g)
    bounds = [0, *sorted(cuts), 24]  # repeated cuts give empty pieces
    pieces = [attention_ref(q, k[:, a:c], v[:, a:c], return_lse=True) for a, c in zip(bounds, bounds[1:], strict=False)]
    random.Random(order_seed).shuffle(pieces)
    want_out, want_lse = attention_ref(q, k, v, return_lse=True)
    out, lse = merge_many(torch.stack([p[0] for p in pieces]), torch.stack([p[1] for p in pieces]))
    assert max_abs_err(out, want_out) < 1e-5 and max_abs_err(lse, want_lse) < 1e-5
    acc_out, acc_lse = pieces[0]
    for p_out, p_lse in pieces[1:]:  # pairwise, in the shuffled order
        acc_out, acc_lse = merge_states(acc_out, acc_lse, p_out, p_lse)
    assert max_abs_err(acc_out, want_out) < 1e-5 and max_abs_err(acc_lse, want_lse) < 1e-5


@given(magnitude=st.sampled_from([10.0, 100.0, 1e3, 1e4]), block=st.integers(1, 8), seed=st.integers(0, 100))
def test_extreme_logits_in_fp16_stay_finite(magnitude, block, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 4, 2, 16, generator=g)
    q = (q / q.norm(dim=-1, keepdim=True) * magnitude**0.5 * 4).half()  # logits up to about +-magnitude
    k = torch.randn(1, 9, 2, 16, generator=g)
    k = (k / k.norm(dim=-1, keepdim=True) * magnitude**0.5 * 4).half()
    v = torch.randn(1, 9, 2, 16, generator=g).half()
    ref_out, ref_lse = attention_ref(q, k, v, return_lse=True, causal=True)
    out, lse = blockwise_attention(q, k, v, block_size=block, causal=True)
    assert torch.isfinite(ref_out).all() and torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert max_abs_err(out, ref_out) < 2e-3
    x = torch.randn(3, 50, generator=g) * magnitude
    assert torch.isfinite(online_softmax(x.half().float(), block)).all()


def test_empty_and_fully_masked_states():
    out = torch.randn(1, 2, 1, 4)
    lse = torch.randn(1, 1, 2)
    empty = torch.full_like(lse, float("-inf"))
    fa_empty = torch.full_like(lse, float("inf"))
    for e in (empty, fa_empty):
        o, l = merge_states(out, lse, torch.zeros_like(out), e)
        assert torch.allclose(o, out) and torch.allclose(l, lse)
    o, l = merge_states(torch.zeros_like(out), empty, torch.zeros_like(out), fa_empty)
    assert torch.all(o == 0) and torch.all(torch.isposinf(l))
    q = torch.randn(1, 3, 1, 4)
    o, l = blockwise_attention(q, torch.randn(1, 5, 1, 4), torch.randn(1, 5, 1, 4), seqlens_k=0, block_size=2)
    assert torch.all(o == 0) and torch.all(torch.isposinf(l))


def test_base2_conversions_round_trip():
    lse = torch.tensor([[[0.0, 1.0, -3.5]]])
    assert torch.allclose(lse_to_base2(torch.tensor([1.0])), torch.tensor([1.4426950408889634]))
    assert torch.allclose(lse_from_base2(lse_to_base2(lse)), lse)


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: merge_states(
                torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3), torch.zeros(1, 2, 3, 4), torch.zeros(1, 3, 2)
            ),
            "shape \\(batch, nheads, seqlen_q\\)",
        ),
        (
            lambda: blockwise_attention(
                torch.zeros(1, 2, 2, 4), torch.zeros(1, 2, 2, 4), torch.zeros(1, 2, 2, 4), block_size=0
            ),
            "block_size",
        ),
    ],
)
def test_bad_inputs(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
