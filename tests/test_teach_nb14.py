"""Notebook 14's exercise checks: the solution passes, the stub is not attempted yet, and
the planted mistakes (typical wrong answers a learner writes) fail."""

from __future__ import annotations

import torch
from teach_harness import exercise_tests

from flashkv_edu.teach import nb14_several_query_rows as nb14


def plan_ignores_decodes(decodes, prompts_left, budget):  # the decodes' tokens not counted
    return nb14.chunk_plan(0, prompts_left, budget)


def plan_whole_budget_each(decodes, prompts_left, budget):  # every prompt gets the whole remainder
    return [min(n, budget - decodes) for n in prompts_left]


def plan_overshoots(decodes, prompts_left, budget):  # a chunk of the budget whatever the prompt has left
    return [budget - decodes if i == 0 else 0 for i, _ in enumerate(prompts_left)]


def sample_always_accept(drafts, q, p, generator=None):  # the draft's distribution, not the target's
    return [*drafts, int(torch.multinomial(p[len(drafts)], 1, generator=generator))]


def sample_from_p_on_reject(drafts, q, p, generator=None):  # resample from p instead of max(0, p - q)
    out = []
    for i, tok in enumerate(drafts):
        if float(torch.rand((), generator=generator)) < min(1.0, float(p[i, tok] / q[i, tok])):
            out.append(tok)
            continue
        out.append(int(torch.multinomial(p[i], 1, generator=generator)))
        return out
    return [*out, int(torch.multinomial(p[len(drafts)], 1, generator=generator))]


def sample_accept_by_p_only(drafts, q, p, generator=None):  # accepts with p(d) (forgets to divide by q)
    out = []
    for i, tok in enumerate(drafts):
        if float(torch.rand((), generator=generator)) < float(p[i, tok]):
            out.append(tok)
            continue
        residual = (p[i] - q[i]).clamp(min=0)
        out.append(int(torch.multinomial(residual / residual.sum(), 1, generator=generator)))
        return out
    return [*out, int(torch.multinomial(p[len(drafts)], 1, generator=generator))]


def rollback_by_rejected_plus_one(length, k, accepted):  # the shipped bug
    rejected = k - accepted
    return length + k + 1 - (rejected + 1), length + k - (rejected + 1)


def rollback_nothing(length, k, accepted):  # rejected drafts left visible
    return length + k + 1, length + k


def rollback_draft_like_target(length, k, accepted):  # the draft never computed d_k
    return length + accepted + 1, length + accepted + 1


def mask_parents_only(parents):  # a node sees its parent, not the whole path
    n = len(parents)
    m = torch.eye(n, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            m[i, p] = True
    return m


def mask_transposed(parents):
    return nb14.ancestor_mask(parents).T.contiguous()


def mask_without_self(parents):
    return nb14.ancestor_mask(parents) & ~torch.eye(len(parents), dtype=torch.bool)


MISTAKES = {
    "check_chunk_plan": [plan_ignores_decodes, plan_whole_budget_each, plan_overshoots],
    "check_rejection_sample": [sample_always_accept, sample_from_p_on_reject, sample_accept_by_p_only],
    "check_rollback_lengths": [rollback_by_rejected_plus_one, rollback_nothing, rollback_draft_like_target],
    "check_ancestor_mask": [mask_parents_only, mask_transposed, mask_without_self],
}

(
    test_the_solution_passes,
    test_the_stub_is_not_attempted_yet,
    test_a_planted_mistake_fails,
    test_every_check_has_planted_mistakes,
) = exercise_tests(nb14, MISTAKES)
