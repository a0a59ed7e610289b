"""The session store on a real three-master Redis Cluster: routing, races, failover, durable mode."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import statistics
import time
from collections.abc import Awaitable
from importlib import resources
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from session.reasons import TerminateReason
from session.states import SessionEvent, SessionState
from session.wire import TransportKind
from store import keys as K
from store.api import ReattachResult, SessionStore, StoreConfig
from store.cluster import ClusterScriptBatcher, parse_cluster_url
from store.errors import StoreNotDurable, StoreUnavailable
from store.policy import ClientPolicy
from store.scripts import OPERATIONS, NonceCache
from store.status import StoreStatus
from tests.support.redis_cluster import RedisClusterProcesses
from tests.support.redis_server import RedisServer

UDP, TCP = TransportKind.UDP, TransportKind.TCP
S, E = SessionState, SessionEvent
POLICY = ClientPolicy(os.urandom(32), upstreams=("127.0.0.1:80",), reattach_rate=100_000)


def _slot(key: str) -> int:
    return key_slot(key.encode())


def sids_per_master(cluster: RedisClusterProcesses, per_master: int) -> dict[int, list[bytes]]:
    """Fresh session ids, ``per_master`` on each master (by port)."""
    ranges = cluster.slot_ranges()
    out: dict[int, list[bytes]] = {port: [] for _, _, port in ranges}
    while any(len(v) < per_master for v in out.values()):
        sid = os.urandom(16)
        slot = _slot(K.record_key(sid))
        port = next(p for first, last, p in ranges if first <= slot <= last)
        if len(out[port]) < per_master:
            out[port].append(sid)
    return out


async def born(store: SessionStore, sid: bytes | None = None, *, ttl_ms: int | None = None,
               node: str = "n1") -> bytes:  # fmt: skip
    sid = sid or os.urandom(16)
    res = await store.birth(sid, wrapped_secret=os.urandom(60), node=node,
                            binding_id=os.urandom(16), kind=UDP, upstream="127.0.0.1:80",
                            policy=POLICY, ttl_ms=ttl_ms)  # fmt: skip
    assert res.ok, res
    return sid


async def reattach(store: SessionStore, sid: bytes, version: int, *, node: str = "n2",
                   tag: str = "udp:198.51.100.7:40000", kind: TransportKind = UDP,
                   nonce: bytes | None = None, **kw: Any) -> ReattachResult:  # fmt: skip
    ts = store.estimated_server_ms() or await store.server_time_ms()
    return await store.reattach(sid, expected_version=version, nonce=nonce or os.urandom(16),
                                timestamp_ms=ts, kind=kind, node=node, addr_tag=tag,
                                **kw)  # fmt: skip


async def _bounded(aw: Awaitable[Any], bound_s: float) -> tuple[str, float]:
    """("ok" | the StoreUnavailable message, seconds); fails if it took longer than bound_s."""
    t0 = time.monotonic()
    try:
        await asyncio.wait_for(aw, bound_s + 5)  # the outer bound only catches a hang
        outcome = "ok"
    except StoreUnavailable as exc:
        outcome = f"unavailable: {exc}"
    elapsed = time.monotonic() - t0
    assert elapsed < bound_s, f"took {elapsed:.2f}s (bound {bound_s:.2f}s)"
    return outcome, elapsed


# ---- layout ----------------------------------------------------------------------------------


def test_every_script_keeps_to_one_slot() -> None:
    sid = os.urandom(16)
    rec, nonce, times = K.session_keys(sid)
    assert _slot(rec) == _slot(nonce) == _slot(times) == _slot(K.record_key(sid)) == _slot(
        K.nonce_key(sid)) == _slot(K.nonce_times_key(sid))
    # Scripts touch only their KEYS: no key name is built inside Lua.
    lua = resources.files("store").joinpath("lua")
    for name in (*OPERATIONS, "common"):
        src = lua.joinpath(f"{name}.lua").read_text()
        code = "\n".join(line.split("--", 1)[0] for line in src.splitlines())
        assert "jvpn" not in code and "..':'" not in code.replace(" ", ""), name
        # every key a call touches is a local bound to KEYS (``local a, b = KEYS[1], KEYS[2]``)
        keys = {"key", "nkey", "tkey", "KEYS[1]"}  # common.lua's helpers take these
        for names, values in re.findall(r"local\s+([\w\s,]+?)\s*=\s*(KEYS\[[^\n]*)", code):
            if all(v.strip().startswith("KEYS[") for v in values.split(",")):
                keys |= {n.strip() for n in names.split(",")}
        calls = re.findall(r"redis\.call\('(\w+)',\s*([^,)]+)", code)
        assert {arg.strip() for op, arg in calls if op != "TIME"} <= keys, (name, calls)


def test_cluster_url_parsing() -> None:
    nodes, kw = parse_cluster_url("redis+cluster://u:p%40ss@10.0.0.1:7000,[::1]:7001/0")
    assert nodes == [("10.0.0.1", 7000), ("::1", 7001)]
    assert kw == {"ssl": False, "username": "u", "password": "p@ss"}
    assert parse_cluster_url("rediss+cluster://h:1")[1] == {"ssl": True}
    for bad in ("redis://h:1", "redis+cluster://h", "redis+cluster://h:1/2",
                "redis+cluster://h:1?x=1"):  # fmt: skip
        with pytest.raises(ValueError):
            parse_cluster_url(bad)


# ---- the session table on three masters ------------------------------------------------------


async def test_lifecycle_on_every_master(
    cluster_store: SessionStore, redis_cluster: RedisClusterProcesses
) -> None:
    store = cluster_store
    assert store.cluster and isinstance(store.batcher, ClusterScriptBatcher)
    by_master = sids_per_master(redis_cluster, 4)
    assert len(by_master) == 3
    for port, sids in by_master.items():
        a, b, c, d = sids
        for sid in sids:
            await born(store, sid)
        assert redis_cluster.master_of_key(K.record_key(a)).port == port
        rec = await store.get(a)
        assert rec is not None and (rec.state, rec.version, rec.epoch) == (S.ATTACHED, 1, 1)
        assert rec.generation == await store.generation()
        # reattach: CAS, replay, idempotent retry
        nonce = os.urandom(16)
        ok = await reattach(store, a, 1, nonce=nonce, tag="udp:a")
        assert ok.ok and (ok.version, ok.epoch, ok.prev_node) == (2, 2, "n1")
        again = await reattach(store, a, 1, nonce=nonce, tag="udp:a")
        assert again.retry and again.binding_id == ok.binding_id
        replay = await reattach(store, a, 1, nonce=nonce, tag="udp:evil")
        assert replay.status is StoreStatus.REPLAYED_NONCE
        assert (await reattach(store, a, 1, tag="udp:z", dual_active_window_ms=0)).status is (
            StoreStatus.STALE_VERSION)  # fmt: skip
        # transitions and the transport-loss rule
        lost = await store.transition(b, 1, E.TRANSPORT_LOST)
        assert lost.ok and lost.state is S.RECOVERING
        assert (await reattach(store, b, 1)).ok
        # activation makes the PENDING binding ACTIVE; refresh fences the previous owner
        assert (await store.refresh(a, 1, "n1")).ok
        assert (await store.activate(a, 2, ok.binding_id, "n2")).ok
        assert (await store.refresh(a, 2, "n2")).ok
        assert (await store.refresh(a, 1, "n1")).status is StoreStatus.NOT_OWNER
        # terminate (and the expiry hint in another slot goes with it)
        term = await store.terminate(c, TerminateReason.ADMIN)
        assert term.ok and not term.already
        assert await store.redis.zscore(K.EXPIRY_INDEX, c.hex()) is None
        assert (await reattach(store, c, 2)).status is StoreStatus.TERMINATED
        assert (await store.get(d)) is not None
    # sweep: expiry hints in one slot, records on three masters
    due = [await born(store, sid, ttl_ms=40)
           for sids in sids_per_master(redis_cluster, 3).values() for sid in sids]
    await asyncio.sleep(0.1)
    swept = await store.sweep(100)
    assert sorted(s.session_id for s in swept) == sorted(due)
    masters = {port for _, _, port in redis_cluster.slot_ranges()}
    assert {redis_cluster.master_of_key(K.record_key(s)).port for s in due} == masters
    # list: every master scanned, pages across nodes
    expected = {s for sids in by_master.values() for s in sids} | set(due)
    found: list[bytes] = []
    cursor = 0
    while True:
        page = await store.list_sessions(limit=5, cursor=cursor)
        found.extend(r.session_id for r in page.sessions)
        cursor = page.cursor
        if cursor == 0:
            break
    assert set(found) == expected and len(found) == len(expected)


async def test_batches_are_split_per_node(
    cluster_store: SessionStore, redis_cluster: RedisClusterProcesses
) -> None:
    store = cluster_store
    sids = [os.urandom(16) for _ in range(1500)]
    births = await asyncio.gather(
        *(born(store, sid, node=f"n{i % 5}") for i, sid in enumerate(sids))
    )
    assert births == sids
    batcher = store.batcher
    assert isinstance(batcher, ClusterScriptBatcher)
    batches0, calls0 = batcher.batches, batcher.calls
    now = await store.server_time_ms()
    bids = [os.urandom(16) for _ in sids]
    res = await asyncio.gather(*(
        store.reattach(sid, expected_version=1, nonce=os.urandom(16), timestamp_ms=now, kind=UDP,
                       node=f"m{i}", addr_tag=f"udp:{i}", binding_id=bids[i])
        for i, sid in enumerate(sids)
    ))  # fmt: skip
    for i, r in enumerate(res):
        assert r.ok and r.binding_id == bids[i] and r.node == f"m{i}" and r.prev_node == f"n{i % 5}"
    calls, batches = batcher.calls - calls0, batcher.batches - batches0
    assert calls == len(sids) and batches < calls / 10, (batches, calls)
    masters = {m.name for m in batcher._nodes.values() if m.calls}  # noqa: SLF001
    assert len(masters) == 3  # one pipeline per node, three nodes


@pytest.mark.slow
async def test_batched_throughput_on_cluster(
    cluster_store: SessionStore, redis_cluster: RedisClusterProcesses
) -> None:
    """Figures for store/README.md: 10k concurrent reattaches, routed and batched per master."""
    store = cluster_store
    await store.load_scripts()  # every master
    n, rates, cpu = 10_000, [], []
    for _ in range(2):
        sids = [os.urandom(16) for _ in range(n)]
        await asyncio.gather(*(born(store, sid) for sid in sids))
        now = await store.server_time_ms()
        b0 = store.batcher.batches
        t0, c0 = time.perf_counter(), time.process_time()
        res = await asyncio.gather(*(
            store.reattach(sid, expected_version=1, nonce=os.urandom(16), timestamp_ms=now,
                           kind=UDP, node="gw-2", addr_tag=f"udp:{i}")
            for i, sid in enumerate(sids)
        ))  # fmt: skip
        rates.append(n / (time.perf_counter() - t0))
        cpu.append((time.process_time() - c0) / n * 1e6)
        assert all(r.ok for r in res)
        assert store.batcher.batches - b0 < n / 50  # coalesced: hundreds per pipeline
    print(f"\nreattach on the 3-master cluster: {max(rates):,.0f}/s batched, "
          f"client CPU {min(cpu):.0f} us per call")  # fmt: skip


async def test_two_claimants_never_both_win_on_cluster(cluster_store: SessionStore) -> None:
    store = cluster_store
    sids = [await born(store) for _ in range(3)]  # most likely on different masters
    versions = dict.fromkeys(sids, 1)
    for i in range(300):
        sid = sids[i % 3]
        version = versions[sid]
        now = store.estimated_server_ms()
        bid_a, bid_b = os.urandom(16), os.urandom(16)
        a, b = await asyncio.gather(
            store.reattach(sid, expected_version=version, nonce=os.urandom(16), timestamp_ms=now,
                           kind=UDP, node="na", addr_tag="udp:a", binding_id=bid_a),
            store.reattach(sid, expected_version=version, nonce=os.urandom(16), timestamp_ms=now,
                           kind=TCP, node="nb", addr_tag="tcp:b", binding_id=bid_b),
        )  # fmt: skip
        winners = [r for r in (a, b) if r.ok]
        assert len(winners) == 1, (a, b)
        loser = b if winners[0] is a else a
        assert loser.status in (StoreStatus.DUAL_ACTIVE_CONFLICT, StoreStatus.STALE_VERSION)
        rec = await store.get(sid)
        assert rec is not None and (rec.version, rec.pending_binding_id) == (
            version + 1,
            winners[0].binding_id,
        )
        versions[sid] = version + 1
    assert sum(versions.values()) == 3 + 300


async def test_noscript_on_every_node_is_loaded_and_resent(
    cluster_store: SessionStore, redis_cluster: RedisClusterProcesses
) -> None:
    store = cluster_store
    sids = [s for v in sids_per_master(redis_cluster, 3).values() for s in v]
    for sid in sids:
        await born(store, sid)
    await store.redis.script_flush()  # every master
    got = await asyncio.gather(*(store.get(sid) for sid in sids for _ in range(5)))
    assert all(r is not None and r.version == 1 for r in got)
    for sid in sids:
        assert (await reattach(store, sid, 1)).ok


async def test_pubsub_crosses_nodes(cluster_url: str, redis_cluster: RedisClusterProcesses) -> None:
    store = SessionStore(cluster_url, StoreConfig(socket_timeout_s=0.3))
    got: list[object] = []

    async def listen() -> None:
        async for change in store.binding_changes(poll_s=0.1):
            got.append(change)
            if len(got) == 1 + len(redis_cluster.masters_now()):
                return

    task = asyncio.create_task(listen())
    try:
        await asyncio.sleep(0.5)  # subscribed, and idle past the socket timeout
        assert not task.done()
        sid = os.urandom(16)
        await store.publish_binding_change(sid, "n2", 5)
        # A PUBLISH on each master reaches the one subscriber, wherever it is.
        for epoch, master in enumerate(redis_cluster.masters_now(), start=6):
            c = master.client()
            c.publish(K.BINDINGS_CHANNEL, b'{"sid":"%s","node":"x","epoch":%d}' % (
                sid.hex().encode(), epoch))  # fmt: skip
            c.close()
        await asyncio.wait_for(task, 3.0)
        assert got[0] == (sid, "n2", 5)
        assert sorted(c.epoch for c in got[1:]) == [6, 7, 8]  # type: ignore[attr-defined]
    finally:
        task.cancel()
        await store.close()


async def test_registry_audit_handshake_generation(cluster_store: SessionStore) -> None:
    store = cluster_store
    pols = [ClientPolicy(os.urandom(32), name=f"c{i}", upstreams=("10.0.0.1:443",))
            for i in range(12)]  # fmt: skip
    for p in pols:
        await store.add_client(p)
    assert [p.name for p in await store.list_clients()] == sorted(p.name for p in pols)
    assert await store.remove_client(pols[0].public_key)
    assert await store.get_client(pols[0].public_key) is None
    assert await store.xadd_event({"event.action": "x"})
    digest = os.urandom(32)
    assert await store.claim_handshake(digest, 1000)
    assert not await store.claim_handshake(digest, 1000)
    assert await store.generation() > 0
    assert await store.ping()


# ---- slot migration: ASK, then MOVED ---------------------------------------------------------


def _sid_in_slot(slot: int) -> bytes:
    while True:
        sid = os.urandom(16)
        if _slot(K.record_key(sid)) == slot:
            return sid


async def test_slot_migration_ask_then_moved(
    cluster_store: SessionStore, redis_cluster: RedisClusterProcesses
) -> None:
    store = cluster_store
    batcher = store.batcher
    assert isinstance(batcher, ClusterScriptBatcher)
    quick = SessionStore(
        redis_cluster.url, StoreConfig(socket_timeout_s=0.2, connect_timeout_s=0.2)
    )
    sid1 = await born(store)
    assert (await reattach(store, sid1, 1)).ok
    for _ in range(NonceCache.INDEX_AT):  # enough decisions for the nonce cache's time index
        assert (await reattach(store, sid1, 10**6)).status is StoreStatus.STALE_VERSION
    assert await store.redis.exists(*K.session_keys(sid1)) == 3  # record, nonces, index
    slot = _slot(K.record_key(sid1))
    sid0 = await born(store, _sid_in_slot(slot))  # its nonce keys do not exist yet
    src = redis_cluster.master_of_slot(slot)
    dst = next(m for m in redis_cluster.masters_now() if m.port != src.port)
    a, b = src.client(), dst.client()
    done = False
    try:
        src_id, dst_id = a.execute_command("CLUSTER MYID"), b.execute_command("CLUSTER MYID")
        b.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        a.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        # Keys all still on the source: served there.
        assert (await reattach(store, sid1, 2)).ok
        # A script whose keys are split (or absent: a birth, sent on by ASK) cannot run until
        # the slot settles: TRYAGAIN, retried with backoff, then fail closed. Never applied.
        for call in (born(quick, _sid_in_slot(slot)), reattach(quick, sid0, 1)):
            outcome, _ = await _bounded(call, 2 * quick.config.call_timeout_s + 0.5)
            assert outcome.startswith("unavailable") and "TRYAGAIN" in outcome, outcome
        # Keys moved: the source answers ASK; ASKING + the script on the target.
        redirects = batcher.redirects
        a.execute_command("MIGRATE", dst.host, dst.port, "", 0, 5000, "KEYS", *K.session_keys(sid1))
        rec1 = await store.get(sid1)
        assert rec1 is not None and rec1.version == 3 and batcher.redirects > redirects
        assert (await reattach(store, sid1, 3)).ok
        pipe = b.pipeline(transaction=False)
        pipe.execute_command("ASKING")
        pipe.hget(K.record_key(sid1), "v")
        assert pipe.execute()[1] == b"4"  # written on the target
        # The rest of the slot moves; it is the target's everywhere: MOVED, the map follows.
        rest = a.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100)
        a.execute_command("MIGRATE", dst.host, dst.port, "", 0, 5000, "KEYS", *rest)
        for m in redis_cluster.masters_now():
            c = m.client()
            c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
            c.close()
        done = True
        assert (await reattach(store, sid0, 1)).ok
        assert await born(store, _sid_in_slot(slot))
        assert batcher.cluster.nodes_manager.slots_cache[slot][0].port == dst.port
    finally:
        if not done:
            for c in (a, b):
                c.execute_command("CLUSTER", "SETSLOT", slot, "STABLE")
        a.close()
        b.close()
        await quick.close()


# ---- store generation ------------------------------------------------------------------------


async def test_new_generation_voids_older_records(cluster_url: str) -> None:
    a = SessionStore(cluster_url)
    b = SessionStore(cluster_url, StoreConfig(generation_check_s=60))  # another gateway, stale
    try:
        old = await born(a)
        g1 = await b.generation()
        assert (await b.get(old)).generation == g1  # type: ignore[union-attr]
        # After restoring a backup the operator starts a new generation.
        g2 = await a.new_generation()
        assert g2 != g1
        r = await reattach(a, old, 1)
        assert r.status is StoreStatus.UNKNOWN_SESSION and not r.ok
        assert (await a.refresh(old, 1, "n1")).status is StoreStatus.UNKNOWN_SESSION
        # A gateway with the old generation cached meets a new record: it re-reads, then agrees.
        new = await born(a)
        assert (await reattach(b, new, 1)).ok
        assert b.generation_changes == 1 and await b.generation() == g2
        assert (await reattach(b, old, 1)).status is StoreStatus.UNKNOWN_SESSION
        assert (await b.refresh(old, 1, "n1")).status is StoreStatus.UNKNOWN_SESSION
        # The key alone lost (a failover dropped it, a shard was flushed): a gateway that
        # knows the generation puts it back; live sessions stay valid.
        c = SessionStore(cluster_url, StoreConfig(generation_check_s=0.1))
        try:
            assert await c.generation() == g2
            await c.redis.delete(K.GENERATION)
            for _ in range(100):
                await c.generation()  # re-reads in the background once the period is over
                if await c.redis.get(K.GENERATION) is not None:
                    break
                await asyncio.sleep(0.02)
            assert int(await c.redis.get(K.GENERATION)) == g2
            assert await c.generation() == g2 and c.generation_changes == 0
            assert (await reattach(c, new, 2)).ok
        finally:
            await c.close()
    finally:
        await a.close()
        await b.close()


# ---- durable mode ----------------------------------------------------------------------------


def _pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


async def _wait_cost(fast: SessionStore, durable: SessionStore, what: str) -> None:
    """Reattach latency with and without WAIT 1, interleaved in one run (the box's noise
    hits both alike); every durable reattach must be acknowledged."""
    sids = [await born(fast) for _ in range(100)]
    lat: dict[str, list[float]] = {"no WAIT": [], "WAIT 1": []}
    versions = dict.fromkeys(sids, 1)
    for _ in range(10):
        for name, store in (("no WAIT", fast), ("WAIT 1", durable)):
            for sid in sids:
                t0 = time.perf_counter()
                res = await reattach(store, sid, versions[sid], tag=f"udp:{name}")
                lat[name].append((time.perf_counter() - t0) * 1000)
                assert res.ok, res  # durable: WAIT 1 acknowledged, else StoreNotDurable
                versions[sid] = res.version
    print()
    for name, xs in lat.items():
        print(f"reattach latency, {what}, {name} (n={len(xs)}): "
              f"p50 {statistics.median(xs):.2f} ms, p99 {_pct(xs, 0.99):.2f} ms")  # fmt: skip


async def test_durable_mode_on_cluster_waits_per_master(
    cluster_url: str, redis_cluster: RedisClusterProcesses
) -> None:
    fast = SessionStore(cluster_url)
    # A generous WAIT timeout for the figures (it bounds a missing ack, not a normal one);
    # a short one where a replica is frozen on purpose.
    durable = SessionStore(cluster_url, StoreConfig(wait_replicas=1, wait_timeout_ms=2000))
    strict = SessionStore(cluster_url, StoreConfig(wait_replicas=1, wait_timeout_ms=500))
    try:
        await _wait_cost(fast, durable, "3-master cluster")
        # Durable births too (the expiry hint goes to its own master).
        assert (await born(durable)) is not None
        # WAIT is per master: with one master's replica frozen, writes there are not
        # acknowledged (StoreNotDurable, never activated); the other masters are unaffected.
        by_master = sids_per_master(redis_cluster, 1)
        for sids in by_master.values():
            await born(fast, sids[0])
        frozen_master = redis_cluster.node_by_port(next(iter(by_master)))
        replica = redis_cluster.replicas_of(frozen_master)[0]
        assert replica.pid is not None
        os.kill(replica.pid, signal.SIGSTOP)  # our own child
        try:
            outcomes = {}
            for port, (sid,) in by_master.items():
                try:
                    outcomes[port] = (await strict.refresh(sid, 1, "n1")).status.name
                except StoreNotDurable:
                    outcomes[port] = "NOT_DURABLE"
        finally:
            os.kill(replica.pid, signal.SIGCONT)
        assert outcomes.pop(frozen_master.port) == "NOT_DURABLE"
        assert set(outcomes.values()) == {"OK"}
    finally:
        await fast.close()
        await durable.close()
        await strict.close()


async def test_durable_mode_cost_single_master_and_replica() -> None:
    master = RedisServer(extra_args=("--repl-diskless-sync-delay", "0")).start()
    replica = master.replica()
    try:
        probe = redis.Redis.from_url(master.url)
        deadline = time.monotonic() + 10
        while probe.wait(1, 100) < 1:  # until the replica acknowledges writes
            probe.set("jvpn:test:probe", 1)
            assert time.monotonic() < deadline
        probe.close()
        fast = SessionStore(master.url)
        durable = SessionStore(master.url, StoreConfig(wait_replicas=1, wait_timeout_ms=2000))
        try:
            await _wait_cost(fast, durable, "single master + replica")
        finally:
            await fast.close()
            await durable.close()
    finally:
        replica.close()
        master.close()


# ---- failover --------------------------------------------------------------------------------


@pytest.mark.slow
async def test_master_failover_fails_closed_then_recovers(
    cluster_url: str, redis_cluster: RedisClusterProcesses
) -> None:
    cfg = StoreConfig(socket_timeout_s=0.3, connect_timeout_s=0.3)
    store = SessionStore(cluster_url, cfg)
    victim = None
    try:
        by_master = sids_per_master(redis_cluster, 5)
        expected: dict[bytes, tuple[int, int, bytes]] = {}
        for sids in by_master.values():
            for sid in sids:
                await born(store, sid)
                res = await reattach(store, sid, 1)
                assert res.ok and (await store.activate(sid, res.epoch, res.binding_id, res.node)).ok
                expected[sid] = (res.version, res.epoch, res.binding_id)
        # Make sure the replicas have every write: with asynchronous replication the last
        # acknowledged writes before a crash can be lost (what durable mode is for).
        for master in redis_cluster.masters_now():
            c = master.client()
            assert c.wait(1, 2000) >= 1
            c.close()
        first = next(iter(by_master))
        doomed, elsewhere = by_master[first], [s for p, v in by_master.items() if p != first
                                               for s in v]  # fmt: skip
        owned = [start for start, port in redis_cluster.slot_owners().items() if port == first]
        victim = redis_cluster.kill_master(_slot(K.record_key(doomed[0])), wait=False)
        assert victim.port == first
        killed_at = time.monotonic()

        # During the failover every call answers within its bound: fails closed, never hangs.
        bound = 2 * cfg.call_timeout_s + 0.5
        outcomes: list[tuple[str, float]] = []
        others: list[str] = []
        recovered_after = None
        while time.monotonic() - killed_at < 20:
            outcome, took = await _bounded(store.get(doomed[0]), bound)
            outcomes.append((outcome, took))
            # A mutation too: an unknown outcome is re-run (refresh is idempotent), bounded.
            await _bounded(store.refresh(doomed[1], 2, "n2"), bound)
            others.append((await _bounded(store.get(elsewhere[len(others) % 10]), bound))[0])
            if outcome == "ok":
                recovered_after = time.monotonic() - killed_at
                break
            await asyncio.sleep(0.05)
        refused = [(o, t) for o, t in outcomes if o != "ok"]
        assert refused and recovered_after is not None, outcomes
        print(f"\nfailover: {len(refused)} reads on the killed master's slots refused "
              f"(StoreUnavailable, each within {max(t for _, t in refused):.2f} s), back after "
              f"{recovered_after:.2f} s; reads on the other masters meanwhile: "
              f"{others.count('ok')} ok, {len(others) - others.count('ok')} refused; "
              f"first refusal: {refused[0][0]}; last: {refused[-1][0]}")  # fmt: skip
        redis_cluster.wait_failover(victim, owned)
        assert redis_cluster.master_of_slot(_slot(K.record_key(doomed[0]))).port != first

        # Every session is readable with its last write (it had reached the replica).
        for sid, (version, epoch, bid) in expected.items():
            rec = await store.get(sid)
            assert rec is not None and (rec.version, rec.epoch, rec.binding_id) == (
                version, epoch, bid), sid.hex()  # fmt: skip
        # The promoted replica never saw SCRIPT LOAD (not replicated): NOSCRIPT, loaded, resent.
        promoted = redis_cluster.master_of_slot(_slot(K.record_key(doomed[0]))).client()
        sha = store._scripts["reattach"].sha  # noqa: SLF001
        assert promoted.script_exists(sha) == [False]
        for sid in doomed:
            assert (await reattach(store, sid, expected[sid][0], node="n3")).ok
        assert promoted.script_exists(sha) == [True]
        promoted.close()
        assert isinstance(store.batcher, ClusterScriptBatcher) and store.batcher.refreshes >= 1
        assert await born(store) and await store.sweep(10) == []
    finally:
        await store.close()
        if victim is not None:
            redis_cluster.restart(victim)  # the module's cluster is whole again


async def test_refused_node_fails_closed_without_topology(cluster_url: str) -> None:
    # Startup nodes that are all gone: StoreUnavailable, fast.
    store = SessionStore("redis+cluster://127.0.0.1:1", StoreConfig(connect_timeout_s=0.3,
                                                                     socket_timeout_s=0.3))  # fmt: skip
    try:
        outcome, elapsed = await _bounded(store.get(os.urandom(16)), 2.0)
        assert outcome.startswith("unavailable")
        outcome, _ = await _bounded(store.ping(), 2.0)
        assert outcome.startswith("unavailable")
    finally:
        await store.close()
