"""``jvpn audit check`` on a deployment's audit stream: two real gateways on one real
redis-server write their records to ``jvpn:audit``; an agent moves between them and
closes; the check passes, and fails once a record that contradicts it is added."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from agent.agent import Agent
from jvpn.cli import main
from tests.support.harness import echo_upstream, start_gateway, wait_for


async def test_audit_check_on_the_audit_stream(redis_url: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    echo, upstream = await echo_upstream()
    a = await start_gateway(redis_url, "gw-a", **{"events.redis_stream": True})
    b = await start_gateway(redis_url, "gw-b", **{"events.redis_stream": True})
    records = tmp_path / "agent.jsonl"
    try:
        priv, _ = await a.add_client(upstream)
        agent = Agent(replace(a.agent(priv, upstream).settings, records_file=str(records)))
        await agent.start()
        await agent.wait_connected(5.0)
        await agent.jump("udp", remote=b.udp)
        await wait_for(lambda: bool(agent.jumps), 5.0, "the jump to gw-b")
        sid = agent.machine.session_id
        await agent.stop()  # CLOSE: gw-b ends the session
        await wait_for(lambda: sid not in b.app.node.bindings and sid not in a.app.node.bindings,
                       5.0, "both nodes let go")
        for gw in (a, b):
            assert gw.app.events is not None
            await gw.app.events.flush()
    finally:
        await a.app.stop()
        await b.app.stop()
        echo.close()
    rc = await asyncio.to_thread(main, ["audit", "check", "--store-url", redis_url,
                                        "--stream-too", str(records), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0, out
    assert out["counts"]["begin"] == 3 and out["counts"]["pending"] == 1  # + its activation
    assert out["counts"]["end"] == 2
    assert out["counts"]["agent_installs"] == 2
    # A grant nobody made, while epoch 2 was ACTIVE: the check must fail.
    r = aioredis.Redis.from_url(redis_url)
    try:
        forged = {"@timestamp": "2030-01-01T00:00:00.000Z", "service": {"node": {"name": "gw-x"}},
                  "event": {"action": "binding", "reason": "granted"},
                  "jvpn": {"phase": "begin", "session_id": sid.hex(), "epoch": 3,
                           "holder": "gw-x#00000000", "incarnation": "gw-x#00000000",
                           "store_ms": 1, "state_version": 99}}  # before every real write
        await r.xadd("jvpn:audit", {"action": "binding", "event": json.dumps(forged)})
    finally:
        await r.aclose()
    rc = await asyncio.to_thread(main, ["audit", "check", "--store-url", redis_url])
    text = capsys.readouterr().out
    assert rc == 1 and "VIOLATIONS" in text, text
