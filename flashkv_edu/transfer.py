"""A sequence's KV blocks moved between processes (notebook 12): a header first, then the blocks,
layer by layer, each layer followed by its SHA-256.

One request's transfer is ``1 + 2 * layers`` point-to-point messages, each with its own tag:

* the header, :data:`HEADER_BYTES` bytes of JSON (:class:`KVHeader`: which request, how many
  tokens, the payload's shape and dtype, which KV heads, the sender's block ids);
* per layer, the payload ``(2, blocks, block_size, heads, headdim)`` (keys, then values, of whole
  blocks: the last one may be partly filled, and its padding moves too), then its digest.

The receiver allocates exactly what the header announces and checks every layer's digest before
it lands in its cache: gloo fills a larger buffer partly, and reinterprets another dtype of the
same size, without an error. Every wait has a timeout; a peer that died or stopped answering
raises :class:`PeerLostError` naming it.

Transports (:class:`Channel`): :class:`GroupChannel` over ``torch.distributed`` (gloo on a CPU,
NCCL with CUDA), and :class:`LocalChannel`, an in-process pair for tests and demonstrations.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import queue
from dataclasses import asdict, dataclass

import torch

from .paged import PagedKVCache
from .validation import ArgumentError, ArgumentTypeError, check_int, check_positive

__all__ = [
    "DIGEST_BYTES",
    "DTYPES",
    "HEADER_BYTES",
    "MAGIC",
    "Channel",
    "GroupChannel",
    "KVHeader",
    "KVReceiver",
    "KVSender",
    "LocalChannel",
    "PeerLostError",
    "TransferError",
    "check_fits",
    "digest",
    "header_for",
    "pack_layer",
    "tag_base",
    "unpack_layer",
]

MAGIC = "flashkv-kv/1"
HEADER_BYTES = 4096
DIGEST_BYTES = 32
ORPHANS: list = []  # receives given up on: their buffers stay alive while the transport may write them
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class PeerLostError(RuntimeError):
    """The peer died (its connection closed) or did not answer within the timeout."""


class TransferError(RuntimeError):
    """What arrived is not what was announced: a bad header or a digest that does not match."""


@dataclass(frozen=True)
class KVHeader:
    """What one request's transfer holds: the keys and values of its first ``tokens`` tokens in
    ``blocks`` whole blocks of ``block_size``, for ``layers`` layers, KV heads ``heads[0]`` to
    ``heads[1] - 1`` of the sender's cache, ``headdim`` wide, in ``dtype``."""

    request: int
    tokens: int
    layers: int
    blocks: int
    block_size: int
    heads: tuple[int, int]
    headdim: int
    dtype: str
    src_blocks: tuple[int, ...]

    @property
    def payload_shape(self) -> tuple[int, ...]:
        return (2, self.blocks, self.block_size, self.heads[1] - self.heads[0], self.headdim)

    @property
    def layer_bytes(self) -> int:
        n = 1
        for size in self.payload_shape:
            n *= size
        return n * DTYPES[self.dtype].itemsize

    @property
    def total_bytes(self) -> int:
        """Payload bytes of all layers (whole blocks), headers and digests left out."""
        return self.layers * self.layer_bytes

    @property
    def token_bytes(self) -> int:
        """The bytes the ``tokens`` tokens' keys and values take (no block padding)."""
        return self.total_bytes // (self.blocks * self.block_size) * self.tokens

    def encode(self) -> torch.Tensor:
        """The header as :data:`HEADER_BYTES` uint8 (JSON, padded with spaces)."""
        text = json.dumps({"magic": MAGIC, **asdict(self)}).encode()
        if len(text) > HEADER_BYTES:
            raise ArgumentError(f"the header takes {len(text)} bytes, more than {HEADER_BYTES}")
        return torch.frombuffer(bytearray(text.ljust(HEADER_BYTES)), dtype=torch.uint8)

    @classmethod
    def decode(cls, data: torch.Tensor) -> KVHeader:
        """Parse :meth:`encode`'s bytes; :class:`TransferError` if they are not a header."""
        try:
            fields = json.loads(bytes(data.numpy()).decode())
            if fields.pop("magic") != MAGIC:
                raise ValueError("not a flashkv_edu KV header")
            fields["heads"] = tuple(fields["heads"])
            fields["src_blocks"] = tuple(fields["src_blocks"])
            header = cls(**fields)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise TransferError(f"the header could not be read: {exc}") from None
        ints = [header.request, header.tokens, header.layers, header.blocks, header.block_size, header.headdim]
        if not all(isinstance(i, int) and i >= 0 for i in ints + list(header.heads)) or header.dtype not in DTYPES:
            raise TransferError(f"the header holds impossible values: {header}")
        if not 0 < header.tokens <= header.blocks * header.block_size or header.heads[1] <= header.heads[0]:
            raise TransferError(f"the header holds impossible values: {header}")
        return header


def tag_base(request: int, layers: int) -> int:
    """The tag of request ``request``'s header; its layer ``l`` payload is ``+ 1 + 2 l``, the
    digest ``+ 2 + 2 l``. Tags keep the messages of different requests apart."""
    return request * (2 * layers + 1)


def digest(t: torch.Tensor) -> torch.Tensor:
    """SHA-256 of a tensor's bytes, as 32 uint8."""
    data = t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
    return torch.frombuffer(bytearray(hashlib.sha256(data).digest()), dtype=torch.uint8)


def header_for(cache: PagedKVCache, blocks, request: int, tokens: int, heads=None) -> KVHeader:
    """The header of sending the first ``tokens`` tokens held in ``blocks`` (a sequence's blocks,
    in order) of ``cache``: KV heads ``heads`` (``(start, stop)``, default all)."""
    tokens = check_int("tokens", tokens, low=1)
    blocks = [check_int("blocks[i]", b, low=0) for b in blocks]
    needed = -(-tokens // cache.block_size)
    if needed > len(blocks):
        raise ArgumentError(f"tokens: {tokens} tokens take {needed} blocks of {cache.block_size}, got {len(blocks)}")
    nheads = cache.k_pools[0].shape[2]
    heads = (0, nheads) if heads is None else (int(heads[0]), int(heads[1]))
    if not 0 <= heads[0] < heads[1] <= nheads:
        raise ArgumentError(f"heads must be a range within the cache's {nheads} KV heads, got {heads}")
    dtype = str(cache.k_pools[0].dtype).removeprefix("torch.")
    return KVHeader(
        request, tokens, cache.num_layers, needed, cache.block_size, heads, cache.k_pools[0].shape[3], dtype,
        tuple(blocks[:needed]),
    )  # fmt: skip


def check_fits(header: KVHeader, cache: PagedKVCache, max_tokens: int) -> None:
    """Whether ``header``'s payload fits ``cache`` (layers, block size, KV heads, head dim, dtype)
    and holds at most ``max_tokens`` tokens: :class:`TransferError` naming what differs."""
    pool = cache.k_pools[0]
    want = dict(layers=cache.num_layers, block_size=cache.block_size, heads=pool.shape[2], headdim=pool.shape[3],
                dtype=str(pool.dtype).removeprefix("torch."))  # fmt: skip
    got = dict(layers=header.layers, block_size=header.block_size, heads=header.heads[1] - header.heads[0],
               headdim=header.headdim, dtype=header.dtype)  # fmt: skip
    for name in want:
        if want[name] != got[name]:
            raise TransferError(f"the transfer holds {name}={got[name]}, this cache has {want[name]}")
    if header.tokens > max_tokens:
        raise TransferError(f"the transfer holds {header.tokens} tokens, at most {max_tokens} may be loaded")


def pack_layer(cache: PagedKVCache, layer: int, blocks, heads: tuple[int, int]) -> torch.Tensor:
    """Layer ``layer``'s keys and values of ``blocks`` (KV heads ``heads``), one contiguous tensor
    ``(2, len(blocks), block_size, heads, headdim)``: a copy (a send needs contiguous memory)."""
    index = torch.tensor(list(blocks), dtype=torch.long, device=cache.k_pools[layer].device)
    k = cache.k_pools[layer].index_select(0, index)[:, :, heads[0] : heads[1]]
    v = cache.v_pools[layer].index_select(0, index)[:, :, heads[0] : heads[1]]
    return torch.stack((k, v)).contiguous()


def unpack_layer(cache: PagedKVCache, layer: int, blocks, payload: torch.Tensor) -> None:
    """Write a payload ``(2, len(blocks), block_size, heads, headdim)`` into ``blocks`` of layer
    ``layer`` (all of this cache's KV heads)."""
    index = torch.tensor(list(blocks), dtype=torch.long, device=cache.k_pools[layer].device)
    cache.k_pools[layer].index_copy_(0, index, payload[0].to(cache.k_pools[layer].device))
    cache.v_pools[layer].index_copy_(0, index, payload[1].to(cache.v_pools[layer].device))


class Pending:
    """A message on its way; :meth:`wait` returns when it arrived or raises :class:`PeerLostError`."""

    def __init__(self, wait, what: str):
        self._wait, self.what, self.done = wait, what, False

    def wait(self) -> None:
        if not self.done:
            self._wait()
            self.done = True


class Channel:
    """Point-to-point messages with one peer: ``isend(tensor, tag)`` and ``irecv(buffer, tag)``
    return :class:`Pending` messages; every wait lasts at most ``timeout`` seconds."""

    peer: str
    timeout: float

    def isend(self, tensor: torch.Tensor, tag: int) -> Pending:
        raise NotImplementedError

    def irecv(self, buffer: torch.Tensor, tag: int) -> Pending:
        raise NotImplementedError


class GroupChannel(Channel):
    """Messages with rank ``peer`` of the default ``torch.distributed`` process group."""

    def __init__(self, peer: int, timeout: float = 60.0):
        self.rank = check_int("peer", peer, low=0)
        self.peer = f"rank {peer}"
        self.timeout = check_positive("timeout", timeout)

    def _lost(self, exc: RuntimeError, what: str) -> PeerLostError:
        # gloo: "Connection reset/closed by peer" (it died) or "Timed out waiting" (it stopped answering)
        why = "did not answer within" if "Timed out" in str(exc) else "was lost (its connection closed) within"
        return PeerLostError(f"{self.peer} {why} {self.timeout} s ({what})")

    def _post(self, post, tensor, tag: int, what: str) -> Pending:
        what = f"{what} tag {tag}"
        try:
            work = post(tensor, self.rank, tag=tag)
        except RuntimeError as exc:  # the connection was already gone when the message was posted
            raise self._lost(exc, what) from None

        def wait():
            try:
                work.wait(datetime.timedelta(seconds=self.timeout))
            except RuntimeError as exc:
                raise self._lost(exc, what) from None

        return Pending(wait, what)

    def isend(self, tensor, tag):
        import torch.distributed as dist

        return self._post(dist.isend, tensor, tag, "send")

    def irecv(self, buffer, tag):
        import torch.distributed as dist

        return self._post(dist.irecv, buffer, tag, "receive")


class LocalChannel(Channel):
    """One end of an in-process pair (:meth:`pair`): a send puts a copy in the peer's mailbox; a
    receive copies it into the buffer, which must match it in shape and dtype (stricter than
    gloo). ``close()`` stands for the process dying: the peer's waits fail at once."""

    def __init__(self, timeout: float, name: str):
        self.timeout, self.peer = check_positive("timeout", timeout), name
        self.boxes: dict[int, queue.Queue] = {}
        self.other: LocalChannel | None = None
        self.closed = False

    @classmethod
    def pair(cls, timeout: float = 60.0, a_peer: str = "the peer", b_peer: str = "the peer"):
        """Two connected ends: ``a`` talks to ``a_peer`` (which holds ``b``) and ``b`` to ``b_peer``."""
        a, b = cls(timeout, a_peer), cls(timeout, b_peer)
        a.other, b.other = b, a
        return a, b

    def _box(self, tag: int) -> queue.Queue:
        return self.boxes.setdefault(tag, queue.Queue())

    def close(self) -> None:
        self.closed = True

    def isend(self, tensor, tag):
        if not isinstance(tensor, torch.Tensor):
            raise ArgumentTypeError(f"isend takes a tensor, got {type(tensor).__name__}")
        if self.closed or self.other.closed:
            raise PeerLostError(f"{self.peer} was lost (send tag {tag})")
        self.other._box(tag).put(tensor.detach().clone())
        return Pending(lambda: None, f"send tag {tag}")

    def irecv(self, buffer, tag):
        def wait():
            deadline = self.timeout
            while True:
                try:
                    got = self._box(tag).get(timeout=min(deadline, 0.05))
                    break
                except queue.Empty:
                    deadline -= 0.05
                    if self.other.closed:
                        raise PeerLostError(f"{self.peer} was lost (receive tag {tag})") from None
                    if deadline <= 0:
                        raise PeerLostError(f"{self.peer} did not answer within {self.timeout} s (tag {tag})") from None
            if got.shape != buffer.shape or got.dtype != buffer.dtype:
                raise TransferError(f"tag {tag}: {tuple(got.shape)} {got.dtype} arrived for a {tuple(buffer.shape)} "
                                    f"{buffer.dtype} buffer")  # fmt: skip
            buffer.copy_(got)

        return Pending(wait, f"receive tag {tag}")


class KVSender:
    """Sends one request's blocks: :meth:`start` the header, :meth:`send_layer` each layer as soon as
    it is computed (the next layer computes while it travels), :meth:`wait` for all of it."""

    def __init__(self, channel: Channel, header: KVHeader):
        self.channel, self.header = channel, header
        self.base = tag_base(header.request, header.layers)
        self.pending: list[tuple[Pending, torch.Tensor]] = []  # tensors kept alive until sent
        self.bytes = 0

    def start(self) -> None:
        data = self.header.encode()
        self.pending.append((self.channel.isend(data, self.base), data))

    def send_layer(self, cache: PagedKVCache, layer: int, corrupt: bool = False) -> None:
        """Send layer ``layer``; ``corrupt`` (fault injection) sends it with its bytes lost."""
        payload = pack_layer(cache, layer, self.header.src_blocks, self.header.heads)
        check = digest(payload)
        if corrupt:
            payload = torch.zeros_like(payload)
        for i, t in ((1, payload), (2, check)):
            self.pending.append((self.channel.isend(t, self.base + i + 2 * layer), t))
        self.bytes += payload.numel() * payload.element_size()

    def wait(self) -> None:
        for pending, _ in self.pending:
            pending.wait()
        self.pending.clear()


class KVReceiver:
    """Receives one request's blocks: :meth:`header` waits for and checks the header,
    :meth:`start` posts a receive per layer into buffers of exactly the announced size,
    :meth:`land_layer` waits for a layer, checks its digest and writes it into the cache."""

    def __init__(self, channel: Channel, request: int, layers: int):
        self.channel, self.request, self.layers = channel, request, layers
        self.base = tag_base(request, layers)
        self.got: KVHeader | None = None
        self.buffers: list[tuple[Pending, torch.Tensor, Pending, torch.Tensor]] = []
        self.bytes = 0

    def header(self) -> KVHeader:
        data = torch.zeros(HEADER_BYTES, dtype=torch.uint8)
        self.channel.irecv(data, self.base).wait()
        header = KVHeader.decode(data)
        if header.request != self.request or header.layers != self.layers:
            raise TransferError(
                f"expected request {self.request} with {self.layers} layers, the header announces request "
                f"{header.request} with {header.layers}"
            )
        self.got = header
        return header

    def start(self) -> None:
        header = self.got
        for layer in range(header.layers):
            payload = torch.empty(header.payload_shape, dtype=DTYPES[header.dtype])
            check = torch.empty(DIGEST_BYTES, dtype=torch.uint8)
            p1 = self.channel.irecv(payload, self.base + 1 + 2 * layer)
            p2 = self.channel.irecv(check, self.base + 2 + 2 * layer)
            self.buffers.append((p1, payload, p2, check))

    def land_layer(self, cache: PagedKVCache, layer: int, blocks) -> None:
        p1, payload, p2, check = self.buffers[layer]
        p1.wait()
        p2.wait()
        if not torch.equal(digest(payload), check):
            raise TransferError(f"request {self.request}, layer {layer}: the payload's SHA-256 does not match")
        unpack_layer(cache, layer, blocks, payload)
        self.bytes += payload.numel() * payload.element_size()

    def abandon(self) -> None:
        """Give up on this transfer: the receives still posted keep their buffers (the transport
        may still write into them) until the process ends, and nothing waits for them."""
        ORPHANS.extend(self.buffers)
        self.buffers = []
