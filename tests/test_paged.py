"""Block allocator, paged cache, paged decode and the serving simulation."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from flashkv_edu.kernels import decode_attention_triton
from flashkv_edu.paged import (
    BlockAllocator,
    OutOfBlocksError,
    PagedKVCache,
    gather_paged,
    slot_mapping,
)
from flashkv_edu.reference import attention_ref
from flashkv_edu.sim import BuddyAllocator, FirstFitAllocator, compare, format_results
from flashkv_edu.teach.nb06_paged_block_tables import paged_attention_torch
from flashkv_edu.testing import max_abs_err
from flashkv_edu.validation import ArgumentError

PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 9, 9], [5, 5, 5, 5, 5, 5, 5, 5, 5]]


def values(tokens):
    return torch.tensor(tokens, dtype=torch.float32)[:, None, None].expand(len(tokens), 1, 2).clone()


class AllocatorMachine(RuleBasedStateMachine):
    """Random allocate / append / fork / free / prefix-hit sequences against a simple model."""

    def __init__(self):
        super().__init__()
        self.cache = None
        self.expected = {}

    @precondition(lambda self: self.cache is None)
    @rule(block_size=st.integers(1, 5), num_blocks=st.integers(4, 14))
    def setup(self, block_size, num_blocks):
        self.cache = PagedKVCache(num_blocks, block_size, 1, 2, max_batch=5, max_blocks_per_seq=10)

    def _snapshot(self):
        a = self.cache.allocator
        return (
            list(a.ref_count),
            list(a.free_list),
            self.cache.block_table.clone(),
            self.cache.cache_seqlens.clone(),
            self.cache.k_cache.clone(),
        )

    def _unchanged(self, snap):
        now = self._snapshot()
        assert now[0] == snap[0] and now[1] == snap[1]
        assert all(torch.equal(a, b) for a, b in zip(now[2:], snap[2:], strict=True))

    @precondition(lambda self: self.cache is not None and len(self.cache.seqs) < 5)
    @rule(prompt=st.sampled_from(PROMPTS))
    def add_prompt(self, prompt):
        slot, cached = self.cache.add_sequence(prompt)
        assert cached % self.cache.block_size == 0 and cached <= len(prompt)
        self.expected[slot] = list(prompt[:cached])
        rest = prompt[cached:]
        try:
            self.cache.append(slot, values(rest), values(rest), tokens=rest)
            self.expected[slot] += rest
        except (OutOfBlocksError, ValueError):
            self.cache.free(slot)  # the caller gives the slot back
            del self.expected[slot]

    @precondition(lambda self: self.cache is not None and self.expected)
    @rule(data=st.data(), n=st.integers(1, 6))
    def append(self, data, n):
        slot = data.draw(st.sampled_from(sorted(self.expected)))
        toks = data.draw(st.lists(st.integers(0, 9), min_size=n, max_size=n))
        snap = self._snapshot()
        try:
            self.cache.append(slot, values(toks), values(toks), tokens=toks)
            self.expected[slot] += toks
        except (OutOfBlocksError, ValueError):
            self._unchanged(snap)  # a failed append changes nothing

    @precondition(lambda self: self.cache is not None and self.expected and len(self.cache.seqs) < 5)
    @rule(data=st.data())
    def fork(self, data):
        slot = data.draw(st.sampled_from(sorted(self.expected)))
        child = self.cache.fork(slot)
        self.expected[child] = list(self.expected[slot])

    @precondition(lambda self: self.cache is not None and self.expected)
    @rule(data=st.data())
    def free(self, data):
        slot = data.draw(st.sampled_from(sorted(self.expected)))
        self.cache.free(slot)
        del self.expected[slot]

    @invariant()
    def books_balance(self):
        if self.cache is None:
            return
        a = self.cache.allocator
        assert min(a.ref_count) >= 0
        held = {}
        for s in self.cache.seqs.values():
            for b in s.blocks:
                held[b] = held.get(b, 0) + 1
        assert all(a.ref_count[b] == held.get(b, 0) for b in range(a.num_blocks)), "leaked or lost a block"
        assert set(a.free_list) == {b for b in range(a.num_blocks) if a.ref_count[b] == 0}
        assert a.num_free + len(held) == a.num_blocks

    @invariant()
    def every_sequence_sees_its_own_data(self):
        if self.cache is None:
            return
        for slot, toks in self.expected.items():
            k, v = self.cache.gather(slot)
            assert k[:, 0, 0].tolist() == [float(t) for t in toks]
            assert int(self.cache.cache_seqlens[slot]) == len(toks)
            dense = gather_paged(self.cache.k_cache, self.cache.block_table[slot : slot + 1])[0, : len(toks)]
            assert torch.equal(dense, k)


TestAllocatorMachine = AllocatorMachine.TestCase


def test_allocator_errors_and_lru_eviction():
    a = BlockAllocator(3, 4)
    blocks = a.allocate(3)
    with pytest.raises(OutOfBlocksError, match="need 1 free blocks, only 0"):
        a.allocate(1)
    a.register(blocks[0], b"k0")
    a.free(blocks[0])
    with pytest.raises(ValueError, match="double free"):
        a.free(blocks[0])
    with pytest.raises(ValueError, match="unknown block"):
        a.free(7)
    assert a.lookup(b"k0") == blocks[0] and a.ref_count[blocks[0]] == 1  # hit takes it off the free list
    a.free(blocks[0])
    a.free(blocks[1])
    assert a.allocate(1) == [blocks[0]] and a.evictions == 1  # LRU: oldest free first, hash dropped
    assert a.lookup(b"k0") is None


def test_copy_on_write_copies_at_most_one_block_per_fork_write():
    c = PagedKVCache(10, 4, 1, 2, max_batch=3, max_blocks_per_seq=4)
    s, _ = c.add_sequence()
    c.append(s, values([1, 2, 3, 4, 5, 6]), values([1, 2, 3, 4, 5, 6]))
    f = c.fork(s)
    assert c.allocator.ref_count[c.seqs[s].blocks[0]] == 2
    c.append(f, values([7]), values([7]))
    assert c.cow_copies == 1 and c.seqs[f].blocks[0] == c.seqs[s].blocks[0]  # full block still shared
    c.append(s, values([8]), values([8]))
    assert c.cow_copies == 1  # the parent's block is no longer shared: written in place
    assert c.gather(s)[0][:, 0, 0].tolist() == [1, 2, 3, 4, 5, 6, 8]
    assert c.gather(f)[0][:, 0, 0].tolist() == [1, 2, 3, 4, 5, 6, 7]


def test_prefix_cache_hits_only_full_blocks():
    c = PagedKVCache(20, 4, 1, 2, max_batch=3, max_blocks_per_seq=5)
    s, cached = c.add_sequence(list(range(10)))
    assert cached == 0
    c.append(s, values(list(range(10))), values(list(range(10))), tokens=list(range(10)))
    c.free(s)
    s2, cached = c.add_sequence(list(range(10)))  # the vLLM doc's example: 10 tokens, block 4 -> 2 blocks hit
    assert cached == 8 and c.allocator.hits == 2
    assert c.gather(s2)[0][:, 0, 0].tolist() == list(range(8))


@given(
    block_size=st.integers(1, 20),
    lens=st.lists(st.integers(0, 60), min_size=1, max_size=3),
    heads=st.sampled_from([(4, 4), (4, 2), (6, 1)]),
    causal=st.booleans(),
    sq=st.integers(1, 3),
    seed=st.integers(0, 1000),
)
def test_paged_decode_equals_contiguous_equals_oracle(block_size, lens, heads, causal, sq, seed):
    g = torch.Generator().manual_seed(seed)
    h, hk = heads
    b = len(lens)
    max_blocks = -(-60 // block_size)
    num_blocks = b * max_blocks + 5
    pool_k = torch.randn(num_blocks, block_size, hk, 16, generator=g)
    pool_v = torch.randn(num_blocks, block_size, hk, 16, generator=g)
    table = torch.randperm(num_blocks, generator=g)[: b * max_blocks].view(b, max_blocks).to(torch.int32)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(b, sq, h, 16, generator=g)
    dense_k, dense_v = gather_paged(pool_k, table), gather_paged(pool_v, table)
    contiguous = attention_ref(q, dense_k, dense_v, seqlens_k=seqlens, causal=causal)
    torch_paged = paged_attention_torch(q, pool_k, pool_v, table, seqlens, causal=causal)
    triton_paged = decode_attention_triton(q, pool_k, pool_v, seqlens, block_table=table, causal=causal)
    assert torch.equal(torch_paged, contiguous)
    assert max_abs_err(triton_paged, contiguous) < 1e-5


def test_paged_cache_drives_the_triton_kernel():
    c = PagedKVCache(32, 16, 2, 32, max_batch=3, max_blocks_per_seq=6)
    ks = {}
    for n in (70, 5, 33):
        s, _ = c.add_sequence()
        ks[s] = (torch.randn(n, 2, 32), torch.randn(n, 2, 32))
        c.append(s, *ks[s])
    q = torch.randn(3, 1, 8, 32)
    out = decode_attention_triton(q, c.k_cache, c.v_cache, c.cache_seqlens, block_table=c.block_table)
    for s, (k, v) in ks.items():
        want = attention_ref(q[s : s + 1], k[None], v[None])
        assert max_abs_err(out[s : s + 1], want) < 1e-5


def test_bad_block_table_is_rejected():
    pool = torch.randn(4, 16, 1, 8)
    with pytest.raises(ValueError, match="block_table entries must lie in \\[0, 4\\)"):
        decode_attention_triton(
            torch.randn(1, 1, 1, 8),
            pool,
            pool,
            torch.tensor([3], dtype=torch.int32),
            block_table=torch.tensor([[4]], dtype=torch.int32),
        )
    with pytest.raises(ValueError, match="cache_batch_idx cannot be used with block_table"):
        decode_attention_triton(
            torch.randn(1, 1, 1, 8),
            pool,
            pool,
            torch.tensor([3], dtype=torch.int32),
            block_table=torch.tensor([[1]], dtype=torch.int32),
            cache_batch_idx=torch.tensor([0], dtype=torch.int32),
        )


def test_buddy_and_first_fit_allocators():
    buddy = BuddyAllocator(16)
    a, b = buddy.alloc(3), buddy.alloc(5)
    assert buddy.reserved(a) == 4 and buddy.reserved(b) == 8
    buddy.release(a)
    buddy.release(b)
    assert buddy.alloc(16) == 0  # everything merged back
    ff = FirstFitAllocator(10)
    x = ff.alloc(4)
    assert ff.alloc(4) == 4
    ff.release(x)
    assert ff.alloc(5) is None and ff.alloc(4) == x  # external fragmentation is real


def test_simulation_meets_the_vllm_targets():
    results = {r.scheme: r for r in compare(n=6000)}
    print(format_results(results.values()))
    paged, maxlen = results["paged, block 16"], results["max"]
    assert paged.token_share >= 0.95
    assert maxlen.token_share < 0.40
    assert paged.concurrent >= 2 * maxlen.concurrent
    assert results["max"].token_share < results["pow2"].token_share < results["oracle"].token_share
    assert results["paged, block 256"].internal_share > paged.internal_share  # big blocks waste their tails


def test_slot_mapping_matches_the_vllm_paper_layout():
    blocks, offsets = slot_mapping(torch.tensor([0, 3, 4, 9]), torch.tensor([7, 1, 3], dtype=torch.int32), 4)
    assert blocks.tolist() == [7, 7, 1, 3] and offsets.tolist() == [0, 3, 0, 1]


def test_scatter_to_pages_is_the_inverse_of_gather_paged():
    from flashkv_edu.paged import scatter_to_pages

    table = torch.randperm(11)[:8].view(2, 4).to(torch.int32)
    for x in (torch.randn(2, 12, 2, 3), torch.rand(2, 12, 2)):  # a cache, per-token scales
        pool = scatter_to_pages(x, table, num_blocks=11)
        assert pool.shape[:2] == (11, 3)
        dense = gather_paged(pool if pool.dim() == 4 else pool[..., None], table)
        assert torch.equal(dense if x.dim() == 4 else dense[..., 0], x)
        unused = sorted(set(range(11)) - set(table.flatten().tolist()))
        assert not pool[unused].any()
    with pytest.raises(ArgumentError, match="multiple of 4 rows"):
        scatter_to_pages(torch.randn(2, 10, 2, 3), table)
