"""Notebook 03's exercise checks: the solution passes, the stub is not attempted yet, and
the planted mistakes (typical wrong answers a learner writes) fail."""

from __future__ import annotations

import torch
from teach_harness import exercise_tests

from flashkv_edu.teach import nb03_window_size_bug as nb03


def window_keeps_w_cached(cached, new, window):  # the new queries see W cached tokens
    visible = torch.cat([cached[:, -window:] if cached.shape[1] else cached, new], 1)
    return visible[:, -window:].clone(), visible


def window_drops_context(cached, new, window):  # roll: the chunk's early queries lose context
    stored = torch.cat([cached, new], 1)[:, -window:]
    return stored, stored


def stuck_at_w_plus_1(stored, new, window):  # flash-linear-attention before PR #910
    if stored.shape[1] < window:
        return torch.cat([stored, new], 1)
    rolled = stored.roll(-new.shape[1], 1)
    tail = new[:, -window:]
    rolled[:, -tail.shape[1] :] = tail
    return rolled


def keeps_w_minus_1(stored, new, window):
    return torch.cat([stored, new], 1)[:, -(window - 1) :] if window > 1 else new[:, :0]


def window_minus_zero_slice(cached, new, window):  # cached[:, -(window - 1):] is everything when window = 1
    visible = torch.cat([cached[:, -(window - 1) :], new], 1)
    return visible[:, -window:].clone(), visible


def rolls_only_when_exactly_full(stored, new, window):  # flash-linear-attention v0.1's equality test
    if stored.shape[1] == window:
        n = min(new.shape[1], window)
        rolled = stored.roll(-n, 1)
        rolled[:, -n:] = new[:, -n:]
        return rolled
    return torch.cat([stored, new], 1)


def drops_n_oldest(stored, new, window):  # drops as many old tokens as arrive, full or not
    return torch.cat([stored[:, new.shape[1] :], new], 1)[:, -window:]


MISTAKES = {
    "check_window_update": [window_keeps_w_cached, window_drops_context, window_minus_zero_slice],
    "check_window_cache_update": [stuck_at_w_plus_1, keeps_w_minus_1, rolls_only_when_exactly_full, drops_n_oldest],
}

(
    test_the_solution_passes,
    test_the_stub_is_not_attempted_yet,
    test_a_planted_mistake_fails,
    test_every_check_has_planted_mistakes,
) = exercise_tests(nb03, MISTAKES)
