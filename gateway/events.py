"""Out-of-band structured events (Elastic Common Schema JSON lines).

Theory of operation. The data path calls ``EventBus.emit`` (or one of its
helpers): it builds a flat record of dotted ECS keys, hands it to in-process
subscribers, and appends it to a bounded deque, all synchronously and in
constant time. When the deque is full the event is dropped and counted; the
caller never waits. A single drain task takes batches off the deque,
serializes them to nested ECS JSON and hands each batch to every sink
(``gateway.sinks``), each write bounded by the sink's timeout. Sink failures
are counted on the sink and logged (rate-limited), never raised.

Secrets never reach a sink: ``bytes`` values are written as ``fingerprint()``
(a short SHA-256), except ``session_id`` which is public (it is in the
cleartext header) and written as hex.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import json
import logging
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from enum import Enum
from typing import IO, Any

import orjson

from gateway.config import EventsConfig
from gateway.sinks import (  # noqa: F401  (the sinks' names, where the bus is)
    FileSink,
    HttpSink,
    MemorySink,
    RedisStreamSink,
    Sink,
    SinkBusy,
    StdoutSink,
    SyslogSink,
)
from session.keys import fingerprint
from session.records import BINDING_ACTION
from settings import parse_address

log = logging.getLogger("jvpn.events")

ECS_VERSION = "8.11"
SERVICE_NAME = "jumping-vpn"
EVENT_DATASET = "jvpn.events"
DEFAULT_QUEUE_SIZE = 10_000
BATCH_MAX = 256
_SERIALIZE_SLICE = 64  # yield to the loop between slices of a large batch

# kwargs of emit() that map onto ECS fields; any other bare name goes under jvpn.*
_ECS_SHORTCUTS = {
    "outcome": "event.outcome",
    "reason": "event.reason",
    "category": "event.category",
    "type": "event.type",
    "source_ip": "source.ip",
    "source_port": "source.port",
    "trace_id": "trace.id",
    "message": "message",
    "duration_ns": "event.duration",  # ECS: nanoseconds
}

# action -> ECS event.kind, event.category, event.type, default event.outcome. Each type is
# one the ECS reference expects for every category listed ("Expected event types for
# category ...": authentication and session: start, end, info; network: access, allowed,
# connection, denied, end, info, protocol, start; intrusion_detection: allowed, denied, info):
# a reattach or a transport switch changes a session but is "info" (ECS has no "change" for
# these categories); the kind of change is event.action.
_ACTIONS: dict[str, tuple[str, list[str], list[str], str]] = {
    "state_change": ("event", ["session"], ["info"], "success"),
    "transport_switch": ("event", ["network", "session"], ["info"], "success"),
    "security_event": ("alert", ["intrusion_detection"], ["denied"], "failure"),
    "reattach": ("event", ["authentication", "session"], ["info"], "unknown"),
    "handshake": ("event", ["authentication", "session"], ["start"], "unknown"),
    "drop": ("event", ["network"], ["denied"], "failure"),
    "binding_revoked": ("event", ["session"], ["end"], "success"),
}
_DEFAULT_ACTION = ("event", ["network"], ["info"], "unknown")
# A history record's fields (GatewayMachine._record), in its order: bare names, all under
# jvpn.* but the reason (event.reason); its action has no entry above: the default's kind.
_RECORD_ORDER = ("session_id", "phase", "reason", "epoch", "holder", "incarnation", "store_ms",
                 "state_version", "binding_id", "binding_status")
_RECORD_CATEGORY, _RECORD_TYPE = _DEFAULT_ACTION[1], _DEFAULT_ACTION[2]
_JSON_TEXT: dict[str, str] = {}  # a string -> its JSON text (a record's few distinct strings)


def _json_text(value: str) -> str:
    """``value`` as JSON text, as orjson writes it (hex ids need no escaping; the phases,
    reasons and node names repeat: cached)."""
    if value.isascii() and value.isalnum():
        return f'"{value}"'
    text = _JSON_TEXT.get(value)
    if text is None:
        text = orjson.dumps(value).decode()
        if len(_JSON_TEXT) < 4096:
            _JSON_TEXT[value] = text
    return text


# Allowed (category -> event types), as the ECS reference lists them, for the categories used.
ECS_EXPECTED_TYPES: dict[str, frozenset[str]] = {
    "authentication": frozenset({"start", "end", "info"}),
    "session": frozenset({"start", "end", "info"}),
    "network": frozenset({"access", "allowed", "connection", "denied", "end", "info", "protocol",
                          "start"}),
    "intrusion_detection": frozenset({"allowed", "denied", "info"}),
}


def _message(action: str, outcome: str, f: dict[str, Any]) -> str:
    """ECS ``message``: one human line per event (what a log viewer shows first)."""
    sid = f.get("session_id")
    who = f"session {sid.hex()[:12] if isinstance(sid, bytes) else str(sid)[:12]} " if sid else ""
    reason = f.get("reason")
    why = f": {_name(reason)}" if reason not in (None, "") else ""
    if action == "state_change":
        return (f"{who}{f.get('from_state')} -> {f.get('to_state')} "
                f"(v{f.get('state_version')}){why}")
    if action == "transport_switch":
        return f"{who}{f.get('from_transport')} -> {f.get('to_transport')}{why}"
    if action == "security_event":
        return f"security: {f.get('security_kind')}{why} {who}".rstrip()
    return f"{action} {f.get('outcome', outcome)}{why} {who}".rstrip()


_TS_CACHE: list[Any] = [None, ""]  # (millisecond, its text): a busy node emits several per ms


def _timestamp(t: float) -> str:
    ms = int(t * 1000)
    if _TS_CACHE[0] != ms:
        text = datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")
        _TS_CACHE[0], _TS_CACHE[1] = ms, text.replace("+00:00", "Z")
    return str(_TS_CACHE[1])


def _field_value(key: str, value: Any) -> Any:
    """Make a value safe and serializable: bytes are hex (session ids) or fingerprints."""
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        return raw.hex() if key.endswith("session_id") else fingerprint(raw)
    if isinstance(value, Enum):
        return value.name
    return value


_FIELD_PARTS: dict[str, tuple[str, ...]] = {}  # emit() keyword -> its ECS path, split
_PLAIN = frozenset({str, int, float, bool, list})  # exact types _field_value returns as they are


def _name(value: str | Enum) -> str:
    return value.name if isinstance(value, Enum) else value


def _optional(value: object) -> object:
    """ "" means "no value" (an enum member is always a value, even if its int is 0)."""
    return None if value is None or (isinstance(value, str) and value == "") else value


_PATHS: dict[str, list[str]] = {}  # dotted key -> its parts (keys come from a small set)
_JSON = json.JSONEncoder(separators=(",", ":"), default=str)  # one encoder, not one per event


def encode_json(doc: dict[str, Any]) -> str:
    """One compact JSON line: orjson (~0.3 us for an event, the stdlib encoder ~4 us: two
    events per reattach made it a tenth of a gateway's CPU), and the stdlib encoder for
    what orjson refuses (an int beyond 64 bits, a lone surrogate): same text otherwise."""
    try:
        return orjson.dumps(doc, default=str).decode()
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return _JSON.encode(doc)


def to_document(fields: dict[str, Any]) -> dict[str, Any]:
    """Nest flat dotted ECS keys into the canonical JSON document."""
    doc: dict[str, Any] = {}
    paths = _PATHS
    for key, value in fields.items():
        parts = paths.get(key)
        if parts is None:
            parts = [key] if key.startswith("@") else key.split(".")
            if len(paths) < 4096:
                paths[key] = parts
        _place(doc, parts, value)
    return doc


def _place(doc: dict[str, Any], parts: Sequence[str], value: Any) -> None:
    """Set ``value`` at the nested path ``parts`` of ``doc`` as ``to_document`` would."""
    node = doc
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):  # "a" and "a.b" both set: keep the rest dotted
            node[".".join(parts[i:])] = value
            return
        node = child
    node[parts[-1]] = value


def _flatten(doc: dict[str, Any], prefix: str, out: dict[str, Any]) -> dict[str, Any]:
    for key, value in doc.items():
        if type(value) is dict:
            _flatten(value, prefix + key + ".", out)
        else:
            out[prefix + key] = value
    return out


class Event:
    """One event: the nested ECS document, and its JSON line once serialized.

    ``fields`` is the same event as flat dotted ECS keys (``"event.action"``), made on
    first use: subscribers and tests read it; the sinks only need the document. A history
    record is made as its line (``EventBus.emit``): its document is read from the line
    when asked for."""

    __slots__ = ("_doc", "line", "_fields", "_action")

    def __init__(self, doc: dict[str, Any] | None, line: str = "", action: str = "") -> None:
        self._doc = doc
        self.line = line
        self._fields: dict[str, Any] | None = None
        self._action = action

    @property
    def doc(self) -> dict[str, Any]:
        if self._doc is None:
            self._doc = orjson.loads(self.line)
        return self._doc

    @property
    def fields(self) -> dict[str, Any]:
        if self._fields is None:
            self._fields = _flatten(self.doc, "", {})
        return self._fields

    @property
    def action(self) -> str:
        """event.action, e.g. "state_change"."""
        if self._action:
            return self._action
        event = self.doc.get("event")
        return str(event.get("action", "")) if type(event) is dict else ""

    def document(self) -> dict[str, Any]:
        """The nested ECS document (shared: read it, do not change it)."""
        return self.doc

    def serialize(self) -> str:
        """The event as one compact JSON line (cached)."""
        if not self.line:
            self.line = encode_json(self.doc)
        return self.line

    def __repr__(self) -> str:
        return f"Event({self.fields!r})"


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
            "event": {"dataset": EVENT_DATASET, "kind": "event", "category": _RECORD_CATEGORY,
                      "type": _RECORD_TYPE, "action": BINDING_ACTION, "outcome": "unknown",
                      "reason": ""}})
        assert head.endswith('"reason":""}}')
        self._record_head = "," + head[1:-4]

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
        kind, category, type_, outcome = _ACTIONS.get(action, _DEFAULT_ACTION)
        # The nested document is built here, in the order the flat keys would have
        # (to_document of the flat fields gives the same document): a reattach emits
        # two events, and nesting afterwards cost more than all the rest of emitting.
        doc: dict[str, Any] = {
            "@timestamp": _timestamp(self._clock()),
            "log": {"level": "warning" if kind == "alert" else "info"},
            "message": fields.pop("message", None) or _message(action, outcome, fields),
            "ecs": self._ecs,
            "service": self._service,
            "event": {"dataset": EVENT_DATASET, "kind": kind, "category": category,
                      "type": type_, "action": action, "outcome": outcome},
        }
        known = _FIELD_PARTS
        for key, value in fields.items():
            if value is None:
                continue
            parts = known.get(key)
            if parts is None:
                path = key if "." in key else _ECS_SHORTCUTS.get(key) or "jvpn." + key
                parts = (path,) if path.startswith("@") else tuple(path.split("."))
                if len(known) < 4096:
                    known[key] = parts
            if type(value) not in _PLAIN:
                value = _field_value(key, value)
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
            _place(doc, parts, value)
        return self._enqueue(Event(doc))

    def _record_line(self, fields: dict[str, Any]) -> str:
        """A control-plane history record (``session.records``) as its JSON line, made from
        pre-encoded parts: the same line, byte for byte, as the general path below gives
        the same fields (a test compares them), without building the document (a node
        writes two to four records per reattach: building and serializing their documents
        cost more than all its other events). "" for fields not in the order and of the
        types ``GatewayMachine._record`` gives them (then the general path does)."""
        if tuple(fields) != _RECORD_ORDER:
            return ""
        sid, phase, reason, epoch, holder, inc, store_ms, version, bid, status = fields.values()
        if not (type(phase) is str and type(reason) is str and reason
                and type(epoch) is int and type(holder) is str and type(inc) is str
                and type(store_ms) is int):
            return ""
        why = _json_text(reason)
        if type(sid) is bytes:
            hexed = sid.hex()
            head = f'"binding unknown: {why[1:-1]} session {hexed[:12]}"'
            jvpn = f'"session_id":"{hexed}","phase":'
        elif sid is None:
            head = f'"binding unknown: {why[1:-1]}"'
            jvpn = '"phase":'
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
            tail.append(f',"binding_id":{_json_text(bid)}')
        if status is not None:
            if type(status) is not str:
                return ""
            tail.append(f',"binding_status":{_json_text(status)}')
        return (f'{{"@timestamp":"{_timestamp(self._clock())}","log":{{"level":"info"}},'
                f'"message":{head}{self._record_head}{why}}},"jvpn":{{{jvpn}'
                f'{_json_text(phase)},"epoch":{epoch},"holder":{_json_text(holder)},'
                f'"incarnation":{_json_text(inc)},"store_ms":{store_ms}{"".join(tail)}}}}}')

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
        from_state, to_state = _name(from_state), _name(to_state)
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
            reason=_optional(reason),
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
            reason=_optional(reason),
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
            reason=_optional(reason),
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


def sinks_from_config(
    cfg: EventsConfig, redis_client: Any | None = None, stdout: IO[str] | None = None
) -> list[Sink]:
    """Build the sinks an ``EventsConfig`` asks for (redis stream only if a client is given)."""
    sinks: list[Sink] = []
    if cfg.stdout:
        sinks.append(StdoutSink(stdout))
    if cfg.file:
        sinks.append(FileSink(cfg.file))
    if cfg.redis_stream and redis_client is not None:
        sinks.append(RedisStreamSink(redis_client, cfg.redis_stream_name, cfg.redis_stream_maxlen))
    if cfg.siem_syslog:
        sinks.append(SyslogSink(*parse_address(cfg.siem_syslog, peer=True)))
    if cfg.siem_http:
        sinks.append(HttpSink(cfg.siem_http, cfg.http_timeout_s))
    return sinks
