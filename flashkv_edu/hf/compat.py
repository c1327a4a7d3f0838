"""What flashkv_edu.hf needs to know of the installed transformers: its names, the cache argument.

transformers is an optional dependency (``pip install 'flashkv_edu[hf]'``); importing
:mod:`flashkv_edu.hf` without it raises ImportError with :data:`INSTALL_HINT`. transformers 5.24
renamed the cache argument of ``forward`` and ``generate`` from ``past_key_values`` to ``cache``:
:func:`cache_kwargs` passes it under the name the installed release takes.
"""

from __future__ import annotations

NAME = "fkv_edu"
"""The attention implementation :func:`register` adds. Not "flashkv_edu": transformers treats any
name that contains "flash" as a FlashAttention kernel and takes other code paths for it (Falcon
and gpt-oss fail there), so the name leaves that word out."""
ALIAS = "flashkv_edu"
"""The earlier name, still registered where this transformers allows it (see :func:`register`)."""
INSTALL_HINT = (
    "flashkv_edu.hf needs Hugging Face transformers: pip install 'flashkv_edu[hf]' "
    "(or: pip install transformers). `python3 run.py lab` and `python3 run.py test` install it."
)

try:
    import transformers
    from transformers import cache_utils  # noqa: F401  (FlashKVCache's base classes)
except ImportError as exc:  # the rest of the package works without transformers
    raise ImportError(INSTALL_HINT) from exc

ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
"""The ``config.layer_types`` a :class:`FlashKVCache` and :func:`attention` serve (chunked
attention, Llama 4's, as FlashAttention 3's ``attention_chunk``). Others (linear attention,
convolutions) are refused with a message naming the type."""


def release(version: str) -> tuple[int, ...]:
    from packaging.version import Version

    return Version(version).release


CACHE_ARGUMENT = "cache" if release(transformers.__version__) >= (5, 24) else "past_key_values"
"""The keyword under which the installed transformers' ``forward`` and ``generate`` take a cache."""


def cache_kwargs(cache) -> dict:
    """``{CACHE_ARGUMENT: cache}``: ``model.generate(ids, **hf.cache_kwargs(cache))`` passes the cache
    under the name the installed transformers takes (``cache`` from 5.24, ``past_key_values`` before),
    so neither end of the supported range warns."""
    return {CACHE_ARGUMENT: cache}


BACKEND = {"name": "auto"}
"""The ``flash_attn_with_kvcache`` backend the registered attention uses (set by ``register``)."""

__all__ = [
    "ALIAS",
    "ATTENTION_LAYER_TYPES",
    "BACKEND",
    "CACHE_ARGUMENT",
    "INSTALL_HINT",
    "NAME",
    "cache_kwargs",
    "release",
    "transformers",
]
