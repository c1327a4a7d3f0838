"""Tiers below the device pool: a state machine over a paged cache with a host tier and a disk
tier (allocate, swap out and in, evict, promote, fork, roll back, free, corrupt a file), bit-for-bit
contents, persistence across a process restart, and checksums."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from flashkv_edu.cache import write_kv
from flashkv_edu.offload import BlockLayout, KVLostError, StoreFullError, TieredStore
from flashkv_edu.paged import OutOfBlocksError, PagedKVCache, SwappedSequence
from flashkv_edu.validation import ArgumentError

LAYERS, HEADS, DIM = 2, 1, 2


def kv_rows(tokens: list[int], start: int, end: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What a model would store for positions ``start..end-1``: a function of the whole prefix up
    to each token (so a block reused under the wrong prefix shows), different per layer."""
    ks, vs = [], []
    for p in range(start, end):
        digest = hashlib.blake2b(repr(tokens[: p + 1]).encode(), digest_size=8).digest()
        x = torch.tensor([b for b in digest[: 2 * HEADS * DIM]], dtype=torch.float32).view(HEADS, 2 * DIM)
        ks.append(x[:, :DIM] + 1000 * layer)
        vs.append(-x[:, DIM:] - 1000 * layer)
    if not ks:
        return torch.zeros(0, HEADS, DIM), torch.zeros(0, HEADS, DIM)
    return torch.stack(ks), torch.stack(vs)


def write_tokens(cache: PagedKVCache, slot: int, tokens: list[int], new: list[int]) -> None:
    """Append ``new`` after ``tokens`` (what the slot holds) in every layer, through the one write path."""
    start = cache.reserve(slot, len(new), new)
    full = tokens + new
    for layer in range(cache.num_layers):
        k, v = kv_rows(full, start, start + len(new), layer)
        first = torch.tensor([start])
        write_kv(
            cache.k_pools[layer],
            cache.v_pools[layer],
            k[None],
            v[None],
            first,
            block_table=cache.block_table[slot : slot + 1],
        )


def contents(cache: PagedKVCache, slot: int) -> list[torch.Tensor]:
    blocks = cache.seqs[slot].blocks
    length = cache.seqs[slot].length
    return [pool[blocks].reshape(-1, HEADS, DIM)[:length] for pool in cache.pools]


def expected(tokens: list[int]) -> list[torch.Tensor]:
    out = []
    for layer in range(LAYERS):
        k, v = kv_rows(tokens, 0, len(tokens), layer)
        out += [k, v]
    return out


PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 0, 0], [1, 2, 3, 4, 9, 9, 9, 9, 9, 9], [7, 7, 7, 7, 7]]


class TieredMachine(RuleBasedStateMachine):
    """A small device pool over a small host tier and a bounded disk tier."""

    def __init__(self):
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.cache = PagedKVCache(6, 3, HEADS, DIM, max_batch=4, max_blocks_per_seq=6, num_layers=LAYERS)
        self.store = TieredStore.for_cache(self.cache, host_blocks=3, disk_dir=self.dir.name, disk_blocks=5)
        self.cache.attach_store(self.store)
        self.slots: dict[int, list[int]] = {}  # open slot -> its tokens
        self.swapped: list[tuple[SwappedSequence, list[int]]] = []

    def teardown(self):
        self.dir.cleanup()

    def _state(self):
        a = self.cache.allocator
        return (
            list(a.ref_count),
            list(a.free_list),
            dict(a.hash_of),
            [p.clone() for p in self.cache.pools],
            sorted(self.store.pinned),
            list(self.store.host.rows),
            list(self.store.disk.keys),
        )

    def _unchanged(self, before):
        now = self._state()
        assert now[:3] == before[:3] and now[4:] == before[4:]
        assert all(torch.equal(a, b) for a, b in zip(now[3], before[3], strict=True))

    @precondition(lambda self: len(self.cache.seqs) < 4)
    @rule(prompt=st.sampled_from(PROMPTS))
    def open_prompt(self, prompt):
        """Allocate: the cached prefix comes from any tier (promoted on a host or disk hit)."""
        need = self.cache.blocks_to_admit(prompt)
        if need > self.cache.allocator.num_free:
            return
        slot, cached = self.cache.add_sequence(prompt)
        assert cached < len(prompt) and cached % 3 == 0
        assert contents(self.cache, slot) == [] or all(
            torch.equal(a, b[:cached]) for a, b in zip(contents(self.cache, slot), expected(prompt), strict=True)
        )
        write_tokens(self.cache, slot, prompt[:cached], prompt[cached:])
        self.slots[slot] = list(prompt)

    @precondition(lambda self: self.slots)
    @rule(data=st.data(), n=st.integers(1, 4))
    def append(self, data, n):
        slot = data.draw(st.sampled_from(sorted(self.slots)))
        new = data.draw(st.lists(st.integers(0, 9), min_size=n, max_size=n))
        before = self._state()
        try:
            write_tokens(self.cache, slot, self.slots[slot], new)
            self.slots[slot] += new
        except (OutOfBlocksError, ArgumentError):
            self._unchanged(before)

    @precondition(lambda self: self.slots and len(self.cache.seqs) < 4)
    @rule(data=st.data())
    def fork(self, data):
        slot = data.draw(st.sampled_from(sorted(self.slots)))
        self.slots[self.cache.fork(slot)] = list(self.slots[slot])

    @precondition(lambda self: self.slots)
    @rule(data=st.data())
    def roll_back(self, data):
        slot = data.draw(st.sampled_from(sorted(self.slots)))
        length = data.draw(st.integers(0, len(self.slots[slot])))
        self.cache.truncate(slot, length)
        self.slots[slot] = self.slots[slot][:length]

    @precondition(lambda self: self.slots)
    @rule(data=st.data())
    def free(self, data):
        """Free a slot: its hashed blocks stay findable until evicted (then they move down)."""
        slot = data.draw(st.sampled_from(sorted(self.slots)))
        self.cache.free(slot)
        del self.slots[slot]

    @precondition(lambda self: self.slots)
    @rule(data=st.data())
    def swap_out(self, data):
        slot = data.draw(st.sampled_from(sorted(self.slots)))
        before = self._state()
        try:
            handle = self.cache.swap_out(slot)
        except StoreFullError:
            self._unchanged(before)
            return
        assert handle.length == len(self.slots[slot]) and slot not in self.cache.seqs
        self.swapped.append((handle, self.slots.pop(slot)))

    @precondition(lambda self: self.swapped)
    @rule(data=st.data())
    def swap_in(self, data):
        i = data.draw(st.integers(0, len(self.swapped) - 1))
        handle, tokens = self.swapped[i]
        before = self._state()
        try:
            slot = self.cache.swap_in(handle)
        except (OutOfBlocksError, ArgumentError):
            self._unchanged(before)
            return
        except KVLostError:
            self.swapped.pop(i)  # a corrupted file: the sequence must be recomputed
            assert not any(k in self.store for k in handle.keys)
            return
        self.swapped.pop(i)
        self.slots[slot] = tokens
        assert not any(k in self.store for k in handle.keys), "swap rows left behind"

    @precondition(lambda self: len(self.store.disk) > 0)
    @rule(data=st.data(), how=st.sampled_from(["truncate", "flip", "delete"]))
    def damage_a_file(self, data, how):
        present = [k for k in self.store.disk.keys if self.store.disk.path(k).exists()]
        if not present:
            return
        path = self.store.disk.path(data.draw(st.sampled_from(present)))
        blob = path.read_bytes()
        if how == "truncate":
            path.write_bytes(blob[: len(blob) // 2])
        elif how == "flip":
            path.write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
        else:
            path.unlink()

    @invariant()
    def no_block_leaked_and_counts_right(self):
        a = self.cache.allocator
        held = {}
        for s in self.cache.seqs.values():
            for b in s.blocks:
                held[b] = held.get(b, 0) + 1
        assert all(a.ref_count[b] == held.get(b, 0) for b in range(a.num_blocks)), "leaked or lost a block"
        assert set(a.free_list) == {b for b in range(a.num_blocks) if a.ref_count[b] == 0}
        assert {a.block_of[k]: k for k in a.block_of} == a.hash_of

    @invariant()
    def contents_bit_for_bit(self):
        for slot, tokens in self.slots.items():
            assert self.cache.seqs[slot].length == len(tokens) == int(self.cache.cache_seqlens[slot])
            got = contents(self.cache, slot)
            assert all(torch.equal(g, e) for g, e in zip(got, expected(tokens), strict=True)), f"slot {slot}"

    @invariant()
    def store_books_balance(self):
        live = {k for h, _ in self.swapped for k in h.keys}
        assert self.store.pinned <= live  # a lost row is unpinned and gone
        assert len(self.store.host) <= self.store.host.capacity and len(self.store.disk) <= 5
        on_disk = {p.name for p in Path(self.dir.name).iterdir()}
        # no stray files (a file deleted from outside is found missing when read)
        assert on_disk <= {self.store.disk.path(k).name for k in self.store.disk.keys}, "stray files"
        both = set(self.store.host.rows) & set(self.store.disk.keys)
        assert not any(k.startswith(b"swap:") for k in both), "a swap row in two tiers"


TestTieredMachine = TieredMachine.TestCase
TestTieredMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None, derandomize=True)


# --- the tiers on their own -------------------------------------------------------------------------


def _layout(nbytes_per_pool: int = 8):
    return BlockLayout([torch.zeros(4, nbytes_per_pool // 4, dtype=torch.float32)])


def test_lru_moves_down_then_drops_unpinned_and_keeps_pinned(tmp_path):
    store = TieredStore(_layout(), host_blocks=2, disk_dir=tmp_path, disk_blocks=2)
    rows = {bytes([i]): torch.full((8,), i, dtype=torch.uint8) for i in range(1, 6)}
    store.put(b"\x01", rows[b"\x01"], pin=True)
    for key in (b"\x02", b"\x03", b"\x04"):
        store.put(key, rows[key])
    assert store.tier_of(b"\x01") == "disk" and store.tier_of(b"\x02") == "disk"  # moved down, oldest first
    store.put(b"\x05", rows[b"\x05"])  # the disk is full: its oldest unpinned file goes
    assert store.tier_of(b"\x02") is None and store.tier_of(b"\x01") == "disk" and store.stats["dropped"] == 1
    tier, row = store.get(b"\x01")  # a disk hit is promoted; a content row keeps its file
    assert tier == "disk" and torch.equal(row, rows[b"\x01"]) and store.tier_of(b"\x01") == "host"
    assert b"\x01" in store.disk
    assert store.can_pin(3) and not store.can_pin(4)


def test_a_full_store_refuses_pinned_rows_and_changes_nothing():
    store = TieredStore(_layout(), host_blocks=1)
    store.put(b"a", torch.zeros(8, dtype=torch.uint8), pin=True)
    with pytest.raises(StoreFullError):
        store.put(b"b", torch.ones(8, dtype=torch.uint8), pin=True)
    assert store.tier_of(b"b") is None and store.pinned == {b"a"}
    assert store.put(b"c", torch.ones(8, dtype=torch.uint8)) is False  # best effort: every row pinned


@pytest.mark.parametrize("damage", ["truncate", "flip a payload byte", "flip a checksum byte", "rename", "empty"])
def test_a_damaged_file_is_a_miss_never_data(tmp_path, damage):
    store = TieredStore(_layout(16), host_blocks=0, disk_dir=tmp_path)
    row = torch.arange(16, dtype=torch.uint8)
    store.put(b"key-1", row)
    store.put(b"key-2", row + 1)
    path = store.disk.path(b"key-1")
    blob = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(blob[:-3])
    elif damage == "flip a payload byte":
        path.write_bytes(blob[:-1] + bytes([blob[-1] ^ 0x10]))
    elif damage == "flip a checksum byte":
        path.write_bytes(blob[:20] + bytes([blob[20] ^ 1]) + blob[21:])
    elif damage == "rename":  # key-2's bytes under key-1's name
        os.replace(store.disk.path(b"key-2"), path)
        store.disk.keys.pop(b"key-2")
    else:
        path.write_bytes(b"")
    assert store.get(b"key-1") is None
    assert store.stats["corrupt"] == 1 and not path.exists() and b"key-1" not in store


def test_swap_in_of_a_corrupted_sequence_says_recompute(tmp_path):
    cache = PagedKVCache(4, 2, HEADS, DIM, max_batch=2, max_blocks_per_seq=4, num_layers=LAYERS)
    cache.attach_store(TieredStore.for_cache(cache, host_blocks=0, disk_dir=tmp_path))
    slot, _ = cache.add_sequence([1, 2, 3])
    write_tokens(cache, slot, [], [1, 2, 3])
    handle = cache.swap_out(slot)
    path = cache.store.disk.path(handle.keys[1])
    path.write_bytes(path.read_bytes()[:-1])
    free_before = cache.allocator.num_free
    with pytest.raises(KVLostError, match="recompute"):
        cache.swap_in(handle)
    assert handle.done and not cache.store.pinned and not list(tmp_path.iterdir())
    assert cache.allocator.num_free == free_before and not cache.seqs
    with pytest.raises(ArgumentError, match="handle"):
        cache.swap_in(handle)


def test_persistent_prefix_cache_survives_a_process_restart(tmp_path):
    """One process serves a prompt and persists its prefix cache; a second, fresh process finds
    the blocks on disk by their content hash and gets bit-identical keys and values."""
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_offload import PagedKVCache, TieredStore, write_tokens, contents, expected, HEADS, DIM, LAYERS
        cache = PagedKVCache(8, 4, HEADS, DIM, max_batch=1, max_blocks_per_seq=8, num_layers=LAYERS)
        cache.attach_store(TieredStore.for_cache(cache, host_blocks=2, disk_dir={str(tmp_path)!r}))
        prompt = list(range(1, 14))
        slot, cached = cache.add_sequence(prompt)
        write_tokens(cache, slot, prompt[:cached], prompt[cached:])
        ok = all(torch.equal(a, b) for a, b in zip(contents(cache, slot), expected(prompt)))
        if sys.argv[1] == "first":
            print(cached, cache.persist(), ok)
        else:
            print(cached, cache.prefix_hits["disk"], ok)
        """
    )
    run = lambda which: subprocess.run(  # noqa: E731
        [sys.executable, "-c", script, which], capture_output=True, text=True, check=True
    ).stdout.split()
    assert run("first") == ["0", "3", "True"]  # 13 tokens in blocks of 4: 3 full blocks written
    assert run("second") == ["12", "3", "True"]  # a new process: 12 tokens from disk, all 3 blocks
    assert len(list(tmp_path.glob("*.kvb"))) == 3


def test_a_store_must_match_the_cache_and_stale_swap_files_are_cleared(tmp_path):
    cache = PagedKVCache(4, 2, HEADS, DIM, max_batch=1, max_blocks_per_seq=2, num_layers=LAYERS)
    other = PagedKVCache(4, 2, HEADS, DIM + 2, max_batch=1, max_blocks_per_seq=2, num_layers=LAYERS)
    with pytest.raises(ArgumentError, match="store"):
        cache.attach_store(TieredStore.for_cache(other, host_blocks=1))
    (tmp_path / "swap-00ff.kvb").write_bytes(b"left by a dead process")
    (tmp_path / "notes.txt").write_text("not ours")
    TieredStore.for_cache(cache, host_blocks=1, disk_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def _persisted_prompt(tmp_path, disk_blocks=None):
    """A cache whose 13-token prompt's 3 full blocks were persisted to ``tmp_path``; returns the
    prompt, the keys of its blocks in order and what ``persist`` returned."""
    cache = PagedKVCache(8, 4, HEADS, DIM, max_batch=1, max_blocks_per_seq=8, num_layers=LAYERS)
    cache.attach_store(TieredStore.for_cache(cache, host_blocks=2, disk_dir=tmp_path, disk_blocks=disk_blocks))
    prompt = list(range(1, 14))
    slot, _ = cache.add_sequence(prompt)
    write_tokens(cache, slot, [], prompt)
    keys = list(cache.seqs[slot].hashes)
    return prompt, keys, cache.persist()


@pytest.mark.parametrize("entry", ["a directory", "a symlink to a directory", "a fifo"])
def test_a_foreign_entry_where_a_block_file_should_be_is_a_miss(tmp_path, entry):
    """Anything but a regular file under a block's name is never read (a fifo would block) and
    never deleted; the prompt reuses the blocks before it, computes the rest, and no block is left
    referenced without an owner."""
    prompt, keys, _ = _persisted_prompt(tmp_path)
    path = tmp_path / next(p.name for p in tmp_path.iterdir() if p.name.endswith(keys[1].hex() + ".kvb"))
    path.unlink()
    if entry == "a directory":
        path.mkdir()
    elif entry == "a symlink to a directory":
        (tmp_path / "elsewhere").mkdir()
        path.symlink_to(tmp_path / "elsewhere")
    else:
        os.mkfifo(path)
    cache = PagedKVCache(8, 4, HEADS, DIM, max_batch=1, max_blocks_per_seq=8, num_layers=LAYERS)
    store = TieredStore.for_cache(cache, host_blocks=2, disk_dir=tmp_path)
    cache.attach_store(store)
    assert store.disk.foreign == 1 and keys[1] not in store.disk  # reported at opening, not listed
    slot, cached = cache.add_sequence(prompt)
    assert cached == 4 and cache.prefix_hits["disk"] == 1  # block 0 found, block 1 missing: stop there
    write_tokens(cache, slot, prompt[:cached], prompt[cached:])
    assert all(torch.equal(a, b) for a, b in zip(contents(cache, slot), expected(prompt), strict=True))
    cache.free(slot)
    assert cache.allocator.num_free == 8 and (path.exists() or path.is_symlink())  # left alone
    assert store.put(keys[1], torch.zeros(store.layout.nbytes, dtype=torch.uint8)) in (True, False)  # never raises


def test_an_entry_that_turns_foreign_after_opening_is_a_reported_miss(tmp_path):
    prompt, keys, _ = _persisted_prompt(tmp_path)
    cache = PagedKVCache(8, 4, HEADS, DIM, max_batch=1, max_blocks_per_seq=8, num_layers=LAYERS)
    store = TieredStore.for_cache(cache, host_blocks=2, disk_dir=tmp_path)
    cache.attach_store(store)
    path = store.disk.path(keys[0])
    path.unlink()
    path.mkdir()  # after the store listed it
    slot, cached = cache.add_sequence(prompt)
    assert cached == 0 and store.stats["unreadable"] == 1 and store.stats["corrupt"] == 0 and path.is_dir()
    cache.free(slot)
    assert cache.allocator.num_free == 8 and not cache.seqs


def test_a_failing_tier_leaves_no_reference_without_an_owner(tmp_path, monkeypatch):
    prompt, keys, _ = _persisted_prompt(tmp_path)
    cache = PagedKVCache(8, 4, HEADS, DIM, max_batch=1, max_blocks_per_seq=8, num_layers=LAYERS)
    cache.attach_store(TieredStore.for_cache(cache, host_blocks=2, disk_dir=tmp_path))
    real = cache.store.layout.unpack
    calls = []

    def unpack_then_fail(*args):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("the device copy failed")
        return real(*args)

    monkeypatch.setattr(cache.store.layout, "unpack", unpack_then_fail)
    with pytest.raises(OSError, match="device copy"):
        cache.add_sequence(prompt)
    assert cache.allocator.num_free == 8 and not cache.seqs and all(n == 0 for n in cache.allocator.ref_count)


def test_persist_returns_what_the_disk_kept(tmp_path):
    _, keys, kept = _persisted_prompt(tmp_path, disk_blocks=2)
    files = list(tmp_path.glob("*.kvb"))
    assert kept == len(files) == 2
