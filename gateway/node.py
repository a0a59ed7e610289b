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

TCP connections are a resource an unauthenticated peer can hold, so the
adapter bounds them (``TcpLimits``; the machine never sees a refused or timed-out
connection): a cap on open connections, lowered to what the process's
descriptor limit leaves, and one per source address (over either, the new
connection is closed at once); a deadline for the first whole frame and an idle
deadline, one timer per connection that a frame never touches (it stamps the
time; the timer re-arms from the stamp when it fires); and write back-pressure:
above a high-water mark the connection's frames are dropped, and a peer that
stays above it too long is aborted. Each is counted (``TCP_LIMIT`` drops, and
``QUEUE_FULL`` for the frames dropped) and logged at most every few seconds
with the counts.

Behind a balancer the client's address arrives with each message
(``gateway.balancer``): a 24-byte prefix on every UDP datagram, a PROXY v1
header at the start of a TCP connection. It is believed only from
``trusted_balancers``; the Peer then carries the client's address (what the
machine sees) and, for UDP, the balancer's socket to answer to (``via``). The
per-source TCP cap counts the client's address once its header arrived.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import resource
import secrets
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, cast

from gateway import udp_engine
from gateway.balancer import (
    PREFIX_LEN,
    PROXY_V1_SIGNATURE,
    TrustedBalancers,
    has_prefix_magic,
    parse_prefix,
    parse_proxy_v1,
)
from gateway.events import EventBus
from gateway.metrics import Metrics
from gateway.quic import QuicListener
from gateway.tracing import NOOP_SPAN, SpanCtx, Tracing
from netdev.sender import SocketSender
from session import wire
from session.binding import Binding, Peer
from session.errors import DecodeError
from session.gateway import (
    CloseUpstream,
    GatewayMachine,
    GatewaySettings,
    NotLocal,
    Send,
    StoreCall,
    ToTun,
    ToUpstream,
)
from session.reasons import DropReason, TerminateReason
from session.storeops import (
    ActivateOp,
    BirthOp,
    ClaimAddressesOp,
    ClaimHandshakeOp,
    ClaimSlotOp,
    ConfirmKeyOp,
    GetClientOp,
    GetRecordOp,
    PublishMoveOp,
    ReattachOp,
    RefreshOp,
    RekeyOp,
    ReleaseAddressesOp,
    ReleaseSlotOp,
    ServerTimeOp,
    StoreFailure,
    SweepOp,
    TerminateOp,
    TransitionOp,
)
from session.stream import FramedStream
from store.api import SessionStore
from store.errors import StoreError, StoreUnavailable

if TYPE_CHECKING:
    from gateway.l3 import L3Plane

log = logging.getLogger("jvpn.gateway")

UDP_SOCKET_BUFFER = 4 << 20  # bytes asked for the listener's receive and send buffers
PEER_CACHE_MAX = 100_000
UPSTREAM_BACKLOG = 64  # payloads held per session while its upstream socket opens
RESOLVED_TTL_S = 30.0  # how long an upstream name's address is used for new engine flows
RESOLVED_MAX = 1024  # upstream names remembered at most
TIMER_MAX_SLEEP_S = 0.5
NodeSettings = GatewaySettings  # the name the app and the tests use
FD_RESERVE = 64  # descriptors kept back from TCP: listeners, store, admin, logs, children
FDS_PER_TCP = 2  # a TCP session's connection and its upstream socket
RECLAIM_INTERVAL_S = 60.0  # inner addresses of ended sessions whose release was lost
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


class GatewayNode:
    """One stateless gateway process: listeners, the store, the machine between them."""

    def __init__(self, settings: GatewaySettings, store: SessionStore, static_priv: bytes,
                 kek: bytes, events: EventBus, metrics: Metrics,
                 clock: Callable[[], float] = time.monotonic,
                 tracing: Tracing | None = None, tcp_limits: TcpLimits | None = None,
                 trusted_balancers: TrustedBalancers | None = None,
                 engine: bool = False) -> None:
        self.settings = settings
        self.store = store
        self.events = events
        self.metrics = metrics
        self.clock = clock
        self.tracing = tracing or Tracing.disabled(settings.node_id)
        # os.urandom: what secrets.token_bytes calls, without its two Python frames per call
        self.machine = GatewayMachine(settings, static_priv, kek, metrics=metrics, events=events,
                                      tracer=self.tracing, random=os.urandom)
        self._ops = _store_ops(store)
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.base_events.Server | None = None
        self._conns: dict[int, _TcpProtocol] = {}
        self._next_conn = 1
        self.tcp_limits = tcp_limits or TcpLimits()
        self.trusted = trusted_balancers or TrustedBalancers()
        self._prefix_logged = float("-inf")  # loop time of the last prefix problem logged
        self.tcp_cap = self.tcp_limits.max_connections  # set from the fd limit by start()
        self._per_source: dict[str, int] = {}  # open connections by source address
        self._tcp_report = _LimitReport()
        # one upstream socket per (session, flow): a flow is one local source at the agent
        self._upstreams: dict[tuple[bytes, int], asyncio.DatagramTransport] = {}
        self._opening: dict[tuple[bytes, int], list[bytes]] = {}
        self._resolved: dict[str, tuple[str, float]] = {}  # name -> (address, until)
        self._resolving: set[str] = set()
        self._flows: dict[bytes, set[int]] = {}  # session -> its flows with a socket
        self._opening_tasks: set[asyncio.Future[Any]] = set()
        self._store_was_ok: bool | None = None
        self._background: list[asyncio.Task[Any]] = []
        self._stopping = False
        self.l3: L3Plane | None = None  # L3 mode: the node's TUN, egress and relay (gateway/l3.py)
        self.udp_address: tuple[str, int] | None = None
        self.tcp_address: tuple[str, int] | None = None
        self.quic: QuicListener | None = None  # gateway.quic, when a QUIC listener is asked for
        self.quic_address: tuple[str, int] | None = None
        # the compiled UDP data path (gateway/udp_engine.py), when asked for and possible
        self.want_engine = engine
        self.engine: Any = None
        self._mirror: udp_engine.EngineMirror | None = None
        self._mirror_all_due = False  # a refresh of the lease is scheduled (_mirror_sync_soon)
        self._udp_proto: _UdpProtocol | None = None
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

    async def start(self, udp: tuple[str, int] | None, tcp: tuple[str, int] | None,
                    quic: tuple[tuple[str, int], QuicListener] | None = None) -> None:
        """Check the store, open the listeners, start the timer and the move notices."""
        loop = asyncio.get_running_loop()
        self.machine.handle_timer(self.clock())  # the first health check, before listening
        self._flush()
        first = next(iter(self._calls.values()), None)
        if first is not None:
            await asyncio.wait([first], timeout=self.store.config.call_timeout_s * 2)
        if udp is not None and self.want_engine:
            self._start_engine(loop, udp)
        elif udp is not None:
            self._udp, _ = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self), local_addr=udp)
            self.udp_address = self._udp.get_extra_info("sockname")[:2]
            _grow_buffers(self._udp)
        if tcp is not None:
            self.tcp_cap = fd_bounded_cap(self.tcp_limits.max_connections)
            if self.tcp_cap < self.tcp_limits.max_connections:
                log.warning("tcp_max_connections %d lowered to %d: the descriptor limit "
                            "(RLIMIT_NOFILE, ulimit -n) leaves no more",
                            self.tcp_limits.max_connections, self.tcp_cap)
            self._tcp = await loop.create_server(lambda: _TcpProtocol(self), tcp[0], tcp[1])
            self.tcp_address = self._tcp.sockets[0].getsockname()[:2]
        if quic is not None:
            addr, listener = quic
            tx, _ = await loop.create_datagram_endpoint(lambda: listener, local_addr=addr)
            self.quic = listener
            self.quic_address = tx.get_extra_info("sockname")[:2]
            _grow_buffers(tx)
        self._background = [
            asyncio.create_task(self._timer_loop(), name="jvpn-timer"),
            asyncio.create_task(self._move_notices(), name="jvpn-move-notices"),
        ]
        if self.settings.inner_pool is not None:
            self._background.append(asyncio.create_task(self._reclaim_loop(),
                                                        name="jvpn-address-reclaim"))

    async def stop(self) -> None:
        """Close listeners, cancel loops and calls, drop bindings (no store writes)."""
        self._stopping = True  # from here on no input reaches the machine
        if self.engine is not None:
            asyncio.get_running_loop().remove_reader(self.engine.fileno())
            self._mirror = None  # nothing reaches the stopped engine any more
            self.engine.stop()
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            for conn in list(self._conns.values()):
                conn.shut()
        if self.quic is not None:
            self.quic.close()
        self._tcp_report.flush()
        await cancel_bounded([*self._background, *self._calls.values(), *self._opening_tasks])
        if self._tcp is not None:
            await self._tcp.wait_closed()
        self.machine.stop(self.clock())
        self._flush()
        self._calls.clear()

    async def terminate_session(self, sid: bytes,
                                reason: TerminateReason = TerminateReason.ADMIN) -> None:
        """Administrative terminate: tombstone, authenticated CLOSE to the client."""
        before = set(self._calls)
        self.machine.terminate(sid, reason)
        self._flush()
        self._mirror_sync(sid)
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

    def from_upstream(self, session_id: bytes, data: bytes, flow: int = 0) -> None:
        """A reply from the session's upstream target (to one flow of the agent)."""
        if self._stopping:
            return
        self.machine.upstream_received(session_id, data, self.clock(), flow)
        self._flush()

    def _answered(self, call_id: int, span: SpanCtx, sid: bytes | None,
                  fut: asyncio.Future[Any]) -> None:
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
        if self._mirror is not None:
            if sid is not None:
                self._mirror.sync(sid)
            else:
                self._mirror_sync_soon()

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
            elif type(e) is ToTun:
                if self.l3 is not None:
                    self.l3.to_tun(e)
            elif type(e) is NotLocal:
                if self.l3 is not None:
                    self.l3.not_local(e)

    def _send(self, peer: Peer, data: bytes) -> None:
        if peer.kind is wire.TransportKind.UDP:
            if self._udp is None:
                return
            self._udp.sendto(data, peer.send_addr)
        elif peer.kind is wire.TransportKind.QUIC:
            if self.quic is None or not self.quic.send(peer.conn, data):
                return  # that connection closed meanwhile
        else:
            conn = self._conns.get(peer.conn)
            if conn is None or not conn.write_frame(data):
                return  # that connection closed meanwhile, or its peer does not keep up
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
        # The engine is told of the one session the answer concerns; an answer about no
        # session (the health check: the lease moves for all; the sweeper) refreshes them all.
        sid: bytes | None = getattr(op, "session_id", None)
        fut.add_done_callback(partial(self._answered, call.call_id, span, sid))

    def _to_upstream(self, e: ToUpstream) -> None:
        sid = (e.session_id, e.flow)
        target = None
        if self._mirror is not None and sid not in self._upstreams and sid not in self._opening:
            target = self._engine_target(e.upstream)
        if target is not None:
            # the engine opens and reads installed bindings' upstreams, one socket per flow
            # (0: plain PAYLOADs), and from then on carries that flow both ways by itself
            assert self._mirror is not None
            self._mirror.sync(e.session_id)
            try:
                self.engine.to_upstream(e.session_id, target, e.data, e.flow)
                return
            except (OSError, ValueError) as exc:
                if e.session_id in self._mirror.installed:  # else TCP/QUIC: the asyncio path below
                    log.warning("upstream %s:%s unreachable: %s", e.upstream[0], e.upstream[1], exc)
                    self.metrics.count_drop(DropReason.POLICY, wire.TransportKind.UDP)
                    return
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
        flows = self._flows.setdefault(e.session_id, set())
        if len(flows) >= wire.MAX_FLOWS + 1:  # flow ids are bounded on the wire too
            self.metrics.count_drop(DropReason.RATE_LIMITED, wire.TransportKind.UDP)
            return
        flows.add(e.flow)
        self._opening[sid] = [e.data]
        task = asyncio.ensure_future(self._open_upstream(sid, e.upstream))
        self._opening_tasks.add(task)
        task.add_done_callback(self._opened)

    def _engine_target(self, upstream: tuple[str, int]) -> tuple[str, int] | None:
        """The upstream as an address the compiled engine can open (it resolves no names):
        an address as it is; a name from what it resolved to within ``RESOLVED_TTL_S``,
        else None (this flow takes the asyncio path, which resolves it, and the name is
        looked up for the flows after it)."""
        host, port = upstream
        try:
            ipaddress.ip_address(host)
            return upstream
        except ValueError:
            pass
        now = time.monotonic()
        known = self._resolved.get(host)
        if known is not None and known[1] > now:
            return (known[0], port)
        if host not in self._resolving and (known is not None or len(self._resolved) < RESOLVED_MAX):
            self._resolving.add(host)
            task = asyncio.ensure_future(self._resolve(host, port))
            self._opening_tasks.add(task)
            task.add_done_callback(self._opened)
        return None

    async def _resolve(self, host: str, port: int) -> None:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_DGRAM)
        except OSError as exc:
            log.warning("upstream %s: not resolved: %s", host, exc)
            return
        finally:
            self._resolving.discard(host)
        if infos:
            self._resolved[host] = (str(infos[0][4][0]), time.monotonic() + RESOLVED_TTL_S)

    def _opened(self, task: asyncio.Future[Any]) -> None:
        self._opening_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("opening an upstream socket failed", exc_info=task.exception())

    async def _open_upstream(self, sid: tuple[bytes, int], addr: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _UpstreamProtocol(self, sid[0], sid[1]), remote_addr=addr)
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

    def _close_upstream(self, session_id: bytes) -> None:
        if self._mirror is not None:
            self.engine.close_upstream(session_id)
            self._mirror.sync(session_id)  # the machine dropped the binding: out of the engine
        for flow in self._flows.pop(session_id, ()):
            sid = (session_id, flow)
            self._opening.pop(sid, None)
            transport = self._upstreams.pop(sid, None)
            if transport is not None:
                transport.close()

    # ---- the compiled UDP data path (gateway/udp_engine.py) -----------------------------------

    def _start_engine(self, loop: asyncio.AbstractEventLoop, udp: tuple[str, int]) -> None:
        import jvpn_dataplane

        family = socket.AF_INET6 if ":" in udp[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind(udp)
            for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                sock.setsockopt(socket.SOL_SOCKET, opt, UDP_SOCKET_BUFFER)
            self.engine = jvpn_dataplane.GatewayEngine(sock.fileno(), udp_engine.QUEUE_MAX)
            # behind these the engine reads the client's address from each datagram's prefix
            self.engine.set_trusted_balancers(
                [(n.network_address.packed, n.prefixlen) for n in self.trusted.networks])
        except BaseException:
            sock.close()
            raise
        self._udp = cast(asyncio.DatagramTransport, SocketSender(
            sock, lambda: self.metrics.count_drop(DropReason.QUEUE_FULL, wire.TransportKind.UDP)))
        self._udp_proto = _UdpProtocol(self)
        self._mirror = udp_engine.EngineMirror(self.engine, self.machine,
                                               jvpn_dataplane.DataChannel)
        self.udp_address = sock.getsockname()[:2]
        loop.add_reader(self.engine.fileno(), self._engine_ready)
        log.info("udp data path: compiled engine (batched system calls on its own thread)")

    def _engine_ready(self) -> None:
        """Items the engine handed up: to the machine, as from the socket or an upstream."""
        assert self._mirror is not None and self._udp_proto is not None
        touched: set[bytes] = set()
        for kind, a, b in self.engine.drain(udp_engine.DRAIN_MAX):
            if kind == 0:
                self._udp_proto.datagram_received(a, b)
                # a datagram with the magic came from a trusted balancer (the engine drops
                # it from anyone else): the message starts after the prefix
                at = PREFIX_LEN if has_prefix_magic(a) else 0
                if len(a) >= at + wire.HEADER_LEN:
                    touched.add(a[at + 4:at + wire.HEADER_LEN])
            elif kind == 2:  # from the TUN, for no binding the engine carries
                if self.l3 is not None:
                    self.l3._from_tun(a)
            elif kind == 3:  # a reply from one flow's upstream (UDP-forward mode)
                flow, data = b
                self.from_upstream(a, data, flow)
                touched.add(a)
            else:
                self.from_upstream(a, b)
                touched.add(a)
        for sid in touched:
            self._mirror.sync(sid)

    def engine_stats(self) -> None:
        """Bring what the compiled engine forwarded into the bindings (before reading them)."""
        if self._mirror is not None:
            self._mirror.pull_active()

    def _mirror_sync_soon(self) -> None:
        """Refresh the node's lease and the engine's counters once the answers of this loop
        iteration are in, not once per answer about no session (the health check, the
        registry, the sweeper): when a client's registry entry goes stale, each of its
        reattaches in flight reads it. (A binding the machine changed is refreshed on its
        own: no answer walks every binding.)"""
        if not self._mirror_all_due:
            self._mirror_all_due = True
            asyncio.get_running_loop().call_soon(self._mirror_sync_due)

    def _mirror_sync_due(self) -> None:
        self._mirror_all_due = False
        self._mirror_sync()

    def _mirror_sync(self, sid: bytes | None = None) -> None:
        """Refresh the engine: one session's binding and the node's lease; without a session
        (the timer) the lease and the engine's counters. Never a walk of every binding."""
        mirror = self._mirror
        if mirror is None:
            return
        mirror.refresh_lease()
        if sid is not None:
            mirror.sync(sid)
            return
        delta = mirror.counters_delta()
        m = self.metrics
        m.rx_packets += delta["rx_packets"] - delta["handed_up_datagrams"]  # those: on_message
        m.rx_bytes += delta["rx_bytes"] - delta["handed_up_bytes"]
        m.tx_packets += delta["tx_packets"]
        m.tx_bytes += delta["tx_bytes"]
        for reason, n in udp_engine.drop_reasons(delta):
            m.count_drop(reason, wire.TransportKind.UDP, n)
            if reason in (DropReason.MISSING_PREFIX, DropReason.UNTRUSTED_PREFIX):
                # the engine counts them; which address sent them is not kept per packet
                self._log_prefix_drop(reason, wire.TransportKind.UDP, f"({n} seen by the engine)")
        for why, n in udp_engine.tunnel_drops(delta):
            self.machine.tunnel_dropped(why, wire.TransportKind.UDP, n)
        if self.l3 is not None and delta.get("tun_write_errors"):
            self.l3.counts["tun_write_errors"] += delta["tun_write_errors"]
        m.engine = mirror.totals

    # ---- background ------------------------------------------------------------------------

    async def _timer_loop(self) -> None:
        while True:
            delay = self.machine.get_timer() - self.clock()
            await asyncio.sleep(min(max(0.0, delay), TIMER_MAX_SLEEP_S))
            now = self.clock()
            if now < self.machine.get_timer():
                continue
            if self._mirror is not None:
                self._mirror.pull_active()  # what the engine forwarded: the silence timers see it
            try:  # the health check, the lease and the sweeper live here: never die
                self.machine.handle_timer(now)
            except Exception:
                log.exception("gateway timer failed")
            self._flush()
            self._mirror_sync()
            self._log_store_health()

    async def _reclaim_loop(self) -> None:
        """Free the inner addresses of sessions whose release was lost (a node died between
        a session's end and its release); every node, idempotent, about once a minute."""
        while True:
            await asyncio.sleep(RECLAIM_INTERVAL_S * (0.5 + secrets.randbelow(1000) / 1000))
            try:
                freed = await self.store.reclaim_addresses(grace_ms=int(RECLAIM_INTERVAL_S * 1000))
            except StoreError as exc:
                log.debug("address reclaim: %s", exc)
                continue
            if freed:
                log.info("reclaimed the inner addresses of %d ended sessions", freed)

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
                        if self.l3 is not None:
                            self.l3.binding_moved(sid)  # its owner cache (routed relay)
                    except Exception:
                        log.exception("move notice handling failed")
                    self._flush()
                    self._mirror_sync(sid)
            except StoreUnavailable:
                await asyncio.sleep(1.0)

    # ---- TCP connections --------------------------------------------------------------------

    def _new_conn(self, proto: _TcpProtocol, source: str | None) -> int:
        """Register an accepted connection; 0 (and counted, reported) if over a cap.

        ``source`` None: not counted per source yet (a balancer's connection, whose
        client address comes with its PROXY header: ``claim_source``).
        """
        if len(self._conns) >= self.tcp_cap:
            self.tcp_limited(f"refused over the connection cap ({self.tcp_cap})")
            return 0
        if source is not None and not self.claim_source(source):
            return 0
        cid = self._next_conn
        self._next_conn += 1
        self._conns[cid] = proto
        return cid

    def claim_source(self, source: str) -> bool:
        """Count one more connection from ``source``; False (counted, reported) if over its cap."""
        lim = self.tcp_limits
        n = self._per_source.get(source, 0)
        if lim.max_per_source and n >= lim.max_per_source:
            self.tcp_limited(f"refused over the per-source cap ({lim.max_per_source})")
            return False
        self._per_source[source] = n + 1
        return True

    def prefix_dropped(self, reason: DropReason, kind: wire.TransportKind, source: str) -> None:
        """A message dropped for its client-address prefix: counted; logged at most every 5 s."""
        self.metrics.count_drop(reason, kind)
        self._log_prefix_drop(reason, kind, source)

    def _log_prefix_drop(self, reason: DropReason, kind: wire.TransportKind, source: str) -> None:
        now = time.monotonic()
        if now - self._prefix_logged >= LIMIT_LOG_INTERVAL_S:
            self._prefix_logged = now
            if reason is DropReason.MISSING_PREFIX:
                log.warning("%s from trusted balancer %s without the client's address: dropped "
                            "(is jvpn.filter / proxy_protocol on in nginx?)", kind.name, source)
            else:
                log.warning("%s client-address prefix from %s, not a trusted balancer: dropped",
                            kind.name, source)

    def _conn_closed(self, cid: int, source: str) -> None:
        if self._conns.pop(cid, None) is None:
            return
        n = self._per_source.get(source, 0) - 1
        if n > 0:
            self._per_source[source] = n
        else:
            self._per_source.pop(source, None)

    def tcp_limited(self, what: str) -> None:
        """A connection refused or closed by a limit: counted, and reported (throttled)."""
        self.metrics.count_drop(DropReason.TCP_LIMIT, wire.TransportKind.TCP)
        self._tcp_report.note(what)


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
            policy=op.policy, wrapped_control=op.wrapped_control, inner=op.inner),
        RekeyOp: lambda op: store.rekey(
            op.session_id, epoch=op.epoch, binding_id=op.binding_id, node=op.node,
            generation=op.generation, wrapped_secret=op.wrapped_secret,
            wrapped_control=op.wrapped_control, new_binding_id=op.new_binding_id),
        ConfirmKeyOp: lambda op: store.confirm_key(op.session_id, op.generation),
        TransitionOp: lambda op: store.transition(op.session_id, op.expected_version, op.event),
        RefreshOp: lambda op: store.refresh(op.session_id, op.epoch, op.node),
        ActivateOp: lambda op: store.activate(op.session_id, op.epoch, op.binding_id, op.node),
        TerminateOp: lambda op: store.terminate(op.session_id, op.reason),
        PublishMoveOp: lambda op: store.publish_binding_change(op.session_id, op.node, op.epoch),
        ServerTimeOp: lambda op: store.server_time_ms(),
        SweepOp: lambda op: store.sweep(op.limit),
        ClaimSlotOp: lambda op: store.claim_slot(op.client_id, op.session_id, op.limit,
                                                 op.end_ms),
        ReleaseSlotOp: lambda op: store.release_slot(op.client_id, op.session_id),
        ClaimAddressesOp: lambda op: store.claim_addresses(op.session_id, op.pool, op.size),
        ReleaseAddressesOp: lambda op: store.release_addresses(op.session_id),
    }


_OP_NAMES: dict[type, str] = {
    ReattachOp: "reattach", GetRecordOp: "get", GetClientOp: "get_client",
    ClaimHandshakeOp: "claim_handshake", BirthOp: "birth", TransitionOp: "transition",
    RefreshOp: "refresh", ActivateOp: "activate", RekeyOp: "rekey",
    ConfirmKeyOp: "confirm_key", TerminateOp: "terminate", PublishMoveOp: "publish",
    ServerTimeOp: "time", SweepOp: "sweep", ClaimSlotOp: "slot", ReleaseSlotOp: "release_slot",
    ClaimAddressesOp: "addr", ReleaseAddressesOp: "addr_free",
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
        self._relayed: dict[tuple[tuple[str, int], tuple[str, int]], Peer] = {}

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        node = self.node
        if node.trusted and node.trusted.trusts(addr[0]):
            parsed = parse_prefix(data)
            if parsed is None:
                node.prefix_dropped(DropReason.MISSING_PREFIX, wire.TransportKind.UDP, addr[0])
                return
            client, data = parsed
            key = (client, (addr[0], addr[1]))
            peer = self._relayed.get(key)
            if peer is None:  # the client's address; answers go to the balancer's socket
                if len(self._relayed) > PEER_CACHE_MAX:
                    self._relayed.clear()
                peer = self._relayed[key] = Peer(wire.TransportKind.UDP, client, via=key[1])
            node.on_message(data, peer)
            return
        if has_prefix_magic(data):  # a client address from someone not allowed to give one
            node.prefix_dropped(DropReason.UNTRUSTED_PREFIX, wire.TransportKind.UDP, addr[0])
            return
        peer = self._peers.get(addr)
        if peer is None:  # one Peer per address: the machine compares them often
            if len(self._peers) > PEER_CACHE_MAX:
                self._peers.clear()
            peer = self._peers[addr] = Peer(wire.TransportKind.UDP, (addr[0], addr[1]))
        node.on_message(data, peer)

    def error_received(self, exc: Exception) -> None:
        log.debug("udp error: %s", exc)


class _LimitReport:
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


class _TcpProtocol(FramedStream, asyncio.Protocol):
    """One TCP connection: frames to the node, frames back, within the node's TcpLimits."""

    def __init__(self, node: GatewayNode) -> None:
        self.node = node
        self.limits = node.tcp_limits
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
        self.conn = self.node._new_conn(self, None if balancer else self.source) if addr else 0
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
        if not self.node.claim_source(client[0]):
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
        self.node.tcp_limited(what)
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
            self.node._conn_closed(self.conn, self.source)


class _UpstreamProtocol(asyncio.DatagramProtocol):
    def __init__(self, node: GatewayNode, session_id: bytes, flow: int = 0) -> None:
        self.node = node
        self.session_id = session_id
        self.flow = flow

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.node.from_upstream(self.session_id, data, self.flow)

    def error_received(self, exc: Exception) -> None:
        log.debug("upstream error: %s", exc)
