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

import torch

from . import runtime
from .rotary import apply_rotary
from .validation import (
    check_alibi_slopes,
    check_block_table,
    check_cache_shapes,
    check_lengths,
    check_positive,
    check_same,
    check_tensor,
    check_window,
)

BACKENDS = ("auto", "triton", "torch")


def _check_int32(name, t, shape):
    check_tensor(name, t)
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _validate(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
              block_table, softmax_scale, window_size, softcap, alibi_slopes, num_splits, backend):
    """Check every argument before anything is written. Returns the normalised pieces."""
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    check_tensor("q", q, ndim=4, dtypes=dtypes)
    check_tensor("k_cache", k_cache, ndim=4, dtypes=dtypes)
    check_tensor("v_cache", v_cache, ndim=4, dtypes=dtypes)
    tensors = {"q": q, "k_cache": k_cache, "v_cache": v_cache}
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (both or neither)")
    if k is not None:
        check_tensor("k", k, ndim=4)
        check_tensor("v", v, ndim=4)
        tensors.update(k=k, v=v)
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if rotary_cos is not None:
        if k is None:
            raise ValueError("rotary_cos/rotary_sin need new keys k and v (rotary is applied on append)")
        check_tensor("rotary_cos", rotary_cos, ndim=2)
        check_tensor("rotary_sin", rotary_sin, ndim=2)
        tensors.update(rotary_cos=rotary_cos, rotary_sin=rotary_sin)
    check_same(tuple(tensors), tuple(tensors.values()), "dtype")
    check_same(tuple(tensors), tuple(tensors.values()), "device")
    b, sq, h, d = q.shape
    if b == 0:
        raise ValueError("q must have batch size > 0")
    check_cache_shapes(q, k_cache, v_cache)
    hk = k_cache.shape[2]
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must be contiguous in the last dimension (they are updated in place)")
    if block_table is not None:
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx cannot be used with block_table (paged KV cache)")
        if cache_leftpad is not None:
            raise ValueError("cache_leftpad cannot be used with block_table (paged KV cache)")
        check_block_table(block_table, b, k_cache.shape[0])
        capacity = block_table.shape[1] * k_cache.shape[1]
    else:
        capacity = k_cache.shape[1]
    snew = 0
    if k is not None:
        if k.shape != v.shape:
            raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
        if k.shape[0] != b or k.shape[2] != hk or k.shape[3] != d:
            raise ValueError(f"k must have shape ({b}, seqlen_new, {hk}, {d}), got {tuple(k.shape)}")
        if cache_seqlens is None:
            raise ValueError("cache_seqlens is required when k and v are given (where to append)")
        snew = k.shape[1]
    if cache_seqlens is None:
        seqlens = torch.full((b,), capacity, dtype=torch.int32, device=q.device)
    elif isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        seqlens = check_lengths("cache_seqlens", cache_seqlens, b, high=capacity, device=q.device)
    else:
        _check_int32("cache_seqlens", cache_seqlens, (b,))
        seqlens = check_lengths("cache_seqlens", cache_seqlens, b, high=capacity, device=q.device)
    if snew and int(seqlens.max()) + snew > capacity:
        raise ValueError(f"cache overflow: cache_seqlens {seqlens.tolist()} + {snew} new tokens exceeds the "
                         f"cache capacity {capacity}" + (" (block_table)" if block_table is not None else ""))
    batch_rows = None
    if cache_batch_idx is not None:
        _check_int32("cache_batch_idx", cache_batch_idx, (b,))
        batch_rows = check_lengths("cache_batch_idx", cache_batch_idx, b, high=k_cache.shape[0] - 1, device=q.device)
        if k is not None and batch_rows.unique().numel() != b:
            raise ValueError(f"cache_batch_idx must not repeat a cache row when k/v are appended, "
                             f"got {batch_rows.tolist()}")
    elif block_table is None and k_cache.shape[0] < b:
        raise ValueError(f"k_cache holds {k_cache.shape[0]} sequences for a batch of {b}; pass cache_batch_idx")
    leftpad = None
    if cache_leftpad is not None:
        _check_int32("cache_leftpad", cache_leftpad, (b,))
        leftpad = check_lengths("cache_leftpad", cache_leftpad, b, device=q.device)
        if bool((leftpad > seqlens).any()):
            raise ValueError(f"cache_leftpad must be <= cache_seqlens, got {leftpad.tolist()} > {seqlens.tolist()}")
    rotary_dim = 0
    if rotary_cos is not None:
        if rotary_cos.shape != rotary_sin.shape:
            raise ValueError("rotary_cos and rotary_sin must have the same shape")
        rotary_dim = 2 * rotary_cos.shape[1]
        if rotary_dim > d or rotary_dim % 16:
            raise ValueError(f"rotary_dim = 2 * rotary_cos.shape[1] = {rotary_dim} must be a multiple of 16 and "
                             f"<= head dim {d}")
        if rotary_cos.shape[0] < capacity:
            raise ValueError(f"rotary_cos must have at least {capacity} rows (the cache capacity), "
                             f"got {rotary_cos.shape[0]}")
    left, right = check_window(window_size)
    if softmax_scale is not None:
        check_positive("softmax_scale", softmax_scale)
    check_positive("softcap", softcap, allow_zero=True)
    if alibi_slopes is not None:
        check_alibi_slopes(alibi_slopes, b, h)
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or not 0 <= num_splits <= 128:
        raise ValueError(f"num_splits must be an int in [0, 128] (0 = heuristic), got {num_splits!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        runtime.require_triton()
    return capacity, seqlens, snew, batch_rows, leftpad, rotary_dim, (left, right)


def _append(k_cache, v_cache, k, v, seqlens, batch_rows, block_table):
    """Write k[b, t], v[b, t] at row seqlens[b] + t of each sequence's cache (contiguous row
    ``batch_rows[b]`` or through ``block_table``). Nothing else changes."""
    b, snew = k.shape[:2]
    pos = seqlens.long()[:, None] + torch.arange(snew, device=k.device)[None, :]         # (b, snew)
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


def _dense_cache(cache, batch_rows, block_table):
    """Each sequence's cache as a contiguous ``(batch, capacity, nheads_k, headdim)`` tensor."""
    if block_table is not None:
        from .paged import gather_paged

        return gather_paged(cache, block_table)
    if batch_rows is not None:
        return cache[batch_rows.long()]
    return cache


def attention_over_cache_torch(q, k_dense, v_dense, seqlens_end, leftpad, softmax_scale, window, softcap,
                               alibi_slopes):
    """The PyTorch path: attention of q ``(b, sq, h, d)`` over dense caches ``(b, S, h_k, d)``
    with valid keys ``[leftpad, seqlens_end)``. Each KV head's group of query heads is one
    batched matmul over that head's keys, read in place; computed in fp32 (fp64 stays fp64).
    Returns ``(out, lse)``."""
    from .reference import alibi_bias, key_visibility

    b, sq, h, d = q.shape
    S, hk = k_dense.shape[1], k_dense.shape[2]
    g = h // hk
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    # Rows of one KV head's group are (query head, query token) pairs: one matmul per KV head,
    # reading that head's keys in place (no copy of the cache).
    qf = (q.to(ct) * scale).view(b, sq, hk, g, d).permute(0, 2, 3, 1, 4).reshape(b, hk, g * sq, d)
    kf, vf = k_dense.to(ct), v_dense.to(ct)                                      # (b, S, hk, d)
    z = torch.stack([torch.bmm(qf[:, j], kf[:, :, j].transpose(1, 2)) for j in range(hk)], 1)
    z = z.view(b, hk, g, sq, S)
    if softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    if alibi_slopes is not None:
        bias = alibi_bias(alibi_slopes, sq, S, seqlens_k=seqlens_end, leftpad_k=leftpad, batch=b, dtype=ct)
        z = z + bias.view(b, hk, g, sq, S)
    keep = key_visibility(sq, S, window_size=window, seqlens_k=seqlens_end,
                          leftpad_k=leftpad if leftpad is not None else 0, batch=b, device=q.device)
    z.masked_fill_(~keep[:, None, None], float("-inf"))
    lse = torch.logsumexp(z, dim=-1)
    empty = torch.isneginf(lse)
    p = torch.exp(z - lse.masked_fill(empty, 0.0)[..., None]).view(b, hk, g * sq, S)
    out = torch.stack([torch.bmm(p[:, j], vf[:, :, j]) for j in range(hk)], 1).view(b, hk, g, sq, d)
    out = out.permute(0, 3, 1, 2, 4).reshape(b, sq, h, d).to(q.dtype)
    lse = lse.masked_fill(empty, float("inf")).reshape(b, h, sq).float()
    return out, lse


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False,
                            *, backend="auto"):
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
        backend: ``"triton"`` (the kernels), ``"torch"`` (PyTorch), ``"auto"`` (Triton when
            installed).

    Returns:
        ``out`` ``(batch, seqlen_q, nheads, headdim)`` in q's dtype, and ``softmax_lse`` with
        ``return_softmax_lse``. A row that sees no key gives 0 and LSE +inf.

    Raises ``ValueError``/``TypeError`` naming the argument, before any cache is touched.
    """
    capacity, seqlens, snew, batch_rows, leftpad, rotary_dim, window = _validate(
        q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
        block_table, softmax_scale, window_size, softcap, alibi_slopes, num_splits, backend)
    b, sq, h, d = q.shape
    left, right = window
    if causal:
        right = 0
    # FlashAttention's normalisation, which decides where queries are rotated.
    left = -1 if left >= capacity else left
    right = -1 if right >= capacity else right
    is_causal = left < 0 and right == 0
    is_local = (left >= 0 or right >= 0) and not is_causal
    if k is not None:
        if rotary_dim:
            positions = seqlens.long()[:, None] + torch.arange(snew, device=q.device)[None, :]
            k = apply_rotary(k, rotary_cos, rotary_sin, positions, interleaved=rotary_interleaved)
        _append(k_cache, v_cache, k, v, seqlens, batch_rows, block_table)
    if rotary_dim:
        offsets = torch.arange(sq, device=q.device)[None, :] if (is_causal or is_local) else 0
        positions = seqlens.long()[:, None] + offsets
        q = apply_rotary(q, rotary_cos, rotary_sin, positions.expand(b, sq), interleaved=rotary_interleaved)
    ends = (seqlens + snew).to(torch.int32)
    use_triton = backend == "triton" or (backend == "auto" and runtime.HAS_TRITON)
    if use_triton:
        from .kernels.decode import decode_attention_triton
        from .split import GPU, H100, choose_num_splits

        splits = num_splits
        if splits == 0:
            gpu = H100
            if q.is_cuda:
                props = torch.cuda.get_device_properties(q.device)
                gpu = GPU(props.name, props.multi_processor_count, H100.hbm_bytes_per_s)
            splits = choose_num_splits(b, h, k_cache.shape[2], sq, capacity, d, gpu,
                                       alibi=alibi_slopes is not None, local=is_local)
        out, lse = decode_attention_triton(
            q, k_cache, v_cache, ends, cache_leftpad=leftpad, cache_batch_idx=batch_rows, block_table=block_table,
            softmax_scale=softmax_scale, window_size=(left, right), softcap=softcap, alibi_slopes=alibi_slopes,
            num_splits=splits, return_lse=True)
    else:
        out, lse = attention_over_cache_torch(
            q, _dense_cache(k_cache, batch_rows, block_table), _dense_cache(v_cache, batch_rows, block_table), ends,
            leftpad, softmax_scale, (left, right), softcap, alibi_slopes)
    return (out, lse) if return_softmax_lse else out
