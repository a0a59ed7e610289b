"""Refusals are final where they should be: a real agent against a real gateway.

A revoked client's agent is closed (authenticated), re-handshakes, is refused
(authenticated UNKNOWN_CLIENT) a bounded number of times with a growing delay,
then stops with a non-zero exit and a message saying what to fix. An agent that
never attached exits non-zero too.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from agent.cli import EXIT_NEVER_ATTACHED, EXIT_REFUSED, exit_code
from session.reasons import RejectReason
from tests.support.harness import FAST, echo_upstream, start_gateway


async def test_a_revoked_agent_stops_after_bounded_backoff_with_advice(
        redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    gw = await start_gateway(redis_url)
    echo, upstream = await echo_upstream()
    priv, pub = await gw.add_client(upstream)
    agent = gw.agent(priv, upstream, params=replace(FAST, refusals_final=4))
    try:
        await agent.start()
        await agent.wait_connected(5)
        await gw.store.revoke_client(pub)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        # 4 refusals with backoff 0.05, 0.1, 0.2 between them: well under 10 s on a busy box.
        await asyncio.wait_for(agent.finished.wait(), 10)
        assert loop.time() - t0 < 10
        refused = agent.machine.refused
        assert refused is not None and refused.reason is RejectReason.UNKNOWN_CLIENT
        assert agent.handshakes == 1 + 4  # the first session, then exactly the bounded retries
        await agent.stop()
        assert exit_code(agent) == EXIT_REFUSED
        err = capsys.readouterr().err
        assert "UNKNOWN_CLIENT" in err and "jvpn clients add" in err
    finally:
        await agent.stop()
        echo.close()
        await gw.app.stop()


async def test_an_agent_that_never_attached_exits_non_zero(
        redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    gw = await start_gateway(redis_url)
    echo, upstream = await echo_upstream()
    priv, _ = await gw.add_client(upstream)
    agent = gw.agent(priv, upstream, transports=["udp"], gateways=[("127.0.0.1", 9)])
    try:
        await agent.start()
        await agent.stop()
        assert not agent.ever_attached and agent.machine.refused is None
        assert exit_code(agent) == EXIT_NEVER_ATTACHED
        assert "never attached" in capsys.readouterr().err
    finally:
        await agent.stop()
        echo.close()
        await gw.app.stop()
