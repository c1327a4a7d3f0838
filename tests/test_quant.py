"""Quantized KV caches (notebook 09): error bounds, kernels == dequantize-then-oracle, the fp8
API path with FlashAttention 3's descales, the streaming integer cache, the memory table."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flashkv_edu as fk
from flashkv_edu import quant as Q
from flashkv_edu.cache import MODEL_SHAPES
from flashkv_edu.kernels import decode as D
from flashkv_edu.kernels.common import e4m3_to_float
from flashkv_edu.paged import gather_paged, scatter_to_pages
from flashkv_edu.quant_eval import attention_through_cache
from flashkv_edu.runtime import tl, triton
from flashkv_edu.testing import max_abs_err, within_fa_tolerance
from flashkv_edu.validation import ArgumentError

FP8 = torch.float8_e4m3fn


def _close(got, want) -> bool:
    """Equal up to fp32 rounding, relative to the size of the values."""
    return max_abs_err(got, want) <= 1e-5 * (1 + float(want.abs().max()))


def _x(seed, shape, outliers=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.rand((), generator=g) * 10
    if outliers:
        x[..., 1] *= 30
    return x


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**20),
    bits=st.sampled_from([8, 4, 2]),
    axis=st.sampled_from(["token", "channel"]),
    group=st.sampled_from([0, 8, 16]),
    symmetric=st.booleans(),
    outliers=st.booleans(),
)
def test_integer_roundtrip_error_is_at_most_half_a_step(seed, bits, axis, group, symmetric, outliers):
    group = group or (16 if axis == "channel" else 0)
    x = _x(seed, (2, 32, 2, 16), outliers)
    q = Q.quantize_int(x, bits, axis=axis, group=group, symmetric=symmetric)
    step = Q.ungroup(q.scale.float().expand_as(q.codes).contiguous(), axis, q.shape)
    err = (q.dequantize() - x).abs()
    assert bool((err <= step / 2 * (1 + 1e-5) + 1e-6 * x.abs().max()).all())
    lo, hi = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    assert int(q.codes.min()) >= lo and int(q.codes.max()) <= hi


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**20), granularity=st.sampled_from(["one", "tensor", "head"]))
def test_fp8_roundtrip_error_is_relative_within_the_range(seed, granularity):
    """e4m3 keeps 3 mantissa bits: within the range, error <= 2^-4 |x| (half an ulp), or half
    the subnormal step 2^-10 * descale; beyond 448 * descale it saturates."""
    x = _x(seed, (2, 16, 2, 16))
    ds = Q.fp8_descales(x, granularity)
    y = Q.dequantize_fp8(Q.quantize_fp8(x, ds), ds)
    d = ds[:, None, :, None]
    inside = x.abs() <= Q.E4M3_MAX * d * (1 + 1e-6)  # a calibrated absmax lands on 448 up to rounding
    bound = torch.maximum(x.abs() * 2**-4, d * 2**-10) * (1 + 1e-6)
    assert bool(((y - x).abs() <= bound)[inside].all())
    assert bool((y.abs() == Q.E4M3_MAX * d.expand_as(x))[~inside].all())
    if granularity != "one":
        assert bool(inside.all())


def test_e4m3_decoded_in_software_matches_all_256_bit_patterns():
    @triton.jit
    def decode(X, Y):
        i = tl.arange(0, 256)
        tl.store(Y + i, e4m3_to_float(tl.load(X + i)))

    bits = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    got = torch.empty(256)
    decode[(1,)](bits, got)
    want = bits.view(FP8).float()
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    ok = ~torch.isnan(want)
    assert torch.equal(got[ok], want[ok])


def _quantized_cache(kind, b, L, hk, d, seed):
    """(cache k, cache v, k_descale, v_descale, real k, real v) for an fp8 or int8 cache."""
    k, v = _x(seed, (b, L, hk, d)), _x(seed + 1, (b, L, hk, d))
    if kind == "fp8":
        kd, vd = Q.fp8_descales(k), Q.fp8_descales(v)
        k8, v8 = Q.quantize_fp8(k, kd), Q.quantize_fp8(v, vd)
        return k8, v8, kd, vd, Q.dequantize_fp8(k8, kd), Q.dequantize_fp8(v8, vd)
    out = []
    for x in (k, v):
        q = Q.quantize_int(x, 8)
        out.append((q.codes.view(b, L, hk, d).to(torch.int8), q.scale[..., 0, 0].float()))
    (ki, ks), (vi, vs) = out
    return ki, vi, ks, vs, ki.float() * ks[..., None], vi.float() * vs[..., None]


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**20),
    kind=st.sampled_from(["fp8", "int8"]),
    paged=st.booleans(),
    splits=st.sampled_from([1, 3]),
    sq=st.sampled_from([1, 2]),
)
def test_quantized_decode_kernel_equals_the_dequantized_oracle(seed, kind, paged, splits, sq):
    b, L, hk, h, d, page = 2, 48, 2, 4, 16, 16
    kc, vc, ks, vs, kr, vr = _quantized_cache(kind, b, L, hk, d, seed)
    lens = torch.tensor([L, 1 + seed % L], dtype=torch.int32)
    q = _x(seed + 2, (b, sq, h, d)) / 3
    want = fk.attention_ref(q, kr, vr, seqlens_k=lens, causal=True)
    tbl = None
    if paged:
        tbl = torch.randperm(b * L // page + 1, generator=torch.Generator().manual_seed(seed))[: b * L // page]
        tbl = tbl.view(b, L // page).to(torch.int32)
        kc, vc = scatter_to_pages(kc, tbl), scatter_to_pages(vc, tbl)
        if kind == "int8":
            ks, vs = scatter_to_pages(ks, tbl), scatter_to_pages(vs, tbl)
    got = D.decode_attention_triton(
        q, kc, vc, lens, block_table=tbl, causal=True, num_splits=splits, k_descale=ks, v_descale=vs
    )
    assert _close(got, want)


def test_the_sm80_byte_path_gives_the_native_fp8_result(monkeypatch):
    kc, vc, ks, vs, kr, vr = _quantized_cache("fp8", 2, 32, 2, 16, 7)
    q = _x(9, (2, 1, 4, 16)) / 3
    lens = torch.tensor([32, 5], dtype=torch.int32)
    native = D.decode_attention_triton(q, kc, vc, lens, k_descale=ks, v_descale=vs)
    monkeypatch.setattr(D, "_needs_fp8_bits", lambda device: True)
    assert torch.equal(D.decode_attention_triton(q, kc, vc, lens, k_descale=ks, v_descale=vs), native)


@settings(max_examples=16, deadline=None)
@given(
    seed=st.integers(0, 2**20),
    backend=st.sampled_from(["torch", "triton"]),
    paged=st.booleans(),
    snew=st.sampled_from([0, 1, 3]),
)
def test_api_fp8_cache_appends_with_the_descales_and_equals_the_oracle(seed, backend, paged, snew):
    b, L, hk, h, d, page = 2, 32, 2, 4, 16, 8
    kc, vc, ks, vs, kr, vr = _quantized_cache("fp8", b, L, hk, d, seed)
    lens = torch.tensor([L - 3, seed % (L - 3)], dtype=torch.int32)
    q = _x(seed + 2, (b, 1, h, d)) / 3
    k = _x(seed + 3, (b, snew, hk, d)) if snew else None
    v = _x(seed + 4, (b, snew, hk, d)) if snew else None
    if snew:  # what the cache must hold after the append: the new rows quantized with the descales
        for i in range(b):
            rows = slice(int(lens[i]), int(lens[i]) + snew)
            kr[i, rows] = Q.dequantize_fp8(Q.quantize_fp8(k, ks), ks)[i]
            vr[i, rows] = Q.dequantize_fp8(Q.quantize_fp8(v, vs), vs)[i]
    want = fk.attention_ref(q, kr, vr, seqlens_k=lens + snew, causal=True)
    tbl = None
    if paged:
        tbl = torch.arange(b * L // page).flip(0).view(b, L // page).to(torch.int32)
        kc, vc = scatter_to_pages(kc, tbl), scatter_to_pages(vc, tbl)
    got = fk.flash_attn_with_kvcache(
        q, kc, vc, k, v, cache_seqlens=lens, block_table=tbl, causal=True, k_descale=ks, v_descale=vs, backend=backend
    )
    assert _close(got, want)
    if snew:
        dense_k = gather_paged(kc, tbl) if paged else kc
        for i in range(b):
            rows = slice(int(lens[i]), int(lens[i]) + snew)
            assert torch.equal(dense_k[i, rows].view(torch.uint8), Q.quantize_fp8(k, ks)[i].view(torch.uint8))


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(k_descale=None, v_descale=None), "needs k_descale"),
        (dict(v_descale=None), "both or neither"),
        (dict(k_descale=torch.ones(2, 3)), "k_descale must have shape"),
        (dict(v_descale=-torch.ones(2, 2)), "v_descale must be positive"),
        (dict(k_descale=torch.ones(2, 2, dtype=torch.float16)), "k_descale must have shape"),
        (dict(k_cache_dtype=torch.float32), "apply to fp8"),
        (dict(k_cache_dtype=torch.int8), "k_cache must have dtype"),
    ],
)
def test_api_fp8_bad_descales_are_refused_before_any_write(change, match):
    b, L, hk, d = 2, 16, 2, 16
    dtype = change.pop("k_cache_dtype", FP8)
    kc = torch.zeros(b, L, hk, d).to(dtype)
    vc = torch.zeros(b, L, hk, d).to(dtype)
    before = kc.clone()
    args = dict(k_descale=torch.ones(b, hk), v_descale=torch.ones(b, hk))
    args.update(change)
    with pytest.raises((ArgumentError, TypeError)) as info:
        fk.flash_attn_with_kvcache(
            torch.randn(b, 1, 4, d),
            kc,
            vc,
            torch.randn(b, 1, hk, d),
            torch.randn(b, 1, hk, d),
            cache_seqlens=torch.zeros(b, dtype=torch.int32),
            **args,
        )
    assert match in str(info.value) and isinstance(info.value, RuntimeError)
    assert torch.equal(
        kc.view(torch.uint8) if dtype == FP8 else kc, before.view(torch.uint8) if dtype == FP8 else before
    )


@pytest.mark.parametrize("name", [n for n, s in Q.SCHEMES.items() if s.kind == "int"])
def test_the_streaming_integer_cache_stores_what_the_scheme_says(name):
    """Appending in uneven chunks gives, for every token already quantized, the scheme's
    round trip of its 16-bit value; the newest tokens wait in 16 bits; attention reads that."""
    s = Q.SCHEMES[name]
    b, L, hk, d = 2, 100, 2, 32
    k, v = _x(1, (b, L, hk, d)), _x(2, (b, L, hk, d))
    cache = Q.QuantizedKVCache(b, 128, hk, d, s)
    for lo, hi in ((0, 37), (37, 38), (38, L)):
        cache.append(k[:, lo:hi], v[:, lo:hi])
    kd, vd = cache.dequantized()
    n = s.quantized_length(L)
    assert n == (L if s.residual == 0 else 64)
    for got, x, role in ((kd, k, "k"), (vd, v, "v")):
        assert torch.allclose(got[:, :n], Q.roundtrip(x[:, :n].half().float(), s, role), atol=1e-6)
        assert torch.equal(got[:, n:L], x[:, n:].half().float()) and not got[:, L:].any()
    q = _x(3, (b, 1, 4, d))
    want = fk.attention_ref(q, kd, vd, seqlens_k=cache.cache_seqlens, causal=True)
    assert _close(cache.attention(q, causal=True), want)
    if cache.raw_int8:  # int8 codes and per-token scales go straight into the kernel
        assert _close(cache.attention(q, causal=True, backend="triton"), want)
    with pytest.raises(ArgumentError, match="overflow"):
        cache.append(k[:, :29], v[:, :29])
    assert torch.equal(cache.cache_seqlens, torch.tensor([L, L], dtype=torch.int32))


def test_pack_and_unpack_are_inverse():
    for bits in (8, 4, 2):
        c = torch.randint(0, 2**bits, (3, 5, 16))
        packed = Q.pack_codes(c, bits)
        assert packed.shape[-1] == 16 * bits // 8 and torch.equal(Q.unpack_codes(packed, bits).long(), c)


def test_memory_table_for_llama3_8b():
    shape = MODEL_SHAPES["Llama-3-8B (GQA)"]
    layers, _, hk, d = shape
    kib = {n: Q.bytes_per_token(s, layers, hk, d) / 1024 for n, s in Q.SCHEMES.items()}
    assert kib["fp32"] == 256 and kib["fp16"] == kib["bf16"] == 128
    assert kib["int8 per token"] == 64 + 64 * 2 / 128  # one fp16 scale per 128 values
    assert kib["int4 per token, groups of 32"] == 32 + 64 * 4 / 32  # scale + zero per 32
    assert 64 < kib["fp8 e4m3, per-(batch, head) scale"] < 64.01
    assert kib["int2 KIVI"] < kib["int4 KIVI"] < kib["int8 per token"] <= kib["fp16"] / 2 + 1


def test_attention_through_cache_matches_the_streaming_cache_row_by_row():
    """The one-pass model path equals decoding step by step through a QuantizedKVCache."""
    s = Q.SCHEMES["int2 KIVI"]
    b, L, hk, h, d = 1, 80, 2, 4, 32
    q, k, v = _x(4, (b, L, h, d)) / 4, _x(5, (b, L, hk, d)), _x(6, (b, L, hk, d))
    k, v = k.half().float(), v.half().float()
    full = attention_through_cache(q, k, v, s)
    cache = Q.QuantizedKVCache(b, 96, hk, d, s)
    for t in range(L):
        cache.append(k[:, t : t + 1], v[:, t : t + 1])
        step = cache.attention(q[:, t : t + 1], causal=True)
        assert _close(step, full[:, t : t + 1]), t


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Q.Scheme("x", "int4"), "kind must be"),
        (lambda: Q.Scheme("x", "int", 3), "bits must be 8, 4 or 2"),
        (lambda: Q.Scheme("x", "int", 4, k_axis="channel"), "group must be > 0"),
        (lambda: Q.Scheme("x", "fp8", 8, fp8_scale="row"), "fp8_scale must be"),
        (lambda: Q.quantize_int(torch.randn(1, 4, 1, 16), 4, group=5), "must divide the head dim"),
        (lambda: Q.quantize_int(torch.randn(1, 5, 1, 16), 4, axis="channel", group=4), "must divide seqlen"),
        (lambda: Q.quantize_int(torch.randn(1, 4, 1, 16), 9), "bits"),
        (lambda: Q.fp8_descales(torch.randn(1, 4, 1, 16), "row"), "granularity must be"),
        (lambda: Q.QuantizedKVCache(1, 64, 1, 16, Q.SCHEMES["fp16"]), "stores integer schemes"),
        (lambda: Q.QuantizedKVCache(1, 50, 1, 64, Q.SCHEMES["int2 KIVI"]), "multiple of the token group"),
        (lambda: Q.QuantizedKVCache(1, 64, 1, 16, Q.SCHEMES["int2 KIVI"]), "must divide the head dim"),
    ],
)
def test_bad_quantization_arguments_are_refused_with_their_name(make, match):
    with pytest.raises(ArgumentError, match=match):
        make()


def test_a_refused_append_leaves_the_quantized_cache_unchanged():
    cache = Q.QuantizedKVCache(2, 64, 2, 32, Q.SCHEMES["int4 KIVI"])
    cache.append(torch.randn(2, 40, 2, 32), torch.randn(2, 40, 2, 32))
    before = [t.clone() for t in (*cache.codes.values(), *cache.scales.values(), *cache.pending.values())]
    for k, v in [
        (torch.randn(2, 3, 1, 32), torch.randn(2, 3, 1, 32)),  # wrong KV heads
        (torch.randn(2, 3, 2, 32), torch.randn(2, 4, 2, 32)),  # k and v differ
        (torch.randn(2, 25, 2, 32), torch.randn(2, 25, 2, 32)),  # overflow
    ]:
        with pytest.raises(ArgumentError):
            cache.append(k, v)
    after = [*cache.codes.values(), *cache.scales.values(), *cache.pending.values()]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert cache.cache_seqlens.tolist() == [40, 40]


@st.composite
def accepted_schemes(draw):
    """Integer schemes QuantizedKVCache accepts for head dim 32 and capacity 64."""
    bits = draw(st.sampled_from([8, 4, 2]))
    k_axis, v_axis = draw(st.sampled_from([("token", "token"), ("channel", "token"), ("token", "channel")]))
    channel = "channel" in (k_axis, v_axis)
    group = draw(st.sampled_from([8, 16, 32] if channel else [0, 8, 16, 32]))
    residual = draw(st.sampled_from([0, 4, 16]))
    return Q.Scheme("drawn", "int", bits, k_axis=k_axis, v_axis=v_axis, group=group,
                    symmetric=draw(st.booleans()), residual=residual)  # fmt: skip


@settings(max_examples=25, deadline=None)
@given(scheme=st.one_of(st.sampled_from([s for s in Q.SCHEMES.values() if s.kind == "int"]), accepted_schemes()),
       n=st.integers(1, 64), sq=st.sampled_from([1, 3]), seed=st.integers(0, 10**6))  # fmt: skip
def test_both_backends_compute_the_same_attention_for_every_accepted_scheme(scheme, n, sq, seed):
    """Triton (reading int8 codes in the kernel where it can, else the dequantized cache) and
    PyTorch agree with the oracle on the dequantized cache within FlashAttention's tolerance rule."""
    d = 32 if scheme.name == "drawn" else 64
    cache = Q.QuantizedKVCache(2, 64, 2, d, scheme)
    g = torch.Generator().manual_seed(seed)
    cache.append(torch.randn(2, n, 2, d, generator=g), torch.randn(2, n, 2, d, generator=g))
    q = torch.randn(2, sq, 4, d, generator=g)
    k, v = cache.dequantized()
    ref = fk.attention_ref(q, k, v, seqlens_k=cache.cache_seqlens, causal=True)
    lowp = fk.attention_ref(q, k, v, seqlens_k=cache.cache_seqlens, causal=True, compute_dtype=torch.bfloat16)
    for backend in ("torch", "triton"):
        out = cache.attention(q, backend=backend, causal=True)
        assert within_fa_tolerance(out, ref, lowp), (backend, scheme, max_abs_err(out, ref))


def test_the_kernel_reads_codes_only_with_one_scale_per_token_and_head():
    """The grouped int8 scheme that once read only its first group's scale goes through the
    dequantized cache instead."""
    assert Q.QuantizedKVCache(1, 64, 1, 32, Q.SCHEMES["int8 per token"]).kernel_reads_codes
    assert not Q.QuantizedKVCache(1, 64, 1, 32, Q.Scheme("g", "int", 8, group=8)).kernel_reads_codes
    assert not Q.QuantizedKVCache(1, 64, 1, 32, Q.Scheme("c", "int", 8, k_axis="channel", group=8)).kernel_reads_codes
