"""Decode attention over a KV cache in Triton (notebooks 05, 06, 07).

One program per (batch x KV head, split, row tile). It serves **all** query heads that share its
KV head: the ``seqlen_q * group`` (query token, query head) pairs are packed as the rows of the
tile (row ``r`` is token ``r // group`` of head ``kv_head * group + r % group``), so each
key/value tile is read from memory once for the whole group. With a few query tokens (decode)
there is a single row tile. Keys come from a contiguous cache ``(batch_cache, capacity, nheads_k,
headdim)`` or, with ``PAGED``, from a pool of pages ``(num_blocks, page_size, nheads_k,
headdim)`` through ``block_table`` (notebook 06). With ``SPLIT`` each program covers one chunk
of the keys and writes a partial state (``out`` normalised within the chunk, ``lse``; an empty
chunk writes 0 and -inf) that the combine step of notebook 07 merges.
"""

from __future__ import annotations

import inspect

import torch

from .. import runtime
from ..call import APPEND_ARGUMENTS, DEFAULTS, KVCacheCall, check_kvcache_call
from ..runtime import tl, triton
from ..validation import SCALE_PER_HEAD as SCALE_PER_HEAD_MODE
from ..validation import SCALE_PER_TOKEN as SCALE_PER_TOKEN_MODE
from ..validation import (
    ArgumentTypeError,
    check_bool,
    check_power_of_two,
)
from .combine import combine_splits
from .common import (
    block_d,
    check_row_offsets,
    decode_block_n,
    default_warps,
    dot_in_fp32,
    next_pow2,
    output_dtype,
)

__all__ = [
    "READ_ARGUMENTS",
    "add_sink",
    "decode_attention_triton",
    "decode_kernel",
    "decode_over_cache",
    "dequantize",
    "finish_split",
    "kv_row_pointers",
    "launch_decode",
    "split_range",
    "split_size_for",
    "splits_for",
]

if runtime.HAS_TRITON:
    from .common import (
        SCALE_NONE,
        SCALE_PER_HEAD,
        SCALE_PER_TOKEN,
        e4m3_to_float,
        online_softmax_step,
        visible_key_range,
    )

    @triton.jit
    def split_range(split, split_size, seqlen_k):
        """``(lo, hi)``: split ``split`` covers keys ``[split * split_size, (split + 1) *
        split_size)`` cut at ``seqlen_k``; a split past the end is empty (``hi <= lo``)."""
        lo = split * split_size
        hi = tl.minimum(seqlen_k, lo + split_size)
        return lo, hi

    @triton.jit
    def kv_row_pointers(
        K_head, V_head, BLOCK_TABLE, b64, cache_row, pos, col_ok, stride_btb, stride_kb, stride_ks, stride_vb,
        stride_vs, page_size, PAGED: tl.constexpr,
    ):  # fmt: skip
        """Pointers to the key and value rows at absolute cache positions ``pos`` of this sequence,
        and where a per-token scale of each sits (``row``, ``slot``): cache row ``cache_row`` of a
        contiguous cache, or block ``block_table[b, pos // page]`` at ``pos % page`` of a pool."""
        if PAGED:
            row = tl.load(BLOCK_TABLE + b64 * stride_btb + pos // page_size, mask=col_ok, other=0).to(tl.int64)
            slot = pos % page_size
        else:
            row = cache_row
            slot = pos
        return K_head + row * stride_kb + slot * stride_ks, V_head + row * stride_vb + slot * stride_vs, row, slot

    @triton.jit
    def dequantize(x, scale, FP8_BITS: tl.constexpr):
        """A quantized tile's real values, ``stored * scale`` in fp32; ``FP8_BITS``: the tile holds
        e4m3 bit patterns (uint8) decoded in software (GPUs without fp8 conversion, sm_80)."""
        if FP8_BITS:
            x = e4m3_to_float(x)
        return x.to(tl.float32) * scale

    @triton.jit
    def finish_split(m_i, l_i, acc):
        """A program's partial state from its running max ``m_i``, sum ``l_i`` (``[M]``) and
        accumulator ``acc`` (``[M, D]``): ``out = acc / l_i`` and ``lse = m_i + log(l_i)``; a row
        that saw no key gives ``out = 0`` and ``lse = -inf``, so that it drops out of a combine."""
        empty = l_i == 0.0
        out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, l_i)[:, None])
        lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
        return out, lse

    @triton.jit
    def add_sink(m_i, l_i, acc, sink):
        """Fold one more logit with no value, ``sink`` (``[M]``, -inf for none), into a running
        state: the denominator grows by ``exp(sink)``; the LSE will include it."""
        m_new = tl.maximum(m_i, sink)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        return m_new, l_i * alpha + tl.exp(sink - m_safe), acc * alpha[:, None]

    @triton.jit
    def decode_kernel(
        Q, K, V, O, LSE, SEQLENS, LEFTPAD, BATCH_IDX, BLOCK_TABLE, SLOPES, SINKS, TILES, K_SCALE, V_SCALE,
        stride_qb, stride_qs, stride_qh,
        stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh,
        stride_osplit, stride_ob, stride_os, stride_oh,
        stride_lsplit, stride_lb, stride_lh,
        stride_btb, stride_sb,
        stride_ksb, stride_kss, stride_ksh,
        stride_vsb, stride_vss, stride_vsh,
        nheads_k, seqlen_q, headdim, page_size, split_size, scale, softcap, window_left, window_right, chunk,
        GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        PAGED: tl.constexpr,
        SPLIT: tl.constexpr,
        HAS_LEFTPAD: tl.constexpr,
        HAS_BATCH_IDX: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
        HAS_ALIBI: tl.constexpr,
        DOT_FP32: tl.constexpr,
        KV_SCALE: tl.constexpr = 0,
        FP8_BITS: tl.constexpr = False,
        HAS_SINK: tl.constexpr = False,
        HAS_CHUNK: tl.constexpr = False,
    ):  # fmt: skip
        """One program per (sequence x KV head, split, row tile); rows are (query token, query
        head) pairs of one KV head's group. ``KV_SCALE``: ``SCALE_NONE``, ``SCALE_PER_HEAD`` (one
        descale per sequence and KV head) or ``SCALE_PER_TOKEN`` (one scale per cached token).
        ``HAS_CHUNK``: FlashAttention 3's ``attention_chunk``, a row sees only the keys of its
        diagonal's chunk of ``chunk`` positions."""
        pid = tl.program_id(0)
        split = tl.program_id(1)
        pid_m = tl.program_id(2)
        b = pid // nheads_k
        kvh = pid % nheads_k
        # Scalar base pointers with 64-bit offsets (b * stride_kb passes 2^31 in a large cache);
        # the per-element offsets added to them stay small and 32-bit.
        b64 = b.to(tl.int64)
        start = 0
        if HAS_LEFTPAD:
            start = tl.load(LEFTPAD + b)
        sk = tl.load(SEQLENS + b) - start  # valid keys (new ones included)
        cache_row = b64
        if HAS_BATCH_IDX:
            cache_row = tl.load(BATCH_IDX + b).to(tl.int64)
        K_head = K + kvh * stride_kh
        V_head = V + kvh * stride_vh

        # The tile's rows: row r is query token r // GROUP of query head kvh * GROUP + r % GROUP.
        r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        tok = r // GROUP
        head = kvh * GROUP + r % GROUP
        dims = tl.arange(0, BLOCK_D)
        row_ok = tok < seqlen_q
        dim_ok = dims < headdim
        q_ptrs = Q + b64 * stride_qb + tok[:, None] * stride_qs + head[:, None] * stride_qh + dims[None, :]
        q = tl.load(q_ptrs, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        diag = tok + sk - seqlen_q  # bottom-right alignment
        chunk_lo = diag  # the first key of the row's chunk (HAS_CHUNK); a non-negative remainder
        if HAS_CHUNK:  # in both % conventions (C's on a GPU, numpy's floor in the interpreter)
            chunk_lo = diag - ((diag % chunk) + chunk) % chunk

        # This split's key range, narrowed to the tiles some row of this tile can see.
        lo, hi = split_range(split, split_size, sk)
        first_tok = (pid_m * BLOCK_M) // GROUP
        last_tok = tl.minimum(seqlen_q - 1, (pid_m * BLOCK_M + BLOCK_M - 1) // GROUP)
        seen_lo, seen_hi = visible_key_range(first_tok, last_tok, sk, seqlen_q, window_left, window_right, BLOCK_N)
        lo = tl.maximum(lo, seen_lo)
        hi = tl.minimum(hi, seen_hi)

        slope = tl.zeros([BLOCK_M], tl.float32)
        if HAS_ALIBI:
            slope = tl.load(SLOPES + b * stride_sb + head, mask=row_ok, other=0.0)
        k_scale = 1.0
        v_scale = 1.0
        if KV_SCALE == SCALE_PER_HEAD:  # FlashAttention 3's descales, one per (sequence, KV head)
            k_scale = tl.load(K_SCALE + b64 * stride_ksb + kvh * stride_ksh)
            v_scale = tl.load(V_SCALE + b64 * stride_vsb + kvh * stride_vsh)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        tiles = 0
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N)  # compacted key index j'
            col_ok = cols < hi
            k_rows, v_rows, row, slot = kv_row_pointers(
                K_head, V_head, BLOCK_TABLE, b64, cache_row, start + cols, col_ok, stride_btb, stride_kb, stride_ks,
                stride_vb, stride_vs, page_size, PAGED,
            )  # fmt: skip
            kv_mask = col_ok[:, None] & dim_ok[None, :]
            k = tl.load(k_rows[:, None] + dims[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_rows[:, None] + dims[None, :], mask=kv_mask, other=0.0)
            # A quantized cache is dequantized here, one tile at a time, in registers.
            if KV_SCALE == SCALE_PER_TOKEN:
                k_tok = tl.load(K_SCALE + row * stride_ksb + slot * stride_kss + kvh * stride_ksh, mask=col_ok)
                v_tok = tl.load(V_SCALE + row * stride_vsb + slot * stride_vss + kvh * stride_vsh, mask=col_ok)
                k = dequantize(k, k_tok.to(tl.float32)[:, None], FP8_BITS)
                v = dequantize(v, v_tok.to(tl.float32)[:, None], FP8_BITS)
            elif KV_SCALE == SCALE_PER_HEAD:
                k = dequantize(k, k_scale, FP8_BITS)
                v = dequantize(v, v_scale, FP8_BITS)
            if KV_SCALE != SCALE_NONE and not DOT_FP32:  # tensor cores take q's 16-bit type
                k = k.to(Q.dtype.element_ty)
                v = v.to(Q.dtype.element_ty)
            visible = row_ok[:, None] & col_ok[None, :]
            if window_right >= 0:
                visible = visible & (cols[None, :] <= diag[:, None] + window_right)
            if window_left >= 0:
                visible = visible & (cols[None, :] >= diag[:, None] - window_left)
            if HAS_CHUNK:
                in_chunk = (cols[None, :] >= chunk_lo[:, None]) & (cols[None, :] < chunk_lo[:, None] + chunk)
                visible = visible & in_chunk
            bias = -slope[:, None] * tl.abs(diag[:, None] - cols[None, :]).to(tl.float32)
            m_i, l_i, acc = online_softmax_step(
                q, k, v, m_i, l_i, acc, visible, bias, scale, softcap, HAS_SOFTCAP, HAS_ALIBI, DOT_FP32
            )
            tiles += 1

        if HAS_SINK:  # a learnable sink joins the denominator once: in split 0 (the combine merges the rest)
            sink = tl.load(SINKS + head, mask=row_ok, other=0.0)
            m_i, l_i, acc = add_sink(m_i, l_i, acc, tl.where(split == 0, sink, float("-inf")))
        out, lse = finish_split(m_i, l_i, acc)
        if not SPLIT:  # the final answer: a row that saw no key at all has LSE +inf
            lse = tl.where(lse == float("-inf"), float("inf"), lse)
        O_seq = O + split.to(tl.int64) * stride_osplit + b64 * stride_ob
        o_ptrs = O_seq + tok[:, None] * stride_os + head[:, None] * stride_oh
        tl.store(o_ptrs + dims[None, :], out.to(O.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
        LSE_seq = LSE + split.to(tl.int64) * stride_lsplit + b64 * stride_lb
        tl.store(LSE_seq + head * stride_lh + tok, lse, mask=row_ok)
        tl.store(TILES + (split * tl.num_programs(0) + pid) * tl.num_programs(2) + pid_m, tiles)


def _needs_fp8_bits(device: torch.device) -> bool:
    """Whether fp8 e4m3 must be decoded in software: GPUs before sm_89 have no conversion
    instruction (Triton refuses the type there). The interpreter converts natively."""
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) < (8, 9)


def _scale_strides(t: torch.Tensor, mode: int) -> tuple[int, int, int]:
    """(row, slot, KV head) strides of a scale tensor: ``(batch, nheads_k)`` descales have no
    slot stride; per-token scales are ``(rows, slots, nheads_k)``."""
    if mode == SCALE_PER_HEAD_MODE:
        return t.stride(0), 0, t.stride(1)
    if mode == SCALE_PER_TOKEN_MODE:
        return t.stride(0), t.stride(1), t.stride(2)
    return 0, 0, 0


def split_size_for(capacity: int, num_splits: int, block_n: int) -> int:
    """Keys per split, as FlashAttention sizes them: ``ceil(ceil(capacity / block_n) / num_splits)``
    key blocks. It counts the cache **capacity**, so short sequences leave splits empty."""
    blocks = -(-capacity // block_n)
    return -(-blocks // num_splits) * block_n


def decode_attention_triton(
    q,
    k_cache,
    v_cache,
    cache_seqlens,
    *,
    num_splits=1,
    block_n=None,
    return_lse=False,
    return_tile_counts=False,
    return_partials=False,
    **arguments,
):
    """Attention of ``q`` ``(batch, seqlen_q, nheads, headdim)`` against a KV cache, through
    `decode_kernel` (and :func:`~flashkv_edu.kernels.combine.combine_kernel` when ``num_splits > 1``).

    The arguments are ``flash_attn_with_kvcache``'s without the append (:data:`READ_ARGUMENTS`:
    ``cache_leftpad``, ``cache_batch_idx``, ``block_table``, ``softmax_scale``, ``causal``,
    ``window_size``, ``softcap``, ``alibi_slopes``, ``k_descale``, ``v_descale``,
    ``learnable_sink``), checked by the same :func:`~flashkv_edu.call.check_kvcache_call`: sequence
    ``b`` sees the keys at absolute cache rows ``[cache_leftpad[b], cache_seqlens[b])`` in cache row
    ``cache_batch_idx[b]`` (default ``b``) of a contiguous cache ``(batch_cache, capacity, nheads_k,
    headdim)``, or, with ``block_table`` ``(batch, max_blocks)`` int32, at ``k_cache[block_table[b,
    p // page], p % page]`` of a paged cache ``(num_blocks, page, nheads_k, headdim)`` (any page
    size). Masks, softcap, ALiBi and the empty-row rule are :func:`flashkv_edu.attention_ref`'s.
    ``num_splits``: 1 .. 128, or 0 for FlashAttention 2's heuristic.

    A quantized cache (notebook 09) is dequantized tile by tile inside the kernel, real value =
    stored x scale: an fp8 e4m3 or int8 cache with ``k_descale``/``v_descale`` fp32 ``(batch,
    nheads_k)`` (FlashAttention 3's descales), or an int8 cache with one scale per cached token
    and KV head, ``k_descale``/``v_descale`` of the cache's shape without the head dim.

    Returns ``out`` (q's dtype), plus fp32 ``lse`` ``(batch, nheads, seqlen_q)`` with
    ``return_lse``, plus the int32 ``(num_splits, batch * nheads_k, row tiles)`` count of key
    tiles each program visited with ``return_tile_counts``, plus the per-split states
    ``(out_partial (splits, batch, seqlen_q, nheads, headdim), lse_partial (splits, batch,
    nheads, seqlen_q))`` (fp32; empty splits 0 and -inf) with ``return_partials`` and
    ``num_splits > 1``.
    """
    for name, flag in (
        ("return_lse", return_lse),
        ("return_tile_counts", return_tile_counts),
        ("return_partials", return_partials),
    ):
        check_bool(name, flag)
    if block_n is not None:
        block_n = check_power_of_two("block_n", block_n)
    not_here = sorted(set(arguments) & {*APPEND_ARGUMENTS, "backend", "return_softmax_lse", "cache_seqlens"})
    if not_here:
        raise ArgumentTypeError(
            f"decode_attention_triton reads a cache and appends nothing; {', '.join(not_here)} belong to "
            "flash_attn_with_kvcache (the LSE is return_lse here)"
        )
    call = check_kvcache_call(
        q,
        k_cache,
        v_cache,
        cache_seqlens=cache_seqlens,
        num_splits=num_splits,
        return_softmax_lse=return_lse,
        backend="triton",
        per_token_scales=True,
        **arguments,
    )
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_row_offsets(name, t)
    out, lse, tiles, partials = launch_decode(q, k_cache, v_cache, call, block_n=block_n)
    result = [out]
    if return_lse:
        result.append(lse)
    if return_tile_counts:
        result.append(tiles)
    if return_partials and partials is not None:
        result += list(partials)
    return result[0] if len(result) == 1 else tuple(result)


# What the decode kernel's entry point takes of flash_attn_with_kvcache's keywords (call.DEFAULTS):
# everything that reads a cache, nothing that appends.
TENSORS = ("q", "k_cache", "v_cache", "cache_seqlens")
READ_ARGUMENTS = tuple(
    name
    for name in DEFAULTS
    if name not in (*APPEND_ARGUMENTS, "cache_seqlens", "num_splits", "return_softmax_lse", "backend")
)
decode_attention_triton.__signature__ = inspect.Signature(
    [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in TENSORS]
    + [
        inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d)
        for n, d in [("num_splits", 1), ("block_n", None), ("return_lse", False), ("return_tile_counts", False),
                     ("return_partials", False)] + [(n, DEFAULTS[n]) for n in READ_ARGUMENTS]
    ]
)  # fmt: skip


def decode_over_cache(q, k_cache, v_cache, call: KVCacheCall):
    """The Triton backend of ``flash_attn_with_kvcache``: ``(out, lse)`` of a checked call (keys
    already appended, q already rotated)."""
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_row_offsets(name, t)
    out, lse, _, _ = launch_decode(q, k_cache, v_cache, call)
    return out, lse


def splits_for(call: KVCacheCall) -> int:
    """The call's ``num_splits``, or FlashAttention 2's heuristic for 0 (on the present GPU, or
    as if on an H100)."""
    if call.num_splits:
        return call.num_splits
    from ..split import choose_num_splits, gpu_for

    return choose_num_splits(
        call.batch,
        call.nheads,
        call.nheads_k,
        call.seqlen_q,
        call.capacity,
        call.headdim,
        gpu_for(call.seqlens.device),
        alibi=call.alibi_slopes is not None,
        local=call.is_local,
    )


def launch_decode(q, k_cache, v_cache, call: KVCacheCall, *, block_n: int | None = None):
    """Launch :func:`decode_kernel` (and the combine) for a checked call. Returns ``(out, lse,
    tiles, partials)``: ``partials`` is ``(out_partial, lse_partial)`` with more than one split,
    else None."""
    b, sq, h, d = q.shape
    hk = call.nheads_k
    num_splits = splits_for(call)
    q = q if q.stride(-1) == 1 else q.contiguous()
    bn = decode_block_n(d) if block_n is None else block_n
    bm = max(16, min(next_pow2(sq * (h // hk)), 128 if runtime.INTERPRET else 64))
    row_tiles = triton.cdiv(sq * (h // hk), bm)
    split_size = split_size_for(call.capacity, num_splits, bn)
    dev = q.device
    dummy_i32 = torch.zeros(1, dtype=torch.int32, device=dev)
    out = torch.empty(q.shape, dtype=output_dtype(q.dtype), device=dev)
    lse = torch.empty(b, h, sq, dtype=torch.float32, device=dev)
    if num_splits == 1:
        o_buf, l_buf = out, lse
        o_split, l_split = 0, 0
    else:
        o_buf = torch.empty(num_splits, b, sq, h, d, dtype=torch.float32, device=dev)
        l_buf = torch.empty(num_splits, b, h, sq, dtype=torch.float32, device=dev)
        o_split, l_split = o_buf.stride(0), l_buf.stride(0)
    o_view = o_buf if num_splits == 1 else o_buf[0]
    l_view = l_buf if num_splits == 1 else l_buf[0]
    tiles = torch.zeros(num_splits, b * hk, row_tiles, dtype=torch.int32, device=dev)
    slopes = call.alibi_slopes if call.alibi_slopes is not None else torch.zeros(1, device=dev)
    stride_sb = slopes.stride(0) if slopes.dim() == 2 else 0
    table = call.block_table if call.paged else dummy_i32
    fp8_bits = k_cache.dtype == torch.float8_e4m3fn and _needs_fp8_bits(dev)
    if fp8_bits:
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    mode = call.scale_mode
    k_sc = call.k_descale if mode else slopes
    v_sc = call.v_descale if mode else slopes
    decode_kernel[(b * hk, num_splits, row_tiles)](
        q,
        k_cache,
        v_cache,
        o_buf,
        l_buf,
        call.ends,
        call.leftpad if call.leftpad is not None else dummy_i32,
        call.batch_rows if call.batch_rows is not None else dummy_i32,
        table,
        slopes,
        call.sink if call.sink is not None else slopes,
        tiles,
        k_sc,
        v_sc,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        o_split,
        o_view.stride(0),
        o_view.stride(1),
        o_view.stride(2),
        l_split,
        l_view.stride(0),
        l_view.stride(1),
        table.stride(0) if call.paged else 0,
        stride_sb,
        *_scale_strides(k_sc, mode),
        *_scale_strides(v_sc, mode),
        hk,
        sq,
        d,
        call.page_size or 1,
        split_size,
        call.scale,
        call.softcap if call.softcap > 0 else 1.0,
        call.window[0],
        call.window[1],
        max(call.chunk, 1),
        GROUP=h // hk,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_D=block_d(d),
        PAGED=call.paged,
        SPLIT=num_splits > 1,
        HAS_LEFTPAD=call.leftpad is not None,
        HAS_BATCH_IDX=call.batch_rows is not None,
        HAS_SOFTCAP=call.softcap > 0,
        HAS_ALIBI=call.alibi_slopes is not None,
        DOT_FP32=dot_in_fp32(q.dtype),
        KV_SCALE=mode,
        FP8_BITS=fp8_bits,
        HAS_SINK=call.sink is not None,
        HAS_CHUNK=call.chunk > 0,
        num_warps=default_warps(d),
        num_stages=2,
    )
    partials = None
    if num_splits > 1:
        partials = (o_buf, l_buf)
        out, lse = combine_splits(o_buf, l_buf, q.dtype)
    return out.to(q.dtype), lse, tiles, partials
