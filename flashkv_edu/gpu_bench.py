"""Decode attention on a CUDA GPU, measured against the HBM roofline.

    python -m flashkv_edu.bench gpu [--out FILE]

For batch x context 1x32K, 1x128K, 8x8K and 64x4K (head dim 128, 32 query heads over 8 KV
heads, bf16): the compiled Triton decode kernel with ``num_splits=1``, with FlashAttention 2's
heuristic, and with the best split count of 1..128; PyTorch's ``scaled_dot_product_attention``
on the same tensors beside it. Each time is the median of CUDA-event timings after warm-up.
Achieved bandwidth = bytes of K and V read / time; the roofline fraction divides it by the
GPU's peak HBM bandwidth. The wave model of notebook 07 (:func:`flashkv_edu.split.model_decode`)
is stored beside each measurement. Results go to ``flashkv_edu/data/gpu_results.json`` with the
device name, date and versions; without a CUDA device the command says so and exits with 2.
"""

from __future__ import annotations

import datetime
import json
import statistics
from pathlib import Path

import torch

__all__ = [
    "HEADDIM",
    "NHEADS",
    "NHEADS_K",
    "NO_CUDA",
    "PEAK_BANDWIDTH",
    "RESULTS_PATH",
    "SHAPES",
    "SPLITS",
    "cuda_median_seconds",
    "format_rows",
    "main",
    "measure_shape",
    "peak_bandwidth",
    "run",
]

RESULTS_PATH = Path(__file__).with_name("data") / "gpu_results.json"
SHAPES = ((1, 32 * 1024), (1, 128 * 1024), (8, 8 * 1024), (64, 4 * 1024))
NHEADS, NHEADS_K, HEADDIM = 32, 8, 128
SPLITS = (1, 2, 4, 8, 16, 32, 64, 128)
# Peak HBM bandwidth by product name (vendor data sheets), bytes/s.
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100-SXM4-80GB": 2.039e12, "A100": 1.555e12}
NO_CUDA = "CUDA is missing: no CUDA device is visible, so `bench gpu` cannot measure anything on this machine."


def peak_bandwidth(device_name: str) -> float:
    """The data-sheet HBM bandwidth of a GPU, matched by name (H100 SXM if unknown)."""
    for key, value in PEAK_BANDWIDTH.items():
        if key in device_name:
            return value
    return PEAK_BANDWIDTH["H100"]


def cuda_median_seconds(fn, reps: int = 30, warmup: int = 5) -> float:
    """Median seconds of ``fn()`` on the current CUDA stream, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def measure_shape(batch: int, context: int, device) -> dict:
    """One row of the table: times for every split count, the heuristic's choice, SDPA."""
    from .kernels.decode import decode_attention_triton
    from .split import GPU, choose_num_splits, model_decode

    props = torch.cuda.get_device_properties(device)
    gpu = GPU(props.name, props.multi_processor_count, peak_bandwidth(props.name))
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (batch, context, NHEADS_K, HEADDIM)
    k = torch.randn(shape, device=device, dtype=torch.bfloat16, generator=gen)
    v = torch.randn(shape, device=device, dtype=torch.bfloat16, generator=gen)
    q = torch.randn(batch, 1, NHEADS, HEADDIM, device=device, dtype=torch.bfloat16, generator=gen)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    heuristic = choose_num_splits(batch, NHEADS, NHEADS_K, 1, context, HEADDIM, gpu)
    times = {}
    for n in sorted(set(SPLITS) | {heuristic}):
        times[n] = cuda_median_seconds(lambda n=n: decode_attention_triton(q, k, v, lens, num_splits=n))
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    sdpa = cuda_median_seconds(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True))
    best = min(SPLITS, key=lambda n: times[n])
    kv_bytes = 2 * k.numel() * k.element_size()
    return dict(
        batch=batch,
        context=context,
        kv_bytes=kv_bytes,
        seconds={str(n): t for n, t in times.items()},
        heuristic_splits=heuristic,
        best_splits=best,
        sdpa_seconds=sdpa,
        roofline_seconds=kv_bytes / gpu.hbm_bytes_per_s,
        roofline_fraction_best=kv_bytes / times[best] / gpu.hbm_bytes_per_s,
        roofline_fraction_heuristic=kv_bytes / times[heuristic] / gpu.hbm_bytes_per_s,
        model_seconds={str(n): model_decode(batch, NHEADS_K, context, HEADDIM, n, gpu).modelled_s for n in SPLITS},
    )


def run(device=None) -> dict:
    """Every shape on ``device`` (default: the current CUDA device); the results document."""
    import triton

    device = torch.device(device or "cuda")
    name = torch.cuda.get_device_name(device)
    rows = [measure_shape(b, L, device) for b, L in SHAPES]
    return dict(
        device=name,
        date=datetime.date.today().isoformat(),
        torch=torch.__version__,
        triton=triton.__version__,
        cuda=torch.version.cuda,
        peak_hbm_bytes_per_s=peak_bandwidth(name),
        nheads=NHEADS,
        nheads_k=NHEADS_K,
        headdim=HEADDIM,
        dtype="bf16",
        rows=rows,
    )


def format_rows(doc: dict) -> str:
    """The results as a text table."""
    lines = [
        f"{doc['device']} ({doc['date']}, torch {doc['torch']}, triton {doc['triton']}): decode, d={doc['headdim']}, "
        f"{doc['nheads']} q / {doc['nheads_k']} kv heads, {doc['dtype']}",
        f"{'batch x context':>16} {'splits=1':>10} {'heuristic':>14} {'best':>14} {'SDPA':>10} "
        f"{'% of HBM peak':>14} {'1 / best':>9} {'SDPA / best':>12}",
    ]
    for r in doc["rows"]:
        s = r["seconds"]
        best, heur = r["best_splits"], r["heuristic_splits"]
        lines.append(
            f"{r['batch']:>6} x {r['context']:>7} {s['1'] * 1e6:>8.1f}us {s[str(heur)] * 1e6:>8.1f}us ({heur:>3})"
            f" {s[str(best)] * 1e6:>8.1f}us ({best:>3}) {r['sdpa_seconds'] * 1e6:>8.1f}us"
            f" {r['roofline_fraction_best'] * 100:>13.0f}% {s['1'] / s[str(best)]:>8.1f}x"
            f" {r['sdpa_seconds'] / s[str(best)]:>11.2f}x"
        )
    return "\n".join(lines)


def main(out=None) -> int:
    if not torch.cuda.is_available():
        print(NO_CUDA)
        return 2
    doc = run()
    print(format_rows(doc))
    path = Path(out) if out else RESULTS_PATH
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"written to {path}")
    return 0
