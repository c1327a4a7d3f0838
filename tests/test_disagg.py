"""Disaggregated prefill and decode in real processes (gloo over loopback, notebook 12): the same
tokens as one process, what moved, what a fault costs, that nothing leaks and no process outlives
the run. Every run has a short timeout: CI never waits on gloo's 30 minutes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from flashkv_edu import charlm, disagg, workers
from flashkv_edu.speculative import greedy_generate

PROMPTS = ["def main(argv):\n    ", "class KVCache:\n    def __init__(self, ", "import os\nimport sys\n"]
NEW = 12
TIMEOUT = 10.0


@pytest.fixture(scope="module")
def one_process():
    """Greedy tokens of the trained model in this process, each prompt alone."""
    model, _ = charlm.load()
    return [greedy_generate(model, [charlm.encode(p)], NEW)[0][0] for p in PROMPTS]


@pytest.fixture(autouse=True)
def _no_process_outlives_a_test():
    before = set(os.listdir("/proc")) if os.path.isdir("/proc") else set()
    yield
    import multiprocessing

    assert not multiprocessing.active_children()
    assert not [p for p in _worker_pids() if p not in before]


def _worker_pids() -> list[str]:
    """Processes started by run_workers still alive (Linux: /proc/<pid>/cmdline names multiprocessing)."""
    found = []
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read()
                with open(f"/proc/{pid}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if ppid == os.getpid() and b"multiprocessing" in cmd and b"resource_tracker" not in cmd:
                found.append(pid)
    return found


def _moved_bytes(prompt: str) -> int:
    """Whole blocks of 16 covering all but the last prompt token, 4 layers, keys and values, 2 KV
    heads of 32 fp32 values."""
    return -(-(len(charlm.encode(prompt)) - 1) // 16) * 16 * 4 * 2 * 2 * 32 * 4


@pytest.mark.parametrize(
    ("prefill", "decode", "tp"), [(1, 1, 1), (1, 2, 1), (1, 1, 2)], ids=["1+1", "1+2", "tensor-parallel-2"]
)
def test_disaggregated_tokens_equal_one_process(prefill, decode, tp, one_process):
    """Tokens identical to one process; the bytes moved are the prompt's KV less its last token,
    in whole blocks; no block leaks on either side; with tensor parallelism every rank holds half
    the KV heads, so half the cache bytes of a rank with all of them, and the bytes moved add up."""
    result = disagg.disaggregate(
        PROMPTS, NEW, prefill_workers=prefill, decode_workers=decode, tensor_parallel=tp, timeout=TIMEOUT
    )
    assert result.tokens == one_process
    assert result.recomputed == [False] * 3 and not result.errors
    assert result.kv_bytes == [_moved_bytes(p) for p in PROMPTS]
    assert set(result.leaked_blocks.values()) == {0} and len(result.leaked_blocks) == prefill + decode * tp
    assert max(result.transfer_seconds) < TIMEOUT
    if tp == 2:
        decode_ranks = [r for r, role in result.roles.items() if role == "decode"]
        local = disagg.disaggregate(PROMPTS, NEW, local=True)
        assert {result.cache_bytes[r] for r in decode_ranks} == {local.cache_bytes[1] // 2}


@pytest.mark.parametrize("fault", ["kill-prefill", "kill-decode", "drop-transfer", "stall-prefill"])
def test_a_fault_is_detected_in_bounded_time_and_the_request_recomputed(fault, one_process):
    """A worker that dies, a transfer whose bytes are lost, a worker that stops answering: found
    within the timeout, the affected requests recomputed (by the decode worker, or here when the
    decode worker died), the tokens still one process's, no block leaked by a worker that lived."""
    started = time.perf_counter()
    result = disagg.disaggregate(PROMPTS[:2], NEW, fault=fault, timeout=3.0)
    took = time.perf_counter() - started
    assert result.tokens == one_process[:2]
    assert result.recomputed[0], result
    if fault == "drop-transfer":
        assert result.recomputed == [True, False] and not result.errors
    else:
        assert result.errors, "the fault is reported"
    assert set(result.leaked_blocks.values()) <= {0}
    assert took < 3.0 * 4 + 10, f"{fault}: {took:.1f} s"


def test_a_prefix_computed_by_one_process_is_reused_by_another(tmp_path, one_process):
    """Prefill workers keep full prompt blocks on the disk tier under SHA-256 chain keys: the
    processes of a second run find the blocks the first run's processes wrote."""
    prompts = [PROMPTS[1] * 2, PROMPTS[1] * 2 + "x"]
    first = disagg.disaggregate(prompts, 4, store=tmp_path, timeout=TIMEOUT)
    second = disagg.disaggregate(prompts, 4, store=tmp_path, timeout=TIMEOUT)
    assert first.prefix_hit_tokens[0] == 0
    n = len(charlm.encode(prompts[0]))
    assert second.prefix_hit_tokens == [(n - 1) // 16 * 16] * 2
    assert second.outputs == first.outputs and second.recomputed == [False, False]


def test_run_workers_reports_every_worker_and_ends_every_process():
    """A worker that raises, one that exits, and one that returns: each reported as such."""
    results = workers.run_workers(_probe, ["ok", "raise", "exit"], timeout=5.0)
    assert [r.ok for r in results] == [True, False, False]
    assert results[0].value == 3 and "ValueError: planted" in results[1].error
    assert "exited with code 5" in results[2].error and results[2].exitcode == 5
    for r in results:
        with pytest.raises(ProcessLookupError):
            os.kill(r.pid, 0)


def _probe(rank, world, job, timeout):
    import torch.distributed as dist

    if job == "raise":
        raise ValueError("planted")
    if job == "exit":
        os._exit(5)
    return dist.get_world_size()


def test_the_command_prints_each_output_and_writes_the_json(tmp_path, one_process):
    out = tmp_path / "run.json"
    args = ["--prompt", PROMPTS[0], "--prompt", PROMPTS[2], "--max-new-tokens", str(NEW), "--decode-workers", "2"]
    done = subprocess.run(
        [sys.executable, "-m", "flashkv_edu.disagg", *args, "--timeout", "10", "--json", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    record = json.loads(out.read_text())
    assert set(record) == {"outputs", "kv_bytes", "transfer_seconds", "prefix_hit_tokens", "recomputed"}
    assert record["outputs"] == [charlm.decode(one_process[0]), charlm.decode(one_process[2])]
    assert record["kv_bytes"] == [_moved_bytes(PROMPTS[0]), _moved_bytes(PROMPTS[2])]
    assert record["recomputed"] == [False, False] and record["prefix_hit_tokens"] == [0, 0]
    assert repr(record["outputs"][0]) in done.stdout
