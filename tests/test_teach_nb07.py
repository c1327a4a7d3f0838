"""Notebook 07's exercise checks: the solution passes, the stub is not attempted yet, and
the planted mistakes (typical wrong answers a learner writes) fail."""

from __future__ import annotations

from teach_harness import exercise_tests

from flashkv_edu.runtime import tl, triton
from flashkv_edu.teach import nb07_split_kv_decode as nb07


@triton.jit
def split_unclipped(split, split_size, seqlen_k):
    return split * split_size, split * split_size + split_size


@triton.jit
def split_shifted(split, split_size, seqlen_k):
    lo = split * split_size + 1
    return lo, tl.minimum(seqlen_k, lo + split_size)


@triton.jit
def finish_plus_inf(m_i, l_i, acc):
    empty = l_i == 0.0
    out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, l_i)[:, None])
    return out, tl.where(empty, float("inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))


@triton.jit
def finish_unguarded(m_i, l_i, acc):
    return acc / l_i[:, None], m_i + tl.log(l_i)


@triton.jit
def combine_no_max(
    OACC,
    LACC,
    O,
    LSE,
    stride_as,
    stride_ab,
    stride_aq,
    stride_ah,
    stride_ls,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oq,
    stride_oh,
    stride_fb,
    stride_fh,
    num_splits,
    nheads,
    seqlen_q,
    headdim,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // (seqlen_q * nheads)
    t = (pid // nheads) % seqlen_q
    h = pid % nheads
    s = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    s_ok = s < num_splits
    lse = tl.load(LACC + s * stride_ls + b * stride_lb + h * stride_lh + t, mask=s_ok, other=float("-inf"))
    w = tl.exp(lse)  # overflows for large logits
    total = tl.sum(w, 0)
    parts = tl.load(
        OACC + s[:, None] * stride_as + b * stride_ab + t * stride_aq + h * stride_ah + dims[None, :],
        mask=s_ok[:, None] & (dims[None, :] < headdim),
        other=0.0,
    )
    tl.store(
        O + b * stride_ob + t * stride_oq + h * stride_oh + dims,
        tl.sum(w[:, None] * parts, 0) / total,
        mask=dims < headdim,
    )
    tl.store(LSE + b * stride_fb + h * stride_fh + t, tl.log(total))


@triton.jit
def combine_mean(
    OACC,
    LACC,
    O,
    LSE,
    stride_as,
    stride_ab,
    stride_aq,
    stride_ah,
    stride_ls,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oq,
    stride_oh,
    stride_fb,
    stride_fh,
    num_splits,
    nheads,
    seqlen_q,
    headdim,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // (seqlen_q * nheads)
    t = (pid // nheads) % seqlen_q
    h = pid % nheads
    s = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    s_ok = s < num_splits
    lse = tl.load(LACC + s * stride_ls + b * stride_lb + h * stride_lh + t, mask=s_ok, other=float("-inf"))
    parts = tl.load(
        OACC + s[:, None] * stride_as + b * stride_ab + t * stride_aq + h * stride_ah + dims[None, :],
        mask=s_ok[:, None] & (dims[None, :] < headdim),
        other=0.0,
    )
    tl.store(
        O + b * stride_ob + t * stride_oq + h * stride_oh + dims, tl.sum(parts, 0) / num_splits, mask=dims < headdim
    )
    tl.store(LSE + b * stride_fb + h * stride_fh + t, tl.max(lse, 0))


@triton.jit
def split_hi_one_short(split, split_size, seqlen_k):
    lo = split * split_size
    return lo, tl.minimum(seqlen_k - 1, lo + split_size)  # the last key is never read


@triton.jit
def finish_forgets_max(m_i, l_i, acc):
    empty = l_i == 0.0
    out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, l_i)[:, None])
    return out, tl.where(empty, float("-inf"), tl.log(tl.where(empty, 1.0, l_i)))  # l_i is relative to m_i


@triton.jit
def finish_not_normalised(m_i, l_i, acc):
    empty = l_i == 0.0
    return acc, tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))


# loads and stores the whole tile: fine while headdim == BLOCK_D
@triton.jit
def combine_no_dim_mask(
    OACC,
    LACC,
    O,
    LSE,
    stride_as,
    stride_ab,
    stride_aq,
    stride_ah,
    stride_ls,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oq,
    stride_oh,
    stride_fb,
    stride_fh,
    num_splits,
    nheads,
    seqlen_q,
    headdim,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // (seqlen_q * nheads)).to(tl.int64)  # 64-bit base offsets
    t = (pid // nheads) % seqlen_q
    h = pid % nheads
    s = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    s_ok = s < num_splits
    row_lse = LACC + b * stride_lb + h * stride_lh + t
    row_acc = OACC + b * stride_ab + t * stride_aq + h * stride_ah
    lse = tl.load(row_lse + s.to(tl.int64) * stride_ls, mask=s_ok, other=float("-inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp(lse - top)
    total = tl.sum(w, 0)
    parts = tl.load(
        (row_acc + s.to(tl.int64) * stride_as)[:, None] + dims[None, :],
        mask=s_ok[:, None],
        other=0.0,
    )
    out = tl.sum(w[:, None] * parts, 0) / tl.where(total == 0.0, 1.0, total)
    final = tl.where(total == 0.0, float("inf"), top + tl.log(tl.where(total == 0.0, 1.0, total)))
    tl.store(O + b * stride_ob + t * stride_oq + h * stride_oh + dims, out.to(O.dtype.element_ty))
    tl.store(LSE + b * stride_fb + h * stride_fh + t, final)


# the query token is left out: fine while seqlen_q == 1
@triton.jit
def combine_ignores_token(
    OACC,
    LACC,
    O,
    LSE,
    stride_as,
    stride_ab,
    stride_aq,
    stride_ah,
    stride_ls,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oq,
    stride_oh,
    stride_fb,
    stride_fh,
    num_splits,
    nheads,
    seqlen_q,
    headdim,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // (seqlen_q * nheads)).to(tl.int64)  # 64-bit base offsets
    t = (pid // nheads) % seqlen_q
    h = pid % nheads
    s = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    s_ok = s < num_splits
    row_lse = LACC + b * stride_lb + h * stride_lh
    row_acc = OACC + b * stride_ab + h * stride_ah
    lse = tl.load(row_lse + s.to(tl.int64) * stride_ls, mask=s_ok, other=float("-inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp(lse - top)
    total = tl.sum(w, 0)
    parts = tl.load(
        (row_acc + s.to(tl.int64) * stride_as)[:, None] + dims[None, :],
        mask=s_ok[:, None] & (dims[None, :] < headdim),
        other=0.0,
    )
    out = tl.sum(w[:, None] * parts, 0) / tl.where(total == 0.0, 1.0, total)
    final = tl.where(total == 0.0, float("inf"), top + tl.log(tl.where(total == 0.0, 1.0, total)))
    tl.store(O + b * stride_ob + t * stride_oq + h * stride_oh + dims, out.to(O.dtype.element_ty), mask=dims < headdim)
    tl.store(LSE + b * stride_fb + h * stride_fh + t, final)


# an all-empty row keeps LSE -inf (the final answer is +inf)
@triton.jit
def combine_empty_row_minus_inf(
    OACC,
    LACC,
    O,
    LSE,
    stride_as,
    stride_ab,
    stride_aq,
    stride_ah,
    stride_ls,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oq,
    stride_oh,
    stride_fb,
    stride_fh,
    num_splits,
    nheads,
    seqlen_q,
    headdim,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // (seqlen_q * nheads)).to(tl.int64)  # 64-bit base offsets
    t = (pid // nheads) % seqlen_q
    h = pid % nheads
    s = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    s_ok = s < num_splits
    row_lse = LACC + b * stride_lb + h * stride_lh + t
    row_acc = OACC + b * stride_ab + t * stride_aq + h * stride_ah
    lse = tl.load(row_lse + s.to(tl.int64) * stride_ls, mask=s_ok, other=float("-inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp(lse - top)
    total = tl.sum(w, 0)
    parts = tl.load(
        (row_acc + s.to(tl.int64) * stride_as)[:, None] + dims[None, :],
        mask=s_ok[:, None] & (dims[None, :] < headdim),
        other=0.0,
    )
    out = tl.sum(w[:, None] * parts, 0) / tl.where(total == 0.0, 1.0, total)
    final = tl.where(total == 0.0, float("-inf"), top + tl.log(tl.where(total == 0.0, 1.0, total)))
    tl.store(O + b * stride_ob + t * stride_oq + h * stride_oh + dims, out.to(O.dtype.element_ty), mask=dims < headdim)
    tl.store(LSE + b * stride_fb + h * stride_fh + t, final)


MISTAKES = {
    "check_split_range": [split_unclipped, split_shifted, split_hi_one_short],
    "check_finish_split": [finish_plus_inf, finish_unguarded, finish_forgets_max, finish_not_normalised],
    "check_combine_kernel": [
        combine_no_max,
        combine_mean,
        combine_no_dim_mask,
        combine_ignores_token,
        combine_empty_row_minus_inf,
    ],
}

(
    test_the_solution_passes,
    test_the_stub_is_not_attempted_yet,
    test_a_planted_mistake_fails,
    test_every_check_has_planted_mistakes,
) = exercise_tests(nb07, MISTAKES)
