"""Addresses, routes and policy-routing rules over netlink (pyroute2), undone exactly.

Theory of operation. ``NetConfig`` applies one change at a time and records how to
undo it; ``undo()`` reverses them newest first and ignores what is already gone
(an interface's addresses and routes vanish with it). Full tunnel follows wg-quick:
the default routes go into their own table, a rule sends everything *not* carrying
the tunnel's firewall mark to that table, and a rule before it consults the main
table with ``suppress_prefixlength 0`` (its specific routes, never its default); the
tunnel's own sockets carry the mark (SO_MARK), so the path to the gateways stays
outside the tunnel whatever the default route. Rules outlive the process that made
them, so they are recognised by their priority and table and removed by
``clean_stale`` at start (a crash leaves nothing behind for the next run).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

IFA_F_NODAD = 0x02  # no duplicate address detection: the address is usable at once
FIB_RULE_INVERT = 0x02  # "not fwmark"
MAIN_TABLE = 254
DEFAULT_TABLE = 51820  # the full tunnel's table, also its firewall mark (as wg-quick)
DEFAULT_RULE_PRIORITY = 5200  # ours: this and the next one


@dataclass(frozen=True, slots=True)
class FullTunnel:
    """Where the full tunnel's routes and rules go."""

    table: int = DEFAULT_TABLE
    mark: int = DEFAULT_TABLE
    priority: int = DEFAULT_RULE_PRIORITY


def _family(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> int:
    return socket.AF_INET if net.version == 4 else socket.AF_INET6


class NetConfig:
    """Changes applied to the kernel, each with its undo."""

    def __init__(self, ipr: IPRoute | None = None) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        if ipr is None:
            # pyroute2's synchronous API runs an event loop of its own: a plain asyncio one
            # (the policy's may be uvloop, which cannot carry netlink sockets). Blocking:
            # call from a thread, never from a running loop.
            self._loop = asyncio.SelectorEventLoop()
            ipr = IPRoute(use_event_loop=self._loop)
        self.ipr = ipr
        self._undo: list[Callable[[], object]] = []

    def index(self, ifname: str) -> int:
        found = self.ipr.link_lookup(ifname=ifname)
        if not found:
            raise LookupError(f"no interface {ifname!r}")
        return int(found[0])

    def link_up(self, ifname: str, mtu: int) -> int:
        idx = self.index(ifname)
        self.ipr.link("set", index=idx, state="up", mtu=mtu)
        return idx

    def add_address(self, idx: int,
                    iface: ipaddress.IPv4Interface | ipaddress.IPv6Interface) -> None:
        kw = {"flags": IFA_F_NODAD} if iface.version == 6 else {}
        self.ipr.addr("add", index=idx, address=str(iface.ip),
                      prefixlen=iface.network.prefixlen, **kw)
        self._undo.append(lambda: self.ipr.addr("del", index=idx, address=str(iface.ip),
                                                prefixlen=iface.network.prefixlen))

    def add_route(self, idx: int, dst: ipaddress.IPv4Network | ipaddress.IPv6Network,
                  table: int = MAIN_TABLE) -> None:
        fam = _family(dst)
        self.ipr.route("replace", dst=str(dst), oif=idx, table=table, family=fam)
        self._undo.append(lambda: self.ipr.route("del", dst=str(dst), oif=idx, table=table,
                                                 family=fam))

    def full_tunnel(self, idx: int, families: Iterable[int], ft: FullTunnel) -> None:
        """Default routes into the tunnel (wg-quick's rules), per address family."""
        for fam in families:
            dst = "0.0.0.0/0" if fam == socket.AF_INET else "::/0"
            self.add_route(idx, ipaddress.ip_network(dst), table=ft.table)
            self._rule(fam, table=ft.table, priority=ft.priority, fwmark=ft.mark,
                       flags=FIB_RULE_INVERT)
            self._rule(fam, table=MAIN_TABLE, priority=ft.priority + 1, suppress_prefixlen=0)

    def _rule(self, family: int, **kw: int) -> None:
        self.ipr.rule("add", family=family, **kw)
        self._undo.append(lambda: self.ipr.rule("del", family=family, **kw))

    def undo(self) -> None:
        """Remove everything applied, newest first (what is gone already is skipped)."""
        while self._undo:
            fn = self._undo.pop()
            with contextlib.suppress(NetlinkError, OSError):
                fn()

    def close(self) -> None:
        self.undo()
        if self._loop is not None:  # we made the socket: close it and its loop
            self.ipr.close()
            self._loop.close()
            self._loop = None


def clean_stale(ipr: IPRoute, ft: FullTunnel, ifname: str) -> list[str]:
    """Remove what a previous run that died may have left: our rules (by priority and
    table), the routes in our table, and a leftover interface of our name. Returns what
    it removed, for the log."""
    removed: list[str] = []
    for fam in (socket.AF_INET, socket.AF_INET6):
        for rule in ipr.get_rules(family=fam):
            prio = rule.get_attr("FRA_PRIORITY")
            table = rule.get_attr("FRA_TABLE") or rule.get("table")
            ours = (prio == ft.priority and table == ft.table) or (
                prio == ft.priority + 1 and table == MAIN_TABLE)
            if ours:
                with contextlib.suppress(NetlinkError):
                    ipr.rule("del", family=fam, priority=prio, table=table)
                    removed.append(f"rule {prio} table {table} (family {fam})")
        for route in ipr.get_routes(family=fam, table=ft.table):
            if (route.get_attr("RTA_TABLE") or route.get("table")) != ft.table:
                continue
            with contextlib.suppress(NetlinkError):
                ipr.route("del", table=ft.table, family=fam,
                          dst_len=route.get("dst_len"), dst=route.get_attr("RTA_DST"),
                          oif=route.get_attr("RTA_OIF"))
                removed.append(f"route in table {ft.table} (family {fam})")
    for idx in ipr.link_lookup(ifname=ifname):
        with contextlib.suppress(NetlinkError):
            ipr.link("del", index=idx)
            removed.append(f"interface {ifname}")
    return removed


def snapshot(ipr: IPRoute) -> tuple[list[tuple[object, ...]], ...]:
    """Addresses, routes (every table) and rules, comparable: what a run must leave as found."""
    addrs = sorted((a.get("index"), a.get_attr("IFA_ADDRESS"), a.get("prefixlen"))
                   for a in ipr.get_addr())
    routes = sorted(
        (r.get("family"), r.get_attr("RTA_TABLE"), str(r.get_attr("RTA_DST")), r.get("dst_len"),
         r.get_attr("RTA_OIF"), str(r.get_attr("RTA_GATEWAY")))
        for fam in (socket.AF_INET, socket.AF_INET6) for r in ipr.get_routes(family=fam, table=0))
    rules = sorted(
        (r.get("family"), r.get_attr("FRA_PRIORITY"), r.get_attr("FRA_TABLE"),
         r.get_attr("FRA_FWMARK"), r.get("flags"))
        for fam in (socket.AF_INET, socket.AF_INET6) for r in ipr.get_rules(family=fam))
    return addrs, routes, rules  # type: ignore[return-value]
