"""The gateway's session machine: handshake, reattach, data, silence, leases, fencing.

Theory of operation. The machine is driven by calls, as aioquic's
QuicConnection and the client's ``ClientSession``: ``receive(data, peer, now)``
for every datagram or TCP frame, ``upstream_received`` for what a session's
upstream answers, ``store_answered(call_id, answer, now)`` when a store
operation it asked for completes, ``handle_timer(now)`` when ``get_timer()``
comes due, and the operator's commands (``terminate``, ``binding_moved``). It is
read out by ``effects()``: bytes to send to a peer, a store operation to run
(``StoreCall``, whose answer comes back through ``store_answered`` with the same
call id), a payload for a session's upstream, an upstream to close. Metrics,
events and traces go to the sinks it is given, which record and never decide.
It opens no socket, reads no clock and never waits: time is passed in.

A node is stateless with respect to sessions: the store holds every session;
the machine holds only a cache of unwrapped secrets and the local binding
table for the sessions bound here. DATA never touches the store. Control
messages make exactly one store script call on the hot path (a cached
session's REATTACH_REQUEST: the CAS; an uncached one reads the record first).
Every answer to an unvalidated address respects the 3x amplification limit
(``session.binding.within_budget``), and every failure is explicit: an
authenticated REJECT with a reason, or a counted drop.

The lease (fail closed): the node forwards only while the store answered
within ``lease_s``, and only for bindings the store confirmed after the last
lapse. Silence: a binding with no authenticated packet for
``silence_keepalives`` keepalive intervals is reported TRANSPORT_LOST.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import partial
from typing import Any, Protocol

from session import control, wire
from session.binding import (
    Binding,
    PathProbe,
    Peer,
    RekeyState,
    SessionSecrets,
    within_budget,
)
from session.budget import Buckets, Recent, Throttle
from session.errors import RemoteProtocolError, SessionError
from session.handshake import Refusal, Responder, ServerHello
from session.inner import InnerAddresses, InnerPool, parse_prefixes
from session.keys import (
    WRAP_NONCE_LEN,
    KekRing,
    SessionKeys,
    control_policy,
    fingerprint,
    policy_binding,
    rekey_secret,
    unwrap_secret,
    wrap_secret,
)
from session.noise import dh, public_key
from session.reasons import DropReason, NoticeKind, RejectReason, TerminateReason
from session.records import BINDING_ACTION, BindingStatus, RecordPhase, RecordReason
from session.states import (
    LIVE_STATES,
    QUALITY_EVENTS,
    TRANSITIONS,
    SessionEvent,
    SessionState,
    StateMachine,
    is_allowed,
)
from session.storeops import (
    ActivateOp,
    ActivateResult,
    BirthOp,
    BirthResult,
    ClaimAddressesOp,
    ClaimHandshakeOp,
    ClaimSlotOp,
    ClientPolicy,
    ConfirmKeyOp,
    ExpiredSession,
    GetClientOp,
    GetRecordOp,
    PublishMoveOp,
    ReattachOp,
    ReattachResult,
    RefreshOp,
    RefreshResult,
    RekeyOp,
    RekeyResult,
    ReleaseAddressesOp,
    ReleaseSlotOp,
    ServerTimeOp,
    SessionRecord,
    SlotResult,
    StoreFailure,
    StoreOp,
    StoreStatus,
    SweepOp,
    TerminateOp,
    TerminateResult,
    TransitionOp,
    TransitionResult,
)
from session.tunnel import SessionRoute, TunnelDrop, TunnelRouter

KEY_CACHE_SIZE = 200_000
HANDSHAKE_WINDOW_MS = 120_000
RETRY_TOKEN_LIFETIME_S = 10
NOTICE_INTERVAL_S = 0.5  # at most one NOT_BOUND_HERE per session per interval
NOTICE_TABLE_MAX = 100_000
MAX_CONTROL_CALLS = 4096  # store calls in flight; beyond it control messages are dropped
MAX_UNAUTH_CALLS = 1024  # of those, caused by packets not authenticated yet
UNKNOWN_SESSION_TTL_S = 10.0  # a session id the store did not know is not asked again
ALERT_INTERVAL_S = 1.0  # security events per kind and source address, at most one per this
HANDSHAKE_ANSWER_CACHE = 10_000
SWEEP_LIMIT = 500
BIRTH_VERSION = 1  # created at BIRTH v0, HANDSHAKE_COMPLETE applied: ATTACHED v1
BIRTH_EPOCH = 1
REFRESHES_PER_TICK = 1024  # the rest wait for the next maintenance tick
MAX_PATH_PROBES = 4  # new addresses challenged at once per binding
PATH_CHALLENGE_INTERVAL_S = 0.1  # a challenge is repeated at most this often per address
MAX_HELD = 16  # a PENDING binding's packets held until it is ACTIVE
REKEY_MIN_INTERVAL_S = 1.0  # REKEYs a binding may ask at most this often (each one is a write)
REREAD_INTERVAL_S = 1.0  # a cached secret a proof failed under is re-read at most this often
REREAD_WAITERS = 8  # requests of one session that wait for its re-read in flight
# A reattach request made this much earlier than one already seen for its session was
# superseded (the client moved on): it must not win. Below it, two requests cannot be
# ordered by their timestamps (the client's estimate of the store's clock moves a little).
SUPERSEDED_MARGIN_MS = 250
REQUEST_TABLE_MAX = 100_000  # sessions whose newest request time a node remembers


# A transport kind as metrics and events name it ("udp"): Enum.name is a descriptor call.
KIND_LABELS: dict[wire.TransportKind, str] = {k: k.name.lower() for k in wire.TransportKind}


class Outcome(StrEnum):
    """How a handshake or reattach ended (the metrics' and spans' ``outcome`` label)."""

    OK = "ok"
    RETRY = "retry"  # a RETRY cookie (handshake) or an idempotent retransmission (reattach)
    RETRANSMIT = "retransmit"
    REFUSED = "refused"
    REJECTED = "rejected"
    DROPPED = "dropped"


@dataclass(frozen=True)
class GatewaySettings:
    """What the machine needs from the gateway's config, in the units it uses (seconds)."""

    node_id: str
    keepalive_interval: float = 1.0
    silence_keepalives: int = 3
    reattach_window_ms: int = 30_000
    dual_active_window_ms: int = 2_000
    sweep_interval: float = 1.0
    handshake_retry_threshold: float = -1.0  # handshakes/s before RETRY; 0 always, <0 never
    registry_staleness_s: float = 10.0  # how old a node's view of the client registry may be
    source_rate: float = 200.0  # store-costing unauthenticated requests/s per source address
    source_burst: float = 400.0
    max_sessions: int = 1_000_000
    lease_s: float = 3.0  # forward only while the store answered within this
    keys_reject_after_s: float = 180.0  # no data under a session secret older than this
    inner_pool: InnerPool | None = None  # L3 sessions: the cluster's inner-address pools
    # L3: a packet for a session bound on another node is relayed there (NotLocal: routed
    # egress with a relay socket) or, when the node relays nothing (NAT egress), dropped
    relay_not_local: bool = True



# ---- effects ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Send:
    """Send ``data`` to ``peer`` (a datagram, or one frame on its connection). ``leased``: a
    binding's traffic, decided under the node's lease; it may leave only while the lease
    still holds (a node stopped between the decision and the send must not send it when
    it resumes past its lease: ``effects(now)`` checks the lease again)."""

    peer: Peer
    data: bytes
    leased: bool = False


@dataclass(slots=True)
class StoreCall:
    """Run ``op``; hand its answer (or a ``StoreFailure``) to ``store_answered(call_id)``."""

    call_id: int
    op: StoreOp
    span: Span | None = None  # the handshake/reattach span the call belongs to


@dataclass(slots=True)
class ToUpstream:
    """Send ``data`` to the session's upstream ``host:port`` (opened on first use)."""

    session_id: bytes
    upstream: tuple[str, int]
    data: bytes
    flow: int = 0  # the agent's local source (one upstream socket per flow); 0: none


@dataclass(slots=True)
class CloseUpstream:
    """The session's binding is gone from this node: close its upstream, if any."""

    session_id: bytes


@dataclass(slots=True)
class ToTun:
    """Write an L3 session's IP packet (checked: its source, an allowed destination) to the
    node's TUN interface."""

    session_id: bytes
    data: bytes


@dataclass(slots=True)
class NotLocal:
    """A packet from the TUN for inner address ``pool_index`` whose session is not bound
    here, to relay to the node that holds the binding now (only when the node relays:
    ``GatewaySettings.relay_not_local``; else the machine drops it, NO_ROUTE)."""

    pool_index: int
    data: bytes


Effect = Send | StoreCall | ToUpstream | CloseUpstream | ToTun | NotLocal


# ---- the sinks it reports to (gateway/ supplies the real ones) -------------------------------


class Span(Protocol):
    def set(self, outcome: str | None = None, reason: Any = None, version: int | None = None,
            epoch: int | None = None, session_id: bytes | None = None) -> None: ...

    def end(self) -> None: ...

    @property
    def trace_id(self) -> str | None: ...


class Tracer(Protocol):
    def handshake(self, peer: Any) -> Span: ...

    def reattach(self, session_id: bytes, peer: Any) -> Span: ...


class Metrics(Protocol):
    def count_drop(self, reason: object, transport: object, n: int = 1) -> None: ...

    def transport_switch(self, from_: Any, to: Any, reason: Any) -> None: ...

    def state_change(self, from_: Any, to: Any) -> None: ...

    def reattach(self, outcome: str, reason: Any, latency_s: float | None = None) -> None: ...

    def handshake(self, outcome: str, reason: Any) -> None: ...

    def security(self, kind: Any) -> None: ...

    def store_latency(self, op: str, seconds: float) -> None: ...

    def set_store_up(self, up: bool) -> None: ...


class Events(Protocol):
    def emit(self, action: str, **fields: Any) -> bool: ...

    def state_change(self, session_id: bytes, from_state: Any, to_state: Any, version: int,
                     epoch: int, reason: str, **fields: Any) -> Any: ...

    def transport_switch(self, session_id: bytes, from_transport: str, to_transport: str,
                         reason: str, version: int, epoch: int, **fields: Any) -> Any: ...

    def security_event(self, kind: str, reason: Any, session_id: bytes | None = None,
                       **fields: Any) -> Any: ...


class _NoSpan:
    trace_id = None

    def set(self, *a: Any, **k: Any) -> None:
        return None

    def end(self) -> None:
        return None


NO_SPAN: Span = _NoSpan()


class _NoTracer:
    def handshake(self, peer: Any) -> Span:
        return NO_SPAN

    def reattach(self, session_id: bytes, peer: Any) -> Span:
        return NO_SPAN


# ---- operations in flight --------------------------------------------------------------------


class _Handshake:
    """One HANDSHAKE_INIT being answered: what every step needs."""

    __slots__ = ("msg", "raw", "peer", "span", "t0", "responder", "digest", "policy",
                 "claimed_before")

    def __init__(self, msg: wire.HandshakeInit, raw: bytes, peer: Peer, span: Span,
                 t0: float, responder: Responder, digest: bytes) -> None:
        self.msg = msg
        self.raw = raw
        self.peer = peer
        self.span = span
        self.t0 = t0
        self.responder = responder
        self.digest = digest
        self.policy: ClientPolicy | None = None
        self.claimed_before = False  # an earlier copy's claim had an unknown outcome


class _Reattach:
    """One REATTACH_REQUEST being answered."""

    __slots__ = ("req", "raw", "peer", "span", "secrets", "previous", "cached", "t0", "t1",
                 "bid")

    def __init__(self, req: wire.ReattachRequest, raw: bytes, peer: Peer, span: Span,
                 t0: float, bid: bytes) -> None:
        self.req = req
        self.raw = raw
        self.peer = peer
        self.span = span
        self.secrets: SessionSecrets | None = None
        self.previous: SessionSecrets | None = None  # kept since a REKEY (record's wsp)
        self.cached = False  # secrets from this node's cache (may predate a REKEY elsewhere)
        self.t0 = self.t1 = t0
        self.bid = bid


Continuation = Callable[[Any, float], None]


@dataclass
class _Timers:
    maintenance: float = 0.0
    health: float = 0.0
    sweep: float = 0.0


@dataclass
class Health:
    """What the node knows of the store (for /readyz and the lease)."""

    ok: bool = False
    error: str = "not checked yet"
    ok_at: float = float("-inf")  # when the store last answered (our clock)
    trust_since: float = float("-inf")  # bindings confirmed before this must be re-confirmed
    checking: bool = False
    offset_ms: float = 0.0  # store clock minus our ms
    clock_known: bool = False  # offset_ms was learned from the store
    latency_s: float | None = None  # the last health check's round trip


def _same_quic_connection(b: Binding, peer: Peer) -> None:
    """DATA on a QUIC connection other than the binding's is dropped: a new QUIC connection
    carries a session only through its reattach. (QUIC's own migration, a new address on the
    same connection, is a new path of the binding, validated as UDP's is.)"""
    if peer.kind is wire.TransportKind.QUIC and peer.conn != b.peer.conn:
        raise RemoteProtocolError(DropReason.UNEXPECTED, "DATA on another QUIC connection")


class GatewayMachine:
    """One gateway node's protocol logic, without I/O."""

    def __init__(self, settings: GatewaySettings, static_priv: bytes, kek: bytes, *,
                 metrics: Metrics, events: Events, random: Callable[[int], bytes],
                 tracer: Tracer | None = None, previous_keks: Sequence[bytes] = ()) -> None:
        self.settings = settings
        self.instance_id = wire.node_instance(settings.node_id, random(wire.NODE_INSTANCE_LEN))
        self.node = self.instance_id.encode()
        self.metrics = metrics
        self.events = events
        self.tracer: Tracer = tracer or _NoTracer()
        self._static = static_priv
        # ``kek`` wraps the secrets born here; it and ``previous_keks`` (KEK rotation) unwrap
        self.keks = KekRing(kek, previous_keks)
        self._random = random
        self.bindings: dict[bytes, Binding] = {}  # ACTIVE bindings (see binding.py)
        self.pending: dict[bytes, Binding] = {}  # PENDING ones, granted by a reattach
        self.health = Health()
        self._secrets: OrderedDict[bytes, SessionSecrets] = OrderedDict()
        # The previous secret a re-read found (a REKEY's, kept by the store until the client
        # proves the new one), and when: for the session's next requests while a re-read is
        # not due again (a client that never got the REKEY's answer proves under it).
        self._previous: dict[bytes, tuple[SessionSecrets, float]] = {}
        self._out: list[Effect] = []
        self._calls: dict[int, tuple[Continuation, bool, bool]] = {}
        self._control_calls = 0
        self._unauth_calls = 0
        threshold = settings.handshake_retry_threshold
        self._hs_rate = Buckets(threshold if threshold != 0 else 0.0,
                                max(threshold, 0.0), size=1)
        self._sources = Buckets(settings.source_rate, settings.source_burst)
        self._unknown = Recent(UNKNOWN_SESSION_TTL_S)  # session ids the store does not know
        self._reread = Recent(REREAD_INTERVAL_S)  # sessions whose cached secret was re-read
        # Requests waiting for their session's re-read in flight (bounded by the unauth calls).
        self._rereading: dict[bytes, list[_Reattach]] = {}
        self._used_tokens = Recent(2 * RETRY_TOKEN_LIFETIME_S)
        self._alerts = Throttle(ALERT_INTERVAL_S)
        self._reject_after_ms = settings.keys_reject_after_s * 1000
        # Requests already reported (one alert per refused request, not per copy of it).
        self._alerted = Recent(2 * settings.reattach_window_ms / 1000)
        self._newest_request: dict[bytes, int] = {}  # session -> newest proof timestamp seen
        # Handshakes this node is answering or whose claim's outcome it never learned, by
        # digest: a copy of one from the same address is the client's retransmission.
        self._hs_mine: OrderedDict[bytes, list[Any]] = OrderedDict()  # [peer, busy, claimed]
        # Is each client key still in the registry, and when we last asked (bounded staleness:
        # a revoked client's sessions end within registry_staleness_s plus a refresh period).
        self._registered: dict[str, tuple[bool, float]] = {}
        # Reattaches waiting for their client's registry read, by client (one read in flight
        # per client: when a client's entry goes stale, each of its reattaches needs it).
        self._registry_waiters: dict[str, list[_Reattach]] = {}
        self._registry_waiting = 0  # all clients' waiters: at most MAX_CONTROL_CALLS
        self._sweeping = False
        self._next_call = 1
        self._timers = _Timers()
        self._token_key = random(32)
        self._notice_sent: dict[bytes, float] = {}
        # Answers to recent handshakes, so a retransmitted INIT (its answer was lost) from the
        # same address gets the same answer; from another address it is a replay.
        self._hs_answers: OrderedDict[bytes, tuple[tuple[int, str, int], bytes]] = OrderedDict()
        pool = settings.inner_pool
        self.tunnel = TunnelRouter(pool) if pool is not None else None
        self.tunnel_drops: dict[TunnelDrop, int] = {}
        self._record(RecordPhase.NODE_STARTED, None, 0, RecordReason.STARTED, 0, status=None)

    # ---- outputs ---------------------------------------------------------------------------

    def effects(self, now: float | None = None) -> list[Effect]:
        """What to do now, in order (the list is handed over: the machine starts a new one).
        ``now``: the adapter's clock as it is about to execute them. A binding's traffic
        (``Send.leased``) decided under the lease is dropped and counted (LEASE_EXPIRED) if
        the lease ran out since: the process was stopped between the decision and the send
        (SIGSTOP, a paused VM), and a fenced node sends nothing of a binding's."""
        out, self._out = self._out, []
        if now is not None and now - self.health.ok_at >= self.settings.lease_s:
            kept: list[Effect] = []
            for e in out:
                if type(e) is Send and e.leased:
                    self.metrics.count_drop(DropReason.LEASE_EXPIRED, e.peer.kind)
                else:
                    kept.append(e)
            out = kept
        return out

    def get_timer(self) -> float:
        """When ``handle_timer`` is next due (our clock)."""
        t = self._timers
        return min(t.maintenance, t.health, t.sweep)

    @property
    def calls_in_flight(self) -> int:
        return len(self._calls)

    @property
    def control_calls_in_flight(self) -> int:
        """Store calls that packets from the network caused (bounded by MAX_CONTROL_CALLS)."""
        return self._control_calls

    def store_ms(self, now: float) -> int:
        """The store's clock, estimated from ours (the clock every node shares)."""
        return int(now * 1000 + self.health.offset_ms)

    def _record(self, phase: RecordPhase, sid: bytes | None, epoch: int, reason: RecordReason,
                store_ms: int, *, holder: str | None = None, version: int | None = None,
                binding_id: bytes | None = None,
                status: BindingStatus | None = BindingStatus.ACTIVE) -> None:
        """One control-plane history record (session.records): every binding begin and end,
        every release from this node's table, lease lapses and re-confirmations. The one
        place they are written, so the history checker sees all of them alike."""
        # ``_value_``: the member's value as a plain attribute (``.value`` is a descriptor
        # call, three per record, each costing more than the rest of the field)
        self.events.emit(BINDING_ACTION, session_id=sid, phase=phase._value_,
                         reason=reason._value_, epoch=epoch,
                         holder=holder if holder is not None else self.instance_id,
                         incarnation=self.instance_id, store_ms=store_ms, state_version=version,
                         binding_id=binding_id.hex() if binding_id is not None else None,
                         binding_status=status._value_ if status is not None else None)

    def engine_record(self, installed: bool, sid: bytes, epoch: int, now: float) -> None:
        """The compiled engine was given (or lost) a binding's keys: a record like the
        machine's own, so the history shows the data plane held only what the node held."""
        self._record(RecordPhase.ENGINE_INSTALL if installed else RecordPhase.ENGINE_REMOVE,
                     sid, epoch, RecordReason.ENGINE, self.store_ms(now), status=None)

    def forwards_plainly(self, b: Binding) -> bool:
        """Whether ``b``'s payloads are forwarded without a decision, so that the compiled
        engine may carry them alone: validated, no new address under validation, no REKEY
        in flight (the downlink still under the previous keys), a live state, a UDP peer."""
        return (b.validated and not b.probes and b.prev_channel is None
                and b.state in LIVE_STATES and b.peer.kind is wire.TransportKind.UDP)

    def lease(self) -> tuple[float, float]:
        """The node's lease (``_leased``): until when it may forward (our clock), and since
        when it trusts the store (a binding confirmed before that carries nothing)."""
        h = self.health
        return (h.ok_at + self.settings.lease_s, h.trust_since)

    def engine_forwarded(self, sid: bytes, rx: int, tx: int, last_rx: float, rx_bytes: int,
                         tx_bytes: int) -> None:
        """What the compiled engine forwarded for one binding since it last said: counted,
        and a binding it received on was heard (not lost; silence counts from ``last_rx``)."""
        b = self.bindings.get(sid)
        if b is None:
            return
        if rx:
            b.rx_packets += rx
            b.rx_bytes += rx_bytes
            b.lost = False
            if last_rx > b.last_rx:
                b.last_rx = last_rx
        b.tx_packets += tx
        b.tx_bytes += tx_bytes

    def sessions_by_state(self) -> dict[str, int]:
        counts: dict[str, int] = {s.name: 0 for s in SessionState}
        for b in self.bindings.values():
            counts["RECOVERING" if b.lost else b.state.name] += 1
        return counts

    # ---- inputs: the store -----------------------------------------------------------------

    def _call(self, op: StoreOp, then: Continuation, span: Span | None = None,
              control: bool = False, unauth: bool = False) -> None:
        """Ask for ``op``; ``control``: work a packet from the network caused, which the
        MAX_CONTROL_CALLS bound applies to (the node's own upkeep is bounded by its timers);
        ``unauth``: caused before anything was authenticated (MAX_UNAUTH_CALLS), so that
        a flood of those never takes the slots of authenticated work."""
        cid = self._next_call
        self._next_call += 1
        self._calls[cid] = (then, control, unauth)
        if control:
            self._control_calls += 1
        if unauth:
            self._unauth_calls += 1
        self._out.append(StoreCall(cid, op, span))

    def _control_full(self) -> bool:
        return self._control_calls >= MAX_CONTROL_CALLS

    def store_answered(self, call_id: int, answer: Any, now: float) -> None:
        """The answer to ``StoreCall(call_id)``: a typed result, or a ``StoreFailure``."""
        entry = self._calls.pop(call_id, None)
        if entry is not None:
            then, control, unauth = entry
            if control:
                self._control_calls -= 1
            if unauth:
                self._unauth_calls -= 1
            then(answer, now)

    # ---- inputs: the network ---------------------------------------------------------------

    def receive(self, data: bytes, peer: Peer, now: float) -> None:
        """One datagram or TCP frame from ``peer``. Bad input is dropped and counted."""
        try:
            msg = wire.decode(data)
            if isinstance(msg, wire.Data):
                self._handle_data(msg, data, peer, now)
            elif isinstance(msg, wire.ReattachRequest):
                self._handle_reattach_request(msg, data, peer, now)
            elif isinstance(msg, wire.HandshakeInit):
                self._handle_handshake_init(msg, data, peer, now)
            else:
                raise RemoteProtocolError(DropReason.UNEXPECTED, msg.TYPE.name)
        except RemoteProtocolError as exc:
            self._drop(exc.reason, peer)

    def _drop(self, reason: DropReason, peer: Peer) -> None:
        self.metrics.count_drop(reason, peer.kind)

    def _answer(self, peer: Peer, request_size: int, out: bytes) -> None:
        """Answer one packet from an unvalidated address: at most 3x what it sent."""
        if within_budget(request_size, 0, len(out)):
            self._out.append(Send(peer, out))
        else:
            self.metrics.count_drop(DropReason.NOT_VALIDATED, peer.kind)

    def _send(self, b: Binding, data: bytes) -> None:
        if not b.may_send(len(data)):
            self.metrics.count_drop(DropReason.NOT_VALIDATED, b.peer.kind)
            return
        self._out.append(Send(b.peer, data, leased=True))
        b.tx_packets += 1
        b.tx_bytes += len(data)
        if b.probes:
            # While a new address is being validated the downlink goes there as well, within
            # its 3x budget: a NAT rebinding loses (almost) nothing, a copier gains nothing.
            for peer, p in b.probes.items():
                if within_budget(p.rx, p.tx, len(data)):
                    p.tx += len(data)
                    self._out.append(Send(peer, data, leased=True))

    # ---- data ------------------------------------------------------------------------------

    def _leased(self, b: Binding, now: float) -> bool:
        """Whether this node may still forward for ``b`` (see the lease above)."""
        h = self.health
        return now - h.ok_at < self.settings.lease_s and b.confirmed_at >= h.trust_since

    def _handle_data(self, msg: wire.Data, raw: bytes, peer: Peer, now: float) -> None:
        b = self.bindings.get(msg.session_id)
        if b is None or b.epoch != msg.epoch:
            if b is not None and b.prev_channel is not None and b.prev_channel.epoch == msg.epoch:
                return self._prev_epoch_data(b, msg, raw, peer, now)
            p = self.pending.get(msg.session_id)
            if p is not None and p.epoch == msg.epoch:
                return self._pending_data(p, msg, raw, peer, now)
            if b is None and p is None:  # a stale epoch is the sender's problem
                self._maybe_not_bound(msg.session_id, peer, raw, now)
            raise RemoteProtocolError(
                DropReason.UNKNOWN_SESSION if b is None else DropReason.STALE_EPOCH, "DATA")
        if not self._leased(b, now):
            raise RemoteProtocolError(DropReason.LEASE_EXPIRED, "DATA")
        _same_quic_connection(b, peer)
        plain = b.channel.open(msg, raw)  # replay window + AEAD; raises on failure
        inner = wire.decode_inner(plain)
        if peer is not b.peer and peer != b.peer:
            # Authenticated, from another address: a NAT rebinding, or a copy. Challenge it;
            # move only when it answers (the packet itself is the client's: it is used).
            if inner.kind is wire.InnerType.PATH_RESPONSE:
                if self._path_answered(b, peer, inner.payload):
                    self._roam(b, peer)
                    b.validated = True
            else:
                self._probe(b, peer, len(raw), now)
        elif not b.validated:
            b.validated = True
        b.last_rx = now
        b.rx_packets += 1
        b.rx_bytes += len(raw)
        rk = b.rekey
        if rk is not None and b.prev_channel is not None and not rk.confirming:
            self._confirm_key(b, rk)
        self._deliver(b, inner, now)

    def _prev_epoch_data(self, b: Binding, msg: wire.Data, raw: bytes, peer: Peer,
                         now: float) -> None:
        """A packet under the keys a REKEY replaced, still in flight (or the client's REKEY
        again: its answer was lost). From the binding's own peer only."""
        assert b.prev_channel is not None
        plain = b.prev_channel.open(msg, raw)
        if peer != b.peer:
            raise RemoteProtocolError(DropReason.UNEXPECTED, "previous keys from a new address")
        b.last_rx = now
        b.rx_packets += 1
        b.rx_bytes += len(raw)
        self._deliver(b, wire.decode_inner(plain), now, self._tx_made_ms(b))

    def _tx_made_ms(self, b: Binding) -> int:
        """When the secret of ``b.tx_channel`` was made (store ms): the previous one's while
        a REKEY waits for the client's confirmation."""
        rk = b.rekey
        if b.prev_channel is not None and rk is not None:
            return rk.prev_made_ms
        return b.secrets.made_ms

    def _deliver(self, b: Binding, inner: wire.Inner, now: float,
                 made_ms: int | None = None) -> None:
        """One authenticated packet of an ACTIVE binding (under the keys of a secret made at
        ``made_ms``; default: the current one): act on what it carries."""
        b.lost = False
        if b.state is SessionState.RECOVERING and not b.transition_pending:
            # We had reported it lost on silence, but the same binding speaks again.
            self._transition(b, SessionEvent.TRANSPORT_RESTORED, "gateway: binding speaks again",
                             now)
        kind = inner.kind
        if kind is wire.InnerType.PAYLOAD:
            if made_ms is None:
                made_ms = b.secrets.made_ms
            if self.store_ms(now) - made_ms > self._reject_after_ms:
                self.metrics.count_drop(DropReason.KEYS_EXPIRED, b.peer.kind)
                return
            self._to_upstream(b, inner.payload)
        elif kind is wire.InnerType.REKEY:
            self._rekey(b, inner, now)
        elif kind is wire.InnerType.FLOW_PAYLOAD:
            if b.secrets.route is not None:  # L3 carries IP packets, not flows
                self._tunnel_drop(TunnelDrop.NOT_L3, b.peer.kind)
            else:
                self._to_upstream(b, inner.payload, inner.flow)
        elif kind is wire.InnerType.KEEPALIVE:
            ack = wire.inner_keepalive_ack(inner.seq, inner.echo_ms, b.version, int(b.state))
            self._send(b, b.tx_channel.seal(ack))
            if inner.state != b.state and not b.transition_pending:
                self._reported_state(b, inner.state, now)
        elif kind is wire.InnerType.CLOSE:
            self._terminate(b.session_id, TerminateReason.CLIENT_CLOSE, "client close",
                            notify=False)
        # PATH_RESPONSE from the peer itself (a late answer): nothing left to validate.

    def _probe(self, b: Binding, peer: Peer, size: int, now: float) -> None:
        """Challenge a new address of ``b`` (within 3x what it sent)."""
        probes = b.probes
        if probes is None:
            probes = b.probes = {}
        p = probes.get(peer)
        if p is None:
            if len(probes) >= MAX_PATH_PROBES:  # copies from many addresses: keep the newest
                del probes[next(iter(probes))]
            p = probes[peer] = PathProbe(self._random(wire.PATH_DATA_LEN))
        p.rx += size
        if now - p.last_sent < PATH_CHALLENGE_INTERVAL_S:
            return
        out = b.tx_channel.seal(wire.inner_path_challenge(p.challenge))
        if not within_budget(p.rx, p.tx, len(out)):
            self.metrics.count_drop(DropReason.NOT_VALIDATED, peer.kind)
            return
        p.tx += len(out)
        p.last_sent = now
        self._out.append(Send(peer, out))
        b.tx_packets += 1

    def _path_answered(self, b: Binding, peer: Peer, data: bytes) -> bool:
        """Whether the client answered ``b``'s challenge from ``peer``: the address is its
        own, and the caller moves the binding there."""
        p = b.probes.get(peer) if b.probes else None
        if p is None or not hmac.compare_digest(p.challenge, data):
            self.metrics.count_drop(DropReason.UNEXPECTED, peer.kind)
            return False
        b.probes = None
        return True

    # ---- REKEY: a fresh Diffie-Hellman in band ---------------------------------------------

    def _rekey(self, b: Binding, inner: wire.Inner, now: float) -> None:
        """The client's REKEY on the ACTIVE binding: a new X25519 exchange derives the next
        session secret (``rekey_secret``), the store installs it with a new binding (one
        script, rekey.lua), then the answer goes back under the keys the client still has."""
        rk = b.rekey
        if rk is not None:  # one at a time; the same one again means our answer was lost
            if rk.answer and rk.client_pub == inner.payload and b.prev_channel is not None:
                self._send(b, b.prev_channel.seal(rk.answer))
            return
        s = b.secrets
        if not b.validated or inner.generation != s.generation:
            self.metrics.count_drop(DropReason.UNEXPECTED, b.peer.kind)
            return
        if self.store_ms(now) - s.made_ms < REKEY_MIN_INTERVAL_S * 1000:
            # Each REKEY is a store write: a client (authenticated, but maybe hostile) gets
            # at most one per interval (WireGuard: one handshake per REKEY_TIMEOUT).
            self.metrics.count_drop(DropReason.RATE_LIMITED, b.peer.kind)
            return
        priv = self._random(32)
        pub = public_key(priv)
        try:
            shared = dh(priv, inner.payload)
        except SessionError:
            self.metrics.count_drop(DropReason.BAD_HANDSHAKE, b.peer.kind)
            return
        secret = rekey_secret(s.secret, shared, inner.payload, pub, s.generation + 1)
        new = SessionSecrets(secret, SessionKeys(secret), s.upstream, s.client_id, s.ttl_ms,
                             s.policy, s.generation + 1, 0, route=s.route)
        wrapped, control_wrapped = self._wrap(b.session_id, new)
        bid = self._random(wire.BINDING_ID_LEN)
        rk = b.rekey = RekeyState(inner.payload)
        op = RekeyOp(b.session_id, b.epoch, b.binding_id, self.instance_id, s.generation,
                     wrapped, control_wrapped, bid)
        self._call(op, lambda res, t: self._rekeyed(b, rk, new, bid, pub, res, t))

    def _rekeyed(self, b: Binding, rk: RekeyState, new: SessionSecrets, bid: bytes,
                 pub: bytes, res: Any, now: float) -> None:
        sid = b.session_id
        if self.bindings.get(sid) is not b or b.rekey is not rk:
            return
        if not isinstance(res, RekeyResult) or not res.ok:
            b.rekey = None  # the client asks again
            if isinstance(res, RekeyResult) and res.expired_now:  # this call ended it
                self._release(b.secrets.client_id, sid)
                self._state_changed(sid, b.state, SessionState.TERMINATED, res.version,
                                    res.epoch, "EXPIRED")
                self._record(RecordPhase.END, sid, res.epoch, RecordReason.EXPIRED,
                             res.server_ms, holder=res.node, version=res.version, status=None)
            if isinstance(res, RekeyResult) and res.status in (
                    StoreStatus.NOT_OWNER, StoreStatus.TERMINATED, StoreStatus.EXPIRED):
                self._refresh(b, now)  # we may not hold it any more: the store says
            return
        new.made_ms = res.server_ms
        # One write replaced the binding (same node, new epoch and keys): its records.
        self._record(RecordPhase.END, sid, b.epoch, RecordReason.REKEYED, res.server_ms,
                     status=None)
        self._record(RecordPhase.RELEASE, sid, b.epoch, RecordReason.REKEYED, res.server_ms,
                     status=None)
        self._record(RecordPhase.BEGIN, sid, res.epoch, RecordReason.REKEYED, res.server_ms,
                     binding_id=bid)
        rk.prev_made_ms = b.secrets.made_ms
        b.prev_channel = b.channel
        b.epoch, b.binding_id, b.secrets, b._channel = res.epoch, bid, new, None
        self._cache(sid, new)
        rk.answer = wire.inner_rekey_ack(new.generation, res.epoch, bid, pub)
        self._send(b, b.prev_channel.seal(rk.answer))
        self.events.emit("rekey", outcome="success", session_id=sid, epoch=res.epoch,
                         key_generation=new.generation)

    def _confirm_key(self, b: Binding, rk: RekeyState) -> None:
        """The client's first packet under the new keys: it has them. The previous secret
        goes from the store and from this node (forward secrecy from here on)."""
        rk.confirming = True

        def done(ok: Any, now: float) -> None:
            if b.rekey is not rk:
                return
            if isinstance(ok, StoreFailure):
                rk.confirming = False  # the next packet tries again
                return
            b.prev_channel = None
            b.rekey = None
            self._previous.pop(b.session_id, None)

        self._call(ConfirmKeyOp(b.session_id, b.secrets.generation), done)

    # ---- PENDING bindings ------------------------------------------------------------------

    def _pending_data(self, p: Binding, msg: wire.Data, raw: bytes, peer: Peer,
                      now: float) -> None:
        """A packet for a PENDING binding: it validates the path, then one store script makes
        the binding ACTIVE (``_activated``). Its packets wait for that (a few, bounded); it
        sends nothing but path challenges."""
        _same_quic_connection(p, peer)
        plain = p.channel.open(msg, raw)  # replay window + AEAD; raises on failure
        inner = wire.decode_inner(plain)
        if peer != p.peer:
            if inner.kind is wire.InnerType.PATH_RESPONSE:
                if self._path_answered(p, peer, inner.payload):
                    p.peer = peer
                    p.validated = True
            else:
                self._probe(p, peer, len(raw), now)
        else:
            p.validated = True
        p.last_rx = now
        p.rx_packets += 1
        p.rx_bytes += len(raw)
        if inner.kind is not wire.InnerType.PATH_RESPONSE:
            held = p.held if p.held is not None else []
            p.held = held
            if len(held) < MAX_HELD:
                held.append(inner)
            else:
                self.metrics.count_drop(DropReason.NOT_VALIDATED, peer.kind)
        if p.validated and not p.activating:
            p.activating = True
            self._call(ActivateOp(p.session_id, p.epoch, p.binding_id, self.instance_id),
                       lambda res, t: self._activated(p, res, t))

    def _activated(self, p: Binding, res: Any, now: float) -> None:
        """activate.lua's answer: the binding is ACTIVE, or it was superseded or ended."""
        sid = p.session_id
        if self.pending.get(sid) is not p:
            if isinstance(res, ActivateResult) and res.ok and res.prev_node:
                # Made ACTIVE after this node let it go (a newer grant here replaced it):
                # the store's write is recorded all the same, and the binding released.
                at = res.activated_ms or res.server_ms
                self._record(RecordPhase.END, sid, res.prev_epoch, RecordReason.MOVED, at,
                             holder=res.prev_node, status=None)
                self._record(RecordPhase.BEGIN, sid, p.epoch, RecordReason.VALIDATED, at,
                             binding_id=p.binding_id)
                self._record(RecordPhase.RELEASE, sid, p.epoch, RecordReason.SUPERSEDED,
                             res.server_ms, status=None)
            return
        p.activating = False
        if isinstance(res, StoreFailure):
            p.activation_unknown = True  # the client's next packet asks again, or upkeep does
            return
        assert isinstance(res, ActivateResult)
        if not res.ok:  # a newer reattach superseded it, or the session ended
            self._drop_pending(sid, RecordReason.SUPERSEDED if res.status is StoreStatus.NOT_OWNER
                               else _ended_elsewhere(res.status), res.server_ms)
            self.events.emit("binding_superseded", outcome="failure", session_id=sid,
                             reason=res.status.name, epoch=p.epoch, current_epoch=res.epoch,
                             current_node=res.node or None)
            if res.expired_now:  # this call wrote the EXPIRED tombstone: its event, its record
                self._release(p.secrets.client_id, sid)
                self._state_changed(sid, p.state, SessionState.TERMINATED, res.version,
                                    res.epoch, "EXPIRED")
                self._record(RecordPhase.END, sid, res.epoch, RecordReason.EXPIRED,
                             res.server_ms, holder=res.node, version=res.version, status=None)
                self._tell_holder(sid, res.node)
            b = self.bindings.get(sid)
            if b is not None and res.status in (StoreStatus.TERMINATED, StoreStatus.EXPIRED):
                self._refresh(b, now)  # ends it, tells the client
            return
        del self.pending[sid]
        if res.prev_node:  # the write that made it ACTIVE ended the previous binding
            at = res.activated_ms or res.server_ms  # (a repeated call: the first one's)
            self._record(RecordPhase.END, sid, res.prev_epoch, RecordReason.MOVED, at,
                         holder=res.prev_node, status=None)
            self._record(RecordPhase.BEGIN, sid, p.epoch, RecordReason.VALIDATED, at,
                         binding_id=p.binding_id)
        self._drop_binding(sid, RecordReason.MOVED, res.server_ms)
        self.bindings[sid] = p
        if p.secrets.route is not None and self.tunnel is not None:
            self.tunnel.add(sid, p.secrets.route)
        p.confirmed_at = p.last_refresh = now
        self._announce(p, res.prev_node)
        held, p.held = p.held or [], None
        for inner in held:
            if self.bindings.get(sid) is not p:
                break
            self._deliver(p, inner, now)

    def _to_upstream(self, b: Binding, payload: bytes, flow: int = 0) -> None:
        route = b.secrets.route
        if route is not None:  # L3: an IP packet, cryptokey-routed
            why = route.check_uplink(payload)
            if why is not None:
                return self._tunnel_drop(why, b.peer.kind)
            self._out.append(ToTun(b.session_id, payload))
            return
        addr = b.secrets.upstream_address()
        if addr is None:
            self.metrics.count_drop(DropReason.POLICY, b.peer.kind)
            return
        self._out.append(ToUpstream(b.session_id, addr, payload, flow))

    def upstream_received(self, session_id: bytes, data: bytes, now: float,
                          flow: int = 0) -> None:
        """A reply from the session's upstream target (to ``flow``): tunnel it back."""
        b = self.bindings.get(session_id)
        if b is None or not b.validated or len(data) > wire.MAX_PAYLOAD_SIZE:
            self.metrics.count_drop(DropReason.NOT_VALIDATED, wire.TransportKind.UDP)
            return
        if not self._leased(b, now):
            self.metrics.count_drop(DropReason.LEASE_EXPIRED, wire.TransportKind.UDP)
            return
        if self.store_ms(now) - self._tx_made_ms(b) > self._reject_after_ms:
            # Nothing tunnelled under a secret past reject-after (the client's REKEY is due).
            self.metrics.count_drop(DropReason.KEYS_EXPIRED, b.peer.kind)
            return
        inner = wire.inner_flow_payload(flow, data) if flow else wire.inner_payload(data)
        self._send(b, b.tx_channel.seal(inner))

    def tun_received(self, packet: bytes, now: float, relayed: bool = False) -> None:
        """An IP packet from the node's TUN (or, ``relayed``, from another node that does not
        hold its session): tunnel it to the session owning its destination, only to it."""
        tunnel = self.tunnel
        if tunnel is None:
            return self._tunnel_drop(TunnelDrop.NOT_L3, wire.TransportKind.UDP)
        sid, dst, why = tunnel.owner(packet)
        b = self.bindings.get(sid) if sid is not None else None
        if b is None or b.secrets.route is None or dst is None or not b.secrets.route.owns(dst):
            index = tunnel.pool_index(dst) if dst is not None else None
            if index is not None and not relayed and self.settings.relay_not_local:
                self._out.append(NotLocal(index, packet))
                return
            return self._tunnel_drop(why or TunnelDrop.NO_ROUTE, wire.TransportKind.UDP)
        src = packet[12:16] if packet[0] >> 4 == 4 else packet[8:24]
        if not b.secrets.route.allows(src):
            return self._tunnel_drop(TunnelDrop.SOURCE_DENIED, b.peer.kind)
        self.upstream_received(b.session_id, packet, now)

    def _tunnel_drop(self, why: TunnelDrop, kind: wire.TransportKind) -> None:
        self.tunnel_dropped(why, kind)

    def tunnel_dropped(self, why: TunnelDrop, kind: wire.TransportKind, n: int = 1) -> None:
        """Count ``n`` IP packets refused for ``why`` (here, or by the compiled engine)."""
        self.tunnel_drops[why] = self.tunnel_drops.get(why, 0) + n
        self.metrics.count_drop(DropReason.SPOOFED_SOURCE if why is TunnelDrop.SPOOFED_SOURCE
                                else DropReason.POLICY, kind, n)

    def _roam(self, b: Binding, peer: Peer) -> None:
        old = b.peer
        b.peer = peer
        if old.kind == peer.kind and old.addr == peer.addr and old.conn == peer.conn:
            # Only the balancer's flow changed (a reload or restart gives it new sockets):
            # the client's transport did not move, so it is no switch and no NAT rebinding.
            self.events.emit("balancer_flow", outcome="success", session_id=b.session_id,
                             source_ip=peer.addr[0])
            return
        reason = "nat_rebind" if old.kind == peer.kind else "path_change"
        self.metrics.transport_switch(KIND_LABELS[old.kind], KIND_LABELS[peer.kind], reason)
        self.events.transport_switch(b.session_id, old.describe(), peer.describe(), reason,
                                     b.version, b.epoch, source_ip=peer.addr[0])

    def _maybe_not_bound(self, sid: bytes, peer: Peer, raw: bytes, now: float) -> None:
        """Tell a client (authenticated) that this node does not hold its binding."""
        last = self._notice_sent.get(sid)
        if last is not None and now - last < NOTICE_INTERVAL_S:
            return
        if self._unknown.seen(sid, now) or not self._source_budget(peer, now):
            return
        if len(self._notice_sent) > NOTICE_TABLE_MAX:
            self._notice_sent.clear()
        self._notice_sent[sid] = now
        self._call(GetRecordOp(sid), lambda rec, t: self._not_bound_loaded(sid, peer, raw, rec, t),
                   control=True, unauth=True)

    def _not_bound_loaded(self, sid: bytes, peer: Peer, raw: bytes, rec: Any, now: float) -> None:
        if rec is None:
            self._unknown.add(sid, now)
        if not isinstance(rec, SessionRecord) or sid in self.bindings:
            return  # unknown, the store is away, or bound here meanwhile: nothing to say
        secrets = self._secrets_from(sid, rec)
        if secrets is None:
            return
        terminated = rec.state is SessionState.TERMINATED
        kind = NoticeKind.TERMINATED if terminated else NoticeKind.NOT_BOUND_HERE
        reason = int(rec.terminate_reason or 0) if terminated else 0
        # The notice echoes the triggering packet's AEAD tag: the client accepts a hint only
        # for a packet it really sent, so forged DATA cannot talk it off a working path.
        notice = wire.Notice(sid, kind, reason, rec.version, raw[-wire.NONCE_LEN:],
                             self.store_ms(now))
        self._answer(peer, len(raw), control.seal(notice, secrets.keys.control_key))

    # ---- state changes the gateway observes ------------------------------------------------

    def _reported_state(self, b: Binding, reported: int, now: float) -> None:
        """The client reports a quality state; record the transition in the store."""
        try:
            event = QUALITY_EVENTS.get(SessionState(reported))
        except ValueError:
            return
        if event is not None and is_allowed(b.state, event):
            self._transition(b, event, "client_reported", now)

    def _transition(self, b: Binding, event: SessionEvent, why: str, t0: float) -> None:
        if self._control_full():
            return
        b.transition_pending = True
        self._call(TransitionOp(b.session_id, b.version, event),
                   lambda res, now: self._transitioned(b, why, t0, res, now), control=True)

    def _transitioned(self, b: Binding, why: str, t0: float, res: Any, now: float) -> None:
        b.transition_pending = False
        if not isinstance(res, TransitionResult):
            return
        self.metrics.store_latency("transition", max(0.0, now - t0))
        sid = b.session_id
        current = self.bindings.get(sid) is b
        if res.status in (StoreStatus.TERMINATED, StoreStatus.EXPIRED):
            # The session is over (this call wrote the EXPIRED tombstone, or it was one).
            if current and b.validated:
                why_end = res.terminate_reason or TerminateReason.EXPIRED
                self._send(b, b.tx_channel.seal(wire.inner_close(int(why_end))))
            if res.expired_now:
                self._release(b.secrets.client_id, sid)
                self._state_changed(sid, res.prev_state or b.state, SessionState.TERMINATED,
                                    res.version, res.epoch, "EXPIRED")
                self._record(RecordPhase.END, sid, res.epoch, RecordReason.EXPIRED,
                             res.server_ms, version=res.version, status=None,
                             holder=self.instance_id if res.epoch == b.epoch else "")
            if current:
                self._drop_binding(sid, RecordReason.EXPIRED if res.expired_now
                                   else _ended_elsewhere(res.status), res.server_ms)
            return
        if res.state is None:
            return
        # The session's ACTIVE binding is another one (ours moved and its notice was missed;
        # not a REKEY of ours still in flight): the session's state is not ours to copy, or
        # a later report from here would be written at its current version.
        moved = (current and res.epoch != b.epoch
                 and not (b.rekey is not None and not b.rekey.answer))
        if res.ok:
            # The store changed: its event is emitted even if the binding here changed
            # meanwhile (then only the binding's copy of the state is left alone).
            old = b.state if current else (res.prev_state or b.state)
            if current and not moved:
                if TRANSITIONS[old].get(res.event) is res.state and res.version > b.version:
                    b.sm.adopt(res.version, res.event)  # the store applied the table's edge
                elif res.version > b.version:
                    b.sm.resync(res.state, res.version)  # our copy had fallen behind
            self._state_changed(sid, old, res.state, res.version, res.epoch, why,
                                b.peer.addr[0])
        elif current and not moved and res.version > b.version:
            b.sm.resync(res.state, res.version)
        if moved:  # one read, and it is let go (_still_held checks the node too)
            self._call(GetRecordOp(sid), partial(self._still_held, b))

    def _state_changed(self, sid: bytes, old: SessionState, new: SessionState, version: int,
                       epoch: int, reason: str, source_ip: str | None = None) -> None:
        if old is new:  # a reattach of an ATTACHED session: a transport switch, not a state change
            return
        self.metrics.state_change(old.name, new.name)
        self.events.state_change(sid, old.name, new.name, version, epoch, reason,
                                 source_ip=source_ip)

    # ---- handshake -------------------------------------------------------------------------

    def _retry_token(self, peer: Peer, handshake_id: bytes, bucket: int) -> bytes:
        """A stateless RETRY token: bound to the address, the handshake and a time bucket."""
        msg = f"{peer.describe()}|{bucket}|".encode() + handshake_id
        mac = hmac.new(self._token_key, msg, hashlib.blake2s).digest()[:24]
        return mac + bucket.to_bytes(8, "big")

    def _token_valid(self, token: bytes, handshake_id: bytes, peer: Peer, now: float) -> bool:
        if len(token) != 32:
            return False
        bucket = int.from_bytes(token[24:], "big")
        if int(now) // RETRY_TOKEN_LIFETIME_S - bucket not in (0, 1):
            return False
        return hmac.compare_digest(token, self._retry_token(peer, handshake_id, bucket))

    def _needs_retry(self, now: float) -> bool:
        """Handshakes beyond ``handshake_retry_threshold`` per second get a RETRY first (O(1))."""
        return not self._hs_rate.take(None, now)

    def _source_budget(self, peer: Peer, now: float) -> bool:
        """Store-costing work an unauthenticated packet may cause: per source, and in all."""
        return (self._unauth_calls < MAX_UNAUTH_CALLS and not self._control_full()
                and self._sources.take(peer.addr[0], now))

    def _alert(self, kind: str, reason: str, now: float, source_ip: str | None = None,
               request: bytes | None = None, **fields: Any) -> None:
        """A security event, counted always, emitted at most once per kind, source and
        second (with how many it folds in): a flood cannot roll the audit log over.
        ``request``: what identifies the refused request (its nonce or proof); its copies
        (retransmissions, duplicates) are counted, not reported again."""
        self.metrics.security(kind)
        if request is not None:
            if self._alerted.seen((kind, request), now):
                return
            self._alerted.add((kind, request), now)
        folded = self._alerts.admit((kind, source_ip), now)
        if folded is None:
            return
        if folded:
            fields["suppressed"] = folded
        self.events.security_event(kind, reason, source_ip=source_ip, **fields)

    def _handle_handshake_init(self, msg: wire.HandshakeInit, raw: bytes, peer: Peer,
                               now: float) -> None:
        if msg.token:
            if not self._token_valid(msg.token, msg.handshake_id, peer, now):
                raise RemoteProtocolError(DropReason.BAD_MAC, "HANDSHAKE_INIT token")
        elif self._needs_retry(now):
            token = self._retry_token(peer, msg.handshake_id, int(now) // RETRY_TOKEN_LIFETIME_S)
            self._answer(peer, len(raw), wire.encode(wire.Retry(msg.handshake_id, token)))
            self.metrics.handshake(Outcome.RETRY, "")
            return
        if not self._source_budget(peer, now):  # before the Diffie-Hellman work
            raise RemoteProtocolError(DropReason.RATE_LIMITED, "HANDSHAKE_INIT")
        try:
            responder = Responder(self._static, msg.handshake_id, msg.noise)
        except SessionError:
            self.metrics.handshake(Outcome.DROPPED, "BAD_HANDSHAKE")
            raise RemoteProtocolError(DropReason.BAD_HANDSHAKE, "HANDSHAKE_INIT") from None
        digest = hashlib.sha256(msg.noise).digest()
        cached = self._hs_answers.get(digest)
        if cached is not None:
            if cached[0] == peer.key:
                self._out.append(Send(peer, cached[1]))  # the same answer, nothing created twice
                self.metrics.handshake(Outcome.RETRANSMIT, "")
            else:
                self._handshake_replay(peer, now)
            return
        mine = self._hs_mine.get(digest)
        if mine is not None and mine[1]:  # being answered: a copy (retransmission or replay)
            if mine[0] == peer.key:
                self.metrics.handshake(Outcome.RETRANSMIT, "")
            else:
                self._handshake_replay(peer, now)
            return
        claimed_before = mine is not None and mine[0] == peer.key and mine[2]
        self._hs_mine[digest] = [peer.key, True, claimed_before]
        self._hs_mine.move_to_end(digest)
        while len(self._hs_mine) > HANDSHAKE_ANSWER_CACHE:
            self._hs_mine.popitem(last=False)
        if msg.token:  # a token buys one handshake, not many
            if self._used_tokens.seen(msg.token, now):
                return self._handshake_replay(peer, now)
            self._used_tokens.add(msg.token, now)
        span = self.tracer.handshake(peer)
        hs = _Handshake(msg, raw, peer, span, now, responder, digest)
        hs.claimed_before = claimed_before
        self._call(GetClientOp(responder.client_static.hex()),
                   lambda policy, t: self._hs_client(hs, policy, t), span, control=True,
                   unauth=True)

    def _hs_done(self, hs: _Handshake, outcome_known: bool) -> None:
        """The handshake was answered: forget it, unless its claim's outcome is unknown (then
        a retransmission of it from the same address is not a replay)."""
        mine = self._hs_mine.get(hs.digest)
        if mine is None or mine[0] != hs.peer.key:
            return
        if outcome_known:
            del self._hs_mine[hs.digest]
        else:
            mine[1] = False

    def _hs_refuse(self, hs: _Handshake, reason: RejectReason, detail: str, now: float) -> None:
        self._hs_done(hs, True)
        out = wire.encode(wire.HandshakeResp(
            hs.msg.handshake_id, hs.msg.handshake_id,
            hs.responder.refuse(Refusal(reason, self.store_ms(now)))))
        self._answer(hs.peer, len(hs.raw), out)
        self.metrics.handshake(Outcome.REFUSED, reason.name)
        hs.span.set(outcome=Outcome.REFUSED, reason=reason)
        hs.span.end()
        self.events.emit("handshake", outcome="failure", reason=reason.name,
                         source_ip=hs.peer.addr[0], detail=detail, trace_id=hs.span.trace_id,
                         **{"jvpn.client": fingerprint(hs.responder.client_static)})

    def _hs_store_failed(self, hs: _Handshake, failure: StoreFailure) -> None:
        self._hs_done(hs, False)
        self.metrics.handshake(Outcome.REFUSED, "STORE_UNAVAILABLE")
        hs.span.set(outcome=Outcome.REFUSED, reason=RejectReason.STORE_UNAVAILABLE)
        hs.span.end()
        out = wire.encode(wire.Reject(hs.msg.handshake_id, bytes(wire.NONCE_LEN),
                                      RejectReason.STORE_UNAVAILABLE, 0, 0))
        self._answer(hs.peer, len(hs.raw), out)
        self.events.emit("handshake", outcome="failure", reason="STORE_UNAVAILABLE",
                         source_ip=hs.peer.addr[0], detail=failure.detail,
                         trace_id=hs.span.trace_id)

    def _hs_client(self, hs: _Handshake, policy: Any, now: float) -> None:
        if isinstance(policy, StoreFailure):
            return self._hs_store_failed(hs, policy)
        hello = hs.responder.hello
        if policy is None:
            self._alert("unknown_client", "UNKNOWN_CLIENT", now, hs.peer.addr[0],
                        client=fingerprint(hs.responder.client_static))
            return self._hs_refuse(hs, RejectReason.UNKNOWN_CLIENT, "key not in registry", now)
        if not self.health.clock_known:  # no store clock to check the client's against yet
            return self._hs_store_failed(hs, StoreFailure("store clock not known yet"))
        if abs(hello.wall_ms - self.store_ms(now)) > HANDSHAKE_WINDOW_MS:
            return self._hs_refuse(hs, RejectReason.CLOCK_SKEW,
                                   "client clock outside the handshake window", now)
        if hello.kind.name.lower() not in policy.transports or hello.kind != hs.peer.kind:
            return self._hs_refuse(hs, RejectReason.POLICY_DENIED,
                                   f"transport {hello.kind.name} not allowed", now)
        if hello.l3:
            if self.tunnel is None or not policy.prefixes:
                return self._hs_refuse(hs, RejectReason.POLICY_DENIED,
                                       "L3 not offered here or not allowed to this client", now)
        elif hello.upstream not in policy.upstreams:
            return self._hs_refuse(hs, RejectReason.POLICY_DENIED,
                                   f"upstream {hello.upstream!r} not allowed", now)
        hs.policy = policy
        mine = self._hs_mine.get(hs.digest)
        if mine is not None and mine[0] == hs.peer.key:
            mine[2] = True  # from here the claim may apply even if its answer is lost
        self._call(ClaimHandshakeOp(hs.digest, HANDSHAKE_WINDOW_MS * 2),
                   lambda fresh, t: self._hs_claimed(hs, fresh, t), hs.span, control=True)

    def _hs_claimed(self, hs: _Handshake, fresh: Any, now: float) -> None:
        if isinstance(fresh, StoreFailure):
            return self._hs_store_failed(hs, fresh)
        if not fresh:
            if hs.claimed_before:  # our own earlier claim applied after all (a store stall)
                return self._hs_store_failed(hs, StoreFailure("handshake claimed by a copy "
                                                              "whose answer was lost"))
            self._hs_done(hs, True)
            hs.span.set(outcome=Outcome.DROPPED, reason=DropReason.REPLAYED)
            hs.span.end()
            return self._handshake_replay(hs.peer, now)
        if len(self.bindings) >= self.settings.max_sessions:
            return self._hs_refuse(hs, RejectReason.OVERLOADED, "node at max_sessions", now)
        policy = hs.policy
        assert policy is not None
        sid = self._random(wire.SESSION_ID_LEN)
        if not policy.max_sessions:  # no quota for this key
            return self._hs_slot(hs, sid, SlotResult(True, 0), now)
        # The client's quota first (before the answer is written, so a refusal can still be
        # sent): the session's slot lasts at most its maximum age.
        slot = ClaimSlotOp(hs.responder.client_static.hex(), sid, policy.max_sessions,
                           self.store_ms(now) + policy.max_age_ms)
        self._call(slot, lambda got, t: self._hs_slot(hs, sid, got, t), hs.span, control=True)

    def _hs_slot(self, hs: _Handshake, sid: bytes, got: Any, now: float) -> None:
        if isinstance(got, StoreFailure):
            return self._hs_store_failed(hs, got)
        if not got.ok:
            return self._hs_refuse(hs, RejectReason.POLICY_DENIED,
                                   f"the client holds {got.count} sessions, its quota", now)
        if hs.responder.hello.l3 and self.tunnel is not None:
            pool = self.tunnel.pool
            self._call(ClaimAddressesOp(sid, pool.spec, pool.size),
                       lambda a, t: self._hs_addresses(hs, sid, a, t), hs.span, control=True)
            return
        self._hs_accept(hs, sid, None, now)

    def _hs_addresses(self, hs: _Handshake, sid: bytes, got: Any, now: float) -> None:
        """The session's inner addresses are claimed (or the pools said no)."""
        client = hs.responder.client_static.hex()
        if isinstance(got, StoreFailure):
            self._release(client, sid)
            return self._hs_store_failed(hs, got)
        if not got.ok or self.tunnel is None:
            self._release(client, sid)
            if got.status is StoreStatus.POOL_EXHAUSTED:
                self._alert("pool_exhausted", "ADDRESS_POOL_EXHAUSTED", now, hs.peer.addr[0])
                return self._hs_refuse(hs, RejectReason.ADDRESS_POOL_EXHAUSTED,
                                       f"inner-address pools exhausted ({got.used} held)", now)
            return self._hs_refuse(hs, RejectReason.STORE_UNAVAILABLE,
                                   f"inner-address pools: {got.status.name}", now)
        self._hs_accept(hs, sid, self.tunnel.pool.addresses(got.index), now)

    def _hs_accept(self, hs: _Handshake, sid: bytes, inner: InnerAddresses | None,
                   now: float) -> None:
        """Write message 2 and the session's record (birth)."""
        policy = hs.policy
        assert policy is not None
        hello = hs.responder.hello
        bid = self._random(wire.BINDING_ID_LEN)
        ttl_ms = int(policy.ttl_s * 1000)
        inner_text = inner.text() if inner is not None else ""
        prefixes = ",".join(policy.prefixes) if inner is not None else ""
        server_hello = ServerHello(
            sid, BIRTH_VERSION, int(SessionState.ATTACHED), BIRTH_EPOCH, bid, self.node,
            self.store_ms(now), ttl_ms, int(self.settings.keepalive_interval * 1000),
            inner_text, prefixes)
        msg2, secret = hs.responder.accept(server_hello)
        client_hex = hs.responder.client_static.hex()
        bound = policy_binding(client_hex, hello.upstream, ttl_ms, policy.reattach_rate,
                               policy.transport_mask, policy.max_age_ms,
                               inner_text, prefixes)  # what BirthOp writes
        route = (SessionRoute(inner, parse_prefixes(policy.prefixes))
                 if inner is not None else None)
        secrets = SessionSecrets(secret, SessionKeys(secret), hello.upstream, client_hex, ttl_ms,
                                 bound, 0, self.store_ms(now), route=route)
        wrapped, control_wrapped = self._wrap(sid, secrets)
        op = BirthOp(sid, wrapped, client_hex, self.instance_id,
                     bid, hs.peer.kind, hello.upstream, policy, control_wrapped, inner_text)
        self._call(op, lambda born, t: self._hs_born(hs, op, secrets, msg2, now, born, t),
                   hs.span, control=True)

    def _release(self, client_id: str, sid: bytes) -> None:
        """The session ended: free its place in its client's quota (best effort: a slot
        whose release is lost expires at the session's maximum age), and its inner addresses
        (a lost release is reclaimed by ``SessionStore.reclaim_addresses``)."""
        self._call(ReleaseSlotOp(client_id, sid), _ignore)
        if self.tunnel is not None:
            self._call(ReleaseAddressesOp(sid), _ignore)

    def _hs_born(self, hs: _Handshake, op: BirthOp, secrets: SessionSecrets, msg2: bytes,
                 t1: float, born: Any, now: float) -> None:
        if isinstance(born, StoreFailure):
            self._release(op.client_id, op.session_id)
            return self._hs_store_failed(hs, born)
        assert isinstance(born, BirthResult)
        self.metrics.store_latency("birth", max(0.0, now - t1))
        if not born.ok:
            self._release(op.client_id, op.session_id)
            return self._hs_refuse(hs, RejectReason.STORE_UNAVAILABLE,
                                   f"birth: {born.status.name}", now)
        sid = op.session_id
        self._cache(sid, secrets)
        b = self._bind(sid, BIRTH_EPOCH, op.binding_id, hs.peer, secrets, born.version,
                       SessionState.ATTACHED, now, born.server_ms)
        b.rx_unvalidated = len(hs.raw)
        answer = wire.encode(wire.HandshakeResp(sid, hs.msg.handshake_id, msg2))
        self._hs_answers[hs.digest] = (hs.peer.key, answer)
        self._hs_done(hs, True)
        while len(self._hs_answers) > HANDSHAKE_ANSWER_CACHE:
            self._hs_answers.popitem(last=False)
        if b.may_send(len(answer)):
            self._out.append(Send(b.peer, answer))
        else:
            self.metrics.count_drop(DropReason.NOT_VALIDATED, b.peer.kind)
        self.metrics.handshake(Outcome.OK, "")
        hs.span.set(outcome=Outcome.OK, session_id=sid, version=born.version, epoch=BIRTH_EPOCH)
        hs.span.end()
        self._state_changed(sid, SessionState.BIRTH, SessionState.ATTACHED, born.version,
                            BIRTH_EPOCH, "handshake", hs.peer.addr[0])
        self.events.emit("handshake", outcome="success", session_id=sid,
                         source_ip=hs.peer.addr[0], duration_ns=int((now - hs.t0) * 1e9),
                         trace_id=hs.span.trace_id)

    def _handshake_replay(self, peer: Peer, now: float) -> None:
        self._alert("handshake_replay", "REPLAYED_NONCE", now, peer.addr[0])
        self._drop(DropReason.REPLAYED, peer)

    def _announce(self, b: Binding, prev_node: str) -> None:
        """``b`` is the session's ACTIVE binding now: tell the previous owner and the record."""
        if prev_node and prev_node != self.instance_id:
            # The old owner is fenced by its refresh (NOT_OWNER) or its lease anyway.
            self._call(PublishMoveOp(b.session_id, self.instance_id, b.epoch), _ignore)
        old_desc, old_kind = b.origin
        self.metrics.transport_switch(old_kind, KIND_LABELS[b.peer.kind], "reattach")
        self.events.transport_switch(b.session_id, old_desc, b.peer.describe(), "reattach",
                                     b.version, b.epoch, source_ip=b.peer.addr[0],
                                     previous_node=prev_node or None)

    def _new_binding(self, sid: bytes, epoch: int, bid: bytes, peer: Peer,
                     secrets: SessionSecrets, version: int, state: SessionState,
                     now: float) -> Binding:
        sm = StateMachine(state, version, role="gateway", authoritative=False)
        return Binding(sid, epoch, bid, self.node, peer, secrets, sm, last_rx=now,
                       last_refresh=now, confirmed_at=now)

    def _bind(self, sid: bytes, epoch: int, bid: bytes, peer: Peer, secrets: SessionSecrets,
              version: int, state: SessionState, now: float, store_ms: int) -> Binding:
        """Install an ACTIVE binding (a birth, or a grant the store already made ACTIVE);
        ``store_ms``: the write's time."""
        self._drop_binding(sid, RecordReason.MOVED, store_ms)
        b = self.bindings[sid] = self._new_binding(sid, epoch, bid, peer, secrets, version,
                                                   state, now)
        if secrets.route is not None and self.tunnel is not None:
            self.tunnel.add(sid, secrets.route)  # a stale entry is harmless: looked up, checked
        self._record(RecordPhase.BEGIN, sid, epoch, RecordReason.GRANTED, store_ms,
                     version=version, binding_id=bid)
        return b

    def _grant(self, sid: bytes, res: ReattachResult, peer: Peer, secrets: SessionSecrets,
               request_size: int, now: float, store_ms: int) -> Binding:
        """Hold the binding a reattach granted here: PENDING (until ``_activated``) or, for
        a decision the store already made ACTIVE, installed."""
        if not res.binding_pending:
            b = self._bind(sid, res.epoch, res.binding_id, peer, secrets, res.version,
                           res.state or SessionState.ATTACHED, now, store_ms)
        else:
            self._drop_pending(sid, RecordReason.SUPERSEDED, store_ms)
            b = self.pending[sid] = self._new_binding(
                sid, res.epoch, res.binding_id, peer, secrets, res.version,
                res.state or SessionState.ATTACHED, now)
            self._record(RecordPhase.BEGIN, sid, res.epoch, RecordReason.GRANTED, store_ms,
                         version=res.version, binding_id=res.binding_id,
                         status=BindingStatus.PENDING)
        b.rx_unvalidated = request_size
        return b

    def _held_epoch(self, sid: bytes) -> int:
        """The newest epoch this node holds for ``sid`` (ACTIVE or PENDING; 0: none)."""
        b, p = self.bindings.get(sid), self.pending.get(sid)
        return max(b.epoch if b is not None else 0, p.epoch if p is not None else 0)

    def _drop_pending(self, sid: bytes, reason: RecordReason, store_ms: int) -> None:
        """Forget ``sid``'s PENDING binding here (if any), with its record."""
        p = self.pending.pop(sid, None)
        if p is not None:
            self._record(RecordPhase.RELEASE, sid, p.epoch, reason, store_ms, version=p.version,
                         status=BindingStatus.PENDING)

    def _drop_binding(self, sid: bytes, reason: RecordReason, store_ms: int) -> None:
        """Remove ``sid``'s ACTIVE binding from this node's table (if held), with its record."""
        b = self.bindings.pop(sid, None)
        if b is not None:
            self._out.append(CloseUpstream(sid))
            self._record(RecordPhase.RELEASE, sid, b.epoch, reason, store_ms, version=b.version,
                         status=None)
            if b.secrets.route is not None and self.tunnel is not None:
                self.tunnel.remove(sid, b.secrets.route)

    # ---- secrets ---------------------------------------------------------------------------

    def _cache(self, sid: bytes, secrets: SessionSecrets) -> None:
        self._secrets[sid] = secrets
        self._secrets.move_to_end(sid)
        while len(self._secrets) > KEY_CACHE_SIZE:
            self._previous.pop(self._secrets.popitem(last=False)[0], None)

    def _secrets_from(self, sid: bytes, rec: SessionRecord,
                      fresh: bool = False) -> SessionSecrets | None:
        """The session's secrets: cached (unless ``fresh`` or of an older key generation than
        the record's), else unwrapped from its record (and cached)."""
        cached = self._secrets.get(sid)
        if cached is not None and not fresh and cached.generation >= rec.key_generation:
            return cached
        if (cached is not None and fresh and cached.generation == rec.key_generation
                and (cached.generation == 0 or cached.made_ms == rec.keys_ms)):
            # The record says what we hold: nothing to unwrap again. (A generation alone
            # does not name a secret: a REKEY undone, then made again, reuses its number.)
            return cached
        secrets = self._unwrap(sid, rec, rec.wrapped_secret, rec.key_generation, rec.keys_ms)
        if secrets is not None:
            self._cache(sid, secrets)
        return secrets

    def _unwrap(self, sid: bytes, rec: SessionRecord, blob: bytes, generation: int,
                made_ms: int) -> SessionSecrets | None:
        """One wrapped secret of ``rec`` (the current or the previous), or None."""
        if not blob:
            return None
        policy = _policy_of(rec)
        try:
            secret = unwrap_secret(self.keks, blob, sid, policy=policy)
        except SessionError as exc:  # a record's policy fields changed, an old format, another KEK
            self.events.security_event("unwrap_failed", "BAD_KEK", session_id=sid,
                                       detail=str(exc))
            self.metrics.security("unwrap_failed")
            return None
        return SessionSecrets(secret, SessionKeys(secret), rec.upstream, rec.client_id,
                              rec.ttl_ms, policy, generation, made_ms,
                              route=_route_of(rec.inner, rec.prefixes))

    def _wrap(self, sid: bytes, secrets: SessionSecrets) -> tuple[bytes, bytes]:
        """The secret and its control key wrapped under the current KEK (what a record and
        its tombstone keep)."""
        kek = self.keks.current
        return (wrap_secret(kek, secrets.secret, sid, policy=secrets.policy,
                            nonce=self._random(WRAP_NONCE_LEN)),
                wrap_secret(kek, secrets.keys.control_key, sid,
                            policy=control_policy(secrets.policy),
                            nonce=self._random(WRAP_NONCE_LEN)))

    def _tombstone_key(self, sid: bytes, rec: SessionRecord) -> bytes | None:
        """A tombstone's control key (it keeps no secret): to MAC a late TERMINATED."""
        if not rec.terminated or not rec.wrapped_control:
            return None
        try:
            return unwrap_secret(self.keks, rec.wrapped_control, sid,
                                 policy=control_policy(_policy_of(rec)))
        except SessionError:
            return None

    # ---- reattach --------------------------------------------------------------------------

    def _handle_reattach_request(self, req: wire.ReattachRequest, raw: bytes, peer: Peer,
                                 now: float) -> None:
        """Reattach step 3: the proof with the session's key (cached, or loaded and unwrapped
        on a miss), then one CAS."""
        if self._control_full():
            raise RemoteProtocolError(DropReason.RATE_LIMITED, "REATTACH_REQUEST")
        sid = req.session_id
        secrets = self._secrets.get(sid)
        if secrets is None:
            if self._unknown.seen(sid, now):  # the store said so a moment ago: no store call
                out = wire.encode(wire.Reject(sid, req.nonce, RejectReason.UNKNOWN_SESSION, 0,
                                              self.store_ms(now)))
                self._answer(peer, len(raw), out)
                self.metrics.reattach(Outcome.REJECTED, RejectReason.UNKNOWN_SESSION.name, 0.0)
                return
            if not self._source_budget(peer, now):
                raise RemoteProtocolError(DropReason.RATE_LIMITED, "REATTACH_REQUEST")
        r = _Reattach(req, raw, peer, self.tracer.reattach(sid, peer), now,
                      self._random(wire.BINDING_ID_LEN))
        if secrets is not None:
            self._secrets.move_to_end(sid)
            r.secrets = secrets
            r.cached = True
            return self._reattach_check(r, now)
        self._call(GetRecordOp(sid), lambda rec, t: self._reattach_loaded(r, rec, t), r.span,
                   control=True, unauth=True)

    def _reattach_loaded(self, r: _Reattach, rec: Any, now: float, fresh: bool = False) -> None:
        if isinstance(rec, StoreFailure):
            return self._reattach_reject(r, RejectReason.STORE_UNAVAILABLE, None, now)
        sid = r.req.session_id
        secrets = self._secrets_from(sid, rec, fresh) if rec is not None else None
        if secrets is None:
            key = self._tombstone_key(sid, rec) if rec is not None else None
            if key is not None:  # a tombstone: over, said authenticated (it has no secret)
                reason = (RejectReason.EXPIRED if rec.terminate_reason is TerminateReason.EXPIRED
                          else RejectReason.TERMINATED)
                return self._reattach_reject(r, reason, key, now, rec.version)
            self._unknown.add(sid, now)
            return self._reattach_reject(r, RejectReason.UNKNOWN_SESSION, None, now)
        self.metrics.store_latency("get", max(0.0, now - r.t0))
        r.secrets = secrets
        r.cached = False
        r.previous = self._unwrap(sid, rec, rec.previous_wrapped, rec.key_generation - 1,
                                  rec.previous_keys_ms)
        if r.previous is not None and sid in self._secrets:
            self._previous[sid] = (r.previous, now)
        else:
            self._previous.pop(sid, None)  # the client proved the new one: the store let go
        self._reattach_check(r, now)

    def _reattach_check(self, r: _Reattach, now: float) -> None:
        """The proof, the transport and the clock, before the store."""
        req, raw, peer = r.req, r.raw, r.peer
        assert r.secrets is not None
        keys = r.secrets.keys
        if not control.verify(raw, keys.proof_key):
            sid = req.session_id
            waiting = self._rereading.get(sid)
            if r.cached and waiting is not None and len(waiting) < REREAD_WAITERS:
                # The record is being read again for an earlier request: this one (the
                # client's next try, under the same new secret) is checked on its answer.
                r.cached = False
                waiting.append(r)
                return
            if r.cached and not self._reread.seen(sid, now):
                # Our cached secret may predate a REKEY made on another node: read the
                # record again (at most once a second per session) and check again.
                self._reread.add(sid, now)
                r.cached = False
                self._rereading[sid] = [r]
                self._call(GetRecordOp(sid), lambda rec, t: self._reread_answered(sid, rec, t),
                           r.span, control=True, unauth=True)
                return
            if r.cached and r.previous is None and sid in self._previous:
                previous, read_at = self._previous[sid]
                if now - read_at >= REREAD_INTERVAL_S:
                    del self._previous[sid]  # a re-read is due again instead
                elif previous.generation == r.secrets.generation - 1:
                    r.previous = previous  # read again a moment ago: the record kept it
            if r.previous is None or not control.verify(raw, r.previous.keys.proof_key):
                self._alert("bad_proof", "BAD_PROOF", now, peer.addr[0],
                            session_id=req.session_id, proof=fingerprint(raw[-wire.MAC_LEN:]),
                            request=raw[-wire.MAC_LEN:])
                return self._reattach_reject(r, RejectReason.BAD_PROOF, None, now)
            # The client never learned a REKEY its node committed (the node died first): its
            # proof is under the previous secret, which the store gives back (reattach.lua).
            r.secrets = r.previous
            keys = r.secrets.keys
        if req.kind != peer.kind:
            return self._reattach_reject(r, RejectReason.POLICY_DENIED, keys.control_key, now)
        if not self.health.clock_known:
            return self._reattach_reject(r, RejectReason.STORE_UNAVAILABLE, keys.control_key, now)
        if abs(req.timestamp_ms - self.store_ms(now)) > self.settings.reattach_window_ms:
            return self._reattach_reject(r, RejectReason.CLOCK_SKEW, keys.control_key, now)
        if now - self.health.ok_at >= self.settings.lease_s:
            # No store answer within the lease: this node may have been paused, and what its
            # sockets held meanwhile are requests the client has given up on. Only requests
            # that arrive once the store answered again may bind.
            return self._reattach_reject(r, RejectReason.STORE_UNAVAILABLE, keys.control_key,
                                         now)
        if self._superseded(req):
            self.metrics.reattach(Outcome.DROPPED, "SUPERSEDED", max(0.0, now - r.t0))
            r.span.set(outcome=Outcome.DROPPED, reason="SUPERSEDED")
            r.span.end()
            return self._drop(DropReason.SUPERSEDED, peer)
        client = r.secrets.client_id
        if not self._registry_fresh(client, now):  # rarely: the registry, then the CAS
            waiters = self._registry_waiters.get(client)
            if waiters is not None and self._registry_waiting < MAX_CONTROL_CALLS:
                waiters.append(r)  # the read in flight answers it too
                self._registry_waiting += 1
                return
            if waiters is None:
                self._registry_waiters[client] = [r]
                self._call(GetClientOp(client),
                           lambda pol, t: self._registry_read(client, pol, t), r.span,
                           control=True)
            else:  # beyond the bound: a read of its own
                self._call(GetClientOp(client),
                           lambda pol, t: self._reattach_registry(r, pol, t), r.span,
                           control=True)
            return
        if not self._registered.get(client, (False, 0.0))[0]:
            return self._revoked(r, now)
        self._reattach_cas(r, now)

    def _reread_answered(self, sid: bytes, rec: Any, now: float) -> None:
        """The record read again: every request that waited for it is checked on it."""
        for r in self._rereading.pop(sid, []):
            self._reattach_loaded(r, rec, now, fresh=True)

    def _superseded(self, req: wire.ReattachRequest) -> bool:
        """Whether a newer request of the session was seen here (then ``req`` must not win);
        remembers ``req``'s time otherwise. Called for authenticated requests only."""
        sid, ts = req.session_id, req.timestamp_ms
        newest = self._newest_request.get(sid)
        if newest is not None and ts < newest - SUPERSEDED_MARGIN_MS:
            return True
        if newest is None or ts > newest:
            if newest is None and len(self._newest_request) >= REQUEST_TABLE_MAX:
                self._newest_request.pop(next(iter(self._newest_request)))
            self._newest_request[sid] = ts
        return False

    def _registry_read(self, client: str, policy: Any, now: float) -> None:
        """The registry read of ``client``'s waiting reattaches: each goes on as if it had
        read it itself."""
        waiters = self._registry_waiters.pop(client, [])
        self._registry_waiting -= len(waiters) - 1  # the first one made the read
        for r in waiters:
            self._reattach_registry(r, policy, now)

    def _reattach_registry(self, r: _Reattach, policy: Any, now: float) -> None:
        assert r.secrets is not None
        if isinstance(policy, StoreFailure):
            return self._reattach_reject(r, RejectReason.STORE_UNAVAILABLE,
                                         r.secrets.keys.control_key, now)
        self._learn_registry(r.secrets.client_id, policy is not None, now)
        if policy is None:
            return self._revoked(r, now)
        self._reattach_cas(r, now)

    def _revoked(self, r: _Reattach, now: float) -> None:
        """The session's client key left the registry: the session ends, cluster-wide."""
        assert r.secrets is not None
        sid = r.req.session_id
        self._reattach_reject(r, RejectReason.TERMINATED, r.secrets.keys.control_key, now)
        self._terminate(sid, TerminateReason.POLICY_REVOKED, "client revoked", notify=True)

    def _registry_fresh(self, client: str, now: float) -> bool:
        known = self._registered.get(client)
        return known is not None and now - known[1] < self.settings.registry_staleness_s

    def _learn_registry(self, client: str, present: bool, now: float) -> None:
        if len(self._registered) >= KEY_CACHE_SIZE:
            self._registered.pop(next(iter(self._registered)))
        self._registered[client] = (present, now)

    def _reattach_cas(self, r: _Reattach, now: float) -> None:
        req, peer = r.req, r.peer
        r.t1 = now
        assert r.secrets is not None
        op = ReattachOp(req.session_id, req.expected_version, req.nonce, req.timestamp_ms,
                        req.kind, self.instance_id, r.bid, peer.describe(),
                        self.settings.reattach_window_ms, self.settings.dual_active_window_ms,
                        r.secrets.generation)
        self._call(op, lambda res, t: self._reattach_decided(r, res, t), r.span, control=True)

    def _reattach_answer(self, r: _Reattach, msg: wire.Message, key: bytes | None) -> None:
        out = control.seal(msg, key) if key is not None else wire.encode(msg)
        self._answer(r.peer, len(r.raw), out)  # the path is unvalidated

    def _reattach_reject(self, r: _Reattach, reason: RejectReason, key: bytes | None,
                         now: float, version: int = 0,
                         res: ReattachResult | None = None) -> None:
        """Refuse ``r``; ``res``: the store's decision, whose current version, epoch and node
        the event records beside the version the request expected."""
        req, peer = r.req, r.peer
        self._reattach_answer(r, wire.Reject(req.session_id, req.nonce, reason,
                                             version if key else 0, self.store_ms(now)), key)
        self.metrics.reattach(Outcome.REJECTED, reason.name, max(0.0, now - r.t0))
        r.span.set(outcome=Outcome.REJECTED, reason=reason)
        r.span.end()
        current: dict[str, Any] = {}
        if res is not None:
            current = {"current_version": res.version, "current_epoch": res.epoch,
                       "current_node": res.node or None, "store_ms": res.server_ms}
        self.events.emit("reattach", outcome="failure", reason=reason.name,
                         session_id=req.session_id, source_ip=peer.addr[0],
                         nonce=fingerprint(req.nonce), transport=peer.describe(),
                         trace_id=r.span.trace_id, duration_ns=int(max(0.0, now - r.t0) * 1e9),
                         expected_version=req.expected_version, **current)

    def _reattach_decided(self, r: _Reattach, res: Any, now: float) -> None:
        """Reattach steps 3-5 after the CAS: bind, tell, answer, record."""
        assert r.secrets is not None
        keys = r.secrets.keys
        if isinstance(res, StoreFailure):  # unavailable, or unreadable: fail closed
            return self._reattach_reject(r, RejectReason.STORE_UNAVAILABLE, keys.control_key, now)
        assert isinstance(res, ReattachResult)
        req, raw, peer, span = r.req, r.raw, r.peer, r.span
        sid = req.session_id
        self.metrics.store_latency("reattach", max(0.0, now - r.t1))
        if res.server_ms:
            self.health.offset_ms = res.server_ms - now * 1000
            self.health.clock_known = True
        if not res.ok:
            reason = res.reason or RejectReason.STORE_UNAVAILABLE
            if res.status is StoreStatus.KEY_MOVED:  # rekeyed since we cached it: forget it
                self._secrets.pop(sid, None)
                self._previous.pop(sid, None)
            if res.expired_now:
                self._release(r.secrets.client_id, sid)
                self._state_changed(sid, res.prev_state or SessionState.ATTACHED,
                                    SessionState.TERMINATED, res.version, res.epoch, "EXPIRED")
                self._record(RecordPhase.END, sid, res.epoch, RecordReason.EXPIRED, res.server_ms,
                             holder=res.node, version=res.version, status=None)
                self._drop_binding(sid, RecordReason.EXPIRED, res.server_ms)
                self._tell_holder(sid, res.node)
            if (reason in (RejectReason.REPLAYED_NONCE, RejectReason.DUAL_ACTIVE_CONFLICT)
                    and not res.retry):  # a retry's refusal was reported when decided
                self._alert(reason.name.lower(), reason.name, now, peer.addr[0], session_id=sid,
                            nonce=fingerprint(req.nonce), transport=peer.describe(),
                            request=req.nonce)
            version = res.version
            if reason is RejectReason.REPLAYED_NONCE and req.expected_version + 1 != version:
                # An old request replayed: its sender learns nothing of the session now. (A
                # request raced by a copy that just won is told, so the client can retry.)
                version = 0
            return self._reattach_reject(r, reason, keys.control_key, now, version, res)
        if self._secrets.get(sid) is not r.secrets:
            self._cache(sid, r.secrets)  # read, or given back by the store (a REKEY undone)
        node_id = res.node.encode()[: wire.MAX_NODE_ID_LEN]
        write_ms = res.decided_ms or res.server_ms  # when the store decided (a retry: first)
        ack = wire.ReattachAck(sid, req.nonce, res.version, res.epoch, res.binding_id, node_id,
                               self.store_ms(now))
        if res.retry:
            # Idempotent retransmission: same answer, nothing changes twice. But if the first
            # run's outcome never reached us (the store paused: we answered STORE_UNAVAILABLE
            # and the CAS applied late), we do not hold the binding this ACK grants: adopt it.
            if (res.binding_current and res.node == self.instance_id
                    and self._held_epoch(sid) < res.epoch):
                b = self._grant(sid, res, peer, r.secrets, len(raw), now, write_ms)
                b.origin = (f"node:{res.prev_node or '-'}", "unknown")
                if not res.binding_pending:
                    self.metrics.transport_switch("unknown", KIND_LABELS[peer.kind], "reattach")
                    self.events.transport_switch(sid, b.origin[0], peer.describe(),
                                                 "reattach_late_applied", res.version, res.epoch,
                                                 source_ip=peer.addr[0])
            self._reattach_answer(r, ack, keys.control_key)
            self.metrics.reattach(Outcome.RETRY, "", max(0.0, now - r.t0))
            span.set(outcome=Outcome.RETRY, version=res.version, epoch=res.epoch)
            span.end()
            return
        old = self.bindings.get(sid)
        old_desc = old.peer.describe() if old is not None else f"node:{res.prev_node or '-'}"
        old_kind = (KIND_LABELS[old.peer.kind] if old is not None
                    else KIND_LABELS[res.prev_kind] if res.prev_kind is not None else "none")
        answer = control.seal(ack, keys.control_key)  # sealed once: the binding counts its size
        if res.node == self.instance_id:
            if self._held_epoch(sid) >= res.epoch:
                # A late answer (its outcome was unknown, then recovered) for an epoch this
                # node already holds or has passed: binding it again would restart a send
                # counter under the same traffic keys. Answer it, change nothing.
                self._reattach_answer(r, ack, keys.control_key)
                self.metrics.reattach(Outcome.RETRY, "", max(0.0, now - r.t0))
                span.set(outcome=Outcome.RETRY, version=res.version, epoch=res.epoch)
                span.end()
                return
            if res.recovered and not res.binding_current:
                # Granted (its answer was lost, then re-read), but the session has moved on
                # since: recorded as it happened, not installed.
                # (A reattach grants PENDING; not current, it never became ACTIVE.)
                self._record(RecordPhase.BEGIN, sid, res.epoch, RecordReason.GRANTED, write_ms,
                             version=res.version, binding_id=res.binding_id,
                             status=BindingStatus.PENDING)
                self._record(RecordPhase.RELEASE, sid, res.epoch, RecordReason.REVOKED,
                             res.server_ms, version=res.version, status=None)
                self._reattach_answer(r, ack, keys.control_key)
                self.metrics.reattach(Outcome.RETRY, "", max(0.0, now - r.t0))
                span.set(outcome=Outcome.RETRY, version=res.version, epoch=res.epoch)
                span.end()
                return
            b = self._grant(sid, res, peer, r.secrets, len(raw), now, write_ms)
            b.tx_unvalidated = len(answer)  # the ACK below
            b.origin = (old_desc, old_kind)
            if not res.binding_pending:  # a store that grants ACTIVE at once
                self._announce(b, res.prev_node)
        self._answer(peer, len(raw), answer)  # as _reattach_answer would
        self.metrics.reattach(Outcome.OK, "", max(0.0, now - r.t0))
        span.set(outcome=Outcome.OK, version=res.version, epoch=res.epoch)
        span.end()
        self._state_changed(sid, res.prev_state or SessionState.ATTACHED, SessionState.ATTACHED,
                            res.version, res.epoch, "reattach", peer.addr[0])

    # ---- terminate -------------------------------------------------------------------------

    def terminate(self, sid: bytes, reason: TerminateReason = TerminateReason.ADMIN) -> None:
        """Administrative terminate: tombstone, authenticated CLOSE to the client."""
        self._terminate(sid, reason, reason.name.lower(), notify=True)

    def _terminate(self, sid: bytes, reason: TerminateReason, why: str, notify: bool) -> None:
        self._call(TerminateOp(sid, reason),
                   lambda res, now: self._terminated(sid, reason, why, notify, res), control=True)

    def _terminated(self, sid: bytes, reason: TerminateReason, why: str, notify: bool,
                    res: Any) -> None:
        if not isinstance(res, TerminateResult):
            return  # the store is away: the session lives on until it answers
        self._drop_pending(sid, RecordReason.TERMINATED if res.ok and not res.already
                           else _ended_elsewhere(res.status), res.server_ms)
        b = self.bindings.get(sid)
        if b is not None and notify and b.validated:
            self._send(b, b.tx_channel.seal(wire.inner_close(int(reason))))
        if b is not None and res.ok and not res.already:
            self._release(b.secrets.client_id, sid)
        if res.ok and not res.already:
            self._record(RecordPhase.END, sid, res.epoch, RecordReason.TERMINATED, res.server_ms,
                         holder=res.node, version=res.version, status=None)
            self._drop_binding(sid, RecordReason.TERMINATED, res.server_ms)
            self._tell_holder(sid, res.node)
        else:
            self._drop_binding(sid, _ended_elsewhere(res.status), res.server_ms)
        if res.ok and not res.already and res.prev_state is not None:
            self._state_changed(sid, res.prev_state, SessionState.TERMINATED, res.version,
                                res.epoch, why)

    # ---- the cluster: moves, refreshes, the sweeper, the lease -----------------------------

    def binding_moved(self, sid: bytes, node: str, epoch: int, now: float) -> None:
        """Another node took ``sid`` (pub/sub): a hint only, the store decides (refresh)."""
        b = self.bindings.get(sid)
        if b is not None and (node != self.instance_id or epoch != b.epoch):
            self._refresh(b, now)

    def _refresh(self, b: Binding, t0: float) -> None:
        self._call(RefreshOp(b.session_id, b.epoch, self.instance_id),
                   lambda res, now: self._refreshed(b, t0, res))

    def _refreshed(self, b: Binding, t0: float, res: Any) -> None:
        if not isinstance(res, RefreshResult) or self.bindings.get(b.session_id) is not b:
            return
        if res.status is StoreStatus.OK:
            if res.version > b.version:  # transitions made elsewhere
                if res.state is not None and res.state is not b.state:
                    b.sm.resync(res.state, res.version)
                else:
                    b.sm.adopt(res.version)
            if b.confirmed_at < self.health.trust_since <= t0:
                self._record(RecordPhase.LEASE_CONFIRMED, b.session_id, b.epoch,
                             RecordReason.GRANTED, res.server_ms, version=res.version,
                             status=None)
            b.confirmed_at = max(b.confirmed_at, t0)
            self.health.ok_at = max(self.health.ok_at, t0)
            return
        # NOT_OWNER, TERMINATED, EXPIRED or gone: this node must stop forwarding (fencing).
        if res.status in (StoreStatus.TERMINATED, StoreStatus.EXPIRED) and b.validated:
            # Ended elsewhere (admin, sweeper): tell the client, authenticated, in band.
            why = res.terminate_reason or TerminateReason.ADMIN
            self._send(b, b.tx_channel.seal(wire.inner_close(int(why))))
        if res.status is StoreStatus.EXPIRED and res.expired_now:
            self._record(RecordPhase.END, b.session_id, b.epoch, RecordReason.EXPIRED,
                         res.server_ms, version=res.version, status=None)
            self._drop_binding(b.session_id, RecordReason.EXPIRED, res.server_ms)
        else:
            self._drop_binding(b.session_id, _ended_elsewhere(res.status), res.server_ms)
        self.events.emit("binding_revoked", outcome="success", session_id=b.session_id,
                         reason=res.status.name, epoch=b.epoch, new_node=res.node or None)
        if res.status is StoreStatus.EXPIRED and res.expired_now:
            self._release(b.secrets.client_id, b.session_id)
            self._state_changed(b.session_id, b.state, SessionState.TERMINATED, res.version,
                                b.epoch, "EXPIRED")

    def handle_timer(self, now: float) -> None:
        """Run what is due: the store health check, silence and refreshes, the sweeper."""
        t = self._timers
        if now >= t.health:
            t.health = now + min(1.0, self.settings.lease_s / 3)
            self._check_store(now)
        if now >= t.maintenance:
            t.maintenance = now + self.settings.keepalive_interval / 2
            self._maintain(now)
        if now >= t.sweep:
            t.sweep = now + self.settings.sweep_interval
            if not self._sweeping:
                self._sweeping = True
                self._call(SweepOp(SWEEP_LIMIT), self._swept)

    def _check_store(self, now: float) -> None:
        if self.health.checking:
            return
        self.health.checking = True
        self._call(ServerTimeOp(), lambda ms, t1: self._store_checked(now, ms, t1))

    def _store_checked(self, t0: float, server_ms: Any, t1: float) -> None:
        h = self.health
        h.checking = False
        if isinstance(server_ms, StoreFailure):
            h.ok, h.error = False, server_ms.detail or "store unreachable"
            self.metrics.set_store_up(False)
            return
        h.offset_ms = server_ms - (t0 + t1) / 2 * 1000
        h.latency_s = max(0.0, t1 - t0)
        h.clock_known = True
        if t0 - h.ok_at >= self.settings.lease_s and self.bindings:
            # The lease lapsed (outage, or this process was paused): every binding must be
            # confirmed by the store again before it carries data; refresh them all now.
            h.trust_since = t0
            for b in self.bindings.values():
                b.last_refresh = float("-inf")
                self._record(RecordPhase.LEASE_LAPSED, b.session_id, b.epoch,
                             RecordReason.LEASE_LAPSED, int(server_ms), version=b.version,
                             status=None)
            self.events.emit("lease_lapsed", outcome="success", bindings=len(self.bindings))
        h.ok_at = t0
        h.ok, h.error = True, ""
        self.metrics.set_store_up(True)

    def _maintain(self, now: float) -> None:
        """Silence detection and TTL/ownership refresh for local bindings."""
        interval = self.settings.keepalive_interval
        silence = interval * self.settings.silence_keepalives
        budget = REFRESHES_PER_TICK
        asking: set[str] = set()
        for p in [p for p in self.pending.values() if now - p.last_rx > silence]:
            if p.activating:
                continue  # its activation's answer decides
            if p.activation_unknown:  # it may be ACTIVE: ask again (idempotent) before letting go
                if not p.activating:
                    p.activating = True
                    self._call(ActivateOp(p.session_id, p.epoch, p.binding_id, self.instance_id),
                               partial(self._activated, p))
                continue
            # Granted, never validated (its client went elsewhere, or a copier asked): it
            # carried nothing; the store's record still names the binding it replaced.
            self._drop_pending(p.session_id, RecordReason.NOT_VALIDATED, self.store_ms(now))
            self.events.emit("binding_superseded", outcome="failure", session_id=p.session_id,
                             reason="NOT_VALIDATED", epoch=p.epoch)
        for b in list(self.bindings.values()):
            if now - b.last_rx > silence and b.state is not SessionState.RECOVERING:
                b.lost = True  # reported until the store records it (a skipped report retries)
                if not b.transition_pending and is_allowed(b.state, SessionEvent.TRANSPORT_LOST):
                    self._transition(b, SessionEvent.TRANSPORT_LOST, "gateway: binding silent",
                                     now)
            refresh_every = max(interval, b.secrets.ttl_ms / 1000 / 4)
            unconfirmed = b.confirmed_at < self.health.trust_since
            if budget > 0 and b.lost and not unconfirmed and now - b.last_refresh >= refresh_every:
                # A silent binding is not refreshed (that would keep a dead session alive),
                # but still checked: one read, so it is let go once ended or moved elsewhere.
                budget -= 1
                b.last_refresh = now
                self._call(GetRecordOp(b.session_id), partial(self._still_held, b))
            elif (budget > 0 and (not b.lost or unconfirmed)
                    and now - b.last_refresh >= refresh_every):
                budget -= 1
                b.last_refresh = now
                self._refresh(b, now)
                client = b.secrets.client_id
                if not self._registry_fresh(client, now) and client not in asking:
                    asking.add(client)
                    self._call(GetClientOp(client), partial(self._registry_checked, client))

    def _still_held(self, b: Binding, rec: Any, now: float) -> None:
        """A silent binding's record, read: let it go if the session ended or moved on."""
        if not isinstance(rec, SessionRecord) and rec is not None:
            return  # the store is away: the lease decides
        if self.bindings.get(b.session_id) is not b:
            return
        if rec is None:
            status = StoreStatus.UNKNOWN_SESSION
        elif rec.terminated:
            status = (StoreStatus.EXPIRED if rec.terminate_reason is TerminateReason.EXPIRED
                      else StoreStatus.TERMINATED)
        elif rec.epoch != b.epoch or rec.node != self.instance_id:
            status = StoreStatus.NOT_OWNER
        else:
            return
        self._drop_binding(b.session_id, _ended_elsewhere(status), rec.server_ms if rec else 0)
        self.events.emit("binding_revoked", outcome="success", session_id=b.session_id,
                         reason=status.name, epoch=b.epoch,
                         new_node=rec.node if rec is not None else None)

    def _registry_checked(self, client: str, policy: Any, now: float) -> None:
        """A refresh-time registry read: a removed client's sessions here end now."""
        if isinstance(policy, StoreFailure):
            return
        self._learn_registry(client, policy is not None, now)
        if policy is None:
            for b in list(self.bindings.values()):
                if b.secrets.client_id == client:
                    self._terminate(b.session_id, TerminateReason.POLICY_REVOKED,
                                    "client revoked", notify=True)

    def _swept(self, expired: Any, now: float) -> None:
        self._sweeping = False
        if not isinstance(expired, list):
            return
        for item in expired:
            assert isinstance(item, ExpiredSession)
            self._release(item.client_id, item.session_id)
            # A session at its maximum age may still be busy: tell its client, authenticated,
            # in band (here), or wake its owner, whose refresh answers EXPIRED and does so.
            b = self.bindings.get(item.session_id)
            if b is not None and b.validated:
                self._send(b, b.tx_channel.seal(wire.inner_close(int(TerminateReason.EXPIRED))))
            elif b is None:
                self._tell_holder(item.session_id, item.node)
            self._record(RecordPhase.END, item.session_id, item.epoch, RecordReason.EXPIRED,
                         item.server_ms, holder=item.node, version=item.version, status=None)
            self._drop_binding(item.session_id, RecordReason.EXPIRED, item.server_ms)
            self._drop_pending(item.session_id, RecordReason.EXPIRED_ELSEWHERE, item.server_ms)
            self._state_changed(item.session_id, item.prev_state, SessionState.TERMINATED,
                                item.version, item.epoch, "EXPIRED")

    def _tell_holder(self, sid: bytes, holder: str) -> None:
        """This node ended a session another node holds: wake the holder (pub/sub, a hint),
        whose refresh then answers TERMINATED or EXPIRED and closes its client."""
        if holder and holder != self.instance_id:
            self._call(PublishMoveOp(sid, "-", 0), _ignore)

    def stop(self, now: float | None = None) -> None:
        """Forget every binding and call in flight (no store writes: the store keeps them)."""
        store_ms = self.store_ms(now) if now is not None else 0
        for sid in list(self.bindings):
            self._drop_binding(sid, RecordReason.NODE_STOPPED, store_ms)
        for sid in list(self.pending):
            self._drop_pending(sid, RecordReason.NODE_STOPPED, store_ms)
        self._calls.clear()
        self._control_calls = 0
        self._unauth_calls = 0
        self._sweeping = False
        self.health.checking = False


def _policy_of(rec: SessionRecord) -> bytes:
    """The policy binding of a record's fields (what its secrets are wrapped with)."""
    return policy_binding(rec.client_id, rec.upstream, rec.ttl_ms, rec.reattach_rate,
                          rec.transports_mask, rec.max_age_ms, rec.inner, rec.prefixes)


def _route_of(inner: str, prefixes: str) -> SessionRoute | None:
    """An L3 record's route (None in UDP-forward mode, or if its fields do not parse: they
    are bound into the secret, so that is a record this node cannot have unwrapped)."""
    if not inner:
        return None
    try:
        return SessionRoute(InnerAddresses.parse(inner),
                            parse_prefixes(tuple(p for p in prefixes.split(",") if p)))
    except ValueError:
        return None


def _ignore(answer: Any, now: float) -> None:
    return None


def _ended_elsewhere(status: StoreStatus) -> RecordReason:
    """Why a node lets go of a binding the store no longer has as its own."""
    if status is StoreStatus.EXPIRED:
        return RecordReason.EXPIRED_ELSEWHERE
    if status is StoreStatus.TERMINATED:
        return RecordReason.TERMINATED_ELSEWHERE
    return RecordReason.REVOKED
