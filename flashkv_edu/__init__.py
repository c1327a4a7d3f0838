"""flashkv_edu: FlashAttention's KV-cache inference, built step by step.

``runtime`` is imported first: it picks the device and switches Triton's interpreter on for
CPU-only machines before any kernel is defined.
"""

from . import runtime
from .api import flash_attn_with_kvcache
from .reference import attention_mask, attention_ref, key_visibility
from .runtime import DEVICE, HAS_TRITON, INTERPRET, setup_notebook

__version__ = "0.1.0"

__all__ = [
    "DEVICE",
    "HAS_TRITON",
    "INTERPRET",
    "attention_mask",
    "attention_ref",
    "flash_attn_with_kvcache",
    "key_visibility",
    "runtime",
    "setup_notebook",
]
