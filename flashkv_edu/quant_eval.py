"""Notebook 09's experiments: synthetic keys and the trained model read through each scheme.

How much a quantized cache changes attention and the model's loss, measured against exact (fp32)
attention, the oracle: :func:`attention_through_cache` (what a decoder reading a ``scheme`` cache
computes at every step, KIVI's residual included), :func:`attention_error` (outlier keys),
:func:`model_loss` and :func:`scheme_losses` (the character model of notebook 08, fp8 descales
calibrated by :func:`calibrate_fp8`). ``python -m flashkv_edu.bench quant`` prints them.
"""

from __future__ import annotations

import torch

from . import quant as Q
from .quant_codecs import Scheme, roundtrip
from .reference import attention_ref
from .rotary import apply_rotary

__all__ = [
    "attention_error",
    "attention_through_cache",
    "calibrate_fp8",
    "model_loss",
    "outlier_keys",
    "record_kv",
    "scheme_losses",
]


def attention_through_cache(q, k, v, scheme: Scheme, *, k_descale=None, v_descale=None, softmax_scale=None):
    """Causal attention of a whole sequence (``q`` ``(b, s, h, d)``, ``k``/``v`` ``(b, s, hk,
    d)``) as a decoder reading a ``scheme`` cache computes it: query ``t`` sees key ``j`` as
    stored **at step t**: quantized when ``j < scheme.quantized_length(t + 1)``, else in 16
    bits (KIVI's residual and unfinished groups). Every quantized group's codes depend only on
    its own tokens, so one pass gives every step exactly. Returns ``out`` like ``q``."""
    k_hat = roundtrip(k, scheme, "k", k_descale)
    v_hat = roundtrip(v, scheme, "v", v_descale)
    s = q.shape[1]
    if scheme.kind != "int" or (scheme.residual == 0 and scheme.token_group == 1):
        return attention_ref(q, k_hat, v_hat, causal=True, softmax_scale=softmax_scale).to(q.dtype)
    # Queries that find the same number n of quantized keys read one cache: keys [0, n) as
    # stored, the rest in 16 bits. Each such run of queries is one bottom-right causal call.
    half_k, half_v = k.to(torch.float16).float(), v.to(torch.float16).float()
    out = torch.empty_like(q)
    t = 0
    while t < s:
        n = scheme.quantized_length(t + 1)
        end = t + 1
        while end < s and scheme.quantized_length(end + 1) == n:
            end += 1
        keys = torch.cat([k_hat[:, :n], half_k[:, n:end]], 1)
        values = torch.cat([v_hat[:, :n], half_v[:, n:end]], 1)
        out[:, t:end] = attention_ref(q[:, t:end], keys, values, causal=True, softmax_scale=softmax_scale)
        t = end
    return out


def outlier_keys(seed: int = 0, b: int = 1, s: int = 256, hk: int = 2, d: int = 64, channels=(5, 40), factor=20.0):
    """Keys ``(b, s, hk, d)`` with a few **outlier channels** ``factor`` times larger than the
    rest, as KIVI observed in real models' keys; values without outliers."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, s, hk, d, generator=g)
    k[..., list(channels)] *= factor
    v = torch.randn(b, s, hk, d, generator=g)
    return k, v


def attention_error(q, k, v, scheme: Scheme) -> float:
    """Mean absolute error of causal attention's output when K and V are read through
    ``scheme`` (every token quantized, as after a long generation), against fp32."""
    exact = attention_ref(q, k, v, causal=True)
    got = attention_ref(q, roundtrip(k, scheme, "k"), roundtrip(v, scheme, "v"), causal=True)
    return float((got - exact).abs().mean())


# --- the trained model of notebook 08 through a quantized cache ----------------------------------


class _ThroughCache:
    """Attention context for :meth:`flashkv_edu.model.TinyDecoder.run`: whole sequences from
    position 0, each layer's K and V read through a ``scheme`` cache (or recorded, for
    calibration, when ``scheme`` is None)."""

    def __init__(self, positions, rope, scheme: Scheme | None, descales=None):
        self.positions, self.rope, self.scheme, self.descales = positions, rope, scheme, descales
        self.recorded: list[tuple[torch.Tensor, torch.Tensor]] = []

    def attend(self, layer, q, k, v):
        if self.rope is not None:
            q, k = apply_rotary(q, *self.rope, self.positions), apply_rotary(k, *self.rope, self.positions)
        if self.scheme is None:
            self.recorded.append((k, v))
            return attention_ref(q, k, v, causal=True).to(q.dtype)
        kd = vd = None
        if self.scheme.kind == "fp8":
            kd, vd = (t.expand(q.shape[0], -1).contiguous() for t in self.descales[self.scheme.fp8_scale][layer])
        return attention_through_cache(q, k, v, self.scheme, k_descale=kd, v_descale=vd)


@torch.no_grad()
def record_kv(model, tokens: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's keys (after rotary) and values, ``(n, s, nheads_k, headdim)``, for a
    whole-sequence forward pass of ``tokens`` ``(n, s)``."""
    n, s = tokens.shape
    positions = torch.arange(s).expand(n, s)
    ctx = _ThroughCache(positions, model.rope(), None)
    model.run(tokens, positions, ctx)
    return ctx.recorded


@torch.no_grad()
def calibrate_fp8(model, tokens: torch.Tensor) -> dict:
    """fp8 descales per layer from a calibration batch ``tokens`` ``(n, s)``, as vLLM's
    calibrated scales: ``{"one" | "tensor" | "head": [(k_descale (1, hk), v_descale (1, hk)) per
    layer]}``, ``absmax / 448`` over the whole batch (per KV head for ``"head"``)."""
    out = {"one": [], "tensor": [], "head": []}
    for k, v in record_kv(model, tokens):
        pair = {g: [] for g in out}
        for x in (k, v):
            amax = x.float().abs().amax(dim=(0, 1, 3))[None]  # (1, hk)
            pair["head"].append(amax / Q.E4M3_MAX)
            pair["tensor"].append((amax.amax() / Q.E4M3_MAX).expand_as(amax))
            pair["one"].append(torch.ones_like(amax))
        for g in out:
            out[g].append(tuple(pair[g]))
    return out


@torch.no_grad()
def model_loss(model, tokens: torch.Tensor, scheme: Scheme, descales: dict | None = None, per_sequence: bool = False):
    """Mean next-token cross-entropy (nats per character) of ``tokens`` ``(n, s)`` when every
    layer reads its keys and values through a ``scheme`` cache (fp8 needs :func:`calibrate_fp8`'s
    ``descales``). ``per_sequence``: the mean of each sequence, a tensor ``(n,)``."""
    n, s = tokens.shape
    positions = torch.arange(s - 1).expand(n, s - 1)
    logits = model.run(tokens[:, :-1], positions, _ThroughCache(positions, model.rope(), scheme, descales))
    losses = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="none"
    ).view(n, s - 1)
    return losses.mean(1) if per_sequence else float(losses.mean())


def scheme_losses(model, sequences: int, length: int = 257, per_sequence: bool = False) -> dict:
    """Validation loss (nats per character) of the character model of notebook 08 through every
    scheme of :data:`flashkv_edu.quant.SCHEMES`: ``sequences`` pieces of ``length`` characters of its
    validation text; fp8 descales calibrated on 8 pieces of its training text. ``per_sequence``:
    each scheme's losses per piece, tensors ``(sequences,)`` (for the noise floor)."""
    from . import charlm

    text = torch.tensor(charlm.encode(charlm.stdlib_text()))
    val = text[int(0.98 * len(text)) :]  # charlm's validation split
    seqs = torch.stack([val[i * 700 : i * 700 + length] for i in range(sequences)])
    calib = calibrate_fp8(model, torch.stack([text[i * 40_000 : i * 40_000 + 256] for i in range(8)]))
    return {name: model_loss(model, seqs, scheme, calib, per_sequence) for name, scheme in Q.SCHEMES.items()}
