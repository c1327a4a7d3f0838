"""flashkv_edu.fa3 refuses every bad FlashAttention 3 argument as the rest of the package does: the
right exception type (also a RuntimeError), a message naming the argument (by FA3's name:
``page_table``, not ``block_table``), and the caches bit-for-bit as they were."""

from __future__ import annotations

import pytest
import torch
from contract import case_registry, refused_unchanged

from flashkv_edu import fa3
from flashkv_edu.validation import ArgumentError, ArgumentTypeError

VALUE, TYPE = ArgumentError, ArgumentTypeError
CASES, bad = case_registry()


def args(**change):
    """A valid varlen call: 2 sequences of 1 and 3 query rows, 4 query heads over 2 KV heads, d 16,
    capacity 8, one new key each (varlen), causal, rotary tables of 8 rows."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    angle = torch.rand(8, 8, generator=g)
    a = dict(
        q=r(4, 4, 16),
        k_cache=r(2, 8, 2, 16),
        v_cache=r(2, 8, 2, 16),
        k=r(2, 2, 16),
        v=r(2, 2, 16),
        rotary_cos=angle.cos(),
        rotary_sin=angle.sin(),
        cache_seqlens=torch.tensor([3, 5], dtype=torch.int32),
        cu_seqlens_q=torch.tensor([0, 1, 4], dtype=torch.int32),
        max_seqlen_q=3,
        cu_seqlens_k_new=torch.tensor([0, 1, 2], dtype=torch.int32),
        causal=True,
    )
    a.update(change)
    return a


def fa3_call(**change):
    a = args(**change)
    tensors = [t for t in a.values() if isinstance(t, torch.Tensor)]
    return (lambda: fa3.flash_attn_with_kvcache(**a)), tensors


def paged(**change):
    g = torch.Generator().manual_seed(1)
    pool = dict(
        k_cache=torch.randn(6, 4, 2, 16, generator=g),
        v_cache=torch.randn(6, 4, 2, 16, generator=g),
        page_table=torch.tensor([[0, 1], [2, 3], [4, 5]], dtype=torch.int32),
        cache_batch_idx=torch.tensor([2, 0], dtype=torch.int32),
    )
    return fa3_call(**{**pool, **change})


def test_the_valid_calls_run():
    for build in (fa3_call, paged):
        fn, _ = build()
        out = fn()
        assert out.shape == (4, 4, 16)


bad("cu_seqlens_q without max_seqlen_q", VALUE, "max_seqlen_q")(lambda: fa3_call(max_seqlen_q=None))
bad("max_seqlen_q without cu_seqlens_q", VALUE, "cu_seqlens_q")(
    lambda: fa3_call(cu_seqlens_q=None, q=torch.randn(2, 3, 4, 16))
)
bad("cu_seqlens_q int64", TYPE, "cu_seqlens_q")(lambda: fa3_call(cu_seqlens_q=torch.tensor([0, 1, 4])))
bad("cu_seqlens_q not from 0", VALUE, "cu_seqlens_q")(
    lambda: fa3_call(cu_seqlens_q=torch.tensor([1, 1, 4], dtype=torch.int32))
)
bad("cu_seqlens_q past the rows", VALUE, "cu_seqlens_q")(
    lambda: fa3_call(cu_seqlens_q=torch.tensor([0, 1, 5], dtype=torch.int32))
)
bad("cu_seqlens_q decreasing", VALUE, "cu_seqlens_q")(
    lambda: fa3_call(cu_seqlens_q=torch.tensor([0, 3, 2], dtype=torch.int32), q=torch.randn(2, 4, 16))
)
bad("a sequence longer than max_seqlen_q", VALUE, "max_seqlen_q")(lambda: fa3_call(max_seqlen_q=2))
bad("max_seqlen_q 0", VALUE, "max_seqlen_q")(lambda: fa3_call(max_seqlen_q=0))
bad("varlen q 4-D", VALUE, "q")(lambda: fa3_call(q=torch.randn(1, 4, 4, 16)))
bad("cu_seqlens_k_new without k", VALUE, "cu_seqlens_k_new")(
    lambda: fa3_call(k=None, v=None, rotary_cos=None, rotary_sin=None)
)
bad("cu_seqlens_k_new of another batch", VALUE, "cu_seqlens_k_new")(
    lambda: fa3_call(cu_seqlens_k_new=torch.tensor([0, 2], dtype=torch.int32))
)
bad("cu_seqlens_k_new not ending at the rows", VALUE, "cu_seqlens_k_new")(
    lambda: fa3_call(cu_seqlens_k_new=torch.tensor([0, 1, 1], dtype=torch.int32))
)
bad("varlen new keys overflow the cache", VALUE, "cu_seqlens_k_new")(
    lambda: fa3_call(cache_seqlens=torch.tensor([3, 8], dtype=torch.int32))
)
bad("varlen k and v of other rows", VALUE, "k and v")(lambda: fa3_call(v=torch.randn(3, 2, 16)))
bad("varlen k 4-D", VALUE, "k")(lambda: fa3_call(k=torch.randn(1, 2, 2, 16)))
bad("qv of another head dim", VALUE, "qv")(lambda: fa3_call(qv=torch.randn(4, 4, 8)))
bad("qv of another dtype", VALUE, "qv")(lambda: fa3_call(qv=torch.randn(4, 4, 16).double()))
bad("qv not a tensor", TYPE, "qv")(lambda: fa3_call(qv=[1.0]))
bad("qv with backend triton", VALUE, "qv")(lambda: fa3_call(qv=torch.randn(4, 4, 16), backend="triton"))
bad("rotary_seqlens without rotary tables", VALUE, "rotary_seqlens")(
    lambda: fa3_call(rotary_cos=None, rotary_sin=None, rotary_seqlens=torch.tensor([0, 1], dtype=torch.int32))
)
bad("rotary_seqlens negative", VALUE, "rotary_seqlens")(
    lambda: fa3_call(rotary_seqlens=torch.tensor([0, -1], dtype=torch.int32))
)
bad("rotary_seqlens int64", TYPE, "rotary_seqlens")(lambda: fa3_call(rotary_seqlens=torch.tensor([0, 1])))
bad("rotary_seqlens of another batch", VALUE, "rotary_seqlens")(
    lambda: fa3_call(rotary_seqlens=torch.tensor([0, 1, 2], dtype=torch.int32))
)
bad("attention_chunk negative", VALUE, "attention_chunk")(lambda: fa3_call(attention_chunk=-1))
bad("attention_chunk a float", TYPE, "attention_chunk")(lambda: fa3_call(attention_chunk=4.0))
bad("pack_gqa a string", TYPE, "pack_gqa")(lambda: fa3_call(pack_gqa="yes"))
bad("sm_margin negative", VALUE, "sm_margin")(lambda: fa3_call(sm_margin=-2))
bad("num_splits past 128", VALUE, "num_splits")(lambda: fa3_call(num_splits=200))
bad("q_descale with a 16-bit q", VALUE, "q_descale")(lambda: fa3_call(q_descale=torch.ones(2, 2)))
bad("an fp8 q without q_descale", VALUE, "q_descale")(
    lambda: fa3_call(q=torch.randn(4, 4, 16).to(torch.float8_e4m3fn), rotary_cos=None, rotary_sin=None)
)
bad("scheduler_metadata not a plan", VALUE, "scheduler_metadata")(
    lambda: fa3_call(scheduler_metadata=torch.zeros(19, dtype=torch.int32))
)
bad("scheduler_metadata of another call", VALUE, "scheduler_metadata")(
    lambda: fa3_call(
        scheduler_metadata=fa3.get_scheduler_metadata(2, 3, 8, 4, 2, 16, torch.tensor([3, 5], dtype=torch.int32))
    )
)
bad("page_table int64", TYPE, "page_table")(lambda: paged(page_table=torch.tensor([[0, 1], [2, 3], [4, 5]])))
bad("page_table entry past the pool", VALUE, "page_table")(
    lambda: paged(page_table=torch.tensor([[0, 1], [2, 3], [4, 9]], dtype=torch.int32))
)
bad("cache_batch_idx past the page table", VALUE, "cache_batch_idx")(
    lambda: paged(cache_batch_idx=torch.tensor([3, 0], dtype=torch.int32))
)
bad("cache_batch_idx repeated with an append", VALUE, "cache_batch_idx")(
    lambda: paged(cache_batch_idx=torch.tensor([1, 1], dtype=torch.int32))
)
bad("an unknown FA3 keyword", TYPE, "block_table")(lambda: fa3_call(block_table=None))
bad("alibi_slopes is not FA3's", TYPE, "alibi_slopes")(lambda: fa3_call(alibi_slopes=torch.ones(4)))


def _plan(**change):
    kw = dict(
        batch_size=2, max_seqlen_q=1, max_seqlen_k=8, num_heads_q=4, num_heads_kv=2, headdim=16,
        cache_seqlens=torch.tensor([3, 5], dtype=torch.int32),
    )  # fmt: skip
    kw.update(change)
    return (lambda: fa3.get_scheduler_metadata(**kw)), [kw["cache_seqlens"]]


bad("plan batch_size 0", VALUE, "batch_size")(lambda: _plan(batch_size=0))
bad("plan heads that do not divide", VALUE, "num_heads_kv")(lambda: _plan(num_heads_kv=3))
bad("plan qkv_dtype int8", TYPE, "qkv_dtype")(lambda: _plan(qkv_dtype=torch.int8))
bad("plan cache_seqlens of another batch", VALUE, "cache_seqlens")(
    lambda: _plan(cache_seqlens=torch.tensor([3], dtype=torch.int32))
)
bad("plan cu_seqlens_q of another batch", VALUE, "cu_seqlens_q")(
    lambda: _plan(cu_seqlens_q=torch.tensor([0, 1], dtype=torch.int32))
)
bad("plan causal a string", TYPE, "causal")(lambda: _plan(causal="yes"))
bad("plan window_size a triple", VALUE, "window_size")(lambda: _plan(window_size=(1, 2, 3)))
bad("plan num_splits 300", VALUE, "num_splits")(lambda: _plan(num_splits=300))


def _combine(out_partial, lse_partial, **kw):
    return (lambda: fa3.flash_attn_combine(out_partial, lse_partial, **kw)), [out_partial, lse_partial]


bad("combine fp16 partials", TYPE, "out_partial")(
    lambda: _combine(torch.zeros(2, 1, 3, 2, 8).half(), torch.zeros(2, 1, 3, 2))
)
bad("combine 3-D partials", VALUE, "out_partial")(lambda: _combine(torch.zeros(2, 3, 8), torch.zeros(2, 3)))
bad("combine lse of another shape", VALUE, "lse_partial")(
    lambda: _combine(torch.zeros(2, 1, 3, 2, 8), torch.zeros(2, 1, 2, 3))
)
bad("combine no split", VALUE, "out_partial")(lambda: _combine(torch.zeros(0, 1, 3, 2, 8), torch.zeros(0, 1, 3, 2)))
bad("combine out_dtype int", TYPE, "out_dtype")(
    lambda: _combine(torch.zeros(2, 1, 3, 2, 8), torch.zeros(2, 1, 3, 2), out_dtype=torch.int32)
)
bad("combine out of another shape", VALUE, "out")(
    lambda: _combine(torch.zeros(2, 1, 3, 2, 8), torch.zeros(2, 1, 3, 2), out=torch.zeros(1, 3, 2, 4))
)


@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_bad_input(c):
    refused_unchanged(c, *c.build())


def test_every_new_argument_has_a_case():
    named = " ".join(c.name + " " + c.arg for c in CASES)
    for arg in (
        "qv", "cu_seqlens_q", "cu_seqlens_k_new", "max_seqlen_q", "rotary_seqlens", "q_descale", "attention_chunk",
        "scheduler_metadata", "pack_gqa", "sm_margin", "page_table", "cache_batch_idx",
    ):  # fmt: skip
        assert arg in named, arg
