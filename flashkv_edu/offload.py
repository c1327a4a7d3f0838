"""Tiers below the device pool: host memory, then files on disk (notebook 11).

A block of a paged cache (every layer's keys and values for ``block_size`` tokens) travels as
one row of bytes (:class:`BlockLayout`). A :class:`TieredStore` keeps such rows under keys:

* **host tier**: a preallocated ``(capacity, block_bytes)`` uint8 tensor (pinned memory when a
  GPU is present, so copies to and from the device can run asynchronously), LRU order;
* **disk tier**: one file per block in a directory, named after its key, written atomically
  (a temporary file, then ``os.replace``), with a checksum over the key and the bytes. A file that
  is truncated, corrupted or renamed fails the check and is deleted: it is a miss, recomputed,
  never read into attention. Files survive the process: a new process that opens the same
  directory finds them (a persistent prefix cache).

Keys are the prefix cache's block hashes (content addresses: the same tokens after the same
prefix give the same key, in any process) or swap keys (one preempted sequence's blocks,
**pinned** until it is swapped back in: a pinned row may move down to disk but is never dropped).
When the host tier is full its least recently used row moves down to disk; when the disk is
full its least recently used unpinned file is deleted. :meth:`TieredStore.get` falls through the
tiers and promotes a disk hit back into host memory; a content row keeps its file (the durable
copy, so the prefix cache survives a crash), a swap row moves.

:class:`~flashkv_edu.paged.PagedKVCache` uses a store through ``attach_store``: blocks evicted
from the device's prefix cache move down into it, prompts look through it, ``swap_out`` /
``swap_in`` preempt a sequence into it and bring it back, ``persist`` writes the prefix cache to
disk.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import time
from collections import Counter, OrderedDict
from pathlib import Path

import torch

from .validation import ArgumentError, ArgumentTypeError, check_int

__all__ = [
    "MAGIC",
    "SUFFIX",
    "SWAP_PREFIX",
    "BlockLayout",
    "DiskTier",
    "HostTier",
    "KVLostError",
    "StoreFullError",
    "TieredStore",
    "check_key",
    "checksum",
    "file_name",
    "key_of",
]

MAGIC = b"FKVBLK01"
SWAP_PREFIX = b"swap:"
SUFFIX = ".kvb"
_HEADER = len(MAGIC) + 8 + 16  # magic, payload length, checksum


class StoreFullError(RuntimeError):
    """The store cannot take more pinned blocks (nothing was changed)."""


class KVLostError(RuntimeError):
    """A swapped-out block could not be read back (its file failed the checksum): the sequence
    must be recomputed."""


def check_key(key) -> bytes:
    if not isinstance(key, bytes) or not key:
        raise ArgumentTypeError(f"key must be non-empty bytes (a block hash or a swap key), got {key!r}")
    return key


def file_name(key: bytes) -> str:
    """``<hex>.kvb`` for a content key, ``swap-<hex>.kvb`` for a swap key."""
    if key.startswith(SWAP_PREFIX):
        return "swap-" + key[len(SWAP_PREFIX) :].hex() + SUFFIX
    return key.hex() + SUFFIX


def key_of(name: str) -> bytes | None:
    """The key a file name stands for, or None for a name the store did not write."""
    if not name.endswith(SUFFIX):
        return None
    stem = name[: -len(SUFFIX)]
    prefix = b""
    if stem.startswith("swap-"):
        prefix, stem = SWAP_PREFIX, stem[5:]
    try:
        return prefix + bytes.fromhex(stem)
    except ValueError:
        return None


def checksum(key: bytes, payload) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(key)
    h.update(memoryview(payload))
    return h.digest()


class BlockLayout:
    """How one block packs into bytes: for each pool in ``pools`` (a cache's key and value pools,
    each ``(num_blocks, block_size, nheads_k, headdim)``), the block's slice, in order.
    ``nbytes`` is the size of one packed row. Two caches with equal layouts can exchange rows."""

    def __init__(self, pools):
        if not isinstance(pools, (list, tuple)) or not pools:
            raise ArgumentTypeError("pools must be a non-empty list of tensors")
        for i, p in enumerate(pools):
            if not isinstance(p, torch.Tensor) or p.dim() < 2:
                raise ArgumentTypeError(f"pools[{i}] must be a tensor (num_blocks, block_size, ...)")
        self.parts = tuple((tuple(p.shape[1:]), p.dtype) for p in pools)
        self.part_bytes = tuple(p[0].numel() * p.element_size() for p in pools)
        self.nbytes = sum(self.part_bytes)

    def __eq__(self, other) -> bool:
        return isinstance(other, BlockLayout) and self.parts == other.parts

    def __hash__(self) -> int:
        return hash(self.parts)

    def __repr__(self) -> str:
        return f"BlockLayout({len(self.parts)} parts, {self.nbytes} bytes per block)"

    def pack(self, pools, blocks) -> torch.Tensor:
        """Rows ``(len(blocks), nbytes)`` uint8 on the CPU holding ``blocks`` of ``pools``."""
        index = torch.as_tensor(list(blocks), dtype=torch.long, device=pools[0].device)
        parts = [p[index].reshape(len(index), p[0].numel()).contiguous().view(torch.uint8).cpu() for p in pools]
        return torch.cat(parts, dim=1)

    def unpack(self, rows: torch.Tensor, pools, blocks) -> None:
        """Write packed ``rows`` ``(len(blocks), nbytes)`` into ``blocks`` of ``pools``."""
        index = torch.as_tensor(list(blocks), dtype=torch.long, device=pools[0].device)
        start = 0
        for p, nbytes in zip(pools, self.part_bytes, strict=True):
            part = rows[:, start : start + nbytes].contiguous().view(p.dtype)
            p[index] = part.reshape(len(index), *p.shape[1:]).to(p.device)
            start += nbytes


class HostTier:
    """``capacity`` rows of ``nbytes`` bytes in host memory, kept in LRU order (oldest first)."""

    def __init__(self, capacity: int, nbytes: int):
        self.capacity = check_int("host_blocks", capacity, low=0)
        self.nbytes = check_int("nbytes", nbytes, low=1)
        pin = torch.cuda.is_available()
        self.data = torch.empty(self.capacity, self.nbytes, dtype=torch.uint8, pin_memory=pin)
        self.rows: OrderedDict[bytes, int] = OrderedDict()
        self.free_rows = list(range(self.capacity - 1, -1, -1))

    def __contains__(self, key) -> bool:
        return key in self.rows

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def full(self) -> bool:
        return not self.free_rows

    def oldest(self, skip=()) -> bytes | None:
        return next((k for k in self.rows if k not in skip), None)

    def put(self, key: bytes, row: torch.Tensor) -> None:
        index = self.free_rows.pop()
        self.data[index].copy_(row)
        self.rows[key] = index

    def get(self, key: bytes) -> torch.Tensor:
        self.rows.move_to_end(key)
        return self.data[self.rows[key]]

    def pop(self, key: bytes) -> torch.Tensor:
        index = self.rows.pop(key)
        self.free_rows.append(index)
        return self.data[index].clone()


class DiskTier:
    """One file per row in ``directory`` (created if missing), at most ``capacity`` files
    (None: no limit), LRU order by last use (at opening: by modification time). Swap files
    left by an earlier process are deleted when the directory is opened."""

    def __init__(self, directory, nbytes: int, capacity: int | None = None):
        if not isinstance(directory, (str, os.PathLike)):
            raise ArgumentTypeError(f"disk_dir must be a path, got {type(directory).__name__}")
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise ArgumentError(f"disk_dir {str(self.directory)!r} exists and is not a directory")
        self.nbytes = check_int("nbytes", nbytes, low=1)
        self.capacity = None if capacity is None else check_int("disk_blocks", capacity, low=1)
        self.directory.mkdir(parents=True, exist_ok=True)
        found = []
        self.foreign = 0  # entries named like a block file that are not regular files: never read, never deleted
        for path in self.directory.iterdir():
            key = key_of(path.name)
            if key is None:
                continue
            if not path.is_file() or path.is_symlink():
                self.foreign += 1
                continue
            if key.startswith(SWAP_PREFIX):
                _unlink_file(path)
            else:
                try:
                    found.append((path.stat().st_mtime_ns, path.name, key))
                except OSError:
                    self.foreign += 1
        self.keys: OrderedDict[bytes, None] = OrderedDict((k, None) for _, _, k in sorted(found))
        self.corrupt = 0
        self.unreadable = 0
        self.last_miss = ""  # why the latest get() missed: "corrupt" or "unreadable"
        while self.capacity is not None and len(self.keys) > self.capacity:
            self.remove(next(iter(self.keys)))

    def path(self, key: bytes) -> Path:
        return self.directory / file_name(key)

    def __contains__(self, key) -> bool:
        return key in self.keys

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def full(self) -> bool:
        return self.capacity is not None and len(self.keys) >= self.capacity

    def oldest(self, skip=()) -> bytes | None:
        return next((k for k in self.keys if k not in skip), None)

    def put(self, key: bytes, row: torch.Tensor) -> bool:
        """Write the row's file; False (nothing kept) when it cannot be written, e.g. a directory
        or an unwritable entry stands where the file should be."""
        payload = row.contiguous().numpy().tobytes()
        blob = MAGIC + len(payload).to_bytes(8, "little") + checksum(key, payload) + payload
        tmp = self.directory / f".tmp-{os.getpid()}-{file_name(key)}"
        try:
            tmp.write_bytes(blob)
            os.replace(tmp, self.path(key))
        except OSError:
            _unlink_file(tmp)
            self.keys.pop(key, None)
            return False
        self.keys[key] = None
        self.keys.move_to_end(key)
        return True

    def get(self, key: bytes) -> torch.Tensor | None:
        """The row, or None when its entry is missing, not a regular file or unreadable (counted
        in ``unreadable``, left where it is) or fails the checks (counted in ``corrupt``, deleted).
        Either way the key is forgotten: a miss, recomputed by the caller."""
        path = self.path(key)
        try:
            if not path.is_file() or path.is_symlink():
                raise IsADirectoryError(str(path))
            blob = path.read_bytes()
        except OSError:
            self.unreadable += 1
            self.last_miss = "unreadable"
            self.keys.pop(key, None)
            return None
        payload = blob[_HEADER:]
        ok = (
            len(blob) == _HEADER + self.nbytes
            and blob.startswith(MAGIC)
            and int.from_bytes(blob[len(MAGIC) : len(MAGIC) + 8], "little") == self.nbytes
            and blob[len(MAGIC) + 8 : _HEADER] == checksum(key, payload)
        )
        if not ok:
            self.corrupt += 1
            self.last_miss = "corrupt"
            self.remove(key)
            return None
        self.keys.move_to_end(key)
        return torch.frombuffer(bytearray(payload), dtype=torch.uint8)

    def remove(self, key: bytes) -> None:
        """Forget ``key`` and delete its file (an entry that is not a regular file is left alone)."""
        self.keys.pop(key, None)
        _unlink_file(self.path(key))


def _unlink_file(path: Path) -> None:
    """Delete ``path`` if it is a file (or a link); anything else, or a failure, is left alone."""
    try:
        if path.is_symlink() or path.is_file():
            path.unlink()
    except OSError:
        pass


class TieredStore:
    """Rows of ``layout.nbytes`` bytes under keys, in a host tier of ``host_blocks`` rows and,
    with ``disk_dir``, a disk tier of at most ``disk_blocks`` files (None: no limit).

    ``stats`` counts hits per tier, misses, rows moved down (``demoted``), promoted, dropped,
    files that failed their checksum (``corrupt``, deleted), entries that could not be read
    (``unreadable``: a directory or an unreadable file where a block file should be, left alone and
    treated as a miss), writes that failed (``disk_write_failed``), and bytes and seconds spent on
    each tier. ``disk.foreign`` counts entries named like block files that are not regular files.
    """

    _ids = itertools.count()

    def __init__(self, layout: BlockLayout, host_blocks: int, disk_dir=None, disk_blocks: int | None = None):
        if not isinstance(layout, BlockLayout):
            raise ArgumentTypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
        host_blocks = check_int("host_blocks", host_blocks, low=0)
        if disk_dir is None and disk_blocks is not None:
            raise ArgumentError("disk_blocks needs disk_dir")
        if disk_dir is None and host_blocks == 0:
            raise ArgumentError("host_blocks must be >= 1 when there is no disk tier")
        self.layout = layout
        self.host = HostTier(host_blocks, layout.nbytes)
        self.disk = None if disk_dir is None else DiskTier(disk_dir, layout.nbytes, disk_blocks)
        self.pinned: set[bytes] = set()
        self.stats: Counter = Counter()
        self._swap_ids = itertools.count()
        self._name = f"{os.getpid()}:{next(TieredStore._ids)}:{time.time_ns()}"

    @classmethod
    def for_cache(cls, cache, host_blocks: int, disk_dir=None, disk_blocks: int | None = None) -> TieredStore:
        """A store whose rows fit ``cache`` (a :class:`~flashkv_edu.paged.PagedKVCache`)."""
        return cls(BlockLayout(cache.pools), host_blocks, disk_dir, disk_blocks)

    # --- capacity ------------------------------------------------------------------------------

    @property
    def capacity(self) -> int | None:
        """Rows the tiers hold together (None: the disk has no limit)."""
        if self.disk is not None and self.disk.capacity is None:
            return None
        return self.host.capacity + (self.disk.capacity if self.disk is not None else 0)

    def can_pin(self, n: int) -> bool:
        """Whether ``n`` more pinned rows fit (pinned rows are never dropped)."""
        n = check_int("n", n, low=0)
        return self.capacity is None or len(self.pinned) + n <= self.capacity

    def tier_of(self, key) -> str | None:
        key = check_key(key)
        if key in self.host:
            return "host"
        if self.disk is not None and key in self.disk:
            return "disk"
        return None

    def __contains__(self, key) -> bool:
        return self.tier_of(key) is not None

    def __len__(self) -> int:
        return len(self.host) + (len(self.disk) if self.disk is not None else 0)

    def new_swap_key(self) -> bytes:
        """A key no other sequence, store or process uses."""
        name = f"{self._name}:{next(self._swap_ids)}".encode()
        return SWAP_PREFIX + hashlib.blake2b(name, digest_size=16).digest()

    # --- moving rows -----------------------------------------------------------------------------

    def _write_disk(self, key: bytes, row: torch.Tensor) -> bool:
        """Put a row on disk (a file already there is kept: same key, same bytes), deleting the
        least recently used unpinned file if the disk is full."""
        disk = self.disk
        if key in disk:
            disk.keys.move_to_end(key)
            return True
        if disk.full:
            victim = disk.oldest(skip=self.pinned)
            if victim is None:
                return False
            disk.remove(victim)
            self.stats["dropped"] += 1
        start = time.perf_counter()
        if not disk.put(key, row):
            self.stats["disk_write_failed"] += 1
            return False
        self.stats["disk_write_s"] += time.perf_counter() - start
        self.stats["disk_bytes_written"] += row.numel()
        return True

    def _disk_has_room_for(self, key: bytes) -> bool:
        disk = self.disk
        return key in disk or not disk.full or disk.oldest(skip=self.pinned) is not None

    def _make_host_room(self) -> bool:
        """Free one host row: move the least recently used row down to disk, or drop the oldest
        unpinned row. False if neither is possible."""
        if not self.host.full:
            return True
        if self.disk is not None:
            victim = self.host.oldest()
            if victim is not None and self._disk_has_room_for(victim):
                row = self.host.pop(victim)
                if self._write_disk(victim, row):
                    self.stats["demoted"] += 1
                    return True
                self.host.put(victim, row)  # the disk refused it: keep it here, drop another below
        victim = self.host.oldest(skip=self.pinned)
        if victim is None:
            return False
        self.host.pop(victim)
        self.stats["dropped"] += 1
        return True

    def _place(self, key: bytes, row: torch.Tensor) -> bool:
        if self.host.capacity and self._make_host_room():
            start = time.perf_counter()
            self.host.put(key, row)
            self.stats["host_write_s"] += time.perf_counter() - start
            self.stats["host_bytes_written"] += row.numel()
            return True
        return self.disk is not None and self._write_disk(key, row)

    def put(self, key, row: torch.Tensor, *, pin: bool = False) -> bool:
        """Store ``row`` (``(nbytes,)`` uint8) under ``key``, most recently used. An unpinned
        row is best effort (returns False if every row is pinned); a pinned one raises
        :class:`StoreFullError` first, changing nothing, when it cannot fit."""
        key = check_key(key)
        if not isinstance(row, torch.Tensor) or row.dtype != torch.uint8 or tuple(row.shape) != (self.layout.nbytes,):
            raise ArgumentError(f"row must be a uint8 tensor of shape ({self.layout.nbytes},), got {row!r:.80}")
        if pin and key not in self.pinned and not self.can_pin(1):
            raise StoreFullError(f"the store holds {len(self.pinned)} pinned rows, its capacity is {self.capacity}")
        tier = self.tier_of(key)
        if tier == "host":
            self.host.get(key)  # refresh its place in the LRU order
        elif tier == "disk":
            self.disk.keys.move_to_end(key)
        elif not self._place(key, row.cpu()):
            return False
        if pin:
            self.pinned.add(key)
        return True

    def get(self, key) -> tuple[str, torch.Tensor] | None:
        """``(tier, row)`` for a hit (a disk hit is checked and promoted into host memory), or
        None. A file that fails its checksum is deleted and counted in ``stats["corrupt"]``."""
        key = check_key(key)
        if key in self.host:
            start = time.perf_counter()
            row = self.host.get(key).clone()
            self.stats["host_read_s"] += time.perf_counter() - start
            self.stats["host_hits"] += 1
            return "host", row
        if self.disk is not None and key in self.disk:
            start = time.perf_counter()
            row = self.disk.get(key)
            self.stats["disk_read_s"] += time.perf_counter() - start
            if row is None:
                self.stats[self.disk.last_miss] += 1  # "corrupt" (deleted) or "unreadable" (left alone)
                self.pinned.discard(key)
                self.stats["misses"] += 1
                return None
            self.stats["disk_bytes_read"] += row.numel()
            self.stats["disk_hits"] += 1
            if self.host.capacity and self._make_host_room():
                if key.startswith(SWAP_PREFIX):
                    self.disk.remove(key)  # a swap row lives in one place
                self.host.put(key, row)
                self.stats["promoted"] += 1
            return "disk", row
        self.stats["misses"] += 1
        return None

    def discard(self, key) -> None:
        """Forget ``key`` in every tier (and unpin it)."""
        key = check_key(key)
        self.pinned.discard(key)
        if key in self.host:
            self.host.pop(key)
        if self.disk is not None:
            self.disk.remove(key)

    def write_to_disk(self, key, row: torch.Tensor) -> bool:
        """Write ``row`` under ``key`` to the disk tier (kept in host memory too, if there)."""
        key = check_key(key)
        if self.disk is None:
            raise ArgumentError("this store has no disk tier (pass disk_dir)")
        if key in self.disk:
            self.disk.keys.move_to_end(key)
            return True
        return self._write_disk(key, row.cpu())

    def flush_host(self) -> list[bytes]:
        """Copy every unpinned host row to disk (a persistent prefix cache). Returns the keys
        written (a full disk may delete some of them again as later ones arrive)."""
        if self.disk is None:
            raise ArgumentError("this store has no disk tier (pass disk_dir)")
        return [
            key
            for key in [k for k in self.host.rows if k not in self.pinned]
            if self.write_to_disk(key, self.host.data[self.host.rows[key]])
        ]
