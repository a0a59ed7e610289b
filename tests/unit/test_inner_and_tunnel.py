"""Inner addresses, the L3 handshake fields and cryptokey routing, in memory."""

from __future__ import annotations

import ipaddress

import pytest

from session import wire
from session.client import ClientParams, HandshakeComplete, HandshakeFailed
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
from session.reasons import DropReason, RejectReason
from session.storeops import ClientPolicy
from session.tunnel import SessionRoute, TunnelDrop, TunnelRouter, addresses
from tests.support.memnet import WALL_MS, Cl, Gw, Net

POOL = InnerPool.parse("10.77.0.0/16", "fd77::/64")


def ipv4(src: str, dst: str, size: int = 40) -> bytes:
    head = bytes([0x45, 0]) + size.to_bytes(2, "big") + bytes([0, 0, 0, 0, 64, 6, 0, 0])
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


# ---- the machines, in memory (tests/support/memnet.py) ------------------------------------


def _l3_session(net: Net) -> tuple[Cl, Gw, InnerAddresses]:
    from tests.unit.test_machines import CL_PRIV, CL_PUB, GW_PRIV, GW_PUB, GW_SETTINGS, HOME, KEK

    gw = net.gateway("gw-a", GW_PRIV, KEK, inner_pool=POOL, **GW_SETTINGS)
    net.store.clients[CL_PUB.hex()] = ClientPolicy(
        CL_PUB, prefixes=("192.0.2.0/24", "2001:db8::/32"))
    c = net.client(CL_PRIV, GW_PUB, ClientParams(keepalive_interval=0.2, l3=True))
    net.add_path(c, 1, HOME, "gw-a")
    c.machine.connect(net.now, WALL_MS, 1, wire.TransportKind.UDP)
    net.run(0.5)
    up = c.of(HandshakeComplete)
    assert up and up[0].inner is not None, c.events
    assert up[0].routes == ("192.0.2.0/24", "2001:db8::/32")
    return c, gw, up[0].inner


def test_an_l3_session_carries_checked_ip_packets_both_ways() -> None:
    net = Net(seed=3)
    net.echo = False
    c, gw, inner = _l3_session(net)
    assert inner == POOL.addresses(0)
    sid = c.machine.session_id
    good = ipv4("10.77.0.2", "192.0.2.9", 1200)
    c.machine.send(good, net.now)
    c.flush()
    c.machine.send(ipv6("fd77::2", "2001:db8::1"), net.now)
    c.flush()
    spoofed = ipv4("10.77.0.3", "192.0.2.9")  # another session's address
    denied = ipv4("10.77.0.2", "198.51.100.1")  # outside the client's prefixes
    for p in (spoofed, denied):
        c.machine.send(p, net.now)
        c.flush()
    net.run(net.now + 0.2)
    assert gw.tun == [good, ipv6("fd77::2", "2001:db8::1")]  # unchanged, and only those
    drops = [a[0] for a, _ in gw.metrics.named("count_drop")]
    assert DropReason.SPOOFED_SOURCE in drops and DropReason.POLICY in drops
    assert gw.machine.tunnel_drops[TunnelDrop.SPOOFED_SOURCE] == 1
    assert gw.machine.tunnel_drops[TunnelDrop.PREFIX_DENIED] == 1

    # downlink: only to the owner, only from an allowed source; others are not local
    reply = ipv4("192.0.2.9", "10.77.0.2")
    gw.machine.tun_received(reply, net.now)
    gw.machine.tun_received(ipv4("198.51.100.1", "10.77.0.2"), net.now)  # source not allowed
    gw.machine.tun_received(ipv4("192.0.2.9", "10.77.0.7"), net.now)  # index 5, not here
    gw.machine.tun_received(ipv4("192.0.2.9", "10.0.0.1"), net.now)  # no session's at all
    gw.flush()
    net.run(net.now + 0.2)
    assert c.received == [reply]
    assert gw.not_local == [(5, ipv4("192.0.2.9", "10.77.0.7"))]
    assert gw.machine.tunnel_drops[TunnelDrop.SOURCE_DENIED] == 1
    assert gw.machine.tunnel_drops[TunnelDrop.NO_ROUTE] == 1
    # relayed packets for a session not bound here are dropped, never relayed again
    gw.machine.tun_received(ipv4("192.0.2.9", "10.77.0.7"), net.now, relayed=True)
    gw.flush()
    assert len(gw.not_local) == 1
    assert net.store.addresses == {sid: 0}


def test_a_node_that_relays_nothing_drops_packets_for_sessions_bound_elsewhere() -> None:
    """NAT egress (relay_not_local off): a packet from the TUN for another node's session
    is the machine's drop (NO_ROUTE, counted POLICY), not a NotLocal for the adapter."""
    from dataclasses import replace

    net = Net(seed=4)
    net.echo = False
    c, gw, _ = _l3_session(net)
    elsewhere = ipv4("192.0.2.9", "10.77.0.7")  # pool index 5: no session of this node's
    gw.machine.tun_received(elsewhere, net.now)
    gw.flush()
    assert gw.not_local == [(5, elsewhere)]  # a node that relays: the adapter relays it
    gw.machine.settings = replace(gw.machine.settings, relay_not_local=False)
    gw.machine.tun_received(elsewhere, net.now)
    gw.flush()
    assert gw.not_local == [(5, elsewhere)], "a node that relays nothing asked to relay"
    assert gw.machine.tunnel_drops[TunnelDrop.NO_ROUTE] == 1
    assert (DropReason.POLICY, wire.TransportKind.UDP) in [
        a[:2] for a, _ in gw.metrics.named("count_drop")]


def test_an_exhausted_pool_is_an_explicit_refusal() -> None:
    net = Net(seed=4)
    net.store.addresses = {i.to_bytes(16, "big"): i for i in range(POOL.size)}
    from tests.unit.test_machines import CL_PRIV, CL_PUB, GW_PRIV, GW_PUB, GW_SETTINGS, HOME, KEK

    net.gateway("gw-a", GW_PRIV, KEK, inner_pool=POOL, **GW_SETTINGS)
    net.store.clients[CL_PUB.hex()] = ClientPolicy(CL_PUB, prefixes=("0.0.0.0/0",))
    c = net.client(CL_PRIV, GW_PUB, ClientParams(l3=True))
    net.add_path(c, 1, HOME, "gw-a")
    c.machine.connect(net.now, WALL_MS, 1, wire.TransportKind.UDP)
    net.run(0.5)
    failed = c.of(HandshakeFailed)
    assert failed and failed[0].reason is RejectReason.ADDRESS_POOL_EXHAUSTED
    assert failed[0].authenticated


def test_relayed_packets_are_macd_and_the_nat_ruleset_is_one_atomic_table() -> None:
    from gateway.l3_net import L3Config, nat_ruleset
    from session.relay import relay_tag

    key = bytes(32)
    pkt = ipv4("192.0.2.9", "10.77.0.2")
    tag = relay_tag(key, pkt)
    assert len(tag) == 16 and tag == relay_tag(key, pkt)
    assert tag != relay_tag(bytes([1]) * 32, pkt) and tag != relay_tag(key, pkt[:-1] + b"\x01")
    cfg = L3Config(tun_name="jvpn0", mtu=1420, pool=POOL)
    rules = nat_ruleset("jvpn_jvpn0", cfg, delete_first=True)
    assert rules.startswith("table inet jvpn_jvpn0\ndelete table inet jvpn_jvpn0\n")
    assert 'ip saddr 10.77.0.0/16 oifname != "jvpn0" masquerade' in rules
    assert 'ip6 saddr fd77::/64 oifname != "jvpn0" masquerade' in rules
    out = nat_ruleset("t", L3Config("jvpn0", 1420, POOL, egress_interface="eth1"), False)
    assert 'oifname "eth1" masquerade' in out and "delete" not in out


def test_the_inner_mtu_keeps_a_packet_in_one_quic_datagram_frame() -> None:
    from session.inner import inner_mtu
    from session.wire import DATA_OVERHEAD, QUIC_DATAGRAM_MAX, TransportKind

    quic = inner_mtu([TransportKind.QUIC])
    assert quic + DATA_OVERHEAD == QUIC_DATAGRAM_MAX
    assert inner_mtu([TransportKind.UDP, TransportKind.TCP, TransportKind.QUIC]) == quic
    assert inner_mtu([TransportKind.QUIC], path_mtu=1460) < quic  # a smaller path: smaller


def test_a_replayed_or_stale_relayed_packet_is_dropped_and_counted() -> None:
    from gateway.l3 import L3Plane
    from gateway.l3_net import L3Config
    from gateway.metrics import Metrics
    from session.relay import RELAY_MAX_AGE_MS, RelayCodec

    clock = [1_000_000]
    key = bytes(range(32))

    class Sender(RelayCodec):  # another node, whose wall clock is ours
        def seal(self, packet: bytes, now_ms: int | None = None) -> bytes:
            return super().seal(packet, clock[0] if now_ms is None else now_ms)

    sender = Sender(key, b"sender-1", clock[0])
    delivered: list[bytes] = []

    class Machine:  # the node's machine: what the plane hands a relayed packet to
        def tun_received(self, packet: bytes, now: float, relayed: bool = False) -> None:
            assert relayed
            delivered.append(packet)

    class Node:
        _stopping = False
        machine = Machine()
        metrics = Metrics("gw-test")

        def _flush(self) -> None:
            pass

    node = Node()
    plane = L3Plane(node, L3Config("jvpn0", 1420, POOL, egress="routed"),  # type: ignore[arg-type]
                    key, wall_ms=lambda: clock[0])
    pkt = ipv4("192.0.2.9", "10.77.0.2")
    first, second = sender.seal(pkt), sender.seal(pkt)
    plane.relay_received(first)
    plane.relay_received(first)  # the same datagram again: refused
    plane.relay_received(second)  # the same packet relayed anew: a new counter, accepted
    assert delivered == [pkt, pkt]
    assert plane.counts["relay_replayed"] == 1 and plane.counts["relayed_in"] == 2
    assert node.metrics.drops[(DropReason.REPLAYED, wire.TransportKind.UDP)] == 1
    # out of order within the window is fine; a forged tag is not
    third, fourth = sender.seal(pkt), sender.seal(pkt)
    plane.relay_received(fourth)
    plane.relay_received(third)
    assert len(delivered) == 4
    plane.relay_received(third[:-1] + bytes([third[-1] ^ 1]))
    assert plane.counts["relay_bad_tag"] == 1 and len(delivered) == 4
    # too old to tell (its window may be forgotten by then): refused, counted
    late = sender.seal(pkt)
    clock[0] += RELAY_MAX_AGE_MS + 1
    plane.relay_received(late)
    assert plane.counts["relay_too_old"] == 1 and len(delivered) == 4
    # a receiver that restarted refuses what was sent before it started
    early = sender.seal(pkt)
    clock[0] += 1
    fresh = RelayCodec(key, b"receiver", clock[0])
    assert fresh.open(early, clock[0]) == (None, "too_old")
    assert fresh.open(sender.seal(pkt), clock[0]) == (pkt, None)


def test_the_return_address_neighbour_advertisement_is_rfc_4861_shaped() -> None:
    from gateway.l3_net import neighbor_advertisement

    target = ipaddress.IPv6Address("fd99::254").packed
    mac = bytes.fromhex("0200000000aa")
    na = neighbor_advertisement(target, mac, solicited=True)
    assert len(na) == 32 and na[0] == 136 and na[1] == 0  # type NA, code 0
    assert na[4] == 0x80 | 0x40 | 0x20  # router, solicited, override
    assert na[8:24] == target and na[24:26] == b"\x02\x01" and na[26:32] == mac
    assert neighbor_advertisement(target, mac, solicited=False)[4] == 0x80 | 0x20
