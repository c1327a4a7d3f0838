"""Tensor-parallel attention over a split KV cache (notebook 12).

With ``T`` ranks, rank ``r`` keeps KV heads ``r * h_k / T`` to ``(r + 1) * h_k / T - 1`` of every
layer in its own paged cache, and the query heads that read them (query head ``h`` reads KV head
``h // (h / h_k)``, so a contiguous range of KV heads is read by a contiguous range of query
heads). Each rank attends over its heads only; the outputs of all ranks are gathered (an
all-gather over the tensor-parallel group) before the output projection, so every rank continues
with every head's output, exactly what one process computes. Only the cache and the attention are
split here: the projections and the MLP run whole on every rank (Megatron-style splitting of the
weights would split them too).
"""

from __future__ import annotations

import datetime

import torch

from .steps import LayerHooks
from .transfer import PeerLostError, TransferError
from .validation import ArgumentError, check_int, check_positive

__all__ = ["ShardHooks", "agree", "head_range"]


def head_range(nheads: int, rank: int, world: int) -> tuple[int, int]:
    """Heads ``[start, stop)`` of ``nheads`` that rank ``rank`` of ``world`` holds."""
    nheads = check_int("nheads", nheads, low=1)
    world = check_int("world", world, low=1)
    rank = check_int("rank", rank, low=0)
    if nheads % world:
        raise ArgumentError(f"tensor parallel: {world} ranks cannot split {nheads} heads evenly")
    if rank >= world:
        raise ArgumentError(f"rank must be below world ({world}), got {rank}")
    per = nheads // world
    return rank * per, (rank + 1) * per


def agree(value: int, group, timeout: float) -> int:
    """The smallest ``value`` over the ranks of ``group`` (all-reduce MIN, ``timeout`` seconds at
    most): how ranks that must act alike (load a transfer, or recompute) decide together."""
    import torch.distributed as dist

    t = torch.tensor([int(value)], dtype=torch.int64)
    work = dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group, async_op=True)
    try:
        work.wait(datetime.timedelta(seconds=timeout))
    except RuntimeError as exc:
        raise PeerLostError(f"the tensor-parallel ranks did not agree within {timeout} s: {exc}") from None
    return int(t[0])


class ShardHooks(LayerHooks):
    """Rank ``rank`` of a tensor-parallel ``group`` of ``world`` ranks: attends with its query and
    KV heads (:func:`head_range`) and gathers every rank's output (``timeout`` seconds at most).
    ``inner``: the hooks to run as well (a connector's loads and saves)."""

    def __init__(self, rank: int, world: int, nheads: int, nheads_k: int, group=None, timeout: float = 60.0,
                 inner: LayerHooks | None = None):  # fmt: skip
        self.rank, self.world, self.group = rank, world, group
        self.q_heads = head_range(nheads, rank, world)
        self.kv_heads = head_range(nheads_k, rank, world)
        self.timeout = check_positive("timeout", timeout)
        self.inner = inner or LayerHooks()

    def before(self, layer: int) -> None:
        """The inner hooks' ``before`` (a layer's load), then, with several ranks, an agreement:
        if any rank's load failed, every rank raises (they recompute together)."""
        failure = None
        try:
            self.inner.before(layer)
        except (PeerLostError, TransferError) as exc:
            failure = exc
        if self.world > 1 and not agree(failure is None, self.group, self.timeout):
            raise failure or TransferError(f"layer {layer}: another tensor-parallel rank's transfer failed")
        if failure is not None:
            raise failure

    def after(self, layer: int) -> None:
        self.inner.after(layer)

    def shard(self, q, k, v):
        (q0, q1), (k0, k1) = self.q_heads, self.kv_heads
        return q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1]

    def gather(self, out):
        if self.world == 1:
            return out
        import torch.distributed as dist

        out = out.contiguous()
        parts = [torch.empty_like(out) for _ in range(self.world)]
        work = dist.all_gather(parts, out, group=self.group, async_op=True)
        try:
            work.wait(datetime.timedelta(seconds=self.timeout))
        except RuntimeError as exc:
            raise PeerLostError(
                f"the tensor-parallel all-gather did not complete within {self.timeout} s: {exc}"
            ) from None
        return torch.cat(parts, dim=2)
