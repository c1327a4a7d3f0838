"""Automatic checks for the notebooks' exercises.

Each ``check_…`` takes the learner's function, runs it on a grid of cases against the finished
code of the package and prints one readable verdict. It returns True or False.
"""

from __future__ import annotations

import torch

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
