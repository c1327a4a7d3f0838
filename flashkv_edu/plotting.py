"""Pictures shared by the notebooks: masks as heatmaps, and widget wrappers around them."""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch
from matplotlib.colors import ListedColormap

from .reference import attention_mask, top_left_causal_mask

MASK_COLORS = ListedColormap(["#f2f2f2", "#2b6cb0"])  # hidden, visible


def show_mask(ax, mask: torch.Tensor, title: str, *, xlabel="key position j",
              ylabel="query row i") -> None:
    """Draw a bool ``(seqlen_q, seqlen_k)`` mask: blue = the query sees that key."""
    sq, sk = mask.shape
    ax.imshow(mask.int().numpy(), cmap=MASK_COLORS, vmin=0, vmax=1, aspect="equal")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xticks(range(sk))
    ax.set_yticks(range(sq))
    ax.set_xticks([x - 0.5 for x in range(1, sk)], minor=True)
    ax.set_yticks([y - 0.5 for y in range(1, sq)], minor=True)
    ax.grid(which="minor", color="white", linewidth=1)
    ax.tick_params(which="minor", length=0)


def draw_mask_panel(seqlen_q: int = 3, seqlen_k: int = 8, window_left: int = -1,
                    window_right: int = -1, causal: bool = True):
    """Three heatmaps side by side: PyTorch's top-left causal mask, FlashAttention's
    bottom-right mask for the chosen ``window_size``/``causal``, and their difference.
    Returns the figure (so a widget can redraw it) and the number of visible entries."""
    fa = attention_mask(seqlen_q, seqlen_k, causal=causal, window_size=(window_left, window_right))
    tl = top_left_causal_mask(seqlen_q, seqlen_k)
    fig, axes = plt.subplots(1, 3, figsize=(12, 2.2 + 0.35 * seqlen_q))
    show_mask(axes[0], tl, f"top-left causal (is_causal=True)\n{seqlen_q} queries, {seqlen_k} keys")
    window = f"window_size=({window_left}, {window_right})" + (", causal" if causal else "")
    show_mask(axes[1], fa, f"FlashAttention bottom-right\n{window}")
    show_mask(axes[2], fa ^ tl, "where they differ")
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
