"""A gateway node: listeners, handshake and reattach pipelines, the data plane.

Theory of operation. The node is stateless with respect to sessions: the store
holds every session, the node holds only a cache of unwrapped secrets and the
local binding table (``gateway.bindings``) for the sessions bound to it. DATA
packets are handled synchronously from the socket callback and never touch
the store. Control messages (handshake, reattach, CLOSE, reported state
changes) run as tasks that make exactly one store script call on the hot
path; concurrent calls are coalesced into pipelines by the store's batcher.
Every answer to an unvalidated address respects the 3x amplification limit,
and every failure is explicit: an authenticated REJECT with a reason, or a
counted drop.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from gateway.bindings import Binding, Peer, SessionSecrets
from gateway.events import EventBus, fingerprint
from gateway.metrics import Metrics
from gateway.tracing import NOOP_SPAN, SpanCtx, Tracing
from session import control, wire
from session.errors import RemoteProtocolError, SessionError
from session.handshake import Refusal, Responder, ServerHello
from session.keys import SessionKeys, unwrap_secret, wrap_secret
from session.reasons import DropReason, NoticeKind, RejectReason, TerminateReason
from session.states import SessionEvent, SessionState, is_allowed
from store.api import PendingReattach, ReattachResult, SessionStore
from store.errors import StoreError, StoreUnavailable
from store.status import StoreStatus

log = logging.getLogger("jvpn.gateway")

KEY_CACHE_SIZE = 200_000
HANDSHAKE_WINDOW_MS = 120_000
RETRY_TOKEN_LIFETIME_S = 10
NOTICE_INTERVAL_S = 0.5  # at most one NOT_BOUND_HERE per session per interval
MAX_CONTROL_TASKS = 4096
UDP_SOCKET_BUFFER = 4 << 20  # bytes asked for the listener's receive and send buffers
HANDSHAKE_ANSWER_CACHE = 10_000


@dataclass(frozen=True)
class NodeSettings:
    """What the node needs from GatewayConfig, in the units it uses."""

    node_id: str
    keepalive_interval: float = 1.0
    silence_keepalives: int = 3
    reattach_window_ms: int = 30_000
    dual_active_window_ms: int = 2_000
    sweep_interval: float = 1.0
    handshake_retry_threshold: float = -1.0  # handshakes/s before RETRY; 0 always, <0 never
    max_sessions: int = 1_000_000
    lease_s: float = 3.0  # forward only while the store answered within this (monotonic)

    @property
    def node_bytes(self) -> bytes:
        return self.node_id.encode()[: wire.MAX_NODE_ID_LEN]


class _Reattach:
    """One REATTACH_REQUEST being answered: what every step of either path needs."""

    __slots__ = ("req", "raw", "peer", "span", "secrets", "t0", "t1", "bid")

    def __init__(self, req: wire.ReattachRequest, raw: bytes, peer: Peer, span: SpanCtx,
                 secrets: SessionSecrets | None) -> None:
        self.req = req
        self.raw = raw
        self.peer = peer
        self.span = span
        self.secrets = secrets
        self.t0 = self.t1 = time.perf_counter()
        self.bid = os.urandom(wire.BINDING_ID_LEN)


class GatewayNode:
    """One stateless gateway process."""

    def __init__(self, settings: NodeSettings, store: SessionStore, static_priv: bytes,
                 kek: bytes, events: EventBus, metrics: Metrics,
                 clock: Callable[[], float] = time.monotonic,
                 tracing: Tracing | None = None) -> None:
        self.settings = settings
        self.store = store
        self._static = static_priv
        self._kek = kek
        self.events = events
        self.metrics = metrics
        self.clock = clock
        self.tracing = tracing or Tracing.disabled(settings.node_id)
        self.node = settings.node_bytes
        self.bindings: dict[bytes, Binding] = {}
        self._secrets: OrderedDict[bytes, SessionSecrets] = OrderedDict()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._queued: set[asyncio.Future[Any]] = set()  # task-less reattaches at the store
        self._stopping = False
        # How reattaches that reached the store went: "queued" (no task), "task" (the
        # coroutine path), "resumed" (queued, then finished by the coroutine path).
        self.reattach_paths = {"queued": 0, "task": 0, "resumed": 0}
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.base_events.Server | None = None
        self._background: list[asyncio.Task[Any]] = []
        self._token_key = os.urandom(32)
        self._hs_times: list[float] = []
        self._store_offset_ms = 0.0  # store clock minus our monotonic ms
        self._notice_sent: dict[bytes, float] = {}
        # Answers to recent handshakes, so a retransmitted INIT (its answer was lost) from the
        # same address gets the same answer; from another address it is a replay.
        self._hs_answers: OrderedDict[bytes, tuple[tuple[int, str, int], bytes]] = OrderedDict()
        self.store_ok = False
        self.store_error = "not checked yet"
        # The lease (fail closed): forward only while the store answered within lease_s, and
        # only for bindings the store confirmed after the last lapse.
        self._store_ok_at = float("-inf")
        self._trust_since = float("-inf")
        self.udp_address: tuple[str, int] | None = None
        self.tcp_address: tuple[str, int] | None = None
        metrics.sessions_callback = self._sessions_by_state

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self, udp: tuple[str, int] | None, tcp: tuple[str, int] | None) -> None:
        """Open the listeners and the background loops."""
        loop = asyncio.get_running_loop()
        await self._check_store()
        if udp is not None:
            self._udp, _ = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self), local_addr=udp)
            self.udp_address = self._udp.get_extra_info("sockname")[:2]
            _grow_buffers(self._udp)
        if tcp is not None:
            self._tcp = await loop.create_server(lambda: _TcpProtocol(self), tcp[0], tcp[1])
            self.tcp_address = self._tcp.sockets[0].getsockname()[:2]
        self._background = [
            asyncio.create_task(self._maintenance_loop(), name="jvpn-maintenance"),
            asyncio.create_task(self._sweep_loop(), name="jvpn-sweeper"),
            asyncio.create_task(self._health_loop(), name="jvpn-health"),
            asyncio.create_task(self._revocation_loop(), name="jvpn-revocations"),
        ]

    async def stop(self) -> None:
        """Close listeners, cancel loops and tasks, drop bindings (no store writes)."""
        self._stopping = True
        for fut in self._queued:  # queued reattaches: never sent, or their answer is ignored
            fut.cancel()
        await cancel_bounded([*self._background, *self._tasks])
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()
        for b in self.bindings.values():
            b.close()
        self.bindings.clear()

    async def ready(self) -> tuple[bool, str]:
        """Readiness for /readyz: the store must answer."""
        return (self.store_ok, "ok" if self.store_ok else f"store unreachable: {self.store_error}")

    # ---- ingress -------------------------------------------------------------------------

    def on_message(self, data: bytes, peer: Peer) -> None:
        """Entry point for every datagram and TCP frame. Never raises."""
        m = self.metrics
        m.rx_packets += 1
        m.rx_bytes += len(data)
        try:
            msg = wire.decode(data)
            if isinstance(msg, wire.Data):
                self._handle_data(msg, data, peer)
            elif isinstance(msg, wire.ReattachRequest):
                self._reattach_request(msg, data, peer)
            elif isinstance(msg, wire.HandshakeInit):
                self._spawn(self._handle_handshake(msg, data, peer), peer)
            else:
                raise RemoteProtocolError(DropReason.UNEXPECTED, msg.TYPE.name)
        except RemoteProtocolError as exc:
            self._drop(exc.reason, peer)
        except Exception:  # a bug must not kill the listener
            log.exception("unexpected error handling a message from %s", peer.describe())
            self._drop(DropReason.MALFORMED, peer)

    def _drop(self, reason: DropReason, peer: Peer) -> None:
        self.metrics.count_drop(reason, peer.kind)

    def _control_full(self) -> bool:
        """Control work in flight (tasks and task-less reattaches) is at its bound."""
        return len(self._tasks) + len(self._queued) >= MAX_CONTROL_TASKS

    def _spawn(self, coro: Awaitable[None], peer: Peer) -> None:
        if self._control_full():
            coro.close()  # type: ignore[attr-defined]
            self._drop(DropReason.RATE_LIMITED, peer)
            return
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("control task failed", exc_info=task.exception())

    # ---- data plane ----------------------------------------------------------------------

    def _leased(self, b: Binding, now: float) -> bool:
        """Whether this node may still forward for ``b`` (see the lease in __init__)."""
        return now - self._store_ok_at < self.settings.lease_s and b.confirmed_at >= self._trust_since

    def _handle_data(self, msg: wire.Data, raw: bytes, peer: Peer) -> None:
        b = self.bindings.get(msg.session_id)
        if b is None or b.epoch != msg.epoch:
            if b is None:  # a stale epoch is the sender's problem, not a missing binding
                self._maybe_not_bound(msg.session_id, peer, raw)
            raise RemoteProtocolError(
                DropReason.UNKNOWN_SESSION if b is None else DropReason.STALE_EPOCH, "DATA")
        now = self.clock()
        if not self._leased(b, now):
            raise RemoteProtocolError(DropReason.LEASE_EXPIRED, "DATA")
        plain = b.channel.open(msg, raw)  # replay window + AEAD; raises on failure
        inner = wire.decode_inner(plain)
        if peer is not b.peer and peer != b.peer:  # the UDP listener reuses Peer objects
            self._roam(b, peer)
        if not b.validated:
            b.validated = True
        b.last_rx = now
        b.rx_packets += 1
        if b.lost:
            b.lost = False
        if b.state is SessionState.RECOVERING and not b.transition_pending:
            # We had marked it lost on silence, but the same binding speaks again.
            b.transition_pending = True
            self._spawn(self._transition(b, SessionEvent.TRANSPORT_RESTORED,
                                         "gateway: binding speaks again"), peer)
        kind = inner.kind
        if kind is wire.InnerType.PAYLOAD:
            self._to_upstream(b, inner.payload)
        elif kind is wire.InnerType.KEEPALIVE:
            ack = wire.inner_keepalive_ack(inner.seq, inner.echo_ms, b.version, int(b.state))
            self._send(b, b.channel.seal(ack))
            if inner.state != b.state and not b.transition_pending:
                self._reported_state(b, inner.state)
        elif kind is wire.InnerType.CLOSE:
            self._spawn(self._terminate(b.session_id, TerminateReason.CLIENT_CLOSE, "client close",
                                        notify=False), peer)

    def _send(self, b: Binding, data: bytes) -> None:
        if not b.may_send(len(data)):
            self.metrics.count_drop(DropReason.NOT_VALIDATED, b.peer.kind)
            return
        b.peer.send(data)
        b.tx_packets += 1
        self.metrics.tx_packets += 1
        self.metrics.tx_bytes += len(data)

    def _to_upstream(self, b: Binding, payload: bytes) -> None:
        if b.upstream is None:
            self._spawn(self._open_upstream(b, payload), b.peer)
            return
        b.upstream.sendto(payload)

    async def _open_upstream(self, b: Binding, first: bytes) -> None:
        if b.upstream is not None:
            b.upstream.sendto(first)
            return
        host, _, port = b.secrets.upstream.rpartition(":")
        if not host:
            self.metrics.count_drop(DropReason.POLICY, b.peer.kind)
            return
        loop = asyncio.get_running_loop()
        sid = b.session_id
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UpstreamProtocol(self, sid), remote_addr=(host, int(port)))
        current = self.bindings.get(sid)
        if current is not b or b.upstream is not None:
            transport.close()
            if current is not None and current.upstream is not None:
                current.upstream.sendto(first)
            return
        b.upstream = transport
        transport.sendto(first)

    def from_upstream(self, session_id: bytes, data: bytes) -> None:
        """A reply from the session's upstream target: tunnel it back."""
        b = self.bindings.get(session_id)
        if b is None or not b.validated or len(data) > wire.MAX_PAYLOAD_SIZE:
            self.metrics.count_drop(DropReason.NOT_VALIDATED, wire.TransportKind.UDP)
            return
        if not self._leased(b, self.clock()):
            self.metrics.count_drop(DropReason.LEASE_EXPIRED, wire.TransportKind.UDP)
            return
        self._send(b, b.channel.seal(wire.inner_payload(data)))

    def _roam(self, b: Binding, peer: Peer) -> None:
        old = b.peer
        b.peer = peer
        reason = "nat_rebind" if old.kind == peer.kind else "path_change"
        self.metrics.transport_switch(old.kind.name.lower(), peer.kind.name.lower(), reason)
        self.events.transport_switch(b.session_id, old.describe(), peer.describe(), reason,
                                     b.version, b.epoch, source_ip=peer.addr[0])

    def _maybe_not_bound(self, sid: bytes, peer: Peer, raw: bytes) -> None:
        """Tell a client (authenticated) that this node does not hold its binding."""
        now = self.clock()
        last = self._notice_sent.get(sid)
        if last is not None and now - last < NOTICE_INTERVAL_S:
            return
        if len(self._notice_sent) > 100_000:
            self._notice_sent.clear()
        self._notice_sent[sid] = now
        self._spawn(self._send_not_bound(sid, peer, raw), peer)

    async def _send_not_bound(self, sid: bytes, peer: Peer, raw: bytes) -> None:
        try:
            secrets, rec = await self._secrets_for(sid)
            if rec is None and secrets is not None:  # a cache hit: the record is still needed
                rec = await self.store.get(sid)
        except StoreUnavailable:
            return
        if secrets is None or rec is None:
            return
        terminated = rec.state is SessionState.TERMINATED
        kind = NoticeKind.TERMINATED if terminated else NoticeKind.NOT_BOUND_HERE
        reason = int(rec.terminate_reason or 0) if terminated else 0
        # The notice echoes the triggering packet's AEAD tag: the client accepts a hint only
        # for a packet it really sent, so forged DATA cannot talk it off a working path.
        notice = wire.Notice(sid, kind, reason, rec.version, raw[-wire.NONCE_LEN:],
                             self._store_ms())
        out = control.seal(notice, secrets.keys.control_key)
        if len(out) <= 3 * len(raw):
            peer.send(out)

    def _reported_state(self, b: Binding, reported: int) -> None:
        """The client reports a quality state; record the transition in the store."""
        try:
            target = SessionState(reported)
        except ValueError:
            return
        event = {
            SessionState.ATTACHED: SessionEvent.QUALITY_RECOVERED,
            SessionState.VOLATILE: SessionEvent.QUALITY_VOLATILE,
            SessionState.DEGRADED: SessionEvent.QUALITY_DEGRADED,
        }.get(target)
        if event is None or not is_allowed(b.state, event):
            return
        b.transition_pending = True
        self._spawn(self._transition(b, event, "client_reported"), b.peer)

    async def _transition(self, b: Binding, event: SessionEvent, why: str) -> None:
        try:
            t0 = time.perf_counter()
            res = await self.store.transition(b.session_id, b.version, event)
            self.metrics.store_latency("transition", time.perf_counter() - t0)
        except StoreUnavailable:
            b.transition_pending = False
            return
        b.transition_pending = False
        if self.bindings.get(b.session_id) is not b:
            return
        if res.ok and res.state is not None:
            old = b.state
            b.state = res.state
            b.version = res.version
            self._state_changed(b.session_id, old, res.state, res.version, b.epoch, why,
                                b.peer.addr[0])
        elif res.version > b.version and res.state is not None:
            b.version = res.version
            b.state = res.state

    def _state_changed(self, sid: bytes, old: SessionState, new: SessionState, version: int,
                       epoch: int, reason: str, source_ip: str | None = None) -> None:
        self.metrics.state_change(old.name, new.name)
        self.events.state_change(sid, old.name, new.name, version, epoch, reason,
                                 source_ip=source_ip)

    # ---- handshake -----------------------------------------------------------------------

    def _retry_token(self, peer: Peer, bucket: int) -> bytes:
        msg = f"{peer.describe()}|{bucket}".encode()
        return hmac.new(self._token_key, msg, hashlib.blake2s).digest()[:24] + bucket.to_bytes(8, "big")

    def _token_valid(self, token: bytes, peer: Peer) -> bool:
        if len(token) != 32:
            return False
        bucket = int.from_bytes(token[24:], "big")
        now_bucket = int(time.time()) // RETRY_TOKEN_LIFETIME_S
        if now_bucket - bucket not in (0, 1):
            return False
        return hmac.compare_digest(token, self._retry_token(peer, bucket))

    def _needs_retry(self, now: float) -> bool:
        threshold = self.settings.handshake_retry_threshold
        if threshold < 0:
            return False
        if threshold == 0:
            return True
        self._hs_times = [t for t in self._hs_times if now - t < 1.0]
        self._hs_times.append(now)
        return len(self._hs_times) > threshold

    async def _handle_handshake(self, msg: wire.HandshakeInit, raw: bytes, peer: Peer) -> None:
        with self.tracing.handshake(peer) as span:
            await self._handshake(msg, raw, peer, span)

    async def _handshake(self, msg: wire.HandshakeInit, raw: bytes, peer: Peer,
                         span: SpanCtx) -> None:
        t0 = time.perf_counter()
        now = self.clock()
        if not msg.token and self._needs_retry(now):
            token = self._retry_token(peer, int(time.time()) // RETRY_TOKEN_LIFETIME_S)
            out = wire.encode(wire.Retry(msg.handshake_id, token))
            if len(out) <= 3 * len(raw):
                peer.send(out)
            self.metrics.handshake("retry", "")
            span.set(outcome="retry")
            return
        if msg.token and not self._token_valid(msg.token, peer):
            span.set(outcome="dropped", reason=DropReason.BAD_MAC)
            self._drop(DropReason.BAD_MAC, peer)
            return
        try:
            responder = Responder(self._static, msg.handshake_id, msg.noise)
        except SessionError:
            self.metrics.handshake("dropped", "BAD_HANDSHAKE")
            span.set(outcome="dropped", reason=DropReason.BAD_HANDSHAKE)
            self._drop(DropReason.BAD_HANDSHAKE, peer)
            return
        client_hex = responder.client_static.hex()
        hello = responder.hello
        digest = hashlib.sha256(msg.noise).digest()
        cached = self._hs_answers.get(digest)
        if cached is not None:
            if cached[0] == peer.key:
                peer.send(cached[1])  # retransmission: same answer, nothing created twice
                self.metrics.handshake("retransmit", "")
                span.set(outcome="retransmit")
            else:
                span.set(outcome="dropped", reason=DropReason.REPLAYED)
                self._handshake_replay(peer)
            return

        def refuse(reason: RejectReason, detail: str) -> None:
            out = wire.encode(wire.HandshakeResp(
                msg.handshake_id, msg.handshake_id,
                responder.refuse(Refusal(reason, self._store_ms()))))
            if len(out) <= 3 * len(raw):
                peer.send(out)
            self.metrics.handshake("refused", reason.name)
            span.set(outcome="refused", reason=reason)
            self.events.emit("handshake", outcome="failure", reason=reason.name,
                             source_ip=peer.addr[0], detail=detail, trace_id=span.trace_id,
                             **{"jvpn.client": fingerprint(responder.client_static)})

        try:
            with self.tracing.store_call("get_client"):
                policy = await self.store.get_client(client_hex)
            if policy is None:
                self.events.security_event("unknown_client", "UNKNOWN_CLIENT",
                                           source_ip=peer.addr[0],
                                           client=fingerprint(responder.client_static))
                self.metrics.security("unknown_client")
                return refuse(RejectReason.UNKNOWN_CLIENT, "key not in registry")
            if abs(hello.wall_ms - time.time() * 1000) > HANDSHAKE_WINDOW_MS:
                return refuse(RejectReason.CLOCK_SKEW, "client clock outside the handshake window")
            if hello.kind.name.lower() not in policy.transports or hello.kind != peer.kind:
                return refuse(RejectReason.POLICY_DENIED, f"transport {hello.kind.name} not allowed")
            if hello.upstream not in policy.upstreams:
                return refuse(RejectReason.POLICY_DENIED, f"upstream {hello.upstream!r} not allowed")
            with self.tracing.store_call("claim_handshake"):
                fresh = await self.store.claim_handshake(digest, HANDSHAKE_WINDOW_MS * 2)
            if not fresh:
                span.set(outcome="dropped", reason=DropReason.REPLAYED)
                return self._handshake_replay(peer)
            if len(self.bindings) >= self.settings.max_sessions:
                return refuse(RejectReason.OVERLOADED, "node at max_sessions")
            sid = os.urandom(wire.SESSION_ID_LEN)
            bid = os.urandom(wire.BINDING_ID_LEN)
            ttl_ms = int(policy.ttl_s * 1000)
            server_hello = ServerHello(
                sid, self.store.BIRTH_VERSION, int(SessionState.ATTACHED), 1, bid, self.node,
                self._store_ms(), ttl_ms, int(self.settings.keepalive_interval * 1000))
            msg2, secret = responder.accept(server_hello)
            t1 = time.perf_counter()
            with self.tracing.store_call("birth") as st:
                born = await self.store.birth(
                    session_id=sid, wrapped_secret=wrap_secret(self._kek, secret, sid),
                    client_id=client_hex, node=self.settings.node_id, binding_id=bid,
                    kind=peer.kind, upstream=hello.upstream, policy=policy)
                st.set(outcome=born.status.name)
            self.metrics.store_latency("birth", time.perf_counter() - t1)
            if not born.ok:
                return refuse(RejectReason.STORE_UNAVAILABLE, f"birth: {born.status.name}")
        except StoreUnavailable as exc:
            self.metrics.handshake("refused", "STORE_UNAVAILABLE")
            span.set(outcome="refused", reason=RejectReason.STORE_UNAVAILABLE)
            out = wire.encode(wire.Reject(msg.handshake_id, bytes(wire.NONCE_LEN),
                                          RejectReason.STORE_UNAVAILABLE, 0, 0))
            if len(out) <= 3 * len(raw):
                peer.send(out)
            log.warning("handshake refused, store unavailable: %s", exc)
            return
        secrets = SessionSecrets(secret, SessionKeys(secret), hello.upstream, client_hex, ttl_ms)
        self._cache(sid, secrets)
        b = self._bind(sid, 1, bid, peer, secrets, born.version, SessionState.ATTACHED)
        b.rx_unvalidated = len(raw)
        answer = wire.encode(wire.HandshakeResp(sid, msg.handshake_id, msg2))
        self._hs_answers[digest] = (peer.key, answer)
        while len(self._hs_answers) > HANDSHAKE_ANSWER_CACHE:
            self._hs_answers.popitem(last=False)
        self._send_control(b, answer)
        self.metrics.handshake("ok", "")
        span.set(outcome="ok", session_id=sid, version=born.version, epoch=1)
        self._state_changed(sid, SessionState.BIRTH, SessionState.ATTACHED, born.version, 1,
                            "handshake", peer.addr[0])
        self.events.emit("handshake", outcome="success", session_id=sid,
                         source_ip=peer.addr[0], duration_ms=(time.perf_counter() - t0) * 1000,
                         trace_id=span.trace_id)

    def _handshake_replay(self, peer: Peer) -> None:
        self.events.security_event("handshake_replay", "REPLAYED_NONCE", source_ip=peer.addr[0])
        self.metrics.security("handshake_replay")
        self._drop(DropReason.REPLAYED, peer)

    def _send_control(self, b: Binding, data: bytes) -> None:
        if b.may_send(len(data)):
            b.peer.send(data)
        else:
            self.metrics.count_drop(DropReason.NOT_VALIDATED, b.peer.kind)

    def _bind(self, sid: bytes, epoch: int, bid: bytes, peer: Peer, secrets: SessionSecrets,
              version: int, state: SessionState) -> Binding:
        old = self.bindings.pop(sid, None)
        if old is not None:
            old.close()
        now = self.clock()
        b = Binding(sid, epoch, bid, self.node, peer, secrets, version, state, last_rx=now,
                    last_refresh=now, confirmed_at=now)
        self.bindings[sid] = b
        return b

    # ---- reattach ------------------------------------------------------------------------

    async def _secrets_for(self, sid: bytes) -> tuple[SessionSecrets | None, Any]:
        """Cached secrets, else load the record and unwrap (one store read)."""
        cached = self._secrets.get(sid)
        if cached is not None:
            self._secrets.move_to_end(sid)
            return cached, None
        t0 = time.perf_counter()
        with self.tracing.store_call("get"):  # a child only inside a reattach span
            rec = await self.store.get(sid)
        self.metrics.store_latency("get", time.perf_counter() - t0)
        if rec is None or not rec.wrapped_secret:
            return None, rec
        try:
            secret = unwrap_secret(self._kek, rec.wrapped_secret, sid)
        except SessionError:
            self.events.security_event("unwrap_failed", "BAD_KEK", session_id=sid)
            self.metrics.security("unwrap_failed")
            return None, rec
        secrets = SessionSecrets(secret, SessionKeys(secret), rec.upstream, rec.client_id,
                                 rec.ttl_ms)
        self._cache(sid, secrets)
        return secrets, rec

    def _cache(self, sid: bytes, secrets: SessionSecrets) -> None:
        self._secrets[sid] = secrets
        self._secrets.move_to_end(sid)
        while len(self._secrets) > KEY_CACHE_SIZE:
            self._secrets.popitem(last=False)

    def _reattach_request(self, req: wire.ReattachRequest, raw: bytes, peer: Peer) -> None:
        """A REATTACH_REQUEST from the socket callback.

        The usual case (the session's secrets cached, tracing off, a single Redis) runs
        without a task: the checks here, the CAS queued on the store's batcher, the
        answer from the batch's done callback (``_reattach_landed``). Everything else,
        and anything unusual on the way, takes the coroutine path (``_handle_reattach``);
        both paths share every check and every outcome.
        """
        sid = req.session_id
        secrets = self._secrets.get(sid)
        if secrets is None or self.tracing.enabled:
            self._spawn(self._handle_reattach(req, raw, peer), peer)
            return
        if self._control_full():
            self._drop(DropReason.RATE_LIMITED, peer)
            return
        self._secrets.move_to_end(sid)
        r = _Reattach(req, raw, peer, NOOP_SPAN, secrets)
        if not self._reattach_checks(r):
            return
        r.t1 = time.perf_counter()
        pending = self.store.reattach_nowait(**self._cas_args(r))
        if pending is None:
            self._spawn(self._reattach_store(r, None), peer)
            return
        self.reattach_paths["queued"] += 1
        self._queued.add(pending.future)
        pending.future.add_done_callback(lambda _f: self._reattach_landed(r, pending))

    def _reattach_landed(self, r: _Reattach, pending: PendingReattach) -> None:
        """The queued CAS answered: finish here, or hand the rest to the coroutine path."""
        self._queued.discard(pending.future)
        if self._stopping:
            return
        try:
            res = self.store.reattach_done(pending)
            if res is None:  # an error, an unknown outcome, a moved generation
                self._spawn(self._reattach_store(r, pending), r.peer)
                return
            self.metrics.store_latency("reattach", time.perf_counter() - r.t1)
            self._reattach_outcome(r, res)
        except Exception:  # a callback must not raise into the event loop
            log.exception("reattach outcome failed")

    async def _handle_reattach(self, req: wire.ReattachRequest, raw: bytes, peer: Peer) -> None:
        with self.tracing.reattach(req.session_id, peer) as span:
            r = _Reattach(req, raw, peer, span, None)
            try:
                secrets, _ = await self._secrets_for(req.session_id)
            except StoreUnavailable:
                return self._reattach_reject(r, RejectReason.STORE_UNAVAILABLE, None)
            if secrets is None:
                return self._reattach_reject(r, RejectReason.UNKNOWN_SESSION, None)
            r.secrets = secrets
            if self._reattach_checks(r):
                r.t1 = time.perf_counter()
                await self._reattach_store(r, None)

    def _reattach_answer(self, r: _Reattach, msg: wire.Message, key: bytes | None) -> None:
        out = control.seal(msg, key) if key is not None else wire.encode(msg)
        if len(out) <= 3 * len(r.raw):  # the amplification limit: the path is unvalidated
            r.peer.send(out)

    def _reattach_reject(self, r: _Reattach, reason: RejectReason, key: bytes | None,
                         version: int = 0) -> None:
        req, peer = r.req, r.peer
        self._reattach_answer(r, wire.Reject(req.session_id, req.nonce, reason,
                                             version if key else 0, self._store_ms()), key)
        self.metrics.reattach("rejected", reason.name, time.perf_counter() - r.t0)
        r.span.set(outcome="rejected", reason=reason)
        self.events.emit("reattach", outcome="failure", reason=reason.name,
                         session_id=req.session_id, source_ip=peer.addr[0],
                         nonce=fingerprint(req.nonce), transport=peer.describe(),
                         trace_id=r.span.trace_id)

    def _reattach_checks(self, r: _Reattach) -> bool:
        """DESIGN.md section 4 steps 1-2 (proof, policy, clock) before the store: False if
        rejected."""
        req, raw, peer = r.req, r.raw, r.peer
        assert r.secrets is not None
        keys = r.secrets.keys
        if not control.verify(raw, keys.proof_key):
            self.metrics.security("bad_proof")
            self.events.security_event("bad_proof", "BAD_PROOF", session_id=req.session_id,
                                       source_ip=peer.addr[0], proof=fingerprint(raw[-wire.MAC_LEN:]))
            self._reattach_reject(r, RejectReason.BAD_PROOF, None)
            return False
        if req.kind != peer.kind:
            self._reattach_reject(r, RejectReason.POLICY_DENIED, keys.control_key)
            return False
        if abs(req.timestamp_ms - self._store_ms()) > self.settings.reattach_window_ms:
            self._reattach_reject(r, RejectReason.CLOCK_SKEW, keys.control_key)
            return False
        return True

    def _cas_args(self, r: _Reattach) -> dict[str, Any]:
        """The store's reattach CAS for ``r`` (either path)."""
        req = r.req
        return dict(session_id=req.session_id, expected_version=req.expected_version,
                    nonce=req.nonce, timestamp_ms=req.timestamp_ms, kind=req.kind,
                    node=self.settings.node_id, binding_id=r.bid, addr_tag=r.peer.describe(),
                    window_ms=self.settings.reattach_window_ms,
                    dual_active_window_ms=self.settings.dual_active_window_ms)

    async def _reattach_store(self, r: _Reattach, pending: PendingReattach | None) -> None:
        """The store step on the coroutine path: the whole CAS, or the rest of a queued one."""
        assert r.secrets is not None
        self.reattach_paths["task" if pending is None else "resumed"] += 1
        try:
            with self.tracing.store_call("reattach") as st:
                if pending is None:
                    res = await self.store.reattach(**self._cas_args(r))
                else:
                    res = await self.store.finish_reattach(pending)
                st.set(outcome=res.status.name)
            self.metrics.store_latency("reattach", time.perf_counter() - r.t1)
        except StoreError as exc:  # unavailable, or an answer we cannot read: fail closed
            if not isinstance(exc, StoreUnavailable):
                log.error("reattach: unreadable store answer: %s", exc)
            return self._reattach_reject(r, RejectReason.STORE_UNAVAILABLE,
                                         r.secrets.keys.control_key)
        self._reattach_outcome(r, res)

    def _reattach_outcome(self, r: _Reattach, res: ReattachResult) -> None:
        """DESIGN.md section 4 steps 3-5 after the CAS: bind, tell, answer, record."""
        req, raw, peer, span = r.req, r.raw, r.peer, r.span
        sid, t0 = req.session_id, r.t0
        secrets = r.secrets
        assert secrets is not None
        keys = secrets.keys
        if res.server_ms:
            self._store_offset_ms = res.server_ms - self.clock() * 1000
        if not res.ok:
            reason = res.reason or RejectReason.STORE_UNAVAILABLE
            if res.expired_now:
                self._state_changed(sid, res.prev_state or SessionState.ATTACHED,
                                    SessionState.TERMINATED, res.version, res.epoch, "EXPIRED")
                self._drop_binding(sid)
            if reason in (RejectReason.REPLAYED_NONCE, RejectReason.DUAL_ACTIVE_CONFLICT):
                self.metrics.security(reason.name.lower())
                self.events.security_event(reason.name.lower(), reason.name, session_id=sid,
                                           source_ip=peer.addr[0], nonce=fingerprint(req.nonce),
                                           transport=peer.describe())
            return self._reattach_reject(r, reason, keys.control_key, res.version)
        node_id = res.node.encode()[: wire.MAX_NODE_ID_LEN]
        ack = wire.ReattachAck(sid, req.nonce, res.version, res.epoch, res.binding_id, node_id,
                               self._store_ms())
        if res.retry:
            # Idempotent retransmission: same answer, nothing changes twice. But if the first
            # run's outcome never reached us (the store paused: we answered STORE_UNAVAILABLE
            # and the CAS applied late), we do not hold the binding this ACK grants: adopt it.
            cur = self.bindings.get(sid)
            if (res.binding_current and res.node == self.settings.node_id
                    and (cur is None or cur.epoch < res.epoch)):
                b = self._bind(sid, res.epoch, res.binding_id, peer, secrets, res.version,
                               res.state or SessionState.ATTACHED)
                b.rx_unvalidated = len(raw)
                self.metrics.transport_switch("unknown", peer.kind.name.lower(), "reattach")
                self.events.transport_switch(sid, f"node:{res.prev_node or '-'}", peer.describe(),
                                             "reattach_late_applied", res.version, res.epoch,
                                             source_ip=peer.addr[0])
            self._reattach_answer(r, ack, keys.control_key)
            self.metrics.reattach("retry", "", time.perf_counter() - t0)
            span.set(outcome="retry", version=res.version, epoch=res.epoch)
            return
        old = self.bindings.get(sid)
        old_desc = old.peer.describe() if old is not None else f"node:{res.prev_node or '-'}"
        old_kind = (old.peer.kind.name.lower() if old is not None
                    else res.prev_kind.name.lower() if res.prev_kind is not None else "none")
        if res.node == self.settings.node_id:
            b = self._bind(sid, res.epoch, res.binding_id, peer, secrets, res.version,
                           SessionState.ATTACHED)
            b.rx_unvalidated = len(raw)
            b.tx_unvalidated = 0
        if res.prev_node and res.prev_node != self.settings.node_id:
            self._spawn(self._publish_move(sid, res.epoch), peer)
        self._reattach_answer(r, ack, keys.control_key)
        latency = time.perf_counter() - t0
        self.metrics.reattach("ok", "", latency)
        span.set(outcome="ok", version=res.version, epoch=res.epoch)
        self.metrics.transport_switch(old_kind, peer.kind.name.lower(), "reattach")
        self.events.transport_switch(sid, old_desc, peer.describe(), "reattach", res.version,
                                     res.epoch, source_ip=peer.addr[0],
                                     previous_node=res.prev_node or None)
        self._state_changed(sid, res.prev_state or SessionState.ATTACHED, SessionState.ATTACHED,
                            res.version, res.epoch, "reattach", peer.addr[0])

    async def _publish_move(self, sid: bytes, epoch: int) -> None:
        try:
            await self.store.publish_binding_change(sid, self.settings.node_id, epoch)
        except StoreUnavailable:
            pass  # the old owner is fenced by its refresh (NOT_OWNER) or its lease anyway

    def _drop_binding(self, sid: bytes) -> None:
        b = self.bindings.pop(sid, None)
        if b is not None:
            b.close()

    async def _terminate(self, sid: bytes, reason: TerminateReason, why: str,
                         notify: bool = True) -> None:
        b = self.bindings.get(sid)
        try:
            res = await self.store.terminate(sid, reason)
        except StoreUnavailable:
            return
        if b is not None and notify and b.validated:
            self._send(b, b.channel.seal(wire.inner_close(int(reason))))
        self._drop_binding(sid)
        if res.ok and not res.already and res.prev_state is not None:
            self._state_changed(sid, res.prev_state, SessionState.TERMINATED, res.version,
                                res.epoch, why)

    async def terminate_session(self, sid: bytes, reason: TerminateReason = TerminateReason.ADMIN) -> None:
        """Administrative terminate: tombstone, authenticated CLOSE to the client."""
        await self._terminate(sid, reason, reason.name.lower())

    # ---- background loops ----------------------------------------------------------------

    def _store_ms(self) -> int:
        return int(self.clock() * 1000 + self._store_offset_ms)

    async def _check_store(self) -> None:
        try:
            t0 = self.clock()
            server_ms = await self.store.server_time_ms()
            t1 = self.clock()
            self._store_offset_ms = server_ms - (t0 + t1) / 2 * 1000
            if t0 - self._store_ok_at >= self.settings.lease_s and self.bindings:
                # The lease lapsed (outage, or this process was paused): every binding must be
                # confirmed by the store again before it carries data; refresh them all now.
                self._trust_since = t0
                for b in self.bindings.values():
                    b.last_refresh = float("-inf")
                log.warning("store lease lapsed: re-confirming %d bindings", len(self.bindings))
                self.events.emit("lease_lapsed", outcome="success", bindings=len(self.bindings))
            self._store_ok_at = t0
            if not self.store_ok:
                log.info("store reachable")
            self.store_ok = True
            self.store_error = ""
        except StoreUnavailable as exc:
            if self.store_ok:
                log.warning("store unreachable: %s", exc)
            self.store_ok = False
            self.store_error = str(exc) or type(exc).__name__
        self.metrics.set_store_up(self.store_ok)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.settings.lease_s / 3))
            await self._check_store()

    async def _maintenance_loop(self) -> None:
        """Silence detection and TTL/ownership refresh for local bindings."""
        interval = self.settings.keepalive_interval
        while True:
            await asyncio.sleep(interval / 2)
            now = self.clock()
            silence = interval * self.settings.silence_keepalives
            refreshes = []
            for b in list(self.bindings.values()):
                if not b.lost and now - b.last_rx > silence and b.state is not SessionState.RECOVERING:
                    b.lost = True
                    if not b.transition_pending and is_allowed(b.state, SessionEvent.TRANSPORT_LOST):
                        b.transition_pending = True
                        self._spawn(self._transition(b, SessionEvent.TRANSPORT_LOST,
                                                     "gateway: binding silent"), b.peer)
                refresh_every = max(interval, b.secrets.ttl_ms / 1000 / 4)
                unconfirmed = b.confirmed_at < self._trust_since
                if (not b.lost or unconfirmed) and now - b.last_refresh >= refresh_every:
                    b.last_refresh = now
                    refreshes.append(b)
            if refreshes:
                await asyncio.gather(*(self._refresh(b) for b in refreshes))

    async def _refresh(self, b: Binding) -> None:
        t0 = self.clock()
        try:
            res = await self.store.refresh(b.session_id, b.epoch, self.settings.node_id)
        except StoreUnavailable:
            return
        if self.bindings.get(b.session_id) is not b:
            return
        if res.status is StoreStatus.OK:
            b.version = max(b.version, res.version)
            b.confirmed_at = max(b.confirmed_at, t0)
            self._store_ok_at = max(self._store_ok_at, t0)
            return
        # NOT_OWNER, TERMINATED or EXPIRED: this node must stop forwarding (fencing).
        if res.status in (StoreStatus.TERMINATED, StoreStatus.EXPIRED) and b.validated:
            # Ended elsewhere (admin, sweeper): tell the client, authenticated, in band.
            why = res.terminate_reason or TerminateReason.ADMIN
            self._send(b, b.channel.seal(wire.inner_close(int(why))))
        self._drop_binding(b.session_id)
        self.events.emit("binding_revoked", outcome="success", session_id=b.session_id,
                         reason=res.status.name, epoch=b.epoch, new_node=res.node or None)
        if res.status is StoreStatus.EXPIRED and res.expired_now:
            self._state_changed(b.session_id, b.state, SessionState.TERMINATED, res.version,
                                b.epoch, "EXPIRED")

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_interval)
            try:
                expired = await self.store.sweep(500)
            except StoreUnavailable:
                continue
            for item in expired:
                self._drop_binding(item.session_id)
                self._state_changed(item.session_id, item.prev_state, SessionState.TERMINATED,
                                    item.version, item.epoch, "EXPIRED")

    async def _revocation_loop(self) -> None:
        """React at once when another node took a binding or an admin ended a session."""
        while True:
            try:
                async for sid, node, epoch in self.store.binding_changes():
                    b = self.bindings.get(sid)
                    if b is not None and (node != self.settings.node_id or epoch != b.epoch):
                        # A hint only: the store decides (NOT_OWNER, TERMINATED, or still ours).
                        self._spawn(self._refresh(b), b.peer)
            except StoreUnavailable:
                await asyncio.sleep(1.0)

    def _sessions_by_state(self) -> dict[str, int]:
        counts: dict[str, int] = {s.name: 0 for s in SessionState}
        for b in self.bindings.values():
            counts["RECOVERING" if b.lost else b.state.name] += 1
        return counts


# ---- asyncio adapters ------------------------------------------------------------------------


async def cancel_bounded(tasks: list[asyncio.Task[Any]], timeout: float = 3.0) -> None:
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
        self.transport: asyncio.DatagramTransport | None = None
        self._peers: dict[tuple[str, int], Peer] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        peer = self._peers.get(addr)
        if peer is None:
            if len(self._peers) > 100_000:
                self._peers.clear()
            tr = self.transport
            assert tr is not None
            a = (addr[0], addr[1])
            peer = Peer(wire.TransportKind.UDP, a, lambda d: tr.sendto(d, a))
            self._peers[addr] = peer
        self.node.on_message(data, peer)

    def error_received(self, exc: Exception) -> None:
        log.debug("udp error: %s", exc)


class _TcpProtocol(asyncio.Protocol):
    def __init__(self, node: GatewayNode) -> None:
        self.node = node
        self.decoder = wire.FrameDecoder()
        self.peer: Peer | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        addr = transport.get_extra_info("peername")
        tr = self.transport
        assert tr is not None
        self.peer = Peer(wire.TransportKind.TCP, (addr[0], addr[1]),
                         lambda d: tr.write(wire.frame(d)))

    def data_received(self, data: bytes) -> None:
        assert self.peer is not None and self.transport is not None
        try:
            frames = self.decoder.feed(data)
        except RemoteProtocolError as exc:
            # A bad length cannot be resynchronised: count it and close this stream only.
            self.node.metrics.count_drop(exc.reason, wire.TransportKind.TCP)
            self.transport.close()
            return
        for f in frames:
            self.node.on_message(f, self.peer)
        if self.decoder.error is not None:  # a bad length right after these frames
            self.node.metrics.count_drop(self.decoder.error.reason, wire.TransportKind.TCP)
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None:
            self.peer.closed = True


class _UpstreamProtocol(asyncio.DatagramProtocol):
    def __init__(self, node: GatewayNode, session_id: bytes) -> None:
        self.node = node
        self.session_id = session_id

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.node.from_upstream(self.session_id, data)

    def error_received(self, exc: Exception) -> None:
        log.debug("upstream error: %s", exc)
