"""Notebook 12's exercise checks: the solution passes, the stub is not attempted yet, and
the planted mistakes (typical wrong answers a learner writes) fail."""

from __future__ import annotations

import hashlib

import torch
from teach_harness import exercise_tests

from flashkv_edu.teach import nb12_beyond_one_process as nb12
from flashkv_edu.transfer import DTYPES, digest, tag_base


def bytes_whole_prompt(n, bs, layers, heads, d, size):  # sends the last prompt token too
    slots = -(-n // bs) * bs
    per = layers * 2 * heads * d * size
    return slots * per, (slots - n) * per


def bytes_tokens_only(n, bs, layers, heads, d, size):  # forgets the block padding
    return (n - 1) * layers * 2 * heads * d * size, 0


def bytes_keys_only(n, bs, layers, heads, d, size):  # forgets the values
    moved, pad = nb12.kv_transfer_bytes(n, bs, layers, heads, d, size)
    return moved // 2, pad // 2


def bytes_floor_blocks(n, bs, layers, heads, d, size):  # full blocks only, the partial one dropped
    per = layers * 2 * heads * d * size
    return (n - 1) // bs * bs * per, 0


def receive_into_staging(channel, header, layer, staging):  # the shipped bug: a view of the reused buffer
    base = tag_base(header.request, header.layers)
    channel.irecv(staging, base + 1 + 2 * layer).wait()
    n = 1
    for s in header.payload_shape:
        n *= s
    return staging[:n].view(header.payload_shape)


def receive_no_digest(channel, header, layer, staging):  # exact buffer, the digest never checked
    payload = torch.empty(header.payload_shape, dtype=DTYPES[header.dtype])
    channel.irecv(payload, tag_base(header.request, header.layers) + 1 + 2 * layer).wait()
    return payload


def receive_fp32_always(channel, header, layer, staging):  # the announced dtype ignored
    base = tag_base(header.request, header.layers)
    payload = torch.empty(header.payload_shape, dtype=torch.float32)
    check = torch.empty(32, dtype=torch.uint8)
    channel.irecv(payload, base + 1 + 2 * layer).wait()
    channel.irecv(check, base + 2 + 2 * layer).wait()
    if not torch.equal(digest(payload), check):
        raise nb12.TransferError("digest")
    return payload


def receive_staging_copy(channel, header, layer, staging):  # copies out of the staging buffer, fp32 assumed
    return receive_into_staging(channel, header, layer, staging).clone()


def key_python_hash(parent, tokens):  # LMCache #1139: seeded per process
    return hash((parent, str(list(tokens)))).to_bytes(8, "little", signed=True)


def key_no_parent(parent, tokens):  # stable, but the same block after any prefix gets one key
    return hashlib.sha256(",".join(map(str, tokens)).encode()).digest()


def key_joined_digits(parent, tokens):  # [1, 23] and [12, 3] both hash "123"
    return hashlib.sha256((parent or b"") + "".join(map(str, tokens)).encode()).digest()


def key_hex_string(parent, tokens):  # a str, not bytes
    return hashlib.sha256((parent or b"root") + repr(list(tokens)).encode()).hexdigest()


def inputs_consecutive_views(cache, slots):  # the zero-copy fast path
    lo = slots[0]
    if slots == list(range(lo, lo + len(slots))):
        return cache.block_table[lo : lo + len(slots)], cache.cache_seqlens[lo : lo + len(slots)]
    return nb12.launch_inputs(cache, slots)


def inputs_sorted(cache, slots):  # rows in slot order instead of the step's order
    rows = torch.tensor(sorted(slots))
    return cache.block_table[rows], cache.cache_seqlens[rows].clone()


def inputs_table_view(cache, slots):  # lengths copied, the whole live block table handed over
    rows = torch.tensor(slots)
    return cache.block_table.narrow(0, slots[0], len(slots)) if slots == sorted(slots) else cache.block_table[rows], (
        cache.cache_seqlens[rows].clone()
    )


MISTAKES = {
    "check_kv_transfer_bytes": [bytes_whole_prompt, bytes_tokens_only, bytes_keys_only, bytes_floor_blocks],
    "check_receive_layer": [receive_into_staging, receive_no_digest, receive_fp32_always, receive_staging_copy],
    "check_block_key": [key_python_hash, key_no_parent, key_joined_digits, key_hex_string],
    "check_launch_inputs": [inputs_consecutive_views, inputs_sorted, inputs_table_view],
}

(
    test_the_solution_passes,
    test_the_stub_is_not_attempted_yet,
    test_a_planted_mistake_fails,
    test_every_check_has_planted_mistakes,
) = exercise_tests(nb12, MISTAKES)
