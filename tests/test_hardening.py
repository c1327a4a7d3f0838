"""No silent wrong results: strides never matter, rows outside the valid keys are never read,
interpreted bf16 rounds like a GPU, kernel addresses are 64-bit, and "auto" is the fast path."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flashkv_edu import flash_attn_with_kvcache, runtime
from flashkv_edu.kernels.decode import decode_attention_triton
from flashkv_edu.kernels.forward import attention_triton
from flashkv_edu.online_softmax import blockwise_attention
from flashkv_edu.reference import attention_core, attention_ref
from flashkv_edu.rotary import rotary_tables

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


def test_attention_core_touches_only_the_valid_columns():
    """The PyTorch core reads columns [min start, max end) and nothing else."""
    q = torch.randn(2, 1, 2, 8)
    k = torch.full((2, 10, 1, 8), float("nan"))
    v = torch.full((2, 10, 1, 8), float("nan"))
    k[:, 3:6], v[:, 3:6] = torch.randn(2, 3, 1, 8), torch.randn(2, 3, 1, 8)
    start, end = torch.tensor([3, 4], dtype=torch.int32), torch.tensor([6, 5], dtype=torch.int32)
    out, lse = attention_core(
        q, k, v, scale=8**-0.5, window=(-1, -1), softcap=0.0, alibi_slopes=None, start=start, end=end
    )
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


def test_attention_core_skips_the_mask_only_when_every_query_sees_every_key():
    """The core builds no mask when every query sees every key; at the window's edges (one key
    fewer on either side) it must still mask. Checked against the textbook formula."""
    from flashkv_edu.reference import attention_mask, naive_attention

    g = torch.Generator().manual_seed(5)
    for sq, sk in [(1, 1), (1, 5), (2, 2), (3, 6), (4, 4)]:
        q, k, v = (torch.randn(1, n, 2, 8, generator=g) for n in (sq, sk, sk))
        for left in sorted({-1, 0, sk - 2, sk - 1, sk} - {-2}):
            for right in sorted({-1, 0, sq - 2, sq - 1, sq} - {-2}):
                mask = attention_mask(sq, sk, window_size=(left, right))
                out = attention_ref(q, k, v, window_size=(left, right))
                expected = torch.where(mask.any(-1)[None, :, None, None], naive_attention(q, k, v, mask=mask), 0.0)
                torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6, msg=f"{sq} {sk} {left} {right}")


# --- interpreter details ----------------------------------------------------------------------


@pytest.mark.skipif(not runtime.INTERPRET, reason="the interpreter's rounding")
def test_interpreted_bf16_output_rounds_to_nearest():
    """Under the interpreter a bf16 kernel computes in fp32 (DOT_FP32); its output must be that
    fp32 result rounded to nearest, as a GPU stores it, not truncated toward zero."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 3, 4, 32, generator=g).bfloat16()
    kc = torch.randn(2, 40, 2, 32, generator=g).bfloat16()
    vc = torch.randn(2, 40, 2, 32, generator=g).bfloat16()
    lens = torch.tensor([40, 17], dtype=torch.int32)
    for splits in (1, 3):
        out16 = decode_attention_triton(q, kc, vc, lens, causal=True, num_splits=splits)
        out32 = decode_attention_triton(q.float(), kc.float(), vc.float(), lens, causal=True, num_splits=splits)
        assert torch.equal(out16, out32.to(torch.bfloat16)), f"num_splits={splits}"
    fwd16 = attention_triton(q, kc, vc, seqlens_k=lens, causal=True)
    fwd32 = attention_triton(q.float(), kc.float(), vc.float(), seqlens_k=lens, causal=True)
    assert torch.equal(fwd16, fwd32.to(torch.bfloat16))


BIG_OFFSET_SCRIPT = textwrap.dedent("""
    import torch
    import flashkv_edu
    from flashkv_edu.kernels.decode import decode_attention_triton
    from flashkv_edu.kernels.forward import attention_triton
    from flashkv_edu.reference import attention_ref

    # Cache row 2 starts 2 * 2^30 = 2^31 elements in: past int32. The storage is virtual
    # (torch.empty); only the rows written below are ever touched.
    L, d, stride_b = 64, 16, 2**30
    def big_cache():
        store = torch.empty(stride_b * 2 + L * d, dtype=torch.float16)
        view = store.as_strided((3, L, 1, d), (stride_b, d, d, 1))
        view[2].normal_()
        return view
    kc, vc = big_cache(), big_cache()
    q = torch.randn(1, 1, 2, d, dtype=torch.float16)
    lens = torch.tensor([L], dtype=torch.int32)
    ref = attention_ref(q, kc[2:3].contiguous(), vc[2:3].contiguous())
    out = decode_attention_triton(q, kc, vc, lens, cache_batch_idx=torch.tensor([2], dtype=torch.int32))
    assert torch.allclose(out.float(), ref.float(), atol=2e-3), "decode kernel"
    q3 = torch.randn(3, 1, 2, d, dtype=torch.float16)
    out = attention_triton(q3, kc, vc)[2:3]
    ref = attention_ref(q3[2:3], kc[2:3].contiguous(), vc[2:3].contiguous())
    assert torch.allclose(out.float(), ref.float(), atol=2e-3), "forward kernel"
    print("64-bit offsets ok")
""")


@pytest.mark.skipif(not runtime.INTERPRET, reason="the interpreter reproduces the overflow on a CPU")
def test_kernel_addresses_are_64_bit():
    """``cache_row * stride_kb`` past 2^31 elements: with 32-bit arithmetic the address wraps
    and the read lands outside the cache (a crash or garbage); with 64-bit base offsets the
    kernels read the right rows. Run in a subprocess so a wrapped address cannot take pytest
    down with it."""
    run = subprocess.run([sys.executable, "-c", BIG_OFFSET_SCRIPT], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "64-bit offsets ok" in run.stdout, run.stdout[-2000:] + run.stderr[-2000:]


# --- who decides where code runs ---------------------------------------------------------------


def test_auto_is_pytorch_on_a_cpu_and_triton_on_a_gpu():
    assert runtime.resolve_backend("auto", "cpu") == "torch"
    expected = "triton" if (runtime.HAS_TRITON and not runtime.INTERPRET) else "torch"
    assert runtime.resolve_backend("auto", "cuda") == expected
    assert runtime.resolve_backend("torch", "cpu") == "torch"


def _runtime_report(env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")}
    env.update(env_extra)
    code = "import flashkv_edu.runtime as r; print(r.INTERPRET, r.HAS_CUDA, r.run_canary())"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout.split()


@pytest.mark.skipif(runtime.HAS_CUDA, reason="what a CPU-only machine decides")
def test_runtime_alone_decides_on_a_cpu():
    """Without a GPU the interpreter is on whatever CUDA_VISIBLE_DEVICES says, and the canary
    really runs; in a compile-only process (TRITON_INTERPRET=0) it says it did not run."""
    assert _runtime_report({}) == ["True", "False", "True"]
    assert _runtime_report({"CUDA_VISIBLE_DEVICES": "-1"}) == ["True", "False", "True"]
    assert _runtime_report({"CUDA_VISIBLE_DEVICES": "0"}) == ["True", "False", "True"]
    assert _runtime_report({"TRITON_INTERPRET": "0"}) == ["False", "False", "False"]


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
    room = cap - max(new, sq if cfg["rotary"] else 0)
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
