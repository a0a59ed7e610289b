"""Hostile QUIC input at a real gateway's QUIC listener: garbage, truncated Initials,
floods of well-formed Initials (from one source and from many). The gateway keeps
serving: a legitimate agent still attaches over QUIC and tunnels, every refusal is
counted, and the connections still in their handshake stay within their caps."""

from __future__ import annotations

import asyncio
import random
import socket

from qh3.quic.configuration import QuicConfiguration
from qh3.quic.connection import QuicConnection

from agent.quic import client_configuration
from session import wire
from session.reasons import DropReason
from tests.support.harness import echo_upstream, start_gateway, wait_for

SEED = 1313
FLOOD_ONE_SOURCE = 200  # real Initials from 127.0.0.2 (the per-source cap)
FLOOD_MANY_SOURCES = 400  # real Initials from 127.0.0.3-127.0.0.42 (the global cap, Retry)


def initial(now: float, config: QuicConfiguration | None = None) -> bytes:
    """A genuine client Initial datagram (>= 1200 bytes, a fresh connection)."""
    q = QuicConnection(configuration=config or client_configuration())
    q.connect(("127.0.0.1", 443), now=now)
    return q.datagrams_to_send(now=now)[0][0]


def sender(source: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    s.bind((source, 0))
    return s


def drops(gw, reason: DropReason) -> int:  # type: ignore[no-untyped-def]
    return gw.node.metrics.drops.get((reason, wire.TransportKind.QUIC), 0)


async def test_hostile_quic_input_does_not_stall_the_gateway(redis_url: str) -> None:
    rng = random.Random(SEED)
    gw = await start_gateway(redis_url, quic_handshake_timeout_s=2.0)
    echo, upstream = await echo_upstream()
    priv, _ = await gw.add_client(upstream)
    listener = gw.node.quic
    target = gw.quic
    socks: list[socket.socket] = []
    got: list[bytes] = []
    agent = gw.agent(priv, upstream, transports=["quic"], on_payload=got.append)
    peak = 0

    def watch() -> None:
        nonlocal peak
        peak = max(peak, listener.handshaking)

    try:
        loop = asyncio.get_running_loop()
        now = loop.time()
        one = sender("127.0.0.1")
        socks.append(one)
        # Garbage of every size, QUIC-looking or not; short headers for no connection.
        for _ in range(500):
            n = rng.randrange(0, 1500)
            data = bytes(rng.getrandbits(8) for _ in range(n))
            one.sendto(data, target)
        for _ in range(100):
            one.sendto(bytes([0x40 | rng.randrange(0x40)]) + rng.randbytes(40), target)
        # Truncated Initials, and an Initial of an unknown version.
        real = initial(now)
        for cut in (1, 5, 7, 30, 100, 600, 1199):
            one.sendto(real[:cut], target)
        unknown = bytearray(real)
        unknown[1:5] = b"\x0a\x0a\x0a\x0a"
        one.sendto(bytes(unknown), target)
        await asyncio.sleep(0)
        # A flood of genuine Initials from one source, then from many.
        flooder = sender("127.0.0.2")
        socks.append(flooder)
        for i in range(FLOOD_ONE_SOURCE):
            flooder.sendto(initial(now), target)
            if i % 20 == 0:
                watch()
                await asyncio.sleep(0)
        many = [sender(f"127.0.0.{3 + i}") for i in range(40)]
        socks.extend(many)
        for i in range(FLOOD_MANY_SOURCES):
            many[i % len(many)].sendto(initial(now), target)
            if i % 20 == 0:
                watch()
                await asyncio.sleep(0)
        watch()
        # Meanwhile a legitimate agent attaches over QUIC and tunnels.
        t0 = loop.time()
        await agent.start()
        await agent.wait_connected(10)
        attach_s = loop.time() - t0
        for i in range(20):
            agent.send(f"legit-{i}".encode())
        await wait_for(lambda: len(got) >= 20, 5, "the legitimate agent's echoes")
        watch()
        print(f"legitimate agent attached {attach_s * 1000:.0f} ms into the flood; "
              f"peak handshaking {peak}; drops {dict(gw.node.metrics.drops)}")
        lim = listener.limits
        assert peak <= lim.max_handshaking
        assert drops(gw, DropReason.MALFORMED) > 0
        assert drops(gw, DropReason.TRUNCATED) >= 4  # whole-header cuts under 1200 bytes
        assert drops(gw, DropReason.BAD_VERSION) == 1
        assert drops(gw, DropReason.QUIC_LIMIT) > 0  # the per-source cap refused the flood
        # The half-open connections of the flood are discarded by their deadline.
        await wait_for(lambda: listener.handshaking == 0, 10, "flood connections discarded")
        assert len(listener.conns) == 1  # the agent's
    finally:
        for s in socks:
            s.close()
        await agent.stop()
        echo.close()
        await gw.app.stop()
