"""REKEY against a real gateway and a real redis-server: forward secrecy, shown on a dump.

An on-path observer records the agent's DATA packets; an attacker later holds the
cluster KEK and a dump of the store. Before a REKEY the dump opens the recorded
packets (the control: the test can fail); after the REKEY completes (a fresh
X25519 exchange, the new secret installed, the previous one forgotten once the
agent confirmed), the same KEK and a new dump open none of them.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

from session import wire
from session.errors import SessionError
from session.framing import DataChannel
from session.keys import policy_binding, traffic_keys, unwrap_secret
from store import keys as K
from tests.support.harness import FAST, echo_upstream, shared_keys, start_gateway, wait_for


def _opens(dump: dict[bytes, bytes], sid: bytes, binding: tuple[int, bytes, bytes],
           raw: bytes) -> bool:
    """Whether a store dump (and the KEK) decrypts one recorded client->gateway packet."""
    cid = dump[b"cid"]  # the client's public key, raw (or its hex, in older records)
    policy = policy_binding(cid.hex() if len(cid) == 32 else cid.decode(), dump[b"up"].decode(),
                            int(dump[b"ttl"]),
                            int(dump[b"rr"]), int(dump[b"tk"]),
                            int(dump[b"ma"]) if b"ma" in dump else None)
    for field in (b"ws", b"wsp"):  # every wrapped secret the dump holds
        if field not in dump:
            continue
        secret = unwrap_secret(shared_keys().kek, dump[field], sid, policy=policy)
        epoch, bid, node = binding
        c2g, g2c = traffic_keys(secret, epoch, bid, node)
        try:
            DataChannel(g2c, c2g, sid, epoch).open_raw(raw)
            return True
        except SessionError:
            continue
    return False


async def test_a_store_dump_after_a_rekey_cannot_decrypt_traffic_recorded_before_it(
        redis_url: str) -> None:
    gw = await start_gateway(redis_url)
    echo, upstream = await echo_upstream()
    priv, _ = await gw.add_client(upstream)
    got: list[bytes] = []
    agent = gw.agent(priv, upstream, params=replace(FAST, rekey_after=1.5, reject_after=5.0),
                     on_payload=got.append)
    recorded: list[bytes] = []
    machine = gw.node.machine
    receive = machine.receive

    def tap(data: bytes, peer: Any, now: float) -> None:
        recorded.append(bytes(data))  # what an on-path observer records
        receive(data, peer, now)

    machine.receive = tap  # type: ignore[method-assign]
    try:
        await agent.start()
        await agent.wait_connected(5)
        sid = agent.machine.session_id
        b = gw.node.bindings[sid]
        before = (b.epoch, b.binding_id, b.node_id)
        for i in range(10):
            agent.send(b"before the rekey %d" % i)
        await wait_for(lambda: len(got) >= 10, 5, "echoes before the rekey")
        dump_before = await gw.store.redis.hgetall(K.record_key(sid))
        assert int(dump_before.get(b"kg", 0)) == 0
        old = [r for r in recorded
               if isinstance(m := wire.decode(r), wire.Data) and m.epoch == before[0]]
        assert len(old) >= 10

        async def rekeyed() -> bool:
            rec = await gw.store.get(sid)
            return rec is not None and rec.key_generation >= 1 and not rec.previous_wrapped

        deadline = asyncio.get_running_loop().time() + 10
        while not await rekeyed():
            assert asyncio.get_running_loop().time() < deadline, "no rekey within 10 s"
            await asyncio.sleep(0.05)
        dump_after = await gw.store.redis.hgetall(K.record_key(sid))

        # The control: the dump taken before the REKEY decrypts what was recorded.
        assert all(_opens(dump_before, sid, before, r) for r in old)
        # After it, the same KEK and the new dump decrypt none of it.
        assert not any(_opens(dump_after, sid, before, r) for r in old)
        assert b"wsp" not in dump_after and dump_after[b"ws"] != dump_before[b"ws"]

        # The session carried on across the REKEY: same session, traffic flows.
        assert agent.machine.session_id == sid and agent.machine.epoch > before[0]
        for i in range(10):
            agent.send(b"after the rekey %d" % i)
        await wait_for(lambda: sum(g.startswith(b"after") for g in got) >= 10, 5,
                       "echoes after the rekey")
        assert any(e.action == "rekey" for e in gw.events)
    finally:
        machine.receive = receive  # type: ignore[method-assign]
        await agent.stop()
        echo.close()
        await gw.app.stop()


async def test_a_cold_node_answers_a_tombstone_authenticated_without_its_secret(
        redis_url: str) -> None:
    """A tombstone keeps no wrapped secret, only the wrapped control key: a node that never
    saw the session still answers a late request with an authenticated TERMINATED."""
    from session.reasons import RejectReason
    from tests.support.rawclient import Endpoint, RawSession

    a = await start_gateway(redis_url, node_id="gw-a")
    echo, upstream = await echo_upstream()
    eps: list[Endpoint] = []
    b = None
    try:
        priv, _ = await a.add_client(upstream)
        s = RawSession(priv, a.app.keys.public, upstream)
        eps.append(await Endpoint.udp(a.udp))
        await s.connect(eps[0])
        assert (await a.store.terminate(s.session_id)).ok
        dump = await a.store.redis.hgetall(K.record_key(s.session_id))
        assert b"ws" not in dump and b"wsp" not in dump and b"wc" in dump
        b = await start_gateway(redis_url, node_id="gw-b")  # its key cache is empty
        eps.append(await Endpoint.udp(b.udp))
        raw, req = s.request()
        got = await s.send_request(eps[1], raw, req)
        assert isinstance(got.msg, wire.Reject) and got.msg.reason is RejectReason.TERMINATED
        assert s.authentic(got), "the late TERMINATED is not authenticated"
    finally:
        for e in eps:
            e.close()
        echo.close()
        await a.app.stop()
        if b is not None:
            await b.app.stop()
