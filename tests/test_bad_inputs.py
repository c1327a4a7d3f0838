"""Every public entry point refuses bad input the same way: the right exception type (also a
RuntimeError, as FlashAttention's errors are), a message that names the argument, and every
cache, table and allocator bit-for-bit as it was."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from contract import Case, case_registry, refused_unchanged

from flashkv_edu import flash_attn_with_kvcache
from flashkv_edu.cache import KVCache
from flashkv_edu.kernels.combine import combine_splits
from flashkv_edu.kernels.decode import decode_attention_triton
from flashkv_edu.kernels.forward import attention_triton, simple_attention
from flashkv_edu.model import ModelConfig, TinyDecoder
from flashkv_edu.online_softmax import blockwise_attention, merge_many, merge_states
from flashkv_edu.paged import BlockAllocator, OutOfBlocksError, PagedKVCache, gather_paged
from flashkv_edu.reference import attention_ref, key_visibility
from flashkv_edu.rotary import rotary_tables
from flashkv_edu.serving import Request, new_paged_cache, paged_step, serve
from flashkv_edu.split import block_n_for, choose_num_splits, model_decode, num_splits_heuristic, waves
from flashkv_edu.validation import ArgumentError, ArgumentTypeError
from flashkv_edu.window_cache import SlidingWindowCache

VALUE, TYPE = ArgumentError, ArgumentTypeError


CASES, case = case_registry()


def check(c: Case):
    refused_unchanged(c, *c.build())


# --- flash_attn_with_kvcache, on both backends -------------------------------------------------


def api_args(paged=False):
    """A valid decode call: batch 2, 4 query heads over 2 KV heads, d=16, capacity 8."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)
    a = dict(
        q=r(2, 1, 4, 16),
        k=r(2, 1, 2, 16),
        v=r(2, 1, 2, 16),
        cache_seqlens=torch.tensor([3, 5], dtype=torch.int32),
        causal=True,
    )
    if paged:
        a.update(
            k_cache=r(6, 4, 2, 16),
            v_cache=r(6, 4, 2, 16),
            block_table=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32),
        )
    else:
        a.update(k_cache=r(2, 8, 2, 16), v_cache=r(2, 8, 2, 16))
    return a


API_CASES: list[tuple[str, Callable, type, str]] = []


def api_case(name, exc, arg, paged=False):
    def register(edit):
        API_CASES.append((name, lambda: edit(api_args(paged)) or None, exc, arg, paged, edit))
        return edit

    return register


def _cos_sin(rows, dim):
    return rotary_tables(rows, dim)


api_case("q not a tensor", TYPE, "q")(lambda a: a.update(q=a["q"].tolist()))
api_case("q 3-D", VALUE, "q")(lambda a: a.update(q=a["q"][0]))
api_case("q integer", TYPE, "q")(lambda a: a.update(q=a["q"].long()))
api_case("q fp64", TYPE, "q")(lambda a: a.update(q=a["q"].double()))
api_case("k_cache dtype differs", VALUE, "k_cache")(lambda a: a.update(k_cache=a["k_cache"].half()))
api_case("k_cache on another device", VALUE, "device")(lambda a: a.update(q=a["q"].to("meta")))
api_case("v_cache shape differs", VALUE, "v_cache")(lambda a: a.update(v_cache=a["v_cache"][:, :4]))
api_case("k without v", VALUE, "k and v")(lambda a: a.update(v=None))
api_case("k with wrong heads", VALUE, "k must have shape")(
    lambda a: a.update(k=a["k"].repeat(1, 1, 2, 1), v=a["v"].repeat(1, 1, 2, 1))
)
api_case("k and v shapes differ", VALUE, "k and v")(lambda a: a.update(v=a["v"].repeat(1, 2, 1, 1)))
api_case("cache_seqlens missing with k", VALUE, "cache_seqlens")(lambda a: a.update(cache_seqlens=None))
api_case("cache_seqlens int64", TYPE, "cache_seqlens")(lambda a: a.update(cache_seqlens=a["cache_seqlens"].long()))
api_case("cache_seqlens float", TYPE, "cache_seqlens")(lambda a: a.update(cache_seqlens=a["cache_seqlens"].float()))
api_case("cache_seqlens bool", TYPE, "cache_seqlens")(lambda a: a.update(cache_seqlens=a["cache_seqlens"] > 0))
api_case("cache_seqlens wrong shape", VALUE, "cache_seqlens")(
    lambda a: a.update(cache_seqlens=torch.tensor([1, 2, 3], dtype=torch.int32))
)
api_case("cache_seqlens negative", VALUE, "cache_seqlens")(
    lambda a: a.update(cache_seqlens=torch.tensor([-1, 2], dtype=torch.int32))
)
api_case("cache_seqlens past capacity", VALUE, "cache_seqlens")(
    lambda a: a.update(cache_seqlens=torch.tensor([9, 2], dtype=torch.int32))
)
api_case("append overflows the cache", VALUE, "cache_seqlens")(
    lambda a: a.update(cache_seqlens=torch.tensor([8, 2], dtype=torch.int32))
)
api_case("append overflows the block table", VALUE, "cache_seqlens", paged=True)(
    lambda a: a.update(cache_seqlens=torch.tensor([8, 2], dtype=torch.int32))
)
api_case("cache_batch_idx out of range", VALUE, "cache_batch_idx")(
    lambda a: a.update(cache_batch_idx=torch.tensor([0, 2], dtype=torch.int32))
)
api_case("cache_batch_idx repeats with k", VALUE, "cache_batch_idx")(
    lambda a: a.update(cache_batch_idx=torch.tensor([1, 1], dtype=torch.int32))
)
api_case("cache_batch_idx int64", TYPE, "cache_batch_idx")(lambda a: a.update(cache_batch_idx=torch.tensor([0, 1])))
api_case("cache_leftpad past cache_seqlens", VALUE, "cache_leftpad")(
    lambda a: a.update(cache_leftpad=torch.tensor([4, 0], dtype=torch.int32))
)
api_case("cache_leftpad negative", VALUE, "cache_leftpad")(
    lambda a: a.update(cache_leftpad=torch.tensor([-1, 0], dtype=torch.int32))
)
api_case("cache_leftpad with block_table", VALUE, "cache_leftpad", paged=True)(
    lambda a: a.update(cache_leftpad=torch.tensor([0, 0], dtype=torch.int32))
)
api_case("cache_batch_idx with block_table", VALUE, "cache_batch_idx", paged=True)(
    lambda a: a.update(cache_batch_idx=torch.tensor([0, 1], dtype=torch.int32))
)
api_case("block_table int64", TYPE, "block_table", paged=True)(lambda a: a.update(block_table=a["block_table"].long()))
api_case("block_table entry past the pool", VALUE, "block_table", paged=True)(
    lambda a: a.update(block_table=torch.tensor([[0, 6], [2, 3]], dtype=torch.int32))
)
api_case("block_table negative entry", VALUE, "block_table", paged=True)(
    lambda a: a.update(block_table=torch.tensor([[0, -1], [2, 3]], dtype=torch.int32))
)
api_case("block_table wrong rows", VALUE, "block_table", paged=True)(
    lambda a: a.update(block_table=a["block_table"][:1])
)
api_case("window_size below -1", VALUE, "window_size")(lambda a: a.update(window_size=(-2, 0)))
api_case("window_size one number", VALUE, "window_size")(lambda a: a.update(window_size=(3,)))
api_case("window_size float", TYPE, "window_size")(lambda a: a.update(window_size=(1.5, 0)))
api_case("window_size float tensor", VALUE, "window_size")(lambda a: a.update(window_size=torch.tensor([1.0, 0.0])))
api_case("causal a string", TYPE, "causal")(lambda a: a.update(causal="no"))
api_case("causal an int", TYPE, "causal")(lambda a: a.update(causal=1))
api_case("softmax_scale zero", VALUE, "softmax_scale")(lambda a: a.update(softmax_scale=0.0))
api_case("softmax_scale nan", VALUE, "softmax_scale")(lambda a: a.update(softmax_scale=float("nan")))
api_case("softmax_scale a string", TYPE, "softmax_scale")(lambda a: a.update(softmax_scale="0.1"))
api_case("softcap negative", VALUE, "softcap")(lambda a: a.update(softcap=-1.0))
api_case("softcap infinite", VALUE, "softcap")(lambda a: a.update(softcap=float("inf")))
api_case("alibi_slopes wrong shape", VALUE, "alibi_slopes")(lambda a: a.update(alibi_slopes=torch.rand(3)))
api_case("alibi_slopes fp16", TYPE, "alibi_slopes")(lambda a: a.update(alibi_slopes=torch.rand(4).half()))
api_case("alibi_slopes nan", VALUE, "alibi_slopes")(lambda a: a.update(alibi_slopes=torch.full((4,), float("nan"))))
api_case("num_splits 129", VALUE, "num_splits")(lambda a: a.update(num_splits=129))
api_case("num_splits negative", VALUE, "num_splits")(lambda a: a.update(num_splits=-1))
api_case("num_splits bool", VALUE, "num_splits")(lambda a: a.update(num_splits=True))
api_case("backend unknown", VALUE, "backend")(lambda a: a.update(backend="cuda"))
api_case("seqlen_q zero", VALUE, "seqlen_q")(lambda a: a.update(q=a["q"][:, :0]))
api_case("batch zero", VALUE, "batch")(lambda a: a.update(q=a["q"][:0], k=a["k"][:0], v=a["v"][:0]))
api_case("nheads zero", VALUE, "nheads")(lambda a: a.update(q=a["q"][:, :, :0]))
api_case("headdim zero", VALUE, "headdim")(
    lambda a: a.update(
        q=a["q"][..., :0],
        k=a["k"][..., :0],
        v=a["v"][..., :0],
        k_cache=a["k_cache"][..., :0],
        v_cache=a["v_cache"][..., :0],
    )
)
api_case("headdim over 512", VALUE, "headdim")(
    lambda a: a.update(
        q=torch.randn(2, 1, 4, 520),
        k=None,
        v=None,
        k_cache=torch.randn(2, 8, 2, 520),
        v_cache=torch.randn(2, 8, 2, 520),
    )
)
api_case("nheads_k does not divide nheads", VALUE, "nheads_k")(lambda a: a.update(q=torch.randn(2, 1, 3, 16)))
api_case("k_cache strided in headdim", VALUE, "k_cache")(
    lambda a: a.update(k_cache=torch.randn(2, 8, 2, 32)[..., ::2], v_cache=torch.randn(2, 8, 2, 32)[..., ::2])
)
api_case("k_cache holds fewer sequences than the batch", VALUE, "cache_batch_idx")(
    lambda a: a.update(
        k_cache=a["k_cache"][:1],
        v_cache=a["v_cache"][:1],
        k=None,
        v=None,
        cache_seqlens=torch.tensor([3, 5], dtype=torch.int32),
    )
)
api_case("rotary_cos without rotary_sin", VALUE, "rotary_cos")(lambda a: a.update(rotary_cos=_cos_sin(8, 16)[0]))
api_case("rotary without new keys", VALUE, "rotary_cos")(
    lambda a: a.update(k=None, v=None, rotary_cos=_cos_sin(8, 16)[0], rotary_sin=_cos_sin(8, 16)[1])
)
api_case("rotary_dim not a multiple of 16", VALUE, "rotary_dim")(
    lambda a: a.update(rotary_cos=_cos_sin(8, 8)[0], rotary_sin=_cos_sin(8, 8)[1])
)
api_case("rotary_cos shorter than the cache", VALUE, "rotary_cos")(
    lambda a: a.update(rotary_cos=_cos_sin(6, 16)[0], rotary_sin=_cos_sin(6, 16)[1])
)
api_case("rotary_interleaved a string", TYPE, "rotary_interleaved")(lambda a: a.update(rotary_interleaved="yes"))
api_case("return_softmax_lse an int", TYPE, "return_softmax_lse")(lambda a: a.update(return_softmax_lse=1))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("entry", API_CASES, ids=[c[0] for c in API_CASES])
def test_flash_attn_with_kvcache_bad_input(entry, backend):
    name, _, exc, arg, paged, edit = entry

    def build():
        a = api_args(paged)
        a["backend"] = backend
        edit(a)
        state = [a["k_cache"], a["v_cache"], a.get("block_table"), a.get("cache_seqlens")]
        return (lambda: flash_attn_with_kvcache(**a)), [s for s in state if isinstance(s, torch.Tensor)]

    check(Case(name, build, exc, arg))


# --- kernels, called directly ------------------------------------------------------------------


def _decode(**kw):
    q, kc, vc = torch.randn(1, 1, 2, 16), torch.randn(1, 8, 1, 16), torch.randn(1, 8, 1, 16)
    lens = torch.tensor([5], dtype=torch.int32)
    return (lambda: decode_attention_triton(q, kc, vc, kw.pop("cache_seqlens", lens), **kw)), [kc, vc]


case("decode block_n not a power of two", VALUE, "block_n")(lambda: _decode(block_n=24))
case("decode block_n too small", VALUE, "block_n")(lambda: _decode(block_n=8))
case("decode cache_seqlens past capacity", VALUE, "cache_seqlens")(
    lambda: _decode(cache_seqlens=torch.tensor([9], dtype=torch.int32))
)
case("decode cache_leftpad past cache_seqlens", VALUE, "cache_leftpad")(
    lambda: _decode(cache_leftpad=torch.tensor([6], dtype=torch.int32))
)
case("decode causal a string", TYPE, "causal")(lambda: _decode(causal="yes"))
case("decode return_lse an int", TYPE, "return_lse")(lambda: _decode(return_lse=1))
case("forward block_m not a power of two", VALUE, "block_m")(
    lambda: ((lambda: attention_triton(*(torch.randn(1, 4, 1, 16),) * 3, block_m=24)), [])
)
case("forward fp64", TYPE, "q")(lambda: ((lambda: attention_triton(*(torch.randn(1, 4, 1, 16).double(),) * 3)), []))
case("forward seqlens_k past seqlen_k", VALUE, "seqlens_k")(
    lambda: ((lambda: attention_triton(*(torch.randn(1, 4, 1, 16),) * 3, seqlens_k=torch.tensor([5]))), [])
)
case("simple_attention headdims differ", VALUE, "headdim")(
    lambda: ((lambda: simple_attention(torch.randn(4, 16), torch.randn(4, 8), torch.randn(4, 8))), [])
)
case("combine lse shape", VALUE, "lse_partial")(
    lambda: ((lambda: combine_splits(torch.zeros(2, 1, 1, 2, 16), torch.zeros(2, 1, 1, 2))), [])
)
case("combine fp16 partials", TYPE, "out_partial")(
    lambda: ((lambda: combine_splits(torch.zeros(2, 1, 1, 2, 16).half(), torch.zeros(2, 1, 2, 1))), [])
)
case("combine zero splits", VALUE, "out_partial")(
    lambda: ((lambda: combine_splits(torch.zeros(0, 1, 1, 2, 16), torch.zeros(0, 1, 2, 1))), [])
)


# --- the oracle and blockwise attention -------------------------------------------------------


def _qkv():
    return torch.randn(1, 2, 2, 8), torch.randn(1, 3, 2, 8), torch.randn(1, 3, 2, 8)


case("attention_ref causal a string", TYPE, "causal")(lambda: ((lambda: attention_ref(*_qkv(), causal="no")), []))
case("attention_ref compute_dtype int", VALUE, "compute_dtype")(
    lambda: ((lambda: attention_ref(*_qkv(), compute_dtype=torch.int32)), [])
)
case("attention_ref leftpad past seqlens", VALUE, "leftpad_k")(
    lambda: ((lambda: attention_ref(*_qkv(), seqlens_k=torch.tensor([2]), leftpad_k=torch.tensor([3]))), [])
)
case("attention_ref return_lse a string", TYPE, "return_lse")(
    lambda: ((lambda: attention_ref(*_qkv(), return_lse="yes")), [])
)
case("attention_ref batch zero", VALUE, "batch")(lambda: ((lambda: attention_ref(*(x[:0] for x in _qkv()))), []))
case("blockwise block_size zero", VALUE, "block_size")(
    lambda: ((lambda: blockwise_attention(*_qkv(), block_size=0)), [])
)
case("blockwise block_size float", TYPE, "block_size")(
    lambda: ((lambda: blockwise_attention(*_qkv(), block_size=2.5)), [])
)
case("key_visibility seqlen_k float", TYPE, "seqlen_k")(lambda: ((lambda: key_visibility(2, 3.0)), []))


# --- merging states ----------------------------------------------------------------------------


def _state_pair():
    return torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2)


case("merge_states int64", TYPE, "out_a")(
    lambda: (
        (lambda: merge_states(torch.zeros(1, 2, 2, 8, dtype=torch.int64), torch.zeros(1, 2, 2), *_state_pair())),
        [],
    )
)
case("merge_states lse shape", VALUE, "lse_b")(
    lambda: ((lambda: merge_states(*_state_pair(), torch.randn(1, 2, 2, 8), torch.randn(1, 2, 3))), [])
)
case("merge_states shapes differ", VALUE, "out_a and out_b")(
    lambda: ((lambda: merge_states(*_state_pair(), torch.randn(1, 3, 2, 8), torch.randn(1, 2, 3))), [])
)
case("merge_many of nothing", VALUE, "outs")(
    lambda: ((lambda: merge_many(torch.zeros(0, 1, 2, 2, 8), torch.zeros(0, 1, 2, 2))), [])
)
case("merge_many of a list", TYPE, "outs")(lambda: ((lambda: merge_many([], [])), []))
case("merge_many counts differ", VALUE, "lses")(
    lambda: ((lambda: merge_many(torch.zeros(2, 1, 2, 2, 8), torch.zeros(3, 1, 2, 2))), [])
)


# --- split helpers -----------------------------------------------------------------------------

case("heuristic no programs", VALUE, "batch_nheads_mblocks")(lambda: ((lambda: num_splits_heuristic(0, 132, 8)), []))
case("heuristic no SMs", VALUE, "num_sms")(lambda: ((lambda: num_splits_heuristic(4, 0, 8)), []))
case("heuristic float blocks", TYPE, "num_n_blocks")(lambda: ((lambda: num_splits_heuristic(4, 132, 8.5)), []))
case("choose_num_splits nheads 0", VALUE, "nheads")(lambda: ((lambda: choose_num_splits(1, 0, 1, 1, 1024, 128)), []))
case("choose_num_splits nheads_k does not divide", VALUE, "nheads_k")(
    lambda: ((lambda: choose_num_splits(1, 6, 4, 1, 1024, 128)), [])
)
case("choose_num_splits gpu a string", VALUE, "gpu")(
    lambda: ((lambda: choose_num_splits(1, 8, 2, 1, 1024, 128, gpu="H100")), [])
)
case("model_decode num_splits 0", VALUE, "num_splits")(lambda: ((lambda: model_decode(1, 8, 1024, 128, 0)), []))
case("waves no SMs", VALUE, "num_sms")(lambda: ((lambda: waves(10, 0)), []))
case("block_n_for headdim 0", VALUE, "headdim")(lambda: ((lambda: block_n_for(0)), []))


# --- KVCache -----------------------------------------------------------------------------------


def _kv(**kw):
    cache = KVCache(2, 6, 1, 4)
    cache.append(torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4))
    k = kw.pop("k", torch.randn(2, 1, 1, 4))
    v = kw.pop("v", k.clone())
    return (lambda: cache.append(k, v, **kw)), cache


case("KVCache num_new bools", TYPE, "num_new")(lambda: _kv(num_new=[True, False]))
case("KVCache num_new floats", TYPE, "num_new")(lambda: _kv(num_new=[1.0, 0.0]))
case("KVCache num_new wrong count", VALUE, "num_new")(lambda: _kv(num_new=[1]))
case("KVCache num_new past the chunk", VALUE, "num_new")(lambda: _kv(num_new=[2, 0]))
case("KVCache seq_idx out of range", VALUE, "seq_idx")(lambda: _kv(k=torch.randn(1, 1, 1, 4), seq_idx=[2]))
case("KVCache seq_idx repeats", VALUE, "seq_idx")(lambda: _kv(seq_idx=[1, 1]))
case("KVCache seq_idx float", TYPE, "seq_idx")(lambda: _kv(k=torch.randn(1, 1, 1, 4), seq_idx=0.0))
case("KVCache k dtype", VALUE, "k_cache, k")(lambda: _kv(k=torch.randn(2, 1, 1, 4).half()))
case("KVCache k heads", VALUE, "nheads_k")(lambda: _kv(k=torch.randn(2, 1, 2, 4)))
case("KVCache overflow", VALUE, "capacity")(lambda: _kv(k=torch.randn(2, 5, 1, 4)))
case("KVCache rows differ", VALUE, "seq_idx")(lambda: _kv(k=torch.randn(3, 1, 1, 4)))


def _kv_plain():
    cache = KVCache(2, 6, 1, 4)
    cache.append(torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4))
    return cache


case("KVCache.valid seq out of range", VALUE, "seq ")(lambda: ((lambda c: lambda: c.valid(5))(_kv_plain()), []))
case("KVCache.valid seq float", TYPE, "seq ")(lambda: ((lambda c: lambda: c.valid(1.0))(_kv_plain()), []))
case("KVCache.reset seq_idx out of range", VALUE, "seq_idx")(
    lambda: (lambda c: ((lambda: c.reset([3])), c))(_kv_plain())
)
case("KVCache batch float", TYPE, "batch")(lambda: ((lambda: KVCache(2.5, 4, 1, 4)), []))
case("KVCache headdim 0", VALUE, "headdim")(lambda: ((lambda: KVCache(2, 4, 1, 0)), []))
case("KVCache dtype int", TYPE, "dtype")(lambda: ((lambda: KVCache(2, 4, 1, 4, dtype=torch.int32)), []))


# --- SlidingWindowCache ------------------------------------------------------------------------


def _window(**kw):
    cache = SlidingWindowCache(default_window=4)
    cache.update(torch.randn(1, 3, 1, 2), torch.randn(1, 3, 1, 2), 0)
    k = kw.pop("k", torch.randn(1, 1, 1, 2))
    v = kw.pop("v", k.clone())
    return (lambda: cache.update(k, v, **kw)), cache


case("window cache shapes differ", VALUE, "value_states")(lambda: _window(v=torch.randn(1, 2, 1, 2)))
case("window cache layer -1", VALUE, "layer_idx")(lambda: _window(layer_idx=-1))
case("window cache kwargs a list", TYPE, "cache_kwargs")(
    lambda: _window(layer_idx=0, cache_kwargs=[("window_size", 4)])
)
case("window cache window 0", VALUE, "window_size")(lambda: _window(layer_idx=0, cache_kwargs={"window_size": 0}))
case("window cache window changes", VALUE, "window_size")(lambda: _window(layer_idx=0, cache_kwargs={"window_size": 3}))
case("window cache heads change", VALUE, "key_states")(lambda: _window(k=torch.randn(1, 1, 2, 2)))
case("window cache dtype changes", VALUE, "key_states")(lambda: _window(k=torch.randn(1, 1, 1, 2).double()))


# --- BlockAllocator ----------------------------------------------------------------------------


def _alloc(method, *args):
    a = BlockAllocator(4, 2)
    a.allocate(2)
    a.free(1)
    return (lambda: getattr(a, method)(*args)), a


case("allocate -1", VALUE, "n")(lambda: _alloc("allocate", -1))
case("allocate 2.5", TYPE, "n")(lambda: _alloc("allocate", 2.5))
case("allocate more than free", OutOfBlocksError, "free blocks")(lambda: _alloc("allocate", 4))
case("free unknown block", VALUE, "block")(lambda: _alloc("free", 9))
case("free a free block", VALUE, "double free")(lambda: _alloc("free", 1))
case("incref a free block", VALUE, "block")(lambda: _alloc("incref", 2))
case("register a non-bytes key", TYPE, "key")(lambda: _alloc("register", 0, "abc"))
case("register a free block", VALUE, "block")(lambda: _alloc("register", 3, b"k"))
case("lookup an int", TYPE, "key")(lambda: _alloc("lookup", 5))
case("BlockAllocator num_blocks 0", VALUE, "num_blocks")(lambda: ((lambda: BlockAllocator(0, 2)), []))


# --- PagedKVCache ------------------------------------------------------------------------------


def _paged(method, *args, fork=False, **kw):
    c = PagedKVCache(6, 2, 1, 4, max_batch=3, max_blocks_per_seq=3)
    slot, _ = c.add_sequence([1, 2, 3])
    c.append(slot, torch.randn(3, 1, 4), torch.randn(3, 1, 4), [1, 2, 3])
    if fork:
        c.fork(slot)  # the last block (partly filled) is now shared
    return (lambda: getattr(c, method)(*args, **kw)), c


case("reserve -5", VALUE, "n")(lambda: _paged("reserve", 0, -5))
case("reserve 2.5 after a fork (no copy-on-write)", TYPE, "n")(lambda: _paged("reserve", 0, 2.5, fork=True))
case("reserve past the block table", VALUE, "n")(lambda: _paged("reserve", 0, 4))
case("reserve unknown slot", VALUE, "slot")(lambda: _paged("reserve", 2, 1))
case("reserve tokens miscounted", VALUE, "tokens")(lambda: _paged("reserve", 0, 2, [5]))
case("reserve float tokens", TYPE, "tokens")(lambda: _paged("reserve", 0, 1, [5.0]))


def _paged_full():
    _, c = _paged("fork", 0)
    c.allocator.allocate(c.allocator.num_free)  # the pool is now exhausted
    return (lambda: c.reserve(0, 2)), c


case("reserve with too few free blocks", OutOfBlocksError, "free blocks")(_paged_full)
case("append k wrong shape", VALUE, "k")(lambda: _paged("append", 0, torch.randn(1, 2, 4), torch.randn(1, 2, 4)))
case("append k dtype", VALUE, "k")(lambda: _paged("append", 0, torch.randn(1, 1, 4).half(), torch.randn(1, 1, 4)))
case("append k 2-D", VALUE, "k")(lambda: _paged("append", 0, torch.randn(1, 4), torch.randn(1, 4)))
case("add_sequence float tokens", TYPE, "prompt_tokens")(lambda: _paged("add_sequence", [1.5, 2.0]))
case("add_sequence negative token", VALUE, "prompt_tokens")(lambda: _paged("add_sequence", [-1]))
case("fork unknown slot", VALUE, "slot")(lambda: _paged("fork", 1))
case("free unknown slot", VALUE, "slot")(lambda: _paged("free", 1))
case("PagedKVCache max_batch float", TYPE, "max_batch")(
    lambda: ((lambda: PagedKVCache(4, 2, 1, 4, max_batch=2.5, max_blocks_per_seq=2)), [])
)
case("gather_paged block_table int64", TYPE, "block_table")(
    lambda: ((lambda: gather_paged(torch.randn(4, 2, 1, 4), torch.tensor([[0, 1]]))), [])
)


# --- serving -----------------------------------------------------------------------------------


def _serving():
    torch.manual_seed(0)
    model = TinyDecoder(ModelConfig(vocab_size=16, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seqlen=32))
    cache = new_paged_cache(model, num_blocks=8, block_size=4, max_batch=2)
    slot, _ = cache.add_sequence([1, 2, 3])
    paged_step(model, cache, [slot], [[1, 2, 3]])
    return model, cache, slot


def _step(slots, tokens, **kw):
    model, cache, _ = _serving()
    return (lambda: paged_step(model, cache, slots, tokens, **kw)), cache


case("paged_step slots and tokens differ in length", VALUE, "tokens")(lambda: _step([0], [[1], [2]]))
case("paged_step token past the vocabulary", VALUE, "tokens[0]")(lambda: _step([0], [[99]]))
case("paged_step closed slot", VALUE, "slot")(lambda: _step([1], [[1]]))
case("paged_step slot repeated", VALUE, "slots")(lambda: _step([0, 0], [[1], [1]]))
case("paged_step ragged tokens", VALUE, "tokens")(lambda: _step([0], [[]]))
case("paged_step past the sequence capacity", VALUE, "slot 0")(lambda: _step([0], [list(range(10)) * 3]))
case("paged_step backend unknown", VALUE, "backend")(lambda: _step([0], [[1]], backend="gpu"))


def _serve(requests, **kw):
    model, cache, _ = _serving()
    return (lambda: serve(model, requests, cache, **kw)), cache


case("serve prompt too long (no slot left open)", VALUE, "requests[1]")(
    lambda: _serve([Request([1, 2], 2), Request(list(range(16)) * 2, 4)])
)
case("serve max_new_tokens 0", VALUE, "max_new_tokens")(lambda: _serve([Request([1, 2], 0)]))
case("serve empty prompt", VALUE, "prompt")(lambda: _serve([Request([], 3)]))
case("serve a non-request", TYPE, "requests[0]")(lambda: _serve([[1, 2, 3]]))
case("serve token past the vocabulary", VALUE, "requests[0].prompt")(lambda: _serve([Request([1, 40], 2)]))


# --- the model ---------------------------------------------------------------------------------


def _model_forward(tokens):
    model = TinyDecoder(ModelConfig(vocab_size=16, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, max_seqlen=32))
    cache = model.new_cache(1, 8)
    return (lambda: model(tokens, cache)), cache


case("model tokens past the vocabulary", VALUE, "tokens")(lambda: _model_forward(torch.tensor([[3, 17]])))
case("model tokens float", TYPE, "tokens")(lambda: _model_forward(torch.tensor([[3.0]])))
case("model cache overflow", VALUE, "capacity")(lambda: _model_forward(torch.zeros(1, 9, dtype=torch.long)))


@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_bad_input(c):
    check(c)


def test_the_module_covers_the_surface():
    """At least 80 distinct bad inputs over every public entry point."""
    assert len(CASES) + len(API_CASES) >= 80
    assert len(API_CASES) >= 40


def test_errors_are_catchable_as_runtime_error_like_flashattention():
    try:
        flash_attn_with_kvcache(
            torch.randn(1, 1, 2, 8), torch.randn(1, 4, 1, 8), torch.randn(1, 4, 1, 8), window_size=(-3, 0)
        )
    except RuntimeError as err:  # what code written for FlashAttention catches
        assert isinstance(err, ValueError) and "window_size" in str(err)
    else:
        raise AssertionError("no error raised")
