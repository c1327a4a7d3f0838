"""The one checked call behind ``flash_attn_with_kvcache`` and the decode kernel's entry point.

:func:`check_kvcache_call` validates every argument before anything is written and returns a
:class:`KVCacheCall`: the normalised call (window with causal folded in, default scale, int32
index tensors, key ranges, scale mode) that the backends take. Checks that read tensor values are
gathered in one :class:`~flashkv_edu.validation.DeviceChecks` and read from the device once; the
same read brings back the few numbers the PyTorch path needs on the host (the longest sequence,
whether every row starts at 0), so no backend reads the device again. Inside
:func:`~flashkv_edu.validation.skip_value_checks` nothing is read (CUDA-graph capture).

``cache_seqlens`` always means the tokens in the cache **before** this call's append; with no new
``k``/``v`` that is the number of keys attention reads.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass

import torch

from . import runtime
from .call_fa3 import check_fa3_arguments, check_plan, fa3_backend_rules, groups_from, read_groups
from .validation import (
    QUANTIZED_CACHE_DTYPES,
    SCALE_NONE,
    ArgumentError,
    ArgumentTypeError,
    DeviceChecks,
    check_alibi_slopes,
    check_block_table,
    check_bool,
    check_cache_descales,
    check_cache_shapes,
    check_lengths,
    check_num_splits,
    check_same,
    check_sink,
    check_softcap,
    check_tensor,
    check_window,
    normalize_window,
    range_message,
    softmax_scale_for,
    value_checks_on,
)

__all__ = [
    "APPEND_ARGUMENTS",
    "CACHE_DTYPES",
    "DEFAULTS",
    "FA2_ARGUMENTS",
    "FA2_DEFAULTS",
    "FA3_ONLY",
    "FA3_ORDER",
    "FA3_SIGNATURE",
    "KEYWORD_ONLY",
    "KVCACHE_SIGNATURE",
    "MAX_HEADDIM",
    "KVCacheCall",
    "bind_kvcache_arguments",
    "check_kvcache_call",
]

# flash_attn_with_kvcache's arguments after (q, k_cache, v_cache): FlashAttention 2's, in its order
# and with its defaults, then flashkv_edu's keyword-only ones. The one list: the API's signature,
# the check's keywords and the decode kernel's entry point are made from it.
FA2_ARGUMENTS = (
    ("k", None),
    ("v", None),
    ("rotary_cos", None),
    ("rotary_sin", None),
    ("cache_seqlens", None),
    ("cache_batch_idx", None),
    ("cache_leftpad", None),
    ("block_table", None),
    ("softmax_scale", None),
    ("causal", False),
    ("window_size", (-1, -1)),
    ("softcap", 0.0),
    ("rotary_interleaved", True),
    ("alibi_slopes", None),
    ("num_splits", 0),
    ("return_softmax_lse", False),
)
KEYWORD_ONLY = (("k_descale", None), ("v_descale", None), ("learnable_sink", None), ("backend", "auto"))
FA2_DEFAULTS = dict(FA2_ARGUMENTS + KEYWORD_ONLY)
# FlashAttention 3's arguments that FlashAttention 2 lacks (flashkv_edu.fa3 takes them).
FA3_ONLY = (
    ("qv", None),
    ("cu_seqlens_q", None),
    ("cu_seqlens_k_new", None),
    ("max_seqlen_q", None),
    ("rotary_seqlens", None),
    ("q_descale", None),
    ("attention_chunk", 0),
    ("scheduler_metadata", None),
    ("pack_gqa", None),
    ("sm_margin", 0),
)
DEFAULTS = {**FA2_DEFAULTS, **dict(FA3_ONLY)}
APPEND_ARGUMENTS = ("k", "v", "rotary_cos", "rotary_sin", "rotary_interleaved")  # what only an append uses
# FlashAttention 3's order (hopper/flash_attn_interface.py), its names: FA3 calls block_table page_table
# and has no alibi_slopes. The defaults are DEFAULTS'.
FA3_RENAMED = {"page_table": "block_table"}
FA3_ORDER = (
    "k", "v", "qv", "rotary_cos", "rotary_sin", "cache_seqlens", "cache_batch_idx", "cache_leftpad", "page_table",
    "cu_seqlens_q", "cu_seqlens_k_new", "max_seqlen_q", "rotary_seqlens", "q_descale", "k_descale", "v_descale",
    "softmax_scale", "causal", "window_size", "attention_chunk", "softcap", "rotary_interleaved",
    "scheduler_metadata", "num_splits", "pack_gqa", "sm_margin", "return_softmax_lse",
)  # fmt: skip
FA3_KEYWORD_ONLY = ("learnable_sink", "backend")


def _parameters(names_defaults, kind):
    return [inspect.Parameter(name, kind, default=default) for name, default in names_defaults]


_TENSORS = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in ("q", "k_cache", "v_cache")]
KVCACHE_SIGNATURE = inspect.Signature(
    _TENSORS
    + _parameters(FA2_ARGUMENTS, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    + _parameters(KEYWORD_ONLY, inspect.Parameter.KEYWORD_ONLY)
)
"""``flash_attn_with_kvcache(q, k_cache, v_cache, k=None, ..., return_softmax_lse=False, *,
k_descale=None, v_descale=None, learnable_sink=None, backend="auto")``."""

FA3_SIGNATURE = inspect.Signature(
    _TENSORS
    + _parameters([(n, DEFAULTS[FA3_RENAMED.get(n, n)]) for n in FA3_ORDER], inspect.Parameter.POSITIONAL_OR_KEYWORD)
    + _parameters([(n, DEFAULTS[n]) for n in FA3_KEYWORD_ONLY], inspect.Parameter.KEYWORD_ONLY)
)
"""FlashAttention 3's ``flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, qv=None, ...,
return_softmax_lse=False, *, learnable_sink=None, backend="auto")``."""


def bind_kvcache_arguments(name: str, args: tuple, kwargs: dict, signature=KVCACHE_SIGNATURE) -> dict:
    """``args``/``kwargs`` of a ``flash_attn_with_kvcache`` call (``signature``: FlashAttention 2's
    or :data:`FA3_SIGNATURE`) as one dict of every argument under the checked call's names
    (defaults filled in; FA3's ``page_table`` is ``block_table``); a missing tensor, an unknown
    keyword or too many positional arguments raise
    :class:`~flashkv_edu.validation.ArgumentTypeError` naming ``name``'s signature."""
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise ArgumentTypeError(f"{name}{signature}: {exc}") from None
    bound.apply_defaults()
    return {FA3_RENAMED.get(n, n): value for n, value in bound.arguments.items()}


CACHE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEADDIM = {"torch": 512, "triton": 256}  # the kernels' register budget; any size in PyTorch


@dataclass(frozen=True, kw_only=True)
class KVCacheCall:
    """A checked, normalised ``flash_attn_with_kvcache`` call (shapes as in its docstring)."""

    batch: int
    seqlen_q: int
    nheads: int
    nheads_k: int
    headdim: int
    headdim_v: int  # v_cache's head dim (FlashAttention 3's headdim_v); the output has it
    capacity: int  # keys a sequence can hold (block_table columns x page size when paged)
    page_size: int  # rows per block of a paged pool; 0 for a contiguous cache
    seqlens: torch.Tensor  # int32 (batch,): cached tokens before the append
    ends: torch.Tensor  # int32 (batch,): keys attention reads up to (exclusive), seqlens + snew
    leftpad: torch.Tensor | None  # int32 (batch,): first valid cache row
    snew: int  # new tokens appended per sequence
    batch_rows: torch.Tensor | None  # int32 (batch,): cache row of each sequence
    block_table: torch.Tensor | None  # int32 (batch, max_blocks), contiguous
    alibi_slopes: torch.Tensor | None  # fp32 (nheads,) or (batch, nheads), contiguous
    sink: torch.Tensor | None  # fp32 (nheads,): learnable sink logits (FlashAttention 4's learnable_sink)
    rotary_dim: int
    rotary_interleaved: bool
    scale: float
    softcap: float
    window: tuple[int, int]  # (left, right), causal folded in, FlashAttention's capacity rule applied
    is_causal: bool  # window == (-1, 0)
    is_local: bool  # any other finite window
    num_splits: int  # 0 = heuristic
    backend: str  # "triton" or "torch"
    scale_mode: int  # validation.SCALE_NONE / SCALE_PER_HEAD / SCALE_PER_TOKEN
    k_descale: torch.Tensor | None
    v_descale: torch.Tensor | None
    return_lse: bool
    # Read from the device together with the checks (conservative values when checks are skipped):
    max_end: int  # the longest row's end
    min_end: int  # the shortest row's end
    max_start: int  # the latest first valid row (0 without leftpad)
    # FlashAttention 3's arguments (flashkv_edu.fa3); the defaults are FlashAttention 2's behaviour.
    chunk: int = 0  # attention_chunk: keys only from the query's chunk of that many positions
    headdim_qv: int = 0  # qv's head dim (v's): scores q.k + qv.v; 0 without qv
    rotary_base: torch.Tensor | None = None  # int32 (batch,): rotary_seqlens, the position of row 0
    q_lens: torch.Tensor | None = None  # varlen queries: int32 (batch,) rows of each sequence
    cu_seqlens_q: torch.Tensor | None = None  # int32 (batch + 1,): where each sequence's rows start in q
    knew: torch.Tensor | None = None  # varlen new keys: int32 (batch,) appended to each sequence
    cu_seqlens_k_new: torch.Tensor | None = None  # int32 (batch + 1,)
    total_q: int = 0  # varlen queries: rows of the packed q
    q_descale: torch.Tensor | None = None  # fp32 (batch, nheads_k): an fp8 q's real value is q * q_descale
    # varlen queries, read with the checks: (sequences of <= 1 query row, whether they come first,
    # (min, max) end of theirs, (min, max) end of the others); flashkv_edu.varlen pads the groups apart
    groups: tuple | None = None
    pack_gqa: bool | None = None  # scheduling only (FlashAttention 3's PackGQA)
    sm_margin: int = 0  # scheduling only: SMs left free for other kernels

    @property
    def varlen_q(self) -> bool:
        return self.q_lens is not None

    @property
    def paged(self) -> bool:
        return self.block_table is not None

    @property
    def sees_whole_rows(self) -> bool:
        """Whether every query row sees every key of ``[0, max_end)``: all rows start at 0 and end
        together, and the window does not cut into them (a plain decode step)."""
        s, sq = self.max_end, self.seqlen_q
        left, right = self.window
        return (
            s > 0
            and self.max_start == 0
            and self.min_end == s
            and self.alibi_slopes is None
            and (left < 0 or left >= s - 1)
            and (right < 0 or right >= sq - 1)
            and (self.chunk == 0 or self.chunk >= s)
            and self.q_lens is None
        )


def check_kvcache_call(
    q, k_cache, v_cache, *, per_token_scales: bool = False, fa3: bool = False, **arguments
) -> KVCacheCall:
    """Check every argument of ``flash_attn_with_kvcache`` (keywords as in :data:`DEFAULTS`;
    ``per_token_scales``: whether an int8 cache may carry one scale per token, as the decode
    kernel's entry point allows; ``fa3``: FlashAttention 3's rules, under which a paged cache also
    takes ``cache_batch_idx`` (rows of the page table) and ``cache_leftpad``) before anything is
    written; return the normalised
    :class:`KVCacheCall`. Errors name the argument. Head dims go up to 512 on the PyTorch backend
    and 256 in the Triton kernels, which also need ``v_cache``'s head dim to equal ``k_cache``'s.

    The phases, in order: the tensors (types, pairs, dtypes, devices), the layout (shapes, pages,
    capacity, new tokens), the lengths (``cache_seqlens``, ``cache_batch_idx``, ``cache_leftpad``:
    one device read for all of them), the masks and rotary tables, the scales (softmax, softcap,
    ALiBi, sinks, splits, fp8 descales)."""
    unknown = sorted(set(arguments) - set(DEFAULTS))
    if unknown:
        raise ArgumentTypeError(f"flash_attn_with_kvcache got unexpected keyword arguments: {', '.join(unknown)}")
    a = {**DEFAULTS, **arguments, "q": q, "k_cache": k_cache, "v_cache": v_cache}
    checks = DeviceChecks()
    fa3_fields = check_fa3_arguments(a, checks)  # may stand in a 4-D view for a varlen or fp8 q
    q = a["q"]
    backend = fa3_backend_rules(a, fa3_fields, _check_tensors(a, per_token_scales))
    layout = _check_layout(a, backend, checks, fa3)
    lengths = _check_lengths(a, layout, checks, fa3_fields["knew"])
    window = normalize_window(a["window_size"], a["causal"], seqlen_k=layout["capacity"])
    is_causal = window[0] < 0 and window[1] == 0
    is_local = (window[0] >= 0 or window[1] >= 0) and not is_causal
    rotary_dim = _check_rotary(a, layout)
    scales = _check_scales(a, layout, per_token_scales, checks, fa3_fields["headdim_qv"])
    seqlens = lengths["seqlens"]
    added = fa3_fields["knew"] if fa3_fields["knew"] is not None else layout["snew"]  # new keys per row
    group_reads = read_groups(fa3_fields, seqlens + added, layout["capacity"], checks)
    values = checks.run()
    snew = layout["snew"]
    if value_checks_on():
        max_end, min_end = values[lengths["end_max"]], values[lengths["end_min"]]
        max_start = values[lengths["pad_max"]] if lengths["leftpad"] is not None else 0
        if fa3_fields["knew"] is not None:
            snew = values[fa3_fields["knew_max"]]
    else:  # nothing read: the backends assume the worst (every row may reach the capacity)
        max_end, min_end, max_start = layout["capacity"], 0, layout["capacity"]
        if fa3_fields["knew"] is not None:
            snew = min(fa3_fields["total_k_new"], layout["capacity"])
    b, sq, h, d = q.shape
    call = KVCacheCall(
        batch=b,
        seqlen_q=sq,
        nheads=h,
        nheads_k=k_cache.shape[2],
        headdim=d,
        headdim_v=v_cache.shape[3],
        capacity=layout["capacity"],
        page_size=layout["page_size"],
        seqlens=seqlens,
        ends=(seqlens + added).to(torch.int32) if fa3_fields["knew"] is not None or snew else seqlens,
        leftpad=lengths["leftpad"],
        snew=snew,
        batch_rows=lengths["batch_rows"],
        block_table=layout["block_table"],
        rotary_dim=rotary_dim,
        rotary_interleaved=a["rotary_interleaved"],
        window=window,
        is_causal=is_causal,
        is_local=is_local,
        backend=backend,
        return_lse=a["return_softmax_lse"],
        max_end=max_end,
        min_end=min_end,
        max_start=max_start,
        chunk=fa3_fields["chunk"],
        headdim_qv=fa3_fields["headdim_qv"],
        rotary_base=fa3_fields["rotary_base"],
        q_lens=fa3_fields["q_lens"],
        groups=groups_from(values, group_reads),
        total_q=fa3_fields["total_q"],
        cu_seqlens_q=fa3_fields["cu_seqlens_q"],
        knew=fa3_fields["knew"],
        cu_seqlens_k_new=fa3_fields["cu_seqlens_k_new"],
        q_descale=fa3_fields["q_descale"],
        pack_gqa=fa3_fields["pack_gqa"],
        sm_margin=fa3_fields["sm_margin"],
        **scales,
    )
    if a["scheduler_metadata"] is not None:  # a plan made once per step: it must be this call's
        splits = check_plan(a["scheduler_metadata"], call, check_window(a["window_size"]), a["causal"])
        call = dataclasses.replace(call, num_splits=splits)
    return call


def _check_tensors(a: dict, per_token_scales: bool) -> str:
    """Types, dtypes and devices of every tensor argument, the pairs given together, the flags;
    returns the backend (``"triton"`` or ``"torch"``)."""
    q, k, v = a["q"], a["k"], a["v"]
    quantized = QUANTIZED_CACHE_DTYPES if per_token_scales else (torch.float8_e4m3fn,)
    check_tensor("q", q, ndim=4, dtypes=CACHE_DTYPES)
    check_tensor("k_cache", a["k_cache"], ndim=4, dtypes=CACHE_DTYPES + quantized)
    check_tensor("v_cache", a["v_cache"], ndim=4, dtypes=CACHE_DTYPES + quantized)
    tensors = {"q": q}
    if (k is None) != (v is None):
        raise ArgumentError("k and v must be given together (both or neither)")
    if k is not None:
        check_tensor("k", k, ndim=4)
        check_tensor("v", v, ndim=4)
        tensors.update(k=k, v=v)
    cos, sin = a["rotary_cos"], a["rotary_sin"]
    if (cos is None) != (sin is None):
        raise ArgumentError("rotary_cos and rotary_sin must be given together")
    if cos is not None:
        if k is None:
            raise ArgumentError("rotary_cos/rotary_sin need new keys k and v (rotary is applied on append)")
        check_tensor("rotary_cos", cos, ndim=2)
        check_tensor("rotary_sin", sin, ndim=2)
        tensors.update(rotary_cos=cos, rotary_sin=sin)
    check_same(tuple(tensors), tuple(tensors.values()), "dtype")
    tensors.update(k_cache=a["k_cache"], v_cache=a["v_cache"])
    check_same(tuple(tensors), tuple(tensors.values()), "device")
    check_bool("rotary_interleaved", a["rotary_interleaved"])
    check_bool("return_softmax_lse", a["return_softmax_lse"])
    if q.shape[0] == 0:
        raise ArgumentError("q must have batch size >= 1, got 0")
    if q.shape[1] == 0:
        raise ArgumentError("q must have seqlen_q >= 1, got 0")
    return runtime.resolve_backend(a["backend"], q.device)


def _check_layout(a: dict, backend: str, checks: DeviceChecks, fa3: bool = False) -> dict:
    """Shapes of the caches and the new keys, the page table: ``capacity``, ``page_size``,
    ``block_table`` (checked, int32), ``snew``. Under FlashAttention 3's rules (``fa3``) a paged
    call may name ``cache_batch_idx``: the rows of the page table its sequences use (the table
    handed on is those rows), and ``cache_leftpad``."""
    q, k_cache, v_cache, k, v = a["q"], a["k_cache"], a["v_cache"], a["k"], a["v"]
    b, _, _, d = q.shape
    check_cache_shapes(q, k_cache, v_cache, MAX_HEADDIM[backend])
    hk, dv = k_cache.shape[2], v_cache.shape[3]
    if backend == "triton" and dv != d:
        raise ArgumentError(
            f"backend='triton' needs v_cache's head dim to equal k_cache's ({d}), got {dv}; use backend='torch'"
        )
    if k_cache.shape[0] == 0 or k_cache.shape[1] == 0:
        raise ArgumentError(f"k_cache must hold at least one sequence and one row, got {tuple(k_cache.shape)}")
    block_table = a["block_table"]
    if block_table is not None:
        for name in ("cache_batch_idx", "cache_leftpad"):
            if a[name] is not None and not fa3:
                raise ArgumentError(f"{name} cannot be used with block_table (paged KV cache)")
        if a["cache_batch_idx"] is not None:  # FA3: sequence i reads page-table row cache_batch_idx[i]
            check_tensor("block_table", block_table, ndim=2)
            rows = _check_batch_rows(a, block_table.shape[0], checks)
            block_table = block_table[rows.long().clamp(0, max(block_table.shape[0] - 1, 0))]
            a["cache_batch_idx"] = None  # the table's rows are chosen: no cache row to pick later
        block_table = check_block_table(block_table, b, k_cache.shape[0], checks)
        page_size = k_cache.shape[1]
        capacity = block_table.shape[1] * page_size
    else:
        page_size, capacity = 0, k_cache.shape[1]
    snew = 0
    if k is not None:
        if k.shape[0] != b or k.shape[2] != hk or k.shape[3] != d:
            raise ArgumentError(f"k must have shape ({b}, seqlen_new, {hk}, {d}), got {tuple(k.shape)}")
        if tuple(v.shape) != (b, k.shape[1], hk, dv):
            raise ArgumentError(
                f"k and v must have the same shape but for v's head dim (v_cache's, {dv}): v must be "
                f"{(b, k.shape[1], hk, dv)}, got {tuple(v.shape)}"
            )
        if a["cache_seqlens"] is None:
            raise ArgumentError("cache_seqlens is required when k and v are given (where to append)")
        snew = k.shape[1]
        if snew > capacity:
            raise ArgumentError(f"k holds {snew} new tokens, more than the cache capacity {capacity}")
    if block_table is None and a["cache_batch_idx"] is None and k_cache.shape[0] < b:
        raise ArgumentError(f"k_cache holds {k_cache.shape[0]} sequences for a batch of {b}; pass cache_batch_idx")
    return dict(capacity=capacity, page_size=page_size, block_table=block_table, snew=snew)


def _check_lengths(a: dict, layout: dict, checks: DeviceChecks, knew=None) -> dict:
    """``cache_seqlens`` (room for the append), ``cache_batch_idx`` (rows in range, none repeated
    when appending), ``cache_leftpad`` (<= the lengths): int32 tensors, and the keys of the
    device-read numbers (``seq_min``, ``seq_max``, ``pad_max``)."""
    q, k_cache = a["q"], a["k_cache"]
    b = q.shape[0]
    capacity, snew, paged = layout["capacity"], layout["snew"], layout["block_table"] is not None
    if a["cache_seqlens"] is None:
        seqlens = torch.full((b,), capacity, dtype=torch.int32, device=q.device)
    else:
        seqlens = check_lengths("cache_seqlens", a["cache_seqlens"], b, device=q.device, int32_only=True, checks=False)

    def overflow() -> str:
        if int(seqlens.max()) > capacity or int(seqlens.min()) < 0:
            return range_message("cache_seqlens", seqlens, 0, capacity)
        return (
            f"cache overflow: cache_seqlens {seqlens.tolist()} + {snew} new tokens exceeds the cache "
            f"capacity {capacity}" + (" (block_table)" if paged else "")
        )

    if knew is None:  # one aminmax serves the range, the overflow and the host numbers
        end_min, end_max = checks.in_range(seqlens + snew, snew, capacity, overflow)
    else:  # varlen new keys (FlashAttention 3's cu_seqlens_k_new): knew[b] of them in row b

        def overflow() -> str:
            if int(seqlens.max()) > capacity or int(seqlens.min()) < 0:
                return range_message("cache_seqlens", seqlens, 0, capacity)
            return (
                f"cache overflow: cache_seqlens {seqlens.tolist()} + new tokens {knew.tolist()} "
                f"(cu_seqlens_k_new) exceeds the cache capacity {capacity}"
            )

        checks.in_range(seqlens, 0, capacity, overflow)
        end_min, end_max = checks.in_range(seqlens + knew, 0, capacity, overflow)
    batch_rows = None
    if a["cache_batch_idx"] is not None:
        batch_rows = _check_batch_rows(a, k_cache.shape[0], checks)
    leftpad = pad_max = None
    if a["cache_leftpad"] is not None:
        leftpad = check_lengths("cache_leftpad", a["cache_leftpad"], b, device=q.device, int32_only=True, checks=False)
        _, pad_max = checks.in_range(leftpad, 0, None, lambda: range_message("cache_leftpad", leftpad, 0, None))
        checks.in_range(
            leftpad - seqlens,
            None,
            0,
            lambda: f"cache_leftpad must be <= cache_seqlens, got {leftpad.tolist()} > {seqlens.tolist()}",
        )
    return dict(
        seqlens=seqlens, batch_rows=batch_rows, leftpad=leftpad, end_min=end_min, end_max=end_max, pad_max=pad_max
    )


def _check_batch_rows(a: dict, rows: int, checks: DeviceChecks) -> torch.Tensor:
    """``cache_batch_idx``: int32 ``(batch,)`` in ``[0, rows)``, no row twice when k/v are appended."""
    b = a["q"].shape[0]
    batch_rows = check_lengths(
        "cache_batch_idx", a["cache_batch_idx"], b, high=rows - 1, device=a["q"].device, int32_only=True, checks=checks
    )
    if a["k"] is not None and b > 1:
        checks.require(
            (batch_rows.sort().values.diff() != 0).all(),
            lambda: f"cache_batch_idx must not repeat a cache row when k/v are appended, got {batch_rows.tolist()}",
        )
    return batch_rows


def _check_rotary(a: dict, layout: dict) -> int:
    """The rotary tables' shapes; returns ``rotary_dim`` (0 without rotary)."""
    cos, sin = a["rotary_cos"], a["rotary_sin"]
    if cos is None:
        return 0
    d, capacity = a["q"].shape[3], layout["capacity"]
    if cos.shape != sin.shape:
        raise ArgumentError(
            f"rotary_cos and rotary_sin must have the same shape, got {tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    rotary_dim = 2 * cos.shape[1]
    if rotary_dim == 0 or rotary_dim > d or rotary_dim % 16:
        raise ArgumentError(
            f"rotary_dim = 2 * rotary_cos.shape[1] = {rotary_dim} must be a positive multiple of 16 and <= head dim {d}"
        )
    if cos.shape[0] < capacity:
        raise ArgumentError(f"rotary_cos must have at least {capacity} rows (the cache capacity), got {cos.shape[0]}")
    # New keys rotate at cache_seqlens + t < capacity: inside the table. Queries rotate at
    # cache_seqlens + i (causal or local) or all at cache_seqlens, and may pass its end: those rows
    # rotate by the identity, as FlashAttention's masked table loads give (rotary.apply_rotary).
    return rotary_dim


def _check_scales(a: dict, layout: dict, per_token_scales: bool, checks: DeviceChecks, headdim_qv: int = 0) -> dict:
    """The softmax scale, softcap, ALiBi slopes, learnable sinks, ``num_splits`` and the fp8 (or
    per-token int8) descales, as :class:`KVCacheCall`'s fields."""
    q = a["q"]
    b, _, h, d = q.shape
    alibi_slopes = a["alibi_slopes"]
    if alibi_slopes is not None:
        alibi_slopes = check_alibi_slopes(alibi_slopes, b, h, checks)
        if alibi_slopes.device != q.device:
            raise ArgumentError(f"alibi_slopes must be on q's device {q.device}, got {alibi_slopes.device}")
    sink = None if a["learnable_sink"] is None else check_sink(a["learnable_sink"], h, q.device, checks)
    k_descale, v_descale = a["k_descale"], a["v_descale"]
    scale_mode = check_cache_descales(
        q,
        a["k_cache"],
        a["v_cache"],
        k_descale,
        v_descale,
        batch=b,
        paged=layout["block_table"] is not None,
        per_token=per_token_scales,
        checks=checks,
    )
    return dict(
        scale=softmax_scale_for(d + headdim_qv, a["softmax_scale"]),  # FA3: (d + dv) ** -0.5 with qv
        softcap=check_softcap(a["softcap"]),
        alibi_slopes=alibi_slopes,
        sink=sink,
        num_splits=check_num_splits(a["num_splits"]),
        scale_mode=scale_mode,
        k_descale=k_descale if scale_mode != SCALE_NONE else None,
        v_descale=v_descale if scale_mode != SCALE_NONE else None,
    )
