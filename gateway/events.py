"""Out-of-band structured events (Elastic Common Schema JSON lines).

Theory of operation. The data path calls ``EventBus.emit`` (or one of its
helpers): it builds a flat record of dotted ECS keys, hands it to in-process
subscribers, and appends it to a bounded deque, all synchronously and in
constant time. When the deque is full the event is dropped and counted; the
caller never waits. A single drain task takes batches off the deque,
serializes them to nested ECS JSON (the schema: ``gateway.ecs``) and hands
each batch to every sink (``gateway.sinks``), each write bounded by the sink's
timeout. Sink failures
are counted on the sink and logged (rate-limited), never raised.

Secrets never reach a sink: ``bytes`` values are written as ``fingerprint()``
(a short SHA-256), except ``session_id`` which is public (it is in the
cleartext header) and written as hex.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import logging
import time
from collections.abc import Callable, Sequence
from enum import Enum
from typing import Any

from gateway.ecs import (
    ACTIONS,
    DEFAULT_ACTION,
    ECS_SHORTCUTS,
    ECS_VERSION,
    EVENT_DATASET,
    FIELD_PARTS,
    PLAIN,
    RECORD_CATEGORY,
    RECORD_ORDER,
    RECORD_TYPE,
    SERVICE_NAME,
    Event,
    encode_json,
    field_value,
    json_text,
    message_of,
    name_of,
    optional,
    place,
    timestamp,
)
from gateway.sinks import Sink
from session.records import BINDING_ACTION

log = logging.getLogger("jvpn.events")

DEFAULT_QUEUE_SIZE = 10_000
BATCH_MAX = 256
_SERIALIZE_SLICE = 64  # yield to the loop between slices of a large batch


Subscriber = Callable[[Event], None]


class EventBus:
    """Bounded, non-blocking event pipeline from the data path to the sinks."""

    def __init__(
        self,
        node: str,
        sinks: Sequence[Sink] = (),
        queue_size: int = DEFAULT_QUEUE_SIZE,
        *,
        on_drop: Callable[[], None] | None = None,
        clock: Callable[[], float] | None = None,
        batch_max: int = BATCH_MAX,
    ) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be >= 1")
        self.node = node
        self.sinks: list[Sink] = list(sinks)
        self.queue_size = queue_size
        self.on_drop = on_drop
        self.batch_max = batch_max
        self.emitted = 0  # accepted onto the queue
        self.dropped = 0  # refused because the queue was full
        self.subscriber_errors = 0
        self._clock = clock or time.time  # wall clock: the audit log is read by humans
        self._queue: collections.deque[Event] = collections.deque()
        self._subscribers: list[Subscriber] = []
        self._wakeup = asyncio.Event()
        self._drained = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._in_batch = False
        # Shared by every document of this bus (never changed: a field under ecs.* or
        # service.* gets its own copy first, see emit).
        self._ecs = {"version": ECS_VERSION}
        self._service = {"name": SERVICE_NAME, "node": {"name": node}}
        # A history record's line between its message and its reason (_record_line).
        head = encode_json({
            "ecs": self._ecs, "service": self._service,
            "event": {"dataset": EVENT_DATASET, "kind": "event", "category": RECORD_CATEGORY,
                      "type": RECORD_TYPE, "action": BINDING_ACTION, "outcome": "unknown",
                      "reason": ""}})
        assert head.endswith('"reason":""}}')
        self._record_head = "," + head[1:-4]
        # (phase, reason, holder, incarnation) -> the parts of its records' lines they make
        self._record_parts: dict[tuple[str, str, str, str], tuple[str, str, str, str]] = {}

    # ---- producer side (synchronous, O(1), never blocks) ---------------------------------

    def emit(self, action: str, **fields: Any) -> bool:
        """Queue an event; False if the queue was full (the event is dropped and counted).

        Bare keyword names map to ECS (outcome, reason, source_ip, source_port,
        trace_id, ...) or else to ``jvpn.<name>``; dotted names are used as is.
        None values are omitted.
        """
        if action == BINDING_ACTION:
            line = self._record_line(fields)
            if line:
                return self._enqueue(Event(None, line, BINDING_ACTION))
        kind, category, type_, outcome = ACTIONS.get(action, DEFAULT_ACTION)
        # The nested document is built here, in the order the flat keys would have
        # (to_document of the flat fields gives the same document): a reattach emits
        # two events, and nesting afterwards cost more than all the rest of emitting.
        doc: dict[str, Any] = {
            "@timestamp": timestamp(self._clock()),
            "log": {"level": "warning" if kind == "alert" else "info"},
            "message": fields.pop("message", None) or message_of(action, outcome, fields),
            "ecs": self._ecs,
            "service": self._service,
            "event": {"dataset": EVENT_DATASET, "kind": kind, "category": category,
                      "type": type_, "action": action, "outcome": outcome},
        }
        known = FIELD_PARTS
        for key, value in fields.items():
            if value is None:
                continue
            parts = known.get(key)
            if parts is None:
                path = key if "." in key else ECS_SHORTCUTS.get(key) or "jvpn." + key
                parts = (path,) if path.startswith("@") else tuple(path.split("."))
                if len(known) < 4096:
                    known[key] = parts
            if type(value) not in PLAIN:
                value = field_value(key, value)
            if len(parts) == 2:  # most fields: "jvpn.epoch", "event.reason", "source.ip"
                head = parts[0]
                child = doc.get(head)
                if child is None:
                    doc[head] = {parts[1]: value}
                    continue
                if type(child) is dict and child is not self._ecs and child is not self._service:
                    child[parts[1]] = value
                    continue
            shared = doc.get(parts[0])
            if shared is self._ecs or shared is self._service:
                doc[parts[0]] = copy.deepcopy(shared)  # never change the shared ones
            place(doc, parts, value)
        return self._enqueue(Event(doc))

    def _record_line(self, fields: dict[str, Any]) -> str:
        """A control-plane history record (``session.records``) as its JSON line, made from
        pre-encoded parts: the same line, byte for byte, as the general path below gives
        the same fields (a test compares them), without building the document (a node
        writes two to four records per reattach: building and serializing their documents
        cost more than all its other events). "" for fields not in the order and of the
        types ``GatewayMachine._record`` gives them (then the general path does)."""
        if tuple(fields) != RECORD_ORDER:
            return ""
        sid, phase, reason, epoch, holder, inc, store_ms, version, bid, status = fields.values()
        if not (type(phase) is str and type(reason) is str and reason
                and type(epoch) is int and type(holder) is str and type(inc) is str
                and type(store_ms) is int):
            return ""
        parts = self._record_parts.get((phase, reason, holder, inc))
        if parts is None:
            # What a node's records share: a few phases and reasons, its own holder name.
            why = json_text(reason)
            parts = (f'"binding unknown: {why[1:-1]}', f'{self._record_head}{why}}},"jvpn":{{',
                     f'{json_text(phase)},"epoch":',
                     f',"holder":{json_text(holder)},"incarnation":{json_text(inc)},"store_ms":')
            if len(self._record_parts) < 4096:
                self._record_parts[(phase, reason, holder, inc)] = parts
        message, after, phase_text, holders = parts
        if type(sid) is bytes:
            hexed = sid.hex()
            head = f'{message} session {hexed[:12]}"{after}"session_id":"{hexed}","phase":'
        elif sid is None:
            head = f'{message}"{after}"phase":'
        else:
            return ""
        tail = []
        if version is not None:
            if type(version) is not int:
                return ""
            tail.append(f',"state_version":{version}')
        if bid is not None:
            if type(bid) is not str:
                return ""
            tail.append(f',"binding_id":{json_text(bid)}')
        if status is not None:
            if type(status) is not str:
                return ""
            tail.append(f',"binding_status":{json_text(status)}')
        return (f'{{"@timestamp":"{timestamp(self._clock())}","log":{{"level":"info"}},'
                f'"message":{head}{phase_text}{epoch}{holders}{store_ms}{"".join(tail)}}}}}')

    def _enqueue(self, ev: Event) -> bool:
        """Hand ``ev`` to the subscribers and queue it for the sinks (or drop and count it)."""
        for callback in self._subscribers:
            try:
                callback(ev)
            except Exception:
                self.subscriber_errors += 1
                if self.subscriber_errors == 1 or self.subscriber_errors % 1000 == 0:
                    log.exception("event subscriber failed (%d so far)", self.subscriber_errors)
        if len(self._queue) >= self.queue_size:
            self.dropped += 1
            if self.on_drop is not None:
                try:
                    self.on_drop()
                except Exception:
                    log.exception("on_drop callback failed")
            return False
        self._queue.append(ev)
        self.emitted += 1
        if not self._wakeup.is_set():
            self._wakeup.set()
        return True

    def state_change(
        self,
        session_id: bytes,
        from_state: str | Enum,
        to_state: str | Enum,
        version: int,
        epoch: int,
        reason: str | Enum = "",
        **extra: Any,
    ) -> bool:
        """STATE_CHANGE: a session moved between states (a TERMINATED move is type "end")."""
        from_state, to_state = name_of(from_state), name_of(to_state)
        type_ = (
            ["end"] if to_state == "TERMINATED" else ["start"] if from_state == "BIRTH" else None
        )
        return self.emit(
            "state_change",
            session_id=session_id,
            from_state=from_state,
            to_state=to_state,
            state_version=version,
            epoch=epoch,
            reason=optional(reason),
            type=type_,
            **extra,
        )

    def transport_switch(
        self,
        session_id: bytes,
        from_transport: str,
        to_transport: str,
        reason: str | Enum,
        version: int,
        epoch: int,
        **extra: Any,
    ) -> bool:
        """TRANSPORT_SWITCH: a session's binding moved, e.g. "udp:10.0.0.1:5000" -> "tcp:..."."""
        return self.emit(
            "transport_switch",
            session_id=session_id,
            from_transport=from_transport,
            to_transport=to_transport,
            reason=optional(reason),
            state_version=version,
            epoch=epoch,
            **extra,
        )

    def security_event(
        self,
        kind: str,
        reason: str | Enum,
        session_id: bytes | None = None,
        source_ip: str | None = None,
        **extra: Any,
    ) -> bool:
        """SECURITY_EVENT (ECS event.kind "alert"): bad proof, replayed nonce, unknown client..."""
        return self.emit(
            "security_event",
            security_kind=kind,
            reason=optional(reason),
            session_id=session_id,
            source_ip=source_ip,
            **extra,
        )

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback(event)`` synchronously on every emit (even dropped ones); returns unsubscribe.

        Callbacks run on the caller's path: they must be cheap, must not block,
        and must treat the event as read-only (its document is what the sinks get).
        """
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    @property
    def pending(self) -> int:
        """Events queued and not yet handed to the sinks."""
        return len(self._queue)

    # ---- consumer side ------------------------------------------------------------------

    async def start(self) -> None:
        """Open the sinks and start the drain task."""
        if self._task is not None:
            return
        for sink in self.sinks:
            try:
                await sink.open()
            except Exception:
                sink.errors += 1
                log.exception("event sink %s failed to open; will retry on write", sink.name)
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name=f"jvpn-events-{self.node}")

    async def flush(self, timeout_s: float = 5.0) -> None:
        """Wait until everything queued so far has been handed to the sinks."""

        async def _wait() -> None:
            while self._queue or self._in_batch:
                self._drained.clear()
                await self._drained.wait()

        await asyncio.wait_for(_wait(), timeout_s)

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Deliver what is queued (bounded by ``timeout_s``), then close the sinks."""
        task, self._task = self._task, None
        if task is not None:
            self._stopping = True
            self._wakeup.set()
            try:
                await asyncio.wait_for(task, timeout_s)
            except TimeoutError:
                log.warning("event bus: %d events undelivered at stop", len(self._queue))
            except Exception:
                log.exception("event drain task failed")
        for sink in self.sinks:
            try:
                await asyncio.wait_for(sink.close(), sink.timeout_s)
            except Exception:
                log.exception("event sink %s failed to close", sink.name)

    async def _run(self) -> None:
        while True:
            while not self._queue:
                self._drained.set()
                if self._stopping:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            n = min(len(self._queue), self.batch_max)
            batch = [self._queue.popleft() for _ in range(n)]
            self._in_batch = True
            try:
                await self._deliver(batch)
            except Exception:  # never let the drain task die
                log.exception("event delivery failed")
            finally:
                self._in_batch = False

    async def _deliver(self, batch: list[Event]) -> None:
        if not self.sinks:
            return  # nobody reads the JSON lines (serialize() stays lazy for subscribers)
        for i, ev in enumerate(batch):
            ev.serialize()
            if i % _SERIALIZE_SLICE == _SERIALIZE_SLICE - 1:
                await asyncio.sleep(0)
        if self.sinks:
            await asyncio.gather(*(self._write(sink, batch) for sink in self.sinks))

    async def _write(self, sink: Sink, batch: list[Event]) -> None:
        try:
            await asyncio.wait_for(sink.write(batch), sink.timeout_s)
        except Exception as exc:
            sink.errors += 1
            sink.dropped += len(batch)
            if sink.errors == 1 or sink.errors % 100 == 0:
                log.warning(
                    "event sink %s: %s (%d failed batches so far)",
                    sink.name,
                    exc.__class__.__name__ if not str(exc) else exc,
                    sink.errors,
                )
