"""The chain's masks as PyTorch FlexAttention ``mask_mod`` / ``score_mod`` functions (notebook 13).

``torch.nn.attention.flex_attention`` computes ``softmax(score_mod(q k^T))`` over the keys a
``mask_mod(b, h, q_idx, kv_idx)`` allows. Every mask of this course is a few lines of it, with
FlashAttention's conventions (bottom-right alignment: query ``i`` of ``seqlen_q`` sits at key
position ``i + seqlen_k - seqlen_q``; each row its own ``seqlen_k``):

* :func:`causal`, :func:`window` (``window_size=(left, right)``), :func:`chunked`
  (``attention_chunk``), :func:`sinks_and_window` (StreamingLLM: the first ``sinks`` keys and the
  last ``window``), :func:`documents` (varlen sequences packed in one row);
* :func:`softcap` and :func:`alibi` as score modifications.

:func:`flex_attend` runs them in flashkv_edu's layout ``(batch, seqlen, nheads, headdim)``, under
``torch.inference_mode()``: eagerly (which materialises the scores; PyTorch says so with a
warning, silenced here because this module knows it) or compiled (one ``torch.compile`` of
``flex_attention``, kept and reused). On a CPU the compiled path needs x86 with AVX2 and not
macOS, refuses the LSE and mixed dtypes; where it refuses, :func:`flex_attend` runs eagerly and
says why in ``last_path``. :func:`paged_flex` reads a paged cache through PyTorch's
``PagedAttention`` with the same block table ``flash_attn_with_kvcache`` takes.
"""

from __future__ import annotations

import platform
import sys
import warnings

import torch

from .validation import ArgumentError, check_int, check_tensor

__all__ = [
    "alibi",
    "causal",
    "chunked",
    "compiled_flex_attention",
    "documents",
    "flex_attend",
    "last_path",
    "paged_flex",
    "sinks_and_window",
    "softcap",
    "window",
]

EAGER_WARNING = "flex_attention called without torch.compile"
last_path = {"path": None, "why": None}
"""What the latest :func:`flex_attend` ran: ``"compiled"`` or ``"eager"``, and why eager."""


def _offset(seqlen_q: int, seqlens_k: torch.Tensor):
    return lambda b: seqlens_k[b] - seqlen_q  # key position of query 0 in row b (bottom-right)


def causal(seqlen_q: int, seqlens_k: torch.Tensor):
    """Bottom-right causal over each row's ``seqlens_k`` keys."""
    off = _offset(seqlen_q, seqlens_k)

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx + off(b)) & (kv_idx < seqlens_k[b])

    return mask_mod


def window(seqlen_q: int, seqlens_k: torch.Tensor, left: int, right: int):
    """FlashAttention's ``window_size=(left, right)`` (-1: unbounded), bottom-right aligned."""
    off = _offset(seqlen_q, seqlens_k)

    def mask_mod(b, h, q_idx, kv_idx):
        at = q_idx + off(b)
        ok = kv_idx < seqlens_k[b]
        if left >= 0:
            ok = ok & (kv_idx >= at - left)
        if right >= 0:
            ok = ok & (kv_idx <= at + right)
        return ok

    return mask_mod


def chunked(seqlen_q: int, seqlens_k: torch.Tensor, chunk: int):
    """Llama 4's chunked local attention (``attention_chunk``), causal: keys of the query's own chunk
    of ``chunk`` positions, up to the query."""
    off = _offset(seqlen_q, seqlens_k)
    base = causal(seqlen_q, seqlens_k)

    def mask_mod(b, h, q_idx, kv_idx):
        return base(b, h, q_idx, kv_idx) & (kv_idx // chunk == (q_idx + off(b)) // chunk)

    return mask_mod


def sinks_and_window(seqlen_q: int, seqlens_k: torch.Tensor, sinks: int, window_len: int):
    """StreamingLLM, causal: the first ``sinks`` keys and the last ``window_len`` up to the query."""
    off = _offset(seqlen_q, seqlens_k)
    base = causal(seqlen_q, seqlens_k)

    def mask_mod(b, h, q_idx, kv_idx):
        return base(b, h, q_idx, kv_idx) & ((kv_idx < sinks) | (kv_idx > q_idx + off(b) - window_len))

    return mask_mod


def documents(doc_ids: torch.Tensor):
    """Sequences packed in one row (varlen): causal within a document, nothing across them.
    ``doc_ids`` ``(total,)``: the document of each packed token."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (doc_ids[q_idx] == doc_ids[kv_idx]) & (kv_idx <= q_idx)

    return mask_mod


def softcap(cap: float):
    """FlashAttention's ``softcap``: scores become ``cap * tanh(score / cap)``."""

    def score_mod(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    return score_mod


def alibi(slopes: torch.Tensor, seqlen_q: int, seqlens_k: torch.Tensor):
    """FlashAttention's ALiBi: ``-slope[h] * |key position - query position|`` added to the scaled
    score (flex_attention hands ``score_mod`` the score already scaled)."""
    off = _offset(seqlen_q, seqlens_k)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (kv_idx - (q_idx + off(b))).abs()

    return score_mod


_COMPILED = {}


def compiled_flex_attention():
    """The one compiled ``flex_attention`` (compiled on first use; later calls reuse it)."""
    if "fn" not in _COMPILED:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED["fn"] = torch.compile(flex_attention)
    return _COMPILED["fn"]


def _compile_refusal(q: torch.Tensor, return_lse: bool, dtypes) -> str | None:
    """Why the compiled CPU path would refuse these inputs (None: it would not)."""
    if q.device.type != "cpu":
        return None
    if return_lse:
        return "the compiled CPU path does not return the LSE"
    if len(set(dtypes)) > 1:
        return "the compiled CPU path refuses mixed query, key and value dtypes"
    if sys.platform == "darwin":
        return "the compiled CPU path does not run on macOS"
    cap = torch.backends.cpu.get_cpu_capability()
    if platform.machine().lower() not in ("x86_64", "amd64") or cap not in ("AVX2", "AVX512"):
        return f"the compiled CPU path needs x86 with AVX2 (this CPU: {platform.machine()}, {cap})"
    return None


def flex_attend(q, k, v, mask_mod=None, score_mod=None, *, scale=None, compiled: bool = False,
                return_lse: bool = False, block_size: int = 16):  # fmt: skip
    """FlexAttention in flashkv_edu's layout: ``q`` ``(b, sq, h, d)``, ``k``/``v`` ``(b, sk, h_k,
    d)``. Returns ``out`` ``(b, sq, h, d)`` (and the LSE ``(b, h, sq)`` with ``return_lse``)."""
    from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4)
    block_size = check_int("block_size", block_size, low=1)
    b, sq, h, _ = q.shape
    sk = k.shape[1]
    why = _compile_refusal(q, return_lse, (q.dtype, k.dtype, v.dtype)) if compiled else "compiled=False"
    with torch.inference_mode():
        block_mask = None
        if mask_mod is not None:
            block_mask = create_block_mask(mask_mod, b, None, sq, sk, device=q.device, BLOCK_SIZE=block_size)
        args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        kwargs = dict(score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=h != k.shape[2])
        if return_lse:
            kwargs["return_aux"] = AuxRequest(lse=True)
        if why is None:
            result = compiled_flex_attention()(*args, **kwargs)
            last_path.update(path="compiled", why=None)
        else:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=EAGER_WARNING)  # eager materialises the scores: known
                result = flex_attention(*args, **kwargs)
            last_path.update(path="eager", why=why)
    if return_lse:
        out, aux = result
        return out.transpose(1, 2).clone(), aux.lse.clone()
    return result.transpose(1, 2).clone()


def paged_flex(q, k_pool, v_pool, block_table, cache_seqlens, *, scale=None):
    """Decode-style attention over a paged cache through PyTorch's ``PagedAttention``: ``q`` ``(b,
    sq, h, d)``, pools ``(num_pages, page_size, h_k, d)``, ``block_table`` ``(b, max_pages)`` and
    ``cache_seqlens`` ``(b,)`` exactly as ``flash_attn_with_kvcache`` takes them; bottom-right
    causal. Returns ``(b, sq, h, d)`` (eager)."""
    from torch.nn.attention.experimental._paged_attention import PagedAttention
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    check_tensor("q", q, ndim=4)
    n_pages, page, hk, d = k_pool.shape
    b, sq = q.shape[:2]
    max_pages = block_table.shape[1]
    if max_pages > n_pages:
        raise ArgumentError(f"block_table has {max_pages} columns, more than the pool's {n_pages} pages")
    lens = cache_seqlens.long()
    paged = PagedAttention(n_pages, page, b, device=q.device)
    for row in range(b):
        used = -(-int(lens[row]) // page)
        pages = block_table[row, :used].long()
        paged.page_table[row, :used] = pages
        paged.physical_to_logical[row, pages] = torch.arange(used, device=q.device)
    # physical caches (1, h_k, n_pages * page, d): every sequence reads the one pool
    k_phys = k_pool.permute(2, 0, 1, 3).reshape(1, hk, n_pages * page, d)
    v_phys = v_pool.permute(2, 0, 1, 3).reshape(1, hk, n_pages * page, v_pool.shape[-1])
    with torch.inference_mode():
        logical = create_block_mask(causal(sq, lens), b, None, sq, max_pages * page, device=q.device, BLOCK_SIZE=page)
        physical = paged.convert_logical_block_mask(logical, kv_len=lens)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=EAGER_WARNING)
            out = flex_attention(
                q.transpose(1, 2), k_phys.expand(b, -1, -1, -1), v_phys.expand(b, -1, -1, -1), block_mask=physical,
                scale=scale, enable_gqa=q.shape[2] != hk,
            )  # fmt: skip
    return out.transpose(1, 2).clone()
