"""The error contract of notebook 13's surfaces: the ring cache, the page-summary cache, MLA and the
FlexAttention helpers. Each bad input gives the right exception type (also a RuntimeError), a
message naming the argument, and leaves every object as it was (tests/contract.py)."""

from __future__ import annotations

import pytest
import torch
from contract import call, case_registry, refused_unchanged

from flashkv_edu import charlm, flex
from flashkv_edu.mla import MLAConfig, kv_values_per_token
from flashkv_edu.quest import quest_attention, select_pages
from flashkv_edu.ring_cache import RingKVCache, stream_nll
from flashkv_edu.rotary import rotary_tables
from flashkv_edu.validation import ArgumentError, ArgumentTypeError

VALUE, TYPE = ArgumentError, ArgumentTypeError
CASES, bad = case_registry()

bad("RingKVCache batch 0", VALUE, "batch")(lambda: call(RingKVCache, 0, 2, 4, 1, 16))
bad("RingKVCache negative sinks", VALUE, "sinks")(lambda: call(RingKVCache, 1, -1, 4, 1, 16))
bad("RingKVCache window 0", VALUE, "window")(lambda: call(RingKVCache, 1, 2, 0, 1, 16))
bad("RingKVCache positions", VALUE, "positions")(lambda: call(RingKVCache, 1, 2, 4, 1, 16, positions="relative"))
bad("RingKVCache window as float", TYPE, "window")(lambda: call(RingKVCache, 1, 2, 4.0, 1, 16))


def _ring_attend(q_tokens=1, batch=1):
    ring = RingKVCache(1, 1, 3, 1, 16)
    cos, sin = rotary_tables(32, 16)
    q, kv = torch.randn(batch, q_tokens, 2, 16), torch.randn(batch, q_tokens, 1, 16)
    return (lambda: ring.attend(q, kv, kv, cos, sin)), [ring]


bad("ring attend two tokens", VALUE, "one new token")(lambda: _ring_attend(q_tokens=2))
bad("ring attend another batch", VALUE, "one new token")(lambda: _ring_attend(batch=2))


def _nll(tokens, how="sinks", **kw):
    model, _ = charlm.load()
    return call(stream_nll, model, tokens, how, **kw)


bad("stream_nll unknown way", VALUE, "how")(lambda: _nll(torch.arange(5), "all"))
bad("stream_nll a 2-D stream", VALUE, "tokens")(lambda: _nll(torch.zeros(2, 5, dtype=torch.long)))
bad("stream_nll one token", VALUE, "tokens")(lambda: _nll(torch.tensor([3])))
bad("stream_nll past the rotary tables", VALUE, "tokens")(lambda: _nll(torch.zeros(1100, dtype=torch.long)))
bad("stream_nll negative sinks", VALUE, "sinks")(lambda: _nll(torch.arange(5), sinks=-1))
bad("stream_nll window 0", VALUE, "window")(lambda: _nll(torch.arange(5), window=0))
bad("select_pages budget 0", VALUE, "budget")(lambda: call(select_pages, torch.randn(5), 0))
bad("select_pages recent above budget", VALUE, "recent")(lambda: call(select_pages, torch.randn(5), 2, 3))
bad("select_pages budget as float", TYPE, "budget")(lambda: call(select_pages, torch.randn(5), 2.0))


def _quest(q_tokens=1, length=5):
    k_pool = torch.randn(4, 4, 1, 16)
    table = torch.arange(4, dtype=torch.int32)[None]
    lens = torch.tensor([length], dtype=torch.int32)
    q = torch.randn(1, q_tokens, 2, 16)
    return (lambda: quest_attention(q, k_pool, k_pool.clone(), table, lens, 2)), [k_pool, table, lens]


bad("quest_attention two query tokens", VALUE, "one token")(lambda: _quest(q_tokens=2))
bad("quest_attention an empty sequence", VALUE, "cache_seqlens[0]")(lambda: _quest(length=0))
bad("MLAConfig odd rope", VALUE, "rope")(lambda: call(MLAConfig, rope=7))
bad("MLAConfig latent 0", VALUE, "latent")(lambda: call(MLAConfig, latent=0))
bad("kv_values_per_token unknown kind", VALUE, "kind")(lambda: call(kv_values_per_token, "MoE", nheads=4, headdim=8))
bad("flex_attend a 3-D query", VALUE, "q")(
    lambda: call(flex.flex_attend, torch.randn(5, 2, 8), torch.randn(1, 5, 2, 8), torch.randn(1, 5, 2, 8))
)
bad("flex_attend block_size 0", VALUE, "block_size")(
    lambda: call(flex.flex_attend, *(torch.randn(1, 5, 2, 8) for _ in range(3)), block_size=0)
)


def _paged_wide():
    pool = torch.randn(4, 4, 1, 16)
    table = torch.zeros(1, 6, dtype=torch.int32)
    return (lambda: flex.paged_flex(torch.randn(1, 1, 2, 16), pool, pool, table, torch.tensor([5]))), [pool, table]


bad("paged_flex table wider than the pool", VALUE, "block_table")(_paged_wide)


@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_bad_input(c):
    refused_unchanged(c, *c.build())


def test_the_module_has_its_cases():
    assert len(CASES) >= 20
