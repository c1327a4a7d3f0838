"""Notebook 04's exercise checks: the solution passes, the stub is not attempted yet, and
the planted mistakes (typical wrong answers a learner writes) fail."""

from __future__ import annotations

import torch
from teach_harness import exercise_tests

from flashkv_edu.teach import nb04_online_softmax as nb04


def update_no_rescale(m, l, block):
    m_new = torch.maximum(m, block.max(-1).values)
    safe = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
    return m_new, l + torch.exp(block - safe[..., None]).sum(-1)


def update_nan_on_masked(m, l, block):
    m_new = torch.maximum(m, block.max(-1).values)
    return m_new, l * torch.exp(m - m_new) + torch.exp(block - m_new[..., None]).sum(-1)


def update_in_place(m, l, block):  # rescales the caller's running sum in place
    m_new = torch.maximum(m, block.max(-1).values)
    safe = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
    l *= torch.exp(m - safe)
    return m_new, l + torch.exp(block - safe[..., None]).sum(-1)


def update_forgets_old_max(m, l, block):  # the new max is the block's own, not the running one
    m_new = block.max(-1).values
    safe = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
    return m_new, l * torch.exp(m - safe) + torch.exp(block - safe[..., None]).sum(-1)


def finalize_plain(m, l, acc):
    return acc / l[:, None], m + torch.log(l)


def finalize_minus_inf(m, l, acc):
    out, lse = nb04.my_finalize(m, l, acc)
    return out, torch.where(l == 0, torch.full_like(lse, float("-inf")), lse)


def finalize_forgets_max(m, l, acc):  # lse = log(l): l was summed relative to m
    out, lse = nb04.my_finalize(m, l, acc)
    return out, torch.where(l == 0, lse, torch.log(l))


def finalize_no_divide(m, l, acc):  # the accumulator is not normalised
    out, lse = nb04.my_finalize(m, l, acc)
    return torch.where((l == 0)[:, None], out, acc), lse


def merge_averaged(out_a, lse_a, out_b, lse_b):
    return (out_a + out_b) / 2, torch.logaddexp(lse_a, lse_b)


def merge_no_max(out_a, lse_a, out_b, lse_b):
    wa, wb = torch.exp(lse_a), torch.exp(lse_b)
    total = wa + wb
    out = (wa / total).transpose(1, 2)[..., None] * out_a + (wb / total).transpose(1, 2)[..., None] * out_b
    return out, torch.log(total)


def merge_minus_inf_only(out_a, lse_a, out_b, lse_b):  # empty = -inf only: +inf (an empty row) gives NaN
    top = torch.maximum(lse_a, lse_b)
    top = torch.where(torch.isneginf(top), torch.zeros_like(top), top)
    wa, wb = torch.exp(lse_a - top), torch.exp(lse_b - top)
    total = wa + wb
    lse = torch.where(total == 0, torch.full_like(top, float("inf")), top + torch.log(total))
    norm = torch.where(total == 0, torch.ones_like(total), total)
    wa, wb = (wa / norm).transpose(1, 2)[..., None], (wb / norm).transpose(1, 2)[..., None]
    return (wa * out_a.float() + wb * out_b.float()).to(out_a.dtype), lse


def merge_in_fp32(out_a, lse_a, out_b, lse_b):  # forgets to return out in the inputs' dtype
    out, lse = nb04.my_merge_states(out_a, lse_a, out_b, lse_b)
    return out.float(), lse


MISTAKES = {
    "check_online_update": [update_no_rescale, update_nan_on_masked, update_in_place, update_forgets_old_max],
    "check_finalize": [finalize_plain, finalize_minus_inf, finalize_forgets_max, finalize_no_divide],
    "check_merge_states": [merge_averaged, merge_no_max, merge_minus_inf_only, merge_in_fp32],
}

(
    test_the_solution_passes,
    test_the_stub_is_not_attempted_yet,
    test_a_planted_mistake_fails,
    test_every_check_has_planted_mistakes,
) = exercise_tests(nb04, MISTAKES)
