"""Paged KV cache: a block allocator and block tables (notebook 06), swap and persist (notebook 11).

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

Notebook 11 adds the tiers below the pool (:mod:`flashkv_edu.offload`): a :class:`PagedKVCache`
with a store attached swaps a sequence's blocks out to host memory or disk and back
(``swap_out``/``swap_in``), persists its prefix blocks, and lets a new prompt find cached blocks
in the tiers as well as in the pool.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .blocks import (
    BlockAllocator,
    OutOfBlocksError,
    block_hash,
    gather_paged,
    scatter_to_pages,
    slot_mapping,
    token_ids,
)
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

# BlockAllocator and the block helpers live in blocks.py and are part of this module's face.
__all__ = [
    "BlockAllocator",
    "OutOfBlocksError",
    "PagedKVCache",
    "SequenceState",
    "SwappedSequence",
    "block_hash",
    "gather_paged",
    "scatter_to_pages",
    "slot_mapping",
    "token_ids",
]


@dataclass
class SequenceState:
    blocks: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    length: int = 0
    hashes: list[bytes] = field(default_factory=list)  # keys of its full blocks, in order
    pending: int = 0  # reserved tokens whose ids come later (fill_tokens): an overlapped step's samples


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
        self.seqs: dict[int, SequenceState] = {}
        self.prefix_caching = prefix_caching
        self.cow_copies = 0
        self.store = None  # a TieredStore below the device pool (attach_store)
        # Called with "block_table" or "cache_seqlens" before either is written (overlap scheduling
        # checks that no step in flight reads what is rewritten: flashkv_edu.overlap).
        self.on_write = None
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

    def sequence(self, slot: int) -> SequenceState:
        """The sequence in ``slot`` (its blocks, tokens, length); raises for a slot holding none."""
        if isinstance(slot, bool) or not isinstance(slot, int) or slot not in self.seqs:
            raise ArgumentError(f"slot {slot!r} holds no sequence (open slots: {sorted(self.seqs)})")
        return self.seqs[slot]

    def _free_slot(self) -> int:
        for slot in range(self.max_batch):
            if slot not in self.seqs:
                return slot
        raise ArgumentError(f"all {self.max_batch} batch slots are in use")

    def _written(self) -> None:
        if self.on_write is not None:
            self.on_write("block_table")
            self.on_write("cache_seqlens")

    def _sync_row(self, slot: int) -> None:
        self._written()
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
        tokens = [] if prompt_tokens is None else token_ids("prompt_tokens", prompt_tokens)
        slot = self._free_slot()
        seq = SequenceState()
        if self.prefix_caching:
            try:
                self._reuse_prefix(seq, tokens)
            except BaseException:  # nothing may stay referenced without an owner
                for block in seq.blocks:
                    self.allocator.free(block)
                raise
            seq.length = len(seq.blocks) * self.block_size
            seq.tokens = tokens[: seq.length]
        self.seqs[slot] = seq
        self._sync_row(slot)
        return slot, seq.length

    def _reuse_prefix(self, seq: SequenceState, tokens: list[int]) -> None:
        """Append to ``seq`` the cached blocks of ``tokens``' reusable prefix, from the device or
        a store's tiers (copied into a free block), one reference each."""
        for key in self._prefix_keys(tokens):
            block, source = self.allocator.lookup(key), "device"
            if block is None:
                found = self.store.get(key) if self.store is not None and self.allocator.num_free else None
                if found is None:
                    break
                source, row = found
                block = self.allocator.allocate(1)[0]
                seq.blocks.append(block)  # owned by seq from here on (released if the copy fails)
                self.store.layout.unpack(row[None], self.pools, [block])
                self.allocator.register(block, key)
            else:
                seq.blocks.append(block)
            seq.hashes.append(key)
            self.prefix_hits[source] += 1

    def blocks_to_admit(self, prompt_tokens) -> int:
        """Free blocks that opening ``prompt_tokens`` (:meth:`add_sequence`) and prefilling the
        rest take: every block the prompt fills, less the cached ones other sequences are using
        (shared, not taken from the free list). Changes nothing."""
        tokens = token_ids("prompt_tokens", prompt_tokens)
        shared = 0
        if self.prefix_caching:
            for key in self._prefix_keys(tokens):
                block = self.allocator.block_of.get(key)
                if block is None:
                    break
                shared += self.allocator.ref_count[block] > 0
        return -(-len(tokens) // self.block_size) - shared

    def blocks_needed(self, slot: int, n: int) -> int:
        """Free blocks an append of ``n`` tokens to ``slot`` takes (a copy-on-write block included)."""
        return self._plan(self.sequence(slot), n)[0]

    def _plan(self, seq: SequenceState, n: int) -> tuple[int, bool]:
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

    def reserve(self, slot: int, n: int, tokens=None, *, later: bool = False) -> int:
        """Make room for ``n`` more tokens of ``slot`` in every layer and return the position of
        the first one: allocate blocks, copy a shared last block first (copy-on-write, all
        layers), update the block table, advance the length. The caller writes the keys and
        values (``flash_attn_with_kvcache`` does it through ``block_table``). ``tokens``: their
        ids, for the prefix cache; ``later=True``: the ids are not known yet (a step scheduled
        before the one that samples them) and come through :meth:`fill_tokens`. Raises,
        changing nothing, when the pool has too few free blocks."""
        seq = self.sequence(slot)
        n = check_int("n", n, low=0)
        later = check_bool("later", later)
        tokens = token_ids("tokens", tokens) if tokens is not None else None
        if tokens is not None and len(tokens) != n:
            raise ArgumentError(f"tokens must hold {n} ids, got {len(tokens)}")
        if later and tokens is not None:
            raise ArgumentError("reserve takes tokens now or later=True, not both")
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
        if later:
            seq.pending += n
        elif tokens is None or seq.tokens is None or seq.pending or len(seq.tokens) != start:
            seq.tokens = None  # token ids unknown: this sequence no longer feeds the prefix cache
        else:
            seq.tokens.extend(tokens)
            self._register_full_blocks(seq)
        self._sync_row(slot)
        return start

    def fill_tokens(self, slot: int, tokens) -> None:
        """The ids of the oldest tokens :meth:`reserve` took with ``later=True``, in order: they
        feed the prefix cache as if they had been known at once."""
        seq = self.sequence(slot)
        tokens = token_ids("tokens", tokens)
        if len(tokens) > seq.pending:
            raise ArgumentError(f"slot {slot} waits for {seq.pending} token ids, got {len(tokens)}")
        seq.pending -= len(tokens)
        if seq.tokens is not None:
            seq.tokens.extend(tokens)
            self._register_full_blocks(seq)

    def _register_full_blocks(self, seq: SequenceState) -> None:
        """Key every full block of ``seq`` whose ids are all known (prefix caching)."""
        bs = self.block_size
        while self.prefix_caching and len(seq.hashes) < len(seq.tokens) // bs:
            i = len(seq.hashes)
            key = block_hash(seq.hashes[-1] if seq.hashes else None, seq.tokens[i * bs : (i + 1) * bs])
            self.allocator.register(seq.blocks[i], key)
            seq.hashes.append(key)

    def fork(self, slot: int) -> int:
        """A new slot sharing every block of ``slot`` (parallel sampling, beam search)."""
        seq = self.sequence(slot)
        child = self._free_slot()
        for block in seq.blocks:
            self.allocator.incref(block)
        self.seqs[child] = SequenceState(
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
        seq = self.sequence(slot)
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
            self.sequence(o)
        new = {}
        for i, o in enumerate(order):
            old = self.seqs[o]
            for block in old.blocks:
                self.allocator.incref(block)
            new[i] = SequenceState(
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
        seq = self.sequence(slot)
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
        self.seqs[slot] = SequenceState(
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
        store on the same directory finds them. Returns how many of them the disk tier holds
        afterwards (a disk of ``disk_blocks`` files keeps at most that many)."""
        store = self._require_store("persist")
        if store.disk is None:
            raise ArgumentError("persist needs a store with a disk tier (disk_dir)")
        blocks = sorted(self.allocator.hash_of)
        written = []
        if blocks:
            rows = store.layout.pack(self.pools, blocks)
            for block, row in zip(blocks, rows, strict=True):
                key = self.allocator.hash_of[block]
                if store.write_to_disk(key, row):
                    written.append(key)
        written += store.flush_host()
        return len({key for key in written if key in store.disk})

    def free(self, slot: int) -> None:
        """Release ``slot``; its blocks go to the free list last block first (the blocks that
        hash the longest prefixes are the least reusable, so they are evicted first)."""
        seq = self.sequence(slot)
        self._written()
        for block in reversed(seq.blocks):
            self.allocator.free(block)
        del self.seqs[slot]
        self.block_table[slot] = 0
        self.cache_seqlens[slot] = 0

    def gather(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The sequence's keys and values as contiguous ``(length, nheads_k, headdim)`` copies."""
        seq = self.sequence(slot)
        pos = torch.arange(seq.length, device=self.k_cache.device)
        table = torch.tensor(seq.blocks, dtype=torch.int32, device=self.k_cache.device)
        blocks, offsets = slot_mapping(pos, table, self.block_size)
        return self.k_cache[blocks, offsets], self.v_cache[blocks, offsets]
