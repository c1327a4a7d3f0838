"""Notebook 13 (long context): figures, the attention-mass probe, exercise checks and solutions.

Exercises: ``sink_cache_update`` (bug hunt: transformers' SinkCache rotated a new key at its
absolute position while the cached ones sat at positions inside the cache, #33691),
``page_upper_bound`` (Quest's bound), ``absorb_query`` (MLA's weight absorption) and
``streaming_mask`` (StreamingLLM's mask as a FlexAttention ``mask_mod``).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch

from ..rotary import apply_rotary, rotary_tables
from .exercise import CaseFailed, Exercise, expect_close, expect_equal, run_check

EXERCISES = [
    Exercise(
        "13", "sink_cache_update", "check_sink_cache_update", 20, bug_hunt=True,
        source="https://github.com/huggingface/transformers/issues/33691",
    ),
    Exercise("13", "page_upper_bound", "check_page_upper_bound", 10),
    Exercise("13", "absorb_query", "check_absorb_query", 15),
    Exercise("13", "streaming_mask", "check_streaming_mask", 15),
]  # fmt: skip


# --- figures ------------------------------------------------------------------------------------------------


def smooth(x: torch.Tensor, width: int = 32) -> torch.Tensor:
    """A running mean over ``width`` tokens (the start averages what it has)."""
    c = torch.cat((torch.zeros(1), x.float().cumsum(0)))
    idx = torch.arange(1, x.numel() + 1)
    return (c[idx] - c[(idx - width).clamp(min=0)]) / (idx - (idx - width).clamp(min=0))


def draw_stream(curves: dict, train_len: int, budget: int):
    """Per-token NLL along a stream (running mean of 32 tokens) per way of keeping the cache."""
    fig, ax = plt.subplots(figsize=(12, 4.4))
    for label, nll in curves.items():
        ax.plot(range(1, nll.numel() + 1), smooth(nll), label=label)
    ax.axvline(train_len, color="gray", ls="--", lw=1)
    low = ax.get_ylim()[0]
    ax.text(train_len + 8, low + 0.05, f"training context ({train_len})", fontsize=10, va="bottom")
    ax.axvline(budget, color="gray", ls=":", lw=1)
    ax.text(budget - 8, low + 0.05, f"cache of {budget}", fontsize=10, va="bottom", ha="right")
    ax.set_xlabel("position in the stream")
    ax.set_ylabel("NLL (nats per character, running mean of 32)")
    ax.set_title("A stream 8x longer than the model was trained on: dense attention degrades, a bounded cache does not")
    ax.legend(fontsize=10, loc="upper left", bbox_to_anchor=(0.2, 1.0))
    fig.tight_layout()
    return fig


class MassProbe:
    """A model context that computes causal attention explicitly (rotary at the given positions)
    and records, per layer, the attention mass each query puts on key 0."""

    def __init__(self, positions, rope):
        self.positions, self.rope, self.mass = positions, rope, []

    def attend(self, layer, q, k, v):
        q, k = apply_rotary(q, *self.rope, self.positions), apply_rotary(k, *self.rope, self.positions)
        group = q.shape[2] // k.shape[2]
        qh = q.transpose(1, 2)
        kh, vh = (x.transpose(1, 2).repeat_interleave(group, 1) for x in (k, v))
        n = q.shape[1]
        scores = (qh @ kh.transpose(-1, -2)) * q.shape[-1] ** -0.5
        p = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        self.mass.append(p[0, :, :, 0].mean(0).detach())
        return (p @ vh).transpose(1, 2)


@torch.no_grad()
def attention_on_first(model, tokens) -> list[torch.Tensor]:
    """Per layer, the attention mass (heads averaged) each query of ``tokens`` ``(n,)`` puts on
    the first token."""
    tokens = torch.as_tensor(tokens)[None]
    pos = torch.arange(tokens.shape[1])[None]
    probe = MassProbe(pos, model.rope())
    model.run(tokens, pos, probe)
    return probe.mass


def draw_mass(mass: list[torch.Tensor]):
    fig, ax = plt.subplots(figsize=(12, 3.8))
    n = mass[0].numel()
    for layer, m in enumerate(mass):
        ax.plot(range(n), m, label=f"layer {layer}")
    ax.plot(range(1, n), [1 / (i + 1) for i in range(1, n)], "k:", label="1 / (keys seen): uniform attention")
    ax.set_ylim(0, 0.3)
    ax.set_xlabel("query position")
    ax.set_ylabel("attention mass on token 0")
    ax.set_title("Does this model park attention on its first token? (LLMs put most of it there: the 'sink')")
    ax.legend(fontsize=10, ncol=3)
    fig.tight_layout()
    return fig


def draw_masks(masks: dict, seqlen_q: int, seqlen_k: int):
    """One heat map per mask_mod: which key (column) each query (row) may attend."""
    fig, axes = plt.subplots(1, len(masks), figsize=(3.2 * len(masks), 3.6))
    qi = torch.arange(seqlen_q)[:, None]
    ki = torch.arange(seqlen_k)[None, :]
    zero = torch.zeros((), dtype=torch.long)
    for ax, (title, mod) in zip(axes, masks.items(), strict=True):
        dense = mod(zero, zero, qi, ki).expand(seqlen_q, seqlen_k)
        ax.imshow(dense, cmap="Blues", vmin=0, vmax=1.3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("key")
        ax.set_yticks([])
    axes[0].set_ylabel("query")
    fig.suptitle(f"The chain's masks as mask_mods ({seqlen_q} queries, {seqlen_k} keys, bottom-right aligned)")
    fig.tight_layout()
    return fig


def draw_quest(nll_rows: list[dict], retrieval_rows: list[dict], pages: int):
    """Loss and retrieval accuracy against the page budget, with the bytes read."""
    fig, (ax_l, ax_r) = plt.subplots(1, 2, figsize=(12, 4.2))
    ax_l.plot([r["budget"] for r in nll_rows], [r["nll"] for r in nll_rows], "o-")
    ax_l.axhline(nll_rows[-1]["nll"], color="gray", ls=":", label="every page (dense)")
    ax_l.set_xlabel(f"pages read per step (of {pages}, the last always)")
    ax_l.set_ylabel("NLL (nats per character)")
    ax_l.set_title("The trained model, 8 x 128 characters")
    ax_l.legend(fontsize=10)
    ax_r.plot([r["budget"] for r in retrieval_rows], [r["accuracy"] for r in retrieval_rows], "o-", label="accuracy")
    ax_r.plot([r["budget"] for r in retrieval_rows], [r["bytes"] / r["dense_bytes"] for r in retrieval_rows], "s--",
              label="bytes read / dense")  # fmt: skip
    ax_r.set_xscale("log", base=2)
    ax_r.set_xlabel("pages read per query (log scale)")
    ax_r.set_title("Key -> value retrieval, 512 keys in 32 pages")
    ax_r.legend(fontsize=10)
    fig.suptitle("Reading only the pages whose summaries promise high scores")
    fig.tight_layout()
    return fig


def draw_selection(chosen: torch.Tensor):
    """``chosen`` ``(steps, pages)`` bool: which pages each decode step read."""
    fig, ax = plt.subplots(figsize=(12, 3.6))
    ax.imshow(chosen.T.float(), aspect="auto", cmap="Greens", origin="lower", interpolation="nearest")
    ax.set_xlabel("decode step")
    ax.set_ylabel("page")
    ax.set_title("Pages read at each step (budget 3: the newest page and the 2 with the largest bounds)")
    fig.tight_layout()
    return fig


# --- exercise 1 (bug hunt): SinkCache's new key ---------------------------------------------------------------


def sink_cache_update(cached, new_key, t, sinks, window, cos, sin):
    """Keys stored rotated at their positions inside the cache: ``cached`` ``(n, nheads_k, d)``
    rotated at 0 .. n-1, ``new_key`` ``(nheads_k, d)`` before rotary, at absolute position ``t``.
    Returns the cache after adding it (at most ``sinks + window`` keys, rotated at their new
    positions inside the cache): when full, the oldest window key leaves and the window keys
    after it move one position down."""
    n = cached.shape[0]
    if n < sinks + window:
        pos = torch.tensor([[n]])
        return torch.cat((cached, apply_rotary(new_key[None, None], cos, sin, pos)[0]))
    back = (cos[1:2], -sin[1:2])  # a rotation by -1 position
    moved = apply_rotary(cached[None, sinks + 1 :], *back, torch.zeros(1, n - sinks - 1, dtype=torch.long))[0]
    pos = torch.tensor([[sinks + window - 1]])
    return torch.cat((cached[:sinks], moved, apply_rotary(new_key[None, None], cos, sin, pos)[0]))


def check_sink_cache_update(fn) -> bool | None:
    """A stream fed through the learner's update against keys stored before rotary and rotated at
    their position inside the cache when read (exact): before the cache is full, at the first
    eviction and after many; the caller's tensors are left alone."""
    cos, sin = rotary_tables(256, 8)

    def case(label, sinks, window, steps, heads=2):
        def run(f):
            g = torch.Generator().manual_seed(steps)
            raw = torch.randn(steps, heads, 8, generator=g)
            cached = torch.zeros(0, heads, 8)
            for t in range(steps):
                prev, snapshot, key = cached, cached.clone(), raw[t].clone()
                cached = f(prev, key, t, sinks, window, cos, sin)
                if not torch.equal(prev, snapshot) or not torch.equal(key, raw[t]):
                    raise CaseFailed(f"step {t}: your function changed its inputs in place")
                keep = (
                    list(range(t + 1))
                    if t < sinks + window
                    else list(range(sinks)) + list(range(t - window + 1, t + 1))
                )
                want = apply_rotary(raw[keep][None], cos, sin, torch.arange(len(keep))[None])[0]
                got = tuple(cached.shape) if isinstance(cached, torch.Tensor) else cached
                if got != tuple(want.shape):
                    raise CaseFailed(f"step {t}: expected {tuple(want.shape)} cached keys, got {got!r}")
                expect_close(f"step {t} (absolute position {t}): keys rotated at their positions in the cache",
                             want, cached, atol=1e-4)  # fmt: skip

        return label, run

    return run_check(
        "check_sink_cache_update",
        fn,
        [
            case("4 sinks + 4, before it is full", 4, 4, 8),
            case("2 sinks + 3, the first evictions", 2, 3, 7),
            case("4 sinks + 8, 40 tokens", 4, 8, 40),
            case("no sinks, a window of 5, 20 tokens, 1 head", 0, 5, 20, 1),
        ],  # fmt: skip
        "every cached key at its position inside the cache, the new one too",
    )


# --- exercise 2: Quest's bound -----------------------------------------------------------------------------


def page_upper_bound(q, mins, maxs):
    """Upper bound of ``q . k`` over the keys of each page: ``q`` ``(d,)``, ``mins``/``maxs``
    ``(pages, d)`` the channel-wise min and max of each page's keys. Returns ``(pages,)``."""
    return torch.maximum(q * mins, q * maxs).sum(-1)


def check_page_upper_bound(fn) -> bool | None:
    """Random pages (the bound must hold for every key and be reached by a one-key page), a query
    with negative channels, ``q`` and summaries left alone."""

    def case(label, pages, size, d, seed):
        def run(f):
            g = torch.Generator().manual_seed(seed)
            keys = torch.randn(pages, size, d, generator=g)
            q = torch.randn(d, generator=g)
            mins, maxs = keys.amin(1), keys.amax(1)
            args = (q.clone(), mins.clone(), maxs.clone())
            got = f(*args)
            if not all(torch.equal(a, b) for a, b in zip(args, (q, mins, maxs), strict=True)):
                raise CaseFailed("your function changed q or the summaries in place")
            expect_close("the bounds", page_upper_bound(q, mins, maxs), got, atol=1e-5)
            best = (keys @ q).amax(1)
            if bool((got < best - 1e-5).any()):
                raise CaseFailed("a page holds a key that scores above your bound")

        return label, run

    return run_check(
        "check_page_upper_bound",
        fn,
        [
            case("8 pages of 16 keys, d 32", 8, 16, 32, 0),
            case("one-key pages: the bound is the score", 5, 1, 16, 1),
            case("3 pages of 4, d 2", 3, 4, 2, 2),
        ],  # fmt: skip
        "sum over channels of max(q min, q max): never below a key's score, tight for one key",
    )


# --- exercise 3: MLA's absorption ------------------------------------------------------------------------------


def absorb_query(q_nope, w_uk, nheads):
    """``q_lat`` ``(b, s, nheads, latent)`` with ``q_lat[h] . c == q_nope[h] . (W_uk[h] c)`` for every
    latent ``c``: ``q_nope`` ``(b, s, nheads, nope)``, ``w_uk`` the up-projection ``(nheads * nope,
    latent)`` (``k_nope = (c @ w_uk.T).view(..., nheads, nope)``)."""
    nope, latent = q_nope.shape[-1], w_uk.shape[1]
    return torch.einsum("bshn,hnl->bshl", q_nope, w_uk.view(nheads, nope, latent))


def check_absorb_query(fn) -> bool | None:
    """Scores through the learner's absorbed query against decompressed keys, several shapes."""

    def case(label, b, s, h, nope, latent, n_keys):
        def run(f):
            g = torch.Generator().manual_seed(h * 7 + nope)
            q_nope = torch.randn(b, s, h, nope, generator=g)
            w_uk = torch.randn(h * nope, latent, generator=g)
            c = torch.randn(b, n_keys, latent, generator=g)
            q_lat = f(q_nope.clone(), w_uk.clone(), h)
            k_nope = (c @ w_uk.T).view(b, n_keys, h, nope)
            want = torch.einsum("bshn,bkhn->bshk", q_nope, k_nope)
            if not isinstance(q_lat, torch.Tensor) or tuple(q_lat.shape) != (b, s, h, latent):
                raise CaseFailed(f"expected q_lat of shape {(b, s, h, latent)}, got "
                                 f"{tuple(q_lat.shape) if isinstance(q_lat, torch.Tensor) else q_lat!r}")  # fmt: skip
            got = torch.einsum("bshl,bkl->bshk", q_lat, c)
            expect_close("scores q_lat . c against q_nope . (W_uk c)", want, got, atol=1e-3)

        return label, run

    return run_check(
        "check_absorb_query",
        fn,
        [
            case("4 heads, nope 16, latent 32", 2, 3, 4, 16, 32, 5),
            case("1 head", 1, 1, 1, 8, 16, 4),
            case("3 heads, latent smaller than nope", 1, 2, 3, 16, 8, 6),
        ],  # fmt: skip
        "q_lat . c equals q_nope . (W_uk c) for every head and key",
    )


# --- exercise 4: StreamingLLM's mask as a mask_mod ----------------------------------------------------------------


def streaming_mask(seqlen_q, seqlens_k, sinks, window):
    """A FlexAttention ``mask_mod(b, h, q_idx, kv_idx)``: causal, bottom-right aligned (query ``i``
    sits at key position ``i + seqlens_k[b] - seqlen_q``), the first ``sinks`` keys and the last
    ``window`` keys up to the query's position (its own included)."""

    def mask_mod(b, h, q_idx, kv_idx):
        at = q_idx + seqlens_k[b] - seqlen_q
        return (kv_idx <= at) & ((kv_idx < sinks) | (kv_idx > at - window))

    return mask_mod


def _dense(mod, b: int, seqlen_q: int, seqlen_k: int) -> torch.Tensor:
    qi = torch.arange(seqlen_q)[:, None]
    ki = torch.arange(seqlen_k)[None, :]
    return mod(torch.tensor(b), torch.tensor(0), qi, ki).expand(seqlen_q, seqlen_k)


def check_streaming_mask(fn) -> bool | None:
    """The mask of every row against StreamingLLM's rule, queries fewer than keys (bottom-right),
    rows of different lengths, no sinks, a window of one."""

    def case(label, seqlen_q, lengths, sinks, window):
        def run(f):
            lens = torch.tensor(lengths)
            mod = f(seqlen_q, lens, sinks, window)
            want = streaming_mask(seqlen_q, lens, sinks, window)
            for b, n in enumerate(lengths):
                got = _dense(mod, b, seqlen_q, n)
                if got.dtype != torch.bool:
                    raise CaseFailed(f"row {b}: mask_mod must return booleans, got {got.dtype}")
                expect_equal(f"row {b} ({seqlen_q} queries over {n} keys): the mask", _dense(want, b, seqlen_q, n), got)

        return label, run

    return run_check(
        "check_streaming_mask",
        fn,
        [
            case("square, 2 sinks + 4", 12, [12], 2, 4),
            case("3 queries over 20 keys", 3, [20], 4, 5),
            case("two rows, 9 and 30 keys", 4, [9, 30], 1, 3),
            case("no sinks, window 1", 5, [8], 0, 1),
        ],  # fmt: skip
        "causal, bottom-right, sinks and the window, every row",
    )
