"""The client's address behind the balancer, at a real gateway (gateway/balancer.py).

nginx carries the client's address before every UDP datagram (a 24-byte prefix,
deploy/nginx/jvpn.js) and in a PROXY v1 header on TCP. A gateway believes it only
from its ``trusted_balancers``: there the session's peer is the client's address
(events, budgets, tokens) while answers go back to the balancer's socket; a
forged prefix sent straight to a node from anywhere else is dropped, counted and
moves nothing; a trusted balancer's message without one is dropped and counted.
Every wait is a poll with a deadline.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from gateway.balancer import encode_prefix, parse_prefix
from session import wire
from session.reasons import DropReason
from tests.support.harness import Gateway, echo_upstream, start_gateway, wait_for
from tests.support.rawclient import Endpoint, RawSession, _TcpProto, _UdpProto

UDP, TCP = wire.TransportKind.UDP, wire.TransportKind.TCP
CLIENT = ("203.0.113.7", 40000)  # the address the balancer says the client has


def drops(gw: Gateway, reason: DropReason, kind: wire.TransportKind = UDP) -> int:
    return int(gw.app.metrics.drops.get((reason, kind), 0))


class Relayed(Endpoint):
    """A UDP endpoint that puts ``prefix`` before every datagram (what nginx's filter does)."""

    prefix = b""

    def write(self, data: bytes) -> None:
        super().write(self.prefix + data)


async def udp_from(remote: tuple[str, int], source: str, prefix: bytes = b"") -> Relayed:
    ep = Relayed(UDP, remote)
    ep.prefix = prefix
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.bind((source, 0))
    sock.connect(remote)
    ep._sock = sock
    ep.local = sock.getsockname()
    await asyncio.get_running_loop().create_datagram_endpoint(lambda: _UdpProto(ep), sock=sock)
    return ep


async def tcp_from(remote: tuple[str, int], source: str, head: bytes = b"") -> Endpoint:
    ep = Endpoint(TCP, remote)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await asyncio.wait_for(loop.sock_connect(sock, remote), 5.0)
    await loop.create_connection(lambda: _TcpProto(ep), sock=sock)
    if head:
        ep.write(head)
    return ep


def test_the_prefix_round_trips_and_rejects_what_is_not_one() -> None:
    for host, seen in (("203.0.113.7", "203.0.113.7"), ("2001:db8::1", "2001:db8::1"),
                       ("::ffff:10.0.0.1", "10.0.0.1")):
        data = encode_prefix(host, 40000) + b"msg"
        assert parse_prefix(data) == ((seen, 40000), b"msg")
    good = encode_prefix("203.0.113.7", 40000)
    assert parse_prefix(good[:-1]) is None  # truncated
    assert parse_prefix(b"JVPB" + good[4:]) is None  # magic
    assert parse_prefix(good[:4] + b"\x05" + good[5:]) is None  # family
    assert parse_prefix(good[:23] + b"\x01") is None  # IPv4 with stray bytes
    assert parse_prefix(good[:6] + b"\x00\x00" + good[8:]) is None  # port 0


@pytest.mark.parametrize("trusted", [[], ["127.0.0.3"]], ids=["no-balancer", "other-balancer"])
async def test_a_forged_prefix_sent_straight_to_a_node_is_dropped_and_moves_nothing(
        redis_url: str, trusted: list[str]) -> None:
    gw = await start_gateway(redis_url, trusted_balancers=trusted)
    echo, upstream = await echo_upstream()
    try:
        priv, _ = await gw.add_client(upstream)
        st = RawSession(priv, gw.app.keys.public, upstream)
        victim = await Endpoint.udp(gw.udp)
        await st.connect(victim)
        assert st.session_id
        b = gw.node.bindings[st.session_id]
        before = (b.peer, b.epoch, dict(b.probes or {}))
        events = len(gw.events)
        # An attacker (127.0.0.2, not a balancer) claims to relay for the victim's address,
        # and for an address of its choosing, copying the victim's authenticated packets.
        forger = await udp_from(gw.udp, "127.0.0.2")
        forged = [encode_prefix(*victim.local) + st.keepalive_packet(seq=7),
                  encode_prefix(*CLIENT) + st.keepalive_packet(seq=8),
                  encode_prefix(*CLIENT) + st.request()[0]]
        for raw in forged:
            forger.write(raw)
        await wait_for(lambda: drops(gw, DropReason.UNTRUSTED_PREFIX) == len(forged), 3.0,
                       "the forged prefixes to be dropped and counted")
        assert await forger.quiet(0.3) == []  # nothing answered the forger
        b = gw.node.bindings[st.session_id]
        assert (b.peer, b.epoch, dict(b.probes or {})) == before  # no move, no challenge
        assert b.peer.addr == victim.local and b.peer.via is None
        # No event of the forgery (the victim's own silence past 0.3 s may be reported).
        assert [e.doc for e in gw.events[events:]
                if "binding silent" not in str(e.doc.get("message"))] == []
        await st.keepalive(victim)  # the session still works from its own address
        # The same over TCP: a PROXY header from a non-balancer closes the connection.
        conn = await tcp_from(gw.tcp, "127.0.0.2",
                              f"PROXY TCP4 {CLIENT[0]} 127.0.0.1 {CLIENT[1]} 51820\r\n".encode())
        await asyncio.wait_for(conn.eof.wait(), 3.0)
        assert drops(gw, DropReason.UNTRUSTED_PREFIX, TCP) == 1
    finally:
        echo.close()
        await gw.app.stop()


async def test_a_trusted_balancer_carries_the_client_address(redis_url: str) -> None:
    gw = await start_gateway(redis_url, trusted_balancers=["127.0.0.1"])
    echo, upstream = await echo_upstream()
    try:
        priv, _ = await gw.add_client(upstream)
        st = RawSession(priv, gw.app.keys.public, upstream)
        relay = await udp_from(gw.udp, "127.0.0.1", encode_prefix(*CLIENT))
        await st.connect(relay)  # handshake and keepalive through the "balancer"
        assert st.session_id
        peer = gw.node.bindings[st.session_id].peer
        assert peer.addr == CLIENT and peer.via == relay.local  # answers went to the relay
        seen = {e.fields["source.ip"] for e in gw.events if e.fields.get("source.ip")}
        assert seen == {CLIENT[0]}, seen
        # Without a prefix, from the balancer: a misconfiguration, dropped and counted.
        bare = await udp_from(gw.udp, "127.0.0.1")
        bare.write(st.keepalive_packet(seq=50))
        await wait_for(lambda: drops(gw, DropReason.MISSING_PREFIX) == 1, 3.0,
                       "a bare datagram from the balancer to be dropped")
        assert await bare.quiet(0.2) == []
        # TCP: the PROXY v1 header names the client, per connection.
        st2 = RawSession(priv, gw.app.keys.public, upstream)
        conn = await tcp_from(gw.tcp, "127.0.0.1",
                              b"PROXY TCP4 198.51.100.9 127.0.0.1 41000 51820\r\n")
        await st2.connect(conn)
        assert st2.session_id
        assert gw.node.bindings[st2.session_id].peer.addr == ("198.51.100.9", 41000)
        assert gw.node.tcp.per_source.get("198.51.100.9") == 1
        assert "127.0.0.1" not in gw.node.tcp.per_source
        # A balancer connection without the header is dropped and closed.
        junk = await tcp_from(gw.tcp, "127.0.0.1", wire.frame(st.keepalive_packet(seq=51)))
        await asyncio.wait_for(junk.eof.wait(), 3.0)
        assert drops(gw, DropReason.MISSING_PREFIX, TCP) == 1
    finally:
        echo.close()
        await gw.app.stop()


async def test_a_balancer_reload_is_no_transport_switch(redis_url: str) -> None:
    """nginx reloaded (or restarted) relays the same client from new sockets: the prefix
    still names the client's own address, so the session follows the new flow (after its
    challenge) without a transport switch or a NAT rebinding being counted. A real
    rebinding, a new client address, still is one."""
    gw = await start_gateway(redis_url, trusted_balancers=["127.0.0.1"])
    echo, upstream = await echo_upstream()
    try:
        priv, _ = await gw.add_client(upstream)
        st = RawSession(priv, gw.app.keys.public, upstream)
        relay = await udp_from(gw.udp, "127.0.0.1", encode_prefix(*CLIENT))
        await st.connect(relay)

        def switches() -> float:
            return sum(gw.app.metrics.transport_switches.values())

        before = switches()
        for new_client, counted in ((CLIENT, False), (("203.0.113.7", 40001), True)):
            reloaded = await udp_from(gw.udp, "127.0.0.1", encode_prefix(*new_client))
            reloaded.send(st.keepalive_packet(seq=60))
            challenge = await st.next_inner(reloaded,
                                            lambda i: i.kind is wire.InnerType.PATH_CHALLENGE)
            reloaded.send(st.seal(wire.inner_path_response(challenge.payload)))
            await wait_for(lambda r=reloaded: gw.node.bindings[st.session_id].peer.via == r.local,
                           3.0, "the downlink to follow the new flow")
            await st.keepalive(reloaded)
            nat = [e for e in gw.actions("transport_switch") if e.get("event.reason") == "nat_rebind"]
            assert (switches() > before) is counted and bool(nat) is counted, new_client
    finally:
        echo.close()
        await gw.app.stop()
