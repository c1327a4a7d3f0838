"""Notebook 08's exercise checks: the solution passes, the stub is not attempted yet, and
the planted mistakes (typical wrong answers a learner writes) fail."""

from __future__ import annotations

import torch
from teach_harness import exercise_tests

import flashkv_edu as fk
from flashkv_edu.rotary import apply_rotary
from flashkv_edu.teach import nb08_putting_it_together as nb08


def decode_step_no_advance(q, k, v, kc, vc, lens, table):
    return fk.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, block_table=table, causal=True), lens


def decode_step_no_append(q, k, v, kc, vc, lens, table):
    return fk.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, block_table=table, causal=True), lens + 1


def decode_step_in_place(q, k, v, kc, vc, lens, table):  # lens += 1: the next layer appends one row later
    out = fk.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, block_table=table, causal=True)
    lens += 1
    return out, lens


def decode_step_int64(q, k, v, kc, vc, lens, table):  # the next call refuses int64 cache_seqlens
    out = fk.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, block_table=table, causal=True)
    return out, lens.long() + 1


def snippet_one_length(x, wq, wk, wv, k_cache, v_cache, cache_seqlens):  # one length for the whole batch
    b, d, hk = x.shape[0], k_cache.shape[3], k_cache.shape[2]
    q, k, v = (x @ wq).view(b, 1, -1, d), (x @ wk).view(b, 1, hk, d), (x @ wv).view(b, 1, hk, d)
    n = torch.full_like(cache_seqlens, int(cache_seqlens.max()))
    out = fk.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=n, causal=True)
    return out, (cache_seqlens + 1).to(torch.int32)


def snippet_as_found(x, wq, wk, wv, k_cache, v_cache, cache_seqlens):  # all three bugs
    b, d = x.shape[0], k_cache.shape[3]
    q = (x @ wq).view(b, 1, -1, d)
    n = int(cache_seqlens.max())
    out = fk.flash_attn_with_kvcache(q, k_cache[:, :n], v_cache[:, :n], cache_seqlens=cache_seqlens, causal=True)
    return out, cache_seqlens + 1


def snippet_projects_output(x, wq, wk, wv, k_cache, v_cache, cache_seqlens):
    b, d, hk = x.shape[0], k_cache.shape[3], k_cache.shape[2]
    q = (x @ wq).view(b, 1, -1, d)
    y = torch.einsum("bsd,de->bse", q.reshape(b, 1, -1), torch.eye(q.shape[2] * d, x.shape[-1]))
    k, v = (y @ wk).view(b, 1, hk, d), (y @ wv).view(b, 1, hk, d)
    out = fk.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, causal=True)
    return out, cache_seqlens + 1


def snippet_sliced_cache(x, wq, wk, wv, k_cache, v_cache, cache_seqlens):
    b, d, hk = x.shape[0], k_cache.shape[3], k_cache.shape[2]
    q, k, v = (x @ wq).view(b, 1, -1, d), (x @ wk).view(b, 1, hk, d), (x @ wv).view(b, 1, hk, d)
    n = int(cache_seqlens.max())
    out = fk.flash_attn_with_kvcache(q, k_cache[:, :n], v_cache[:, :n], k, v, cache_seqlens=cache_seqlens, causal=True)
    return out, cache_seqlens + 1


def rotary_default_layout(q, k, v, k_cache, v_cache, lens, cos, sin):  # the bug as shipped
    return fk.flash_attn_with_kvcache(
        q, k_cache, v_cache, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=lens, causal=True
    )


def rotary_queries_only(q, k, v, k_cache, v_cache, lens, cos, sin):
    q = apply_rotary(q, cos, sin, lens.long()[:, None], interleaved=False)
    return fk.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens, causal=True)


def rotary_swapped_tables(q, k, v, k_cache, v_cache, lens, cos, sin):  # cos and sin exchanged
    return fk.flash_attn_with_kvcache(
        q, k_cache, v_cache, k, v, rotary_cos=sin, rotary_sin=cos, cache_seqlens=lens, causal=True,
        rotary_interleaved=False,
    )  # fmt: skip


def rotary_advances_in_place(q, k, v, k_cache, v_cache, lens, cos, sin):  # moves the caller's lengths
    out = nb08.rotary_decode(q, k, v, k_cache, v_cache, lens, cos, sin)
    lens += 1
    return out


MISTAKES = {
    "check_decode_step": [decode_step_no_advance, decode_step_no_append, decode_step_in_place, decode_step_int64],
    "check_attention_step": [snippet_as_found, snippet_projects_output, snippet_sliced_cache, snippet_one_length],
    "check_rotary_decode": [
        rotary_default_layout,
        rotary_queries_only,
        rotary_swapped_tables,
        rotary_advances_in_place,
    ],
}

(
    test_the_solution_passes,
    test_the_stub_is_not_attempted_yet,
    test_a_planted_mistake_fails,
    test_every_check_has_planted_mistakes,
) = exercise_tests(nb08, MISTAKES)
