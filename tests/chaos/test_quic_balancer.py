"""QUIC through the nginx balancer, three real gateways, one killed.

Six agents speak only QUIC, each through its own NAT (a user-space relay) to nginx's
QUIC port. A connection's first flow is hashed; the gateway it reached chose
connection IDs naming itself (QUIC-LB style). When the NATs rebind (new source ports:
each a new nginx flow that starts with a short-header packet), jvpn.quicPreread routes
the new flow by connection ID to the same node: no agent reattaches, each keeps its
QUIC connection and node. (Hashing the new flow instead would send each agent to its
connection ID's hash node, the right one for one agent in three: all six staying put
by chance is a 1-in-729 event.) Then the node holding the most agents is killed
(SIGKILL): its agents notice the silence and reattach over new QUIC connections,
which nginx hashes to surviving nodes; every session (same id) goes on.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

import pytest

from agent.agent import Agent
from instruments.netsim import UdpEcho, UdpRelay
from tests.chaos.conftest import Echoes, agent_settings, register_client, signal_gateway
from tests.support.harness import LIVE_STATES, wait_for
from tests.support.local_cluster import LocalCluster

pytestmark = pytest.mark.timeout(120)

AGENTS = 6
REBINDS = 2


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def test_quic_through_nginx_routes_by_connection_id_and_survives_a_node_kill(
        chaos_cluster: Callable[..., LocalCluster], echo: tuple[UdpEcho, str],
        figure: Callable[..., None]) -> None:
    cluster = await asyncio.to_thread(chaos_cluster, 3)
    _, upstream = echo
    quic = _addr(cluster.state["balancer"]["quic"])
    relays = [await UdpRelay(quic).start() for _ in range(AGENTS)]
    privs = await asyncio.gather(*(register_client(cluster, upstream) for _ in range(AGENTS)))
    agents: list[tuple[Agent, Echoes]] = []
    for i, (priv, relay) in enumerate(zip(privs, relays, strict=True)):
        got = Echoes()
        settings = replace(agent_settings(cluster, priv, upstream, f"quic-{i}"),
                           transports=["quic"], quic_gateways=[relay.address])
        agents.append((Agent(settings, on_payload=got), got))
    running = True

    async def traffic() -> None:
        seq = 0
        while running:
            for a, _ in agents:
                a.send(seq.to_bytes(4, "big") + b"q" * 60)
            seq += 1
            await asyncio.sleep(0.02)

    task = None
    try:
        for a, _ in agents:
            await a.start()
        await asyncio.gather(*(a.wait_connected(10) for a, _ in agents))
        task = asyncio.ensure_future(traffic())
        nodes = [str(a.status()["node"]) for a, _ in agents]
        sids = [a.machine.session_id for a, _ in agents]
        await wait_for(lambda: all(len(g.times) > 10 for _, g in agents), 5, "echoes")

        for r in range(REBINDS):
            before = [len(g.times) for _, g in agents]
            for relay in relays:
                relay.rebind()
            await wait_for(lambda b=before: all(len(g.times) > n + 10
                                                for (_, g), n in zip(agents, b, strict=True)),
                           5, f"echoes after rebind {r}")
        for (a, _), node in zip(agents, nodes, strict=True):
            assert a.jumps == [], f"{a.settings.name} reattached: {a.log_lines[-3:]}"
            assert str(a.status()["node"]) == node

        victim = Counter(nodes).most_common(1)[0][0]
        moved = [i for i, n in enumerate(nodes) if n == victim]
        t_kill = time.monotonic()
        signal_gateway(cluster, victim, signal.SIGKILL)

        def recovered() -> bool:
            now = time.monotonic()
            return all(agents[i][0].jumps and str(agents[i][0].status()["node"]) != victim
                       and (agents[i][1].last_before(now) or 0) > agents[i][0].jumps[-1].at
                       for i in moved)
        await wait_for(recovered, 15, "the killed node's sessions on survivors over new QUIC")
        await asyncio.sleep(0.5)
        t_end = time.monotonic()
        for i, (a, got) in enumerate(agents):
            st = a.status()
            assert a.machine.session_id == sids[i] and st["state"] in LIVE_STATES
            assert str(st["transport"]).startswith("quic") and st["node"] != victim
            assert a.handshakes == 1 and a.terminated_sessions == 0
            assert got.first_after(t_end - 0.4) is not None, f"{a.settings.name}: no echo lately"
        gaps = [agents[i][1].longest_gap(t_kill, t_end) for i in moved]
        figure("quic_node_kill_longest_interruption", max(gaps), "s", victim=victim,
               moved=len(moved), agents=AGENTS,
               reattach_ms=[round(agents[i][0].jumps[-1].latency * 1000) for i in moved])
    finally:
        running = False
        if task is not None:
            task.cancel()
        for a, _ in agents:
            await a.stop()
        for relay in relays:
            relay.close()
