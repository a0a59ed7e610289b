"""The client's address behind the balancer: what nginx puts before the messages it forwards.

Theory of operation. Behind nginx every datagram and connection reaches a
gateway from nginx's own socket, so without help per-source budgets, RETRY
tokens and audit events would all see one source. nginx therefore carries the
client's address, and a gateway believes it only from the addresses it is told
are balancers (``trusted_balancers``; empty by default: nothing is believed):

- UDP: nginx's PROXY protocol writes at most one v1 header on a flow's first
  datagram, which a lost datagram loses. So ``deploy/nginx/jvpn.js`` (``filter``)
  puts a fixed 24-byte prefix before *every* client -> gateway datagram::

      magic "JVPA" | family u8 (4 or 6) | reserved u8 (0) | port u16 |
      address 16 bytes (IPv4: 4 bytes then 12 zero bytes)

  Replies go back unchanged to nginx's socket (the Peer's ``via``).
- TCP: PROXY protocol v1 (``proxy_protocol on;``), once at the start of the
  connection, which TCP delivers reliably.

From a trusted balancer a datagram without a valid prefix, or a connection
without a valid PROXY header, is dropped and counted (``MISSING_PREFIX``: a
misconfiguration); from anyone else a datagram that starts with the prefix
magic is dropped and counted (``UNTRUSTED_PREFIX``: a forgery), and everything
else is an ordinary message from that address. Parsing is strict and bounded.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable

PREFIX_MAGIC = b"JVPA"
PREFIX = struct.Struct("!4sBBH16s")
PREFIX_LEN = PREFIX.size  # 24
PROXY_V1_MAX = 107  # the longest v1 header, CRLF included (haproxy's proxy-protocol.txt)
PROXY_V1_SIGNATURE = b"PROXY "

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(items: Iterable[str]) -> tuple[Network, ...]:
    """``trusted_balancers`` as networks (an address is a /32 or /128); ValueError if bad."""
    return tuple(ipaddress.ip_network(item.strip(), strict=False) for item in items)


class TrustedBalancers:
    """Which source addresses may speak for a client (a cached membership test)."""

    __slots__ = ("networks", "_cache")

    CACHE_MAX = 4096

    def __init__(self, networks: Iterable[Network] = ()) -> None:
        self.networks = tuple(networks)
        self._cache: dict[str, bool] = {}

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, host: str) -> bool:
        if not self.networks:
            return False
        hit = self._cache.get(host)
        if hit is None:
            try:
                ip = ipaddress.ip_address(host.split("%", 1)[0])
            except ValueError:
                hit = False
            else:
                if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                    ip = ip.ipv4_mapped
                hit = any(ip.version == n.version and ip in n for n in self.networks)
            if len(self._cache) >= self.CACHE_MAX:
                self._cache.clear()
            self._cache[host] = hit
        return hit


def encode_prefix(host: str, port: int) -> bytes:
    """The prefix jvpn.js writes for a client at ``host``:``port`` (tests and tools)."""
    ip = ipaddress.ip_address(host)
    raw = ip.packed if ip.version == 6 else ip.packed + bytes(12)
    return PREFIX.pack(PREFIX_MAGIC, ip.version, 0, port, raw)


def has_prefix_magic(data: bytes) -> bool:
    return data[:4] == PREFIX_MAGIC


def parse_prefix(data: bytes) -> tuple[tuple[str, int], bytes] | None:
    """((client host, port), the message) of a prefixed datagram; None if not one."""
    if len(data) < PREFIX_LEN:
        return None
    magic, family, reserved, port, raw = PREFIX.unpack_from(data)
    if magic != PREFIX_MAGIC or reserved != 0 or port == 0:
        return None
    if family == 4 and not any(raw[4:]):
        host = str(ipaddress.IPv4Address(raw[:4]))
    elif family == 6:
        ip6 = ipaddress.IPv6Address(raw)
        host = str(ip6.ipv4_mapped or ip6)  # a dual-stack listener's IPv4 client is IPv4
    else:
        return None
    return (host, port), data[PREFIX_LEN:]


def parse_proxy_v1(buf: bytes) -> tuple[tuple[str, int] | None, int] | None:
    """A PROXY protocol v1 header at the start of ``buf``.

    Returns (client address or None for ``PROXY UNKNOWN``, header length), None
    while the header is incomplete; raises ValueError if it is not one.
    """
    if buf[:len(PROXY_V1_SIGNATURE)] != PROXY_V1_SIGNATURE[:len(buf)]:
        raise ValueError("no PROXY protocol header")
    end = buf.find(b"\r\n", 0, PROXY_V1_MAX)
    if end < 0:
        if len(buf) >= PROXY_V1_MAX:
            raise ValueError("PROXY header too long")
        return None
    parts = buf[:end].decode("ascii", "strict").split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return None, end + 2
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ValueError("malformed PROXY header")
    src = ipaddress.ip_address(parts[2])
    ipaddress.ip_address(parts[3])
    if src.version != (4 if parts[1] == "TCP4" else 6):
        raise ValueError("PROXY header family mismatch")
    port = _port(parts[4])
    _port(parts[5])
    return (str(src), port), end + 2


def _port(text: str) -> int:
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[0] == "0"):
        raise ValueError("bad port in PROXY header")
    port = int(text)
    if not 0 < port < 65536:
        raise ValueError("bad port in PROXY header")
    return port
