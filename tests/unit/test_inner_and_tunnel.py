"""Inner addresses, the L3 handshake fields and cryptokey routing, in memory."""

from __future__ import annotations

import ipaddress

import pytest

from session import wire
from session.errors import DecodeError
from session.handshake import (
    ClientHello,
    ServerHello,
    decode_client_hello,
    decode_server_payload,
    encode_client_hello,
    encode_server_hello,
)
from session.inner import InnerAddresses, InnerPool, parse_prefixes
from session.keys import policy_binding
from session.tunnel import SessionRoute, TunnelDrop, TunnelRouter, addresses

POOL = InnerPool.parse("10.77.0.0/16", "fd77::/64")


def ipv4(src: str, dst: str, size: int = 40) -> bytes:
    head = bytes([0x45, 0, 0, size, 0, 0, 0, 0, 64, 6, 0, 0])
    return (head + ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed
            + bytes(size - 20))


def ipv6(src: str, dst: str) -> bytes:
    head = bytes([0x60, 0, 0, 0, 0, 0, 6, 64])
    return head + ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed


def test_pool_indexes_name_one_pair_and_skip_network_and_gateway() -> None:
    assert POOL.gateway.text() == "10.77.0.1/16,fd77::1/64"
    a = POOL.addresses(0)
    assert a.text() == "10.77.0.2/16,fd77::2/64"
    assert InnerAddresses.parse(a.text()) == a
    assert POOL.index_of(a.v4.ip) == 0 and POOL.index_of(a.v6.ip) == 0
    assert POOL.index_of(POOL.gateway.v4.ip) is None
    assert POOL.index_of(ipaddress.ip_address("10.78.0.2")) is None
    assert POOL.size == 65536 - 3
    with pytest.raises(ValueError):
        POOL.addresses(POOL.size)
    for bad in (("10.77.0.1/16", "fd77::/64"), ("fd77::/64", "10.0.0.0/8"),
                ("10.0.0.0/30", "fd77::/64")):
        with pytest.raises(ValueError):
            InnerPool.parse(*bad)
    with pytest.raises(ValueError):
        InnerAddresses.parse("fd77::2/64,10.77.0.2/16")


def test_l3_hello_fields_round_trip_and_old_hellos_stay_byte_identical() -> None:
    plain = ClientHello(1, wire.TransportKind.UDP, "10.0.0.1:53")
    assert encode_client_hello(plain) == encode_client_hello(
        ClientHello(1, wire.TransportKind.UDP, "10.0.0.1:53", l3=False))
    l3 = ClientHello(1, wire.TransportKind.TCP, "", l3=True)
    assert decode_client_hello(encode_client_hello(l3)) == l3
    assert decode_client_hello(encode_client_hello(plain)) == plain
    sh = ServerHello(b"s" * 16, 1, 2, 1, b"b" * 16, b"gw", 5, 6, 7,
                     POOL.addresses(3).text(), "0.0.0.0/0,::/0")
    assert decode_server_payload(encode_server_hello(sh)) == sh
    bare = ServerHello(b"s" * 16, 1, 2, 1, b"b" * 16, b"gw", 5, 6, 7)
    assert decode_server_payload(encode_server_hello(bare)) == bare
    import msgpack
    with pytest.raises(DecodeError):  # a mode that does not exist
        decode_client_hello(msgpack.packb({"t": 1, "k": 1, "u": "", "m": 7}))
    with pytest.raises(DecodeError):  # an upstream longer than an upstream may be
        decode_client_hello(msgpack.packb({"t": 1, "k": 1, "u": "x" * 300}))


def test_policy_binding_covers_inner_addresses_and_prefixes() -> None:
    base = ("ab" * 32, "", 300_000, 30, 6, 86_400_000)
    one = policy_binding(*base, "10.77.0.2/16,fd77::2/64", "10.0.0.0/8")
    assert one != policy_binding(*base, "10.77.0.3/16,fd77::3/64", "10.0.0.0/8")
    assert one != policy_binding(*base, "10.77.0.2/16,fd77::2/64", "0.0.0.0/0")
    assert one != policy_binding(*base)
    policy_binding("a", "b", 1, 2, 3, None, "x", "y")  # never raises on what a record holds


def test_cryptokey_routing_uplink_and_downlink() -> None:
    a, b = POOL.addresses(0), POOL.addresses(1)
    ra = SessionRoute(a, parse_prefixes(("192.0.2.0/24", "2001:db8::/32")))
    rb = SessionRoute(b, parse_prefixes(("0.0.0.0/0", "::/0")))
    assert ra.check_uplink(ipv4("10.77.0.2", "192.0.2.9")) is None
    assert ra.check_uplink(ipv6("fd77::2", "2001:db8::1")) is None
    assert ra.check_uplink(ipv4("10.77.0.3", "192.0.2.9")) is TunnelDrop.SPOOFED_SOURCE
    assert ra.check_uplink(ipv4("10.77.0.2", "198.51.100.1")) is TunnelDrop.PREFIX_DENIED
    assert ra.check_uplink(b"\x45" + bytes(10)) is TunnelDrop.MALFORMED
    assert ra.check_uplink(b"") is TunnelDrop.MALFORMED
    assert ra.check_uplink(b"\x70" + bytes(60)) is TunnelDrop.MALFORMED
    router = TunnelRouter(POOL)
    router.add(b"A" * 16, ra)
    router.add(b"B" * 16, rb)
    assert router.owner(ipv4("192.0.2.9", "10.77.0.2"))[0] == b"A" * 16
    assert router.owner(ipv6("2001:db8::1", "fd77::3"))[0] == b"B" * 16
    sid, dst, why = router.owner(ipv4("192.0.2.9", "10.77.0.9"))
    assert sid is None and why is TunnelDrop.NO_ROUTE and dst is not None
    assert router.pool_index(dst) == 7
    router.remove(b"A" * 16, ra)
    assert router.owner(ipv4("192.0.2.9", "10.77.0.2"))[0] is None
    assert addresses(ipv6("fd77::2", "::1")) == (ipaddress.IPv6Address("fd77::2").packed,
                                                ipaddress.IPv6Address("::1").packed)
