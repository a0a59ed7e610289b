"""Traces from a real gateway: a handshake and a reattach, each with its store calls as children."""

from __future__ import annotations

import asyncio
import inspect

import pytest

from gateway.app import GatewayApp
from gateway.config import load_gateway_config
from gateway.tracing import ATTR_OUTCOME, ATTR_SESSION_HASH, Tracing, session_hash
from tests.support.harness import Gateway, echo_upstream, shared_keys, wait_for

pytestmark = pytest.mark.skipif(
    "tracing" not in inspect.signature(GatewayApp.__init__).parameters,
    reason="gateway not wired for tracing yet (GatewayApp(..., tracing=))")


async def test_handshake_and_reattach_spans(redis_url: str) -> None:
    cfg = load_gateway_config(None, env={}, overrides={
        "node_id": "gw-trace", "listen_udp": "127.0.0.1:0", "listen_tcp": "127.0.0.1:0",
        "store_url": redis_url, "keepalive_interval_s": 0.1, "sweep_interval_s": 0.1,
        "handshake_retry_threshold": -1, "events.redis_stream": False})
    tracing = Tracing.in_memory("gw-trace")
    app = GatewayApp(cfg, shared_keys(), tracing=tracing)  # type: ignore[call-arg]
    await app.start()
    gw = Gateway(app)
    echo, upstream = await echo_upstream()
    priv, _ = await gw.add_client(upstream)
    agent = gw.agent(priv, upstream)
    try:
        await agent.start()
        await agent.wait_connected(5)
        agent.kill_transport()
        await wait_for(lambda: len(agent.jumps) >= 1, 5, "a reattach")
        assert tracing.memory is not None
        await wait_for(lambda: any(s.name == "jvpn.reattach" and
                                   s.attributes.get(ATTR_OUTCOME) == "ok"
                                   for s in tracing.memory.get_finished_spans()), 5, "span")
    finally:
        await agent.stop()
        echo.close()
        await app.stop()
        await asyncio.sleep(0)
    spans = list(tracing.memory.get_finished_spans())
    by_id = {s.context.span_id: s for s in spans}
    hs = [s for s in spans if s.name == "jvpn.handshake" and s.attributes[ATTR_OUTCOME] == "ok"]
    ra = [s for s in spans if s.name == "jvpn.reattach" and s.attributes[ATTR_OUTCOME] == "ok"]
    assert hs and ra
    sid_hash = hs[0].attributes[ATTR_SESSION_HASH]
    assert ra[0].attributes[ATTR_SESSION_HASH] == sid_hash
    assert sid_hash == session_hash(agent.machine.session_id)
    # Found from the short id the CLI shows (jvpn status), the same on both spans.
    short = agent.machine.session_id.hex()[:12]
    assert hs[0].attributes["jvpn.session_short_id"] == ra[0].attributes["jvpn.session_short_id"] == short
    assert ra[0].attributes["jvpn.state_version"] > 1 and ra[0].attributes["jvpn.epoch"] > 1

    def children(top: object) -> set[str]:
        return {s.name for s in spans
                if s.parent is not None and by_id.get(s.parent.span_id) is top}

    assert {"jvpn.store.get_client", "jvpn.store.claim_handshake",
            "jvpn.store.birth"} <= children(hs[0])
    assert "jvpn.store.reattach" in children(ra[0])
    raw = agent.machine.session_id.hex()
    for s in spans:
        assert all(raw not in str(v) for v in s.attributes.values())
