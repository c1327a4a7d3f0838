"""Notebook 14 (several query rows per step): figures, exercise checks and their solutions.

Exercises: ``chunk_plan`` (a step's token budget), ``rejection_sample`` (speculative sampling,
checked by a chi-square test over many draws), ``rollback_lengths`` (bug hunt: a draft cache
trimmed by "rejected + 1", mlxcel #994) and ``ancestor_mask`` (tree attention's mask).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch

from .. import charlm
from ..cascade import ancestor_mask as _ancestor_mask
from ..speculative import ModelCache, greedy_generate
from .exercise import CaseFailed, Exercise, expect_equal, run_check

EXERCISES = [
    Exercise("14", "chunk_plan", "check_chunk_plan", 10),
    Exercise("14", "rejection_sample", "check_rejection_sample", 20),
    Exercise(
        "14", "rollback_lengths", "check_rollback_lengths", 15, bug_hunt=True,
        source="https://github.com/lablup/mlxcel/issues/994",
    ),
    Exercise("14", "ancestor_mask", "check_ancestor_mask", 10),
]  # fmt: skip


# --- figures ----------------------------------------------------------------------------------------------


def draw_budget(traces: dict, steps: int = 40):
    """Stacked bars of each step's tokens: decodes and prompt tokens, per run."""
    fig, axes = plt.subplots(len(traces), 1, figsize=(12, 2.4 * len(traces) + 0.6), sharex=True)
    for ax, (label, trace) in zip(axes, traces.items(), strict=True):
        prefill = trace.step_prefill_tokens[:steps]
        decode = [t - p for t, p in zip(trace.step_tokens[:steps], prefill, strict=True)]
        x = range(len(prefill))
        ax.bar(x, decode, color="tab:blue", label="decode tokens")
        ax.bar(x, prefill, bottom=decode, color="tab:orange", label="prompt tokens")
        ax.set_yscale("symlog", linthresh=10)
        ax.set_ylabel("tokens")
        ax.set_title(label, fontsize=11)
    axes[0].legend(fontsize=10)
    axes[-1].set_xlabel("step")
    fig.suptitle("Each step's tokens: a 700-token prompt joins three running requests")
    fig.tight_layout()
    return fig


def draw_tbt(rows: list[dict]):
    """Time between tokens of the running requests, sorted, per token budget."""
    fig, ax = plt.subplots(figsize=(12, 4.2))
    for r in rows:
        gaps = [g * 1e3 for g in r["gaps"]]
        label = "no chunking" if r["budget"] is None else f"budget {r['budget']}"
        ax.plot([i / (len(gaps) - 1) for i in range(len(gaps))], gaps, label=f"{label} (p99 {r['p99'] * 1e3:.0f} ms)")
    ax.set_yscale("log")
    ax.set_xlabel("fraction of the gaps (sorted)")
    ax.set_ylabel("time between tokens (ms, log scale)")
    ax.set_title("Running requests while a 2,048-token prompt arrives: the stall shrinks with the budget")
    ax.legend(fontsize=10)
    fig.tight_layout()
    return fig


def draw_acceptance(rows: list[dict]):
    """Tokens per target call against k, measured and by the i.i.d. formula, and the speed-up."""
    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(12, 4.2))
    for draft in dict.fromkeys(r["draft"] for r in rows):
        mine = [r for r in rows if r["draft"] == draft]
        ks = [r["k"] for r in mine]
        line = ax_t.plot(ks, [r["tokens_per_call"] for r in mine], "o-", label=f"{draft}, measured")[0]
        ax_t.plot(ks, [r["formula"] for r in mine], "--", color=line.get_color(), label=f"{draft}, (1-a^(k+1))/(1-a)")
        ax_s.plot(ks, [r["speedup"] for r in mine], "o-", label=draft)
    ax_s.axhline(1.0, color="gray", lw=1)
    ax_s.axhline(1.5, color="gray", ls=":", lw=1)
    ax_t.set_xlabel("drafts per round k")
    ax_t.set_ylabel("tokens per target call")
    ax_t.legend(fontsize=10)
    ax_s.set_xlabel("drafts per round k")
    ax_s.set_ylabel("speed-up over target-only greedy")
    ax_s.legend(fontsize=10)
    fig.suptitle("Speculative decoding on this CPU: what each draft buys")
    fig.tight_layout()
    return fig


def draw_tree(tokens: list[int], parents: list[int]):
    """The tree (labels: the tokens as characters) and its ancestor mask."""
    mask = _ancestor_mask(parents)
    fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(12, 4.2))
    ax_m.imshow(mask, cmap="Blues", vmin=0, vmax=1.3)
    labels = [charlm.decode([t]).replace(" ", "\u00b7").replace("\n", "\\n") for t in tokens]  # a space shows as a dot
    ax_m.set_xticks(range(len(tokens)), labels, fontsize=10)
    ax_m.set_yticks(range(len(tokens)), labels, fontsize=10)
    ax_m.set_title("ancestor mask: node (row) sees node (column); a dot is a space", fontsize=11)
    depth = [0] * len(parents)
    for i, p in enumerate(parents):
        depth[i] = 0 if p < 0 else depth[p] + 1
    rank = {}
    for i in range(len(parents)):
        rank[i] = sum(1 for j in range(i) if depth[j] == depth[i])
        if parents[i] >= 0:
            ax_t.plot([depth[parents[i]], depth[i]], [rank[parents[i]], rank[i]], "k-", lw=1)
        ax_t.text(depth[i], rank[i], labels[i], ha="center", va="center", fontsize=11,
                  bbox=dict(boxstyle="round", fc="#dbeafe"))  # fmt: skip
    ax_t.set_xlim(-0.5, max(depth) + 0.5)
    ax_t.set_ylim(-0.7, max(rank.values()) + 0.7)
    ax_t.invert_yaxis()
    ax_t.set_xlabel("depth (position = cached tokens + depth)")
    ax_t.set_yticks([])
    ax_t.set_title("the draft tree, verified in one call", fontsize=11)
    fig.tight_layout()
    return fig


# --- exercise 1: a step's token budget ----------------------------------------------------------------------


def chunk_plan(decodes, prompts_left, budget):
    """Tokens each waiting prompt prefills this step: ``decodes`` running requests take one token
    each from ``budget``; prompts (``prompts_left``, tokens still to prefill, first come first)
    take what is left, in order, each at most what it still has."""
    left = budget - decodes
    plan = []
    for n in prompts_left:
        take = max(0, min(n, left))
        plan.append(take)
        left -= take
    return plan


def check_chunk_plan(fn) -> bool | None:
    def case(label, decodes, prompts_left, budget):
        def run(f):
            got = f(decodes, list(prompts_left), budget)
            expect_equal("tokens per prompt", chunk_plan(decodes, prompts_left, budget), [int(x) for x in got])

        return label, run

    return run_check(
        "check_chunk_plan",
        fn,
        [
            case("3 decodes, a 700-token prompt, budget 64", 3, [700], 64),
            case("two prompts, the first almost done", 2, [5, 300], 64),
            case("decodes fill the budget", 8, [100], 8),
            case("no prompt", 4, [], 32),
            case("three prompts, budget 256", 0, [100, 100, 100], 256),
        ],  # fmt: skip
        "decodes first, then prompt chunks first come first served, within the budget",
    )


# --- exercise 2: speculative sampling ---------------------------------------------------------------------------


def rejection_sample(draft_tokens, draft_probs, target_probs, generator=None):
    """The emitted tokens of one round: accept draft ``i`` with probability ``min(1, p_i(d_i) /
    q_i(d_i))``; at the first rejection draw from ``max(0, p_i - q_i)`` normalised and stop; when
    all are accepted draw a bonus from ``p_k``."""
    out = []
    for i, tok in enumerate(draft_tokens):
        p, q = float(target_probs[i, tok]), float(draft_probs[i, tok])
        if float(torch.rand((), generator=generator)) < min(1.0, p / q):
            out.append(int(tok))
            continue
        residual = (target_probs[i] - draft_probs[i]).clamp(min=0)
        out.append(int(torch.multinomial(residual / residual.sum(), 1, generator=generator)))
        return out
    out.append(int(torch.multinomial(target_probs[len(draft_tokens)], 1, generator=generator)))
    return out


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def first_token_counts(fn, draft_probs, target_probs, draws: int, seed: int = 0) -> torch.Tensor:
    """How often each token is emitted first over ``draws`` rounds (drafts drawn from q)."""
    g = torch.Generator().manual_seed(seed)
    vocab = target_probs.shape[1]
    counts = torch.zeros(vocab)
    for _ in range(draws):
        drafts = [int(torch.multinomial(draft_probs[i], 1, generator=g)) for i in range(draft_probs.shape[0])]
        out = fn(drafts, draft_probs, target_probs, g)
        counts[int(out[0])] += 1
    return counts


def check_rejection_sample(fn) -> bool | None:
    """The first emitted token must follow the target's distribution p_0 (chi-square over 3,000
    rounds, critical value at the 0.1 % level), whatever the draft; every round emits at least one
    token and at most k + 1; accepted drafts come first."""

    def case(label, p, q, seed):
        def run(f):
            p_, q_ = torch.tensor(p), torch.tensor(q)
            counts = first_token_counts(f, q_, p_, 3000, seed)
            stat, dof = _chi_square(counts, p_[0]), int((p_[0] > 0).sum()) - 1
            critical = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47}[dof]
            if stat > critical:
                raise CaseFailed(f"the first token's frequencies {counts.tolist()} are not the target's {p[0]} "
                                 f"(chi-square {stat:.1f} > {critical} for {dof} degrees of freedom)")  # fmt: skip
            g = torch.Generator().manual_seed(1)
            for _ in range(20):
                drafts = [int(torch.multinomial(q_[i], 1, generator=g)) for i in range(q_.shape[0])]
                out = f(drafts, q_, p_, g)
                if not 1 <= len(out) <= len(drafts) + 1 or list(out[:-1]) != drafts[: len(out) - 1]:
                    raise CaseFailed(f"drafts {drafts} gave {list(out)}: expected the accepted drafts, then one token")

        return label, run

    p2 = [[0.5, 0.3, 0.2, 0.0], [0.1, 0.1, 0.1, 0.7], [0.25, 0.25, 0.25, 0.25]]
    return run_check(
        "check_rejection_sample",
        fn,
        [
            case("a draft unlike the target", p2, [[0.1, 0.1, 0.1, 0.7], [0.7, 0.1, 0.1, 0.1]], 0),
            case("a draft close to the target", p2, [[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.1, 0.6]], 1),
            case(
                "one draft, certain of a token the target rates 0.3",
                [[0.5, 0.3, 0.2, 0.0], [0.0, 0.0, 1.0, 0.0]],
                [[0.0, 1.0, 0.0, 0.0]],
                2,
            ),
        ],  # fmt: skip
        "the emitted tokens follow the target's distribution, whatever the draft",
    )


# --- exercise 3 (bug hunt): rolling the caches back ------------------------------------------------------------


def rollback_lengths(length, k, accepted):
    """Both caches held ``length`` tokens (the context but its last token). The draft wrote ``k``
    keys (the last token and ``d_1 .. d_{k-1}``), the target's verification ``k + 1`` (the last
    token and ``d_1 .. d_k``); ``accepted`` drafts were kept. Returns the lengths to keep:
    ``(target, draft)``."""
    return length + accepted + 1, length + min(accepted + 1, k)


def speculate_with(fn, prompt: list[int], new_tokens: int, k: int) -> list[int]:
    """Greedy speculative decoding with the trained target and draft, the caches cut back to what
    ``fn(length, k, accepted)`` says after every round; a cache that keeps fewer keys than the
    context needs is topped up (re-fed), one that keeps more is used as it is."""
    target, _ = charlm.load()
    draft, _ = charlm.load(charlm.DRAFT_CHECKPOINT)
    t, d = ModelCache(target, 1, 512, False), ModelCache(draft, 1, 512, False)
    context, out = list(prompt), []
    t.feed([0], [context[:-1]])
    d.feed([0], [context[:-1]])
    with torch.no_grad():
        while len(out) < new_tokens:
            length = len(context) - 1
            for cache in (t, d):
                if cache.lengths[0] < length:
                    cache.feed([0], [context[cache.lengths[0] : length]])
            drafts, last = [], context[-1]
            for _ in range(k):
                last = int(d.feed([0], [[last]])[0][-1].argmax())
                drafts.append(last)
            logits = t.feed([0], [[context[-1], *drafts]])[0]
            choice = logits.argmax(-1).tolist()
            a = 0
            while a < k and drafts[a] == choice[a]:
                a += 1
            keep_t, keep_d = (int(x) for x in fn(length, k, a))
            t.truncate(0, min(keep_t, t.lengths[0]))
            d.truncate(0, min(keep_d, d.lengths[0]))
            context += drafts[:a] + [choice[a]]
            out += drafts[:a] + [choice[a]]
    return out[:new_tokens]


def check_rollback_lengths(fn) -> bool | None:
    """The lengths for every k and accepted count, then a real run: tokens identical to target-only
    greedy decoding."""

    def lengths(f):
        for k in range(1, 6):
            for a in range(k + 1):
                expect_equal(f"k={k}, {a} accepted, caches of 100: (target, draft)", rollback_lengths(100, k, a),
                             tuple(int(x) for x in f(100, k, a)))  # fmt: skip

    def real(f):
        prompt = charlm.encode("def main(argv):\n    ")
        want = greedy_generate(charlm.load()[0], [prompt], 24)[0][0]
        got = speculate_with(f, prompt, 24, 4)
        expect_equal("24 tokens of speculative decoding against target-only greedy", want, got)

    return run_check(
        "check_rollback_lengths", fn, [("every k and accepted count", lengths), ("a real run, k = 4", real)],
        "the target keeps the last token and the accepted drafts; the draft what it computed of them",
    )  # fmt: skip


# --- exercise 4: the tree mask ------------------------------------------------------------------------------------


ancestor_mask = _ancestor_mask  # the solution is the package's own (it checks the parents with tree_depths)


def check_ancestor_mask(fn) -> bool | None:
    def case(label, parents):
        def run(f):
            got = f(list(parents))
            if not isinstance(got, torch.Tensor):
                raise CaseFailed(f"expected a tensor, got {type(got).__name__}")
            expect_equal("the mask", _ancestor_mask(parents), got.bool())

        return label, run

    return run_check(
        "check_ancestor_mask",
        fn,
        [
            case("a chain of 4", [-1, 0, 1, 2]),
            case("two branches of 2", [-1, 0, 0, 1, 2]),
            case("a root alone", [-1]),
            case("a deeper tree", [-1, 0, 0, 1, 1, 2, 3, 3]),
        ],  # fmt: skip
        "every node sees itself and all its ancestors, nothing else",
    )
