"""Quantized KV caches (notebook 09): the cache class, above the API.

The codecs (how an element is stored and read back: fp8 with descales, integers per token or per
channel, KIVI) live in :mod:`flashkv_edu.quant_codecs` and are re-exported here;
:class:`QuantizedKVCache` stores integer codes and runs attention over them through
:func:`flashkv_edu.flash_attn_with_kvcache` or the decode kernel. Notebook 09's experiments (the
trained model through each scheme) are in ``flashkv_edu/teach/nb09_precision_and_quantized_caches.py``.
"""

from __future__ import annotations

import torch

from .api import flash_attn_with_kvcache
from .cache import write_rows
from .quant_codecs import (
    E4M3_MAX,
    SCALE_BYTES,
    SCHEMES,
    IntQuantized,
    Scheme,
    bytes_per_token,
    check_scheme,
    check_values,
    dequantize_fp8,
    fp8_descales,
    pack_codes,
    quantize_fp8,
    quantize_int,
    roundtrip,
    ungroup,
    unpack_codes,
)
from .validation import ArgumentError, check_backend, check_float_tensor, check_int

__all__ = [
    "E4M3_MAX",
    "SCALE_BYTES",
    "SCHEMES",
    "IntQuantized",
    "QuantizedKVCache",
    "Scheme",
    "bytes_per_token",
    "dequantize_fp8",
    "fp8_descales",
    "pack_codes",
    "quantize_fp8",
    "quantize_int",
    "roundtrip",
    "ungroup",
    "unpack_codes",
]


# --- a cache that stores integer codes -------------------------------------------------------


class QuantizedKVCache:
    """A contiguous KV cache ``(batch, capacity, nheads_k, headdim)`` stored under an integer
    ``scheme``: codes packed ``8 / bits`` to a byte, fp16 scales (and zero points) per token
    group or, for a per-channel axis, per ``group`` tokens of each channel; the newest tokens
    wait in a 16-bit buffer of ``residual + group`` rows until a whole group is outside the
    residual window (KIVI's streaming rule, :meth:`Scheme.quantized_length`).

    ``append(k, v)`` adds ``(batch, snew, nheads_k, headdim)`` to every sequence;
    ``dequantized()`` returns what attention reads; ``attention(q, ...)`` runs
    :func:`flashkv_edu.flash_attn_with_kvcache`'s semantics over it. An 8-bit symmetric cache with
    one scale per token and head goes straight into the Triton decode kernel, which dequantizes
    tile by tile (``backend="triton"``, :attr:`kernel_reads_codes`); other schemes are dequantized
    first.
    """

    def __init__(self, batch: int, capacity: int, nheads_k: int, headdim: int, scheme: Scheme, device="cpu"):
        check_scheme(scheme)
        if scheme.kind != "int":
            raise ArgumentError(f"QuantizedKVCache stores integer schemes; {scheme.name!r} is {scheme.kind}")
        for name, value in (("batch", batch), ("capacity", capacity), ("nheads_k", nheads_k)):
            check_int(name, value, low=1)
        scheme.check_headdim(headdim)
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ArgumentError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r}") from exc
        self.scheme = scheme
        self.shape = (batch, capacity, nheads_k, headdim)
        g = scheme.token_group
        if capacity % g:
            raise ArgumentError(f"capacity ({capacity}) must be a multiple of the token group ({g})")
        packed = headdim * scheme.bits // 8
        code_dtype = torch.int8 if self.raw_int8 else torch.uint8
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
    def raw_int8(self) -> bool:
        """Symmetric 8-bit codes are stored as plain int8 (no packing)."""
        return self.scheme.bits == 8 and self.scheme.symmetric

    @property
    def kernel_reads_codes(self) -> bool:
        """Whether the Triton decode kernel reads this cache's codes directly: int8, symmetric,
        one scale per token and KV head (per-token axes whose group is the whole head dim), no
        16-bit residual. Every other scheme is dequantized first, on both backends."""
        s, d = self.scheme, self.shape[3]
        return self.raw_int8 and s.residual == 0 and (s.k_axis, s.v_axis) == ("token", "token") and s.group in (0, d)

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
            if t.device != self.cache_seqlens.device:
                raise ArgumentError(f"{name} must be on the cache's device {self.cache_seqlens.device}, got {t.device}")
        if k.shape != v.shape:
            raise ArgumentError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
        if k.shape[1] == 0:
            return
        check_values("k", k)
        check_values("v", v)
        if int(self.cache_seqlens.max()) + k.shape[1] > cap:
            raise ArgumentError(f"cache overflow: {self.cache_seqlens.tolist()} + {k.shape[1]} > capacity {cap}")
        for t in range(k.shape[1]):
            for i in range(b):
                self._push(i, k[i, t].float(), v[i, t].float())

    def _push(self, i: int, k_row: torch.Tensor, v_row: torch.Tensor) -> None:
        n = int(self.cache_seqlens[i])
        done = self.scheme.quantized_length(n)
        at, row = torch.tensor([n - done]), torch.tensor([i])
        for r, x in (("k", k_row), ("v", v_row)):  # the 16-bit residual rows: (1, 1, hk, d) at slot n - done
            write_rows(self.pending[r], x.half()[None, None], at, rows=row)
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
        codes = ungroup(q.codes, axis, q.shape)  # (1, g, hk, d)
        if not self.raw_int8:
            codes = pack_codes(codes + (2 ** (s.bits - 1) if s.symmetric else 0), s.bits)
        row = torch.tensor([i])
        write_rows(self.codes[r], codes.to(self.codes[r].dtype), torch.tensor([pos]), rows=row)
        # Scales (and zero points): per token, (1, g, hk, groups) at row pos; per channel, one row
        # (1, 1, hk, d) for this block of `group` tokens, at row pos // group.
        at = torch.tensor([pos if axis == "token" else pos // s.group])
        write_rows(self.scales[r], q.scale[..., 0], at, rows=row)
        if q.zero is not None:
            write_rows(self.zeros[r], q.zero[..., 0], at, rows=row)

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k, v)`` fp32 ``(batch, capacity, nheads_k, headdim)``: the values attention reads
        (rows past a sequence's length are 0)."""
        s = self.scheme
        b, cap, hk, d = self.shape
        out = []
        for r in "kv":
            axis = s.k_axis if r == "k" else s.v_axis
            if self.raw_int8:
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

    # The masks of flash_attn_with_kvcache that attention over this cache accepts.
    MASK_ARGUMENTS = ("causal", "window_size", "softcap", "softmax_scale", "alibi_slopes")

    def attention(self, q: torch.Tensor, *, backend: str = "torch", **kwargs) -> torch.Tensor:
        """Attention of ``q`` ``(batch, seqlen_q, nheads, headdim)`` over the cached tokens, with
        :func:`flashkv_edu.flash_attn_with_kvcache`'s masks (``causal``, ``window_size``,
        ``softcap``, ``softmax_scale``, ``alibi_slopes``). With ``backend="triton"`` and
        :attr:`kernel_reads_codes` the decode kernel dequantizes the int8 tiles itself; otherwise
        (every backend, every other scheme) the cache is dequantized first. Both compute the same."""
        b, _, hk, d = self.shape
        check_float_tensor("q", q, ndim=4)
        if q.shape[0] != b or q.shape[3] != d or q.shape[2] % hk or q.shape[1] == 0:
            raise ArgumentError(
                f"q must have shape ({b}, seqlen_q >= 1, a multiple of {hk} heads, {d}), got {tuple(q.shape)}"
            )
        check_backend(backend)
        unknown = sorted(set(kwargs) - set(self.MASK_ARGUMENTS))
        if unknown:
            raise ArgumentError(f"attention takes the masks {self.MASK_ARGUMENTS}; got {', '.join(unknown)}")
        if backend == "triton" and self.kernel_reads_codes:
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
