"""Several gateway nodes on one store: any node accepts any reattach, never two bindings."""

from __future__ import annotations

import asyncio

from session.states import SessionState
from session.wire import node_name
from tests.support.harness import echo_upstream, start_gateway, wait_for


async def test_reattach_on_another_node_moves_the_binding_and_fences_the_old_one(
        redis_url: str) -> None:
    a = await start_gateway(redis_url, node_id="gw-a")
    b = await start_gateway(redis_url, node_id="gw-b")
    echo, upstream = await echo_upstream()
    priv, _ = await a.add_client(upstream)
    got: list[bytes] = []
    agent = a.agent(priv, upstream, on_payload=got.append)
    try:
        await agent.start()
        await agent.wait_connected(5)
        sid = agent.machine.session_id
        assert sid in a.node.bindings
        agent.send(b"on-a")
        await wait_for(lambda: b"on-a" in got, 5, "echo via node a")

        await agent.jump("udp", "move", remote=b.udp)
        await wait_for(lambda: node_name(agent.machine.node_id.decode()) == "gw-b", 5,
                       "binding on node b")
        # Node a heard of the move (pub/sub hint, confirmed by the store) and dropped it.
        await wait_for(lambda: sid not in a.node.bindings, 5, "node a fenced")
        assert sid in b.node.bindings
        rec = await a.store.get(sid)
        assert rec is not None and node_name(rec.node) == "gw-b" and rec.epoch == agent.machine.epoch == 2
        agent.send(b"on-b")
        await wait_for(lambda: b"on-b" in got, 5, "echo via node b")
        assert any(node_name(e.get("jvpn.previous_node") or "") == "gw-a"
                   for e in b.actions("transport_switch"))
        assert any(e.get("event.action") == "binding_revoked" for e in a.events
                   for e in [e.fields])
    finally:
        await agent.stop()
        echo.close()
        await a.app.stop()
        await b.app.stop()


async def test_a_node_without_the_binding_never_forwards_and_hints_authenticated(
        redis_url: str) -> None:
    """DATA reaching a node that does not hold the binding is not forwarded; the node answers
    with a NOT_BOUND_HERE notice MAC'd under the session's control key."""
    from session import control, wire
    from session.reasons import NoticeKind
    from tests.support.rawclient import Endpoint, RawSession

    a = await start_gateway(redis_url, node_id="gw-a")
    b = await start_gateway(redis_url, node_id="gw-b")
    echo, upstream = await echo_upstream()
    try:
        priv, _ = await a.add_client(upstream)
        s = RawSession(priv, a.app.keys.public, upstream)
        ea = await Endpoint.udp(a.udp)
        await s.connect(ea)
        eb = await Endpoint.udp(b.udp)
        before = echo.received
        eb.send(s.payload_packet(b"to-the-wrong-node"))
        got = await eb.expect(lambda m: isinstance(m, wire.Notice), 2.0, "NOTICE")
        assert isinstance(got.msg, wire.Notice) and got.msg.kind is NoticeKind.NOT_BOUND_HERE
        assert s.keys is not None and control.verify(got.raw, s.keys.control_key)
        await asyncio.sleep(0.2)
        assert echo.received == before  # node b forwarded nothing
        ea.close()
        eb.close()
    finally:
        echo.close()
        await a.app.stop()
        await b.app.stop()


async def test_agent_recovers_when_its_node_forgets_the_binding(redis_url: str) -> None:
    a = await start_gateway(redis_url, node_id="gw-a")
    echo, upstream = await echo_upstream()
    priv, _ = await a.add_client(upstream)
    got: list[bytes] = []
    agent = a.agent(priv, upstream, on_payload=got.append)
    try:
        await agent.start()
        await agent.wait_connected(5)
        sid = agent.machine.session_id
        a.node.machine.bindings.pop(sid)  # as after a restart of this node
        await wait_for(lambda: agent.machine.state is SessionState.ATTACHED
                       and agent.machine.epoch >= 2, 5, "reattach")
        agent.send(b"after")
        await wait_for(lambda: b"after" in got, 5, "echo after reattach")
        assert agent.machine.session_id == sid
    finally:
        await agent.stop()
        echo.close()
        await a.app.stop()


async def test_cloned_client_on_two_nodes_one_binding_each_round(redis_url: str) -> None:
    """Two holders of the same session keys reattach to two nodes at once, 200 rounds."""
    from session import wire
    from tests.support.rawclient import Endpoint, RawSession

    a = await start_gateway(redis_url, node_id="gw-a")
    b = await start_gateway(redis_url, node_id="gw-b")
    echo, upstream = await echo_upstream()
    try:
        priv, _ = await a.add_client(upstream, reattach_rate=100_000)
        clone = RawSession(priv, a.app.keys.public, upstream)
        first = await Endpoint.udp(a.udp)
        await clone.connect(first)
        alerts_before = len(a.actions("security_event")) + len(b.actions("security_event"))
        version = clone.version
        for _ in range(200):
            ea, eb = await Endpoint.udp(a.udp), await Endpoint.udp(b.udp)
            raw1, req1 = clone.request(version=version)
            raw2, req2 = clone.request(version=version)
            ea.send(raw1)
            eb.send(raw2)
            got = await asyncio.gather(clone.answer(ea, req1.nonce), clone.answer(eb, req2.nonce))
            acks = [g for g in got if isinstance(g.msg, wire.ReattachAck)]
            rejects = [g for g in got if isinstance(g.msg, wire.Reject)]
            assert len(acks) == 1 and len(rejects) == 1, [g.msg for g in got]
            ack = acks[0].msg
            assert isinstance(ack, wire.ReattachAck) and clone.authentic(acks[0])
            clone.install(acks[0], ea if acks[0] is got[0] else eb)
            await clone.keepalive()  # validates the winner's PENDING binding: now ACTIVE
            rec = await a.store.get(clone.session_id)
            assert rec is not None and (rec.epoch, rec.binding_id) == (ack.epoch, ack.binding_id)
            # At most one node holds the current epoch locally; the store holds one binding.
            holders = [n for n in (a, b) if (bd := n.node.bindings.get(clone.session_id))
                       is not None and bd.epoch == rec.epoch]
            assert len(holders) == 1
            version = ack.version
            ea.close()
            eb.close()
        # Every losing claimant is counted as a security event; the audit log aggregates
        # them per kind and source (one event a second, with the count it folds in).
        counted = sum(n.app.metrics._security.labels("dual_active_conflict")._value.get()
                      for n in (a, b))
        assert counted >= 200
        alerts = len(a.actions("security_event")) + len(b.actions("security_event")) - alerts_before
        assert 1 <= alerts < 200
    finally:
        echo.close()
        await a.app.stop()
        await b.app.stop()
