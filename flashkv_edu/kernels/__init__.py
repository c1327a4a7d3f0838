"""Triton kernels (notebooks 05-07). On a machine without a GPU they run through Triton's
interpreter (switched on by :mod:`flashkv_edu.runtime` before these modules are imported);
``python -m flashkv_edu.kernels.gpucheck`` compiles every one of them for sm_80 and sm_90."""

from .combine import combine_splits
from .decode import decode_attention_triton
from .forward import attention_triton

__all__ = ["attention_triton", "combine_splits", "decode_attention_triton"]
