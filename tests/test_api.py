"""flash_attn_with_kvcache against an independent reference, on a grid modelled on
FlashAttention's own test_flash_attn_kvcache (sizes scaled down for the interpreter)."""

import math
import random

import pytest
import torch

from flashkv_edu import flash_attn_with_kvcache
from flashkv_edu.reference import attention_ref
from flashkv_edu.testing import max_abs_err, within_fa_tolerance

SEQLENS = [(1, 64), (1, 99), (3, 128), (8, 40), (4, 17), (16, 48), (2, 2)]
HEADDIMS = [32, 59, 64, 80, 128, 256]


def rotary_reference(x, cos, sin, positions, interleaved):
    """Rotate the first 2*cos.shape[1] features of x (b, s, h, d) as complex numbers."""
    rot = 2 * cos.shape[1]
    xf = x.float()
    c = cos.float()[positions][:, :, None, :]
    s = sin.float()[positions][:, :, None, :]
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


def run_case(cfg, backend, dtype=torch.float16):
    g = torch.Generator().manual_seed(cfg["seed"])
    b, h = 2, 6
    hk = {"mha": 6, "mqa": 1, "gqa": 3}[cfg["mha"]]
    sq, cap, d = cfg["sq"], cfg["cap"], cfg["d"]
    rand = lambda *shape: torch.randn(*shape, generator=g).to(dtype)
    q = rand(b, sq, h, d)
    snew = (sq if cfg["same_new"] else int(torch.randint(1, sq + 1, (1,), generator=g))) if cfg["new_kv"] else 0
    k_new, v_new = (rand(b, snew, hk, d), rand(b, snew, hk, d)) if snew else (None, None)
    rotary_dim = math.floor(int(cfg["rotary_fraction"] * d) / 16) * 16
    window = tuple(int(x) for x in torch.randint(0, cap, (2,), generator=g)) if cfg["local"] else (-1, -1)
    x = sq if (cfg["causal"] or cfg["local"]) and rotary_dim else snew
    if snew:
        lens = torch.randint(0, cap - x + 1, (b,), generator=g, dtype=torch.int32)
    else:
        lens = torch.randint(1, cap + 1, (b,), generator=g, dtype=torch.int32)
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


def test_head_dim_over_256_and_dtype_mismatch():
    with pytest.raises(ValueError, match="headdim of q must be <= 256"):
        flash_attn_with_kvcache(torch.randn(1, 1, 1, 264), torch.randn(1, 4, 1, 264), torch.randn(1, 4, 1, 264))
    with pytest.raises(ValueError, match="share one dtype"):
        flash_attn_with_kvcache(torch.randn(1, 1, 1, 16).half(), torch.randn(1, 4, 1, 16), torch.randn(1, 4, 1, 16))
