"""Notebook 08 (putting it together): its exercises.

Exercises: ``my_decode_step`` (driving ``flash_attn_with_kvcache`` for one step) and two bug
hunts from the field: ``attention_step`` (a widely copied generation snippet that slices the
cache, never passes the new keys and projects them from the wrong tensor) and ``rotary_decode``
(``rotary_interleaved`` left at FlashAttention's default for a rotate-half model).
"""

from __future__ import annotations

import torch

import flashkv_edu as fk
from flashkv_edu.paged import gather_paged
from flashkv_edu.rotary import apply_rotary, rotary_tables

from .exercise import (
    CaseFailed,
    Exercise,
    call_unchanged,
    expect_close,
    expect_dtype,
    expect_equal,
    expect_pair,
    run_check,
)

EXERCISES = [
    Exercise("08", "my_decode_step", "check_decode_step", 15),
    Exercise(
        "08",
        "attention_step",
        "check_attention_step",
        20,
        bug_hunt=True,
        source="https://github.com/Dao-AILab/flash-attention/issues/638",
    ),
    Exercise(
        "08",
        "rotary_decode",
        "check_rotary_decode",
        10,
        bug_hunt=True,
        source="https://github.com/Dao-AILab/flash-attention/issues/862",
    ),
]


def draw_serving_trace(trace, requests, labels=None):
    """A per-request timeline of :func:`flashkv_edu.serving.serve` (top: one row per request,
    waiting from arrival to admission, then prefill and decoding until it leaves) above the
    blocks in use and running requests per decode step (bottom), on one step axis. Returns
    the figure."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    steps = len(trace.running)
    fig, (ax_r, ax_b) = plt.subplots(2, 1, figsize=(11, 5), sharex=True, gridspec_kw={"height_ratios": [1.4, 1]})
    for row, r in enumerate(requests):
        y = len(requests) - 1 - row
        if r.admitted > r.arrival:
            ax_r.barh(y, r.admitted - r.arrival, left=r.arrival, color="#e2e8f0", edgecolor="gray")
        ax_r.barh(y, 1, left=r.admitted, color="#ed8936")
        ax_r.barh(y, r.finished - r.admitted, left=r.admitted + 1, color="#2b6cb0")
        note = f"slot {r.slot}" + (f", prefix hit {r.cached_tokens}" if r.cached_tokens else "")
        ax_r.text(r.finished + 1.3, y, note, va="center", fontsize=10)
    ax_r.set_yticks(range(len(requests)))
    ax_r.set_yticklabels(list(reversed(labels or [f"request {i}" for i in range(len(requests))])), fontsize=10)
    ax_r.set(title="Continuous batching: each request's life on the decode-step axis")
    legend = [
        Patch(color="#e2e8f0", label="waiting for a slot"),
        Patch(color="#ed8936", label="prefill (joins)"),
        Patch(color="#2b6cb0", label="decoding, one token per step"),
    ]
    ax_r.legend(handles=legend, fontsize=10, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax_b.step(range(steps), trace.blocks_used, where="post", label="blocks in use")
    ax_b.step(range(steps), trace.running, where="post", label="running requests")
    ax_b.set(title="Blocks in use and running requests", xlabel="decode step", ylabel="count")
    ax_b.legend(fontsize=10, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


# --- exercise 1: one decode step ------------------------------------------------------------------


def my_decode_step(q, k, v, k_cache, v_cache, cache_seqlens, block_table):
    """Append ``k, v`` ``(batch, 1, nheads_k, headdim)`` through ``block_table``, attend causally,
    and return ``(out, new_cache_seqlens)``: the call does not advance the lengths."""
    out = fk.flash_attn_with_kvcache(
        q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, block_table=block_table, causal=True
    )
    return out, (cache_seqlens + k.shape[1]).to(torch.int32)


def check_decode_step(fn) -> bool | None:
    """Three steps in a row on a paged cache: keys where they belong, outputs, lengths."""
    gen = torch.Generator().manual_seed(8)
    pool_k, pool_v = torch.zeros(12, 4, 2, 16), torch.zeros(12, 4, 2, 16)
    table = torch.randperm(12, generator=gen)[:8].view(2, 4).to(torch.int32)
    state = {"lens": torch.tensor([3, 9], dtype=torch.int32), "seen": gather_paged(pool_k, table).clone()}

    def step(i):
        def run(f):
            lens = state["lens"]
            q = torch.randn(2, 1, 4, 16, generator=gen)
            k, v = torch.randn(2, 1, 2, 16, generator=gen), torch.randn(2, 1, 2, 16, generator=gen)
            out, new_lens = expect_pair(
                "result", call_unchanged(f, q, k, v, pool_k, pool_v, lens, table, may_write=(3, 4))
            )
            expect_dtype(
                "returned cache_seqlens (the next step passes them to flash_attn_with_kvcache)", torch.int32, new_lens
            )
            for b in range(2):
                state["seen"][b, int(lens[b])] = k[b, 0]
            expect_equal("keys in the cache", state["seen"], gather_paged(pool_k, table))
            want = fk.attention_ref(
                q, gather_paged(pool_k, table), gather_paged(pool_v, table), causal=True, seqlens_k=lens + 1
            )
            expect_close("output", want, out, atol=1e-5)
            expect_equal("returned cache_seqlens", lens + 1, new_lens)
            state["lens"] = new_lens

        return f"decode step {i}", run

    return run_check(
        "check_decode_step",
        fn,
        [step(0), step(1), step(2), step(3)],
        "4 steps on a paged cache across a page boundary; keys, outputs and int32 lengths right, inputs unchanged",
    )


# --- exercise 2 (bug hunt): a generation snippet from the wild ----------------------------------


def attention_step(x, wq, wk, wv, k_cache, v_cache, cache_seqlens):
    """One decode step of one attention layer: project ``q, k, v`` from the layer input ``x``
    ``(batch, 1, dim)``, append ``k, v`` at ``cache_seqlens`` and attend causally. Returns
    ``(out (batch, 1, nheads, headdim), new cache_seqlens)``."""
    b, d, hk = x.shape[0], k_cache.shape[3], k_cache.shape[2]
    q = (x @ wq).view(b, 1, -1, d)
    k = (x @ wk).view(b, 1, hk, d)
    v = (x @ wv).view(b, 1, hk, d)
    out = fk.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, causal=True)
    return out, (cache_seqlens + 1).to(torch.int32)


def check_attention_step(fn) -> bool | None:
    """Four decode steps over a cache with room to grow, for two sequences with prompts of 5 and 2
    tokens (each at its own length), against attention over each one's projected history."""
    gen = torch.Generator().manual_seed(81)
    dim, h, hk, d, b = 32, 4, 2, 8, 2
    wq, wk, wv = (torch.randn(dim, n * d, generator=gen) * dim**-0.5 for n in (h, hk, hk))
    k_cache, v_cache = torch.zeros(b, 16, hk, d), torch.zeros(b, 16, hk, d)
    prompts = [torch.randn(1, n, dim, generator=gen) for n in (5, 2)]
    for i, p in enumerate(prompts):
        n = p.shape[1]
        k_cache[i, :n], v_cache[i, :n] = (p @ wk).view(n, hk, d), (p @ wv).view(n, hk, d)
    state = {"lens": torch.tensor([5, 2], dtype=torch.int32), "xs": prompts}

    def step(i):
        def run(f):
            x = torch.randn(b, 1, dim, generator=gen)
            lens = state["lens"]
            out, new_lens = expect_pair(
                "result", call_unchanged(f, x, wq, wk, wv, k_cache, v_cache, lens, may_write=(4, 5))
            )
            xs = [torch.cat([state["xs"][r], x[r : r + 1]], 1) for r in range(b)]
            want = torch.cat(
                [
                    fk.attention_ref(
                        (x[r : r + 1] @ wq).view(1, 1, h, d),
                        (xs[r] @ wk).view(1, -1, hk, d),
                        (xs[r] @ wv).view(1, -1, hk, d),
                        causal=True,
                    )
                    for r in range(b)
                ]
            )
            if not isinstance(out, torch.Tensor) or out.shape != want.shape:
                raise CaseFailed(f"output should have shape {tuple(want.shape)}")
            expect_close(
                "attention output (each sequence sees its own earlier tokens and this one)", want, out, atol=1e-4
            )
            expect_dtype("returned cache_seqlens", torch.int32, new_lens)
            expect_equal("returned cache_seqlens", lens + 1, new_lens)
            state["lens"], state["xs"] = new_lens, xs

        return f"decode step {i} after prompts of 5 and 2 tokens", run

    return run_check(
        "check_attention_step",
        fn,
        [step(i) for i in range(4)],
        "4 steps, ragged lengths: new keys appended in place, projected from the layer input, attended",
    )


# --- exercise 3 (bug hunt): rotary layout ---------------------------------------------------------


def rotary_decode(q, k, v, k_cache, v_cache, cache_seqlens, cos, sin):
    """A decode step of a Llama-style model (rotary in the rotate-half / GPT-NeoX layout),
    rotary applied by ``flash_attn_with_kvcache`` at position ``cache_seqlens``."""
    return fk.flash_attn_with_kvcache(
        q,
        k_cache,
        v_cache,
        k,
        v,
        rotary_cos=cos,
        rotary_sin=sin,
        cache_seqlens=cache_seqlens,
        causal=True,
        rotary_interleaved=False,
    )


def check_rotary_decode(fn) -> bool | None:
    """A cache holding keys rotated the rotate-half way; the new token must be rotated the same
    way at its position before attention."""
    gen = torch.Generator().manual_seed(82)

    def case(lens):
        def run(f):
            b, cap, h, hk, d = len(lens), 24, 4, 2, 32
            cos, sin = rotary_tables(cap, d)
            raw_k = torch.randn(b, cap, hk, d, generator=gen)
            pos = torch.arange(cap)[None, :].expand(b, cap)
            k_cache = apply_rotary(raw_k, cos, sin, pos, interleaved=False)
            v_cache = torch.randn(b, cap, hk, d, generator=gen)
            q = torch.randn(b, 1, h, d, generator=gen)
            k, v = torch.randn(b, 1, hk, d, generator=gen), torch.randn(b, 1, hk, d, generator=gen)
            seqlens = torch.tensor(lens, dtype=torch.int32)
            at = seqlens.long()[:, None]
            want_k = k_cache.clone()
            for i, n in enumerate(lens):
                want_k[i, n] = apply_rotary(k[i : i + 1], cos, sin, at[i : i + 1], interleaved=False)[0, 0]
            want_v = v_cache.clone()
            want_v[torch.arange(b), seqlens.long()] = v[:, 0]
            want = fk.attention_ref(
                apply_rotary(q, cos, sin, at, interleaved=False), want_k, want_v, seqlens_k=seqlens + 1, causal=True
            )
            out = f(q, k, v, k_cache, v_cache, seqlens, cos, sin)
            expect_equal(
                "cache_seqlens after the call (the caller advances them)",
                torch.tensor(lens, dtype=torch.int32),
                seqlens,
            )
            expect_close("the appended, rotated key", want_k, k_cache, atol=1e-5)
            expect_close("attention output", want, out, atol=1e-4)

        return f"cache_seqlens={lens}", run

    return run_check(
        "check_rotary_decode",
        fn,
        [case([7]), case([3, 11]), case([0, 23])],
        "keys and queries rotated in the rotate-half layout at the right positions",
    )
