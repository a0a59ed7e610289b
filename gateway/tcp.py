"""The TCP listener: framed messages in and out, the PROXY header, and the limits a peer meets.

Theory of operation. Each accepted connection is one peer of the machine,
``Peer(TCP, address, connection number)``; its bytes are cut into frames by
``session.stream.FramedStream`` and each frame goes to ``GatewayNode.on_message``
(which hands it to the machine); the node writes the machine's answers back with
``TcpListener.send``. This module decides nothing about sessions: it only bounds
what a connection may hold.

TCP connections are a resource an unauthenticated peer can hold, so the listener
bounds them (``TcpLimits``; the machine never sees a refused or timed-out
connection): a cap on open connections, lowered to what the process's descriptor
limit leaves, and one per source address (over either, the new connection is
closed at once); a deadline for the first whole frame and an idle deadline, one
timer per connection that a frame never touches (it stamps the time; the timer
re-arms from the stamp when it fires); and write back-pressure: above a
high-water mark the connection's frames are dropped, and a peer that stays above
it too long is aborted. Each is counted (``TCP_LIMIT`` drops, and ``QUEUE_FULL``
for the frames dropped) and logged at most every few seconds with the counts.

Behind a balancer the client's address arrives in a PROXY v1 header at the start
of the connection (``gateway.balancer``), believed only from ``trusted_balancers``;
the per-source cap counts the client's address once its header arrived.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from gateway.balancer import PROXY_V1_SIGNATURE, parse_proxy_v1
from session import wire
from session.binding import Peer
from session.errors import DecodeError
from session.reasons import DropReason
from session.stream import FramedStream

if TYPE_CHECKING:
    from gateway.node import GatewayNode

log = logging.getLogger("jvpn.gateway")

FD_RESERVE = 64  # descriptors kept back from TCP: listeners, store, admin, logs, children
FDS_PER_TCP = 2  # a TCP session's connection and its upstream socket
LIMIT_LOG_INTERVAL_S = 5.0  # TCP limit reports at most this often (with the counts)


@dataclass(frozen=True, slots=True)
class TcpLimits:
    """What one TCP peer may hold (gateway config ``tcp_*``)."""

    max_connections: int = 1024  # lowered at start to what RLIMIT_NOFILE leaves
    max_per_source: int = 16  # 0 = no per-source limit
    first_frame_timeout: float = 5.0
    idle_timeout: float = 60.0
    write_buffer: int = 256 * 1024  # the transport's high-water mark
    write_stall: float = 10.0  # longest stay above the mark

    @property
    def write_buffer_max(self) -> int:
        """Never more queued than this (above the mark nothing is written: one frame over)."""
        return 2 * self.write_buffer + wire.FRAME_HEAD.size + 0xFFFF


def fd_bounded_cap(wanted: int) -> int:
    """``wanted``, lowered so TCP connections cannot use the descriptors everything else needs."""
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return wanted
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, (soft - FD_RESERVE) // FDS_PER_TCP))

class LimitReport:
    """TCP limit events, logged at most every LIMIT_LOG_INTERVAL_S, each kind with its count."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.last = float("-inf")  # loop time of the last report
        self.handle: asyncio.TimerHandle | None = None

    def note(self, what: str) -> None:
        self.counts[what] += 1
        if self.handle is not None:
            return  # a report is due: this joins it
        loop = asyncio.get_running_loop()
        wait = self.last + LIMIT_LOG_INTERVAL_S - loop.time()
        if wait <= 0:
            self.flush()
        else:
            self.handle = loop.call_later(wait, self.flush)

    def flush(self) -> None:
        """Log what is pending now (at stop, or when the interval is up)."""
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        if not self.counts:
            return
        self.last = asyncio.get_running_loop().time()
        log.warning("TCP limits: %s", ", ".join(f"{n} {what}" for what, n in self.counts.items()))
        self.counts.clear()



class TcpListener:
    """The TCP server and its open connections, by number, within ``TcpLimits``."""

    def __init__(self, node: GatewayNode, limits: TcpLimits) -> None:
        self.node = node
        self.limits = limits
        self.cap = limits.max_connections  # set from the fd limit by start()
        self.conns: dict[int, TcpConnection] = {}
        self.per_source: dict[str, int] = {}  # open connections by source address
        self.address: tuple[str, int] | None = None
        self._server: asyncio.base_events.Server | None = None
        self._next_conn = 1
        self._report = LimitReport()

    async def start(self, addr: tuple[str, int]) -> None:
        """Listen on ``addr``, with the connection cap the descriptor limit leaves."""
        self.cap = fd_bounded_cap(self.limits.max_connections)
        if self.cap < self.limits.max_connections:
            log.warning("tcp_max_connections %d lowered to %d: the descriptor limit "
                        "(RLIMIT_NOFILE, ulimit -n) leaves no more",
                        self.limits.max_connections, self.cap)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: TcpConnection(self.node, self),
                                                addr[0], addr[1])
        self.address = self._server.sockets[0].getsockname()[:2]

    def close(self) -> None:
        """Stop listening and close every connection (the pending limit report is logged)."""
        if self._server is not None:
            self._server.close()
            for conn in list(self.conns.values()):
                conn.shut()
        self._report.flush()

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_closed()

    def send(self, conn: int, data: bytes) -> bool:
        """One frame to connection ``conn``; False if it closed or its peer does not keep up."""
        c = self.conns.get(conn)
        return c is not None and c.write_frame(data)

    def register(self, proto: TcpConnection, source: str | None) -> int:
        """Register an accepted connection; 0 (and counted, reported) if over a cap.

        ``source`` None: not counted per source yet (a balancer's connection, whose
        client address comes with its PROXY header: ``claim_source``).
        """
        if len(self.conns) >= self.cap:
            self.limited(f"refused over the connection cap ({self.cap})")
            return 0
        if source is not None and not self.claim_source(source):
            return 0
        cid = self._next_conn
        self._next_conn += 1
        self.conns[cid] = proto
        return cid

    def claim_source(self, source: str) -> bool:
        """Count one more connection from ``source``; False (counted, reported) if over its cap."""
        lim = self.limits
        n = self.per_source.get(source, 0)
        if lim.max_per_source and n >= lim.max_per_source:
            self.limited(f"refused over the per-source cap ({lim.max_per_source})")
            return False
        self.per_source[source] = n + 1
        return True

    def closed(self, cid: int, source: str) -> None:
        """Connection ``cid`` is gone: forget it, and one connection of its source."""
        if self.conns.pop(cid, None) is None:
            return
        n = self.per_source.get(source, 0) - 1
        if n > 0:
            self.per_source[source] = n
        else:
            self.per_source.pop(source, None)

    def limited(self, what: str) -> None:
        """A connection refused or closed by a limit: counted, and reported (throttled)."""
        self.node.metrics.count_drop(DropReason.TCP_LIMIT, wire.TransportKind.TCP)
        self._report.note(what)


class TcpConnection(FramedStream, asyncio.Protocol):
    """One TCP connection: frames to the node, frames back, within the node's TcpLimits."""

    def __init__(self, node: GatewayNode, listener: TcpListener) -> None:
        self.node = node
        self.listener = listener
        self.limits = listener.limits
        self.peer: Peer | None = None
        self.conn = 0
        self.source = ""
        self.tx: asyncio.Transport | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.last_frame = -1.0  # loop time of the last whole frame; < 0: none yet
        self.deadline: asyncio.TimerHandle | None = None  # first frame, then idle
        self.stall: asyncio.TimerHandle | None = None  # set while writing is paused
        self.paused = False
        self.proxy_header: bytearray | None = None  # from a balancer, until its PROXY header
        self.first_data = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tx = cast(asyncio.Transport, transport)
        addr = tx.get_extra_info("peername")
        balancer = bool(addr) and self.node.trusted.trusts(str(addr[0]))
        self.source = str(addr[0]) if addr and not balancer else ""
        self.conn = self.listener.register(self, None if balancer else self.source) if addr else 0
        if not self.conn:
            tx.abort()  # at once: the descriptor is free on the next loop turn
            return
        self.transport = self.tx = tx
        tx.set_write_buffer_limits(high=self.limits.write_buffer)
        if balancer:  # the peer is known once the PROXY header names the client
            self.proxy_header = bytearray()
        else:
            self.peer = Peer(wire.TransportKind.TCP, (addr[0], addr[1]), self.conn)
        self.loop = asyncio.get_running_loop()
        self.deadline = self.loop.call_later(self.limits.first_frame_timeout, self._check_deadline)

    def data_received(self, data: bytes) -> None:
        if self.tx is None or self.tx.is_closing():
            return
        if self.proxy_header is not None:
            data = self._proxy_header(data)
            if not data:
                return
        elif self.first_data:
            self.first_data = False
            if data[:len(PROXY_V1_SIGNATURE)] == PROXY_V1_SIGNATURE[:len(data)]:
                self.node.prefix_dropped(DropReason.UNTRUSTED_PREFIX, wire.TransportKind.TCP,
                                         self.source)
                self.shut(abort=True)
                return
        super().data_received(data)

    def _proxy_header(self, data: bytes) -> bytes:
        """Collect the balancer's PROXY v1 header; the bytes after it (b"" until then)."""
        assert self.proxy_header is not None and self.tx is not None
        buf = self.proxy_header
        buf += data
        peer = self.tx.get_extra_info("peername")
        try:
            res = parse_proxy_v1(bytes(buf))
        except ValueError:
            res, client = None, None
        else:
            if res is None:
                return b""  # incomplete (bounded by the length cap and the first-frame deadline)
            client = res[0]
        if res is None or client is None:
            self.proxy_header = None
            self.node.prefix_dropped(DropReason.MISSING_PREFIX, wire.TransportKind.TCP,
                                     str(peer[0]) if peer else "")
            self.shut(abort=True)
            return b""
        rest = bytes(buf[res[1]:])
        self.proxy_header = None
        self.first_data = False
        if not self.listener.claim_source(client[0]):
            self.shut(abort=True)
            return b""
        self.source = client[0]
        self.peer = Peer(wire.TransportKind.TCP, client, self.conn)
        return rest

    def frame_received(self, frame: bytes) -> None:
        if self.peer is None or self.loop is None:
            return  # refused
        self.last_frame = self.loop.time()
        self.node.on_message(frame, self.peer)

    def framing_failed(self, error: DecodeError) -> None:
        self.node.metrics.count_drop(error.reason, wire.TransportKind.TCP)

    def _check_deadline(self) -> None:
        """The first frame is late, or the connection fell silent: close it; else re-arm."""
        self.deadline = None
        if self.tx is None or self.loop is None or self.tx.is_closing():
            return
        if self.last_frame < 0:
            self._limit(f"closed without a frame within {self.limits.first_frame_timeout:g}s")
            return
        due = self.last_frame + self.limits.idle_timeout
        now = self.loop.time()
        if now >= due:
            self._limit(f"closed idle for {self.limits.idle_timeout:g}s")
            return
        self.deadline = self.loop.call_later(due - now, self._check_deadline)

    def write_frame(self, data: bytes) -> bool:
        """Write one frame; False if it was not (closing, or the peer does not keep up)."""
        tx = self.tx
        if tx is None or tx.is_closing():
            return False
        if self.paused:
            self.node.metrics.count_drop(DropReason.QUEUE_FULL, wire.TransportKind.TCP)
            return False
        if tx.get_write_buffer_size() > self.limits.write_buffer_max:  # a transport that
            self._limit("aborted over the write buffer cap")  # never paused us
            return False
        self.send_frame(data)
        return True

    def pause_writing(self) -> None:
        self.paused = True
        if self.stall is None and self.loop is not None:
            self.stall = self.loop.call_later(self.limits.write_stall, self._stalled)

    def resume_writing(self) -> None:
        self.paused = False
        if self.stall is not None:
            self.stall.cancel()
            self.stall = None

    def _stalled(self) -> None:
        self.stall = None
        if self.paused and self.tx is not None and not self.tx.is_closing():
            self._limit(f"aborted not reading for {self.limits.write_stall:g}s")

    def _limit(self, what: str) -> None:
        self.listener.limited(what)
        self.shut(abort=True)

    def shut(self, abort: bool = False) -> None:
        """Close (abort: at once, queued bytes dropped; so is a paused connection's close)."""
        if self.tx is None:
            return
        if abort or self.paused:
            self.tx.abort()
        else:
            self.tx.close()

    def connection_lost(self, exc: Exception | None) -> None:
        for handle in (self.deadline, self.stall):
            if handle is not None:
                handle.cancel()
        self.deadline = self.stall = None
        self.paused = False
        if self.conn:
            self.listener.closed(self.conn, self.source)

