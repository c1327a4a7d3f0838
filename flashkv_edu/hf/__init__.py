"""flashkv_edu inside Hugging Face transformers (notebook 10): an attention implementation and a cache.

    from flashkv_edu import hf
    name = hf.register()                            # attn_implementation="fkv_edu"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=name)
    cache = hf.FlashKVCache(model.config, max_batch_size=4, max_cache_len=512, page_size=16)
    out = model.generate(ids, attention_mask=mask, **hf.cache_kwargs(cache), max_new_tokens=32)

transformers 5.24 renamed the cache argument of ``forward`` and ``generate`` from ``past_key_values``
to ``cache`` (the old name warns, and goes in 5.40 and 6.0): :func:`cache_kwargs` passes it under the
name the installed version takes.

What transformers passes to an attention function (after RoPE, after ``cache.update``): ``query``
``(batch, heads, q_len, head_dim)``, ``key``/``value`` ``(batch, kv_heads, kv_len, head_dim)``, the
padding ``attention_mask`` (2-D ``(batch, kv_len)`` bool, or None when nothing is padded, built by the
same mask function as FlashAttention 2's integration), ``scaling``, ``sliding_window`` (HF's ``W`` =
FlashAttention's ``window_size=(W - 1, 0)``), ``softcap`` and, for gpt-oss, the learnable sinks
``s_aux``. :func:`attention` maps them onto :func:`flashkv_edu.flash_attn_with_kvcache`: bottom-right
causal over each row's keys, left padding as ``cache_leftpad``.

:class:`FlashKVCache` is a thin adapter over the package's caches: one
:class:`~flashkv_edu.cache.KVCache` per layer (contiguous), or one
:class:`~flashkv_edu.paged.PagedKVCache` whose block tables serve every layer (paged). With this
module's attention its ``update`` writes nothing: it hands the new keys to the attention function,
which checks the call, writes them through the package's one write path and reads the cache in place.
transformers is an optional dependency: ``pip install 'flashkv_edu[hf]'``.

The package's files: ``compat`` (names, the installed transformers, the cache argument),
``attention`` (the attention function), ``handoff`` (update -> attention), ``cache``
(``FlashKVCache``), ``patches`` (every change to transformers' internals, labelled PATCH),
``register``, ``serve`` (continuous batching, the local loader).
"""

from __future__ import annotations

from .attention import attention  # noqa: I001
from .cache import FlashKVCache, FlashKVLayer
from .compat import ALIAS, CACHE_ARGUMENT, NAME, cache_kwargs, transformers  # first: ImportError without transformers
from .register import register
from .serve import load_local, serve

__all__ = [
    "ALIAS",
    "CACHE_ARGUMENT",
    "NAME",
    "FlashKVCache",
    "FlashKVLayer",
    "attention",
    "cache_kwargs",
    "load_local",
    "register",
    "serve",
    "transformers",
]
