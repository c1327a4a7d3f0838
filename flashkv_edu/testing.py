"""Comparison helpers of the tests and the notebooks: an exact max error and FlashAttention's
tolerance rule."""

from __future__ import annotations

import torch

__all__ = ["max_abs_err", "within_fa_tolerance"]


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b|`` in fp64, treating equal infinities (and NaN pairs) as 0 error."""
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    same = (a64 == b64) | (torch.isnan(a64) & torch.isnan(b64))
    diff = (a64 - b64).abs().masked_fill(same, 0.0)
    return float(diff.max()) if diff.numel() else 0.0


def within_fa_tolerance(
    out: torch.Tensor, out_ref: torch.Tensor, out_lowp: torch.Tensor, mult: float = 3.0, atol: float = 1e-5
) -> bool:
    """FlashAttention's test rule: ``max|out - out_ref| <= mult * max|out_lowp - out_ref| + atol``.

    ``out_ref`` is the fp32 oracle, ``out_lowp`` the same attention computed in the input's
    own precision (its natural rounding error). FA uses ``mult = 3``, or 5 with ALiBi.
    """
    return max_abs_err(out, out_ref) <= mult * max_abs_err(out_lowp, out_ref) + atol
