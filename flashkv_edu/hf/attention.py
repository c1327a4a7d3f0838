"""transformers' attention-function interface over :func:`flashkv_edu.flash_attn_with_kvcache`.

What transformers passes to an attention function (after RoPE, after ``cache.update``): ``query``
``(batch, heads, q_len, head_dim)``, ``key``/``value`` ``(batch, kv_heads, kv_len, head_dim)``, the
padding ``attention_mask`` (2-D ``(batch, kv_len)`` bool, or None when nothing is padded, built by the
same mask function as FlashAttention 2's integration), ``scaling``, ``sliding_window`` (HF's ``W`` =
FlashAttention's ``window_size=(W - 1, 0)``), ``softcap`` and, for gpt-oss, the learnable sinks
``s_aux``. :func:`attention` maps them onto :func:`flashkv_edu.flash_attn_with_kvcache`: bottom-right
causal over each row's keys, left padding as ``cache_leftpad``.
"""

from __future__ import annotations

import weakref

import torch

from ..api import run_checked_call
from ..call import check_kvcache_call
from ..validation import ArgumentError, check_int, check_positive, check_tensor
from .compat import ATTENTION_LAYER_TYPES, BACKEND, NAME
from .handoff import consumed_by, settle_transformed, take

# Keyword arguments transformers passes that do not change the result of attention here.
HARMLESS_KWARGS = frozenset(
    {
        "position_ids",
        "cache_position",
        "use_cache",
        "output_attentions",
        "output_router_logits",
        "position_embeddings",
        "layer_idx",
    }
)


def left_padding(attention_mask, batch: int, kv_len: int, device) -> torch.Tensor | None:
    """Leading masked columns of each row of a 2-D padding mask ``(batch, kv_len)`` (None: no
    padding). Only left padding is FlashAttention's ``cache_leftpad``: anything else is refused."""
    if attention_mask is None:
        return None
    check_tensor("attention_mask", attention_mask)
    if attention_mask.dim() != 2:
        raise ArgumentError(
            f"the {NAME} attention takes transformers' 2-D padding mask, got shape {tuple(attention_mask.shape)}; "
            f"call flashkv_edu.hf.register() before building the model"
        )
    if tuple(attention_mask.shape) != (batch, kv_len):
        raise ArgumentError(
            f"attention_mask must have shape (batch, kv_len) = {(batch, kv_len)} (one column per cached or new "
            f"token), got {tuple(attention_mask.shape)}"
        )
    mask = attention_mask.to(device=device, dtype=torch.bool)
    pads = (mask.int().cumsum(-1) == 0).sum(-1)
    if bool((mask.sum(-1) != mask.shape[1] - pads).any()):
        raise ArgumentError(f"{NAME} supports left padding only (FlashAttention's cache_leftpad)")
    return pads.to(torch.int32) if bool(pads.any()) else None


# Padding masks built for Llama 4's chunked layers: id(mask) -> (weak mask, kv_offset, left pads (batch,)).
_CHUNK_MASKS: dict[int, tuple] = {}


def padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
    """transformers' mask function for :data:`NAME`: FlashAttention 2's 2-D padding mask ``(batch,
    kv_length)`` (None: nothing padded). For layers with a local size (``local_size``: sliding
    windows and Llama 4's chunks) a ``DynamicCache`` hands the attention only the last keys,
    starting at position ``kv_offset``: the mask is then always a tensor, and where its keys start
    (``kv_offset``, each row's left padding) is recorded for :func:`chunk_leftpad`, which aligns a
    chunked layer's chunks (a sliding layer needs no record: its window is relative)."""
    from transformers.masking_utils import flash_attention_mask

    mask = flash_attention_mask(
        batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask=attention_mask, **kwargs
    )
    if kwargs.get("local_size") is None:
        return mask
    device = kwargs.get("device", "cpu") if attention_mask is None else attention_mask.device
    if mask is None:
        mask = torch.ones(batch_size, kv_length, dtype=torch.bool, device=device)
    if attention_mask is None:
        pads = torch.zeros(batch_size, dtype=torch.int64, device=device)
    else:
        pads = (attention_mask.to(torch.bool).int().cumsum(-1) == 0).sum(-1)
    for entry_key, entry in list(_CHUNK_MASKS.items()):
        if entry[0]() is None:
            del _CHUNK_MASKS[entry_key]
    _CHUNK_MASKS[id(mask)] = (weakref.ref(mask), int(kv_offset), pads)
    return mask


def chunk_leftpad(attention_mask, chunk: int, module) -> torch.Tensor | None:
    """``cache_leftpad`` for a chunked layer attending to the keys a ``DynamicCache`` returned, which
    start at position ``kv_offset`` of the left-padded sequence (row ``b`` padded by ``P_b``).
    FlashAttention 3 numbers chunks from ``cache_leftpad``: ``(P_b - kv_offset) mod chunk`` keeps
    every key in its chunk. Where the window still holds padding that is exactly the padding;
    otherwise the keys it hides lie in chunks before every query's. None: nothing to shift."""
    entry = _CHUNK_MASKS.get(id(attention_mask)) if attention_mask is not None else None
    if entry is None or entry[0]() is not attention_mask:
        raise ArgumentError(
            f"layer {getattr(module, 'layer_idx', '?')} is chunked attention (Llama 4): with transformers' "
            f"DynamicCache, {NAME} needs the padding mask its own mask function built (call "
            "flashkv_edu.hf.register() before building the model) to know where the keys start; or use "
            "hf.FlashKVCache"
        )
    _, kv_offset, pads = entry
    shift = pads.to(torch.int64) - kv_offset
    shift = torch.where(shift >= 0, shift, shift % chunk).to(torch.int32)
    return shift if bool(shift.any()) else None


_OPTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> (arguments, options)


def attention_options(module, scaling, dropout, sliding_window, softcap, kwargs) -> dict:
    """transformers' attention arguments as ``flash_attn_with_kvcache`` keywords, every one checked:
    an argument that would change the result and is not implemented raises, naming it. A layer
    passes the same arguments at every step: their checked options are kept per module (not
    with a learnable sink, a tensor that may change)."""
    arguments = None
    if "s_aux" not in kwargs:
        given = tuple(sorted(k for k, v in kwargs.items() if v is not None))
        arguments = (scaling, dropout, sliding_window, softcap, kwargs.get("is_causal"), given, BACKEND["name"])
        try:
            kept = _OPTIONS.get(module)
        except TypeError:  # a module that cannot be weakly referenced (None in a direct call)
            arguments = kept = None
        if kept is not None and kept[0] == arguments:
            return kept[1]
    options = check_attention_options(module, scaling, dropout, sliding_window, softcap, dict(kwargs))
    if arguments is not None:
        _OPTIONS[module] = (arguments, options)
    return options


def check_attention_options(module, scaling, dropout, sliding_window, softcap, kwargs) -> dict:
    """:func:`attention_options` without the memory."""
    if dropout:
        raise ArgumentError(f"{NAME} attention has no dropout (got dropout={dropout}); use model.eval()")
    config = getattr(module, "config", None)
    layer_types = getattr(config, "layer_types", None)
    layer_idx = getattr(module, "layer_idx", None)
    chunk = 0
    if layer_types and isinstance(layer_idx, int) and layer_idx < len(layer_types):
        kind = layer_types[layer_idx]
        if kind not in ATTENTION_LAYER_TYPES:
            raise ArgumentError(f"{NAME} attention serves {ATTENTION_LAYER_TYPES}; layer {layer_idx} is {kind!r}")
        if kind == "chunked_attention":  # Llama 4: keys of the query's own chunk of positions only
            chunk = check_int(
                "attention_chunk_size (the model's)", getattr(config, "attention_chunk_size", None), low=1
            )
    sink = kwargs.pop("s_aux", None)  # gpt-oss's learnable sinks, one logit per query head
    if kwargs.get("is_causal") is False:
        raise ArgumentError(f"{NAME} attention is causal (a decoder's); got is_causal=False (an encoder?)")
    unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in HARMLESS_KWARGS | {"is_causal"})
    if unknown:
        raise ArgumentError(
            f"{NAME} attention does not implement {', '.join(unknown)}: refusing rather than ignoring "
            "what would change the result"
        )
    if sliding_window is not None:
        sliding_window = check_int("sliding_window (the model's)", sliding_window, low=1)
    window = (sliding_window - 1, 0) if sliding_window else (-1, -1)
    scale = None if scaling is None else check_positive("scaling (the model's)", scaling)
    cap = check_positive("softcap (the model's)", float(softcap or 0.0), allow_zero=True)
    options = dict(softmax_scale=scale, causal=True, window_size=window, softcap=cap, backend=BACKEND["name"])
    if chunk:
        options["attention_chunk"] = chunk
    if sink is not None:
        options["learnable_sink"] = sink.detach()
    return options


def attention(
    module,
    query,
    key,
    value,
    attention_mask,
    scaling=None,
    dropout=0.0,
    sliding_window=None,
    softcap=None,
    **kwargs,
):
    """transformers' attention-function interface over :func:`flash_attn_with_kvcache`.
    Returns ``(out (batch, q_len, heads, head_dim_v), None)``.

    With a :class:`FlashKVCache` the new keys arrive here unwritten: they are written into the
    cache and attention reads the cache in place. With any other cache (``DynamicCache``) ``key``
    and ``value`` are the whole history."""
    options = attention_options(module, scaling, dropout, sliding_window, softcap, kwargs)
    check_tensor("query", query, ndim=4)
    q = query.transpose(1, 2)
    handed = take(key, value)
    if handed is not None:
        cache, layer_idx = handed
        return cache.attend_layer(layer_idx, q, key, value, attention_mask, options), None
    check_tensor("key", key, ndim=4)
    check_tensor("value", value, ndim=4)
    shared = consumed_by(key)
    if shared is not None:  # a layer reading another layer's keys and values (Gemma 3n's KV sharing)
        cache, layer_idx = shared
        return cache.read_layer(layer_idx, q, attention_mask, options), None
    settle_transformed(module, key, attention_mask, q.device)
    k, v = key.transpose(1, 2), value.transpose(1, 2)
    b, kv_len = q.shape[0], k.shape[1]
    pad = left_padding(attention_mask, b, kv_len, q.device)
    if "attention_chunk" in options:  # Llama 4 over a DynamicCache: the keys start at kv_offset
        pad = chunk_leftpad(attention_mask, options["attention_chunk"], module)
    seqlens = torch.full((b,), kv_len, dtype=torch.int32, device=q.device)
    return checked_attention(q, k, v, cache_seqlens=seqlens, cache_leftpad=pad, **options), None


def checked_attention(q, k_cache, v_cache, **arguments):
    """``flash_attn_with_kvcache(q, k_cache, v_cache, **arguments)`` through the one checked call,
    which also takes FlashAttention 3's keywords (``attention_chunk``): the output."""
    call = check_kvcache_call(q, k_cache, v_cache, **arguments)
    return run_checked_call(call, q, k_cache, v_cache, arguments.get("k"), arguments.get("v"))[0]


__all__ = [
    "HARMLESS_KWARGS",
    "attention",
    "attention_options",
    "check_attention_options",
    "checked_attention",
    "chunk_leftpad",
    "left_padding",
    "padding_mask",
]
