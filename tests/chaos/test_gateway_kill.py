"""`kill -9` one of three gateway processes while 30 agents send datagrams through nginx.

Every agent of the dead node must notice the silence (3 keepalives of 0.1 s),
reattach through the balancer on a surviving node (nginx routes the new flow
away from the dead upstream: UDP after the refused read marks it failed, TCP
by proxy_next_upstream on the refused connect) and keep its session: the same
session id, ATTACHED, echoes flowing. The figure is the longest interruption
of any agent: the longest time without an echo around the kill.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable

import pytest

from instruments.netsim import UdpEcho
from tests.chaos.conftest import Traffic, signal_gateway, start_agents, stop_agents
from tests.support.harness import LIVE_STATES, wait_for
from tests.support.local_cluster import LocalCluster

pytestmark = pytest.mark.timeout(120)

AGENTS = 30
RECOVERY_S = 10.0  # bound on waiting for every agent to flow again


async def test_kill_one_of_three_gateways_loses_no_session(
        chaos_cluster: Callable[..., LocalCluster], echo: tuple[UdpEcho, str],
        figure: Callable[..., None]) -> None:
    cluster = await asyncio.to_thread(chaos_cluster, 3)
    _, upstream = echo
    agents = await start_agents(cluster, upstream, AGENTS)
    traffic = Traffic(agents).start()
    try:
        await asyncio.sleep(1.0)
        sids = [a.machine.session_id for a, _ in agents]
        # Move every agent to its session-id node first (a session's first flow is hashed
        # by client address, its reattaches by session id): then the kill hits settled sessions.
        await asyncio.gather(*(a.jump("udp", reason="settle") for a, _ in agents))
        await wait_for(lambda: all(len(a.jumps) >= 1 for a, _ in agents), 10.0, "settle jumps")
        await asyncio.sleep(0.5)
        by_node: dict[str, int] = {}
        for a, _ in agents:
            by_node[str(a.status()["node"])] = by_node.get(str(a.status()["node"]), 0) + 1
        victim = max(by_node, key=lambda n: by_node[n])
        on_victim = [i for i, (a, _) in enumerate(agents) if a.status()["node"] == victim]
        jumps_before = [len(a.jumps) for a, _ in agents]

        t_kill = time.monotonic()
        signal_gateway(cluster, victim, signal.SIGKILL)

        def recovered() -> bool:
            return all(a.status()["node"] != victim and a.machine.attached
                       and got.first_after(t_kill + 0.05) is not None
                       and (got.last_before(time.monotonic()) or 0) > a.jumps[-1].at
                       for i, (a, got) in enumerate(agents) if i in on_victim)
        await wait_for(recovered, RECOVERY_S, f"agents of the killed {victim} flowing elsewhere")
        await asyncio.sleep(1.0)  # traffic after recovery, for every agent
        t_end = time.monotonic()
    finally:
        await traffic.stop()
    try:
        gaps = [got.longest_gap(t_kill, t_end) for _, got in agents]
        moved_gaps = [gaps[i] for i in on_victim]
        outages = [a.jumps[-1].outage for i, (a, _) in enumerate(agents)
                   if i in on_victim and len(a.jumps) > jumps_before[i]]
        for i, (a, got) in enumerate(agents):
            st = a.status()
            assert a.machine.session_id == sids[i], f"{a.settings.name}: session replaced"
            assert st["state"] in LIVE_STATES, a.log_lines[-5:]
            assert st["node"] != victim
            assert a.terminated_sessions == 0 and a.handshakes == 1
            assert got.first_after(t_end - 0.5) is not None, f"{a.settings.name}: no echo lately"
        transports = sorted({str(agents[i][0].status()["transport"]).split()[0] for i in on_victim})
        figure("kill9_longest_interruption", max(moved_gaps), "s", agents=AGENTS,
               moved=len(on_victim), victim=victim,
               agent_outage_max=f"{max(outages, default=0):.3f}",
               p50=f"{sorted(moved_gaps)[len(moved_gaps) // 2]:.3f}",
               unaffected_max_gap=f"{max((g for i, g in enumerate(gaps) if i not in on_victim), default=0):.3f}",
               transports="/".join(transports),
               by_hint=sum(any("does not hold our binding" in line for line in agents[i][0].log_lines)
                           for i in on_victim))
        assert max(moved_gaps) < RECOVERY_S
    finally:
        await stop_agents(agents)
