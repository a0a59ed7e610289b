"""UDP-forward mode: two programs sharing the agent's local port each get their own replies.

Each local source address is a flow (FLOW_PAYLOAD, a 16-bit id in the encrypted DATA);
the gateway keeps one upstream socket per flow and tags replies with it. Before flows,
one program got 20 replies (10 of them the other's) and the other none.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from agent.agent import Agent, AgentSettings
from tests.support.harness import FAST, echo_upstream, start_gateway, wait_for


class _App(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.got: list[bytes] = []

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.got.append(data)


async def test_two_programs_on_the_agents_port_get_only_their_own_replies(
        redis_url: str) -> None:
    gw = await start_gateway(redis_url)
    echo, upstream = await echo_upstream()
    priv, _ = await gw.add_client(upstream)
    agent = Agent(AgentSettings(
        private_key=priv, gateway_public_key=gw.app.keys.public, gateways=[gw.udp],
        tcp_gateways=[gw.tcp], upstream=upstream, local_udp=("127.0.0.1", 0),
        params=replace(FAST, upstream=upstream)))
    loop = asyncio.get_running_loop()
    apps: list[tuple[asyncio.DatagramTransport, _App]] = []
    try:
        await agent.start()
        await agent.wait_connected(5)
        local = agent.local_address
        assert local is not None
        for _ in range(2):
            t, p = await loop.create_datagram_endpoint(_App, remote_addr=local)
            apps.append((t, p))
        for i in range(10):
            for n, (t, _) in enumerate(apps):
                t.sendto(b"app%d-%d" % (n, i))
        await wait_for(lambda: all(len(p.got) >= 10 for _, p in apps), 5, "10 replies each")
        await asyncio.sleep(0.1)  # nothing else arrives late
        for n, (_, p) in enumerate(apps):
            assert sorted(p.got) == sorted(b"app%d-%d" % (n, i) for i in range(10)), p.got
        agent.kill_transport()  # flows survive a reattach: same ids, same upstream sockets
        await wait_for(lambda: len(agent.jumps) >= 1, 5, "a reattach")
        apps[1][0].sendto(b"app1-after")
        await wait_for(lambda: b"app1-after" in apps[1][1].got, 5, "the reply after the jump")
        assert b"app1-after" not in apps[0][1].got
    finally:
        for t, _ in apps:
            t.close()
        await agent.stop()
        echo.close()
        await gw.app.stop()
