"""A gateway node: the asyncio adapter around the gateway machine (``session.gateway``).

Theory of operation. The machine decides everything; this module only moves
bytes and answers between it and the world. Every datagram and TCP frame goes
to ``GatewayMachine.receive`` with the time; after every input the machine's
effects are executed in order: bytes to a peer (a UDP address or one TCP
connection), a store operation (run on the store, its answer fed back with
``store_answered``), a payload to a session's upstream UDP socket (opened on
first use), an upstream to close. One timer task calls ``handle_timer`` when
the machine asks; one task follows the store's move notices. A store call is
a future: a reattach's CAS is queued on the store's batcher without a task
(``SessionStore.reattach_soon``), every other call is a task; either way its
answer re-enters the machine from the future's callback, the same path with
tracing on or off.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from functools import partial
from typing import Any

from gateway.events import EventBus
from gateway.metrics import Metrics
from gateway.tracing import NOOP_SPAN, SpanCtx, Tracing
from session import wire
from session.binding import Binding, Peer
from session.errors import DecodeError
from session.gateway import (
    CloseUpstream,
    GatewayMachine,
    GatewaySettings,
    Send,
    StoreCall,
    ToUpstream,
)
from session.reasons import DropReason, TerminateReason
from session.storeops import (
    BirthOp,
    ClaimHandshakeOp,
    GetClientOp,
    GetRecordOp,
    PublishMoveOp,
    ReattachOp,
    RefreshOp,
    ServerTimeOp,
    StoreFailure,
    SweepOp,
    TerminateOp,
    TransitionOp,
)
from session.stream import FramedStream
from store.api import SessionStore
from store.errors import StoreError, StoreUnavailable

log = logging.getLogger("jvpn.gateway")

UDP_SOCKET_BUFFER = 4 << 20  # bytes asked for the listener's receive and send buffers
PEER_CACHE_MAX = 100_000
UPSTREAM_BACKLOG = 64  # payloads held per session while its upstream socket opens
TIMER_MAX_SLEEP_S = 0.5
NodeSettings = GatewaySettings  # the name the app and the tests use


class GatewayNode:
    """One stateless gateway process: listeners, the store, the machine between them."""

    def __init__(self, settings: GatewaySettings, store: SessionStore, static_priv: bytes,
                 kek: bytes, events: EventBus, metrics: Metrics,
                 clock: Callable[[], float] = time.monotonic,
                 tracing: Tracing | None = None) -> None:
        self.settings = settings
        self.store = store
        self.events = events
        self.metrics = metrics
        self.clock = clock
        self.tracing = tracing or Tracing.disabled(settings.node_id)
        self.machine = GatewayMachine(settings, static_priv, kek, metrics=metrics, events=events,
                                      tracer=self.tracing, random=secrets.token_bytes)
        self._ops = _store_ops(store)
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.base_events.Server | None = None
        self._conns: dict[int, _TcpProtocol] = {}
        self._next_conn = 1
        self._upstreams: dict[bytes, asyncio.DatagramTransport] = {}
        self._opening: dict[bytes, list[bytes]] = {}
        self._opening_tasks: set[asyncio.Future[Any]] = set()
        self._store_was_ok: bool | None = None
        self._background: list[asyncio.Task[Any]] = []
        self._stopping = False
        self.udp_address: tuple[str, int] | None = None
        self.tcp_address: tuple[str, int] | None = None
        metrics.sessions_callback = self.machine.sessions_by_state

    # ---- what the app and the tests read ----------------------------------------------------

    @property
    def bindings(self) -> dict[bytes, Binding]:
        return self.machine.bindings

    @property
    def store_ok(self) -> bool:
        return self.machine.health.ok

    @property
    def calls_in_flight(self) -> int:
        return len(self._calls)

    async def ready(self) -> tuple[bool, str]:
        """Readiness for /readyz: the store must answer."""
        h = self.machine.health
        return (h.ok, "ok" if h.ok else f"store unreachable: {h.error}")

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self, udp: tuple[str, int] | None, tcp: tuple[str, int] | None) -> None:
        """Check the store, open the listeners, start the timer and the move notices."""
        loop = asyncio.get_running_loop()
        self.machine.handle_timer(self.clock())  # the first health check, before listening
        self._flush()
        first = next(iter(self._calls.values()), None)
        if first is not None:
            await asyncio.wait([first], timeout=self.store.config.call_timeout_s * 2)
        if udp is not None:
            self._udp, _ = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self), local_addr=udp)
            self.udp_address = self._udp.get_extra_info("sockname")[:2]
            _grow_buffers(self._udp)
        if tcp is not None:
            self._tcp = await loop.create_server(lambda: _TcpProtocol(self), tcp[0], tcp[1])
            self.tcp_address = self._tcp.sockets[0].getsockname()[:2]
        self._background = [
            asyncio.create_task(self._timer_loop(), name="jvpn-timer"),
            asyncio.create_task(self._move_notices(), name="jvpn-move-notices"),
        ]

    async def stop(self) -> None:
        """Close listeners, cancel loops and calls, drop bindings (no store writes)."""
        self._stopping = True  # from here on no input reaches the machine
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            for conn in list(self._conns.values()):
                if conn.transport is not None:
                    conn.transport.close()
        await cancel_bounded([*self._background, *self._calls.values(), *self._opening_tasks])
        if self._tcp is not None:
            await self._tcp.wait_closed()
        self.machine.stop()
        self._flush()
        self._calls.clear()

    async def terminate_session(self, sid: bytes,
                                reason: TerminateReason = TerminateReason.ADMIN) -> None:
        """Administrative terminate: tombstone, authenticated CLOSE to the client."""
        before = set(self._calls)
        self.machine.terminate(sid, reason)
        self._flush()
        mine = [f for cid, f in self._calls.items() if cid not in before]
        if mine:
            await asyncio.wait(mine, timeout=self.store.config.call_timeout_s * 2)

    # ---- inputs ----------------------------------------------------------------------------

    def on_message(self, data: bytes, peer: Peer) -> None:
        """Entry point for every datagram and TCP frame. Never raises."""
        if self._stopping:
            return
        m = self.metrics
        m.rx_packets += 1
        m.rx_bytes += len(data)
        try:
            self.machine.receive(data, peer, self.clock())
        except Exception:  # a bug must not kill the listener: count it, say it
            log.exception("unexpected error handling a message from %s", peer.describe())
            m.count_drop(DropReason.MALFORMED, peer.kind)
        self._flush()

    def from_upstream(self, session_id: bytes, data: bytes) -> None:
        """A reply from the session's upstream target."""
        if self._stopping:
            return
        self.machine.upstream_received(session_id, data, self.clock())
        self._flush()

    def _answered(self, call_id: int, span: SpanCtx, fut: asyncio.Future[Any]) -> None:
        """A store call completed: its answer (or a StoreFailure) goes to the machine."""
        self._calls.pop(call_id, None)
        if self._stopping:
            if not fut.cancelled():
                fut.exception()  # retrieved: nothing is left unread at stop
            span.set(outcome="cancelled")
            span.end()
            return
        exc = None if fut.cancelled() else fut.exception()
        if fut.cancelled():  # not by stop(): the machine must still hear of it (fail closed)
            answer: Any = StoreFailure("store call cancelled")
            span.set(outcome="cancelled")
        elif exc is None:
            answer = fut.result()
            if span is not NOOP_SPAN:
                span.set(outcome=getattr(getattr(answer, "status", None), "name", "OK"))
        elif isinstance(exc, StoreUnavailable):
            answer = StoreFailure(str(exc) or type(exc).__name__)
            span.fail(exc)
        else:  # an answer we cannot read: fail closed, and say so
            log.error("store call failed: %r", exc, exc_info=exc if not isinstance(exc, StoreError)
                      else None)
            answer = StoreFailure(f"{type(exc).__name__}: {exc}", unreadable=True)
            span.fail(exc)
        span.end()
        try:
            self.machine.store_answered(call_id, answer, self.clock())
        except Exception:
            log.exception("store answer handling failed")
        self._flush()

    # ---- effects ---------------------------------------------------------------------------

    def _flush(self) -> None:
        """Execute the machine's effects, in order."""
        for e in self.machine.effects():
            if type(e) is Send:
                self._send(e.peer, e.data)
            elif type(e) is StoreCall:
                self._store_call(e)
            elif type(e) is ToUpstream:
                self._to_upstream(e)
            elif type(e) is CloseUpstream:
                self._close_upstream(e.session_id)

    def _send(self, peer: Peer, data: bytes) -> None:
        if peer.kind is wire.TransportKind.UDP:
            if self._udp is None:
                return
            self._udp.sendto(data, peer.addr)
        else:
            conn = self._conns.get(peer.conn)
            if conn is None:
                return  # that connection closed meanwhile
            conn.send_frame(data)
        self.metrics.tx_packets += 1
        self.metrics.tx_bytes += len(data)

    def _store_call(self, call: StoreCall) -> None:
        op = call.op
        span: SpanCtx = NOOP_SPAN
        if call.span is not None and self.tracing.enabled:
            span = self.tracing.store_call(_OP_NAMES[type(op)], parent=call.span)
        try:
            fut: asyncio.Future[Any] = asyncio.ensure_future(self._ops[type(op)](op))
        except Exception as exc:  # a bad argument: fail closed like an unreadable answer
            fut = asyncio.get_running_loop().create_future()
            fut.set_exception(exc)
        self._calls[call.call_id] = fut
        fut.add_done_callback(partial(self._answered, call.call_id, span))

    def _to_upstream(self, e: ToUpstream) -> None:
        sid = e.session_id
        transport = self._upstreams.get(sid)
        if transport is not None:
            transport.sendto(e.data)
            return
        backlog = self._opening.get(sid)
        if backlog is not None:
            if len(backlog) < UPSTREAM_BACKLOG:
                backlog.append(e.data)
            else:
                self.metrics.count_drop(DropReason.RATE_LIMITED, wire.TransportKind.UDP)
            return
        self._opening[sid] = [e.data]
        task = asyncio.ensure_future(self._open_upstream(sid, e.upstream))
        self._opening_tasks.add(task)
        task.add_done_callback(self._opened)

    def _opened(self, task: asyncio.Future[Any]) -> None:
        self._opening_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("opening an upstream socket failed", exc_info=task.exception())

    async def _open_upstream(self, sid: bytes, addr: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _UpstreamProtocol(self, sid), remote_addr=addr)
        except (OSError, ValueError, OverflowError) as exc:
            log.warning("upstream %s:%s unreachable: %s", addr[0], addr[1], exc)
            dropped = self._opening.pop(sid, None) or []
            for _ in dropped:
                self.metrics.count_drop(DropReason.POLICY, wire.TransportKind.UDP)
            return
        backlog = self._opening.pop(sid, None)
        if backlog is None:  # the binding went away meanwhile
            transport.close()
            return
        self._upstreams[sid] = transport
        for data in backlog:
            transport.sendto(data)

    def _close_upstream(self, sid: bytes) -> None:
        self._opening.pop(sid, None)
        transport = self._upstreams.pop(sid, None)
        if transport is not None:
            transport.close()

    # ---- background ------------------------------------------------------------------------

    async def _timer_loop(self) -> None:
        while True:
            delay = self.machine.get_timer() - self.clock()
            await asyncio.sleep(min(max(0.0, delay), TIMER_MAX_SLEEP_S))
            now = self.clock()
            if now < self.machine.get_timer():
                continue
            try:  # the health check, the lease and the sweeper live here: never die
                self.machine.handle_timer(now)
            except Exception:
                log.exception("gateway timer failed")
            self._flush()
            self._log_store_health()

    def _log_store_health(self) -> None:
        h = self.machine.health
        if h.ok == self._store_was_ok:
            return
        if h.ok:
            log.info("store reachable")
        else:
            log.warning("store unreachable: %s", h.error)
        self._store_was_ok = h.ok

    async def _move_notices(self) -> None:
        """React at once when another node took a binding or an admin ended a session."""
        while True:
            try:
                async for sid, node, epoch in self.store.binding_changes():
                    try:
                        self.machine.binding_moved(sid, node, epoch, self.clock())
                    except Exception:
                        log.exception("move notice handling failed")
                    self._flush()
            except StoreUnavailable:
                await asyncio.sleep(1.0)

    def _new_conn(self, proto: _TcpProtocol) -> int:
        cid = self._next_conn
        self._next_conn += 1
        self._conns[cid] = proto
        return cid


def _store_ops(store: SessionStore) -> dict[type, Callable[[Any], Awaitable[Any]]]:
    """Each store operation of the machine as one SessionStore call."""
    return {
        ReattachOp: store.reattach_soon,
        GetRecordOp: lambda op: store.get(op.session_id),
        GetClientOp: lambda op: store.get_client(op.client_id),
        ClaimHandshakeOp: lambda op: store.claim_handshake(op.digest, op.ttl_ms),
        BirthOp: lambda op: store.birth(
            op.session_id, wrapped_secret=op.wrapped_secret, client_id=op.client_id,
            node=op.node, binding_id=op.binding_id, kind=op.kind, upstream=op.upstream,
            policy=op.policy),
        TransitionOp: lambda op: store.transition(op.session_id, op.expected_version, op.event),
        RefreshOp: lambda op: store.refresh(op.session_id, op.epoch, op.node),
        TerminateOp: lambda op: store.terminate(op.session_id, op.reason),
        PublishMoveOp: lambda op: store.publish_binding_change(op.session_id, op.node, op.epoch),
        ServerTimeOp: lambda op: store.server_time_ms(),
        SweepOp: lambda op: store.sweep(op.limit),
    }


_OP_NAMES: dict[type, str] = {
    ReattachOp: "reattach", GetRecordOp: "get", GetClientOp: "get_client",
    ClaimHandshakeOp: "claim_handshake", BirthOp: "birth", TransitionOp: "transition",
    RefreshOp: "refresh", TerminateOp: "terminate", PublishMoveOp: "publish",
    ServerTimeOp: "time", SweepOp: "sweep",
}


async def cancel_bounded(tasks: Iterable[asyncio.Future[Any]], timeout: float = 3.0) -> None:
    """Cancel ``tasks`` and wait for them, bounded; cancel again while they linger.

    redis-py can swallow a cancellation that lands while a command is being
    sent (its internal wait_for on Python 3.11), so one cancel() is not enough
    for a loop that talks to the store: stop must never hang on it.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pending = {t for t in tasks if not t.done()}
    while pending and loop.time() < deadline:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.2)
    if pending:
        log.warning("%d tasks did not stop within %.1fs", len(pending), timeout)


def _grow_buffers(transport: asyncio.BaseTransport) -> None:
    """Ask for UDP_SOCKET_BUFFER both ways (the kernel caps it at net.core.[rw]mem_max).

    The 208 KiB default holds only ~270 small datagrams: a burst of reattaches
    (a NAT rebinding storm) while the loop is busy would be dropped by the kernel.
    """
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, UDP_SOCKET_BUFFER)
        except OSError:
            pass


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, node: GatewayNode) -> None:
        self.node = node
        self._peers: dict[tuple[str, int], Peer] = {}

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        peer = self._peers.get(addr)
        if peer is None:  # one Peer per address: the machine compares them often
            if len(self._peers) > PEER_CACHE_MAX:
                self._peers.clear()
            peer = self._peers[addr] = Peer(wire.TransportKind.UDP, (addr[0], addr[1]))
        self.node.on_message(data, peer)

    def error_received(self, exc: Exception) -> None:
        log.debug("udp error: %s", exc)


class _TcpProtocol(FramedStream, asyncio.Protocol):
    def __init__(self, node: GatewayNode) -> None:
        self.node = node
        self.peer: Peer | None = None
        self.conn = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        addr = transport.get_extra_info("peername")
        self.conn = self.node._new_conn(self)
        self.peer = Peer(wire.TransportKind.TCP, (addr[0], addr[1]), self.conn)

    def frame_received(self, frame: bytes) -> None:
        assert self.peer is not None
        self.node.on_message(frame, self.peer)

    def framing_failed(self, error: DecodeError) -> None:
        self.node.metrics.count_drop(error.reason, wire.TransportKind.TCP)

    def connection_lost(self, exc: Exception | None) -> None:
        self.node._conns.pop(self.conn, None)


class _UpstreamProtocol(asyncio.DatagramProtocol):
    def __init__(self, node: GatewayNode, session_id: bytes) -> None:
        self.node = node
        self.session_id = session_id

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.node.from_upstream(self.session_id, data)

    def error_received(self, exc: Exception) -> None:
        log.debug("upstream error: %s", exc)
