"""The error contract on the surfaces added around the API: the quantization codecs and
``QuantizedKVCache`` (flashkv_edu.quant), the transformers adapter (flashkv_edu.hf), the serving
loop (flashkv_edu.serving) and every command line. Each bad input gives the right exception type
(also a RuntimeError, as FlashAttention's errors are), a message naming the argument, and leaves
every object bit-for-bit as it was; a bad command line is a usage line, exit status 2, and no file
written."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
from contract import call, case_registry, same, snapshot

from flashkv_edu import hf
from flashkv_edu import quant as Q
from flashkv_edu.model import ModelConfig, TinyDecoder
from flashkv_edu.paged import PagedKVCache
from flashkv_edu.serving import Request, decode_step, new_paged_cache, paged_step, serve
from flashkv_edu.teach import nb10_transformers_model as nb10
from flashkv_edu.validation import ArgumentError, ArgumentTypeError

VALUE, TYPE = ArgumentError, ArgumentTypeError


CASES, bad = case_registry()


# --- quant: the codecs ---------------------------------------------------------------------------------

x4 = lambda *shape: torch.randn(*shape, generator=torch.Generator().manual_seed(0))  # noqa: E731
with_nan = lambda: x4(1, 4, 2, 16).index_put_((torch.tensor([0]), torch.tensor([1])), torch.tensor(float("nan")))  # noqa: E731

bad("Scheme kind unknown", VALUE, "kind")(lambda: call(Q.Scheme, "x", "int4"))
bad("Scheme int bits 3", VALUE, "bits")(lambda: call(Q.Scheme, "x", "int", 3))
bad("Scheme bits float", TYPE, "bits")(lambda: call(Q.Scheme, "x", "int", 4.0))
bad("Scheme bits bool", TYPE, "bits")(lambda: call(Q.Scheme, "x", "int", True))
bad("Scheme group negative", VALUE, "group")(lambda: call(Q.Scheme, "x", "int", 4, group=-1))
bad("Scheme group float", TYPE, "group")(lambda: call(Q.Scheme, "x", "int", 4, group=2.5))
bad("Scheme residual negative", VALUE, "residual")(lambda: call(Q.Scheme, "x", "int", 4, residual=-5))
bad("Scheme residual float", TYPE, "residual")(lambda: call(Q.Scheme, "x", "int", 4, residual=1.5))
bad("Scheme symmetric a string", TYPE, "symmetric")(lambda: call(Q.Scheme, "x", "int", 4, symmetric="no"))
bad("Scheme k_axis tokens", VALUE, "k_axis")(lambda: call(Q.Scheme, "x", "int", 4, k_axis="tokens"))
bad("Scheme v_axis None", VALUE, "v_axis")(lambda: call(Q.Scheme, "x", "int", 4, v_axis=None))
bad("Scheme channel without group", VALUE, "group")(lambda: call(Q.Scheme, "x", "int", 4, k_axis="channel"))
bad("Scheme fp8 scale row", VALUE, "fp8_scale")(lambda: call(Q.Scheme, "x", "fp8", 8, fp8_scale="row"))
bad("Scheme fp8 bits 16", VALUE, "bits")(lambda: call(Q.Scheme, "x", "fp8", 16))
bad("Scheme float without dtype", VALUE, "dtype")(lambda: call(Q.Scheme, "x", "float", 16))
bad("Scheme float dtype int8", VALUE, "dtype")(lambda: call(Q.Scheme, "x", "float", 8, dtype=torch.int8))
bad("Scheme float bits disagree", VALUE, "bits")(lambda: call(Q.Scheme, "x", "float", 32, dtype=torch.float16))
bad("Scheme int with a dtype", VALUE, "dtype")(lambda: call(Q.Scheme, "x", "int", 8, dtype=torch.float16))
bad("Scheme fp8 with a group", VALUE, "group")(lambda: call(Q.Scheme, "x", "fp8", 8, group=32))
bad("Scheme name empty", TYPE, "name")(lambda: call(Q.Scheme, "", "int", 8))
bad("bytes_per_token n_layers -1", VALUE, "n_layers")(
    lambda: call(Q.bytes_per_token, Q.SCHEMES["int8 per token"], -1, 8, 128)
)
bad("bytes_per_token nheads_k 0", VALUE, "nheads_k")(
    lambda: call(Q.bytes_per_token, Q.SCHEMES["int8 per token"], 32, 0, 128)
)
bad("bytes_per_token headdim float", TYPE, "headdim")(
    lambda: call(Q.bytes_per_token, Q.SCHEMES["int8 per token"], 32, 8, 128.0)
)
bad("bytes_per_token context 0", VALUE, "context")(
    lambda: call(Q.bytes_per_token, Q.SCHEMES["int8 per token"], 32, 8, 128, 0)
)
bad("bytes_per_token scheme a string", TYPE, "scheme")(lambda: call(Q.bytes_per_token, "int8 per token", 32, 8, 128))
bad("bytes_per_token group does not divide", VALUE, "group")(
    lambda: call(Q.bytes_per_token, Q.SCHEMES["int4 per token, groups of 32"], 32, 8, 48)
)
bad("quantize_int bits 0", VALUE, "bits")(lambda: call(Q.quantize_int, x4(1, 4, 2, 16), 0))
bad("quantize_int bits 9", VALUE, "bits")(lambda: call(Q.quantize_int, x4(1, 4, 2, 16), 9))
bad("quantize_int axis tokens", VALUE, "axis")(lambda: call(Q.quantize_int, x4(1, 4, 2, 16), 8, axis="tokens"))
bad("quantize_int group 0 per channel", VALUE, "group")(
    lambda: call(Q.quantize_int, x4(1, 4, 2, 16), 8, axis="channel", group=0)
)
bad("quantize_int group -2", VALUE, "group")(lambda: call(Q.quantize_int, x4(1, 4, 2, 16), 8, group=-2))
bad("quantize_int group does not divide", VALUE, "group")(lambda: call(Q.quantize_int, x4(1, 4, 2, 16), 8, group=5))
bad("quantize_int a NaN", VALUE, "finite")(lambda: call(Q.quantize_int, with_nan(), 8))
bad("quantize_int empty", VALUE, "empty")(lambda: call(Q.quantize_int, x4(1, 0, 2, 16), 8))
bad("quantize_int ints", TYPE, "x")(lambda: call(Q.quantize_int, torch.ones(1, 4, 2, 16, dtype=torch.int32), 8))
bad("quantize_int 3-D", VALUE, "x")(lambda: call(Q.quantize_int, x4(4, 2, 16), 8))
bad("quantize_int symmetric int", TYPE, "symmetric")(lambda: call(Q.quantize_int, x4(1, 4, 2, 16), 8, symmetric=1))
bad("pack_codes out of range", VALUE, "codes")(lambda: call(Q.pack_codes, torch.tensor([[0, 16]]), 4))
bad("pack_codes negative", VALUE, "codes")(lambda: call(Q.pack_codes, torch.tensor([[-1, 3]]), 4))
bad("pack_codes bits 3", VALUE, "bits")(lambda: call(Q.pack_codes, torch.tensor([[0, 1]]), 3))
bad("pack_codes ragged last dim", VALUE, "codes")(lambda: call(Q.pack_codes, torch.tensor([[0, 1, 2]]), 4))
bad("pack_codes floats", TYPE, "codes")(lambda: call(Q.pack_codes, torch.tensor([[0.0, 1.0]]), 4))
bad("unpack_codes int64", TYPE, "packed")(lambda: call(Q.unpack_codes, torch.tensor([[3]]), 4))
bad("unpack_codes bits 0", VALUE, "bits")(lambda: call(Q.unpack_codes, torch.tensor([[3]], dtype=torch.uint8), 0))
bad("fp8_descales a NaN", VALUE, "finite")(lambda: call(Q.fp8_descales, with_nan()))
bad("fp8_descales granularity", VALUE, "granularity")(lambda: call(Q.fp8_descales, x4(1, 4, 2, 16), "row"))
bad("fp8_descales empty", VALUE, "empty")(lambda: call(Q.fp8_descales, x4(1, 0, 2, 16)))
bad("quantize_fp8 descale 0", VALUE, "descale")(lambda: call(Q.quantize_fp8, x4(1, 4, 2, 16), torch.zeros(1, 2)))
bad("quantize_fp8 descale negative", VALUE, "descale")(lambda: call(Q.quantize_fp8, x4(1, 4, 2, 16), -torch.ones(1, 2)))
bad("quantize_fp8 descale shape", VALUE, "descale")(lambda: call(Q.quantize_fp8, x4(1, 4, 2, 16), torch.ones(2)))
bad("quantize_fp8 descale fp16", TYPE, "descale")(
    lambda: call(Q.quantize_fp8, x4(1, 4, 2, 16), torch.ones(1, 2, dtype=torch.float16))
)
bad("quantize_fp8 a NaN", VALUE, "finite")(lambda: call(Q.quantize_fp8, with_nan(), torch.ones(1, 2)))
bad("dequantize_fp8 of fp32", TYPE, "x8")(lambda: call(Q.dequantize_fp8, x4(1, 4, 2, 16), torch.ones(1, 2)))
bad("dequantize_fp8 descale inf", VALUE, "descale")(
    lambda: call(Q.dequantize_fp8, x4(1, 4, 2, 16).to(torch.float8_e4m3fn), torch.full((1, 2), float("inf")))
)
bad("roundtrip role q", VALUE, "role")(lambda: call(Q.roundtrip, x4(1, 4, 2, 16), Q.SCHEMES["fp16"], "q"))
bad("roundtrip scheme a string", TYPE, "scheme")(lambda: call(Q.roundtrip, x4(1, 4, 2, 16), "fp16"))
bad("roundtrip descale for an int scheme", VALUE, "descale")(
    lambda: call(Q.roundtrip, x4(1, 4, 2, 16), Q.SCHEMES["int8 per token"], descale=torch.ones(1, 2))
)
bad("roundtrip a NaN", VALUE, "finite")(lambda: call(Q.roundtrip, with_nan(), Q.SCHEMES["int8 per token"]))


# --- quant: QuantizedKVCache ----------------------------------------------------------------------------


def qcache(scheme="int4 KIVI", d=32):
    cache = Q.QuantizedKVCache(2, 64, 2, d, Q.SCHEMES[scheme])
    cache.append(x4(2, 40, 2, d), x4(2, 40, 2, d))
    return cache


def qcache_call(method, *args, scheme="int4 KIVI", **kwargs):
    cache = qcache(scheme)
    return (lambda: getattr(cache, method)(*args, **kwargs)), [cache]


bad("QuantizedKVCache scheme a string", TYPE, "scheme")(
    lambda: call(Q.QuantizedKVCache, 1, 64, 1, 32, "int8 per token")
)
bad("QuantizedKVCache fp16 scheme", VALUE, "integer schemes")(
    lambda: call(Q.QuantizedKVCache, 1, 64, 1, 32, Q.SCHEMES["fp16"])
)
bad("QuantizedKVCache group does not divide", VALUE, "group")(
    lambda: call(Q.QuantizedKVCache, 1, 64, 1, 48, Q.SCHEMES["int4 per token, groups of 32"])
)
bad("QuantizedKVCache capacity not a multiple", VALUE, "capacity")(
    lambda: call(Q.QuantizedKVCache, 1, 50, 1, 64, Q.SCHEMES["int2 KIVI"])
)
bad("QuantizedKVCache batch 0", VALUE, "batch")(
    lambda: call(Q.QuantizedKVCache, 0, 64, 1, 32, Q.SCHEMES["int8 per token"])
)
bad("QuantizedKVCache nheads_k float", TYPE, "nheads_k")(
    lambda: call(Q.QuantizedKVCache, 1, 64, 1.0, 32, Q.SCHEMES["int8 per token"])
)
bad("QuantizedKVCache headdim 0", VALUE, "headdim")(
    lambda: call(Q.QuantizedKVCache, 1, 64, 1, 0, Q.SCHEMES["int8 per token"])
)
bad("QuantizedKVCache 2-bit odd head dim", VALUE, "bytes")(
    lambda: call(Q.QuantizedKVCache, 1, 64, 1, 6, Q.Scheme("x", "int", 2))
)
bad("QuantizedKVCache device bogus", VALUE, "device")(
    lambda: call(Q.QuantizedKVCache, 1, 64, 1, 32, Q.SCHEMES["int8 per token"], device="bogus")
)
bad("append wrong KV heads", VALUE, "k")(lambda: qcache_call("append", x4(2, 3, 1, 32), x4(2, 3, 1, 32)))
bad("append k and v differ", VALUE, "k and v")(lambda: qcache_call("append", x4(2, 3, 2, 32), x4(2, 4, 2, 32)))
bad("append overflow", VALUE, "overflow")(lambda: qcache_call("append", x4(2, 25, 2, 32), x4(2, 25, 2, 32)))
bad("append a NaN", VALUE, "finite")(
    lambda: qcache_call("append", x4(2, 3, 2, 32), x4(2, 3, 2, 32).index_fill_(1, torch.tensor([1]), float("nan")))
)
bad("append integer keys", TYPE, "k")(
    lambda: qcache_call("append", torch.ones(2, 3, 2, 32, dtype=torch.int64), x4(2, 3, 2, 32))
)
bad("append a list", TYPE, "k")(lambda: qcache_call("append", [[1.0]], x4(2, 3, 2, 32)))
bad("attention q head dim", VALUE, "q")(lambda: qcache_call("attention", x4(2, 1, 4, 16)))
bad("attention q batch", VALUE, "q")(lambda: qcache_call("attention", x4(3, 1, 4, 32)))
bad("attention q heads not a multiple", VALUE, "q")(lambda: qcache_call("attention", x4(2, 1, 3, 32)))
bad("attention backend cuda", VALUE, "backend")(lambda: qcache_call("attention", x4(2, 1, 4, 32), backend="cuda"))
bad("attention unknown keyword", VALUE, "block_table")(
    lambda: qcache_call("attention", x4(2, 1, 4, 32), block_table=torch.zeros(2, 2, dtype=torch.int32))
)
bad("attention bad window", VALUE, "window_size")(
    lambda: qcache_call("attention", x4(2, 1, 4, 32), window_size=(-2, 0))
)


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


def _hybrid_config():
    cfg = nb10.tiny_config("llama")
    cfg.layer_types = ["full_attention", "linear_attention"]
    return cfg


bad("FlashKVCache a linear-attention layer", VALUE, "linear_attention")(
    lambda: call(hf.FlashKVCache, _hybrid_config(), 1, 64)
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


# --- serving -------------------------------------------------------------------------------------------


def _tiny():
    return TinyDecoder(ModelConfig(vocab_size=16, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seqlen=32))


bad("new_paged_cache num_blocks 0", VALUE, "num_blocks")(lambda: call(new_paged_cache, _tiny(), 0))
bad("new_paged_cache block_size float", TYPE, "block_size")(lambda: call(new_paged_cache, _tiny(), 8, 4.0))
bad("new_paged_cache max_batch 0", VALUE, "max_batch")(lambda: call(new_paged_cache, _tiny(), 8, 4, 0))
bad("new_paged_cache max_seqlen under a block", VALUE, "max_seqlen")(
    lambda: call(new_paged_cache, _tiny(), 8, 16, 2, 8)
)
bad("new_paged_cache not a TinyDecoder", TYPE, "model")(lambda: call(new_paged_cache, object(), 8))


def _served(fn, *args, **kwargs):
    model = _tiny()
    cache = new_paged_cache(model, num_blocks=8, block_size=4, max_batch=2)
    slot, _ = cache.add_sequence([1, 2, 3])
    return (lambda: fn(model, cache, *args, **kwargs)), [cache]


bad("paged_step a closed slot", VALUE, "slot")(lambda: _served(paged_step, [1], [[3]]))
bad("paged_step tokens past the vocabulary", VALUE, "vocabulary")(lambda: _served(paged_step, [0], [[99]]))
bad("paged_step ragged tokens", VALUE, "tokens")(lambda: _served(paged_step, [0], [[]]))
bad("paged_step backend cuda", VALUE, "backend")(lambda: _served(paged_step, [0], [[3]], backend="cuda"))


def _serve_requests(requests):
    model = _tiny()
    cache = new_paged_cache(model, num_blocks=8, block_size=4, max_batch=2)
    return (lambda: serve(model, requests, cache)), [cache, requests]


bad("serve requests not a list", TYPE, "requests")(lambda: _serve_requests(Request([1], 2)))
bad("serve a request with no prompt", VALUE, "prompt")(lambda: _serve_requests([Request([], 2)]))
bad("serve a request with 0 new tokens", VALUE, "max_new_tokens")(lambda: _serve_requests([Request([1], 0)]))
bad("serve a request past the model's positions", VALUE, "can hold")(lambda: _serve_requests([Request([1], 40)]))


def _decode_step_call(**changes):
    cache = PagedKVCache(8, 4, 1, 16, max_batch=2, max_blocks_per_seq=2)
    a = dict(
        q=x4(1, 1, 2, 16),
        k=x4(1, 1, 1, 16),
        v=x4(1, 1, 1, 16),
        k_cache=cache.k_cache,
        v_cache=cache.v_cache,
        cache_seqlens=torch.tensor([3], dtype=torch.int32),
        block_table=torch.tensor([[0, 1]], dtype=torch.int32),
    )
    a.update(changes)
    return (lambda: decode_step(**a)), [cache]


bad("decode_step without new keys", VALUE, "k and v")(lambda: _decode_step_call(k=None, v=None))
bad("decode_step overflow", VALUE, "cache overflow")(
    lambda: _decode_step_call(cache_seqlens=torch.tensor([8], dtype=torch.int32))
)


@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_bad_input(c):
    fn, state = c.build()
    before = snapshot(state)
    with pytest.raises(c.exc) as info:
        fn()
    assert isinstance(info.value, RuntimeError), f"{type(info.value).__name__} is not a RuntimeError"
    assert c.arg in str(info.value), f"message does not name {c.arg!r}: {info.value}"
    assert same(before, snapshot(state)), "a failed call changed state"


def test_there_are_at_least_a_hundred_cases():
    assert len(CASES) + len(CLI_CASES) >= 100


# --- command lines -----------------------------------------------------------------------------------

CLI_CASES = [
    ("flashkv_edu.bench", ["decode", "--steps", "0"], "--steps"),
    ("flashkv_edu.bench", ["decode", "--steps", "-3"], "--steps"),
    ("flashkv_edu.bench", ["decode", "--steps", "two"], "--steps"),
    ("flashkv_edu.bench", ["decode", "--contexts", "0"], "--contexts"),
    ("flashkv_edu.bench", ["decode", "--contexts", "100000000"], "--contexts"),
    ("flashkv_edu.bench", ["decode", "--contexts", "4000", "--steps", "200"], "--contexts + --steps"),
    ("flashkv_edu.bench", ["nothing"], "invalid choice"),
    ("flashkv_edu.bench", ["gpu", "--out", "{tmp}/missing/results.json"], "--out"),
    ("flashkv_edu.bench", ["gpu", "--out", "{tmp}"], "--out"),
    ("flashkv_edu.sim", ["--rate", "0"], "--rate"),
    ("flashkv_edu.sim", ["--rate", "nan"], "--rate"),
    ("flashkv_edu.sim", ["--seed", "-1"], "--seed"),
    ("flashkv_edu.charlm", ["train", "--minutes", "-1"], "--minutes"),
    ("flashkv_edu.charlm", ["train", "--minutes", "inf"], "--minutes"),
    ("flashkv_edu.charlm", ["fly"], "invalid choice"),
    ("flashkv_edu.kernels.gpucheck", ["--workers", "0"], "--workers"),
    ("flashkv_edu.kernels.gpucheck", ["--json", "{tmp}/missing/table.json"], "--json"),
    ("flashkv_edu.kernels.gpucheck", ["--excerpt", "no_such_kernel"], "--excerpt"),
    ("flashkv_edu.teach", ["solutions", "{tmp}/afile/solved"], "dir"),
    ("flashkv_edu.teach", ["solutions", "{tmp}/solved", "--notebooks", "{tmp}/missing"], "--notebooks"),
    ("flashkv_edu.teach", ["solutions", "{tmp}/solved", "--notebooks", "{tmp}/empty"], "lacks"),
    ("flashkv_edu.teach", ["nothing"], "invalid choice"),
]


def _main(module: str):
    import importlib

    if module == "flashkv_edu.teach":
        return importlib.import_module("flashkv_edu.teach.__main__").main
    return importlib.import_module(module).main


@pytest.mark.parametrize(
    "module, argv, named", CLI_CASES, ids=[" ".join([m.split(".")[-1], *a]) for m, a, _ in CLI_CASES]
)
def test_a_bad_command_line_is_a_usage_error(tmp_path, module, argv, named):
    """Exit status 2, a usage line naming the option, and the working directory untouched."""
    (tmp_path / "afile").write_text("a file, not a directory\n")
    (tmp_path / "empty").mkdir()
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    before = snapshot(tmp_path)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as info:
        _main(module)(argv)
    assert info.value.code == 2, err.getvalue()
    assert "usage:" in err.getvalue() and named in err.getvalue(), err.getvalue()
    assert same(before, snapshot(tmp_path)), "a refused command line wrote a file"
