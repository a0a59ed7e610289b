"""Tombstones hold no secret: every path that writes one drops the wrapped session secret.

The raw Redis hash is read with redis-py (what a dump of the store holds), and a late
reattach still gets an explicit TERMINATED or EXPIRED from the store.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from session.reasons import RejectReason, TerminateReason
from session.states import SessionEvent, SessionState
from store import keys as K
from store.api import SessionStore
from store.status import StoreStatus
from tests.integration.test_store import born, reattach

# The wrapped session secret (everything traffic keys derive from) and the previous one a
# REKEY keeps until the client confirms; a tombstone keeps only the wrapped control key.
SECRET_FIELDS = {b"ws", b"wsp"}
KEPT_FIELDS = {b"st", b"v", b"ep", b"nd", b"tr", b"te", b"cr", b"dl", b"gen"}


async def _raw_keys(store: SessionStore, sid: bytes) -> dict[bytes, dict[bytes, bytes]]:
    """Every key of the session's hash tag, as a dump would hold it (hashes only)."""
    r = store.redis
    out: dict[bytes, dict[bytes, bytes]] = {}
    async for key in r.scan_iter(match=f"*{{{K.session_hex(sid)}}}*"):
        if await r.type(key) == b"hash":
            out[key] = await r.hgetall(key)
        else:
            out[key] = {}
    return out


async def _assert_secretless_tombstone(store: SessionStore, sid: bytes,
                                       status: StoreStatus) -> None:
    dump = await _raw_keys(store, sid)
    rec = dump.get(K.record_key(sid).encode())
    assert rec is not None, dump
    assert int(rec[b"st"]) == SessionState.TERMINATED
    assert not SECRET_FIELDS & rec.keys(), sorted(rec)
    assert KEPT_FIELDS <= rec.keys(), sorted(rec)  # what a late request is answered from
    for key, fields in dump.items():  # no other key of the session holds it either
        assert not any(b"w" * 61 in v for v in fields.values()), key
    late = await reattach(store, sid, int(rec[b"v"]))
    want = RejectReason.EXPIRED if status is StoreStatus.EXPIRED else RejectReason.TERMINATED
    assert (late.status, late.reason) == (status, want)
    got = await store.get(sid)
    assert got is not None and got.state is SessionState.TERMINATED and got.wrapped_secret == b""


async def _born_with_marked_secret(store: SessionStore, ttl_ms: int | None = None) -> bytes:
    sid = await born(store, ttl_ms=ttl_ms)
    await store.redis.hset(K.record_key(sid), "ws", b"w" * 61)  # recognisable in the dump
    assert (await reattach(store, sid, 1)).ok  # the nonce keys exist too
    return sid


async def _terminate(store: SessionStore, sid: bytes) -> None:
    assert (await store.terminate(sid, TerminateReason.CLIENT_CLOSE)).ok


async def _transition_terminate(store: SessionStore, sid: bytes) -> None:
    assert (await store.transition(sid, 2, SessionEvent.TERMINATE)).ok


@pytest.mark.parametrize("end", [_terminate, _transition_terminate], ids=["terminate", "transition"])
async def test_terminated_tombstone_holds_no_secret(
    session_store: SessionStore, end: Callable[[SessionStore, bytes], Awaitable[None]]
) -> None:
    sid = await _born_with_marked_secret(session_store)
    await end(session_store, sid)
    await _assert_secretless_tombstone(session_store, sid, StoreStatus.TERMINATED)


async def _by_expire(store: SessionStore, sid: bytes) -> None:
    assert (await store.expire(sid)).expired_now


async def _by_sweep(store: SessionStore, sid: bytes) -> None:
    assert [e.session_id for e in await store.sweep()] == [sid]


async def _by_reattach(store: SessionStore, sid: bytes) -> None:
    assert (await reattach(store, sid, 2)).expired_now


async def _by_refresh(store: SessionStore, sid: bytes) -> None:
    assert (await store.refresh(sid, 2, "n2")).expired_now


async def _by_transition(store: SessionStore, sid: bytes) -> None:
    assert (await store.transition(sid, 2, SessionEvent.TRANSPORT_LOST)).expired_now


@pytest.mark.parametrize("end", [_by_expire, _by_sweep, _by_reattach, _by_refresh, _by_transition],
                         ids=["expire", "sweep", "reattach", "refresh", "transition"])
async def test_expired_tombstone_holds_no_secret(
    session_store: SessionStore, end: Callable[[SessionStore, bytes], Awaitable[None]]
) -> None:
    sid = await _born_with_marked_secret(session_store, ttl_ms=300)
    await asyncio.sleep(0.35)
    await end(session_store, sid)
    await _assert_secretless_tombstone(session_store, sid, StoreStatus.EXPIRED)


async def test_live_record_keeps_its_secret(session_store: SessionStore) -> None:
    sid = await _born_with_marked_secret(session_store)
    rec = await session_store.redis.hgetall(K.record_key(sid))
    assert rec[b"ws"] == b"w" * 61  # the secret leaves only with the session
