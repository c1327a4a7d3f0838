"""The error contract of flashkv_edu.serving's step functions and ``serve``. Each bad input
gives the right exception type (also a RuntimeError, as FlashAttention's
errors are), a message naming the argument, and leaves every object bit-for-bit as it was
(the contract in tests/contract.py)."""

from __future__ import annotations

import pytest
import torch
from contract import call, case_registry, refused_unchanged, x4

from flashkv_edu.model import ModelConfig, TinyDecoder
from flashkv_edu.paged import PagedKVCache
from flashkv_edu.serving import Request, decode_step, new_paged_cache, paged_step, serve
from flashkv_edu.validation import ArgumentError, ArgumentTypeError

VALUE, TYPE = ArgumentError, ArgumentTypeError
CASES, bad = case_registry()


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
    refused_unchanged(c, *c.build())


def test_the_module_has_its_cases():
    assert len(CASES) >= 10
