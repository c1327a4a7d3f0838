"""Notebook 07 (split-KV decode): its figures, its widget, and its Triton exercises.

Exercises, all ``@triton.jit``: ``my_split_range`` (the keys one split covers),
``my_finish_split`` (a split's partial state, the LSE of an empty split included) and
``my_combine_kernel`` (the kernel that merges the splits).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch

from flashkv_edu import runtime
from flashkv_edu.online_softmax import merge_many
from flashkv_edu.runtime import tl, triton

from .exercise import CaseFailed, Exercise, MemoryRecord, expect_close, expect_equal, expect_within, run_check

EXERCISES = [
    Exercise("07", "my_split_range", "check_split_range", 10, triton=True),
    Exercise("07", "my_finish_split", "check_finish_split", 15, triton=True),
    Exercise("07", "my_combine_kernel", "check_combine_kernel", 25, triton=True),
]

# --- figures ---------------------------------------------------------------------------------


def draw_sm_timeline(
    batch: int = 1,
    nheads_k: int = 8,
    context: int = 32768,
    num_splits: int = 1,
    gpu_name: str = "H100",
    headdim: int = 128,
    time_max_us: float | None = None,
):
    """SMs over time for one decode attention step under :func:`flashkv_edu.split.model_decode`:
    each program is a bar on its SM, programs run in waves. ``time_max_us`` fixes the time
    axis, so that two figures can be compared on one scale. Returns ``(fig, model)``."""
    from flashkv_edu.split import A100, H100, model_decode

    gpu = {"H100": H100, "A100": A100}[gpu_name]
    m = model_decode(batch, nheads_k, context, headdim, num_splits, gpu)
    per_program = m.modelled_s / m.waves
    fig, ax = plt.subplots(figsize=(10, 3.8))
    remaining = m.programs
    for w in range(m.waves):
        busy = min(gpu.num_sms, remaining)
        remaining -= busy
        ax.broken_barh([(w * per_program * 1e6, per_program * 1e6 * 0.97)], (0, busy), color="#2b6cb0")
        if busy < gpu.num_sms:
            ax.broken_barh(
                [(w * per_program * 1e6, per_program * 1e6 * 0.97)], (busy, gpu.num_sms - busy), color="#fed7d7"
            )
    ax.axvline(m.roofline_s * 1e6, color="black", linestyle="--", linewidth=1)
    ax.text(m.roofline_s * 1e6, gpu.num_sms * 1.02, " roofline", fontsize=10)
    ax.set_ylim(0, gpu.num_sms * 1.1)
    ax.set_xlim(0, (time_max_us or max(m.modelled_s, m.roofline_s) * 1e6) * 1.05)
    ax.set(
        title=f"{gpu.name}: batch {batch}, {nheads_k} KV heads, {context} tokens, {num_splits} split(s): "
        f"{m.programs} programs, {m.waves} wave(s), {m.sm_utilization:.0%} of SMs busy",
        xlabel="time (us, modelled)",
        ylabel="SM (blue busy, red idle)",
    )
    fig.tight_layout()
    return fig, m


def sm_timeline_explorer():
    """A widget over batch, KV heads, context length, splits and GPU for :func:`draw_sm_timeline`."""
    import ipywidgets as widgets

    def redraw(batch, nheads_k, context_k, num_splits, gpu):
        draw_sm_timeline(batch, nheads_k, context_k * 1024, num_splits, gpu)
        plt.show()

    return widgets.interactive(
        redraw,
        batch=widgets.IntSlider(value=1, min=1, max=64, description="batch"),
        nheads_k=widgets.Dropdown(options=[1, 2, 4, 8, 32], value=8, description="KV heads"),
        context_k=widgets.IntSlider(value=32, min=1, max=128, description="context (K)"),
        num_splits=widgets.IntSlider(value=1, min=1, max=128, description="splits"),
        gpu=widgets.Dropdown(options=["H100", "A100"], value="H100", description="GPU"),
    )


def draw_split_efficiency(batch_nheads_mblocks: int, num_sms: int, num_n_blocks: int, max_splits: int = 128):
    """FlashAttention 2's wave efficiency ``eff(s)`` for every split count (ineligible ones grey),
    the 85%-of-best line, and the chosen split count. Returns ``(fig, chosen)``."""
    import math

    from flashkv_edu.split import num_splits_heuristic

    chosen = num_splits_heuristic(batch_nheads_mblocks, num_sms, num_n_blocks, max_splits)
    top = min(max_splits, num_sms, num_n_blocks)
    xs, effs, ok = [], [], []
    for s in range(1, top + 1):
        w = batch_nheads_mblocks * s / num_sms
        xs.append(s)
        effs.append(w / math.ceil(w))
        ok.append(s == 1 or math.ceil(num_n_blocks / s) != math.ceil(num_n_blocks / (s - 1)))
    best = max(e for e, o in zip(effs, ok, strict=True) if o)
    fig, ax = plt.subplots(figsize=(10, 3.6))
    ax.bar(xs, effs, color=["#2b6cb0" if o else "#cbd5e0" for o in ok])
    ax.axhline(0.85 * best, color="crimson", linestyle="--", linewidth=1, label="85% of the best")
    ax.bar([chosen], [effs[chosen - 1]], color="#dd6b20", label=f"chosen: {chosen} splits")
    ax.set(
        title=f"wave efficiency: {batch_nheads_mblocks} programs, {num_sms} slots, {num_n_blocks} key blocks "
        "(grey: same chunk size as s-1)",
        xlabel="num_splits s",
        ylabel="eff(s) = w / ceil(w)",
    )
    ax.legend(fontsize=10)
    fig.tight_layout()
    return fig, chosen


if runtime.HAS_TRITON:
    # --- solutions --------------------------------------------------------------------------------

    # The package's own kernel pieces are the solutions: the solved notebook shows their source.
    from ..kernels.combine import combine_kernel as my_combine_kernel  # noqa: F401
    from ..kernels.decode import finish_split as my_finish_split  # noqa: F401
    from ..kernels.decode import split_range as my_split_range  # noqa: F401

    # --- harness kernels ---------------------------------------------------------------------------

    @triton.jit
    def _split_range_harness(LO, HI, split_size, seqlen_k, FN: tl.constexpr):
        split = tl.program_id(0)
        lo, hi = FN(split, split_size, seqlen_k)
        tl.store(LO + split, (lo + split * 0).to(tl.int32))
        tl.store(HI + split, (hi + split * 0).to(tl.int32))

    @triton.jit
    def _finish_harness(M, L, ACC, OUT, LSE, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, FN: tl.constexpr):
        r = tl.arange(0, BLOCK_M)
        d = tl.arange(0, BLOCK_D)
        out, lse = FN(tl.load(M + r), tl.load(L + r), tl.load(ACC + r[:, None] * BLOCK_D + d[None, :]))
        tl.store(OUT + r[:, None] * BLOCK_D + d[None, :], out)
        tl.store(LSE + r, lse)


def check_split_range(fn) -> bool | None:
    """Each split's ``(lo, hi)`` for caches that fill all splits and that leave some empty."""

    def case(splits, size, sk):
        def run(f):
            lo, hi = torch.zeros(splits, dtype=torch.int32), torch.zeros(splits, dtype=torch.int32)
            _split_range_harness[(splits,)](lo, hi, size, sk, FN=f)
            for s in range(splits):
                a, b = s * size, min(sk, (s + 1) * size)
                if a >= sk:
                    if min(int(hi[s]), sk) > int(lo[s]):
                        raise CaseFailed(
                            f"split {s} starts at key {a}, past the {sk} keys: it must be empty, got "
                            f"[{int(lo[s])}, {int(hi[s])})"
                        )
                    continue
                expect_equal(f"split {s}'s range", (a, b), (int(lo[s]), int(hi[s])))

        return f"{splits} splits of {size} keys over {sk} keys", run

    return run_check(
        "check_split_range",
        fn,
        [case(4, 32, 128), case(4, 32, 100), case(8, 64, 70), case(3, 16, 1), case(1, 64, 64), case(5, 16, 33)],
        "full, ragged and empty splits",
    )


def check_finish_split(fn) -> bool | None:
    """Partial states from random running sums, with rows that saw no key in the split."""
    gen = torch.Generator().manual_seed(71)

    def case(empty_rows):
        def run(f):
            m = torch.randn(16, generator=gen) * 3
            l = torch.rand(16, generator=gen) + 0.5
            acc = torch.randn(16, 16, generator=gen)
            m[empty_rows], l[empty_rows], acc[empty_rows] = float("-inf"), 0.0, 0.0
            out, lse = torch.full((16, 16), float("nan")), torch.full((16,), float("nan"))
            _finish_harness[(1,)](m, l, acc, out, lse, BLOCK_M=16, BLOCK_D=16, FN=f)
            want_out = torch.where(l[:, None] > 0, acc / l.clamp_min(1e-30)[:, None], 0.0)
            want_lse = torch.where(l > 0, m + torch.log(l.clamp_min(1e-30)), float("-inf"))
            expect_close("out", want_out, out, atol=1e-5)
            expect_close("lse", want_lse, lse, atol=1e-5)

        return f"empty rows {empty_rows}", run

    return run_check(
        "check_finish_split",
        fn,
        [case([]), case([0, 5]), case(list(range(16))), case([15])],
        "full rows, some empty rows and an all-empty split (lse -inf)",
    )


def check_combine_kernel(kernel) -> bool | None:
    """Partial states of the package's split decode kernel (empty splits, rows with no key,
    large logits, several query tokens, a head dim below the tile) merged by ``kernel`` against
    notebook 04's ``merge_many``. The output sits in a guard band and the loads are recorded:
    nothing outside the head dim may be read or written."""
    from flashkv_edu.kernels.decode import decode_attention_triton

    gen = torch.Generator().manual_seed(72)

    def case(label, lens, splits, scale, sq=1, d=16):
        def run(f):
            b = len(lens)
            kc = torch.randn(b, 70, 1, d, generator=gen) * scale
            q = torch.randn(b, sq, 4, d, generator=gen) * scale
            seqlens = torch.tensor(lens, dtype=torch.int32)
            _, _, o_part, l_part = decode_attention_triton(
                q, kc, kc, seqlens, causal=sq > 1, num_splits=splits, return_lse=True, return_partials=True
            )
            want_out, want_lse = merge_many(o_part, l_part)
            n, _, _, h, _ = o_part.shape
            band = torch.full((b * sq * h * d + 64,), float("nan"))  # the output, then a guard band
            out = band[: b * sq * h * d].view(b, sq, h, d)
            lse = torch.full((b, h, sq), float("nan"))
            with MemoryRecord() as mem:
                f[(b * sq * h,)](
                    o_part, l_part, out, lse, o_part.stride(0), o_part.stride(1), o_part.stride(2), o_part.stride(3),
                    l_part.stride(0), l_part.stride(1), l_part.stride(2), out.stride(0), out.stride(1), out.stride(2),
                    lse.stride(0), lse.stride(1), n, h, sq, d, BLOCK_S=max(2, triton.next_power_of_2(n)),
                    BLOCK_D=max(16, triton.next_power_of_2(d)),
                )  # fmt: skip
            expect_within("out_partial", mem, "loads", o_part, torch.ones(o_part.shape, dtype=torch.bool))
            if mem.available and mem.strays("loads", [o_part, l_part]):
                raise CaseFailed("a load read memory outside the partial states: mask the head dim (d < BLOCK_D)")
            if not bool(band[b * sq * h * d :].isnan().all()):
                raise CaseFailed("a store wrote past the output's last element: mask the head dim (d < BLOCK_D)")
            expect_close("lse", want_lse, lse, atol=1e-4)
            expect_close("out", want_out, out, atol=1e-4)

        return label, run

    cases = [
        case("2 splits, both full", [70, 64], 2, 1.0),
        case("5 splits, sequence 2 leaves some empty", [70, 9], 5, 1.0),
        case("a sequence with no keys (all splits empty)", [40, 0], 3, 1.0),
        case("large logits (LSE in the hundreds)", [70, 33], 4, 12.0),
        case("3 query tokens per sequence (causal)", [70, 21], 4, 1.0, sq=3),
        case("head dim 12 in a tile of 16", [50, 70], 3, 1.0, d=12),
    ]
    return run_check(
        "check_combine_kernel",
        kernel,
        cases,
        "full, empty and all-empty splits, large logits, several query tokens, head dim below the tile",
    )
