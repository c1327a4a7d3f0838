"""Cascade attention and tree attention: one prefix under many query rows (notebook 14).

**Cascade** (FlashInfer's ``MultiLevelCascadeAttentionWrapper``; vLLM V1, PR #11635). ``B``
sequences share a long prefix and each has its own suffix. Per-row attention reads the prefix
``B`` times. Cascade attends the prefix once, all ``B`` decode queries as the rows of one
sequence with no causal mask (every query comes after the whole prefix), then each row's suffix,
and merges the two partial states by their log-sum-exp (:func:`~flashkv_edu.online_softmax.merge_states`,
notebook 04). The bytes read fall from ``B (P + S)`` to ``P + B S`` token slots.

**Tree attention** (SpecInfer, Medusa, EAGLE). A tree of draft tokens is verified in one call:
node ``i`` sits at position ``L + depth(i)`` and sees the ``L`` cached tokens and its ancestors
(itself included), the ancestor matrix. Here too the cache part (every node sees all of it) and
the tree part (the mask) are two states merged by LSE. The accepted path's keys and values are
then copied into place, one after another (compaction).
"""

from __future__ import annotations

import torch

from .api import flash_attn_with_kvcache
from .online_softmax import merge_states
from .rotary import apply_rotary
from .validation import ArgumentError, check_tensor

__all__ = [
    "TreeContext",
    "accept_tree",
    "ancestor_mask",
    "cascade_attention",
    "cascade_bytes",
    "masked_state",
    "tree_depths",
]


def cascade_attention(q, prefix_k, prefix_v, suffix_k, suffix_v, suffix_lens, **kwargs):
    """Decode attention of ``q`` ``(B, 1, h, d)`` over a shared prefix ``prefix_k``/``prefix_v``
    ``(1, P, h_k, d)`` and per-row suffixes ``(B, S, h_k, d)`` with ``suffix_lens`` ``(B,)`` int32
    (0 allowed). Returns ``out`` ``(B, 1, h, d)`` and ``lse`` ``(B, h, 1)``."""
    check_tensor("q", q, ndim=4)
    if q.shape[1] != 1:
        raise ArgumentError(f"cascade_attention takes one decode query per row, got seqlen_q={q.shape[1]}")
    if prefix_k.shape[0] != 1:
        raise ArgumentError(f"prefix_k must hold one shared prefix (batch 1), got batch {prefix_k.shape[0]}")
    rows = q.transpose(0, 1)  # (1, B, h, d): the B queries as rows of one sequence
    out_p, lse_p = flash_attn_with_kvcache(rows, prefix_k, prefix_v, causal=False, return_softmax_lse=True, **kwargs)
    out_s, lse_s = flash_attn_with_kvcache(
        q, suffix_k, suffix_v, cache_seqlens=suffix_lens, causal=True, return_softmax_lse=True, **kwargs
    )
    return merge_states(out_p.transpose(0, 1), lse_p.permute(2, 1, 0), out_s, lse_s)


def cascade_bytes(batch: int, prefix: int, suffix: int, token_bytes: int) -> tuple[int, int]:
    """KV bytes read by per-row attention and by cascade attention (``token_bytes`` per token)."""
    return batch * (prefix + suffix) * token_bytes, (prefix + batch * suffix) * token_bytes


def tree_depths(parents: list[int]) -> list[int]:
    """Depth of each node of a tree given parent-before-child (``parents[0] == -1``: the root)."""
    depths = []
    for i, p in enumerate(parents):
        if (i == 0) != (p == -1) or p >= i:
            raise ArgumentError(
                f"parents must list the root first (-1) and each parent before its child, got {parents}"
            )
        depths.append(0 if p == -1 else depths[p] + 1)
    return depths


def ancestor_mask(parents: list[int]) -> torch.Tensor:
    """``(n, n)`` bool: node ``i`` may attend node ``j`` when ``j`` is ``i`` or one of its ancestors."""
    tree_depths(parents)
    n = len(parents)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        j = i
        while j != -1:
            mask[i, j] = True
            j = parents[j]
    return mask


def masked_state(q, k, v, mask, scale: float):
    """Attention state of ``q`` ``(1, n, h, d)`` over ``k``/``v`` ``(1, n, h_k, d)`` where ``mask``
    ``(n, n)`` allows it: ``(out (1, n, h, d), lse (1, h, n))``."""
    group = q.shape[2] // k.shape[2]
    qh = q.transpose(1, 2).float()
    kh, vh = (x.transpose(1, 2).repeat_interleave(group, 1).float() for x in (k, v))
    scores = (qh @ kh.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    out = torch.softmax(scores, -1) @ vh
    return out.transpose(1, 2).to(q.dtype), lse


class TreeContext:
    """Attention for ``TinyDecoder.run`` over tree nodes ``(1, n)`` after ``length`` cached tokens
    of row ``row`` of per-layer contiguous caches: the nodes are rotated at ``length + depth``,
    attend the whole cache (one call, no causal mask) and their ancestors (the mask), merged. The
    nodes' rotated keys and values are kept per layer (``nodes[layer]``) for :meth:`compact`."""

    def __init__(self, caches, row: int, length: int, parents: list[int], rope):
        self.caches, self.row, self.length, self.rope = caches, row, length, rope
        self.mask = ancestor_mask(parents)
        self.positions = (length + torch.tensor(tree_depths(parents)))[None]
        self.nodes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def attend(self, layer, q, k, v):
        q, k = apply_rotary(q, *self.rope, self.positions), apply_rotary(k, *self.rope, self.positions)
        self.nodes[layer] = (k, v)
        c = self.caches[layer]
        scale = q.shape[-1] ** -0.5
        idx = torch.tensor([self.row], dtype=torch.int32)
        lens = torch.tensor([self.length], dtype=torch.int32)
        out_c, lse_c = flash_attn_with_kvcache(q, c.k_cache, c.v_cache, cache_seqlens=lens, cache_batch_idx=idx,
                                               causal=False, return_softmax_lse=True)  # fmt: skip
        out_t, lse_t = masked_state(q, k, v, self.mask, scale)
        return merge_states(out_c, lse_c, out_t, lse_t)[0]

    def compact(self, path: list[int]) -> None:
        """Write the accepted ``path`` (node indices, root first)'s keys and values into the cache
        after the ``length`` cached tokens, in order, and set the row's length."""
        index = torch.tensor(path)
        for layer, (k, v) in self.nodes.items():
            c = self.caches[layer]
            c.k_cache[self.row, self.length : self.length + len(path)] = k[0, index]
            c.v_cache[self.row, self.length : self.length + len(path)] = v[0, index]
            c.cache_seqlens[self.row] = self.length + len(path)


def accept_tree(tokens: list[int], parents: list[int], logits: torch.Tensor) -> tuple[list[int], int]:
    """Greedy acceptance over a tree: from the root, follow the child whose token is the target's
    argmax at its parent. Returns the accepted path (node indices, root first) and the target's
    token after it."""
    choice = logits.argmax(-1).tolist()
    path = [0]
    while True:
        children = [i for i, p in enumerate(parents) if p == path[-1] and tokens[i] == choice[path[-1]]]
        if not children:
            return path, choice[path[-1]]
        path.append(children[0])
