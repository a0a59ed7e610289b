"""Inner addresses are part of the session (store/lua/addr.lua, session/inner.py).

Allocated atomically from the cluster's pools before birth, written into the
record and bound into the wrapped secret, told to the client inside the
handshake's message 2, unchanged across reattach and node moves, freed only
when the session ends; an exhausted pool is an explicit refusal with its own
reason. Real redis-server, real gateways, raw clients on loopback.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import time

import redis.asyncio as aioredis

from session import wire
from session.handshake import Refusal, ServerHello
from session.inner import InnerAddresses, InnerPool
from session.reasons import RejectReason, TerminateReason
from session.storeops import StoreStatus
from store import keys as K
from store.api import SessionStore
from tests.support.harness import Gateway, start_gateway, wait_for
from tests.support.rawclient import Endpoint, RawSession

POOL = InnerPool.parse("10.77.0.0/29", "fd77::/125")  # 5 addresses: exhaustion is cheap
# no TUN: the host's network is not the tests' to change (tests/netns does that)
L3 = {"inner_pool_v4": "10.77.0.0/29", "inner_pool_v6": "fd77::/125", "tun_name": ""}
PREFIXES = ("192.0.2.0/24", "2001:db8::/32")


async def test_claims_are_atomic_idempotent_bounded_and_freed(session_store: SessionStore) -> None:
    sids = [os.urandom(16) for _ in range(POOL.size + 1)]
    got = await asyncio.gather(*(session_store.claim_addresses(s, POOL.spec, POOL.size)
                                 for s in sids[:-1]))  # concurrent: one script each
    assert all(r.ok for r in got)
    assert sorted(r.index for r in got) == list(range(POOL.size))  # never one index twice
    again = await session_store.claim_addresses(sids[0], POOL.spec, POOL.size)
    assert again.ok and again.index == got[0].index  # a retried claim: the same addresses
    full = await session_store.claim_addresses(sids[-1], POOL.spec, POOL.size)
    assert full.status is StoreStatus.POOL_EXHAUSTED and full.index == -1
    other = await session_store.claim_addresses(os.urandom(16), "10.9.0.0/24,fd09::/64", 253)
    assert other.status is StoreStatus.POOL_MISMATCH  # a node configured otherwise
    assert await session_store.release_addresses(sids[2]) == 1
    assert await session_store.release_addresses(sids[2]) == 0  # idempotent
    reused = await session_store.claim_addresses(sids[-1], POOL.spec, POOL.size)
    assert reused.ok and reused.index == got[2].index
    assert await session_store.address_owner(got[2].index) == sids[-1]


async def test_reclaim_frees_only_ended_sessions_past_the_grace(redis_url: str) -> None:
    gw = await start_gateway(redis_url, **L3)
    eps: list[Endpoint] = []
    try:
        priv, _ = await gw.add_client("127.0.0.1:9", prefixes=PREFIXES)
        live, ended = RawSession(priv, gw.app.keys.public, "", l3=True), \
            RawSession(priv, gw.app.keys.public, "", l3=True)
        for s in (live, ended):
            eps.append(await Endpoint.udp(gw.udp))
            await s.connect(eps[-1])
        # the end is recorded, but its release is lost (the node died in between)
        await gw.store.terminate(ended.session_id, TerminateReason.ADMIN)
        orphan = os.urandom(16)  # claimed, never born (a node died before the birth)
        await gw.store.claim_addresses(orphan, POOL.spec, POOL.size)
        assert await gw.store.reclaim_addresses(grace_ms=60_000) == 0  # all too young
        await asyncio.sleep(0.05)
        assert await gw.store.reclaim_addresses(grace_ms=10) == 2
        held = await gw.store.redis.hkeys(K.POOL_KEYS[3])
        assert held == [live.session_id.hex().encode()]
    finally:
        for e in eps:
            e.close()
        await gw.app.stop()


async def _l3(gw: Gateway, priv: bytes) -> tuple[RawSession, Endpoint, ServerHello | Refusal]:
    s = RawSession(priv, gw.app.keys.public, "", l3=True)
    ep = await Endpoint.udp(gw.udp)
    return s, ep, await s.handshake(ep)


async def test_an_l3_session_keeps_its_addresses_across_nodes_until_it_ends(
        redis_url: str) -> None:
    a = await start_gateway(redis_url, node_id="gw-a", **L3)
    b = await start_gateway(redis_url, node_id="gw-b", **L3)
    eps: list[Endpoint] = []
    try:
        priv, _ = await a.add_client("127.0.0.1:9", prefixes=PREFIXES)
        s, ep, hello = await _l3(a, priv)
        eps.append(ep)
        assert isinstance(hello, ServerHello), hello
        inner = InnerAddresses.parse(hello.inner)
        assert inner.v4.ip in POOL.v4 and inner.v6.ip in POOL.v6
        assert inner.v4.ip.packed[-1] == inner.v6.ip.packed[-1]  # one index names both
        assert hello.routes == ",".join(PREFIXES)
        await s.keepalive(ep)
        rec = await a.store.get(s.session_id)
        assert rec is not None and rec.inner == hello.inner and rec.prefixes == hello.routes

        # a move to the other node (which unwraps the record: the addresses are bound in it)
        ep_b = await Endpoint.udp(b.udp)
        eps.append(ep_b)
        got = await s.reattach(ep_b)
        assert isinstance(got.msg, wire.ReattachAck), got.msg
        rec2 = await b.store.get(s.session_id)
        assert rec2 is not None and rec2.node.startswith("gw-b") and rec2.inner == hello.inner
        route = b.node.machine.bindings[s.session_id].secrets.route
        assert route is not None and route.inner == inner

        # a second session gets other addresses; the pool runs out with an explicit reason
        others = []
        for _ in range(POOL.size - 1):
            o, oep, oh = await _l3(a, priv)
            eps.append(oep)
            assert isinstance(oh, ServerHello) and oh.inner != hello.inner
            others.append(oh.inner)
        assert len(set(others)) == POOL.size - 1
        _, oep, refused = await _l3(a, priv)
        eps.append(oep)
        assert isinstance(refused, Refusal)
        assert refused.reason is RejectReason.ADDRESS_POOL_EXHAUSTED

        # the session ends: its addresses (only then) go back to the pool
        ep_b.send(s.seal(wire.inner_close(int(TerminateReason.CLIENT_CLOSE))))
        deadline = time.monotonic() + 5
        while await a.store.address_owner(POOL.index_of(inner.v4.ip) or 0) is not None:
            assert time.monotonic() < deadline, "the ended session's addresses were not freed"
            await asyncio.sleep(0.02)
        n, nep, nh = await _l3(a, priv)
        eps.append(nep)
        assert isinstance(nh, ServerHello) and nh.inner == hello.inner  # reused, not leaked
    finally:
        for e in eps:
            e.close()
        await a.app.stop()
        await b.app.stop()


async def test_l3_is_refused_without_prefixes_or_pools(redis_url: str) -> None:
    with_pool = await start_gateway(redis_url, node_id="gw-p", **L3)
    without = await start_gateway(redis_url, node_id="gw-n")
    eps: list[Endpoint] = []
    try:
        plain, _ = await with_pool.add_client("127.0.0.1:9")  # no prefixes: no L3
        allowed, _ = await with_pool.add_client("127.0.0.1:9", prefixes=PREFIXES)
        for gw, priv in ((with_pool, plain), (without, allowed)):
            _, ep, got = await _l3(gw, priv)
            eps.append(ep)
            assert isinstance(got, Refusal) and got.reason is RejectReason.POLICY_DENIED
    finally:
        for e in eps:
            e.close()
        await with_pool.app.stop()
        await without.app.stop()


async def test_rewritten_inner_addresses_never_unwrap(redis_url: str) -> None:
    a = await start_gateway(redis_url, node_id="gw-a", **L3)
    b = await start_gateway(redis_url, node_id="gw-b", **L3)
    admin = aioredis.Redis.from_url(redis_url)
    eps: list[Endpoint] = []
    try:
        priv, _ = await a.add_client("127.0.0.1:9", prefixes=PREFIXES)
        s, ep, hello = await _l3(a, priv)
        eps.append(ep)
        assert isinstance(hello, ServerHello)
        await s.keepalive(ep)
        stolen = f"{POOL.addresses(4).v4.with_prefixlen},{POOL.addresses(4).v6.with_prefixlen}"
        record = K.session_keys(s.session_id)[0]
        await admin.hset(record, mapping={"ia": stolen, "ap": "0.0.0.0/0,::/0"})
        ep_b = await Endpoint.udp(b.udp)
        eps.append(ep_b)
        got = await s.reattach(ep_b, validate=False)
        assert isinstance(got.msg, wire.Reject), got.msg  # the tampered record does not unwrap
        assert got.msg.reason is RejectReason.UNKNOWN_SESSION
        await wait_for(lambda: bool(b.actions("security_event")), 5, "the unwrap failure")
        assert ipaddress.ip_interface(hello.inner.split(",")[0]) != stolen.split(",")[0]
    finally:
        for e in eps:
            e.close()
        await admin.aclose()
        await a.app.stop()
        await b.app.stop()
