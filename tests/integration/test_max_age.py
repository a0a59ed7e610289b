"""A maximum session age by policy (DESIGN §3): however often a session reattaches or
refreshes, it ends at ``created + max age``, as an expiry (TERMINATED, reason EXPIRED),
in the store's scripts (store/lua/common.lua, ``end_ms``) and through the sweeper's index;
its client is told, authenticated, as of any expiry."""

from __future__ import annotations

import asyncio
import contextlib
import time

from session import wire
from session.reasons import RejectReason, TerminateReason
from session.states import SessionEvent, SessionState
from store import keys as K
from store.api import SessionStore
from store.status import StoreStatus
from tests.integration.test_store import born, reattach
from tests.support.harness import echo_upstream, start_gateway
from tests.support.rawclient import Endpoint, RawSession

MAX_AGE_MS = 300


async def test_reattach_and_refresh_never_renew_past_the_max_age(
        session_store: SessionStore) -> None:
    """A busy session (reattaching and refreshing every 40 ms, TTL 300 s) ends at 0.3 s."""
    store = session_store
    sid = await born(store, max_age_s=MAX_AGE_MS / 1000, reattach_rate=1000)
    rec = await store.get(sid)
    assert rec is not None and rec.max_age_ms == MAX_AGE_MS and rec.ttl_ms == 300_000
    assert rec.ends_ms == rec.created_ms + MAX_AGE_MS
    version, epoch, node, renewals = rec.version, rec.epoch, "n1", 0
    while True:
        res = await reattach(store, sid, version, node="n2" if node == "n1" else "n1")
        if not res.ok:
            break
        version, epoch, node = res.version, res.epoch, res.node
        ref = await store.refresh(sid, epoch, node)
        if not ref.ok:
            res = None  # type: ignore[assignment]
            break
        assert ref.deadline_ms == rec.created_ms + MAX_AGE_MS  # renewed, but capped
        renewals += 1
        await asyncio.sleep(0.04)
    after = await store.get(sid)
    assert after is not None and after.state is SessionState.TERMINATED
    assert after.terminate_reason is TerminateReason.EXPIRED
    assert after.terminated_ms is not None
    assert after.terminated_ms - after.created_ms >= MAX_AGE_MS
    assert renewals >= 3  # it really was kept busy until then
    # Whichever call met the age first, every later one is told EXPIRED.
    late = await reattach(store, sid, after.version)
    assert late.status is StoreStatus.EXPIRED and late.reason is RejectReason.EXPIRED
    ref = await store.refresh(sid, epoch, node)
    assert ref.status is StoreStatus.EXPIRED
    assert ref.terminate_reason is TerminateReason.EXPIRED


async def test_reattach_answers_expired_at_the_max_age(session_store: SessionStore) -> None:
    store = session_store
    sid = await born(store, max_age_s=MAX_AGE_MS / 1000)
    ok = await reattach(store, sid, 1)
    assert ok.ok
    await asyncio.sleep(MAX_AGE_MS / 1000 + 0.05)
    res = await reattach(store, sid, ok.version)
    assert res.status is StoreStatus.EXPIRED and res.reason is RejectReason.EXPIRED
    assert res.expired_now and res.terminate_reason is TerminateReason.EXPIRED


async def test_refresh_answers_expired_at_the_max_age(session_store: SessionStore) -> None:
    store = session_store
    sid = await born(store, max_age_s=MAX_AGE_MS / 1000)
    assert (await store.refresh(sid, 1, "n1")).ok
    await asyncio.sleep(MAX_AGE_MS / 1000 + 0.05)
    res = await store.refresh(sid, 1, "n1")
    assert res.status is StoreStatus.EXPIRED and res.expired_now
    assert res.terminate_reason is TerminateReason.EXPIRED


async def test_transition_answers_expired_at_the_max_age(session_store: SessionStore) -> None:
    store = session_store
    sid = await born(store, max_age_s=MAX_AGE_MS / 1000)
    await asyncio.sleep(MAX_AGE_MS / 1000 + 0.05)
    res = await store.transition(sid, 1, SessionEvent.TRANSPORT_LOST)
    assert res.status is StoreStatus.EXPIRED and res.expired_now


async def test_the_sweeper_ends_a_quiet_session_at_its_max_age(
        session_store: SessionStore) -> None:
    """The expiry index holds min(TTL deadline, max-age deadline): a quiet session with a TTL
    of 300 s is ended by the sweeper at its max age of 0.3 s."""
    store = session_store
    sid = await born(store, max_age_s=MAX_AGE_MS / 1000)
    rec = await store.get(sid)
    assert rec is not None
    assert await store.sweep() == []  # due at once (a lower bound): rescheduled, still live
    score = await store.redis.zscore(K.EXPIRY_INDEX, K.session_hex(sid))
    assert score == rec.created_ms + MAX_AGE_MS
    ended: list[bytes] = []
    deadline = time.monotonic() + 3.0
    while sid not in ended and time.monotonic() < deadline:
        ended += [e.session_id for e in await store.sweep()]
        await asyncio.sleep(0.05)
    assert sid in ended
    after = await store.get(sid)
    assert after is not None and after.terminate_reason is TerminateReason.EXPIRED
    assert after.terminated_ms is not None
    assert after.terminated_ms - after.created_ms >= MAX_AGE_MS


async def test_a_record_born_without_a_max_age_has_none(session_store: SessionStore) -> None:
    """A record written before maximum ages (birth without ARGV[12]) keeps no ``ma``: only its
    TTL ends it, as before."""
    store = session_store
    sid = await born(store, ttl_ms=60_000, max_age_s=MAX_AGE_MS / 1000)
    await store.redis.hdel(K.session_keys(sid)[0], "ma")  # as an older gateway wrote it
    await asyncio.sleep(MAX_AGE_MS / 1000 + 0.05)
    assert (await store.refresh(sid, 1, "n1")).ok
    rec = await store.get(sid)
    assert rec is not None and rec.max_age_ms is None and not rec.terminated


async def test_the_client_is_told_at_the_max_age(redis_url: str) -> None:
    """End to end: a client that keeps its session busy (keepalives, one reattach) is closed,
    authenticated, in band, with reason EXPIRED at its max age; a reattach after that gets
    an authenticated EXPIRED."""
    gw = await start_gateway(redis_url, node_id="gw-age")
    echo, upstream = await echo_upstream()
    priv, _ = await gw.add_client(upstream, ttl_s=30.0, max_age_s=1.5, reattach_rate=100)
    eps: list[Endpoint] = []
    s = RawSession(priv, gw.app.keys.public, upstream)
    pinger: asyncio.Task[None] | None = None
    try:
        ep = await Endpoint.udp(gw.udp)
        eps.append(ep)
        await s.connect(ep)
        t0 = time.monotonic()
        await asyncio.sleep(0.5)
        moved = await Endpoint.udp(gw.udp)  # a reattach does not renew the age
        eps.append(moved)
        got = await s.reattach(moved)
        assert isinstance(got.msg, wire.ReattachAck), got.msg

        async def ping() -> None:
            while True:
                moved.send(s.keepalive_packet())
                await asyncio.sleep(0.1)

        pinger = asyncio.create_task(ping())
        close = await s.next_inner(moved, lambda i: i.kind is wire.InnerType.CLOSE, 5.0)
        elapsed = time.monotonic() - t0
        assert close.reason == TerminateReason.EXPIRED
        assert 1.3 <= elapsed < 4.0, elapsed
        pinger.cancel()
        rec = await gw.store.get(s.session_id)
        assert rec is not None and rec.state is SessionState.TERMINATED
        assert rec.terminate_reason is TerminateReason.EXPIRED
        late_ep = await Endpoint.udp(gw.udp)
        eps.append(late_ep)
        late = await s.reattach(late_ep, validate=False)
        assert isinstance(late.msg, wire.Reject) and late.msg.reason is RejectReason.EXPIRED
        assert s.authentic(late)
    finally:
        if pinger is not None:
            pinger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pinger
        for e in eps:
            e.close()
        echo.close()
        await gw.app.stop()
