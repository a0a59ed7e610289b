"""A gateway node: the asyncio adapter around the gateway machine (``session.gateway``).

Theory of operation. The machine decides everything; this module only moves
bytes and answers between it and the world. Every datagram and TCP frame goes
to ``GatewayMachine.receive`` with the time; after every input the machine's
effects are executed in order: bytes to a peer (a UDP address, one TCP
connection, one QUIC connection), a store operation (run on the store, its
answer fed back with ``store_answered``), a payload to a session's upstream
(``gateway.upstream``, or the compiled engine), an upstream to close, a packet
to the L3 plane. One timer task calls ``handle_timer`` when the machine asks;
one task follows the store's move notices. A store call is a future: a
reattach's CAS and an activation are queued on the store's batcher without a
task (``SessionStore.reattach_soon``, ``activate_soon``), every other call is a
task; either way its
answer re-enters the machine from the future's callback, the same path with
tracing on or off.

The listeners are their own modules, each handing the node messages with their
``Peer``: ``gateway.udp`` (datagrams, the balancer's client-address prefix),
``gateway.tcp`` (framing, the PROXY header, the limits an unauthenticated peer
meets), ``gateway.quic``; with the compiled data path on, ``gateway.udp_engine``
reads the UDP socket and hands up what it does not carry.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from gateway.balancer import TrustedBalancers
from gateway.events import EventBus
from gateway.metrics import Metrics
from gateway.quic import QuicListener
from gateway.store_calls import OP_NAMES, answer_of, cancel_bounded, store_ops
from gateway.tcp import TcpLimits, TcpListener
from gateway.tracing import NOOP_SPAN, SpanCtx, Tracing
from gateway.udp import UdpProtocol, grow_buffers
from gateway.udp_engine import EnginePath
from gateway.upstream import Upstreams
from session import wire
from session.binding import Binding, Peer
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
from store.api import SessionStore
from store.errors import StoreError, StoreUnavailable

if TYPE_CHECKING:
    from gateway.l3 import L3Plane

log = logging.getLogger("jvpn.gateway")

TIMER_MAX_SLEEP_S = 0.5
NodeSettings = GatewaySettings  # the name the app and the tests use
RECLAIM_INTERVAL_S = 60.0  # inner addresses of ended sessions whose release was lost
PREFIX_LOG_INTERVAL_S = 5.0  # client-address prefix problems logged at most this often


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
        self._ops = store_ops(store)
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._udp: asyncio.DatagramTransport | None = None
        self.trusted = trusted_balancers or TrustedBalancers()
        self._prefix_logged = float("-inf")  # loop time of the last prefix problem logged
        self.tcp: TcpListener | None = None  # gateway.tcp, when a TCP listener is asked for
        self.tcp_limits = tcp_limits or TcpLimits()
        self.upstreams = Upstreams(self)  # gateway.upstream
        self._store_was_ok: bool | None = None
        self._background: list[asyncio.Task[Any]] = []
        self._stopping = False
        self.l3: L3Plane | None = None  # L3 mode: the node's TUN, egress and relay (gateway/l3.py)
        self.udp_address: tuple[str, int] | None = None
        self.quic: QuicListener | None = None  # gateway.quic, when a QUIC listener is asked for
        self.quic_address: tuple[str, int] | None = None
        # the compiled UDP data path (gateway/udp_engine.py), when asked for and possible
        self.engine_path = EnginePath(self) if engine else None
        metrics.sessions_callback = self.machine.sessions_by_state

    # ---- what the app and the tests read ----------------------------------------------------

    @property
    def bindings(self) -> dict[bytes, Binding]:
        return self.machine.bindings

    @property
    def engine(self) -> Any:
        """The compiled engine (``jvpn_dataplane.GatewayEngine``) once started, else None."""
        return self.engine_path.engine if self.engine_path is not None else None

    @property
    def tcp_address(self) -> tuple[str, int] | None:
        return self.tcp.address if self.tcp is not None else None

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
        if udp is not None and self.engine_path is not None:
            self._udp, self.udp_address = self.engine_path.start(loop, udp)
        elif udp is not None:
            self._udp, _ = await loop.create_datagram_endpoint(
                lambda: UdpProtocol(self), local_addr=udp)
            self.udp_address = self._udp.get_extra_info("sockname")[:2]
            grow_buffers(self._udp)
        if tcp is not None:
            self.tcp = TcpListener(self, self.tcp_limits)
            await self.tcp.start(tcp)
        if quic is not None:
            addr, listener = quic
            tx, _ = await loop.create_datagram_endpoint(lambda: listener, local_addr=addr)
            self.quic = listener
            self.quic_address = tx.get_extra_info("sockname")[:2]
            grow_buffers(tx)
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
        if self.engine_path is not None:
            self.engine_path.stop()
        if self._udp is not None:
            self._udp.close()
        if self.tcp is not None:
            self.tcp.close()
        if self.quic is not None:
            self.quic.close()
        await cancel_bounded([*self._background, *self._calls.values(), *self.upstreams.tasks])
        if self.tcp is not None:
            await self.tcp.wait_closed()
        self.machine.stop(self.clock())
        self._flush()
        self._calls.clear()

    async def terminate_session(self, sid: bytes,
                                reason: TerminateReason = TerminateReason.ADMIN) -> None:
        """Administrative terminate: tombstone, authenticated CLOSE to the client."""
        before = set(self._calls)
        self.machine.terminate(sid, reason)
        self._flush()
        self._engine_sync(sid)
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
        answer = answer_of(fut, span)
        try:
            self.machine.store_answered(call_id, answer, self.clock())
        except Exception:
            log.exception("store answer handling failed")
        self._flush()
        if self.engine_path is not None:
            self.engine_path.answered(sid)

    # ---- effects ---------------------------------------------------------------------------

    def _flush(self) -> None:
        """Execute the machine's effects, in order."""
        for e in self.machine.effects(self.clock()):
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
        elif self.tcp is None or not self.tcp.send(peer.conn, data):
            return  # that connection closed meanwhile, or its peer does not keep up
        self.metrics.tx_packets += 1
        self.metrics.tx_bytes += len(data)

    def _store_call(self, call: StoreCall) -> None:
        op = call.op
        span: SpanCtx = NOOP_SPAN
        if call.span is not None and self.tracing.enabled:
            span = self.tracing.store_call(OP_NAMES[type(op)], parent=call.span)
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
        path = self.engine_path
        if path is not None and not self.upstreams.held(e.session_id, e.flow):
            target = self.upstreams.engine_address(e.upstream)
            if target is not None and path.to_upstream(e, target):
                return
        self.upstreams.send(e)

    def _close_upstream(self, session_id: bytes) -> None:
        if self.engine_path is not None:
            self.engine_path.close_upstream(session_id)
        self.upstreams.close(session_id)

    def engine_stats(self) -> None:
        """Bring what the compiled engine forwarded into the bindings (before reading them)."""
        if self.engine_path is not None:
            self.engine_path.pull_active()

    def _engine_sync(self, sid: bytes | None = None) -> None:
        if self.engine_path is not None:
            self.engine_path.sync(sid)

    # ---- background ------------------------------------------------------------------------

    async def _timer_loop(self) -> None:
        while True:
            delay = self.machine.get_timer() - self.clock()
            await asyncio.sleep(min(max(0.0, delay), TIMER_MAX_SLEEP_S))
            now = self.clock()
            if now < self.machine.get_timer():
                continue
            self.engine_stats()  # what the engine forwarded: the silence timers see it
            try:  # the health check, the lease and the sweeper live here: never die
                self.machine.handle_timer(now)
            except Exception:
                log.exception("gateway timer failed")
            self._flush()
            self._engine_sync()
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
                    self._engine_sync(sid)
            except StoreUnavailable:
                await asyncio.sleep(1.0)

    # ---- the client's address behind a balancer ----------------------------------------------

    def prefix_dropped(self, reason: DropReason, kind: wire.TransportKind, source: str) -> None:
        """A message dropped for its client-address prefix: counted; logged at most every 5 s."""
        self.metrics.count_drop(reason, kind)
        self.log_prefix_drop(reason, kind, source)

    def log_prefix_drop(self, reason: DropReason, kind: wire.TransportKind, source: str) -> None:
        now = time.monotonic()
        if now - self._prefix_logged >= PREFIX_LOG_INTERVAL_S:
            self._prefix_logged = now
            if reason is DropReason.MISSING_PREFIX:
                log.warning("%s from trusted balancer %s without the client's address: dropped "
                            "(is jvpn.filter / proxy_protocol on in nginx?)", kind.name, source)
            else:
                log.warning("%s client-address prefix from %s, not a trusted balancer: dropped",
                            kind.name, source)
