"""The agent: one client session, its successive transports, local forwarding.

Theory of operation. ``ClientSession`` (session/client.py) decides; this class
only performs. After every input (a datagram, a timer, a local payload) it
*pumps*: sends what the machine queued on the right path, acts on the events
(open a new transport on TransportLost, move to the next candidate on a timeout
or POLICY_DENIED, re-handshake after an authenticated TERMINATED) and re-arms
the single timer. Candidates are tried in order: a fresh UDP socket to the
same gateway (new source port: survives NAT rebinding and a blocked port), the
other UDP gateway addresses, then QUIC (UDP to the session port blocked, QUIC passes),
then TCP (UDP blocked), in the order ``transports`` gives. Every decision is logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, cast

from agent import udp_engine
from agent.l3 import L3Interface, L3Settings
from agent.quic import MIN_HANDSHAKE_TIMEOUT_S, QuicPath
from agent.transports import Path, TcpPath, UdpPath
from netdev.netwatch import AddressEvent, AddressWatch
from netdev.sender import SocketSender
from session import wire
from session.client import (
    ClientParams,
    ClientSession,
    HandshakeComplete,
    HandshakeFailed,
    PayloadReceived,
    ReattachAction,
    Reattached,
    ReattachRejected,
    ReattachTimedOut,
    RefusedForGood,
    Rekeyed,
    SecurityNotice,
    SessionTerminated,
    StateChanged,
    TransportLost,
)
from session.reasons import DropReason
from session.records import AGENT_SUMMARY_ACTION, EPOCH_INSTALL_ACTION
from session.states import SessionState

log = logging.getLogger("jvpn.agent")
QUIC_QUICK_TRY_S = 0.3  # a fresh QUIC handshake's time after a path went silent under a probe


@dataclass
class AgentSettings:
    """Everything an agent needs (built from AgentConfig by the CLI)."""

    private_key: bytes
    gateway_public_key: bytes
    gateways: list[tuple[str, int]]
    tcp_gateways: list[tuple[str, int]]
    upstream: str
    local_udp: tuple[str, int] | None = ("127.0.0.1", 0)
    transports: list[str] = field(default_factory=lambda: ["udp", "tcp"])
    params: ClientParams = field(default_factory=ClientParams)
    name: str = "agent"
    l3: L3Settings | None = None  # L3 mode: a TUN interface instead of the local UDP port
    quic_gateways: list[tuple[str, int]] = field(default_factory=list)  # none: no QUIC candidate
    engine: bool = False  # the compiled UDP data path (agent/udp_engine.py), with local_udp
    records_file: str | None = None  # JSONL: each epoch installed, stale-epoch drops apart
    watch_addresses: bool = True  # netlink: a transport whose source address goes is lost at once

    def addresses(self, kind: str) -> list[tuple[str, int]]:
        """The gateway addresses of one transport kind ("udp", "tcp", "quic")."""
        if kind == "udp":
            return self.gateways
        return self.quic_gateways if kind == "quic" else self.tcp_gateways


@dataclass
class JumpRecord:
    at: float
    reason: str
    from_transport: str
    to_transport: str
    latency: float
    outage: float
    version: int
    epoch: int
    node: str


class Agent:
    """Runs one ClientSession over asyncio transports."""

    def __init__(self, settings: AgentSettings,
                 on_payload: Callable[[bytes], None] | None = None) -> None:
        self.settings = settings
        params = settings.params
        if settings.l3 is not None and not params.l3:
            params = replace(params, l3=True)
        self.machine = ClientSession(settings.private_key, settings.gateway_public_key, params)
        self.l3: L3Interface | None = None
        if settings.l3 is not None:
            kinds = [wire.TransportKind[t.upper()] for t in settings.transports]
            self.l3 = L3Interface(settings.l3, kinds)
        self.paths: dict[int, Path] = {}
        self._next_path = 1
        self._timer: asyncio.Handle | None = None
        self._timer_at = 0.0  # when self._timer fires
        self._loop: asyncio.AbstractEventLoop | None = None
        self._local: asyncio.DatagramTransport | None = None
        # UDP-forward mode: one flow per local source address (replies kept apart); the
        # least recently used flow id is reused when all are taken
        self._flow_of: OrderedDict[tuple[str, int], int] = OrderedDict()
        self._addr_of: dict[int, tuple[str, int]] = {}
        self._on_payload = on_payload
        self._candidates: list[tuple[str, tuple[str, int]]] = self._candidate_list()
        self._cursor = 0
        self._opening = False
        self.jumps: list[JumpRecord] = []
        self.log_lines: list[str] = []
        self.connected = asyncio.Event()
        self.finished = asyncio.Event()  # the agent cannot go on (refused for good): exit
        self.ever_attached = False
        self.terminated_sessions = 0
        self.handshakes = 0
        self._stopped = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._path_desc: dict[int, str] = {}
        self.engine: Any = None
        self._channel_class: Any = None
        self._engine_state: tuple[Any, ...] | None = None  # what the engine was last told
        self._engine_poller: asyncio.TimerHandle | None = None  # see _engine_poll
        self._route = 0  # the route hint of the next reattach (wire.ROUTE_MAX)
        self._watch: AddressWatch | None = None
        self._records: Any = None  # the open records file, if any (line-buffered)
        if settings.records_file:
            self._records = open(settings.records_file, "a", buffering=1)  # noqa: SIM115

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Open the local port (if any) and start the handshake."""
        self._loop = asyncio.get_running_loop()
        if self.l3 is not None:
            # netlink: pyroute2 runs its own loop; offloads only for the engine
            offload = self.settings.engine and self.l3.settings.offload
            await asyncio.to_thread(self.l3.open, offload)
            self._log(f"L3: TUN offloads {self.l3.offloads_said(self.settings.engine)}")
            if self.settings.engine:
                assert self.l3.tun is not None
                self._start_engine(self._loop, tun=self.l3.tun.fd)  # it reads the TUN
            else:
                self.l3.attach(self._loop, self._tun_packet)
        if self.settings.watch_addresses:
            ignore = [self.settings.l3.tun_name] if self.settings.l3 is not None else []
            watch = AddressWatch(self._address_event, ignore)
            if watch.start(self._loop):
                self._watch = watch
        if self.settings.local_udp is not None and self.settings.engine and self.engine is None:
            self._start_engine(self._loop, self.settings.local_udp)
        elif self.settings.local_udp is not None:
            self._local, _ = await self._loop.create_datagram_endpoint(
                lambda: _LocalProtocol(self), local_addr=self.settings.local_udp)
        await self._connect()

    async def wait_connected(self, timeout: float = 10.0) -> None:
        await asyncio.wait_for(self.connected.wait(), timeout)

    async def stop(self, close_session: bool = True) -> None:
        """Close the session (authenticated CLOSE) and every socket."""
        self._stopped = True
        if close_session and self.machine.attached:
            self.machine.close(self._now())
            self._pump()
        if self._timer is not None:
            self._timer.cancel()
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
        for t in list(self._tasks):
            t.cancel()
        for p in list(self.paths.values()):
            p.close()
        self.paths.clear()
        if self._engine_poller is not None:
            self._engine_poller.cancel()
            self._engine_poller = None
        if self.engine is not None:
            assert self._loop is not None
            self._loop.remove_reader(self.engine.fileno())
            self.engine.stop()
        if self._local is not None:
            self._local.close()
        if self.l3 is not None:
            if self.l3.tun is not None:
                self.l3.tun.detach()
            await asyncio.to_thread(self.l3.close)
        if self._records is not None:
            drops = {r.name: n for r, n in self.machine.drops.items()}
            self._record(AGENT_SUMMARY_ACTION, drops=drops, handshakes=self.handshakes,
                         reattaches=len(self.jumps))
            self._records.close()
            self._records = None

    def _record(self, action: str, **fields: object) -> None:
        """One line of the agent's records (the document shape the gateways' events have)."""
        if self._records is None:
            return
        m = self.machine
        doc = {"@timestamp": time.time(), "service": {"name": "jumping-vpn-agent",
                                                     "node": {"name": self.settings.name}},
               "event": {"action": action},
               "jvpn": {"session_id": m.session_id.hex(), "state_version": m.version,
                        "epoch": m.epoch, "node": m.node_id.decode(errors="replace"),
                        "stale_epoch_drops": m.drops.get(DropReason.STALE_EPOCH, 0),
                        **fields}}
        try:
            self._records.write(json.dumps(doc, separators=(",", ":")) + "\n")
        except (OSError, ValueError) as exc:
            log.warning("[%s] agent records: %s", self.settings.name, exc)

    @property
    def local_address(self) -> tuple[str, int] | None:
        if self._local is None:
            return None
        return self._local.get_extra_info("sockname")[:2]

    def status(self) -> dict[str, object]:
        st = self.machine.status()
        path = self.paths.get(self.machine.path or -1)
        st["transport"] = path.describe() if path is not None else "-"
        st["name"] = self.settings.name
        st["jumps"] = len(self.jumps)
        return st

    def status_line(self) -> str:
        s = self.status()
        rtt = "-" if s["rtt_ms"] is None else f"{s['rtt_ms']:.1f}ms"
        return (f"{s['name']}: {s['state']} v{s['version']} epoch {s['epoch']} via {s['transport']}"
                f" node {s['node']} rtt {rtt} loss {s['loss_pct']}% jumps {s['jumps']}")

    # ---- inputs --------------------------------------------------------------------------

    def send(self, payload: bytes) -> bool:
        """Tunnel one datagram to the upstream."""
        ok = self.machine.send(payload, self._now())
        self._pump()
        return ok

    async def jump(self, kind: str = "udp", reason: str = "jump",
                   remote: tuple[str, int] | None = None) -> None:
        """Move the session to a fresh transport on purpose (new source port, UDP->TCP, node)."""
        if not self.machine.attached:
            return
        if remote is None:
            remote = self.settings.addresses(kind)[0]
        path = await self._open_path(kind, remote)
        if path is None:
            return
        self.machine.reattach(self._now(), path.path_id, path.kind, reason=reason)
        self._pump()

    def kill_transport(self) -> None:
        """Close the current transport silently (the machine must notice by itself)."""
        path = self.paths.pop(self.machine.path or -1, None)
        if path is not None:
            path._on_failed = lambda *_: None  # silent: no socket-error shortcut
            path.close()

    # ---- machinery -----------------------------------------------------------------------

    def _now(self) -> float:
        return self._loop.time() if self._loop is not None else time.monotonic()

    def _candidate_list(self) -> list[tuple[str, tuple[str, int]]]:
        out: list[tuple[str, tuple[str, int]]] = []
        for kind in self.settings.transports:
            out.extend((kind, a) for a in self.settings.addresses(kind))
        return out

    async def _open_path(self, kind: str, remote: tuple[str, int],
                         quick: bool = False) -> Path | None:
        """Open one transport; ``quick``: a QUIC handshake gets QUIC_QUICK_TRY_S only (the
        previous path went silent under a probe: QUIC is likely blocked, and the next
        kind should not wait a full handshake timeout)."""
        pid = self._next_path
        self._next_path += 1
        mark = self.l3.mark if self.l3 is not None else 0
        path: Path
        if kind == "udp" and self.engine is not None:
            path = udp_engine.EngineUdpPath(pid, remote, self._on_receive, self._on_failed,
                                            self.engine, mark)
        else:
            path = _PATHS[kind](pid, remote, self._on_receive, self._on_failed, mark)
        try:
            if isinstance(path, QuicPath):  # a QUIC handshake gets the session handshake's time
                await path.open(QUIC_QUICK_TRY_S if quick else max(
                    MIN_HANDSHAKE_TIMEOUT_S, self.settings.params.handshake_timeout))
            else:
                await path.open()
        except (OSError, TimeoutError) as exc:
            self._log(f"cannot open {kind} path to {remote[0]}:{remote[1]}: {exc}")
            return None
        self.paths[pid] = path
        self._path_desc[pid] = path.describe()
        return path

    async def _connect(self) -> None:
        """Handshake on the current candidate (a new session)."""
        kind, remote = self._candidates[self._cursor % len(self._candidates)]
        path = await self._open_path(kind, remote)
        if path is None:
            self._cursor += 1
            self._later(self.settings.params.backoff_initial, self._connect)
            return
        self.handshakes += 1
        self.machine.connect(self._now(), int(time.time() * 1000), path.path_id, path.kind)
        self._pump()

    async def _recover(self, advance: bool) -> None:
        """Open the next candidate transport and send a reattach on it."""
        if self._opening or self._stopped or self.machine.state is not SessionState.RECOVERING:
            return
        self._opening = True
        try:
            if advance:
                self._cursor += 1
            quick = self.machine.lost_to_probe
            for _ in range(len(self._candidates)):
                kind, remote = self._candidates[self._cursor % len(self._candidates)]
                path = await self._open_path(kind, remote, quick)
                if path is not None:
                    break
                self._cursor += 1
            else:
                self._later(self.settings.params.backoff_initial, lambda: self._recover(False))
                return
            if self.machine.state is SessionState.RECOVERING:
                self.machine.reattach(self._now(), path.path_id, path.kind, reason="recover",
                                      route=self._route)
                self._pump()
        finally:
            self._opening = False

    def _later(self, delay: float, fn: Callable[[], object]) -> None:
        async def run() -> None:
            await asyncio.sleep(delay)
            if not self._stopped:
                res = fn()
                if asyncio.iscoroutine(res):
                    await res
        self._task(run())

    def _task(self, coro) -> None:  # type: ignore[no-untyped-def]
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def _on_receive(self, path_id: int, data: bytes) -> None:
        self.machine.receive(data, path_id, self._now())
        self._pump()

    def _on_failed(self, path_id: int, reason: str) -> None:
        self.paths.pop(path_id, None)
        if self._stopped:
            return
        self.machine.transport_failed(self._now(), path_id, reason)
        self._pump()

    def _address_event(self, ev: AddressEvent) -> None:
        """The host's addresses changed (netlink). The current transport's source address
        gone: that path is dead now, not after its keepalives go unanswered. An address
        added while recovering: try again at once (a replaced address comes back)."""
        if self._stopped:
            return
        m = self.machine
        path = self.paths.get(m.path or -1)
        if (not ev.added and m.attached and path is not None and path.local is not None
                and path.local[0] == ev.address):
            self._log(f"local address {ev.address} removed under {path.describe()}")
            self._on_failed(path.path_id, f"local address {ev.address} removed")
        elif ev.added and m.state is SessionState.RECOVERING and not self._opening:
            self._task(self._recover(advance=False))

    def _on_timer(self) -> None:
        self._timer = None
        self.machine.handle_timer(self._now())
        self._pump()

    def _pump(self) -> None:
        m = self.machine
        for path_id, data in m.datagrams_to_send():
            path = self.paths.get(path_id)
            if path is not None:
                path.send(data)
        while (ev := m.next_event()) is not None:
            self._handle_event(ev)
        if self._stopped:
            return
        if self.engine is not None:
            self._engine_sync()
        # Re-arm only for an earlier deadline: a timer that fires early is harmless
        # (handle_timer acts only on what is due, and the pump re-arms), while
        # cancel + call_at on every datagram is not. (uvloop's call_at for a past
        # time returns a plain Handle, with no when(): keep our own copy.)
        when = m.get_timer()
        if when is not None and self._loop is not None and (
                self._timer is None or when < self._timer_at):
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = when
            self._timer = self._loop.call_at(when, self._on_timer)

    def _handle_event(self, ev: object) -> None:
        m = self.machine
        if isinstance(ev, PayloadReceived):
            if self.l3 is not None:
                self.l3.write(ev.data)
            if self._on_payload is not None:
                self._on_payload(ev.data)
            addr = self._addr_of.get(ev.flow)
            if self._local is not None and addr is not None:
                self._local.sendto(ev.data, addr)
        elif isinstance(ev, HandshakeComplete):
            self._record(EPOCH_INSTALL_ACTION, reason="handshake")
            self._close_others(ev.path)
            if self.l3 is not None and ev.inner is not None:
                self._task(self._l3_up(ev))  # connected once the interface is configured
            else:
                self.connected.set()
            self.ever_attached = True
            self._log(f"session {ev.session_id.hex()[:12]} up: v{ev.version} epoch {ev.epoch} "
                      f"node {ev.node_id.decode(errors='replace')} via {self._desc(ev.path)}")
        elif isinstance(ev, HandshakeFailed):
            reason = ev.reason.name if ev.reason else "no answer"
            self._drop_path(ev.path)
            if m.refused is not None:
                return  # RefusedForGood follows
            self._log(f"handshake failed on {self._desc(ev.path)}: {reason}"
                      f"{' (authenticated)' if ev.authenticated else ''}; trying the next transport"
                      f" in {ev.retry_in:.1f} s")
            self._cursor += 1
            self._later(ev.retry_in, self._connect)
        elif isinstance(ev, RefusedForGood):
            self._log(f"refused for good: {ev.reason.name} ({ev.attempts} authenticated refusals "
                      f"in a row): {ev.advice}")
            self.finished.set()
        elif isinstance(ev, StateChanged):
            self._log(f"state {ev.old.name} -> {ev.new.name} (v{ev.version}): {ev.reason}")
        elif isinstance(ev, TransportLost):
            self._log(f"transport lost on {self._desc(ev.path)}: {ev.reason}; reattaching")
            self._drop_path(ev.path)
            # First try a fresh socket of the same kind and address, then move on.
            self._task(self._recover(advance=False))
        elif isinstance(ev, Reattached):
            old = self._desc(ev.old_path) if ev.old_path is not None else "-"
            new = self._desc(ev.path)
            self._route = 0
            self._record(EPOCH_INSTALL_ACTION, reason=ev.reason)
            self.jumps.append(JumpRecord(self._now(), ev.reason, old, new, ev.latency, ev.outage,
                                         ev.version, ev.epoch, ev.node_id.decode(errors="replace")))
            outage = f", outage {ev.outage * 1000:.0f} ms" if ev.outage else ""
            self._log(f"reattached ({ev.reason}) {old} => {new} in {ev.latency * 1000:.1f} ms{outage}: "
                      f"v{ev.version} epoch {ev.epoch} node {ev.node_id.decode(errors='replace')}")
            self._close_others(ev.path)
        elif isinstance(ev, ReattachRejected):
            auth = "authenticated" if ev.authenticated else "unauthenticated"
            self._log(f"reattach rejected: {ev.reason.name} ({auth}); action: {ev.action}")
            if ev.action is ReattachAction.NEXT_TRANSPORT:
                self._drop_path(ev.path)
        elif isinstance(ev, ReattachTimedOut):
            # Behind a balancer the next request carries the next route hint: it reaches
            # another node if the usual one does not answer (paused, overloaded, dead). Not
            # when UDP goes unanswered: UDP is likely blocked, not the node, and the next
            # kind is tried on the usual node first (nginx's TCP proxy skips a dead node by
            # itself; a move would cost a NAT-egress session its connections).
            udp = self._desc(ev.path).startswith("udp")
            if not udp or all(kind == "udp" for kind, _ in self._candidates):
                self._route = self._route % wire.ROUTE_MAX + 1
            self._log(f"no answer to reattach on {self._desc(ev.path)}; next transport "
                      f"(route {self._route})")
            if not (m.attached and ev.path == m.path):  # a rebind on the live path keeps it
                self._drop_path(ev.path)
            if udp:  # a fresh UDP socket got no answer: UDP is likely blocked, so the next
                # candidate of another kind (QUIC or TCP, in the configured order) comes next
                self._cursor = self._next_not("udp") - 1  # _recover advances onto it
            if m.state is SessionState.RECOVERING:
                self._task(self._recover(advance=True))
        elif isinstance(ev, SessionTerminated):
            self.terminated_sessions += 1
            self.connected.clear()
            self._log(f"session terminated ({ev.reason}); "
                      f"{'re-handshaking' if ev.authenticated and not self._stopped else 'stopping'}")
            if ev.authenticated and not self._stopped and m.refused is None:
                for p in list(self.paths.values()):
                    p.close()
                self.paths.clear()
                self._later(self.settings.params.backoff_initial, self._connect)
        elif isinstance(ev, Rekeyed):  # a new binding (epoch) on the same node, new keys
            self._record(EPOCH_INSTALL_ACTION, reason="rekey")
        elif isinstance(ev, SecurityNotice):
            self._log(f"SECURITY: {ev.kind}: {ev.detail}")

    async def _l3_up(self, ev: HandshakeComplete) -> None:
        l3 = self.l3
        assert l3 is not None and ev.inner is not None
        try:
            changed = await asyncio.to_thread(l3.session_up, ev.inner, ev.routes)
        except Exception as exc:  # a bad route, a clash with the host's own configuration
            self._log(f"L3: cannot configure {l3.settings.tun_name}: {exc!r}")
            return
        if changed:
            self._log(f"L3: {l3.settings.tun_name} mtu {l3.mtu} {ev.inner.text()} "
                      f"routes {','.join(ev.routes) or '-'}")
        self.connected.set()

    def _tun_packet(self, packet: bytes) -> None:
        if len(packet) <= wire.MAX_PAYLOAD_SIZE:  # the TUN's MTU is below it
            self.send(packet)

    def _next_not(self, kind: str) -> int:
        """The cursor of the next candidate not of ``kind`` after the current one (the next
        one if every candidate is of ``kind``)."""
        n = len(self._candidates)
        for step in range(1, n + 1):
            if self._candidates[(self._cursor + step) % n][0] != kind:
                return self._cursor + step
        return self._cursor + 1

    def _close_others(self, keep: int) -> None:
        for pid in [p for p in self.paths if p != keep]:
            self._drop_path(pid)

    def _drop_path(self, pid: int) -> None:
        p = self.paths.pop(pid, None)
        if p is not None:
            p._on_failed = lambda *_: None
            p.close()

    def _desc(self, pid: int | None) -> str:
        return self._path_desc.get(pid if pid is not None else -1, f"path {pid}")

    def _log(self, line: str) -> None:
        self.log_lines.append(line)
        if len(self.log_lines) > 1000:
            del self.log_lines[:500]
        log.info("[%s] %s", self.settings.name, line)

    # ---- the compiled UDP data path (agent/udp_engine.py) -----------------------------------

    def _start_engine(self, loop: asyncio.AbstractEventLoop, local: tuple[str, int] | None = None,
                      tun: int | None = None) -> None:
        """The engine on the local UDP port ``local``, or on the L3 interface's TUN ``tun``."""
        import jvpn_dataplane

        self._channel_class = jvpn_dataplane.DataChannel
        if tun is not None:
            self.engine = jvpn_dataplane.AgentEngine(tun, udp_engine.QUEUE_MAX, tun=True)
            loop.add_reader(self.engine.fileno(), self._engine_ready)
            self._engine_poller = loop.call_later(self._engine_poll_s(), self._engine_poll)
            self._log("L3 data path: compiled engine (the TUN and the UDP paths on its own "
                      "thread)")
            return
        assert local is not None
        family = socket.AF_INET6 if ":" in local[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind(local)
            self.engine = jvpn_dataplane.AgentEngine(sock.fileno(), udp_engine.QUEUE_MAX)
        except BaseException:
            sock.close()
            raise
        self._channel_class = jvpn_dataplane.DataChannel
        self._local = cast(asyncio.DatagramTransport, SocketSender(sock))
        loop.add_reader(self.engine.fileno(), self._engine_ready)
        self._log("udp data path: compiled engine (batched system calls on its own thread)")

    def _engine_ready(self) -> None:
        """What the engine handed up: to the machine, as from the sockets."""
        for kind, a, b in self.engine.drain(udp_engine.DRAIN_MAX):
            if self._stopped:
                return
            if kind == 0:
                if len(a) <= wire.MAX_PAYLOAD_SIZE:
                    self.local_received(a, b)
            elif kind == 2:
                self._tun_packet(a)
            elif a in self.paths:
                if udp_engine.is_notice(b):  # a hint may echo a packet the engine sealed
                    self.machine.sealed_elsewhere(self.engine.recent_tags())
                self._on_receive(a, b)

    def _engine_poll_s(self) -> float:
        """How often the machine hears what the engine carried: a few times per silence-probe
        period (the probe's grace), else twice per keepalive interval. Not per packet."""
        p = self.settings.params
        return max(0.01, p.probe_silence / 4) if p.probe_silence > 0 else p.keepalive_interval / 2

    def _engine_poll(self) -> None:
        """What the engine sent and heard by itself, to the machine's silence probe."""
        self._engine_poller = None
        if self._stopped or self.engine is None or self._loop is None:
            return
        try:
            sent, heard = self.engine.take_activity()
        except RuntimeError:
            return  # stopped meanwhile
        if sent is not None or heard is not None:
            self.machine.engine_activity(sent, heard)
            self._pump()
        self._engine_poller = self._loop.call_later(self._engine_poll_s(), self._engine_poll)

    def _engine_sync(self) -> None:
        """Tell the engine the machine's current path and channel, and whether it is fast."""
        m = self.machine
        ch = m.channel
        path = self.paths.get(m.path) if m.path is not None else None
        # L3 packets travel as plain PAYLOADs, UDP-forward mode's datagrams as flows (one per
        # local source, FLOW_PAYLOAD, the ids the agent gave: local_received): both carried
        fast = (m.attached and isinstance(path, udp_engine.EngineUdpPath)
                and type(ch) is self._channel_class)
        state = (m.path, ch, fast, m.keys_until)
        if state != self._engine_state:
            self._engine_state = state
            if isinstance(path, udp_engine.EngineUdpPath) and ch is not None \
                    and type(ch) is self._channel_class:
                self.engine.set_current(m.path, ch, fast, m.keys_until)
            else:
                self.engine.set_current(None, None, False)

    def local_received(self, data: bytes, addr: tuple[str, int]) -> None:
        """A datagram from a local program: tunnelled as its own flow."""
        flow = self._flow_of.get(addr)
        if flow is None:
            if len(self._flow_of) < wire.MAX_FLOWS:
                flow = len(self._flow_of) + 1
            else:  # every id taken: the least recently heard source gives its id up
                if self.engine is not None:  # the engine heard the sources it carried
                    self._order_flows(self.engine.flow_times())
                old, flow = self._flow_of.popitem(last=False)
            self._flow_of[addr] = flow
            self._addr_of[flow] = addr
            if self.engine is not None:
                self.engine.set_flow(flow, addr)  # it carries this source from now on
        else:
            self._flow_of.move_to_end(addr)
        self.machine.send(data, self._now(), flow)
        self._pump()

    def _order_flows(self, times: list[tuple[int, float]]) -> None:
        """The flows least recently heard first, by when the engine last read each source
        (every local datagram passes through it, carried or handed up)."""
        for flow, _ in sorted(times, key=lambda t: t[1]):
            addr = self._addr_of.get(flow)
            if addr is not None and self._flow_of.get(addr) == flow:
                self._flow_of.move_to_end(addr)


_PATHS: dict[str, type[UdpPath] | type[TcpPath] | type[QuicPath]] = {
    "udp": UdpPath, "tcp": TcpPath, "quic": QuicPath}


class _LocalProtocol(asyncio.DatagramProtocol):
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) <= wire.MAX_PAYLOAD_SIZE:
            self.agent.local_received(data, addr)
