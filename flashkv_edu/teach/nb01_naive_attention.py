"""Notebook 01 (naive attention): its figures, its widget, and its exercises.

Exercises: ``my_gqa_attention`` (query heads sharing KV heads), ``my_bottom_right_mask``
(FlashAttention's causal mask), and the bug hunt ``window_size_for`` (transformers'
``sliding_window=W`` handed to FlashAttention as ``(W, 0)``).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch
from matplotlib.colors import ListedColormap

from flashkv_edu.reference import attention_mask, attention_ref, top_left_causal_mask

from .exercise import CaseFailed, Exercise, call_unchanged, expect_close, expect_dtype, expect_equal, run_check

EXERCISES = [
    Exercise("01", "my_gqa_attention", "check_gqa_attention", 15),
    Exercise("01", "my_bottom_right_mask", "check_bottom_right_mask", 10),
    Exercise(
        "01",
        "window_size_for",
        "check_window_size_for",
        10,
        bug_hunt=True,
        source="https://github.com/huggingface/transformers/issues/29623",
    ),
]

# --- figures ---------------------------------------------------------------------------------

MASK_COLORS = ListedColormap(["#f2f2f2", "#2b6cb0"])  # hidden, visible


DIFF_COLORS = ListedColormap(["#f2f2f2", "#e53e3e"])  # same, different


def show_mask(ax, mask: torch.Tensor, title: str, *, xlabel="key position j", ylabel="query row i", cmap=None) -> None:
    """Draw a bool ``(seqlen_q, seqlen_k)`` mask: blue = the query sees that key (or True in
    ``cmap``'s second colour)."""
    sq, sk = mask.shape
    ax.imshow(mask.int().numpy(), cmap=cmap or MASK_COLORS, vmin=0, vmax=1, aspect="equal")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xticks(range(sk))
    ax.set_yticks(range(sq))
    ax.set_xticks([x - 0.5 for x in range(1, sk)], minor=True)
    ax.set_yticks([y - 0.5 for y in range(1, sq)], minor=True)
    ax.grid(which="minor", color="white", linewidth=1)
    ax.tick_params(which="minor", length=0)


def draw_mask_panel(
    seqlen_q: int = 3, seqlen_k: int = 8, window_left: int = -1, window_right: int = -1, causal: bool = True
):
    """Three heatmaps side by side: PyTorch's top-left causal mask, FlashAttention's
    bottom-right mask for the chosen ``window_size``/``causal``, and their difference.
    Returns the figure (so a widget can redraw it) and the number of visible entries."""
    fa = attention_mask(seqlen_q, seqlen_k, causal=causal, window_size=(window_left, window_right))
    tl = top_left_causal_mask(seqlen_q, seqlen_k)
    fig, axes = plt.subplots(1, 3, figsize=(12, 2.2 + 0.35 * seqlen_q))
    show_mask(axes[0], tl, f"top-left causal (is_causal=True)\n{seqlen_q} queries, {seqlen_k} keys")
    window = f"window_size=({window_left}, {window_right})" + (", causal" if causal else "")
    show_mask(axes[1], fa, f"FlashAttention bottom-right\n{window}")
    show_mask(axes[2], fa ^ tl, "where they differ", cmap=DIFF_COLORS)
    from matplotlib.patches import Patch

    legend = [
        Patch(color=MASK_COLORS(1), label="visible"),
        Patch(color=MASK_COLORS(0), label="hidden"),
        Patch(color=DIFF_COLORS(1), label="the two masks disagree"),
    ]
    axes[2].legend(handles=legend, fontsize=10, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    return fig, int(fa.sum())


def mask_explorer():
    """An ipywidgets explorer over seqlen_q, seqlen_k, window and causal for
    :func:`draw_mask_panel`."""
    import ipywidgets as widgets

    def redraw(seqlen_q, seqlen_k, window_left, window_right, causal):
        fig, _ = draw_mask_panel(seqlen_q, seqlen_k, window_left, window_right, causal)
        plt.show()

    return widgets.interactive(
        redraw,
        seqlen_q=widgets.IntSlider(value=3, min=1, max=12, description="seqlen_q"),
        seqlen_k=widgets.IntSlider(value=8, min=1, max=16, description="seqlen_k"),
        window_left=widgets.IntSlider(value=-1, min=-1, max=12, description="window left"),
        window_right=widgets.IntSlider(value=-1, min=-1, max=12, description="window right"),
        causal=widgets.Checkbox(value=True, description="causal"),
    )


def draw_window_softcap_alibi(win: torch.Tensor, window: int, slopes: torch.Tensor):
    """Three panels: a sliding-window mask, the softcap curve for two caps, and head 0's ALiBi
    bias over 8 x 8 positions. Returns the figure."""
    from flashkv_edu.reference import alibi_bias

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    show_mask(axes[0], win, f"sliding window W={window}: window_size=({window - 1}, 0)")
    z = torch.linspace(-30, 30, 200)
    for cap in (5.0, 15.0):
        axes[1].plot(z, cap * torch.tanh(z / cap), label=f"softcap c={cap:g}")
    axes[1].plot(z, z, "k--", linewidth=0.8, label="no softcap")
    axes[1].set(title="softcap: z -> c tanh(z / c)", xlabel="scaled logit z", ylabel="capped logit")
    axes[1].legend()
    bias = alibi_bias(slopes, 8, 8)[0, 0]
    im = axes[2].imshow(bias.numpy(), cmap="viridis")
    axes[2].set(title=f"ALiBi bias, head 0 (slope {slopes[0]:g})", xlabel="key position j", ylabel="query row i")
    fig.colorbar(im, ax=axes[2], label="bias added to the logit")
    fig.tight_layout()
    return fig


# --- exercise 1: attention with shared KV heads ---------------------------------------------


def my_gqa_attention(q, k, v):
    """Unmasked attention for ``q (b, s_q, h, d)`` and ``k, v (b, s_k, h_k, d)``, ``h_k`` dividing
    ``h``: query head ``i`` reads KV head ``i // (h // h_k)``."""
    group = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * q.shape[-1] ** -0.5
    return torch.einsum("bhij,bjhd->bihd", torch.softmax(scores, dim=-1), v)


def check_gqa_attention(fn) -> bool | None:
    """``fn(q, k, v)`` against the oracle: MHA, GQA and MQA, one query and one key, a batch of one,
    logits large enough to overflow ``exp`` (a softmax must subtract the row maximum), fp16 and bf16
    inputs (the output keeps q's dtype); the caller's tensors must come back unchanged."""
    gen = torch.Generator().manual_seed(1)

    def case(h, hk, b=2, sq=5, sk=7, d=16, scale=1.0, dtype=torch.float32):
        def run(f):
            q = (torch.randn(b, sq, h, d, generator=gen) * scale).to(dtype)
            k = (torch.randn(b, sk, hk, d, generator=gen) * scale).to(dtype)
            v = torch.randn(b, sk, hk, d, generator=gen).to(dtype)
            got = call_unchanged(f, q, k, v)
            expect_dtype("output", dtype, got)
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            expect_close("output", attention_ref(q, k, v, compute_dtype=torch.float32).float(), got.float(), atol=tol)

        label = f"nheads={h}, nheads_k={hk}, batch={b}, seqlen_q={sq}, seqlen_k={sk}"
        if scale != 1.0:
            label += f", inputs x{scale:g} (logits in the thousands)"
        if dtype != torch.float32:
            label += f", {dtype}"
        return label, run

    cases = [case(4, 4), case(6, 2), case(6, 3), case(8, 1), case(4, 2, b=1, sq=1, sk=1), case(2, 1, scale=30.0)]
    cases += [case(4, 2, dtype=torch.float16), case(4, 2, dtype=torch.bfloat16)]
    return run_check(
        "check_gqa_attention",
        fn,
        cases,
        "MHA, GQA and MQA match attention_ref within 1e-4, huge logits, fp16/bf16 kept, inputs unchanged",
    )


# --- exercise 2: the bottom-right causal mask ------------------------------------------------


def my_bottom_right_mask(seqlen_q, seqlen_k):
    """Bool ``(seqlen_q, seqlen_k)``: query row ``i`` sees key ``j`` when ``j <= i + seqlen_k - seqlen_q``."""
    i = torch.arange(seqlen_q)[:, None]
    j = torch.arange(seqlen_k)[None, :]
    return j <= i + seqlen_k - seqlen_q


def check_bottom_right_mask(fn) -> bool | None:
    """``fn(seqlen_q, seqlen_k)`` must return FlashAttention's bottom-right causal mask, as a bool
    tensor of that shape."""

    def case(sq, sk):
        def run(f):
            got = f(sq, sk)
            expect_dtype("mask", torch.bool, got)
            expect_equal("mask", attention_mask(sq, sk, causal=True), got)

        return f"seqlen_q={sq}, seqlen_k={sk}", run

    shapes = [(1, 1), (1, 7), (2, 5), (5, 2), (4, 4), (3, 9), (9, 3), (6, 1), (1, 16), (16, 16)]
    return run_check(
        "check_bottom_right_mask",
        fn,
        [case(sq, sk) for sq, sk in shapes],
        "10 shapes, including seqlen_q > seqlen_k, as bool tensors",
    )


# --- exercise 3 (bug hunt): transformers' sliding_window handed to FlashAttention ------------


def window_size_for(sliding_window):
    """FlashAttention's ``window_size`` for a transformers config with ``sliding_window = W``:
    each query sees the ``W`` most recent tokens, itself included."""
    return (sliding_window - 1, 0)


def check_window_size_for(fn) -> bool | None:
    """With ``fn(W)`` as ``window_size`` (causal), the last query must see exactly the ``W``
    most recent keys, every other query the ``W`` most recent up to itself."""

    def case(w, sq, sk):
        def run(f):
            window = f(w)
            if not isinstance(window, (tuple, list)) or len(window) != 2:
                raise CaseFailed(f"return a pair (left, right), got {window!r}")
            window = tuple(window)  # FlashAttention takes a tuple or a list
            got = attention_mask(sq, sk, causal=True, window_size=window)
            i = torch.arange(sq)[:, None] + sk - sq
            j = torch.arange(sk)[None, :]
            want = (j <= i) & (j > i - w)
            if not torch.equal(got, want):
                row = int((got != want).any(1).nonzero()[0])
                raise CaseFailed(
                    f"query row {row} should see keys {want[row].nonzero().flatten().tolist()}, "
                    f"with window_size={window} it sees {got[row].nonzero().flatten().tolist()}"
                )

        return f"sliding_window={w}, {sq} queries over {sk} keys", run

    return run_check(
        "check_window_size_for",
        fn,
        [case(4, 1, 9), case(1, 1, 5), case(1, 4, 4), case(3, 4, 8), case(6, 6, 6), case(10, 3, 5)],
        "a W-token window is window_size=(W-1, 0)",
    )
