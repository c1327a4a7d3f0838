"""Codecs of quantized KV caches (notebook 09): how a tensor is stored and read back.

Below the API: ``flash_attn_with_kvcache`` quantizes new fp8 keys with :func:`quantize_fp8`, and
:class:`flashkv_edu.quant.QuantizedKVCache` (above the API) packs integer codes with these functions.

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

from .validation import ArgumentError, ArgumentTypeError, check_bool, check_float_tensor, check_int, check_tensor

__all__ = [
    "E4M3_MAX",
    "SCALE_BYTES",
    "SCHEMES",
    "IntQuantized",
    "Scheme",
    "bytes_per_token",
    "check_descale",
    "check_scheme",
    "check_values",
    "dequantize_fp8",
    "fp8_descales",
    "pack_codes",
    "quantize_fp8",
    "quantize_int",
    "roundtrip",
    "ungroup",
    "unpack_codes",
]

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
        if not isinstance(self.name, str) or not self.name:
            raise ArgumentTypeError(f"name must be a non-empty str, got {self.name!r}")
        if self.kind not in ("float", "fp8", "int"):
            raise ArgumentError(f"kind must be 'float', 'fp8' or 'int', got {self.kind!r}")
        bits = check_int("bits", self.bits)
        group = check_int("group", self.group, low=0)
        residual = check_int("residual", self.residual, low=0)
        check_bool("symmetric", self.symmetric)
        if self.kind == "float":
            if self.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                raise ArgumentError(f"a float scheme needs dtype fp32, fp16 or bf16, got {self.dtype!r}")
            if bits != torch.finfo(self.dtype).bits:
                raise ArgumentError(f"bits must be {torch.finfo(self.dtype).bits} for {self.dtype}, got {bits}")
        elif self.dtype is not None:
            raise ArgumentError(f"dtype is for float schemes; a {self.kind} scheme stores codes, got {self.dtype!r}")
        if self.kind == "fp8":
            if bits != 8:
                raise ArgumentError(f"an fp8 scheme has bits 8, got {bits}")
            if self.fp8_scale not in ("one", "tensor", "head"):
                raise ArgumentError(f"fp8_scale must be 'one', 'tensor' or 'head', got {self.fp8_scale!r}")
        if self.kind == "int":
            if bits not in (8, 4, 2):
                raise ArgumentError(f"integer bits must be 8, 4 or 2, got {bits}")
            for name in ("k_axis", "v_axis"):
                if getattr(self, name) not in ("token", "channel"):
                    raise ArgumentError(f"{name} must be 'token' or 'channel', got {getattr(self, name)!r}")
            if "channel" in (self.k_axis, self.v_axis) and group == 0:
                raise ArgumentError("group must be > 0 tokens per scale for a per-channel scheme")
        elif group or residual or (self.k_axis, self.v_axis) != ("token", "token"):
            raise ArgumentError(f"group, residual and k_axis/v_axis are for integer schemes; {self.kind!r} has none")

    def check_headdim(self, headdim: int) -> int:
        """``headdim`` fits this scheme: token groups divide it and codes pack into whole bytes."""
        headdim = check_int("headdim", headdim, low=1)
        if self.kind == "int":
            if "token" in (self.k_axis, self.v_axis) and self.group and headdim % self.group:
                raise ArgumentError(f"group ({self.group} channels per scale) must divide the head dim ({headdim})")
            if headdim * self.bits % 8:
                raise ArgumentError(f"{self.bits}-bit codes of a head dim of {headdim} do not fill whole bytes")
        return headdim

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


# --- argument checks --------------------------------------------------------------------------------


def check_scheme(scheme) -> Scheme:
    if not isinstance(scheme, Scheme):
        raise ArgumentTypeError(
            f"scheme must be a flashkv_edu.quant.Scheme (e.g. quant.SCHEMES['int8 per token']), got {scheme!r}"
        )
    return scheme


def check_values(name: str, x, *, ndim: int | None = 4) -> torch.Tensor:
    """A non-empty floating tensor of finite values: a NaN or inf would quantize to a wrong code
    (or make a scale meaningless) without a word."""
    check_float_tensor(name, x, ndim=ndim)
    if x.numel() == 0:
        raise ArgumentError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ArgumentError(f"{name} must be finite (it holds NaN or inf)")
    return x


def check_descale(name: str, descale, x) -> torch.Tensor:
    """fp32 ``(batch, nheads_k)`` of ``x``, positive and finite."""
    check_tensor(name, descale, ndim=2, dtypes=(torch.float32,))
    want = (x.shape[0], x.shape[2])
    if tuple(descale.shape) != want:
        raise ArgumentError(f"{name} must have shape (batch, nheads_k) = {want}, got {tuple(descale.shape)}")
    if descale.device != x.device:
        raise ArgumentError(f"{name} must be on {x.device}, got {descale.device}")
    if not bool((torch.isfinite(descale) & (descale > 0)).all()):
        raise ArgumentError(f"{name} must be positive and finite")
    return descale


def _check_axis(axis) -> str:
    if axis not in ("token", "channel"):
        raise ArgumentError(f"axis must be 'token' or 'channel', got {axis!r}")
    return axis


def _check_pack_bits(bits) -> int:
    bits = check_int("bits", bits)
    if bits not in (8, 4, 2):
        raise ArgumentError(f"bits must be 8, 4 or 2 (codes packed whole into bytes), got {bits}")
    return bits


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
    check_scheme(scheme)
    for name, value in (("n_layers", n_layers), ("nheads_k", nheads_k), ("context", context)):
        check_int(name, value, low=1)
    scheme.check_headdim(headdim)
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
        return ungroup(x, self.axis, self.shape)


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


def ungroup(x: torch.Tensor, axis: str, shape: tuple) -> torch.Tensor:
    """The inverse of the grouping a quantizer works in: ``x`` grouped along ``axis`` (``"token"``:
    ``(b, s, h, d / G, G)``; ``"channel"``: ``(b, s / G, h, d, G)``) back to ``shape`` ``(b, s, h, d)``."""
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
    check_values("x", x)
    check_int("bits", bits, low=2, high=8)
    _check_axis(axis)
    group = check_int("group", group, low=0)
    check_bool("symmetric", symmetric)
    if axis == "channel" and group == 0:
        raise ArgumentError("group must be > 0 tokens per scale for axis='channel'")
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
    bits = _check_pack_bits(bits)
    check_tensor("codes", codes)
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool or codes.dim() == 0:
        raise ArgumentTypeError(f"codes must be an integer tensor with a last dim, got {codes.dtype}")
    per = 8 // bits
    if codes.shape[-1] % per:
        raise ArgumentError(f"codes' last dim ({codes.shape[-1]}) must be a multiple of {per} for {bits}-bit packing")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**bits):
        raise ArgumentError(
            f"codes must lie in [0, {2**bits}) for {bits} bits, got [{int(codes.min())}, {int(codes.max())}]"
        )
    c = codes.to(torch.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    out = torch.zeros(c.shape[:-1], dtype=torch.uint8, device=codes.device)
    for i in range(per):
        out |= c[..., i] << (bits * i)
    return out


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`."""
    bits = _check_pack_bits(bits)
    check_tensor("packed", packed, dtypes=(torch.uint8,))
    if packed.dim() == 0:
        raise ArgumentError("packed must have a last dim")
    per = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (bits * i)) & mask for i in range(per)]
    return torch.stack(parts, -1).reshape(*packed.shape[:-1], packed.shape[-1] * per)


# --- fp8 -----------------------------------------------------------------------------------------


def fp8_descales(x: torch.Tensor, granularity: str = "head") -> torch.Tensor:
    """fp32 descales ``(batch, nheads_k)`` for ``x`` ``(b, s, h, d)``: ``absmax / 448`` per
    (sequence, KV head) (``"head"``), one for the whole tensor (``"tensor"``), or 1.0 (``"one"``)."""
    check_values("x", x)
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
    check_values("x", x)
    check_descale("descale", descale, x)
    y = x.float() / descale[:, None, :, None]
    return y.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def dequantize_fp8(x8: torch.Tensor, descale: torch.Tensor) -> torch.Tensor:
    """The real values of an fp8 cache: ``stored * descale``, in fp32."""
    check_tensor("x8", x8, ndim=4, dtypes=(torch.float8_e4m3fn,))
    check_descale("descale", descale, x8)
    return x8.float() * descale[:, None, :, None]


# --- a scheme applied to K and V -------------------------------------------------------------


def roundtrip(x: torch.Tensor, scheme: Scheme, role: str = "k", descale: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` ``(b, s, h, d)`` stored and read back under ``scheme`` (fp32). ``role`` ``"k"`` or
    ``"v"`` picks the integer axis. Per-channel groups: only whole groups of tokens are
    quantized, the tail is returned as is. fp8: ``descale`` (default from ``fp8_scale``)."""
    check_scheme(scheme)
    check_values("x", x)
    if role not in ("k", "v"):
        raise ArgumentError(f"role must be 'k' or 'v', got {role!r}")
    if descale is not None and scheme.kind != "fp8":
        raise ArgumentError(f"descale is for fp8 schemes; {scheme.name!r} is {scheme.kind}")
    if scheme.kind == "int":
        scheme.check_headdim(x.shape[3])
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
