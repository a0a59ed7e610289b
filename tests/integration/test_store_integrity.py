"""The store is not trusted with integrity (DESIGN §3).

Whoever can write to Redis but holds no KEK must not be able to steer a
session or widen a client's rights:

- a session record's policy fields (``cid``, ``up``, ``ttl``, ``rr``, ``tk``) are
  bound into the wrapped secret's associated data: a record whose upstream was
  rewritten to the attacker's socket no longer unwraps on a gateway that loads
  it (here: a second node, with no cached secret), so the session is refused as
  unknown and not one byte of its traffic reaches that socket;
- client registry entries carry a MAC under a KEK-derived key: an entry whose
  upstreams were widened, one written without the KEK, or a valid entry copied
  onto another key is refused at handshake as UNKNOWN_CLIENT, with a security
  event.

Real gateways on the shared redis-server, raw clients on loopback sockets.
"""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from session import wire
from session.handshake import Refusal, ServerHello
from session.reasons import RejectReason
from store import keys as K
from tests.support.harness import Gateway, echo_upstream, start_gateway, wait_for
from tests.support.rawclient import Endpoint, RawSession


class _Sink(asyncio.DatagramProtocol):
    """The attacker's UDP socket: records every datagram that reaches it."""

    def __init__(self) -> None:
        self.got: list[bytes] = []

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.got.append(data)


async def _attacker_socket() -> tuple[asyncio.DatagramTransport, _Sink, str]:
    loop = asyncio.get_running_loop()
    transport, sink = await loop.create_datagram_endpoint(_Sink, local_addr=("127.0.0.1", 0))
    host, port = transport.get_extra_info("sockname")[:2]
    return transport, sink, f"{host}:{port}"


def _security(gw: Gateway, kind: str) -> list[dict]:  # type: ignore[type-arg]
    return [e for e in gw.actions("security_event") if e.get("jvpn.security_kind") == kind]


async def test_rewritten_upstream_never_gets_the_sessions_traffic(redis_url: str) -> None:
    a = await start_gateway(redis_url, node_id="gw-a")
    b = await start_gateway(redis_url, node_id="gw-b")
    echo, upstream = await echo_upstream()
    trap, sink, trap_addr = await _attacker_socket()
    admin = aioredis.Redis.from_url(redis_url)
    eps: list[Endpoint] = []
    try:
        priv, _ = await a.add_client(upstream)
        s = RawSession(priv, a.app.keys.public, upstream)
        ep_a = await Endpoint.udp(a.udp)
        eps.append(ep_a)
        await s.connect(ep_a)
        ep_a.send(s.payload_packet(b"before"))
        assert await s.wait_payloads(ep_a, 1) == [b"before"]  # echoed: the session works

        # The attacker writes one field of the record: the upstream, now its own socket.
        record = K.session_keys(s.session_id)[0]
        assert await admin.hset(record, "up", trap_addr) == 0

        # gw-b has no cached secret: it loads the record to check the proof.
        ep_b = await Endpoint.udp(b.udp)
        eps.append(ep_b)
        got = await s.reattach(ep_b, validate=False)
        if isinstance(got.msg, wire.ReattachAck):  # the gateway adopted the tampered record
            await s.keepalive(ep_b)
            for i in range(5):
                ep_b.send(s.payload_packet(b"secret %d" % i))
        await asyncio.sleep(0.5)
        assert sink.got == [], f"{len(sink.got)} datagrams of the session reached the attacker"
        assert isinstance(got.msg, wire.Reject), got.msg
        assert got.msg.reason is RejectReason.UNKNOWN_SESSION
        events = _security(b, "unwrap_failed")
        assert events and "policy" in str(events[0].get("jvpn.detail")), b.actions("security_event")
        rec = await b.store.get(s.session_id)
        assert rec is not None and rec.node.startswith("gw-a")  # nothing moved

        # The owner never re-reads the record: its traffic still goes where it was born to.
        ep_a.send(s.payload_packet(b"after"))
        await s.wait_payloads(ep_a, 2)
        assert s.payloads[-1] == b"after" and sink.got == []
    finally:
        for ep in eps:
            ep.close()
        trap.close()
        echo.close()
        await admin.aclose()
        await a.app.stop()
        await b.app.stop()


async def _handshake(gw: Gateway, priv: bytes, upstream: str) -> ServerHello | Refusal:
    s = RawSession(priv, gw.app.keys.public, upstream)
    ep = await Endpoint.udp(gw.udp)
    try:
        return await s.handshake(ep)
    finally:
        ep.close()


async def test_a_tampered_registry_entry_is_refused_at_handshake(redis_url: str) -> None:
    gw = await start_gateway(redis_url)
    echo, upstream = await echo_upstream()
    admin = aioredis.Redis.from_url(redis_url)
    try:
        priv, pub = await gw.add_client(upstream)
        assert isinstance(await _handshake(gw, priv, upstream), ServerHello)

        # Widen the client's upstreams to a host it was never allowed.
        evil = "127.0.0.1:4444"
        assert await admin.hset(K.client_key(pub), "upstreams", f"{upstream},{evil}") == 0
        for target in (evil, upstream):  # the entry as a whole is refused
            refusal = await _handshake(gw, priv, target)
            assert isinstance(refusal, Refusal), refusal
            assert refusal.reason is RejectReason.UNKNOWN_CLIENT
        await wait_for(lambda: bool(_security(gw, "registry_entry_refused")), 2.0,
                       "a registry_entry_refused security event")
        assert "bad MAC" in _security(gw, "registry_entry_refused")[0]["jvpn.detail"]
        assert gw.store.registry_refused >= 2
    finally:
        echo.close()
        await admin.aclose()
        await gw.app.stop()


async def test_forged_and_copied_registry_entries_are_refused(redis_url: str) -> None:
    from session.noise import generate_keypair

    gw = await start_gateway(redis_url)
    echo, upstream = await echo_upstream()
    admin = aioredis.Redis.from_url(redis_url)
    try:
        _, good_pub = await gw.add_client(upstream)
        good = await admin.hgetall(K.client_key(good_pub))

        # An entry written by hand, as the registry looked before it was MAC'd.
        forged_priv, forged_pub = generate_keypair()
        await admin.hset(K.client_key(forged_pub), mapping={
            "name": "x", "ttl_s": "300.0", "reattach_rate": "30", "transports": "udp,tcp",
            "upstreams": upstream, "created": "1"})
        refusal = await _handshake(gw, forged_priv, upstream)
        assert isinstance(refusal, Refusal) and refusal.reason is RejectReason.UNKNOWN_CLIENT

        # A valid entry (MAC included) copied onto the attacker's key.
        copied_priv, copied_pub = generate_keypair()
        await admin.hset(K.client_key(copied_pub), mapping=good)
        refusal = await _handshake(gw, copied_priv, upstream)
        assert isinstance(refusal, Refusal) and refusal.reason is RejectReason.UNKNOWN_CLIENT
        assert await gw.store.list_clients() == [await gw.store.get_client(good_pub)]
    finally:
        echo.close()
        await admin.aclose()
        await gw.app.stop()
