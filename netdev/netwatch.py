"""The host's addresses, watched over netlink: a transport learns at once that its source
address is gone, instead of from keepalives that stop being answered.

Theory of operation. One rtnetlink socket joined to the address multicast groups
(IPv4 and IPv6) is read on the caller's event loop; pyroute2 parses the messages. Each
address added or removed (not on an interface the caller ignores, such as its own TUN)
becomes one ``AddressEvent`` handed to the callback. Nothing is polled and nothing is
sent to the kernel. A socket that cannot be opened (not Linux, a sandbox) leaves the
watch off, which the caller is told: detection falls back to keepalives.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pyroute2.netlink.rtnl.marshal import MarshalRtnl

log = logging.getLogger("jvpn.netdev")

RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100
RTM_NEWADDR, RTM_DELADDR = 20, 21
READS_PER_WAKE = 64  # bounded work per wake-up (the socket keeps the rest)


@dataclass(frozen=True, slots=True)
class AddressEvent:
    added: bool  # False: removed
    address: str
    index: int  # the interface's index


class AddressWatch:
    """Calls ``on_event`` for every address added to or removed from the host."""

    def __init__(self, on_event: Callable[[AddressEvent], object],
                 ignore_interfaces: Iterable[str] = ()) -> None:
        self.on_event = on_event
        self.ignore = set(ignore_interfaces)
        self._ignored: set[int] = set()
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._marshal = MarshalRtnl()
        self.events = 0

    def start(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Open the socket and read it on ``loop``; False (and a log line) if it cannot."""
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        except (OSError, AttributeError) as exc:
            log.info("address watch off (%s): keepalives alone detect a lost address", exc)
            return False
        try:
            sock.bind((0, RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
            sock.setblocking(False)
            loop.add_reader(sock.fileno(), self._readable)
        except (OSError, NotImplementedError) as exc:
            sock.close()
            log.info("address watch off (%s): keepalives alone detect a lost address", exc)
            return False
        self._sock, self._loop = sock, loop
        return True

    def stop(self) -> None:
        if self._sock is not None and self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
        self._sock = None

    def _ignored_index(self, index: int) -> bool:
        if index in self._ignored:
            return True
        try:
            name = socket.if_indextoname(index)
        except OSError:
            return False  # gone already: its addresses are news
        if name in self.ignore:
            self._ignored.add(index)
            return True
        return False

    def _readable(self) -> None:
        assert self._sock is not None
        for _ in range(READS_PER_WAKE):
            try:
                data = self._sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # ENOBUFS: events were lost; the keepalives still run
                log.debug("address watch: %s", exc)
                return
            try:
                messages = list(self._marshal.parse(data))
            except Exception as exc:  # a message pyroute2 cannot parse: skip the datagram
                log.debug("address watch: unparsable netlink message: %r", exc)
                continue
            for msg in messages:
                kind = msg.get("header", {}).get("type")
                if kind not in (RTM_NEWADDR, RTM_DELADDR):
                    continue
                index = int(msg.get("index") or 0)
                address = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
                if not address or self._ignored_index(index):
                    continue
                self.events += 1
                self.on_event(AddressEvent(kind == RTM_NEWADDR, str(address), index))
