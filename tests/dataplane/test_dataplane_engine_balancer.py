"""The compiled UDP data path in a real gateway behind a (fake) balancer, and at the keys'
reject-after age.

Behind a trusted balancer the engine reads the client's address from each datagram's
prefix, forwards the plain case itself and answers to the balancer's socket; a datagram
from the balancer without a prefix, or with one from anyone else, is dropped and counted
by the engine with the adapter's reasons. Past reject-after the engine carries nothing
for the session either way: the machine refuses it (KEYS_EXPIRED).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from types import ModuleType

from gateway.balancer import encode_prefix
from session import wire
from session.framing import DataChannel as PyChannel
from session.reasons import DropReason
from tests.dataplane.test_dataplane_engine_tun import (
    C2G,
    EPOCH,
    G2C,
    ME_V4,
    ME_V6,
    SERVER,
    SID,
    drain,
    ipv4,
    recv,
)
from tests.integration.test_balancer_address import udp_from
from tests.support.harness import Gateway, echo_upstream, start_gateway, wait_for
from tests.support.rawclient import Endpoint, RawSession

UDP = wire.TransportKind.UDP
CLIENT = ("203.0.113.7", 40000)  # the address the balancer says the client has


def drops(gw: Gateway, reason: DropReason) -> int:
    return int(gw.app.metrics.drops.get((reason, UDP), 0))


async def _payloads(st: RawSession, ep: Endpoint, n: int, timeout: float = 5.0) -> list[bytes]:
    got: list[bytes] = []
    for _ in range(n):
        inner = await st.next_inner(ep, lambda i: i.kind is wire.InnerType.PAYLOAD, timeout)
        got.append(inner.payload)
    return got


async def test_the_engine_carries_a_session_behind_a_balancer(redis_url: str,
                                                              compiled: ModuleType) -> None:
    gw = await start_gateway(redis_url, data_plane="compiled", udp_engine="on",
                             trusted_balancers=["127.0.0.1"])
    echo, upstream = await echo_upstream()
    try:
        engine = gw.node.engine
        assert engine is not None
        priv, _ = await gw.add_client(upstream)
        st = RawSession(priv, gw.app.keys.public, upstream)
        relay = await udp_from(gw.udp, "127.0.0.1", encode_prefix(*CLIENT))
        await st.connect(relay)  # handshake and validation through the balancer: the machine's
        assert st.session_id
        await st.keepalive(relay)
        b = gw.node.bindings[st.session_id]
        assert b.peer.addr == CLIENT and b.peer.via == relay.local
        assert gw.node.engine_path.mirror is not None and gw.node.engine_path.mirror.fast(b)

        relay.send(st.payload_packet(b"first"))  # opens the upstream socket (the machine)
        assert await _payloads(st, relay, 1) == [b"first"]
        fwd = engine.counters()["forwarded"]
        for i in range(100):
            relay.send(st.payload_packet(b"p%03d" % i))
        got = await _payloads(st, relay, 100)  # the replies came back to the balancer's socket
        assert sorted(got) == sorted(b"p%03d" % i for i in range(100))
        c = engine.counters()
        assert c["forwarded"] >= fwd + 100 and c["returned"] >= 100, c

        # from the balancer without a prefix, and a prefix from a non-balancer: dropped and
        # counted by the engine, with the adapter's reasons, into the node's metrics
        bare = await udp_from(gw.udp, "127.0.0.1")
        bare.send(st.payload_packet(b"bare"))
        forger = await udp_from(gw.udp, "127.0.0.2", encode_prefix(*CLIENT))
        forger.send(st.payload_packet(b"forged"))
        await wait_for(lambda: (drops(gw, DropReason.MISSING_PREFIX) == 1
                                and drops(gw, DropReason.UNTRUSTED_PREFIX) == 1), 5,
                       "the prefix drops in the node's metrics")
        c = engine.counters()
        assert (c[f"drop_{int(DropReason.MISSING_PREFIX)}"],
                c[f"drop_{int(DropReason.UNTRUSTED_PREFIX)}"]) == (1, 1)
        assert await bare.quiet(0.1) == [] and await forger.quiet(0.1) == []
        assert gw.node.bindings[st.session_id].peer == b.peer  # nothing moved

        # a balancer reload (a new socket, the same client): handed up with its prefix, the
        # machine challenges the new flow and the session follows it, fast again
        reloaded = await udp_from(gw.udp, "127.0.0.1", encode_prefix(*CLIENT))
        reloaded.send(st.keepalive_packet(seq=60))
        challenge = await st.next_inner(reloaded, lambda i: i.kind is wire.InnerType.PATH_CHALLENGE)
        reloaded.send(st.seal(wire.inner_path_response(challenge.payload)))
        await wait_for(lambda: gw.node.bindings[st.session_id].peer.via == reloaded.local, 5,
                       "the session to follow the new flow")
        fwd = engine.counters()["forwarded"]
        for i in range(20):
            reloaded.send(st.payload_packet(b"q%02d" % i))
        assert len(await _payloads(st, reloaded, 20)) == 20
        assert engine.counters()["forwarded"] >= fwd + 19
        for ep in (relay, bare, forger, reloaded):
            ep.close()
    finally:
        echo.close()
        await gw.app.stop()


class Upstream(asyncio.DatagramProtocol):
    """An upstream that records what arrives and answers only when told."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.got: list[tuple[bytes, tuple[str, int]]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.got.append((data, addr))


async def test_the_engine_carries_nothing_past_reject_after(redis_url: str,
                                                           compiled: ModuleType) -> None:
    reject_after_s = 3.0
    gw = await start_gateway(redis_url, data_plane="compiled", udp_engine="on",
                             keys_reject_after_s=reject_after_s)
    transport, up = await asyncio.get_running_loop().create_datagram_endpoint(
        Upstream, local_addr=("127.0.0.1", 0))
    try:
        engine = gw.node.engine
        assert engine is not None
        host, port = transport.get_extra_info("sockname")[:2]
        priv, _ = await gw.add_client(f"{host}:{port}")
        st = RawSession(priv, gw.app.keys.public, f"{host}:{port}")
        ep = await Endpoint.udp(gw.udp)
        await st.connect(ep)
        assert st.session_id
        await st.keepalive(ep)
        b = gw.node.bindings[st.session_id]

        # young keys: the engine forwards both ways
        ep.send(st.payload_packet(b"first"))  # opens the upstream socket (the machine)
        await wait_for(lambda: len(up.got) == 1, 5, "the first payload upstream")
        engine_socket = up.got[0][1]
        for i in range(5):
            ep.send(st.payload_packet(b"p%d" % i))
        await wait_for(lambda: len(up.got) == 6, 5, "the payloads upstream")
        assert engine.counters()["forwarded"] == 5
        transport.sendto(b"reply", engine_socket)
        assert await _payloads(st, ep, 1) == [b"reply"]
        assert engine.counters()["returned"] == 1

        # past reject-after (the store's clock, as the machine reads it), the session kept
        # live meanwhile (keepalives, which are the machine's): still fast in the engine
        m = gw.node.machine
        for _ in range(int(reject_after_s / 0.2) + 50):
            if m.store_ms(gw.node.clock()) - b.secrets.made_ms > reject_after_s * 1000:
                break
            await st.keepalive(ep)
            await asyncio.sleep(0.2)
        else:
            raise AssertionError("the keys never aged past reject-after")
        assert gw.node.engine_path.mirror is not None
        assert gw.node.engine_path.mirror.fast(gw.node.bindings[st.session_id])
        expired = drops(gw, DropReason.KEYS_EXPIRED)
        for i in range(5):
            ep.send(st.payload_packet(b"late %d" % i))
        await wait_for(lambda: drops(gw, DropReason.KEYS_EXPIRED) >= expired + 5, 5,
                       "the machine's KEYS_EXPIRED for the uplink")
        transport.sendto(b"late reply", engine_socket)
        await wait_for(lambda: drops(gw, DropReason.KEYS_EXPIRED) >= expired + 6, 5,
                       "the machine's KEYS_EXPIRED for the downlink")
        assert len(up.got) == 6
        assert not [r for r in await ep.quiet(0.2)
                    if wire.peek_header(r)[0] is wire.MessageType.DATA
                    and st.open(r).kind is wire.InnerType.PAYLOAD]
        c = engine.counters()
        assert (c["forwarded"], c["returned"]) == (5, 1), c
        ep.close()
    finally:
        transport.close()
        await gw.app.stop()


def test_the_l3_engine_behind_a_balancer_and_past_reject_after(compiled: ModuleType) -> None:
    """The engine alone (a datagram socket pair stands in for the TUN): an L3 session
    behind a balancer, its keys young then past reject-after."""
    listen = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listen.bind(("127.0.0.1", 0))
    nginx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    nginx.bind(("127.0.0.1", 0))
    nginx.connect(listen.getsockname())
    tun, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    engine = compiled.GatewayEngine(listen.fileno())
    try:
        engine.set_tun(tun.fileno())
        engine.set_trusted_balancers([(ipaddress.ip_address("127.0.0.0").packed, 8)])
        gw = compiled.DataChannel(G2C, C2G, SID, EPOCH)
        cl = PyChannel(C2G, G2C, SID, EPOCH)
        route = compiled.CryptokeyRoute(ME_V4.packed, ME_V6.packed,
                                        [(ipaddress.ip_address("10.99.0.0").packed, 24)])
        t0 = time.monotonic()
        engine.set_lease(t0 + 60, t0)
        engine.set_keys_clock(0.0, 180_000.0)
        made_ms = t0 * 1000 - 170_000  # ten seconds before reject-after
        engine.install(SID, gw, CLIENT, True, t0, route, via=nginx.getsockname(),
                       keys_made_ms=made_ms)
        prefix = encode_prefix(*CLIENT)
        up, down = ipv4(ME_V4, SERVER), ipv4(SERVER, ME_V4, b"reply")
        nginx.send(prefix + cl.seal(wire.inner_payload(up)))
        assert recv(kernel) == up
        kernel.send(down)
        raw = recv(nginx)  # to the balancer's socket, without a prefix
        assert raw is not None and wire.decode_inner(cl.open_raw(raw)).payload == down

        # the store's clock 20 s later: past reject-after, nothing is carried either way
        engine.set_keys_clock(20_000.0, 180_000.0)
        late = prefix + cl.seal(wire.inner_payload(up))
        nginx.send(late)
        assert drain(engine, 1) == [(0, late, nginx.getsockname())]  # as it came
        kernel.send(down)
        assert drain(engine, 1) == [(2, down, None)]
        assert recv(kernel, 0.1) is None and recv(nginx, 0.1) is None
        c = engine.counters()
        assert (c["forwarded"], c["returned"], c["tun_writes"]) == (1, 1, 1), c
        engine.set_tun(None)
    finally:
        engine.stop()
        for s in (listen, nginx, tun, kernel):
            s.close()
