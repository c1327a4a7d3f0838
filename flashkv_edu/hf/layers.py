"""The layers of :class:`~flashkv_edu.hf.FlashKVCache`: its own attention layer (transformers' view
of one layer: a length, mask sizes; the keys and values live in the cache's package caches) and
transformers' layers for a hybrid model's other layers."""

from __future__ import annotations

from transformers.cache_utils import CacheLayerMixin


def other_layer_classes() -> dict:
    """transformers' cache layers for the non-attention layers of hybrid models, by layer type:
    linear attention (Qwen3.5's Gated DeltaNet) and convolutions (LFM2); empty where the installed
    transformers has none."""
    from transformers import cache_utils

    linear = getattr(cache_utils, "LinearAttentionLayer", None)
    return {} if linear is None else {"linear_attention": linear, "conv": linear}


class FlashKVLayer(CacheLayerMixin):
    """One layer of :class:`FlashKVCache`: transformers' view of it (a length, mask sizes). The keys
    and values live in the cache's package caches; ``update`` hands them to the cache."""

    is_sliding = False  # every token is kept; a window is applied by the mask
    is_compileable = False
    is_croppable = True

    def __init__(self, cache, index: int):  # cache: the FlashKVCache that owns this layer
        super().__init__()
        self.cache, self.index = cache, index
        self.length = 0  # tokens per row as transformers counts them (left padding included)
        # How this layer meets the attention: None until its first pass, "in_place" when the model
        # hands update's tensors straight to attention, "history" when it transforms them first.
        self.mode = None

    def lazy_initialization(self, key_states, value_states) -> None:
        self.cache.initialize_layer(self.index, key_states, value_states)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        return self.cache.update_layer(self.index, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.cache.max_cache_len

    def _whole_cache(self, what: str):
        raise NotImplementedError(f"call FlashKVCache.{what} (the cache's layers share their storage)")

    def crop(self, tokens_to_remove: int) -> None:
        self._whole_cache("crop")

    def reorder_cache(self, beam_idx) -> None:
        self._whole_cache("reorder_cache")

    def batch_select_indices(self, indices) -> None:
        self._whole_cache("batch_select_indices")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._whole_cache("batch_repeat_interleave")

    def reset(self) -> None:
        self._whole_cache("reset")


__all__ = ["FlashKVLayer", "other_layer_classes"]
