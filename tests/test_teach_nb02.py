"""Notebook 02's exercise checks: the solution passes, the stub is not attempted yet, and
the planted mistakes (typical wrong answers a learner writes) fail."""

from __future__ import annotations

import torch
from teach_harness import exercise_tests

from flashkv_edu.teach import nb02_kv_cache as nb02


def append_at_zero(k_cache, v_cache, lens, k, v):
    k_cache[:, : k.shape[1]], v_cache[:, : k.shape[1]] = k, v
    return lens + k.shape[1]


def append_no_advance(k_cache, v_cache, lens, k, v):
    nb02.my_append(k_cache, v_cache, lens, k, v)
    return lens


def append_advances_in_place(k_cache, v_cache, lens, k, v):  # cache_seqlens += snew: the caller's lengths move
    nb02.my_append(k_cache, v_cache, lens, k, v)
    lens += k.shape[1]
    return lens


def append_lengths_int64(k_cache, v_cache, lens, k, v):  # the next call's cache_seqlens must be int32
    return nb02.my_append(k_cache, v_cache, lens, k, v).long()


def append_first_length(k_cache, v_cache, lens, k, v):  # every row written where row 0 starts
    for b in range(k.shape[0]):
        start = int(lens[0])
        k_cache[b, start : start + k.shape[1]], v_cache[b, start : start + k.shape[1]] = k[b], v[b]
    return (lens + k.shape[1]).to(torch.int32)


def positions_from_zero(lens, n):
    return torch.arange(n)[None, :].expand(len(lens), n)


def positions_off_by_one(lens, n):
    return lens.long()[:, None] + torch.arange(1, n + 1)[None, :]


def positions_int32(lens, n):  # int32 positions: index tensors for rotary tables must be int64
    return lens[:, None] + torch.arange(n, dtype=torch.int32)[None, :]


def positions_first_row(lens, n):  # one sequence's positions for the whole batch
    return (int(lens[0]) + torch.arange(n))[None, :].expand(len(lens), n)


def cache_for_prompt(prompt_lens, new, hk, d):  # the bug as shipped
    shape = (len(prompt_lens), max(prompt_lens), hk, d)
    return torch.zeros(shape), torch.zeros(shape)


def cache_one_short(prompt_lens, new, hk, d):
    shape = (len(prompt_lens), max(prompt_lens) + new - 1, hk, d)
    return torch.zeros(shape), torch.zeros(shape)


def cache_first_prompt(prompt_lens, new, hk, d):  # sized to the first prompt, not the longest
    shape = (len(prompt_lens), prompt_lens[0] + new, hk, d)
    return torch.zeros(shape), torch.zeros(shape)


MISTAKES = {
    "check_append": [
        append_at_zero,
        append_no_advance,
        append_advances_in_place,
        append_lengths_int64,
        append_first_length,
    ],
    "check_decode_positions": [positions_from_zero, positions_off_by_one, positions_int32, positions_first_row],
    "check_allocate_cache": [cache_for_prompt, cache_one_short, cache_first_prompt],
}

(
    test_the_solution_passes,
    test_the_stub_is_not_attempted_yet,
    test_a_planted_mistake_fails,
    test_every_check_has_planted_mistakes,
) = exercise_tests(nb02, MISTAKES)
