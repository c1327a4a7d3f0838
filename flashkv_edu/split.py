"""Split-KV decode (Flash-Decoding): how many splits, and what they buy (notebook 07).

At decode time FlashAttention launches one program per (batch, head, query block). With a
small batch that is far fewer programs than a GPU has streaming multiprocessors (SMs), so most
of the GPU idles while each program walks a long cache alone. Splitting the keys into
``num_splits`` chunks multiplies the programs; each chunk yields an attention state
``(out, lse)`` and a combine step merges them (notebook 04's ``merge_states``).

This module holds FlashAttention 2's split heuristic, a model of waves of programs over SMs,
and a roofline estimate of a decode step (time to read the KV cache from memory).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .validation import ArgumentError, check_int, check_positive

__all__ = [
    "A100",
    "GPU",
    "H100",
    "DecodeModel",
    "block_n_for",
    "choose_num_splits",
    "combine_splits_torch",
    "gpu_for",
    "model_decode",
    "num_splits_heuristic",
    "num_splits_heuristic_fa3",
    "roofline_seconds",
    "waves",
]


@dataclass(frozen=True)
class GPU:
    """The two numbers decode attention cares about."""

    name: str
    num_sms: int
    hbm_bytes_per_s: float


A100 = GPU("A100-80GB SXM", 108, 2.039e12)
H100 = GPU("H100 SXM", 132, 3.35e12)


def gpu_for(device) -> GPU:
    """The GPU that ``device`` is (name and SM count read from CUDA; bandwidth taken as an
    H100's), or :data:`H100` for a CPU device, so ``num_splits=0`` acts as it would there."""
    device = torch.device(device)
    if device.type != "cuda":
        return H100
    props = torch.cuda.get_device_properties(device)
    return GPU(props.name, props.multi_processor_count, H100.hbm_bytes_per_s)


def _check_gpu(gpu) -> GPU:
    if not isinstance(gpu, GPU):
        raise ArgumentError(f"gpu must be a flashkv_edu.split.GPU, got {type(gpu).__name__}")
    check_int("gpu.num_sms", gpu.num_sms, low=1)
    check_positive("gpu.hbm_bytes_per_s", gpu.hbm_bytes_per_s)
    return gpu


def num_splits_heuristic(batch_nheads_mblocks: int, num_sms: int, num_n_blocks: int, max_splits: int = 128) -> int:
    """FlashAttention 2's ``num_splits_heuristic`` (``csrc/flash_attn/flash_api.cpp``).

    ``batch_nheads_mblocks`` programs already exist; ``num_sms`` is the number of program slots
    (FlashAttention passes twice the SM count); ``num_n_blocks`` key blocks per sequence.

    1. If the programs already fill 80% of the slots, do not split.
    2. Otherwise consider ``s = 1 .. min(max_splits, num_sms, num_n_blocks)`` whose chunk size
       ``ceil(n_blocks / s)`` differs from that of ``s - 1`` (others add programs, not speed).
    3. Wave efficiency ``eff(s) = w / ceil(w)`` with ``w = batch_nheads_mblocks * s / num_sms``.
    4. Return the smallest eligible ``s`` within 85% of the best efficiency.
    """
    batch_nheads_mblocks = check_int("batch_nheads_mblocks", batch_nheads_mblocks, low=1)
    num_sms = check_int("num_sms", num_sms, low=1)
    num_n_blocks = check_int("num_n_blocks", num_n_blocks, low=1)
    max_splits = check_int("max_splits", max_splits, low=1)
    if batch_nheads_mblocks >= 0.8 * num_sms:
        return 1
    max_splits = min(max_splits, num_sms, num_n_blocks)

    def eligible(s):
        return s == 1 or math.ceil(num_n_blocks / s) != math.ceil(num_n_blocks / (s - 1))

    return _smallest_efficient(batch_nheads_mblocks, num_sms, [s for s in range(1, max_splits + 1) if eligible(s)])


def _smallest_efficient(programs: int, num_sms: int, candidates: list[int]) -> int:
    """The smallest split count of ``candidates`` whose wave efficiency ``w / ceil(w)`` (``w =
    programs * s / num_sms``) is within 85% of the best one's: both FlashAttention generations'
    rule."""
    efficiency = {}
    for s in candidates:
        waves = programs * s / num_sms
        efficiency[s] = waves / math.ceil(waves)
    best = max(efficiency.values(), default=0.0)
    return next((s for s in candidates if efficiency[s] >= 0.85 * best), 1)


def num_splits_heuristic_fa3(
    total_mblocks: int,
    num_sms: int,
    num_n_blocks: int,
    num_m_blocks: int,
    size_one_kv_head: int,
    causal_or_local: bool,
    max_splits: int = 128,
) -> int:
    """FlashAttention 3's ``num_splits_heuristic`` (``hopper/heuristics.h``): FlashAttention 2's
    rule with two changes.

    1. ``total_mblocks`` programs fill 80% of ``num_sms`` (FA3 passes the SM count less
       ``sm_margin``, not twice it): one split, unless one KV head's keys and values
       (``size_one_kv_head`` bytes) outgrow a 50 MB L2, the queries pass over them at least twice
       (``num_m_blocks >= 2 * num_sms``) and the mask is neither causal nor local: then
       ``ceil(size / 50 MB)`` splits.
    2. Otherwise one split for ``num_n_blocks <= 4`` key blocks, else the smallest ``s`` within
       85% of the best wave efficiency, over every ``s`` (no eligibility filter)."""
    for name, value, low in (
        ("total_mblocks", total_mblocks, 1),
        ("num_sms", num_sms, 1),
        ("num_n_blocks", num_n_blocks, 1),
        ("num_m_blocks", num_m_blocks, 1),
        ("size_one_kv_head", size_one_kv_head, 0),
        ("max_splits", max_splits, 1),
    ):
        check_int(name, value, low=low)
    l2 = 50 * 1024 * 1024
    if total_mblocks >= 0.8 * num_sms:
        if size_one_kv_head > l2 and num_m_blocks >= 2 * num_sms and not causal_or_local:
            return min(-(-size_one_kv_head // l2), max_splits)
        return 1
    if num_n_blocks <= 4:
        return 1
    return _smallest_efficient(total_mblocks, num_sms, list(range(1, min(max_splits, num_sms, num_n_blocks) + 1)))


def block_n_for(headdim: int) -> int:
    """Key-block width of FlashAttention 2's split-KV kernel: 256 (d <= 64), 128 (d <= 128), else 64."""
    headdim = check_int("headdim", headdim, low=1)
    return 256 if headdim <= 64 else (128 if headdim <= 128 else 64)


def choose_num_splits(
    batch: int,
    nheads: int,
    nheads_k: int,
    seqlen_q: int,
    capacity: int,
    headdim: int,
    gpu: GPU = H100,
    alibi: bool = False,
    local: bool = False,
) -> int:
    """What ``num_splits=0`` becomes in FlashAttention 2: the heuristic fed as ``set_params_splitkv``
    feeds it. For decode (``seqlen_q == 1``) with GQA, no window and no ALiBi, FlashAttention
    first folds the query heads of a KV group into the query length (``h -> h_k``,
    ``seqlen_q -> group``). Key blocks count the cache **capacity**."""
    for name, value in (
        ("batch", batch),
        ("nheads", nheads),
        ("nheads_k", nheads_k),
        ("seqlen_q", seqlen_q),
        ("capacity", capacity),
        ("headdim", headdim),
    ):
        check_int(name, value, low=1)
    if nheads % nheads_k:
        raise ArgumentError(f"nheads_k ({nheads_k}) must divide nheads ({nheads})")
    _check_gpu(gpu)
    if seqlen_q == 1 and nheads > nheads_k and not local and not alibi and headdim % 8 == 0:
        nheads, seqlen_q = nheads_k, nheads // nheads_k
    programs = batch * nheads * math.ceil(seqlen_q / 64)
    n_blocks = math.ceil(capacity / block_n_for(headdim))
    return num_splits_heuristic(programs, 2 * gpu.num_sms, n_blocks, 128)


def waves(num_programs: int, num_sms: int, programs_per_sm: int = 1) -> list[int]:
    """Busy SMs in each wave when ``num_programs`` equal programs run ``programs_per_sm`` at a
    time on each of ``num_sms`` SMs (the last wave may be partial)."""
    num_programs = check_int("num_programs", num_programs, low=0)
    num_sms = check_int("num_sms", num_sms, low=1)
    programs_per_sm = check_int("programs_per_sm", programs_per_sm, low=1)
    slots = num_sms * programs_per_sm
    full, rest = divmod(num_programs, slots)
    busy = [num_sms] * full
    if rest:
        busy.append(math.ceil(rest / programs_per_sm))
    return busy


@dataclass
class DecodeModel:
    """Idealised time of one decode attention step with ``num_splits`` splits."""

    programs: int
    waves: int
    sm_utilization: float  # busy SM-waves / (waves * SMs)
    kv_bytes: int
    roofline_s: float  # KV bytes / HBM bandwidth: the floor for any kernel
    modelled_s: float  # waves x time for one program to stream its chunk


def model_decode(
    batch: int, nheads_k: int, context: int, headdim: int, num_splits: int, gpu: GPU = H100, bytes_per_elem: int = 2
) -> DecodeModel:
    """A first-order model: one program per (sequence, KV head, split); each program streams its
    chunk of K and V at ``bandwidth / num_sms`` (its SM's share); programs run in waves of
    ``num_sms``. Ignores the combine step and launch overheads."""
    for name, value in (
        ("batch", batch),
        ("nheads_k", nheads_k),
        ("context", context),
        ("headdim", headdim),
        ("num_splits", num_splits),
        ("bytes_per_elem", bytes_per_elem),
    ):
        check_int(name, value, low=1)
    _check_gpu(gpu)
    programs = batch * nheads_k * num_splits
    busy = waves(programs, gpu.num_sms)
    kv = 2 * batch * context * nheads_k * headdim * bytes_per_elem
    per_program = kv / programs
    per_program_time = per_program / (gpu.hbm_bytes_per_s / gpu.num_sms)
    return DecodeModel(
        programs,
        len(busy),
        sum(busy) / (len(busy) * gpu.num_sms),
        kv,
        kv / gpu.hbm_bytes_per_s,
        len(busy) * per_program_time,
    )


def roofline_seconds(batch: int, context: int, nheads_k: int, headdim: int, gpu: GPU, bytes_per_elem: int = 2) -> float:
    """Lower bound on one layer's decode attention: bytes of K and V read / HBM bandwidth."""
    for name, value in (
        ("batch", batch),
        ("context", context),
        ("nheads_k", nheads_k),
        ("headdim", headdim),
        ("bytes_per_elem", bytes_per_elem),
    ):
        check_int(name, value, low=0)
    _check_gpu(gpu)
    return 2 * batch * context * nheads_k * headdim * bytes_per_elem / gpu.hbm_bytes_per_s


def combine_splits_torch(out_partial: torch.Tensor, lse_partial: torch.Tensor):
    """The combine step in PyTorch: ``out_partial (splits, batch, seqlen_q, nheads, headdim)``
    and ``lse_partial (splits, batch, nheads, seqlen_q)`` merged as in notebook 04
    (empty splits have LSE -inf), as the Triton combine kernel does."""
    from .online_softmax import merge_many

    return merge_many(out_partial, lse_partial)
