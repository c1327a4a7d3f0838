"""flashkv_edu inside Hugging Face transformers (notebook 10): an attention implementation and a cache.

    from flashkv_edu import hf
    name = hf.register()                            # attn_implementation="fkv_edu"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=name)
    cache = hf.FlashKVCache(model.config, max_batch_size=4, max_cache_len=512, page_size=16)
    out = model.generate(ids, attention_mask=mask, **hf.cache_kwargs(cache), max_new_tokens=32)

:func:`attention` maps transformers' attention-function arguments onto
:func:`flashkv_edu.flash_attn_with_kvcache`; :class:`FlashKVCache` is a thin adapter over the
package's caches whose ``update`` hands the new keys to that attention, which writes them through the
package's one write path. transformers is an optional dependency: ``pip install 'flashkv_edu[hf]'``.

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
