"""The GPU lane: every kernel compiled on CUDA against the oracle (``pytest -m gpu``).

Left out of the default run (pyproject's ``-m 'not browser and not gpu'``), selected with ``-m gpu``;
skipped, with the reason, where no CUDA device is visible (the CPU runs of these kernels are the
interpreter tests in test_kernels.py, test_split.py and test_quant.py).
Tolerances are FlashAttention's rule: the kernel's error against the fp32 oracle is at most 3x
(5x with ALiBi) the error of the same attention computed in the input's own precision, + 1e-5.
"""

from __future__ import annotations

import pytest
import torch

import flashkv_edu as fk
from flashkv_edu import quant as Q
from flashkv_edu.testing import max_abs_err, within_fa_tolerance

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="CUDA is missing: the GPU lane needs a visible NVIDIA GPU"
    ),
]

DTYPES = [torch.float16, torch.bfloat16]
DEV = "cuda"


def _rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return torch.randn(*shape, device=DEV, generator=g).to(dtype)


def _oracle_pair(q, k, v, **kw):
    """(fp32 oracle, the same attention in the inputs' precision)."""
    ref = fk.attention_ref(q.float(), k.float(), v.float(), **kw)
    lowp = fk.attention_ref(q, k, v, compute_dtype=q.dtype, **kw)
    return ref, lowp


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("headdim", [64, 128, 256])
@pytest.mark.parametrize("causal, window", [(False, (-1, -1)), (True, (-1, -1)), (True, (37, 0)), (False, (20, 9))])
@pytest.mark.parametrize("sq, sk", [(1, 512), (128, 128), (113, 203), (256, 1024)])
def test_forward_kernel_on_cuda(dtype, headdim, causal, window, sq, sk):
    from flashkv_edu.kernels.forward import attention_triton

    q = _rand(2, sq, 8, headdim, dtype=dtype, seed=1)
    k, v = _rand(2, sk, 2, headdim, dtype=dtype, seed=2), _rand(2, sk, 2, headdim, dtype=dtype, seed=3)
    ref, lowp = _oracle_pair(q, k, v, causal=causal, window_size=window)
    out = attention_triton(q, k, v, causal=causal, window_size=window)
    assert within_fa_tolerance(out, ref, lowp)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("num_splits", [1, 2, 3, 8, 32, 128])
@pytest.mark.parametrize("page", [None, 1, 16, 256])
def test_decode_kernel_split_and_paged_on_cuda(dtype, num_splits, page):
    from flashkv_edu.kernels.decode import decode_attention_triton
    from flashkv_edu.paged import gather_paged, scatter_to_pages

    b, cap, hk, h, d = 3, 1024, 8, 32, 128
    k, v = _rand(b, cap, hk, d, dtype=dtype, seed=4), _rand(b, cap, hk, d, dtype=dtype, seed=5)
    q = _rand(b, 1, h, d, dtype=dtype, seed=6)
    lens = torch.tensor([1024, 333, 1], dtype=torch.int32, device=DEV)
    ref, lowp = _oracle_pair(q, k, v, seqlens_k=lens, causal=True)
    table = None
    if page is not None:
        blocks = cap // page
        table = torch.randperm(b * blocks, device=DEV).view(b, blocks).to(torch.int32)
        pool_k, pool_v = scatter_to_pages(k, table), scatter_to_pages(v, table)
        assert torch.equal(gather_paged(pool_k, table), k)
        k, v = pool_k, pool_v
    out = decode_attention_triton(q, k, v, lens, block_table=table, causal=True, num_splits=num_splits)
    assert within_fa_tolerance(out, ref, lowp)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_api_on_cuda_appends_and_attends(dtype, backend):
    b, cap, hk, h, d = 2, 512, 2, 8, 128
    kc, vc = _rand(b, cap, hk, d, dtype=dtype, seed=7), _rand(b, cap, hk, d, dtype=dtype, seed=8)
    k, v = _rand(b, 3, hk, d, dtype=dtype, seed=9), _rand(b, 3, hk, d, dtype=dtype, seed=10)
    q = _rand(b, 3, h, d, dtype=dtype, seed=11)
    lens = torch.tensor([100, 7], dtype=torch.int32, device=DEV)
    kr, vr = kc.clone(), vc.clone()
    for i in range(b):
        kr[i, int(lens[i]) : int(lens[i]) + 3], vr[i, int(lens[i]) : int(lens[i]) + 3] = k[i], v[i]
    ref, lowp = _oracle_pair(q, kr, vr, seqlens_k=lens + 3, causal=True)
    out = fk.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, causal=True, backend=backend)
    assert within_fa_tolerance(out, ref, lowp) and torch.equal(kc, kr)


@pytest.mark.parametrize("kind", ["fp8", "int8"])
@pytest.mark.parametrize("paged", [False, True])
def test_quantized_decode_on_cuda(kind, paged):
    from flashkv_edu.kernels.decode import decode_attention_triton
    from flashkv_edu.paged import scatter_to_pages

    b, cap, hk, h, d, page = 2, 512, 8, 32, 128, 16
    k, v = _rand(b, cap, hk, d, seed=12), _rand(b, cap, hk, d, seed=13)
    q = _rand(b, 1, h, d, dtype=torch.bfloat16, seed=14)
    if kind == "fp8":
        ks, vs = Q.fp8_descales(k), Q.fp8_descales(v)
        kc, vc = Q.quantize_fp8(k, ks), Q.quantize_fp8(v, vs)
        kr, vr = Q.dequantize_fp8(kc, ks), Q.dequantize_fp8(vc, vs)
    else:
        qk, qv = Q.quantize_int(k, 8), Q.quantize_int(v, 8)
        kc, vc = qk.codes.view(k.shape).to(torch.int8), qv.codes.view(v.shape).to(torch.int8)
        ks, vs = qk.scale[..., 0, 0].float(), qv.scale[..., 0, 0].float()
        kr, vr = qk.dequantize(), qv.dequantize()
    lens = torch.tensor([512, 45], dtype=torch.int32, device=DEV)
    ref = fk.attention_ref(q.float(), kr, vr, seqlens_k=lens)
    lowp = fk.attention_ref(q, kr.to(q.dtype), vr.to(q.dtype), seqlens_k=lens, compute_dtype=q.dtype)
    table = None
    if paged:
        table = torch.arange(b * cap // page, device=DEV).flip(0).view(b, cap // page).to(torch.int32)
        kc, vc = scatter_to_pages(kc, table), scatter_to_pages(vc, table)
        if kind == "int8":
            ks, vs = scatter_to_pages(ks, table), scatter_to_pages(vs, table)
    out = decode_attention_triton(q, kc, vc, lens, block_table=table, k_descale=ks, v_descale=vs, num_splits=4)
    assert within_fa_tolerance(out, ref, lowp), max_abs_err(out, ref)


def test_gpu_bench_runs_one_shape():
    from flashkv_edu.gpu_bench import measure_shape

    row = measure_shape(1, 4096, torch.device(DEV))
    assert row["best_splits"] in (1, 2, 4, 8, 16, 32, 64, 128) and row["roofline_fraction_best"] > 0
