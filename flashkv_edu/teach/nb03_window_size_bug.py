"""Notebook 03 (the window_size bug): its figures, its widget, and its exercises.

Exercises: ``my_window_update`` (one step of the fixed sliding-window cache) and the bug hunt
``window_cache_update`` (flash-linear-attention v0.3.1-v0.5.0 per-layer update, stuck at W + 1
tokens until PR #910).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch
from matplotlib.colors import ListedColormap

from flashkv_edu.window_cache import position_chunk, window_update

from .exercise import Exercise, call_unchanged, expect_equal, expect_pair, run_check

EXERCISES = [
    Exercise("03", "my_window_update", "check_window_update", 15),
    Exercise(
        "03",
        "window_cache_update",
        "check_window_cache_update",
        15,
        bug_hunt=True,
        source="https://github.com/fla-org/flash-linear-attention/pull/910",
    ),
]

# --- figures ---------------------------------------------------------------------------------


def draw_window_trace(trace, window, title: str, ax=None):
    """Draw a :class:`~flashkv_edu.window_cache.Trace`: one row per update, one column per
    token position. Dark blue = stored and returned to the new queries, orange = returned to
    the new queries but not stored, pale blue = stored but not returned, grey = seen and
    evicted, white = not yet seen. The new chunk's own positions are outlined."""
    from matplotlib.patches import Patch, Rectangle
    from matplotlib.ticker import MaxNLocator

    total = max(trace.seen) if trace.seen else 1
    grid = torch.zeros(max(len(trace.seen), 1), total)
    for step, (seen, contents) in enumerate(zip(trace.seen, trace.contents, strict=True)):
        grid[step, :seen] = 1
        visible = set(trace.visible[step]) if step < len(trace.visible) else set()
        stored = set(contents)
        for pos in stored | visible:
            if 0 <= pos < total:
                grid[step, pos] = 2 if pos in stored and pos in visible else (3 if pos in visible else 4)
    if ax is None:
        _, ax = plt.subplots(figsize=(10, 0.5 * grid.shape[0] + 1.8))
    colours = ["white", "#d9d9d9", "#2b6cb0", "#ed8936", "#90cdf4"]
    ax.imshow(grid.numpy(), cmap=ListedColormap(colours), vmin=0, vmax=4, aspect="auto", interpolation="nearest")
    for step in range(len(trace.seen)):
        first_new = trace.seen[step - 1] if step else 0
        ax.add_patch(
            Rectangle(
                (first_new - 0.5, step - 0.5),
                trace.seen[step] - first_new,
                1,
                fill=False,
                edgecolor="black",
                linewidth=1.2,
            )
        )
    for step, stored in enumerate(trace.stored):
        ax.text(total - 0.4, step, f" {stored} stored", va="center", fontsize=10)
    if trace.error:
        ax.text(
            0,
            len(trace.seen) - 0.5 if trace.seen else 0,
            f"  stopped: {trace.error[:60]}",
            color="crimson",
            fontsize=10,
            va="center",
        )
    ax.set(
        title=f"{title} (window W={window})", xlabel="token position", ylabel="update #", yticks=range(grid.shape[0])
    )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(-0.5, total + 2.5)
    legend = [
        Patch(color=colours[2], label="stored, seen by the new queries"),
        Patch(color=colours[3], label="seen by the new queries, not stored"),
        Patch(color=colours[4], label="stored, not seen by the new queries"),
        Patch(color=colours[1], label="evicted"),
        Patch(facecolor="white", edgecolor="black", label="the new chunk (the queries)"),
    ]
    ax.legend(handles=legend, fontsize=10, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.figure.tight_layout()
    return ax


def window_stepper():
    """A widget: pick a cache (historical replica or the fix), the window and the chunk sizes,
    and watch which positions each update leaves stored."""
    import ipywidgets as widgets

    from flashkv_edu.window_cache import ReplicaPre910, ReplicaV01, ReplicaV020, SlidingWindowCache, run_chunks

    caches = {
        "fixed SlidingWindowCache": SlidingWindowCache,
        "replica v0.1.x (equality roll)": ReplicaV01,
        "replica v0.2.0-0.2.1 (roll drops context)": ReplicaV020,
        "replica v0.3.1-0.5.0 (stuck at W+1)": ReplicaPre910,
    }

    def redraw(cache, window, chunks):
        try:
            sizes = [int(x) for x in chunks.replace(",", " ").split()]
        except ValueError:
            print("chunk sizes must be whole numbers, e.g. 3 2 1 1 6")
            return
        if not sizes or min(sizes) < 1:
            print("give at least one chunk size >= 1")
            return
        trace = run_chunks(caches[cache](), sizes, window)
        draw_window_trace(trace, window, cache)
        plt.show()

    return widgets.interactive(
        redraw,
        cache=widgets.Dropdown(options=list(caches), description="cache"),
        window=widgets.IntSlider(value=4, min=1, max=8, description="window W"),
        chunks=widgets.Text(value="3 2 1 1 6 1", description="chunk sizes"),
    )


def draw_replica_traces(runs: dict, doubling, correct, window: int):
    """Left: tokens stored per update for each replica and the fix. Right: a caller that
    re-appends the returned cache (doubling) against one that passes only new tokens.
    Returns the figure."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    for name, trace in runs.items():
        style = dict(color="black", linewidth=2.5) if name.startswith("fixed") else {}
        axes[0].plot(range(1, len(trace.stored) + 1), trace.stored, marker=".", label=name, **style)
    axes[0].axhline(window, color="gray", linestyle=":", linewidth=1, label=f"W = {window}")
    axes[0].set(title=f"Tokens stored per update, window W={window}", xlabel="update #", ylabel="tokens stored")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(fontsize=10)
    axes[1].semilogy(
        range(1, len(doubling.stored) + 1),
        doubling.stored,
        "o-",
        color="crimson",
        label="caller re-appends the returned cache",
    )
    axes[1].semilogy(
        range(1, len(correct.stored) + 1), correct.stored, "s-", color="black", label="caller passes only new tokens"
    )
    axes[1].set(title="Full attention (no window): a buggy caller", xlabel="update #", ylabel="tokens stored (log)")
    axes[1].legend(fontsize=10)
    fig.tight_layout()
    return fig


# --- exercise 1: one step of the fixed cache ----------------------------------------------------


def my_window_update(cached, new, window):
    """``(stored, visible)`` for ``(batch, seqlen, ...)`` tensors: ``stored`` = the last
    ``window`` tokens of ``cached + new``; ``visible`` = the last ``window - 1`` cached tokens
    followed by all of ``new`` (what the new queries may attend to)."""
    keep = min(window - 1, cached.shape[1])
    visible = torch.cat([cached[:, cached.shape[1] - keep :], new], 1)
    return visible[:, -window:].clone(), visible


def _positions(x):
    return x[0, :, 0, 0].long()


def _chunk(start: int, n: int) -> torch.Tensor:
    """Token positions ``start .. start+n-1`` as keys ``(2, n, 2, 2)``: batch row 1 holds the
    positions + 1000, so mixing up rows (or heads) shows."""
    x = position_chunk(start, n, nheads_k=2).repeat(2, 1, 1, 1).contiguous()
    x[1] += 1000
    return x


def check_window_update(fn) -> bool | None:
    """``fn(cached, new, window)`` against :func:`flashkv_edu.window_cache.window_update` on
    chunks below, at and above the window (tensors hold their token positions)."""

    def case(w, c, n):
        def run(f):
            cached, new = _chunk(0, c), _chunk(c, n)
            want = window_update(cached, new, w)
            got = expect_pair("result", call_unchanged(f, cached, new, w))
            expect_equal("positions stored", _positions(want[0]), _positions(got[0]))
            expect_equal("positions visible to the new queries", _positions(want[1]), _positions(got[1]))
            expect_equal("stored (both batch rows, every head)", want[0], got[0])
            expect_equal("visible (both batch rows, every head)", want[1], got[1])

        return f"window={w}, {c} cached, {n} new", run

    cases = [case(w, c, n) for w in (1, 3, 4) for c in (0, 1, 2, 3, 4, 7) for n in (1, 3, 4, 9) if c <= w]
    return run_check("check_window_update", fn, cases, f"{len(cases)} cases: chunks below, at and above the window")


# --- exercise 2 (bug hunt): stuck at W + 1 -------------------------------------------------------


def window_cache_update(stored, new, window):
    """The tokens a sliding-window layer keeps after ``new`` arrives: the last ``window`` of
    ``stored + new`` (sequence on dim 1)."""
    return torch.cat([stored, new], 1)[:, -window:]


def check_window_cache_update(fn) -> bool | None:
    """Feed chunk sequences through ``fn``; after every update the stored tokens must be exactly
    the ``window`` most recent positions."""

    def case(window, chunks):
        def run(f):
            stored = _chunk(0, 0)
            seen = 0
            for size in chunks:
                stored = call_unchanged(f, stored, _chunk(seen, size), window)
                seen += size
                want = torch.arange(max(0, seen - window), seen)
                expect_equal(f"positions stored after {seen} tokens", want, _positions(stored))
                expect_equal(
                    f"stored after {seen} tokens (both batch rows)",
                    _chunk(int(want[0]) if len(want) else 0, len(want)),
                    stored,
                )

        return f"window={window}, chunks {list(chunks)}", run

    cases = [case(4, (3, 2, 1, 1)), case(4, (1, 1, 1, 1, 1, 1)), case(3, (2, 5, 1)), case(5, (7, 2, 2))]
    cases += [case(1, (1, 1, 3)), case(4, (4, 1, 6))]
    return run_check("check_window_cache_update", fn, cases, "the cache always holds the last W positions")
