"""``register()``: flashkv_edu's attention under ``attn_implementation="fkv_edu"``."""

from __future__ import annotations

from ..validation import check_backend
from .attention import attention, padding_mask
from .compat import ALIAS, BACKEND, NAME
from .patches import serve_falcon, skip_flash_kernel_preload


def register(backend: str = "auto") -> str:
    """Register the attention function (and FlashAttention 2's padding-mask builder, which also records where
    Llama 4's chunked layers' keys start) under
    :data:`NAME` (and the earlier :data:`ALIAS`); ``backend`` is the :func:`flash_attn_with_kvcache`
    backend it uses. Returns the name to pass as ``attn_implementation``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    BACKEND["name"] = check_backend(backend)
    for name in (NAME, ALIAS):
        AttentionInterface.register(name, attention)
        AttentionMaskInterface.register(name, padding_mask)
    skip_flash_kernel_preload()
    serve_falcon()
    return NAME


__all__ = ["register"]
