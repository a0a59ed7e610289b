"""Inner addresses: what an L3 session is inside the tunnel, and the pools they come from.

Theory of operation. A cluster has one pool per address family (an IPv4 and an
IPv6 prefix, the same on every node). The store hands out one *index* per
session (``store/lua/addr.lua``, atomically, before the session is born); index
``i`` names the pair (v4 network + 2 + i, v6 network + 2 + i). Offset 1 of each
prefix is the gateways' own inner address (every node uses it: return traffic
needs one next hop inside the tunnel, and it is the same wherever the session
is bound). The pair is written into the session record and bound into its
wrapped secret with the policy fields, so it cannot change while the session
lives, whichever node carries it; it is freed only when the session ends.

Pure: ``ipaddress`` arithmetic only.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from session.wire import (
    DATA_OVERHEAD,
    MAX_PAYLOAD_SIZE,
    QUIC_DATAGRAM_MAX,
    QUIC_MAX_UDP_PAYLOAD,
    TransportKind,
)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_POOL_SIZE = 1 << 20  # sessions per pool at most, whatever the prefixes allow
MAX_PREFIXES = 32  # allowed destination prefixes per client
MIN_INNER_MTU = 1280  # the IPv6 minimum: an inner MTU below it cannot carry IPv6
OUTER_IP_HEADER = 40  # the worst case (an IPv6 outer path)
OUTER_TCP_HEADER = 32  # TCP with timestamps


@dataclass(frozen=True, slots=True)
class InnerAddresses:
    """One session's inner IPv4 and IPv6 addresses, each with its pool's prefix length."""

    v4: ipaddress.IPv4Interface
    v6: ipaddress.IPv6Interface

    def text(self) -> str:
        """The record's ``ia`` field: ``"10.77.0.2/16,fd77::2/64"``."""
        return f"{self.v4.with_prefixlen},{self.v6.with_prefixlen}"

    @classmethod
    def parse(cls, text: str) -> InnerAddresses:
        """From ``text()``; ValueError if malformed."""
        a, sep, b = text.partition(",")
        if not sep:
            raise ValueError(f"inner addresses must be 'v4/len,v6/len', got {text!r}")
        v4 = ipaddress.ip_interface(a)
        v6 = ipaddress.ip_interface(b)
        if not isinstance(v4, ipaddress.IPv4Interface) or not isinstance(
                v6, ipaddress.IPv6Interface):
            raise ValueError(f"inner addresses must be one IPv4 then one IPv6, got {text!r}")
        return cls(v4, v6)

    def owns(self, source: IPAddress) -> bool:
        """Whether ``source`` is one of the session's own addresses (cryptokey routing)."""
        return source == self.v4.ip or source == self.v6.ip


@dataclass(frozen=True, slots=True)
class InnerPool:
    """The cluster's pools: an IPv4 and an IPv6 prefix, allocated by index."""

    v4: ipaddress.IPv4Network
    v6: ipaddress.IPv6Network

    @classmethod
    def parse(cls, v4: str, v6: str) -> InnerPool:
        """Both prefixes (strict: host bits clear); ValueError if unusable."""
        n4 = ipaddress.ip_network(v4, strict=True)
        n6 = ipaddress.ip_network(v6, strict=True)
        if not isinstance(n4, ipaddress.IPv4Network) or n4.prefixlen > 29:
            raise ValueError(f"inner IPv4 pool must be an IPv4 prefix of /29 or wider, got {v4!r}")
        if not isinstance(n6, ipaddress.IPv6Network) or n6.prefixlen > 125:
            raise ValueError(f"inner IPv6 pool must be an IPv6 prefix of /125 or wider, got {v6!r}")
        return cls(n4, n6)

    @property
    def spec(self) -> str:
        """What the store records with the pool: nodes configured differently are refused."""
        return f"{self.v4},{self.v6}"

    @property
    def size(self) -> int:
        """Addresses to hand out: the smaller family's hosts, less network, gateway and
        (IPv4) broadcast."""
        return min(self.v4.num_addresses - 3, self.v6.num_addresses - 2, MAX_POOL_SIZE)

    @property
    def gateway(self) -> InnerAddresses:
        """The gateways' own inner addresses (offset 1 in each prefix)."""
        return self._at(1)

    def addresses(self, index: int) -> InnerAddresses:
        """The pair that index ``index`` names; ValueError outside the pool."""
        if not 0 <= index < self.size:
            raise ValueError(f"pool index {index} outside 0..{self.size - 1}")
        return self._at(2 + index)

    def index_of(self, address: IPAddress) -> int | None:
        """The pool index of an inner address (either family), None if not a session's."""
        net: IPNetwork = self.v4 if address.version == 4 else self.v6
        if address not in net:
            return None
        i = int(address) - int(net.network_address) - 2
        return i if 0 <= i < self.size else None

    def _at(self, offset: int) -> InnerAddresses:
        a4 = self.v4.network_address + offset
        a6 = self.v6.network_address + offset
        return InnerAddresses(ipaddress.IPv4Interface(f"{a4}/{self.v4.prefixlen}"),
                              ipaddress.IPv6Interface(f"{a6}/{self.v6.prefixlen}"))


def inner_mtu(kinds: Iterable[TransportKind], path_mtu: int = 1500) -> int:
    """The TUN MTU for a session that may use ``kinds``: the smallest inner MTU among them,
    so no jump ever changes it. A UDP datagram must fit the path (no outer fragmentation);
    a TCP frame is kept within one segment; over QUIC a packet stays in one DATAGRAM frame
    (no head-of-line blocking), whose QUIC packet fits the path. Never above the largest
    tunnelled payload; ValueError below the IPv6 minimum."""
    quic_udp = min(QUIC_MAX_UDP_PAYLOAD, path_mtu - OUTER_IP_HEADER - 8)
    per_kind = {
        TransportKind.UDP: path_mtu - OUTER_IP_HEADER - 8 - DATA_OVERHEAD,
        TransportKind.TCP: path_mtu - OUTER_IP_HEADER - OUTER_TCP_HEADER - 2 - DATA_OVERHEAD,
        TransportKind.QUIC: (QUIC_DATAGRAM_MAX - (QUIC_MAX_UDP_PAYLOAD - quic_udp)
                             - DATA_OVERHEAD),
    }
    mtu = min([per_kind[k] for k in kinds] or [0])
    mtu = min(mtu, MAX_PAYLOAD_SIZE)
    if mtu < MIN_INNER_MTU:
        raise ValueError(f"a path MTU of {path_mtu} leaves an inner MTU of {mtu}, "
                         f"below {MIN_INNER_MTU}")
    return mtu


def parse_prefixes(items: tuple[str, ...] | list[str]) -> tuple[IPNetwork, ...]:
    """Allowed destination prefixes, strictly parsed; ValueError naming a bad one."""
    if len(items) > MAX_PREFIXES:
        raise ValueError(f"at most {MAX_PREFIXES} prefixes, got {len(items)}")
    out = []
    for item in items:
        try:
            out.append(ipaddress.ip_network(item, strict=True))
        except ValueError as exc:
            raise ValueError(f"prefix {item!r}: {exc}") from None
    return tuple(out)


def prefixes_text(items: tuple[str, ...]) -> str:
    """The record's ``ap`` field (comma-separated, as given)."""
    return ",".join(items)
