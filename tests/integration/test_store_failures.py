"""Store outages: fail fast and closed (StoreUnavailable), never hang; recover; durable mode."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis

from session.reasons import TerminateReason
from session.states import SessionEvent
from session.wire import TransportKind
from store.api import SessionStore, StoreConfig
from store.errors import StoreNotDurable, StoreUnavailable
from store.policy import ClientPolicy
from store.status import StoreStatus
from tests.support.redis_server import RedisServer

UDP = TransportKind.UDP
POLICY = ClientPolicy(os.urandom(32), upstreams=("127.0.0.1:80",), reattach_rate=1000)


async def born(store: SessionStore, node: str = "n1") -> bytes:
    sid = os.urandom(16)
    res = await store.birth(sid, wrapped_secret=os.urandom(60), node=node, binding_id=os.urandom(16),
                            kind=UDP, upstream="127.0.0.1:80", policy=POLICY)  # fmt: skip
    assert res.ok, res
    return sid


async def assert_unavailable(aw: Awaitable[Any], bound_s: float) -> StoreUnavailable:
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable) as info:
        await asyncio.wait_for(aw, bound_s + 5)  # the outer bound only catches a hang
    elapsed = time.monotonic() - t0
    assert elapsed < bound_s, f"took {elapsed:.2f}s (bound {bound_s:.2f}s)"
    return info.value


@pytest.mark.slow
async def test_outage_fails_fast_then_recovers_on_same_port(redis_server: RedisServer) -> None:
    cfg = StoreConfig(socket_timeout_s=0.5, connect_timeout_s=0.5)
    store = SessionStore(redis_server.url, cfg)
    try:
        sid = await born(store)
        now = await store.server_time_ms()
        port = redis_server.port
        redis_server.stop()
        assert not redis_server.running
        bound = 2 * cfg.call_timeout_s  # a CAS with an unknown outcome is re-run once
        ops: list[Callable[[], Awaitable[Any]]] = [
            lambda: store.reattach(sid, expected_version=1, nonce=os.urandom(16), timestamp_ms=now,
                                   kind=UDP, node="n2", addr_tag="udp:a"),
            lambda: store.get(sid),
            lambda: store.refresh(sid, 1, "n1"),
            lambda: store.transition(sid, 1, SessionEvent.QUALITY_VOLATILE),
            lambda: store.terminate(sid, TerminateReason.ADMIN),
            lambda: born(store),
            lambda: store.sweep(10),
            store.ping,
            store.server_time_ms,
            lambda: store.get_client(POLICY.public_key),
            lambda: store.publish_binding_change(sid, "n2", 2),
            lambda: store.xadd_event({"a": 1}),
        ]  # fmt: skip
        for op in ops:
            await assert_unavailable(op(), bound)
        # Many concurrent callers during the outage: every one answered, none hangs.
        results = await asyncio.wait_for(
            asyncio.gather(*(store.get(sid) for _ in range(200)), return_exceptions=True), bound + 1
        )
        assert all(isinstance(r, StoreUnavailable) for r in results)

        redis_server.start()
        assert redis_server.port == port and redis_server.running
        assert await store.ping()
        # No persistence: the session is gone, so it is unknown (never silently "fine").
        assert await store.get(sid) is None
        res = await store.reattach(sid, expected_version=1, nonce=os.urandom(16),
                                   timestamp_ms=await store.server_time_ms(), kind=UDP, node="n2",
                                   addr_tag="udp:a")  # fmt: skip
        assert res.status is StoreStatus.UNKNOWN_SESSION
        sid2 = await born(store)  # scripts reloaded after NOSCRIPT
        assert (await store.get(sid2)) is not None
    finally:
        await store.close()


@pytest.mark.slow
async def test_unresponsive_store_times_out_and_unknown_cas_is_reread(
    redis_server: RedisServer,
) -> None:
    cfg = StoreConfig(socket_timeout_s=0.3, connect_timeout_s=0.3)
    store = SessionStore(redis_server.url, cfg)
    assert redis_server.pid is not None
    try:
        sid = await born(store)
        now = await store.server_time_ms()
        nonce, bid = os.urandom(16), os.urandom(16)

        def attempt() -> Awaitable[Any]:
            return store.reattach(sid, expected_version=1, nonce=nonce, timestamp_ms=now, kind=UDP,
                                  node="n2", addr_tag="udp:a", binding_id=bid)  # fmt: skip

        os.kill(redis_server.pid, signal.SIGSTOP)  # alive, accepting, never answering
        try:
            exc = await assert_unavailable(attempt(), 2 * cfg.call_timeout_s)
            assert exc.maybe_applied
        finally:
            os.kill(redis_server.pid, signal.SIGCONT)
        # The request sat in the server's socket buffer and may have applied late.
        # Asking again with the same nonce and tag gives the one recorded decision.
        res = await attempt()
        assert res.ok and res.binding_id == bid and res.epoch == 2 and res.version == 2
        rec = await store.get(sid)
        assert rec is not None and rec.version == 2
        assert (rec.pending_epoch, rec.pending_binding_id) == (2, bid)
    finally:
        await store.close()


async def test_binding_subscriber_reports_outage(redis_server: RedisServer) -> None:
    store = SessionStore(redis_server.url, StoreConfig(socket_timeout_s=0.3, connect_timeout_s=0.3))
    try:

        async def consume() -> None:
            async for _ in store.binding_changes(poll_s=0.1):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.3)
        redis_server.stop()
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(task, 3.0)
    finally:
        await store.close()


def _wait_replica_acking(master: RedisServer, timeout: float = 10.0) -> None:
    """Until the replica acknowledges writes (INFO says "online" before it has loaded the RDB)."""
    client = redis.Redis.from_url(master.url)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            client.set("jvpn:test:probe", time.monotonic())
            if client.wait(1, 100) >= 1:
                return
        raise AssertionError(f"replica never acknowledged: {client.info('replication')}")
    finally:
        client.close()


@pytest.mark.slow
async def test_durable_mode_waits_for_replicas(redis_server: RedisServer) -> None:
    cfg = StoreConfig(wait_replicas=1, wait_timeout_ms=100)
    store = SessionStore(redis_server.url, cfg)
    try:
        # No replica: the write is not acknowledged, so nothing may be activated.
        sid = os.urandom(16)
        with pytest.raises(StoreNotDurable):
            await store.birth(sid, wrapped_secret=b"w", node="n1", binding_id=os.urandom(16),
                              kind=UDP, upstream="127.0.0.1:80", policy=POLICY)  # fmt: skip
        # Reads need no acknowledgement.
        assert (await store.get(sid)) is not None

        admin = redis.Redis.from_url(redis_server.url)
        admin.config_set("repl-diskless-sync-delay", 0)  # default waits 5 s for more replicas
        admin.close()
        replica = redis_server.replica()
        try:
            _wait_replica_acking(redis_server)
            sid2 = await born(store)
            res = await store.reattach(sid2, expected_version=1, nonce=os.urandom(16),
                                       timestamp_ms=await store.server_time_ms(), kind=UDP,
                                       node="n2", addr_tag="udp:a")  # fmt: skip
            assert res.ok
            replica.stop()
            t0 = time.monotonic()
            with pytest.raises(StoreNotDurable):
                await store.refresh(sid2, 2, "n2")
            assert time.monotonic() - t0 < 1.0
        finally:
            replica.close()
    finally:
        await store.close()
