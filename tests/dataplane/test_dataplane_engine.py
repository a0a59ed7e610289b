"""The compiled UDP data path (the engine) in a real gateway: it forwards the plain case
itself, refuses what the design refuses with the same reasons, and hands everything else
to the machine, which still decides (new addresses, keepalives, unknown sessions)."""

from __future__ import annotations

import asyncio
from types import ModuleType

from session import wire
from session.reasons import DropReason
from tests.support.harness import Gateway, echo_upstream, start_gateway, wait_for
from tests.support.rawclient import Endpoint, RawSession

UDP = wire.TransportKind.UDP


def drops(gw: Gateway, reason: DropReason) -> int:
    return int(gw.app.metrics.drops.get((reason, UDP), 0))


async def _payloads(st: RawSession, ep: Endpoint, n: int, timeout: float = 5.0) -> list[bytes]:
    got: list[bytes] = []
    for _ in range(n):
        inner = await st.next_inner(ep, lambda i: i.kind is wire.InnerType.PAYLOAD, timeout)
        got.append(inner.payload)
    return got


async def test_engine_forwards_refuses_and_hands_up(redis_url: str, compiled: ModuleType) -> None:
    gw = await start_gateway(redis_url, data_plane="compiled", udp_engine="on")
    echo, upstream = await echo_upstream()
    try:
        engine = gw.node.engine
        assert engine is not None
        priv, _ = await gw.add_client(upstream)
        st = RawSession(priv, gw.app.keys.public, upstream)
        ep = await Endpoint.udp(gw.udp)
        await st.connect(ep)  # handshake and validation: all through the machine
        assert st.session_id
        await st.keepalive(ep)

        # the plain case: payloads there and back; the first opens the upstream socket
        # through the machine, after it the engine forwards them alone
        ep.send(st.payload_packet(b"first"))
        assert await _payloads(st, ep, 1) == [b"first"]
        sent = [st.payload_packet(b"p%03d" % i) for i in range(100)]
        for raw in sent:
            ep.send(raw)
        got = await _payloads(st, ep, 100)
        assert sorted(got) == sorted(b"p%03d" % i for i in range(100))
        c = engine.counters()
        assert c["forwarded"] == 100 and c["returned"] >= 100, c  # and the first reply
        # the engine's holding of the binding's keys is on record, as the node's decisions are
        held = [e.doc["jvpn"] for e in gw.events if e.doc.get("event", {}).get("action")
                == "binding" and e.doc["jvpn"].get("phase", "").startswith("engine_")]
        assert [(j["phase"], j["session_id"], j["epoch"]) for j in held] == [
            ("engine_install", st.session_id.hex(), 1)], held
        # the engine's work reaches the node's metrics (copied in at the next timer)
        await wait_for(lambda: gw.app.metrics.engine.get("forwarded", 0) >= 100, 5, "metrics")
        text = gw.app.metrics.exposition().decode()
        assert 'jvpn_engine_packets_total{path="forwarded"}' in text
        assert 'jvpn_engine_syscalls_total{call="recvmmsg"}' in text

        # refusals: a replay and a forgery, counted by the same reasons as the machine's
        before = (drops(gw, DropReason.REPLAYED), drops(gw, DropReason.BAD_AEAD))
        ep.send(sent[50])
        forged = bytearray(st.payload_packet(b"forged"))
        forged[-1] ^= 1
        ep.send(bytes(forged))
        await wait_for(lambda: (drops(gw, DropReason.REPLAYED) > before[0]
                                and drops(gw, DropReason.BAD_AEAD) > before[1]), 5,
                       "the replay and the forgery counted")
        assert await ep.quiet(0.2) == []

        # a keepalive goes to the machine (which answers it) and is accepted exactly once:
        # the machine opened it through the channel it shares with the engine
        ka = st.keepalive_packet(seq=9)
        ep.send(ka)
        await st.next_inner(ep, lambda i: i.kind is wire.InnerType.KEEPALIVE_ACK)
        replayed = drops(gw, DropReason.REPLAYED)
        ep.send(ka)
        await wait_for(lambda: drops(gw, DropReason.REPLAYED) > replayed, 5, "the replayed keepalive")

        # a packet of the session from a new address goes to the machine, which challenges
        # the address; until it answers, payloads are the machine's again (3x budget)
        b = gw.node.bindings[st.session_id]
        other = await Endpoint.udp(gw.udp)
        other.send(st.payload_packet(b"from elsewhere"))
        await wait_for(lambda: bool(gw.node.bindings[st.session_id].probes), 5, "a path probe")
        inner = await st.next_inner(other, lambda i: i.kind is wire.InnerType.PATH_CHALLENGE)
        assert gw.node.engine_path.mirror is not None and not gw.node.engine_path.mirror.fast(b)
        other.send(st.seal(wire.inner_path_response(inner.payload)))
        await wait_for(lambda: gw.node.bindings[st.session_id].peer.addr == other.local, 5,
                       "the move to the validated address")
        fwd = engine.counters()["forwarded"]
        for i in range(20):
            other.send(st.payload_packet(b"q%02d" % i))
        assert len(await _payloads(st, other, 20)) == 20
        assert engine.counters()["forwarded"] >= fwd + 19  # fast again on the new address

        # an unknown session is the machine's: it is counted there, as without the engine
        unknown = drops(gw, DropReason.UNKNOWN_SESSION)
        ghost = bytearray(st.payload_packet(b"ghost"))
        ghost[4:20] = b"\x00" * 16
        other.send(bytes(ghost))
        await wait_for(lambda: drops(gw, DropReason.UNKNOWN_SESSION) > unknown, 5, "unknown")
        ep.close()
        other.close()
    finally:
        echo.close()
        await gw.app.stop()
        await asyncio.sleep(0)


async def test_engine_stops_forwarding_when_the_lease_lapses(redis_server, compiled: ModuleType) -> None:  # type: ignore[no-untyped-def]
    gw = await start_gateway(redis_server.url, data_plane="compiled", udp_engine="on", lease_s=0.5)
    echo, upstream = await echo_upstream()
    try:
        priv, _ = await gw.add_client(upstream)
        st = RawSession(priv, gw.app.keys.public, upstream)
        ep = await Endpoint.udp(gw.udp)
        await st.connect(ep)
        await st.keepalive(ep)
        ep.send(st.payload_packet(b"first"))
        assert await _payloads(st, ep, 1) == [b"first"]
        redis_server.stop()  # the store goes silent: the lease lapses within lease_s
        await asyncio.sleep(0.8)  # past the lease: what the engine does now is the point
        lapsed = gw.node.engine.counters()["drop_17"]
        for i in range(10):
            ep.send(st.payload_packet(b"late %d" % i))
        await wait_for(lambda: gw.node.engine.counters()["drop_17"] >= lapsed + 10, 5,
                       "LEASE_EXPIRED drops in the engine")
        assert not [r for r in await ep.quiet(0.2)
                    if wire.peek_header(r)[0] is wire.MessageType.DATA
                    and st.open(r).kind is wire.InnerType.PAYLOAD]
    finally:
        echo.close()
        await gw.app.stop()


async def test_an_upstream_named_by_host_name_is_carried(redis_url: str, compiled: ModuleType) -> None:
    """The engine opens upstream sockets by address only: a policy's upstream given by name
    (compose's "echo:9000") takes the asyncio path for the flows opened before the node
    resolved it, and the engine for the flows after; both get their replies."""
    gw = await start_gateway(redis_url, data_plane="compiled", udp_engine="on")
    echo, upstream = await echo_upstream()
    named = "localhost:" + upstream.rsplit(":", 1)[1]
    try:
        engine = gw.node.engine
        assert engine is not None
        priv, _ = await gw.add_client(named)
        st = RawSession(priv, gw.app.keys.public, named)
        ep = await Endpoint.udp(gw.udp)
        await st.connect(ep)
        assert st.session_id
        await st.keepalive(ep)

        async def flow_echo(flow: int, data: bytes) -> None:
            ep.send(st.seal(wire.inner_flow_payload(flow, data)))
            inner = await st.next_inner(
                ep, lambda i: i.kind is wire.InnerType.FLOW_PAYLOAD and i.payload == data)
            assert inner.flow == flow

        await flow_echo(1, b"before the name is known")  # the asyncio path
        await wait_for(lambda: "localhost" in gw.node.upstreams.resolved, 5, "the name resolved")
        forwarded = engine.counters()["forwarded"]
        await flow_echo(2, b"opened by the machine")  # the engine opens flow 2's socket
        await flow_echo(2, b"carried by the engine")
        assert engine.counters()["forwarded"] > forwarded
        await flow_echo(1, b"flow 1 stays where it opened")
        ep.close()
    finally:
        echo.close()
        await gw.app.stop()
        await asyncio.sleep(0)
