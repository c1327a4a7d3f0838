"""A contiguous KV cache with per-sequence lengths (notebook 02).

Keys and values live in ``(batch, capacity, nheads_k, headdim)`` buffers, FlashAttention's
``k_cache`` / ``v_cache`` layout. ``cache_seqlens[b]`` (int32) says how many rows of sequence
``b`` hold tokens, so one batch can hold sequences of different lengths.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from .validation import (
    FLOAT_DTYPES,
    ArgumentError,
    ArgumentTypeError,
    check_bool,
    check_int,
    check_same,
    check_tensor,
)

__all__ = [
    "MODEL_SHAPES",
    "CacheMemory",
    "KVCache",
    "append_to_cache",
    "check_seq_idx",
    "kv_bytes_per_token",
    "write_kv",
    "write_rows",
]


def _int_list_tensor(name: str, values, device=None) -> torch.Tensor:
    """A 1-D int64 tensor from an int, a list of ints or an integer tensor; bools, floats and
    anything ragged are refused."""
    if isinstance(values, torch.Tensor):
        idx = values.to(device) if device is not None else values
    else:
        items = [values] if not isinstance(values, (list, tuple)) else list(values)
        if any(isinstance(x, bool) or not isinstance(x, numbers.Integral) for x in items):
            raise ArgumentTypeError(f"{name} must be an int or a 1-D list/tensor of ints, got {values!r}")
        idx = torch.tensor(items, dtype=torch.int64, device=device)
    if idx.dim() != 1 or idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise ArgumentTypeError(f"{name} must be an int or a 1-D list/tensor of ints, got {values!r}")
    return idx.long()


def check_seq_idx(seq_idx, batch: int, device=None, name: str = "seq_idx") -> torch.Tensor:
    """Turn ``seq_idx`` (None = every row, an int, a list or a 1-D integer tensor) into distinct,
    in-range int64 row indices."""
    if seq_idx is None:
        return torch.arange(batch, device=device)
    idx = _int_list_tensor(name, seq_idx, device)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= batch):
        raise ArgumentError(f"{name} entries must lie in [0, {batch}), got {idx.tolist()}")
    if idx.unique().numel() != idx.numel():
        raise ArgumentError(f"{name} must not repeat a sequence, got {idx.tolist()}")
    return idx


def _positions(dst, n: int, snew: int, start, rows, block_table, counts):
    """Where token ``t`` of sequence ``i`` goes: index tensors ``(first, second)`` into ``dst``
    (row and position of a contiguous cache, or block and slot of a pool), and the keep-mask of
    ragged appends (None when every token is written)."""
    device = dst.device
    pos = start.long().to(device)[:, None] + torch.arange(snew, device=device)[None, :]  # (n, snew)
    if block_table is not None:
        page = dst.shape[1]
        # A ragged append's padding tokens (not kept) may point past the table: clamp, never read.
        table = block_table.long().to(device)
        first, second = table.gather(1, (pos // page).clamp_max(table.shape[1] - 1)), pos % page
    else:
        seq = torch.arange(n, device=device) if rows is None else rows.long().to(device)
        first, second = seq[:, None].expand(n, snew), pos
    keep = None if counts is None else torch.arange(snew, device=device)[None, :] < counts.to(device)[:, None]
    return first, second, keep


def _scatter(dst, src, first, second, keep) -> None:
    if keep is None:
        dst[first, second] = src.to(dst.dtype)
    else:
        dst[first[keep], second[keep]] = src[keep].to(dst.dtype)


def write_rows(dst, src, start, *, rows=None, block_table=None, counts=None) -> None:
    """Write ``src[i, t]`` (``src`` ``(n, snew, ...)``) at token position ``start[i] + t`` of
    sequence ``i``, for ``t < counts[i]`` (default: all ``snew``), in place:

    * contiguous ``dst`` ``(batch_cache, capacity, ...)``: at ``dst[rows[i], start[i] + t]``
      (``rows`` default ``0 .. n-1``);
    * paged ``dst`` ``(num_blocks, page, ...)`` with ``block_table`` ``(n, max_blocks)``: position
      ``p`` at ``dst[block_table[i, p // page], p % page]``.

    ``start``, ``rows``, ``counts`` are ``(n,)`` integer tensors. The caller has checked that every
    position fits; no other element of ``dst`` changes. With :func:`write_kv` (keys and values
    together) this is the one write path of the package: every cache's keys, values, quantized
    codes and scales are written by one of the two, through the same scatter. (Whole blocks that
    move, a copy-on-write or a swap back in from a tier, are copied block by block, not rows.)"""
    n, snew = src.shape[:2]
    if n == 0 or snew == 0:
        return
    _scatter(dst, src, *_positions(dst, n, snew, start, rows, block_table, counts))


def write_kv(k_cache, v_cache, k, v, start, *, rows=None, block_table=None, counts=None, same_start=None) -> None:
    """:func:`write_rows` for keys and values together (``k``, ``v`` ``(n, snew, nheads_k,
    headdim)``, the positions computed once): the append of every cache in the package,
    contiguous or paged. ``same_start``: a host int when the caller knows that every row starts
    there (rows ``0 .. n-1`` of a contiguous cache, all tokens): a plain slice copy then."""
    n, snew = k.shape[:2]
    if n == 0 or snew == 0:
        return
    if same_start is not None and rows is None and block_table is None and counts is None:
        k_cache[:n, same_start : same_start + snew] = k.to(k_cache.dtype)
        v_cache[:n, same_start : same_start + snew] = v.to(v_cache.dtype)
        return
    where = _positions(k_cache, n, snew, start, rows, block_table, counts)
    _scatter(k_cache, k, *where)
    _scatter(v_cache, v, *where)


def append_to_cache(k_cache, v_cache, cache_seqlens, k, v) -> torch.Tensor:
    """Write ``k, v`` ``(batch, snew, nheads_k, headdim)`` after each sequence's
    ``cache_seqlens`` tokens, in place, and return the new lengths (int32 ``(batch,)``).
    The bare operation; :meth:`KVCache.append` adds the checks."""
    write_kv(k_cache, v_cache, k, v, cache_seqlens)
    return (cache_seqlens + k.shape[1]).to(torch.int32)


@dataclass
class CacheMemory:
    """Bytes reserved by the buffers vs bytes that hold tokens."""

    reserved_bytes: int
    used_bytes: int

    @property
    def utilization(self) -> float:
        return self.used_bytes / self.reserved_bytes if self.reserved_bytes else 0.0


class KVCache:
    """Contiguous key/value cache for ``batch`` sequences of up to ``max_seqlen`` tokens.

    ``growable=True`` doubles the capacity when an append would overflow (counting the copies
    in ``grow_copies`` and ``grow_bytes_copied``); otherwise overflow raises ``ValueError`` and
    nothing is written.
    """

    def __init__(
        self,
        batch: int,
        max_seqlen: int,
        nheads_k: int,
        headdim: int,
        *,
        dtype=torch.float32,
        device=None,
        growable: bool = False,
        headdim_v: int | None = None,
        head_major: bool = False,
    ):
        headdim_v = headdim if headdim_v is None else headdim_v
        for name, value in (
            ("batch", batch),
            ("max_seqlen", max_seqlen),
            ("nheads_k", nheads_k),
            ("headdim", headdim),
            ("headdim_v", headdim_v),
        ):
            check_int(name, value, low=1)
        if dtype not in FLOAT_DTYPES:
            raise ArgumentTypeError(f"dtype must be a floating dtype, got {dtype}")
        check_bool("growable", growable)
        check_bool("head_major", head_major)
        self.head_major = head_major
        self.k_cache = self._buffer(batch, max_seqlen, nheads_k, headdim, dtype, device)
        self.v_cache = self._buffer(batch, max_seqlen, nheads_k, headdim_v, dtype, device)
        self.cache_seqlens = torch.zeros(batch, dtype=torch.int32, device=self.k_cache.device)
        self.growable = growable
        self.grow_copies = 0
        self.grow_bytes_copied = 0

    def _buffer(self, batch, capacity, nheads_k, headdim, dtype, device) -> torch.Tensor:
        """Zeros ``(batch, capacity, nheads_k, headdim)``: FlashAttention's layout; with
        ``head_major`` a view of ``(batch, nheads_k, capacity, headdim)`` storage (still contiguous
        in the head dim, as FlashAttention asks), where each head's keys are one block of memory
        for PyTorch's fused attention to stream."""
        if self.head_major:
            return torch.zeros(batch, nheads_k, capacity, headdim, dtype=dtype, device=device).transpose(1, 2)
        return torch.zeros(batch, capacity, nheads_k, headdim, dtype=dtype, device=device)

    # --- shape ----------------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return self.k_cache.shape[0]

    @property
    def capacity(self) -> int:
        return self.k_cache.shape[1]

    @property
    def nheads_k(self) -> int:
        return self.k_cache.shape[2]

    @property
    def headdim(self) -> int:
        return self.k_cache.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.k_cache.dtype

    # --- writing --------------------------------------------------------------------------
    @property
    def headdim_v(self) -> int:
        return self.v_cache.shape[3]

    def _check_new(self, name: str, x) -> None:
        check_tensor(name, x, ndim=4)
        check_same(("k_cache", name), (self.k_cache, x), "dtype")
        check_same(("k_cache", name), (self.k_cache, x), "device")
        if x.shape[2] != self.nheads_k:
            raise ArgumentError(f"{name} must have nheads_k={self.nheads_k} heads, got {x.shape[2]}")
        want = self.headdim if name == "k" else self.headdim_v
        if x.shape[3] != want:
            raise ArgumentError(f"{name} must have head dim {want}, got {x.shape[3]}")

    def append(self, k: torch.Tensor, v: torch.Tensor, seq_idx=None, num_new=None) -> None:
        """Append new tokens ``k, v`` ``(n, snew, nheads_k, headdim)`` to ``n`` sequences.

        ``seq_idx`` picks the sequences (default: all ``batch`` rows in order); ``num_new``
        ``(n,)`` appends only the first ``num_new[i]`` tokens of row ``i`` (ragged appends).
        Raises ``ValueError``/``TypeError`` on bad input and leaves the cache unchanged.
        """
        self._check_new("k", k)
        self._check_new("v", v)
        if k.shape[:3] != v.shape[:3]:
            raise ArgumentError(f"k and v must agree in (n, snew, nheads_k), got {tuple(k.shape)} and {tuple(v.shape)}")
        rows = check_seq_idx(seq_idx, self.batch, self.k_cache.device)
        if k.shape[0] != rows.numel():
            raise ArgumentError(f"k has {k.shape[0]} rows but seq_idx selects {rows.numel()} sequences")
        if num_new is None:
            counts = torch.full((rows.numel(),), k.shape[1], dtype=torch.int64, device=rows.device)
        else:
            counts = _int_list_tensor("num_new", num_new, rows.device)
            if counts.shape != (rows.numel(),):
                raise ArgumentError(f"num_new must hold {rows.numel()} ints (one per sequence), got {num_new!r}")
            if counts.numel() and (int(counts.min()) < 0 or int(counts.max()) > k.shape[1]):
                raise ArgumentError(f"num_new entries must lie in [0, {k.shape[1]}], got {counts.tolist()}")
        start = self.cache_seqlens[rows]
        needed = int((start + counts).max()) if rows.numel() else 0
        if needed > self.capacity:
            if not self.growable:
                raise ArgumentError(
                    f"cache overflow: appending {counts.tolist()} tokens to sequences {rows.tolist()} "
                    f"of length {start.tolist()} needs {needed} rows, capacity is {self.capacity}"
                )
            self._grow(needed)
        write_kv(self.k_cache, self.v_cache, k, v, start, rows=rows, counts=counts)
        self.cache_seqlens[rows] = (start + counts).to(torch.int32)

    def _grow(self, needed: int) -> None:
        capacity = self.capacity
        while capacity < needed:
            capacity *= 2
        for name in ("k_cache", "v_cache"):
            old = getattr(self, name)
            new = self._buffer(self.batch, capacity, *old.shape[2:], old.dtype, old.device)
            new[:, : old.shape[1]] = old
            self.grow_bytes_copied += old.numel() * old.element_size()
            setattr(self, name, new)
        self.grow_copies += 1

    def reset(self, seq_idx=None) -> None:
        """Forget the tokens of the chosen sequences (default: all) and zero their rows."""
        rows = check_seq_idx(seq_idx, self.batch, self.k_cache.device)
        self.cache_seqlens[rows] = 0
        self.k_cache[rows] = 0
        self.v_cache[rows] = 0

    # --- reading --------------------------------------------------------------------------
    def valid(self, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views ``(length, nheads_k, headdim)`` of sequence ``seq``'s cached keys and values."""
        row = int(check_seq_idx(check_int("seq", seq), self.batch, name="seq")[0])
        n = int(self.cache_seqlens[row])
        return self.k_cache[row, :n], self.v_cache[row, :n]

    def memory(self) -> CacheMemory:
        """Bytes reserved by both buffers vs bytes holding cached tokens."""
        per_token = self.nheads_k * (self.headdim + self.headdim_v) * self.k_cache.element_size()
        return CacheMemory(
            reserved_bytes=self.batch * self.capacity * per_token, used_bytes=int(self.cache_seqlens.sum()) * per_token
        )


def kv_bytes_per_token(n_layers: int, nheads_k: int, headdim: int, bytes_per_elem: int = 2) -> int:
    """KV-cache bytes one token occupies in a whole model: ``2 * layers * nheads_k * headdim * bytes``."""
    return 2 * n_layers * nheads_k * headdim * bytes_per_elem


# Published shapes (layers, query heads, KV heads, head dim) of a few well-known models.
MODEL_SHAPES = {
    "Llama-2-7B (MHA)": (32, 32, 32, 128),
    "Llama-3-8B (GQA)": (32, 32, 8, 128),
    "Mistral-7B (GQA)": (32, 32, 8, 128),
    "OPT-13B (MHA)": (40, 40, 40, 128),
    "Llama-3-70B (GQA)": (80, 64, 8, 128),
}
