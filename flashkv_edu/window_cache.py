"""The sliding-window cache bug, reproduced and fixed (notebook 03).

All caches here speak the Hugging Face / flash-linear-attention (FLA) interface::

    keys, values = cache.update(key_states, value_states, layer_idx, cache_kwargs=None)

with tensors ``(batch, seqlen, nheads_k, headdim)`` (sequence on dim 1, FLA's layout), plus
``get_seq_length(layer_idx)`` (tokens seen) and ``stored_length(layer_idx)`` (tokens kept).
A sliding window of ``W`` tokens (the current one included) is ``window_size=(W - 1, 0)`` in
FlashAttention terms; ``cache_kwargs={"window_size": W}`` in FLA's.

The ``Replica…`` classes are small, faithful re-creations of the behaviour of historical FLA
releases, each keeping exactly the control flow that caused its failure (see the notebook and
the project's reference notes for the history). They are for teaching; do not use them.
:class:`SlidingWindowCache` is the fixed cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .validation import ArgumentError, ArgumentTypeError, check_int, check_same, check_tensor

__all__ = [
    "ReplicaPre910",
    "ReplicaV01",
    "ReplicaV020",
    "SlidingWindowCache",
    "Trace",
    "position_chunk",
    "run_chunks",
    "window_update",
]


class _LayeredCache:
    """Per-layer ``(k, v)`` state and per-layer seen-token counters."""

    def __init__(self):
        self.states: dict[int, object] = {}
        self.seen: dict[int, int] = {}

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens this layer has seen (the logical position), not the number stored."""
        return self.seen.get(layer_idx, 0)

    def stored_length(self, layer_idx: int = 0) -> int:
        """Tokens this layer keeps in memory."""
        state = self.states.get(layer_idx)
        return 0 if state is None else int(state[0].shape[1])

    def _count(self, layer_idx: int, n: int) -> None:
        self.seen[layer_idx] = self.seen.get(layer_idx, 0) + n


# --- replicas of historical behaviour ------------------------------------------------------


class ReplicaV01(_LayeredCache):
    """FLA v0.1.x (the code of the 'KV Cache exploded' report).

    * ``cache_kwargs.get(...)`` with the default ``cache_kwargs=None`` raises AttributeError.
    * The cache rolls only when its length is **exactly** the window: once a multi-token chunk
      jumps past W, the test never matches again and the cache grows without bound.
    """

    def update(self, key_states, value_states, layer_idx=0, cache_kwargs=None):
        self._count(layer_idx, key_states.shape[1])
        window = cache_kwargs.get("window_size", None)  # crashes when cache_kwargs is None
        n = key_states.shape[1]
        if layer_idx not in self.states:
            if window is not None and n > window:
                key_states, value_states = key_states[:, -window:], value_states[:, -window:]
            self.states[layer_idx] = (key_states, value_states)
        else:
            k, v = self.states[layer_idx]
            if window is not None and k.shape[1] == window:  # equality test: the bug
                k, v = k.roll(-n, 1), v.roll(-n, 1)
                k[:, -n:], v[:, -n:] = key_states, value_states
                self.states[layer_idx] = (k, v)
            else:
                self.states[layer_idx] = (torch.cat([k, key_states], 1), torch.cat([v, value_states], 1))
        return self.states[layer_idx]


class ReplicaV020(_LayeredCache):
    """FLA v0.2.0-v0.2.1.

    * ``cache_kwargs=None`` now means "no window": a sliding-window layer whose caller forgets
      to pass its window silently becomes a full-attention cache that grows forever.
    * After a roll, a mis-indented assignment stores the *input* (just the new tokens) as the
      cache, so context is lost every W steps.
    * A prefill of exactly W tokens is stored as the caller's tuple, and the in-place roll
      then fails with ``TypeError: 'tuple' object does not support item assignment``.
    """

    def update(self, key_states, value_states, layer_idx=0, cache_kwargs=None):
        if cache_kwargs is None:
            cache_kwargs = {}
        window = cache_kwargs.get("window_size", None)
        self._count(layer_idx, key_states.shape[1])
        attn_state = (key_states, value_states)
        n = key_states.shape[1]
        if layer_idx not in self.states:
            if window is not None and n > window:
                attn_state = [s[:, -window:] for s in attn_state]
            self.states[layer_idx] = attn_state
            return self.states[layer_idx]
        state = self.states[layer_idx]
        if window is not None and state[0].shape[1] == window:
            for i, new in enumerate(attn_state):
                state[i] = state[i].roll(-n, 1)  # TypeError when state is a tuple
                state[i][:, -n:] = new
        else:
            attn_state = [torch.cat([old, new], 1) for old, new in zip(state, attn_state, strict=True)]
        self.states[layer_idx] = attn_state  # mis-indented: after a roll this is the new tokens only
        return self.states[layer_idx]


class ReplicaPre910(_LayeredCache):
    """FLA v0.3.1-v0.5.0 per-layer cache (``FLALayer`` before PR #910).

    The window is read from ``cache_kwargs`` on every call and ``>=`` triggers the roll, but a
    chunk that carries a short cache past W is concatenated without trimming, and a roll keeps
    the length it found (writing at most the chunk's last W tokens into its tail): the cache is
    stuck at W + 1 (or more) tokens.
    """

    def update(self, key_states, value_states, layer_idx=0, cache_kwargs=None):
        window = (cache_kwargs or {}).get("window_size")
        self._count(layer_idx, key_states.shape[1])
        n = key_states.shape[1]
        if layer_idx not in self.states:
            if window is not None and n > window:
                key_states, value_states = key_states[:, -window:], value_states[:, -window:]
            self.states[layer_idx] = (key_states, value_states)
            return self.states[layer_idx]
        k, v = self.states[layer_idx]
        if window is not None and k.shape[1] >= window:
            k, v = k.roll(-n, 1), v.roll(-n, 1)  # the length found is kept: the bug
            k_tail, v_tail = key_states[:, -window:], value_states[:, -window:]
            k[:, -k_tail.shape[1] :], v[:, -v_tail.shape[1] :] = k_tail, v_tail
        else:
            k, v = torch.cat([k, key_states], 1), torch.cat([v, value_states], 1)  # no trim: the bug
        self.states[layer_idx] = (k, v)
        return self.states[layer_idx]


# --- the fix -----------------------------------------------------------------------------


def window_update(cached: torch.Tensor, new: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sliding-window step for a ``(batch, seqlen, ...)`` tensor (sequence on dim 1).

    Returns ``(stored, visible)``: ``stored`` is the last ``window`` tokens of
    ``cached + new`` (a copy, so it never pins a long chunk in memory); ``visible`` is what the
    new tokens' queries may attend to: the last ``window - 1`` cached tokens and all of ``new``.
    """
    keep = min(window - 1, cached.shape[1])
    visible = torch.cat([cached[:, cached.shape[1] - keep :], new], 1)
    return visible[:, -window:].clone(), visible


class SlidingWindowCache(_LayeredCache):
    """A per-layer KV cache that keeps at most ``W`` tokens for sliding-window layers.

    * The window comes from ``cache_kwargs["window_size"]`` (or ``default_window``) on a
      layer's first update and **sticks** to that layer; later calls may omit
      ``cache_kwargs``. Passing a different window later raises ``ValueError``.
    * ``update`` returns the keys/values the *new* queries may see: up to ``W - 1`` earlier
      tokens plus the whole new chunk (so a prefill longer than W still attends within
      itself). Attend over them with ``window_size=(W - 1, 0)``.
    * It stores the last ``W`` tokens (copied, so a long prefill is not kept alive by a view),
      and counts every token seen separately (``get_seq_length``), which positions need.
    * ``window_size=None`` means full attention: everything is kept and returned.
    """

    def __init__(self, default_window: int | None = None):
        super().__init__()
        self.default_window = self._check_window(default_window)
        self.windows: dict[int, int | None] = {}

    @staticmethod
    def _check_window(window):
        if window is None:
            return None
        return check_int("window_size (None, or the tokens kept, current one included)", window, low=1)

    def window(self, layer_idx: int = 0) -> int | None:
        """The window of ``layer_idx`` (None = full attention)."""
        return self.windows.get(layer_idx, self.default_window)

    def _check_states(self, key_states, value_states, layer_idx):
        check_tensor("key_states", key_states, ndim=4)
        check_tensor("value_states", value_states, ndim=4)
        if key_states.shape != value_states.shape:
            raise ArgumentError(
                f"key_states and value_states must have the same shape, got "
                f"{tuple(key_states.shape)} and {tuple(value_states.shape)}"
            )
        check_same(("key_states", "value_states"), (key_states, value_states), "dtype")
        check_int("layer_idx", layer_idx, low=0)
        old = self.states.get(layer_idx)
        if old is not None:
            k = old[0]
            if (k.shape[0], *k.shape[2:]) != (key_states.shape[0], *key_states.shape[2:]):
                raise ArgumentError(
                    f"key_states must be (batch={k.shape[0]}, seqlen, nheads_k={k.shape[2]}, "
                    f"headdim={k.shape[3]}) for layer {layer_idx}, got {tuple(key_states.shape)}"
                )
            check_same(("cached keys", "key_states"), (k, key_states), "dtype")
            check_same(("cached keys", "key_states"), (k, key_states), "device")

    def update(self, key_states, value_states, layer_idx=0, cache_kwargs=None):
        """Add ``n`` new tokens; return the ``(keys, values)`` the new queries may attend to."""
        self._check_states(key_states, value_states, layer_idx)
        if cache_kwargs is not None and not isinstance(cache_kwargs, dict):
            raise ArgumentTypeError(f"cache_kwargs must be a dict or None, got {type(cache_kwargs).__name__}")
        window = self.window(layer_idx)
        if cache_kwargs and "window_size" in cache_kwargs:
            given = self._check_window(cache_kwargs["window_size"])
            if layer_idx in self.states and given != window:
                raise ArgumentError(
                    f"window_size of layer {layer_idx} changed from {window} to {given}; "
                    "a layer's window is fixed once it holds tokens"
                )
            window = given
        self.windows[layer_idx] = window
        old = self.states.get(layer_idx)
        self._count(layer_idx, key_states.shape[1])
        if old is None:
            old = (key_states[:, :0], value_states[:, :0])
        if window is None:
            keys = torch.cat([old[0], key_states], 1)
            values = torch.cat([old[1], value_states], 1)
            self.states[layer_idx] = (keys, values)
            return keys, values
        stored_k, keys = window_update(old[0], key_states, window)
        stored_v, values = window_update(old[1], value_states, window)
        self.states[layer_idx] = (stored_k, stored_v)
        return keys, values

    def reset(self) -> None:
        """Forget every layer's tokens, counters and windows."""
        self.states.clear()
        self.seen.clear()
        self.windows.clear()


# --- driving a cache step by step -----------------------------------------------------------


def position_chunk(start: int, n: int, *, nheads_k: int = 1, headdim: int = 2) -> torch.Tensor:
    """Keys whose values are their token positions ``start .. start+n-1``: ``(1, n, nheads_k, headdim)``.
    Reading a cache built from these shows exactly which positions it holds."""
    return torch.arange(start, start + n, dtype=torch.float32)[None, :, None, None].expand(1, n, nheads_k, headdim)


@dataclass
class Trace:
    """What a cache held after each update: stored lengths, seen counts, stored positions, the
    positions ``update`` returned for the new queries to attend over, and the error that
    stopped the run (if any)."""

    stored: list[int] = field(default_factory=list)
    seen: list[int] = field(default_factory=list)
    contents: list[list[int]] = field(default_factory=list)
    visible: list[list[int]] = field(default_factory=list)
    error: str | None = None


def run_chunks(cache, chunks, window: int | None, *, pass_window: str = "always", reappend: bool = False) -> Trace:
    """Feed chunks of ``chunks[i]`` new tokens to ``cache.update`` on layer 0 and record a Trace.

    ``pass_window``: ``"always"`` passes ``cache_kwargs={"window_size": window}`` on every call,
    ``"first"`` only on the first, ``"never"`` leaves ``cache_kwargs`` out (None).
    ``reappend=True`` mimics a buggy caller that concatenates the returned cache with the new
    tokens and passes *that* to ``update`` (the misuse that doubles the cache every step).
    """
    trace = Trace()
    pos = 0
    returned = None
    for step, n in enumerate(chunks):
        new = position_chunk(pos, n)
        pos += n
        if reappend and returned is not None:
            new = torch.cat([returned, new], 1)
        wants = pass_window == "always" or (pass_window == "first" and step == 0)
        kwargs = {"window_size": window} if wants else None
        try:
            returned, _ = cache.update(new, new.clone(), 0, kwargs)
        except Exception as exc:  # the replicas crash in instructive ways
            trace.error = f"{type(exc).__name__}: {exc}"
            break
        trace.stored.append(cache.stored_length(0))
        trace.seen.append(cache.get_seq_length(0))
        trace.contents.append(cache.states[0][0][0, :, 0, 0].long().tolist())
        trace.visible.append(returned[0, :, 0, 0].long().tolist())
    return trace
