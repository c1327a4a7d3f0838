"""Split-KV decode: kernel equality for every split count, the heuristic, and the models."""

import pytest
import torch

from flashkv_edu.kernels import combine_splits, decode_attention_triton
from flashkv_edu.online_softmax import merge_many
from flashkv_edu.paged import gather_paged
from flashkv_edu.reference import attention_ref
from flashkv_edu.split import (
    A100,
    H100,
    choose_num_splits,
    model_decode,
    num_splits_heuristic,
    roofline_seconds,
    waves,
)
from flashkv_edu.testing import max_abs_err


@pytest.mark.parametrize("first", range(1, 129, 16), ids=lambda f: f"splits {f}-{f + 15}")
def test_every_num_splits_from_1_to_128(first):
    """One sequence (keys 5..60 of a 100-row cache, GQA 4:1): every split count from 1 to 128 (16
    per test, so that the workers share them), most of them with more splits than key blocks.
    Ragged batches and paging are covered below."""
    g = torch.Generator().manual_seed(0)
    kc, vc = torch.randn(1, 100, 1, 16, generator=g), torch.randn(1, 100, 1, 16, generator=g)
    q = torch.randn(1, 1, 4, 16, generator=g)
    lens, pads = torch.tensor([61], dtype=torch.int32), torch.tensor([5], dtype=torch.int32)
    ref, ref_lse = attention_ref(q, kc, vc, seqlens_k=lens, leftpad_k=pads, causal=True, return_lse=True)
    unsplit = decode_attention_triton(q, kc, vc, lens, cache_leftpad=pads, causal=True)
    assert max_abs_err(unsplit, ref) < 1e-5
    for splits in range(first, first + 16):
        out, lse = decode_attention_triton(
            q, kc, vc, lens, cache_leftpad=pads, causal=True, num_splits=splits, return_lse=True
        )
        assert max_abs_err(out, unsplit) < 1e-5, splits
        assert max_abs_err(lse, ref_lse) < 1e-5, splits


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("splits", [1, 2, 3, 5, 8, 13, 64, 128])
def test_split_ragged_gqa_window_contiguous_and_paged(splits, paged):
    g = torch.Generator().manual_seed(splits)
    bs, nblk = 7, 12
    pool_k, pool_v = torch.randn(40, bs, 2, 32, generator=g), torch.randn(40, bs, 2, 32, generator=g)
    table = torch.randperm(40, generator=g)[: 3 * nblk].view(3, nblk).to(torch.int32)
    lens = torch.tensor([84, 20, 0], dtype=torch.int32)  # ragged; the last sequence is empty
    q = torch.randn(3, 2, 8, 32, generator=g)  # 2 query tokens, GQA 8:2
    kw = dict(causal=True, window_size=(30, 0))
    dense_k, dense_v = gather_paged(pool_k, table), gather_paged(pool_v, table)
    ref, ref_lse = attention_ref(q, dense_k, dense_v, seqlens_k=lens, return_lse=True, **kw)
    if paged:
        out, lse = decode_attention_triton(
            q, pool_k, pool_v, lens, block_table=table, num_splits=splits, return_lse=True, **kw
        )
    else:
        out, lse = decode_attention_triton(q, dense_k, dense_v, lens, num_splits=splits, return_lse=True, **kw)
    assert max_abs_err(out, ref) < 1e-5 and max_abs_err(lse, ref_lse) < 1e-5
    assert torch.all(out[2] == 0) and torch.all(torch.isposinf(lse[2]))


def test_empty_splits_write_zero_and_minus_inf_and_combine_equals_merge_states():
    kc = torch.randn(1, 256, 1, 16)
    q = torch.randn(1, 1, 2, 16)
    lens = torch.tensor([40], dtype=torch.int32)  # short sequence, long capacity
    out, lse, o_part, l_part = decode_attention_triton(
        q, kc, kc, lens, num_splits=8, return_lse=True, return_partials=True
    )
    # capacity 256 -> 8 blocks of 32 -> 1 block per split; keys 0..39 live in splits 0 and 1 only
    assert torch.isfinite(l_part[:2]).all() and torch.isneginf(l_part[2:]).all()
    assert torch.all(o_part[2:] == 0)
    merged_out, merged_lse = merge_many(o_part, l_part)
    assert max_abs_err(merged_out, out) < 1e-6 and max_abs_err(merged_lse, lse) < 1e-6
    t_out, t_lse = combine_splits(o_part, l_part)
    assert max_abs_err(t_out, out) < 1e-6 and max_abs_err(t_lse, lse) < 1e-6


def test_num_splits_limits():
    kc = torch.randn(1, 8, 1, 16)
    lens = torch.tensor([8], dtype=torch.int32)
    for bad in (-1, 129, 2.0, True):  # 0 is FlashAttention's heuristic, as in the API
        with pytest.raises(ValueError, match="num_splits"):
            decode_attention_triton(torch.randn(1, 1, 1, 16), kc, kc, lens, num_splits=bad)


@pytest.mark.parametrize(
    "gpu, b, h, cap, d, want",
    [
        (H100, 2, 6, 131072, 128, 19),
        (H100, 2, 6, 128, 128, 1),
        (A100, 1, 32, 4096, 128, 6),
        (H100, 8, 32, 4096, 128, 1),
        (H100, 1, 8, 32768, 128, 29),
        (H100, 4, 8, 8192, 64, 7),
    ],
)
def test_heuristic_matches_examples_worked_by_hand_from_the_rule(gpu, b, h, cap, d, want):
    """Worked by hand from num_splits_heuristic in flash_api.cpp (FlashAttention publishes only
    the one example of its source comment, checked in test_heuristic_rules)."""
    assert choose_num_splits(b, h, h, 1, cap, d, gpu) == want  # MHA: no GQA swap


@pytest.mark.parametrize("gpu, wants", [(H100, [28, 7, 4, 1]), (A100, [23, 6, 3, 1])])
def test_heuristic_with_gqa_swap(gpu, wants):
    shapes = [(1, 131072), (4, 32768), (8, 4096), (32, 1024)]  # 8 KV heads, d = 128
    assert [choose_num_splits(b, 32, 8, 1, L, 128, gpu) for b, L in shapes] == wants


def test_heuristic_rules():
    assert num_splits_heuristic(48, 108, 1000) == 2  # the source comment: 2 (eff 0.89) beats 3
    assert num_splits_heuristic(200, 216, 1000) == 1  # >= 0.8 x slots: already full
    assert num_splits_heuristic(12, 264, 1) == 1  # one key block: nothing to split


def test_waves_roofline_and_model():
    assert waves(264, 132) == [132, 132] and waves(140, 132) == [132, 8]
    assert waves(8, 132) == [8]  # batch 1, 8 KV heads: 8 of 132 SMs busy
    # Reference figures (bf16, d=128, 8 KV heads): 1 x 4K on H100 ~ 5.0 us, 8 x 8K on A100 ~ 132 us
    assert abs(roofline_seconds(1, 4096, 8, 128, H100) * 1e6 - 5.0) < 0.1
    assert abs(roofline_seconds(8, 8192, 8, 128, A100) * 1e6 - 132) < 1
    one = model_decode(1, 8, 65536, 128, 1, H100)
    split = model_decode(1, 8, 65536, 128, 16, H100)
    assert one.sm_utilization < 0.07 and split.sm_utilization > 0.96
    assert split.modelled_s < one.modelled_s / 10
    assert abs(one.roofline_s - split.roofline_s) < 1e-12
