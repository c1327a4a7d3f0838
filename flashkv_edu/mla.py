"""Multi-head latent attention's cache (DeepSeek-V2, arXiv 2405.04434; notebook 13).

MLA caches, per token and layer, one **latent** vector ``c`` of ``latent`` values (the keys and
values of every head are linear functions of it) and one small rotary key ``k_pe`` of ``rope``
values shared by the heads: ``latent + rope`` values instead of MHA's ``2 * nheads * headdim``.

Head ``h`` scores key ``j`` with ``q_nope[h] . (W_uk[h] c_j) + q_pe[h] . k_pe_j`` and reads value
``W_uv[h] c_j``. Two ways to compute the same thing:

* **naive**: decompress every cached token's keys ``(nheads, nope + rope)`` and values
  ``(nheads, v)`` and run ordinary attention (``headdim_v != headdim``);
* **absorbed**: move ``W_uk`` onto the query, ``q_lat[h] = W_uk[h]^T q_nope[h]`` (``latent``
  values), so the scores are ``q_lat . c + q_pe . k_pe``: multi-query attention with one KV head
  whose "key" is ``k_pe`` and whose "value" is ``c`` itself, which is FlashAttention 3's
  ``flash_attn_with_kvcache(q_pe, k_pe, c, qv=q_lat)`` (``headdim = rope``, ``headdim_v = latent``);
  ``W_uv`` is applied to the output afterwards. The cache is read once for all heads.

The softmax scale is the naive one, ``(nope + rope) ** -0.5``, passed explicitly (FA3's default
with ``qv`` is ``(rope + latent) ** -0.5``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import fa3
from .api import flash_attn_with_kvcache
from .rotary import apply_rotary
from .validation import ArgumentError, check_int

__all__ = ["MLAConfig", "MLALayer", "kv_values_per_token", "memory_table"]


@dataclass(frozen=True)
class MLAConfig:
    """Shape of an MLA layer: model width ``dim``, ``nheads``, the latent width, the no-rotary and
    rotary parts of a query/key head, and the value head width."""

    dim: int = 64
    nheads: int = 4
    latent: int = 32
    nope: int = 16
    rope: int = 8
    v: int = 16

    def __post_init__(self):
        for name in ("dim", "nheads", "latent", "nope", "rope", "v"):
            check_int(name, getattr(self, name), low=1)
        if self.rope % 2:
            raise ArgumentError(f"rope must be even (rotary pairs), got {self.rope}")


class MLALayer(nn.Module):
    """The projections of one MLA attention layer (random weights) and both ways to attend."""

    def __init__(self, cfg: MLAConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        g = torch.Generator().manual_seed(seed)

        def w(n_in, n_out):
            return nn.Parameter(torch.randn(n_out, n_in, generator=g) / n_in**0.5, requires_grad=False)

        h = cfg.nheads
        self.w_q = w(cfg.dim, h * (cfg.nope + cfg.rope))
        self.w_dkv = w(cfg.dim, cfg.latent)  # down-projection to the latent
        self.w_kr = w(cfg.dim, cfg.rope)  # the shared rotary key
        self.w_uk = w(cfg.latent, h * cfg.nope)  # up-projections
        self.w_uv = w(cfg.latent, h * cfg.v)

    def latents(self, x, positions, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """What the cache holds for tokens ``x`` ``(b, s, dim)`` at ``positions`` ``(b, s)``:
        ``c`` ``(b, s, latent)`` and the rotated ``k_pe`` ``(b, s, rope)``."""
        c = x @ self.w_dkv.T
        k_pe = apply_rotary((x @ self.w_kr.T)[:, :, None], cos, sin, positions)[:, :, 0]
        return c, k_pe

    def queries(self, x, positions, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """``q_nope`` ``(b, s, nheads, nope)`` and the rotated ``q_pe`` ``(b, s, nheads, rope)``."""
        cfg = self.cfg
        q = (x @ self.w_q.T).view(*x.shape[:2], cfg.nheads, cfg.nope + cfg.rope)
        return q[..., : cfg.nope], apply_rotary(q[..., cfg.nope :].contiguous(), cos, sin, positions)

    @property
    def scale(self) -> float:
        return (self.cfg.nope + self.cfg.rope) ** -0.5

    def naive(self, q_nope, q_pe, c, k_pe, cache_seqlens, **kwargs):
        """Decompress the cache and attend: ``c`` ``(b, L, latent)``, ``k_pe`` ``(b, L, rope)``.
        Returns ``(b, s, nheads, v)``."""
        cfg = self.cfg
        b, L = c.shape[:2]
        k_nope = (c @ self.w_uk.T).view(b, L, cfg.nheads, cfg.nope)
        k = torch.cat((k_nope, k_pe[:, :, None].expand(b, L, cfg.nheads, cfg.rope)), -1)
        v = (c @ self.w_uv.T).view(b, L, cfg.nheads, cfg.v)
        q = torch.cat((q_nope, q_pe), -1)
        return flash_attn_with_kvcache(q, k, v, cache_seqlens=cache_seqlens, softmax_scale=self.scale, **kwargs)

    def absorbed(self, q_nope, q_pe, c, k_pe, cache_seqlens, **kwargs):
        """Attend over the latent cache itself (one KV head, FA3's ``qv``). Returns ``(b, s,
        nheads, v)``."""
        cfg = self.cfg
        w_uk = self.w_uk.view(cfg.nheads, cfg.nope, cfg.latent)
        q_lat = torch.einsum("bshn,hnl->bshl", q_nope, w_uk)
        out = fa3.flash_attn_with_kvcache(
            q_pe, k_pe[:, :, None].contiguous(), c[:, :, None].contiguous(), qv=q_lat, cache_seqlens=cache_seqlens,
            softmax_scale=self.scale, **kwargs,
        )  # fmt: skip
        w_uv = self.w_uv.view(cfg.nheads, cfg.v, cfg.latent)
        return torch.einsum("bshl,hvl->bshv", out, w_uv)


def kv_values_per_token(
    kind: str, *, nheads: int, headdim: int, groups: int = 1, latent: int = 0, rope: int = 0
) -> int:
    """Values cached per token and layer: MHA ``2 h d``, GQA ``2 g d``, MQA ``2 d``, MLA ``latent +
    rope``."""
    if kind == "MHA":
        return 2 * nheads * headdim
    if kind == "GQA":
        return 2 * groups * headdim
    if kind == "MQA":
        return 2 * headdim
    if kind == "MLA":
        return latent + rope
    raise ArgumentError(f"kind must be MHA, GQA, MQA or MLA, got {kind!r}")


def memory_table(layers: int = 60, nheads: int = 128, headdim: int = 128, groups: int = 8, latent: int = 512,
                 rope: int = 64, itemsize: int = 2) -> list[dict]:  # fmt: skip
    """KV bytes per token for DeepSeek-V2's shape (60 layers, 128 heads of 128, latent 512 + rope
    64, bf16) under each kind of attention, and what MLA is worth in GQA groups."""
    rows = []
    for kind in ("MHA", "GQA", "MQA", "MLA"):
        n = kv_values_per_token(kind, nheads=nheads, headdim=headdim, groups=groups, latent=latent, rope=rope)
        rows.append(dict(kind=kind if kind != "GQA" else f"GQA ({groups} groups)", values=n,
                         bytes_per_token=n * layers * itemsize, groups_equivalent=n / (2 * headdim)))  # fmt: skip
    return rows
