"""The checks of FlashAttention 3's own arguments, a part of the one checked call (:mod:`flashkv_edu.call`).

FlashAttention 3's ``flash_attn_with_kvcache`` (front door :mod:`flashkv_edu.fa3`) adds varlen
queries and new keys, ``qv``, ``rotary_seqlens``, fp8 queries with ``q_descale``,
``attention_chunk``, ``scheduler_metadata``, ``pack_gqa`` and ``sm_margin``.
:func:`check_fa3_arguments` runs first and turns a call into one that the rest of the check
already knows: a varlen ``q`` ``(total_q, nheads, headdim)`` is checked as the padded ``(batch,
max_seqlen_q, nheads, headdim)`` it becomes (a zero-stride stand-in, no memory), an fp8 ``q`` as
the bf16 it is dequantized to, varlen new keys as an append whose length differs per row. What it
finds goes into :class:`~flashkv_edu.call.KVCacheCall`'s FA3 fields; value checks join the call's
one device read.

Varlen query rows are placed **right-aligned** in the padded layout: sequence ``b``'s
``q_lens[b]`` rows are padded rows ``max_seqlen_q - q_lens[b] ..``, so the bottom-right masks of
the padded call are exactly each sequence's own (the padding rows above them are dropped).

A scheduler plan (:func:`plan_tensor`, what :func:`flashkv_edu.fa3.get_scheduler_metadata`
returns) is an int32 tensor holding the call's shape fields and the split count; a call checks
that its plan was made for it (:func:`check_plan`).
"""

from __future__ import annotations

import torch

from .validation import (
    ArgumentError,
    ArgumentTypeError,
    DeviceChecks,
    check_bool,
    check_int,
    check_lengths,
    check_tensor,
    value_checks_on,
)

__all__ = [
    "PLAN_FIELDS",
    "check_fa3_arguments",
    "check_plan",
    "fa3_backend_rules",
    "groups_from",
    "plan_tensor",
    "read_groups",
]

FP8 = torch.float8_e4m3fn
PLAN_MAGIC = 0x46413300  # "FA3\0"
PLAN_FIELDS = (
    "batch", "max_seqlen_q", "max_seqlen_k", "nheads", "nheads_k", "headdim", "headdim_v", "page_size",
    "causal", "window_left", "window_right", "attention_chunk", "has_softcap", "varlen_q", "varlen_k_new",
    "pack_gqa", "sm_margin", "num_splits",
)  # fmt: skip
"""What a plan holds after its magic number, in this order (``pack_gqa``: -1 for None)."""


def _stand_in(shape, dtype, device) -> torch.Tensor:
    """A tensor of ``shape``, ``dtype``, ``device`` that holds no memory (every element one 0-d
    value): what the shape checks see for a tensor that is reshaped before it is used."""
    return torch.empty((), dtype=dtype, device=device).expand(*shape)


def _offsets(name: str, cu, total: int, device, checks: DeviceChecks, max_len: int | None = None):
    """``cu`` ``(batch + 1,)`` int32 offsets into ``total`` packed rows: ``cu[0] == 0``, non-
    decreasing, ``cu[-1] == total``, no sequence longer than ``max_len``. Returns ``(lengths
    int32 (batch,), the handle of the longest length)``."""
    check_tensor(name, cu, ndim=1)
    if cu.dtype != torch.int32:
        raise ArgumentTypeError(f"{name} must be int32, got {str(cu.dtype).replace('torch.', '')}")
    if cu.shape[0] < 2:
        raise ArgumentError(f"{name} must hold batch + 1 >= 2 offsets, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ArgumentError(f"{name} must be on {device}, got {cu.device}")
    lengths = (cu[1:] - cu[:-1]).to(torch.int32)
    checks.require(cu[0] == 0, lambda: f"{name} must start at 0, got {cu.tolist()}")
    checks.require(cu[-1] == total, lambda: f"{name} must end at {total} (the packed rows), got {cu.tolist()}")
    bound = "" if max_len is None else f" and at most max_seqlen_q = {max_len}"
    _, longest = checks.in_range(
        lengths, 0, max_len, lambda: f"{name}'s sequence lengths must be >= 0{bound}, got {lengths.tolist()}"
    )
    return lengths, longest


def check_fa3_arguments(a: dict, checks: DeviceChecks) -> dict:
    """Check FlashAttention 3's arguments of the call ``a`` (every keyword of
    :data:`~flashkv_edu.call.DEFAULTS`); replace ``a["q"]`` (and ``k``, ``v``, ``qv``) by
    stand-ins of the shapes and dtypes the rest of the check and the backends see. Returns the FA3
    fields of :class:`~flashkv_edu.call.KVCacheCall` (plus ``knew_max``, a device-read handle, and
    ``total_k_new``, the packed new keys)."""
    q, k, v, qv = a["q"], a["k"], a["v"], a["qv"]
    found = dict(
        chunk=check_int("attention_chunk", a["attention_chunk"], low=0),
        sm_margin=check_int("sm_margin", a["sm_margin"], low=0),
        pack_gqa=None if a["pack_gqa"] is None else check_bool("pack_gqa", a["pack_gqa"]),
        headdim_qv=0,
        rotary_base=None,
        q_lens=None,
        total_q=0,
        cu_seqlens_q=None,
        knew=None,
        knew_max=None,
        total_k_new=0,
        cu_seqlens_k_new=None,
        q_descale=None,
    )
    if not isinstance(q, torch.Tensor):
        return found  # the tensor checks name it
    for name in ("k_cache", "v_cache"):
        check_tensor(name, a[name], ndim=4)
    hk, dv = a["k_cache"].shape[2], a["v_cache"].shape[3]
    fp8_q = q.dtype == FP8 or a["q_descale"] is not None
    dtype = torch.bfloat16 if fp8_q else q.dtype  # an fp8 q is dequantized to bf16 (FA3's output dtype)

    cu_q, max_sq = a["cu_seqlens_q"], a["max_seqlen_q"]
    if (cu_q is None) != (max_sq is None):
        raise ArgumentError("cu_seqlens_q and max_seqlen_q must be given together (varlen queries)")
    if cu_q is not None:
        check_tensor("q", q, ndim=3)
        max_sq = check_int("max_seqlen_q", max_sq, low=1)
        total_q, h, d = q.shape
        if total_q == 0:
            raise ArgumentError("q must hold at least one query row, got 0")
        q_lens, _ = _offsets("cu_seqlens_q", cu_q, total_q, q.device, checks, max_sq)
        found.update(q_lens=q_lens, cu_seqlens_q=cu_q, total_q=total_q)
        a["q"] = _stand_in((cu_q.shape[0] - 1, max_sq, h, d), dtype, q.device)
    elif fp8_q:
        check_tensor("q", q, ndim=4)
        a["q"] = _stand_in(q.shape, dtype, q.device)
    b, sq, h, _ = a["q"].shape if a["q"].dim() == 4 else (0, 0, 0, 0)

    if fp8_q:
        _check_fp8_q(a, q, found, b, hk, checks)

    cu_k = a["cu_seqlens_k_new"]
    if cu_k is not None:
        if k is None or v is None:
            raise ArgumentError("cu_seqlens_k_new needs the new keys k and v")
        check_tensor("k", k, ndim=3)
        check_tensor("v", v, ndim=3)
        if k.shape[0] != v.shape[0]:
            raise ArgumentError(f"k and v must hold the same rows (total_k_new), got {k.shape[0]} and {v.shape[0]}")
        if cu_k.shape[0:1] != (b + 1,):
            raise ArgumentError(f"cu_seqlens_k_new must have shape ({b + 1},) (batch + 1), got {tuple(cu_k.shape)}")
        knew, longest = _offsets("cu_seqlens_k_new", cu_k, k.shape[0], q.device, checks)
        found.update(knew=knew, knew_max=longest, cu_seqlens_k_new=cu_k, total_k_new=k.shape[0])
        kdtype = torch.bfloat16 if fp8_q else k.dtype
        a["k"] = _stand_in((b, 0, k.shape[1], k.shape[2]), kdtype, k.device)
        a["v"] = _stand_in((b, 0, v.shape[1], v.shape[2]), kdtype if fp8_q else v.dtype, v.device)
    elif fp8_q and k is not None:
        a["k"], a["v"] = (_stand_in(t.shape, torch.bfloat16, t.device) for t in (k, v))

    if qv is not None:
        if fp8_q:
            raise ArgumentError("qv with an fp8 q is not supported (FlashAttention 3 runs qv in 16 bits)")
        want = (q.shape[0], h, dv) if cu_q is not None else (b, sq, h, dv)
        check_tensor("qv", qv)
        if tuple(qv.shape) != want:
            raise ArgumentError(f"qv must have shape {want} (q's, with v_cache's head dim {dv}), got {tuple(qv.shape)}")
        if qv.dtype != q.dtype or qv.device != q.device:
            raise ArgumentError(
                f"qv must have q's dtype and device ({q.dtype}, {q.device}), got {qv.dtype}, {qv.device}"
            )
        found["headdim_qv"] = dv

    if a["rotary_seqlens"] is not None:
        if a["rotary_cos"] is None:
            raise ArgumentError("rotary_seqlens (rotary positions) needs rotary_cos and rotary_sin")
        found["rotary_base"] = check_lengths(
            "rotary_seqlens", a["rotary_seqlens"], b, device=q.device, int32_only=True, checks=checks
        )
    return found


def _check_fp8_q(a: dict, q, found: dict, b: int, hk: int, checks: DeviceChecks) -> None:
    """FlashAttention 3's fp8 call: q, the caches and any new k/v all e4m3, descales fp32
    ``(batch, nheads_k)``; no rotary, no qv."""
    if q.dtype != FP8:
        raise ArgumentError(f"q_descale goes with an fp8 e4m3 q; q is {str(q.dtype).replace('torch.', '')}")
    qd = a["q_descale"]
    if qd is None:
        raise ArgumentError("an fp8 e4m3 q needs q_descale (real value = q * q_descale[b, kv_head])")
    check_tensor("q_descale", qd, ndim=2, dtypes=(torch.float32,))
    if tuple(qd.shape) != (b, hk) or qd.device != q.device:
        raise ArgumentError(
            f"q_descale must be fp32 ({b}, {hk}) = (batch, nheads_k) on {q.device}, got {tuple(qd.shape)}"
        )
    checks.require((torch.isfinite(qd) & (qd > 0)).all(), lambda: "q_descale must be positive and finite")
    if a["k_cache"].dtype != FP8 or a["v_cache"].dtype != FP8:
        raise ArgumentError("an fp8 q needs fp8 e4m3 k_cache and v_cache with k_descale/v_descale (FlashAttention 3)")
    for name in ("k", "v"):
        if a[name] is not None and (not isinstance(a[name], torch.Tensor) or a[name].dtype != FP8):
            raise ArgumentError(
                f"with an fp8 q the new {name} must be fp8 e4m3 too (FlashAttention 3), got {a[name]!r:.60}"
            )
    if a["rotary_cos"] is not None:
        raise ArgumentError("rotary_cos/rotary_sin with an fp8 q are not supported: rotate before quantizing")
    found["q_descale"] = qd


def fa3_backend_rules(a: dict, found: dict, backend: str) -> str:
    """The backend that serves the call: the Triton kernels do not take ``qv``; asked for by name
    that is an error, and ``backend="auto"`` takes the PyTorch path."""
    if backend == "triton" and found["headdim_qv"]:
        if a["backend"] == "triton":
            raise ArgumentError("backend='triton' does not take qv; use backend='torch' or 'auto'")
        return "torch"
    return backend


def read_groups(found: dict, ends: torch.Tensor, capacity: int, checks: DeviceChecks) -> list[int] | None:
    """For a varlen call, the device reads that split it into groups (:mod:`flashkv_edu.varlen`):
    handles of the number of sequences of at most one query row, whether they come first, and the
    (min, max) end of theirs and of the others. None for a batched call."""
    if found["q_lens"] is None:
        return None
    short = found["q_lens"] <= 1
    first = short.int().cumprod(0).sum() == short.sum()
    bounds = [
        checks.read(op(torch.where(side, ends, fill)))
        for side in (short, ~short)
        for op, fill in ((torch.min, capacity + 1), (torch.max, -1))
    ]
    return [checks.read(short.sum()), checks.read(first), *bounds]


def groups_from(values: list[int], reads: list[int] | None):
    """``KVCacheCall.groups`` from the read values: ``(short, first, (min, max) end of the short,
    of the others)``; one group (the worst case) when nothing was read."""
    if reads is None:
        return None
    if not value_checks_on():
        return (0, False, (0, 0), (0, 0))
    n, first, a_lo, a_hi, b_lo, b_hi = (values[i] for i in reads)
    return (n, bool(first), (max(a_lo, 0), max(a_hi, 0)), (max(b_lo, 0), max(b_hi, 0)))


def plan_tensor(values: dict) -> torch.Tensor:
    """A scheduler plan: int32 ``[PLAN_MAGIC, *values[f] for f in PLAN_FIELDS]``."""
    return torch.tensor([PLAN_MAGIC] + [int(values[f]) for f in PLAN_FIELDS], dtype=torch.int32)


def check_plan(plan, call, window_size, causal: bool) -> int:
    """The split count of ``plan`` (``scheduler_metadata``) after checking that it was made for
    ``call`` (a :class:`~flashkv_edu.call.KVCacheCall`; ``window_size`` and ``causal`` as the call
    gave them): the same shapes and mask, a ``max_seqlen_k`` that covers every sequence, and the
    same ``num_splits`` when the call names one. Raises naming the first field that differs."""
    check_tensor("scheduler_metadata", plan, ndim=1, dtypes=(torch.int32,))
    values = plan.tolist()
    if len(values) != 1 + len(PLAN_FIELDS) or values[0] != PLAN_MAGIC:
        raise ArgumentError("scheduler_metadata must be what flashkv_edu.fa3.get_scheduler_metadata returned")
    got = dict(zip(PLAN_FIELDS, values[1:], strict=True))
    left, right = window_size
    want = dict(
        batch=call.batch,
        max_seqlen_q=call.seqlen_q,
        nheads=call.nheads,
        nheads_k=call.nheads_k,
        headdim=call.headdim,
        headdim_v=call.headdim_v,
        page_size=call.page_size,
        causal=int(causal),
        window_left=left,
        window_right=right,
        attention_chunk=call.chunk,
        has_softcap=int(call.softcap > 0),
        varlen_q=int(call.varlen_q),
        varlen_k_new=int(call.knew is not None),
        pack_gqa=-1 if call.pack_gqa is None else int(call.pack_gqa),
        sm_margin=call.sm_margin,
    )
    for field, value in want.items():
        if got[field] != value:
            raise ArgumentError(
                f"scheduler_metadata was made for {field}={got[field]}, this call has {field}={value}: "
                "make the plan with this call's arguments"
            )
    if got["max_seqlen_k"] < call.max_end:
        raise ArgumentError(
            f"scheduler_metadata was made for max_seqlen_k={got['max_seqlen_k']}, a sequence of this call "
            f"reaches {call.max_end} keys"
        )
    if call.num_splits not in (0, got["num_splits"]):
        raise ArgumentError(
            f"scheduler_metadata plans {got['num_splits']} splits, this call asks for num_splits={call.num_splits}"
        )
    return got["num_splits"]
