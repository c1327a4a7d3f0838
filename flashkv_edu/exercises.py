"""Automatic checks for the notebooks' exercises.

Each ``check_…`` takes the learner's function, runs it on a grid of cases against the finished
code of the package and prints one readable verdict. It returns True or False.
"""

from __future__ import annotations

import torch

from .cache import append_to_cache
from .reference import attention_mask, attention_ref
from .testing import error_bucket, max_abs_err, verdict


def _call(fn, *args):
    try:
        return fn(*args), None
    except Exception as exc:  # the learner's code may raise anything
        return None, f"raised {type(exc).__name__}: {exc}"


# --- notebook 01 -------------------------------------------------------------------------

def check_bottom_right_mask(fn) -> bool:
    """``fn(seqlen_q, seqlen_k)`` must return FlashAttention's bottom-right causal mask."""
    for sq, sk in [(1, 1), (1, 7), (2, 5), (5, 2), (4, 4), (3, 9), (9, 3), (6, 1)]:
        got, err = _call(fn, sq, sk)
        if err:
            return verdict("check_bottom_right_mask", False, f"seqlen_q={sq}, seqlen_k={sk}: {err}")
        want = attention_mask(sq, sk, causal=True)
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            return verdict("check_bottom_right_mask", False,
                           f"seqlen_q={sq}, seqlen_k={sk}: expected shape {tuple(want.shape)}, got {shape}")
        if not torch.equal(got.bool(), want):
            bad = (got.bool() != want).nonzero()[0].tolist()
            return verdict("check_bottom_right_mask", False,
                           f"seqlen_q={sq}, seqlen_k={sk}: wrong at (row, col)={tuple(bad)}")
    return verdict("check_bottom_right_mask", True, "8 shapes, including seqlen_q > seqlen_k")


def check_gqa_attention(fn) -> bool:
    """``fn(q, k, v)`` must compute unmasked attention with GQA/MQA head sharing."""
    gen = torch.Generator().manual_seed(1)
    worst = 0.0
    for h, hk in [(4, 4), (6, 2), (6, 3), (8, 1)]:
        q = torch.randn(2, 5, h, 16, generator=gen)
        k = torch.randn(2, 7, hk, 16, generator=gen)
        v = torch.randn(2, 7, hk, 16, generator=gen)
        got, err = _call(fn, q, k, v)
        name = f"nheads={h}, nheads_k={hk}"
        if err:
            return verdict("check_gqa_attention", False, f"{name}: {err}")
        want = attention_ref(q, k, v)
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            return verdict("check_gqa_attention", False, f"{name}: expected shape {tuple(want.shape)}")
        e = max_abs_err(got, want)
        worst = max(worst, e)
        if e > 1e-4:
            return verdict("check_gqa_attention", False, f"{name}: max error {e:.1e}")
    return verdict("check_gqa_attention", True, f"MHA, GQA, MQA; max error {error_bucket(worst)}")


# --- notebook 02 -------------------------------------------------------------------------

def check_append(fn) -> bool:
    """``fn(k_cache, v_cache, cache_seqlens, k, v)`` must write ``k[b], v[b]`` at rows
    ``cache_seqlens[b] ...`` of sequence ``b`` in place, touch nothing else, and return the
    new lengths."""
    gen = torch.Generator().manual_seed(2)
    for batch, cap, snew in [(1, 8, 1), (3, 10, 2), (4, 16, 5)]:
        k_cache = torch.randn(batch, cap, 2, 4, generator=gen)
        v_cache = torch.randn(batch, cap, 2, 4, generator=gen)
        lens = torch.randint(0, cap - snew + 1, (batch,), generator=gen).to(torch.int32)
        k, v = torch.randn(batch, snew, 2, 4, generator=gen), torch.randn(batch, snew, 2, 4, generator=gen)
        want_k, want_v = k_cache.clone(), v_cache.clone()
        want_lens = append_to_cache(want_k, want_v, lens.clone(), k, v)
        got_k, got_v, got_lens_in = k_cache.clone(), v_cache.clone(), lens.clone()
        got_lens, err = _call(fn, got_k, got_v, got_lens_in, k, v)
        case = f"batch={batch}, lengths={lens.tolist()}, {snew} new tokens"
        if err:
            return verdict("check_append", False, f"{case}: {err}")
        if not torch.equal(got_k, want_k) or not torch.equal(got_v, want_v):
            wrong = ((got_k != want_k) | (got_v != want_v)).any(-1).any(-1).nonzero()[0].tolist()
            return verdict("check_append", False, f"{case}: cache differs at (sequence, row)={tuple(wrong)}")
        if not isinstance(got_lens, torch.Tensor) or not torch.equal(got_lens.to(torch.int32), want_lens):
            return verdict("check_append", False, f"{case}: returned lengths {got_lens}, expected {want_lens.tolist()}")
    return verdict("check_append", True, "3 ragged batches; cache rows and lengths exact")


# --- notebook 03 -------------------------------------------------------------------------

def check_window_update(fn) -> bool:
    """``fn(cached, new, window)`` must return ``(stored, visible)`` like
    :func:`flashkv_edu.window_cache.window_update`: the last ``window`` tokens, and the last
    ``window - 1`` cached tokens followed by all new ones (sequence on dim 1)."""
    from .window_cache import position_chunk, window_update

    cases = [(w, c, n) for w in (1, 3, 4) for c in (0, 2, 4, 7) for n in (1, 3, 4, 9) if c <= w]
    for w, c, n in cases:
        cached, new = position_chunk(0, c), position_chunk(c, n)
        want = window_update(cached, new, w)
        got, err = _call(fn, cached, new, w)
        case = f"window={w}, {c} cached, {n} new"
        if err:
            return verdict("check_window_update", False, f"{case}: {err}")
        if not isinstance(got, tuple) or len(got) != 2:
            return verdict("check_window_update", False, f"{case}: return a pair (stored, visible)")
        for name, g, e in (("stored", got[0], want[0]), ("visible", got[1], want[1])):
            if not isinstance(g, torch.Tensor) or g.shape != e.shape or not torch.equal(g, e):
                shown = g[0, :, 0, 0].long().tolist() if isinstance(g, torch.Tensor) and g.dim() == 4 else g
                return verdict("check_window_update", False,
                               f"{case}: {name} holds positions {shown}, expected {e[0, :, 0, 0].long().tolist()}")
    return verdict("check_window_update", True, f"{len(cases)} cases: chunks below, at and above the window")


# --- notebook 04 -------------------------------------------------------------------------

def check_merge_states(fn) -> bool:
    """``fn(out_a, lse_a, out_b, lse_b)`` must merge two attention states over disjoint key
    sets into the state over both, including empty sides (lse = -inf)."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 3, 4, 8, generator=gen) * 3
    k = torch.randn(2, 10, 2, 8, generator=gen) * 3
    v = torch.randn(2, 10, 2, 8, generator=gen)
    worst = 0.0
    for split in (1, 4, 9):
        out_a, lse_a = attention_ref(q, k[:, :split], v[:, :split], return_lse=True)
        out_b, lse_b = attention_ref(q, k[:, split:], v[:, split:], return_lse=True)
        want_out, want_lse = attention_ref(q, k, v, return_lse=True)
        got, err = _call(fn, out_a, lse_a, out_b, lse_b)
        if err:
            return verdict("check_merge_states", False, f"keys split at {split}: {err}")
        if not isinstance(got, tuple) or len(got) != 2:
            return verdict("check_merge_states", False, "return the pair (out, lse)")
        e = max(max_abs_err(got[0], want_out), max_abs_err(got[1], want_lse))
        worst = max(worst, e)
        if e > 1e-4:
            return verdict("check_merge_states", False, f"keys split at {split}: max error {e:.1e}")
    out_a, lse_a = attention_ref(q, k, v, return_lse=True)
    empty_out, empty_lse = torch.zeros_like(out_a), torch.full_like(lse_a, float("-inf"))
    got, err = _call(fn, out_a, lse_a, empty_out, empty_lse)
    if err or not isinstance(got, tuple) or not torch.isfinite(got[0]).all() or max_abs_err(got[0], out_a) > 1e-5:
        return verdict("check_merge_states", False, f"merging with an empty state (lse=-inf): {err or 'wrong output'}")
    return verdict("check_merge_states", True, f"3 split points and an empty side; max error {error_bucket(worst)}")


# --- notebook 05 -------------------------------------------------------------------------

def check_inner_loop(step) -> bool:
    """``step`` is a ``@triton.jit`` function with ``online_softmax_step``'s signature; it runs as
    the inner loop of ``simple_attention_kernel`` on ragged shapes and must match the oracle."""
    from .kernels.forward import simple_attention

    gen = torch.Generator().manual_seed(5)
    worst = 0.0
    for sq, sk, d in [(1, 7, 16), (20, 45, 32), (33, 16, 20)]:
        q, k, v = (torch.randn(n, d, generator=gen) * 2 for n in (sq, sk, sk))
        got, err = _call(simple_attention, q, k, v, step)
        if err:
            return verdict("check_inner_loop", False, f"seqlen_q={sq}, seqlen_k={sk}: {err}")
        want = attention_ref(q[None, :, None], k[None, :, None], v[None, :, None])[0, :, 0]
        e = max_abs_err(got, want)
        worst = max(worst, e)
        if e > 1e-4:
            return verdict("check_inner_loop", False, f"seqlen_q={sq}, seqlen_k={sk}: max error {e:.1e}")
    return verdict("check_inner_loop", True,
                   f"3 ragged shapes through the Triton kernel; max error {error_bucket(worst)}")


# --- notebook 06 -------------------------------------------------------------------------

def check_slot_mapping(fn) -> bool:
    """``fn(positions, block_table_row, block_size)`` must return the physical
    ``(block ids, offsets)`` of each token position, as :func:`flashkv_edu.paged.slot_mapping`."""
    from .paged import slot_mapping

    gen = torch.Generator().manual_seed(6)
    for block_size in (1, 3, 16):
        table = torch.randperm(40, generator=gen)[:8].to(torch.int32)
        positions = torch.randint(0, 8 * block_size, (12,), generator=gen)
        want = slot_mapping(positions, table, block_size)
        got, err = _call(fn, positions, table, block_size)
        case = f"block_size={block_size}"
        if err:
            return verdict("check_slot_mapping", False, f"{case}: {err}")
        if not isinstance(got, tuple) or len(got) != 2:
            return verdict("check_slot_mapping", False, "return the pair (block ids, offsets)")
        for name, g, w in (("block ids", got[0], want[0]), ("offsets", got[1], want[1])):
            if not isinstance(g, torch.Tensor) or g.shape != w.shape or not torch.equal(g.long(), w):
                return verdict("check_slot_mapping", False,
                               f"{case}: {name} for positions {positions.tolist()[:4]}... "
                               f"should start {w.tolist()[:4]}")
    return verdict("check_slot_mapping", True, "block sizes 1, 3 and 16 with shuffled block tables")


# --- notebook 07 -------------------------------------------------------------------------

def check_combine(fn) -> bool:
    """``fn(out_partial, lse_partial)`` must merge split-KV partial states ``(splits, batch,
    seqlen_q, nheads, headdim)`` / ``(splits, batch, nheads, seqlen_q)`` into ``(out, lse)``,
    empty splits (lse -inf) included, as the split kernel's own combine step does."""
    from .kernels.decode import decode_attention_triton

    gen = torch.Generator().manual_seed(7)
    kc = torch.randn(2, 70, 1, 16, generator=gen) * 2
    q = torch.randn(2, 1, 4, 16, generator=gen) * 2
    lens = torch.tensor([70, 9], dtype=torch.int32)
    for splits in (2, 5):
        out, lse, o_part, l_part = decode_attention_triton(q, kc, kc, lens, num_splits=splits, return_lse=True,
                                                           return_partials=True)
        got, err = _call(fn, o_part, l_part)
        case = f"{splits} splits (sequence 2 leaves some empty)"
        if err:
            return verdict("check_combine", False, f"{case}: {err}")
        if not isinstance(got, tuple) or len(got) != 2:
            return verdict("check_combine", False, "return the pair (out, lse)")
        e = max(max_abs_err(got[0], out), max_abs_err(got[1], lse))
        if not e < 1e-5:
            return verdict("check_combine", False, f"{case}: max error {e:.1e} against the Triton combine kernel")
    return verdict("check_combine", True, "2 and 5 splits, empty splits included; equal to the Triton combine kernel")


# --- notebook 08 -------------------------------------------------------------------------

def check_decode_step(fn) -> bool:
    """``fn(q, k, v, k_cache, v_cache, cache_seqlens, block_table)`` must append the new token
    through ``flash_attn_with_kvcache``, return causal attention over the cache and the
    advanced lengths, for three steps in a row on a paged cache."""
    from .paged import gather_paged

    gen = torch.Generator().manual_seed(8)
    pool_k, pool_v = torch.zeros(12, 4, 2, 16), torch.zeros(12, 4, 2, 16)
    table = torch.randperm(12, generator=gen)[:8].view(2, 4).to(torch.int32)
    lens = torch.tensor([3, 9], dtype=torch.int32)
    seen_k = gather_paged(pool_k, table).clone()
    for step in range(3):
        q = torch.randn(2, 1, 4, 16, generator=gen)
        k, v = torch.randn(2, 1, 2, 16, generator=gen), torch.randn(2, 1, 2, 16, generator=gen)
        got, err = _call(fn, q, k, v, pool_k, pool_v, lens.clone(), table)
        if err:
            return verdict("check_decode_step", False, f"step {step}: {err}")
        if not isinstance(got, tuple) or len(got) != 2:
            return verdict("check_decode_step", False, "return (out, new_cache_seqlens)")
        for b in range(2):
            seen_k[b, int(lens[b])] = k[b, 0]
        if not torch.equal(gather_paged(pool_k, table), seen_k):
            return verdict("check_decode_step", False, f"step {step}: the new keys are not where they belong")
        want = attention_ref(q, gather_paged(pool_k, table), gather_paged(pool_v, table), causal=True,
                             seqlens_k=lens + 1)
        if max_abs_err(got[0], want) > 1e-5:
            return verdict("check_decode_step", False, f"step {step}: wrong attention output")
        if not isinstance(got[1], torch.Tensor) or got[1].tolist() != (lens + 1).tolist():
            return verdict("check_decode_step", False, f"step {step}: lengths should advance to {(lens + 1).tolist()}")
        lens = got[1].to(torch.int32)
    return verdict("check_decode_step", True, "3 steps on a paged cache; keys, outputs and lengths right")
