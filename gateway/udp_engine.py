"""The compiled UDP data path, seen from the asyncio adapter (``jvpn_dataplane.GatewayEngine``).

Theory of operation. With the engine on, a Rust thread owns the reading of the gateway's
UDP socket and of every session's upstream socket (batched system calls) and forwards the
plain case itself: DATA carrying a payload, on a binding the machine marked fast, from
its peer, within its lease, passing the replay window and the AEAD; and upstream replies
back, sealed. In UDP-forward mode a payload is a FLOW_PAYLOAD of one of the agent's local
sources, and each flow has its own upstream socket: the machine's first ``ToUpstream`` of a
(session, flow) opens it in the engine (``to_upstream(..., flow)``), which from then on
sends that flow's datagrams to it and seals its replies as FLOW_PAYLOADs of the flow; a
flow without a socket yet goes to the machine, and replies that are not carried come back
with their flow. Everything else arrives here through ``drain`` and goes to the machine
exactly as a datagram from the socket would (``_UdpProtocol.datagram_received``) or as
an upstream reply (``GatewayNode.from_upstream``). Python keeps sending its own answers on
the same socket.

This module decides nothing: it mirrors the machine's bindings into the engine. A binding
is *fast* while the machine forwards its payloads without a decision
(``GatewayMachine.forwards_plainly``: validated, no new address under validation, no
REKEY in flight, a live state, a UDP peer) and its channel is a compiled one (which the
engine and the machine then share: one replay window, one send counter). What the engine
forwarded goes back to the machine as counts (``GatewayMachine.engine_forwarded``).

Behind a balancer the engine reads the client's address from each datagram's prefix as
``gateway.balancer`` does (the node tells it its ``trusted_balancers``): a binding's
peer is the client's address and its ``via`` the balancer's socket, which must both
match, and replies go to the ``via``. What it hands up is the datagram as it came, prefix
and balancer address included, so the adapter reads it exactly as one from the socket.

Keys age: a binding is installed with when its secret was made (store ms) and the engine
is told the node's estimate of the store's clock and the reject-after age. Past it the
engine carries nothing for the binding, in either direction, and hands its packets up:
the machine refuses them (KEYS_EXPIRED) as it would on its own path. The lease is the
machine's own (``GatewayMachine.lease``), held by the engine as one value for the node
(``set_lease``: the store's last answer plus ``lease_s``, and since when the node trusts
the store) and, per binding, when the store
last confirmed it: a binding carries data while the lease holds and it was confirmed
since the node last trusted the store, so the engine stops forwarding on its own when
the store goes silent (fail closed).

Nothing here walks all bindings: the engine is told of one session whenever the machine
may have changed its binding (an item handed up for it, a store answer or a move notice
about it, the machine dropping it: ``CloseUpstream``), and of the node's lease at every
timer tick and store answer (one call, and only when it moved). What the engine
forwarded comes back for the bindings that had traffic only (``take_active``), before
each timer tick, for the machine's silence timers.

L3 sessions are installed with their route (inner addresses and allowed prefixes, in the
engine's form ``CryptokeyRoute``), and the node's L3 plane hands the engine its TUN: the
engine then carries a fast binding's IP packets between the tunnel and the TUN itself,
with the machine's cryptokey routing, and hands up what it does not carry (packets for a
session bound elsewhere, or not fast). Its refusals come back as counters, folded into
the machine's ``tunnel_drops`` and the drop metrics by the node.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import TYPE_CHECKING, Any, cast

from gateway.balancer import PREFIX_LEN, has_prefix_magic
from gateway.udp import UDP_SOCKET_BUFFER, UdpProtocol
from netdev.sender import SocketSender
from session import wire
from session.binding import Binding
from session.gateway import GatewayMachine
from session.reasons import DropReason
from session.tunnel import SessionRoute, TunnelDrop

if TYPE_CHECKING:
    from gateway.node import GatewayNode
    from session.gateway import ToUpstream

log = logging.getLogger("jvpn.gateway")

DRAIN_MAX = 512  # items handed to the machine per loop wake-up
QUEUE_MAX = 16384  # items the engine keeps waiting for the machine before it drops (QUEUE_FULL)


def available() -> bool:
    """Whether the compiled module carries the engine."""
    try:
        import jvpn_dataplane
    except ImportError:
        return False
    # an older build lacks the balancer prefix, the keys' age or the flows: rebuild it
    # (make dataplane)
    return (hasattr(getattr(jvpn_dataplane, "GatewayEngine", None), "set_keys_clock")
            and hasattr(jvpn_dataplane, "MAX_FLOWS"))


class EnginePath:
    """The compiled engine on the node's UDP socket: started and stopped, what it hands up
    taken to the node, and the mirror kept current."""

    def __init__(self, node: GatewayNode) -> None:
        self.node = node
        self.engine: Any = None
        self.mirror: EngineMirror | None = None
        self._udp_proto: UdpProtocol | None = None
        self._sync_all_due = False  # a refresh of the lease is scheduled (sync_soon)

    def start(self, loop: asyncio.AbstractEventLoop, udp: tuple[str, int]
              ) -> tuple[asyncio.DatagramTransport, tuple[str, int]]:
        """Bind the UDP socket and hand it to the engine; what the node sends its answers
        with (on the same socket) and the bound address."""
        import jvpn_dataplane

        node = self.node
        family = socket.AF_INET6 if ":" in udp[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind(udp)
            for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                sock.setsockopt(socket.SOL_SOCKET, opt, UDP_SOCKET_BUFFER)
            self.engine = jvpn_dataplane.GatewayEngine(sock.fileno(), QUEUE_MAX)
            # behind these the engine reads the client's address from each datagram's prefix
            self.engine.set_trusted_balancers(
                [(n.network_address.packed, n.prefixlen) for n in node.trusted.networks])
        except BaseException:
            sock.close()
            raise
        sender = cast(asyncio.DatagramTransport, SocketSender(
            sock, lambda: node.metrics.count_drop(DropReason.QUEUE_FULL, wire.TransportKind.UDP)))
        self._udp_proto = UdpProtocol(node)
        self.mirror = EngineMirror(self.engine, node.machine, jvpn_dataplane.DataChannel)
        loop.add_reader(self.engine.fileno(), self._ready)
        log.info("udp data path: compiled engine (batched system calls on its own thread)")
        return sender, sock.getsockname()[:2]

    def stop(self) -> None:
        if self.engine is None:
            return
        asyncio.get_running_loop().remove_reader(self.engine.fileno())
        self.mirror = None  # nothing reaches the stopped engine any more
        self.engine.stop()

    def _ready(self) -> None:
        """Items the engine handed up: to the machine, as from the socket or an upstream."""
        if self.mirror is None or self._udp_proto is None:
            return
        node = self.node
        touched: set[bytes] = set()
        for kind, a, b in self.engine.drain(DRAIN_MAX):
            if kind == 0:
                self._udp_proto.datagram_received(a, b)
                # a datagram with the magic came from a trusted balancer (the engine drops
                # it from anyone else): the message starts after the prefix
                at = PREFIX_LEN if has_prefix_magic(a) else 0
                if len(a) >= at + wire.HEADER_LEN:
                    touched.add(a[at + 4:at + wire.HEADER_LEN])
            elif kind == 2:  # from the TUN, for no binding the engine carries
                if node.l3 is not None:
                    node.l3.from_tun(a)
            elif kind == 3:  # a reply from one flow's upstream (UDP-forward mode)
                flow, data = b
                node.from_upstream(a, data, flow)
                touched.add(a)
            else:
                node.from_upstream(a, b)
                touched.add(a)
        for sid in touched:
            self.sync(sid)

    def to_upstream(self, e: ToUpstream, target: tuple[str, int]) -> bool:
        """Open the flow's upstream in the engine, which from then on carries the flow both
        ways by itself (one socket per flow; 0: plain PAYLOADs). False: not an installed
        binding (TCP, QUIC), the node's own sockets carry it."""
        if self.mirror is None:
            return False
        self.mirror.sync(e.session_id)
        try:
            self.engine.to_upstream(e.session_id, target, e.data, e.flow)
            return True
        except (OSError, ValueError) as exc:
            if e.session_id not in self.mirror.installed:
                return False
            log.warning("upstream %s:%s unreachable: %s", e.upstream[0], e.upstream[1], exc)
            self.node.metrics.count_drop(DropReason.POLICY, wire.TransportKind.UDP)
            return True

    def close_upstream(self, session_id: bytes) -> None:
        if self.mirror is not None:
            self.engine.close_upstream(session_id)
            self.mirror.sync(session_id)  # the machine dropped the binding: out of the engine

    def pull_active(self) -> None:
        """Bring what the engine forwarded into the bindings (before reading them)."""
        if self.mirror is not None:
            self.mirror.pull_active()

    def answered(self, sid: bytes | None) -> None:
        """A store answer about ``sid`` (None: about no session) went to the machine."""
        if self.mirror is None:
            return
        if sid is not None:
            self.mirror.sync(sid)
        else:
            self.sync_soon()

    def sync_soon(self) -> None:
        """Refresh the node's lease and the engine's counters once the answers of this loop
        iteration are in, not once per answer about no session (the health check, the
        registry, the sweeper): when a client's registry entry goes stale, each of its
        reattaches in flight reads it. (A binding the machine changed is refreshed on its
        own: no answer walks every binding.)"""
        if not self._sync_all_due:
            self._sync_all_due = True
            asyncio.get_running_loop().call_soon(self._sync_due)

    def _sync_due(self) -> None:
        self._sync_all_due = False
        self.sync()

    def sync(self, sid: bytes | None = None) -> None:
        """Refresh the engine: one session's binding and the node's lease; without a session
        (the timer) the lease and the engine's counters. Never a walk of every binding."""
        mirror = self.mirror
        if mirror is None:
            return
        mirror.refresh_lease()
        if sid is not None:
            mirror.sync(sid)
            return
        delta = mirror.counters_delta()
        node = self.node
        m = node.metrics
        m.rx_packets += delta["rx_packets"] - delta["handed_up_datagrams"]  # those: on_message
        m.rx_bytes += delta["rx_bytes"] - delta["handed_up_bytes"]
        m.tx_packets += delta["tx_packets"]
        m.tx_bytes += delta["tx_bytes"]
        for reason, n in drop_reasons(delta):
            m.count_drop(reason, wire.TransportKind.UDP, n)
            if reason in (DropReason.MISSING_PREFIX, DropReason.UNTRUSTED_PREFIX):
                # the engine counts them; which address sent them is not kept per packet
                node.log_prefix_drop(reason, wire.TransportKind.UDP, f"({n} seen by the engine)")
        for why, n in tunnel_drops(delta):
            node.machine.tunnel_dropped(why, wire.TransportKind.UDP, n)
        if node.l3 is not None and delta.get("tun_write_errors"):
            node.l3.counts["tun_write_errors"] += delta["tun_write_errors"]
        m.engine = mirror.totals


class EngineMirror:
    """The machine's bindings, mirrored into the engine."""

    def __init__(self, engine: Any, machine: GatewayMachine, channel_class: type) -> None:
        self.engine = engine
        self.machine = machine
        self.channel_class = channel_class
        # what the engine was last told, by session (and the compiled form of its route)
        self.installed: dict[bytes, tuple[Any, ...]] = {}
        self._counters: dict[str, int] = {}
        self._lease: tuple[float, ...] | None = None  # what the engine was last told
        self._epochs: dict[bytes, int] = {}  # the epoch whose keys the engine holds, by session

    def fast(self, b: Binding) -> bool:
        """Whether the engine may forward ``b``'s payloads without asking the machine: the
        machine says it forwards them plainly, and the engine shares its compiled channel."""
        return self.machine.forwards_plainly(b) and type(b.channel) is self.channel_class

    def refresh_lease(self) -> None:
        """Tell the engine the node's lease and the store's clock (for the keys' age), if
        they moved (one call each for every binding)."""
        m = self.machine
        lease = (*m.lease(), m.health.offset_ms, m.settings.keys_reject_after_s * 1000)
        old = self._lease
        if lease != old:
            if old is None or lease[:2] != old[:2]:
                self.engine.set_lease(*lease[:2])
            if old is None or lease[2:] != old[2:]:
                self.engine.set_keys_clock(*lease[2:])
            self._lease = lease

    def sync(self, sid: bytes) -> None:
        """Tell the engine what the machine now holds for one session."""
        b = self.machine.bindings.get(sid)
        if b is None or b.peer.kind is not wire.TransportKind.UDP:
            if self.installed.pop(sid, None) is not None:
                self.pull(sid)
                self.engine.remove(sid)
                self._held(sid, None)
            return
        if type(b.channel) is not self.channel_class:
            return  # a channel made before the engine: the machine keeps the whole binding
        route = b.secrets.route
        p = b.peer
        state = (b.channel, p.addr, self.fast(b), b.confirmed_at, route, p.via,
                 b.secrets.made_ms)
        old = self.installed.get(sid)
        if old != state:
            compiled = None
            if route is not None:
                compiled = old[7] if old is not None and old[4] is route else compiled_route(route)
            self.engine.install(sid, b.channel, p.addr, state[2], state[3], compiled,
                                via=p.via, keys_made_ms=float(b.secrets.made_ms))
            self.installed[sid] = (*state, compiled)
            self._held(sid, b.epoch)

    def _held(self, sid: bytes, epoch: int | None) -> None:
        """Record what the engine holds for ``sid`` now (``None``: nothing), if it changed."""
        old = self._epochs.get(sid)
        if old == epoch:
            return
        now = time.monotonic()
        if old is not None:
            self.machine.engine_record(False, sid, old, now)
        if epoch is None:
            del self._epochs[sid]
        else:
            self._epochs[sid] = epoch
            self.machine.engine_record(True, sid, epoch, now)

    def pull(self, sid: bytes) -> None:
        """What the engine forwarded for ``sid``, into the machine's binding."""
        stats = self.engine.take_stats(sid)
        if stats is not None:
            self.machine.engine_forwarded(sid, *stats)

    def pull_active(self) -> None:
        """What the engine forwarded, for the bindings that had traffic since the last call."""
        forwarded = self.machine.engine_forwarded
        for sid, rx, tx, last_rx, rx_bytes, tx_bytes in self.engine.take_active():
            forwarded(sid, rx, tx, last_rx, rx_bytes, tx_bytes)

    @property
    def totals(self) -> dict[str, int]:
        """The engine's counters as of the last ``counters_delta``."""
        return self._counters

    def counters_delta(self) -> dict[str, int]:
        """The engine's counters since the last call."""
        now = self.engine.counters()
        delta = {k: v - self._counters.get(k, 0) for k, v in now.items()}
        self._counters = now
        return delta


def compiled_route(route: SessionRoute) -> Any:
    """An L3 session's addresses and prefixes in the engine's form (``CryptokeyRoute``)."""
    import jvpn_dataplane

    inner = route.inner
    return jvpn_dataplane.CryptokeyRoute(
        inner.v4.ip.packed, inner.v6.ip.packed,
        [(n.network_address.packed, n.prefixlen) for n in route.prefixes])


def drop_reasons(delta: dict[str, int]) -> list[tuple[DropReason, int]]:
    """The engine's drops in ``delta``, by reason."""
    out = []
    for key, n in delta.items():
        if key.startswith("drop_") and n:
            out.append((DropReason(int(key[5:])), n))
    return out


def tunnel_drops(delta: dict[str, int]) -> list[tuple[TunnelDrop, int]]:
    """The engine's L3 refusals in ``delta``, by reason (as ``GatewayMachine.tunnel_drops``)."""
    out = []
    for key, n in delta.items():
        if key.startswith("tunnel_drop_") and n:
            out.append((TunnelDrop(int(key[12:])), n))
    return out
