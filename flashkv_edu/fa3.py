"""FlashAttention 3's ``flash_attn_with_kvcache``, ``get_scheduler_metadata`` and ``flash_attn_combine``.

The second front door to the one checked call: the arguments are FlashAttention 3's
(``hopper/flash_attn_interface.py``), in its order and with its defaults; they are bound under the
checked call's names (:data:`~flashkv_edu.call.FA3_SIGNATURE`) and go through
:func:`~flashkv_edu.call.check_kvcache_call` and :func:`~flashkv_edu.api.run_checked_call`, the
same two steps as FlashAttention 2's front door (:func:`flashkv_edu.flash_attn_with_kvcache`).

What FlashAttention 3 does differently, and this module with it:

* ``page_table`` is FlashAttention 2's ``block_table`` (any page size); there is no ALiBi.
* varlen queries ``q`` ``(total_q, nheads, headdim)`` with ``cu_seqlens_q`` ``(batch + 1,)`` int32
  and ``max_seqlen_q``: the output is ``(total_q, nheads, headdim_v)``, the LSE ``(nheads,
  total_q)``; each sequence's mask is aligned bottom-right within it. Varlen new keys ``k``/``v``
  ``(total_k_new, nheads_k, headdim)`` with ``cu_seqlens_k_new``: sequence ``b`` appends its own
  number of keys at ``cache_seqlens[b]``.
* ``qv`` ``(batch, seqlen_q, nheads, headdim_v)`` (varlen: ``(total_q, nheads, headdim_v)``):
  logits ``scale * (q . k + qv . v)``, default scale ``(headdim + headdim_v) ** -0.5`` (DeepSeek's
  MLA with the up-projections absorbed).
* ``rotary_seqlens`` int32 ``(batch,)``: new keys and queries rotate from these positions instead
  of ``cache_seqlens`` (a ring cache whose rows are not positions).
* ``attention_chunk > 0``: Llama 4's chunked attention, a query sees only the keys of its own chunk
  of that many positions (with causal or a window on top).
* an fp8 e4m3 ``q`` with ``q_descale`` fp32 ``(batch, nheads_k)``: then the caches and any new
  ``k``/``v`` are e4m3 too, each with its descale, and the output is bf16. Here the query is
  dequantized to bf16 (FA3's tensor cores multiply in fp8): results agree within fp8's error.
* ``num_splits``, ``pack_gqa``, ``sm_margin`` and ``scheduler_metadata`` schedule the work and
  never change the result. ``num_splits`` goes up to 128 here (FA3: 256).
* ``return_softmax_lse=True`` returns ``(out, softmax_lse, out_accum, softmax_lse_accum)`` as FA3
  does (``out, lse, *rest = ...``); the split partials are None here. A row that sees no key has
  LSE ``-inf`` (FA2: ``+inf``).

``learnable_sink`` (FlashAttention 4) and ``backend`` are keyword-only, as in the FA2 front door.
"""

from __future__ import annotations

import torch

from .api import run_checked_call
from .call import FA3_SIGNATURE, bind_kvcache_arguments, check_kvcache_call
from .call_fa3 import plan_tensor
from .split import block_n_for, gpu_for, num_splits_heuristic_fa3
from .validation import (
    ArgumentError,
    ArgumentTypeError,
    check_bool,
    check_int,
    check_lengths,
    check_num_splits,
    check_tensor,
    check_window,
)

__all__ = ["flash_attn_combine", "flash_attn_with_kvcache", "get_scheduler_metadata"]


def _fa3_lse(lse: torch.Tensor) -> torch.Tensor:
    """FlashAttention 3's LSE of a row that sees no key: -inf (the checked call gives FA2's +inf)."""
    return lse.masked_fill(torch.isposinf(lse), float("-inf"))


def flash_attn_with_kvcache(*args, **kwargs):
    """FlashAttention 3's ``flash_attn_with_kvcache``: see the module docstring for what differs from
    :func:`flashkv_edu.flash_attn_with_kvcache` (FA2's), whose docstring holds the common rules
    (append first, rotary positions, bottom-right masks, errors before anything is written).

    Returns ``out`` (``(batch, seqlen_q, nheads, headdim_v)``, varlen ``(total_q, nheads,
    headdim_v)``; bf16 for an fp8 q), or with ``return_softmax_lse`` ``(out, softmax_lse, None,
    None)``, the LSE fp32 ``(batch, nheads, seqlen_q)`` (varlen ``(nheads, total_q)``)."""
    a = bind_kvcache_arguments("flashkv_edu.fa3.flash_attn_with_kvcache", args, kwargs, FA3_SIGNATURE)
    try:
        call = check_kvcache_call(**a, fa3=True)
    except (ArgumentError, ArgumentTypeError) as exc:  # speak of the argument by its FA3 name
        raise type(exc)(str(exc).replace("block_table", "page_table")) from None
    out, lse = run_checked_call(
        call, a["q"], a["k_cache"], a["v_cache"], a["k"], a["v"], a["rotary_cos"], a["rotary_sin"], qv=a["qv"]
    )
    if not call.return_lse:
        return out
    return out, _fa3_lse(lse), None, None


flash_attn_with_kvcache.__signature__ = FA3_SIGNATURE


def get_scheduler_metadata(
    batch_size,
    max_seqlen_q,
    max_seqlen_k,
    num_heads_q,
    num_heads_kv,
    headdim,
    cache_seqlens,
    qkv_dtype=torch.bfloat16,
    headdim_v=None,
    cu_seqlens_q=None,
    cu_seqlens_k_new=None,
    cache_leftpad=None,
    page_size=None,
    max_seqlen_k_new=0,
    causal=False,
    window_size=(-1, -1),
    attention_chunk=0,
    has_softcap=False,
    num_splits=0,
    pack_gqa=None,
    sm_margin=0,
):
    """The split plan of one decode step, made once and passed as ``scheduler_metadata`` to every
    layer's :func:`flash_attn_with_kvcache` (FlashAttention 3's ``get_scheduler_metadata``).

    ``num_splits=0`` becomes FlashAttention 3's heuristic
    (:func:`~flashkv_edu.split.num_splits_heuristic_fa3`) on the present GPU (an H100 on a CPU)
    less ``sm_margin`` SMs; a varlen batch (``cu_seqlens_q``) is planned as one sequence, as FA3
    does before its per-sequence dynamic splits. Returns a small int32 tensor (on the CPU): the
    call's shape fields and the split count. A call whose arguments differ from the plan's raises;
    results are the same with and without a plan."""
    fields = {}
    for name, value, low in (
        ("batch_size", batch_size, 1),
        ("max_seqlen_q", max_seqlen_q, 1),
        ("max_seqlen_k", max_seqlen_k, 1),
        ("num_heads_q", num_heads_q, 1),
        ("num_heads_kv", num_heads_kv, 1),
        ("headdim", headdim, 1),
        ("max_seqlen_k_new", max_seqlen_k_new, 0),
        ("attention_chunk", attention_chunk, 0),
        ("sm_margin", sm_margin, 0),
    ):
        fields[name] = check_int(name, value, low=low)
    if fields["num_heads_q"] % fields["num_heads_kv"]:
        raise ArgumentError(f"num_heads_kv ({num_heads_kv}) must divide num_heads_q ({num_heads_q})")
    headdim_v = fields["headdim"] if headdim_v is None else check_int("headdim_v", headdim_v, low=1)
    page = 0 if page_size is None else check_int("page_size", page_size, low=1)
    if not isinstance(qkv_dtype, torch.dtype) or qkv_dtype not in (
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float8_e4m3fn,
    ):
        raise ArgumentTypeError(f"qkv_dtype must be fp16, bf16, fp32 or fp8 e4m3, got {qkv_dtype!r}")
    b = fields["batch_size"]
    seqlens = check_lengths("cache_seqlens", cache_seqlens, b, int32_only=True, checks=False)
    for name, t, n in (("cu_seqlens_q", cu_seqlens_q, b + 1), ("cu_seqlens_k_new", cu_seqlens_k_new, b + 1)):
        if t is not None:
            check_tensor(name, t, ndim=1, dtypes=(torch.int32,))
            if t.shape[0] != n:
                raise ArgumentError(f"{name} must have shape ({n},) (batch_size + 1), got {tuple(t.shape)}")
    if cache_leftpad is not None:
        check_lengths("cache_leftpad", cache_leftpad, b, int32_only=True, checks=False)
    left, right = check_window(window_size)
    causal = check_bool("causal", causal)
    has_softcap = check_bool("has_softcap", has_softcap)
    pack = None if pack_gqa is None else check_bool("pack_gqa", pack_gqa)
    num_splits = check_num_splits(num_splits)
    if num_splits == 0:
        gpu = gpu_for(seqlens.device)  # an H100 on a CPU
        hq, hk = fields["num_heads_q"], fields["num_heads_kv"]
        packed = True if pack is None else pack  # FA3 packs GQA for decode and varlen
        rows = fields["max_seqlen_q"] * (hq // hk if packed else 1)
        batch = 1 if cu_seqlens_q is not None else b
        bytes_per = 1 if qkv_dtype == torch.float8_e4m3fn else (4 if qkv_dtype == torch.float32 else 2)
        num_splits = num_splits_heuristic_fa3(
            batch * (hk if packed else hq) * -(-rows // 64),
            max(gpu.num_sms - fields["sm_margin"], 1),
            -(-fields["max_seqlen_k"] // block_n_for(fields["headdim"])),
            -(-rows // 64),
            fields["max_seqlen_k"] * (fields["headdim"] + headdim_v) * bytes_per,
            causal or left >= 0 or (right >= 0) or fields["attention_chunk"] > 0,
        )
    return plan_tensor(
        dict(
            batch=b,
            max_seqlen_q=fields["max_seqlen_q"],
            max_seqlen_k=fields["max_seqlen_k"],
            nheads=fields["num_heads_q"],
            nheads_k=fields["num_heads_kv"],
            headdim=fields["headdim"],
            headdim_v=headdim_v,
            page_size=page,
            causal=int(causal),
            window_left=left,
            window_right=right,
            attention_chunk=fields["attention_chunk"],
            has_softcap=int(has_softcap),
            varlen_q=int(cu_seqlens_q is not None),
            varlen_k_new=int(cu_seqlens_k_new is not None),
            pack_gqa=-1 if pack is None else int(pack),
            sm_margin=fields["sm_margin"],
            num_splits=num_splits,
        )
    )


def flash_attn_combine(out_partial, lse_partial, out=None, out_dtype=None):
    """FlashAttention 3's split combine: partial states of ``num_splits`` key ranges merged into one.

    ``out_partial`` fp32 ``(num_splits, batch, seqlen, nheads, headdim_v)`` (or varlen ``(num_splits,
    total_q, nheads, headdim_v)``), each split's output normalised within it; ``lse_partial`` fp32
    ``(num_splits, batch, seqlen, nheads)`` (varlen ``(num_splits, total_q, nheads)``); an empty
    split has LSE -inf. Returns ``(out, softmax_lse)``: ``out`` in ``out_dtype`` (default fp32),
    written into ``out`` when given (its shape and dtype must match), and the LSE fp32 ``(batch,
    seqlen, nheads)`` (-inf where every split is empty, with output 0)."""
    from .split import combine_splits_torch

    check_tensor("out_partial", out_partial, dtypes=(torch.float32,))
    check_tensor("lse_partial", lse_partial, dtypes=(torch.float32,))
    varlen = out_partial.dim() == 4
    if out_partial.dim() not in (4, 5):
        raise ArgumentError(
            "out_partial must be (num_splits, batch, seqlen, nheads, headdim_v) or varlen (num_splits, total_q, "
            f"nheads, headdim_v), got shape {tuple(out_partial.shape)}"
        )
    o5 = out_partial[:, None] if varlen else out_partial
    if tuple(lse_partial.shape) != tuple(out_partial.shape[:-1]):
        raise ArgumentError(
            f"lse_partial must have shape {tuple(out_partial.shape[:-1])} (out_partial's without the head dim), "
            f"got {tuple(lse_partial.shape)}"
        )
    if out_partial.shape[0] == 0:
        raise ArgumentError("out_partial must hold at least one split, got 0")
    if lse_partial.device != out_partial.device:
        raise ArgumentError("out_partial and lse_partial must be on one device")
    out_dtype = torch.float32 if out_dtype is None else out_dtype
    if out_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ArgumentTypeError(f"out_dtype must be fp32, fp16 or bf16, got {out_dtype!r}")
    shape = tuple(out_partial.shape[1:])
    if out is not None:
        check_tensor("out", out, dtypes=(out_dtype,))
        if tuple(out.shape) != shape or out.device != out_partial.device:
            raise ArgumentError(f"out must be {shape} on {out_partial.device} ({out_dtype}), got {tuple(out.shape)}")
    l5 = lse_partial[:, None] if varlen else lse_partial
    merged, lse = combine_splits_torch(o5, l5.transpose(2, 3))  # (b, s, h, dv), (b, h, s)
    merged, lse = merged.to(out_dtype), _fa3_lse(lse.transpose(1, 2))  # LSE (b, s, h), as FA3
    if varlen:
        merged, lse = merged[0], lse[0]
    if out is not None:
        out.copy_(merged)
        merged = out
    return merged, lse
