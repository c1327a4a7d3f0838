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


def gqa_unsafe_softmax(q, k, v):  # exp without subtracting the row maximum: overflows to inf / inf = NaN
    g = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    z = torch.einsum("bihd,bjhd->bhij", q, k) * q.shape[-1] ** -0.5
    p = z.exp() / z.exp().sum(-1, keepdim=True)
    return torch.einsum("bhij,bjhd->bihd", p, v)


def gqa_scales_in_place(q, k, v):  # q *= scale changes the caller's queries
    q *= q.shape[-1] ** -0.5
    g = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    return torch.einsum("bhij,bjhd->bihd", torch.einsum("bihd,bjhd->bhij", q, k).softmax(-1), v)


def gqa_in_fp32(q, k, v):  # computes in fp32 and forgets to return q's dtype
    return nb01.my_gqa_attention(q.float(), k.float(), v.float())


def mask_top_left(sq, sk):
    return torch.ones(sq, sk, dtype=torch.bool).tril()


def mask_strict(sq, sk):
    return torch.arange(sk)[None, :] < torch.arange(sq)[:, None] + sk - sq


def mask_as_floats(sq, sk):  # 0/1 floats: masked_fill and SDPA need bools
    return (torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + sk - sq).float()


def mask_one_late(sq, sk):  # the diagonal one key too far right
    return torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + sk - sq + 1


def mask_swapped(sq, sk):  # seqlen_q - seqlen_k instead of seqlen_k - seqlen_q
    return torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + sq - sk


MISTAKES = {
    "check_gqa_attention": [
        gqa_no_scale,
        gqa_wrong_pairing,
        gqa_tiled,
        gqa_unsafe_softmax,
        gqa_scales_in_place,
        gqa_in_fp32,
    ],
    "check_bottom_right_mask": [mask_top_left, mask_strict, mask_as_floats, mask_one_late, mask_swapped],
    "check_window_size_for": [
        lambda w: (w, 0),  # the bug as shipped: one token too many
        lambda w: (-1, 0),  # plain causal
        lambda w: w - 1,  # not a pair
        lambda w: (w // 2, w // 2),  # a centred window
        lambda w: (max(w - 2, 0), 0),  # one token too few
    ],
}

(
    test_the_solution_passes,
    test_the_stub_is_not_attempted_yet,
    test_a_planted_mistake_fails,
    test_every_check_has_planted_mistakes,
) = exercise_tests(nb01, MISTAKES)
