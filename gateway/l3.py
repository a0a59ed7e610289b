"""A node's L3 plane: its TUN interface, egress (NAT or routed), and the node-to-node relay.

Theory of operation. The machine decides (``session.tunnel``: cryptokey routing); this
module moves packets. Checked uplink packets (``ToTun``) are written to the node's TUN;
the kernel forwards them. Everything the kernel routes into the TUN (the pools are the
TUN's connected prefixes, the gateways' own inner addresses on it) goes to
``GatewayMachine.tun_received``, which tunnels it to the owning session if it is bound
here, or reports it ``NotLocal``.

Egress, per node (docs/L3.md says what each guarantees):

- ``nat``: an nftables masquerade for the pools out of every interface but the TUN,
  loaded as one ruleset (``nft -f``, atomic) and removed at stop. Return traffic comes
  back to the node that sent it; a packet for a session bound elsewhere is dropped.
- ``routed``: the pools are routed, once, to the cluster's return addresses (``vip``,
  and ``vip6`` for the IPv6 pool). One node at a time holds them, by a lease in the
  store (``store/lua/lead.lua``): the holder puts them on its TUN (so they vanish if
  the process dies), announces them (gratuitous ARP; an unsolicited neighbour
  advertisement) and answers neighbour solicitations for the IPv6 one from a socket
  that also dies with the process; the others take over when the lease lapses.
  Whatever reaches a node for a session bound elsewhere is relayed, MAC'd under a
  KEK-derived key and replay-protected (``RelayCodec``), over UDP to the node that
  holds the binding now: found in the store (pool index -> session -> its record's
  node -> that node's announced relay address), cached briefly.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import secrets
import socket
import struct
import subprocess
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from netdev.netconf import NetConfig
from netdev.tun import TunDevice
from session.gateway import NotLocal, ToTun
from session.inner import InnerPool
from session.reasons import DropReason
from session.replay import ReplayWindow
from session.wire import TransportKind

if TYPE_CHECKING:
    from gateway.node import GatewayNode

log = logging.getLogger("jvpn.gateway.l3")

RELAY_TAG_LEN = 16
OWNER_CACHE_S = 0.5  # how long a node trusts what the store said about an owner
OWNER_CACHE_MAX = 65536
PENDING_PER_INDEX = 32  # packets held while the owner is looked up
PENDING_INDEXES = 1024
FORWARDING = ("/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding")
GARP_REPEAT = 3
NFT_TIMEOUT_S = 10.0


class L3Error(RuntimeError):
    """The L3 plane could not be set up (no TUN, no nft, a bad interface)."""


@dataclass(frozen=True)
class L3Config:
    tun_name: str
    mtu: int
    pool: InnerPool
    egress: str = "nat"  # "nat" | "routed"
    egress_interface: str = ""
    relay_listen: tuple[str, int] | None = None
    relay_advertise: str = ""  # "host:port" other nodes send to ('' = relay_listen)
    vip: str = ""  # routed: the cluster's return address (IPv4)
    vip6: str = ""  # routed: its IPv6 return address (held with ``vip``; '' = none)
    vip_interface: str = ""  # where the holder announces it
    lease_s: float = 1.0


def relay_tag(key: bytes, packet: bytes) -> bytes:
    return hmac.new(key, packet, hashlib.blake2s).digest()[:RELAY_TAG_LEN]


RELAY_HEAD = struct.Struct("!8sQQ")  # sender id, counter, sender's wall clock (ms)
RELAY_OVERHEAD = RELAY_TAG_LEN + RELAY_HEAD.size
RELAY_MAX_AGE_MS = 2000  # a relayed packet older than this (or from the future) is refused
RELAY_SENDERS_MAX = 256  # replay windows kept (one per sending node process)


class RelayCodec:
    """The node-to-node relay datagram, MAC'd and replay-protected.

    ``tag(16) | sender id(8) | counter u64 | sent at, wall ms u64 | packet``; the tag is
    a MAC over everything after it under a KEK-derived key. Each node process picks a
    random sender id at start and counts up. The receiver keeps one replay window
    (``session.replay``, 4096 counters, RFC 6479) per sender and refuses a packet sent
    more than ``RELAY_MAX_AGE_MS`` before (or after) its own clock, or before it started.
    The age bound is what lets the windows be bounded: a sender's window is forgotten
    only once it has been idle longer than the bound, so whatever it accepted is too old
    by then to be accepted again; a receiver that restarted refuses everything sent
    before its start. The nodes' clocks are kept close (the reattach proof's timestamp
    needs it too)."""

    def __init__(self, key: bytes, wall_ms: Callable[[], int], sender: bytes | None = None
                 ) -> None:
        self.key = key
        self.wall_ms = wall_ms
        self.sender = sender if sender is not None else secrets.token_bytes(8)
        self.started_ms = wall_ms()
        self._counter = 0
        self._windows: OrderedDict[bytes, tuple[ReplayWindow, int]] = OrderedDict()

    def seal(self, packet: bytes) -> bytes:
        self._counter += 1
        body = RELAY_HEAD.pack(self.sender, self._counter, self.wall_ms()) + packet
        return relay_tag(self.key, body) + body

    def open(self, data: bytes) -> tuple[bytes | None, str]:
        """(the packet, "") or (None, why: "bad_tag" | "replayed" | "too_old" | "busy")."""
        if len(data) <= RELAY_OVERHEAD:
            return None, "bad_tag"
        tag, body = data[:RELAY_TAG_LEN], data[RELAY_TAG_LEN:]
        if not hmac.compare_digest(tag, relay_tag(self.key, body)):
            return None, "bad_tag"
        sender, counter, sent_ms = RELAY_HEAD.unpack_from(body)
        now = self.wall_ms()
        if abs(now - sent_ms) > RELAY_MAX_AGE_MS or sent_ms < self.started_ms:
            return None, "too_old"
        entry = self._windows.get(sender)
        if entry is None:
            while self._windows:  # forget windows idle past the age bound (oldest first)
                _, (_, seen) = next(iter(self._windows.items()))
                if now - seen <= RELAY_MAX_AGE_MS:
                    break
                self._windows.popitem(last=False)
            if len(self._windows) >= RELAY_SENDERS_MAX:
                return None, "busy"
            entry = (ReplayWindow(), now)
        window = entry[0]
        if not window.update(counter):
            return None, "replayed"
        self._windows[sender] = (window, now)
        self._windows.move_to_end(sender)
        return body[RELAY_HEAD.size:], ""


def nat_ruleset(table: str, cfg: L3Config, delete_first: bool) -> str:
    """The masquerade ruleset, loaded atomically by one ``nft -f``."""
    out = f'"{cfg.egress_interface}"' if cfg.egress_interface else f'!= "{cfg.tun_name}"'
    head = f"table inet {table}\ndelete table inet {table}\n" if delete_first else ""
    return (f"{head}table inet {table} {{\n"
            f"  chain postrouting {{\n"
            f"    type nat hook postrouting priority srcnat; policy accept;\n"
            f"    ip saddr {cfg.pool.v4} oifname {out} masquerade\n"
            f"    ip6 saddr {cfg.pool.v6} oifname {out} masquerade\n"
            f"  }}\n}}\n")


def _nft(script: str) -> None:
    try:
        done = subprocess.run(["nft", "-f", "-"], input=script.encode(), capture_output=True,
                              timeout=NFT_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise L3Error(f"nft: {exc}") from None
    if done.returncode != 0:
        raise L3Error(f"nft -f failed: {done.stderr.decode(errors='replace').strip()}")


def _sysctl(path: str, value: str) -> str:
    """Set a /proc/sys value (this network namespace's); returns the previous one."""
    with open(path) as f:
        old = f.read().strip()
    if old != value:
        with open(path, "w") as f:
            f.write(value)
    return old


def gratuitous_arp(ifname: str, address: str) -> None:
    """Announce that ``address`` is now at this interface's MAC (an ARP request for itself,
    broadcast): neighbours update the entry they hold."""
    ip = ipaddress.IPv4Address(address).packed
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind((ifname, 0))
        mac = s.getsockname()[4]
        eth = b"\xff" * 6 + mac + struct.pack("!H", 0x0806)
        arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + ip + b"\x00" * 6 + ip
        s.send(eth + arp)


ICMP6_NS, ICMP6_NA = 135, 136
ICMP6_FILTER = 1  # <netinet/icmp6.h>, level IPPROTO_ICMPV6
NA_ROUTER, NA_SOLICITED, NA_OVERRIDE = 0x80000000, 0x40000000, 0x20000000
ALL_NODES = "ff02::1"


def neighbor_advertisement(target: bytes, mac: bytes, solicited: bool) -> bytes:
    """An ICMPv6 NA for ``target`` at ``mac`` (RFC 4861 4.4; the kernel fills the checksum),
    override set: neighbours replace the entry they hold."""
    flags = NA_ROUTER | NA_OVERRIDE | (NA_SOLICITED if solicited else 0)
    return struct.pack("!BBHI16sBB6s", ICMP6_NA, 0, 0, flags, target, 2, 1, mac)


class NeighborResponder:
    """Answers neighbour solicitations for one IPv6 address on one interface while it is open
    (IPv6's gratuitous ARP and ARP reply: Linux answers solicitations only for the addresses
    of the receiving interface, and the return address lives on the TUN so that it vanishes
    with the process; this socket vanishes with it too)."""

    def __init__(self, ifname: str, address: str) -> None:
        self.target = ipaddress.IPv6Address(address).packed
        with open(f"/sys/class/net/{ifname}/address") as f:
            self.mac = bytes.fromhex(f.read().strip().replace(":", ""))
        index = socket.if_nametoindex(ifname)
        s = self.sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 255)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
            solicited_node = ipaddress.IPv6Address("ff02::1:ff00:0").packed[:13] + self.target[13:]
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP,
                         solicited_node + struct.pack("@I", index))
            words = [0xFFFFFFFF] * 8  # a set bit blocks its type: pass only solicitations
            words[ICMP6_NS >> 5] &= ~(1 << (ICMP6_NS & 31))
            s.setsockopt(socket.IPPROTO_ICMPV6, ICMP6_FILTER, struct.pack("@8I", *words))
            s.setblocking(False)
        except BaseException:
            s.close()
            raise
        self.answered = 0

    def announce(self) -> None:
        """An unsolicited advertisement to all nodes (after taking the address over)."""
        self.sock.sendto(neighbor_advertisement(self.target, self.mac, False), (ALL_NODES, 0))

    def readable(self) -> None:
        for _ in range(64):  # bounded per wake-up
            try:
                data, addr = self.sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("neighbour solicitation socket: %s", exc)
                return
            if len(data) < 24 or data[0] != ICMP6_NS or data[8:24] != self.target:
                continue
            src = addr[0].split("%", 1)[0]
            dad = src == "::"  # a duplicate address probe: answer to all nodes, unsolicited
            try:
                self.sock.sendto(neighbor_advertisement(self.target, self.mac, not dad),
                                 (ALL_NODES if dad else src, 0, 0, addr[3] if len(addr) > 3 else 0))
                self.answered += 1
            except OSError as exc:
                log.debug("neighbour advertisement to %s: %s", src, exc)

    def close(self) -> None:
        self.sock.close()


class _RelayProtocol(asyncio.DatagramProtocol):
    def __init__(self, plane: L3Plane) -> None:
        self.plane = plane

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.plane.relay_received(data)


class L3Plane:
    """The node's TUN, egress and relay (see the module's theory of operation)."""

    def __init__(self, node: GatewayNode, cfg: L3Config, relay_key: bytes,
                 clock: Callable[[], float] = time.monotonic,
                 wall_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000) -> None:
        self.node = node
        self.cfg = cfg
        self.codec = RelayCodec(relay_key, wall_ms)
        self.clock = clock
        self.tun: TunDevice | None = None
        self._net: NetConfig | None = None
        self._vip_net: NetConfig | None = None
        self._forwarding: list[tuple[str, str]] = []
        self._nft_table = f"jvpn_{cfg.tun_name}".replace("-", "_")
        self._nat = False
        self._relay: asyncio.DatagramTransport | None = None
        self._owners: OrderedDict[int, tuple[float, tuple[str, int] | None]] = OrderedDict()
        self._index_of: OrderedDict[bytes, int] = OrderedDict()  # session -> its cached index
        self._moved: OrderedDict[bytes, float] = OrderedDict()  # move notices, recent ones
        self._pending: dict[int, list[bytes]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._lease_task: asyncio.Task[None] | None = None
        self._ndp: NeighborResponder | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.vip_held = False
        self._engine_tun = False  # the compiled engine holds a duplicate of the TUN
        self.counts = {"relayed_out": 0, "relayed_in": 0, "relay_bad_tag": 0,
                       "relay_replayed": 0, "relay_too_old": 0, "relay_busy": 0,
                       "not_local_dropped": 0, "tun_write_errors": 0}

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        cfg = self.cfg
        try:
            # netlink (pyroute2's synchronous API runs its own loop) and nft: off our loop
            await asyncio.to_thread(self._setup)
            if cfg.egress == "routed" and cfg.relay_listen is not None:
                self._relay, _ = await loop.create_datagram_endpoint(
                    lambda: _RelayProtocol(self), local_addr=cfg.relay_listen)
                bound = self._relay.get_extra_info("sockname")[:2]
                advertise = cfg.relay_advertise or f"{bound[0]}:{bound[1]}"
                await self.node.store.set_relay(self.node.machine.instance_id, advertise)
                if cfg.vip:
                    self._lease_task = asyncio.create_task(self._hold_vip(), name="jvpn-vip")
        except BaseException:
            await self.stop()
            raise
        assert self.tun is not None
        engine = self.node.engine
        if engine is not None:
            # the compiled engine reads and writes the TUN for the bindings it carries and
            # hands every other packet read from it to from_tun (gateway/udp_engine.py)
            engine.set_tun(self.tun.fd)
            self._engine_tun = True
        else:
            self.tun.attach(loop, self.from_tun)
        log.info("L3: %s mtu %d, gateway %s, egress %s, TUN read by %s", self.tun.name, cfg.mtu,
                 cfg.pool.gateway.text(), cfg.egress,
                 "the compiled engine" if engine is not None else "asyncio")

    def _setup(self) -> None:
        cfg = self.cfg
        self.tun = TunDevice(cfg.tun_name)
        self._net = NetConfig()
        idx = self._net.link_up(self.tun.name, cfg.mtu)
        gw = cfg.pool.gateway
        self._net.add_address(idx, gw.v4)
        self._net.add_address(idx, gw.v6)
        for path in FORWARDING:
            old = _sysctl(path, "1")
            if old != "1":
                self._forwarding.append((path, old))
        if cfg.egress == "nat":
            try:
                _nft(nat_ruleset(self._nft_table, cfg, delete_first=False))
            except L3Error:  # a stale table of a crashed run: replace it, atomically
                _nft(nat_ruleset(self._nft_table, cfg, delete_first=True))
            self._nat = True

    async def stop(self) -> None:
        if self._lease_task is not None:
            self._lease_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._lease_task
            self._lease_task = None
            if self.vip_held:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        self.node.store.egress_lease(self.node.machine.instance_id, 0), 1.0)
        await asyncio.to_thread(self._drop_vip)
        for t in list(self._tasks):
            t.cancel()
        if self._relay is not None:
            self._relay.close()
            self._relay = None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    self.node.store.set_relay(self.node.machine.instance_id, None), 1.0)
        if self._engine_tun:
            self._engine_tun = False
            with contextlib.suppress(RuntimeError, OSError):  # stopped first: closed it
                self.node.engine.set_tun(None)
        if self.tun is not None:
            self.tun.detach()
        await asyncio.to_thread(self._teardown)

    def _teardown(self) -> None:
        if self._nat:
            with contextlib.suppress(L3Error):
                _nft(f"delete table inet {self._nft_table}\n")
            self._nat = False
        for path, old in reversed(self._forwarding):
            with contextlib.suppress(OSError):
                _sysctl(path, old)
        self._forwarding.clear()
        if self._net is not None:
            self._net.close()
            self._net = None
        if self.tun is not None:
            self.tun.close()
            self.tun = None

    # ---- packets ---------------------------------------------------------------------------

    def from_tun(self, packet: bytes) -> None:
        """A packet the kernel routed into the TUN (read by asyncio, or handed up by the
        compiled engine: one no binding it carries owns)."""
        node = self.node
        if node._stopping:
            return
        node.machine.tun_received(packet, self.clock())
        node._flush()

    def to_tun(self, e: ToTun) -> None:
        if self.tun is None or not self.tun.write(e.data):
            self.counts["tun_write_errors"] += 1

    def not_local(self, e: NotLocal) -> None:
        """A packet for a session bound on another node: relay it there (routed), or drop."""
        if self._relay is None:
            self.counts["not_local_dropped"] += 1
            self.node.metrics.count_drop(DropReason.POLICY, TransportKind.UDP)
            return
        hit = self._owners.get(e.pool_index)
        if hit is not None and self.clock() - hit[0] < OWNER_CACHE_S:
            return self._relay_to(hit[1], e.data)
        queue = self._pending.get(e.pool_index)
        if queue is not None:
            if len(queue) < PENDING_PER_INDEX:
                queue.append(e.data)
            return
        if len(self._pending) >= PENDING_INDEXES:
            self.counts["not_local_dropped"] += 1
            return
        self._pending[e.pool_index] = [e.data]
        self._spawn(self._look_up(e.pool_index))

    def _relay_to(self, addr: tuple[str, int] | None, packet: bytes) -> None:
        if addr is None or self._relay is None:
            self.counts["not_local_dropped"] += 1
            return
        self._relay.sendto(self.codec.seal(packet), addr)
        self.counts["relayed_out"] += 1

    async def _look_up(self, index: int) -> None:
        addr: tuple[str, int] | None = None
        sid: bytes | None = None
        started = self.clock()
        try:
            sid, addr = await asyncio.wait_for(self._owner_address(index), 2.0)
        except Exception as exc:  # the store is away: drop (TCP retransmits), look again later
            log.debug("owner of pool index %d not found: %r", index, exc)
        # an answer that a move notice overtook is used once, for the waiting packets
        stale = sid is not None and self._moved.get(sid, float("-inf")) >= started
        self._owners[index] = (float("-inf") if stale else self.clock(), addr)
        self._owners.move_to_end(index)
        while len(self._owners) > OWNER_CACHE_MAX:
            self._owners.popitem(last=False)
        if sid is not None:
            self._index_of[sid] = index
            self._index_of.move_to_end(sid)
            while len(self._index_of) > OWNER_CACHE_MAX:
                self._index_of.popitem(last=False)
        for packet in self._pending.pop(index, []):
            self._relay_to(addr, packet)

    async def _owner_address(self, index: int) -> tuple[bytes | None, tuple[str, int] | None]:
        store = self.node.store
        sid = await store.address_owner(index)
        if sid is None:
            return None, None
        rec = await store.get(sid)
        if rec is None or rec.terminated or not rec.node:
            return sid, None
        if rec.node == self.node.machine.instance_id:
            return sid, None  # ours by the store, not bound here (yet): nothing to relay to
        relay = await store.relay_of(rec.node)
        if not relay:
            return sid, None
        host, _, port = relay.rpartition(":")
        return sid, ((host.strip("[]"), int(port)) if port.isdigit() else None)

    def binding_moved(self, sid: bytes) -> None:
        """Another node took ``sid``'s binding (the store's move notice, which every node
        hears): what this node cached about its owner is stale, look it up again at the
        next packet rather than relay to the old owner (perhaps dead) until the cache
        expires."""
        now = self.clock()
        self._moved[sid] = now
        self._moved.move_to_end(sid)
        while self._moved and (len(self._moved) > OWNER_CACHE_MAX
                               or now - next(iter(self._moved.values())) > OWNER_CACHE_S * 4):
            self._moved.popitem(last=False)
        index = self._index_of.pop(sid, None)
        if index is not None:
            self._owners.pop(index, None)

    def relay_received(self, data: bytes) -> None:
        """A packet another node relayed: MAC, age and replay window checked (each refusal
        dropped and counted), then as if read from our TUN (never relayed again)."""
        packet, why = self.codec.open(data)
        if packet is None:
            self.counts[f"relay_{why}"] += 1
            reason = {"bad_tag": DropReason.BAD_MAC, "busy": DropReason.QUEUE_FULL}.get(
                why, DropReason.REPLAYED)  # replayed, or too old to tell
            self.node.metrics.count_drop(reason, TransportKind.UDP)
            return
        self.counts["relayed_in"] += 1
        node = self.node
        if node._stopping:
            return
        node.machine.tun_received(packet, self.clock(), relayed=True)
        node._flush()

    # ---- the routed return address ---------------------------------------------------------

    async def _hold_vip(self) -> None:
        """Take or renew the egress lease every third of it; hold the address while ours."""
        me = self.node.machine.instance_id
        lease_ms = int(self.cfg.lease_s * 1000)
        renewed = float("-inf")
        while True:
            try:
                holder, _ = await asyncio.wait_for(
                    self.node.store.egress_lease(me, lease_ms), self.cfg.lease_s / 3)
                if holder == me:
                    renewed = self.clock()
                    if not self.vip_held:
                        await asyncio.to_thread(self._take_vip)
                        self._spawn(self._announce())
                elif self.vip_held:
                    await asyncio.to_thread(self._drop_vip)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("egress lease: %r", exc)
            # fail closed: stop answering well before the lease can pass to another node
            if self.vip_held and self.clock() - renewed > self.cfg.lease_s / 2:
                log.warning("egress lease not renewed: giving up %s", self.cfg.vip)
                await asyncio.to_thread(self._drop_vip)
            await asyncio.sleep(self.cfg.lease_s / 3)

    def _take_vip(self) -> None:
        if self.tun is None or self._net is None:
            return
        net = self._vip_net = NetConfig(self._net.ipr)
        idx = net.index(self.tun.name)
        net.add_address(idx, ipaddress.IPv4Interface(f"{self.cfg.vip}/32"))
        if self.cfg.vip6:
            # on the TUN, as the IPv4 one: a neighbour's unicast probe is delivered locally
            net.add_address(idx, ipaddress.IPv6Interface(f"{self.cfg.vip6}/128"))
            self._ndp = NeighborResponder(self.cfg.vip_interface, self.cfg.vip6)
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._watch_ndp, self._ndp)
        self.vip_held = True
        log.info("egress: holding %s%s", self.cfg.vip, f" and {self.cfg.vip6}" * bool(self.cfg.vip6))

    def _watch_ndp(self, ndp: NeighborResponder) -> None:
        if self._loop is not None and ndp is self._ndp:
            self._loop.add_reader(ndp.sock.fileno(), ndp.readable)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _announce(self) -> None:
        for i in range(GARP_REPEAT):
            if not self.vip_held:
                return
            try:
                gratuitous_arp(self.cfg.vip_interface, self.cfg.vip)
                if self._ndp is not None:
                    self._ndp.announce()
            except OSError as exc:
                log.warning("announcing the return address on %s: %s", self.cfg.vip_interface,
                            exc)
                return
            await asyncio.sleep(0.05 * (i + 1))

    def _drop_vip(self) -> None:
        ndp, self._ndp = self._ndp, None
        if ndp is not None:
            if self._loop is not None:
                loop = self._loop
                fd = ndp.sock.fileno()

                def unwatch() -> None:
                    loop.remove_reader(fd)
                    ndp.close()
                if loop.is_running():
                    loop.call_soon_threadsafe(unwatch)
                else:
                    ndp.close()
            else:
                ndp.close()
        if self._vip_net is not None:
            self._vip_net.undo()
            self._vip_net = None
        if self.vip_held:
            log.info("egress: released %s", self.cfg.vip)
        self.vip_held = False
