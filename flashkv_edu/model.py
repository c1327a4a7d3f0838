"""A tiny decoder-only transformer that decodes with or without a KV cache (notebook 02).

Pre-norm blocks (RMSNorm, GQA attention with rotary or learned positions, SiLU MLP). With a
cache, attention goes through :func:`flashkv_edu.attention_ref` with a bottom-right causal mask,
so a step of ``s`` new tokens against ``L`` cached ones is exactly the last ``s`` rows of full
attention; without one, through PyTorch's fused causal SDPA (the fastest uncached path).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .cache import KVCache, check_seq_idx
from .reference import attention_ref
from .rotary import apply_rotary, rotary_tables
from .validation import ArgumentError, ArgumentTypeError

__all__ = [
    "Attention",
    "Block",
    "CacheContext",
    "FullContext",
    "ModelConfig",
    "TinyDecoder",
]


@dataclass(frozen=True)
class ModelConfig:
    """Shape of :class:`TinyDecoder`. ``n_kv_heads`` must divide ``n_heads``."""

    vocab_size: int = 96
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    max_seqlen: int = 2048
    positions: str = "rotary"  # or "learned"
    mlp_ratio: int = 4

    @property
    def headdim(self) -> int:
        return self.dim // self.n_heads

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ArgumentError(f"dim ({self.dim}) must be a multiple of n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ArgumentError(f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})")
        if self.positions not in ("rotary", "learned"):
            raise ArgumentError(f"positions must be 'rotary' or 'learned', got {self.positions!r}")


class Attention(nn.Module):
    """GQA self-attention. Projections live here; *how* attention is computed (with or without a
    cache, rotary applied where) is the job of the context object ``ctx`` (see ``FullContext``
    and ``CacheContext`` below, and :mod:`flashkv_edu.serving` for the paged one)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.headdim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.wo = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=False)

    def forward(self, x, ctx, layer: int):
        b, s, _ = x.shape
        hd = self.cfg.headdim
        q = self.wq(x).view(b, s, self.cfg.n_heads, hd)
        k = self.wk(x).view(b, s, self.cfg.n_kv_heads, hd)
        v = self.wv(x).view(b, s, self.cfg.n_kv_heads, hd)
        return self.wo(ctx.attend(layer, q, k, v).reshape(b, s, -1))


class FullContext:
    """No cache: the tokens are a whole sequence from position 0, attended with PyTorch's
    fused ``scaled_dot_product_attention`` (causal), the fastest uncached path and the honest
    baseline for the cache (differentiable, so training uses it too)."""

    def __init__(self, positions, rope, training: bool):
        self.positions, self.rope, self.training = positions, rope, training

    def attend(self, layer, q, k, v):
        if self.rope is not None:
            q, k = apply_rotary(q, *self.rope, self.positions), apply_rotary(k, *self.rope, self.positions)
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
        )
        return out.transpose(1, 2)  # top-left causal == bottom-right here: seqlen_q == seqlen_k


class CacheContext:
    """Contiguous :class:`KVCache` per layer: append the new keys/values, attend over the cache."""

    def __init__(self, cache: list[KVCache], rows, positions, rope):
        self.cache, self.rows, self.positions, self.rope = cache, rows, positions, rope

    def attend(self, layer, q, k, v):
        if self.rope is not None:
            q, k = apply_rotary(q, *self.rope, self.positions), apply_rotary(k, *self.rope, self.positions)
        c = self.cache[layer]
        c.append(k, v, seq_idx=self.rows)
        return attention_ref(
            q, c.k_cache[self.rows], c.v_cache[self.rows], causal=True, seqlens_k=c.cache_seqlens[self.rows]
        )


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.dim)
        self.attn = Attention(cfg)
        self.norm2 = nn.RMSNorm(cfg.dim)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.dim, cfg.mlp_ratio * cfg.dim, bias=False),
            nn.SiLU(),
            nn.Linear(cfg.mlp_ratio * cfg.dim, cfg.dim, bias=False),
        )

    def forward(self, x, ctx, layer: int):
        x = x + self.attn(self.norm1(x), ctx, layer)
        return x + self.mlp(self.norm2(x))


class TinyDecoder(nn.Module):
    """Decoder-only transformer: ``forward(tokens, cache=None)`` returns logits
    ``(batch, seqlen, vocab_size)``; ``generate`` decodes greedily with or without a cache."""

    def __init__(self, cfg: ModelConfig, *, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_embed = nn.Embedding(cfg.max_seqlen, cfg.dim) if cfg.positions == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        torch.random.set_rng_state(gen_state)
        if cfg.positions == "rotary":
            cos, sin = rotary_tables(cfg.max_seqlen, cfg.headdim)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.eval()

    def new_cache(self, batch: int, max_seqlen: int | None = None, *, growable: bool = False) -> list[KVCache]:
        """One :class:`KVCache` per layer, sized for this model."""
        cap = max_seqlen or self.cfg.max_seqlen
        dtype, device = self.head.weight.dtype, self.head.weight.device
        return [
            KVCache(batch, cap, self.cfg.n_kv_heads, self.cfg.headdim, dtype=dtype, device=device, growable=growable)
            for _ in range(self.cfg.n_layers)
        ]

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, cache: list[KVCache] | None = None, seq_idx=None) -> torch.Tensor:
        """Logits for ``tokens`` ``(n, s)``. Without a cache the tokens are a whole sequence
        from position 0. With a cache they are the next ``s`` tokens of sequences ``seq_idx``
        (default: all), placed after what the cache already holds."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype.is_floating_point:
            raise ArgumentTypeError("tokens must be an integer tensor of shape (batch, seqlen)")
        if tokens.dtype == torch.bool or tokens.numel() == 0:
            raise ArgumentError(f"tokens must be a non-empty integer tensor, got {tokens.dtype} {tuple(tokens.shape)}")
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.cfg.vocab_size:
            raise ArgumentError(f"tokens must lie in [0, {self.cfg.vocab_size}) (the vocabulary)")
        n, s = tokens.shape
        if cache is None:
            rows = None
            positions = torch.arange(s, device=tokens.device).expand(n, s)
        else:
            if len(cache) != self.cfg.n_layers:
                raise ArgumentError(f"cache must hold {self.cfg.n_layers} layers, got {len(cache)}")
            rows = check_seq_idx(seq_idx, cache[0].batch, tokens.device)
            if rows.numel() != n:
                raise ArgumentError(f"tokens has {n} rows but seq_idx selects {rows.numel()} sequences")
            start = cache[0].cache_seqlens[rows].long()
            if not cache[0].growable and int(start.max()) + s > cache[0].capacity:
                raise ArgumentError(f"cache overflow: {int(start.max())} + {s} tokens > capacity {cache[0].capacity}")
            positions = start[:, None] + torch.arange(s, device=tokens.device)[None, :]
        ctx = (
            FullContext(positions, self.rope(), training=False)
            if cache is None
            else CacheContext(cache, rows, positions, self.rope())
        )
        return self.run(tokens, positions, ctx)

    def rope(self):
        """The ``(cos, sin)`` rotary tables, or None with learned positions."""
        return (self.rope_cos, self.rope_sin) if self.cfg.positions == "rotary" else None

    def run(self, tokens: torch.Tensor, positions: torch.Tensor, ctx) -> torch.Tensor:
        """Embed ``tokens`` at ``positions`` (both ``(n, s)``), run the blocks with attention
        context ``ctx``, return logits ``(n, s, vocab_size)``."""
        if int(positions.max()) >= self.cfg.max_seqlen:
            raise ArgumentError(f"position {int(positions.max())} exceeds max_seqlen {self.cfg.max_seqlen}")
        x = self.embed(tokens)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        for layer, block in enumerate(self.blocks):
            x = block(x, ctx, layer)
        return self.head(self.norm(x))

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of ``tokens`` ``(n, s)`` (differentiable, for training)."""
        n, s = tokens.shape
        positions = torch.arange(s - 1, device=tokens.device).expand(n, s - 1)
        logits = self.run(tokens[:, :-1], positions, FullContext(positions, self.rope(), training=True))
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens: int, *, use_cache: bool = True) -> list[list[int]]:
        """Greedy decoding. ``prompts`` is a list of token-id lists (lengths may differ) or an
        integer tensor ``(batch, seqlen)``. Returns the new token ids of each prompt.

        Without a cache every step re-runs the whole sequence. With a cache each prompt is
        prefilled into its own cache row, then all sequences decode together, one token per
        step, each at its own length (a ragged batch).
        """
        if isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ArgumentError("prompts must be a non-empty list of non-empty token lists")
        device = self.head.weight.device
        seqs = [list(p) for p in prompts]
        if not use_cache:
            for _ in range(max_new_tokens):
                for seq in seqs:
                    logits = self(torch.tensor([seq], device=device))
                    seq.append(int(logits[0, -1].argmax()))
        else:
            longest = max(len(p) for p in prompts) + max_new_tokens
            cache = self.new_cache(len(seqs), longest)
            nxt = []
            for i, seq in enumerate(seqs):  # prefill: one row at a time, lengths differ
                logits = self(torch.tensor([seq], device=device), cache, seq_idx=[i])
                nxt.append(int(logits[0, -1].argmax()))
            for step in range(max_new_tokens):
                for seq, t in zip(seqs, nxt, strict=True):
                    seq.append(t)
                if step == max_new_tokens - 1:
                    break
                logits = self(torch.tensor(nxt, device=device)[:, None], cache)  # decode: 1 token each
                nxt = logits[:, -1].argmax(-1).tolist()
        return [seq[len(p) :] for seq, p in zip(seqs, prompts, strict=True)]
