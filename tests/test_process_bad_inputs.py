"""The error contract of notebook 12's surfaces: disaggregation, transfers, the connector, worker
processes, tensor parallelism and overlap scheduling. Each bad input gives the right exception type
(also a RuntimeError), a message naming the argument, and leaves every object as it was; none
starts a process (tests/contract.py)."""

from __future__ import annotations

import pytest
from contract import call, case_registry, refused_unchanged

from flashkv_edu import charlm, disagg
from flashkv_edu.connector import KVConnector
from flashkv_edu.overlap import Device
from flashkv_edu.paged import PagedKVCache
from flashkv_edu.serving import Request, new_paged_cache, serve
from flashkv_edu.tensor_parallel import ShardHooks, head_range
from flashkv_edu.transfer import GroupChannel, LocalChannel, header_for
from flashkv_edu.validation import ArgumentError, ArgumentTypeError
from flashkv_edu.workers import run_workers

VALUE, TYPE = ArgumentError, ArgumentTypeError
CASES, bad = case_registry()

# --- disaggregate ---------------------------------------------------------------------------------------


def _dis(*args, **kwargs):
    return call(disagg.disaggregate, *args, **kwargs)


bad("disaggregate one text, not a list", VALUE, "prompts")(lambda: _dis("def f():"))
bad("disaggregate no prompts", VALUE, "prompts")(lambda: _dis([]))
bad("disaggregate an empty prompt", VALUE, "prompts[1]")(lambda: _dis(["a", ""]))
bad("disaggregate token ids", VALUE, "prompts[0]")(lambda: _dis([[1, 2]]))
bad("disaggregate max_new_tokens 0", VALUE, "max_new_tokens")(lambda: _dis(["a"], 0))
bad("disaggregate max_new_tokens 2.0", TYPE, "max_new_tokens")(lambda: _dis(["a"], 2.0))
bad("disaggregate prefill_workers 0", VALUE, "prefill_workers")(lambda: _dis(["a"], prefill_workers=0))
bad("disaggregate decode_workers 9", VALUE, "decode_workers")(lambda: _dis(["a"], decode_workers=9))
bad("disaggregate tensor_parallel 3 of 2 heads", VALUE, "tensor parallel")(lambda: _dis(["a"], tensor_parallel=3))
bad("disaggregate tensor_parallel 0", VALUE, "tensor_parallel")(lambda: _dis(["a"], tensor_parallel=0))
bad("disaggregate block_size 0", VALUE, "block_size")(lambda: _dis(["a"], block_size=0))
bad("disaggregate timeout 0", VALUE, "timeout")(lambda: _dis(["a"], timeout=0))
bad("disaggregate unknown fault", VALUE, "fault")(lambda: _dis(["a"], fault="meteor"))
bad("disaggregate store a number", VALUE, "store")(lambda: _dis(["a"], store=5))
bad("disaggregate local with tensor parallel", VALUE, "local")(lambda: _dis(["a"], tensor_parallel=2, local=True))
bad("disaggregate local with a fault", VALUE, "local")(lambda: _dis(["a"], fault="kill-decode", local=True))
bad("disaggregate local not a bool", TYPE, "local")(lambda: _dis(["a"], local="yes"))
bad("disaggregate past the model's positions", VALUE, "max_new_tokens")(lambda: _dis(["a" * 1000], 100))

# --- transfers and the connector --------------------------------------------------------------------------


def _cache():
    cache = PagedKVCache(8, 4, 2, 8, max_batch=2, max_blocks_per_seq=4, num_layers=2)
    slot, _ = cache.add_sequence()
    cache.reserve(slot, 6)
    return cache


def _header(**changes):
    cache = _cache()
    a = dict(blocks=cache.seqs[0].blocks, request=0, tokens=6)
    a.update(changes)
    return call(header_for, cache, **a, state=[cache])


bad("header_for 0 tokens", VALUE, "tokens")(lambda: _header(tokens=0))
bad("header_for more tokens than the blocks hold", VALUE, "tokens")(lambda: _header(tokens=9))
bad("header_for heads past the cache's", VALUE, "heads")(lambda: _header(heads=(1, 3)))
bad("header_for empty head range", VALUE, "heads")(lambda: _header(heads=(1, 1)))
bad("header_for a negative block", VALUE, "blocks")(lambda: _header(blocks=[-1, 0]))
bad("KVConnector side", VALUE, "side")(lambda: call(KVConnector, "middle", "worker", _cache()))
bad("KVConnector role", VALUE, "role")(lambda: call(KVConnector, "decode", "driver", _cache()))
bad("KVConnector not a paged cache", VALUE, "cache")(lambda: call(KVConnector, "decode", "worker", object()))
bad("GroupChannel negative peer", VALUE, "peer")(lambda: call(GroupChannel, -1))
bad("GroupChannel timeout 0", VALUE, "timeout")(lambda: call(GroupChannel, 1, 0))
bad("LocalChannel pair timeout -1", VALUE, "timeout")(lambda: call(LocalChannel.pair, -1))


def _isend_list():
    a, b = LocalChannel.pair(1.0)
    return (lambda: a.isend([1, 2], 0)), [b.boxes]


bad("LocalChannel isend a list", TYPE, "tensor")(_isend_list)

# --- worker processes and tensor parallelism -----------------------------------------------------------------

bad("run_workers a lambda", TYPE, "target")(lambda: call(run_workers, lambda *a: 0, [1]))
bad("run_workers not callable", TYPE, "target")(lambda: call(run_workers, "disagg.worker", [1]))
bad("run_workers no jobs", VALUE, "jobs")(lambda: call(run_workers, disagg.worker, []))
bad("run_workers timeout 0", VALUE, "timeout")(lambda: call(run_workers, disagg.worker, [{}], 0))
bad("head_range uneven", VALUE, "evenly")(lambda: call(head_range, 4, 0, 3))
bad("head_range rank past world", VALUE, "rank")(lambda: call(head_range, 4, 2, 2))
bad("ShardHooks timeout 0", VALUE, "timeout")(lambda: call(ShardHooks, 0, 2, 4, 2, None, 0))

# --- overlap scheduling --------------------------------------------------------------------------------


def _serve(**kwargs):
    model, _ = charlm.load()
    requests = [Request([1, 2, 3], 2)]
    cache = new_paged_cache(model, 8, 4, max_batch=2)
    return (lambda: serve(model, requests, cache, **kwargs)), [cache, requests]


bad("serve overlap not a bool", TYPE, "overlap")(lambda: _serve(overlap="yes"))
bad("serve kernel_seconds negative", VALUE, "kernel_seconds")(lambda: _serve(kernel_seconds=-0.1))
bad("serve timeout 0", VALUE, "timeout")(lambda: _serve(overlap=True, timeout=0))
bad("serve inputs not a function", TYPE, "inputs")(lambda: _serve(overlap=True, inputs=[1]))
bad("Device kernel_seconds negative", VALUE, "kernel_seconds")(lambda: call(Device, -1.0))
bad("Device timeout 0", VALUE, "timeout")(lambda: call(Device, 0.0, 0))


def _reserve(**kwargs):
    cache = _cache()
    return (lambda: cache.reserve(0, 1, **kwargs)), [cache]


bad("reserve tokens now and later", VALUE, "later")(lambda: _reserve(tokens=[3], later=True))
bad("reserve later not a bool", TYPE, "later")(lambda: _reserve(later=1))


def _fill(tokens):
    cache = _cache()
    cache.reserve(0, 1, later=True)
    return (lambda: cache.fill_tokens(0, tokens)), [cache]


bad("fill_tokens more than reserved", VALUE, "waits for 1")(lambda: _fill([1, 2]))
bad("fill_tokens not ids", TYPE, "tokens")(lambda: _fill("ab"))


@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_bad_input(c):
    refused_unchanged(c, *c.build())


def test_the_module_has_its_cases():
    assert len(CASES) >= 45


def test_a_device_refuses_a_launch_once_closed():
    device = Device()
    device.close()
    with pytest.raises(ArgumentError, match="closed"):
        device.launch(lambda: 0)
