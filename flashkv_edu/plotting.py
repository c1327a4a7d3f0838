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


def draw_window_trace(trace, window, title: str, ax=None):
    """Draw a :class:`~flashkv_edu.window_cache.Trace`: one row per update, one column per
    token position; dark = stored, light = seen but evicted, white = not yet seen."""
    total = max(trace.seen) if trace.seen else 1
    grid = torch.zeros(max(len(trace.seen), 1), total)
    for step, (seen, contents) in enumerate(zip(trace.seen, trace.contents, strict=True)):
        grid[step, :seen] = 1
        for pos in contents:
            if 0 <= pos < total:
                grid[step, pos] = 2
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 0.45 * grid.shape[0] + 1.2))
    ax.imshow(grid.numpy(), cmap=ListedColormap(["white", "#d9d9d9", "#2b6cb0"]), vmin=0, vmax=2,
              aspect="auto", interpolation="nearest")
    for step, stored in enumerate(trace.stored):
        ax.text(total - 0.4, step, f" {stored} stored", va="center", fontsize=8)
    if trace.error:
        ax.text(0, len(trace.seen) - 0.5 if trace.seen else 0, f"  stopped: {trace.error[:60]}",
                color="crimson", fontsize=8, va="center")
    ax.set(title=f"{title} (window W={window})", xlabel="token position", ylabel="update #",
           yticks=range(grid.shape[0]))
    ax.set_xlim(-0.5, total + 2.5)
    return ax


def window_stepper():
    """A widget: pick a cache (historical replica or the fix), the window and the chunk sizes,
    and watch which positions each update leaves stored."""
    import ipywidgets as widgets

    from .window_cache import ReplicaPre910, ReplicaV01, ReplicaV020, SlidingWindowCache, run_chunks

    caches = {"fixed SlidingWindowCache": SlidingWindowCache, "replica v0.1 (equality roll)": ReplicaV01,
              "replica v0.2.0 (roll drops context)": ReplicaV020, "replica v0.3-0.5 (stuck at W+1)": ReplicaPre910}

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


def draw_online_softmax(block_size: int = 8, seqlen_k: int = 32, seed: int = 0):
    """Stream one query over ``seqlen_k`` keys in blocks of ``block_size`` and plot the logits
    with block edges, then the running max ``m``, running sum ``l`` and running output after
    each block (output converges to the exact answer at the last block). Returns
    ``(fig, history)`` with history the ``(m, l, out)`` floats after each block."""
    from .online_softmax import blockwise_attention

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
    axes[3].plot(ends, outs, marker="o", label="running output")
    exact = float(torch.softmax(logits, 0) @ v[0, :, 0, 0])
    axes[3].axhline(exact, color="k", linestyle=":", linewidth=1, label="exact")
    axes[3].set(title="output = acc / l", xlabel="keys seen", ylabel="o (1-d value)")
    axes[3].legend(fontsize=8)
    fig.tight_layout()
    return fig, list(zip(ms, ls, outs, strict=True))


def online_softmax_explorer():
    """A widget: the block size of :func:`draw_online_softmax`."""
    import ipywidgets as widgets

    def redraw(block_size):
        draw_online_softmax(block_size)
        plt.show()

    return widgets.interactive(redraw, block_size=widgets.IntSlider(value=8, min=1, max=32, description="block size"))


def draw_tile_schedule(seqlen_q: int = 256, seqlen_k: int = 256, block_m: int = 32, block_n: int = 32,
                       causal: bool = True, window: int = 0):
    """Heatmap of :func:`flashkv_edu.kernels.forward.tile_schedule` for causal attention with an
    optional sliding window of ``window`` tokens (0 = none): which (query tile, key tile) pairs
    the forward kernel skips, visits fully visible, or visits partly masked. Returns
    ``(fig, visited, total)`` tile counts."""
    from .kernels.forward import tile_schedule

    window_size = (window - 1, 0) if window > 0 else (-1, -1)
    sched = tile_schedule(seqlen_q, seqlen_k, block_m, block_n, causal=causal, window_size=window_size)
    visited, total = int((sched > 0).sum()), sched.numel()
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    ax.imshow(sched.numpy(), cmap=ListedColormap(["#f2f2f2", "#2b6cb0", "#90cdf4"]), vmin=0, vmax=2,
              interpolation="nearest")
    what = ("causal" if causal else "no mask")
    if window:
        what += f", window W={window} = window_size=({window - 1}, 0)"
    ax.set(title=f"Tile schedule: {what}\nvisited {visited} of {total} tiles ({visited / total:.0%})",
           xlabel=f"key tile ({block_n} keys)", ylabel=f"query tile ({block_m} queries)")
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color="#2b6cb0", label="visited, all visible"),
                       Patch(color="#90cdf4", label="visited, partly masked"),
                       Patch(color="#f2f2f2", label="skipped by loop bounds")],
              loc="upper right", fontsize=7, framealpha=0.9)
    fig.tight_layout()
    return fig, visited, total


def tile_schedule_explorer():
    """A widget over sequence length, tile sizes, causal and window for :func:`draw_tile_schedule`."""
    import ipywidgets as widgets

    def redraw(seqlen, block, causal, window):
        draw_tile_schedule(seqlen, seqlen, block, block, causal, window)
        plt.show()

    return widgets.interactive(
        redraw,
        seqlen=widgets.IntSlider(value=256, min=32, max=1024, step=32, description="seqlen"),
        block=widgets.Dropdown(options=[16, 32, 64, 128], value=32, description="tile size"),
        causal=widgets.Checkbox(value=True, description="causal"),
        window=widgets.IntSlider(value=0, min=0, max=512, step=16, description="window W"),
    )


# --- notebook 06: paged KV cache -------------------------------------------------------------

SEQ_COLORS = ["#2b6cb0", "#dd6b20", "#38a169", "#805ad5", "#d53f8c", "#319795", "#b7791f", "#718096"]


def paged_snapshot(cache) -> dict:
    """What :func:`draw_paged_state` needs from a :class:`~flashkv_edu.paged.PagedKVCache`."""
    return {
        "block_size": cache.block_size,
        "num_blocks": cache.allocator.num_blocks,
        "ref_count": list(cache.allocator.ref_count),
        "cached": set(cache.allocator.hash_of),
        "seqs": {slot: (list(s.blocks), s.length) for slot, s in sorted(cache.seqs.items())},
    }


def draw_paged_state(snap: dict, title: str = "", names=None):
    """Left: each sequence's block table (logical block -> physical block id, fill level).
    Right: the physical pool, each block coloured by its owner (grey = free, hatched = shared
    by several sequences, outlined = free but still in the prefix cache)."""
    from matplotlib.patches import Rectangle

    bs, nb = snap["block_size"], snap["num_blocks"]
    names = names or {}
    fig, (ax_t, ax_p) = plt.subplots(1, 2, figsize=(12, 3.2), gridspec_kw={"width_ratios": [1, 1.3]})
    owner = {}
    for row, (slot, (blocks, length)) in enumerate(snap["seqs"].items()):
        color = SEQ_COLORS[slot % len(SEQ_COLORS)]
        for i, blk in enumerate(blocks):
            fill = min(bs, length - i * bs) / bs
            ax_t.add_patch(Rectangle((i, -row - 0.4), fill, 0.8, color=color, alpha=0.85))
            ax_t.add_patch(Rectangle((i, -row - 0.4), 1, 0.8, fill=False, edgecolor="black", linewidth=0.6))
            ax_t.text(i + 0.5, -row, str(blk), ha="center", va="center", fontsize=8, color="black")
            owner.setdefault(blk, []).append(slot)
    rows = max(1, len(snap["seqs"]))
    width = max([len(b) for b, _ in snap["seqs"].values()] + [4])
    ax_t.set_xlim(0, width)
    ax_t.set_xticks([i + 0.5 for i in range(width)])
    ax_t.set_xticklabels([str(i) for i in range(width)])
    ax_t.set_ylim(-rows + 0.4, 0.6)
    ax_t.set_yticks([-r for r in range(rows)])
    ax_t.set_yticklabels([names.get(s, f"seq {s}") for s in snap["seqs"]] or [""])
    ax_t.set(title="block tables: logical block -> physical id", xlabel="logical block")
    cols = 8
    for blk in range(nb):
        x, y = blk % cols, -(blk // cols)
        users = owner.get(blk, [])
        if users:
            color = SEQ_COLORS[users[0] % len(SEQ_COLORS)]
            ax_p.add_patch(Rectangle((x, y - 0.45), 0.9, 0.9, color=color, alpha=0.85,
                                     hatch="///" if len(users) > 1 else None))
        else:
            ax_p.add_patch(Rectangle((x, y - 0.45), 0.9, 0.9, color="#e2e8f0"))
            if blk in snap["cached"]:
                ax_p.add_patch(Rectangle((x, y - 0.45), 0.9, 0.9, fill=False, edgecolor="#2b6cb0", linewidth=1.5))
        label = f"{blk}" + (f"\nx{snap['ref_count'][blk]}" if snap["ref_count"][blk] > 1 else "")
        ax_p.text(x + 0.45, y, label, ha="center", va="center", fontsize=7)
    ax_p.set_xlim(0, cols)
    ax_p.set_ylim(-((nb - 1) // cols) - 0.6, 0.6)
    ax_p.set_xticks([])
    ax_p.set_yticks([])
    free = sum(1 for r in snap["ref_count"] if r == 0)
    ax_p.set(title=f"physical pool: {nb - free} used, {free} free (hatched: shared, xN: ref count)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def serving_trace(block_size: int = 4, num_blocks: int = 24):
    """A scripted serving trace on a small :class:`~flashkv_edu.paged.PagedKVCache`: requests
    arrive, grow, fork for parallel sampling (copy-on-write), finish, and a new request hits the
    prefix cache. Returns ``[(description, snapshot)]`` after each event, and the slot names."""
    from .paged import PagedKVCache

    cache = PagedKVCache(num_blocks, block_size, 1, 2, max_batch=6, max_blocks_per_seq=8)
    states, names = [], {}

    def kv(n):
        return torch.zeros(n, 1, 2), torch.zeros(n, 1, 2)

    def event(text):
        states.append((text, paged_snapshot(cache)))

    prompt_a = list(range(7))
    a, _ = cache.add_sequence(prompt_a)
    cache.append(a, *kv(7), tokens=prompt_a)
    names[a] = "A"
    event("A arrives: 7-token prompt -> 2 blocks")
    prompt_b = [9] * 10
    b, _ = cache.add_sequence(prompt_b)
    cache.append(b, *kv(10), tokens=prompt_b)
    names[b] = "B"
    event("B arrives: 10-token prompt -> 3 blocks")
    cache.append(a, *kv(1), tokens=[7])
    event("A decodes 1 token: fills its 2nd block")
    a2 = cache.fork(a)
    names[a2] = "A'"
    event("A forks into A' (parallel sampling): blocks shared, ref count 2")
    cache.append(a2, *kv(1), tokens=[8])
    event("A' decodes: needs a new block (its own)")
    cache.append(a, *kv(1), tokens=[11])
    event("A decodes: its own new block")
    for _ in range(3):
        cache.append(b, *kv(1), tokens=[9])
    event("B decodes 3 tokens: a 4th block")
    cache.free(b)
    del names[b]
    event("B finishes: blocks return to the free list (still cached)")
    c, hit = cache.add_sequence(prompt_b + [1, 2])
    cache.append(c, *kv(12 - hit), tokens=(prompt_b + [1, 2])[hit:])
    names[c] = "C"
    event(f"C arrives with B's prompt + 2 tokens: prefix cache hit on {hit} tokens")
    return states, names


def serving_trace_stepper():
    """A widget stepping through :func:`serving_trace`."""
    import ipywidgets as widgets

    states, names = serving_trace()

    def redraw(event):
        text, snap = states[event]
        draw_paged_state(snap, f"event {event}: {text}", names)
        plt.show()

    return widgets.interactive(redraw, event=widgets.IntSlider(value=0, min=0, max=len(states) - 1,
                                                                 description="event"))


# --- notebook 07: split-KV decode ------------------------------------------------------------

def draw_sm_timeline(batch: int = 1, nheads_k: int = 8, context: int = 32768, num_splits: int = 1,
                     gpu_name: str = "H100", headdim: int = 128):
    """SMs over time for one decode attention step under :func:`flashkv_edu.split.model_decode`:
    each program is a bar on its SM, programs run in waves. Returns ``(fig, model)``."""
    from .split import A100, H100, model_decode

    gpu = {"H100": H100, "A100": A100}[gpu_name]
    m = model_decode(batch, nheads_k, context, headdim, num_splits, gpu)
    per_program = m.modelled_s / m.waves
    fig, ax = plt.subplots(figsize=(9, 3.4))
    remaining = m.programs
    for w in range(m.waves):
        busy = min(gpu.num_sms, remaining)
        remaining -= busy
        ax.broken_barh([(w * per_program * 1e6, per_program * 1e6 * 0.97)], (0, busy), color="#2b6cb0")
        if busy < gpu.num_sms:
            ax.broken_barh([(w * per_program * 1e6, per_program * 1e6 * 0.97)], (busy, gpu.num_sms - busy),
                           color="#fed7d7")
    ax.axvline(m.roofline_s * 1e6, color="black", linestyle="--", linewidth=1)
    ax.text(m.roofline_s * 1e6, gpu.num_sms * 1.02, " roofline", fontsize=8)
    ax.set_ylim(0, gpu.num_sms * 1.1)
    ax.set_xlim(0, max(m.modelled_s, m.roofline_s) * 1e6 * 1.05)
    ax.set(title=f"{gpu.name}: batch {batch}, {nheads_k} KV heads, {context} tokens, {num_splits} split(s): "
                 f"{m.programs} programs, {m.waves} wave(s), {m.sm_utilization:.0%} of SMs busy",
           xlabel="time (us, modelled)", ylabel="SM (blue busy, red idle)")
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

    from .split import num_splits_heuristic

    chosen = num_splits_heuristic(batch_nheads_mblocks, num_sms, num_n_blocks, max_splits)
    top = min(max_splits, num_sms, num_n_blocks)
    xs, effs, ok = [], [], []
    for s in range(1, top + 1):
        w = batch_nheads_mblocks * s / num_sms
        xs.append(s)
        effs.append(w / math.ceil(w))
        ok.append(s == 1 or math.ceil(num_n_blocks / s) != math.ceil(num_n_blocks / (s - 1)))
    best = max(e for e, o in zip(effs, ok, strict=True) if o)
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.bar(xs, effs, color=["#2b6cb0" if o else "#cbd5e0" for o in ok])
    ax.axhline(0.85 * best, color="crimson", linestyle="--", linewidth=1, label="85% of the best")
    ax.bar([chosen], [effs[chosen - 1]], color="#dd6b20", label=f"chosen: {chosen} splits")
    ax.set(title=f"wave efficiency: {batch_nheads_mblocks} programs, {num_sms} slots, {num_n_blocks} key blocks "
                 "(grey: same chunk size as s-1)", xlabel="num_splits s", ylabel="eff(s) = w / ceil(w)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig, chosen
