"""Overlap scheduling (notebook 12): ``serve(..., overlap=True)`` plans step N+1 while a device
thread runs step N; tokens are plain ``serve``'s, step N's results are processed during step N+1,
and a step in flight that reads a buffer the scheduler rewrites is caught, whatever the timing."""

from __future__ import annotations

import time

import pytest
import torch

from flashkv_edu import charlm
from flashkv_edu.offload import TieredStore
from flashkv_edu.overlap import BufferVersions, Device, DeviceTimeoutError, HazardError
from flashkv_edu.serving import Request, launch_inputs, new_paged_cache, serve

TEXTS = ["def main(argv):\n", "class Cache:\n    def ", "import os\nimport sys\n", "    return self.", "for i in x:\n"]


@pytest.fixture(scope="module")
def model():
    return charlm.load()[0]


def _requests(new=12):
    return [Request(charlm.encode(t), new, arrival=i) for i, t in enumerate(TEXTS)]


def _served(model, blocks=64, preemption="recompute", **kw):
    requests = _requests()
    cache = new_paged_cache(model, blocks, 4, max_batch=4)
    if preemption == "swap":
        cache.attach_store(TieredStore.for_cache(cache, host_blocks=64))
    trace = serve(model, requests, cache, preemption=preemption, **kw)
    assert cache.allocator.num_free == blocks and not cache.seqs
    return [r.output for r in requests], trace


@pytest.mark.parametrize("blocks", [64, 14], ids=["room", "preempting"])
@pytest.mark.parametrize("preemption", ["recompute", "swap"])
def test_overlap_and_the_serial_device_give_plain_serves_tokens(model, blocks, preemption):
    want, plain = _served(model, blocks, preemption)
    assert (sum(plain.preemptions.values()) > 0) == (blocks == 14)
    for kw in (dict(overlap=True), dict(kernel_seconds=0.001), dict(overlap=True, kernel_seconds=0.001)):
        got, trace = _served(model, blocks, preemption, **kw)
        assert got == want, kw
        assert trace.preemptions == plain.preemptions or blocks == 14


def test_step_n_results_are_processed_during_step_n_plus_1(model):
    """The event log: every step's results are processed in the next step (the serial device
    processes them in their own step); a finished request leaves when its last sample is seen."""
    _, overlapped = _served(model, overlap=True)
    _, serial = _served(model, kernel_seconds=1e-9)
    for step, events in enumerate(overlapped.events):
        for part in events.split("; "):
            if "results processed" in part:
                assert part.startswith("step ") and part.endswith(f"during step {step}")
                assert int(part.split()[1]) == step - 1
    assert all("at once" in p for e in serial.events for p in e.split("; ") if "results processed" in p)
    # the last results are seen one step later, and a slot a finished request frees one step later too
    assert len(overlapped.events) > len(serial.events)
    lanes = {lane for lane, *_ in overlapped.timeline}
    assert lanes == {"device", "scheduler"}


def _consecutive_views(cache, slots):
    """A zero-copy 'fast path' (the bug of SGLang PR #1712's kind): consecutive slots as views."""
    lo = slots[0]
    if slots == list(range(lo, lo + len(slots))):
        return cache.block_table[lo : lo + len(slots)], cache.cache_seqlens[lo : lo + len(slots)]
    return launch_inputs(cache, slots)


def test_a_step_reading_what_the_scheduler_rewrites_is_caught(model):
    """Views of the live block table: harmless when each step runs alone, a race with overlap,
    refused at the scheduler's write (deterministic, whatever the device's speed); the slots and
    blocks the run took are released."""
    want, _ = _served(model)
    got, _ = _served(model, kernel_seconds=1e-9, inputs=_consecutive_views)
    assert got == want
    requests = _requests()
    cache = new_paged_cache(model, 64, 4, max_batch=4)
    with pytest.raises(HazardError, match="while step 0, in flight, reads it"):
        serve(model, requests, cache, overlap=True, inputs=_consecutive_views)
    assert cache.allocator.num_free == 64 and not cache.seqs and cache.on_write is None


def test_buffer_versions_count_writes_and_refuse_one_under_a_lease():
    v = BufferVersions()
    v.write("t")
    v.check()
    v.lease(3, ["t"])
    v.write("other")
    v.check()
    v.write("t")  # recorded, raised by the next check
    with pytest.raises(HazardError, match=r"t is rewritten \(version 1 -> 2\) while step 3"):
        v.check()
    v.release(3)
    assert v.version["t"] == 2 and v.version["other"] == 1


def test_a_device_runs_in_order_for_at_least_the_kernel_time_and_every_wait_is_bounded():
    order = []
    with Device(kernel_seconds=0.02, timeout=1.0) as device:
        handles = [device.launch(lambda i=i: order.append(i) or i) for i in range(3)]
        assert [h.result(1.0) for h in handles] == [0, 1, 2] and order == [0, 1, 2]
        assert all(h.ended - h.started >= 0.02 for h in handles)
        slow = device.launch(lambda: time.sleep(0.5))
        with pytest.raises(DeviceTimeoutError, match="did not finish within 0.05 s"):
            slow.result(0.05)
        failing = device.launch(lambda: torch.zeros(2)[5])
        with pytest.raises(IndexError):
            failing.result(2.0)
    assert not device.thread.is_alive()
