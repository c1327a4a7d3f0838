"""Notebook 02 (the KV cache): its exercises.

Exercises: ``my_append`` (the in-place append with per-sequence lengths), ``decode_positions``
(where the new tokens sit, for rotary embeddings), and the bug hunt ``allocate_cache`` (a cache
sized exactly to the prompt, which the in-place append then writes past).
"""

from __future__ import annotations

import torch

import flashkv_edu as fk
from flashkv_edu.cache import append_to_cache

from .exercise import CaseFailed, Exercise, call_unchanged, expect_close, expect_dtype, expect_equal, run_check

EXERCISES = [
    Exercise("02", "my_append", "check_append", 15),
    Exercise("02", "decode_positions", "check_decode_positions", 10),
    Exercise(
        "02",
        "allocate_cache",
        "check_allocate_cache",
        10,
        bug_hunt=True,
        source="https://github.com/Dao-AILab/flash-attention/issues/638",
    ),
]


# --- exercise 1: append -------------------------------------------------------------------------


def my_append(k_cache, v_cache, cache_seqlens, k, v):
    """Write ``k[b], v[b]`` ``(snew, nheads_k, headdim)`` at rows ``cache_seqlens[b] ...`` of
    sequence ``b``, in place; return the new lengths (int32 ``(batch,)``)."""
    snew = k.shape[1]
    for b in range(k.shape[0]):
        start = int(cache_seqlens[b])
        k_cache[b, start : start + snew] = k[b]
        v_cache[b, start : start + snew] = v[b]
    return (cache_seqlens + snew).to(torch.int32)


def check_append(fn) -> bool | None:
    """``fn(k_cache, v_cache, cache_seqlens, k, v)``: exact cache rows, nothing else touched,
    the new lengths returned."""
    gen = torch.Generator().manual_seed(2)

    def case(lens, cap, snew):
        def run(f):
            batch = len(lens)
            k_cache = torch.randn(batch, cap, 2, 4, generator=gen)
            v_cache = torch.randn(batch, cap, 2, 4, generator=gen)
            seqlens = torch.tensor(lens, dtype=torch.int32)
            k, v = torch.randn(batch, snew, 2, 4, generator=gen), torch.randn(batch, snew, 2, 4, generator=gen)
            want_k, want_v = k_cache.clone(), v_cache.clone()
            want_lens = append_to_cache(want_k, want_v, seqlens.clone(), k, v)
            got_lens = _append(f, k_cache, v_cache, seqlens, k, v)
            expect_equal("k_cache after the append", want_k, k_cache)
            expect_equal("v_cache after the append", want_v, v_cache)
            expect_dtype("returned lengths", torch.int32, got_lens)
            expect_equal("returned lengths", want_lens, got_lens)

        return f"cache_seqlens={lens}, capacity={cap}, {snew} new tokens", run

    return run_check(
        "check_append",
        fn,
        [case([0], 8, 1), case([3, 0, 8], 10, 2), case([11, 2, 0, 6], 16, 5), case([7, 4], 8, 1)],
        "ragged batches up to a full cache; rows and int32 lengths exact; inputs unchanged",
    )


def _append(f, k_cache, v_cache, seqlens, k, v):
    """``f``'s returned lengths; ``cache_seqlens``, ``k`` and ``v`` must come back unchanged (the
    caches are the only things written)."""
    before = [(name, t, t.clone()) for name, t in (("cache_seqlens", seqlens), ("k", k), ("v", v))]
    got = f(k_cache, v_cache, seqlens, k, v)
    for name, t, copy in before:
        if not torch.equal(t, copy):
            raise CaseFailed(
                f"your function changed {name} in place (it was {copy.tolist() if t.numel() < 9 else 'a tensor'}); "
                "return the new lengths and leave the caller's tensors as they are"
            )
    return got


# --- exercise 2: positions of the new tokens ---------------------------------------------------


def decode_positions(cache_seqlens, seqlen_new):
    """Rotary positions ``(batch, seqlen_new)`` (int64) of ``seqlen_new`` new tokens appended
    after ``cache_seqlens[b]`` cached ones."""
    return cache_seqlens.long()[:, None] + torch.arange(seqlen_new)[None, :]


def check_decode_positions(fn) -> bool | None:
    """``fn(cache_seqlens, seqlen_new)`` against ``cache_seqlens + i``."""

    def case(lens, snew):
        def run(f):
            seqlens = torch.tensor(lens, dtype=torch.int32)
            want = seqlens.long()[:, None] + torch.arange(snew)[None, :]
            got = call_unchanged(f, seqlens, snew)
            expect_dtype("positions", torch.int64, got)
            expect_equal("positions", want, got)

        return f"cache_seqlens={lens}, {snew} new tokens", run

    return run_check(
        "check_decode_positions",
        fn,
        [case([0, 0], 3), case([5, 2, 9], 1), case([4, 7], 2), case([0], 1), case([3, 0, 12, 1], 4)],
        "prefill, decode and ragged chunks, int64",
    )


# --- exercise 3 (bug hunt): a cache sized to the prompt ------------------------------------------


def allocate_cache(prompt_lens, max_new_tokens, nheads_k, headdim):
    """Zeroed ``(k_cache, v_cache)`` for ``len(prompt_lens)`` sequences that will each append
    ``max_new_tokens`` tokens after their prompt."""
    capacity = max(prompt_lens) + max_new_tokens
    shape = (len(prompt_lens), capacity, nheads_k, headdim)
    return torch.zeros(shape), torch.zeros(shape)


def check_allocate_cache(fn) -> bool | None:
    """Prefill every prompt, then decode ``max_new_tokens`` steps through
    ``flash_attn_with_kvcache``: every append must fit, and the outputs must equal attention over
    the whole history."""
    gen = torch.Generator().manual_seed(22)

    def case(prompt_lens, new):
        def run(f):
            hk, d = 1, 16
            k_cache, v_cache = f(list(prompt_lens), new, hk, d)
            if not isinstance(k_cache, torch.Tensor) or k_cache.dim() != 4 or k_cache.shape[0] != len(prompt_lens):
                raise CaseFailed(f"return (k_cache, v_cache) of shape (batch, capacity, {hk}, {d})")
            b = len(prompt_lens)
            hist_k = [torch.randn(n, hk, d, generator=gen) for n in prompt_lens]
            hist_v = [torch.randn(n, hk, d, generator=gen) for n in prompt_lens]
            for i, n in enumerate(prompt_lens):
                if n > k_cache.shape[1]:
                    raise CaseFailed(f"a prompt of {n} tokens does not fit in capacity {k_cache.shape[1]}")
                k_cache[i, :n], v_cache[i, :n] = hist_k[i], hist_v[i]
            lens = torch.tensor(prompt_lens, dtype=torch.int32)
            for step in range(new):
                q = torch.randn(b, 1, 2, d, generator=gen)
                k, v = torch.randn(b, 1, hk, d, generator=gen), torch.randn(b, 1, hk, d, generator=gen)
                if int(lens.max()) + 1 > k_cache.shape[1]:
                    raise CaseFailed(
                        f"decode step {step} appends at row {int(lens.max())} of a cache with "
                        f"capacity {k_cache.shape[1]}: the in-place append would write past its end"
                    )
                out = fk.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens, causal=True)
                for i in range(b):
                    hist_k[i] = torch.cat([hist_k[i], k[i]])
                    hist_v[i] = torch.cat([hist_v[i], v[i]])
                    want = fk.attention_ref(q[i : i + 1], hist_k[i][None], hist_v[i][None], causal=True)
                    expect_close(f"decode step {step}, sequence {i}", want, out[i : i + 1], atol=1e-5)
                lens += 1

        return f"prompts of {list(prompt_lens)} tokens, {new} new tokens each", run

    return run_check(
        "check_allocate_cache",
        fn,
        [case((5, 3), 4), case((8,), 6), case((2, 6, 4), 3), case((1, 1), 1), case((3, 9), 2)],
        "every decode step fits and matches attention over the full history",
    )
