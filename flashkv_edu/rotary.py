"""Rotary position embeddings (RoPE) with FlashAttention's table layout.

``cos``/``sin`` tables are ``(seqlen, rotary_dim / 2)``. A pair of features ``(x1, x2)`` with
frequency slot ``m`` at position ``p`` becomes ``(x1 cos - x2 sin, x1 sin + x2 cos)``. Pairs are
features ``(2m, 2m+1)`` when ``interleaved`` (GPT-J style, FlashAttention's default) and
``(m, m + rotary_dim/2)`` otherwise (GPT-NeoX / Llama style). Features past ``rotary_dim``
pass through unchanged.
"""

from __future__ import annotations

import torch

from .validation import ArgumentError

__all__ = [
    "apply_rotary",
    "rotary_tables",
]


def rotary_tables(
    seqlen: int, rotary_dim: int, base: float = 10000.0, *, dtype=torch.float32, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` of shape ``(seqlen, rotary_dim // 2)`` for angles ``p * base^(-2m/rotary_dim)``."""
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ArgumentError(f"rotary_dim must be a positive even number, got {rotary_dim}")
    inv_freq = base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64, device=device) / rotary_dim)
    angles = torch.arange(seqlen, dtype=torch.float64, device=device)[:, None] * inv_freq[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, *, interleaved: bool = False
) -> torch.Tensor:
    """Rotate ``x`` ``(batch, seqlen, nheads, headdim)`` at integer ``positions``
    ``(batch, seqlen)``. Computed in fp32 and rounded back to ``x``'s dtype; returns a new tensor.

    A position at or past the tables' last row rotates by the identity (cos 1, sin 0), as
    FlashAttention's rotary kernel gives it: its loads of ``cos``/``sin`` are masked to the table
    with 1 and 0 as the fill. (Causal queries after a short append reach such rows: query ``i``
    sits at ``cache_seqlens + i`` while the table need only cover the cache.)"""
    rot = 2 * cos.shape[1]
    if rot > x.shape[-1]:
        raise ArgumentError(f"rotary_dim {rot} (2 * cos.shape[1]) must be <= headdim {x.shape[-1]}")
    inside = (positions < cos.shape[0])[:, :, None, None]
    row = positions.clamp(max=cos.shape[0] - 1)
    c = torch.where(inside, cos[row].float()[:, :, None, :], 1.0)  # (batch, seqlen, 1, rot/2)
    s = torch.where(inside, sin[row].float()[:, :, None, :], 0.0)
    xf = x.float()
    head, tail = xf[..., :rot], xf[..., rot:]
    if interleaved:
        x1, x2 = head[..., 0::2], head[..., 1::2]
        rotated = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = head[..., : rot // 2], head[..., rot // 2 :]
        rotated = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((rotated, tail), dim=-1).to(x.dtype)
