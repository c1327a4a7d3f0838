"""flash_attn_with_kvcache against an independent reference, on a grid modelled on
FlashAttention's own test_flash_attn_kvcache (sizes scaled down for the interpreter)."""

import contextlib
import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flashkv_edu import flash_attn_with_kvcache
from flashkv_edu.kernels.forward import attention_triton
from flashkv_edu.online_softmax import blockwise_attention
from flashkv_edu.reference import attention_ref
from flashkv_edu.rotary import apply_rotary, rotary_tables
from flashkv_edu.testing import max_abs_err, within_fa_tolerance

SEQLENS = [(1, 64), (1, 99), (3, 128), (8, 40), (4, 17), (16, 48), (2, 2)]
HEADDIMS = [32, 59, 64, 80, 128, 256]


def rotary_reference(x, cos, sin, positions, interleaved):
    """Rotate the first 2*cos.shape[1] features of x (b, s, h, d) as complex numbers. Positions past
    the tables' end turn by the identity (cos 1, sin 0), FlashAttention's masked table load."""
    rot = 2 * cos.shape[1]
    past = max(0, int(positions.max()) + 1 - cos.shape[0])
    cos = torch.cat([cos.float(), torch.ones(past, rot // 2)])
    sin = torch.cat([sin.float(), torch.zeros(past, rot // 2)])
    xf = x.float()
    c = cos[positions][:, :, None, :]
    s = sin[positions][:, :, None, :]
    if interleaved:
        pairs = torch.complex(xf[..., 0:rot:2].contiguous(), xf[..., 1:rot:2].contiguous())
    else:
        pairs = torch.complex(xf[..., : rot // 2].contiguous(), xf[..., rot // 2 : rot].contiguous())
    turned = pairs * torch.complex(c, s)
    out = xf.clone()
    if interleaved:
        out[..., 0:rot:2], out[..., 1:rot:2] = turned.real, turned.imag
    else:
        out[..., : rot // 2], out[..., rot // 2 : rot] = turned.real, turned.imag
    return out.to(x.dtype)


def make_config(rng):
    sq, cap = rng.choice(SEQLENS)
    cfg = dict(
        sq=sq,
        cap=cap,
        d=rng.choice(HEADDIMS),
        mha=rng.choice(["mha", "mqa", "gqa"]),
        new_kv=rng.random() < 0.6,
        causal=rng.random() < 0.5,
        local=rng.random() < 0.3,
        alibi=rng.random() < 0.25,
        rotary_fraction=rng.choice([0.0, 0.5, 1.0]),
        interleaved=rng.random() < 0.5,
        paged=rng.choice([None, None, 16, 5]),
        leftpad=rng.random() < 0.3,
        batch_idx=rng.random() < 0.3,
        num_splits=rng.choice([1, 0]),
        softcap=rng.choice([0.0, 0.0, 2.5]),
        lse=rng.random() < 0.5,
        same_new=rng.random() < 0.5,
        seed=rng.randrange(10**6),
    )
    if cfg["paged"] is not None:
        cfg["leftpad"] = cfg["batch_idx"] = False
    if not cfg["new_kv"]:
        cfg["rotary_fraction"] = 0.0
    if cfg["new_kv"] and sq > cap:
        cfg["new_kv"] = False
        cfg["rotary_fraction"] = 0.0
    return cfg


def run_case(cfg, backend, dtype=torch.float16, during_call=None):
    """One grid case against the oracle. ``during_call``: a context manager entered around the
    ``flash_attn_with_kvcache`` call only (the oracle runs outside it)."""
    g = torch.Generator().manual_seed(cfg["seed"])
    b, h = 2, 6
    hk = {"mha": 6, "mqa": 1, "gqa": 3}[cfg["mha"]]
    sq, cap, d = cfg["sq"], cfg["cap"], cfg["d"]
    rand = lambda *shape: torch.randn(*shape, generator=g).to(dtype)
    q = rand(b, sq, h, d)
    snew = (sq if cfg["same_new"] else int(torch.randint(1, sq + 1, (1,), generator=g))) if cfg["new_kv"] else 0
    snew = cfg.get("snew", snew)
    k_new, v_new = (rand(b, snew, hk, d), rand(b, snew, hk, d)) if snew else (None, None)
    rotary_dim = math.floor(int(cfg["rotary_fraction"] * d) / 16) * 16
    window = tuple(int(x) for x in torch.randint(0, cap, (2,), generator=g)) if cfg["local"] else (-1, -1)
    if snew:  # causal queries may rotate past the table's end (cache_seqlens + i >= cap)
        lens = torch.randint(0, cap - snew + 1, (b,), generator=g, dtype=torch.int32)
    else:
        lens = torch.randint(1, cap + 1, (b,), generator=g, dtype=torch.int32)
    if "lens" in cfg:
        lens = torch.tensor(cfg["lens"], dtype=torch.int32)
    pads = (
        torch.stack([torch.randint(0, int(c), (1,), generator=g)[0] if c > 0 else torch.tensor(0) for c in lens]).to(
            torch.int32
        )
        if cfg["leftpad"]
        else None
    )
    table = None
    if cfg["paged"]:
        page = cfg["paged"]
        nblk = math.ceil(cap / page)
        num_blocks = nblk * b * 3
        k_cache, v_cache = rand(num_blocks, page, hk, d), rand(num_blocks, page, hk, d)
        table = torch.randperm(num_blocks, generator=g)[: b * nblk].view(b, nblk).to(torch.int32)
        dense_len = nblk * page
    else:
        rows = b + 2 if cfg["batch_idx"] else b
        k_cache, v_cache = rand(rows, cap, hk, d), rand(rows, cap, hk, d)
        dense_len = cap
    batch_idx = torch.randperm(b + 2, generator=g)[:b].to(torch.int32) if cfg["batch_idx"] else None
    cos = sin = None
    if rotary_dim:
        angle = torch.rand(dense_len, rotary_dim // 2, generator=g) * 2 * math.pi
        cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    slopes = torch.rand(b, h, generator=g) * 0.3 if cfg["alibi"] else None

    # reference: expected cache, then attention over it in fp32 (and in fp16 for the error budget)
    k_exp, v_exp = k_cache.clone(), v_cache.clone()
    if snew:
        pos = lens.long()[:, None] + torch.arange(snew)[None, :]
        k_rot = rotary_reference(k_new, cos, sin, pos, cfg["interleaved"]) if rotary_dim else k_new
        for bi in range(b):
            for t in range(snew):
                p = int(pos[bi, t])
                if table is not None:
                    blk, off = int(table[bi, p // cfg["paged"]]), p % cfg["paged"]
                    k_exp[blk, off], v_exp[blk, off] = k_rot[bi, t], v_new[bi, t]
                else:
                    row = int(batch_idx[bi]) if batch_idx is not None else bi
                    k_exp[row, p], v_exp[row, p] = k_rot[bi, t], v_new[bi, t]
    if table is not None:
        kd = k_exp[table.long().flatten()].view(b, dense_len, hk, d)
        vd = v_exp[table.long().flatten()].view(b, dense_len, hk, d)
    elif batch_idx is not None:
        kd, vd = k_exp[batch_idx.long()], v_exp[batch_idx.long()]
    else:
        kd, vd = k_exp, v_exp
    q_ref = q
    if rotary_dim:
        offs = torch.arange(sq)[None, :] if (cfg["causal"] or cfg["local"]) else torch.zeros(1, sq, dtype=torch.long)
        q_ref = rotary_reference(q, cos, sin, lens.long()[:, None] + offs, cfg["interleaved"])
    kw = dict(
        causal=cfg["causal"],
        window_size=window,
        softcap=cfg["softcap"],
        alibi_slopes=slopes,
        seqlens_k=lens + snew,
        leftpad_k=pads,
    )
    out_ref, lse_ref = attention_ref(q_ref, kd, vd, return_lse=True, **kw)
    out_pt = attention_ref(q_ref, kd, vd, compute_dtype=dtype, **kw)

    kc, vc = k_cache.clone(), v_cache.clone()
    with during_call or contextlib.nullcontext():
        result = flash_attn_with_kvcache(
            q,
            kc,
            vc,
            k_new,
            v_new,
            rotary_cos=cos,
            rotary_sin=sin,
            cache_seqlens=lens,
            cache_batch_idx=batch_idx,
            cache_leftpad=pads,
            block_table=table,
            causal=cfg["causal"],
            window_size=window,
            softcap=cfg["softcap"],
            rotary_interleaved=cfg["interleaved"],
            alibi_slopes=slopes,
            num_splits=cfg["num_splits"],
            return_softmax_lse=cfg["lse"],
            backend=backend,
        )
    out = result[0] if cfg["lse"] else result
    assert out.dtype == dtype and out.shape == q.shape
    mult = 5.0 if cfg["alibi"] else 3.0
    assert within_fa_tolerance(out, out_ref, out_pt, mult=mult), (
        max_abs_err(out, out_ref),
        max_abs_err(out_pt, out_ref),
    )
    if cfg["lse"]:
        assert result[1].shape == (b, h, sq) and result[1].dtype == torch.float32
        assert max_abs_err(result[1], lse_ref) < 1e-2
    assert torch.equal(vc, v_exp), "v_cache must be exactly the expected cache"
    assert torch.allclose(kc.float(), k_exp.float(), rtol=1e-3, atol=1e-3), "k_cache differs"
    assert torch.equal(lens, lens.clone())  # cache_seqlens is an input, not mutated (checked below too)


CONFIGS_TORCH = [make_config(random.Random(i)) for i in range(90)]
CONFIGS_TRITON = [make_config(random.Random(1000 + i)) for i in range(40)]


@pytest.mark.parametrize("cfg", CONFIGS_TORCH, ids=lambda c: f"{c['mha']}-sq{c['sq']}-S{c['cap']}-d{c['d']}")
def test_grid_torch_backend(cfg):
    run_case(cfg, "torch")


@pytest.mark.parametrize("cfg", CONFIGS_TRITON, ids=lambda c: f"{c['mha']}-sq{c['sq']}-S{c['cap']}-d{c['d']}")
def test_grid_triton_backend(cfg):
    run_case(cfg, "triton")


def test_grid_covers_every_feature():
    both = CONFIGS_TORCH + CONFIGS_TRITON
    for key in ("new_kv", "causal", "local", "alibi", "interleaved", "leftpad", "batch_idx", "lse", "same_new"):
        assert {c[key] for c in both} == {True, False}, key
    assert {c["paged"] for c in both} == {None, 16, 5}
    assert {c["num_splits"] for c in both} == {0, 1} and {c["softcap"] for c in both} == {0.0, 2.5}
    assert {c["rotary_fraction"] for c in both} == {0.0, 0.5, 1.0} and {c["d"] for c in both} == set(HEADDIMS)
    assert {c["mha"] for c in both} == {"mha", "mqa", "gqa"}
    for backend_cfgs in (CONFIGS_TORCH, CONFIGS_TRITON):
        assert any(c["paged"] and c["new_kv"] for c in backend_cfgs)
        assert any(c["rotary_fraction"] and c["new_kv"] for c in backend_cfgs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_other_dtypes(dtype, backend):
    cfg = dict(
        make_config(random.Random(7)),
        sq=3,
        cap=40,
        d=64,
        new_kv=True,
        paged=16,
        leftpad=False,
        batch_idx=False,
        rotary_fraction=0.5,
        causal=True,
    )
    run_case(cfg, backend, dtype)


def test_cache_seqlens_not_mutated_and_fully_masked_rows():
    q = torch.randn(1, 5, 2, 16)
    kc, vc = torch.zeros(1, 8, 2, 16), torch.zeros(1, 8, 2, 16)
    lens = torch.tensor([0], dtype=torch.int32)
    for backend in ("torch", "triton"):
        out, lse = flash_attn_with_kvcache(
            q,
            kc,
            vc,
            torch.randn(1, 2, 2, 16),
            torch.randn(1, 2, 2, 16),
            cache_seqlens=lens,
            causal=True,
            return_softmax_lse=True,
            backend=backend,
        )
        assert lens.tolist() == [0]
        assert torch.all(out[:, :3] == 0) and torch.all(torch.isposinf(lse[:, :, :3]))  # s_q=5 > s_k=2


def _args():
    g = torch.Generator().manual_seed(0)
    return dict(
        q=torch.randn(2, 1, 4, 16, generator=g),
        k_cache=torch.randn(2, 32, 2, 16, generator=g),
        v_cache=torch.randn(2, 32, 2, 16, generator=g),
        k=torch.randn(2, 1, 2, 16, generator=g),
        v=torch.randn(2, 1, 2, 16, generator=g),
        cache_seqlens=torch.tensor([5, 31], dtype=torch.int32),
    )


BAD = [
    (
        dict(block_table=torch.zeros(2, 2, dtype=torch.int32), cache_batch_idx=torch.tensor([0, 1], dtype=torch.int32)),
        "cache_batch_idx cannot be used with block_table",
    ),
    (dict(v=None), "k and v must be given together"),
    (dict(k=None, v=None, rotary_cos=torch.ones(32, 8), rotary_sin=torch.ones(32, 8)), "rotary_cos/rotary_sin need"),
    (dict(cache_seqlens=torch.tensor([5, 32], dtype=torch.int32)), "cache overflow"),
    (dict(cache_seqlens=torch.tensor([5, 33], dtype=torch.int32)), "cache_seqlens must be <= 32"),
    (dict(block_table=torch.tensor([[0, 9], [1, 2]], dtype=torch.int32)), "block_table entries must lie"),
    (dict(cache_seqlens=torch.tensor([5, 3])), "cache_seqlens must be int32"),
    (dict(window_size=(-2, 0)), "window_size left"),
    (dict(num_splits=129), "num_splits"),
    (dict(rotary_cos=torch.ones(32, 4), rotary_sin=torch.ones(32, 4)), "multiple of 16"),
    (dict(cache_batch_idx=torch.tensor([1, 1], dtype=torch.int32)), "must not repeat"),
    (dict(cache_leftpad=torch.tensor([6, 0], dtype=torch.int32)), "cache_leftpad must be <= cache_seqlens"),
    (dict(alibi_slopes=torch.ones(3)), "alibi_slopes must have shape"),
    (dict(backend="cuda"), "backend must be one of"),
]


@pytest.mark.parametrize("change, match", BAD, ids=[m for _, m in BAD])
def test_bad_arguments_raise_and_leave_caches_untouched(change, match):
    args = _args()
    args.update(change)
    if "block_table" in change and "cache_batch_idx" not in change:
        args["k_cache"], args["v_cache"] = torch.randn(4, 16, 2, 16), torch.randn(4, 16, 2, 16)
    before = args["k_cache"].clone(), args["v_cache"].clone()
    with pytest.raises((ValueError, TypeError), match=match):
        flash_attn_with_kvcache(**args)
    assert torch.equal(args["k_cache"], before[0]) and torch.equal(args["v_cache"], before[1])


def test_head_dims_up_to_512_in_pytorch_and_256_in_the_kernels_and_dtype_mismatch():
    q, kc, vc = torch.randn(1, 3, 2, 512), torch.randn(1, 6, 1, 512), torch.randn(1, 6, 1, 512)
    out = flash_attn_with_kvcache(q, kc, vc, causal=True, backend="torch")
    torch.testing.assert_close(out, attention_ref(q, kc, vc, causal=True), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="headdim of q must be <= 256"):
        flash_attn_with_kvcache(q, kc, vc, backend="triton")
    with pytest.raises(ValueError, match="headdim of q must be <= 512"):
        flash_attn_with_kvcache(torch.randn(1, 1, 1, 520), torch.randn(1, 4, 1, 520), torch.randn(1, 4, 1, 520))
    with pytest.raises(ValueError, match="share one dtype"):
        flash_attn_with_kvcache(torch.randn(1, 1, 1, 16).half(), torch.randn(1, 4, 1, 16), torch.randn(1, 4, 1, 16))


# --- views -------------------------------------------------------------------------------------


def strided_view(t: torch.Tensor) -> torch.Tensor:
    """The same values as ``t`` in a view that is contiguous in no dimension."""
    big = torch.full((*t.shape, 2), -7, dtype=t.dtype)
    big[..., 0] = t
    return big[..., 0]


def cache_view(t: torch.Tensor) -> torch.Tensor:
    """The same values in a view with padded rows and heads (last dim contiguous, which
    FlashAttention requires of a cache it writes in place)."""
    b, s, hk, d = t.shape
    big = torch.full((b + 1, s + 3, hk + 1, d), float("nan"), dtype=t.dtype)
    view = big[1:, 2 : s + 2, :hk]
    view.copy_(t)
    return view


def transposed_view(t: torch.Tensor) -> torch.Tensor:
    """The same 2-D values stored column-major."""
    return t.t().contiguous().t()


# --- silent wrong results reported against the Triton backend ----------------------------------


def test_strided_cache_leftpad_is_read_by_value():
    """``torch.tensor([3, 0, 5, 0], dtype=torch.int32)[::2]`` is leftpad [3, 5]: the kernel once
    read [3, 0] through the strides it ignored."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 1, 2, 16, generator=g)
    kc, vc = torch.randn(2, 8, 1, 16, generator=g), torch.randn(2, 8, 1, 16, generator=g)
    lens = torch.tensor([7, 8], dtype=torch.int32)
    pad_view = torch.tensor([3, 0, 5, 0], dtype=torch.int32)[::2]
    pad = pad_view.contiguous()
    for backend in ("torch", "triton"):
        out_view, lse_view = flash_attn_with_kvcache(
            q, kc, vc, cache_seqlens=lens, cache_leftpad=pad_view, return_softmax_lse=True, backend=backend
        )
        out, lse = flash_attn_with_kvcache(
            q, kc, vc, cache_seqlens=lens, cache_leftpad=pad, return_softmax_lse=True, backend=backend
        )
        ref, ref_lse = attention_ref(q, kc, vc, seqlens_k=lens, leftpad_k=pad, return_lse=True)
        torch.testing.assert_close(out_view, out, rtol=0, atol=0)
        torch.testing.assert_close(lse_view, lse, rtol=0, atol=0)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


def _nan_cache(b, cap, hk, d, lens, pads, g):
    """A cache made with ``torch.empty`` semantics: NaN everywhere but the valid rows."""
    k = torch.full((b, cap, hk, d), float("nan"))
    v = torch.full((b, cap, hk, d), float("nan"))
    for i in range(b):
        k[i, pads[i] : lens[i]] = torch.randn(int(lens[i] - pads[i]), hk, d, generator=g)
        v[i, pads[i] : lens[i]] = torch.randn(int(lens[i] - pads[i]), hk, d, generator=g)
    return k, v


def test_rows_outside_the_valid_keys_are_never_read():
    """NaN in unused cache rows must not reach the output of any path (0 x NaN = NaN)."""
    g = torch.Generator().manual_seed(2)
    b, cap, h, hk, d = 3, 12, 4, 2, 16
    lens = torch.tensor([5, 12, 9], dtype=torch.int32)
    pads = torch.tensor([2, 0, 4], dtype=torch.int32)
    kc, vc = _nan_cache(b, cap, hk, d, lens, pads, g)
    clean_k, clean_v = kc.nan_to_num(0.0), vc.nan_to_num(0.0)
    q = torch.randn(b, 2, h, d, generator=g)
    expected = attention_ref(q, clean_k, clean_v, seqlens_k=lens, leftpad_k=pads, causal=True)
    outs = {
        "attention_ref": attention_ref(q, kc, vc, seqlens_k=lens, leftpad_k=pads, causal=True),
        "blockwise_attention": blockwise_attention(
            q, kc, vc, seqlens_k=lens, leftpad_k=pads, causal=True, block_size=4
        )[0],
        "attention_triton": attention_triton(q, kc, vc, seqlens_k=lens, leftpad_k=pads, causal=True),
    }
    for backend in ("torch", "triton"):
        outs[f"api {backend}"] = flash_attn_with_kvcache(
            q, kc, vc, cache_seqlens=lens, cache_leftpad=pads, causal=True, backend=backend
        )
    # paged: the same sequences laid out in pages of 4, unused pages and rows full of NaN
    page = 4
    pool_k = torch.full((b * 3 + 2, page, hk, d), float("nan"))
    pool_v = pool_k.clone()
    table = torch.tensor([[3, 0, 7], [1, 4, 2], [5, 8, 6]], dtype=torch.int32)
    lens0 = torch.tensor([4, 12, 6], dtype=torch.int32)
    for i in range(b):
        for p in range(int(lens0[i])):
            pool_k[table[i, p // page], p % page] = clean_k[i, p]
            pool_v[table[i, p // page], p % page] = clean_v[i, p]
    expected_paged = attention_ref(q, clean_k, clean_v, seqlens_k=lens0, causal=True)
    for backend in ("torch", "triton"):
        out = flash_attn_with_kvcache(
            q, pool_k, pool_v, cache_seqlens=lens0, block_table=table, causal=True, backend=backend
        )
        assert torch.isfinite(out).all(), f"paged {backend}: NaN from an unused row"
        torch.testing.assert_close(out, expected_paged, rtol=1e-5, atol=1e-5)
    for name, out in outs.items():
        assert torch.isfinite(out).all(), f"{name}: NaN from an unused row"
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, msg=name)


# --- strides never matter: random valid calls, views vs contiguous -----------------------------


@st.composite
def api_configs(draw):
    cfg = dict(
        b=draw(st.integers(1, 3)),
        sq=draw(st.sampled_from([1, 2, 3])),
        heads=draw(st.sampled_from([(4, 2), (2, 2), (4, 1)])),
        d=draw(st.sampled_from([16, 32])),
        paged=draw(st.sampled_from([None, 4, 5])),
        cap=draw(st.integers(8, 20)),
        new=draw(st.integers(0, 2)),
        rotary=draw(st.booleans()),
        interleaved=draw(st.booleans()),
        leftpad=draw(st.booleans()),
        batch_idx=draw(st.booleans()),
        causal=draw(st.booleans()),
        window=draw(st.sampled_from([(-1, -1), (3, 0), (2, 1)])),
        alibi=draw(st.sampled_from([None, "1d", "2d"])),
        softcap=draw(st.sampled_from([0.0, 3.0])),
        splits=draw(st.sampled_from([0, 1, 3])),
        seed=draw(st.integers(0, 10**6)),
    )
    if cfg["paged"]:
        cfg["leftpad"] = cfg["batch_idx"] = False
    if cfg["new"] == 0:
        cfg["rotary"] = False
    return cfg


def _build(cfg):
    """Contiguous arguments of one valid call."""
    g = torch.Generator().manual_seed(cfg["seed"])
    b, sq, d = cfg["b"], cfg["sq"], cfg["d"]
    h, hk = cfg["heads"]
    new = cfg["new"]
    r = lambda *s: torch.randn(*s, generator=g)
    a = dict(
        q=r(b, sq, h, d),
        causal=cfg["causal"],
        window_size=cfg["window"],
        softcap=cfg["softcap"],
        num_splits=cfg["splits"],
        return_softmax_lse=True,
    )
    if cfg["paged"]:
        page = cfg["paged"]
        nblk = -(-cfg["cap"] // page)
        cap = nblk * page
        perm = torch.randperm(b * nblk + 2, generator=g)[: b * nblk].to(torch.int32)
        a["block_table"] = perm.view(b, nblk)
        a["k_cache"], a["v_cache"] = r(b * nblk + 2, page, hk, d), r(b * nblk + 2, page, hk, d)
    else:
        cap = cfg["cap"]
        rows = b + 1 if cfg["batch_idx"] else b
        a["k_cache"], a["v_cache"] = r(rows, cap, hk, d), r(rows, cap, hk, d)
        if cfg["batch_idx"]:
            a["cache_batch_idx"] = torch.randperm(rows, generator=g)[:b].to(torch.int32)
    room = cap - new
    lens = torch.randint(1, room + 1, (b,), generator=g, dtype=torch.int32)
    a["cache_seqlens"] = lens
    if cfg["leftpad"]:
        a["cache_leftpad"] = torch.stack([torch.randint(0, int(n), (1,), generator=g)[0] for n in lens]).to(torch.int32)
    if new:
        a["k"], a["v"] = r(b, new, hk, d), r(b, new, hk, d)
    if cfg["rotary"]:
        cos, sin = rotary_tables(cap, 16)
        a["rotary_cos"], a["rotary_sin"] = cos, sin
        a["rotary_interleaved"] = cfg["interleaved"]
    if cfg["alibi"] == "1d":
        a["alibi_slopes"] = torch.rand(h, generator=g)
    elif cfg["alibi"] == "2d":
        a["alibi_slopes"] = torch.rand(b, h, generator=g)
    return a


def _as_views(a):
    """Every tensor argument replaced by a non-contiguous view of the same values."""
    out = {}
    for name, t in a.items():
        if not isinstance(t, torch.Tensor):
            out[name] = t
        elif name in ("k_cache", "v_cache"):
            out[name] = cache_view(t)
        elif name == "block_table" or (name == "alibi_slopes" and t.dim() == 2):
            out[name] = transposed_view(t) if t.shape[0] > 1 and t.shape[1] > 1 else strided_view(t)
        else:
            out[name] = strided_view(t)
    return out


def _same_call(cfg, backend):
    a = _build(cfg)
    views = _as_views(a)
    out, lse = flash_attn_with_kvcache(**a, backend=backend)
    out_v, lse_v = flash_attn_with_kvcache(**views, backend=backend)
    torch.testing.assert_close(out_v, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse_v, lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(views["k_cache"], a["k_cache"], rtol=0, atol=0)  # the same append
    torch.testing.assert_close(views["v_cache"], a["v_cache"], rtol=0, atol=0)


@settings(max_examples=40)
@given(cfg=api_configs())
def test_views_equal_the_contiguous_call_torch(cfg):
    _same_call(cfg, "torch")


@settings(max_examples=15)
@given(cfg=api_configs())
def test_views_equal_the_contiguous_call_triton(cfg):
    _same_call(cfg, "triton")


# --- valid inputs that used to fail -------------------------------------------------------------


def test_window_size_as_an_integer_tensor_like_flashattentions_tests():
    g = torch.Generator().manual_seed(4)
    q, kc, vc = (
        torch.randn(1, 2, 2, 16, generator=g),
        torch.randn(1, 9, 1, 16, generator=g),
        torch.randn(1, 9, 1, 16, generator=g),
    )
    window = torch.randint(0, 9, (2,), generator=g)
    for backend in ("torch", "triton"):
        out = flash_attn_with_kvcache(q, kc, vc, window_size=window, backend=backend)
        ref = attention_ref(q, kc, vc, window_size=tuple(window.tolist()))
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_a_cache_with_more_rows_than_the_batch():
    """A k_cache holding more sequences than the batch is valid (the first rows are used)."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 1, 2, 16, generator=g)
    kc, vc = torch.randn(4, 8, 1, 16, generator=g), torch.randn(4, 8, 1, 16, generator=g)
    k, v = torch.randn(2, 1, 1, 16, generator=g), torch.randn(2, 1, 1, 16, generator=g)
    lens = torch.tensor([3, 6], dtype=torch.int32)
    outs = {}
    for backend in ("torch", "triton"):
        kb, vb = kc.clone(), vc.clone()
        outs[backend] = flash_attn_with_kvcache(q, kb, vb, k, v, cache_seqlens=lens, causal=True, backend=backend)
        assert torch.equal(kb[2:], kc[2:]) and torch.equal(vb[2:], vc[2:])  # rows past the batch untouched
    ref = attention_ref(q, kb[:2], vb[:2], seqlens_k=lens + 1, causal=True)
    for out in outs.values():
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# --- FlashAttention's edge rules ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_one_sided_window_is_bounded_by_the_capacity_as_in_flashattention(backend):
    """``window_size=(left >= 0, -1)``: FlashAttention sets the right side to the key length
    (``set_params_fprop``), it does not make it infinite. With 5 query rows over 2 keys and
    ``(1, -1)``, query 0 sits 3 keys before the first one and sees nothing."""
    g = torch.Generator().manual_seed(11)
    q, kc, vc = (
        torch.randn(1, 5, 2, 16, generator=g),
        torch.randn(1, 2, 1, 16, generator=g),
        torch.randn(1, 2, 1, 16, generator=g),
    )
    out, lse = flash_attn_with_kvcache(q, kc, vc, window_size=(1, -1), return_softmax_lse=True, backend=backend)
    ref, ref_lse = attention_ref(q, kc, vc, window_size=(1, 2), return_lse=True)
    infinite = attention_ref(q, kc, vc, window_size=(1, -1))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    assert torch.all(out[:, 0] == 0) and torch.all(torch.isposinf(lse[:, :, 0]))  # query 0 sees no key
    assert not torch.allclose(out, infinite)  # an infinite right side would let it see both


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_queries_rotated_past_the_table_turn_by_the_identity_as_in_flashattention(backend):
    """A valid call: 4 causal query rows after 19 and 17 cached tokens, one new key, a 20-row table
    (the capacity, all FlashAttention asks), left padding. Queries rotate at cache_seqlens + i, so
    rows 20..22 lie past the table; FlashAttention's rotary kernel loads them masked as cos 1,
    sin 0. Output, LSE and the written cache match the oracle with that rule."""
    cfg = dict(make_config(random.Random(3)), sq=4, cap=20, d=24, mha="gqa", new_kv=True, snew=1, lens=[19, 17])
    cfg.update(rotary_fraction=1.0, causal=True, local=False, leftpad=True, batch_idx=False, paged=None, lse=True)
    assert max(cfg["lens"]) + cfg["sq"] - 1 >= cfg["cap"]  # the case this test is about
    run_case(cfg, backend)


def test_rotary_identity_past_the_table_is_the_kernels_masked_load():
    """apply_rotary itself: a row past the table leaves x as it is; a row inside turns it."""
    cos, sin = rotary_tables(4, 16)
    x = torch.randn(1, 2, 1, 16)
    out = apply_rotary(x, cos, sin, torch.tensor([[3, 4]]))
    assert torch.equal(out[:, 1], x[:, 1]) and not torch.allclose(out[:, 0], x[:, 0])


# --- learnable sinks and a value head dim of its own ----------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    cfg=api_configs(),
    backend=st.sampled_from(["torch", "triton"]),
    sink_scale=st.sampled_from([0.1, 3.0, 30.0]),
)
def test_learnable_sinks_match_the_oracle_on_both_backends(cfg, backend, sink_scale):
    """Random valid calls (paged, splits, windows, ALiBi, softcap, rotary, leftpad) with a sink per
    query head: out and LSE (which includes the sink) equal the oracle's extra-column softmax."""
    if backend == "triton":
        cfg = dict(cfg, d=16)
    a = _build(cfg)
    h = a["q"].shape[2]
    sink = torch.randn(h, generator=torch.Generator().manual_seed(cfg["seed"])) * sink_scale
    plain = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
    out, lse = flash_attn_with_kvcache(**a, learnable_sink=sink, backend=backend)
    ref_out, ref_lse = _reference_of(plain, learnable_sink=sink)
    torch.testing.assert_close(out, ref_out, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=2e-5, atol=2e-5)


def _reference_of(a, **extra):
    """The oracle for one of ``_build``'s calls: the expected cache after the append, then
    attention_ref over each sequence's keys (rotary through rotary_reference)."""
    q, k_cache, v_cache = a["q"], a["k_cache"].clone(), a["v_cache"].clone()
    lens, k, v = a["cache_seqlens"], a.get("k"), a.get("v")
    b, sq = q.shape[:2]
    table, rows = a.get("block_table"), a.get("cache_batch_idx")
    snew = 0 if k is None else k.shape[1]
    causal_like = a["causal"] or a["window_size"] != (-1, -1)
    if k is not None and "rotary_cos" in a:
        pos = lens.long()[:, None] + torch.arange(snew)[None, :]
        k = rotary_reference(k, a["rotary_cos"], a["rotary_sin"], pos, a["rotary_interleaved"])
    if "rotary_cos" in a:
        offs = torch.arange(sq)[None, :] if causal_like else torch.zeros(1, sq, dtype=torch.long)
        q = rotary_reference(q, a["rotary_cos"], a["rotary_sin"], lens.long()[:, None] + offs, a["rotary_interleaved"])
    if table is not None:
        dense_k = k_cache[table.long()].reshape(b, -1, *k_cache.shape[2:])
        dense_v = v_cache[table.long()].reshape(b, -1, *v_cache.shape[2:])
    else:
        idx = rows.long() if rows is not None else torch.arange(b)
        dense_k, dense_v = k_cache[idx], v_cache[idx]
    for i in range(b):
        for t in range(snew):
            dense_k[i, int(lens[i]) + t], dense_v[i, int(lens[i]) + t] = k[i, t], v[i, t]
    capacity = dense_k.shape[1]
    window = a["window_size"]
    if not a["causal"] and window[0] >= 0 and window[1] < 0:
        window = (window[0], capacity)
    return attention_ref(
        q,
        dense_k,
        dense_v,
        causal=a["causal"],
        window_size=window,
        softcap=a["softcap"],
        alibi_slopes=a.get("alibi_slopes"),
        seqlens_k=lens + snew,
        leftpad_k=a.get("cache_leftpad"),
        return_lse=True,
        **extra,
    )


@settings(max_examples=30, deadline=None)
@given(cfg=api_configs(), dv=st.sampled_from([8, 24, 48]))
def test_a_value_head_dim_of_its_own_matches_the_oracle(cfg, dv):
    """FlashAttention 3's headdim_v (DeepSeek's MLA keys 24 wide, values 16): v_cache, v and the
    output carry their own head dim, on the PyTorch backend."""
    a = _build(cfg)
    g = torch.Generator().manual_seed(cfg["seed"] + 1)
    a["v_cache"] = torch.randn(*a["v_cache"].shape[:3], dv, generator=g)
    if "v" in a:
        a["v"] = torch.randn(*a["v"].shape[:3], dv, generator=g)
    plain = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
    out, lse = flash_attn_with_kvcache(**a, backend="torch")
    assert out.shape == (*a["q"].shape[:3], dv)
    ref_out, ref_lse = _reference_of(plain)
    torch.testing.assert_close(out, ref_out, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="v_cache's head dim"):
        flash_attn_with_kvcache(**plain, backend="triton")


def test_a_sink_is_merge_states_with_an_empty_state():
    """Notebook 04's merge of (out, lse) with (0, sink) is the sink, and a row without keys gives
    output 0 and LSE = sink (FlashAttention 4's convention)."""
    from flashkv_edu.online_softmax import merge_states

    g = torch.Generator().manual_seed(13)
    q, kc, vc = (
        torch.randn(2, 3, 4, 16, generator=g),
        torch.randn(2, 9, 2, 16, generator=g),
        torch.randn(2, 9, 2, 16, generator=g),
    )
    sink = torch.randn(4, generator=g)
    lens = torch.tensor([0, 9], dtype=torch.int32)
    for backend in ("torch", "triton"):
        out, lse = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, causal=True, learnable_sink=sink,
                                           return_softmax_lse=True, backend=backend)  # fmt: skip
        plain, plain_lse = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, causal=True,
                                                   return_softmax_lse=True, backend=backend)  # fmt: skip
        plain_lse = plain_lse.masked_fill(torch.isposinf(plain_lse), float("-inf"))  # an empty state merges as -inf
        merged, merged_lse = merge_states(
            plain, plain_lse, torch.zeros_like(plain), sink[None, :, None].expand_as(plain_lse).contiguous()
        )
        torch.testing.assert_close(out, merged, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse, merged_lse, rtol=1e-5, atol=1e-5)
        assert torch.all(out[0] == 0) and torch.allclose(lse[0], sink[:, None].expand(4, 3))
