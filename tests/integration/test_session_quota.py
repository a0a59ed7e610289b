"""A client key holds at most ClientPolicy.max_sessions live sessions (store/lua/slot.lua)."""

from __future__ import annotations

import asyncio

from session import wire
from session.handshake import Refusal
from session.reasons import RejectReason, TerminateReason
from store.keys import client_sessions_key
from tests.support.harness import echo_upstream, start_gateway, wait_for
from tests.support.rawclient import Endpoint, RawSession


async def test_a_handshake_past_the_quota_is_refused_and_an_ended_session_frees_its_place(
        redis_url: str) -> None:
    gw = await start_gateway(redis_url)
    echo, upstream = await echo_upstream()
    priv, pub = await gw.add_client(upstream, max_sessions=2)
    eps: list[Endpoint] = []
    try:
        sessions = []
        for _ in range(2):
            s = RawSession(priv, gw.app.keys.public, upstream)
            ep = await Endpoint.udp(gw.udp)
            eps.append(ep)
            await s.connect(ep)
            sessions.append((s, ep))
        third = RawSession(priv, gw.app.keys.public, upstream)
        ep3 = await Endpoint.udp(gw.udp)
        eps.append(ep3)
        refusal = await third.handshake(ep3)
        assert isinstance(refusal, Refusal) and refusal.reason is RejectReason.POLICY_DENIED
        key = client_sessions_key(pub.hex())
        assert await gw.store.redis.zcard(key) == 2
        s, ep = sessions[0]
        ep.send(s.seal(wire.inner_close(int(TerminateReason.CLIENT_CLOSE))))  # ends in band
        await wait_for(lambda: s.session_id not in gw.node.bindings, 5, "the session ended")
        for _ in range(250):  # the release is one store call behind the close (5 s bound)
            if await gw.store.redis.zcard(key) == 1:
                break
            await asyncio.sleep(0.02)
        fourth = RawSession(priv, gw.app.keys.public, upstream)
        ep4 = await Endpoint.udp(gw.udp)
        eps.append(ep4)
        hello = await fourth.handshake(ep4)
        assert not isinstance(hello, Refusal), hello
    finally:
        for e in eps:
            e.close()
        echo.close()
        await gw.app.stop()
