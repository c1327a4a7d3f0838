"""The harness of the exercise-check tests (``tests/test_teach_nbNN.py``, one per notebook).

:func:`exercise_tests` makes a notebook's four tests from its teaching module and its planted
mistakes: every solution passes, every stub prints "not attempted yet", every planted mistake
fails with a ``FAIL on`` line, and every check has its planted mistakes.
"""

from __future__ import annotations

import pytest

from flashkv_edu.runtime import tl, triton

MIN_MISTAKES = 3  # planted mistakes per check, at least


def stub(*args, **kwargs):
    raise NotImplementedError


@triton.jit
def stub_step(
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
    raise NotImplementedError("write me")


@triton.jit
def stub_key_range(pid_m, seqlen_q, seqlen_k, window_left, window_right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    raise NotImplementedError("write me")


@triton.jit
def stub_copy_tile(X, Y, n_rows, n_cols, stride_x, stride_y, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    raise NotImplementedError("write me")


@triton.jit
def stub_pack_rows(r, kv_head, GROUP: tl.constexpr):
    raise NotImplementedError("write me")


@triton.jit
def stub_paged_rows(K, BLOCK_TABLE, b, pos, col_ok, stride_btb, page_size, stride_kb, stride_ks):
    raise NotImplementedError("write me")


@triton.jit
def stub_split_range(split, split_size, seqlen_k):
    raise NotImplementedError("write me")


@triton.jit
def stub_finish_split(m_i, l_i, acc):
    raise NotImplementedError("write me")


@triton.jit
def stub_combine_kernel(
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
    raise NotImplementedError("write me")


@triton.jit
def stub_dequantize(x, scale, FP8_BITS: tl.constexpr):
    raise NotImplementedError


TRITON_STUBS = {
    "my_dequantize": stub_dequantize,
    "my_step": stub_step,
    "my_key_range": stub_key_range,
    "my_copy_tile": stub_copy_tile,
    "my_pack_rows": stub_pack_rows,
    "my_paged_rows": stub_paged_rows,
    "my_split_range": stub_split_range,
    "my_finish_split": stub_finish_split,
    "my_combine_kernel": stub_combine_kernel,
}


def exercise_tests(module, mistakes: dict):
    """The four tests of ``module``'s exercises; ``mistakes`` maps a check's name to the wrong
    answers it must fail."""
    exercises = module.EXERCISES

    @pytest.mark.parametrize("ex", exercises, ids=lambda e: e.name)
    def test_the_solution_passes(ex, capsys):
        assert getattr(module, ex.check)(getattr(module, ex.name)) is True
        assert capsys.readouterr().out.startswith(f"{ex.check}: PASS (")

    @pytest.mark.parametrize("ex", exercises, ids=lambda e: e.name)
    def test_the_stub_is_not_attempted_yet(ex, capsys):
        assert getattr(module, ex.check)(TRITON_STUBS[ex.name] if ex.triton else stub) is None
        assert capsys.readouterr().out.startswith(f"{ex.check}: not attempted yet")

    planted = [(c, i, f) for c, fs in mistakes.items() for i, f in enumerate(fs)]

    @pytest.mark.parametrize("check, i, mistake", planted, ids=[f"{c}-{i}" for c, i, _ in planted])
    def test_a_planted_mistake_fails(check, i, mistake, capsys):
        assert getattr(module, check)(mistake) is False
        out = capsys.readouterr().out
        assert out.startswith(f"{check}: FAIL on "), out

    def test_every_check_has_planted_mistakes():
        assert set(mistakes) == {e.check for e in exercises}
        assert all(len(v) >= MIN_MISTAKES for v in mistakes.values()), {c: len(v) for c, v in mistakes.items()}

    return (
        test_the_solution_passes,
        test_the_stub_is_not_attempted_yet,
        test_a_planted_mistake_fails,
        test_every_check_has_planted_mistakes,
    )
