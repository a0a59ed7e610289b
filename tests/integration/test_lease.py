"""The node lease: a node whose store stops answering stops forwarding (fail closed)."""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import replace

from session.reasons import DropReason
from session.states import SessionState
from tests.support.harness import FAST, echo_upstream, start_gateway, wait_for


async def test_node_stops_forwarding_when_its_lease_lapses_and_resumes_after(redis_server) -> None:  # type: ignore[no-untyped-def]
    gw = await start_gateway(redis_server.url, lease_s=0.6, store_timeout_s=0.2)
    echo, upstream = await echo_upstream()
    priv, _ = await gw.add_client(upstream)
    got: list[bytes] = []
    # A patient agent (gives up after 3 s of silence) keeps using the binding past the lease.
    agent = gw.agent(priv, upstream, on_payload=got.append, params=replace(FAST, dead_after=30))
    pid = redis_server.pid
    assert pid is not None
    paused = False
    try:
        await agent.start()
        await agent.wait_connected(5)
        sid = agent.machine.session_id
        agent.send(b"warm-up")
        await wait_for(lambda: b"warm-up" in got, 5, "first echo")

        os.kill(pid, signal.SIGSTOP)  # the store hangs: no answers, no errors
        paused = True
        await asyncio.sleep(1.0)  # past the 0.6 s lease
        before = echo.received
        for i in range(10):
            agent.send(f"during-{i}".encode())
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        assert echo.received == before, "a node past its lease must not forward"
        assert not any(g.startswith(b"during-") for g in got)
        assert agent.machine.state is not SessionState.RECOVERING
        assert gw.app.metrics.drops.get((DropReason.LEASE_EXPIRED, _udp()), 0) >= 10
        ready, why = await gw.node.ready()
        assert not ready and "store" in why

        os.kill(pid, signal.SIGCONT)
        paused = False
        await wait_for(lambda: agent.machine.state is SessionState.ATTACHED, 10, "attached again")
        for i in range(10):
            agent.send(f"after-{i}".encode())
        await wait_for(lambda: sum(g.startswith(b"after-") for g in got) >= 10, 5, "echoes after")
        assert agent.machine.session_id == sid  # the same session, never a silent reset
        assert any(e.action == "lease_lapsed" for e in gw.events)
    finally:
        if paused:
            os.kill(pid, signal.SIGCONT)
        await agent.stop()
        echo.close()
        await gw.app.stop()


def _udp():  # type: ignore[no-untyped-def]
    from session.wire import TransportKind

    return TransportKind.UDP
