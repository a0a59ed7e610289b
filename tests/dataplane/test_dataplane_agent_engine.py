"""The agent's compiled UDP data path: an application's datagrams through the local port,
the session and back, the engine reading the agent's sockets; it keeps working across a
jump to a new path (the machine decides, the engine follows) and a silent path death.
The application's datagrams travel as flows (one per local source): the agent assigns a new
source its flow, then both engines carry it, each reply to its own source."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import replace
from types import ModuleType

from agent.agent import Agent, AgentSettings
from tests.support.harness import FAST, echo_upstream, start_gateway, wait_for


class App:
    """The local application: a UDP socket that sends numbered datagrams to the agent."""

    def __init__(self, agent_port: tuple[str, int]) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.sock.connect(agent_port)
        self.got: set[bytes] = set()
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._read)

    def _read(self) -> None:
        for _ in range(256):
            try:
                self.got.add(self.sock.recv(4096))
            except BlockingIOError:
                return

    def send(self, data: bytes) -> None:
        self.sock.send(data)

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()


async def _round(app: App, agent: Agent, tag: str, n: int) -> None:
    """Send ``n`` datagrams; wait until most come back (the tunnel is UDP: a jump may lose a
    few). The first one alone: the gateway opens the flow's upstream socket meanwhile."""
    first = f"{tag}-first".encode()
    for _ in range(50):  # bounded: 50 tries of 0.2 s
        app.send(first)
        with contextlib.suppress(AssertionError):
            await wait_for(lambda: first in app.got, 0.2, f"the first of {tag}")
            break
    assert first in app.got, f"no echo of the first datagram of {tag}"
    want = {f"{tag}-{i}".encode() for i in range(n)}
    for i in range(n):
        app.send(f"{tag}-{i}".encode())
        if i % 16 == 15:
            await asyncio.sleep(0.002)  # paced: no burst beyond the sockets' buffers
    await wait_for(lambda: len(app.got & want) >= n * 0.9, 10, f"echoes of {tag}")


async def test_agent_engine_end_to_end_and_across_jumps(redis_url: str, compiled: ModuleType) -> None:
    gw = await start_gateway(redis_url, data_plane="compiled", udp_engine="on")
    echo, upstream = await echo_upstream()
    priv, _ = await gw.add_client(upstream)
    settings = AgentSettings(
        private_key=priv, gateway_public_key=gw.app.keys.public, gateways=[gw.udp],
        tcp_gateways=[gw.tcp], upstream=upstream, local_udp=("127.0.0.1", 0),
        transports=["udp", "tcp"], params=replace(FAST, upstream=upstream), name="engine",
        engine=True)
    agent = Agent(settings)
    app: App | None = None
    try:
        await agent.start()
        await agent.wait_connected(5)
        assert agent.engine is not None and agent.local_address is not None
        app = App(agent.local_address)
        await _round(app, agent, "a", 200)
        c = agent.engine.counters()
        assert c["rx_packets"] >= 360, c  # read by the engine
        # the first datagram of the source went up (the agent gave it flow 1); the rest of
        # its flow is the engines' both ways
        assert c["forwarded"] >= 150 and c["returned"] >= 150, c
        assert gw.node.engine.counters()["forwarded"] >= 150
        assert agent.engine.flow_times()[0][0] == 1

        # a second local source: its own flow, its own upstream socket, replies kept apart
        other = App(agent.local_address)
        try:
            await _round(other, agent, "o", 100)
            assert not any(d.startswith(b"o-") for d in app.got)
            assert not any(d.startswith(b"a-") for d in other.got)
            assert sorted(f for f, _ in agent.engine.flow_times()) == [1, 2]
        finally:
            other.close()

        await agent.jump("udp", reason="test")  # a new source port: the machine reattaches
        await wait_for(lambda: len(agent.jumps) >= 1, 5, "the jump")
        await _round(app, agent, "b", 200)
        agent.kill_transport()  # silent death: the machine notices, the engine follows
        await wait_for(lambda: len(agent.jumps) >= 2, 10, "the recovery")
        await _round(app, agent, "c", 200)
        assert agent.engine.counters()["rx_packets"] > c["rx_packets"] + 500
        assert agent.machine.state.name in ("ATTACHED", "VOLATILE", "DEGRADED")
    finally:
        if app is not None:
            app.close()
        await agent.stop()
        echo.close()
        await gw.app.stop()


def test_engine_sockets_get_large_buffers(compiled: ModuleType) -> None:
    """The sockets the engine reads (the application's port, each path) ask for 4 MiB both
    ways: with the 208 KiB default a burst the engine's thread meets late overflows them
    (the loss that bounded the loopback bench's rate)."""
    want = 4 << 20
    with open("/proc/sys/net/core/rmem_max") as f:
        cap = int(f.read())
    local = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    path = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        local.bind(("127.0.0.1", 0))
        path.connect(("127.0.0.1", 9))
        before = local.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        engine = compiled.AgentEngine(local.fileno(), 256)
        engine.add_path(1, path.fileno())
        for sock in (local, path):  # the engine holds duplicates of the same sockets
            got = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            assert got >= 2 * min(want, cap) > 0, (got, cap)  # the kernel reports double
        assert local.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) > before
        engine.stop()
    finally:
        local.close()
        path.close()
