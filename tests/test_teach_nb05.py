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
def pack_swapped(r, kv_head, GROUP: tl.constexpr):
    return r % GROUP, kv_head * GROUP + r // GROUP


@triton.jit
def pack_no_kv_offset(r, kv_head, GROUP: tl.constexpr):
    return r // GROUP, r % GROUP


MISTAKES = {
    "check_inner_loop": [step_no_rescale, step_no_mask],
    "check_key_range": [key_range_all, key_range_top_left],
    "check_copy_tile": [copy_rows_masked_only, copy_load_unmasked],
    "check_pack_rows": [pack_swapped, pack_no_kv_offset],
}

(
    test_the_solution_passes,
    test_the_stub_is_not_attempted_yet,
    test_a_planted_mistake_fails,
    test_every_check_has_planted_mistakes,
) = exercise_tests(nb05, MISTAKES)
