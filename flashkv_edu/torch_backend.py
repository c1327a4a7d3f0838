"""The PyTorch backend of ``flash_attn_with_kvcache``: the fastest correct path on a CPU.

Two engines, chosen per call from the normalised :class:`~flashkv_edu.call.KVCacheCall`:

* **PyTorch's fused attention** where the features allow it: no softcap, no ALiBi, a cache in
  q's dtype, enough query rows to fill its tiles (prefill). ``scaled_dot_product_attention`` with
  ``enable_gqa`` computes the output; when the log-sum-exp is wanted on a CPU, the CPU flash
  kernel behind it (``aten._scaled_dot_product_flash_attention_for_cpu``) returns it too. Masks
  are FlashAttention's bottom-right ones, passed as a boolean ``attn_mask`` (or ``is_causal`` when
  the query and key counts agree).
* **Its own kernel** for the rest (softcap, ALiBi, scaled fp8 caches, decode steps): for each KV
  head, its group of query heads is one batched matmul over that head's keys, read in place from
  a contiguous cache or gathered one head at a time from a paged pool into a small reused
  workspace. A decode step where every query sees every key builds no mask at all.

Rows outside each sequence's ``[cache_leftpad, cache_seqlens + seqlen_new)`` are never read into
the result (a cache made with ``torch.empty`` holds NaN there). Nothing here reads the device:
the host numbers it needs come with the call. The oracle, :func:`flashkv_edu.attention_ref`, is
not used here; the tests compare this module with it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .call import KVCacheCall
from .masks import alibi_distance_bias, visible_keys
from .validation import SCALE_NONE

__all__ = [
    "FUSED_MAX_DECODE_KEYS",
    "FUSED_MAX_PAGED_GATHER_BYTES",
    "FUSED_MIN_ROWS",
    "attention_over_cache",
    "uses_fused_kernel",
]

# When PyTorch's fused kernel beats per-KV-head matmuls on a 2-core CPU (fp32; measured side by side,
# see `python -m flashkv_edu.bench api` and `bench hf`): from 32 query rows per KV head (prefill), or
# for a decode step over a short cache (<= 768 keys); per-head matmuls win a decode step
# over long caches (1.3-1.7x at 1-8K keys) and over paged ones whose gathered copy would outgrow the
# CPU's cache (16 MB at 4 x 512 keys, 32 x 128 heads: 1.1x), where they gather one head at a time into
# a reused workspace instead.
FUSED_MIN_ROWS = 32
FUSED_MAX_DECODE_KEYS = 768
FUSED_MAX_PAGED_GATHER_BYTES = 4 << 20

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


# --- reading the keys of each sequence ------------------------------------------------------------


class _PagedHeads:
    """The first ``used`` rows of each sequence of a paged pool ``(num_blocks, page, nheads_k,
    headdim)``, read one KV head at a time: ``head(j)`` gathers head ``j`` into a reused workspace
    ``(batch, pages * page, headdim)``, small enough to stay in cache while the matmul reads it.
    ``dense()`` gathers every head at once ``(batch, pages * page, nheads_k, headdim)`` (for the
    fused kernel). ``shape`` is that of the dense cache."""

    def __init__(self, name: str, pool: torch.Tensor, block_table: torch.Tensor, used: int):
        nb, page, hk, d = pool.shape
        pages = max(1, -(-used // page))
        self.name, self.pool = name, pool
        self.blocks = block_table[:, :pages].reshape(-1).long()
        self.shape = (block_table.shape[0], pages * page, hk, d)
        # Pool rows (block * page + slot) in sequence order: one 2-D row gather per head is the
        # fastest copy, possible when a head's pages can be viewed as one (rows, headdim) matrix.
        self.flat = pool.stride(0) == page * pool.stride(1)
        self.rows = None

    def head(self, j: int) -> torch.Tensor:
        b, s, _, d = self.shape
        out = _workspace(self.name, (b * s, d), self.pool.dtype, self.pool.device)
        part = self.pool[:, :, j]  # (num_blocks, page, headdim)
        if self.flat:
            if self.rows is None:
                page = self.pool.shape[1]
                self.rows = (self.blocks[:, None] * page + torch.arange(page, device=self.pool.device)).reshape(-1)
            torch.index_select(part.reshape(-1, d), 0, self.rows, out=out)
        else:
            torch.index_select(part, 0, self.blocks, out=out.view(-1, part.shape[1], d))
        return out.view(b, s, d)

    def dense(self) -> torch.Tensor:
        b, s, hk, d = self.shape
        if self.pool.is_contiguous():  # whole blocks as rows: a row gather copies at memcpy speed
            return torch.index_select(self.pool.view(self.pool.shape[0], -1), 0, self.blocks).view(b, s, hk, d)
        return self.pool[self.blocks].reshape(b, s, hk, d)


class _Descaled:
    """A scaled cache (fp8 or int8 with FlashAttention 3's descales ``(batch, nheads_k)``) read one
    KV head at a time as fp32 real values, ``stored * descale[b, j]``; ``shape`` is the cache's."""

    def __init__(self, cache, descale: torch.Tensor):
        self.cache, self.descale, self.shape = cache, descale, cache.shape

    def head(self, j: int) -> torch.Tensor:
        part = self.cache.head(j) if hasattr(self.cache, "head") else self.cache[:, :, j]
        return part.float() * self.descale[:, j, None, None]


def _head(x, j: int, lo: int, s: int, dtype) -> torch.Tensor:
    """KV head ``j`` of ``x`` over key columns ``[lo, lo + s)``: ``(batch, s, headdim)`` in
    ``dtype``. ``x`` is a ``(batch, seqlen_k, nheads_k, headdim)`` tensor (read in place) or an
    object with ``shape`` and ``head(j)``."""
    part = x.head(j) if hasattr(x, "head") else x[:, :, j]
    return part[:, lo : lo + s].to(dtype)  # no copy when the dtype is already right


def _cache_views(k_cache, v_cache, call: KVCacheCall):
    """The keys and values of each sequence, columns ``[0, max_end)``: views of a contiguous cache
    (rows ``cache_batch_idx``), or paged readers."""
    used = max(call.max_end, 1)
    if call.paged:
        return _PagedHeads("k", k_cache, call.block_table, used), _PagedHeads("v", v_cache, call.block_table, used)
    if call.batch_rows is not None:
        rows = call.batch_rows.long()
        return k_cache[rows, :used], v_cache[rows, :used]
    return k_cache[: call.batch, :used], v_cache[: call.batch, :used]


# --- masks -------------------------------------------------------------------------------------------


def _keep(
    sq: int, s: int, window, start: torch.Tensor | None, end: torch.Tensor | None, device, chunk: int = 0
) -> torch.Tensor:
    """Which of the columns ``[0, s)`` each query row sees (:func:`~flashkv_edu.masks.visible_keys`):
    bool ``(sq, s)`` when every row has the keys ``[0, s)`` (``start``/``end`` None), else
    ``(batch, sq, s)`` for per-row ``[start, end)``."""
    if start is None:
        whole = torch.tensor([0, s], device=device)
        return visible_keys(sq, s, window, whole[:1], whole[1:], chunk)[0]
    return visible_keys(sq, s, window, start, end, chunk)


# --- the two engines ----------------------------------------------------------------------------------


def _own_kernel(q, k, v, call: KVCacheCall, start, end, s: int, qv=None):
    """Per-KV-head batched matmuls over columns ``[0, s)`` (with ``qv`` ``(batch, seqlen_q, nheads,
    headdim_v)``: plus ``qv . v``); returns ``(out, lse)``."""
    b, sq, h, d = q.shape
    hk, g = call.nheads_k, h // call.nheads_k
    dv = v.shape[3]
    whole = call.sees_whole_rows
    cd = torch.float32
    keep = None if whole else _keep(sq, s, call.window, start, end, q.device, call.chunk)
    if keep is not None and keep.dim() == 2:
        keep = keep[None].expand(b, sq, s)
    valid = None
    if not whole:  # rows outside [start, end) may hold anything, NaN included: they must not reach the output
        cols = torch.arange(s, device=q.device)[None, :]
        valid = (cols >= start.long()[:, None]) & (cols < end.long()[:, None])

    def v_head(j):
        vj = _head(v, j, 0, s, cd)
        return vj if valid is None else torch.where(valid[:, :, None], vj, torch.zeros((), dtype=cd))

    # Rows of one KV head's group are (query head, query token) pairs.
    qf = q.to(cd).view(b, sq, hk, g, d).permute(0, 2, 3, 1, 4).reshape(b, hk, g * sq, d)
    z = torch.stack([torch.bmm(qf[:, j], _head(k, j, 0, s, cd).transpose(1, 2)) for j in range(hk)], 1)
    if qv is not None:  # MLA's absorbed second query meets the values (FlashAttention 3's qv)
        qvf = qv.to(cd).view(b, sq, hk, g, dv).permute(0, 2, 3, 1, 4).reshape(b, hk, g * sq, dv)
        z = z + torch.stack([torch.bmm(qvf[:, j], v_head(j).transpose(1, 2)) for j in range(hk)], 1)
    z = z.view(b, hk, g, sq, s) * call.scale
    if call.softcap > 0:
        z = call.softcap * torch.tanh(z / call.softcap)
    if call.alibi_slopes is not None:
        z = z + alibi_distance_bias(call.alibi_slopes, sq, s, start, end).view(b, hk, g, sq, s)
    if keep is not None:
        z = z.masked_fill(~keep[:, None, None], float("-inf"))
    lse = torch.logsumexp(z, dim=-1)  # -inf where a row sees nothing
    if call.sink is not None:  # the sink joins every row's denominator; the LSE includes it
        lse = torch.logaddexp(lse, call.sink.view(1, hk, g, 1))
        whole = True  # no row is empty any more: a row without keys has LSE = sink, output 0
    empty = None if whole else torch.isneginf(lse)
    p = torch.exp(z - (lse if whole else lse.masked_fill(empty, 0.0))[..., None]).view(b, hk, g * sq, s)
    out = torch.stack([torch.bmm(p[:, j], v_head(j)) for j in range(hk)], 1).view(b, hk, g, sq, dv)
    out = out.permute(0, 3, 1, 2, 4).reshape(b, sq, h, dv)
    if not whole:
        lse = lse.masked_fill(empty, float("inf"))
    return out, lse.reshape(b, h, sq)


def _fused(q, k, v, call: KVCacheCall, start, end, s: int, equal_rows: bool):
    """PyTorch's fused attention over columns ``[0, s)``; returns ``(out, lse or None)``."""
    b, sq, h, _ = q.shape
    cd = torch.float32
    qt = q.transpose(1, 2).to(cd)
    if hasattr(k, "dense"):
        k, v = k.dense(), v.dense()
    kt, vt = k[:, :s].to(cd), v[:, :s].to(cd)
    keep = None
    is_causal = False
    if not call.sees_whole_rows:
        if equal_rows and call.is_causal and sq == s and not call.chunk:
            is_causal = True
        else:
            keep = _keep(
                sq, s, call.window, None if equal_rows else start, None if equal_rows else end, q.device, call.chunk
            )
            if not equal_rows:  # zero the rows a sequence does not own (they may hold NaN), then mask
                cols = torch.arange(s, device=q.device)[None, :, None, None]
                valid = (cols >= start.long()[:, None, None, None]) & (cols < end.long()[:, None, None, None])
                kt, vt = torch.where(valid, kt, 0.0), torch.where(valid, vt, 0.0)
                keep = keep[:, None]
    kt, vt = kt.transpose(1, 2), vt.transpose(1, 2)
    hk = kt.shape[1]
    # A decode step with no mask: the g = nheads / nheads_k query heads of a KV head become g query
    # rows of that head (FlashAttention 3's pack_gqa), so each key and value is read once, not g times.
    packed = sq == 1 and keep is None and not is_causal and h != hk
    if packed:
        qt = q.reshape(b, hk, h // hk, q.shape[-1]).to(cd)
    # PyTorch's kernels read the head dim as contiguous (the CPU flash kernel silently assumes it).
    qt, kt, vt = (x if x.stride(-1) == 1 else x.contiguous() for x in (qt, kt, vt))
    if (call.return_lse or call.sink is not None) and q.device.type == "cpu":
        mask = (
            None if keep is None else torch.zeros(keep.shape, dtype=cd, device=q.device).masked_fill(~keep, -torch.inf)
        )
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qt, kt, vt, 0.0, is_causal, attn_mask=mask, scale=call.scale
        )[:2]
    else:
        out = F.scaled_dot_product_attention(
            qt, kt, vt, attn_mask=keep, is_causal=is_causal, scale=call.scale, enable_gqa=not packed
        )
        lse = None
    if packed:  # (b, hk, g, dv) -> (b, 1, h, dv); the LSE (b, hk, g) -> (b, h, 1)
        out = out.reshape(b, 1, h, out.shape[-1])
        lse = None if lse is None else lse.reshape(b, h, 1)
    else:
        out = out.transpose(1, 2)
    empty = None
    if keep is not None:  # rows that see no key: output 0 and LSE +inf (the fused kernel leaves NaN)
        empty = ~keep.any(-1)  # (sq,) or (b, 1, sq)
        empty = empty.reshape(1, 1, sq) if empty.dim() == 1 else empty
        out = out.masked_fill(empty.transpose(1, 2)[..., None], 0.0)
    if call.sink is not None:  # merge_states((out, lse), (0, sink)): rescale, then the LSE includes it
        keys_lse = lse if empty is None else lse.masked_fill(empty, float("-inf"))
        total = torch.logaddexp(keys_lse, call.sink.view(1, -1, 1))
        out = out * torch.exp(keys_lse - total).transpose(1, 2)[..., None]
        return out, total
    if lse is not None and empty is not None:
        lse = lse.masked_fill(empty, float("inf"))
    return out, lse


def _small_gather(call: KVCacheCall) -> bool:
    """A contiguous cache (read in place), or pages whose gathered copy stays cache-sized."""
    if not call.paged:
        return True
    gathered = call.batch * call.max_end * call.nheads_k * (call.headdim + call.headdim_v) * 4
    return gathered <= FUSED_MAX_PAGED_GATHER_BYTES


def uses_fused_kernel(call: KVCacheCall) -> bool:
    """Whether :func:`attention_over_cache` hands this call to PyTorch's fused attention."""
    rows = call.seqlen_q * (call.nheads // call.nheads_k)
    return (
        call.softcap == 0
        and call.headdim_qv == 0
        and call.alibi_slopes is None
        and call.scale_mode == SCALE_NONE
        and (rows >= FUSED_MIN_ROWS or (call.max_end <= FUSED_MAX_DECODE_KEYS and _small_gather(call)))
        and call.max_end > 0
        # the LSE (asked for, or needed to add a sink) comes from the CPU flash kernel: one head dim, a CPU
        and not ((call.return_lse or call.sink is not None) and call.headdim_v != call.headdim)
        and not (call.sink is not None and call.seqlens.device.type != "cpu")
    )


def attention_over_cache(q, k_cache, v_cache, call: KVCacheCall, qv=None):
    """Attention of ``q`` ``(batch, seqlen_q, nheads, headdim)`` (and ``qv``, FlashAttention 3's
    second query against the values) over each sequence's keys
    ``[leftpad, ends)`` of the cache (new keys already appended), computed in fp32. Returns
    ``(out, lse)``: ``out`` in q's dtype, ``lse`` fp32 ``(batch, nheads, seqlen_q)`` or None when
    ``call.return_lse`` is False and the fused kernel ran."""
    k, v = _cache_views(k_cache, v_cache, call)
    if call.scale_mode != SCALE_NONE:
        k, v = _Descaled(k, call.k_descale), _Descaled(v, call.v_descale)
    s = call.max_end
    equal_rows = call.max_start == 0 and call.min_end == s
    end = call.ends
    if equal_rows and uses_fused_kernel(call):  # every row sees [0, s): no per-row bounds needed
        start = None
    else:
        start = call.leftpad if call.leftpad is not None else torch.zeros_like(call.ends)
    if uses_fused_kernel(call):
        out, lse = _fused(q, k, v, call, start, end, s, equal_rows)
    else:
        out, lse = _own_kernel(q, k, v, call, start, end, s, qv)
    return out.to(q.dtype), lse
