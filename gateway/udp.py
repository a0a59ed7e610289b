"""The UDP listener: datagrams to the node as peers, with the client's address behind a balancer.

Theory of operation. Every datagram read from the gateway's UDP socket goes to
``GatewayNode.on_message`` with its ``Peer`` (one per address, cached: the machine
compares them often); the node answers on the same socket. Behind a balancer
(``gateway.balancer``) a 24-byte prefix on every datagram carries the client's
address, believed only from ``trusted_balancers``: the Peer then carries the
client's address (what the machine sees) and the balancer's socket to answer to
(``via``). A datagram from a trusted balancer without a valid prefix, or with the
prefix magic from anyone else, is dropped and counted; nothing here decides
about sessions.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING

from gateway.balancer import has_prefix_magic, parse_prefix
from session import wire
from session.binding import Peer
from session.reasons import DropReason

if TYPE_CHECKING:
    from gateway.node import GatewayNode

log = logging.getLogger("jvpn.gateway")

UDP_SOCKET_BUFFER = 4 << 20  # bytes asked for the listener's receive and send buffers
PEER_CACHE_MAX = 100_000


def grow_buffers(transport: asyncio.BaseTransport) -> None:
    """Ask for UDP_SOCKET_BUFFER both ways (the kernel caps it at net.core.[rw]mem_max).

    The 208 KiB default holds only ~270 small datagrams: a burst of reattaches
    (a NAT rebinding storm) while the loop is busy would be dropped by the kernel.
    """
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, UDP_SOCKET_BUFFER)
        except OSError:
            pass


class UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, node: GatewayNode) -> None:
        self.node = node
        self._peers: dict[tuple[str, int], Peer] = {}
        self._relayed: dict[tuple[tuple[str, int], tuple[str, int]], Peer] = {}

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        node = self.node
        if node.trusted and node.trusted.trusts(addr[0]):
            parsed = parse_prefix(data)
            if parsed is None:
                node.prefix_dropped(DropReason.MISSING_PREFIX, wire.TransportKind.UDP, addr[0])
                return
            client, data = parsed
            key = (client, (addr[0], addr[1]))
            peer = self._relayed.get(key)
            if peer is None:  # the client's address; answers go to the balancer's socket
                if len(self._relayed) > PEER_CACHE_MAX:
                    self._relayed.clear()
                peer = self._relayed[key] = Peer(wire.TransportKind.UDP, client, via=key[1])
            node.on_message(data, peer)
            return
        if has_prefix_magic(data):  # a client address from someone not allowed to give one
            node.prefix_dropped(DropReason.UNTRUSTED_PREFIX, wire.TransportKind.UDP, addr[0])
            return
        peer = self._peers.get(addr)
        if peer is None:  # one Peer per address: the machine compares them often
            if len(self._peers) > PEER_CACHE_MAX:
                self._peers.clear()
            peer = self._peers[addr] = Peer(wire.TransportKind.UDP, (addr[0], addr[1]))
        node.on_message(data, peer)

    def error_received(self, exc: Exception) -> None:
        log.debug("udp error: %s", exc)

