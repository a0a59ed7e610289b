"""The session store against a real redis-server: every script status, races, fencing, sweep."""

from __future__ import annotations

import asyncio
import os

import pytest

from session.reasons import RejectReason, TerminateReason
from session.states import TRANSITIONS, SessionEvent, SessionState, is_allowed
from session.storeops import ActivateOp, ReattachOp
from session.wire import TransportKind
from store import keys as K
from store.api import ReattachResult, SessionStore, StoreConfig
from store.policy import ClientPolicy
from store.status import StoreStatus

UDP, TCP = TransportKind.UDP, TransportKind.TCP
S = SessionState
E = SessionEvent


def make_policy(**kw: object) -> ClientPolicy:
    base: dict[str, object] = {
        "public_key": os.urandom(32),
        "name": "test",
        "upstreams": ("127.0.0.1:80",),
    }
    base.update(kw)
    return ClientPolicy(**base)  # type: ignore[arg-type]


async def born(
    store: SessionStore, *, ttl_ms: int | None = None, node: str = "n1", **policy: object
) -> bytes:
    sid = os.urandom(16)
    res = await store.birth(
        sid, wrapped_secret=os.urandom(60), node=node, binding_id=os.urandom(16), kind=UDP,
        upstream="127.0.0.1:80", policy=make_policy(**policy), ttl_ms=ttl_ms,
    )  # fmt: skip
    assert res.ok, res
    return sid


async def reattach(
    store: SessionStore,
    sid: bytes,
    version: int,
    *,
    nonce: bytes | None = None,
    ts: int | None = None,
    kind: TransportKind = UDP,
    node: str = "n2",
    tag: str = "udp:198.51.100.7:40000",
    binding_id: bytes | None = None,
    **kw: int,
) -> ReattachResult:
    if ts is None:
        ts = store.estimated_server_ms() or await store.server_time_ms()
    return await store.reattach(
        sid, expected_version=version, nonce=nonce or os.urandom(16), timestamp_ms=ts, kind=kind,
        node=node, addr_tag=tag, binding_id=binding_id or os.urandom(16), **kw,
    )  # fmt: skip


# ---- birth and read ------------------------------------------------------------------------------


async def test_birth_creates_attached_v1_epoch1(session_store: SessionStore) -> None:
    sid = os.urandom(16)
    bid = os.urandom(16)
    pol = make_policy(ttl_s=60, reattach_rate=7, transports=("udp",))
    res = await session_store.birth(
        sid, wrapped_secret=b"w" * 60, node="gw-1", binding_id=bid, kind=UDP,
        upstream="10.0.0.1:443", policy=pol,
    )  # fmt: skip
    assert (res.status, res.version, res.epoch, res.state) == (StoreStatus.OK, 1, 1, S.ATTACHED)
    assert res.version == SessionStore.BIRTH_VERSION
    assert res.deadline_ms - res.server_ms == 60_000
    rec = await session_store.get(sid)
    assert rec is not None
    assert (rec.state, rec.version, rec.epoch, rec.binding_id, rec.node) == (
        S.ATTACHED,
        1,
        1,
        bid,
        "gw-1",
    )
    assert (rec.kind, rec.upstream, rec.client_id) == (UDP, "10.0.0.1:443", pol.public_key.hex())
    assert (rec.ttl_ms, rec.reattach_rate, rec.transports_mask) == (60_000, 7, 1 << int(UDP))
    assert rec.wrapped_secret == b"w" * 60
    assert rec.generation == await session_store.generation() and rec.generation > 0
    assert 0 < rec.remaining_ms <= 60_000 and rec.idle_ms < 1000
    assert "wrapped_secret" not in repr(rec)

    again = await session_store.birth(
        sid, wrapped_secret=b"x", node="gw-2", binding_id=os.urandom(16), kind=UDP,
        upstream="10.0.0.1:443", policy=pol,
    )  # fmt: skip
    assert again.status is StoreStatus.EXISTS
    assert (await session_store.get(sid)).node == "gw-1"  # type: ignore[union-attr]

    denied = await session_store.birth(
        os.urandom(16), wrapped_secret=b"x", node="gw-1", binding_id=os.urandom(16), kind=TCP,
        upstream="10.0.0.1:443", policy=pol,
    )  # fmt: skip
    assert denied.status is StoreStatus.POLICY_DENIED


async def test_get_unknown_is_none(session_store: SessionStore) -> None:
    assert await session_store.get(os.urandom(16)) is None
    with pytest.raises(ValueError):
        await session_store.get(b"short")


# ---- reattach: every status --------------------------------------------------------------------


async def test_reattach_grants_a_pending_binding_that_activate_makes_active(
        session_store: SessionStore) -> None:
    sid = await born(session_store)
    bid = os.urandom(16)
    res = await reattach(session_store, sid, 1, kind=TCP, node="n2", binding_id=bid)
    assert res.ok and res.reason is None
    assert (res.version, res.epoch, res.binding_id, res.node, res.prev_node) == (
        2,
        2,
        bid,
        "n2",
        "n1",
    )
    assert (res.state, res.prev_state, res.prev_kind) == (S.ATTACHED, S.ATTACHED, UDP)
    assert not res.retry and not res.expired_now and res.binding_current
    assert res.binding_pending
    rec = await session_store.get(sid)
    assert rec is not None
    # Granted PENDING: the version is consumed, the previous binding is still the ACTIVE one.
    assert (rec.version, rec.epoch, rec.node, rec.kind) == (2, 1, "n1", UDP)
    assert (rec.pending_epoch, rec.pending_node, rec.pending_binding_id) == (2, "n2", bid)
    assert rec.last_reattach_ms == res.server_ms
    assert rec.deadline_ms == res.server_ms + rec.ttl_ms
    act = await session_store.activate(sid, 2, bid, "n2")
    assert act.ok and (act.epoch, act.node, act.prev_epoch, act.prev_node) == (2, "n2", 1, "n1")
    assert act.version == 2  # activation consumes no version
    rec = await session_store.get(sid)
    assert rec is not None
    assert (rec.version, rec.epoch, rec.binding_id, rec.node, rec.kind) == (2, 2, bid, "n2", TCP)
    assert (rec.pending_epoch, rec.pending_node) == (0, "")
    again = await session_store.activate(sid, 2, bid, "n2")  # idempotent, and it says what
    assert again.ok and (again.prev_epoch, again.prev_node) == (1, "n1")  # the first did, when
    assert again.activated_ms == act.activated_ms == act.server_ms <= again.server_ms


async def test_reattach_nowait_queues_the_same_cas(session_store: SessionStore,
                                                    redis_url: str) -> None:
    """The task-less first step of reattach: same checks, same script, same result; and
    None (call reattach) where it has no fast path."""
    store = session_store
    sid = await born(store)
    ts = store.estimated_server_ms() or await store.server_time_ms()
    call = dict(expected_version=1, nonce=os.urandom(16), timestamp_ms=ts, kind=TCP, node="n2",
                addr_tag="tcp:198.51.100.7:1", binding_id=os.urandom(16))
    with pytest.raises(ValueError):  # the same argument checks as reattach
        store.reattach_nowait(sid, **{**call, "nonce": b"short"})  # type: ignore[arg-type]
    pending = store.reattach_nowait(sid, **call)  # type: ignore[arg-type]
    assert pending is not None
    await asyncio.wait_for(asyncio.shield(pending.future), 5)
    res = store.reattach_done(pending)
    assert res is not None and res.ok and (res.version, res.node, res.prev_node) == (2, "n2", "n1")
    # finish_reattach on the same reply reaches the same decision.
    assert await store.finish_reattach(pending) == res
    # The same call sent again: the recorded decision (an idempotent retry), nothing twice.
    retry = store.reattach_nowait(sid, **call)  # type: ignore[arg-type]
    assert retry is not None
    await asyncio.wait_for(asyncio.shield(retry.future), 5)
    again = store.reattach_done(retry)
    assert again is not None and again.retry
    assert (again.version, again.binding_id) == (2, call["binding_id"])
    # No fast path: coalescing off (one pipeline per call).
    direct = SessionStore(redis_url, StoreConfig(coalesce=False))
    try:
        await direct.generation()
        assert direct.reattach_nowait(sid, **call) is None  # type: ignore[arg-type]
    finally:
        await direct.close()


async def test_reattach_soon_decodes_the_reply_in_the_batch(session_store: SessionStore) -> None:
    """The gateway's way to run the CAS: queued with no task, its future completed with the
    decoded result from the batch; what needs the rest of reattach (here a store generation
    that moved under the node) continues in a task and reaches the same kind of answer."""
    store = session_store
    sid = await born(store)
    ts = store.estimated_server_ms() or await store.server_time_ms()
    op = ReattachOp(sid, 1, os.urandom(16), ts, TCP, "n2", os.urandom(16), "tcp:198.51.100.7:1",
                    30_000, 2_000)
    paths = dict(store.reattach_paths)
    res = await asyncio.wait_for(store.reattach_soon(op), 5)
    assert res.ok and (res.version, res.node, res.prev_node) == (2, "n2", "n1")
    assert store.reattach_paths["queued"] == paths["queued"] + 1
    assert store.reattach_paths["resumed"] == paths["resumed"]
    again = await asyncio.wait_for(store.reattach_soon(op), 5)  # the same request again
    assert again.retry and (again.version, again.binding_id) == (2, op.binding_id)
    # The node's view of the generation is wrong: the script refuses (GENERATION_MOVED), the
    # reattach re-reads it and runs again.
    assert store._generation is not None
    store._generation += 1
    later = ReattachOp(sid, 2, os.urandom(16), ts, TCP, "n3", os.urandom(16),
                       "tcp:198.51.100.8:1", 30_000, 2_000)
    moved = await asyncio.wait_for(store.reattach_soon(later), 5)
    assert store.reattach_paths["resumed"] == paths["resumed"] + 1
    assert moved.ok and (moved.version, moved.node) == (3, "n3")


async def test_a_settle_that_raises_fails_its_own_call_only(session_store: SessionStore) -> None:
    """A batch hands each reply to its call's settle: one that raises fails that call's
    future and the batch's other calls still get their answers."""
    store = session_store
    sid = await born(store)
    ts = store.estimated_server_ms() or await store.server_time_ms()
    ops = [ReattachOp(sid, 1, os.urandom(16), ts, TCP, "n2", os.urandom(16), f"tcp:198.51.100.{i}:1",
                      30_000, 2_000) for i in range(3)]
    calls = 0

    def broken(reply: object) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a decoder bug")
        return real(reply)

    real = store._reattach_reply
    store._reattach_reply = broken  # type: ignore[method-assign]
    futs = [store.reattach_soon(op) for op in ops]  # one batch
    done = await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), 5)
    assert isinstance(done[0], RuntimeError)
    assert all(isinstance(r, ReattachResult) for r in done[1:])  # a decision each
    assert sum(1 for r in done[1:] if isinstance(r, ReattachResult) and r.ok) <= 1


async def test_activate_soon_queues_the_activation(session_store: SessionStore) -> None:
    """activate_soon as reattach_soon: queued, decoded in the batch; idempotent when run
    again; a moved generation continues in the task and still activates."""
    store = session_store
    sid = await born(store)
    ts = store.estimated_server_ms() or await store.server_time_ms()
    bid = os.urandom(16)
    grant = await asyncio.wait_for(store.reattach_soon(ReattachOp(
        sid, 1, os.urandom(16), ts, TCP, "n2", bid, "tcp:198.51.100.7:1", 30_000, 2_000)), 5)
    assert grant.ok and grant.binding_pending
    paths = dict(store.activate_paths)
    act = await asyncio.wait_for(store.activate_soon(ActivateOp(sid, grant.epoch, bid, "n2")), 5)
    assert act.ok and (act.epoch, act.node, act.prev_epoch, act.prev_node) == (2, "n2", 1, "n1")
    assert store.activate_paths["queued"] == paths["queued"] + 1
    again = await asyncio.wait_for(store.activate_soon(ActivateOp(sid, 2, bid, "n2")), 5)
    assert again.ok and again.activated_ms == act.activated_ms
    assert store._generation is not None
    store._generation += 1  # the node's view of the generation is wrong: resumed, then run
    moved = await asyncio.wait_for(store.activate_soon(ActivateOp(sid, 2, bid, "n2")), 5)
    assert moved.ok and store.activate_paths["resumed"] == paths["resumed"] + 1
    wrong = await asyncio.wait_for(store.activate_soon(ActivateOp(sid, 3, bid, "n2")), 5)
    assert wrong.status is StoreStatus.NOT_OWNER


async def test_reattach_unknown_session(session_store: SessionStore) -> None:
    res = await reattach(session_store, os.urandom(16), 1)
    assert (res.status, res.reason, res.state) == (
        StoreStatus.UNKNOWN_SESSION,
        RejectReason.UNKNOWN_SESSION,
        None,
    )


async def test_reattach_terminated_returns_tombstone_version(session_store: SessionStore) -> None:
    sid = await born(session_store)
    term = await session_store.terminate(sid, TerminateReason.CLIENT_CLOSE)
    assert term.ok and not term.already and term.version == 2
    res = await reattach(session_store, sid, 1)
    assert (res.status, res.reason, res.version) == (
        StoreStatus.TERMINATED,
        RejectReason.TERMINATED,
        2,
    )
    assert res.terminate_reason is TerminateReason.CLIENT_CLOSE and not res.expired_now


async def test_reattach_expired_writes_tombstone_once(session_store: SessionStore) -> None:
    sid = await born(session_store, ttl_ms=50)
    await asyncio.sleep(0.1)
    first = await reattach(session_store, sid, 1)
    assert (first.status, first.reason, first.expired_now) == (
        StoreStatus.EXPIRED,
        RejectReason.EXPIRED,
        True,
    )
    assert (first.version, first.state, first.prev_state) == (2, S.TERMINATED, S.ATTACHED)
    rec = await session_store.get(sid)
    assert rec is not None and rec.state is S.TERMINATED and rec.version == 2
    assert rec.terminate_reason is TerminateReason.EXPIRED and rec.terminated_ms == first.server_ms
    assert rec.wrapped_secret == b""  # no secret outlives its session (store/README.md)
    ttl = await session_store.redis.pttl(K.record_key(sid))
    assert 0 < ttl <= session_store.config.tombstone_ttl_s * 1000
    second = await reattach(session_store, sid, 1)
    assert (second.status, second.expired_now, second.version) == (StoreStatus.EXPIRED, False, 2)


async def test_reattach_clock_skew(session_store: SessionStore) -> None:
    sid = await born(session_store)
    now = await session_store.server_time_ms()
    for ts in (now - 31_000, now + 31_000):
        res = await reattach(session_store, sid, 1, ts=ts, window_ms=30_000)
        assert (res.status, res.reason) == (StoreStatus.CLOCK_SKEW, RejectReason.CLOCK_SKEW)
    res = await reattach(session_store, sid, 1, ts=now - 29_000, window_ms=30_000)
    assert res.ok


async def test_reattach_replayed_nonce_from_other_addr_tag(session_store: SessionStore) -> None:
    sid = await born(session_store)
    nonce = os.urandom(16)
    ok = await reattach(session_store, sid, 1, nonce=nonce, tag="udp:a")
    assert ok.ok
    before = await session_store.get(sid)
    replay = await reattach(session_store, sid, 1, nonce=nonce, tag="udp:attacker", node="n3")
    assert (replay.status, replay.reason) == (
        StoreStatus.REPLAYED_NONCE,
        RejectReason.REPLAYED_NONCE,
    )
    after = await session_store.get(sid)
    assert before is not None and after is not None
    assert (after.version, after.epoch, after.binding_id, after.node) == (
        before.version, before.epoch, before.binding_id, before.node)  # fmt: skip


async def test_reattach_retry_same_tag_is_idempotent(session_store: SessionStore) -> None:
    sid = await born(session_store)
    nonce, bid = os.urandom(16), os.urandom(16)
    first = await reattach(session_store, sid, 1, nonce=nonce, tag="udp:a", binding_id=bid)
    assert first.ok
    before = await session_store.get(sid)
    # A retransmission of the same request (its ACK was lost), even handled by another node.
    again = await reattach(session_store, sid, 1, nonce=nonce, tag="udp:a", node="n9",
                           binding_id=os.urandom(16))  # fmt: skip
    assert again.ok and again.retry and again.binding_current
    same = ("status", "reason", "version", "epoch", "binding_id", "node", "state")
    assert all(getattr(again, f) == getattr(first, f) for f in same), (first, again)
    after = await session_store.get(sid)
    assert before is not None and after is not None
    assert (after.version, after.epoch, after.binding_id, after.node, after.deadline_ms) == (
        before.version, before.epoch, before.binding_id, before.node, before.deadline_ms)  # fmt: skip

    # A recorded rejection is replayed just the same.
    stale_nonce = os.urandom(16)
    stale = await reattach(session_store, sid, 99, nonce=stale_nonce, tag="udp:a")
    assert stale.status is StoreStatus.STALE_VERSION
    stale2 = await reattach(session_store, sid, 99, nonce=stale_nonce, tag="udp:a")
    assert (stale2.status, stale2.retry, stale2.version) == (
        StoreStatus.STALE_VERSION,
        True,
        stale.version,
    )

    # Once superseded, a late retry still gets its recorded answer, marked not current.
    moved = await reattach(session_store, sid, 2, tag="tcp:b", kind=TCP, node="n3")
    assert moved.ok
    late = await reattach(session_store, sid, 1, nonce=nonce, tag="udp:a")
    assert late.retry and late.ok and late.binding_id == bid and not late.binding_current


async def test_reattach_rate_limited(session_store: SessionStore) -> None:
    sid = await born(session_store, reattach_rate=2)
    assert (await reattach(session_store, sid, 1)).ok
    assert (await reattach(session_store, sid, 2)).ok
    res = await reattach(session_store, sid, 3)
    assert (res.status, res.reason) == (StoreStatus.RATE_LIMITED, RejectReason.RATE_LIMITED)
    assert (await session_store.get(sid)).version == 3  # type: ignore[union-attr]


async def test_reattach_policy_denied(session_store: SessionStore) -> None:
    sid = await born(session_store, transports=("udp",))
    res = await reattach(session_store, sid, 1, kind=TCP)
    assert (res.status, res.reason) == (StoreStatus.POLICY_DENIED, RejectReason.POLICY_DENIED)
    assert (await reattach(session_store, sid, 1, kind=UDP)).ok


async def test_reattach_stale_version_and_dual_active(session_store: SessionStore) -> None:
    sid = await born(session_store)
    res = await reattach(session_store, sid, 7)
    assert (res.status, res.reason, res.version) == (
        StoreStatus.STALE_VERSION,
        RejectReason.STALE_VERSION,
        1,
    )
    assert (await reattach(session_store, sid, 1, tag="udp:a")).ok
    # A second claimant for the version just consumed, within the window: a race.
    race = await reattach(session_store, sid, 1, tag="udp:b", dual_active_window_ms=5_000)
    assert (race.status, race.reason) == (
        StoreStatus.DUAL_ACTIVE_CONFLICT,
        RejectReason.DUAL_ACTIVE_CONFLICT,
    )
    # The same claim outside the window is merely stale.
    late = await reattach(session_store, sid, 1, tag="udp:c", dual_active_window_ms=0)
    assert late.status is StoreStatus.STALE_VERSION
    rec = await session_store.get(sid)
    assert rec is not None and rec.version == 2 and rec.pending_epoch == 2


async def test_reattach_rejects_bad_arguments(session_store: SessionStore) -> None:
    sid = await born(session_store)
    with pytest.raises(ValueError):
        await reattach(session_store, sid, 1, nonce=b"short")
    with pytest.raises(ValueError):
        await reattach(session_store, sid, 1, node="")
    huge = await reattach(session_store, sid, 2**64 - 1)
    assert huge.status is StoreStatus.STALE_VERSION


# ---- the transport-loss rule ----------------------------------------------------------------


async def test_lost_rule_accepts_version_before_transport_lost(session_store: SessionStore) -> None:
    sid = await born(session_store)
    lost = await session_store.transition(sid, 1, E.TRANSPORT_LOST)
    assert lost.ok and (lost.version, lost.state) == (2, S.RECOVERING)
    rec = await session_store.get(sid)
    assert rec is not None and rec.lost_version == 1
    # The client never saw version 2: its proof for version 1 is accepted.
    res = await reattach(session_store, sid, 1)
    assert res.ok and (res.version, res.epoch, res.prev_state) == (3, 2, S.RECOVERING)
    rec = await session_store.get(sid)
    assert rec is not None and rec.lost_version is None and rec.state is S.ATTACHED
    # The rule applies only while RECOVERING after the mark: version 1 is now just old.
    assert (
        await reattach(session_store, sid, 1, tag="udp:z")
    ).status is StoreStatus.DUAL_ACTIVE_CONFLICT
    assert (await reattach(session_store, sid, 1, tag="udp:y", dual_active_window_ms=0)).status is (
        StoreStatus.STALE_VERSION)  # fmt: skip


async def test_lost_rule_current_version_also_accepted(session_store: SessionStore) -> None:
    sid = await born(session_store)
    assert (await session_store.transition(sid, 1, E.TRANSPORT_LOST)).ok
    res = await reattach(session_store, sid, 2)
    assert res.ok and res.version == 3


async def test_lost_cleared_by_other_mutation(session_store: SessionStore) -> None:
    sid = await born(session_store)
    assert (await session_store.transition(sid, 1, E.QUALITY_VOLATILE)).ok
    assert (await session_store.transition(sid, 2, E.TRANSPORT_LOST)).ok
    assert (await session_store.get(sid)).lost_version == 2  # type: ignore[union-attr]
    # Version 1 (before VOLATILE) is not covered by the rule.
    assert (await reattach(session_store, sid, 1)).status is StoreStatus.STALE_VERSION


# ---- transitions ---------------------------------------------------------------------------------


async def _session_in(store: SessionStore, state: SessionState) -> tuple[bytes, int]:
    sid = await born(store)
    path = {
        S.ATTACHED: [],
        S.VOLATILE: [E.QUALITY_VOLATILE],
        S.DEGRADED: [E.QUALITY_DEGRADED],
        S.RECOVERING: [E.TRANSPORT_LOST],
    }[state]
    version = 1
    for ev in path:
        res = await store.transition(sid, version, ev)
        assert res.ok, res
        version = res.version
    return sid, version


async def test_transition_table_matches_python(session_store: SessionStore) -> None:
    events = [e for e in E if e not in (E.REATTACH, E.HANDSHAKE_COMPLETE)]
    for state in (S.ATTACHED, S.VOLATILE, S.DEGRADED, S.RECOVERING):
        for event in events:
            sid, version = await _session_in(session_store, state)
            res = await session_store.transition(sid, version, event)
            if is_allowed(state, event):
                assert res.ok, res.detail
                assert (res.version, res.state, res.prev_state) == (
                    version + 1,
                    TRANSITIONS[state][event],
                    state,
                )
            else:
                assert res.status is StoreStatus.ILLEGAL_TRANSITION
                assert event.name in res.detail and state.name in res.detail
                assert res.version == version and res.state is state


async def test_transition_stale_and_tombstones(session_store: SessionStore) -> None:
    sid = await born(session_store)
    stale = await session_store.transition(sid, 5, E.QUALITY_DEGRADED)
    assert (stale.status, stale.version, stale.state) == (StoreStatus.STALE_VERSION, 1, S.ATTACHED)
    term = await session_store.transition(sid, 1, E.TERMINATE, TerminateReason.SECURITY)
    assert term.ok and (term.version, term.state, term.terminate_reason) == (
        2,
        S.TERMINATED,
        TerminateReason.SECURITY,
    )
    after = await session_store.transition(sid, 2, E.QUALITY_VOLATILE)
    assert after.status is StoreStatus.TERMINATED and after.version == 2
    with pytest.raises(ValueError):
        await session_store.transition(sid, 2, E.REATTACH)

    sid2 = await born(session_store)
    exp = await session_store.transition(sid2, 1, E.EXPIRE)
    assert exp.ok and exp.terminate_reason is TerminateReason.EXPIRED
    assert (await reattach(session_store, sid2, 1)).status is StoreStatus.EXPIRED
    ttl = await session_store.redis.pttl(K.record_key(sid2))
    assert 0 < ttl <= 3600 * 1000


async def test_transition_past_deadline_expires(session_store: SessionStore) -> None:
    sid = await born(session_store, ttl_ms=30)
    await asyncio.sleep(0.08)
    res = await session_store.transition(sid, 1, E.QUALITY_VOLATILE)
    assert (res.status, res.expired_now, res.state) == (StoreStatus.EXPIRED, True, S.TERMINATED)


# ---- refresh and fencing ------------------------------------------------------------------------


async def test_refresh_fences_the_previous_owner(session_store: SessionStore) -> None:
    sid = await born(session_store, node="n1")
    ok = await session_store.refresh(sid, 1, "n1")
    assert ok.ok and ok.version == 1 and ok.deadline_ms == ok.server_ms + 300_000
    moved = await reattach(session_store, sid, 1, node="n2")
    assert moved.ok
    # Until the new binding validates, both the ACTIVE holder and the PENDING one may refresh.
    assert (await session_store.refresh(sid, 1, "n1")).ok
    assert (await session_store.refresh(sid, 2, "n2")).ok
    assert (await session_store.activate(sid, 2, moved.binding_id, "n2")).ok
    stale = await session_store.refresh(sid, 1, "n1")
    assert (stale.status, stale.epoch, stale.node) == (StoreStatus.NOT_OWNER, 2, "n2")
    wrong_node = await session_store.refresh(sid, 2, "n1")
    assert wrong_node.status is StoreStatus.NOT_OWNER
    before = await session_store.get(sid)
    await asyncio.sleep(0.01)
    owner = await session_store.refresh(sid, 2, "n2")
    assert owner.ok and owner.version == 2  # no version bump
    after = await session_store.get(sid)
    assert before is not None and after is not None
    assert after.version == before.version and after.deadline_ms > before.deadline_ms


async def test_refresh_expired_and_terminated(session_store: SessionStore) -> None:
    sid = await born(session_store, ttl_ms=40)
    await asyncio.sleep(0.09)
    first = await session_store.refresh(sid, 1, "n1")
    assert (first.status, first.expired_now) == (StoreStatus.EXPIRED, True)
    second = await session_store.refresh(sid, 1, "n1")
    assert (second.status, second.expired_now) == (StoreStatus.EXPIRED, False)
    sid2 = await born(session_store)
    await session_store.terminate(sid2, TerminateReason.ADMIN)
    assert (await session_store.refresh(sid2, 1, "n1")).status is StoreStatus.TERMINATED
    assert (
        await session_store.refresh(os.urandom(16), 1, "n1")
    ).status is StoreStatus.UNKNOWN_SESSION


async def test_terminate_is_idempotent(session_store: SessionStore) -> None:
    sid = await born(session_store)
    first = await session_store.terminate(sid, TerminateReason.POLICY_REVOKED)
    assert first.ok and not first.already and first.prev_state is S.ATTACHED
    second = await session_store.terminate(sid, TerminateReason.ADMIN)
    assert second.ok and second.already and second.version == first.version
    assert second.terminate_reason is TerminateReason.POLICY_REVOKED
    assert not (await session_store.terminate(os.urandom(16))).ok
    assert await session_store.redis.zscore(K.EXPIRY_INDEX, sid.hex()) is None


# ---- sweep --------------------------------------------------------------------------------------


async def test_sweep_expires_due_sessions_and_keeps_fresh(session_store: SessionStore) -> None:
    due = [await born(session_store, ttl_ms=40) for _ in range(3)]
    fresh = [await born(session_store, ttl_ms=60_000) for _ in range(2)]
    moving = await born(session_store, ttl_ms=1_500)  # its hint comes due before its deadline
    await asyncio.sleep(0.6)
    refreshed = await session_store.refresh(moving, 1, "n1")
    assert refreshed.ok
    swept = await session_store.sweep(100)
    assert sorted(s.session_id for s in swept) == sorted(due)
    assert all(s.prev_state is S.ATTACHED and s.version == 2 for s in swept)
    for sid in due:
        rec = await session_store.get(sid)
        assert rec is not None and rec.terminate_reason is TerminateReason.EXPIRED
        assert await session_store.redis.zscore(K.EXPIRY_INDEX, sid.hex()) is None
    for sid in [*fresh, moving]:
        rec = await session_store.get(sid)
        assert rec is not None and rec.state is S.ATTACHED and rec.version == 1
    # The moved deadline is now the hint.
    assert await session_store.redis.zscore(K.EXPIRY_INDEX, moving.hex()) == refreshed.deadline_ms
    assert await session_store.sweep(100) == []
    # An expiry another node noticed first is not reported twice.
    late = await born(session_store, ttl_ms=30)
    await asyncio.sleep(0.06)
    assert (await reattach(session_store, late, 1)).expired_now
    assert await session_store.sweep(100) == []


# ---- PENDING and ACTIVE --------------------------------------------------------------------------


async def test_a_newer_grant_supersedes_an_unvalidated_one(session_store: SessionStore) -> None:
    """A grant nobody validated (a copier's) is superseded by the next one, with the next
    epoch: no epoch is granted twice, and the superseded binding can never become ACTIVE."""
    sid = await born(session_store, reattach_rate=100)
    first = await reattach(session_store, sid, 1, node="n2", tag="udp:copier")
    assert first.ok and first.epoch == 2
    second = await reattach(session_store, sid, 2, node="n3", tag="udp:client")
    assert second.ok and second.epoch == 3 and second.prev_node == "n1"
    late = await session_store.activate(sid, first.epoch, first.binding_id, "n2")
    assert (late.status, late.epoch, late.node) == (StoreStatus.NOT_OWNER, 1, "n1")
    assert (await session_store.refresh(sid, 2, "n2")).status is StoreStatus.NOT_OWNER
    act = await session_store.activate(sid, 3, second.binding_id, "n3")
    assert act.ok and (act.prev_epoch, act.prev_node) == (1, "n1")
    rec = await session_store.get(sid)
    assert rec is not None and (rec.epoch, rec.node, rec.version) == (3, "n3", 3)
    # After an activation the next grant still takes a fresh epoch.
    third = await reattach(session_store, sid, 3, node="n1", tag="udp:client2")
    assert third.ok and third.epoch == 4


async def test_a_retried_request_finds_its_pending_grant(session_store: SessionStore) -> None:
    """The idempotent retransmission of a granted request says whether its binding is still
    the PENDING one (the node adopts it PENDING) or was superseded."""
    sid = await born(session_store, reattach_rate=100)
    nonce = os.urandom(16)
    first = await reattach(session_store, sid, 1, nonce=nonce, node="n2")
    again = await reattach(session_store, sid, 1, nonce=nonce, node="n2")
    assert again.retry and again.binding_current and again.binding_pending
    assert (again.epoch, again.binding_id) == (first.epoch, first.binding_id)
    assert (await session_store.activate(sid, first.epoch, first.binding_id, "n2")).ok
    active = await reattach(session_store, sid, 1, nonce=nonce, node="n2")
    assert active.retry and active.binding_current and not active.binding_pending
    await reattach(session_store, sid, 2, node="n3", tag="udp:other")
    gone = await reattach(session_store, sid, 1, nonce=nonce, node="n2")
    assert gone.retry and gone.binding_current and not gone.binding_pending  # still ACTIVE
    await session_store.activate(sid, 3, (await session_store.get(sid)).pending_binding_id,  # type: ignore[union-attr]
                                 "n3")
    superseded = await reattach(session_store, sid, 1, nonce=nonce, node="n2")
    assert superseded.retry and not superseded.binding_current


async def test_an_ended_session_cannot_be_activated(session_store: SessionStore) -> None:
    sid = await born(session_store)
    granted = await reattach(session_store, sid, 1, node="n2")
    assert (await session_store.terminate(sid)).ok
    res = await session_store.activate(sid, granted.epoch, granted.binding_id, "n2")
    assert res.status is StoreStatus.TERMINATED
    rec = await session_store.get(sid)
    assert rec is not None and rec.pending_node == "" and rec.pending_binding_id == b""
    assert (await session_store.activate(os.urandom(16), 2, os.urandom(16), "n2")).status is (
        StoreStatus.UNKNOWN_SESSION)


# ---- the race ------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_two_claimants_never_both_win(session_store: SessionStore) -> None:
    sid = await born(session_store, reattach_rate=100_000)
    version = 1
    seen_bids: set[bytes] = set()
    # The nonce cache records at most NonceCache.MAX (1024) decisions per 2 x window whatever
    # the rate: a 100 ms window keeps these 2000 decisions well under it.
    for _ in range(1000):
        now = session_store.estimated_server_ms()
        bid_a, bid_b = os.urandom(16), os.urandom(16)
        a, b = await asyncio.gather(
            reattach(session_store, sid, version, ts=now, tag="udp:a", node="na", binding_id=bid_a,
                     window_ms=100),
            reattach(session_store, sid, version, ts=now, tag="tcp:b", node="nb", binding_id=bid_b,
                     kind=TCP, window_ms=100),
        )  # fmt: skip
        winners = [r for r in (a, b) if r.ok]
        losers = [r for r in (a, b) if not r.ok]
        assert len(winners) == 1 and len(losers) == 1, (a, b)
        assert losers[0].status in (StoreStatus.DUAL_ACTIVE_CONFLICT, StoreStatus.STALE_VERSION)
        win = winners[0]
        assert win.version == version + 1
        loser_bid = bid_b if win.binding_id == bid_a else bid_a
        loser_node = "nb" if win.node == "na" else "na"
        lost = await session_store.activate(sid, win.epoch, loser_bid, loser_node)
        assert lost.status is StoreStatus.NOT_OWNER, lost
        assert (await session_store.activate(sid, win.epoch, win.binding_id, win.node)).ok
        rec = await session_store.get(sid)
        assert rec is not None
        assert (rec.version, rec.epoch, rec.binding_id, rec.node) == (
            win.version,
            win.epoch,
            win.binding_id,
            win.node,
        )
        assert loser_bid not in seen_bids and rec.binding_id != loser_bid
        seen_bids.add(win.binding_id)
        version = win.version
    assert version == 1001


# ---- batching ------------------------------------------------------------------------------------


async def test_batcher_returns_each_caller_its_own_result(session_store: SessionStore) -> None:
    pol = make_policy(reattach_rate=1000)
    sids = [os.urandom(16) for _ in range(2000)]
    births = await asyncio.gather(*(
        session_store.birth(sid, wrapped_secret=sid * 2, node=f"n{i % 7}", binding_id=sid,
                            kind=UDP, upstream=f"10.0.{i // 250}.{i % 250}:443", policy=pol)
        for i, sid in enumerate(sids)
    ))  # fmt: skip
    assert all(b.ok for b in births)
    batches0, calls0 = session_store.batcher.batches, session_store.batcher.calls
    now = await session_store.server_time_ms()
    bids = [os.urandom(16) for _ in sids]
    results = await asyncio.gather(*(
        reattach(session_store, sid, 1, ts=now, node=f"m{i}", binding_id=bids[i], tag=f"udp:{i}")
        for i, sid in enumerate(sids)
    ))  # fmt: skip
    for i, res in enumerate(results):
        assert (
            res.ok
            and res.binding_id == bids[i]
            and res.node == f"m{i}"
            and res.prev_node == f"n{i % 7}"
        )
    records = await asyncio.gather(*(session_store.get(sid) for sid in sids))
    for i, (sid, rec) in enumerate(zip(sids, records, strict=True)):
        assert rec is not None and rec.session_id == sid and rec.wrapped_secret == sid * 2
        assert rec.upstream == f"10.0.{i // 250}.{i % 250}:443"
        assert rec.pending_binding_id == bids[i]
    batches = session_store.batcher.batches - batches0
    calls = session_store.batcher.calls - calls0
    assert calls == 4000 and batches < calls / 20, (batches, calls)


async def test_batcher_recovers_from_noscript(session_store: SessionStore) -> None:
    sid = await born(session_store)
    await session_store.redis.script_flush()
    results = await asyncio.gather(*(session_store.get(sid) for _ in range(50)))
    assert all(r is not None and r.version == 1 for r in results)
    await session_store.redis.script_flush()
    assert (await reattach(session_store, sid, 1)).ok


async def test_uncoalesced_mode_and_raw_call(redis_url: str) -> None:
    store = SessionStore(redis_url, StoreConfig(coalesce=False))
    try:
        sid = await born(store)
        res = await asyncio.gather(*(store.get(sid) for _ in range(100)))
        assert all(r is not None for r in res)
        assert store.batcher.batches == store.batcher.calls  # one pipeline per call
        raw = await store.raw_evalsha("read", [K.record_key(sid)], [])
        assert raw[0] > 0 and raw[1]
    finally:
        await store.close()


# ---- registry, listing, pub/sub, audit ---------------------------------------------------------


async def test_client_registry(session_store: SessionStore) -> None:
    from session.quality import QualityThresholds

    a = make_policy(name="alice", transports=("udp",), upstreams=("10.0.0.1:443", "[::1]:80"),
                    quality=QualityThresholds(volatile_rtt_ms=123.0), ttl_s=42.5)  # fmt: skip
    b = make_policy(name="bob", reattach_rate=5)
    stored = await session_store.add_client(a)
    assert stored.created_ms > 0
    await session_store.add_client(b)
    got = await session_store.get_client(a.public_key.hex())
    assert got == stored and got.quality is not None and got.quality.volatile_rtt_ms == 123.0
    assert got.transport_mask == 1 << int(UDP) and got.ttl_ms == 42_500
    assert await session_store.get_client(b.public_key) == await session_store.get_client(
        b.public_key.hex()
    )
    assert [p.name for p in await session_store.list_clients()] == ["alice", "bob"]
    assert await session_store.remove_client(a.public_key)
    assert not await session_store.remove_client(a.public_key)
    assert await session_store.get_client(a.public_key) is None
    with pytest.raises(ValueError):
        make_policy(transports=("sctp",))


async def test_list_sessions_pages_through_records_only(session_store: SessionStore) -> None:
    sids = {await born(session_store) for _ in range(250)}
    first = next(iter(sids))
    assert (await reattach(session_store, first, 1)).ok  # creates a nonce key too
    found: list[bytes] = []
    cursor = 0
    while True:
        page = await session_store.list_sessions(limit=100, cursor=cursor)
        found.extend(r.session_id for r in page.sessions)
        cursor = page.cursor
        if cursor == 0:
            break
    assert set(found) == sids and len(found) == len(set(found))


async def test_handshake_claim(session_store: SessionStore) -> None:
    digest = os.urandom(32)
    assert await session_store.claim_handshake(digest, 1000)
    assert not await session_store.claim_handshake(digest, 1000)


async def test_binding_changes_pubsub(redis_url: str) -> None:
    store = SessionStore(redis_url, StoreConfig(socket_timeout_s=0.3))
    got: list[object] = []

    async def listen() -> None:
        async for change in store.binding_changes(poll_s=0.1):
            got.append(change)
            if len(got) == 2:
                return

    task = asyncio.create_task(listen())
    try:
        await asyncio.sleep(0.8)  # idle longer than the socket timeout: no error
        assert not task.done()
        sid = os.urandom(16)
        assert await store.publish_binding_change(sid, "n2", 5) == 1
        await store.redis.publish(K.BINDINGS_CHANNEL, b"garbage")  # ignored
        await store.publish_binding_change(sid, "n3", 6)
        await asyncio.wait_for(task, 2.0)
        assert got == [(sid, "n2", 5), (sid, "n3", 6)]
        assert got[0].node == "n2"  # type: ignore[attr-defined]
    finally:
        task.cancel()
        await store.close()


async def test_audit_stream(session_store: SessionStore) -> None:
    for i in range(3):
        await session_store.xadd_event(
            {"event.action": "reattach", "n": i, "ok": True}, maxlen=1000
        )
    entries = await session_store.redis.xrange(K.AUDIT_STREAM)
    assert entries is not None and len(entries) == 3
    assert entries[2][1] == {b"event.action": b"reattach", b"n": b"2", b"ok": b"true"}
