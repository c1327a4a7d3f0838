"""A KV connector with vLLM's roles and call order (notebook 12), over :mod:`flashkv_edu.transfer`.

vLLM's ``KVConnectorBase_V1`` is instantiated twice per engine: once with the **scheduler** role
(which tokens can be loaded from elsewhere, which blocks they land in, a metadata object per step,
what happens to a finished request's blocks) and once per worker with the **worker** role (start
loading before the forward, wait for each layer inside it, save each layer after it is computed,
wait for the saves, report finished transfers). :class:`KVConnector` implements those methods for
disaggregated prefill and decode:

* on the **prefill** side it pushes: ``save_kv_layer`` sends each layer to the decode side as
  soon as the layer is computed (the next layer computes while it travels);
* on the **decode** side it loads: the scheduler reads the transfer's header to learn how many
  tokens arrive (never the whole prompt: the last prompt token is always computed here, since
  its logits give the first new token, and a cache holds keys and values, not logits);
  ``start_load_kv`` posts the receives and ``wait_for_layer_load`` lands each layer, checked,
  in the blocks the scheduler allocated, just before that layer's attention reads them.

Every call is recorded in a :class:`CallLog` (``(time, side, role, method, what)``) so the order
of one step can be shown and tested.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .paged import PagedKVCache
from .steps import LayerHooks
from .transfer import (
    Channel,
    KVReceiver,
    KVSender,
    PeerLostError,
    TransferError,
    check_fits,
    header_for,
)
from .validation import ArgumentError

__all__ = ["ROLES", "SIDES", "CallLog", "ConnectorHooks", "ConnectorMeta", "KVConnector", "TransferRequest"]

ROLES = ("scheduler", "worker")
SIDES = ("prefill", "decode")


class CallLog(list):
    """The connector calls of one process: ``(time.time(), side, role, method, what)`` tuples."""

    def record(self, side: str, role: str, method: str, what: str = "") -> None:
        self.append((time.time(), side, role, method, what))

    def methods(self) -> list[str]:
        return [f"{role}.{method}" for _, _, role, method, _ in self]


@dataclass
class TransferRequest:
    """A request as the connector sees it: its id, prompt token ids, and where its KV goes or
    comes from: ``peers`` ``[(channel, (head start, head stop))]``, one per receiving rank on the
    prefill side (tensor parallel decode ranks each take their heads), one on the decode side."""

    request_id: int
    prompt: list[int]
    peers: list[tuple[Channel, tuple[int, int] | None]]


@dataclass
class ConnectorMeta:
    """What the scheduler tells the worker for one step: the transfers to save (prefill side)
    ``{request id: [header per peer]}`` and to load (decode side) ``{request id: (header, blocks)}``."""

    saves: dict = field(default_factory=dict)
    loads: dict = field(default_factory=dict)


class KVConnector:
    """vLLM's connector methods for one ``side`` (``"prefill"`` or ``"decode"``) and ``role``
    (``"scheduler"`` or ``"worker"``) over ``cache``; calling a method of the other role raises."""

    def __init__(self, side: str, role: str, cache: PagedKVCache, log: CallLog | None = None):
        if side not in SIDES:
            raise ArgumentError(f"side must be one of {SIDES}, got {side!r}")
        if role not in ROLES:
            raise ArgumentError(f"role must be one of {ROLES}, got {role!r}")
        if not isinstance(cache, PagedKVCache):
            raise ArgumentError(f"cache must be a PagedKVCache, got {type(cache).__name__}")
        self.side, self.role, self.cache = side, role, cache
        self.log = CallLog() if log is None else log
        self.requests: dict[int, TransferRequest] = {}
        self.headers: dict[int, object] = {}  # decode scheduler: the header each request announced
        self.pending = ConnectorMeta()
        self.meta: ConnectorMeta | None = None
        self.senders: dict[int, list[KVSender]] = {}
        self.receivers: dict[int, tuple[KVReceiver, list[int]]] = {}
        self.finished_sending: set[int] = set()
        self.finished_recving: set[int] = set()
        self.errors: dict[int, str] = {}  # request id -> why its transfer failed
        self.corrupt: set[int] = set()  # fault injection: requests whose first layer arrives altered
        self.moved: dict[int, int] = {}  # request id -> payload bytes sent or landed

    def _call(self, role: str, method: str, what=None) -> None:
        """Check the role, then record the call (``what``: a function giving its details)."""
        if self.role != role:
            raise ArgumentError(f"{method} is a {role}-side method; this connector has the {self.role} role")
        self.log.record(self.side, role, method, what() if what else "")

    # ---- scheduler role ------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: TransferRequest, num_computed_tokens: int) -> tuple[int, bool]:
        """Tokens of ``request`` beyond ``num_computed_tokens`` whose KV can be loaded, and whether
        the load is asynchronous. Prefill side: 0. Decode side: what the transfer's header
        announces (checked against this cache and at most ``len(prompt) - 1``), 0 if it failed."""
        self._call("scheduler", "get_num_new_matched_tokens", lambda: f"request {request.request_id}")
        self.requests[request.request_id] = request
        if self.side == "prefill" or len(request.prompt) < 2:  # a one-token prompt moves nothing
            return 0, False
        channel = request.peers[0][0]
        receiver = KVReceiver(channel, request.request_id, self.cache.num_layers)
        try:
            header = receiver.header()
            check_fits(header, self.cache, len(request.prompt) - 1)
        except (PeerLostError, TransferError) as exc:
            self.errors[request.request_id] = str(exc)
            return 0, False
        self.headers[request.request_id] = (header, receiver)
        return max(header.tokens - num_computed_tokens, 0), False

    def update_state_after_alloc(self, request: TransferRequest, blocks: list[int], num_external_tokens: int) -> None:
        """The allocator gave ``request`` ``blocks``; ``num_external_tokens`` of them are loaded."""
        self._call(
            "scheduler", "update_state_after_alloc", lambda: f"request {request.request_id}, {len(blocks)} blocks"
        )
        rid = request.request_id
        if self.side == "prefill":
            tokens = len(request.prompt) - 1  # the decode side computes the last prompt token itself
            if tokens > 0:
                self.pending.saves[rid] = [
                    (channel, header_for(self.cache, blocks, rid, tokens, heads)) for channel, heads in request.peers
                ]
        elif num_external_tokens:
            header, receiver = self.headers.pop(rid)
            self.pending.loads[rid] = (header, receiver, list(blocks)[: header.blocks])

    def build_connector_meta(self) -> ConnectorMeta:
        """This step's metadata for the workers; the scheduler's pending state starts afresh."""
        pending = self.pending
        self._call(
            "scheduler", "build_connector_meta", lambda: f"{len(pending.saves)} saves, {len(pending.loads)} loads"
        )
        meta, self.pending = self.pending, ConnectorMeta()
        return meta

    def request_finished(self, request: TransferRequest, block_ids: list[int]) -> tuple[bool, dict | None]:
        """Called once when ``request`` finishes, before its blocks are freed: ``(True, params)``
        holds the blocks until ``get_finished`` reports the send done; ``params`` go back to the
        client (vLLM's ``kv_transfer_params``)."""
        self._call("scheduler", "request_finished", lambda: f"request {request.request_id}")
        rid = request.request_id
        if self.side == "decode":
            return False, None
        in_flight = rid in self.senders and rid not in self.finished_sending
        return in_flight, {"request": rid, "tokens": len(request.prompt) - 1, "error": self.errors.get(rid)}

    # ---- worker role ---------------------------------------------------------------------------
    def bind_connector_metadata(self, meta: ConnectorMeta) -> None:
        self._call("worker", "bind_connector_metadata")
        self.meta = meta

    def clear_connector_metadata(self) -> None:
        self._call("worker", "clear_connector_metadata")
        self.meta = None

    def start_load_kv(self) -> None:
        """Before the forward: the decode side posts a receive for every layer of every load."""
        self._call("worker", "start_load_kv", lambda: f"{len(self.meta.loads)} loads")
        for rid, (_header, receiver, blocks) in self.meta.loads.items():
            receiver.start()
            self.receivers[rid] = (receiver, blocks)
        for rid, saves in self.meta.saves.items():
            senders = []
            for channel, header in saves:
                sender = KVSender(channel, header)
                try:
                    sender.start()
                except PeerLostError as exc:
                    self.errors[rid] = str(exc)
                senders.append(sender)
            self.senders[rid] = senders

    def wait_for_layer_load(self, layer: int) -> None:
        """Inside layer ``layer``, before its attention: land that layer of every load (checked);
        raises :class:`PeerLostError` or :class:`TransferError` if it cannot."""
        self._call("worker", "wait_for_layer_load", lambda: f"layer {layer}")
        for rid, (receiver, blocks) in self.receivers.items():
            try:
                receiver.land_layer(self.cache, layer, blocks)
            except (PeerLostError, TransferError) as exc:
                self.errors[rid] = str(exc)
                raise
            self.moved[rid] = receiver.bytes

    def save_kv_layer(self, layer: int) -> None:
        """Inside layer ``layer``, after its attention wrote the keys: send that layer of every save."""
        self._call("worker", "save_kv_layer", lambda: f"layer {layer}")
        for rid, senders in self.senders.items():
            if rid in self.errors:
                continue
            for sender in senders:
                try:
                    sender.send_layer(self.cache, layer, corrupt=layer == 0 and rid in self.corrupt)
                except PeerLostError as exc:
                    self.errors[rid] = str(exc)
            self.moved[rid] = sum(sender.bytes for sender in senders)

    def wait_for_save(self) -> None:
        """When the forward ends: wait for every send (the blocks must not be overwritten before)."""
        self._call("worker", "wait_for_save")
        for rid, senders in self.senders.items():
            for sender in senders:
                try:
                    sender.wait()
                except PeerLostError as exc:
                    self.errors.setdefault(rid, str(exc))
            self.finished_sending.add(rid)

    def get_finished(self, finished_req_ids=()) -> tuple[set[int], set[int]]:
        """Request ids whose sends, and whose loads, completed since the last call."""
        self._call("worker", "get_finished")
        for rid, (receiver, _) in self.receivers.items():
            if rid not in self.errors:
                self.finished_recving.add(rid)
            else:
                receiver.abandon()
        self.receivers.clear()
        sending, recving = set(self.finished_sending), set(self.finished_recving)
        self.finished_sending.clear()
        self.finished_recving.clear()
        self.senders = {rid: s for rid, s in self.senders.items() if rid not in sending}
        return sending, recving


class ConnectorHooks(LayerHooks):
    """The worker connector's calls inside a forward: ``wait_for_layer_load`` before each layer's
    attention, ``save_kv_layer`` after it (vLLM calls them from its attention layers)."""

    def __init__(self, worker: KVConnector):
        self.worker = worker

    def before(self, layer: int) -> None:
        self.worker.wait_for_layer_load(layer)

    def after(self, layer: int) -> None:
        self.worker.save_kv_layer(layer)
