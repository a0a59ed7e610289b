"""Out-of-band structured events (Elastic Common Schema JSON lines).

Theory of operation. The data path calls ``EventBus.emit`` (or one of its
helpers): it builds a flat record of dotted ECS keys, hands it to in-process
subscribers, and appends it to a bounded deque, all synchronously and in
constant time. When the deque is full the event is dropped and counted; the
caller never waits. A single drain task takes batches off the deque,
serializes them to nested ECS JSON and hands each batch to every sink, each
write bounded by the sink's timeout. Sink failures are counted on the sink and
logged (rate-limited), never raised. File and stdout writes run on a private
thread per sink, so a stalled pipe or disk cannot freeze the event loop; a
sink still busy with its previous batch drops the next one (counted).

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
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from enum import Enum
from typing import IO, Any

import aiohttp
import orjson

from gateway.config import EventsConfig
from session.keys import fingerprint
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
}

# action -> ECS event.kind, event.category, event.type, default event.outcome
_ACTIONS: dict[str, tuple[str, list[str], list[str], str]] = {
    "state_change": ("event", ["session"], ["change"], "success"),
    "transport_switch": ("event", ["network", "session"], ["change", "connection"], "success"),
    "security_event": ("alert", ["intrusion_detection"], ["denied"], "failure"),
    "reattach": ("event", ["authentication", "session"], ["change"], "unknown"),
    "handshake": ("event", ["authentication", "session"], ["start"], "unknown"),
    "drop": ("event", ["network"], ["denied"], "failure"),
    "binding_revoked": ("event", ["session"], ["end"], "success"),
}
_DEFAULT_ACTION = ("event", ["network"], ["info"], "unknown")


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
    first use: subscribers and tests read it; the sinks only need the document."""

    __slots__ = ("doc", "line", "_fields")

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.line = ""
        self._fields: dict[str, Any] | None = None

    @property
    def fields(self) -> dict[str, Any]:
        if self._fields is None:
            self._fields = _flatten(self.doc, "", {})
        return self._fields

    @property
    def action(self) -> str:
        """event.action, e.g. "state_change"."""
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


class SinkBusy(Exception):
    """The sink is still writing its previous batch."""


class Sink:
    """A destination for event batches. ``write`` may raise: the bus counts it."""

    name = "sink"
    timeout_s = 2.0

    def __init__(self) -> None:
        self.written = 0  # events delivered (counted by the sink itself)
        self.errors = 0  # failed batches: exception, timeout or busy (counted by the bus)
        self.dropped = 0  # events lost to those failures, or refused one by one

    async def open(self) -> None:
        """Acquire resources (called by EventBus.start)."""

    async def write(self, batch: Sequence[Event]) -> None:
        """Deliver a batch (events are already serialized)."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release resources (called by EventBus.stop)."""


class _ThreadedSink(Sink):
    """Blocking writes on a private thread; never two batches in flight."""

    def __init__(self) -> None:
        super().__init__()
        self._pool: ThreadPoolExecutor | None = None
        self._busy = False

    def _write_lines(self, lines: list[str]) -> None:
        raise NotImplementedError

    def _close_sync(self) -> None:
        pass

    async def write(self, batch: Sequence[Event]) -> None:
        if self._busy:
            raise SinkBusy(self.name)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"jvpn-{self.name}")
        lines = [ev.line for ev in batch]
        self._busy = True
        fut = asyncio.get_running_loop().run_in_executor(self._pool, self._write_lines, lines)
        # Cleared when the thread finishes, even if our await was cancelled by a timeout.
        fut.add_done_callback(self._done)
        await asyncio.shield(fut)
        self.written += len(lines)

    def _done(self, fut: asyncio.Future[None]) -> None:
        self._busy = False
        if not fut.cancelled():
            fut.exception()  # mark retrieved; the awaiting side counted it

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.get_running_loop().run_in_executor(pool, self._close_sync)
            pool.shutdown(wait=False)
        else:
            self._close_sync()


class StdoutSink(_ThreadedSink):
    """JSON lines to stdout (or any text stream)."""

    name = "stdout"

    def __init__(self, stream: IO[str] | None = None) -> None:
        super().__init__()
        self._stream = stream

    def _write_lines(self, lines: list[str]) -> None:
        stream = self._stream or sys.stdout
        stream.write("\n".join(lines) + "\n")
        stream.flush()


class FileSink(_ThreadedSink):
    """JSON lines appended to a file; ``reopen()`` after log rotation."""

    name = "file"

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self._fp: IO[str] | None = None

    def _write_lines(self, lines: list[str]) -> None:
        if self._fp is None:
            self._fp = open(self.path, "a", encoding="utf-8")  # kept open across batches
        try:
            self._fp.write("\n".join(lines) + "\n")
            self._fp.flush()
        except OSError:
            self._close_sync()  # reopen on the next batch
            raise

    def _close_sync(self) -> None:
        fp, self._fp = self._fp, None
        if fp is not None:
            try:
                fp.close()
            except OSError:
                pass

    def reopen(self) -> None:
        """Close the file so the next batch reopens it (e.g. after SIGHUP)."""
        if not self._busy:
            self._close_sync()


# KEYS[1] - the stream; ARGV[1] - approximate MAXLEN; ARGV[2..] - (action, event line) pairs.
# Returns the number of entries added (one per event, as separate XADDs would).
_XADD_BATCH = """
for i = 2, #ARGV, 2 do
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'action', ARGV[i], 'event', ARGV[i + 1])
end
return (#ARGV - 1) / 2
"""


class RedisStreamSink(Sink):
    """The cluster-wide audit log: XADD each event to a Redis stream (approximate MAXLEN)."""

    name = "redis_stream"

    def __init__(
        self, redis_client: Any, stream: str = "jvpn:audit", maxlen: int = 100_000
    ) -> None:
        super().__init__()
        self.redis = redis_client  # a redis.asyncio client; owned by the caller
        self.stream = stream
        self.maxlen = maxlen
        self._xadd_batch: Any = None

    async def write(self, batch: Sequence[Event]) -> None:
        # One script call per batch: a pipeline of XADDs costs ~15 us of client Python each.
        if self._xadd_batch is None:
            self._xadd_batch = self.redis.register_script(_XADD_BATCH)  # reloads on NOSCRIPT
        args: list[Any] = [self.maxlen]
        for ev in batch:
            args += (ev.action, ev.line)
        await self._xadd_batch(keys=[self.stream], args=args)
        self.written += len(batch)


class SyslogSink(Sink):
    """RFC 5424 messages over UDP (RFC 5426); sendto on a non-blocking socket."""

    name = "syslog"
    FACILITY_LOCAL0 = 16
    MAX_DATAGRAM = 65_000

    def __init__(self, host: str, port: int, facility: int = FACILITY_LOCAL0) -> None:
        super().__init__()
        self.host = host
        self.port = port
        self.facility = facility
        self._sock: socket.socket | None = None
        self._addr: Any = None
        self._hostname = _syslog_token(socket.gethostname(), 255)
        self._procid = str(os.getpid())

    async def open(self) -> None:
        infos = await asyncio.get_running_loop().getaddrinfo(
            self.host, self.port, type=socket.SOCK_DGRAM
        )
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setblocking(False)
        self._sock, self._addr = sock, addr

    def format(self, ev: Event) -> bytes:
        """One RFC 5424 message: <PRI>1 TIMESTAMP HOST APP PROCID MSGID - MSG."""
        severity = 4 if ev.doc["event"].get("kind") == "alert" else 6  # warning / informational
        pri = self.facility * 8 + severity
        ts = ev.doc.get("@timestamp") or "-"
        msgid = _syslog_token(ev.action, 32)
        header = f"<{pri}>1 {ts} {self._hostname} {SERVICE_NAME} {self._procid} {msgid} - "
        return header.encode("ascii", "replace") + ev.line.encode("utf-8")

    async def write(self, batch: Sequence[Event]) -> None:
        if self._sock is None:
            await self.open()
        assert self._sock is not None
        failed = 0
        for ev in batch:
            msg = self.format(ev)
            if len(msg) > self.MAX_DATAGRAM:
                failed += 1
                continue
            try:
                self._sock.sendto(msg, self._addr)
            except OSError:  # buffer full (EAGAIN), ICMP unreachable from an earlier send...
                failed += 1
        self.dropped += failed
        self.written += len(batch) - failed

    async def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


class HttpSink(Sink):
    """SIEM webhook: POST each batch as NDJSON; non-2xx and timeouts count as errors."""

    name = "http"

    def __init__(self, url: str, timeout_s: float = 2.0) -> None:
        super().__init__()
        self.url = url
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))

    async def write(self, batch: Sequence[Event]) -> None:
        if self._session is None:
            await self.open()
        assert self._session is not None
        body = ("\n".join(ev.line for ev in batch) + "\n").encode()
        headers = {"Content-Type": "application/x-ndjson"}
        async with self._session.post(self.url, data=body, headers=headers) as resp:
            if resp.status >= 300:
                raise RuntimeError(f"HTTP {resp.status} from {self.url}")
        self.written += len(batch)

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


class MemorySink(Sink):
    """Keeps documents in memory, for tests."""

    name = "memory"

    def __init__(self) -> None:
        super().__init__()
        self.events: list[dict[str, Any]] = []  # nested documents, as sent
        self.lines: list[str] = []

    async def write(self, batch: Sequence[Event]) -> None:
        for ev in batch:
            self.lines.append(ev.line)
            self.events.append(json.loads(ev.line))
        self.written += len(batch)


def _syslog_token(text: str, limit: int) -> str:
    """PRINTUSASCII without spaces, as RFC 5424 header fields require; "-" if empty."""
    token = "".join(c if 33 <= ord(c) <= 126 else "_" for c in text)[:limit]
    return token or "-"


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

    # ---- producer side (synchronous, O(1), never blocks) ---------------------------------

    def emit(self, action: str, **fields: Any) -> bool:
        """Queue an event; False if the queue was full (the event is dropped and counted).

        Bare keyword names map to ECS (outcome, reason, source_ip, source_port,
        trace_id, ...) or else to ``jvpn.<name>``; dotted names are used as is.
        None values are omitted.
        """
        kind, category, type_, outcome = _ACTIONS.get(action, _DEFAULT_ACTION)
        # The nested document is built here, in the order the flat keys would have
        # (to_document of the flat fields gives the same document): a reattach emits
        # two events, and nesting afterwards cost more than all the rest of emitting.
        doc: dict[str, Any] = {
            "@timestamp": _timestamp(self._clock()),
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
        ev = Event(doc)
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
