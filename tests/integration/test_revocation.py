"""Revocation revokes: removing a client key ends its live sessions cluster-wide.

`jvpn clients remove` runs ``SessionStore.revoke_client``: the registry entry
goes, every live session of that key is tombstoned (POLICY_REVOKED) and its
owner is woken, which closes the client with an authenticated CLOSE; a
reattach from a new port is refused (authenticated TERMINATED), and a new
handshake is refused (UNKNOWN_CLIENT).
"""

from __future__ import annotations

from session import wire
from session.reasons import RejectReason, TerminateReason
from session.states import SessionState
from tests.support.harness import echo_upstream, start_gateway
from tests.support.rawclient import Endpoint, RawSession


async def test_removing_a_client_ends_its_sessions_on_every_node(redis_url: str) -> None:
    a = await start_gateway(redis_url, node_id="gw-a")
    b = await start_gateway(redis_url, node_id="gw-b")
    echo, upstream = await echo_upstream()
    priv, pub = await a.add_client(upstream)
    other_priv, _ = await a.add_client(upstream)
    eps: list[Endpoint] = []
    try:
        sessions = []
        for gw in (a, b, a):
            s = RawSession(priv, gw.app.keys.public, upstream)
            ep = await Endpoint.udp(gw.udp)
            eps.append(ep)
            await s.connect(ep)
            sessions.append((s, ep))
        bystander = RawSession(other_priv, a.app.keys.public, upstream)
        by_ep = await Endpoint.udp(a.udp)
        eps.append(by_ep)
        await bystander.connect(by_ep)

        removed, ended = await a.store.revoke_client(pub)
        assert removed and sorted(ended) == sorted(s.session_id for s, _ in sessions)

        for s, ep in sessions:  # each owner closes its client, authenticated, in band
            close = await s.next_inner(ep, lambda i: i.kind is wire.InnerType.CLOSE)
            assert close.reason == TerminateReason.POLICY_REVOKED
            rec = await a.store.get(s.session_id)
            assert rec is not None and rec.state is SessionState.TERMINATED
        s, _ = sessions[0]
        new_ep = await Endpoint.udp(a.udp)
        eps.append(new_ep)
        got = await s.reattach(new_ep, validate=False)
        assert isinstance(got.msg, wire.Reject) and got.msg.reason is RejectReason.TERMINATED
        assert s.authentic(got)
        again = RawSession(priv, a.app.keys.public, upstream)
        hs_ep = await Endpoint.udp(a.udp)
        eps.append(hs_ep)
        refusal = await again.handshake(hs_ep)
        assert getattr(refusal, "reason", None) is RejectReason.UNKNOWN_CLIENT, refusal
        # The other client is untouched.
        await bystander.keepalive(by_ep)
        rec = await a.store.get(bystander.session_id)
        assert rec is not None and rec.state is not SessionState.TERMINATED
    finally:
        for ep in eps:
            ep.close()
        echo.close()
        await a.app.stop()
        await b.app.stop()
