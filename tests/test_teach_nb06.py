"""Notebook 06's exercise checks: the solution passes, the stub is not attempted yet, and
the planted mistakes (typical wrong answers a learner writes) fail."""

from __future__ import annotations

from teach_harness import exercise_tests

from flashkv_edu.runtime import tl, triton
from flashkv_edu.teach import nb06_paged_block_tables as nb06


@triton.jit
def paged_ignores_table(K, BLOCK_TABLE, b, pos, col_ok, stride_btb, page_size, stride_kb, stride_ks):
    return K + (b * 16 * page_size + pos).to(tl.int64) * stride_ks  # as if the pool were contiguous


@triton.jit
def paged_swapped(K, BLOCK_TABLE, b, pos, col_ok, stride_btb, page_size, stride_kb, stride_ks):
    page = tl.load(BLOCK_TABLE + b * stride_btb + pos % page_size, mask=col_ok, other=0)
    return K + page.to(tl.int64) * stride_kb + (pos // page_size) * stride_ks


def blocks_ignore_partial(length, n, bs, shared):
    return -(-n // bs), False


def blocks_no_cow(length, n, bs, shared):
    return -(-(length + n) // bs) - -(-length // bs), False


def last_page_mod(kv_lens, page):  # the buggy formula
    return kv_lens % page


def last_page_plus_one(kv_lens, page):
    return kv_lens % page + 1


MISTAKES = {
    "check_paged_rows": [paged_ignores_table, paged_swapped],
    "check_blocks_to_append": [blocks_ignore_partial, blocks_no_cow],
    "check_last_page_len": [last_page_mod, last_page_plus_one],
}

(
    test_the_solution_passes,
    test_the_stub_is_not_attempted_yet,
    test_a_planted_mistake_fails,
    test_every_check_has_planted_mistakes,
) = exercise_tests(nb06, MISTAKES)
