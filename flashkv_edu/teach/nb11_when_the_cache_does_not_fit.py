"""Notebook 11 (when the cache does not fit): figures, the cost explorer, exercise checks and
their solutions.

Exercises: ``kv_pool_blocks`` (size a block pool), ``radix_match`` (walk a radix tree), and two
bug hunts from nano-vllm: ``cached_prefix`` (a fully cached prompt leaves nothing to prefill,
issue #144) and ``take_free_block`` (a reused block keeps its old hash, issue #163).
"""

from __future__ import annotations

import random

import matplotlib.pyplot as plt

from ..memory import crossover_tokens, recompute_seconds, swap_seconds
from ..paged import BlockAllocator, block_hash
from ..prefix import RadixTree
from .exercise import CaseFailed, Exercise, expect_equal, expect_pair, run_check

EXERCISES = [
    Exercise("11", "kv_pool_blocks", "check_kv_pool_blocks", 10),
    Exercise("11", "radix_match", "check_radix_match", 15),
    Exercise(
        "11",
        "cached_prefix",
        "check_cached_prefix",
        15,
        bug_hunt=True,
        source="https://github.com/GeeeekExplorer/nano-vllm/issues/144",
    ),
    Exercise(
        "11",
        "take_free_block",
        "check_take_free_block",
        15,
        bug_hunt=True,
        source="https://github.com/GeeeekExplorer/nano-vllm/issues/163",
    ),
]

GiB = 2**30


# --- figures ---------------------------------------------------------------------------------


def draw_budgets(budgets: dict):
    """One horizontal bar per device: weights, activation peak, KV blocks and what is left
    (the unused ``1 - utilization`` plus the last partial block), as fractions of its memory."""
    fig, ax = plt.subplots(figsize=(11, 3.8))
    parts = [
        ("weights", "tab:gray", lambda b: b.weight_bytes),
        ("activation peak", "tab:orange", lambda b: b.activation_bytes),
        ("KV-cache blocks", "tab:blue", lambda b: b.kv_bytes),
        ("not used", "#e2e8f0", lambda b: b.total_bytes - b.weight_bytes - b.activation_bytes - b.kv_bytes),
    ]
    names = list(budgets)
    for row, name in enumerate(names):
        b, left = budgets[name], 0.0
        for label, color, size in parts:
            frac = size(b) / b.total_bytes
            ax.barh(row, frac, left=left, color=color, edgecolor="white", label=label if row == 0 else None)
            if frac > 0.06:
                ax.text(left + frac / 2, row, f"{frac:.0%}", ha="center", va="center", fontsize=10)
            left += frac
        ax.text(1.01, row, f"{b.tokens:,} tokens", va="center", fontsize=10)
    ax.set_yticks(range(len(names)), names, fontsize=10)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction of device memory")
    ax.set_title("Where the memory goes: the KV pool gets what weights and one step's activations leave")
    ax.legend(fontsize=10, loc="upper left", bbox_to_anchor=(0.0, -0.25), ncol=4)
    fig.tight_layout()
    return fig


def draw_pressure(traces: dict, pool: int):
    """Per serving run (``traces[label] = ServeTrace``): blocks in use (top) and requests
    waiting (bottom) per decode step, preemptions marked."""
    fig, (ax_b, ax_w) = plt.subplots(2, 1, figsize=(11, 5.6), sharex=True)
    styles = [("tab:gray", "-", 3.5), ("tab:blue", "-", 2.5), ("tab:orange", "--", 1.5)]  # later lines on top, thinner
    for (label, trace), (color, style, width) in zip(traces.items(), styles, strict=False):
        steps = range(len(trace.blocks_used))
        ax_b.step(steps, trace.blocks_used, where="post", color=color, linestyle=style, linewidth=width, label=label)
        ax_w.step(steps, trace.waiting, where="post", color=color, linestyle=style, linewidth=width, label=label)
        marks = [s for s, e in enumerate(trace.events) if "preempt" in e]
        ax_b.plot(marks, [trace.blocks_used[s] for s in marks], "v", color=color, markersize=8)
    ax_b.axhline(pool, color="black", linestyle="--", linewidth=1)
    ax_b.text(0, pool + 0.4, f"the pool: {pool} blocks", fontsize=10)
    ax_b.set(
        ylabel="blocks in use",
        title="Serving under memory pressure (triangles: a request is preempted; where swap and recompute agree, "
        "the dashed line lies on the solid one)",
    )
    ax_w.set(xlabel="decode step", ylabel="requests waiting", title="The queue: admission control waits, never fails")
    ax_b.legend(fontsize=10, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def draw_cost(shape, kv_bytes_per_token, gpu: dict, measured=None, fit=None, max_tokens: int = 131072):
    """Left: the cost model for ``shape`` on an assumed GPU link (``gpu``: bandwidth, flops,
    seconds_per_copy, block_size), swap with one copy per block and with one per layer and K/V,
    against recompute, crossovers marked. Right (with ``measured`` rows of
    :func:`~flashkv_edu.offload_bench.measure_preemption`): this machine, points measured and the
    fitted model's lines."""
    ncols = 2 if measured else 1
    fig, axes = plt.subplots(1, ncols, figsize=(12 if ncols == 2 else 10, 4.4))
    axes = axes if ncols == 2 else [axes]
    ns = [2**i for i in range(0, max_tokens.bit_length())]
    ax = axes[0]
    recompute = lambda n: recompute_seconds(shape, n, gpu["flops"])  # noqa: E731
    curves = {"recompute": recompute}
    for copies, label in ((1, "swap, one copy per block"), (2 * shape.num_layers, "swap, a copy per layer and K/V")):
        curves[label] = lambda n, c=copies: swap_seconds(  # noqa: E731
            kv_bytes_per_token,
            n,
            gpu["bandwidth"],
            block_size=gpu["block_size"],
            copies_per_block=c,
            seconds_per_copy=gpu["seconds_per_copy"],
        )
    for label, fn in curves.items():
        ax.loglog(ns, [fn(n) * 1e3 for n in ns], label=label)
    colors = {label: line.get_color() for label, line in zip(curves, ax.get_lines(), strict=True)}
    ax.set_ylim(bottom=ax.get_ylim()[0] / 10)  # room for the crossover notes below the curves
    for label in list(curves)[1:]:
        cross = crossover_tokens(curves[label], recompute, max_tokens)
        if cross:  # mark where this swap curve meets recompute, on the curves themselves
            y = recompute(cross) * 1e3
            ax.plot([cross], [y], "o", color=colors[label], markersize=7)
            right_half = cross > ns[len(ns) // 2]
            ax.annotate(
                f"{label.split(', ', 1)[1]}\n= recompute at {cross:,} tokens",
                (cross, y),
                xytext=(-30, -80) if right_half else (24, -40),
                textcoords="offset points",
                ha="right" if right_half else "left",
                fontsize=10,
                color=colors[label],
                arrowprops=dict(arrowstyle="-", color=colors[label], linewidth=0.8),
            )
    ax.set(
        xlabel="tokens in the preempted sequence",
        ylabel="ms (out and back in)",
        title=f"{shape.name}: swap vs recompute (model)",
    )
    ax.legend(fontsize=10, loc="lower right")
    if measured:
        ax = axes[1]
        ns_m = [r["tokens"] for r in measured]
        ax.plot(ns_m, [r["recompute_s"] * 1e3 for r in measured], "o", color="tab:blue", label="recompute, measured")
        ax.plot(
            ns_m, [r["swap_host_s"] * 1e3 for r in measured], "s", color="tab:orange", label="swap to host, measured"
        )
        ax.plot(ns_m, [r["swap_disk_s"] * 1e3 for r in measured], "^", color="tab:red", label="swap to disk, measured")
        if fit:
            grid = list(range(ns_m[0], ns_m[-1] + 1, max(1, (ns_m[-1] - ns_m[0]) // 50)))
            flops = [r["prefill_flops"] / r["tokens"] for r in measured]
            per_token_flops = sum(flops) / len(flops)
            ax.plot(
                grid,
                [(fit["recompute_overhead_s"] + per_token_flops * n / fit["flops_per_s"]) * 1e3 for n in grid],
                color="tab:blue",
                linewidth=1,
                label="recompute, fitted",
            )
            per_token_bytes = measured[-1]["bytes"] / measured[-1]["tokens"]
            ax.plot(
                grid,
                [(fit["swap_overhead_s"] + 2 * per_token_bytes * n / fit["bandwidth"]) * 1e3 for n in grid],
                color="tab:orange",
                linewidth=1,
                label="swap to host, fitted",
            )
        ax.set(
            xlabel="tokens in the preempted sequence", ylabel="ms", title="This machine: the trained model (measured)"
        )
        ax.legend(fontsize=10)
    fig.tight_layout()
    return fig


def cost_explorer(shape, kv_bytes_per_token):
    """Widget: link bandwidth, FLOP/s, latency per copy and block size -> :func:`draw_cost`."""
    import ipywidgets as w

    def redraw(bandwidth_gbs, tflops, copy_us, block_size):
        gpu = {
            "bandwidth": bandwidth_gbs * 1e9,
            "flops": tflops * 1e12,
            "seconds_per_copy": copy_us * 1e-6,
            "block_size": block_size,
        }
        draw_cost(shape, kv_bytes_per_token, gpu)
        plt.show()

    return w.interactive(
        redraw,
        bandwidth_gbs=w.FloatLogSlider(value=25, base=10, min=0, max=3, description="link GB/s"),
        tflops=w.FloatLogSlider(value=400, base=10, min=1, max=3.3, description="TFLOP/s"),
        copy_us=w.FloatSlider(value=10, min=0, max=50, step=1, description="µs per copy"),
        block_size=w.Dropdown(options=[1, 16, 64, 256], value=16, description="block size"),
    )


def draw_reuse(results, labels):
    """Tokens found in the cache per request, one bar group per request, one bar per index."""
    fig, ax = plt.subplots(figsize=(12, 4.4))
    width = 0.8 / len(results)
    for i, r in enumerate(results):
        xs = [j + i * width for j in range(len(labels))]
        ax.bar(xs, r.hit_tokens, width=width, label=f"{r.name} ({r.hit_rate:.0%} of prompt tokens)")
    ax.plot(
        [j + 0.4 - width / 2 for j in range(len(labels))],
        results[0].prompt_tokens,
        "k_",
        markersize=14,
        label="prompt length",
    )
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels, rotation=35, ha="right", fontsize=10)
    ax.set(
        ylabel="tokens found in the cache", title="Prefix reuse: a radix tree against block hashes, request by request"
    )
    ax.legend(fontsize=10, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def draw_tiers(found: dict):
    """``found[scenario] = {"device": n, "host": n, "disk": n, "computed": n}`` tokens: where a
    prompt's tokens came from, one stacked bar per scenario."""
    fig, ax = plt.subplots(figsize=(10, 3.6))
    colors = {"device": "tab:blue", "host": "tab:green", "disk": "tab:purple", "computed": "tab:orange"}
    names = list(found)
    for row, name in enumerate(names):
        left = 0
        for part, color in colors.items():
            n = found[name][part]
            ax.barh(row, n, left=left, color=color, label=part if row == 0 else None)
            if n:
                ax.text(left + n / 2, row, str(n), ha="center", va="center", fontsize=10, color="white")
            left += n
    ax.set_yticks(range(len(names)), names, fontsize=10)
    ax.invert_yaxis()
    ax.set(xlabel="prompt tokens", title="Where a prompt's keys and values came from")
    ax.legend(fontsize=10, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


# --- exercise 1: size the pool ----------------------------------------------------------------


def kv_pool_blocks(total_bytes, weight_bytes, activation_bytes, kv_bytes_per_token, block_size, utilization):
    """Blocks a pool gets: ``floor((utilization * total - weights - activations) / block_bytes)``
    with ``block_bytes = block_size * kv_bytes_per_token``; ``ValueError`` if not one fits."""
    usable = int(total_bytes * utilization) - weight_bytes - activation_bytes
    block_bytes = block_size * kv_bytes_per_token
    if usable < block_bytes:
        raise ValueError(f"{usable} bytes left: less than one block of {block_bytes}")
    return usable // block_bytes


def check_kv_pool_blocks(fn) -> bool | None:
    """Llama-3-8B on 80 GiB and on 24 GiB, the trained model, and a budget with no room."""

    def case(label, args, want):
        def run(f):
            if want is None:
                try:
                    got = f(*args)
                except ValueError:
                    return
                raise CaseFailed(f"expected a ValueError (not even one block fits), got {got!r}")
            expect_equal("blocks", want, f(*args))

        return label, run

    return run_check(
        "check_kv_pool_blocks",
        fn,
        [
            case("Llama-3-8B bf16, 80 GiB, 90%", (80 * GiB, 16_060_522_496, 1_104_412_672, 131072, 16, 0.9), 28679),
            case("Llama-3-8B, 24 GiB, 95%", (24 * GiB, 16_060_522_496, 1_104_412_672, 131072, 16, 0.95), 3488),
            case("the trained model, 64 MiB", (64 * 2**20, 3_117_568, 2_887_680, 2048, 16, 0.9), 1659),
            case("8 GiB cannot hold the weights", (8 * GiB, 16_060_522_496, 0, 131072, 16, 0.9), None),
            case("half a block left after weights and activations", (10_000, 5_000, 3_976, 64, 16, 0.9), None),
            case("exactly one block left", (10_000, 5_000, 2_976, 64, 16, 0.9), 1),
        ],
        "three pools sized, exactly one block, and no pool when not one block fits",
    )


# --- exercise 2: walk a radix tree -----------------------------------------------------------


def radix_match(root, tokens):
    """How many leading tokens of ``tokens`` the tree under ``root`` holds. A node has
    ``.tokens`` (the run of tokens on the edge into it) and ``.children`` (first token -> node)."""
    node, matched = root, 0
    while matched < len(tokens):
        child = node.children.get(tokens[matched])
        if child is None:
            return matched
        for t in child.tokens:
            if matched == len(tokens) or tokens[matched] != t:
                return matched
            matched += 1
        node = child
    return matched


def check_radix_match(fn) -> bool | None:
    """Trees built from random token lists; queries that stop at a node, mid-edge, or go past a leaf."""

    def case(seed):
        def run(f):
            rng = random.Random(seed)
            tree, seen = RadixTree(), []
            for _ in range(6):
                seq = [rng.randrange(3) for _ in range(rng.randrange(1, 10))]
                tree.insert(seq)
                seen.append(seq)
            for _ in range(12):
                query = [rng.randrange(3) for _ in range(rng.randrange(1, 12))]
                if rng.random() < 0.5:
                    base = rng.choice(seen)
                    query = base[: rng.randrange(len(base) + 1)] + query
                want = max(_common(query, s) for s in seen)
                got = f(tree.root, query)
                if got != want:
                    raise CaseFailed(f"tree of {seen}, query {query}: expected {want}, got {got!r}")

        return f"random trees (seed {seed})", run

    return run_check("check_radix_match", fn, [case(s) for s in range(4)], "48 queries over 4 random trees")


def _common(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# --- exercise 3 (bug hunt): a prompt found in full --------------------------------------------


def cached_prefix(allocator, tokens, block_size):
    """Reuse the cached full blocks at the start of a new prompt: returns ``(blocks,
    cached_tokens)``; the caller prefills ``tokens[cached_tokens:]``, so at least the last token
    must be left to compute."""
    blocks, parent = [], None
    for i in range((len(tokens) - 1) // block_size):
        key = block_hash(parent, tokens[i * block_size : (i + 1) * block_size])
        block = allocator.lookup(key)
        if block is None:
            break
        blocks.append(block)
        parent = key
    return blocks, len(blocks) * block_size


def _cached_allocator(prompt, block_size):
    """An allocator whose cache holds every full block of ``prompt`` (freed, still findable)."""
    allocator = BlockAllocator(8, block_size)
    parent = None
    for i in range(len(prompt) // block_size):
        block = allocator.allocate(1)[0]
        parent = block_hash(parent, prompt[i * block_size : (i + 1) * block_size])
        allocator.register(block, parent)
    for block in list(allocator.hash_of):
        allocator.free(block)
    return allocator


def check_cached_prefix(fn) -> bool | None:
    """Prompts found in part and in full (exact multiples of the block size), and one never seen."""

    def case(label, cached_prompt, prompt, want_blocks):
        def run(f):
            allocator = _cached_allocator(cached_prompt, 4)
            blocks, cached = expect_pair("result", f(allocator, list(prompt), 4))
            if cached >= len(prompt):
                raise CaseFailed(
                    f"{label}: cached_tokens = {cached} for a {len(prompt)}-token prompt leaves nothing to "
                    "prefill (seqlen_q = 0): no logits for the next token"
                )
            expect_equal(f"{label}: cached_tokens", 4 * want_blocks, cached)
            expect_equal(f"{label}: number of blocks", want_blocks, len(blocks))
            held = [b for b in range(8) if allocator.ref_count[b]]
            expect_equal(f"{label}: blocks referenced afterwards", sorted(blocks), held)

        return label, run

    p = list(range(1, 13))
    return run_check(
        "check_cached_prefix",
        fn,
        [
            case("12-token prompt, first 8 cached", p[:8], p, 2),
            case("a 10-token prompt (not a multiple of 4), first 8 cached", p[:8], p[:10], 2),
            case("a 9-token prompt, all 8 of its full-block tokens cached", p[:8], p[:9], 2),
            case("the same 8 tokens again, found in full", p[:8], p[:8], 1),
            case("a 12-token prompt found in full", p, p, 2),
            case("a prompt never seen", p, [9, 9, 9, 9, 9], 0),
        ],
        "prefixes reused, a fully cached prompt still leaves its last token to compute",
    )


# --- exercise 4 (bug hunt): a reused block keeps its hash -------------------------------------


def take_free_block(allocator):
    """Take the least recently freed block for new contents (reference count 1). A block that
    held cached tokens must leave the prefix cache: its old key would find new contents."""
    block, _ = allocator.free_list.popitem(last=False)
    old = allocator.hash_of.pop(block, None)
    if old is not None:
        del allocator.block_of[old]
        allocator.evictions += 1
    allocator.ref_count[block] = 1
    return block


def _allocator_invariants(allocator) -> None:
    """The allocator's own rules: the two maps of the prefix cache are each other's inverse, free
    blocks have no reference and every block is free or referenced."""
    for key, block in allocator.block_of.items():
        if allocator.hash_of.get(block) != key:
            raise CaseFailed(f"block_of maps a key to block {block}, but hash_of[{block}] no longer holds that key")
    for block, key in allocator.hash_of.items():
        if allocator.block_of.get(key) != block:
            raise CaseFailed(f"hash_of[{block}] still holds a key that block_of no longer maps to it")
    for block in range(allocator.num_blocks):
        free, refs = block in allocator.free_list, allocator.ref_count[block]
        if free == (refs > 0):
            raise CaseFailed(f"block {block}: {'free' if free else 'not free'} with reference count {refs}")


def check_take_free_block(fn) -> bool | None:
    """A cached block is freed, taken for other tokens, and its old key looked up again; a block
    that never held cached tokens is taken too. After each take the allocator's invariants must
    hold and it must still allocate every other block."""

    def case(label, n_cached, n_plain=0):
        def run(f):
            allocator = BlockAllocator(n_cached + n_plain, 4)
            blocks = allocator.allocate(n_cached + n_plain)
            plain, cached = blocks[:n_plain], blocks[n_plain:]
            keys, parent = [], None
            for i, block in enumerate(cached):
                parent = block_hash(parent, [i] * 4)
                allocator.register(block, parent)
                keys.append(parent)
            for block in blocks:  # freed in order: the first freed is taken first
                allocator.free(block)
            taken = f(allocator)
            expect_equal(f"{label}: the block taken (least recently freed)", blocks[0], taken)
            expect_equal(f"{label}: its reference count", 1, allocator.ref_count[taken])
            _allocator_invariants(allocator)
            if not plain and allocator.lookup(keys[0]) is not None:
                raise CaseFailed(
                    f"{label}: block {taken} now holds other tokens, but lookup of its old key still finds it "
                    "(a later request with that prefix would attend to the wrong keys and values)"
                )
            for key in keys[0 if plain else 1 :]:
                block = allocator.lookup(key)
                if block is None:
                    raise CaseFailed(f"{label}: a block that was not taken left the prefix cache")
                allocator.free(block)
            try:
                rest = allocator.allocate(allocator.num_free)  # evicts every remaining cached block
            except Exception as exc:
                raise CaseFailed(
                    f"{label}: after your take, allocating the other blocks raised {type(exc).__name__}: {exc}"
                ) from None
            _allocator_invariants(allocator)
            if allocator.block_of or allocator.hash_of:
                raise CaseFailed(f"{label}: every block is in use with new contents, yet some keys are still cached")
            del rest

        return label, run

    return run_check(
        "check_take_free_block",
        fn,
        [
            case("one cached block", 1),
            case("three cached blocks", 3),
            case("a block that never held cached tokens, then cached ones", 2, n_plain=1),
        ],
        "a reused block leaves the prefix cache; the others stay findable; the allocator still works",
    )
