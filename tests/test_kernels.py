"""Triton kernels (run through the interpreter on CPU) against the oracle, FA's error rule."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flashkv_edu import runtime
from flashkv_edu.kernels import attention_triton, decode_attention_triton
from flashkv_edu.kernels.forward import tile_schedule
from flashkv_edu.kernels.gpucheck import TABLE_PATH
from flashkv_edu.reference import attention_ref
from flashkv_edu.testing import max_abs_err, within_fa_tolerance

CONFIGS = [  # (nheads, nheads_k, mask and extras)
    (4, 4, dict(causal=True)),
    (6, 2, dict(window_size=(9, 0))),
    (4, 1, dict(softcap=4.0, causal=True, window_size=(20, 3))),
]


def rand(shape, dtype, gen):
    return torch.randn(shape, generator=gen).to(dtype)


def check_fa_rule(out, q, k, v, mult=3.0, **kw):
    ref = attention_ref(q, k, v, **kw)
    lowp = attention_ref(q, k, v, compute_dtype=q.dtype, **kw)
    if q.dtype == torch.float32:
        lowp = ref  # the fp32 oracle has no error of its own: allow atol 1e-5 only
    assert within_fa_tolerance(out, ref, lowp, mult=mult), (max_abs_err(out, ref), max_abs_err(lowp, ref))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("headdim", [16, 64, 80, 128, 256])
def test_forward_kernel_grid(headdim, dtype):
    gen = torch.Generator().manual_seed(headdim)
    for h, hk, kw in CONFIGS:
        q = rand((2, 37, h, headdim), dtype, gen)  # 37, 45: not multiples of the tiles
        k = rand((2, 45, hk, headdim), dtype, gen)
        v = rand((2, 45, hk, headdim), dtype, gen)
        lens = torch.tensor([45, 29], dtype=torch.int32)
        out, lse = attention_triton(q, k, v, seqlens_k=lens, return_lse=True, **kw)
        assert out.dtype == dtype and lse.dtype == torch.float32
        check_fa_rule(out, q, k, v, seqlens_k=lens, **kw)
        _, ref_lse = attention_ref(q, k, v, seqlens_k=lens, return_lse=True, **kw)
        assert max_abs_err(lse, ref_lse) < 1e-3


@given(
    b=st.integers(1, 2),
    sq=st.integers(1, 40),
    sk=st.integers(1, 70),
    heads=st.sampled_from([(2, 2), (4, 2), (3, 1)]),
    causal=st.booleans(),
    wl=st.integers(-1, 30),
    wr=st.integers(-1, 30),
    alibi=st.booleans(),
    ragged=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_forward_kernel_random_shapes(b, sq, sk, heads, causal, wl, wr, alibi, ragged, seed):
    g = torch.Generator().manual_seed(seed)
    h, hk = heads
    q, k, v = (
        torch.randn(b, sq, h, 16, generator=g),
        torch.randn(b, sk, hk, 16, generator=g),
        torch.randn(b, sk, hk, 16, generator=g),
    )
    ends = torch.randint(0, sk + 1, (b,), generator=g).int() if ragged else None
    pads = (ends * torch.rand(b, generator=g)).int() if ragged else None
    kw = dict(
        causal=causal,
        window_size=(wl, wr),
        alibi_slopes=torch.rand(b, h, generator=g) if alibi else None,
        seqlens_k=ends,
        leftpad_k=pads,
    )
    out, lse = attention_triton(q, k, v, return_lse=True, **kw)
    ref, ref_lse = attention_ref(q, k, v, return_lse=True, **kw)
    assert max_abs_err(out, ref) < 1e-5 and max_abs_err(lse, ref_lse) < 1e-4


@pytest.mark.parametrize(
    "sq, sk, bm, bn, kw",
    [
        (70, 70, 16, 16, dict()),
        (70, 70, 16, 16, dict(causal=True)),
        (33, 90, 16, 32, dict(causal=True)),
        (64, 64, 16, 16, dict(window_size=(10, 0))),
        (40, 50, 32, 16, dict(window_size=(5, 7))),
    ],
)
def test_kernel_visits_exactly_the_scheduled_tiles(sq, sk, bm, bn, kw):
    q, k = torch.randn(1, sq, 1, 16), torch.randn(1, sk, 1, 16)
    out, tiles = attention_triton(q, k, k, block_m=bm, block_n=bn, return_tile_counts=True, **kw)
    schedule = tile_schedule(sq, sk, bm, bn, **kw)
    assert tiles[0].tolist() == (schedule > 0).sum(1).tolist()
    assert max_abs_err(out, attention_ref(q, k, k, **kw)) < 1e-5


def test_counted_work_causal_half_window_w_over_n():
    n, b = 1024, 32
    full = tile_schedule(n, n, b, b).gt(0).sum().item()
    causal = tile_schedule(n, n, b, b, causal=True).gt(0).sum().item()
    assert full == (n // b) ** 2
    assert causal == (n // b) * (n // b + 1) // 2  # T(T+1)/2: about half
    assert 0.5 <= causal / full <= 0.52
    for w in (64, 128, 256):
        window = tile_schedule(n, n, b, b, window_size=(w - 1, 0)).gt(0).sum().item()
        assert 0.9 * w / n <= window / full <= (w + 2 * b) / n  # about W/N (plus the edge tiles)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("sq, h, hk", [(1, 8, 8), (1, 8, 2), (4, 6, 1), (2, 4, 2)])
def test_decode_kernel_contiguous(sq, h, hk, dtype):
    g = torch.Generator().manual_seed(sq * 100 + h + hk)
    kc, vc = rand((4, 80, hk, 64), dtype, g), rand((4, 80, hk, 64), dtype, g)
    q = rand((3, sq, h, 64), dtype, g)
    lens = torch.tensor([80, 33, 0], dtype=torch.int32)
    pads = torch.tensor([7, 0, 0], dtype=torch.int32)
    idx = torch.tensor([3, 0, 1], dtype=torch.int32)  # cache_batch_idx: rows of a larger cache
    for kw in (dict(causal=True), dict(window_size=(15, 0), softcap=3.0), dict(alibi_slopes=torch.rand(h))):
        out, lse = decode_attention_triton(
            q, kc, vc, lens, cache_leftpad=pads, cache_batch_idx=idx, return_lse=True, **kw
        )
        mult = 5.0 if "alibi_slopes" in kw else 3.0
        check_fa_rule(out, q, kc[idx.long()], vc[idx.long()], mult=mult, seqlens_k=lens, leftpad_k=pads, **kw)
        assert torch.all(out[2] == 0) and torch.all(torch.isposinf(lse[2]))  # empty sequence


def test_decode_kernel_reads_each_kv_tile_once_per_group():
    # GQA 8: one program per (batch, KV head) serves all 8 query heads of its group.
    kc = torch.randn(1, 100, 2, 16)
    _, tiles = decode_attention_triton(
        torch.randn(1, 1, 16, 16), kc, kc, torch.tensor([100], dtype=torch.int32), return_tile_counts=True
    )
    assert tiles.shape == (1, 2, 1)  # 2 programs, not 16
    assert tiles.flatten().tolist() == [4, 4]  # ceil(100 / 32) key tiles each


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: attention_triton(torch.randn(1, 2, 1, 300), torch.randn(1, 2, 1, 300), torch.randn(1, 2, 1, 300)),
            "headdim of q must be <= 256",
        ),
        (lambda: attention_triton(*(torch.randn(1, 2, 1, 8, dtype=torch.float64),) * 3), "fp16, bf16 or fp32"),
        (
            lambda: decode_attention_triton(
                torch.randn(2, 1, 2, 8),
                torch.randn(1, 4, 2, 8),
                torch.randn(1, 4, 2, 8),
                torch.tensor([1, 1], dtype=torch.int32),
            ),
            "pass cache_batch_idx",
        ),
        (
            lambda: decode_attention_triton(
                torch.randn(1, 1, 2, 8),
                torch.randn(1, 4, 2, 8),
                torch.randn(1, 4, 2, 8),
                torch.tensor([5], dtype=torch.int32),
            ),
            "cache_seqlens must be <= 4",
        ),
        (
            lambda: decode_attention_triton(
                torch.randn(1, 1, 3, 8),
                torch.randn(1, 4, 2, 8),
                torch.randn(1, 4, 2, 8),
                torch.tensor([1], dtype=torch.int32),
            ),
            "must divide",
        ),
        (
            lambda: decode_attention_triton(
                torch.randn(1, 1, 2, 8),
                torch.randn(1, 4, 2, 8),
                torch.randn(1, 4, 2, 8),
                torch.tensor([1], dtype=torch.int32),
                num_splits=-1,
            ),
            "num_splits",
        ),
    ],
)
def test_kernel_inputs_are_checked(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_gpu_compile_check_passes_and_matches_the_committed_table(tmp_path):
    """Every kernel compiles for sm_80 and sm_90 with the interpreter off, without spills, and the
    table shown in notebook 05 is the one this run produces."""
    out = tmp_path / "table.json"
    env = dict(os.environ, TRITON_INTERPRET="0")
    run = subprocess.run(
        [sys.executable, "-m", "flashkv_edu.kernels.gpucheck", "--json", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert {r["target"] for r in rows} == {"sm_80", "sm_90"} and all(r["ok"] for r in rows)
    assert {r["kernel"] for r in rows} >= {"attention_fwd_kernel", "decode_kernel", "combine_kernel"}
    assert all(r["spill_bytes"] == 0 for r in rows)
    # Every feature switch of the kernels is compiled for both GPUs: ALiBi and softcap included.
    for kernel in ("attention_fwd_kernel", "decode_kernel"):
        for feature in ("ALiBi", "softcap") + (("sink", "chunk") if kernel == "decode_kernel" else ()):
            targets = {r["target"] for r in rows if r["kernel"] == kernel and feature in r["variant"]}
            assert targets == {"sm_80", "sm_90"}, (kernel, feature)
    table = json.loads(TABLE_PATH.read_text())
    if {r["triton"] for r in table} == {runtime.TRITON_VERSION}:  # the release the table was made with
        assert rows == table, "re-run gpucheck --json and commit the table"
    else:  # another Triton (the --oldest lane): same kernels and variants, its own register counts
        assert [(r["kernel"], r["variant"], r["target"]) for r in rows] == [
            (r["kernel"], r["variant"], r["target"]) for r in table
        ]


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
