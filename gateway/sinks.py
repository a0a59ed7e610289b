"""Where event batches go: JSON lines (stdout, a file), a Redis Stream, syslog, HTTP.

A sink receives batches of serialized events from ``gateway.events.EventBus``.
File and stdout writes run on a private thread per sink, so a stalled pipe or
disk cannot freeze the event loop; a sink still busy with its previous batch
refuses the next one (``SinkBusy``, counted by the bus).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import IO, TYPE_CHECKING, Any

import aiohttp

from gateway.config import EventsConfig
from settings import parse_address, redact_url

log = logging.getLogger("jvpn.events")

if TYPE_CHECKING:
    from gateway.ecs import Event


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
        app = _syslog_token(str(ev.doc.get("service", {}).get("name", "-")), 48)
        header = f"<{pri}>1 {ts} {self._hostname} {app} {self._procid} {msgid} - "
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
                raise RuntimeError(f"HTTP {resp.status} from {redact_url(self.url)}")
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
