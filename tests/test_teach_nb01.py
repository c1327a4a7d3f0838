"""Notebook 01's exercise checks: the solution passes, the stub is not attempted yet, and
the planted mistakes (typical wrong answers a learner writes) fail."""

from __future__ import annotations

import torch
from teach_harness import exercise_tests

from flashkv_edu.teach import nb01_naive_attention as nb01


def gqa_tiled(q, k, v):  # repeat instead of repeat_interleave: wrong head pairing
    g = q.shape[2] // k.shape[2]
    return nb01.my_gqa_attention(
        q,
        k.repeat(1, 1, g, 1)[:, :, : k.shape[2]].repeat(1, 1, g, 1),
        v.repeat(1, 1, g, 1)[:, :, : k.shape[2]].repeat(1, 1, g, 1),
    )


def gqa_no_scale(q, k, v):
    g = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    return torch.einsum("bhij,bjhd->bihd", torch.einsum("bihd,bjhd->bhij", q, k).softmax(-1), v)


def gqa_wrong_pairing(q, k, v):
    g = q.shape[2] // k.shape[2]
    idx = torch.arange(q.shape[2]) % k.shape[2]
    return nb01.my_gqa_attention(q, k[:, :, idx], v[:, :, idx]) if g > 1 else nb01.my_gqa_attention(q, k, v)


def mask_top_left(sq, sk):
    return torch.ones(sq, sk, dtype=torch.bool).tril()


def mask_strict(sq, sk):
    return torch.arange(sk)[None, :] < torch.arange(sq)[:, None] + sk - sq


MISTAKES = {
    "check_gqa_attention": [gqa_no_scale, gqa_wrong_pairing, gqa_tiled],
    "check_bottom_right_mask": [mask_top_left, mask_strict],
    "check_window_size_for": [lambda w: (w, 0), lambda w: (-1, 0), lambda w: w - 1],
}

(
    test_the_solution_passes,
    test_the_stub_is_not_attempted_yet,
    test_a_planted_mistake_fails,
    test_every_check_has_planted_mistakes,
) = exercise_tests(nb01, MISTAKES)
