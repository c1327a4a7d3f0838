"""attention_ref against FlashAttention's stated semantics, SDPA and a per-row re-derivation."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from flashkv_edu.reference import (
    alibi_slopes_for,
    attention_mask,
    attention_ref,
    gqa_attention,
    key_visibility,
    naive_attention,
    top_left_causal_mask,
)
from flashkv_edu.testing import max_abs_err


def rows(mask):
    return [row.nonzero().flatten().tolist() for row in mask]


def test_docstring_example_sq2_sk5():
    # FlashAttention docstring: row 0 keeps keys 0..3, row 1 keeps 0..4.
    assert rows(attention_mask(2, 5, causal=True)) == [[0, 1, 2, 3], [0, 1, 2, 3, 4]]


def test_docstring_example_sq5_sk2():
    # Rows 0-2 keep nothing, row 3 keeps key 0, row 4 keeps keys 0-1.
    assert rows(attention_mask(5, 2, causal=True)) == [[], [], [], [0], [0, 1]]


def test_top_left_differs_from_bottom_right_in_decode():
    # One decode query against 5 cached keys: PyTorch's is_causal shows it key 0 only.
    assert rows(top_left_causal_mask(1, 5)) == [[0]]
    assert rows(attention_mask(1, 5, causal=True)) == [[0, 1, 2, 3, 4]]
    assert torch.equal(top_left_causal_mask(4, 4), attention_mask(4, 4, causal=True))


def test_sliding_window_of_w_tokens_is_w_minus_1_0():
    w = 3
    mask = attention_mask(6, 6, window_size=(w - 1, 0))
    assert mask.sum(-1).tolist() == [1, 2, 3, 3, 3, 3]
    assert rows(mask)[5] == [3, 4, 5]


def test_causal_overrides_right_window():
    assert torch.equal(attention_mask(4, 7, causal=True, window_size=(2, 3)), attention_mask(4, 7, window_size=(2, 0)))


def spec_visible(i, j_abs, sq, sk_end, lp, wl, wr):
    """FlashAttention's rule from the spec, one (row, column) at a time."""
    sk = sk_end - lp
    if not lp <= j_abs < sk_end:
        return False
    jp = j_abs - lp
    diag = i + sk - sq
    lo = 0 if wl < 0 else max(0, diag - wl)
    hi = sk - 1 if wr < 0 else min(sk - 1, diag + wr)
    return lo <= jp <= hi


def loop_reference(q, k, v, scale, wl, wr, softcap, slopes, ends, pads):
    """Attention one (batch, head, row) at a time in fp64, straight from the formulas."""
    b, sq, h, d = q.shape
    hk = k.shape[2]
    out = torch.zeros(b, sq, h, d, dtype=torch.float64)
    lse = torch.full((b, h, sq), math.inf, dtype=torch.float64)
    for bi in range(b):
        sk = ends[bi] - pads[bi]
        for hi in range(h):
            kh = hi // (h // hk)
            for i in range(sq):
                cols = [j for j in range(k.shape[1]) if spec_visible(i, j, sq, ends[bi], pads[bi], wl, wr)]
                if not cols:
                    continue
                z = torch.stack([(q[bi, i, hi].double() @ k[bi, j, kh].double()) * scale for j in cols])
                if softcap > 0:
                    z = softcap * torch.tanh(z / softcap)
                if slopes is not None:
                    diag = i + sk - sq
                    z = z - slopes[bi, hi].double() * torch.tensor(
                        [abs(diag - (j - pads[bi])) for j in cols], dtype=torch.float64
                    )
                lse[bi, hi, i] = torch.logsumexp(z, 0)
                p = torch.softmax(z, 0)
                out[bi, i, hi] = sum(p[n] * v[bi, j, kh].double() for n, j in enumerate(cols))
    return out, lse


@given(
    b=st.integers(1, 2),
    sq=st.integers(1, 6),
    sk=st.integers(1, 9),
    heads=st.sampled_from([(2, 2), (4, 2), (3, 1)]),
    d=st.sampled_from([4, 8]),
    causal=st.booleans(),
    wl=st.integers(-1, 6),
    wr=st.integers(-1, 6),
    softcap=st.sampled_from([0.0, 2.0]),
    alibi=st.booleans(),
    ragged=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_per_row_rederivation(b, sq, sk, heads, d, causal, wl, wr, softcap, alibi, ragged, seed):
    g = torch.Generator().manual_seed(seed)
    h, hk = heads
    q = torch.randn(b, sq, h, d, generator=g)
    k = torch.randn(b, sk, hk, d, generator=g)
    v = torch.randn(b, sk, hk, d, generator=g)
    if ragged:
        ends = torch.randint(0, sk + 1, (b,), generator=g)
        pads = torch.stack([torch.randint(0, int(e) + 1, (1,), generator=g)[0] for e in ends])
    else:
        ends, pads = torch.full((b,), sk), torch.zeros(b, dtype=torch.long)
    slopes = torch.rand(b, h, generator=g) * 0.5 if alibi else None
    out, lse = attention_ref(
        q,
        k,
        v,
        causal=causal,
        window_size=(wl, wr),
        softcap=softcap,
        alibi_slopes=slopes,
        seqlens_k=ends.int(),
        leftpad_k=pads.int(),
        return_lse=True,
        compute_dtype=torch.float64,
    )
    want_out, want_lse = loop_reference(
        q, k, v, d**-0.5, wl, 0 if causal else wr, softcap, slopes, ends.tolist(), pads.tolist()
    )
    assert max_abs_err(out, want_out) < 1e-5
    assert max_abs_err(lse, want_lse) < 1e-9


@given(
    sq=st.integers(1, 12),
    sk=st.integers(1, 12),
    heads=st.sampled_from([(4, 4), (4, 2), (4, 1)]),
    causal=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_matches_sdpa(sq, sk, heads, causal, seed):
    g = torch.Generator().manual_seed(seed)
    h, hk = heads
    q, k, v = (torch.randn(2, n, nh, 16, generator=g) for n, nh in ((sq, h), (sk, hk), (sk, hk)))
    ours = attention_ref(q, k, v, causal=causal)
    mask = attention_mask(sq, sk, causal=causal)
    empty = ~mask.any(-1)
    theirs = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask | empty[:, None], enable_gqa=True
    ).transpose(1, 2)
    theirs = theirs.masked_fill(empty[None, :, None, None], 0.0)  # SDPA has no "empty row" rule
    assert max_abs_err(ours, theirs) < 1e-5
    if causal and sq == sk:  # only here is PyTorch's top-left is_causal the same mask
        sdpa_causal = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
        ).transpose(1, 2)
        assert max_abs_err(ours, sdpa_causal) < 1e-5


def test_fully_masked_rows_give_zero_and_inf():
    q = torch.randn(1, 5, 2, 8)
    k = torch.randn(1, 2, 2, 8)
    out, lse = attention_ref(q, k, k, causal=True, return_lse=True)
    assert torch.all(out[:, :3] == 0)
    assert torch.all(torch.isposinf(lse[:, :, :3]))
    assert torch.isfinite(lse[:, :, 3:]).all()
    out, lse = attention_ref(q, k, k, seqlens_k=0, return_lse=True)
    assert torch.all(out == 0) and torch.all(torch.isposinf(lse))


def test_lse_is_natural_log_of_scaled_logits():
    q, k = torch.randn(1, 3, 1, 8), torch.randn(1, 4, 1, 8)
    _, lse = attention_ref(q, k, k, softmax_scale=0.3, return_lse=True)
    want = torch.logsumexp(torch.einsum("bihd,bjhd->bhij", q, k) * 0.3, -1)
    assert max_abs_err(lse, want) < 1e-6


def test_output_keeps_input_dtype_and_low_precision_compute_is_close():
    q = torch.randn(1, 4, 2, 16, dtype=torch.float16)
    out = attention_ref(q, q, q)
    low = attention_ref(q, q, q, compute_dtype=torch.float16)
    assert out.dtype == torch.float16 and low.dtype == torch.float16
    assert 0 < max_abs_err(low, out) < 1e-2 or max_abs_err(low, out) == 0


def test_gqa_attention_and_naive_attention_agree_with_oracle():
    q, k, v = torch.randn(2, 5, 6, 8), torch.randn(2, 7, 2, 8), torch.randn(2, 7, 2, 8)
    assert max_abs_err(gqa_attention(q, k, v), attention_ref(q, k, v)) < 1e-5
    mask = attention_mask(5, 7, causal=True)
    qq, kk = torch.randn(1, 5, 2, 8), torch.randn(1, 7, 2, 8)
    assert max_abs_err(naive_attention(qq, kk, kk, mask=mask), attention_ref(qq, kk, kk, causal=True)) < 1e-5


def test_alibi_slopes_standard_values():
    assert torch.allclose(alibi_slopes_for(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    assert alibi_slopes_for(6).shape == (6,)


def test_key_visibility_batched_ragged():
    vis = key_visibility(
        1,
        6,
        causal=True,
        seqlens_k=torch.tensor([6, 4], dtype=torch.int32),
        leftpad_k=torch.tensor([0, 2], dtype=torch.int32),
    )
    assert rows(vis[0]) == [[0, 1, 2, 3, 4, 5]] and rows(vis[1]) == [[2, 3]]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: attention_ref(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4)), "q must have 4"),
        (
            lambda: attention_ref(torch.randn(1, 2, 6, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)),
            "nheads_k of k \\(4\\) must divide nheads of q \\(6\\)",
        ),
        (
            lambda: attention_ref(torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 8).half(), torch.randn(1, 2, 2, 8)),
            "share one dtype",
        ),
        (
            lambda: attention_ref(
                torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 8), window_size=(-2, 0)
            ),
            "window_size left must be -1",
        ),
        (
            lambda: attention_ref(
                torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 8), window_size=(3,)
            ),
            "window_size must be a pair",
        ),
        (lambda: attention_ref(torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4)), "head dim"),
        (
            lambda: attention_ref(
                torch.randn(1, 2, 2, 8), torch.randn(1, 3, 2, 8), torch.randn(1, 3, 2, 8), seqlens_k=torch.tensor([4])
            ),
            "seqlens_k must be <= 3",
        ),
        (
            lambda: attention_ref(
                torch.randn(1, 2, 2, 8),
                torch.randn(1, 3, 2, 8),
                torch.randn(1, 3, 2, 8),
                seqlens_k=torch.tensor([2]),
                leftpad_k=torch.tensor([3]),
            ),
            "leftpad_k must be <= seqlens_k",
        ),
        (
            lambda: attention_ref(
                torch.randn(1, 2, 2, 8), torch.randn(1, 3, 2, 8), torch.randn(1, 3, 2, 8), alibi_slopes=torch.rand(3)
            ),
            "alibi_slopes must have shape",
        ),
        (
            lambda: attention_ref(
                torch.randn(1, 2, 2, 8), torch.randn(1, 3, 2, 8), torch.randn(1, 3, 2, 8), softcap=-1.0
            ),
            "softcap must be finite",
        ),
        (lambda: attention_ref([1.0], torch.randn(1, 3, 2, 8), torch.randn(1, 3, 2, 8)), "q must be a torch.Tensor"),
        (
            lambda: attention_ref(torch.randn(1, 2, 2, 8), torch.randn(2, 3, 2, 8), torch.randn(2, 3, 2, 8)),
            "batch size",
        ),
    ],
)
def test_bad_inputs_raise_clear_errors(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()
