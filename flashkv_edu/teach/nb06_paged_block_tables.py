"""Notebook 06 (paged block tables): its figures, its widget, and its exercises.

Exercises: ``my_paged_rows`` (Triton: the block-id load that turns a key position into a row
of the page pool), ``blocks_to_append`` (how many blocks an append allocates, copy-on-write
included) and the bug hunt ``last_page_len`` (FlashInfer's page-table formula).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch

from flashkv_edu import runtime
from flashkv_edu.paged import PagedKVCache, gather_paged
from flashkv_edu.reference import attention_ref
from flashkv_edu.runtime import tl, triton

from .exercise import (
    CaseFailed,
    Exercise,
    MemoryRecord,
    call_unchanged,
    expect_dtype,
    expect_equal,
    expect_pair,
    expect_within,
    run_check,
)

EXERCISES = [
    Exercise("06", "my_paged_rows", "check_paged_rows", 20, triton=True),
    Exercise("06", "blocks_to_append", "check_blocks_to_append", 15),
    Exercise(
        "06",
        "last_page_len",
        "check_last_page_len",
        10,
        bug_hunt=True,
        source="https://github.com/flashinfer-ai/flashinfer/pull/2079",
    ),
]


def paged_attention_torch(q, k_cache, v_cache, block_table, cache_seqlens, **kwargs):
    """Decode attention over a paged cache in PyTorch: gather each sequence's pages into a
    dense tensor, then :func:`flashkv_edu.attention_ref` with ``seqlens_k=cache_seqlens``."""
    return attention_ref(
        q, gather_paged(k_cache, block_table), gather_paged(v_cache, block_table), seqlens_k=cache_seqlens, **kwargs
    )


# --- figures ---------------------------------------------------------------------------------

SEQ_COLORS = ["#2b6cb0", "#dd6b20", "#38a169", "#805ad5", "#d53f8c", "#319795", "#b7791f", "#718096"]


def paged_snapshot(cache) -> dict:
    """What :func:`draw_paged_state` needs from a :class:`~flashkv_edu.paged.PagedKVCache`."""
    return {
        "block_size": cache.block_size,
        "num_blocks": cache.allocator.num_blocks,
        "ref_count": list(cache.allocator.ref_count),
        "cached": set(cache.allocator.hash_of),
        "seqs": {slot: (list(s.blocks), s.length) for slot, s in sorted(cache.seqs.items())},
        "cow_copies": cache.cow_copies,
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
            ax_t.text(i + 0.5, -row, str(blk), ha="center", va="center", fontsize=10, color="black")
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
            ax_p.add_patch(
                Rectangle((x, y - 0.45), 0.9, 0.9, color=color, alpha=0.85, hatch="///" if len(users) > 1 else None)
            )
        else:
            ax_p.add_patch(Rectangle((x, y - 0.45), 0.9, 0.9, color="#e2e8f0"))
            if blk in snap["cached"]:
                ax_p.add_patch(Rectangle((x, y - 0.45), 0.9, 0.9, fill=False, edgecolor="#2b6cb0", linewidth=1.5))
        label = f"{blk}" + (f"\nx{snap['ref_count'][blk]}" if snap["ref_count"][blk] > 1 else "")
        ax_p.text(x + 0.45, y, label, ha="center", va="center", fontsize=10)
    ax_p.set_xlim(0, cols)
    ax_p.set_ylim(-((nb - 1) // cols) - 0.6, 0.6)
    ax_p.set_xticks([])
    ax_p.set_yticks([])
    free = sum(1 for r in snap["ref_count"] if r == 0)
    ax_p.set(title=f"physical pool: {nb - free} used, {free} free (xN: ref count)")
    from matplotlib.patches import Patch

    legend = [
        Patch(facecolor=SEQ_COLORS[0], alpha=0.85, label="in use (colour of its sequence)"),
        Patch(facecolor=SEQ_COLORS[0], alpha=0.85, hatch="///", label="shared by several sequences"),
        Patch(facecolor="#e2e8f0", label="free"),
        Patch(facecolor="#e2e8f0", edgecolor="#2b6cb0", linewidth=1.5, label="free, still in the prefix cache"),
    ]
    ax_p.legend(handles=legend, fontsize=10, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    return fig


def serving_trace(block_size: int = 4, num_blocks: int = 24):
    """A scripted serving trace on a small :class:`~flashkv_edu.paged.PagedKVCache`: requests
    arrive, grow, fork for parallel sampling (copy-on-write), finish, and a new request hits the
    prefix cache. Returns ``[(description, snapshot)]`` after each event, and the slot names."""
    from flashkv_edu.paged import PagedKVCache

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
    event("A arrives: 7-token prompt -> 2 blocks, the 2nd one 3/4 full")
    prompt_b = [9] * 10
    b, _ = cache.add_sequence(prompt_b)
    cache.append(b, *kv(10), tokens=prompt_b)
    names[b] = "B"
    event("B arrives: 10-token prompt -> 3 blocks")
    a2 = cache.fork(a)
    names[a2] = "A'"
    event("A forks into A' (parallel sampling): both blocks shared, ref count 2")
    cache.append(a2, *kv(1), tokens=[8])
    event("A' decodes into the shared, partly filled block: copy-on-write")
    cache.append(a, *kv(1), tokens=[7])
    event("A decodes: its 2nd block is its own again, no copy")
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

    return widgets.interactive(
        redraw, event=widgets.IntSlider(value=0, min=0, max=len(states) - 1, description="event")
    )


# --- notebook 07: split-KV decode ------------------------------------------------------------


def draw_reservation_vs_paging(finals, current, slots: int = 4096, max_len: int = 1024, block: int = 16):
    """Two bars of KV slots: requests reserved at ``max_len`` each (tokens, reserved, internal
    fragmentation) against pages of ``block`` tokens. Returns the figure."""
    fig, axes = plt.subplots(2, 1, figsize=(11, 2.8), sharex=True)
    x = 0
    for f, c in zip(finals, current, strict=True):
        axes[0].barh(0, c, left=x, color="#2b6cb0")
        axes[0].barh(0, f - c, left=x + c, color="#90cdf4")
        axes[0].barh(0, max_len - f, left=x + f, color="#feb2b2")
        x += max_len
    axes[0].set(
        title="contiguous, max-length reservation: tokens (dark), reserved (light), internal fragmentation (red)",
        yticks=[],
    )
    x = 0
    for c in current:
        blocks = -(-c // block) * block
        axes[1].barh(0, c, left=x, color="#2b6cb0")
        axes[1].barh(0, blocks - c, left=x + c, color="#feb2b2")
        x += blocks
    axes[1].barh(0, slots - x, left=x, color="#e2e8f0")
    axes[1].set(
        title=f"paged, blocks of {block}: tokens, last-block tails, and free memory other requests can use",
        yticks=[],
        xlabel="KV slots (tokens)",
    )
    fig.tight_layout()
    return fig


def draw_simulation(results, paper: dict):
    """The serving simulation: KV memory by use per scheme (the vLLM paper's token share as a
    black bar) and average concurrent requests. Returns the figure."""
    schemes = [r.scheme for r in results]
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6))
    bottom = torch.zeros(len(results))
    for name, color, label in [
        ("token_share", "#2b6cb0", "token states"),
        ("reserved_share", "#90cdf4", "reserved"),
        ("internal_share", "#feb2b2", "internal frag."),
        ("external_share", "#cbd5e0", "external frag. / free"),
    ]:
        vals = torch.tensor([getattr(r, name) * 100 for r in results])
        axes[0].bar(schemes, vals, bottom=bottom, color=color, label=label)
        bottom += vals
    for i, s in enumerate(schemes):
        if s in paper:
            axes[0].plot(i, paper[s][0], "k_", markersize=22, markeredgewidth=2)
    axes[0].set(title="KV memory by use (black bar: vLLM paper)", ylabel="% of KV memory")
    axes[0].tick_params(axis="x", rotation=30)
    axes[0].legend(fontsize=10, loc="lower right")
    axes[1].bar(schemes, [r.concurrent for r in results], color="#2b6cb0", label="this simulation")
    axes[1].scatter(
        [s for s in schemes if s in paper],
        [paper[s][1] for s in schemes if s in paper],
        color="black",
        zorder=3,
        label="vLLM paper",
    )
    axes[1].set(title="Average concurrent requests", ylabel="requests")
    axes[1].tick_params(axis="x", rotation=30)
    axes[1].legend(fontsize=10)
    fig.tight_layout()
    return fig


# --- exercise 1 (Triton): the block-id load ------------------------------------------------------

if runtime.HAS_TRITON:

    @triton.jit
    def my_paged_rows(K, BLOCK_TABLE, b, pos, col_ok, stride_btb, page_size, stride_kb, stride_ks):
        """Pointers to the key rows at positions ``pos`` (a ``[BLOCK_N]`` vector, valid where
        ``col_ok``) of sequence ``b``: page ``BLOCK_TABLE[b, pos // page_size]``, row
        ``pos % page_size`` of that page."""
        page = tl.load(BLOCK_TABLE + b * stride_btb + pos // page_size, mask=col_ok, other=0)
        return K + page.to(tl.int64) * stride_kb + (pos % page_size) * stride_ks

    @triton.jit
    def _paged_harness(
        K,
        BLOCK_TABLE,
        OUT,
        SEQLENS,
        stride_btb,
        page_size,
        stride_kb,
        stride_ks,
        stride_ob,
        stride_os,
        D: tl.constexpr,
        BLOCK_N: tl.constexpr,
        FN: tl.constexpr,
    ):
        b = tl.program_id(0)
        seqlen = tl.load(SEQLENS + b)
        dims = tl.arange(0, D)
        for start in range(0, seqlen, BLOCK_N):
            pos = start + tl.arange(0, BLOCK_N)
            col_ok = pos < seqlen
            rows = FN(K, BLOCK_TABLE, b, pos, col_ok, stride_btb, page_size, stride_kb, stride_ks)
            k = tl.load(rows[:, None] + dims[None, :], mask=col_ok[:, None], other=0.0)
            tl.store(OUT + b * stride_ob + pos[:, None] * stride_os + dims[None, :], k, mask=col_ok[:, None])

    @triton.jit
    def _paged_offsets_harness(
        K, BLOCK_TABLE, OFF, seqlen, b, stride_btb, page_size, stride_kb, stride_ks, BLOCK_N: tl.constexpr,
        FN: tl.constexpr,
    ):  # fmt: skip
        """Where ``FN`` points, as element offsets from ``K`` (int64), without reading ``K``: the
        pool's strides may describe a pool far larger than any test could allocate."""
        for start in range(0, seqlen, BLOCK_N):
            pos = start + tl.arange(0, BLOCK_N)
            col_ok = pos < seqlen
            rows = FN(K, BLOCK_TABLE, b, pos, col_ok, stride_btb, page_size, stride_kb, stride_ks)
            tl.store(OFF + pos, (rows.to(tl.int64) - K.to(tl.int64)) // 4, mask=col_ok)


def check_paged_rows(fn) -> bool | None:
    """Gather every sequence's keys through ``fn`` inside a small kernel and compare with
    :func:`flashkv_edu.paged.gather_paged`, for page sizes smaller and larger than the tile and
    block tables exactly as wide as the sequences need; block-table loads are recorded (a load
    past a sequence's pages fails). Then the pointers of a pool of 2^31 elements and more (its
    strides only, nothing allocated): the offsets must not overflow int32."""
    gen = torch.Generator().manual_seed(61)

    def case(page, lens, spare=0):
        def run(f):
            b, d = len(lens), 16
            max_blocks = max(-(-n // page) for n in lens) + spare
            pool = torch.randn(b * max_blocks + 3, page, 1, d, generator=gen)
            table = torch.randperm(pool.shape[0], generator=gen)[: b * max_blocks].view(b, max_blocks).int()
            seqlens = torch.tensor(lens, dtype=torch.int32)
            out = torch.zeros(b, max_blocks * page, 1, d)
            with MemoryRecord() as mem:
                _paged_harness[(b,)](
                    pool, table, out, seqlens, table.stride(0), page, pool.stride(0), pool.stride(1),
                    out.stride(0), out.stride(1), D=d, BLOCK_N=16, FN=f,
                )  # fmt: skip
            needed = torch.arange(max_blocks)[None, :] < torch.tensor([-(-n // page) for n in lens])[:, None]
            expect_within("block_table", mem, "loads", table, needed)
            if mem.available and mem.strays("loads", [pool, table, seqlens]):
                raise CaseFailed("a load read memory outside the pool and the block table: mask the block-table load")
            want = gather_paged(pool, table)
            for i, n in enumerate(lens):
                expect_equal(f"keys of sequence {i}", want[i, :n], out[i, :n])

        label = f"page size {page}, lengths {list(lens)}"
        return label + (f", {spare} spare table columns" if spare else ", a table exactly as wide as needed"), run

    def large_pool(f):
        page, d, seqlen = 16, 128, 40
        stride_ks = 8 * d  # 8 KV heads of 128 per row of a page
        stride_kb = page * stride_ks  # 16,384 elements per page
        table = torch.tensor([[200_000, 131_073, 7]], dtype=torch.int32)  # pages past 2^31 / 16,384
        off = torch.zeros(48, dtype=torch.int64)
        anchor = torch.zeros(1)  # K: only its address is used
        _paged_offsets_harness[(1,)](
            anchor, table, off, seqlen, 0, table.stride(0), page, stride_kb, stride_ks, BLOCK_N=16, FN=f
        )
        pos = torch.arange(seqlen)
        want = table[0, pos // page].long() * stride_kb + (pos % page) * stride_ks
        expect_equal("element offsets of the key rows (int64)", want, off[:seqlen])

    return run_check(
        "check_paged_rows",
        fn,
        [
            case(4, (9, 30), spare=4),
            case(1, (7,)),
            case(16, (16, 40, 3)),
            case(5, (23, 1)),
            case(4, (9, 30)),
            ("a pool of 3.3e9 elements (page 200,000 of 16,384 elements)", large_pool),
        ],
        "page sizes 1, 4, 5 and 16, shuffled and exact-width tables, block-table loads masked, 64-bit offsets",
    )


# --- exercise 2: blocks for an append ------------------------------------------------------------


def blocks_to_append(length, n, block_size, last_block_shared):
    """``(new_blocks, copy_last)`` for appending ``n`` tokens to a sequence of ``length``
    tokens: the blocks to allocate, and whether its last, partly filled block is shared with a
    fork and must be copied first (the copy needs a block of its own)."""
    have = -(-length // block_size)
    total = -(-(length + n) // block_size)
    copy_last = n > 0 and length % block_size != 0 and last_block_shared
    return total - have + int(copy_last), copy_last


def check_blocks_to_append(fn) -> bool | None:
    """Against a real :class:`~flashkv_edu.paged.PagedKVCache`: blocks taken from the pool and
    copy-on-write copies made by ``reserve``."""

    def case(length, n, bs, shared):
        def run(f):
            cache = PagedKVCache(64, bs, 1, 2, max_batch=2, max_blocks_per_seq=32)
            slot, _ = cache.add_sequence()
            cache.reserve(slot, length)
            if shared:
                cache.fork(slot)
            free, copies = cache.allocator.num_free, cache.cow_copies
            cache.reserve(slot, n)
            want = (free - cache.allocator.num_free, cache.cow_copies - copies == 1)
            got = expect_pair("result", f(length, n, bs, shared))
            expect_equal("(new_blocks, copy_last)", want, (int(got[0]), bool(got[1])))

        return f"length={length}, n={n}, block_size={bs}, shared={shared}", run

    cases = [
        case(0, 5, 4, False),
        case(3, 1, 4, False),
        case(4, 1, 4, False),
        case(6, 7, 4, False),
        case(6, 1, 4, True),
        case(8, 3, 4, True),
        case(5, 0, 4, True),
        case(17, 40, 16, True),
        case(0, 0, 4, False),
        case(3, 5, 1, True),
        case(16, 1, 16, True),
        case(7, 9, 8, True),
    ]
    return run_check("check_blocks_to_append", fn, cases, "empty, partial, full and shared last blocks, pages of 1")


# --- exercise 3 (bug hunt): the last page's length -----------------------------------------------


def last_page_len(kv_lens, page_size):
    """Tokens in each sequence's last page (FlashInfer's ``kv_last_page_len``), for int32
    ``kv_lens >= 1``: between 1 and ``page_size``."""
    return ((kv_lens - 1) % page_size + 1).to(torch.int32)


def check_last_page_len(fn) -> bool | None:
    """Full pages plus the last page must add up to each length, a last page is never empty, the
    result is int32 (FlashInfer's ``kv_last_page_len`` is an int32 tensor), and ``kv_lens`` comes
    back unchanged."""

    def case(page, lens):
        def run(f):
            kv = torch.tensor(lens, dtype=torch.int32)
            pages = -(-kv // page)
            want = kv - (pages - 1) * page
            got = call_unchanged(f, kv, page)
            expect_dtype("kv_last_page_len", torch.int32, got)
            for i, n in enumerate(lens):
                if not 1 <= int(got[i]) <= page or int(got[i]) != int(want[i]):
                    raise CaseFailed(
                        f"a sequence of {n} tokens in pages of {page} fills {int(pages[i])} pages, "
                        f"the last holding {int(want[i])} tokens; got {int(got[i])}"
                    )

        return f"page size {page}, lengths {lens}", run

    return run_check(
        "check_last_page_len",
        fn,
        [
            case(16, [1, 15, 17, 40]),
            case(16, [16, 32, 48]),
            case(1, [1, 5]),
            case(4, [3, 4, 5, 8]),
            case(256, [255, 256, 257]),
        ],
        "lengths below, at and above page boundaries; int32, kv_lens unchanged",
    )
