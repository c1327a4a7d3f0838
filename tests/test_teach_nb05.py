"""Notebook 05's exercise checks: the solution passes, the stub is not attempted yet, and
the planted mistakes (typical wrong answers a learner writes) fail."""

from __future__ import annotations

from teach_harness import exercise_tests

from flashkv_edu.runtime import tl, triton
from flashkv_edu.teach import nb05_tiled_triton_kernels as nb05


@triton.jit
def step_no_rescale(
    q,
    k,
    v,
    m_i,
    l_i,
    acc,
    visible,
    bias,
    scale,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    return m_new, l_i + tl.sum(p, 1), acc + tl.dot(p, v, input_precision="ieee")


@triton.jit
def step_no_mask(
    q,
    k,
    v,
    m_i,
    l_i,
    acc,
    visible,
    bias,
    scale,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")


@triton.jit
def key_range_all(pid_m, seqlen_q, seqlen_k, window_left, window_right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    return pid_m * 0, seqlen_k + pid_m * 0  # visits tiles nobody can see


@triton.jit
def key_range_top_left(
    pid_m, seqlen_q, seqlen_k, window_left, window_right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    lo = pid_m * 0
    hi = seqlen_k + pid_m * 0
    if window_right >= 0:  # forgets the bottom-right offset sk - sq
        hi = tl.minimum(seqlen_k, pid_m * BLOCK_M + BLOCK_M - 1 + window_right + 1)
    if window_left >= 0:
        lo = tl.maximum(0, pid_m * BLOCK_M - window_left)
    return (lo // BLOCK_N) * BLOCK_N, hi


@triton.jit
def key_range_zero_is_infinite(
    pid_m, seqlen_q, seqlen_k, window_left, window_right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    lo = pid_m * 0
    hi = seqlen_k + pid_m * 0
    if window_right > 0:  # > instead of >=: a window side of 0 (causal, one token) treated as infinite
        hi = tl.minimum(seqlen_k, pid_m * BLOCK_M + BLOCK_M - 1 + seqlen_k - seqlen_q + window_right + 1)
    if window_left > 0:
        lo = tl.maximum(0, pid_m * BLOCK_M + seqlen_k - seqlen_q - window_left)
    return (lo // BLOCK_N) * BLOCK_N, hi


@triton.jit
def key_range_unclamped(
    pid_m, seqlen_q, seqlen_k, window_left, window_right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    lo = pid_m * 0
    hi = seqlen_k + pid_m * 0
    if window_right >= 0:
        hi = tl.minimum(seqlen_k, pid_m * BLOCK_M + BLOCK_M - 1 + seqlen_k - seqlen_q + window_right + 1)
    if window_left >= 0:  # no max(0, ...): // truncates towards 0, so only a lo below -BLOCK_N shows
        lo = pid_m * BLOCK_M + seqlen_k - seqlen_q - window_left
    return (lo // BLOCK_N) * BLOCK_N, hi


@triton.jit
def key_range_hi_unclamped(
    pid_m, seqlen_q, seqlen_k, window_left, window_right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    lo = pid_m * 0
    hi = seqlen_k + pid_m * 0
    if window_right >= 0:  # no min(seqlen_k, ...): a right window reaches past the last key
        hi = pid_m * BLOCK_M + BLOCK_M - 1 + seqlen_k - seqlen_q + window_right + 1
    if window_left >= 0:
        lo = tl.maximum(0, pid_m * BLOCK_M + seqlen_k - seqlen_q - window_left)
    return (lo // BLOCK_N) * BLOCK_N, hi


@triton.jit
def copy_rows_masked_only(X, Y, n_rows, n_cols, stride_x, stride_y, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    inside = (rows[:, None] < n_rows) & (cols[None, :] < BLOCK_C * 1000)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=inside, other=0.0)
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], x, mask=inside)


@triton.jit
def copy_load_unmasked(X, Y, n_rows, n_cols, stride_x, stride_y, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :])
    tl.store(Y + rows[:, None] * stride_x + cols[None, :], x)  # the row stride of X used for Y too


@triton.jit
def copy_load_rows_only(X, Y, n_rows, n_cols, stride_x, stride_y, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=(rows < n_rows)[:, None], other=0.0)
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], x, mask=inside)  # stores right, loads past the columns


@triton.jit
def copy_load_unmasked_store_masked(
    X, Y, n_rows, n_cols, stride_x, stride_y, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :])
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], x, mask=inside)


@triton.jit
def copy_x_stride_for_y(X, Y, n_rows, n_cols, stride_x, stride_y, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=inside, other=0.0)
    tl.store(Y + rows[:, None] * stride_x + cols[None, :], x, mask=inside)


@triton.jit
def pack_swapped(r, kv_head, GROUP: tl.constexpr):
    return r % GROUP, kv_head * GROUP + r // GROUP


@triton.jit
def pack_no_kv_offset(r, kv_head, GROUP: tl.constexpr):
    return r // GROUP, r % GROUP


@triton.jit
def pack_head_not_scaled(r, kv_head, GROUP: tl.constexpr):
    return r // GROUP, kv_head + r % GROUP


@triton.jit
def step_unguarded(
    q,
    k,
    v,
    m_i,
    l_i,
    acc,
    visible,
    bias,
    scale,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
):  # no guard for rows whose running max is still -inf: exp(-inf - -inf) is NaN
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")


@triton.jit
def step_tf32(
    q,
    k,
    v,
    m_i,
    l_i,
    acc,
    visible,
    bias,
    scale,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
):  # right on the interpreter, TF32 on a GPU
    s = tl.dot(q, tl.trans(k)) * scale
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + tl.dot(p, v)


MISTAKES = {
    "check_inner_loop": [step_no_rescale, step_no_mask, step_unguarded, step_tf32],
    "check_key_range": [
        key_range_all,
        key_range_top_left,
        key_range_zero_is_infinite,
        key_range_unclamped,
        key_range_hi_unclamped,
    ],
    "check_copy_tile": [
        copy_rows_masked_only,
        copy_load_unmasked,
        copy_load_rows_only,
        copy_load_unmasked_store_masked,
        copy_x_stride_for_y,
    ],
    "check_pack_rows": [pack_swapped, pack_no_kv_offset, pack_head_not_scaled],
}

(
    test_the_solution_passes,
    test_the_stub_is_not_attempted_yet,
    test_a_planted_mistake_fails,
    test_every_check_has_planted_mistakes,
) = exercise_tests(nb05, MISTAKES)
