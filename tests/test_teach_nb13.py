"""Notebook 13's exercise checks: the solution passes, the stub is not attempted yet, and
the planted mistakes (typical wrong answers a learner writes) fail."""

from __future__ import annotations

import torch
from teach_harness import exercise_tests

from flashkv_edu.rotary import apply_rotary
from flashkv_edu.teach import nb13_long_context as nb13


def update_at_absolute_position(cached, new_key, t, sinks, window, cos, sin):  # transformers #33691
    n = cached.shape[0]
    if n < sinks + window:
        return nb13.sink_cache_update(cached, new_key, t, sinks, window, cos, sin)
    back = (cos[1:2], -sin[1:2])
    moved = apply_rotary(cached[None, sinks + 1 :], *back, torch.zeros(1, n - sinks - 1, dtype=torch.long))[0]
    return torch.cat((cached[:sinks], moved, apply_rotary(new_key[None, None], cos, sin, torch.tensor([[t]]))[0]))


def update_without_rerotation(cached, new_key, t, sinks, window, cos, sin):  # drops, never moves the others
    n = cached.shape[0]
    if n < sinks + window:
        return nb13.sink_cache_update(cached, new_key, t, sinks, window, cos, sin)
    pos = torch.tensor([[sinks + window - 1]])
    return torch.cat((cached[:sinks], cached[sinks + 1 :], apply_rotary(new_key[None, None], cos, sin, pos)[0]))


def update_moves_sinks_too(cached, new_key, t, sinks, window, cos, sin):  # re-rotates the sinks as well
    n = cached.shape[0]
    if n < sinks + window:
        return nb13.sink_cache_update(cached, new_key, t, sinks, window, cos, sin)
    keep = torch.cat((cached[:sinks], cached[sinks + 1 :]))
    back = (cos[1:2], -sin[1:2])
    moved = apply_rotary(keep[None], *back, torch.zeros(1, keep.shape[0], dtype=torch.long))[0]
    pos = torch.tensor([[sinks + window - 1]])
    return torch.cat((moved, apply_rotary(new_key[None, None], cos, sin, pos)[0]))


def update_evicts_a_sink(cached, new_key, t, sinks, window, cos, sin):  # drops the oldest token overall
    n = cached.shape[0]
    if n < sinks + window:
        return nb13.sink_cache_update(cached, new_key, t, sinks, window, cos, sin)
    back = (cos[1:2], -sin[1:2])
    moved = apply_rotary(cached[None, 1:], *back, torch.zeros(1, n - 1, dtype=torch.long))[0]
    return torch.cat((moved, apply_rotary(new_key[None, None], cos, sin, torch.tensor([[n - 1]]))[0]))


def bound_max_only(q, mins, maxs):  # forgets that a negative q_c prefers the minimum
    return (q * maxs).sum(-1)


def bound_mean(q, mins, maxs):  # the page's centre, not a bound
    return (q * (mins + maxs) / 2).sum(-1)


def bound_abs(q, mins, maxs):  # a bound, but a looser one than Quest's
    return (q.abs() * torch.maximum(mins.abs(), maxs.abs())).sum(-1)


def bound_in_place(q, mins, maxs):  # right numbers, but scales the caller's summaries
    mins.mul_(q)
    maxs.mul_(q)
    return torch.maximum(mins, maxs).sum(-1)


def absorb_transposed(q_nope, w_uk, nheads):  # reads w_uk as (heads, latent, nope)
    nope, latent = q_nope.shape[-1], w_uk.shape[1]
    return torch.einsum("bshn,hln->bshl", q_nope, w_uk.reshape(nheads, latent, nope))


def absorb_heads_summed(q_nope, w_uk, nheads):  # one query for all heads
    nope, latent = q_nope.shape[-1], w_uk.shape[1]
    one = torch.einsum("bshn,hnl->bsl", q_nope, w_uk.view(nheads, nope, latent))
    return one[:, :, None].expand(*q_nope.shape[:3], latent)


def absorb_first_head_weights(q_nope, w_uk, nheads):  # every head through head 0's up-projection
    nope = q_nope.shape[-1]
    return q_nope @ w_uk[:nope]


def mask_top_left(seqlen_q, seqlens_k, sinks, window):  # causal from the top-left corner
    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & ((kv_idx < sinks) | (kv_idx > q_idx - window))

    return mask_mod


def mask_window_one_wider(seqlen_q, seqlens_k, sinks, window):  # window + 1 keys
    def mask_mod(b, h, q_idx, kv_idx):
        at = q_idx + seqlens_k[b] - seqlen_q
        return (kv_idx <= at) & ((kv_idx < sinks) | (kv_idx >= at - window))

    return mask_mod


def mask_sinks_see_the_future(seqlen_q, seqlens_k, sinks, window):  # sinks outside the causal rule
    def mask_mod(b, h, q_idx, kv_idx):
        at = q_idx + seqlens_k[b] - seqlen_q
        return (kv_idx < sinks) | ((kv_idx <= at) & (kv_idx > at - window))

    return mask_mod


def mask_first_row_length(seqlen_q, seqlens_k, sinks, window):  # every row aligned like row 0
    def mask_mod(b, h, q_idx, kv_idx):
        at = q_idx + seqlens_k[0] - seqlen_q
        return (kv_idx <= at) & ((kv_idx < sinks) | (kv_idx > at - window))

    return mask_mod


MISTAKES = {
    "check_sink_cache_update": [
        update_at_absolute_position,
        update_without_rerotation,
        update_moves_sinks_too,
        update_evicts_a_sink,
    ],
    "check_page_upper_bound": [bound_max_only, bound_mean, bound_abs, bound_in_place],
    "check_absorb_query": [absorb_transposed, absorb_heads_summed, absorb_first_head_weights],
    "check_streaming_mask": [mask_top_left, mask_window_one_wider, mask_sinks_see_the_future, mask_first_row_length],
}

(
    test_the_solution_passes,
    test_the_stub_is_not_attempted_yet,
    test_a_planted_mistake_fails,
    test_every_check_has_planted_mistakes,
) = exercise_tests(nb13, MISTAKES)
