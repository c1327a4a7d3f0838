"""Attention sinks and a ring cache (StreamingLLM, notebook 13).

A stream longer than any cache keeps ``sinks`` first tokens and the ``window`` most recent ones:
``sinks + window`` slots, never more. The token at absolute position ``t`` lives in slot ``t`` while
``t < sinks + window``, then in slot ``sinks + (t - sinks) % window`` (the window is a ring).

Where are the keys in position space? Two conventions:

* ``positions="cache"`` (StreamingLLM, arXiv 2309.17453): a token's position is its index among
  the cached tokens (sinks first, then the window oldest to newest), so distances never exceed
  the cache. Keys are stored **before** rotary and rotated at their current position whenever
  they are read; the query and the new key rotate at the new token's position in the cache
  (FlashAttention 3's ``rotary_seqlens``).
* ``positions="absolute"``: keys are stored rotated at their absolute position, never touched
  again; the slots are read through a page table with pages of one token (logical order -> ring
  slot), and the new key is written into the evicted slot by the attention call itself, rotated at
  ``rotary_seqlens = t``: rows of the cache are not positions. Distances to the sinks grow
  without bound.

(The third choice, keys stored rotated and re-rotated by one position each time the window slides,
is what transformers' ``SinkCache`` did: every re-rotation rounds, and the error accumulates. See
:func:`rerotation_drift`.)
"""

from __future__ import annotations

import torch

from . import fa3
from .model import TinyDecoder
from .rotary import apply_rotary, rotary_tables
from .validation import ArgumentError, ArgumentTypeError, check_int

__all__ = [
    "POSITIONS",
    "STREAMS",
    "RingContext",
    "RingKVCache",
    "new_rings",
    "rerotation_drift",
    "ring_slot",
    "stream_logits",
    "stream_nll",
    "visible_tokens",
]

POSITIONS = ("cache", "absolute")


def ring_slot(t: int, sinks: int, window: int) -> int:
    """The slot of the token at absolute position ``t``."""
    return t if t < sinks + window else sinks + (t - sinks) % window


def visible_tokens(t: int, sinks: int, window: int) -> list[int]:
    """Absolute positions the token at ``t`` attends to, in cache order: the sinks, then the
    window oldest first, ``t`` last (``sinks + window`` of them at most)."""
    if t < sinks + window:
        return list(range(t + 1))
    return list(range(sinks)) + list(range(t - window + 1, t + 1))


class RingKVCache:
    """One layer's ring: keys and values ``(batch, sinks + window, nheads_k, headdim)`` (the
    sequences of a batch advance together). ``positions``: see the module docstring."""

    def __init__(self, batch: int, sinks: int, window: int, nheads_k: int, headdim: int, *, positions: str = "cache",
                 dtype=torch.float32):  # fmt: skip
        self.batch = check_int("batch", batch, low=1)
        self.sinks = check_int("sinks", sinks, low=0)
        self.window = check_int("window", window, low=1)
        check_int("nheads_k", nheads_k, low=1)
        check_int("headdim", headdim, low=2)
        if positions not in POSITIONS:
            raise ArgumentError(f"positions must be one of {POSITIONS}, got {positions!r}")
        self.positions = positions
        slots = sinks + window
        self.k = torch.zeros(batch, slots, nheads_k, headdim, dtype=dtype)
        self.v = torch.zeros(batch, slots, nheads_k, headdim, dtype=dtype)
        self.seen = 0  # tokens written so far (the next token's absolute position)

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """One new token per sequence: ``q`` ``(batch, 1, nheads, headdim)``, ``k``/``v``
        ``(batch, 1, nheads_k, headdim)``, all before rotary; ``cos``/``sin`` the rotary tables
        (non-interleaved). Writes the token into its slot and returns the attention output
        ``(batch, 1, nheads, headdim)`` over the sinks, the window and the token itself."""
        b = self.batch
        if q.dim() != 4 or q.shape[0] != b or q.shape[1] != 1 or k.shape[:2] != (b, 1) or v.shape[:2] != (b, 1):
            raise ArgumentError(f"q, k, v must hold one new token for each of the {b} sequences")
        t = self.seen
        cached = visible_tokens(t, self.sinks, self.window)[:-1]
        n = len(cached)
        lengths = torch.full((b,), n, dtype=torch.int32)
        if self.positions == "cache":
            where = torch.arange(n)[None].expand(b, n)
            slots = torch.tensor([ring_slot(p, self.sinks, self.window) for p in cached], dtype=torch.long)
            k_buf = torch.zeros(b, n + 1, *self.k.shape[2:], dtype=self.k.dtype)
            v_buf = torch.zeros_like(k_buf)
            k_buf[:, :n] = apply_rotary(self.k[:, slots], cos, sin, where)  # rotated where they are now
            v_buf[:, :n] = self.v[:, slots]
            out = fa3.flash_attn_with_kvcache(
                q, k_buf, v_buf, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=lengths, rotary_seqlens=lengths,
                causal=True, rotary_interleaved=False,
            )  # fmt: skip
            slot = ring_slot(t, self.sinks, self.window)
            self.k[:, slot], self.v[:, slot] = k[:, 0], v[:, 0]
        else:
            order = [ring_slot(p, self.sinks, self.window) for p in cached] + [ring_slot(t, self.sinks, self.window)]
            table = torch.tensor(order, dtype=torch.int32)[None].expand(b, n + 1).contiguous()
            pools_k, pools_v = (
                self.k.view(b * self.slots, 1, *self.k.shape[2:]),
                self.v.view(b * self.slots, 1, *self.v.shape[2:]),
            )
            table = table + torch.arange(b, dtype=torch.int32)[:, None] * self.slots  # each sequence's own slots
            out = fa3.flash_attn_with_kvcache(
                q, pools_k, pools_v, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=lengths,
                rotary_seqlens=torch.full((b,), t, dtype=torch.int32), page_table=table, causal=True,
                rotary_interleaved=False,
            )  # fmt: skip
        self.seen += 1
        return out


class RingContext:
    """Attention for ``TinyDecoder.run`` over one :class:`RingKVCache` per layer: one token per
    step (use :func:`stream_logits` to feed a stream)."""

    def __init__(self, rings: list[RingKVCache], cos: torch.Tensor, sin: torch.Tensor):
        self.rings, self.cos, self.sin = rings, cos, sin

    def attend(self, layer, q, k, v):
        return self.rings[layer].attend(q, k, v, self.cos, self.sin)


def new_rings(model: TinyDecoder, batch: int, sinks: int, window: int, positions: str = "cache") -> list[RingKVCache]:
    """One ring per layer of ``model``."""
    if not isinstance(model, TinyDecoder):
        raise ArgumentTypeError(f"model must be a TinyDecoder, got {type(model).__name__}")
    cfg = model.cfg
    return [
        RingKVCache(
            batch, sinks, window, cfg.n_kv_heads, cfg.headdim, positions=positions, dtype=model.head.weight.dtype
        )
        for _ in range(cfg.n_layers)
    ]


def rerotation_drift(k: torch.Tensor, steps: int, base: float = 10000.0) -> list[float]:
    """The other choice: a key ``(n, nheads_k, headdim)`` stored rotated at position ``steps`` and
    re-rotated back by one position ``steps`` times (once per slide of the window) against the
    same key rotated at position 0 directly. Returns the largest absolute difference after each
    re-rotation."""
    d = k.shape[-1]
    cos, sin = rotary_tables(steps + 1, d, base)
    back = (cos[1:2], -sin[1:2])  # a rotation by -1 position
    pos = torch.full((1, k.shape[0]), steps)
    stored = apply_rotary(k[None], cos, sin, pos)
    exact = k[None]
    drift = []
    for i in range(steps):
        stored = apply_rotary(stored, *back, torch.zeros_like(pos))
        want = apply_rotary(exact, cos, sin, torch.full_like(pos, steps - i - 1))
        drift.append(float((stored - want).abs().max()))
    return drift


STREAMS = ("dense", "window", "recompute", "sinks")


@torch.no_grad()
def stream_logits(model: TinyDecoder, tokens: torch.Tensor, sinks: int, window: int, positions: str = "cache"):
    """Feed ``tokens`` ``(batch, n)`` one at a time through ring caches of ``sinks + window``
    slots; returns the logits after each token ``(batch, n, vocab)`` and the rings (which never
    grow past ``sinks + window`` slots)."""
    rings = new_rings(model, tokens.shape[0], sinks, window, positions)
    cos, sin = rotary_tables(model.cfg.max_seqlen, model.cfg.headdim)
    ctx = RingContext(rings, cos.to(model.head.weight.dtype), sin.to(model.head.weight.dtype))
    out = []
    for t in range(tokens.shape[1]):
        where = t if positions == "absolute" else min(t, sinks + window - 1)
        pos = torch.full((tokens.shape[0], 1), where)
        out.append(model.run(tokens[:, t : t + 1], pos, ctx)[:, -1])
    return torch.stack(out, 1), rings


@torch.no_grad()
def stream_nll(model: TinyDecoder, tokens, how: str, sinks: int = 4, window: int = 60) -> torch.Tensor:
    """Per-token negative log-likelihood (nats) of ``tokens`` ``(n,)`` (tokens 1 .. n-1), predicted
    with: ``"dense"`` every earlier token, ``"window"`` a ring of the last ``sinks + window``
    tokens (no sinks), ``"recompute"`` the last ``sinks + window`` tokens run afresh for every
    prediction (positions from 0), ``"sinks"`` the first ``sinks`` tokens plus the last
    ``window``. All but ``"dense"`` hold ``sinks + window`` tokens."""
    if how not in STREAMS:
        raise ArgumentError(f"how must be one of {STREAMS}, got {how!r}")
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if tokens.dim() != 1 or tokens.numel() < 2:
        raise ArgumentError(f"tokens must be a 1-D stream of at least 2 ids, got shape {tuple(tokens.shape)}")
    if tokens.numel() > model.cfg.max_seqlen:
        raise ArgumentError(f"tokens: {tokens.numel()} ids, the model's rotary tables hold {model.cfg.max_seqlen}")
    budget = check_int("sinks", sinks, low=0) + check_int("window", window, low=1)
    if how == "dense":
        logits = model(tokens[None])[0]
    elif how == "window":
        logits = stream_logits(model, tokens[None], 0, budget)[0][0]
    elif how == "sinks":
        logits = stream_logits(model, tokens[None], sinks, window)[0][0]
    else:
        logits = model(tokens[None, :budget])[0]
        if tokens.numel() > budget:
            frames = tokens.unfold(0, budget, 1)[1:]  # the last `budget` tokens before each later prediction
            rest = torch.cat([model(frames[i : i + 64])[:, -1] for i in range(0, frames.shape[0], 64)])
            logits = torch.cat([logits, rest])
    logp = torch.log_softmax(logits[:-1].float(), -1)
    return -logp.gather(-1, tokens[1:, None])[:, 0]
