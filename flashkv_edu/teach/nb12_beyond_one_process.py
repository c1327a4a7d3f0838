"""Notebook 12 (beyond one process): figures, gloo's sharp edges measured in two processes, the
exercise checks and their solutions.

Exercises: ``kv_transfer_bytes`` (what a disaggregated request moves), and three bug hunts:
``receive_layer`` (a receive into a reused staging buffer: gloo fills a larger buffer partly and
reinterprets another dtype without an error; NCCL #1938), ``block_key`` (prefix keys from Python's
``hash()`` never match across processes: LMCache #1139) and ``launch_inputs`` (a zero-copy fast
path lets the step in flight read what the scheduler rewrites: SGLang PR #1712).
"""

from __future__ import annotations

import hashlib
import inspect
import os
import subprocess
import sys
import textwrap

import matplotlib.pyplot as plt
import torch

from .. import charlm
from ..overlap import HazardError
from ..serving import Request, serve
from ..serving import launch_inputs as _launch_inputs
from ..steps import new_paged_cache
from ..transfer import DTYPES, KVHeader, PeerLostError, TransferError, digest, tag_base
from ..workers import run_workers
from .exercise import CaseFailed, Exercise, expect_equal, run_check

EXERCISES = [
    Exercise("12", "kv_transfer_bytes", "check_kv_transfer_bytes", 10),
    Exercise(
        "12", "receive_layer", "check_receive_layer", 20, bug_hunt=True,
        source="https://github.com/NVIDIA/nccl/issues/1938",
    ),
    Exercise(
        "12", "block_key", "check_block_key", 15, bug_hunt=True,
        source="https://github.com/LMCache/LMCache/issues/1139",
    ),
    Exercise(
        "12", "launch_inputs", "check_launch_inputs", 15, bug_hunt=True,
        source="https://github.com/sgl-project/sglang/pull/1712",
    ),
]  # fmt: skip


# --- figures ---------------------------------------------------------------------------------------------


def draw_timeline(result, prefill_rank: int = 0, decode_rank: int = 1):
    """The connector's calls of a real run on a common clock: each layer sent by the prefill
    worker (``save_kv_layer``) and landed by the decode worker (``wait_for_layer_load``), per
    request, with the steps between them."""
    logs = {prefill_rank: result.logs[prefill_rank], decode_rank: result.logs[decode_rank]}
    t0 = min(e[0] for log in logs.values() for e in log)
    fig, ax = plt.subplots(figsize=(12, 3.8))
    colors = plt.get_cmap("tab10")
    lanes = {prefill_rank: 1, decode_rank: 0}
    request = {prefill_rank: -1, decode_rank: -1}
    for rank, log in logs.items():
        for when, _side, _role, method, what in log:
            x = (when - t0) * 1e3
            if method == "get_num_new_matched_tokens":
                request[rank] += 1
                ax.axvline(x, ymin=0.05 + 0.5 * lanes[rank], ymax=0.45 + 0.5 * lanes[rank], color="gray", lw=0.8)
            if method == ("save_kv_layer" if rank == prefill_rank else "wait_for_layer_load"):
                layer = int(what.split()[-1])
                marker = "s" if rank == prefill_rank else "o"
                ax.scatter(x, lanes[rank], color=colors(request[rank] % 10), marker=marker, s=60, zorder=3)
                ax.annotate(str(layer), (x, lanes[rank] + 0.12), ha="center", fontsize=10)
    ax.set_yticks([1, 0], ["prefill worker\nsave_kv_layer", "decode worker\nwait_for_layer_load"], fontsize=10)
    ax.set_ylim(-0.6, 1.6)
    ax.set_xlabel("milliseconds since the first call (one colour per request, the number is the layer)")
    ax.set_title("Two processes: each layer leaves as soon as it is computed and lands just before its attention")
    fig.tight_layout()
    return fig


def draw_transfer(rows):
    """Bytes moved (whole blocks) and seconds against prompt length: the measured transfer, the
    bandwidth line through it, and recomputing the prompt on the decode side."""
    tokens = [r["tokens"] for r in rows]
    fig, (ax_b, ax_t) = plt.subplots(1, 2, figsize=(12, 4.2))
    ax_b.plot(tokens, [r["bytes"] / 2**20 for r in rows], "o-", label="moved (whole blocks)")
    ax_b.set_xlabel("prompt tokens")
    ax_b.set_ylabel("MiB of KV moved")
    ax_b.set_title("What moves: 2 KiB per token slot, in blocks of 16")
    ax_b.legend(fontsize=10)
    bandwidth = max(r["bytes_per_s"] for r in rows)
    ax_t.plot(tokens, [r["transfer"] * 1e3 for r in rows], "o-", label="transfer (measured)")
    ax_t.plot(tokens, [r["bytes"] / bandwidth * 1e3 for r in rows], "--",
              label=f"bytes / {bandwidth / 1e6:.0f} MB/s (best measured)")  # fmt: skip
    ax_t.plot(tokens, [r["recompute"] * 1e3 for r in rows], "s-", label="recompute on the decode side")
    ax_t.set_xlabel("prompt tokens")
    ax_t.set_ylabel("milliseconds")
    ax_t.set_title("Moving the KV against computing it again")
    ax_t.legend(fontsize=10)
    fig.tight_layout()
    return fig


def draw_overlap(traces: dict, steps: int = 6):
    """Device and scheduler lanes of the first ``steps`` steps, per run (``traces[label] = trace``)."""
    fig, axes = plt.subplots(len(traces), 1, figsize=(12, 1.9 * len(traces) + 1), sharex=True)
    for ax, (label, trace) in zip(axes, traces.items(), strict=True):
        ends = [e for lane, step, what, s, e in trace.timeline if step <= steps]
        for lane, step, what, start, end in trace.timeline:
            if step > steps or start > max(ends):
                continue
            y = 1 if lane == "device" else 0
            color = "tab:blue" if lane == "device" else ("tab:orange" if what.startswith("plan") else "tab:green")
            ax.barh(y, (end - start) * 1e3, left=start * 1e3, color=color, edgecolor="white", height=0.6)
            if lane == "device":
                ax.text((start + end) / 2 * 1e3, y, str(step), ha="center", va="center", fontsize=10, color="white")
        ax.set_yticks([1, 0], ["device", "scheduler"], fontsize=10)
        ax.set_title(label, fontsize=11)
    axes[-1].set_xlabel("milliseconds (device bars: the step number; scheduler: orange = plan and launch, "
                        "green = results)")  # fmt: skip
    fig.suptitle("Overlap: the scheduler plans step N+1 and processes step N-1 while the device runs step N")
    fig.tight_layout()
    return fig


# --- gloo's sharp edges, measured in two processes ----------------------------------------------------------


def gloo_probe(rank: int, world: int, job, timeout: float) -> dict:
    """Rank 0 sends 4 fp32 values, then 2; rank 1 receives the first into an 8-value buffer
    filled with -1 and the second into an int32 buffer."""
    import torch.distributed as dist

    if rank == 0:
        dist.send(torch.tensor([1.0, 2.0, 3.0, 4.0]), 1)
        dist.send(torch.tensor([1.0, 2.0]), 1)
        return {}
    larger = torch.full((8,), -1.0)
    dist.recv(larger, 0)
    other_dtype = torch.zeros(2, dtype=torch.int32)
    dist.recv(other_dtype, 0)
    return {"larger": larger.tolist(), "other_dtype": other_dtype.tolist()}


def gloo_pitfalls(timeout: float = 30.0) -> dict:
    """What rank 1 of :func:`gloo_probe` received (both receives return without an error)."""
    results = run_workers(gloo_probe, [None, None], timeout)
    for r in results:
        if not r.ok:
            raise RuntimeError(f"the gloo probe's rank {r.rank} failed: {r.error}")
    return results[1].value


# --- exercise 1: what a request moves ------------------------------------------------------------------


def kv_transfer_bytes(prompt_tokens, block_size, layers, kv_heads, headdim, itemsize):
    """Bytes a disaggregated request moves and how many of them are padding: whole blocks holding
    every prompt token but the last, keys and values of every layer."""
    sent = prompt_tokens - 1
    slots = -(-sent // block_size) * block_size
    per_slot = layers * 2 * kv_heads * headdim * itemsize
    return slots * per_slot, (slots - sent) * per_slot


def check_kv_transfer_bytes(fn) -> bool | None:
    """Against :func:`kv_transfer_bytes`'s rule on prompts shorter, equal to and one past a block
    boundary, a one-token prompt, and the trained model's shape."""

    def case(label, *args):
        def run(f):
            got = f(*args)
            if not isinstance(got, tuple) or len(got) != 2:
                raise CaseFailed(f"expected a pair (bytes moved, padding bytes), got {got!r}")
            expect_equal("(bytes moved, padding bytes)", kv_transfer_bytes(*args), tuple(int(x) for x in got))

        return label, run

    return run_check(
        "check_kv_transfer_bytes",
        fn,
        [
            case("the trained model, a 20-token prompt", 20, 16, 4, 2, 32, 4),
            case("17 tokens: 16 sent fill one block", 17, 16, 4, 2, 32, 4),
            case("18 tokens: 17 sent need two blocks", 18, 16, 4, 2, 32, 4),
            case("a one-token prompt moves nothing", 1, 16, 4, 2, 32, 4),
            case("Llama-3-8B shape, bf16, 1000 tokens", 1000, 16, 32, 8, 128, 2),
            case("blocks of 1 never pad", 37, 1, 2, 1, 8, 2),
        ],
        "whole blocks of all but the last prompt token, keys and values, every layer",
    )


# --- exercise 2 (bug hunt): a receive into a reused staging buffer -------------------------------------------


class GlooLikeChannel:
    """An in-process channel that receives as gloo was measured to (reference: a receive into a
    larger buffer fills its start and leaves the rest; another dtype of the same byte size is
    reinterpreted; a smaller buffer kills the receiver, here an error). Messages are queued by tag."""

    def __init__(self):
        self.boxes: dict[int, torch.Tensor] = {}
        self.peer, self.timeout = "the prefill side", 1.0

    def put(self, tensor: torch.Tensor, tag: int) -> None:
        self.boxes[tag] = tensor.detach().contiguous().clone()

    def isend(self, tensor, tag):
        raise CaseFailed("receive_layer sends nothing: it only receives")

    def irecv(self, buffer, tag):
        if tag not in self.boxes:
            raise PeerLostError(f"nothing was sent with tag {tag}")
        sent = self.boxes.pop(tag).view(-1).view(torch.uint8)
        room = buffer.view(-1).view(torch.uint8)
        if room.numel() < sent.numel():
            raise RuntimeError(
                f"the receiver was killed: {sent.numel()} bytes arrived for a {room.numel()}-byte buffer"
            )
        room[: sent.numel()] = sent

        class Done:
            done = True

            def wait(self):
                pass

        return Done()


def receive_layer(channel, header, layer, staging):
    """Receive layer ``layer`` of the transfer ``header`` announces and return it as a tensor of
    ``header.payload_shape`` in ``header.dtype``; raise TransferError if its SHA-256 does not match.
    ``staging`` is a large reusable buffer (it may be ignored)."""
    base = tag_base(header.request, header.layers)
    payload = torch.empty(header.payload_shape, dtype=DTYPES[header.dtype])
    check = torch.empty(32, dtype=torch.uint8)
    channel.irecv(payload, base + 1 + 2 * layer).wait()
    channel.irecv(check, base + 2 + 2 * layer).wait()
    if not torch.equal(digest(payload), check):
        raise TransferError(f"layer {layer}: the payload's SHA-256 does not match")
    return payload


def _sent(header: KVHeader, layer: int, payload: torch.Tensor, corrupt: bool = False) -> GlooLikeChannel:
    channel = GlooLikeChannel()
    base = tag_base(header.request, header.layers)
    check = digest(payload)
    channel.put(torch.zeros_like(payload) if corrupt else payload, base + 1 + 2 * layer)
    channel.put(check, base + 2 + 2 * layer)
    return channel


def check_receive_layer(fn) -> bool | None:
    """Transfers smaller than the staging buffer, after a larger one left its values there; a
    bf16 transfer into an fp32 staging buffer; a layer whose bytes were lost on the way."""
    staging = torch.full((2 * 4 * 16 * 2 * 32,), -7.0)

    def header(tokens, dtype="float32", request=3, layers=4):
        return KVHeader(
            request, tokens, layers, -(-tokens // 16), 16, (0, 2), 32, dtype, tuple(range(-(-tokens // 16)))
        )

    def case(label, h, layer, corrupt=False):
        def run(f):
            g = torch.Generator().manual_seed(layer)
            payload = torch.randn(h.payload_shape, generator=g).to(DTYPES[h.dtype])
            channel = _sent(h, layer, payload, corrupt)
            try:
                got = f(channel, h, layer, staging)
            except TransferError:
                if corrupt:
                    return
                raise CaseFailed("TransferError for a payload that arrived intact") from None
            if corrupt:
                raise CaseFailed("the layer arrived as zeros (its SHA-256 differs) and no TransferError was raised")
            if not isinstance(got, torch.Tensor):
                raise CaseFailed(f"expected a tensor, got {type(got).__name__}")
            if got.untyped_storage().data_ptr() == staging.untyped_storage().data_ptr():
                raise CaseFailed("the result is the staging buffer itself: the next receive overwrites it")
            expect_equal("shape", tuple(h.payload_shape), tuple(got.shape))
            expect_equal("dtype", DTYPES[h.dtype], got.dtype)
            expect_equal("values", payload, got)
            if tag_base(h.request, h.layers) + 1 + 2 * layer in channel.boxes:
                raise CaseFailed("the payload was never received")

        return label, run

    return run_check(
        "check_receive_layer",
        fn,
        [
            case("64 tokens of fp32, layer 2 (fills the staging buffer)", header(64), 2),
            case("20 tokens of fp32 after that (2 blocks)", header(20), 0),
            case("20 tokens of bf16", header(20, "bfloat16"), 1),
            case("a layer whose bytes were lost", header(20), 3, corrupt=True),
            case("request 11 of 2 layers", header(33, request=11, layers=2), 1),
        ],
        "buffers of exactly the announced shape and dtype, every layer's SHA-256 checked",
    )


# --- exercise 3 (bug hunt): prefix keys that match across processes --------------------------------------------


def block_key(parent, tokens):
    """Key of a full block of ``tokens`` (ints) whose prefix ends in the block keyed ``parent``
    (bytes, or None for the first block): the same in every process, bytes."""
    h = hashlib.sha256(parent or b"root")
    for t in tokens:
        h.update(int(t).to_bytes(8, "little", signed=True))
    return h.digest()


def keys_in_new_process(fn, cases, hash_seed: int) -> list:
    """``fn(parent, tokens)`` for each case, computed by a new Python process whose string hashes
    are seeded with ``hash_seed`` (as every new process is, with a random seed): the function's
    source runs there, with ``hashlib``, ``struct`` and ``zlib`` imported."""
    source = textwrap.dedent(inspect.getsource(fn))
    program = (
        "import hashlib, struct, sys, zlib\n"
        + source
        + (
            f"\nfor parent, tokens in {cases!r}:\n"
            f"    key = {fn.__name__}(parent, tokens)\n"
            "    print(key.hex() if isinstance(key, bytes) else repr(key))\n"
        )
    )
    env = dict(os.environ, PYTHONHASHSEED=str(hash_seed))
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=env, timeout=60)
    if done.returncode:
        raise CaseFailed(f"in a new process your function raised: {done.stderr.strip().splitlines()[-1]}")
    return done.stdout.split()


def check_block_key(fn) -> bool | None:
    """Keys computed in two new processes with different hash seeds must be equal; a different
    parent or different tokens must give a different key; keys are bytes."""
    first = block_key(None, [1, 2, 3, 4])
    cases = [(None, [1, 2, 3, 4]), (first, [5, 6, 7, 8]), (None, [5, 6, 7, 8])]

    def across_processes(f):
        a, b = keys_in_new_process(f, cases, 1), keys_in_new_process(f, cases, 2)
        if a != b:
            raise CaseFailed(
                "two processes computed different keys for the same blocks (string hashes are seeded per process): "
                f"{a[0][:16]}... and {b[0][:16]}...: every lookup from another process misses"
            )

    def types(f):
        key = f(None, [1, 2, 3, 4])
        if not isinstance(key, bytes):
            raise CaseFailed(f"a key must be bytes, got {type(key).__name__}")

    def chain(f):
        k1 = f(None, [1, 2, 3, 4])
        if f(k1, [5, 6, 7, 8]) == f(None, [5, 6, 7, 8]):
            raise CaseFailed("the same tokens after another prefix got the same key: a block would be reused after "
                             "the wrong prefix (its keys and values were computed seeing other tokens)")  # fmt: skip

    def separate(f):
        if f(None, [1, 23]) == f(None, [12, 3]) or f(None, [1, 2]) == f(None, [1, 2, 0]):
            raise CaseFailed("different token ids gave the same key ([1, 23] and [12, 3], or [1, 2] and [1, 2, 0])")

    return run_check(
        "check_block_key",
        fn,
        [
            ("bytes", types),
            ("a chain over the parent", chain),
            ("token boundaries", separate),
            ("two processes, hash seeds 1 and 2", across_processes),
        ],  # fmt: skip
        "the same key in every process, a different one after another prefix or for other tokens",
    )


# --- exercise 4 (bug hunt): what a launched step reads ---------------------------------------------------------


launch_inputs = _launch_inputs  # the solution is the package's own


def check_launch_inputs(fn) -> bool | None:
    """The values for consecutive and scattered slots, copies that later writes leave alone, and
    overlap scheduling with them: no hazard, the tokens of plain serving."""
    model, _ = charlm.load()

    def cache_with(lengths):
        cache = new_paged_cache(model, 32, 4, max_batch=4)
        for n in lengths:
            slot, _ = cache.add_sequence()
            cache.reserve(slot, n)
        return cache

    def values(label, slots):
        def run(f):
            cache = cache_with([5, 9, 2, 13])
            table, ends = f(cache, slots)
            rows = torch.tensor(slots)
            expect_equal("block-table rows", cache.block_table[rows], table)
            expect_equal("lengths", cache.cache_seqlens[rows], ends)
            cache.reserve(slots[0], 4)  # the scheduler moves on
            cache.free(slots[-1])
            before = cache_with([5, 9, 2, 13])
            expect_equal("lengths after the scheduler wrote the cache", before.cache_seqlens[rows], ends)
            expect_equal("rows after the scheduler wrote the cache", before.block_table[rows], table)

        return label, run

    def served(f):
        prompts = ["def main(argv):\n", "class Cache:\n    def ", "import os\n"]
        want = [Request(charlm.encode(p), 6) for p in prompts]
        serve(model, want, new_paged_cache(model, 32, 4, max_batch=4))
        got = [Request(charlm.encode(p), 6) for p in prompts]
        try:
            serve(model, got, new_paged_cache(model, 32, 4, max_batch=4), overlap=True, inputs=f)
        except HazardError as exc:
            raise CaseFailed(f"overlap scheduling: {exc}") from None
        expect_equal("tokens with overlap", [r.output for r in want], [r.output for r in got])

    return run_check(
        "check_launch_inputs",
        fn,
        [
            values("consecutive slots 0..3", [0, 1, 2, 3]),
            values("slots 2, 0, 3", [2, 0, 3]),
            values("slots 1 and 2", [1, 2]),
            ("serve(overlap=True) with your inputs", served),
        ],  # fmt: skip
        "copies of the rows and lengths; overlapped serving with no hazard and the same tokens",
    )
