"""``flash_attn_with_kvcache`` with FlashAttention's signature and semantics (notebook 08).

Built from the pieces of notebooks 01-07: the append of new keys/values into the cache (02, 06),
rotary embeddings, bottom-right masks per sequence (01), the Triton decode kernel over a
contiguous or paged cache (05, 06) with split-KV (07), or the PyTorch path.

Differences from FlashAttention, all deliberate: fp32 is accepted (CPU); any page size works
(FA2 needs a multiple of 256); ``cache_batch_idx`` must not repeat an index when ``k`` is given
(FA leaves the result undefined); ``backend=`` picks the implementation. With ALiBi and
``causal=True`` the returned LSE uses the documented bias ``-slope * |i + sk - sq - j|``;
FlashAttention's kernel adds ``slope * j`` instead, which gives the same output but shifts its
LSE by a per-row constant.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import runtime
from .quant import quantize_fp8
from .reference import attention_core
from .rotary import apply_rotary
from .validation import (
    ArgumentError,
    check_alibi_slopes,
    check_block_table,
    check_bool,
    check_cache_descales,
    check_cache_shapes,
    check_lengths,
    check_num_splits,
    check_same,
    check_softcap,
    check_tensor,
    normalize_window,
    softmax_scale_for,
)

BACKENDS = runtime.BACKENDS
CACHE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class CacheCall:
    """Everything ``flash_attn_with_kvcache`` needs, checked and normalised before any write."""

    capacity: int  # keys a sequence can hold (block_table columns x page size)
    seqlens: torch.Tensor  # int32 (batch,) cached tokens before the append
    snew: int  # new tokens appended per sequence
    batch_rows: torch.Tensor | None  # int32 (batch,) cache row per sequence
    leftpad: torch.Tensor | None  # int32 (batch,) first valid cache row
    block_table: torch.Tensor | None  # int32 (batch, max_blocks), contiguous
    alibi_slopes: torch.Tensor | None
    rotary_dim: int
    scale: float
    softcap: float
    window: tuple[int, int]  # causal folded in, sides >= capacity made infinite
    is_causal: bool  # after normalisation: window == (-1, 0)
    is_local: bool  # a window other than plain causal
    num_splits: int
    backend: str  # "triton" or "torch"
    descales: tuple | None = None  # fp8 cache: (k_descale, v_descale) fp32 (batch, nheads_k)


def _validate(
    q,
    k_cache,
    v_cache,
    k,
    v,
    rotary_cos,
    rotary_sin,
    cache_seqlens,
    cache_batch_idx,
    cache_leftpad,
    block_table,
    softmax_scale,
    causal,
    window_size,
    softcap,
    rotary_interleaved,
    alibi_slopes,
    num_splits,
    return_softmax_lse,
    backend,
    k_descale=None,
    v_descale=None,
) -> CacheCall:
    """Check every argument before anything is written; return the normalised call."""
    check_tensor("q", q, ndim=4, dtypes=CACHE_DTYPES)
    check_tensor("k_cache", k_cache, ndim=4, dtypes=CACHE_DTYPES + (torch.float8_e4m3fn,))
    check_tensor("v_cache", v_cache, ndim=4, dtypes=CACHE_DTYPES + (torch.float8_e4m3fn,))
    tensors = {"q": q}
    if (k is None) != (v is None):
        raise ArgumentError("k and v must be given together (both or neither)")
    if k is not None:
        check_tensor("k", k, ndim=4)
        check_tensor("v", v, ndim=4)
        tensors.update(k=k, v=v)
    if (rotary_cos is None) != (rotary_sin is None):
        raise ArgumentError("rotary_cos and rotary_sin must be given together")
    if rotary_cos is not None:
        if k is None:
            raise ArgumentError("rotary_cos/rotary_sin need new keys k and v (rotary is applied on append)")
        check_tensor("rotary_cos", rotary_cos, ndim=2)
        check_tensor("rotary_sin", rotary_sin, ndim=2)
        tensors.update(rotary_cos=rotary_cos, rotary_sin=rotary_sin)
    check_same(tuple(tensors), tuple(tensors.values()), "dtype")
    tensors.update(k_cache=k_cache, v_cache=v_cache)
    check_same(tuple(tensors), tuple(tensors.values()), "device")
    check_bool("rotary_interleaved", rotary_interleaved)
    check_bool("return_softmax_lse", return_softmax_lse)
    b, sq, h, d = q.shape
    if b == 0:
        raise ArgumentError("q must have batch size >= 1, got 0")
    if sq == 0:
        raise ArgumentError("q must have seqlen_q >= 1, got 0")
    check_cache_shapes(q, k_cache, v_cache)
    hk = k_cache.shape[2]
    if k_cache.shape[0] == 0 or k_cache.shape[1] == 0:
        raise ArgumentError(f"k_cache must hold at least one sequence and one row, got {tuple(k_cache.shape)}")
    if block_table is not None:
        if cache_batch_idx is not None:
            raise ArgumentError("cache_batch_idx cannot be used with block_table (paged KV cache)")
        if cache_leftpad is not None:
            raise ArgumentError("cache_leftpad cannot be used with block_table (paged KV cache)")
        block_table = check_block_table(block_table, b, k_cache.shape[0])
        capacity = block_table.shape[1] * k_cache.shape[1]
    else:
        capacity = k_cache.shape[1]
    snew = 0
    if k is not None:
        if k.shape != v.shape:
            raise ArgumentError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
        if k.shape[0] != b or k.shape[2] != hk or k.shape[3] != d:
            raise ArgumentError(f"k must have shape ({b}, seqlen_new, {hk}, {d}), got {tuple(k.shape)}")
        if cache_seqlens is None:
            raise ArgumentError("cache_seqlens is required when k and v are given (where to append)")
        snew = k.shape[1]
    seqlens = check_lengths(
        "cache_seqlens",
        capacity if cache_seqlens is None else cache_seqlens,
        b,
        high=capacity,
        device=q.device,
        int32_only=True,
    )
    if snew and int(seqlens.max()) + snew > capacity:
        raise ArgumentError(
            f"cache overflow: cache_seqlens {seqlens.tolist()} + {snew} new tokens exceeds the cache "
            f"capacity {capacity}" + (" (block_table)" if block_table is not None else "")
        )
    batch_rows = None
    if cache_batch_idx is not None:
        batch_rows = check_lengths(
            "cache_batch_idx", cache_batch_idx, b, high=k_cache.shape[0] - 1, device=q.device, int32_only=True
        )
        if k is not None and batch_rows.unique().numel() != b:
            raise ArgumentError(
                f"cache_batch_idx must not repeat a cache row when k/v are appended, got {batch_rows.tolist()}"
            )
    elif block_table is None and k_cache.shape[0] < b:
        raise ArgumentError(f"k_cache holds {k_cache.shape[0]} sequences for a batch of {b}; pass cache_batch_idx")
    leftpad = None
    if cache_leftpad is not None:
        leftpad = check_lengths("cache_leftpad", cache_leftpad, b, device=q.device, int32_only=True)
        if bool((leftpad > seqlens).any()):
            raise ArgumentError(f"cache_leftpad must be <= cache_seqlens, got {leftpad.tolist()} > {seqlens.tolist()}")
    window = normalize_window(window_size, causal, seqlen_k=capacity)
    is_causal = window[0] < 0 and window[1] == 0
    is_local = (window[0] >= 0 or window[1] >= 0) and not is_causal
    rotary_dim = 0
    if rotary_cos is not None:
        if rotary_cos.shape != rotary_sin.shape:
            raise ArgumentError(
                f"rotary_cos and rotary_sin must have the same shape, got {tuple(rotary_cos.shape)} "
                f"and {tuple(rotary_sin.shape)}"
            )
        rotary_dim = 2 * rotary_cos.shape[1]
        if rotary_dim == 0 or rotary_dim > d or rotary_dim % 16:
            raise ArgumentError(
                f"rotary_dim = 2 * rotary_cos.shape[1] = {rotary_dim} must be a positive multiple of "
                f"16 and <= head dim {d}"
            )
        if rotary_cos.shape[0] < capacity:
            raise ArgumentError(
                f"rotary_cos must have at least {capacity} rows (the cache capacity), got {rotary_cos.shape[0]}"
            )
        last_query = int(seqlens.max()) + (sq - 1 if (is_causal or is_local) else 0)
        if last_query >= rotary_cos.shape[0]:
            raise ArgumentError(
                f"rotary_cos has {rotary_cos.shape[0]} rows but queries sit at positions up to "
                f"{last_query} (cache_seqlens + seqlen_q - 1)"
            )
    scale = softmax_scale_for(d, softmax_scale)
    softcap = check_softcap(softcap)
    if alibi_slopes is not None:
        alibi_slopes = check_alibi_slopes(alibi_slopes, b, h)
        if alibi_slopes.device != q.device:
            raise ArgumentError(f"alibi_slopes must be on q's device {q.device}, got {alibi_slopes.device}")
    num_splits = check_num_splits(num_splits)
    fp8 = check_cache_descales(
        q, k_cache, v_cache, k_descale, v_descale, batch=b, paged=block_table is not None, per_token=False
    )
    backend = runtime.resolve_backend(backend, q.device)
    return CacheCall(
        capacity,
        seqlens,
        snew,
        batch_rows,
        leftpad,
        block_table,
        alibi_slopes,
        rotary_dim,
        scale,
        softcap,
        window,
        is_causal,
        is_local,
        num_splits,
        backend,
        (k_descale, v_descale) if fp8 else None,
    )


def _append(k_cache, v_cache, k, v, seqlens, batch_rows, block_table):
    """Write k[b, t], v[b, t] at row seqlens[b] + t of each sequence's cache (contiguous row
    ``batch_rows[b]`` or through ``block_table``). Nothing else changes."""
    b, snew = k.shape[:2]
    pos = seqlens.long()[:, None] + torch.arange(snew, device=k.device)[None, :]  # (b, snew)
    if block_table is not None:
        page = k_cache.shape[1]
        blocks = block_table.long().gather(1, pos // page)
        k_cache[blocks, pos % page] = k
        v_cache[blocks, pos % page] = v
    else:
        rows = (batch_rows if batch_rows is not None else torch.arange(b, device=k.device)).long()
        rows = rows[:, None].expand(b, snew)
        k_cache.index_put_((rows, pos), k)
        v_cache.index_put_((rows, pos), v)


_WORKSPACE: dict = {}


def _workspace(name: str, shape, dtype, device) -> torch.Tensor:
    """A scratch tensor of ``shape`` reused across calls (grown when too small), like
    FlashAttention's workspace: a fresh multi-MB allocation per call costs more in page faults
    than the copy into it. Not shared between threads."""
    numel = 1
    for n in shape:
        numel *= n
    key = (name, dtype, torch.device(device))
    buf = _WORKSPACE.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype, device=device)
        _WORKSPACE[key] = buf
    return buf[:numel].view(shape)


class _PagedHeads:
    """The pages of a paged pool ``(num_blocks, page, nheads_k, headdim)`` holding the first
    ``used`` rows of each sequence, read one KV head at a time: ``head(j)`` gathers head ``j``
    into a reused workspace ``(batch, pages * page, headdim)``, small enough to stay in cache
    while the core's matmul reads it (gathering all heads at once costs a second pass over
    memory). Rows past a sequence's end may hold anything: the attention core never reads them.
    ``shape`` is that of the gathered cache, ``(batch, pages * page, nheads_k, headdim)``."""

    def __init__(self, name: str, pool: torch.Tensor, block_table: torch.Tensor, used: int):
        nb, page, hk, d = pool.shape
        pages = max(1, -(-used // page))
        self.name, self.pool = name, pool
        self.blocks = block_table[:, :pages].reshape(-1).long()
        self.shape = (block_table.shape[0], pages * page, hk, d)
        # Pool rows (block * page + slot) in sequence order: one 2-D row gather per head is the
        # fastest copy, possible when a head's pages can be viewed as one (rows, headdim) matrix.
        self.flat = pool.stride(0) == page * pool.stride(1)
        if self.flat:
            self.rows = (self.blocks[:, None] * page + torch.arange(page, device=pool.device)).reshape(-1)

    def head(self, j: int) -> torch.Tensor:
        b, s, _, d = self.shape
        out = _workspace(self.name, (b * s, d), self.pool.dtype, self.pool.device)
        part = self.pool[:, :, j]  # (num_blocks, page, headdim)
        if self.flat:
            torch.index_select(part.reshape(-1, d), 0, self.rows, out=out)
        else:
            torch.index_select(part, 0, self.blocks, out=out.view(-1, part.shape[1], d))
        return out.view(b, s, d)


class _Descaled:
    """An fp8 cache read one KV head at a time as fp32 real values, ``stored * descale[b, j]``
    (``descale`` ``(batch, nheads_k)``); ``shape`` is the cache's."""

    def __init__(self, cache, descale: torch.Tensor):
        self.cache, self.descale, self.shape = cache, descale, cache.shape

    def head(self, j: int) -> torch.Tensor:
        part = self.cache.head(j) if hasattr(self.cache, "head") else self.cache[:, :, j]
        return part.float() * self.descale[:, j, None, None]


def attention_over_cache_torch(q, k_cache, v_cache, call: CacheCall, ends: torch.Tensor):
    """The PyTorch path: :func:`flashkv_edu.reference.attention_core` over each sequence's keys
    ``[leftpad, ends)``, read in place from a contiguous cache, or gathered from a paged pool
    (only the pages that hold valid keys, one KV head at a time). Computed in fp32. Returns ``(out, lse)``."""
    b = q.shape[0]
    used = int(ends.max())
    start = call.leftpad if call.leftpad is not None else torch.zeros_like(ends)
    if call.block_table is not None:
        k_dense = _PagedHeads("k", k_cache, call.block_table, used)
        v_dense = _PagedHeads("v", v_cache, call.block_table, used)
    elif call.batch_rows is not None:
        k_dense, v_dense = k_cache[call.batch_rows.long(), :used], v_cache[call.batch_rows.long(), :used]
    else:
        k_dense, v_dense = k_cache[:b, :used], v_cache[:b, :used]
    if call.descales is not None:
        k_dense, v_dense = _Descaled(k_dense, call.descales[0]), _Descaled(v_dense, call.descales[1])
    return attention_core(
        q,
        k_dense,
        v_dense,
        scale=call.scale,
        window=call.window,
        softcap=call.softcap,
        alibi_slopes=call.alibi_slopes,
        start=start,
        end=ends,
        compute_dtype=torch.float32,
    )


def flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens=None,
    cache_batch_idx=None,
    cache_leftpad=None,
    block_table=None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    rotary_interleaved=True,
    alibi_slopes=None,
    num_splits=0,
    return_softmax_lse=False,
    *,
    k_descale=None,
    v_descale=None,
    backend="auto",
):
    """Attention of ``q`` over a KV cache, appending ``k``/``v`` first, as FlashAttention's
    ``flash_attn_with_kvcache``.

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``, fp16/bf16 (fp32 accepted too).
        k_cache, v_cache: ``(batch_cache, capacity, nheads_k, headdim)``, or with ``block_table``
            a paged pool ``(num_blocks, page_block_size, nheads_k, headdim)``. Updated in place.
        k, v: optional new keys/values ``(batch, seqlen_new, nheads_k, headdim)``, written at rows
            ``cache_seqlens[b] .. cache_seqlens[b] + seqlen_new - 1`` (after rotary on k).
        rotary_cos, rotary_sin: ``(seqlen_ro >= capacity, rotary_dim / 2)``; rotary_dim a multiple
            of 16. New keys rotate at positions ``cache_seqlens + t``; queries at
            ``cache_seqlens + i`` when causal or local, else all at ``cache_seqlens``.
        cache_seqlens: int or int32 ``(batch,)``: cached tokens before the append, left padding
            included. **Not** modified; the caller advances it. None: the whole capacity.
        cache_batch_idx: int32 ``(batch,)`` cache row of each sequence (not with ``block_table``).
        cache_leftpad: int32 ``(batch,)`` first valid cache row (not with ``block_table``).
        block_table: int32 ``(batch, max_blocks_per_seq)``; any page size.
        softmax_scale: default ``headdim ** -0.5``.
        causal, window_size: bottom-right aligned masks over the ``cache_seqlens - cache_leftpad +
            seqlen_new`` valid keys; ``(-1, -1)`` = no window, a W-token window is ``(W - 1, 0)``.
        softcap: ``> 0`` caps logits as ``softcap * tanh(logit / softcap)``.
        rotary_interleaved: True: GPT-J pairs ``(2m, 2m+1)``; False: GPT-NeoX halves.
        alibi_slopes: fp32 ``(nheads,)`` or ``(batch, nheads)``.
        num_splits: 0 = FlashAttention 2's heuristic (on the present GPU, or as if on an H100),
            1 = no split, up to 128.
        return_softmax_lse: also return the fp32 natural-log LSE ``(batch, nheads, seqlen_q)``.
        k_descale, v_descale: fp32 ``(batch, nheads_k)``, required with (and only with) an fp8
            e4m3 ``k_cache``/``v_cache``: the real value of a cached element is ``stored *
            descale[b, kv_head]``, as in FlashAttention 3. New ``k``/``v`` (in q's dtype) are
            quantized on append with the same descales, ``e4m3(k / descale)`` saturating at
            +-448. Unlike FA3 (sm90 only, q, k and v all fp8, bf16 output) q stays in its own
            dtype, the output is in q's dtype, any device works, and there is no
            ``q_descale``. Integer caches go through :class:`flashkv_edu.quant.QuantizedKVCache`.
        backend: ``"auto"`` (default): the fastest correct path on q's device, compiled Triton
            for a CUDA tensor, PyTorch otherwise; ``"triton"``: the kernels (through Triton's
            interpreter on a CPU, slow but exact, as notebooks 05-07 use them); ``"torch"``.

    Returns:
        ``out`` ``(batch, seqlen_q, nheads, headdim)`` in q's dtype, and ``softmax_lse`` with
        ``return_softmax_lse``. A row that sees no key gives 0 and LSE +inf.

    Raises :class:`~flashkv_edu.validation.ArgumentError` (a ``ValueError``) or
    :class:`~flashkv_edu.validation.ArgumentTypeError` (a ``TypeError``), both also
    ``RuntimeError`` as FlashAttention's errors are, naming the argument, before any cache is
    touched: a call that fails changes nothing. Index tensors may be non-contiguous views.
    """
    call = _validate(
        q,
        k_cache,
        v_cache,
        k,
        v,
        rotary_cos,
        rotary_sin,
        cache_seqlens,
        cache_batch_idx,
        cache_leftpad,
        block_table,
        softmax_scale,
        causal,
        window_size,
        softcap,
        rotary_interleaved,
        alibi_slopes,
        num_splits,
        return_softmax_lse,
        backend,
        k_descale,
        v_descale,
    )
    b, sq, h, d = q.shape
    # Everything is checked: from here on nothing can fail on the caller's input.
    if k is not None:
        if call.rotary_dim:
            positions = call.seqlens.long()[:, None] + torch.arange(call.snew, device=q.device)[None, :]
            k = apply_rotary(k, rotary_cos, rotary_sin, positions, interleaved=rotary_interleaved)
        if call.descales is not None:
            k, v = quantize_fp8(k, call.descales[0]), quantize_fp8(v, call.descales[1])
        _append(k_cache, v_cache, k, v, call.seqlens, call.batch_rows, call.block_table)
    if call.rotary_dim:
        offsets = torch.arange(sq, device=q.device)[None, :] if (call.is_causal or call.is_local) else 0
        positions = call.seqlens.long()[:, None] + offsets
        q = apply_rotary(q, rotary_cos, rotary_sin, positions.expand(b, sq), interleaved=rotary_interleaved)
    ends = (call.seqlens + call.snew).to(torch.int32)
    if call.backend == "triton":
        from .kernels.decode import decode_attention_triton
        from .split import choose_num_splits, gpu_for

        splits = call.num_splits or choose_num_splits(
            b,
            h,
            k_cache.shape[2],
            sq,
            call.capacity,
            d,
            gpu_for(q.device),
            alibi=call.alibi_slopes is not None,
            local=call.is_local,
        )
        out, lse = decode_attention_triton(
            q,
            k_cache,
            v_cache,
            ends,
            cache_leftpad=call.leftpad,
            cache_batch_idx=call.batch_rows,
            block_table=call.block_table,
            softmax_scale=call.scale,
            window_size=call.window,
            softcap=call.softcap,
            alibi_slopes=call.alibi_slopes,
            num_splits=splits,
            return_lse=True,
            k_descale=None if call.descales is None else call.descales[0],
            v_descale=None if call.descales is None else call.descales[1],
        )
    else:
        out, lse = attention_over_cache_torch(q, k_cache, v_cache, call, ends)
    return (out, lse) if return_softmax_lse else out
