"""The error contract on notebook 11's surfaces: budgets and the cost model (flashkv_edu.memory),
the tiers (flashkv_edu.offload), the paged cache's store, swap and persist methods, preemption in
the serving loop, and the prefix indexes (flashkv_edu.prefix). Each bad input raises the right
exception (also a RuntimeError), names the argument, and leaves every object, and every file in
the store's directory, exactly as it was."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from contract import call, case_registry, refused_unchanged

from flashkv_edu import memory as M
from flashkv_edu.model import ModelConfig, TinyDecoder
from flashkv_edu.offload import BlockLayout, StoreFullError, TieredStore
from flashkv_edu.paged import OutOfBlocksError, PagedKVCache, SwappedSequence
from flashkv_edu.prefix import BlockHashIndex, RadixTree, replay, shared_prefix_workload
from flashkv_edu.serving import Request, new_paged_cache, serve
from flashkv_edu.validation import ArgumentError, ArgumentTypeError

VALUE, TYPE = ArgumentError, ArgumentTypeError


CASES, bad = case_registry()


# --- memory ----------------------------------------------------------------------------------------

GiB = 2**30
shape = M.LLAMA_3_8B
budget = lambda **kw: call(
    M.plan_budget,
    **{
        "total_bytes": 80 * GiB,
        "weight_bytes": 16 * GiB,  # noqa: E731
        "activation_bytes": GiB,
        "kv_bytes_per_token": 131072,
        **kw,
    },
)

bad("ModelShape params 0", VALUE, "params")(lambda _: call(M.ModelShape, "x", 0, 1, 1, 1, 1, 1, 1))
bad("ModelShape headdim float", TYPE, "headdim")(lambda _: call(M.ModelShape, "x", 1, 1, 1, 1, 1, 1, 1.5))
bad("ModelShape dtype_bytes 16", VALUE, "dtype_bytes")(lambda _: call(M.ModelShape, "x", 1, 1, 1, 1, 1, 1, 1, 16))
bad("kv_bytes_per_token cache bytes 0", VALUE, "cache_dtype_bytes")(lambda _: call(shape.kv_bytes_per_token, 0))
bad("activation_bytes tokens 0", VALUE, "tokens")(lambda _: call(shape.activation_bytes, 0))
bad("activation_bytes logits_rows -1", VALUE, "logits_rows")(lambda _: call(shape.activation_bytes, 4, -1))
bad("plan_budget total_bytes float", TYPE, "total_bytes")(lambda _: budget(total_bytes=8e10))
bad("plan_budget weight_bytes negative", VALUE, "weight_bytes")(lambda _: budget(weight_bytes=-1))
bad("plan_budget activation_bytes True", TYPE, "activation_bytes")(lambda _: budget(activation_bytes=True))
bad("plan_budget kv_bytes_per_token 0", VALUE, "kv_bytes_per_token")(lambda _: budget(kv_bytes_per_token=0))
bad("plan_budget block_size 0", VALUE, "block_size")(lambda _: budget(block_size=0))
bad("plan_budget utilization 0", VALUE, "utilization")(lambda _: budget(utilization=0))
bad("plan_budget utilization nan", VALUE, "utilization")(lambda _: budget(utilization=float("nan")))
bad("plan_budget utilization 1.5", VALUE, "utilization")(lambda _: budget(utilization=1.5))
bad("plan_budget utilization a string", TYPE, "utilization")(lambda _: budget(utilization="0.9"))
bad("plan_budget no room for a block", VALUE, "total_bytes")(lambda _: budget(total_bytes=16 * GiB))
bad("Budget.sequences 0", VALUE, "tokens_per_sequence")(lambda _: call(M.plan_budget(GiB, 0, 0, 1024).sequences, 0))
bad("shape_of not a TinyDecoder", TYPE, "model")(lambda _: call(M.shape_of, torch.nn.Linear(2, 2)))


def _tiny():
    return TinyDecoder(ModelConfig(vocab_size=16, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seqlen=32))


bad("measure_step_activations 0 tokens", VALUE, "max_batched_tokens")(
    lambda _: call(M.measure_step_activations, _tiny(), 0)
)
bad("profile_budget a Linear", TYPE, "model")(lambda _: call(M.profile_budget, torch.nn.Linear(2, 2), GiB))
bad("swap_seconds bandwidth 0", VALUE, "bandwidth")(lambda _: call(M.swap_seconds, 1024, 16, 0.0))
bad("swap_seconds tokens -1", VALUE, "tokens")(lambda _: call(M.swap_seconds, 1024, -1, 1e9))
bad("swap_seconds copies 0", VALUE, "copies_per_block")(
    lambda _: call(M.swap_seconds, 1024, 16, 1e9, copies_per_block=0)
)
bad("swap_seconds latency negative", VALUE, "seconds_per_copy")(
    lambda _: call(M.swap_seconds, 1024, 16, 1e9, seconds_per_copy=-1e-6)
)
bad("recompute_seconds flops inf", VALUE, "flops_per_s")(lambda _: call(M.recompute_seconds, shape, 16, float("inf")))
bad("recompute_seconds overhead negative", VALUE, "overhead_s")(
    lambda _: call(M.recompute_seconds, shape, 16, 1e12, overhead_s=-1.0)
)
bad("crossover_tokens max_tokens 1", VALUE, "max_tokens")(
    lambda _: call(M.crossover_tokens, lambda n: 1.0, lambda n: 2.0, 1)
)


# --- the tiers -------------------------------------------------------------------------------------


def _cache(**kw):
    return PagedKVCache(4, 2, 1, 2, max_batch=2, max_blocks_per_seq=4, num_layers=2, **kw)


def _store(tmp, host=1, disk=True, **kw):
    store = TieredStore.for_cache(_cache(), host_blocks=host, disk_dir=tmp / "store" if disk else None, **kw)
    store.put(b"old", torch.arange(store.layout.nbytes, dtype=torch.uint8) % 251)
    store.put(b"older", torch.zeros(store.layout.nbytes, dtype=torch.uint8))
    return store


def _row(store, n=None):
    return torch.zeros(store.layout.nbytes if n is None else n, dtype=torch.uint8)


bad("BlockLayout of nothing", TYPE, "pools")(lambda _: call(BlockLayout, []))
bad("BlockLayout of ints", TYPE, "pools[0]")(lambda _: call(BlockLayout, [3]))
bad("TieredStore layout a cache", TYPE, "layout")(lambda _: call(TieredStore, _cache(), 2))
bad("TieredStore host_blocks -1", VALUE, "host_blocks")(lambda _: call(TieredStore.for_cache, _cache(), -1))
bad("TieredStore no tier at all", VALUE, "host_blocks")(lambda _: call(TieredStore.for_cache, _cache(), 0))
bad("TieredStore disk_blocks without disk_dir", VALUE, "disk_blocks")(
    lambda _: call(TieredStore.for_cache, _cache(), 1, None, 4)
)
bad("TieredStore disk_dir an int", TYPE, "disk_dir")(lambda _: call(TieredStore.for_cache, _cache(), 1, 7))
bad("TieredStore disk_blocks 0", VALUE, "disk_blocks")(
    lambda tmp: call(TieredStore.for_cache, _cache(), 1, tmp / "d", 0, state=[tmp])
)


def _a_file(tmp):
    (tmp / "afile").write_text("not a directory")
    return call(TieredStore.for_cache, _cache(), 1, tmp / "afile", state=[tmp])


bad("TieredStore disk_dir a file", VALUE, "disk_dir")(_a_file)
bad("put a str key", TYPE, "key")(lambda tmp: (lambda s: call(s.put, "k", _row(s), state=[s]))(_store(tmp)))
bad("put an empty key", TYPE, "key")(lambda tmp: (lambda s: call(s.put, b"", _row(s), state=[s]))(_store(tmp)))
bad("put a short row", VALUE, "row")(lambda tmp: (lambda s: call(s.put, b"k", _row(s, 3), state=[s]))(_store(tmp)))
bad("put a float row", VALUE, "row")(lambda tmp: (lambda s: call(s.put, b"k", _row(s).float(), state=[s]))(_store(tmp)))
bad("put pinned into a full store", StoreFullError, "pinned")(
    lambda tmp: (lambda s: call(s.put, b"k", _row(s), pin=True, state=[s]))(_pinned_full(tmp))
)


def _pinned_full(tmp):
    store = TieredStore.for_cache(_cache(), host_blocks=1)
    store.put(b"p", _row(store), pin=True)
    return store


bad("get an int key", TYPE, "key")(lambda tmp: (lambda s: call(s.get, 3, state=[s]))(_store(tmp)))
bad("discard None", TYPE, "key")(lambda tmp: (lambda s: call(s.discard, None, state=[s]))(_store(tmp)))
bad("tier_of a str", TYPE, "key")(lambda tmp: (lambda s: call(s.tier_of, "old", state=[s]))(_store(tmp)))
bad("can_pin -1", VALUE, "n")(lambda tmp: (lambda s: call(s.can_pin, -1, state=[s]))(_store(tmp)))
bad("write_to_disk without a disk", VALUE, "disk_dir")(
    lambda tmp: (lambda s: call(s.write_to_disk, b"k", _row(s), state=[s]))(_store(tmp, disk=False))
)
bad("flush_host without a disk", VALUE, "disk_dir")(
    lambda tmp: (lambda s: call(s.flush_host, state=[s]))(_store(tmp, disk=False))
)


# --- the paged cache's store, swap and persist -----------------------------------------------------


def _filled(tmp, host=4, disk=True, blocks=4):
    cache = PagedKVCache(blocks, 2, 1, 2, max_batch=2, max_blocks_per_seq=4, num_layers=2)
    for pool in cache.pools:
        pool.normal_()
    cache.attach_store(TieredStore.for_cache(cache, host_blocks=host, disk_dir=tmp / "store" if disk else None))
    slot, _ = cache.add_sequence([1, 2, 3])
    cache.reserve(slot, 3, [1, 2, 3])
    return cache, slot


def _on(tmp, method, *args, **kw):
    cache, _ = _filled(tmp, **kw)
    return call(getattr(cache, method), *args, state=[cache])


bad("attach_store a dict", TYPE, "store")(lambda _: (lambda c: call(c.attach_store, {}, state=[c]))(_cache()))
bad("attach_store of another shape", VALUE, "store")(
    lambda _: (lambda c: call(c.attach_store, TieredStore.for_cache(_cache(headdim_v=4), 1), state=[c]))(_cache())
)
bad("swap_out without a store", VALUE, "attach_store")(
    lambda _: (lambda c: call(c.swap_out, c.add_sequence([1])[0], state=[c]))(_cache())
)
bad("swap_out a closed slot", VALUE, "slot")(lambda tmp: _on(tmp, "swap_out", 1))
bad("swap_out into a full store", StoreFullError, "swap_out")(lambda tmp: _on(tmp, "swap_out", 0, host=1, disk=False))
bad("swap_in a list", TYPE, "handle")(lambda tmp: _on(tmp, "swap_in", [b"k"]))
bad("swap_in a handle of another store", VALUE, "handle")(
    lambda tmp: _on(tmp, "swap_in", SwappedSequence([b"swap:x"], 2, [1, 2], []))
)


def _swapped_twice(tmp):
    cache, slot = _filled(tmp)
    handle = cache.swap_out(slot)
    cache.swap_in(handle)
    return call(cache.swap_in, handle, state=[cache])


bad("swap_in twice", VALUE, "already swapped in")(_swapped_twice)


def _no_room(tmp):
    cache, slot = _filled(tmp, blocks=3)
    handle = cache.swap_out(slot)  # two blocks out
    other, _ = cache.add_sequence([5, 6, 7, 8, 9])
    cache.reserve(other, 5, [5, 6, 7, 8, 9])  # all three blocks in use
    return call(cache.swap_in, handle, state=[cache, tmp])


bad("swap_in with no free block", OutOfBlocksError, "free blocks")(_no_room)
bad("persist without a disk", VALUE, "disk")(lambda tmp: _on(tmp, "persist", disk=False))
bad("persist without a store", VALUE, "attach_store")(lambda _: (lambda c: call(c.persist, state=[c]))(_cache()))
bad("resize_layer after attach_store", VALUE, "attach_store")(lambda tmp: _on(tmp, "resize_layer", 0, 1, 4))
bad("blocks_to_admit floats", TYPE, "prompt_tokens")(lambda tmp: _on(tmp, "blocks_to_admit", [1.0, 2.0]))


# --- serving with preemption ---------------------------------------------------------------------------


def _serve(requests, cache_kw=None, **kw):
    model = _tiny()
    cache = new_paged_cache(model, **{"num_blocks": 8, "block_size": 4, "max_batch": 2, **(cache_kw or {})})
    return (lambda: serve(model, requests, cache, **kw)), [cache, requests]


bad("serve preemption evict", VALUE, "preemption")(lambda _: _serve([Request([1], 2)], preemption="evict"))
bad("serve swap without a store", VALUE, "attach_store")(lambda _: _serve([Request([1], 2)], preemption="swap"))
bad("serve watermark 1", VALUE, "watermark")(lambda _: _serve([Request([1], 2)], watermark=1.0))
bad("serve watermark negative", VALUE, "watermark")(lambda _: _serve([Request([1], 2)], watermark=-0.1))
bad("serve watermark a string", TYPE, "watermark")(lambda _: _serve([Request([1], 2)], watermark="1%"))
bad("serve a request larger than the pool", VALUE, "whole pool")(
    lambda _: _serve([Request([1], 2), Request([1] * 10, 20)], cache_kw={"num_blocks": 6})
)


# --- the prefix indexes ----------------------------------------------------------------------------

bad("BlockHashIndex block 0", VALUE, "block_size")(lambda _: call(BlockHashIndex, 0))
bad("BlockHashIndex capacity 0", VALUE, "capacity")(lambda _: call(BlockHashIndex, 4, 0))
bad("RadixTree capacity -1", VALUE, "capacity")(lambda _: call(RadixTree, -1))
bad("RadixTree.match floats", TYPE, "tokens")(lambda _: (lambda t: call(t.match, [1.5], state=[t]))(_tree()))
bad("RadixTree.insert negative", VALUE, "tokens[1]")(lambda _: (lambda t: call(t.insert, [1, -2], state=[t]))(_tree()))
bad("BlockHashIndex.insert a string", TYPE, "tokens")(
    lambda _: (lambda i: call(i.insert, "abc", state=[i]))(BlockHashIndex(2))
)
bad("replay into a dict", VALUE, "index")(lambda _: call(replay, {}, [[1, 2]]))
bad("replay outputs too few", VALUE, "outputs")(
    lambda _: (lambda t: call(replay, t, [[1], [2]], [[3]], state=[t]))(_tree())
)
bad("shared_prefix_workload chats 0", VALUE, "chats")(lambda _: call(shared_prefix_workload, 0))


def _tree():
    tree = RadixTree()
    tree.insert([1, 2, 3])
    return tree


@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_bad_input(c, tmp_path):
    refused_unchanged(c, *c.build(tmp_path))


def test_every_surface_has_cases():
    names = " ".join(c.name for c in CASES)
    for surface in ("plan_budget", "TieredStore", "put", "swap_in", "swap_out", "persist", "serve", "RadixTree"):
        assert surface in names
    assert len(CASES) >= 70
    assert Path(__file__).name.startswith("test_")
