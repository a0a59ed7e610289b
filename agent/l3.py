"""The agent's L3 mode: the TUN interface applications use, and what it routes into it.

Theory of operation. The interface is created once, at start, with an MTU fixed by
the transports the agent may use (``session.inner.inner_mtu``): a jump never changes
it, nor anything else applications can see. When a session comes up the
interface gets the session's inner addresses (IPv4 and IPv6) and the routes its
policy allows: a prefix of length 0 is a full tunnel for its family (wg-quick's
table and rules, ``netdev.netconf``), any other prefix a route in the main table. A
reattach keeps the session and so changes nothing here; only a new session (after
the old one ended) can bring other addresses, which then replace the old ones.
Everything installed is removed at stop (also on SIGTERM, through the CLI's
handler); the interface vanishes with the process even after a crash, and rules a
crash left behind are removed at the next start.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from netdev.netconf import FullTunnel, NetConfig, clean_stale
from netdev.tun import TunDevice, describe_offloads
from session.inner import InnerAddresses, inner_mtu, parse_prefixes
from session.wire import TransportKind

log = logging.getLogger("jvpn.agent")


@dataclass(frozen=True)
class L3Settings:
    """The agent's L3 mode (``[agent] mode = "l3"``)."""

    tun_name: str = "jvpn0"
    path_mtu: int = 1500  # the outer path's MTU the inner MTU is derived from
    full_tunnel: FullTunnel = field(default_factory=FullTunnel)
    offload: bool = True  # TUN offloads, when the compiled engine reads the TUN


class L3Interface:
    """The TUN interface and the addresses, routes and rules a session puts on it."""

    def __init__(self, settings: L3Settings, kinds: Iterable[TransportKind]) -> None:
        self.settings = settings
        self.mtu = inner_mtu(kinds, settings.path_mtu)
        self.inner: InnerAddresses | None = None
        self.routes: tuple[str, ...] = ()
        self.tun: TunDevice | None = None
        self._net: NetConfig | None = None
        self._session: NetConfig | None = None  # what the current session installed

    @property
    def mark(self) -> int:
        """The firewall mark the transports' sockets carry (full tunnel: outside it)."""
        return self.settings.full_tunnel.mark

    def open(self, offload: bool = False) -> None:
        """Remove stale state, create the interface (up, fixed MTU). Blocking (netlink): run
        it in a thread."""
        self._net = NetConfig()
        stale = clean_stale(self._net.ipr, self.settings.full_tunnel, self.settings.tun_name)
        for item in stale:
            log.warning("removed stale %s left by an earlier run", item)
        self.tun = TunDevice(self.settings.tun_name, offload=offload)
        self._net.link_up(self.tun.name, self.mtu)

    def offloads_said(self, engine: bool) -> str:
        """What the start log line says about the TUN's offloads."""
        if self.tun is not None and self.tun.offloads:
            return f"on ({describe_offloads(self.tun.offloads)})"
        if not engine:
            return "off (the Python data plane reads plain packets)"
        return "off (tun_offload = false)" if not self.settings.offload else "off (the kernel took none)"

    def attach(self, loop: asyncio.AbstractEventLoop, on_packet: Callable[[bytes], object]) -> None:
        """Start handing each packet applications send into the interface to ``on_packet``."""
        assert self.tun is not None
        self.tun.attach(loop, on_packet)

    def session_up(self, inner: InnerAddresses, routes: tuple[str, ...]) -> bool:
        """Install a session's addresses and routes; False (nothing done) if they are the
        ones installed already (a new session given the same addresses). Blocking."""
        if inner == self.inner and routes == self.routes:
            return False
        assert self._net is not None and self.tun is not None
        if self._session is not None:
            self._session.undo()
        net = self._session = NetConfig(self._net.ipr)
        idx = net.index(self.tun.name)
        net.add_address(idx, inner.v4)
        net.add_address(idx, inner.v6)
        full: list[int] = []
        for prefix in parse_prefixes(routes):
            if prefix.prefixlen == 0:
                full.append(socket.AF_INET if prefix.version == 4 else socket.AF_INET6)
            else:
                net.add_route(idx, prefix)
        if full:
            net.full_tunnel(idx, full, self.settings.full_tunnel)
        self.inner, self.routes = inner, routes
        return True

    def write(self, packet: bytes) -> None:
        if self.tun is not None:
            self.tun.write(packet)

    def close(self) -> None:
        """Remove everything installed, then the interface. Blocking."""
        if self._session is not None:
            self._session.undo()
            self._session = None
        if self.tun is not None:
            self.tun.close()
            self.tun = None
        if self._net is not None:
            self._net.close()
            self._net = None


def full_tunnel_wanted(routes: Iterable[str]) -> bool:
    return any(ipaddress.ip_network(r).prefixlen == 0 for r in routes)
