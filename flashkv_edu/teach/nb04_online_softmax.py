"""Notebook 04 (online softmax): its figure, its widget, and its exercises.

Exercises: ``my_online_update`` (one block of the streaming normaliser), ``my_finalize`` (turn
a running state into ``(out, lse)``, rows that saw nothing included) and ``my_merge_states``.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import torch

from flashkv_edu.online_softmax import online_normalizer
from flashkv_edu.reference import attention_ref

from .exercise import Exercise, call_unchanged, expect_close, expect_dtype, expect_pair, run_check

EXERCISES = [
    Exercise("04", "my_online_update", "check_online_update", 15),
    Exercise("04", "my_finalize", "check_finalize", 10),
    Exercise("04", "my_merge_states", "check_merge_states", 15),
]

# --- figures ---------------------------------------------------------------------------------


def draw_online_softmax(block_size: int = 8, seqlen_k: int = 32, seed: int = 0):
    """Stream one query over ``seqlen_k`` keys in blocks of ``block_size`` and plot the logits
    with block edges, then the running max ``m``, running sum ``l`` and running output after
    each block (output converges to the exact answer at the last block). Returns
    ``(fig, history)`` with history the ``(m, l, out)`` floats after each block."""
    from flashkv_edu.online_softmax import blockwise_attention

    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 1, 1, 4, generator=gen) * 2
    k = torch.randn(1, seqlen_k, 1, 4, generator=gen)
    v = torch.randn(1, seqlen_k, 1, 1, generator=gen)
    _, _, hist = blockwise_attention(q, k, v, block_size=block_size, return_history=True)
    logits = (q[0, 0, 0] @ k[0, :, 0].T) * 0.5
    ms = [float(m[0, 0, 0]) for m, _, _ in hist]
    ls = [float(l[0, 0, 0]) for _, l, _ in hist]
    outs = [float(acc[0, 0, 0, 0] / l[0, 0, 0]) for _, l, acc in hist]
    ends = [min((i + 1) * block_size, seqlen_k) for i in range(len(hist))]
    fig, axes = plt.subplots(1, 4, figsize=(13, 3))
    axes[0].bar(range(seqlen_k), logits.numpy(), color="#2b6cb0")
    for e in ends[:-1]:
        axes[0].axvline(e - 0.5, color="gray", linestyle=":", linewidth=1)
    axes[0].set(title=f"logits, blocks of {block_size}", xlabel="key j", ylabel="z_j")
    axes[1].step(ends, ms, where="post", marker="o")
    axes[1].axhline(float(logits.max()), color="k", linestyle=":", linewidth=1)
    axes[1].set(title="running max m", xlabel="keys seen", ylabel="m")
    axes[2].plot(ends, ls, marker="o")
    axes[2].set(title="running sum l = sum exp(z - m)", xlabel="keys seen", ylabel="l")
    for i in range(1, len(ms)):  # where the max rose, the old sum was rescaled before adding
        if ms[i] > ms[i - 1]:
            axes[1].annotate(
                "max rises",
                (ends[i], ms[i]),
                textcoords="offset points",
                xytext=(-10, -22),
                fontsize=10,
                color="crimson",
                arrowprops=dict(arrowstyle="->", color="crimson"),
            )
            axes[2].annotate(
                f"old l x e^(m-m') = x{math.exp(ms[i - 1] - ms[i]):.2f}",
                (ends[i], ls[i]),
                textcoords="offset points",
                xytext=(6, 16),
                fontsize=10,
                color="crimson",
                arrowprops=dict(arrowstyle="->", color="crimson"),
            )
    axes[3].plot(ends, outs, marker="o", label="running output")
    exact = float(torch.softmax(logits, 0) @ v[0, :, 0, 0])
    axes[3].axhline(exact, color="k", linestyle=":", linewidth=1, label="exact")
    axes[3].set(title="output = acc / l", xlabel="keys seen", ylabel="o (1-d value)")
    axes[3].legend(fontsize=10)
    fig.tight_layout()
    return fig, list(zip(ms, ls, outs, strict=True))


def online_softmax_explorer():
    """A widget: the block size of :func:`draw_online_softmax`."""
    import ipywidgets as widgets

    def redraw(block_size):
        draw_online_softmax(block_size)
        plt.show()

    return widgets.interactive(redraw, block_size=widgets.IntSlider(value=8, min=1, max=32, description="block size"))


# --- exercise 1: one block of the streaming normaliser ------------------------------------------


def my_online_update(m, l, block):
    """New ``(m, l)`` after a block of logits ``block (..., n)``: running max ``m (...)`` and
    running sum ``l = sum exp(x - m)``. ``-inf`` logits (masked keys) contribute nothing, and a
    row that has seen only ``-inf`` so far keeps ``m = -inf, l = 0``."""
    m_new = torch.maximum(m, block.max(-1).values)
    safe = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
    l_new = l * torch.exp(m - safe) + torch.exp(block - safe[..., None]).sum(-1)
    return m_new, l_new


def check_online_update(fn) -> bool | None:
    """Stream blocks through ``fn`` and compare ``(m, l)`` with :func:`online_normalizer`."""
    gen = torch.Generator().manual_seed(41)

    def case(label, x, block):
        def run(f):
            m = torch.full(x.shape[:-1], float("-inf"))
            l = torch.zeros(x.shape[:-1])
            for start in range(0, x.shape[-1], block):
                m, l = expect_pair("result", call_unchanged(f, m, l, x[..., start : start + block]))
            want_m, want_l, _ = online_normalizer(x, block)
            expect_close("running max m", want_m, m, atol=1e-5)
            expect_close("running sum l", want_l, l, atol=1e-4)

        return label, run

    growing = torch.arange(12.0).repeat(2, 1)
    masked = torch.randn(3, 10, generator=gen) * 4
    masked[0, :6] = float("-inf")
    masked[1] = float("-inf")
    late = torch.randn(2, 9, generator=gen) * 3
    late[:, 3:6] = float("-inf")  # a whole block of masked keys between visible ones
    return run_check(
        "check_online_update",
        fn,
        [
            case("random logits, blocks of 4", torch.randn(2, 3, 16, generator=gen) * 5, 4),
            case("a max that grows every block", growing, 3),
            case("masked keys and a fully masked row", masked, 4),
            case("large logits (1e3), one block", torch.randn(2, 5, generator=gen) * 1e3, 5),
            case("a fully masked block after finite ones", late, 3),
            case("blocks of 1, the last one partial", torch.randn(4, 7, generator=gen) * 3, 1),
            case("10 keys in blocks of 4 (a partial last block)", torch.randn(1, 10, generator=gen) * 2, 4),
        ],
        "growing maxima, masked keys and blocks, a fully masked row, partial blocks, large logits",
    )


# --- exercise 2: finishing a state -------------------------------------------------------------


def my_finalize(m, l, acc):
    """``(out, lse)`` from a running state: ``out = acc / l`` and ``lse = m + log(l)``; a row that
    saw no key (``l == 0``) gives ``out = 0`` and ``lse = +inf``, FlashAttention's convention.
    ``m, l`` are ``(rows,)``, ``acc`` is ``(rows, headdim)``."""
    empty = l == 0
    out = torch.where(empty[:, None], torch.zeros_like(acc), acc / torch.where(empty, 1.0, l)[:, None])
    lse = torch.where(empty, torch.full_like(m, float("inf")), m + torch.log(torch.where(empty, 1.0, l)))
    return out, lse


def check_finalize(fn) -> bool | None:
    """Running states from the oracle's own logits, with rows that saw nothing."""
    gen = torch.Generator().manual_seed(42)

    def case(label, n_empty):
        def run(f):
            q, k, v = (
                torch.randn(1, 6, 1, 8, generator=gen),
                torch.randn(1, 5, 1, 8, generator=gen),
                torch.randn(1, 5, 1, 8, generator=gen),
            )
            out_ref, lse_ref = attention_ref(q, k, v, causal=True, return_lse=True)  # rows 0.. see nothing
            z = torch.einsum("bihd,bjhd->bhij", q, k)[0, 0] * 8**-0.5
            keep = torch.arange(5)[None, :] <= torch.arange(6)[:, None] - 1
            z = z.masked_fill(~keep, float("-inf"))
            m = z.max(-1).values
            safe = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
            p = torch.exp(z - safe[:, None])
            l, acc = p.sum(-1), p @ v[0, :, 0]
            rows = slice(0, 6) if n_empty else slice(1, 6)
            out, lse = expect_pair("result", call_unchanged(f, m[rows].clone(), l[rows].clone(), acc[rows].clone()))
            expect_close("out", out_ref[0, rows, 0], out, atol=1e-5)
            expect_close("lse", lse_ref[0, 0, rows], lse, atol=1e-5)

        return label, run

    return run_check(
        "check_finalize",
        fn,
        [case("rows that all see keys", 0), case("row 0 sees no key", 1)],
        "out and lse, and 0 / +inf for a row that sees nothing",
    )


# --- exercise 3: merging two states -------------------------------------------------------------


def my_merge_states(out_a, lse_a, out_b, lse_b):
    """Merge states over disjoint key sets: ``out (batch, seqlen_q, nheads, headdim)``,
    ``lse (batch, nheads, seqlen_q)``; an empty side has ``lse = -inf`` or ``+inf`` (what
    attention_ref returns for a row that sees no key; its out is 0). Both empty: out 0, lse +inf."""
    # An empty side has lse -inf (no key yet) or +inf (FlashAttention's final form of an empty row).
    lse_a = lse_a.float().masked_fill(torch.isinf(lse_a), float("-inf"))
    lse_b = lse_b.float().masked_fill(torch.isinf(lse_b), float("-inf"))
    top = torch.maximum(lse_a, lse_b)
    top = torch.where(torch.isneginf(top), torch.zeros_like(top), top)
    wa, wb = torch.exp(lse_a - top), torch.exp(lse_b - top)
    total = wa + wb
    lse = torch.where(total == 0, torch.full_like(top, float("inf")), top + torch.log(total))
    norm = torch.where(total == 0, torch.ones_like(total), total)
    wa, wb = (wa / norm).transpose(1, 2)[..., None], (wb / norm).transpose(1, 2)[..., None]
    out = wa * torch.nan_to_num(out_a.float()) + wb * torch.nan_to_num(out_b.float())
    return out.to(out_a.dtype), lse


def check_merge_states(fn) -> bool | None:
    """``fn(out_a, lse_a, out_b, lse_b)`` against attention over all keys, for three split points
    and a merge with an empty state."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 3, 4, 8, generator=gen) * 3
    k = torch.randn(2, 10, 2, 8, generator=gen) * 3
    v = torch.randn(2, 10, 2, 8, generator=gen)

    def split(at, scale=1.0):
        def run(f):
            qs = q * scale
            out_a, lse_a = attention_ref(qs, k[:, :at], v[:, :at], return_lse=True)
            out_b, lse_b = attention_ref(qs, k[:, at:], v[:, at:], return_lse=True)
            want_out, want_lse = attention_ref(qs, k, v, return_lse=True)
            out, lse = expect_pair("result", call_unchanged(f, out_a, lse_a, out_b, lse_b))
            expect_close("out", want_out, out)
            expect_close("lse", want_lse, lse, atol=1e-4 * max(1.0, scale))

        big = f", logits scaled by {scale:g} (LSE in the hundreds)" if scale != 1 else ""
        return f"keys split at {at}{big}", run

    def empty_side(f, empty_lse):
        out_a, lse_a = attention_ref(q, k, v, return_lse=True)
        out_b, lse_b = torch.zeros_like(out_a), torch.full_like(lse_a, empty_lse)
        out, lse = expect_pair("result", call_unchanged(f, out_a, lse_a, out_b, lse_b))
        expect_close("out", out_a, out, atol=1e-5)
        expect_close("lse", lse_a, lse, atol=1e-5)

    def rows_empty_on_one_side(f):
        # Causal over the first 5 keys (3 queries: row i sees keys j <= i + 2), all of keys 5..8.
        qs, sq = q[:, :3], 3
        out_a, lse_a = attention_ref(qs, k[:, :5], v[:, :5], causal=True, return_lse=True)
        out_b, lse_b = attention_ref(qs, k[:, 5:9], v[:, 5:9], return_lse=True)
        keep = torch.ones(sq, 9, dtype=torch.bool)
        keep[:, :5] = torch.arange(5)[None, :] <= torch.arange(sq)[:, None] + 5 - sq
        kk, vv = k[:, :9].repeat_interleave(2, 2), v[:, :9].repeat_interleave(2, 2)
        z = (torch.einsum("bihd,bjhd->bhij", qs, kk) * 8**-0.5).masked_fill(~keep, float("-inf"))
        want_out = torch.einsum("bhij,bjhd->bihd", torch.softmax(z, -1), vv)
        out, lse = expect_pair("result", call_unchanged(f, out_a, lse_a, out_b, lse_b))
        expect_close("out", want_out, out, atol=1e-4)
        expect_close("lse", torch.logsumexp(z, -1), lse, atol=1e-4)

    def both_empty(f):
        out_a = torch.zeros(2, 3, 4, 8)
        lse_a = torch.full((2, 4, 3), float("inf"))
        out, lse = expect_pair(
            "result", call_unchanged(f, out_a, lse_a, out_a.clone(), torch.full_like(lse_a, -torch.inf))
        )
        expect_close("out", torch.zeros_like(out_a), out, atol=0)
        expect_close("lse", lse_a, lse, atol=0)

    def half_precision(f):
        out_a, lse_a = attention_ref(q.half(), k[:, :4].half(), v[:, :4].half(), return_lse=True)
        out_b, lse_b = attention_ref(q.half(), k[:, 4:].half(), v[:, 4:].half(), return_lse=True)
        want_out, want_lse = attention_ref(q.half(), k.half(), v.half(), return_lse=True)
        out, lse = expect_pair("result", call_unchanged(f, out_a, lse_a, out_b, lse_b))
        expect_dtype("out", torch.float16, out)
        expect_close("out", want_out.float(), out.float(), atol=2e-3)
        expect_close("lse", want_lse, lse, atol=1e-3)

    cases = [split(1), split(4), split(9), split(5, 40.0)]
    cases += [
        ("an empty side with lse = -inf", lambda f: empty_side(f, float("-inf"))),
        ("an empty side with lse = +inf (attention_ref's empty row)", lambda f: empty_side(f, float("inf"))),
        ("query rows that see no key on one side (causal)", rows_empty_on_one_side),
        ("both sides empty (out 0, lse +inf)", both_empty),
        ("fp16 outputs (kept fp16)", half_precision),
    ]
    return run_check(
        "check_merge_states",
        fn,
        cases,
        "3 split points, large logits, empty sides (-inf and +inf), fp16, inputs unchanged",
    )
