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

from .cache import write_kv
from .call import KVCACHE_SIGNATURE, KVCacheCall, bind_kvcache_arguments, check_kvcache_call
from .quant_codecs import quantize_fp8
from .rotary import apply_rotary
from .torch_backend import attention_over_cache
from .varlen import group_calls, pack_rows, packed_key_index, scatter_rows

__all__ = [
    "flash_attn_with_kvcache",
    "run_checked_call",
]


def flash_attn_with_kvcache(*args, **kwargs):
    """Attention of ``q`` over a KV cache, appending ``k``/``v`` first, as FlashAttention's
    ``flash_attn_with_kvcache``.

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``, fp16/bf16 (fp32 accepted too).
        k_cache, v_cache: ``(batch_cache, capacity, nheads_k, headdim)``, or with ``block_table``
            a paged pool ``(num_blocks, page_block_size, nheads_k, headdim)``. Updated in place.
            ``v_cache`` may have its own head dim ``headdim_v`` (FlashAttention 3, e.g. DeepSeek's
            MLA); the output then has it. Head dims up to 512 with ``backend="torch"``, 256 (and
            ``headdim_v == headdim``) in the Triton kernels.
        k, v: optional new keys/values ``(batch, seqlen_new, nheads_k, headdim / headdim_v)``, written at rows
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
        learnable_sink: ``(nheads,)`` fp32/fp16/bf16, one logit per query head (gpt-oss's
            ``sinks``, FlashAttention 4's ``learnable_sink``, vLLM's ``s_aux``): ``exp(sink)`` joins
            each row's softmax denominator, taking probability away from the keys. The returned
            LSE includes it (FlashAttention 4's convention; FlashMLA's excludes it), so a row
            that sees no key gives output 0 and LSE ``sink``. It equals notebook 04's
            ``merge_states((out, lse), (0, sink))``.
        backend: ``"auto"`` (default): the fastest correct path on q's device, compiled Triton
            for a CUDA tensor, PyTorch otherwise; ``"triton"``: the kernels (through Triton's
            interpreter on a CPU, slow but exact, as notebooks 05-07 use them); ``"torch"``.

    Returns:
        ``out`` ``(batch, seqlen_q, nheads, headdim_v)`` in q's dtype, and ``softmax_lse`` with
        ``return_softmax_lse``. A row that sees no key gives 0 and LSE +inf (``sink`` with a
        learnable sink).

    Raises :class:`~flashkv_edu.validation.ArgumentError` (a ``ValueError``) or
    :class:`~flashkv_edu.validation.ArgumentTypeError` (a ``TypeError``), both also
    ``RuntimeError`` as FlashAttention's errors are, naming the argument, before any cache is
    touched: a call that fails changes nothing. Index tensors may be non-contiguous views.
    """
    a = bind_kvcache_arguments("flash_attn_with_kvcache", args, kwargs)
    call = check_kvcache_call(**a)
    out, lse = run_checked_call(
        call, a["q"], a["k_cache"], a["v_cache"], a["k"], a["v"], a["rotary_cos"], a["rotary_sin"]
    )
    return (out, lse) if call.return_lse else out


# The signature, from the one argument list (call.py): help(), inspect.signature and Jupyter show it.
flash_attn_with_kvcache.__signature__ = KVCACHE_SIGNATURE


def run_checked_call(call: KVCacheCall, q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, qv=None):
    """The body of :func:`flash_attn_with_kvcache` after its check: append ``k``/``v`` (rotated,
    quantized for an fp8 cache), then attend with ``call.backend``. ``call`` must be what
    :func:`~flashkv_edu.call.check_kvcache_call` returned for exactly these tensors' shapes, dtypes
    and devices and these index tensors (a caller may reuse one call for several layers whose
    arguments agree in all of that, as :class:`flashkv_edu.hf.FlashKVCache` does within a decode
    step). Returns ``(out, lse or None)``."""
    # Everything is checked: from here on nothing can fail on the caller's input.
    if k is not None:
        _append(call, k_cache, v_cache, k, v, rotary_cos, rotary_sin)
    if not call.varlen_q:
        return _attend(call, q, qv, k_cache, v_cache, rotary_cos, rotary_sin)
    # Varlen queries: each group of sequences padded to its longest (flashkv_edu.varlen), its rows
    # written back in packed order; the LSE in FlashAttention's varlen layout (nheads, total_q).
    out = lse = None
    for sub, rows, q_lens in group_calls(call):
        o, l_ = _attend(
            sub, pack_rows(q, rows), None if qv is None else pack_rows(qv, rows), k_cache, v_cache, rotary_cos,
            rotary_sin, q_lens,
        )  # fmt: skip
        if out is None:
            out = o.new_empty(call.total_q + 1, *o.shape[2:])
            if call.return_lse:
                lse = torch.empty(call.total_q + 1, call.nheads, dtype=torch.float32, device=o.device)
        scatter_rows(out, o, rows)
        if call.return_lse:
            scatter_rows(lse, l_.transpose(1, 2), rows)
    return out[:-1], (None if lse is None else lse[:-1].transpose(0, 1))


def _append(call: KVCacheCall, k_cache, v_cache, k, v, rotary_cos, rotary_sin) -> None:
    """Write the call's new keys and values (rotated; fp8: dequantized, then quantized with the
    cache's descales) through the one write path. Varlen new keys ``(total_k_new, h_k, d)`` are
    written as that many one-token appends, each at its own sequence's position: no padding."""
    starts, rows, table = call.seqlens, call.batch_rows, call.block_table
    k_descale, v_descale = call.k_descale, call.v_descale
    base = call.seqlens if call.rotary_base is None else call.rotary_base  # rotary position of row 0
    snew, same = call.snew, None
    if call.knew is not None:
        seq, t = packed_key_index(call, k.shape[0])
        k, v, snew = k[:, None], v[:, None], 1
        starts, base = (starts.long()[seq] + t).to(torch.int32), base.long()[seq] + t
        if table is not None:
            table = table.index_select(0, seq)
        elif rows is not None:
            rows = rows.index_select(0, seq)
        else:
            rows = seq.to(torch.int32)
        if k_descale is not None:
            k_descale, v_descale = k_descale.index_select(0, seq), v_descale.index_select(0, seq)
    elif call.min_end == call.max_end:  # every row as long (host numbers): a plain slice copy
        same = call.max_end - call.snew
    if call.q_descale is not None:  # fp8 new keys: their real values, requantized below
        k, v = dequantize_per_kv_head(k, k_descale, 1), dequantize_per_kv_head(v, v_descale, 1)
    if call.rotary_dim:
        positions = base.long()[:, None] + torch.arange(snew, device=k.device)[None, :]
        k = apply_rotary(k, rotary_cos, rotary_sin, positions, interleaved=call.rotary_interleaved)
    if k_descale is not None:
        k, v = quantize_fp8(k, k_descale), quantize_fp8(v, v_descale)
    write_kv(k_cache, v_cache, k, v, starts, rows=rows, block_table=table, same_start=same)


def _attend(call: KVCacheCall, q, qv, k_cache, v_cache, rotary_cos, rotary_sin, q_lens=None):
    """Attention of a padded ``q`` ``(batch, seqlen_q, nheads, headdim)`` (fp8: dequantized here)
    over the cache, rotated first; ``q_lens``: a varlen group's rows per sequence (its rows sit
    at the bottom, rotated from their own first position). Returns ``(out, lse or None)``."""
    b, sq = call.batch, call.seqlen_q
    if call.q_descale is not None:  # FlashAttention 3's fp8 q: its real value, in bf16
        q = dequantize_per_kv_head(q, call.q_descale, call.nheads // call.nheads_k)
    if call.rotary_dim:
        base = call.seqlens if call.rotary_base is None else call.rotary_base  # position of row 0
        offsets = torch.arange(sq, device=q.device)[None, :] if (call.is_causal or call.is_local) else 0
        if q_lens is not None and not isinstance(offsets, int):  # row i sits at padded row i + shift
            offsets = (offsets - (sq - q_lens.long())[:, None]).clamp_min(0)
        positions = base.long()[:, None] + offsets
        q = apply_rotary(q, rotary_cos, rotary_sin, positions.expand(b, sq), interleaved=call.rotary_interleaved)
    if call.backend == "triton":
        from .kernels.decode import decode_over_cache

        return decode_over_cache(q, k_cache, v_cache, call)
    return attention_over_cache(q, k_cache, v_cache, call, qv=qv)


def dequantize_per_kv_head(x, descale, group: int) -> torch.Tensor:
    """``x`` ``(batch, s, heads, d)`` (fp8) times ``descale[b, head // group]``, as bf16."""
    scale = descale.repeat_interleave(group, dim=1)[:, None, :, None]
    return (x.float() * scale).to(torch.bfloat16)
