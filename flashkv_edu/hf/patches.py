"""Every change flashkv_edu makes to transformers' internals, each labelled PATCH.

transformers offers public registries for attention functions and mask builders
(``AttentionInterface``, ``AttentionMaskInterface``; used in :mod:`flashkv_edu.hf.register`). Two
things have no public route, and are patched here, only when :func:`~flashkv_edu.hf.register` runs:
Falcon's inline attention (a sibling class registered in Falcon's own table) and the FlashAttention
kernel preload that transformers starts for any implementation whose name contains "flash".
"""

from __future__ import annotations

from ..validation import ArgumentError
from .attention import attention
from .compat import ALIAS, NAME


def serve_falcon() -> None:
    """PATCH of transformers internals (``modeling_falcon.FALCON_ATTENTION_CLASSES``, transformers
    before 5.25; from 5.25 on Falcon calls the attention interface and nothing is patched).

    Falcon computes attention inline (eager or SDPA) and picks its attention class from a table
    keyed by the implementation name, ``FALCON_ATTENTION_CLASSES``; it never calls an attention
    function, so there is no public route in. For :data:`NAME` the table gets
    :class:`FalconAttention` 's sibling below, which projects, rotates and caches exactly as
    Falcon does and then calls :func:`attention`."""
    try:
        from transformers.models.falcon import modeling_falcon as mf
    except ImportError:  # pragma: no cover - a transformers without Falcon
        return
    table = getattr(mf, "FALCON_ATTENTION_CLASSES", None)
    if table is None or NAME in table:  # transformers >= 5.25: Falcon calls the attention interface itself
        return

    class FalconFlashKVAttention(mf.FalconAttention):
        def forward(
            self,
            hidden_states,
            alibi,
            attention_mask,
            position_ids=None,
            layer_past=None,
            use_cache=False,
            output_attentions=False,
            position_embeddings=None,
            **kwargs,
        ):
            if alibi is not None:
                raise ArgumentError(f"{NAME} serves Falcon with rotary positions; this one uses ALiBi (alibi=True)")
            if output_attentions:
                raise ArgumentError(f"{NAME} attention returns no attention weights (output_attentions=True)")
            q, k, v = self._split_heads(self.query_key_value(hidden_states))
            b, s = q.shape[:2]
            kv_heads = self.num_heads if self.new_decoder_architecture else self.num_kv_heads
            q = q.transpose(1, 2).reshape(b, self.num_heads, s, self.head_dim)
            k = k.transpose(1, 2).reshape(b, kv_heads, s, self.head_dim)
            v = v.transpose(1, 2).reshape(b, kv_heads, s, self.head_dim)
            cos, sin = position_embeddings
            q, k = mf.apply_rotary_pos_emb(q, k, cos, sin)
            if layer_past is not None:
                k, v = layer_past.update(k, v, self.layer_idx)
            dropout = self.config.attention_dropout if self.training else 0.0
            out, _ = attention(self, q, k, v, attention_mask, scaling=self.head_dim**-0.5, dropout=dropout)
            return self.dense(out.reshape(b, s, self.num_heads * self.head_dim)), None

    table[NAME] = FalconFlashKVAttention


def skip_flash_kernel_preload() -> None:
    """PATCH of transformers internals (``modeling_flash_attention_utils._lazy_imports``).

    For the alias "flashkv_edu" only: transformers treats every implementation whose name
    contains "flash" as a FlashAttention kernel and preloads one (from the ``flash_attn`` package
    or its kernel hub) when a model is built; its loader is told to load nothing for the alias.
    :data:`NAME` needs none of this (and where the loader differs, the alias is simply not served)."""
    from transformers import modeling_flash_attention_utils as fa_utils

    load = getattr(fa_utils, "_lazy_imports", None)
    if load is None or getattr(load, "_flashkv_wrapped", False) or not hasattr(fa_utils, "_process_flash_kwargs_fn"):
        return

    def lazy_imports(implementation, *args, **kwargs):
        if implementation == ALIAS:
            return None, None, None, fa_utils._pad_input, fa_utils._unpad_input
        return load(implementation, *args, **kwargs)

    lazy_imports._flashkv_wrapped = True
    fa_utils._lazy_imports = lazy_imports


__all__ = ["serve_falcon", "skip_flash_kernel_preload"]
