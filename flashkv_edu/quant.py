"""Precision and quantized KV caches (notebook 09).

A cache element is stored as a low-precision code and read back as ``code * scale`` (``+ zero``
for asymmetric integers). Three families:

* **float storage**: fp32, fp16, bf16: plain rounding, no scales.
* **fp8 e4m3** (vLLM's ``kv_cache_dtype="fp8"``, FlashAttention 3): ``stored = e4m3(x / descale)``,
  one fp32 ``descale`` per (sequence, KV head), per tensor, or 1.0 (uncalibrated).
* **integers** of 8, 4 or 2 bits with a scale per group: per **token** (one scale per token
  and head over ``group`` channels, default all of them) or per **channel** (one scale per
  channel over ``group`` tokens). KIVI quantizes keys per channel, values per token, and keeps
  the ``residual`` newest tokens in 16 bits.

Tensors are ``(batch, seqlen, nheads_k, headdim)``. Scales and zero points are stored in fp16 (2
bytes each), rounded so that no code clips: the error of every element is at most half a step,
``scale / 2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .reference import attention_ref
from .rotary import apply_rotary
from .validation import ArgumentError, check_float_tensor, check_int

E4M3_MAX = 448.0  # largest finite float8_e4m3fn
SCALE_BYTES = 2  # scales and zero points are fp16


@dataclass(frozen=True)
class Scheme:
    """How K and V are stored.

    ``kind``: ``"float"`` (``dtype`` fp32/fp16/bf16), ``"fp8"`` (``fp8_scale`` ``"one"``,
    ``"tensor"`` or ``"head"``), or ``"int"`` (``bits`` 8, 4 or 2; ``k_axis``/``v_axis``
    ``"token"`` or ``"channel"``; ``group``: channels per scale for a token axis (0 = the whole
    head dim), tokens per scale for a channel axis; ``residual`` newest tokens kept in 16 bits).
    """

    name: str
    kind: str
    bits: int = 16
    dtype: torch.dtype | None = None
    fp8_scale: str = "head"
    k_axis: str = "token"
    v_axis: str = "token"
    group: int = 0
    symmetric: bool = True
    residual: int = 0

    def __post_init__(self):
        if self.kind not in ("float", "fp8", "int"):
            raise ArgumentError(f"kind must be 'float', 'fp8' or 'int', got {self.kind!r}")
        if self.kind == "int":
            if self.bits not in (8, 4, 2):
                raise ArgumentError(f"integer bits must be 8, 4 or 2, got {self.bits}")
            for name in ("k_axis", "v_axis"):
                if getattr(self, name) not in ("token", "channel"):
                    raise ArgumentError(f"{name} must be 'token' or 'channel', got {getattr(self, name)!r}")
            if "channel" in (self.k_axis, self.v_axis) and self.group <= 0:
                raise ArgumentError("a per-channel scheme needs group > 0 tokens per scale")
        if self.kind == "fp8" and self.fp8_scale not in ("one", "tensor", "head"):
            raise ArgumentError(f"fp8_scale must be 'one', 'tensor' or 'head', got {self.fp8_scale!r}")

    @property
    def token_group(self) -> int:
        """Tokens quantized together: ``group`` when an axis is per channel, else 1."""
        return self.group if "channel" in (self.k_axis, self.v_axis) else 1

    def quantized_length(self, n: int) -> int:
        """How many of the first ``n`` cached tokens are stored quantized (the rest wait, in
        16 bits, for a full token group outside the residual window)."""
        if self.kind != "int":
            return n
        g = self.token_group
        return max(0, (n - self.residual) // g * g)


SCHEMES = {
    s.name: s
    for s in [
        Scheme("fp32", "float", 32, dtype=torch.float32),
        Scheme("fp16", "float", 16, dtype=torch.float16),
        Scheme("bf16", "float", 16, dtype=torch.bfloat16),
        Scheme("fp8 e4m3, scale 1.0", "fp8", 8, fp8_scale="one"),
        Scheme("fp8 e4m3, per-tensor scale", "fp8", 8, fp8_scale="tensor"),
        Scheme("fp8 e4m3, per-(batch, head) scale", "fp8", 8, fp8_scale="head"),
        Scheme("int8 per token", "int", 8),
        Scheme("int8 per token, asymmetric", "int", 8, symmetric=False),
        Scheme("int4 per token, groups of 32", "int", 4, group=32, symmetric=False),
        Scheme("int2 per token, groups of 32", "int", 2, group=32, symmetric=False),
        Scheme("int4 KIVI", "int", 4, k_axis="channel", group=32, symmetric=False, residual=32),
        Scheme("int2 KIVI", "int", 2, k_axis="channel", group=32, symmetric=False, residual=32),
    ]
}


# --- memory --------------------------------------------------------------------------------------


def _scale_bytes_per_element(scheme: Scheme, axis: str, headdim: int) -> float:
    per_scale = SCALE_BYTES * (1 if scheme.symmetric else 2)
    if axis == "token":
        return per_scale / (scheme.group or headdim)
    return per_scale / scheme.group


def bytes_per_token(scheme: Scheme, n_layers: int, nheads_k: int, headdim: int, context: int = 4096) -> float:
    """KV-cache bytes per token of a whole model, scales included, averaged over a ``context``
    -token sequence (KIVI's residual tokens are 16-bit). fp8 descales are per sequence, not per
    token: ``8 * nheads_k * n_layers`` bytes a sequence, counted too."""
    elements = n_layers * nheads_k * headdim  # per token, for K or for V
    if scheme.kind == "float":
        return 2 * elements * scheme.bits / 8
    if scheme.kind == "fp8":
        return 2 * elements + 2 * n_layers * nheads_k * 4 / context
    total = 0.0
    quantized = scheme.quantized_length(context) / context
    for axis in (scheme.k_axis, scheme.v_axis):
        per = scheme.bits / 8 + _scale_bytes_per_element(scheme, axis, headdim)
        total += elements * (quantized * per + (1 - quantized) * 2)
    return total


# --- integer quantization ------------------------------------------------------------------------


@dataclass
class IntQuantized:
    """Integer codes with fp16 scales (and zero points): ``x ~ codes * scale + zero``, the
    scale and zero broadcast over groups. ``codes`` int16 ``(..., groups, group)`` in the
    grouped layout of :func:`quantize_int`; :meth:`dequantize` returns the original shape."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    axis: str
    shape: tuple
    group: int = field(default=0)

    def dequantize(self) -> torch.Tensor:
        x = self.codes.float() * self.scale.float()
        if self.zero is not None:
            x = x + self.zero.float()
        return _ungroup(x, self.axis, self.shape)


def _grouped(x: torch.Tensor, axis: str, group: int) -> torch.Tensor:
    """``x`` ``(b, s, h, d)`` as ``(..., groups, group)``: groups of ``group`` channels of one
    token (``axis="token"``) or of ``group`` tokens of one channel (``axis="channel"``)."""
    b, s, h, d = x.shape
    if axis == "token":
        g = group or d
        if d % g:
            raise ArgumentError(f"group ({g}) must divide the head dim ({d})")
        return x.reshape(b, s, h, d // g, g)
    if s % group:
        raise ArgumentError(f"a per-channel group of {group} tokens must divide seqlen ({s})")
    return x.reshape(b, s // group, group, h, d).permute(0, 1, 3, 4, 2)  # (b, s/G, h, d, G)


def _ungroup(x: torch.Tensor, axis: str, shape: tuple) -> torch.Tensor:
    b, s, h, d = shape
    if axis == "token":
        return x.reshape(b, s, h, d)
    return x.permute(0, 1, 4, 2, 3).reshape(b, s, h, d)


def _fp16_at_least(x: torch.Tensor) -> torch.Tensor:
    """The smallest fp16 value >= x (so a code never clips after the scale is stored)."""
    h = x.half()
    return torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, math.inf)), h)


def _fp16_at_most(x: torch.Tensor) -> torch.Tensor:
    h = x.half()
    return torch.where(h.float() > x, torch.nextafter(h, torch.full_like(h, -math.inf)), h)


def quantize_int(x: torch.Tensor, bits: int, *, axis: str = "token", group: int = 0, symmetric: bool = True):
    """Round ``x`` ``(b, s, h, d)`` to ``bits``-bit integers with one fp16 scale per group.

    Symmetric: codes in ``[-(2^(bits-1) - 1), 2^(bits-1) - 1]``, ``scale = absmax / qmax``.
    Asymmetric: codes in ``[0, 2^bits - 1]``, ``zero = min``, ``scale = (max - min) / (2^bits - 1)``.
    Every element is within ``scale / 2`` of its dequantized value."""
    check_float_tensor("x", x, ndim=4)
    check_int("bits", bits, low=2, high=8)
    xg = _grouped(x.float(), axis, group)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        amax = xg.abs().amax(-1, keepdim=True)
        scale = _fp16_at_least(torch.where(amax > 0, amax / qmax, torch.ones_like(amax)))
        codes = torch.round(xg / scale.float()).clamp(-qmax, qmax)
        zero = None
    else:
        levels = 2**bits - 1
        zero = _fp16_at_most(xg.amin(-1, keepdim=True))
        span = xg.amax(-1, keepdim=True) - zero.float()
        scale = _fp16_at_least(torch.where(span > 0, span / levels, torch.ones_like(span)))
        codes = torch.round((xg - zero.float()) / scale.float()).clamp(0, levels)
    return IntQuantized(codes.to(torch.int16), scale, zero, bits, axis, tuple(x.shape), group)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes in ``[0, 2^bits)`` along the last dim, ``8 / bits`` to a byte: uint8 of last
    dim ``n * bits / 8``. (Symmetric codes are offset by ``2^(bits-1)`` first.)"""
    per = 8 // bits
    c = codes.to(torch.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    out = torch.zeros(c.shape[:-1], dtype=torch.uint8, device=codes.device)
    for i in range(per):
        out |= c[..., i] << (bits * i)
    return out


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`."""
    per = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (bits * i)) & mask for i in range(per)]
    return torch.stack(parts, -1).reshape(*packed.shape[:-1], packed.shape[-1] * per)


# --- fp8 -----------------------------------------------------------------------------------------


def fp8_descales(x: torch.Tensor, granularity: str = "head") -> torch.Tensor:
    """fp32 descales ``(batch, nheads_k)`` for ``x`` ``(b, s, h, d)``: ``absmax / 448`` per
    (sequence, KV head) (``"head"``), one for the whole tensor (``"tensor"``), or 1.0 (``"one"``)."""
    check_float_tensor("x", x, ndim=4)
    b, _, h, _ = x.shape
    if granularity == "one":
        return torch.ones(b, h, device=x.device)
    if granularity == "tensor":
        amax = x.detach().abs().amax().float().expand(b, h)
    elif granularity == "head":
        amax = x.detach().abs().amax(dim=(1, 3)).float()
    else:
        raise ArgumentError(f"granularity must be 'one', 'tensor' or 'head', got {granularity!r}")
    return torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax)).contiguous()


def quantize_fp8(x: torch.Tensor, descale: torch.Tensor) -> torch.Tensor:
    """``e4m3(x / descale)``, saturating at +-448, for ``x`` ``(b, s, h, d)`` and ``descale``
    ``(b, h)``: what an fp8 cache stores."""
    y = x.float() / descale[:, None, :, None]
    return y.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def dequantize_fp8(x8: torch.Tensor, descale: torch.Tensor) -> torch.Tensor:
    """The real values of an fp8 cache: ``stored * descale``, in fp32."""
    return x8.float() * descale[:, None, :, None]


# --- a scheme applied to K and V -------------------------------------------------------------


def roundtrip(x: torch.Tensor, scheme: Scheme, role: str = "k", descale: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` ``(b, s, h, d)`` stored and read back under ``scheme`` (fp32). ``role`` ``"k"`` or
    ``"v"`` picks the integer axis. Per-channel groups: only whole groups of tokens are
    quantized, the tail is returned as is. fp8: ``descale`` (default from ``fp8_scale``)."""
    if scheme.kind == "float":
        return x.to(scheme.dtype).float()
    if scheme.kind == "fp8":
        ds = fp8_descales(x, scheme.fp8_scale) if descale is None else descale
        return dequantize_fp8(quantize_fp8(x, ds), ds)
    axis = scheme.k_axis if role == "k" else scheme.v_axis
    out = x.float().clone()
    n = x.shape[1] if axis == "token" else x.shape[1] // scheme.group * scheme.group
    if n:
        q = quantize_int(x[:, :n], scheme.bits, axis=axis, group=scheme.group, symmetric=scheme.symmetric)
        out[:, :n] = q.dequantize()
    return out


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
            pair["head"].append(amax / E4M3_MAX)
            pair["tensor"].append((amax.amax() / E4M3_MAX).expand_as(amax))
            pair["one"].append(torch.ones_like(amax))
        for g in out:
            out[g].append(tuple(pair[g]))
    return out


@torch.no_grad()
def model_loss(model, tokens: torch.Tensor, scheme: Scheme, descales: dict | None = None) -> float:
    """Mean next-token cross-entropy (nats per character) of ``tokens`` ``(n, s)`` when every
    layer reads its keys and values through a ``scheme`` cache (fp8 needs :func:`calibrate_fp8`'s
    ``descales``)."""
    n, s = tokens.shape
    positions = torch.arange(s - 1).expand(n, s - 1)
    logits = model.run(tokens[:, :-1], positions, _ThroughCache(positions, model.rope(), scheme, descales))
    return float(
        torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    )


def scheme_losses(model, sequences: int, length: int = 257) -> dict[str, float]:
    """Validation loss (nats per character) of the character model of notebook 08 through every
    scheme of :data:`SCHEMES`: ``sequences`` pieces of ``length`` characters of its validation
    text; fp8 descales calibrated on 8 pieces of its training text."""
    from . import charlm

    text = torch.tensor(charlm.encode(charlm.stdlib_text()))
    val = text[int(0.98 * len(text)) :]  # charlm's validation split
    seqs = torch.stack([val[i * 700 : i * 700 + length] for i in range(sequences)])
    calib = calibrate_fp8(model, torch.stack([text[i * 40_000 : i * 40_000 + 256] for i in range(8)]))
    return {name: model_loss(model, seqs, scheme, calib) for name, scheme in SCHEMES.items()}


@torch.no_grad()
def cached_vs_uncached(model, prompts: list[list[int]], new_tokens: int) -> list[int | None]:
    """Greedy decoding of each prompt with the KV cache and without; per prompt, the first
    step where the two token sequences differ (None if identical)."""
    cached = model.generate(prompts, new_tokens, use_cache=True)
    uncached = model.generate(prompts, new_tokens, use_cache=False)
    first = []
    for a, b in zip(cached, uncached, strict=True):
        diff = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
        first.append(diff[0] if diff else None)
    return first


@torch.no_grad()
def top2_gap(model, tokens: list[int]) -> float:
    """Logit gap between the best and second-best next token after ``tokens`` (fp32 model):
    small gaps are where rounding can flip a greedy choice."""
    logits = model(torch.tensor([tokens]))[0, -1].float()
    top = logits.topk(2).values
    return float(top[0] - top[1])


# --- a cache that stores integer codes -------------------------------------------------------


class QuantizedKVCache:
    """A contiguous KV cache ``(batch, capacity, nheads_k, headdim)`` stored under an integer
    ``scheme``: codes packed ``8 / bits`` to a byte, fp16 scales (and zero points) per token
    group or, for a per-channel axis, per ``group`` tokens of each channel; the newest tokens
    wait in a 16-bit buffer of ``residual + group`` rows until a whole group is outside the
    residual window (KIVI's streaming rule, :meth:`Scheme.quantized_length`).

    ``append(k, v)`` adds ``(batch, snew, nheads_k, headdim)`` to every sequence;
    ``dequantized()`` returns what attention reads; ``attention(q, ...)`` runs
    :func:`flashkv_edu.flash_attn_with_kvcache`'s semantics over it. An 8-bit symmetric
    per-token cache goes straight into the Triton decode kernel, which dequantizes tile by tile
    (``backend="triton"``); other schemes are dequantized first.
    """

    def __init__(self, batch: int, capacity: int, nheads_k: int, headdim: int, scheme: Scheme, device="cpu"):
        if scheme.kind != "int":
            raise ArgumentError(f"QuantizedKVCache stores integer schemes; {scheme.name!r} is {scheme.kind}")
        self.scheme = scheme
        self.shape = (check_int("batch", batch, low=1), check_int("capacity", capacity, low=1), nheads_k, headdim)
        g = scheme.token_group
        if capacity % g:
            raise ArgumentError(f"capacity ({capacity}) must be a multiple of the token group ({g})")
        packed = headdim * scheme.bits // 8
        code_dtype = torch.int8 if self._raw_int8 else torch.uint8
        self.codes = {r: torch.zeros(batch, capacity, nheads_k, packed, dtype=code_dtype, device=device) for r in "kv"}
        self.scales, self.zeros = {}, {}
        for r in "kv":
            axis = scheme.k_axis if r == "k" else scheme.v_axis
            shape = (
                (batch, capacity, nheads_k, headdim // (scheme.group or headdim))
                if axis == "token"
                else (batch, capacity // scheme.group, nheads_k, headdim)
            )
            self.scales[r] = torch.zeros(shape, dtype=torch.float16, device=device)
            self.zeros[r] = None if scheme.symmetric else torch.zeros(shape, dtype=torch.float16, device=device)
        self.pending = {r: torch.zeros(batch, scheme.residual + g, nheads_k, headdim, device=device) for r in "kv"}
        self.cache_seqlens = torch.zeros(batch, dtype=torch.int32, device=device)

    @property
    def _raw_int8(self) -> bool:
        """Symmetric 8-bit codes are stored as plain int8, readable by the decode kernel."""
        return self.scheme.bits == 8 and self.scheme.symmetric

    def nbytes(self) -> int:
        """Bytes this cache allocates (codes, scales, zero points, the 16-bit pending rows)."""
        tensors = [*self.codes.values(), *self.scales.values(), *self.pending.values()]
        tensors += [z for z in self.zeros.values() if z is not None]
        pending = sum(t.numel() * 2 for t in self.pending.values())  # counted as 16-bit storage
        return (
            sum(t.numel() * t.element_size() for t in tensors) - sum(t.nbytes for t in self.pending.values()) + pending
        )

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append ``snew`` tokens to every sequence; checks everything before writing."""
        b, cap, hk, d = self.shape
        for name, t in (("k", k), ("v", v)):
            check_float_tensor(name, t, ndim=4)
            if t.shape[0] != b or t.shape[2:] != (hk, d):
                raise ArgumentError(f"{name} must have shape ({b}, snew, {hk}, {d}), got {tuple(t.shape)}")
        if k.shape != v.shape:
            raise ArgumentError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
        if int(self.cache_seqlens.max()) + k.shape[1] > cap:
            raise ArgumentError(f"cache overflow: {self.cache_seqlens.tolist()} + {k.shape[1]} > capacity {cap}")
        for t in range(k.shape[1]):
            for i in range(b):
                self._push(i, k[i, t].float(), v[i, t].float())

    def _push(self, i: int, k_row: torch.Tensor, v_row: torch.Tensor) -> None:
        n = int(self.cache_seqlens[i])
        done = self.scheme.quantized_length(n)
        self.pending["k"][i, n - done], self.pending["v"][i, n - done] = k_row.half(), v_row.half()
        self.cache_seqlens[i] = n + 1
        now = self.scheme.quantized_length(n + 1)
        if now > done:  # a whole group left the residual window: quantize it
            g = now - done
            for r in "kv":
                self._store(r, i, done, self.pending[r][i, :g].float()[None])
                self.pending[r][i, : n + 1 - now] = self.pending[r][i, g : n + 1 - done].clone()

    def _store(self, r: str, i: int, pos: int, x: torch.Tensor) -> None:
        s = self.scheme
        axis = s.k_axis if r == "k" else s.v_axis
        q = quantize_int(x, s.bits, axis=axis, group=s.group, symmetric=s.symmetric)
        codes = _ungroup(q.codes, axis, q.shape)[0]  # (g, hk, d)
        if self._raw_int8:
            self.codes[r][i, pos : pos + len(codes)] = codes.to(torch.int8)
        else:
            offset = 2 ** (s.bits - 1) if s.symmetric else 0
            self.codes[r][i, pos : pos + len(codes)] = pack_codes(codes + offset, s.bits)
        if axis == "token":
            rows = slice(pos, pos + len(codes))
            self.scales[r][i, rows] = q.scale[0, :, :, :, 0]
            if q.zero is not None:
                self.zeros[r][i, rows] = q.zero[0, :, :, :, 0]
        else:
            self.scales[r][i, pos // s.group] = q.scale[0, 0, :, :, 0]
            if q.zero is not None:
                self.zeros[r][i, pos // s.group] = q.zero[0, 0, :, :, 0]

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k, v)`` fp32 ``(batch, capacity, nheads_k, headdim)``: the values attention reads
        (rows past a sequence's length are 0)."""
        s = self.scheme
        b, cap, hk, d = self.shape
        out = []
        for r in "kv":
            axis = s.k_axis if r == "k" else s.v_axis
            if self._raw_int8:
                codes = self.codes[r].float()
            else:
                codes = unpack_codes(self.codes[r], s.bits).float() - (2 ** (s.bits - 1) if s.symmetric else 0)
            if axis == "token":
                g = s.group or d
                x = codes.view(b, cap, hk, d // g, g) * self.scales[r].float()[..., None]
                if self.zeros[r] is not None:
                    x = x + self.zeros[r].float()[..., None]
            else:
                x = codes.view(b, cap // s.group, s.group, hk, d) * self.scales[r].float()[:, :, None]
                if self.zeros[r] is not None:
                    x = x + self.zeros[r].float()[:, :, None]
            x = x.reshape(b, cap, hk, d).clone()
            for i in range(b):
                n = int(self.cache_seqlens[i])
                done = s.quantized_length(n)
                x[i, done:n] = self.pending[r][i, : n - done].float()
                x[i, n:] = 0
            out.append(x)
        return out[0], out[1]

    def attention(self, q: torch.Tensor, *, backend: str = "torch", **kwargs) -> torch.Tensor:
        """Attention of ``q`` ``(batch, seqlen_q, nheads, headdim)`` over the cached tokens, with
        :func:`flashkv_edu.flash_attn_with_kvcache`'s masks (``causal``, ``window_size``, ...)."""
        from .api import flash_attn_with_kvcache

        s = self.scheme
        if backend == "triton" and self._raw_int8 and s.residual == 0:
            from .kernels.decode import decode_attention_triton

            return decode_attention_triton(
                q.float(),
                self.codes["k"],
                self.codes["v"],
                self.cache_seqlens,
                k_descale=self.scales["k"][..., 0],
                v_descale=self.scales["v"][..., 0],
                **kwargs,
            ).to(q.dtype)
        k, v = self.dequantized()
        out = flash_attn_with_kvcache(
            q.float(), k, v, cache_seqlens=self.cache_seqlens, backend=backend, num_splits=1, **kwargs
        )
        return out.to(q.dtype)


@torch.no_grad()
def greedy_choices(model, tokens: torch.Tensor, prompt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced greedy choices for positions ``prompt - 1 .. s - 2`` of ``tokens``
    ``(n, s)``: ``(uncached, cached)`` argmax ids ``(n, s - prompt)``. Uncached: one forward
    over the whole sequence. Cached: prefill ``prompt`` tokens, then one token per step through
    the KV cache. Same tokens, same model; only the GEMM shapes differ."""
    n, s = tokens.shape
    uncached = model(tokens)[:, prompt - 1 : s - 1].argmax(-1)
    cache = model.new_cache(n, s)
    steps = [model(tokens[:, :prompt], cache)[:, -1]]
    for t in range(prompt, s - 1):
        steps.append(model(tokens[:, t : t + 1], cache)[:, -1])
    return uncached, torch.stack(steps, 1).argmax(-1)
