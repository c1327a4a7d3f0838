"""How much KV cache fits: a memory budget sized the way vLLM sizes its block pool (notebook 11).

A serving engine loads the weights, runs one step with the most tokens a step may hold
(``max_batched_tokens``) and measures its activation peak, then gives what is left of
``utilization * total`` to KV blocks, all allocated up front:

    num_blocks = floor((utilization * total - weights - activation peak) / block_bytes)
    block_bytes = block_size * kv_bytes_per_token
    kv_bytes_per_token = num_layers * nheads_k * (headdim + headdim_v) * dtype_bytes

A pool sized this way never runs out of memory mid-step: what it can run out of is *blocks*
(:class:`~flashkv_edu.paged.OutOfBlocksError`), and the serving loop answers that by queueing
or preempting (:mod:`flashkv_edu.serving`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .profiling import measure_allocations
from .validation import ArgumentError, ArgumentTypeError, check_int, check_positive

__all__ = [
    "LLAMA_3_8B",
    "Budget",
    "ModelShape",
    "crossover_tokens",
    "measure_step_activations",
    "plan_budget",
    "prefill_flops",
    "profile_budget",
    "recompute_seconds",
    "shape_of",
    "swap_seconds",
]


@dataclass(frozen=True)
class ModelShape:
    """What the budget needs to know about a decoder: parameter count, layers, widths, KV heads
    and head dims, bytes per element of weights and cache, and how many ``intermediate``-wide
    tensors its MLP keeps alive (3 for a gated SwiGLU MLP: gate, up and their product; 2 for
    ``Linear -> SiLU -> Linear``)."""

    name: str
    params: int
    num_layers: int
    hidden: int
    intermediate: int
    vocab: int
    nheads_k: int
    headdim: int
    dtype_bytes: int = 2
    mlp_tensors: int = 3
    headdim_v: int | None = None

    def __post_init__(self):
        for field_name in ("params", "num_layers", "hidden", "intermediate", "vocab", "nheads_k", "headdim"):
            check_int(field_name, getattr(self, field_name), low=1)
        check_int("dtype_bytes", self.dtype_bytes, low=1, high=8)
        check_int("mlp_tensors", self.mlp_tensors, low=1)
        if self.headdim_v is not None:
            check_int("headdim_v", self.headdim_v, low=1)

    @property
    def weight_bytes(self) -> int:
        return self.params * self.dtype_bytes

    def kv_bytes_per_token(self, cache_dtype_bytes: int | None = None) -> int:
        """Bytes one token's keys and values take in every layer (``cache_dtype_bytes``
        defaults to the weights' element size; 1 for an fp8 or int8 cache)."""
        if cache_dtype_bytes is None:
            nbytes = self.dtype_bytes
        else:
            nbytes = check_int("cache_dtype_bytes", cache_dtype_bytes, low=1)
        headdim_v = self.headdim if self.headdim_v is None else self.headdim_v
        return self.num_layers * self.nheads_k * (self.headdim + headdim_v) * nbytes

    def activation_bytes(self, tokens: int, logits_rows: int | None = None) -> int:
        """An estimate of one step's activation peak for ``tokens`` tokens: inside the widest
        layer, about four ``hidden``-wide tensors (residual, normed input, attention output,
        projections) and ``mlp_tensors`` MLP-wide ones per token, plus fp32 logits for the
        ``logits_rows`` rows that are sampled (default: every token). A serving engine measures
        this instead (:func:`profile_budget` does, for a PyTorch model)."""
        tokens = check_int("tokens", tokens, low=1)
        rows = tokens if logits_rows is None else check_int("logits_rows", logits_rows, low=0)
        per_token = (4 * self.hidden + self.mlp_tensors * self.intermediate) * self.dtype_bytes
        return tokens * per_token + rows * self.vocab * 4


LLAMA_3_8B = ModelShape(
    "Llama-3-8B (bf16)",
    params=8_030_261_248,
    num_layers=32,
    hidden=4096,
    intermediate=14336,
    vocab=128256,
    nheads_k=8,
    headdim=128,
)


def shape_of(model) -> ModelShape:
    """The :class:`ModelShape` of a :class:`~flashkv_edu.model.TinyDecoder`."""
    from .model import TinyDecoder

    if not isinstance(model, TinyDecoder):
        raise ArgumentTypeError(f"model must be a TinyDecoder, got {type(model).__name__}")
    cfg = model.cfg
    dtype = model.head.weight.dtype
    return ModelShape(
        "TinyDecoder",
        params=sum(p.numel() for p in model.parameters()),
        num_layers=cfg.n_layers,
        hidden=cfg.dim,
        intermediate=cfg.mlp_ratio * cfg.dim,
        vocab=cfg.vocab_size,
        nheads_k=cfg.n_kv_heads,
        headdim=cfg.headdim,
        dtype_bytes=torch.empty(0, dtype=dtype).element_size(),
        mlp_tensors=2,
    )


@dataclass(frozen=True)
class Budget:
    """A sized pool: ``num_blocks`` blocks of ``block_size`` tokens, ``block_bytes`` each, from
    ``utilization * total_bytes`` minus weights and the activation peak."""

    total_bytes: int
    utilization: float
    weight_bytes: int
    activation_bytes: int
    kv_bytes_per_token: int
    block_size: int
    num_blocks: int

    @property
    def block_bytes(self) -> int:
        return self.block_size * self.kv_bytes_per_token

    @property
    def kv_bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    @property
    def tokens(self) -> int:
        """Tokens the pool holds (every block full)."""
        return self.num_blocks * self.block_size

    def sequences(self, tokens_per_sequence: int) -> int:
        """How many sequences of ``tokens_per_sequence`` tokens (prompt + output) fit at once:
        each needs ``ceil(tokens / block_size)`` blocks, the last one partly empty."""
        n = check_int("tokens_per_sequence", tokens_per_sequence, low=1)
        return self.num_blocks // math.ceil(n / self.block_size)


def plan_budget(
    total_bytes: int,
    weight_bytes: int,
    activation_bytes: int,
    kv_bytes_per_token: int,
    *,
    block_size: int = 16,
    utilization: float = 0.9,
) -> Budget:
    """Size the block pool: ``floor((utilization * total - weights - activations) / block_bytes)``
    blocks. Raises :class:`~flashkv_edu.validation.ArgumentError` when not even one block fits
    (a negative pool is a crash waiting to happen, not a pool)."""
    total_bytes = check_int("total_bytes", total_bytes, low=1)
    weight_bytes = check_int("weight_bytes", weight_bytes, low=0)
    activation_bytes = check_int("activation_bytes", activation_bytes, low=0)
    kv_bytes_per_token = check_int("kv_bytes_per_token", kv_bytes_per_token, low=1)
    block_size = check_int("block_size", block_size, low=1)
    utilization = check_positive("utilization", utilization)
    if utilization > 1:
        raise ArgumentError(f"utilization must be in (0, 1], got {utilization}")
    usable = int(total_bytes * utilization) - weight_bytes - activation_bytes
    block_bytes = block_size * kv_bytes_per_token
    if usable < block_bytes:
        raise ArgumentError(
            f"total_bytes: {utilization:g} x {total_bytes} bytes minus weights ({weight_bytes}) and activations "
            f"({activation_bytes}) leaves {usable} bytes, less than one block ({block_bytes} bytes): "
            "lower max_batched_tokens, shrink the cache dtype, or use a larger device"
        )
    return Budget(
        total_bytes, utilization, weight_bytes, activation_bytes, kv_bytes_per_token, block_size, usable // block_bytes
    )


def measure_step_activations(model, max_batched_tokens: int) -> int:
    """The activation peak (bytes of new tensors alive at once) of one forward pass of ``model``
    (a :class:`~flashkv_edu.model.TinyDecoder`) over ``max_batched_tokens`` tokens, measured,
    as vLLM's profile run measures it on a GPU. Rows are at most the model's ``max_seqlen`` long."""
    shape_of(model)
    tokens = check_int("max_batched_tokens", max_batched_tokens, low=1)
    row = min(tokens, model.cfg.max_seqlen)
    rows = math.ceil(tokens / row)
    ids = torch.zeros(rows, row, dtype=torch.long, device=model.head.weight.device)
    with torch.no_grad():
        _, report = measure_allocations(model, ids)
    return report.peak_live_bytes


def profile_budget(
    model, total_bytes: int, *, max_batched_tokens: int = 512, block_size: int = 16, utilization: float = 0.9
) -> Budget:
    """:func:`plan_budget` for a real model: weights (parameters and buffers) counted, the
    activation peak of a ``max_batched_tokens`` step measured (:func:`measure_step_activations`)."""
    shape = shape_of(model)
    weights = sum(t.nbytes for t in model.parameters()) + sum(t.nbytes for t in model.buffers())
    activations = measure_step_activations(model, max_batched_tokens)
    return plan_budget(
        total_bytes,
        weights,
        activations,
        shape.kv_bytes_per_token(),
        block_size=block_size,
        utilization=utilization,
    )


# --- what preemption costs: moving bytes against recomputing them -------------------------------


def prefill_flops(shape: ModelShape, tokens: int) -> float:
    """FLOPs of prefilling ``tokens`` tokens: ``2 * params`` per token for the matrix products,
    plus causal attention, ``2 * num_layers * hidden * tokens**2`` (scores and the weighted sum,
    ``2 * tokens**2 * hidden`` FLOPs each per layer, halved by the causal mask)."""
    n = check_int("tokens", tokens, low=0)
    return 2.0 * shape.params * n + 2.0 * shape.num_layers * shape.hidden * n * n


def recompute_seconds(shape: ModelShape, tokens: int, flops_per_s: float, *, overhead_s: float = 0.0) -> float:
    """Preemption by recompute: prefill the sequence again at ``flops_per_s`` achieved, plus a
    fixed ``overhead_s`` per prefill (launching the step, Python)."""
    fixed = check_positive("overhead_s", overhead_s, allow_zero=True)
    return fixed + prefill_flops(shape, tokens) / check_positive("flops_per_s", flops_per_s)


def swap_seconds(
    kv_bytes_per_token: int,
    tokens: int,
    bandwidth: float,
    *,
    block_size: int = 16,
    copies_per_block: int = 1,
    seconds_per_copy: float = 0.0,
    overhead_s: float = 0.0,
) -> float:
    """Preemption by swap: copy the sequence's blocks out and back in, each way
    ``bytes / bandwidth`` plus ``seconds_per_copy`` for each of the ``copies_per_block`` copies
    of each block (1 when a block's layers are packed in one row, as here; ``2 * num_layers``
    when every layer's key and value block is copied separately), plus a fixed ``overhead_s``
    per preemption."""
    n = check_int("tokens", tokens, low=0)
    kv = check_int("kv_bytes_per_token", kv_bytes_per_token, low=1)
    blocks = math.ceil(n / check_int("block_size", block_size, low=1))
    copies = blocks * check_int("copies_per_block", copies_per_block, low=1)
    latency = check_positive("seconds_per_copy", seconds_per_copy, allow_zero=True)
    fixed = check_positive("overhead_s", overhead_s, allow_zero=True)
    return fixed + 2.0 * (blocks * block_size * kv / check_positive("bandwidth", bandwidth) + copies * latency)


def crossover_tokens(swap, recompute, max_tokens: int = 1 << 20) -> int | None:
    """The shortest sequence (a power of two up to ``max_tokens``, then refined to the token) at
    which ``swap(tokens)`` is cheaper than ``recompute(tokens)`` when shorter ones are not, or None
    if the cheaper side never changes in that range."""
    max_tokens = check_int("max_tokens", max_tokens, low=2)
    first = swap(1) < recompute(1)
    lo, hi = 1, 2
    while hi <= max_tokens and (swap(hi) < recompute(hi)) == first:
        lo, hi = hi, hi * 2
    if hi > max_tokens:
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if (swap(mid) < recompute(mid)) == first:
            lo = mid
        else:
            hi = mid
    return hi
