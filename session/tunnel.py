"""Cryptokey routing for L3 sessions, as WireGuard does it.

Theory of operation. An L3 session's DATA payloads are IP packets, carried
unchanged. Towards the network (uplink) a packet is accepted only if its source
is one of the session's own inner addresses and its destination lies in the
prefixes its client's policy allows; anything else is dropped and counted by
reason. Towards the client (downlink) a packet read from the node's TUN goes to
the session that owns its destination address, and only to it, and only if its
source lies in that session's allowed prefixes (a reply from where it may
reach). The owner map is this node's: a destination owned by a session bound
elsewhere is reported as not local (routed mode relays it to the owning node).

Pure: packets are bytes; addresses are compared packed.
"""

from __future__ import annotations

import ipaddress
from enum import IntEnum

from session.inner import InnerAddresses, InnerPool, IPNetwork

IPV4_HEADER = 20
IPV6_HEADER = 40


class TunnelDrop(IntEnum):
    """Why an IP packet was not forwarded (counted per reason)."""

    MALFORMED = 1  # not an IPv4/IPv6 packet (too short, wrong version)
    SPOOFED_SOURCE = 2  # uplink: the inner source is not the session's own address
    PREFIX_DENIED = 3  # uplink: destination outside the client's allowed prefixes
    NO_ROUTE = 4  # downlink: destination is no session's inner address
    SOURCE_DENIED = 5  # downlink: source outside the owning session's allowed prefixes
    NOT_L3 = 6  # a UDP-forward session: no IP packets


def addresses(packet: bytes) -> tuple[bytes, bytes] | None:
    """(source, destination), packed, of an IPv4 or IPv6 packet; None if it is neither."""
    if not packet:
        return None
    version = packet[0] >> 4
    if version == 4 and len(packet) >= IPV4_HEADER:
        return packet[12:16], packet[16:20]
    if version == 6 and len(packet) >= IPV6_HEADER:
        return packet[8:24], packet[24:40]
    return None


class SessionRoute:
    """One L3 session's addresses and prefixes, in the forms the per-packet checks use."""

    __slots__ = ("inner", "prefixes", "_own", "_allowed")

    def __init__(self, inner: InnerAddresses, prefixes: tuple[IPNetwork, ...]) -> None:
        self.inner = inner
        self.prefixes = prefixes
        self._own = (inner.v4.ip.packed, inner.v6.ip.packed)
        self._allowed: dict[bytes, bool] = {}  # destination -> allowed, memoised (bounded)

    def owns(self, packed: bytes) -> bool:
        return packed in self._own

    def allows(self, packed: bytes) -> bool:
        """Whether the packed address lies in an allowed prefix (memoised, bounded)."""
        hit = self._allowed.get(packed)
        if hit is None:
            addr = ipaddress.ip_address(packed)
            hit = any(addr.version == n.version and addr in n for n in self.prefixes)
            if len(self._allowed) >= 4096:
                self._allowed.clear()
            self._allowed[packed] = hit
        return hit

    def check_uplink(self, packet: bytes) -> TunnelDrop | None:
        """None if the session may send ``packet`` on, else why not."""
        a = addresses(packet)
        if a is None:
            return TunnelDrop.MALFORMED
        if a[0] not in self._own:
            return TunnelDrop.SPOOFED_SOURCE
        if not self.allows(a[1]):
            return TunnelDrop.PREFIX_DENIED
        return None


class TunnelRouter:
    """This node's map from inner address to the session bound here that owns it."""

    __slots__ = ("pool", "_owners")

    def __init__(self, pool: InnerPool) -> None:
        self.pool = pool
        self._owners: dict[bytes, bytes] = {}  # packed inner address -> session id

    def add(self, session_id: bytes, route: SessionRoute) -> None:
        for packed in route._own:
            self._owners[packed] = session_id

    def remove(self, session_id: bytes, route: SessionRoute) -> None:
        for packed in route._own:
            if self._owners.get(packed) == session_id:
                del self._owners[packed]

    def owner(self, packet: bytes) -> tuple[bytes | None, bytes | None, TunnelDrop | None]:
        """(session id bound here, destination, None) for a downlink packet, or
        (None, destination, NO_ROUTE) when no session here owns it, or a drop reason."""
        a = addresses(packet)
        if a is None:
            return None, None, TunnelDrop.MALFORMED
        sid = self._owners.get(a[1])
        if sid is None:
            return None, a[1], TunnelDrop.NO_ROUTE
        return sid, a[1], None

    def pool_index(self, packed: bytes) -> int | None:
        """The pool index of a packed inner address (None: not a session's)."""
        return self.pool.index_of(ipaddress.ip_address(packed))

    def __len__(self) -> int:
        return len(self._owners)
