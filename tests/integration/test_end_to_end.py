"""End to end through real sockets and a real redis-server: flow, kill, reattach, resume."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp

from tests.support.harness import echo_upstream, start_gateway, wait_for


async def poll(check: Callable[[], bool], timeout: float) -> bool:
    """Whether ``check`` holds within ``timeout`` (polled; never raises)."""
    try:
        await wait_for(check, timeout, "")
    except AssertionError:
        return False
    return True


async def test_datagrams_flow_then_survive_a_killed_transport(redis_url: str) -> None:
    gw = await start_gateway(redis_url)
    echo, upstream = await echo_upstream()
    priv, _ = await gw.add_client(upstream)
    got: list[bytes] = []
    agent = gw.agent(priv, upstream, on_payload=got.append)
    try:
        await agent.start()
        await agent.wait_connected(5)
        v0, e0 = agent.machine.version, agent.machine.epoch
        for i in range(20):
            agent.send(f"before-{i}".encode())
        await wait_for(lambda: len(got) >= 20, 5, "echoes before the kill")

        agent.kill_transport()  # silent death: the agent must notice by keepalive silence
        await wait_for(lambda: len(agent.jumps) >= 1, 5, "a reattach")
        # The new path carries data once the grant is active: probe until one echo is back
        # (a datagram sent while the grant is still PENDING may be lost, as on any jump).
        for n in range(50):  # bounded: 50 probes of 0.2 s
            agent.send(f"probe-{n}".encode())
            if await poll(lambda: any(g.startswith(b"probe-") for g in got), 0.2):
                break
        assert any(g.startswith(b"probe-") for g in got), "no echo on the new path"
        for i in range(20):
            agent.send(f"after-{i}".encode())
        await wait_for(lambda: sum(g.startswith(b"after-") for g in got) >= 20, 5, "echoes after")

        m = agent.machine
        assert m.version > v0 and m.epoch > e0
        await wait_for(lambda: bool(gw.actions("transport_switch")), 5, "TRANSPORT_SWITCH event")
        assert any(d["jvpn.to_state"] == "ATTACHED" for d in gw.actions("state_change"))
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{gw.app.admin_port}/metrics") as r:
                text = await r.text()
        assert 'jvpn_transport_switch_total{' in text
        switch = [ln for ln in text.splitlines() if ln.startswith("jvpn_transport_switch_total{")]
        assert sum(float(ln.rsplit(" ", 1)[1]) for ln in switch) >= 1
        assert any(ln.startswith("jvpn_state_change_total{") for ln in text.splitlines())
    finally:
        await agent.stop()
        echo.close()
        await gw.app.stop()
        await asyncio.sleep(0)


async def test_admin_terminate_closes_the_client_authenticated_and_it_rehandshakes(
        redis_url: str) -> None:
    from session.reasons import TerminateReason
    from session.states import SessionState

    gw = await start_gateway(redis_url)
    echo, upstream = await echo_upstream()
    priv, _ = await gw.add_client(upstream)
    agent = gw.agent(priv, upstream)
    try:
        await agent.start()
        await agent.wait_connected(5)
        first = agent.machine.session_id
        res = await gw.store.terminate(first, TerminateReason.ADMIN)
        assert res.ok
        await gw.store.publish_binding_change(first, "-", 0)
        await wait_for(lambda: agent.terminated_sessions == 1, 5, "authenticated close")
        await wait_for(lambda: agent.machine.state is SessionState.ATTACHED
                       and agent.machine.session_id != first, 5, "a new session")
        rec = await gw.store.get(first)
        assert rec is not None and rec.state is SessionState.TERMINATED
        assert rec.terminate_reason is TerminateReason.ADMIN
        assert any("session terminated" in line for line in agent.log_lines)
    finally:
        await agent.stop()
        echo.close()
        await gw.app.stop()
