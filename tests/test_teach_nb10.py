"""Notebook 10's exercise checks: the solution passes, the stub is not attempted yet, and
the planted mistakes (typical wrong answers a learner writes) fail."""

from __future__ import annotations

from teach_harness import exercise_tests

from flashkv_edu.teach import nb10_transformers_model as nb10


def window_w(sliding_window):  # the off-by-one: W keys back instead of W - 1
    return (-1, -1) if sliding_window is None else (sliding_window, 0)


def window_centered(sliding_window):  # a local window centred on the query, as in Longformer
    return (-1, -1) if sliding_window is None else (sliding_window // 2, sliding_window // 2)


def window_one_short(sliding_window):  # W - 2: one key too few
    return (-1, -1) if sliding_window is None else (sliding_window - 2, 0)


def hf_attention_no_padding(query, key, value, attention_mask, scaling, sliding_window, softcap):
    return nb10.my_hf_attention(query, key, value, None, scaling, sliding_window, softcap)


def hf_attention_heads_first(query, key, value, attention_mask, scaling, sliding_window, softcap):
    return nb10.my_hf_attention(query, key, value, attention_mask, scaling, sliding_window, softcap).transpose(1, 2)


def hf_attention_window_w(query, key, value, attention_mask, scaling, sliding_window, softcap):
    return nb10.my_hf_attention(
        query, key, value, attention_mask, scaling, None if sliding_window is None else sliding_window + 1, softcap
    )


def hf_attention_default_scale(query, key, value, attention_mask, scaling, sliding_window, softcap):
    return nb10.my_hf_attention(
        query, key, value, attention_mask, None, sliding_window, softcap
    )  # the model's scale dropped


MISTAKES = {
    "check_hf_window_size": [window_w, window_centered, window_one_short],
    "check_my_hf_attention": [
        hf_attention_no_padding,
        hf_attention_heads_first,
        hf_attention_window_w,
        hf_attention_default_scale,
    ],
}

(
    test_the_solution_passes,
    test_the_stub_is_not_attempted_yet,
    test_a_planted_mistake_fails,
    test_every_check_has_planted_mistakes,
) = exercise_tests(nb10, MISTAKES)
