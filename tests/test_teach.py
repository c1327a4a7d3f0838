"""Every exercise check: the package's solution passes, the shipped stub reads as "not attempted
yet", and at least two planted typical mistakes fail with a message naming the case."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flashkv_edu as fk
from flashkv_edu.rotary import apply_rotary
from flashkv_edu.runtime import tl, triton
from flashkv_edu.teach import NOTEBOOKS, all_exercises, module_for
from flashkv_edu.teach import nb01_naive_attention as nb01
from flashkv_edu.teach import nb02_kv_cache as nb02
from flashkv_edu.teach import nb03_window_size_bug as nb03
from flashkv_edu.teach import nb04_online_softmax as nb04
from flashkv_edu.teach import nb05_tiled_triton_kernels as nb05
from flashkv_edu.teach import nb06_paged_block_tables as nb06
from flashkv_edu.teach import nb07_split_kv_decode as nb07
from flashkv_edu.teach import nb08_putting_it_together as nb08
from flashkv_edu.teach import nb09_precision_and_quantized_caches as nb09
from flashkv_edu.teach import nb10_transformers_model as nb10
from flashkv_edu.teach import nb11_when_the_cache_does_not_fit as nb11
from flashkv_edu.teach.__main__ import exercise_table

ROOT = Path(__file__).resolve().parents[1]


def stub(*args, **kwargs):
    raise NotImplementedError


@triton.jit
def stub_step(
    q,
    k,
    v,
    m_i,
    l_i,
    acc,
    visible,
    bias,
    scale,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    raise NotImplementedError("write me")


@triton.jit
def stub_key_range(pid_m, seqlen_q, seqlen_k, window_left, window_right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    raise NotImplementedError("write me")


@triton.jit
def stub_copy_tile(X, Y, n_rows, n_cols, stride_x, stride_y, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    raise NotImplementedError("write me")


@triton.jit
def stub_pack_rows(r, kv_head, GROUP: tl.constexpr):
    raise NotImplementedError("write me")


@triton.jit
def stub_paged_rows(K, BLOCK_TABLE, b, pos, col_ok, stride_btb, page_size, stride_kb, stride_ks):
    raise NotImplementedError("write me")


@triton.jit
def stub_split_range(split, split_size, seqlen_k):
    raise NotImplementedError("write me")


@triton.jit
def stub_finish_split(m_i, l_i, acc):
    raise NotImplementedError("write me")


@triton.jit
def stub_combine_kernel(
    OACC,
    LACC,
    O,
    LSE,
    stride_as,
    stride_ab,
    stride_aq,
    stride_ah,
    stride_ls,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oq,
    stride_oh,
    stride_fb,
    stride_fh,
    num_splits,
    nheads,
    seqlen_q,
    headdim,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    raise NotImplementedError("write me")


@triton.jit
def stub_dequantize(x, scale, FP8_BITS: tl.constexpr):
    raise NotImplementedError


TRITON_STUBS = {
    "my_dequantize": stub_dequantize,
    "my_step": stub_step,
    "my_key_range": stub_key_range,
    "my_copy_tile": stub_copy_tile,
    "my_pack_rows": stub_pack_rows,
    "my_paged_rows": stub_paged_rows,
    "my_split_range": stub_split_range,
    "my_finish_split": stub_finish_split,
    "my_combine_kernel": stub_combine_kernel,
}


# --- planted mistakes, by exercise ------------------------------------------------------------------


def gqa_tiled(q, k, v):  # repeat instead of repeat_interleave: wrong head pairing
    g = q.shape[2] // k.shape[2]
    return nb01.my_gqa_attention(
        q,
        k.repeat(1, 1, g, 1)[:, :, : k.shape[2]].repeat(1, 1, g, 1),
        v.repeat(1, 1, g, 1)[:, :, : k.shape[2]].repeat(1, 1, g, 1),
    )


def gqa_no_scale(q, k, v):
    g = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    return torch.einsum("bhij,bjhd->bihd", torch.einsum("bihd,bjhd->bhij", q, k).softmax(-1), v)


def gqa_wrong_pairing(q, k, v):
    g = q.shape[2] // k.shape[2]
    idx = torch.arange(q.shape[2]) % k.shape[2]
    return nb01.my_gqa_attention(q, k[:, :, idx], v[:, :, idx]) if g > 1 else nb01.my_gqa_attention(q, k, v)


def mask_top_left(sq, sk):
    return torch.ones(sq, sk, dtype=torch.bool).tril()


def mask_strict(sq, sk):
    return torch.arange(sk)[None, :] < torch.arange(sq)[:, None] + sk - sq


def append_at_zero(k_cache, v_cache, lens, k, v):
    k_cache[:, : k.shape[1]], v_cache[:, : k.shape[1]] = k, v
    return lens + k.shape[1]


def append_no_advance(k_cache, v_cache, lens, k, v):
    nb02.my_append(k_cache, v_cache, lens, k, v)
    return lens


def positions_from_zero(lens, n):
    return torch.arange(n)[None, :].expand(len(lens), n)


def positions_off_by_one(lens, n):
    return lens.long()[:, None] + torch.arange(1, n + 1)[None, :]


def cache_for_prompt(prompt_lens, new, hk, d):  # the bug as shipped
    shape = (len(prompt_lens), max(prompt_lens), hk, d)
    return torch.zeros(shape), torch.zeros(shape)


def cache_one_short(prompt_lens, new, hk, d):
    shape = (len(prompt_lens), max(prompt_lens) + new - 1, hk, d)
    return torch.zeros(shape), torch.zeros(shape)


def window_keeps_w_cached(cached, new, window):  # the new queries see W cached tokens
    visible = torch.cat([cached[:, -window:] if cached.shape[1] else cached, new], 1)
    return visible[:, -window:].clone(), visible


def window_drops_context(cached, new, window):  # roll: the chunk's early queries lose context
    stored = torch.cat([cached, new], 1)[:, -window:]
    return stored, stored


def stuck_at_w_plus_1(stored, new, window):  # flash-linear-attention before PR #910
    if stored.shape[1] < window:
        return torch.cat([stored, new], 1)
    rolled = stored.roll(-new.shape[1], 1)
    tail = new[:, -window:]
    rolled[:, -tail.shape[1] :] = tail
    return rolled


def keeps_w_minus_1(stored, new, window):
    return torch.cat([stored, new], 1)[:, -(window - 1) :] if window > 1 else new[:, :0]


def update_no_rescale(m, l, block):
    m_new = torch.maximum(m, block.max(-1).values)
    safe = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
    return m_new, l + torch.exp(block - safe[..., None]).sum(-1)


def update_nan_on_masked(m, l, block):
    m_new = torch.maximum(m, block.max(-1).values)
    return m_new, l * torch.exp(m - m_new) + torch.exp(block - m_new[..., None]).sum(-1)


def finalize_plain(m, l, acc):
    return acc / l[:, None], m + torch.log(l)


def finalize_minus_inf(m, l, acc):
    out, lse = nb04.my_finalize(m, l, acc)
    return out, torch.where(l == 0, torch.full_like(lse, float("-inf")), lse)


def merge_averaged(out_a, lse_a, out_b, lse_b):
    return (out_a + out_b) / 2, torch.logaddexp(lse_a, lse_b)


def merge_no_max(out_a, lse_a, out_b, lse_b):
    wa, wb = torch.exp(lse_a), torch.exp(lse_b)
    total = wa + wb
    out = (wa / total).transpose(1, 2)[..., None] * out_a + (wb / total).transpose(1, 2)[..., None] * out_b
    return out, torch.log(total)


@triton.jit
def step_no_rescale(
    q,
    k,
    v,
    m_i,
    l_i,
    acc,
    visible,
    bias,
    scale,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    return m_new, l_i + tl.sum(p, 1), acc + tl.dot(p, v, input_precision="ieee")


@triton.jit
def step_no_mask(
    q,
    k,
    v,
    m_i,
    l_i,
    acc,
    visible,
    bias,
    scale,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")


@triton.jit
def key_range_all(pid_m, seqlen_q, seqlen_k, window_left, window_right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    return pid_m * 0, seqlen_k + pid_m * 0  # visits tiles nobody can see


@triton.jit
def key_range_top_left(
    pid_m, seqlen_q, seqlen_k, window_left, window_right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    lo = pid_m * 0
    hi = seqlen_k + pid_m * 0
    if window_right >= 0:  # forgets the bottom-right offset sk - sq
        hi = tl.minimum(seqlen_k, pid_m * BLOCK_M + BLOCK_M - 1 + window_right + 1)
    if window_left >= 0:
        lo = tl.maximum(0, pid_m * BLOCK_M - window_left)
    return (lo // BLOCK_N) * BLOCK_N, hi


@triton.jit
def copy_rows_masked_only(X, Y, n_rows, n_cols, stride_x, stride_y, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    inside = (rows[:, None] < n_rows) & (cols[None, :] < BLOCK_C * 1000)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=inside, other=0.0)
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], x, mask=inside)


@triton.jit
def copy_load_unmasked(X, Y, n_rows, n_cols, stride_x, stride_y, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :])
    tl.store(Y + rows[:, None] * stride_x + cols[None, :], x)  # the row stride of X used for Y too


@triton.jit
def pack_swapped(r, kv_head, GROUP: tl.constexpr):
    return r % GROUP, kv_head * GROUP + r // GROUP


@triton.jit
def pack_no_kv_offset(r, kv_head, GROUP: tl.constexpr):
    return r // GROUP, r % GROUP


@triton.jit
def paged_ignores_table(K, BLOCK_TABLE, b, pos, col_ok, stride_btb, page_size, stride_kb, stride_ks):
    return K + (b * 16 * page_size + pos).to(tl.int64) * stride_ks  # as if the pool were contiguous


@triton.jit
def paged_swapped(K, BLOCK_TABLE, b, pos, col_ok, stride_btb, page_size, stride_kb, stride_ks):
    page = tl.load(BLOCK_TABLE + b * stride_btb + pos % page_size, mask=col_ok, other=0)
    return K + page.to(tl.int64) * stride_kb + (pos // page_size) * stride_ks


def blocks_ignore_partial(length, n, bs, shared):
    return -(-n // bs), False


def blocks_no_cow(length, n, bs, shared):
    return -(-(length + n) // bs) - -(-length // bs), False


def last_page_mod(kv_lens, page):  # the buggy formula
    return kv_lens % page


def last_page_plus_one(kv_lens, page):
    return kv_lens % page + 1


@triton.jit
def split_unclipped(split, split_size, seqlen_k):
    return split * split_size, split * split_size + split_size


@triton.jit
def split_shifted(split, split_size, seqlen_k):
    lo = split * split_size + 1
    return lo, tl.minimum(seqlen_k, lo + split_size)


@triton.jit
def finish_plus_inf(m_i, l_i, acc):
    empty = l_i == 0.0
    out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, l_i)[:, None])
    return out, tl.where(empty, float("inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))


@triton.jit
def finish_unguarded(m_i, l_i, acc):
    return acc / l_i[:, None], m_i + tl.log(l_i)


@triton.jit
def combine_no_max(
    OACC,
    LACC,
    O,
    LSE,
    stride_as,
    stride_ab,
    stride_aq,
    stride_ah,
    stride_ls,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oq,
    stride_oh,
    stride_fb,
    stride_fh,
    num_splits,
    nheads,
    seqlen_q,
    headdim,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // (seqlen_q * nheads)
    t = (pid // nheads) % seqlen_q
    h = pid % nheads
    s = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    s_ok = s < num_splits
    lse = tl.load(LACC + s * stride_ls + b * stride_lb + h * stride_lh + t, mask=s_ok, other=float("-inf"))
    w = tl.exp(lse)  # overflows for large logits
    total = tl.sum(w, 0)
    parts = tl.load(
        OACC + s[:, None] * stride_as + b * stride_ab + t * stride_aq + h * stride_ah + dims[None, :],
        mask=s_ok[:, None] & (dims[None, :] < headdim),
        other=0.0,
    )
    tl.store(
        O + b * stride_ob + t * stride_oq + h * stride_oh + dims,
        tl.sum(w[:, None] * parts, 0) / total,
        mask=dims < headdim,
    )
    tl.store(LSE + b * stride_fb + h * stride_fh + t, tl.log(total))


@triton.jit
def combine_mean(
    OACC,
    LACC,
    O,
    LSE,
    stride_as,
    stride_ab,
    stride_aq,
    stride_ah,
    stride_ls,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oq,
    stride_oh,
    stride_fb,
    stride_fh,
    num_splits,
    nheads,
    seqlen_q,
    headdim,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // (seqlen_q * nheads)
    t = (pid // nheads) % seqlen_q
    h = pid % nheads
    s = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    s_ok = s < num_splits
    lse = tl.load(LACC + s * stride_ls + b * stride_lb + h * stride_lh + t, mask=s_ok, other=float("-inf"))
    parts = tl.load(
        OACC + s[:, None] * stride_as + b * stride_ab + t * stride_aq + h * stride_ah + dims[None, :],
        mask=s_ok[:, None] & (dims[None, :] < headdim),
        other=0.0,
    )
    tl.store(
        O + b * stride_ob + t * stride_oq + h * stride_oh + dims, tl.sum(parts, 0) / num_splits, mask=dims < headdim
    )
    tl.store(LSE + b * stride_fb + h * stride_fh + t, tl.max(lse, 0))


def decode_step_no_advance(q, k, v, kc, vc, lens, table):
    return fk.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, block_table=table, causal=True), lens


def decode_step_no_append(q, k, v, kc, vc, lens, table):
    return fk.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, block_table=table, causal=True), lens + 1


def snippet_as_found(x, wq, wk, wv, k_cache, v_cache, cache_seqlens):  # all three bugs
    b, d = x.shape[0], k_cache.shape[3]
    q = (x @ wq).view(b, 1, -1, d)
    n = int(cache_seqlens.max())
    out = fk.flash_attn_with_kvcache(q, k_cache[:, :n], v_cache[:, :n], cache_seqlens=cache_seqlens, causal=True)
    return out, cache_seqlens + 1


def snippet_projects_output(x, wq, wk, wv, k_cache, v_cache, cache_seqlens):
    b, d, hk = x.shape[0], k_cache.shape[3], k_cache.shape[2]
    q = (x @ wq).view(b, 1, -1, d)
    y = torch.einsum("bsd,de->bse", q.reshape(b, 1, -1), torch.eye(q.shape[2] * d, x.shape[-1]))
    k, v = (y @ wk).view(b, 1, hk, d), (y @ wv).view(b, 1, hk, d)
    out = fk.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, causal=True)
    return out, cache_seqlens + 1


def snippet_sliced_cache(x, wq, wk, wv, k_cache, v_cache, cache_seqlens):
    b, d, hk = x.shape[0], k_cache.shape[3], k_cache.shape[2]
    q, k, v = (x @ wq).view(b, 1, -1, d), (x @ wk).view(b, 1, hk, d), (x @ wv).view(b, 1, hk, d)
    n = int(cache_seqlens.max())
    out = fk.flash_attn_with_kvcache(q, k_cache[:, :n], v_cache[:, :n], k, v, cache_seqlens=cache_seqlens, causal=True)
    return out, cache_seqlens + 1


def rotary_default_layout(q, k, v, k_cache, v_cache, lens, cos, sin):  # the bug as shipped
    return fk.flash_attn_with_kvcache(
        q, k_cache, v_cache, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=lens, causal=True
    )


def rotary_queries_only(q, k, v, k_cache, v_cache, lens, cos, sin):
    q = apply_rotary(q, cos, sin, lens.long()[:, None], interleaved=False)
    return fk.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens, causal=True)


def quantize_unsigned_range(x, bits):  # 2^bits - 1 levels on each side: codes overflow the type
    qmax = 2**bits - 1
    scale = x.abs().amax(-1, keepdim=True) / qmax
    return torch.round(x / scale), scale


def quantize_floor(x, bits):  # truncates instead of rounding: errors up to a whole step
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax(-1, keepdim=True) / qmax
    return torch.floor(x / scale), scale


def quantize_per_tensor(x, bits):  # one scale for everything
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax() / qmax
    return torch.round(x / scale), scale


def quantize_unguarded(x, bits):  # a token of zeros divides by 0: NaN codes
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax(-1, keepdim=True) / qmax
    return torch.round(x / scale).clamp(-qmax, qmax), scale


def kivi_per_token(k, bits, group):  # scales over each token's channels: the outlier channel sets every scale
    t, c = k.shape
    zero = k.amin(1, keepdim=True).expand(t, c)
    scale = ((k.amax(1, keepdim=True) - k.amin(1, keepdim=True)) / (2**bits - 1)).expand(t, c)
    codes = torch.round((k - zero) / scale).clamp(0, 2**bits - 1)
    return codes, scale[::group].contiguous(), zero[::group].contiguous()


def kivi_symmetric(k, bits, group):  # no zero point: keys that are not centred lose half the levels
    t, c = k.shape
    groups = k.reshape(t // group, group, c)
    scale = groups.abs().amax(1) / (2 ** (bits - 1) - 1)
    codes = torch.round(groups / scale[:, None])
    return codes.reshape(t, c), scale, torch.zeros_like(scale)


@triton.jit
def dequantize_no_scale(x, scale, FP8_BITS: tl.constexpr):  # forgets the scale
    return x.to(tl.float32)


@triton.jit
def dequantize_bits_as_numbers(x, scale, FP8_BITS: tl.constexpr):  # e4m3 bytes read as integers 0..255
    return x.to(tl.float32) * scale


def bytes_keys_only(n_layers, nheads_k, headdim, bits, group, asymmetric):
    return n_layers * nheads_k * (headdim * bits / 8 + headdim // group * 2 * (2 if asymmetric else 1))


def bytes_no_zero_point(n_layers, nheads_k, headdim, bits, group, asymmetric):
    return 2 * n_layers * nheads_k * (headdim * bits / 8 + headdim // group * 2)


def window_w(sliding_window):  # the off-by-one: W keys back instead of W - 1
    return (-1, -1) if sliding_window is None else (sliding_window, 0)


def window_centered(sliding_window):  # a local window centred on the query, as in Longformer
    return (-1, -1) if sliding_window is None else (sliding_window // 2, sliding_window // 2)


def hf_attention_no_padding(query, key, value, attention_mask, scaling, sliding_window, softcap):
    return nb10.my_hf_attention(query, key, value, None, scaling, sliding_window, softcap)


def hf_attention_heads_first(query, key, value, attention_mask, scaling, sliding_window, softcap):
    return nb10.my_hf_attention(query, key, value, attention_mask, scaling, sliding_window, softcap).transpose(1, 2)


def hf_attention_window_w(query, key, value, attention_mask, scaling, sliding_window, softcap):
    return nb10.my_hf_attention(
        query, key, value, attention_mask, scaling, None if sliding_window is None else sliding_window + 1, softcap
    )


def pool_total_memory(total, weights, acts, kv, bs, u):  # forgets the utilization
    return nb11.kv_pool_blocks(total, weights, acts, kv, bs, 1.0)


def pool_no_refusal(total, weights, acts, kv, bs, u):  # a negative pool instead of an error
    return (int(total * u) - weights - acts) // (bs * kv)


def pool_no_activations(total, weights, acts, kv, bs, u):
    return nb11.kv_pool_blocks(total, weights, 0, kv, bs, u)


def radix_whole_edges(root, tokens):  # stops at the last node fully matched
    node, matched = root, 0
    while matched < len(tokens) and tokens[matched] in node.children:
        child = node.children[tokens[matched]]
        if list(tokens[matched : matched + len(child.tokens)]) != list(child.tokens):
            return matched
        matched += len(child.tokens)
        node = child
    return matched


def radix_first_token_only(root, tokens):  # trusts an edge once its first token matches
    node, matched = root, 0
    while matched < len(tokens) and tokens[matched] in node.children:
        node = node.children[tokens[matched]]
        matched += len(node.tokens)
    return min(matched, len(tokens))


def prefix_as_found(allocator, tokens, block_size):  # nano-vllm before PR #199
    blocks, parent = [], None
    for i in range(len(tokens) // block_size):
        key = nb11.block_hash(parent, tokens[i * block_size : (i + 1) * block_size])
        block = allocator.lookup(key)
        if block is None:
            break
        blocks.append(block)
        parent = key
    return blocks, len(blocks) * block_size


def prefix_trimmed_but_leaked(allocator, tokens, block_size):  # drops the last hit without releasing it
    blocks, cached = prefix_as_found(allocator, tokens, block_size)
    if blocks and cached >= len(tokens):
        blocks = blocks[:-1]
    return blocks, len(blocks) * block_size


def take_block_as_found(allocator):  # nano-vllm #163: the old key still maps to the block
    block, _ = allocator.free_list.popitem(last=False)
    allocator.ref_count[block] = 1
    return block


def take_block_half_forgotten(allocator):  # clears the block's key but not the key's block
    block, _ = allocator.free_list.popitem(last=False)
    allocator.hash_of.pop(block, None)
    allocator.ref_count[block] = 1
    return block


MISTAKES = {
    (nb01, "check_gqa_attention"): [gqa_no_scale, gqa_wrong_pairing],
    (nb01, "check_bottom_right_mask"): [mask_top_left, mask_strict],
    (nb01, "check_window_size_for"): [lambda w: (w, 0), lambda w: (-1, 0), lambda w: w - 1],
    (nb02, "check_append"): [append_at_zero, append_no_advance],
    (nb02, "check_decode_positions"): [positions_from_zero, positions_off_by_one],
    (nb02, "check_allocate_cache"): [cache_for_prompt, cache_one_short],
    (nb03, "check_window_update"): [window_keeps_w_cached, window_drops_context],
    (nb03, "check_window_cache_update"): [stuck_at_w_plus_1, keeps_w_minus_1],
    (nb04, "check_online_update"): [update_no_rescale, update_nan_on_masked],
    (nb04, "check_finalize"): [finalize_plain, finalize_minus_inf],
    (nb04, "check_merge_states"): [merge_averaged, merge_no_max],
    (nb05, "check_inner_loop"): [step_no_rescale, step_no_mask],
    (nb05, "check_key_range"): [key_range_all, key_range_top_left],
    (nb05, "check_copy_tile"): [copy_rows_masked_only, copy_load_unmasked],
    (nb05, "check_pack_rows"): [pack_swapped, pack_no_kv_offset],
    (nb06, "check_paged_rows"): [paged_ignores_table, paged_swapped],
    (nb06, "check_blocks_to_append"): [blocks_ignore_partial, blocks_no_cow],
    (nb06, "check_last_page_len"): [last_page_mod, last_page_plus_one],
    (nb07, "check_split_range"): [split_unclipped, split_shifted],
    (nb07, "check_finish_split"): [finish_plus_inf, finish_unguarded],
    (nb07, "check_combine_kernel"): [combine_no_max, combine_mean],
    (nb08, "check_decode_step"): [decode_step_no_advance, decode_step_no_append],
    (nb08, "check_attention_step"): [snippet_as_found, snippet_projects_output, snippet_sliced_cache],
    (nb08, "check_rotary_decode"): [rotary_default_layout, rotary_queries_only],
    (nb09, "check_quantize_symmetric"): [
        quantize_unsigned_range,
        quantize_floor,
        quantize_per_tensor,
        quantize_unguarded,
    ],
    (nb09, "check_quantize_keys_per_channel"): [kivi_per_token, kivi_symmetric],
    (nb09, "check_cache_bytes_per_token"): [bytes_keys_only, bytes_no_zero_point],
    (nb09, "check_dequantize"): [dequantize_no_scale, dequantize_bits_as_numbers],
    (nb10, "check_hf_window_size"): [window_w, window_centered],
    (nb10, "check_my_hf_attention"): [hf_attention_no_padding, hf_attention_heads_first, hf_attention_window_w],
    (nb11, "check_kv_pool_blocks"): [pool_total_memory, pool_no_refusal, pool_no_activations],
    (nb11, "check_radix_match"): [radix_whole_edges, radix_first_token_only],
    (nb11, "check_cached_prefix"): [prefix_as_found, prefix_trimmed_but_leaked],
    (nb11, "check_take_free_block"): [take_block_as_found, take_block_half_forgotten],
}

EXERCISES = [(module_for(stem), e) for stem in NOTEBOOKS for e in module_for(stem).EXERCISES]


def _id(entry):
    return entry[1].name


@pytest.mark.parametrize("entry", EXERCISES, ids=_id)
def test_the_solution_passes(entry, capsys):
    module, ex = entry
    assert getattr(module, ex.check)(getattr(module, ex.name)) is True
    assert capsys.readouterr().out.startswith(f"{ex.check}: PASS (")


@pytest.mark.parametrize("entry", EXERCISES, ids=_id)
def test_the_stub_is_not_attempted_yet(entry, capsys):
    module, ex = entry
    assert getattr(module, ex.check)(TRITON_STUBS[ex.name] if ex.triton else stub) is None
    assert capsys.readouterr().out.startswith(f"{ex.check}: not attempted yet")


PLANTED = [(m, c, i, f) for (m, c), fs in MISTAKES.items() for i, f in enumerate(fs)]


@pytest.mark.parametrize("module, check, i, mistake", PLANTED, ids=[f"{c}-{i}" for _, c, i, _ in PLANTED])
def test_a_planted_mistake_fails(module, check, i, mistake, capsys):
    assert getattr(module, check)(mistake) is False
    out = capsys.readouterr().out
    assert out.startswith(f"{check}: FAIL on "), out


def test_every_check_has_two_planted_mistakes():
    checks = {(module_for(stem), e.check) for stem in NOTEBOOKS for e in module_for(stem).EXERCISES}
    assert checks == set(MISTAKES) and all(len(v) >= 2 for v in MISTAKES.values())


def test_the_course_has_enough_practice():
    ex = all_exercises()
    assert len(ex) >= 24 and sum(e.triton for e in ex) >= 8 and sum(e.bug_hunt for e in ex) >= 6
    assert all(e.source.startswith("https://") for e in ex if e.bug_hunt)
    for stem in NOTEBOOKS:
        assert 2 <= len(module_for(stem).EXERCISES) <= 4


def test_notebooks_ship_stubs_with_tags_and_the_readme_table_is_current():
    """Each exercise is a stub cell tagged ``exercise`` (bug hunts also ``bug-hunt``) that
    raises NotImplementedError, followed by its check; the README holds the current table."""
    from flashkv_edu.teach.__main__ import defined_name

    for stem in NOTEBOOKS:
        nb = json.loads((ROOT / "notebooks" / f"{stem}.ipynb").read_text())
        cells = nb["cells"]
        module = module_for(stem)
        found = {}
        for i, cell in enumerate(cells):
            tags = cell.get("metadata", {}).get("tags", [])
            if "exercise" in tags:
                src = "".join(cell["source"])
                name = defined_name(src)
                found[name] = ("bug-hunt" in tags, src, "".join(cells[i + 1]["source"]))
        want = {e.name: e for e in module.EXERCISES}
        assert set(found) == set(want), stem
        for name, (bug, src, check_src) in found.items():
            assert bug == want[name].bug_hunt, name
            assert want[name].check in check_src, name
            assert "raise NotImplementedError" in src, name
            if bug:
                assert want[name].source in "".join("".join(c["source"]) for c in cells), name
    assert exercise_table() in (ROOT / "README.md").read_text()


def test_solutions_command_writes_solved_copies(tmp_path):
    """The instructors' command on one notebook, without executing (the nbval test below runs
    the executed copies)."""
    run = subprocess.run(
        [sys.executable, "-m", "flashkv_edu.teach", "solutions", str(tmp_path), "--no-execute"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    nb = json.loads((tmp_path / "01_naive_attention.ipynb").read_text())
    cells = [c for c in nb["cells"] if "exercise" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 3 and not any("NotImplementedError" in "".join(c["source"]) for c in cells)
    nb = json.loads((tmp_path / "11_when_the_cache_does_not_fit.ipynb").read_text())
    solved = ["".join(c["source"]) for c in nb["cells"] if "bug-hunt" in c.get("metadata", {}).get("tags", [])]
    assert solved[0].startswith("from flashkv_edu.paged import block_hash")  # what the function needs is kept
    assert "(len(tokens) - 1) // block_size" in solved[0]


def test_the_shipped_buggy_code_fails_its_check(capsys):
    """A bug hunt starts from the real buggy code: with the `raise` line deleted and nothing
    else changed, its check fails and names the failing case."""
    for stem in NOTEBOOKS:
        module = module_for(stem)
        nb = json.loads((ROOT / "notebooks" / f"{stem}.ipynb").read_text())
        for cell in nb["cells"]:
            if "bug-hunt" not in cell.get("metadata", {}).get("tags", []):
                continue
            src = "\n".join(
                line for line in "".join(cell["source"]).splitlines() if "raise NotImplementedError" not in line
            )
            namespace = {"torch": torch, "fk": fk, "triton": triton, "tl": tl}
            exec(src, namespace)
            from flashkv_edu.teach.__main__ import defined_name

            name = defined_name(src)
            ex = next(e for e in module.EXERCISES if e.name == name)
            assert getattr(module, ex.check)(namespace[name]) is False, name
            assert capsys.readouterr().out.startswith(f"{ex.check}: FAIL on "), name


def test_every_picture_reads_at_full_zoom():
    """Stored figures are at least 900 px wide (JupyterLab shows them 1:1), and no text in the
    teaching files or notebooks is set below 10 points."""
    import base64
    import json
    import re
    import struct

    root = Path(__file__).resolve().parents[1]
    narrow = []
    for path in sorted((root / "notebooks").glob("*.ipynb")):
        for i, cell in enumerate(json.loads(path.read_text())["cells"]):
            for out in cell.get("outputs", []):
                png = out.get("data", {}).get("image/png")
                if png:
                    width = struct.unpack(">I", base64.b64decode(png)[16:20])[0]
                    if width < 900:
                        narrow.append((path.name, i, width))
    assert not narrow, f"figures narrower than 900 px: {narrow}"
    sources = [*(root / "flashkv_edu" / "teach").glob("nb*.py"), *(root / "notebooks").glob("*.ipynb")]
    small = [(p.name, m) for p in sources for m in re.findall(r"fontsize=\s*([0-9.]+)", p.read_text()) if float(m) < 10]
    assert not small, f"text below 10 points: {small}"
    from flashkv_edu import runtime

    runtime.setup_notebook()
    import matplotlib

    rc = matplotlib.rcParams
    assert rc["figure.figsize"][0] * rc["figure.dpi"] >= 900 and rc["font.size"] >= 10
    assert all(rc[k] >= 10 for k in ("xtick.labelsize", "ytick.labelsize", "legend.fontsize", "axes.labelsize"))
