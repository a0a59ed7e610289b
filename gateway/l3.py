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
  back to the node that sent it; a packet for a session bound elsewhere is dropped (by
  the machine: the node relays nothing, ``GatewaySettings.relay_not_local`` is off).
- ``routed``: the pools are routed, once, to the cluster's return addresses (``vip``,
  and ``vip6`` for the IPv6 pool). One node at a time holds them, by a lease in the
  store (``store/lua/lead.lua``): the holder puts them on its TUN (so they vanish if
  the process dies), announces them (gratuitous ARP; an unsolicited neighbour
  advertisement) and answers neighbour solicitations for the IPv6 one from a socket
  that also dies with the process; the others take over when the lease lapses.
  Whatever reaches a node for a session bound elsewhere is relayed, MAC'd under a
  KEK-derived key and replay-protected (``session.relay.RelayCodec``), over UDP to
  the node that holds the binding now: found in the store (pool index -> session ->
  its record's node -> that node's announced relay address), cached briefly
  (``session.relay.OwnerCache``). What a relayed packet must be and where to relay
  are decided there; this module reads the store, the sockets and the clocks.

The host's side (forwarding, the nftables ruleset, ARP and neighbour
announcements) is ``gateway.l3_net``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from gateway.l3_net import (
    FORWARDING,
    L3Config,
    L3Error,
    NeighborResponder,
    gratuitous_arp,
    nat_ruleset,
    nft,
    sysctl,
)
from netdev.netconf import NetConfig
from netdev.tun import TunDevice, describe_offloads
from session.gateway import NotLocal, ToTun
from session.relay import OwnerCache, RelayCodec, relay_address, relay_holder
from session.wire import TransportKind

if TYPE_CHECKING:
    from gateway.node import GatewayNode

log = logging.getLogger("jvpn.gateway.l3")

PENDING_PER_INDEX = 32  # packets held while the owner is looked up
PENDING_INDEXES = 1024
GARP_REPEAT = 3


def _offloads(tun: TunDevice, engine: bool, wanted: bool) -> str:
    """What the start log line says about the TUN's offloads."""
    if tun.offloads:
        return f"on ({describe_offloads(tun.offloads)})"
    if not engine:
        return "off (the Python data plane reads plain packets)"
    return "off (tun_offload = false)" if not wanted else "off (the kernel took none)"


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
        self.wall_ms = wall_ms
        self.codec = RelayCodec(relay_key, secrets.token_bytes(8), wall_ms())
        self.clock = clock
        self.tun: TunDevice | None = None
        self._net: NetConfig | None = None
        self._vip_net: NetConfig | None = None
        self._forwarding: list[tuple[str, str]] = []
        self._nft_table = f"jvpn_{cfg.tun_name}".replace("-", "_")
        self._nat = False
        self._relay: asyncio.DatagramTransport | None = None
        self.owners = OwnerCache()
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
        log.info("L3: %s mtu %d, gateway %s, egress %s, TUN read by %s, TUN offloads %s",
                 self.tun.name, cfg.mtu, cfg.pool.gateway.text(), cfg.egress,
                 "the compiled engine" if engine is not None else "asyncio", _offloads(
                     self.tun, engine is not None, cfg.offload))

    def _setup(self) -> None:
        cfg = self.cfg
        self.tun = TunDevice(cfg.tun_name, offload=cfg.offload and self.node.engine is not None)
        self._net = NetConfig()
        idx = self._net.link_up(self.tun.name, cfg.mtu)
        gw = cfg.pool.gateway
        self._net.add_address(idx, gw.v4)
        self._net.add_address(idx, gw.v6)
        for path in FORWARDING:
            old = sysctl(path, "1")
            if old != "1":
                self._forwarding.append((path, old))
        if cfg.egress == "nat":
            try:
                nft(nat_ruleset(self._nft_table, cfg, delete_first=False))
            except L3Error:  # a stale table of a crashed run: replace it, atomically
                nft(nat_ruleset(self._nft_table, cfg, delete_first=True))
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
                nft(f"delete table inet {self._nft_table}\n")
            self._nat = False
        for path, old in reversed(self._forwarding):
            with contextlib.suppress(OSError):
                sysctl(path, old)
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
        """A packet for a session bound on another node: relay it there (the machine asks
        only when this node relays, ``GatewaySettings.relay_not_local``)."""
        if self._relay is None:  # closed at stop
            self.counts["not_local_dropped"] += 1
            return
        known, addr = self.owners.lookup(e.pool_index, self.clock())
        if known:
            return self._relay_to(addr, e.data)
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
        self._relay.sendto(self.codec.seal(packet, self.wall_ms()), addr)
        self.counts["relayed_out"] += 1

    async def _look_up(self, index: int) -> None:
        addr: tuple[str, int] | None = None
        sid: bytes | None = None
        started = self.clock()
        try:
            sid, addr = await asyncio.wait_for(self._owner_address(index), 2.0)
        except Exception as exc:  # the store is away: drop (TCP retransmits), look again later
            log.debug("owner of pool index %d not found: %r", index, exc)
        self.owners.learned(index, sid, addr, started, self.clock())
        for packet in self._pending.pop(index, []):
            self._relay_to(addr, packet)

    async def _owner_address(self, index: int) -> tuple[bytes | None, tuple[str, int] | None]:
        store = self.node.store
        sid = await store.address_owner(index)
        if sid is None:
            return None, None
        rec = await store.get(sid)
        holder = None if rec is None else relay_holder(rec.node, rec.terminated,
                                                        self.node.machine.instance_id)
        if holder is None:
            return sid, None
        return sid, relay_address(await store.relay_of(holder))

    def binding_moved(self, sid: bytes) -> None:
        """Another node took ``sid``'s binding (the store's move notice, which every node
        hears): what this node cached about its owner is stale, look it up again at the
        next packet rather than relay to the old owner (perhaps dead) until the cache
        expires."""
        self.owners.moved(sid, self.clock())

    def relay_received(self, data: bytes) -> None:
        """A packet another node relayed: MAC, age and replay window checked (each refusal
        dropped and counted), then as if read from our TUN (never relayed again)."""
        packet, why = self.codec.open(data, self.wall_ms())
        if packet is None:
            assert why is not None
            self.counts[f"relay_{why.value}"] += 1
            self.node.metrics.count_drop(why.drop_reason, TransportKind.UDP)
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
