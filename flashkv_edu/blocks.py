"""Blocks of a paged KV cache (notebook 06): the allocator, the prefix-cache key, where a token lives.

:class:`BlockAllocator` hands out fixed-size physical blocks with reference counts (sharing
between forks) and a prefix cache: a full block is keyed by :func:`block_hash`, a digest chaining
its parent block's key with its tokens, so a new prompt that starts with the same tokens reuses
it. Freed blocks with a key stay findable on an LRU free list until an allocation evicts them.
Token ``p`` of a sequence sits at ``(block_table[p // block_size], p % block_size)``
(:func:`slot_mapping`); :func:`gather_paged` and :func:`scatter_to_pages` turn a pool into a
contiguous cache and back. :mod:`flashkv_edu.paged` builds the paged cache on these.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch

from .validation import ArgumentError, ArgumentTypeError, check_int, check_tensor

__all__ = [
    "BlockAllocator",
    "OutOfBlocksError",
    "block_hash",
    "gather_paged",
    "scatter_to_pages",
    "slot_mapping",
    "token_ids",
]


class OutOfBlocksError(RuntimeError):
    """No free block is left (nothing was changed)."""


def token_ids(name: str, tokens) -> list[int]:
    """A list of token ids (ints >= 0) from a list, a tuple or a 1-D integer tensor."""
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() != 1 or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise ArgumentTypeError(f"{name} must be a 1-D list or tensor of token ids, got {tokens!r}")
        tokens = tokens.tolist()
    if not isinstance(tokens, (list, tuple)):
        raise ArgumentTypeError(f"{name} must be a list of token ids, got {type(tokens).__name__}")
    return [check_int(f"{name}[{i}]", t, low=0) for i, t in enumerate(tokens)]


def block_hash(parent: bytes | None, tokens) -> bytes:
    """Prefix-cache key of a full block: SHA-256 over the parent block's key and this block's
    token ids (8 bytes each, little-endian), 32 bytes. The same in every process and on every run
    (vLLM's default since v0.10.2): never Python's ``hash()``, which is seeded per process for
    strings and bytes, so keys shared between processes would never match."""
    h = hashlib.sha256(parent or b"root")
    h.update(b"".join(int(t).to_bytes(8, "little", signed=True) for t in tokens))
    return h.digest()


def slot_mapping(positions: torch.Tensor, block_table_row: torch.Tensor, block_size: int):
    """Where tokens live: for token positions ``(n,)`` of one sequence, return the physical
    ``(block ids, offsets)``, each ``(n,)``: ``block_table_row[p // block_size]`` and
    ``p % block_size``."""
    check_tensor("positions", positions, ndim=1)
    check_tensor("block_table_row", block_table_row, ndim=1)
    block_size = check_int("block_size", block_size, low=1)
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= block_size * block_table_row.numel()):
        raise ArgumentError(
            f"positions must lie in [0, {block_size * block_table_row.numel()}) "
            f"(block_table_row holds {block_table_row.numel()} blocks of {block_size})"
        )
    positions = positions.long()
    return block_table_row.long()[positions // block_size], positions % block_size


class BlockAllocator:
    """A pool of ``num_blocks`` physical blocks with reference counts and a prefix cache.

    Free blocks sit on an LRU list (oldest first). ``allocate`` takes the oldest free block and
    forgets its hash (eviction); ``free`` decrements a block's count and, at zero, appends it
    to the list, where ``lookup`` can still find it by hash until it is evicted.
    """

    def __init__(self, num_blocks: int, block_size: int):
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size)):
            check_int(name, value, low=1)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_count = [0] * num_blocks
        self.free_list: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.hash_of: dict[int, bytes] = {}
        self.block_of: dict[bytes, int] = {}
        self.hits = 0
        self.evictions = 0
        # Called as on_evict(block, key) before a cached block is reused (its contents are still
        # there): a cache with a store moves the block down a tier instead of losing it.
        self.on_evict = None

    @property
    def num_free(self) -> int:
        return len(self.free_list)

    def allocate(self, n: int = 1) -> list[int]:
        """Take ``n`` free blocks (reference count 1 each), evicting cached ones oldest first.
        Raises :class:`OutOfBlocksError` and changes nothing if fewer than ``n`` are free."""
        n = check_int("n", n, low=0)
        if n > self.num_free:
            raise OutOfBlocksError(f"need {n} free blocks, only {self.num_free} of {self.num_blocks} are free")
        blocks = []
        for _ in range(n):
            block, _ = self.free_list.popitem(last=False)
            old = self.hash_of.pop(block, None)
            if old is not None:
                del self.block_of[old]
                self.evictions += 1
                if self.on_evict is not None:
                    self.on_evict(block, old)
            self.ref_count[block] = 1
            blocks.append(block)
        return blocks

    def _check_block(self, block: int) -> None:
        if isinstance(block, bool) or not isinstance(block, int) or not 0 <= block < self.num_blocks:
            raise ArgumentError(f"unknown block {block!r}: blocks are 0 .. {self.num_blocks - 1}")

    def incref(self, block: int) -> None:
        """Share a block that is in use (a fork)."""
        self._check_block(block)
        if self.ref_count[block] == 0:
            raise ArgumentError(f"block {block} is free; it cannot be shared")
        self.ref_count[block] += 1

    def free(self, block: int) -> None:
        """Drop one reference; at zero the block joins the tail of the free list."""
        self._check_block(block)
        if self.ref_count[block] == 0:
            raise ArgumentError(f"double free of block {block}")
        self.ref_count[block] -= 1
        if self.ref_count[block] == 0:
            self.free_list[block] = None

    def register(self, block: int, key: bytes) -> None:
        """Record that full ``block`` holds the tokens hashed as ``key`` (first writer wins)."""
        self._check_block(block)
        if not isinstance(key, bytes):
            raise ArgumentTypeError(f"key must be bytes (a block_hash), got {type(key).__name__}")
        if self.ref_count[block] == 0:
            raise ArgumentError(f"block {block} is free; only a block in use can be registered")
        if key not in self.block_of and block not in self.hash_of:
            self.block_of[key] = block
            self.hash_of[block] = key

    def forget(self, block: int) -> None:
        """Drop ``block``'s prefix-cache key (its contents are about to change)."""
        self._check_block(block)
        key = self.hash_of.pop(block, None)
        if key is not None:
            del self.block_of[key]

    def lookup(self, key: bytes) -> int | None:
        """A cached block with this key, now referenced once more (taken off the free list if it
        was free), or None."""
        if not isinstance(key, bytes):
            raise ArgumentTypeError(f"key must be bytes (a block_hash), got {type(key).__name__}")
        block = self.block_of.get(key)
        if block is None:
            return None
        if self.ref_count[block] == 0:
            del self.free_list[block]
        self.ref_count[block] += 1
        self.hits += 1
        return block


def gather_paged(k_cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """Dense view of a paged cache: ``(batch, max_blocks * block_size, nheads_k, headdim)`` with
    row ``p`` of sequence ``b`` taken from ``k_cache[block_table[b, p // bs], p % bs]``."""
    check_tensor("k_cache", k_cache, ndim=4)
    from .validation import check_block_table

    check_block_table(
        block_table, block_table.shape[0] if isinstance(block_table, torch.Tensor) else 0, k_cache.shape[0]
    )
    b, nblk = block_table.shape
    dense = k_cache[block_table.long()]  # (b, nblk, bs, hk, d), a copy
    return dense.reshape(b, nblk * k_cache.shape[1], *k_cache.shape[2:])


def scatter_to_pages(x: torch.Tensor, block_table: torch.Tensor, num_blocks: int | None = None) -> torch.Tensor:
    """The inverse of :func:`gather_paged`: a contiguous ``(batch, max_blocks * page, ...)``
    tensor (a cache, or per-token scales) laid out in a pool ``(num_blocks, page, ...)``, row
    ``p`` of sequence ``b`` at ``[block_table[b, p // page], p % page]``. Blocks no sequence
    uses are zero. ``num_blocks`` defaults to the largest block id + 1."""
    check_tensor("x", x)
    b, nblk = block_table.shape
    if x.dim() < 2 or x.shape[0] != b or x.shape[1] % nblk:
        raise ArgumentError(f"x must be (batch={b}, a multiple of {nblk} rows, ...), got {tuple(x.shape)}")
    page = x.shape[1] // nblk
    num_blocks = int(block_table.max()) + 1 if num_blocks is None else num_blocks
    pool = torch.zeros(num_blocks, page, *x.shape[2:], dtype=x.dtype, device=x.device)
    pool[block_table.long().reshape(-1)] = x.reshape(b * nblk, page, *x.shape[2:])
    return pool
