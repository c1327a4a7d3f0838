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


def finalize_plain(m, l, acc):
    return acc / l[:, None], m + torch.log(l)


def finalize_minus_inf(m, l, acc):
    out, lse = nb04.my_finalize(m, l, acc)
    return out, torch.where(l == 0, torch.full_like(lse, float("-inf")), lse)


def merge_averaged(out_a, lse_a, out_b, lse_b):
    return (out_a + out_b) / 2, torch.logaddexp(lse_a, lse_b)


def merge_no_max(out_a, lse_a, out_b, lse_b):
    wa, wb = torch.exp(lse_a), torch.exp(lse_b)
    total = wa + wb
    out = (wa / total).transpose(1, 2)[..., None] * out_a + (wb / total).transpose(1, 2)[..., None] * out_b
    return out, torch.log(total)


MISTAKES = {
    "check_online_update": [update_no_rescale, update_nan_on_masked],
    "check_finalize": [finalize_plain, finalize_minus_inf],
    "check_merge_states": [merge_averaged, merge_no_max],
}

(
    test_the_solution_passes,
    test_the_stub_is_not_attempted_yet,
    test_a_planted_mistake_fails,
    test_every_check_has_planted_mistakes,
) = exercise_tests(nb04, MISTAKES)
