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


@triton.jit
def paged_no_int64(K, BLOCK_TABLE, b, pos, col_ok, stride_btb, page_size, stride_kb, stride_ks):
    page = tl.load(BLOCK_TABLE + b * stride_btb + pos // page_size, mask=col_ok, other=0)
    return K + page * stride_kb + (pos % page_size) * stride_ks  # int32 product: overflows past 2^31


@triton.jit
def paged_cast_after_multiply(K, BLOCK_TABLE, b, pos, col_ok, stride_btb, page_size, stride_kb, stride_ks):
    page = tl.load(BLOCK_TABLE + b * stride_btb + pos // page_size, mask=col_ok, other=0)
    return K + (page * stride_kb).to(tl.int64) + (pos % page_size) * stride_ks  # overflowed before the cast


@triton.jit
def paged_table_unmasked(K, BLOCK_TABLE, b, pos, col_ok, stride_btb, page_size, stride_kb, stride_ks):
    page = tl.load(BLOCK_TABLE + b * stride_btb + pos // page_size)  # reads entries past the sequence's pages
    return K + page.to(tl.int64) * stride_kb + (pos % page_size) * stride_ks


def blocks_ignore_partial(length, n, bs, shared):
    return -(-n // bs), False


def blocks_no_cow(length, n, bs, shared):
    return -(-(length + n) // bs) - -(-length // bs), False


def blocks_cow_on_full_block(length, n, bs, shared):  # a full shared block is never written: no copy
    have, total = -(-length // bs), -(-(length + n) // bs)
    copy = n > 0 and shared and length > 0
    return total - have + int(copy), copy


def blocks_copy_not_counted(length, n, bs, shared):  # the copy needs a block of its own
    have, total = -(-length // bs), -(-(length + n) // bs)
    return total - have, n > 0 and length % bs != 0 and shared


def last_page_mod(kv_lens, page):  # the buggy formula
    return kv_lens % page


def last_page_plus_one(kv_lens, page):
    return kv_lens % page + 1


def last_page_float(kv_lens, page):  # true division: float32 lengths
    return (kv_lens - 1) - ((kv_lens - 1) / page).floor() * page + 1


def last_page_int64(kv_lens, page):  # the right numbers as int64 (the dtype bug of the issue)
    return (kv_lens.long() - 1) % page + 1


def last_page_in_place(kv_lens, page):  # %= rewrites the caller's lengths
    kv_lens -= 1
    kv_lens %= page
    kv_lens += 1
    return kv_lens


MISTAKES = {
    "check_paged_rows": [
        paged_ignores_table,
        paged_swapped,
        paged_no_int64,
        paged_cast_after_multiply,
        paged_table_unmasked,
    ],
    "check_blocks_to_append": [blocks_ignore_partial, blocks_no_cow, blocks_cow_on_full_block, blocks_copy_not_counted],
    "check_last_page_len": [last_page_mod, last_page_plus_one, last_page_float, last_page_int64, last_page_in_place],
}

(
    test_the_solution_passes,
    test_the_stub_is_not_attempted_yet,
    test_a_planted_mistake_fails,
    test_every_check_has_planted_mistakes,
) = exercise_tests(nb06, MISTAKES)
