"""flashkv_edu.fa3: FlashAttention 3's ``flash_attn_with_kvcache`` against the oracle.

The grid follows FA3's own ``test_flash_attn_kvcache`` (hopper/test_flash_attn.py), sized for a CPU:
varlen queries and varlen new keys, rotary (with ``rotary_seqlens``), causal / local /
``attention_chunk``, paged caches of page size 1, 4 and 16 with ``cache_batch_idx`` and
``cache_leftpad``, ``num_splits`` 1, 3 and 0 with and without a scheduler plan, and ``qv`` with
``d = 64`` and ``dv = 256 / 512``. Each case is checked per sequence against
:func:`flashkv_edu.attention_ref` with FA3's tolerance rule (max error within 2x PyTorch's own
low-precision error + 1e-5), the appended cache rows exactly (values) or to rounding (rotated
keys), and nothing else in the caches changed."""

from __future__ import annotations

import math
import random

import pytest
import torch
from test_api import rotary_reference

from flashkv_edu import fa3
from flashkv_edu import flash_attn_with_kvcache as fa2_kvcache
from flashkv_edu.reference import attention_ref, attention_varlen_ref
from flashkv_edu.testing import max_abs_err, within_fa_tolerance
from flashkv_edu.validation import ArgumentError


def make_config(rng: random.Random) -> dict:
    cfg = dict(
        sq=rng.choice([1, 3, 8]),
        cap=rng.choice([24, 40]),
        d=rng.choice([32, 64]),
        mha=rng.choice(["mha", "mqa", "gqa"]),
        varlen_q=rng.random() < 0.5,
        new_kv=rng.random() < 0.7,
        varlen_k=rng.random() < 0.5,
        causal=rng.random() < 0.5,
        local=rng.random() < 0.25,
        chunk=rng.choice([0, 0, 5, 8]),
        rotary_fraction=rng.choice([0.0, 0.5, 1.0]),
        interleaved=rng.random() < 0.5,
        rotary_seqlens=rng.random() < 0.3,
        page=rng.choice([None, None, 1, 4, 16]),
        batch_idx=rng.random() < 0.3,
        leftpad=rng.random() < 0.3,
        num_splits=rng.choice([1, 3, 0]),
        plan=rng.random() < 0.5,
        softcap=rng.choice([0.0, 0.0, 3.0]),
        seed=rng.randrange(10**6),
    )
    if not cfg["new_kv"]:
        cfg["rotary_fraction"], cfg["varlen_k"] = 0.0, False
    if cfg["rotary_fraction"] == 0.0:
        cfg["rotary_seqlens"] = False
    return cfg


def build(cfg, dtype=torch.bfloat16, dv=None, qv=False):
    """The tensors of one call and the oracle's answer: ``(kwargs, expected caches, out_ref,
    lse_ref, out_lowp)``."""
    g = torch.Generator().manual_seed(cfg["seed"])
    b, h = 3, 4
    hk = {"mha": 4, "mqa": 1, "gqa": 2}[cfg["mha"]]
    sq, cap, d = cfg["sq"], cfg["cap"], cfg["d"]
    dv = dv or d
    rand = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    q_lens = torch.randint(0 if cfg["varlen_q"] else sq, sq + 1, (b,), generator=g) if cfg["varlen_q"] else None
    if q_lens is not None and cfg.get("decode_first"):  # decode rows first, then one chunk
        q_lens[:] = 1
        q_lens[-1] = sq
    elif q_lens is not None:
        q_lens[0] = sq  # one sequence as long as max_seqlen_q
    knew = torch.zeros(b, dtype=torch.long)
    if cfg["new_kv"]:
        most = min(sq, cap // 2)
        knew = torch.randint(0, most + 1, (b,), generator=g) if cfg["varlen_k"] else torch.full((b,), most)
    lens = torch.stack([torch.randint(0, cap - int(n) + 1, (1,), generator=g)[0] for n in knew]).to(torch.int32)
    pads = None
    if cfg["leftpad"]:
        pads = torch.stack([torch.randint(0, int(c) + 1, (1,), generator=g)[0] for c in lens]).to(torch.int32)
    rotary_dim = math.floor(int(cfg["rotary_fraction"] * d) / 16) * 16
    window = tuple(int(x) for x in torch.randint(0, cap, (2,), generator=g)) if cfg["local"] else (-1, -1)
    page = cfg["page"]
    rows = b + 2 if cfg["batch_idx"] else b
    batch_idx = torch.randperm(rows, generator=g)[:b].to(torch.int32) if cfg["batch_idx"] else None
    if page:
        nblk = -(-cap // page)
        num_blocks = nblk * rows + 3
        k_cache, v_cache = rand(num_blocks, page, hk, d), rand(num_blocks, page, hk, dv)
        table = torch.randperm(num_blocks, generator=g)[: rows * nblk].view(rows, nblk).to(torch.int32)
    else:
        k_cache, v_cache = rand(rows, cap, hk, d), rand(rows, cap, hk, dv)
        table = None
    cos = sin = None
    dense_len = (-(-cap // page) * page) if page else cap
    if rotary_dim:
        angle = torch.rand(dense_len, rotary_dim // 2, generator=g) * 2 * math.pi
        cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    rot_base = lens.clone()
    if cfg["rotary_seqlens"]:
        rot_base = torch.randint(0, cap, (b,), generator=g, dtype=torch.int32)

    total_q = int(q_lens.sum()) if q_lens is not None else b * sq
    q = rand(total_q, h, d) if q_lens is not None else rand(b, sq, h, d)
    qv_t = None
    if qv:
        qv_t = rand(total_q, h, dv) if q_lens is not None else rand(b, sq, h, dv)
    k_new = (
        rand(int(knew.sum()), hk, d) if cfg["varlen_k"] else (rand(b, int(knew[0]), hk, d) if cfg["new_kv"] else None)
    )
    v_new = None
    if k_new is not None:
        v_new = rand(*k_new.shape[:-1], dv)
    cu_q = None if q_lens is None else torch.cat([torch.zeros(1), q_lens.cumsum(0)]).to(torch.int32)
    cu_k = torch.cat([torch.zeros(1), knew.cumsum(0)]).to(torch.int32) if cfg["varlen_k"] else None

    # The oracle, sequence by sequence: the expected cache, then attention over its valid keys.
    k_exp, v_exp = k_cache.clone(), v_cache.clone()
    outs, lses, lowp = [], [], []
    for i in range(b):
        row = int(batch_idx[i]) if batch_idx is not None else i
        n_new = int(knew[i])
        if k_new is not None and n_new:
            kn = k_new[int(cu_k[i]) : int(cu_k[i + 1])] if cu_k is not None else k_new[i]
            vn = v_new[int(cu_k[i]) : int(cu_k[i + 1])] if cu_k is not None else v_new[i]
            if rotary_dim:
                pos = int(rot_base[i]) + torch.arange(n_new)
                kn = rotary_reference(kn[None], cos, sin, pos[None], cfg["interleaved"])[0]
            for t in range(n_new):
                p = int(lens[i]) + t
                if table is not None:
                    blk, off = int(table[row, p // page]), p % page
                    k_exp[blk, off], v_exp[blk, off] = kn[t], vn[t]
                else:
                    k_exp[row, p], v_exp[row, p] = kn[t], vn[t]
        if table is not None:
            kd = k_exp[table[row].long()].reshape(-1, hk, d)
            vd = v_exp[table[row].long()].reshape(-1, hk, dv)
        else:
            kd, vd = k_exp[row], v_exp[row]
        nq = int(q_lens[i]) if q_lens is not None else sq
        qi = q[int(cu_q[i]) : int(cu_q[i + 1])] if cu_q is not None else q[i]
        qvi = None
        if qv_t is not None:
            qvi = (qv_t[int(cu_q[i]) : int(cu_q[i + 1])] if cu_q is not None else qv_t[i])[None]
        if rotary_dim and nq:
            offs = torch.arange(nq) if (cfg["causal"] or cfg["local"]) else torch.zeros(nq, dtype=torch.long)
            qi = rotary_reference(qi[None], cos, sin, (int(rot_base[i]) + offs)[None], cfg["interleaved"])[0]
        end = int(lens[i]) + n_new
        kw = dict(
            causal=cfg["causal"],
            window_size=window,
            softcap=cfg["softcap"],
            attention_chunk=cfg["chunk"],
            seqlens_k=torch.tensor([end]),
            leftpad_k=None if pads is None else pads[i : i + 1],
            qv=qvi,
        )
        if nq == 0:
            continue
        o, lse = attention_ref(qi[None], kd[None], vd[None], return_lse=True, **kw)
        outs.append(o[0])
        lses.append(lse[0])
        lowp.append(attention_ref(qi[None], kd[None], vd[None], compute_dtype=dtype, **kw)[0])
    kwargs = dict(
        q=q,
        k_cache=k_cache,
        v_cache=v_cache,
        k=k_new,
        v=v_new,
        qv=qv_t,
        rotary_cos=cos,
        rotary_sin=sin,
        cache_seqlens=lens,
        cache_batch_idx=batch_idx,
        cache_leftpad=pads,
        page_table=table,
        cu_seqlens_q=cu_q,
        cu_seqlens_k_new=cu_k,
        max_seqlen_q=sq if cu_q is not None else None,
        rotary_seqlens=rot_base if cfg["rotary_seqlens"] else None,
        causal=cfg["causal"],
        window_size=window,
        attention_chunk=cfg["chunk"],
        softcap=cfg["softcap"],
        rotary_interleaved=cfg["interleaved"],
        num_splits=cfg["num_splits"],
        return_softmax_lse=True,
    )
    if cfg["plan"]:
        kwargs["scheduler_metadata"] = fa3.get_scheduler_metadata(
            b, sq, cap, h, hk, d, lens, qkv_dtype=dtype, headdim_v=dv, cu_seqlens_q=cu_q, cu_seqlens_k_new=cu_k,
            cache_leftpad=pads, page_size=page, causal=cfg["causal"], window_size=window,
            attention_chunk=cfg["chunk"], has_softcap=cfg["softcap"] > 0, num_splits=cfg["num_splits"],
        )  # fmt: skip
    if cu_q is not None:
        out_ref, lse_ref, out_lowp = torch.cat(outs), torch.cat(lses, 1), torch.cat(lowp)
    else:
        out_ref, lse_ref, out_lowp = torch.stack(outs), torch.stack(lses), torch.stack(lowp)
    lse_ref = lse_ref.masked_fill(torch.isposinf(lse_ref), float("-inf"))  # FA3: an empty row has -inf
    return kwargs, (k_exp, v_exp), out_ref, lse_ref, out_lowp


def run_case(cfg, backend, **build_kw):
    kwargs, (k_exp, v_exp), out_ref, lse_ref, out_lowp = build(cfg, **build_kw)
    kc, vc = kwargs["k_cache"].clone(), kwargs["v_cache"].clone()
    out, lse, *rest = fa3.flash_attn_with_kvcache(**{**kwargs, "k_cache": kc, "v_cache": vc}, backend=backend)
    assert rest == [None, None]
    assert out.shape == out_ref.shape and out.dtype == kwargs["q"].dtype
    assert within_fa_tolerance(out, out_ref, out_lowp, mult=2.0), (
        max_abs_err(out, out_ref),
        max_abs_err(out_lowp, out_ref),
    )
    assert lse.shape == lse_ref.shape and max_abs_err(lse, lse_ref) < 2e-2
    assert torch.equal(vc, v_exp), "v_cache must be exactly the expected cache"
    assert torch.allclose(kc.float(), k_exp.float(), rtol=1e-2, atol=1e-2), "k_cache differs"


CONFIGS = [make_config(random.Random(i)) for i in range(80)]
TRITON_CONFIGS = [make_config(random.Random(5000 + i)) for i in range(18)] + [
    dict(make_config(random.Random(5100)), new_kv=True, rotary_fraction=1.0, rotary_seqlens=True, varlen_q=True)
]


def _cid(c):
    parts = [c["mha"], f"sq{c['sq']}", f"S{c['cap']}", f"d{c['d']}"]
    for flag in ("varlen_q", "varlen_k", "causal", "local", "rotary_seqlens", "batch_idx", "leftpad", "plan"):
        if c[flag]:
            parts.append(flag)
    if c["chunk"]:
        parts.append(f"chunk{c['chunk']}")
    if c["page"]:
        parts.append(f"page{c['page']}")
    return "-".join(parts)


@pytest.mark.parametrize("cfg", CONFIGS, ids=_cid)
def test_grid_torch_backend(cfg):
    run_case(cfg, "torch")


@pytest.mark.parametrize("cfg", TRITON_CONFIGS, ids=_cid)
def test_grid_triton_backend(cfg):
    run_case(cfg, "triton")


def test_grid_covers_every_feature():
    for flag in ("varlen_q", "varlen_k", "causal", "local", "rotary_seqlens", "batch_idx", "leftpad", "plan"):
        assert any(c[flag] for c in CONFIGS), flag
        assert not all(c[flag] for c in CONFIGS), flag
    assert {c["page"] for c in CONFIGS} == {None, 1, 4, 16}
    assert {c["chunk"] for c in CONFIGS} >= {0, 5, 8}
    assert {c["num_splits"] for c in CONFIGS} == {0, 1, 3}
    assert any(c["page"] and c["batch_idx"] and c["leftpad"] for c in CONFIGS)
    assert any(c["varlen_q"] and c["varlen_k"] and c["chunk"] for c in CONFIGS)
    assert any(c["chunk"] for c in TRITON_CONFIGS) and any(c["varlen_q"] for c in TRITON_CONFIGS)
    assert any(c["rotary_seqlens"] for c in TRITON_CONFIGS)


@pytest.mark.parametrize("dv", [256, 512])
@pytest.mark.parametrize("varlen_q", [False, True], ids=["batched", "varlen"])
def test_qv_with_a_narrow_key_and_a_wide_value(dv, varlen_q):
    """MLA with its weights absorbed (FA3's ``qv``): d = 64, dv = 256 / 512, default scale
    ``(d + dv) ** -0.5``; backend 'auto' serves it on the PyTorch path."""
    cfg = dict(make_config(random.Random(7)), d=64, varlen_q=varlen_q, new_kv=True, causal=True, chunk=0, page=None)
    run_case(cfg, "auto", dv=dv, qv=True)


def test_the_fa3_door_is_the_fa2_call_where_they_overlap():
    """The same call through both front doors gives the same bits (FA3's LSE -inf for an empty row
    aside), and the keyword list is written once: FA3's signature is FA3's order."""
    import inspect

    cfg = dict(make_config(random.Random(11)), varlen_q=False, varlen_k=False, chunk=0, rotary_seqlens=False)
    cfg.update(page=4, batch_idx=False, leftpad=False, plan=False)
    kwargs = build(cfg)[0]
    for name in ("qv", "cu_seqlens_q", "cu_seqlens_k_new", "max_seqlen_q", "rotary_seqlens", "attention_chunk"):
        kwargs.pop(name)
    two = {n: t for n, t in kwargs.items() if n != "page_table"}
    two["block_table"] = kwargs["page_table"]
    a = fa3.flash_attn_with_kvcache(
        **{**kwargs, "k_cache": kwargs["k_cache"].clone(), "v_cache": kwargs["v_cache"].clone()}
    )
    b = fa2_kvcache(**{**two, "k_cache": two["k_cache"].clone(), "v_cache": two["v_cache"].clone()})
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1].masked_fill(torch.isposinf(b[1]), float("-inf")))
    names = list(inspect.signature(fa3.flash_attn_with_kvcache).parameters)
    assert names[:6] == ["q", "k_cache", "v_cache", "k", "v", "qv"]
    assert names[-3:] == ["return_softmax_lse", "learnable_sink", "backend"]
    assert "alibi_slopes" not in names and "page_table" in names and "block_table" not in names


def test_a_plan_gives_the_same_result_and_a_plan_for_another_call_raises():
    cfg = dict(make_config(random.Random(3)), plan=False, num_splits=0, varlen_q=True, new_kv=True)
    kwargs, *_ = build(cfg)
    lens, b, sq = kwargs["cache_seqlens"], 3, cfg["sq"]
    plan = fa3.get_scheduler_metadata(
        b, sq, cfg["cap"], 4, kwargs["k_cache"].shape[2], cfg["d"], lens, cu_seqlens_q=kwargs["cu_seqlens_q"],
        cu_seqlens_k_new=kwargs["cu_seqlens_k_new"], page_size=cfg["page"], causal=cfg["causal"],
        window_size=kwargs["window_size"], attention_chunk=cfg["chunk"], has_softcap=cfg["softcap"] > 0,
    )  # fmt: skip
    caches = lambda: dict(k_cache=kwargs["k_cache"].clone(), v_cache=kwargs["v_cache"].clone())  # noqa: E731
    without = fa3.flash_attn_with_kvcache(**{**kwargs, **caches()})
    with_plan = fa3.flash_attn_with_kvcache(**{**kwargs, **caches(), "scheduler_metadata": plan})
    assert torch.equal(without[0], with_plan[0])
    other = fa3.get_scheduler_metadata(
        b, sq, cfg["cap"], 4, kwargs["k_cache"].shape[2], cfg["d"], lens, causal=not cfg["causal"]
    )
    k_cache, v_cache = kwargs["k_cache"].clone(), kwargs["v_cache"].clone()
    with pytest.raises(ArgumentError, match="scheduler_metadata was made for"):
        fa3.flash_attn_with_kvcache(**{**kwargs, "k_cache": k_cache, "v_cache": v_cache, "scheduler_metadata": other})
    assert torch.equal(k_cache, kwargs["k_cache"]) and torch.equal(v_cache, kwargs["v_cache"])


def test_fa3_split_rule_differs_from_fa2_where_frontier_says():
    """FA3's heuristic: no eligibility filter, one split for <= 4 key blocks, and an L2-sized KV head
    is split even when the programs fill the GPU (non-causal, queries passing over it twice)."""
    from flashkv_edu.split import num_splits_heuristic, num_splits_heuristic_fa3

    assert num_splits_heuristic_fa3(8, 132, 4, 1, 0, False) == 1
    assert num_splits_heuristic(8, 264, 4) > 1  # FA2 splits 4 blocks (its program slots: 2 x SMs)
    big = 200 * 1024 * 1024
    assert num_splits_heuristic_fa3(400, 132, 1000, 300, big, False) == 4
    assert num_splits_heuristic_fa3(400, 132, 1000, 300, big, True) == 1
    found = [num_splits_heuristic_fa3(n, 132, 64, 1, 0, False) for n in (1, 8, 32, 64, 110)]
    assert found[0] > found[-1] == 1


@pytest.mark.parametrize("varlen", [False, True])
def test_combine_merges_partials_as_fa3_lays_them_out(varlen):
    """``flash_attn_combine``: partials of split key ranges merge into the whole attention, LSE in
    FA3's ``(batch, seqlen, nheads)`` layout; an all-empty row gives 0 and -inf."""
    g = torch.Generator().manual_seed(4)
    b, s, h, d, n = 2, 3, 2, 8, 3
    q, k, v = (
        torch.randn(b, s, h, d, generator=g),
        torch.randn(b, 12, h, d, generator=g),
        torch.randn(b, 12, h, d, generator=g),
    )
    whole, whole_lse = attention_ref(q, k, v, return_lse=True)
    parts = [attention_ref(q, k[:, i * 4 : (i + 1) * 4], v[:, i * 4 : (i + 1) * 4], return_lse=True) for i in range(n)]
    out_p = torch.stack([p[0] for p in parts])
    lse_p = torch.stack([p[1].transpose(1, 2) for p in parts])  # (n, b, s, h)
    lse_p[:, 1, 2] = float("-inf")  # row (1, 2) empty in every split
    if varlen:
        out, lse = fa3.flash_attn_combine(out_p.reshape(n, b * s, h, d), lse_p.reshape(n, b * s, h))
        out, lse = out.view(b, s, h, d), lse.view(b, s, h)
    else:
        out, lse = fa3.flash_attn_combine(out_p, lse_p)
    assert lse.shape == (b, s, h) and out.dtype == torch.float32
    keep = torch.ones(b, s, dtype=torch.bool)
    keep[1, 2] = False
    assert torch.allclose(out[keep], whole[keep], atol=1e-5)
    assert torch.allclose(lse[keep], whole_lse.transpose(1, 2)[keep], atol=1e-5)
    assert torch.equal(out[1, 2], torch.zeros(h, d)) and torch.isneginf(lse[1, 2]).all()
    into = torch.empty(b, s, h, d, dtype=torch.bfloat16)
    got, _ = fa3.flash_attn_combine(out_p, lse_p, out=into, out_dtype=torch.bfloat16)
    assert got is into and torch.allclose(into.float(), out, atol=1e-2)


def test_fp8_queries_with_q_descale_match_the_dequantized_call():
    """FA3's fp8 call: q, caches and new k/v in e4m3 with descales, output bf16. It equals the bf16
    call on the dequantized values (the same keys written)."""
    g = torch.Generator().manual_seed(5)
    b, sq, h, hk, d, cap = 2, 2, 4, 2, 32, 16
    e4 = torch.float8_e4m3fn
    q = torch.randn(b, sq, h, d, generator=g).to(e4)
    kc, vc = torch.randn(b, cap, hk, d, generator=g).to(e4), torch.randn(b, cap, hk, d, generator=g).to(e4)
    k, v = torch.randn(b, 1, hk, d, generator=g).to(e4), torch.randn(b, 1, hk, d, generator=g).to(e4)
    qd, kd, vd = (torch.rand(b, hk, generator=g) + 0.5 for _ in range(3))
    lens = torch.tensor([3, 9], dtype=torch.int32)
    out = fa3.flash_attn_with_kvcache(
        q, kc, vc, k, v, cache_seqlens=lens, q_descale=qd, k_descale=kd, v_descale=vd, causal=True
    )
    assert out.dtype == torch.bfloat16 and out.shape == (b, sq, h, d)
    assert torch.equal(kc[0, 3], k[0, 0]) and torch.equal(vc[1, 9], v[1, 0])  # written as given
    real = lambda x, s: x.float() * s.repeat_interleave(x.shape[2] // s.shape[1], 1)[:, None, :, None]  # noqa: E731
    for i in range(b):
        n = int(lens[i]) + 1
        ref = attention_ref(
            real(q, qd)[i : i + 1], real(kc, kd)[i : i + 1, :n], real(vc, vd)[i : i + 1, :n], causal=True
        )
        assert max_abs_err(out[i : i + 1], ref) < 3e-2


def test_the_varlen_oracle_is_attention_ref_per_sequence():
    g = torch.Generator().manual_seed(6)
    q, k, v = torch.randn(5, 2, 8, generator=g), torch.randn(7, 2, 8, generator=g), torch.randn(7, 2, 8, generator=g)
    cu_q, cu_k = torch.tensor([0, 2, 5]), torch.tensor([0, 3, 7])
    out, lse = attention_varlen_ref(q, k, v, cu_q, cu_k, causal=True, return_lse=True)
    one = attention_ref(q[2:5][None], k[3:7][None], v[3:7][None], causal=True)
    assert out.shape == (5, 2, 8) and lse.shape == (2, 5) and torch.equal(out[2:5], one[0])


def test_chunked_attention_is_llama4s_mask():
    """``attention_chunk=c`` with causal: query at position p sees keys floor(p / c) * c .. p."""
    from flashkv_edu.masks import visible_keys

    keep = visible_keys(9, 9, (-1, 0), torch.tensor([0]), torch.tensor([9]), chunk=4)[0]
    for p in range(9):
        assert keep[p].nonzero().flatten().tolist() == list(range(p // 4 * 4, p + 1))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("page", [None, 4])
def test_decode_rows_first_then_a_chunk_in_one_call(page, backend):
    """The mixed step of chunked prefill: decode rows first (read in place, one group), then a chunk
    (its own group), new keys varlen; against the oracle, contiguous and paged."""
    cfg = dict(make_config(random.Random(21)), varlen_q=True, decode_first=True, sq=8, new_kv=True, varlen_k=True)
    cfg.update(page=page, causal=True, chunk=0, batch_idx=False, plan=False)
    run_case(cfg, backend)


def test_the_bench_varlen_row_computes_the_same_step_three_ways():
    from flashkv_edu.bench import bench_varlen

    rows = bench_varlen(decode_rows=3, context=40, chunk=8, nheads=4, nheads_k=2, headdim=16, repeats=1)
    assert {r["backend"] for r in rows} == {"torch", "triton"} and all(r["same"] for r in rows)
