"""Disaggregated prefill and decode between processes (notebook 12).

    python -m flashkv_edu.disagg --prompt "def main(" --prompt "class Cache:" --max-new-tokens 32 \\
        --prefill-workers 1 --decode-workers 2 --tensor-parallel 1 --store DIR --json out.json

Prefill workers and decode workers are separate OS processes in one ``torch.distributed`` group
(:mod:`flashkv_edu.workers`), each with the trained model and its own paged cache. Request ``i``
is prefilled by prefill worker ``i % P`` and decoded by decode worker ``i % D`` (a group of ``T``
ranks with tensor parallelism, each holding ``h_k / T`` KV heads). The prefill worker computes
the prompt's keys and values into its blocks and sends all but the last token's, layer by layer
while the next layer computes (:class:`~flashkv_edu.connector.KVConnector`, vLLM's call order);
the decode worker allocates its own blocks, receives into them, checks every layer's SHA-256,
computes the last prompt token and generates.

Whole blocks move: a request's ``ceil((n - 1) / block_size)`` blocks per layer, keys and values,
the last block's unused slots included (the padding, reported apart). A transfer that fails (the
peer died or stopped answering within ``timeout`` seconds, or a digest did not match) is
recomputed by the decode worker; a request whose decode worker died is recomputed by this
process. With ``store``, prefill workers keep full prompt blocks on notebook 11's disk tier under
SHA-256 keys: another process reuses a prefix one of them computed.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import charlm
from .cli import dir_to_create, file_to_write, float_in, int_in
from .connector import CallLog, ConnectorHooks, KVConnector, TransferRequest
from .offload import TieredStore
from .paged import PagedKVCache
from .serving import Request, serve
from .steps import new_paged_cache, paged_step, plan_step, run_step
from .tensor_parallel import ShardHooks, agree, head_range
from .transfer import GroupChannel, LocalChannel, PeerLostError, TransferError
from .validation import ArgumentError, check_bool, check_int, check_positive
from .workers import DEFAULT_TIMEOUT, WorkerResult, run_workers

__all__ = ["FAULTS", "DisaggResult", "disaggregate", "main", "worker"]

FAULTS = ("none", "kill-prefill", "kill-decode", "drop-transfer", "stall-prefill")
"""``kill-prefill``: the first prefill worker dies after sending layer 0 of its first request;
``kill-decode``: the first decode worker dies after reading its first request's header;
``drop-transfer``: the first request's layer 0 arrives with its bytes lost (zeros);
``stall-prefill``: the first prefill worker stops answering after sending layer 0 (it sleeps
until it is killed)."""
KILLED_EXIT = 17


@dataclass
class DisaggResult:
    """Per prompt: the generated ``outputs`` (text) and ``tokens``; ``kv_bytes`` moved (whole
    blocks, all layers, keys and values; 0 when nothing arrived), of which ``padding_bytes`` fill
    the last blocks' unused slots; ``transfer_seconds`` (decode side: from asking for the header
    to the last layer landed); ``prefix_hit_tokens`` (found in the store); ``recomputed`` (the
    transfer failed, or its decode worker died, and the prompt was computed again). Per rank:
    ``errors`` (what a worker reported), ``leaked_blocks`` (blocks not back in its pool at the
    end), ``cache_bytes`` (its pools), ``logs`` (its connector calls)."""

    outputs: list[str]
    tokens: list[list[int]]
    kv_bytes: list[int]
    padding_bytes: list[int]
    transfer_seconds: list[float]
    prefix_hit_tokens: list[int]
    recomputed: list[bool]
    errors: dict = field(default_factory=dict)
    leaked_blocks: dict = field(default_factory=dict)
    cache_bytes: dict = field(default_factory=dict)
    logs: dict = field(default_factory=dict)
    roles: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """The ``--json`` record."""
        keys = ("outputs", "kv_bytes", "transfer_seconds", "prefix_hit_tokens", "recomputed")
        return {k: v for k, v in asdict(self).items() if k in keys}


def _plan(n: int, prefill: int, decode: int, tp: int) -> dict:
    """Ranks: prefill workers ``0 .. P-1``, then ``D`` decode groups of ``T`` ranks."""
    groups = [[prefill + d * tp + t for t in range(tp)] for d in range(decode)]
    return {
        "prefill_rank": [i % prefill for i in range(n)],
        "decode_group": [groups[i % decode] for i in range(n)],
        "groups": groups,
    }


def disaggregate(
    prompts,
    max_new_tokens: int = 32,
    *,
    prefill_workers: int = 1,
    decode_workers: int = 1,
    tensor_parallel: int = 1,
    store=None,
    fault: str = "none",
    timeout: float = DEFAULT_TIMEOUT,
    block_size: int = 16,
    local: bool = False,
) -> DisaggResult:
    """Generate greedily for ``prompts`` (texts) with the trained model, prefill and decode in
    separate processes (module docstring). Checks everything before starting a process.
    ``local=True`` runs the same workers' code in this process, one after the other, over
    in-process channels (no tensor parallelism, no faults): the connector's calls without the
    processes' start-up time."""
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not prompts:
        raise ArgumentError(f"prompts must be a non-empty list of texts, got {prompts!r}")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p:
            raise ArgumentError(f"prompts[{i}] must be a non-empty text, got {p!r}")
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, low=1)
    prefill_workers = check_int("prefill_workers", prefill_workers, low=1, high=8)
    decode_workers = check_int("decode_workers", decode_workers, low=1, high=8)
    tensor_parallel = check_int("tensor_parallel", tensor_parallel, low=1)
    block_size = check_int("block_size", block_size, low=1)
    timeout = check_positive("timeout", timeout)
    if fault not in FAULTS:
        raise ArgumentError(f"fault must be one of {FAULTS}, got {fault!r}")
    local = check_bool("local", local)
    if local and (tensor_parallel > 1 or fault != "none"):
        raise ArgumentError("local=True runs without processes: tensor_parallel must be 1 and fault 'none'")
    cfg = charlm.CONFIG
    head_range(cfg.n_kv_heads, 0, tensor_parallel)  # T must split the KV heads
    if store is not None and not isinstance(store, (str, os.PathLike)):
        raise ArgumentError(f"store must be a directory path, got {store!r}")
    ids = [charlm.encode(p) for p in prompts]
    longest = max(len(t) for t in ids) + max_new_tokens
    if longest > cfg.max_seqlen:
        raise ArgumentError(f"a prompt plus max_new_tokens takes {longest} positions; the model has {cfg.max_seqlen}")
    plan = _plan(len(ids), prefill_workers, decode_workers, tensor_parallel)
    common = dict(prompts=ids, max_new_tokens=max_new_tokens, block_size=block_size, tp=tensor_parallel,
                  fault=fault, store=None if store is None else str(store), **plan)  # fmt: skip
    jobs = [dict(common, role="prefill", requests=[i for i in range(len(ids)) if plan["prefill_rank"][i] == r])
            for r in range(prefill_workers)]  # fmt: skip
    for d, ranks in enumerate(plan["groups"]):
        mine = [i for i in range(len(ids)) if plan["decode_group"][i] == ranks]
        jobs += [dict(common, role="decode", requests=mine, tp_rank=t, first_decode=d == 0) for t in range(len(ranks))]
    if local:
        results = _run_locally(jobs, timeout)
    else:
        results = run_workers(worker, jobs, timeout)
    return _gather(ids, max_new_tokens, plan, jobs, results)


def _run_locally(jobs: list[dict], timeout: float) -> list[WorkerResult]:
    """The workers' code in this process, one after the other over in-process channels: every
    prefill worker first (its sends do not wait), then every decode worker."""
    model, _ = charlm.load()
    pairs: dict[tuple[int, int], LocalChannel] = {}

    def channel_of(me: int):
        def channel(peer: int) -> LocalChannel:
            if (me, peer) not in pairs:
                pairs[(me, peer)], pairs[(peer, me)] = LocalChannel.pair(timeout, f"rank {peer}", f"rank {me}")
            return pairs[(me, peer)]

        return channel

    results = []
    for rank, job in enumerate(jobs):
        run = _prefill_worker if job["role"] == "prefill" else _decode_worker
        results.append(WorkerResult(rank, run(model, job, timeout, channel_of(rank))))
    return results


def _gather(ids, max_new_tokens, plan, jobs, results) -> DisaggResult:
    """Per prompt, what its decode group generated; prompts whose decode group failed are
    recomputed here."""
    n = len(ids)
    out = DisaggResult(["" for _ in ids], [[] for _ in ids], [0] * n, [0] * n, [0.0] * n, [0] * n, [False] * n)
    for r in results:
        out.roles[r.rank] = jobs[r.rank]["role"]
        if not r.ok:
            out.errors[r.rank] = r.error
            continue
        out.leaked_blocks[r.rank] = r.value["num_blocks"] - r.value["free_blocks"]
        out.cache_bytes[r.rank] = r.value["cache_bytes"]
        out.logs[r.rank] = r.value["log"]
        for i, rec in r.value["requests"].items():
            if jobs[r.rank]["role"] == "prefill":
                out.prefix_hit_tokens[i] = rec["hit_tokens"]
                if rec.get("error"):
                    out.errors.setdefault(r.rank, rec["error"])
    for i in range(n):
        group = [results[rank] for rank in plan["decode_group"][i]]
        if all(g.ok for g in group):
            recs = [g.value["requests"][i] for g in group]
            if any(rec["tokens"] != recs[0]["tokens"] for rec in recs):
                raise RuntimeError(f"request {i}: the tensor-parallel ranks generated different tokens")
            out.tokens[i] = recs[0]["tokens"]
            out.recomputed[i] = recs[0]["recomputed"]
            out.kv_bytes[i] = sum(rec["bytes"] for rec in recs)
            out.padding_bytes[i] = sum(rec["padding_bytes"] for rec in recs)
            out.transfer_seconds[i] = max(rec["seconds"] for rec in recs)
        else:
            out.tokens[i] = _recompute(ids[i], max_new_tokens)
            out.recomputed[i] = True
    out.outputs = [charlm.decode(t) for t in out.tokens]
    return out


def _recompute(prompt: list[int], max_new_tokens: int) -> list[int]:
    """The prompt generated in this process (its decode worker died)."""
    model, _ = charlm.load()
    request = Request(prompt, max_new_tokens)
    cache = new_paged_cache(model, -(-(len(prompt) + max_new_tokens) // 16) + 1, 16, max_batch=1)
    serve(model, [request], cache)
    return request.output


def worker(rank: int, world: int, job: dict, timeout: float) -> dict:
    """One worker process (started by :func:`disaggregate` through ``run_workers``)."""
    import torch.distributed as dist

    groups = {}
    if job["tp"] > 1:  # every rank creates every group, in the same order
        import datetime

        for ranks in job["groups"]:
            groups[tuple(ranks)] = dist.new_group(ranks, timeout=datetime.timedelta(seconds=timeout))
    model, _ = charlm.load()
    channel = lambda peer: GroupChannel(peer, timeout)  # noqa: E731
    if job["role"] == "prefill":
        return _prefill_worker(model, job, timeout, channel)
    ranks = next(r for r in job["groups"] if rank in r)
    return _decode_worker(model, job, timeout, channel, groups.get(tuple(ranks)))


def _pool_bytes(cache: PagedKVCache) -> int:
    return sum(p.numel() * p.element_size() for p in cache.pools)


def _report(cache: PagedKVCache, log: CallLog, requests: dict) -> dict:
    return dict(requests=requests, log=list(log), num_blocks=cache.allocator.num_blocks,
                free_blocks=cache.allocator.num_free, cache_bytes=_pool_bytes(cache))  # fmt: skip


class _Fault(ConnectorHooks):
    """The connector's hooks, and the prefill worker dying (``kill``) or stopping to answer after
    sending layer 0 (fault injection)."""

    def __init__(self, worker: KVConnector, kill: bool):
        super().__init__(worker)
        self.kill = kill

    def after(self, layer: int) -> None:
        super().after(layer)
        if layer == 0:
            self.worker.wait_for_save()  # layer 0 is on its way
            if self.kill:
                os._exit(KILLED_EXIT)
            while True:  # stopped answering: killed by run_workers once the others are done
                time.sleep(1)


def _prefill_worker(model, job: dict, timeout: float, channel) -> dict:
    """Prefill each of ``job["requests"]`` and push its KV to its decode group."""
    cfg = model.cfg
    longest = max(len(job["prompts"][i]) for i in job["requests"]) if job["requests"] else 1
    cache = new_paged_cache(model, -(-longest // job["block_size"]) + 1, job["block_size"], max_batch=1)
    if job["store"]:
        cache.attach_store(TieredStore.for_cache(cache, host_blocks=1, disk_dir=job["store"]))
    log = CallLog()
    sched, work = KVConnector("prefill", "scheduler", cache, log), KVConnector("prefill", "worker", cache, log)
    done = {}
    for k, i in enumerate(job["requests"]):
        prompt, group = job["prompts"][i], job["decode_group"][i]
        peers = [(channel(dr), head_range(cfg.n_kv_heads, t, len(group))) for t, dr in enumerate(group)]
        request = TransferRequest(i, prompt, peers)
        first = k == 0 and job["prefill_rank"][i] == 0
        if first and job["fault"] == "drop-transfer":
            work.corrupt.add(i)
        stop = first and job["fault"] in ("kill-prefill", "stall-prefill")
        hooks = _Fault(work, job["fault"] == "kill-prefill") if stop else ConnectorHooks(work)
        sched.get_num_new_matched_tokens(request, 0)
        slot, cached = cache.add_sequence(prompt)
        planned = plan_step(model, cache, [slot], [prompt[cached:]], hooks=hooks)
        blocks = list(cache.seqs[slot].blocks)
        sched.update_state_after_alloc(request, blocks, 0)
        work.bind_connector_metadata(sched.build_connector_meta())
        work.start_load_kv()
        logits = run_step(planned)
        work.wait_for_save()
        work.get_finished({i})
        work.clear_connector_metadata()
        sched.request_finished(request, blocks)
        if job["store"]:
            cache.persist()
        cache.free(slot)
        done[i] = dict(hit_tokens=cached, first_token=int(logits[0].argmax()), bytes=work.moved.get(i, 0),
                       error=work.errors.get(i))  # fmt: skip
    return _report(cache, log, done)


def _decode_worker(model, job: dict, timeout: float, channel, group=None) -> dict:
    """Load each of ``job["requests"]`` from its prefill worker (or recompute it), then generate."""
    cfg, t, tp = model.cfg, job.get("tp_rank", 0), job["tp"]
    mine = job["requests"]
    longest = max((len(job["prompts"][i]) for i in mine), default=1) + job["max_new_tokens"]
    per_seq = -(-longest // job["block_size"])
    cache = PagedKVCache(
        per_seq * max(len(mine), 1), job["block_size"], cfg.n_kv_heads // tp, cfg.headdim, max_batch=max(len(mine), 1),
        max_blocks_per_seq=per_seq, dtype=model.head.weight.dtype, num_layers=cfg.n_layers, prefix_caching=False,
    )  # fmt: skip
    log = CallLog()
    sched, work = KVConnector("decode", "scheduler", cache, log), KVConnector("decode", "worker", cache, log)
    plain = ShardHooks(t, tp, cfg.n_heads, cfg.n_kv_heads, group, timeout)
    done, slots = {}, {}
    for k, i in enumerate(mine):
        prompt = job["prompts"][i]
        request = TransferRequest(i, prompt, [(channel(job["prefill_rank"][i]), None)])
        start = time.perf_counter()
        matched, _ = sched.get_num_new_matched_tokens(request, 0)
        if k == 0 and job["first_decode"] and t == 0 and job["fault"] == "kill-decode":
            os._exit(KILLED_EXIT)
        agreed = agree(matched, group, timeout) if tp > 1 else matched  # every rank loads, or none
        if agreed != matched:
            sched.headers.pop(i)[1].abandon()
            matched = agreed
        slot, _ = cache.add_sequence()
        if matched:
            cache.reserve(slot, matched, prompt[:matched])
        sched.update_state_after_alloc(request, list(cache.seqs[slot].blocks), matched)
        work.bind_connector_metadata(sched.build_connector_meta())
        work.start_load_kv()
        hooks = ShardHooks(t, tp, cfg.n_heads, cfg.n_kv_heads, group, timeout, inner=ConnectorHooks(work))
        recomputed = matched == 0 and len(prompt) > 1  # a one-token prompt has nothing to move
        try:
            logits = paged_step(model, cache, [slot], [prompt[matched:]], hooks=hooks)
        except (PeerLostError, TransferError):
            cache.free(slot)
            slot, _ = cache.add_sequence()
            logits = paged_step(model, cache, [slot], [prompt], hooks=plain)
            recomputed = True
        seconds = time.perf_counter() - start
        work.wait_for_save()
        work.get_finished({i})
        work.clear_connector_metadata()
        sched.request_finished(request, list(cache.seqs[slot].blocks))
        moved, slots_sent = work.moved.get(i, 0), -(-matched // job["block_size"]) * job["block_size"]
        padding = moved // slots_sent * (slots_sent - matched) if matched and not recomputed else 0
        done[i] = dict(tokens=[int(logits[0].argmax())], recomputed=recomputed, bytes=moved,
                       padding_bytes=padding, seconds=seconds, error=work.errors.get(i))  # fmt: skip
        slots[i] = slot
    for _ in range(job["max_new_tokens"] - 1):
        if not mine:
            break
        logits = paged_step(
            model, cache, [slots[i] for i in mine], [[done[i]["tokens"][-1]] for i in mine], hooks=plain
        )
        for i, row in zip(mine, logits, strict=True):
            done[i]["tokens"].append(int(row.argmax()))
    for i in mine:
        cache.free(slots[i])
    return _report(cache, log, done)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flashkv_edu.disagg",
        description="Generate with the trained model, prefill and decode in separate processes (notebook 12).",
    )
    parser.add_argument("--prompt", action="append", default=None, help="a prompt (repeat for several)")
    parser.add_argument("--max-new-tokens", type=int_in(1, 512), default=32)
    parser.add_argument("--prefill-workers", type=int_in(1, 8), default=1)
    parser.add_argument("--decode-workers", type=int_in(1, 8), default=1)
    parser.add_argument(
        "--tensor-parallel",
        type=int_in(1, charlm.CONFIG.n_kv_heads),
        default=1,
        help=f"ranks per decode worker, each holding h_k / T of the {charlm.CONFIG.n_kv_heads} KV heads",
    )
    parser.add_argument(
        "--store",
        type=dir_to_create,
        default=None,
        help="a directory of prefix blocks shared by the prefill workers (and later runs)",
    )
    parser.add_argument("--fault", choices=FAULTS, default="none")
    parser.add_argument("--timeout", type=float_in(0, 3600), default=DEFAULT_TIMEOUT, help="seconds any wait may take")
    parser.add_argument("--json", type=file_to_write, default=None, help="write the results here")
    args = parser.parse_args(argv)  # fmt: skip
    prompts = args.prompt or ["def main(argv):\n    ", "class KVCache:\n    def "]
    if any(not p for p in prompts):
        parser.error("--prompt must not be empty")
    if charlm.CONFIG.n_kv_heads % args.tensor_parallel:
        parser.error(f"--tensor-parallel must divide the model's {charlm.CONFIG.n_kv_heads} KV heads")
    longest = max(len(charlm.encode(p)) for p in prompts) + args.max_new_tokens
    if longest > charlm.CONFIG.max_seqlen:
        parser.error(
            f"a prompt plus --max-new-tokens takes {longest} positions; the model has {charlm.CONFIG.max_seqlen}"
        )
    started = time.perf_counter()
    result = disaggregate(
        prompts, args.max_new_tokens, prefill_workers=args.prefill_workers, decode_workers=args.decode_workers,
        tensor_parallel=args.tensor_parallel, store=args.store, fault=args.fault, timeout=args.timeout,
    )  # fmt: skip
    for i, prompt in enumerate(prompts):
        how = "recomputed" if result.recomputed[i] else f"{result.kv_bytes[i]} bytes of KV moved"
        hit = f", {result.prefix_hit_tokens[i]} prompt tokens from the store" if result.prefix_hit_tokens[i] else ""
        print(f"[{i}] {prompt!r} -> {result.outputs[i]!r}  ({how}{hit})")
    for rank, error in sorted(result.errors.items()):
        print(f"rank {rank} ({result.roles.get(rank)}): {error}")
    print(f"{len(prompts)} prompts in {time.perf_counter() - started:.1f} s")
    if args.json is not None:
        Path(args.json).write_text(json.dumps(result.summary(), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
