"""The QUIC transport end to end: a session over QUIC DATAGRAM frames, and jumps
between UDP, TCP and QUIC in every direction under traffic, loss reported per jump."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest

from gateway.quic_config import server_id_of
from instruments.netsim import QuicShape, RelayStats, UdpRelay
from session import wire
from tests.support.harness import LIVE_STATES, echo_upstream, start_gateway, wait_for

KINDS = ("udp", "tcp", "quic")
RATE_HZ = 200  # datagrams per second while jumping
PER_JUMP_S = 0.5


async def test_a_session_lives_on_quic_datagrams(redis_url: str) -> None:
    gw = await start_gateway(redis_url)
    echo, upstream = await echo_upstream()
    priv, _ = await gw.add_client(upstream)
    got: list[bytes] = []
    agent = gw.agent(priv, upstream, transports=["quic"], on_payload=got.append)
    try:
        await agent.start()
        await agent.wait_connected(5)
        for i in range(50):
            agent.send(f"q-{i}".encode())
        await wait_for(lambda: len(got) >= 50, 5, "echoes over QUIC")
        b = gw.node.bindings[agent.machine.session_id]
        assert b.peer.kind is wire.TransportKind.QUIC
        # A message larger than one DATAGRAM frame holds crosses too (on the stream).
        big = b"B" * wire.MAX_PAYLOAD_SIZE
        agent.send(big)
        await wait_for(lambda: big in got, 5, "a full-size payload over QUIC")
        # The connection ID the gateway chose names the node (QUIC-LB).
        conn = gw.node.quic.conns[b.peer.conn]
        assert server_id_of(conn.quic.host_cid) == gw.node.quic.server_id
        rec = await gw.store.get(agent.machine.session_id)
        assert rec is not None and rec.kind is wire.TransportKind.QUIC
    finally:
        await agent.stop()
        echo.close()
        await gw.app.stop()


def _bound_on(gw: Any, agent: Any, kind: str) -> bool:
    b = gw.node.bindings.get(agent.machine.session_id)
    return b is not None and b.peer.kind.name.lower() == kind


async def test_jumps_between_every_pair_of_transports_under_traffic(redis_url: str) -> None:
    gw = await start_gateway(redis_url)
    echo, upstream = await echo_upstream()
    priv, _ = await gw.add_client(upstream)
    got: set[int] = set()
    agent = gw.agent(priv, upstream, transports=["udp", "quic", "tcp"],
                     on_payload=lambda d: got.add(int(d)))
    pairs = list(itertools.permutations(KINDS, 2))
    seq = itertools.count()
    report: list[str] = []
    try:
        await agent.start()
        await agent.wait_connected(5)
        assert agent.status()["transport"].startswith("udp")
        current = "udp"
        # Visit all six ordered pairs: udp->tcp, tcp->quic, quic->udp, udp->quic, quic->tcp, tcp->udp.
        route = ["tcp", "quic", "udp", "quic", "tcp", "udp"]
        seen_pairs = set()
        for target in route:
            sent = []
            jumps_before = len(agent.jumps)
            loop = asyncio.get_running_loop()
            end = loop.time() + PER_JUMP_S
            jumped = False
            while loop.time() < end:
                n = next(seq)
                agent.send(str(n).encode())
                sent.append(n)
                if not jumped and loop.time() > end - PER_JUMP_S / 2:
                    jumped = True
                    await agent.jump(target, reason=f"{current}->{target}")
                await asyncio.sleep(1 / RATE_HZ)
            await wait_for(lambda n=jumps_before: len(agent.jumps) > n, 5, f"jump to {target}")
            await wait_for(lambda last=sent[-1]: last in got, 5, f"traffic after the jump to {target}")
            lost = [n for n in sent if n not in got]
            report.append(f"{current}->{target}: sent {len(sent)}, lost {len(lost)}")
            seen_pairs.add((current, target))
            # the binding moves once the store activated the grant: poll, do not assume
            await wait_for(lambda t=target: _bound_on(gw, agent, t), 5, f"binding on {target}")
            assert agent.machine.state.name in LIVE_STATES
            current = target
        print("\n".join(report))
        assert seen_pairs == set(pairs), seen_pairs
        # Make-before-break: a proactive jump loses (almost) nothing on loopback.
        for line in report:
            sent_n = int(line.split("sent ")[1].split(",")[0])
            lost_n = int(line.split("lost ")[1])
            assert lost_n <= max(2, sent_n // 20), line
    finally:
        await agent.stop()
        echo.close()
        await gw.app.stop()


@pytest.mark.parametrize("first", ["udp", "tcp"])
async def test_data_on_a_new_quic_connection_needs_its_reattach(redis_url: str, first: str) -> None:
    """Only a REATTACH moves a session onto a new QUIC connection: the machine drops DATA
    that arrives on a QUIC connection other than the binding's (counted UNEXPECTED)."""
    from agent.quic import QuicPath

    gw = await start_gateway(redis_url)
    echo, upstream = await echo_upstream()
    priv, _ = await gw.add_client(upstream)
    agent = gw.agent(priv, upstream, transports=[first])
    other = QuicPath(99, gw.quic, lambda *_: None, lambda *_: None)
    try:
        await agent.start()
        await agent.wait_connected(5)
        sid = agent.machine.session_id
        before = gw.node.bindings[sid].peer
        await other.open()
        # A genuine DATA of the session, copied onto another QUIC connection.
        agent.machine.send(b"copy me", loop_now())
        out = agent.machine.datagrams_to_send()
        assert out
        key = ("UNEXPECTED", "QUIC")
        drops = _drops(gw, key)
        for _, data in out:
            other.send(data)
        await wait_for(lambda: _drops(gw, key) > drops, 5, "the copy dropped")
        assert gw.node.bindings[sid].peer == before
    finally:
        other.close()
        await agent.stop()
        echo.close()
        await gw.app.stop()


def loop_now() -> float:
    return asyncio.get_running_loop().time()


def _drops(gw, key: tuple[str, str]) -> int:  # type: ignore[no-untyped-def]
    return sum(n for (r, t), n in gw.node.metrics.drops.items()
               if getattr(r, "name", r) == key[0] and getattr(t, "name", t) == key[1])


async def _fallback(gw, upstream: str, priv: bytes, transports: list[str],  # type: ignore[no-untyped-def]
                    ) -> tuple[float, str, RelayStats]:
    """UDP to the session port turns QUIC-only (a firewall passing only QUIC): how long the
    agent takes to be back (loss detected -> ACK), and on which transport."""
    relay_udp = await UdpRelay(gw.udp).start()
    relay_quic = await UdpRelay(gw.quic).start()
    relay_quic.quic_only = QuicShape()
    got: list[bytes] = []
    agent = gw.agent(priv, upstream, transports=transports, gateways=[relay_udp.address],
                     quic_gateways=[relay_quic.address], on_payload=got.append)
    try:
        await agent.start()
        await agent.wait_connected(5)
        assert agent.status()["transport"].startswith("udp")
        relay_udp.quic_only = QuicShape()  # from now on only QUIC passes on UDP
        await wait_for(lambda: len(agent.jumps) >= 1, 10, "a fallback")
        jump = agent.jumps[0]
        agent.send(b"after")
        await wait_for(lambda: b"after" in got, 5, "traffic after the fallback")
        return jump.latency, jump.to_transport, relay_udp.stats
    finally:
        await agent.stop()
        relay_udp.close()
        relay_quic.close()


async def test_udp_blocked_but_quic_passes_falls_back_to_quic_before_tcp(redis_url: str) -> None:
    gw = await start_gateway(redis_url)
    echo, upstream = await echo_upstream()
    priv, _ = await gw.add_client(upstream)
    try:
        latency, to, stats = await _fallback(gw, upstream, priv, ["udp", "quic", "tcp"])
        print(f"UDP blocked, QUIC passes: fallback to {to} in {latency * 1000:.0f} ms")
        assert to.startswith("quic"), to
        assert stats.dropped > 0  # the session's own UDP datagrams were dropped
        b = next(iter(gw.node.bindings.values()))
        assert b.peer.kind is wire.TransportKind.QUIC
        # A client whose policy has no QUIC goes on to TCP.
        priv2, _ = await gw.add_client(upstream, transports=("udp", "tcp"))
        latency2, to2, _ = await _fallback(gw, upstream, priv2, ["udp", "quic", "tcp"])
        print(f"QUIC not allowed: fallback to {to2} in {latency2 * 1000:.0f} ms")
        assert to2.startswith("tcp"), to2
    finally:
        echo.close()
        await gw.app.stop()


async def test_a_session_starts_on_quic_when_udp_is_blocked_from_the_start(
        redis_url: str) -> None:
    gw = await start_gateway(redis_url)
    echo, upstream = await echo_upstream()
    priv, _ = await gw.add_client(upstream)
    relay_udp = await UdpRelay(gw.udp).start()
    relay_udp.quic_only = QuicShape()
    agent = gw.agent(priv, upstream, transports=["udp", "quic", "tcp"],
                     gateways=[relay_udp.address])
    try:
        await agent.start()
        await agent.wait_connected(10)
        assert agent.status()["transport"].startswith("quic")
    finally:
        await agent.stop()
        relay_udp.close()
        echo.close()
        await gw.app.stop()
