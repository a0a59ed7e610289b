"""The reattach nonce cache against a real redis-server: bounded per call and in size.

reattach.lua keeps recent nonces in a hash (nonce -> recorded decision) and an index
beside it (a sorted set, nonce scored by its decision time, same hash tag). A call never
reads the whole cache: it prunes at most ``NonceCache.PRUNE`` stale entries through the
index and checks the size with HLEN; the cache holds at most
``min(PER_RATE * rr + SLACK, MAX)`` entries whatever the configured rate.
"""

from __future__ import annotations

import asyncio
import os

import msgpack

from session.reasons import RejectReason, TerminateReason
from store import keys as K
from store.api import SessionStore
from store.scripts import NonceCache
from store.status import StoreStatus
from tests.integration.test_store import born, reattach

FAR = 10**6  # a version no call proves: every call is decided STALE_VERSION and recorded


async def _sizes(store: SessionStore, sid: bytes) -> tuple[int, int]:
    _, nkey, tkey = K.session_keys(sid)
    return int(await store.redis.hlen(nkey)), int(await store.redis.zcard(tkey))


async def _fill(store: SessionStore, sid: bytes, n: int, **kw: int) -> list[StoreStatus]:
    out: list[StoreStatus] = []
    for lo in range(0, n, 200):  # batched, as many gateways would send them
        res = await asyncio.gather(*(reattach(store, sid, FAR, tag=f"udp:10.0.0.{i % 200}:1", **kw)
                                     for i in range(lo, min(n, lo + 200))))
        out.extend(r.status for r in res)
    return out


def _decision(ts: int) -> bytes:
    """A recorded decision as reattach.lua writes it: cmsgpack.pack(ts, status, reason,
    version, epoch, binding id, node, tag), values packed one after another."""
    return b"".join(msgpack.packb(v, use_bin_type=False) for v in (
        ts, int(StoreStatus.STALE_VERSION), int(RejectReason.STALE_VERSION), 1, 1, b"", b"",
        "0123456789abcdef"))


async def _commandstats(store: SessionStore) -> dict[str, int]:
    info = await store.redis.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()}


async def test_cache_is_capped_whatever_the_rate(session_store: SessionStore) -> None:
    """reattach_rate 100,000 once meant a cache of 400,016 entries read whole on every call."""
    sid = await born(session_store, reattach_rate=100_000)
    cap = min(NonceCache.PER_RATE * 100_000 + NonceCache.SLACK, NonceCache.MAX)
    assert cap == NonceCache.MAX == 1024
    nonce = os.urandom(16)
    first = await reattach(session_store, sid, FAR, nonce=nonce, tag="udp:192.0.2.1:1")
    statuses = [first.status, *await _fill(session_store, sid, cap + 59)]
    assert statuses[:cap] == [StoreStatus.STALE_VERSION] * cap  # recorded
    assert set(statuses[cap:]) == {StoreStatus.RATE_LIMITED}  # a full cache: refused, unrecorded
    assert await _sizes(session_store, sid) == (cap, cap)
    _, nkey, tkey = K.session_keys(sid)
    full = sum([await session_store.redis.memory_usage(k, samples=0) or 0 for k in (nkey, tkey)])
    print(f"\nnonce cache at its cap ({cap} entries): {full} B")
    assert full < 300 * 1024  # store/README.md: about 230 KiB per session at most, whatever rr
    # The documented decisions still hold on a full cache: a recorded nonce retried from
    # its address gets its decision back, from another address REPLAYED_NONCE.
    again = await reattach(session_store, sid, FAR, nonce=nonce, tag="udp:192.0.2.1:1")
    assert (again.status, again.retry) == (StoreStatus.STALE_VERSION, True)
    other = await reattach(session_store, sid, FAR, nonce=nonce, tag="udp:192.0.2.2:1")
    assert other.status is StoreStatus.REPLAYED_NONCE
    assert await _sizes(session_store, sid) == (cap, cap)


async def test_small_rate_keeps_its_cap(session_store: SessionStore) -> None:
    sid = await born(session_store, reattach_rate=5)
    cap = NonceCache.PER_RATE * 5 + NonceCache.SLACK  # 36 < MAX
    statuses = await _fill(session_store, sid, cap + 10)
    assert statuses[:5] == [StoreStatus.STALE_VERSION] * 5  # then the rate limit (recorded)
    assert set(statuses[5:]) == {StoreStatus.RATE_LIMITED}
    assert await _sizes(session_store, sid) == (cap, cap)


async def test_pruning_is_bounded_per_call(session_store: SessionStore) -> None:
    sid = await born(session_store, reattach_rate=100_000)
    n = 200
    assert set(await _fill(session_store, sid, n, window_ms=10_000)) == {StoreStatus.STALE_VERSION}
    assert await _sizes(session_store, sid) == (n, n)
    await asyncio.sleep(0.25)  # every entry is now older than 2 x 100 ms
    await session_store.redis.config_resetstat()
    res = await reattach(session_store, sid, FAR, window_ms=100)
    assert res.status is StoreStatus.STALE_VERSION
    stats = await _commandstats(session_store)
    assert "hgetall" not in stats and "hvals" not in stats and "hscan" not in stats, stats
    # One call removed PRUNE stale entries, no more, and recorded itself.
    assert await _sizes(session_store, sid) == (n - NonceCache.PRUNE + 1,) * 2
    calls = 1
    while (await _sizes(session_store, sid))[0] > calls:
        await reattach(session_store, sid, FAR, window_ms=100)
        calls += 1
        assert calls <= n // NonceCache.PRUNE + 2
    assert await _sizes(session_store, sid) == (calls, calls)  # only this run's own entries


async def test_a_nonce_older_than_two_windows_is_forgotten(session_store: SessionStore) -> None:
    sid = await born(session_store)
    nonce = os.urandom(16)
    first = await reattach(session_store, sid, FAR, nonce=nonce, tag="udp:a", window_ms=100)
    assert first.status is StoreStatus.STALE_VERSION
    assert (await reattach(session_store, sid, FAR, nonce=nonce, tag="udp:b", window_ms=100)).reason \
        is RejectReason.REPLAYED_NONCE
    await asyncio.sleep(0.25)
    # A request carrying it now has a fresh timestamp (a new proof): decided afresh.
    late = await reattach(session_store, sid, FAR, nonce=nonce, tag="udp:b", window_ms=100)
    assert late.status is StoreStatus.STALE_VERSION and not late.retry
    assert await _sizes(session_store, sid) == (1, 0)  # a small cache has no index


async def test_a_cache_without_its_index_is_indexed_once(session_store: SessionStore) -> None:
    """A nonce hash written before the index existed (or by an older gateway during a rolling
    upgrade) is indexed from its recorded times on the next call, stale entries dropped."""
    sid = await born(session_store)
    _, nkey, tkey = K.session_keys(sid)
    now = await session_store.server_time_ms()
    live = [os.urandom(16) for _ in range(30)]
    stale = [os.urandom(16) for _ in range(10)]
    r = session_store.redis
    for nonce in live:
        await r.hset(nkey, nonce, _decision(now - 1000))
    for nonce in stale:
        await r.hset(nkey, nonce, _decision(now - 120_000))
    await r.pexpire(nkey, 60_000)
    res = await reattach(session_store, sid, FAR, window_ms=30_000)
    assert res.status is StoreStatus.STALE_VERSION
    assert await _sizes(session_store, sid) == (31, 31)
    # The index never outlives the hash: read the hash's TTL first (a later read is older).
    hash_ttl = await r.pttl(nkey)
    assert 0 < await r.pttl(tkey) <= hash_ttl
    replay = await reattach(session_store, sid, FAR, nonce=live[0], tag="udp:elsewhere")
    assert replay.status is StoreStatus.REPLAYED_NONCE


async def test_a_small_cache_has_no_index(session_store: SessionStore) -> None:
    """Up to NonceCache.INDEX_AT decisions the cache is pruned by reading it whole (bounded
    by that size) and has no time index, which would cost more memory than the cache; past
    it the index is built once and used from then on."""
    sid = await born(session_store, reattach_rate=100_000)
    _, nkey, tkey = K.session_keys(sid)
    for _ in range(NonceCache.INDEX_AT):
        await reattach(session_store, sid, FAR, window_ms=30_000)
    assert await session_store.redis.exists(tkey) == 0
    await reattach(session_store, sid, FAR, window_ms=30_000)
    assert await _sizes(session_store, sid) == (NonceCache.INDEX_AT + 1,) * 2


async def test_tombstone_and_birth_clear_both_keys(session_store: SessionStore) -> None:
    sid = await born(session_store, reattach_rate=100_000)
    for _ in range(NonceCache.INDEX_AT + 1):  # large enough to have its index
        await reattach(session_store, sid, FAR, window_ms=30_000)
    _, nkey, tkey = K.session_keys(sid)
    assert await session_store.redis.exists(nkey, tkey) == 2
    assert (await session_store.terminate(sid, TerminateReason.ADMIN)).ok
    assert await session_store.redis.exists(nkey, tkey) == 0
