"""The client's session machine: handshake, data, keepalives, reattach.

Theory of operation. The machine is driven by calls, as aioquic's
QuicConnection: ``connect``/``reattach``/``send``/``close`` from the agent,
``receive(data, path, now)`` for every datagram or frame, and
``handle_timer(now)`` when ``get_timer()`` comes due. It is read out by
``datagrams_to_send()`` and ``next_event()``. A *path* is an opaque integer the
agent gives to one transport (a UDP socket or TCP connection); the machine
never learns addresses.

The session outlives its paths. When no authenticated packet arrives for
``dead_after`` keepalive intervals, the machine moves to RECOVERING and asks
the agent for a new path (``TransportLost``); the agent opens one and calls
``reattach``. The request carries a MAC proof over (session_id, expected
version, fresh nonce, timestamp, transport kind); retransmissions reuse the
same bytes so the gateway can answer them idempotently. Only an ACK bound to
our outstanding nonce and MAC'd under the control key installs the new
binding, and from then on only the newest epoch's traffic keys are accepted:
a stale node can no longer reach us. Unauthenticated rejections never end the
session; only an authenticated TERMINATED/EXPIRED, an authenticated NOTICE or
an in-band CLOSE do.

State changes only through the session's ``StateMachine`` (session/states.py):
the client's own events (quality, transport lost, close) are applied to it,
and the gateway's (state, version) from an authenticated answer is adopted,
which the table checks too. The client never counts versions itself.
"""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from session import control, dataplane, wire
from session.errors import DecodeError, IllegalAdoption, LocalProtocolError, RemoteProtocolError
from session.framing import DataChannel
from session.handshake import ClientHello, Initiator, Refusal, ServerHello
from session.inner import InnerAddresses, parse_prefixes
from session.keys import SessionKeys, rekey_secret, traffic_keys
from session.noise import dh, public_key
from session.quality import PathQuality, QualityThresholds
from session.reasons import DropReason, NoticeKind, RejectReason, TerminateReason
from session.states import LIVE_STATES, QUALITY_EVENTS, SessionEvent, SessionState, StateMachine

PENDING_MAX = 256  # payloads held while recovering, flushed after reattach
HANDSHAKE_RETRIES = 3
# A request's nonce starts with a claim id, the same for every request for one version:
# the store tells this client's own superseded attempts (STALE_VERSION) from another
# claimant's (DUAL_ACTIVE_CONFLICT). The other 8 bytes keep each nonce unique.
CLAIM_ID_LEN = 8
REATTACH_RETRIES = 3  # retransmissions of the same request bytes on one path
REKEY_RETRIES = 5  # REKEYs sent unanswered on a live binding before it is rebound (reattach)
STALE_RETRIES = 3  # immediate retries after an authenticated STALE_VERSION
KEEPALIVE_TRACK = 64
SENT_TAGS = 64  # AEAD tags of our latest DATA packets, which a NOT_BOUND_HERE must echo


@dataclass(frozen=True)
class ClientParams:
    """Timings and policy for one client session (seconds)."""

    keepalive_interval: float = 0.5
    dead_after: int = 3
    # DATA sent and nothing heard for this long (plus 4 smoothed RTTs): a keepalive probe
    # goes at once, and the path is lost if nothing is heard for as long again; 0 = off
    # (only ``dead_after`` silent intervals). A busy flow learns of a dead path in two of
    # these instead of ``dead_after`` intervals; an idle one sends nothing more.
    probe_silence: float = 0.0
    handshake_timeout: float = 1.0
    reattach_timeout: float = 0.5
    reattach_retries: int = REATTACH_RETRIES  # retransmissions of one request on its path before giving up
    backoff_initial: float = 0.1
    backoff_max: float = 5.0
    refusals_final: int = 5  # authenticated refusals in a row that end the agent (bounded backoff)
    upstream: str = ""
    thresholds: QualityThresholds = field(default_factory=QualityThresholds)
    # A fresh Diffie-Hellman on WireGuard's schedule (REKEY): after rekey_after seconds or
    # rekey_after_messages packets under one session secret; none is sent (payloads wait)
    # under a secret older than reject_after, which the gateway enforces too.
    rekey_after: float = 120.0
    reject_after: float = 180.0
    rekey_after_messages: int = 2**60
    rekey_timeout: float = 1.0  # a REKEY unanswered this long is sent again
    l3: bool = False  # ask for an L3 session: inner addresses and routes, IP packets as DATA


# ---- actions and events ------------------------------------------------------------------


class ReattachAction(StrEnum):
    """What the client does after a REJECT of its reattach request."""

    RETRY = "retry"  # at once, with a fresh nonce (and the adopted version or clock)
    BACKOFF = "backoff"  # on the same path after an exponential backoff
    NEXT_TRANSPORT = "next_transport"  # this path is refused: the agent tries another
    STAY = "stay"  # a proactive jump was refused: the current path still carries the session
    REHANDSHAKE = "rehandshake"  # the session is over: the agent starts a new one
    WAIT = "wait"  # an unauthenticated answer, a hint: the request stays outstanding


class SecurityNoticeKind(StrEnum):
    """Something an attacker (or a second claimant) may be doing, reported to the agent."""

    FORGED_REJECT = "forged_reject"  # a REJECT claiming authentication failed its MAC
    FORGED_NOTICE = "forged_notice"  # a NOTICE failed its MAC
    DUAL_ACTIVE_CONFLICT = "dual_active_conflict"  # another claimant holds this session



@dataclass(frozen=True)
class HandshakeComplete:
    session_id: bytes
    version: int
    epoch: int
    node_id: bytes
    path: int
    inner: InnerAddresses | None = None  # L3: the session's inner addresses (authenticated)
    routes: tuple[str, ...] = ()  # L3: the prefixes to route into the tunnel


@dataclass(frozen=True)
class HandshakeFailed:
    reason: RejectReason | None  # None: no answer in time
    authenticated: bool
    path: int
    retry_in: float = 0.0  # when the agent should try again (the machine's backoff)


# Authenticated handshake refusals that no retry can cure: the operator must change something.
# OVERLOADED, STORE_UNAVAILABLE and RATE_LIMITED pass by themselves and only feed the backoff.
REFUSAL_ADVICE: dict[RejectReason, str] = {
    RejectReason.UNKNOWN_CLIENT: "this agent's key is not in the cluster's registry (never added, "
    "or removed): register its public key with `jvpn clients add`",
    RejectReason.POLICY_DENIED: "the client's policy refuses this upstream or transport, or its "
    "session quota is full: check the agent's upstream and transports against `jvpn clients list`",
    RejectReason.CLOCK_SKEW: "this machine's clock is too far from the cluster's: synchronise it (NTP)",
}


@dataclass(frozen=True)
class RefusedForGood:
    """The cluster refused this client, authenticated, ``attempts`` times in a row: stop."""

    reason: RejectReason
    attempts: int
    advice: str


@dataclass(frozen=True)
class PayloadReceived:
    data: bytes
    flow: int = 0  # UDP-forward mode: the local source it answers (0: none)


@dataclass(frozen=True)
class StateChanged:
    old: SessionState
    new: SessionState
    version: int
    reason: str


@dataclass(frozen=True)
class TransportLost:
    """The current path is dead: the agent should open another and call ``reattach``."""

    path: int
    reason: str


@dataclass(frozen=True)
class Reattached:
    old_path: int | None
    path: int
    version: int
    epoch: int
    node_id: bytes
    latency: float  # from the loss (or the jump request) to the ACK
    reason: str
    outage: float = 0.0  # from the last packet heard on the lost path to the ACK (0 for a jump)


@dataclass(frozen=True)
class Rekeyed:
    """A REKEY completed: a fresh Diffie-Hellman made key ``generation``, on a new binding."""

    generation: int
    old_epoch: int
    epoch: int
    latency: float  # from the first REKEY sent to its answer


@dataclass(frozen=True)
class ReattachRejected:
    reason: RejectReason
    authenticated: bool
    action: ReattachAction
    path: int


@dataclass(frozen=True)
class ReattachTimedOut:
    """No answer on this path: the agent should try another transport."""

    path: int


@dataclass(frozen=True)
class SessionTerminated:
    reason: str
    authenticated: bool


@dataclass(frozen=True)
class SecurityNotice:
    kind: SecurityNoticeKind
    detail: str


Event = (
    HandshakeComplete | HandshakeFailed | PayloadReceived | StateChanged | TransportLost
    | Reattached | ReattachRejected | ReattachTimedOut | SessionTerminated | SecurityNotice
    | Rekeyed
    | RefusedForGood
)


# ---- the machine -------------------------------------------------------------------------


@dataclass
class _Pending:
    """One outstanding handshake or reattach request."""

    raw: bytes
    path: int
    nonce: bytes
    first_sent: float
    deadline: float
    tries: int = 1
    reason: str = ""


class ClientSession:
    """One client session over any number of successive paths."""

    def __init__(self, static_priv: bytes, gateway_pub: bytes, params: ClientParams,
                 random: Callable[[int], bytes] = secrets.token_bytes) -> None:
        self.params = params
        self._static = static_priv
        self._gateway_pub = gateway_pub
        self._random = random
        self._machine = _new_machine()
        self.session_id = b""
        self.epoch = 0
        self.node_id = b""
        self.path: int | None = None
        self.kind = wire.TransportKind.UDP
        self.server_offset_ms = 0.0  # gateway ms minus our ms, learned from authenticated answers
        self.ttl = 0.0
        self._keys: SessionKeys | None = None
        self._secret = b""
        self._channel: DataChannel | None = None
        self._initiator: Initiator | None = None
        self._hs: _Pending | None = None
        self._req: _Pending | None = None
        self._recovery_start: float | None = None
        self._outage_start: float | None = None
        self._backoff = params.backoff_initial
        self._retry_at: float | None = None
        self._retry_path: int | None = None
        self._req_kind = wire.TransportKind.UDP
        self._stale_retries = 0
        self._connect_backoff = params.backoff_initial  # survives connect(): reset by a session
        self._refusals = 0  # authenticated final refusals in a row
        self.refused: RefusedForGood | None = None
        self._claim = b""  # the claim id of this client's requests for _claim_version
        self._claim_version = -1
        self._last_rx = 0.0
        self._unanswered: float | None = None  # first DATA sent since we last heard anything
        self._probed: float | None = None  # when the silence probe went
        self._after_probe = False  # the path was lost to an unanswered probe (see reattach)
        self._lost_kind: wire.TransportKind | None = None  # that path's kind
        self._next_keepalive: float | None = None
        self._ka_seq = 0
        self._quality = PathQuality(min_grace=max(0.2, params.keepalive_interval))
        self._out: deque[tuple[int, bytes]] = deque()
        self._events: deque[Event] = deque()
        self._pending_payloads: deque[tuple[bytes, int]] = deque()  # (payload, flow)
        self._generation = 0  # REKEYs so far: the session secret's key generation
        self._keys_made = 0.0  # when the session secret was made (handshake or REKEY)
        self._rekey: _Rekey | None = None
        # The ephemeral key of this generation's REKEY, kept until the next generation is
        # installed (a reattach stops the REKEY, not its key): a gateway may have committed
        # a REKEY made with it whose answer is still on its way, and an answer is taken
        # only with the key it answers.
        # (session, generation, priv, when first sent: the new secret is no older than that)
        self._rekey_key: tuple[bytes, int, bytes, float] | None = None
        self._prev_channel: DataChannel | None = None  # until the gateway uses the new keys
        self._sent_tags: deque[bytes] = deque(maxlen=SENT_TAGS)  # for NOT_BOUND_HERE hints
        self.stats = {
            "payloads_sent": 0, "payloads_received": 0, "payloads_dropped": 0,
            "reattaches": 0, "rejects": 0, "dropped_input": 0,
        }
        self.drops: dict[DropReason, int] = {}
        self.reattach_latencies: list[float] = []

    # ---- API: outputs ----------------------------------------------------------------

    def datagrams_to_send(self) -> list[tuple[int, bytes]]:
        """(path, message bytes) pairs to transmit, oldest first."""
        out = list(self._out)
        self._out.clear()
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        """When ``handle_timer`` must next be called (None: nothing pending)."""
        # Called after every datagram by the agent: no temporary list.
        best = self._dead_at()
        for t in (self._probe_at(), self._hs.deadline if self._hs else None,
                  self._req.deadline if self._req else None,
                  self._retry_at, self._next_keepalive, self._rekey_due()):
            if t is not None and (best is None or t < best):
                best = t
        return best

    @property
    def state(self) -> SessionState:
        return self._machine.state

    @property
    def version(self) -> int:
        """The last ``state_version`` the gateway reported (the client never counts its own)."""
        return self._machine.version

    @property
    def lost_to_probe(self) -> bool:
        """The path was lost to an unanswered probe and no reattach has gone since: the
        agent gives a fresh path of the same kind a short try only (see ``reattach``)."""
        return self._after_probe

    @property
    def attached(self) -> bool:
        return self._machine.state in LIVE_STATES

    @property
    def keys_until(self) -> float:
        """Until when the current secret may seal payloads (then: held, and a REKEY)."""
        return self._keys_made + self.params.reject_after

    def engine_activity(self, sent: float | None, heard: float | None) -> None:
        """What a compiled engine carried on the current path by itself: when it first sealed
        DATA since it was last asked (``sent``; arms the silence probe as the DATA this
        machine seals does), and when it last accepted the gateway's DATA (``heard``; as
        any authenticated packet, it answers what was sent before it)."""
        if heard is not None and heard > self._last_rx:
            self._last_rx = heard
            self._unanswered = self._probed = None
        if sent is not None and sent > self._last_rx and self._unanswered is None and self.attached:
            self._unanswered = sent

    def sealed_elsewhere(self, tags: Iterable[bytes]) -> None:
        """AEAD tags of DATA packets sealed on the current binding outside the machine (the
        compiled data path): a NOT_BOUND_HERE hint echoing one of them is about our packet."""
        known = set(self._sent_tags)
        self._sent_tags.extend(t for t in tags if t not in known)

    @property
    def channel(self) -> DataChannel | None:
        """The current binding's DATA channel (None before the first handshake)."""
        return self._channel

    @property
    def quality(self) -> PathQuality:
        return self._quality

    def status(self) -> dict[str, object]:
        """A snapshot for status lines and the status command."""
        q = self._quality
        return {
            "session_id": self.session_id.hex(),
            "state": self.state.name,
            "version": self.version,
            "epoch": self.epoch,
            "node": wire.node_name(self.node_id.decode(errors="replace")),
            "node_instance": self.node_id.decode(errors="replace"),
            "transport": self.kind.name.lower() if self.path is not None else "-",
            "path": self.path,
            "rtt_ms": None if q.rtt_ms is None else round(q.rtt_ms, 2),
            "jitter_ms": round(q.jitter_ms, 2),
            "loss_pct": round(q.loss_pct, 1),
            **self.stats,
        }

    # ---- API: inputs -----------------------------------------------------------------

    def connect(self, now: float, wall_ms: int, path: int, kind: wire.TransportKind) -> None:
        """Start (or restart) a session with a handshake on ``path``."""
        if self.state is not SessionState.BIRTH and self.state is not SessionState.TERMINATED:
            raise LocalProtocolError(f"connect() in state {self.state.name}")
        if self.refused is not None:
            raise LocalProtocolError(f"connect() after a final refusal ({self.refused.reason.name})")
        self._reset_session()
        hid = self._random(wire.SESSION_ID_LEN)
        hello = ClientHello(wall_ms, kind, self.params.upstream, l3=self.params.l3)
        self._initiator = Initiator(self._static, self._gateway_pub, hid, hello)
        raw = wire.encode(wire.HandshakeInit(hid, self._initiator.message1))
        self.kind = kind
        self._hs = _Pending(raw, path, hid, now, now + self.params.handshake_timeout)
        self._out.append((path, raw))

    def send(self, payload: bytes, now: float, flow: int = 0) -> bool:
        """Tunnel one datagram (of local source ``flow``, UDP-forward mode; 0: none, as L3
        packets); held (bounded) while recovering. False if dropped."""
        # During a proactive jump the current path still carries data (make before break).
        if (self.attached and self._channel is not None and self.path is not None
                and now - self._keys_made > self.params.reject_after):
            # Nothing more under this secret: wait (bounded) for the REKEY under way.
            if self._rekey is None and self._req is None:
                self._send_rekey(now)
            if len(self._pending_payloads) < PENDING_MAX:
                self._pending_payloads.append((payload, flow))
                return True
        elif self.attached and self._channel is not None and self.path is not None:
            inner = wire.inner_flow_payload(flow, payload) if flow else wire.inner_payload(payload)
            self._out.append((self.path, self._seal(inner)))
            self.stats["payloads_sent"] += 1
            if self._unanswered is None:
                self._unanswered = now
            return True
        if self.state in (SessionState.RECOVERING, SessionState.BIRTH):
            if len(self._pending_payloads) < PENDING_MAX:
                self._pending_payloads.append((payload, flow))
                return True
        self.stats["payloads_dropped"] += 1
        return False

    def reattach(self, now: float, path: int, kind: wire.TransportKind, reason: str = "jump",
                 route: int = 0) -> None:
        """Ask the cluster to bind the session to ``path`` (a fresh request, new nonce);
        ``route``: the balancer's route hint (wire.ROUTE_MAX), 0 for the usual node."""
        if self._keys is None or self.state in (SessionState.BIRTH, SessionState.TERMINATED):
            raise LocalProtocolError(f"reattach() in state {self.state.name}")
        if self._recovery_start is None:
            self._recovery_start = now
        self._retry_at = None
        if self._claim_version != self.version:  # one claim id per version claimed
            nonce = self._random(wire.NONCE_LEN)  # the claim id and the rest: one draw
            self._claim, self._claim_version = nonce[:CLAIM_ID_LEN], self.version
        else:
            nonce = self._claim + self._random(wire.NONCE_LEN - CLAIM_ID_LEN)
        req = wire.ReattachRequest(
            self.session_id, self.version, nonce, self._server_ms(now), kind, route=route,
        )
        raw = control.seal(req, self._keys.proof_key)
        self._rekey = None  # a REKEY the gateway committed unanswered is undone by this proof
        self._req = _Pending(raw, path, nonce, now, now + self.params.reattach_timeout, reason=reason)
        if self._after_probe:
            # The path went silent under a probe: a fresh socket of the same kind gets one
            # short try (a rebinding middlebox answers at once), then the agent moves on to
            # the next kind instead of retransmitting into what is likely blocked or dead.
            self._after_probe = False
            if kind == self._lost_kind:
                self._req.deadline = now + self._silence_grace()
                self._req.tries = self.params.reattach_retries + 1
        self._req_kind = kind
        self._out.append((path, raw))

    def transport_failed(self, now: float, path: int, reason: str) -> None:
        """The agent saw the path die (socket error, interface gone)."""
        if path == self.path and self.attached:
            self._lose_transport(now, reason)
        elif self._req is not None and self._req.path == path:
            self._req = None
            self._events.append(ReattachTimedOut(path))
        elif self._hs is not None and self._hs.path == path:
            self._hs = None
            self._handshake_failed(None, False, path)

    def close(self, now: float, reason: TerminateReason = TerminateReason.CLIENT_CLOSE) -> None:
        """End the session on purpose: an authenticated in-band CLOSE."""
        if self._channel is not None and self.path is not None and self.attached:
            self._out.append((self.path, self._channel.seal(wire.inner_close(int(reason)))))
        self._terminate(f"closed: {reason.name}", True, reason)

    def receive(self, data: bytes, path: int, now: float) -> None:
        """Handle one datagram or frame from ``path``. Bad input is dropped and counted."""
        try:
            msg = wire.decode(data)
            if isinstance(msg, wire.Data):
                self._handle_data(msg, data, path, now)
            elif isinstance(msg, wire.HandshakeResp):
                self._handle_handshake_resp(msg, path, now)
            elif isinstance(msg, wire.Retry):
                self._handle_retry(msg, path, now)
            elif isinstance(msg, wire.ReattachAck):
                self._handle_reattach_ack(msg, data, path, now)
            elif isinstance(msg, wire.Reject):
                self._handle_reject(msg, data, path, now)
            elif isinstance(msg, wire.Notice):
                self._handle_notice(msg, data, path, now)
            else:
                raise DecodeError(DropReason.UNEXPECTED, type(msg).__name__)
        except RemoteProtocolError as exc:
            self._drop(exc.reason)

    def handle_timer(self, now: float) -> None:
        """Retransmit, probe, detect death and fire backoffs that are due."""
        if self._hs is not None and now >= self._hs.deadline:
            self._handshake_timeout(now)
        if self._req is not None and now >= self._req.deadline:
            self._reattach_timeout(now)
        if self._retry_at is not None and now >= self._retry_at:
            self._retry_at = None
            if self._req is None and self._retry_path is not None and self.state is SessionState.RECOVERING:
                self.reattach(now, self._retry_path, self._req_kind, reason="retry")
        probe_at = self._probe_at()
        if probe_at is not None and now >= probe_at:
            self._probed = now  # the data went unanswered: ask at once, not at the next interval
            self._send_keepalive(now)
        dead_at = self._dead_at()
        if dead_at is not None and now >= dead_at:
            why = (f"no answer for {self.params.dead_after} keepalive intervals"
                   if self._probed is None else "data and a probe unanswered")
            self._lose_transport(now, why)
        if self._next_keepalive is not None and now >= self._next_keepalive:
            self._send_keepalive(now)
        due = self._rekey_due()
        if due is not None and now >= due:
            self._send_rekey(now)

    # ---- REKEY --------------------------------------------------------------------------

    def _rekey_due(self) -> float | None:
        """When the next REKEY (or its retransmission) is due; None while it cannot run."""
        if self._channel is None or not self.attached or self._req is not None:
            return None
        if self._rekey is not None:
            return self._rekey.deadline
        if self._channel.next_send_counter >= self.params.rekey_after_messages:
            return 0.0
        return self._keys_made + self.params.rekey_after

    def _send_rekey(self, now: float) -> None:
        """Ask for a fresh Diffie-Hellman on the current binding (same key on a resend)."""
        assert self._channel is not None and self.path is not None
        rk = self._rekey
        if rk is None:
            kept = self._rekey_key
            if kept is not None and kept[:2] == (self.session_id, self._generation):
                priv, first = kept[2], kept[3]  # the same key as this generation's last REKEY
            else:
                priv, first = self._random(32), now
                self._rekey_key = (self.session_id, self._generation, priv, now)
            rk = self._rekey = _Rekey(priv, public_key(priv), first)
        elif rk.tries >= REKEY_RETRIES:
            # The node may hold a REKEY it committed whose answer we dropped (it came while
            # we were reattaching): it repeats only that answer and ignores our new key. A
            # reattach on this path, proven under the secret we hold, undoes that REKEY
            # (reattach.lua) and gives a fresh binding, where the next REKEY runs.
            self.reattach(now, self.path, self.kind, reason="rekey")
            return
        rk.tries += 1
        rk.deadline = now + self.params.rekey_timeout
        self._out.append((self.path, self._seal(wire.inner_rekey(self._generation, rk.public))))

    def _rekey_answered(self, inner: wire.Inner, path: int, now: float) -> None:
        """The gateway's REKEY_ACK: derive the next secret, move to its binding."""
        rk = self._rekey
        if rk is None or inner.generation != self._generation + 1 or inner.epoch <= self.epoch:
            self._drop(DropReason.UNEXPECTED)
            return
        shared = dh(rk.private, inner.payload)
        secret = rekey_secret(self._secret, shared, rk.public, inner.payload, inner.generation)
        self._rekey = None
        self._rekey_key = None
        prev = self._channel
        self._secret = secret
        self._keys = SessionKeys(secret)
        self._generation = inner.generation
        # An answer to a REKEY first sent at rk.started may have been committed since then.
        self._keys_made = rk.started
        old_epoch = self.epoch
        self._bind(inner.epoch, inner.binding_id, self.node_id, path, now)
        self._prev_channel = prev  # the gateway's downlink stays on it until it sees ours
        self._events.append(Rekeyed(inner.generation, old_epoch, inner.epoch, now - rk.started))
        self._send_keepalive(now)  # the first packet under the new keys: the gateway confirms
        self._flush_pending()

    # ---- handlers ----------------------------------------------------------------------

    def _handle_handshake_resp(self, msg: wire.HandshakeResp, path: int, now: float) -> None:
        if self._hs is None or self._initiator is None or msg.handshake_id != self._hs.nonce:
            raise DecodeError(DropReason.UNEXPECTED, "no handshake outstanding")
        # finish() changes nothing: an answer that does not authenticate, or whose cleartext
        # session id disagrees with the authenticated one (a tampered copy racing the
        # genuine answer), is dropped and the handshake stays outstanding.
        answer, secret = self._initiator.finish(msg.noise)
        if isinstance(answer, ServerHello) and answer.session_id != msg.session_id:
            raise DecodeError(DropReason.MALFORMED, "session_id mismatch")
        if isinstance(answer, ServerHello) and self.params.l3:
            _l3_fields(answer)  # an L3 answer without usable addresses is not ours to take
        self._hs = None
        self._initiator = None
        if isinstance(answer, Refusal):
            self.server_offset_ms = answer.server_ms - now * 1000
            self._handshake_failed(answer.reason, True, path)
            return
        self._install_hello(answer, secret, path, now)  # the authenticated session id

    def _install_hello(self, h: ServerHello, secret: bytes, path: int, now: float) -> None:
        old = self.state
        self._refusals = 0
        self._connect_backoff = self.params.backoff_initial
        self._adopt(h.version, SessionEvent.HANDSHAKE_COMPLETE, "SERVER_HELLO")
        self.session_id = h.session_id
        self._secret = secret
        self._keys = SessionKeys(secret)
        self._generation = 0
        self._keys_made = now
        self.ttl = h.ttl_ms / 1000
        self.server_offset_ms = h.server_ms - now * 1000
        self._bind(h.epoch, h.binding_id, h.node_id, path, now)
        self._events.append(StateChanged(old, self.state, self.version, "handshake"))
        inner, routes = _l3_fields(h) if self.params.l3 else (None, ())
        self._events.append(HandshakeComplete(h.session_id, h.version, h.epoch, h.node_id, path,
                                              inner, routes))
        self._send_keepalive(now)  # validates the path at the gateway
        self._flush_pending()

    def _handle_retry(self, msg: wire.Retry, path: int, now: float) -> None:
        if self._hs is None or msg.handshake_id != self._hs.nonce or path != self._hs.path:
            raise DecodeError(DropReason.UNEXPECTED, "RETRY without handshake")
        if self._initiator is None:
            raise DecodeError(DropReason.UNEXPECTED, "RETRY after handshake")
        # Same handshake message, now carrying the gateway's stateless token.
        raw = wire.encode(wire.HandshakeInit(self._hs.nonce, self._initiator.message1, msg.token))
        self._hs.raw = raw
        self._hs.deadline = now + self.params.handshake_timeout
        self._out.append((path, raw))

    def _handle_data(self, msg: wire.Data, raw: bytes, path: int, now: float) -> None:
        if self._channel is None or msg.session_id != self.session_id:
            raise DecodeError(DropReason.UNKNOWN_SESSION, "no channel")
        prev = self._prev_channel
        if prev is not None and msg.epoch == prev.epoch and msg.epoch != self._channel.epoch:
            plain = prev.open(msg, raw)  # sent before the gateway saw our new keys
        else:
            plain = self._channel.open(msg, raw)  # epoch, replay and AEAD checks
            self._prev_channel = None  # the gateway uses the new keys: the old ones go
        inner = wire.decode_inner(plain)
        if path != self.path:
            # Authenticated, but on a path we are leaving or never bound: ignore it.
            self._drop(DropReason.UNEXPECTED)
            return
        self._last_rx = now
        self._unanswered = self._probed = None
        if inner.kind is wire.InnerType.PAYLOAD or inner.kind is wire.InnerType.FLOW_PAYLOAD:
            self.stats["payloads_received"] += 1
            self._events.append(PayloadReceived(inner.payload, inner.flow))
        elif inner.kind is wire.InnerType.KEEPALIVE_ACK:
            self._quality.on_probe_answered(inner.seq, now)
            if inner.version > self.version:  # an older ACK may arrive late: nothing to learn
                self._adopt(inner.version, None, "KEEPALIVE_ACK")
            self._evaluate_quality(now)
        elif inner.kind is wire.InnerType.KEEPALIVE:
            pass  # gateways do not probe us; treat as liveness only
        elif inner.kind is wire.InnerType.PATH_CHALLENGE:
            # The gateway saw us from a new address (a NAT rebinding): answer on this path,
            # so the answer comes from that address and the downlink moves there.
            self._out.append((path, self._seal(wire.inner_path_response(inner.payload))))
        elif inner.kind is wire.InnerType.CLOSE:
            self._terminate(f"gateway closed: {_reason_name(TerminateReason, inner.reason)}", True,
                            inner.reason)
        elif inner.kind is wire.InnerType.REKEY_ACK:
            self._rekey_answered(inner, path, now)

    def _handle_reattach_ack(self, msg: wire.ReattachAck, raw: bytes, path: int, now: float) -> None:
        req = self._req
        if req is None or msg.nonce != req.nonce or msg.session_id != self.session_id:
            raise DecodeError(DropReason.UNEXPECTED, "ACK for no outstanding request")
        assert self._keys is not None
        if not control.verify(raw, self._keys.control_key):
            raise RemoteProtocolError(DropReason.BAD_MAC, "REATTACH_ACK")
        if msg.epoch <= self.epoch:
            raise RemoteProtocolError(DropReason.STALE_EPOCH, "ACK does not advance the epoch")
        old_path = self.path
        old = self.state
        self._adopt(msg.version, SessionEvent.REATTACH, "REATTACH_ACK")  # the version must advance too
        self._req = None
        self._backoff = self.params.backoff_initial
        self._stale_retries = 0
        self.server_offset_ms = msg.server_ms - now * 1000
        self.kind = self._req_kind
        self._bind(msg.epoch, msg.binding_id, msg.node_id, req.path, now)
        latency = now - (self._recovery_start if self._recovery_start is not None else req.first_sent)
        outage = now - self._outage_start if self._outage_start is not None else 0.0
        self._recovery_start = None
        self._outage_start = None
        self.stats["reattaches"] += 1
        self.reattach_latencies.append(latency)
        self._events.append(StateChanged(old, self.state, self.version, "reattach"))
        self._events.append(Reattached(old_path, req.path, msg.version, msg.epoch, msg.node_id,
                                       latency, req.reason, outage))
        self._send_keepalive(now)  # proves the new path at once
        self._flush_pending()

    def _handle_reject(self, msg: wire.Reject, raw: bytes, path: int, now: float) -> None:
        req = self._req
        if req is None or msg.nonce != req.nonce or msg.session_id != self.session_id:
            if self._hs is not None and msg.session_id == self._hs.nonce and not msg.authenticated:
                # An unauthenticated handshake rejection (e.g. OVERLOADED): wait and retry.
                self._hs.deadline = now + self._backoff_step()
                return
            raise DecodeError(DropReason.UNEXPECTED, "REJECT for no outstanding request")
        assert self._keys is not None
        authenticated = msg.authenticated and control.verify(raw, self._keys.control_key)
        if msg.authenticated and not authenticated:
            self._events.append(SecurityNotice(SecurityNoticeKind.FORGED_REJECT, msg.reason.name))
            raise RemoteProtocolError(DropReason.BAD_MAC, "REJECT")
        self.stats["rejects"] += 1
        r = msg.reason
        if not authenticated:
            # Anyone who sees the request can forge this answer (the nonce travels in clear),
            # so it is a hint: the request stays outstanding, is retransmitted, and a genuine
            # ACK that follows is taken; only its own timeout moves the client on.
            self._events.append(ReattachRejected(r, False, ReattachAction.WAIT, path))
            return
        self._req = None
        self.server_offset_ms = msg.server_ms - now * 1000
        action = ReattachAction.BACKOFF
        if r in (RejectReason.TERMINATED, RejectReason.EXPIRED) and authenticated:
            self._events.append(ReattachRejected(r, True, ReattachAction.REHANDSHAKE, path))
            code = TerminateReason.EXPIRED if r is RejectReason.EXPIRED else None
            self._terminate(f"gateway says {r.name}", True, code)
            return
        # The gateway's version comes with an authenticated STALE_VERSION or DUAL_ACTIVE_CONFLICT;
        # one that would take us back is not adopted (fail closed: no retry on it).
        # An authenticated REPLAYED_NONCE carries the version when our request was raced by
        # a copy that won: adopt it too, and retry with a fresh nonce.
        adoptable = msg.version >= self.version
        if (r in (RejectReason.STALE_VERSION, RejectReason.REPLAYED_NONCE) and adoptable
                and msg.version and self._stale_retries < STALE_RETRIES):
            self._stale_retries += 1
            if msg.version > self.version:
                self._machine.adopt(msg.version)
            action = ReattachAction.RETRY
        elif r in (RejectReason.REPLAYED_NONCE, RejectReason.CLOCK_SKEW) and self._stale_retries < STALE_RETRIES:
            self._stale_retries += 1
            action = ReattachAction.RETRY  # fresh nonce / re-synced clock
        elif r is RejectReason.DUAL_ACTIVE_CONFLICT:
            if adoptable:
                self._machine.adopt(msg.version)
            self._events.append(SecurityNotice(SecurityNoticeKind.DUAL_ACTIVE_CONFLICT,
                                               "another claimant holds this session"))
        elif r is RejectReason.POLICY_DENIED:
            action = ReattachAction.NEXT_TRANSPORT
        if action is ReattachAction.BACKOFF and self.state is not SessionState.RECOVERING:
            action = ReattachAction.STAY
        self._events.append(ReattachRejected(r, authenticated, action, path))
        if action is ReattachAction.RETRY:
            self.reattach(now, path, self._req_kind, reason=req.reason)
        elif action is ReattachAction.NEXT_TRANSPORT:
            self._events.append(ReattachTimedOut(path))
        elif action is ReattachAction.BACKOFF:
            self._retry_at = now + self._backoff_step()
            self._retry_path = path

    def _handle_notice(self, msg: wire.Notice, raw: bytes, path: int, now: float) -> None:
        if msg.session_id != self.session_id or self._keys is None:
            raise DecodeError(DropReason.UNKNOWN_SESSION, "NOTICE")
        if not control.verify(raw, self._keys.control_key):
            self._events.append(SecurityNotice(SecurityNoticeKind.FORGED_NOTICE, msg.kind.name))
            raise RemoteProtocolError(DropReason.BAD_MAC, "NOTICE")
        if msg.version < self.version:
            raise RemoteProtocolError(DropReason.STALE_EPOCH, "NOTICE older than our version")
        if msg.kind is NoticeKind.TERMINATED:
            self._terminate(f"gateway notice: {_reason_name(TerminateReason, msg.reason)}", True,
                            msg.reason)
        elif msg.kind is NoticeKind.NOT_BOUND_HERE and path == self.path and self.attached:
            # A gateway answers any DATA it cannot place, even forged DATA (the session id is
            # cleartext); the hint echoes the triggering packet's AEAD tag, so only a hint
            # about a packet we sent on this binding moves us.
            if msg.nonce not in self._sent_tags:
                raise RemoteProtocolError(DropReason.UNEXPECTED, "NOT_BOUND_HERE for no packet of ours")
            self._lose_transport(now, "gateway does not hold our binding")

    # ---- internals ---------------------------------------------------------------------

    def _bind(self, epoch: int, binding_id: bytes, node_id: bytes, path: int, now: float) -> None:
        c2g, g2c = traffic_keys(self._secret, epoch, binding_id, node_id)
        self._channel = dataplane.new_channel(c2g, g2c, self.session_id, epoch)
        self._prev_channel = None
        self.epoch = epoch
        self.node_id = node_id
        self.path = path
        self._last_rx = now
        self._unanswered = self._probed = None
        self._quality = PathQuality(min_grace=max(0.2, self.params.keepalive_interval))

    def _seal(self, inner: bytes) -> bytes:
        assert self._channel is not None
        raw = self._channel.seal(inner)
        self._sent_tags.append(raw[-wire.AEAD_TAG_LEN:])
        return raw

    def _send_keepalive(self, now: float) -> None:
        if self._channel is None or self.path is None or not (self.attached or self.state is SessionState.ATTACHED):
            self._next_keepalive = None
            return
        self._ka_seq = (self._ka_seq + 1) & 0xFFFFFFFF
        self._quality.on_probe_sent(self._ka_seq, now)
        inner = wire.inner_keepalive(self._ka_seq, int(now * 1000) & 0xFFFFFFFFFFFFFFFF, int(self.state))
        self._out.append((self.path, self._seal(inner)))
        self._next_keepalive = now + self.params.keepalive_interval
        self._quality.expire(now)
        self._evaluate_quality(now)

    def _evaluate_quality(self, now: float) -> None:
        if not self.attached or self._quality.samples < 3:
            return
        target = self._quality.classify(self.params.thresholds, self.state)
        if target is self.state:
            return
        event = QUALITY_EVENTS[target]
        old = self.state
        self._machine.apply(event)
        # The gateway records the change and returns the new version in its next ACK.
        self._events.append(StateChanged(old, self.state, self.version, "quality"))

    def _silence_grace(self) -> float:
        return self.params.probe_silence + 4 * (self._quality.srtt or 0.0)

    def _probe_at(self) -> float | None:
        """When unanswered DATA calls for a probe (None: none due)."""
        if (self._unanswered is None or self._probed is not None or not self.attached
                or self.params.probe_silence <= 0 or self._channel is None):
            return None
        return max(self._unanswered, self._last_rx) + self._silence_grace()

    def _dead_at(self) -> float | None:
        if not self.attached or self._channel is None:
            return None
        dead = self._last_rx + self.params.dead_after * self.params.keepalive_interval
        if self._probed is not None:
            dead = min(dead, self._probed + self._silence_grace())
        return dead

    def _lose_transport(self, now: float, reason: str) -> None:
        old = self.state
        self._machine.apply(SessionEvent.TRANSPORT_LOST)
        self._next_keepalive = None
        self._after_probe = self._probed is not None
        self._lost_kind = self.kind
        self._unanswered = self._probed = None
        self._recovery_start = now
        self._outage_start = self._last_rx
        self._events.append(StateChanged(old, self.state, self.version, reason))
        self._events.append(TransportLost(self.path if self.path is not None else -1, reason))

    def _handshake_timeout(self, now: float) -> None:
        hs = self._hs
        assert hs is not None
        if hs.tries >= HANDSHAKE_RETRIES:
            self._hs = None
            self._initiator = None
            self._handshake_failed(None, False, hs.path)
            return
        hs.tries += 1
        hs.deadline = now + self.params.handshake_timeout * hs.tries
        self._out.append((hs.path, hs.raw))

    def _reattach_timeout(self, now: float) -> None:
        req = self._req
        assert req is not None
        if req.tries > self.params.reattach_retries:
            self._req = None
            self._events.append(ReattachTimedOut(req.path))
            return
        req.tries += 1
        req.deadline = now + self.params.reattach_timeout
        self._out.append((req.path, req.raw))  # same bytes: idempotent at the gateway

    def _handshake_failed(self, reason: RejectReason | None, authenticated: bool, path: int) -> None:
        """A handshake failed: retry after a backoff, or, after ``refusals_final`` authenticated
        refusals in a row that no retry cures, give up for good (the agent exits)."""
        final = authenticated and reason in REFUSAL_ADVICE
        self._refusals = self._refusals + 1 if final else 0
        if final and self._refusals >= self.params.refusals_final:
            assert reason is not None
            self.refused = RefusedForGood(reason, self._refusals, REFUSAL_ADVICE[reason])
            self._events.append(HandshakeFailed(reason, authenticated, path))
            self._events.append(self.refused)
            return
        delay = self._connect_backoff
        self._connect_backoff = min(self.params.backoff_max, delay * 2)
        self._events.append(HandshakeFailed(reason, authenticated, path, delay))

    def _backoff_step(self) -> float:
        delay = self._backoff
        self._backoff = min(self.params.backoff_max, self._backoff * 2)
        return delay

    def _terminate(self, reason: str, authenticated: bool, code: int | None = None) -> None:
        """End the session (``code``: its TerminateReason, when known); a second call is a no-op."""
        old = self.state
        if old is not SessionState.TERMINATED:
            event = SessionEvent.EXPIRE if code == TerminateReason.EXPIRED else SessionEvent.TERMINATE
            self._machine.apply(event, code)
            self._events.append(StateChanged(old, self.state, self.version, reason))
            self._events.append(SessionTerminated(reason, authenticated))
        self._channel = None
        self._prev_channel = None
        self._rekey = None
        self._rekey_key = None
        self._req = None
        self._hs = None
        self._next_keepalive = None
        self._retry_at = None

    def _flush_pending(self) -> None:
        while self._pending_payloads and self.attached:
            payload, flow = self._pending_payloads.popleft()
            self.send(payload, 0.0, flow)

    def _server_ms(self, now: float) -> int:
        return max(0, int(now * 1000 + self.server_offset_ms))

    def _adopt(self, version: int, event: SessionEvent | None, what: str) -> None:
        """Adopt the gateway's (state, version) from an authenticated ``what``; drop it if illegal."""
        try:
            self._machine.adopt(version, event)
        except IllegalAdoption as exc:  # the gateway's fault (or a replay), not ours
            raise RemoteProtocolError(DropReason.STALE_EPOCH, f"{what}: {exc}") from None

    def _reset_session(self) -> None:
        self._machine = _new_machine()  # a new session is born: not a transition of the old one
        self.session_id = b""
        self.epoch = 0
        self._keys = None
        self._channel = None
        self._req = None
        self._retry_at = None
        self._recovery_start = None
        self._backoff = self.params.backoff_initial

    def _drop(self, reason: DropReason) -> None:
        self.stats["dropped_input"] += 1
        self.drops[reason] = self.drops.get(reason, 0) + 1


@dataclass(slots=True)
class _Rekey:
    """A REKEY under way: our ephemeral key, until the gateway's answer."""

    private: bytes = field(repr=False)
    public: bytes = b""
    started: float = 0.0
    deadline: float = 0.0
    tries: int = 0  # sent so far (the same key each time)


def _l3_fields(h: ServerHello) -> tuple[InnerAddresses, tuple[str, ...]]:
    """An L3 ServerHello's inner addresses and routes; DecodeError if missing or malformed."""
    if not h.inner:
        raise DecodeError(DropReason.MALFORMED, "ServerHello without inner addresses")
    routes = tuple(r for r in h.routes.split(",") if r)
    try:
        inner = InnerAddresses.parse(h.inner)
        parse_prefixes(routes)
    except ValueError as exc:
        raise DecodeError(DropReason.MALFORMED, f"ServerHello L3 fields: {exc}") from None
    return inner, routes


def _new_machine() -> StateMachine:
    return StateMachine(role="client", authoritative=False)


def _reason_name(enum: type[TerminateReason], value: int) -> str:
    try:
        return enum(value).name
    except ValueError:
        return str(value)
