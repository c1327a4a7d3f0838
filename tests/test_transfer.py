"""KV transfer between processes, the parts that need no process: the header, the payloads and
their digests, the in-process channel, the connector's call order (notebook 12)."""

from __future__ import annotations

import pytest
import torch

from flashkv_edu import charlm, disagg
from flashkv_edu.connector import KVConnector, TransferRequest
from flashkv_edu.paged import PagedKVCache
from flashkv_edu.speculative import greedy_generate
from flashkv_edu.transfer import (
    HEADER_BYTES,
    KVHeader,
    KVReceiver,
    KVSender,
    LocalChannel,
    PeerLostError,
    TransferError,
    check_fits,
    digest,
    header_for,
    pack_layer,
)

PROMPTS = ["def main(argv):\n    ", "class KVCache:\n    def __init__(self, ", "import os\n", "x"]


def _filled_cache(tokens=37, heads=2, block_size=16, layers=3, seed=0):
    cache = PagedKVCache(8, block_size, heads, 8, max_batch=2, max_blocks_per_seq=4, num_layers=layers)
    g = torch.Generator().manual_seed(seed)
    for pool in cache.pools:
        pool.copy_(torch.randn(pool.shape, generator=g))
    slot, _ = cache.add_sequence()
    cache.reserve(slot, tokens)
    return cache, slot


def test_a_header_survives_the_wire_and_garbage_is_refused():
    cache, slot = _filled_cache()
    header = header_for(cache, cache.seqs[slot].blocks, request=7, tokens=36, heads=(1, 2))
    assert header.blocks == 3 and header.payload_shape == (2, 3, 16, 1, 8)
    assert header.layer_bytes == 2 * 3 * 16 * 1 * 8 * 4 and header.total_bytes == 3 * header.layer_bytes
    assert header.token_bytes == header.total_bytes // 48 * 36  # 12 of 48 slots are the last block's padding
    data = header.encode()
    assert data.dtype == torch.uint8 and data.shape == (HEADER_BYTES,)
    assert KVHeader.decode(data) == header
    for bad in (torch.zeros(HEADER_BYTES, dtype=torch.uint8), torch.full((HEADER_BYTES,), 32, dtype=torch.uint8)):
        with pytest.raises(TransferError, match="could not be read"):
            KVHeader.decode(bad)
    impossible = KVHeader(7, 99, 3, 3, 16, (1, 2), 8, "float32", (0, 1, 2))  # 99 tokens in 48 slots
    with pytest.raises(TransferError, match="impossible"):
        KVHeader.decode(impossible.encode())


def test_a_payload_moves_whole_blocks_and_lands_in_other_block_ids():
    """Sender blocks [0, 1, 2] land in the receiver's blocks [5, 3, 6]: the same keys and values
    token for token; a head slice lands in a cache of that many heads."""
    src, slot = _filled_cache(tokens=40)
    a, b = LocalChannel.pair(5.0)
    header = header_for(src, src.seqs[slot].blocks, request=0, tokens=40, heads=(1, 2))
    sender = KVSender(a, header)
    sender.start()
    for layer in range(src.num_layers):
        sender.send_layer(src, layer)
    dst = PagedKVCache(8, 16, 1, 8, max_batch=1, max_blocks_per_seq=4, num_layers=3)
    receiver = KVReceiver(b, request=0, layers=3)
    assert receiver.header() == header
    check_fits(header, dst, max_tokens=40)
    receiver.start()
    for layer in range(3):
        receiver.land_layer(dst, layer, [5, 3, 6])
    for layer in range(3):
        for pools in ("k_pools", "v_pools"):
            got = getattr(dst, pools)[layer][[5, 3, 6]]
            want = getattr(src, pools)[layer][src.seqs[slot].blocks][:, :, 1:2]
            assert torch.equal(got, want)
    assert receiver.bytes == sender.bytes == header.total_bytes


def test_a_corrupted_layer_or_a_lost_peer_is_reported_never_landed():
    src, slot = _filled_cache(tokens=20)
    header = header_for(src, src.seqs[slot].blocks, request=1, tokens=20)
    a, b = LocalChannel.pair(5.0)
    sender = KVSender(a, header)
    sender.start()
    sender.send_layer(src, 0, corrupt=True)
    dst = PagedKVCache(8, 16, 2, 8, max_batch=1, max_blocks_per_seq=4, num_layers=3)
    before = dst.k_pools[0].clone()
    receiver = KVReceiver(b, request=1, layers=3)
    receiver.header()
    receiver.start()
    with pytest.raises(TransferError, match="layer 0.*SHA-256"):
        receiver.land_layer(dst, 0, [0, 1])
    assert torch.equal(dst.k_pools[0], before)
    a.close()  # the sender's process died
    with pytest.raises(PeerLostError, match="lost"):
        receiver.land_layer(dst, 1, [0, 1])
    quiet, other = LocalChannel.pair(0.2)
    with pytest.raises(PeerLostError, match="did not answer within 0.2 s"):
        KVReceiver(other, request=0, layers=3).header()
    assert quiet.timeout == 0.2


def test_the_header_is_checked_against_the_receiving_cache():
    src, slot = _filled_cache(tokens=20)
    header = header_for(src, src.seqs[slot].blocks, request=0, tokens=20)
    for cache, what in (
        (PagedKVCache(8, 8, 2, 8, max_batch=1, max_blocks_per_seq=4, num_layers=3), "block_size"),
        (PagedKVCache(8, 16, 1, 8, max_batch=1, max_blocks_per_seq=4, num_layers=3), "heads"),
        (PagedKVCache(8, 16, 2, 8, max_batch=1, max_blocks_per_seq=4, num_layers=2), "layers"),
        (PagedKVCache(8, 16, 2, 8, max_batch=1, max_blocks_per_seq=4, num_layers=3, dtype=torch.float16), "dtype"),
    ):
        with pytest.raises(TransferError, match=what):
            check_fits(header, cache, 100)
    with pytest.raises(TransferError, match="at most 19"):
        check_fits(header, src, 19)  # the whole prompt would leave nothing to compute
    assert torch.equal(digest(pack_layer(src, 0, [0], (0, 2))), digest(pack_layer(src, 0, [0], (0, 2))))


def _one_process_outputs(prompts, new_tokens):
    model, _ = charlm.load()
    return [greedy_generate(model, [charlm.encode(p)], new_tokens)[0][0] for p in prompts]


def test_disaggregated_locally_equals_one_process_and_moves_the_prompt_less_one_token():
    """The workers' code in one process (in-process channels): tokens identical to one process;
    each request moves ceil((n - 1) / 16) whole blocks of 4 layers, keys and values (2 KV heads of
    32 fp32 values: 2048 bytes a token slot), its padding the last block's unused slots; a
    one-token prompt moves nothing. Every block is back in its pool."""
    result = disagg.disaggregate(PROMPTS, 12, local=True, prefill_workers=2, decode_workers=2)
    assert result.tokens == _one_process_outputs(PROMPTS, 12)
    per_slot = 4 * 2 * 2 * 32 * 4
    for i, p in enumerate(PROMPTS):
        sent = len(charlm.encode(p)) - 1
        slots = -(-sent // 16) * 16
        assert result.kv_bytes[i] == slots * per_slot
        assert result.padding_bytes[i] == (slots - sent) * per_slot
    assert result.recomputed == [False, False, False, False] and result.kv_bytes[3] == 0
    assert set(result.leaked_blocks.values()) == {0}


def test_the_connector_calls_in_vllm_order():
    """One request's step on each side: the scheduler's three calls, then the worker's, with
    wait_for_layer_load / save_kv_layer inside every layer, then request_finished."""
    result = disagg.disaggregate(PROMPTS[:1], 2, local=True)
    layer_calls = [m for layer in range(4) for m in ("worker.wait_for_layer_load", "worker.save_kv_layer")]
    step = [
        "scheduler.get_num_new_matched_tokens",
        "scheduler.update_state_after_alloc",
        "scheduler.build_connector_meta",
        "worker.bind_connector_metadata",
        "worker.start_load_kv",
        *layer_calls,
        "worker.wait_for_save",
        "worker.get_finished",
        "worker.clear_connector_metadata",
        "scheduler.request_finished",
    ]
    for rank in (0, 1):
        assert [f"{role}.{m}" for _, _, role, m, _ in result.logs[rank]] == step
    assert [e[1] for e in result.logs[0]] == ["prefill"] * len(step)
    assert [e[1] for e in result.logs[1]] == ["decode"] * len(step)


def test_a_connector_refuses_the_other_roles_methods():
    cache, _ = _filled_cache()
    sched = KVConnector("decode", "scheduler", cache)
    with pytest.raises(ValueError, match="worker-side method"):
        sched.start_load_kv()
    worker = KVConnector("prefill", "worker", cache)
    with pytest.raises(ValueError, match="scheduler-side method"):
        worker.get_num_new_matched_tokens(TransferRequest(0, [1, 2], []), 0)
    assert not sched.log and not worker.log


def test_a_decode_scheduler_matches_nothing_when_the_header_never_comes():
    """No header within the timeout: 0 tokens matched (the decode worker computes the prompt),
    the reason kept; a one-token prompt is never waited for."""
    cache, _ = _filled_cache()
    _, b = LocalChannel.pair(0.1)
    sched = KVConnector("decode", "scheduler", cache)
    assert sched.get_num_new_matched_tokens(TransferRequest(3, [5, 6, 7], [(b, None)]), 0) == (0, False)
    assert "did not answer" in sched.errors[3]
    assert sched.get_num_new_matched_tokens(TransferRequest(4, [5], [(b, None)]), 0) == (0, False)
    assert 4 not in sched.errors
