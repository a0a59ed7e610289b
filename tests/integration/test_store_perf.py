"""Store budgets: memory per session, and batched throughput against Redis's own capacity."""

from __future__ import annotations

import asyncio
import os
import socket
import time

import pytest

from session.wire import TransportKind
from store import EXPIRY_INDEX, load_scripts, pack_evalsha, session_keys
from store.api import SessionStore, StoreConfig
from store.policy import ClientPolicy

UDP = TransportKind.UDP
MEMORY_BUDGET = 1024  # bytes per session (target: <= 1 KiB over 100k sessions)
# The target is >= 50% of the raw rate, measured by `jvpn-lab bench` (BENCHMARKS.md). A
# shared 2-core CI box cannot hold a throughput ratio reliably, so by default this
# test prints the ratio and only asserts that batching beats one call per round
# trip; set JVPN_BENCH_MIN_RATIO (e.g. 0.4) on a quiet machine to assert it too.
MIN_RATIO = float(os.environ.get("JVPN_BENCH_MIN_RATIO", "0"))


async def _birth_many(store: SessionStore, n: int, policy: ClientPolicy) -> list[bytes]:
    sids = [os.urandom(16) for _ in range(n)]
    res = await asyncio.gather(*(
        store.birth(sid, wrapped_secret=os.urandom(64),  # session.keys.wrap_secret: 1+3+12+32+16
                    node=f"gw-{i % 8}-51820", binding_id=os.urandom(16), kind=UDP,
                    upstream="10.20.30.40:443", policy=policy,
                    wrapped_control=os.urandom(64))  # what its tombstone keeps
        for i, sid in enumerate(sids)
    ))  # fmt: skip
    assert all(r.ok for r in res)
    return sids


async def test_memory_per_session_under_1kib(session_store: SessionStore) -> None:
    n = 2000
    policy = ClientPolicy(os.urandom(32), upstreams=("10.20.30.40:443",), reattach_rate=30)
    sids = await _birth_many(session_store, n, policy)
    now = await session_store.server_time_ms()
    # One reattach each (granted, then activated): a realistic session also holds its nonce
    # hash.
    res = await asyncio.gather(*(
        session_store.reattach(sid, expected_version=1, nonce=os.urandom(16), timestamp_ms=now,
                               kind=UDP, node="gw-3-51820", addr_tag=f"udp:203.0.113.{i % 250}:4{i % 9999:04d}")
        for i, sid in enumerate(sids)
    ))  # fmt: skip
    assert all(r.ok for r in res)
    act = await asyncio.gather(*(session_store.activate(sid, r.epoch, r.binding_id, r.node)
                                 for sid, r in zip(sids, res, strict=True)))
    assert all(a.ok for a in act)
    r = session_store.redis
    pipe = r.pipeline(transaction=False)
    for sid in sids:
        rec_key, nonce_key, times_key = session_keys(sid)
        pipe.memory_usage(rec_key, samples=0)
        pipe.memory_usage(nonce_key, samples=0)
        pipe.memory_usage(times_key, samples=0)
        pipe.object("encoding", rec_key)
    out = await pipe.execute()
    records = out[0::4]
    nonces = out[1::4]
    times = [t or 0 for t in out[2::4]]  # a small nonce cache has no time index
    encodings = set(out[3::4])
    index = await r.memory_usage(EXPIRY_INDEX, samples=0) or 0
    per_session = (sum(records) + sum(nonces) + sum(times) + index) / n
    print(f"\nmemory per session: record {sum(records) / n:.0f} B + nonces {sum(nonces) / n:.0f} B"
          f" + nonce times {sum(times) / n:.0f} B"
          f" + expiry index {index / n:.0f} B = {per_session:.0f} B ({encodings})")  # fmt: skip
    assert encodings == {b"listpack"}, (
        "a value over hash-max-listpack-value (64 B) bloats the record"
    )
    assert per_session < MEMORY_BUDGET


def _raw_capacity(host: str, port: int, commands: list[bytes]) -> float:
    """Script calls per second Redis itself sustains: one pipeline on a plain socket."""
    payload = b"".join(commands)
    with socket.create_connection((host, port), timeout=30) as sock:
        t0 = time.perf_counter()
        sock.sendall(payload)
        buf, pos, got = b"", 0, 0
        while got < len(commands):
            chunk = sock.recv(1 << 20)
            assert chunk, "connection closed"
            buf = buf[pos:] + chunk
            pos = 0
            while True:  # every reply is a bulk string (msgpack) or an error line
                head_end = buf.find(b"\r\n", pos)
                if head_end < 0:
                    break
                assert buf[pos : pos + 1] == b"$", buf[pos : pos + 80]
                end = head_end + 2 + int(buf[pos + 1 : head_end]) + 2
                if end > len(buf):
                    break
                pos, got = end, got + 1
        return len(commands) / (time.perf_counter() - t0)


@pytest.mark.slow
async def test_batched_reattach_throughput(redis_url: str) -> None:
    n = 10_000
    store = SessionStore(redis_url)
    direct = SessionStore(redis_url, StoreConfig(coalesce=False))
    try:
        policy = ClientPolicy(os.urandom(32), upstreams=("10.20.30.40:443",), reattach_rate=1000)
        await store.load_scripts()
        host = store.redis.connection_pool.connection_kwargs["host"]
        port = store.redis.connection_pool.connection_kwargs["port"]
        sha = load_scripts()["reattach"].sha  # the benchmark baseline

        def request(sid: bytes, now: int, i: int) -> list[bytes | str | int]:
            return [1, os.urandom(16), now, int(UDP), "gw-2", os.urandom(16), f"udp:{i}",
                    30_000, 2_000, 3_600_000, 86_400_000]  # fmt: skip

        async def batched(sids: list[bytes]) -> float:
            now = await store.server_time_ms()
            t0 = time.perf_counter()
            res = await asyncio.gather(*(
                store.reattach(sid, expected_version=1, nonce=os.urandom(16), timestamp_ms=now,
                               kind=UDP, node="gw-2", addr_tag=f"udp:{i}")
                for i, sid in enumerate(sids)
            ))  # fmt: skip
            rate = len(sids) / (time.perf_counter() - t0)
            assert all(r.ok for r in res)
            return rate

        async def one_at_a_time(sids: list[bytes]) -> float:
            now = await direct.server_time_ms()
            sem = asyncio.Semaphore(64)  # the pool size: plain concurrent calls

            async def call(i: int, sid: bytes) -> None:
                async with sem:
                    res = await direct.reattach(sid, expected_version=1, nonce=os.urandom(16),
                                                timestamp_ms=now, kind=UDP, node="gw-2",
                                                addr_tag=f"udp:{i}")  # fmt: skip
                    assert res.ok

            t0 = time.perf_counter()
            await asyncio.gather(*(call(i, sid) for i, sid in enumerate(sids)))
            return len(sids) / (time.perf_counter() - t0)

        raw_rates, batched_rates, direct_rates = [], [], []
        for _ in range(2):  # best of two: the box is shared
            sids = await _birth_many(store, n, policy)
            now = await store.server_time_ms()
            cmds = [
                pack_evalsha(sha, session_keys(s), request(s, now, i)) for i, s in enumerate(sids)
            ]
            raw_rates.append(await asyncio.to_thread(_raw_capacity, host, port, cmds))
            batched_rates.append(await batched(await _birth_many(store, n, policy)))
            direct_rates.append(await one_at_a_time(await _birth_many(store, n // 2, policy)))
        raw, rate, direct_rate = max(raw_rates), max(batched_rates), max(direct_rates)
        print(f"\nreattach.lua: redis capacity {raw:,.0f}/s, batched API {rate:,.0f}/s "
              f"({rate / raw:.0%}), one call per round trip {direct_rate:,.0f}/s")  # fmt: skip
        assert rate >= MIN_RATIO * raw
        assert rate > direct_rate, "batching does not beat one call per round trip"
    finally:
        await store.close()
        await direct.close()
