"""The error contract of flashkv_edu.hf: ``FlashKVCache``, the attention function, ``serve`` and
``load_local``. Each bad input gives the right exception type (also a RuntimeError, as FlashAttention's
errors are), a message naming the argument, and leaves every object bit-for-bit as it was
(the contract in tests/contract.py)."""

from __future__ import annotations

import pytest
import torch
from contract import call, case_registry, refused_unchanged, x4

from flashkv_edu import hf
from flashkv_edu.teach import nb10_transformers_model as nb10
from flashkv_edu.validation import ArgumentError, ArgumentTypeError

VALUE, TYPE = ArgumentError, ArgumentTypeError
CASES, bad = case_registry()


# --- hf: FlashKVCache and the attention function ------------------------------------------------------


def _pair(kind="llama"):
    eager, ours = nb10.model_pair(kind)
    hf.register("torch")
    return eager, ours


def cache_of(page_size=None):
    _, ours = _pair()
    return ours, hf.FlashKVCache(ours.config, 2, 64, page_size=page_size)


bad("FlashKVCache max_batch_size 0", VALUE, "max_batch_size")(
    lambda: call(hf.FlashKVCache, nb10.tiny_config("llama"), 0, 64)
)
bad("FlashKVCache max_cache_len bool", TYPE, "max_cache_len")(
    lambda: call(hf.FlashKVCache, nb10.tiny_config("llama"), 1, True)
)
bad("FlashKVCache page_size 0", VALUE, "page_size")(
    lambda: call(hf.FlashKVCache, nb10.tiny_config("llama"), 1, 64, page_size=0)
)
bad("FlashKVCache dtype int8", TYPE, "dtype")(
    lambda: call(hf.FlashKVCache, nb10.tiny_config("llama"), 1, 64, dtype=torch.int8)
)
bad("FlashKVCache device bogus", VALUE, "device")(
    lambda: call(hf.FlashKVCache, nb10.tiny_config("llama"), 1, 64, device="bogus")
)
bad("FlashKVCache config a dict", TYPE, "config")(lambda: call(hf.FlashKVCache, {"num_hidden_layers": 2}, 1, 64))


def _hybrid_config(kinds=("full_attention", "mamba")):
    cfg = nb10.tiny_config("llama")
    cfg.layer_types = list(kinds)
    return cfg


bad("FlashKVCache a layer type it does not know", VALUE, "mamba")(
    lambda: call(hf.FlashKVCache, _hybrid_config(), 1, 64)
)
bad("FlashKVCache no attention layer", VALUE, "no attention layer")(
    lambda: call(hf.FlashKVCache, _hybrid_config(("conv", "linear_attention")), 1, 64)
)


def update_call(key, value, page_size=None, layer=0):
    _, cache = cache_of(page_size)
    return (lambda: cache.update(key, value, layer)), [cache]


bad("update key 3-D", VALUE, "key_states")(lambda: update_call(x4(2, 2, 16), x4(2, 2, 1, 16)))
bad("update int64 keys", TYPE, "key_states")(
    lambda: update_call(torch.ones(2, 2, 1, 16, dtype=torch.int64), x4(2, 2, 1, 16))
)
bad("update values of other heads", VALUE, "value_states")(lambda: update_call(x4(2, 2, 1, 16), x4(2, 1, 1, 16)))
bad("update batch over max_batch_size", VALUE, "max_batch_size")(lambda: update_call(x4(3, 2, 1, 16), x4(3, 2, 1, 16)))
bad("update overflow", VALUE, "max_cache_len")(lambda: update_call(x4(2, 2, 65, 16), x4(2, 2, 65, 16)))
bad("update paged overflow", VALUE, "max_cache_len")(lambda: update_call(x4(2, 2, 65, 16), x4(2, 2, 65, 16), 4))


def _initialized_update(key, value, page_size=None):
    ours, cache = cache_of(page_size)
    ids = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(1))
    ours(input_ids=ids, use_cache=True, **hf.cache_kwargs(cache))
    return (lambda: cache.update(key, value, 0)), [cache]


bad("update another head dim after the first", VALUE, "head_dim")(
    lambda: _initialized_update(x4(2, 2, 1, 8), x4(2, 2, 1, 8))
)
bad("update another head count after the first", VALUE, "kv_heads")(
    lambda: _initialized_update(x4(2, 1, 1, 16), x4(2, 1, 1, 16), 4)
)
bad("update another batch after the first", VALUE, "rows")(
    lambda: _initialized_update(x4(1, 2, 1, 16), x4(1, 2, 1, 16))
)


def _generate_call(mask_edit=None, page_size=None, ids_shape=(2, 6)):
    ours, cache = cache_of(page_size)
    ids = torch.randint(3, 100, ids_shape, generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    if mask_edit:
        mask = mask_edit(mask)
    fn = lambda: ours(input_ids=ids, attention_mask=mask, use_cache=True, **hf.cache_kwargs(cache))  # noqa: E731
    return fn, [cache]


def _right_pad(m):
    m[1, -2:] = 0
    return m


bad("right-padded batch, contiguous", VALUE, "left padding")(lambda: _generate_call(_right_pad))
bad("right-padded batch, paged", VALUE, "left padding")(lambda: _generate_call(_right_pad, page_size=4))


def _attention_call(**kwargs):
    _, ours = _pair()
    module = ours.model.layers[0].self_attn
    q, k = x4(1, 4, 3, 16), x4(1, 2, 3, 16)
    mask = kwargs.pop("attention_mask", None)
    return (lambda: hf.attention(module, q, k, k, mask, **kwargs)), [q, k]


bad("attention dropout", VALUE, "dropout")(lambda: _attention_call(dropout=0.1))
bad("attention is_causal False", VALUE, "is_causal")(lambda: _attention_call(is_causal=False))
bad("attention head_mask", VALUE, "head_mask")(lambda: _attention_call(head_mask=torch.ones(4)))
bad("attention sinks unknown name", VALUE, "sinks")(lambda: _attention_call(sinks=torch.zeros(4)))
bad("attention mask wrong rows", VALUE, "attention_mask")(
    lambda: _attention_call(attention_mask=torch.ones(2, 3, dtype=torch.bool))
)
bad("attention mask wrong columns", VALUE, "attention_mask")(
    lambda: _attention_call(attention_mask=torch.ones(1, 5, dtype=torch.bool))
)
bad("attention mask 4-D", VALUE, "mask")(lambda: _attention_call(attention_mask=torch.ones(1, 1, 3, 3)))
bad("attention sliding_window 0", VALUE, "sliding_window")(lambda: _attention_call(sliding_window=0))
bad("attention negative softcap", VALUE, "softcap")(lambda: _attention_call(softcap=-1.0))
bad("attention scaling 0", VALUE, "scaling")(lambda: _attention_call(scaling=0.0))


def _cache_method(method, *args, page_size=None):
    ours, cache = cache_of(page_size)
    ids = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(3))
    ours(input_ids=ids, use_cache=True, **hf.cache_kwargs(cache))
    return (lambda: getattr(cache, method)(*args)), [cache]


bad("crop more than held", VALUE, "remove")(lambda: _cache_method("crop", -6))
bad("crop a float", TYPE, "tokens_to_remove")(lambda: _cache_method("crop", -1.0))
bad("reorder_cache out of range", VALUE, "beam_idx")(lambda: _cache_method("reorder_cache", torch.tensor([0, 2])))
bad("reorder_cache floats", TYPE, "beam_idx")(lambda: _cache_method("reorder_cache", torch.tensor([0.0, 1.0])))
bad("reorder_cache too many rows", VALUE, "max_batch_size")(
    lambda: _cache_method("reorder_cache", torch.tensor([0, 1, 1]), page_size=4)
)
bad("batch_select_indices negative", VALUE, "indices")(lambda: _cache_method("batch_select_indices", [-1]))
bad("batch_repeat_interleave 0", VALUE, "repeats")(lambda: _cache_method("batch_repeat_interleave", 0))
bad("update layer_idx past the layers", VALUE, "layer_idx")(
    lambda: update_call(x4(2, 2, 1, 16), x4(2, 2, 1, 16), layer=5)
)
bad("update layer_idx a string", TYPE, "layer_idx")(lambda: update_call(x4(2, 2, 1, 16), x4(2, 2, 1, 16), layer="0"))
bad("get_seq_length layer_idx a string", TYPE, "layer_idx")(lambda: _cache_method("get_seq_length", "0"))
bad("get_seq_length layer_idx negative", VALUE, "layer_idx")(lambda: _cache_method("get_seq_length", -1, page_size=4))
bad("get_mask_sizes layer_idx past the layers", VALUE, "layer_idx")(lambda: _cache_method("get_mask_sizes", 1, 2))
bad("get_mask_sizes query_length a float", TYPE, "query_length")(lambda: _cache_method("get_mask_sizes", 1.0, 0))
bad("get_max_length layer_idx past the layers", VALUE, "layer_idx")(lambda: _cache_method("get_max_length", 9))
bad("register backend cuda", VALUE, "backend")(lambda: call(hf.register, "cuda"))
bad("register backend None", VALUE, "backend")(lambda: call(hf.register, None))


def _serve(*args, **kwargs):
    _, ours = _pair()
    return call(hf.serve, ours, *args, **kwargs)


bad("serve no prompts", VALUE, "prompts")(lambda: _serve([], 3))
bad("serve an empty prompt", VALUE, "prompts[1]")(lambda: _serve([[3, 4], []], 3))
bad("serve a float token", TYPE, "prompts[0][1]")(lambda: _serve([[3, 4.0]], 3))
bad("serve a token past the vocabulary", VALUE, "vocabulary")(lambda: _serve([[3, 400]], 3))
bad("serve a negative token", VALUE, "prompts[0][0]")(lambda: _serve([[-3, 4]], 3))
bad("serve max_new_tokens True", TYPE, "max_new_tokens")(lambda: _serve([[3, 4]], True))
bad("serve max_new_tokens 0", VALUE, "max_new_tokens")(lambda: _serve([[3, 4]], 0))
bad("serve max_new_tokens per prompt, wrong count", VALUE, "max_new_tokens")(lambda: _serve([[3, 4]], [2, 3]))
bad("serve max_batch 0", VALUE, "max_batch")(lambda: _serve([[3, 4]], 2, max_batch=0))
bad("serve page_size -1", VALUE, "page_size")(lambda: _serve([[3, 4]], 2, page_size=-1))
bad("serve past the model's positions", VALUE, "positions")(lambda: _serve([[3, 4]], 600))
bad("serve an eager model", VALUE, "attn_implementation")(lambda: call(hf.serve, _pair()[0], [[3, 4]], 2))
bad("load_local a missing directory", VALUE, "path")(lambda: call(hf.load_local, "/nonexistent/checkpoint"))


@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_bad_input(c):
    refused_unchanged(c, *c.build())


def test_the_module_has_its_cases():
    assert len(CASES) >= 40
