"""Path quality moves a session to DEGRADED and back; the store records each change."""

from __future__ import annotations

from dataclasses import replace

from instruments.netsim import UdpRelay
from session.states import SessionState
from tests.support.harness import FAST, echo_upstream, start_gateway, wait_for


async def test_lossy_path_degrades_then_recovers_and_store_follows(redis_url: str) -> None:
    gw = await start_gateway(redis_url)
    echo, upstream = await echo_upstream()
    relay = await UdpRelay(gw.udp, loss=0.0, seed=7).start()
    priv, _ = await gw.add_client(upstream)
    # Patient: loss must degrade the session, not make the agent give the path up.
    agent = gw.agent(priv, upstream, params=replace(FAST, dead_after=20),
                     gateways=[relay.address], transports=["udp"])
    try:
        await agent.start()
        await agent.wait_connected(5)
        sid = agent.machine.session_id
        v0 = agent.machine.version
        relay.loss = 0.35  # each way: about 58% of keepalive round trips fail
        await wait_for(lambda: agent.machine.state is SessionState.DEGRADED, 15, "DEGRADED")
        await wait_for(lambda: agent.machine.version > v0, 10, "version from the gateway")
        # The store followed (a STATE_CHANGE is emitted only for a CAS the store applied).
        # Not its state right now: at 35% loss a lucky streak can already report ATTACHED.
        await wait_for(lambda: any(e["jvpn.to_state"] in ("DEGRADED", "VOLATILE")
                                   for e in gw.actions("state_change")), 10, "store followed")
        relay.loss = 0.0
        await wait_for(lambda: agent.machine.state is SessionState.ATTACHED, 20, "recovered")
        await wait_for(lambda: gw.node.bindings[sid].state is SessionState.ATTACHED, 10,
                       "gateway view recovered")
        rec = await gw.store.get(sid)
        assert rec is not None and rec.state is SessionState.ATTACHED
        assert rec.version == gw.node.bindings[sid].version >= v0 + 2
        changes = [(e["jvpn.from_state"], e["jvpn.to_state"]) for e in gw.actions("state_change")]
        assert ("ATTACHED", "DEGRADED") in changes or ("ATTACHED", "VOLATILE") in changes
        assert agent.machine.session_id == sid and agent.handshakes == 1
    finally:
        await agent.stop()
        relay.close()
        echo.close()
        await gw.app.stop()
