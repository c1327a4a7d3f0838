"""Paged KV cache: a block allocator and block tables (notebook 06).

Keys and values live in pools of fixed-size physical blocks shaped like FlashAttention's paged
cache, ``(num_blocks, block_size, nheads_k, headdim)``. Each sequence owns a **block table**:
logical block ``i`` (tokens ``i*block_size ... (i+1)*block_size - 1``) lives in physical block
``block_table[seq, i]``, so token ``p`` sits at ``(block_table[seq, p // block_size],
p % block_size)``. A sequence wastes at most one partly filled block.

FlashAttention 2 accepts ``block_table`` only when ``block_size`` is a multiple of 256; vLLM's
default is 16 and FlashAttention 3 accepts any size. Everything here works for any size.

:class:`BlockAllocator` hands out blocks with reference counts (sharing between forks) and a
prefix cache: a full block is keyed by a hash chaining its parent block's hash with its tokens,
so a new prompt that starts with the same tokens reuses it. Freed blocks with a hash stay
findable on an LRU free list until a new allocation evicts them.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from .cache import write_kv
from .offload import BlockLayout, KVLostError, StoreFullError, TieredStore
from .validation import (
    FLOAT_DTYPES,
    ArgumentError,
    ArgumentTypeError,
    check_bool,
    check_int,
    check_same,
    check_tensor,
)


class OutOfBlocksError(RuntimeError):
    """No free block is left (nothing was changed)."""


def _token_ids(name: str, tokens) -> list[int]:
    """A list of token ids (ints >= 0) from a list, a tuple or a 1-D integer tensor."""
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() != 1 or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise ArgumentTypeError(f"{name} must be a 1-D list or tensor of token ids, got {tokens!r}")
        tokens = tokens.tolist()
    if not isinstance(tokens, (list, tuple)):
        raise ArgumentTypeError(f"{name} must be a list of token ids, got {type(tokens).__name__}")
    return [check_int(f"{name}[{i}]", t, low=0) for i, t in enumerate(tokens)]


def block_hash(parent: bytes | None, tokens) -> bytes:
    """Prefix-cache key of a full block: a digest of the parent block's key and this block's token ids."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"root")
    h.update(b",".join(str(int(t)).encode() for t in tokens))
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


@dataclass
class _Sequence:
    blocks: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    length: int = 0
    hashes: list[bytes] = field(default_factory=list)  # keys of its full blocks, in order


@dataclass
class SwappedSequence:
    """A sequence preempted by :meth:`PagedKVCache.swap_out`: the store keys of its blocks (in
    order), its length, token ids and block hashes. ``done`` once swapped in (or lost)."""

    keys: list[bytes]
    length: int
    tokens: list[int] | None
    hashes: list[bytes]
    done: bool = False


class PagedKVCache:
    """Key/value pools ``(num_blocks, block_size, nheads_k, headdim)`` plus an int32
    ``block_table (max_batch, max_blocks_per_seq)`` and int32 ``cache_seqlens (max_batch,)``,
    the arguments FlashAttention's paged ``flash_attn_with_kvcache`` takes.

    Rows of the batch are *slots*: :meth:`add_sequence` opens one (reusing cached prompt blocks),
    :meth:`append` writes new keys/values through the table (copy-on-write if the last block is
    shared), :meth:`fork` shares every block with a new slot, :meth:`free` releases a slot.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        nheads_k: int,
        headdim: int,
        *,
        max_batch: int,
        max_blocks_per_seq: int,
        dtype=torch.float32,
        device=None,
        prefix_caching: bool = True,
        num_layers: int = 1,
        headdim_v: int | None = None,
    ):
        if dtype not in FLOAT_DTYPES:
            raise ArgumentTypeError(f"dtype must be a floating dtype, got {dtype}")
        headdim_v = headdim if headdim_v is None else headdim_v
        for name, value in (
            ("nheads_k", nheads_k),
            ("headdim", headdim),
            ("headdim_v", headdim_v),
            ("max_batch", max_batch),
            ("max_blocks_per_seq", max_blocks_per_seq),
            ("num_layers", num_layers),
        ):
            check_int(name, value, low=1)
        check_bool("prefix_caching", prefix_caching)
        self.allocator = BlockAllocator(num_blocks, block_size)
        # One pool pair per layer; all layers share the block tables (a token sits at the same
        # (block, offset) in every layer). Layers may differ in shape (resize_layer).
        self.k_pools = [
            torch.zeros(num_blocks, block_size, nheads_k, headdim, dtype=dtype, device=device)
            for _ in range(num_layers)
        ]
        self.v_pools = [
            torch.zeros(num_blocks, block_size, nheads_k, headdim_v, dtype=dtype, device=device)
            for _ in range(num_layers)
        ]
        self.block_table = torch.zeros(max_batch, max_blocks_per_seq, dtype=torch.int32, device=self.k_cache.device)
        self.cache_seqlens = torch.zeros(max_batch, dtype=torch.int32, device=self.k_cache.device)
        self.seqs: dict[int, _Sequence] = {}
        self.prefix_caching = prefix_caching
        self.cow_copies = 0
        self.store = None  # a TieredStore below the device pool (attach_store)
        self.prefix_hits = {"device": 0, "host": 0, "disk": 0}

    def resize_layer(self, layer: int, nheads_k: int, headdim: int, headdim_v: int | None = None, dtype=None) -> None:
        """Give ``layer`` pools of another shape (models whose layers differ in KV heads or head
        dims). Its stored keys and values are dropped: call it before the layer's first write."""
        layer = check_int("layer", layer, low=0, high=len(self.k_pools) - 1)
        if self.store is not None:
            raise ArgumentError("resize_layer: a store is attached; resize every layer before attach_store")
        headdim_v = headdim if headdim_v is None else headdim_v
        for name, value in (("nheads_k", nheads_k), ("headdim", headdim), ("headdim_v", headdim_v)):
            check_int(name, value, low=1)
        dtype = self.k_pools[layer].dtype if dtype is None else dtype
        if dtype not in FLOAT_DTYPES:
            raise ArgumentTypeError(f"dtype must be a floating dtype, got {dtype}")
        old = self.k_pools[layer]
        self.k_pools[layer] = torch.zeros(*old.shape[:2], nheads_k, headdim, dtype=dtype, device=old.device)
        self.v_pools[layer] = torch.zeros(*old.shape[:2], nheads_k, headdim_v, dtype=dtype, device=old.device)

    @property
    def num_layers(self) -> int:
        return len(self.k_pools)

    @property
    def pools(self) -> list[torch.Tensor]:
        """Every pool, layer by layer: ``[k_pools[0], v_pools[0], k_pools[1], ...]``."""
        return [pool for pair in zip(self.k_pools, self.v_pools, strict=True) for pool in pair]

    @property
    def k_cache(self) -> torch.Tensor:
        """Layer 0's key pool ``(num_blocks, block_size, nheads_k, headdim)``."""
        return self.k_pools[0]

    @property
    def v_cache(self) -> torch.Tensor:
        """Layer 0's value pool."""
        return self.v_pools[0]

    @property
    def block_size(self) -> int:
        return self.allocator.block_size

    @property
    def max_batch(self) -> int:
        return self.block_table.shape[0]

    @property
    def max_blocks_per_seq(self) -> int:
        return self.block_table.shape[1]

    def _slot(self, slot: int) -> _Sequence:
        if isinstance(slot, bool) or not isinstance(slot, int) or slot not in self.seqs:
            raise ArgumentError(f"slot {slot!r} holds no sequence (open slots: {sorted(self.seqs)})")
        return self.seqs[slot]

    def _free_slot(self) -> int:
        for slot in range(self.max_batch):
            if slot not in self.seqs:
                return slot
        raise ArgumentError(f"all {self.max_batch} batch slots are in use")

    def _sync_row(self, slot: int) -> None:
        seq = self.seqs[slot]
        row = torch.zeros(self.max_blocks_per_seq, dtype=torch.int32)
        row[: len(seq.blocks)] = torch.tensor(seq.blocks, dtype=torch.int32)
        self.block_table[slot] = row.to(self.block_table.device)
        self.cache_seqlens[slot] = seq.length

    def _prefix_keys(self, tokens: list[int]) -> list[bytes]:
        """Keys of the full blocks of ``tokens`` that a new sequence may reuse: never the block
        holding the last token (it must be computed, so the caller gets its logits)."""
        bs = self.block_size
        keys, parent = [], None
        for i in range(min(max(len(tokens) - 1, 0) // bs, self.max_blocks_per_seq)):
            parent = block_hash(parent, tokens[i * bs : (i + 1) * bs])
            keys.append(parent)
        return keys

    def add_sequence(self, prompt_tokens=None) -> tuple[int, int]:
        """Open a slot. With prefix caching, the longest run of full blocks of
        ``prompt_tokens`` already cached is reused (never the whole prompt: its last token
        is always left to compute): found on the device, or, with a store attached
        (:meth:`attach_store`), in its host or disk tier and copied into a free block.
        Returns ``(slot, cached_tokens)``: the caller appends keys/values for
        ``prompt_tokens[cached_tokens:]`` only. ``prefix_hits`` counts blocks found per tier."""
        tokens = [] if prompt_tokens is None else _token_ids("prompt_tokens", prompt_tokens)
        slot = self._free_slot()
        seq = _Sequence()
        if self.prefix_caching:
            for key in self._prefix_keys(tokens):
                block, source = self.allocator.lookup(key), "device"
                if block is None:
                    found = self.store.get(key) if self.store is not None and self.allocator.num_free else None
                    if found is None:
                        break
                    source, row = found
                    block = self.allocator.allocate(1)[0]
                    self.store.layout.unpack(row[None], self.pools, [block])
                    self.allocator.register(block, key)
                seq.blocks.append(block)
                seq.hashes.append(key)
                self.prefix_hits[source] += 1
            seq.length = len(seq.blocks) * self.block_size
            seq.tokens = tokens[: seq.length]
        self.seqs[slot] = seq
        self._sync_row(slot)
        return slot, seq.length

    def blocks_to_admit(self, prompt_tokens) -> int:
        """Free blocks that opening ``prompt_tokens`` (:meth:`add_sequence`) and prefilling the
        rest take: every block the prompt fills, less the cached ones other sequences are using
        (shared, not taken from the free list). Changes nothing."""
        tokens = _token_ids("prompt_tokens", prompt_tokens)
        shared = 0
        if self.prefix_caching:
            for key in self._prefix_keys(tokens):
                block = self.allocator.block_of.get(key)
                if block is None:
                    break
                shared += self.allocator.ref_count[block] > 0
        return -(-len(tokens) // self.block_size) - shared

    def _plan(self, seq: _Sequence, n: int) -> tuple[int, bool]:
        """(new blocks needed, whether the last block must be copied first) to append n tokens."""
        bs = self.block_size
        total_blocks = -(-(seq.length + n) // bs)
        if total_blocks > self.max_blocks_per_seq:
            raise ArgumentError(
                f"n: the sequence would need {total_blocks} blocks, block_table holds {self.max_blocks_per_seq}"
            )
        partial = seq.length % bs != 0
        cow = n > 0 and partial and self.allocator.ref_count[seq.blocks[-1]] > 1
        return total_blocks - len(seq.blocks) + int(cow), cow

    def append(self, slot: int, k: torch.Tensor, v: torch.Tensor, tokens=None) -> None:
        """Append ``k, v`` ``(n, nheads_k, headdim)`` (``n`` new tokens) to ``slot`` (layer 0).

        Allocates blocks as needed; if the last, partly filled block is shared with a fork it is
        copied first (copy-on-write), so other sequences never see this write. ``tokens`` (the
        ``n`` token ids) feed the prefix cache. Raises (changing nothing) on bad input or when
        the pool has too few free blocks.
        """
        for name, x, pool in (("k", k, self.k_cache), ("v", v, self.v_cache)):
            check_tensor(name, x, ndim=3)
            check_same((f"{name}_cache", name), (pool, x), "dtype")
            check_same((f"{name}_cache", name), (pool, x), "device")
            if tuple(x.shape[1:]) != tuple(pool.shape[2:]):
                raise ArgumentError(
                    f"{name} must be (n, nheads_k={pool.shape[2]}, headdim={pool.shape[3]}), got {tuple(x.shape)}"
                )
        if k.shape[0] != v.shape[0]:
            raise ArgumentError(f"k and v must hold the same number of tokens, got {k.shape[0]} and {v.shape[0]}")
        start = self.reserve(slot, k.shape[0], tokens)
        first = torch.tensor([start], device=self.k_cache.device)
        write_kv(self.k_cache, self.v_cache, k[None], v[None], first, block_table=self.block_table[slot : slot + 1])

    def reserve(self, slot: int, n: int, tokens=None) -> int:
        """Make room for ``n`` more tokens of ``slot`` in every layer and return the position of
        the first one: allocate blocks, copy a shared last block first (copy-on-write, all
        layers), update the block table, advance the length. The caller writes the keys and
        values (``flash_attn_with_kvcache`` does it through ``block_table``). Raises, changing
        nothing, when the pool has too few free blocks."""
        seq = self._slot(slot)
        n = check_int("n", n, low=0)
        tokens = _token_ids("tokens", tokens) if tokens is not None else None
        if tokens is not None and len(tokens) != n:
            raise ArgumentError(f"tokens must hold {n} ids, got {len(tokens)}")
        need, cow = self._plan(seq, n)
        if need > self.allocator.num_free:
            raise OutOfBlocksError(
                f"appending {n} tokens to slot {slot} needs {need} free blocks, {self.allocator.num_free} are free"
            )
        if cow:
            old = seq.blocks[-1]
            new = self.allocator.allocate(1)[0]
            for pools in (self.k_pools, self.v_pools):
                for pool in pools:
                    pool[new] = pool[old]
            self.allocator.free(old)
            seq.blocks[-1] = new
            self.cow_copies += 1
        bs = self.block_size
        missing = -(-(seq.length + n) // bs) - len(seq.blocks)
        seq.blocks.extend(self.allocator.allocate(missing) if missing > 0 else [])
        start = seq.length
        seq.length += n
        if tokens is None or seq.tokens is None or len(seq.tokens) != start:
            seq.tokens = None  # token ids unknown: this sequence no longer feeds the prefix cache
        else:
            seq.tokens.extend(tokens)
            while self.prefix_caching and len(seq.hashes) < seq.length // bs:
                i = len(seq.hashes)
                key = block_hash(seq.hashes[-1] if seq.hashes else None, seq.tokens[i * bs : (i + 1) * bs])
                self.allocator.register(seq.blocks[i], key)
                seq.hashes.append(key)
        self._sync_row(slot)
        return start

    def fork(self, slot: int) -> int:
        """A new slot sharing every block of ``slot`` (parallel sampling, beam search)."""
        seq = self._slot(slot)
        child = self._free_slot()
        for block in seq.blocks:
            self.allocator.incref(block)
        self.seqs[child] = _Sequence(
            blocks=list(seq.blocks),
            length=seq.length,
            tokens=None if seq.tokens is None else list(seq.tokens),
            hashes=list(seq.hashes),
        )
        self._sync_row(child)
        return child

    def truncate(self, slot: int, length: int) -> None:
        """Roll ``slot`` back to its first ``length`` tokens (checkpoint and rollback; speculative
        decoding's rejected tokens; transformers' ``crop``): blocks past them are released, and a
        full block that becomes partial leaves the prefix cache (its hash would describe tokens the
        sequence no longer has, and the next append writes into it)."""
        seq = self._slot(slot)
        length = check_int("length", length, low=0, high=seq.length)
        keep = -(-length // self.block_size)
        for block in reversed(seq.blocks[keep:]):
            self.allocator.free(block)
        seq.blocks = seq.blocks[:keep]
        full = length // self.block_size
        if len(seq.hashes) > full:
            for block in seq.blocks[full:]:
                if self.allocator.ref_count[block] == 1:
                    self.allocator.forget(block)
            seq.hashes = seq.hashes[:full]
        seq.length = length
        if seq.tokens is not None:
            seq.tokens = seq.tokens[:length]
        self._sync_row(slot)

    def reorder(self, order) -> None:
        """Rebuild the slots from ``order`` (ints): new slot ``i`` holds what slot ``order[i]``
        held, sharing its blocks (a slot may appear several times, as in beam search, or not at all,
        as when a batch shrinks); every old slot is then released. Nothing is copied: a shared
        last block is copied on the next write."""
        order = [check_int(f"order[{i}]", o, low=0) for i, o in enumerate(order)]
        if len(order) > self.max_batch:
            raise ArgumentError(f"order holds {len(order)} slots; the cache has {self.max_batch}")
        for o in order:
            self._slot(o)
        new = {}
        for i, o in enumerate(order):
            old = self.seqs[o]
            for block in old.blocks:
                self.allocator.incref(block)
            new[i] = _Sequence(
                blocks=list(old.blocks),
                length=old.length,
                tokens=None if old.tokens is None else list(old.tokens),
                hashes=list(old.hashes),
            )
        for slot in list(self.seqs):
            self.free(slot)
        self.seqs = new
        for slot in new:
            self._sync_row(slot)

    # --- tiers below the device (notebook 11) --------------------------------------------------

    def attach_store(self, store) -> None:
        """Put a :class:`~flashkv_edu.offload.TieredStore` below the device pool: cached blocks
        the allocator evicts move down into it, :meth:`add_sequence` looks through it,
        :meth:`swap_out` / :meth:`swap_in` use it, :meth:`persist` writes to its disk tier."""
        if not isinstance(store, TieredStore):
            raise ArgumentTypeError(f"store must be a TieredStore, got {type(store).__name__}")
        if store.layout != BlockLayout(self.pools):
            raise ArgumentError(f"store: its {store.layout} does not match this cache's {BlockLayout(self.pools)}")
        self.store = store
        self.allocator.on_evict = self._move_down

    def _move_down(self, block: int, key: bytes) -> None:
        self.store.put(key, self.store.layout.pack(self.pools, [block])[0])

    def _require_store(self, what: str):
        if self.store is None:
            raise ArgumentError(f"{what} needs a store below the device pool (attach_store)")
        return self.store

    def swap_out(self, slot: int) -> SwappedSequence:
        """Preempt ``slot`` by swapping: copy its blocks (every layer) into the store, pinned,
        and release the slot. Raises :class:`~flashkv_edu.offload.StoreFullError`, changing
        nothing, if the store cannot pin that many more rows."""
        store = self._require_store("swap_out")
        seq = self._slot(slot)
        if not store.can_pin(len(seq.blocks)):
            raise StoreFullError(
                f"swap_out: slot {slot} holds {len(seq.blocks)} blocks; the store has room for "
                f"{store.capacity - len(store.pinned)} more pinned rows"
            )
        rows = store.layout.pack(self.pools, seq.blocks)
        keys = [store.new_swap_key() for _ in seq.blocks]
        for key, row in zip(keys, rows, strict=True):
            store.put(key, row, pin=True)
        handle = SwappedSequence(
            keys=keys,
            length=seq.length,
            tokens=None if seq.tokens is None else list(seq.tokens),
            hashes=list(seq.hashes),
        )
        self.free(slot)
        return handle

    def swap_in(self, handle: SwappedSequence) -> int:
        """Bring a swapped-out sequence back into a free slot (new blocks, the same bytes) and
        return the slot. Raises :class:`OutOfBlocksError` or, with no free slot,
        :class:`~flashkv_edu.validation.ArgumentError`, changing nothing. If a row cannot be
        read back (a disk file failed its checksum), the handle's rows are released and
        :class:`~flashkv_edu.offload.KVLostError` is raised: recompute the sequence."""
        store = self._require_store("swap_in")
        if not isinstance(handle, SwappedSequence):
            raise ArgumentTypeError(f"handle must be a SwappedSequence, got {type(handle).__name__}")
        if handle.done:
            raise ArgumentError("handle: this sequence was already swapped in (or lost)")
        if any(key not in store.pinned for key in handle.keys):
            raise ArgumentError("handle: its rows are not in this cache's store")
        slot = self._free_slot()
        n = len(handle.keys)
        if n > self.allocator.num_free:
            raise OutOfBlocksError(f"swap_in needs {n} free blocks, {self.allocator.num_free} are free")
        rows = []
        for key in handle.keys:
            found = store.get(key)
            if found is None:
                for k in handle.keys:
                    store.discard(k)
                handle.done = True
                raise KVLostError("swap_in: a swapped-out block failed its checksum; recompute the sequence")
            rows.append(found[1])
        blocks = self.allocator.allocate(n)
        if n:
            store.layout.unpack(torch.stack(rows), self.pools, blocks)
        if self.prefix_caching:
            for block, key in zip(blocks, handle.hashes, strict=False):
                self.allocator.register(block, key)
        self.seqs[slot] = _Sequence(
            blocks=blocks,
            length=handle.length,
            tokens=None if handle.tokens is None else list(handle.tokens),
            hashes=list(handle.hashes),
        )
        self._sync_row(slot)
        for key in handle.keys:
            store.discard(key)
        handle.done = True
        return slot

    def persist(self) -> int:
        """Write the prefix cache to the store's disk tier: every block with a hash on the
        device (in use or free) and every unpinned host row. A new process that attaches a
        store on the same directory finds them. Returns the number of rows written."""
        store = self._require_store("persist")
        if store.disk is None:
            raise ArgumentError("persist needs a store with a disk tier (disk_dir)")
        blocks = sorted(self.allocator.hash_of)
        written = 0
        if blocks:
            rows = store.layout.pack(self.pools, blocks)
            for block, row in zip(blocks, rows, strict=True):
                written += store.write_to_disk(self.allocator.hash_of[block], row)
        return written + store.flush_host()

    def free(self, slot: int) -> None:
        """Release ``slot``; its blocks go to the free list last block first (the blocks that
        hash the longest prefixes are the least reusable, so they are evicted first)."""
        seq = self._slot(slot)
        for block in reversed(seq.blocks):
            self.allocator.free(block)
        del self.seqs[slot]
        self.block_table[slot] = 0
        self.cache_seqlens[slot] = 0

    def gather(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The sequence's keys and values as contiguous ``(length, nheads_k, headdim)`` copies."""
        seq = self._slot(slot)
        pos = torch.arange(seq.length, device=self.k_cache.device)
        table = torch.tensor(seq.blocks, dtype=torch.int32, device=self.k_cache.device)
        blocks, offsets = slot_mapping(pos, table, self.block_size)
        return self.k_cache[blocks, offsets], self.v_cache[blocks, offsets]

    def used_tokens(self) -> int:
        """Token slots holding tokens, counting each shared block once."""
        in_use = {b for s in self.seqs.values() for b in s.blocks}
        filled = {}
        for s in self.seqs.values():
            for i, b in enumerate(s.blocks):
                filled[b] = max(filled.get(b, 0), min(self.block_size, s.length - i * self.block_size))
        return sum(filled[b] for b in in_use)


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


def paged_attention_torch(q, k_cache, v_cache, block_table, cache_seqlens, **kwargs):
    """Decode attention over a paged cache in PyTorch: gather each sequence's pages into a
    dense tensor, then :func:`flashkv_edu.attention_ref` with ``seqlens_k=cache_seqlens``."""
    from .reference import attention_ref

    return attention_ref(
        q, gather_paged(k_cache, block_table), gather_paged(v_cache, block_table), seqlens_k=cache_seqlens, **kwargs
    )
