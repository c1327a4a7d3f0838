"""How a FlashKVCache hands a layer's new keys to the attention function, unwritten.

transformers calls ``cache.update(key, value, layer_idx)`` and then the attention function with
what ``update`` returned. With flashkv_edu's attention, :meth:`FlashKVCache.update_layer` writes
nothing: it records ``(cache, key, value, layer)`` under ``id(key)`` here, and the attention function
takes it back (the same tensor objects), writes the keys and attends in one checked call.
"""

from __future__ import annotations

import weakref

from ..validation import ArgumentError
from .compat import NAME

# New keys handed from FlashKVCache.update to attention: id(key) -> (cache, key, value, layer).
PENDING: dict[int, tuple] = {}
# New keys already written and attended to: id(key) -> (weak key, weak cache, layer). A second attention over
# them is a layer that shares the first one's keys and values (Gemma 3n): it reads that layer's cache.
CONSUMED: dict[int, tuple] = {}


def hand_over(cache, key_states, value_states, layer: int) -> None:
    """Leave layer ``layer``'s new keys for the attention function (dropping any the layer left in
    a pass that never reached attention)."""
    for entry_key, entry in list(PENDING.items()):
        if entry[0] is cache and entry[3] == layer:
            del PENDING[entry_key]
    PENDING[id(key_states)] = (cache, key_states, value_states, layer)


def forget(cache) -> None:
    """Drop every key ``cache`` handed over that no attention took yet (the cache was reset)."""
    for entry_key, entry in list(PENDING.items()):
        if entry[0] is cache:
            del PENDING[entry_key]
    for entry_key, entry in list(CONSUMED.items()):
        if entry[1]() is cache:
            del CONSUMED[entry_key]


def take(key, value):
    """``(cache, layer)`` when ``key``/``value`` are what a cache handed over (marking them consumed),
    else None."""
    pending = PENDING.pop(id(key), None)
    if pending is None or pending[1] is not key or pending[2] is not value:
        return None
    for entry_key, (held, owner, layer) in list(CONSUMED.items()):  # one record per (cache, layer), none dead
        if held() is None or owner() is None or (owner() is pending[0] and layer == pending[3]):
            del CONSUMED[entry_key]
    CONSUMED[id(key)] = (weakref.ref(key), weakref.ref(pending[0]), pending[3])
    return pending[0], pending[3]


def consumed_by(key):
    """``(cache, layer)`` when ``key`` was handed over and attended to already (another layer that
    shares its keys and values reads them: Gemma 3n), else None."""
    entry = CONSUMED.get(id(key))
    if entry is None or entry[0]() is not key or entry[1]() is None:
        return None
    return entry[1](), entry[2]


def settle_transformed(module, key, attention_mask, device) -> None:
    """The dense path met a key that is not what a FlashKVCache handed out. If a cache still holds
    unwritten keys for this layer, the model transformed them before attention (DeepSeek's MLA
    caches latents and expands them after ``update``): on that cache's first pass nothing else
    is cached, so the model's keys are the whole history. The pending latents are written now and
    the cache switches that layer to transformers' way (write in ``update``, return the history).
    Later on, an in-place layer meeting such a key is an error, never a silent wrong result."""
    layer_idx = getattr(module, "layer_idx", None)
    waiting = [(k, e) for k, e in PENDING.items() if layer_idx is None or e[3] == layer_idx]
    if not waiting:
        return
    if layer_idx is None:
        raise ArgumentError(f"{NAME} attention cannot tell which cache layer this module is (it has no layer_idx)")
    for entry_key, (cache, key_states, value_states, i) in waiting:
        del PENDING[entry_key]
        cache.settle_layer(i, key_states, value_states, attention_mask, device)


__all__ = ["CONSUMED", "PENDING", "consumed_by", "forget", "hand_over", "settle_transformed", "take"]
