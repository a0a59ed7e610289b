"""Client and gateway machines in memory: a simulated network and a model of the store.

Theory of operation. ``Net`` owns a virtual clock and one event queue. Datagrams
between client machines (``ClientSession``) and gateway machines
(``GatewayMachine``) are events delivered after a latency, subject to loss,
duplication and reordering drawn from a seeded RNG, so every run is
reproducible. A gateway's store operations are answered by ``MemStore`` after
a store latency: a small model of the Lua scripts' decisions (CAS on
state_version, the nonce record, epochs, ownership, tombstones), written from
their header comments; the scripts themselves are tested against a real
redis-server in tests/integration. A gateway's upstream is an echo. No
sockets, no sleeps: ``run`` advances the clock to the next event or timer.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from session import wire
from session.binding import Peer
from session.client import ClientParams, ClientSession
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
from session.reasons import RejectReason, TerminateReason
from session.states import SessionEvent, SessionState, is_allowed
from session.storeops import (
    ActivateOp,
    ActivateResult,
    AddressResult,
    BirthOp,
    BirthResult,
    ClaimAddressesOp,
    ClaimHandshakeOp,
    ClaimSlotOp,
    ClientPolicy,
    ConfirmKeyOp,
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
    StoreStatus,
    SweepOp,
    TerminateOp,
    TerminateResult,
    TransitionOp,
    TransitionResult,
)

UDP = wire.TransportKind.UDP
WALL_MS = 1_800_000_000_000  # the store's clock at t=0


@dataclass
class _Rec:
    state: SessionState
    version: int
    epoch: int
    bid: bytes
    node: str
    kind: wire.TransportKind
    upstream: str
    client_id: str
    ws: bytes
    ttl_ms: int
    nonces: dict[bytes, tuple[str, ReattachResult]] = field(default_factory=dict)
    lv: int = -1  # the version the last successful reattach consumed
    lt: int = 0
    lc: bytes = b""  # the claim id (nonce prefix) of the request that consumed lv
    tr: TerminateReason | None = None
    rr: int = 100  # reattach rate and transports mask, as birth wrote them
    tk: int = 0b110
    ma: int | None = None  # maximum age, ms (not enforced here: store/lua/common.lua end_ms)
    pep: int = 0  # the PENDING binding a reattach granted (reattach.lua, activate.lua)
    pbid: bytes = b""
    pnd: str = ""
    pk: wire.TransportKind | None = None
    kg: int = 0  # key generation, when its secret was made, the previous one until confirmed
    kt: int = 0
    wsp: bytes = b""
    ktp: int = 0
    wc: bytes = b""
    ia: str = ""  # an L3 session's inner addresses and prefixes, as birth wrote them
    ap: str = ""
    lost: int | None = None  # the version before a gateway-observed TRANSPORT_LOST
    act: tuple[int, str, int] | None = None  # the last activation: (prev epoch, node, ms)


class MemStore:
    """The store's decisions, in memory (see store/lua/*.lua for the real ones)."""

    def __init__(self, net: Net) -> None:
        self.net = net
        self.clients: dict[str, ClientPolicy] = {}
        self.records: dict[bytes, _Rec] = {}
        self.claims: set[bytes] = set()
        self.slots: dict[str, dict[bytes, int]] = {}  # client -> session -> end ms (quotas)
        self.addresses: dict[bytes, int] = {}  # session -> its inner-address pool index
        self.up = True
        self.calls: list[Any] = []
        # The next reattach's decision, forced (a rule the model does not keep, e.g. the rate).
        self.force: tuple[StoreStatus, RejectReason] | None = None
        # Change an answer on its way back (an outcome that was unknown, then recovered).
        self.rewrite: Callable[[Any, Any], Any] | None = None
        # Extra seconds before an answer reaches its gateway (a slow call), per operation.
        self.delay: Callable[[Any], float] | None = None

    def ms(self) -> int:
        return WALL_MS + int(self.net.now * 1000)

    def answer(self, op: Any) -> Any:
        self.calls.append(op)
        if not self.up:
            return StoreFailure("store down (test)")
        handler: Callable[[Any], Any] = getattr(self, "_" + type(op).__name__)
        answer = handler(op)
        return self.rewrite(op, answer) if self.rewrite is not None else answer

    def _GetClientOp(self, op: GetClientOp) -> ClientPolicy | None:
        return self.clients.get(op.client_id)

    def _ClaimHandshakeOp(self, op: ClaimHandshakeOp) -> bool:
        fresh = op.digest not in self.claims
        self.claims.add(op.digest)
        return fresh

    def _BirthOp(self, op: BirthOp) -> BirthResult:
        if op.session_id in self.records:
            return BirthResult(StoreStatus.EXISTS, 0, 0, None, self.ms(), 0)
        self.records[op.session_id] = _Rec(
            SessionState.ATTACHED, 1, 1, op.binding_id, op.node, op.kind, op.upstream,
            op.client_id, op.wrapped_secret, op.policy.ttl_ms, rr=op.policy.reattach_rate,
            tk=op.policy.transport_mask, ma=op.policy.max_age_ms, kt=self.ms(),
            wc=op.wrapped_control, ia=op.inner,
            ap=",".join(op.policy.prefixes) if op.inner else "")
        return BirthResult(StoreStatus.OK, 1, 1, SessionState.ATTACHED, self.ms(),
                           self.ms() + op.policy.ttl_ms)

    def _GetRecordOp(self, op: GetRecordOp) -> SessionRecord | None:
        r = self.records.get(op.session_id)
        if r is None:
            return None
        return SessionRecord(op.session_id, r.state, r.version, r.epoch, r.bid, r.node, r.kind,
                             r.upstream, r.client_id, r.ws, r.ttl_ms, self.ms() + r.ttl_ms, 0,
                             self.ms(), r.rr, r.tk, 1, r.tr, None, None, None, r.ma, r.pep,
                             r.pnd, r.pbid, r.wc, r.kg, r.kt, r.wsp, r.ktp, inner=r.ia,
                             prefixes=r.ap)

    def _ReattachOp(self, op: ReattachOp) -> ReattachResult:
        now = self.ms()
        r = self.records.get(op.session_id)

        def reject(status: StoreStatus, reason: RejectReason) -> ReattachResult:
            v, ep, st = (r.version, r.epoch, r.state) if r else (0, 0, None)
            return ReattachResult(status, reason, v, ep, b"", r.node if r else "", "", now, st,
                                  False, False, False, r.tr if r else None, st,
                                  r.kind if r else None)

        if r is None:
            return reject(StoreStatus.UNKNOWN_SESSION, RejectReason.UNKNOWN_SESSION)
        if r.state is SessionState.TERMINATED:
            if r.tr is TerminateReason.EXPIRED:
                return reject(StoreStatus.EXPIRED, RejectReason.EXPIRED)
            return reject(StoreStatus.TERMINATED, RejectReason.TERMINATED)
        if self.force is not None:
            forced, self.force = self.force, None
            return reject(*forced)
        if abs(op.timestamp_ms - now) > op.window_ms:
            return reject(StoreStatus.CLOCK_SKEW, RejectReason.CLOCK_SKEW)
        seen = r.nonces.get(op.nonce)
        if seen is not None:
            tag, decision = seen
            if tag != op.addr_tag:
                return reject(StoreStatus.REPLAYED_NONCE, RejectReason.REPLAYED_NONCE)
            active = decision.ok and (decision.epoch, decision.binding_id) == (r.epoch, r.bid)
            pending = decision.ok and (decision.epoch, decision.binding_id) == (r.pep, r.pbid)
            return ReattachResult(decision.status, decision.reason, decision.version,
                                  decision.epoch, decision.binding_id, decision.node, "", now,
                                  r.state, True, False, active or pending, None, r.state, r.kind,
                                  pending, decided_ms=decision.server_ms)
        lost_ok = r.state is SessionState.RECOVERING and op.expected_version == r.lost
        if op.expected_version != r.version and not lost_ok:
            dual = (op.expected_version == r.lv and now - r.lt < op.dual_active_window_ms
                    and op.nonce[:8] != r.lc)
            res = reject(StoreStatus.DUAL_ACTIVE_CONFLICT if dual else StoreStatus.STALE_VERSION,
                         RejectReason.DUAL_ACTIVE_CONFLICT if dual
                         else RejectReason.STALE_VERSION)
        elif not is_allowed(r.state, SessionEvent.REATTACH):
            res = reject(StoreStatus.ILLEGAL_TRANSITION, RejectReason.POLICY_DENIED)
        elif op.proof_generation >= 0 and op.proof_generation != r.kg and (
                op.proof_generation != r.kg - 1 or not r.wsp or op.timestamp_ms < r.kt):
            res = reject(StoreStatus.KEY_MOVED, RejectReason.STORE_UNAVAILABLE)
        else:
            if op.proof_generation >= 0 and op.proof_generation != r.kg:  # a REKEY undone
                r.ws, r.kt, r.kg = r.wsp, r.ktp, op.proof_generation
            if op.proof_generation >= 0:
                r.wsp = b""
            prev_state = r.state
            r.lv, r.lt, r.lc = op.expected_version, now, op.nonce[:8]
            r.lost = None
            r.version += 1
            r.pep = max(r.epoch, r.pep) + 1
            r.pbid, r.pnd, r.pk, r.state = op.binding_id, op.node, op.kind, SessionState.ATTACHED
            res = ReattachResult(StoreStatus.OK, None, r.version, r.pep, r.pbid, r.pnd,
                                 r.node, now, r.state, False, False, True, None, prev_state,
                                 r.kind, True)
        r.nonces[op.nonce] = (op.addr_tag, res)
        return res

    def _TransitionOp(self, op: TransitionOp) -> TransitionResult:
        r = self.records.get(op.session_id)
        if r is None:
            return TransitionResult(StoreStatus.UNKNOWN_SESSION, 0, None, None, False, None, 0,
                                    self.ms(), op.event)
        prev = r.state
        if op.expected_version != r.version:
            status = StoreStatus.STALE_VERSION
        elif not is_allowed(r.state, op.event):
            status = StoreStatus.ILLEGAL_TRANSITION
        else:
            status = StoreStatus.OK
            if op.event is SessionEvent.TRANSPORT_LOST:
                r.lost = r.version
            r.state = {SessionEvent.TRANSPORT_LOST: SessionState.RECOVERING,
                       SessionEvent.TRANSPORT_RESTORED: SessionState.ATTACHED,
                       SessionEvent.QUALITY_RECOVERED: SessionState.ATTACHED,
                       SessionEvent.QUALITY_VOLATILE: SessionState.VOLATILE,
                       SessionEvent.QUALITY_DEGRADED: SessionState.DEGRADED}[op.event]
            r.version += 1
        return TransitionResult(status, r.version, r.state, prev, False, r.tr, r.epoch,
                                self.ms(), op.event)

    def _RefreshOp(self, op: RefreshOp) -> RefreshResult:
        r = self.records.get(op.session_id)
        if r is None:
            return RefreshResult(StoreStatus.UNKNOWN_SESSION, 0, None, 0, "", 0, self.ms(),
                                 False, None)
        if r.state is SessionState.TERMINATED:
            status = StoreStatus.TERMINATED
        elif (r.node, r.epoch) != (op.node, op.epoch) and (r.pnd, r.pep) != (op.node, op.epoch):
            status = StoreStatus.NOT_OWNER
        else:
            status = StoreStatus.OK
        return RefreshResult(status, r.version, r.state, r.epoch, r.node, 0, self.ms(), False,
                             r.tr)

    def _ActivateOp(self, op: ActivateOp) -> ActivateResult:
        r = self.records.get(op.session_id)
        if r is None:
            return ActivateResult(StoreStatus.UNKNOWN_SESSION, 0, None, 0, "", 0, "", self.ms(),
                                  False, None)
        if r.state is SessionState.TERMINATED:
            return ActivateResult(StoreStatus.TERMINATED, r.version, r.state, r.epoch, r.node, 0,
                                  "", self.ms(), False, r.tr)
        prev_epoch, prev_node, at = 0, "", self.ms()
        if (r.epoch, r.bid, r.node) == (op.epoch, op.binding_id, op.node):
            status = StoreStatus.OK
            prev_epoch, prev_node, at = r.act or (0, "", at)
        elif (r.pep, r.pbid, r.pnd) == (op.epoch, op.binding_id, op.node):
            status, prev_epoch, prev_node = StoreStatus.OK, r.epoch, r.node
            r.act = (r.epoch, r.node, at)
            r.epoch, r.bid, r.node = r.pep, r.pbid, r.pnd
            r.kind = r.pk or r.kind
            r.pbid, r.pnd, r.pk = b"", "", None  # (pep = epoch now)
        else:
            status = StoreStatus.NOT_OWNER
        return ActivateResult(status, r.version, r.state, r.epoch, r.node, prev_epoch,
                              prev_node, self.ms(), False, None, at)

    def _RekeyOp(self, op: RekeyOp) -> RekeyResult:
        r = self.records.get(op.session_id)
        if r is None or r.state is SessionState.TERMINATED:
            status = StoreStatus.UNKNOWN_SESSION if r is None else StoreStatus.TERMINATED
            return RekeyResult(status, 0, None, 0, "", 0, self.ms(), False, None)
        if (r.epoch, r.bid, r.node) != (op.epoch, op.binding_id, op.node):
            return RekeyResult(StoreStatus.NOT_OWNER, r.version, r.state, r.epoch, r.node, r.kg,
                               self.ms(), False, None)
        if r.kg != op.generation:
            return RekeyResult(StoreStatus.STALE_VERSION, r.version, r.state, r.epoch, r.node,
                               r.kg, self.ms(), False, None)
        r.wsp, r.ktp, r.ws, r.kt, r.wc = r.ws, r.kt, op.wrapped_secret, self.ms(), op.wrapped_control
        r.kg += 1
        r.epoch = r.pep = max(r.epoch, r.pep) + 1
        r.bid, r.pbid, r.pnd, r.pk = op.new_binding_id, b"", "", None
        return RekeyResult(StoreStatus.OK, r.version, r.state, r.epoch, r.node, r.kg, self.ms(),
                           False, None)

    def _ConfirmKeyOp(self, op: ConfirmKeyOp) -> bool:
        r = self.records.get(op.session_id)
        if r is None or r.kg != op.generation or not r.wsp:
            return False
        r.wsp = b""
        return True

    def _TerminateOp(self, op: TerminateOp) -> TerminateResult:
        r = self.records.get(op.session_id)
        if r is None:
            return TerminateResult(StoreStatus.UNKNOWN_SESSION, 0, None, None, 0, "", self.ms())
        if r.state is SessionState.TERMINATED:
            return TerminateResult(StoreStatus.TERMINATED, r.version, r.state, r.tr, r.epoch,
                                   r.node, self.ms())
        prev = r.state
        r.state, r.tr = SessionState.TERMINATED, op.reason
        r.pbid, r.pnd, r.pk = b"", "", None
        r.ws = r.wsp = b""
        r.version += 1
        return TerminateResult(StoreStatus.OK, r.version, prev, op.reason, r.epoch, r.node,
                               self.ms())

    def _PublishMoveOp(self, op: PublishMoveOp) -> int:
        for name, gw in self.net.gateways.items():
            if name != op.node:
                self.net.at(self.net.store_latency, lambda g=gw: g.machine.binding_moved(
                    op.session_id, op.node, op.epoch, self.net.now))
        return len(self.net.gateways) - 1

    def _ClaimSlotOp(self, op: ClaimSlotOp) -> SlotResult:
        live = self.slots.setdefault(op.client_id, {})
        for sid in [sid for sid, end in live.items() if end <= self.ms()]:
            del live[sid]
        if op.session_id not in live and len(live) >= op.limit:
            return SlotResult(False, len(live))
        live[op.session_id] = op.end_ms
        return SlotResult(True, len(live))

    def _ReleaseSlotOp(self, op: ReleaseSlotOp) -> int:
        return int(self.slots.get(op.client_id, {}).pop(op.session_id, None) is not None)

    def _ClaimAddressesOp(self, op: ClaimAddressesOp) -> AddressResult:
        held = self.addresses.get(op.session_id)
        if held is not None:
            return AddressResult(StoreStatus.OK, held, len(self.addresses))
        free = sorted(set(range(op.size)) - set(self.addresses.values()))
        if not free:
            return AddressResult(StoreStatus.POOL_EXHAUSTED, -1, len(self.addresses))
        self.addresses[op.session_id] = free[0]
        return AddressResult(StoreStatus.OK, free[0], len(self.addresses))

    def _ReleaseAddressesOp(self, op: ReleaseAddressesOp) -> int:
        return int(self.addresses.pop(op.session_id, None) is not None)

    def _ServerTimeOp(self, op: ServerTimeOp) -> int:
        return self.ms()

    def _SweepOp(self, op: SweepOp) -> list[Any]:
        return []


class Gw:
    """One gateway machine on the simulated network, with an echo upstream."""

    def __init__(self, net: Net, name: str, settings: GatewaySettings, priv: bytes,
                 kek: bytes) -> None:
        self.net = net
        self.name = name
        self.metrics = Recorder()
        self.events = Recorder()
        self.machine = GatewayMachine(settings, priv, kek, metrics=self.metrics,
                                      events=self.events, random=net.rng.randbytes)
        self.upstream: list[bytes] = []
        self.sent: list[tuple[Peer, bytes]] = []
        self.tun: list[bytes] = []  # L3: what the machine wrote to the node's TUN
        self.not_local: list[tuple[int, bytes]] = []
        self.paused = False  # SIGSTOP: no timers, what arrives waits in its socket
        self.buffered: list[tuple[bytes, Peer]] = []

    def deliver(self, data: bytes, peer: Peer) -> None:
        if self.paused:
            self.buffered.append((data, peer))
        else:
            self.machine.receive(data, peer, self.net.now)

    def resume(self) -> None:
        """SIGCONT: the datagrams its sockets buffered are read first, then its timers run."""
        self.paused = False
        buffered, self.buffered = self.buffered, []
        for data, peer in buffered:
            self.machine.receive(data, peer, self.net.now)

    def flush(self) -> None:
        for e in self.machine.effects():
            if isinstance(e, Send):
                self.sent.append((e.peer, e.data))
                self.net.from_gateway(self, e.peer, e.data)
            elif isinstance(e, StoreCall):
                answer = self.net.store.answer(e.op)
                slow = self.net.store.delay(e.op) if self.net.store.delay is not None else 0.0
                self.net.at(self.net.store_latency + slow, lambda c=e.call_id, a=answer:
                            self.machine.store_answered(c, a, self.net.now))
            elif isinstance(e, ToUpstream):
                self.upstream.append(e.data)
                if self.net.echo:
                    self.net.at(0.0005, lambda s=e.session_id, d=e.data:
                                self.machine.upstream_received(s, d, self.net.now))
            elif isinstance(e, ToTun):
                self.tun.append(e.data)
            elif isinstance(e, NotLocal):
                self.not_local.append((e.pool_index, e.data))
            elif isinstance(e, CloseUpstream):
                pass


class Recorder:
    """A metrics/events sink that keeps every call: (method, args, kwargs)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Callable[..., Any]:
        def record(*args: Any, **kw: Any) -> bool:
            self.calls.append((name, args, kw))
            return True
        return record

    def named(self, name: str) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
        return [(a, k) for n, a, k in self.calls if n == name]


@dataclass
class Path:
    """One client path: its address as the gateways see it, and where it goes."""

    addr: tuple[str, int]
    gateway: str
    up: bool = True  # False: everything on it is lost both ways
    uplink: bool = True  # False: what the client sends on it is lost
    downlink: bool = True  # False: what reaches the client on it is lost


class Cl:
    """One client machine, its paths, and what reached it."""

    def __init__(self, net: Net, priv: bytes, gw_pub: bytes, params: ClientParams) -> None:
        self.net = net
        self.machine = ClientSession(priv, gw_pub, params, random=net.rng.randbytes)
        self.paths: dict[int, Path] = {}
        self.received: list[bytes] = []
        self.events: list[Any] = []
        self.inbound: list[tuple[int, bytes]] = []
        self.auto_reattach = False

    def flush(self) -> None:
        for path, data in self.machine.datagrams_to_send():
            p = self.paths.get(path)
            if p is not None and p.up:
                self.net.to_gateway(p, data)
        while (ev := self.machine.next_event()) is not None:
            self.events.append(ev)
            if type(ev).__name__ == "PayloadReceived":
                self.received.append(ev.data)
            elif type(ev).__name__ == "TransportLost" and self.auto_reattach:
                # As the agent does (here on the same path: the test moves addresses).
                self.machine.reattach(self.net.now, ev.path, UDP, reason="lost")

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


class Net:
    """The simulated network and clock."""

    def __init__(self, seed: int = 1, latency: float = 0.005, loss: float = 0.0,
                 dup: float = 0.0, jitter: float = 0.0, store_latency: float = 0.001) -> None:
        self.rng = random.Random(seed)
        self.now = 0.0
        self.latency, self.loss, self.dup, self.jitter = latency, loss, dup, jitter
        self.store_latency = store_latency
        self.echo = True
        self._q: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self.store = MemStore(self)
        self.gateways: dict[str, Gw] = {}
        self.clients: list[Cl] = []
        self.by_addr: dict[tuple[str, int], tuple[Cl, int]] = {}
        self.injected: list[tuple[tuple[str, int], bytes]] = []  # what reached a non-client addr
        self.uplink_log: list[tuple[tuple[str, int], bytes]] = []  # what clients sent

    def at(self, delay: float, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._q, (self.now + delay, self._seq, fn))

    def gateway(self, name: str, priv: bytes, kek: bytes, **settings: Any) -> Gw:
        gw = Gw(self, name, GatewaySettings(node_id=name, **settings), priv, kek)
        self.gateways[name] = gw
        gw.machine.handle_timer(self.now)
        gw.flush()
        return gw

    def client(self, priv: bytes, gw_pub: bytes, params: ClientParams) -> Cl:
        c = Cl(self, priv, gw_pub, params)
        self.clients.append(c)
        return c

    def add_path(self, c: Cl, path: int, addr: tuple[str, int], gateway: str) -> Path:
        p = c.paths[path] = Path(addr, gateway)
        self.by_addr[addr] = (c, path)
        return p

    def _delays(self) -> list[float]:
        if self.rng.random() < self.loss:
            return []
        n = 2 if self.rng.random() < self.dup else 1
        return [self.latency + self.rng.random() * self.jitter for _ in range(n)]

    def to_gateway(self, p: Path, data: bytes) -> None:
        gw = self.gateways[p.gateway]
        peer = Peer(UDP, p.addr)
        self.uplink_log.append((p.addr, data))
        for d in self._delays():
            self.at(d, lambda: p.up and p.uplink and gw.deliver(data, peer))

    def inject(self, gateway: str, addr: tuple[str, int], data: bytes) -> None:
        """An attacker's datagram from ``addr`` to ``gateway`` (delivered, never lost)."""
        gw = self.gateways[gateway]
        self.at(self.latency, lambda: gw.deliver(data, Peer(UDP, addr)))

    def from_gateway(self, gw: Gw, peer: Peer, data: bytes) -> None:
        dest = self.by_addr.get(peer.addr)
        if dest is None:
            self.injected.append((peer.addr, data))
            return
        c, path = dest
        for d in self._delays():
            def deliver() -> None:
                p = c.paths.get(path)
                if p is not None and p.up and p.downlink and p.gateway == gw.name:
                    c.inbound.append((path, data))
                    c.machine.receive(data, path, self.now)
            self.at(d, deliver)

    def _flush_all(self) -> None:
        for gw in self.gateways.values():
            gw.flush()
        for c in self.clients:
            c.flush()

    def run(self, until: float, max_steps: int = 2_000_000) -> None:
        """Advance to ``until``: events, client timers and gateway timers in time order."""
        for _ in range(max_steps):
            self._flush_all()
            t = until
            if self._q:
                t = min(t, self._q[0][0])
            for c in self.clients:
                ct = c.machine.get_timer()
                if ct is not None:
                    t = min(t, ct)
            for gw in self.gateways.values():
                if not gw.paused:
                    t = min(t, gw.machine.get_timer())
            self.now = max(self.now, t)
            if self.now >= until and not (self._q and self._q[0][0] <= until):
                self._flush_all()
                return
            while self._q and self._q[0][0] <= self.now:
                heapq.heappop(self._q)[2]()
            for c in self.clients:
                ct = c.machine.get_timer()
                if ct is not None and ct <= self.now:
                    c.machine.handle_timer(self.now)
            for gw in self.gateways.values():
                if not gw.paused and gw.machine.get_timer() <= self.now:
                    gw.machine.handle_timer(self.now)
        raise AssertionError(f"run({until}) did not finish in {max_steps} steps")


class GatewayPeer:
    """The real gateway machine and the store model as one synchronous peer, for tests that
    drive a client machine by hand: ``answer(raw, addr, now)`` is what the gateway sends
    back to ``addr`` once every store call it made has been answered."""

    def __init__(self, priv: bytes, kek: bytes, client_pub: bytes, upstream: str,
                 **settings: Any) -> None:
        self.net = Net(store_latency=0.0)
        self.gw = self.net.gateway("gw-test", priv, kek, **settings)
        self.store = self.net.store
        self.store.clients[client_pub.hex()] = ClientPolicy(client_pub, upstreams=(upstream,))
        self.net.run(0.0)  # the first health check: the store clock

    def answer(self, raw: bytes, addr: tuple[str, int], now: float) -> list[bytes]:
        self.net.now = max(self.net.now, now)
        self.gw.machine.receive(raw, Peer(UDP, addr), self.net.now)
        return self._settle(addr, self.net.now)

    def _settle(self, addr: tuple[str, int] | None, now: float) -> list[bytes]:
        m, out = self.gw.machine, []
        for _ in range(1000):
            effects = m.effects()
            if not effects:
                return out
            for e in effects:
                if isinstance(e, StoreCall):
                    m.store_answered(e.call_id, self.store.answer(e.op), now)
                elif isinstance(e, Send) and e.peer.addr == addr:
                    out.append(e.data)
        raise AssertionError("the gateway machine never settled")

    @property
    def sid(self) -> bytes:
        [sid] = self.store.records
        return sid

    @property
    def record(self) -> _Rec:
        return self.store.records[self.sid]

    @property
    def keys(self) -> Any:
        return self.gw.machine._secrets[self.sid].keys

    @property
    def channel(self) -> Any:
        """The gateway's side of the newest binding's AEAD channel (the PENDING one a
        reattach granted, before the client's first packet activates it)."""
        m = self.gw.machine
        return (m.pending.get(self.sid) or m.bindings[self.sid]).channel

    def data(self, payload: bytes) -> bytes:
        return bytes(self.channel.seal(wire.inner_payload(payload)))
