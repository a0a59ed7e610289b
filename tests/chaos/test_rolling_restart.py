"""Rolling restart of every gateway, one at a time, under traffic: no session lost.

``jvpn-lab cluster restart gw-N`` stops one gateway (SIGTERM, the recorded pid
only) and starts it again on the same ports. Its agents notice the silence
and reattach through nginx on another node; after each restart every agent
must be ATTACHED with its original session id and its echoes flowing before
the next node goes. The figure is the longest interruption of any agent.

Measured: 0.32-0.38 s (silence detection, 3 x 0.1 s, plus the reattach), no
reattach over TCP (asserted). ``restart`` reloads nginx once the gateway is ready: nginx
demotes a restarted upstream until one of its flows ends, and UDP flows of
live sessions do not end, so without the reload (``--no-reload``) every
session ended up on the last node, and when that one restarted no UDP upstream
was live ("no live upstreams"): 1.4 s interruptions, the agents falling back
to TCP. See deploy/README.md.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from instruments.netsim import UdpEcho
from tests.chaos.conftest import Traffic, start_agents, stop_agents
from tests.support.harness import LIVE_STATES, wait_for
from tests.support.local_cluster import LocalCluster

pytestmark = pytest.mark.timeout(150)

AGENTS = 12
GATEWAYS = 3


async def test_rolling_restart_loses_no_session(
        chaos_cluster: Callable[..., LocalCluster], echo: tuple[UdpEcho, str],
        figure: Callable[..., None]) -> None:
    cluster = await asyncio.to_thread(chaos_cluster, GATEWAYS)
    _, upstream = echo
    agents = await start_agents(cluster, upstream, AGENTS)
    sids = [a.machine.session_id for a, _ in agents]
    pids_before = {g["node_id"]: g["pid"] for g in cluster.state["gateways"]}
    traffic = Traffic(agents).start()
    moved = 0
    try:
        await asyncio.sleep(0.5)
        t_start = time.monotonic()
        for node in sorted(pids_before):
            holders = [a for a, _ in agents if a.status()["node"] == node]
            moved += len(holders)
            t_node = time.monotonic()
            await asyncio.to_thread(cluster.restart, node)

            def flowing(t: float = t_node) -> bool:
                return all(a.machine.attached
                           and (got.last_before(time.monotonic()) or 0) > t + 0.05
                           for a, got in agents)
            await wait_for(flowing, 10.0, f"every agent flowing after restarting {node}")
            await asyncio.sleep(0.5)
        t_end = time.monotonic()
    finally:
        await traffic.stop()
    try:
        bad = await asyncio.to_thread(cluster.cli, "restart", "gw-9")
        assert bad.returncode == 1 and "no gateway 'gw-9'" in bad.stderr, bad.stderr
        pids_after = {g["node_id"]: g["pid"] for g in cluster.state["gateways"]}
        assert all(pids_after[n] != pids_before[n] for n in pids_before), (pids_before, pids_after)
        # Each restart reloaded nginx (fresh upstream health: no restarted node stays demoted).
        nginx_log = (cluster.run_dir / "logs" / "nginx.error.log").read_text()
        assert nginx_log.count("(SIGHUP) received") == GATEWAYS, nginx_log[-2000:]
        gaps = [got.longest_gap(t_start, t_end) for _, got in agents]
        for i, (a, got) in enumerate(agents):
            assert a.machine.session_id == sids[i], f"{a.settings.name}: session replaced"
            assert a.status()["state"] in LIVE_STATES and a.terminated_sessions == 0
            assert a.handshakes == 1, a.log_lines[-10:]
            assert got.first_after(t_end - 0.4) is not None
    finally:
        await stop_agents(agents)
    over_tcp = [j for a, _ in agents for j in a.jumps if j.to_transport.startswith("tcp")]
    figure("rolling_restart_longest_interruption", max(gaps), "s", gateways=GATEWAYS,
           agents=AGENTS, reattaches=moved, p50=f"{sorted(gaps)[len(gaps) // 2]:.3f}",
           total=f"{t_end - t_start:.1f}s", reattaches_over_tcp=len(over_tcp))
    # A live UDP node was always there to move to (the reloads cleared nginx's marks):
    # nobody had to spend its UDP retries and fall back to TCP.
    assert not over_tcp, [(j.reason, j.from_transport, j.to_transport) for j in over_tcp]
