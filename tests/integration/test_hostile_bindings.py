"""PENDING/ACTIVE bindings and REKEY against a real redis-server, as an attacker drives them.

Each test is one attack on the store's side of the rules of docs/ARCHITECTURE.md
(Security rules, as implemented: "Pending, then active binding" and "Rekey"): it
plays the scripts in the order an on-path attacker, a slow node or a race would,
and checks what the store holds afterwards.
"""

from __future__ import annotations

import os

from store.api import RekeyResult, SessionStore
from store.status import StoreStatus
from tests.integration.test_store import born, reattach


async def _rekey(store: SessionStore, sid: bytes, node: str = "n1") -> RekeyResult:
    """The ACTIVE binding's holder installs the next secret (as a node does for a REKEY)."""
    rec = await store.get(sid)
    assert rec is not None
    return await store.rekey(sid, epoch=rec.epoch, binding_id=rec.binding_id, node=node,
                             generation=rec.key_generation, wrapped_secret=os.urandom(60),
                             wrapped_control=os.urandom(60), new_binding_id=os.urandom(16))


async def test_a_request_withheld_across_a_rekey_cannot_roll_the_secret_back(
        session_store: SessionStore) -> None:
    """An on-path attacker withholds a REATTACH_REQUEST (proven under the secret of the
    time), lets the client REKEY, and delivers the request before the client's first packet
    under the new keys. Its proof is under the previous secret, which the store still
    keeps: were it taken as the client's "I never learned the REKEY", the store would put
    the previous secret back (the new one, which the client holds, gone: its next reattach
    fails for good, and a dump opens the traffic before the rekey). A proof made before the
    REKEY was committed says nothing of the kind: refused, nothing changes. A proof made
    after it (the client really lost the answer) still gets the previous secret back."""
    sid = await born(session_store, reattach_rate=100)
    withheld_ts = await session_store.server_time_ms() - 5
    rk = await _rekey(session_store, sid)
    assert rk.ok and rk.generation == 1
    before = await session_store.get(sid)
    assert before is not None and before.previous_wrapped
    late = await reattach(session_store, sid, 1, ts=withheld_ts, proof_generation=0,
                          node="n9", tag="udp:attacker")
    assert late.status is StoreStatus.KEY_MOVED, late
    rec = await session_store.get(sid)
    assert rec is not None
    assert (rec.key_generation, rec.wrapped_secret) == (1, before.wrapped_secret)
    assert rec.previous_wrapped == before.previous_wrapped and rec.pending_node == ""
    # The client that never got the REKEY's answer proves under the previous secret, later.
    undo = await reattach(session_store, sid, 1, ts=rk.server_ms + 1, proof_generation=0)
    assert undo.ok, undo
    rec = await session_store.get(sid)
    assert rec is not None and rec.key_generation == 0 and not rec.previous_wrapped
    assert rec.wrapped_secret == before.previous_wrapped


async def test_a_proof_under_the_previous_secret_after_confirmation_is_refused(
        session_store: SessionStore) -> None:
    """Once the client showed it holds the new secret (confirm_key.lua), the previous one is
    gone from the store: a reattach proven under it (a replay, or a node's stale cache) is
    KEY_MOVED, recorded, and changes nothing; under the new one it succeeds."""
    sid = await born(session_store, reattach_rate=100)
    rk = await _rekey(session_store, sid)
    assert rk.ok
    assert await session_store.confirm_key(sid, 1)
    assert not await session_store.confirm_key(sid, 1)  # idempotent
    ts = rk.server_ms + 1
    old = await reattach(session_store, sid, 1, ts=ts, proof_generation=0)
    assert old.status is StoreStatus.KEY_MOVED
    rec = await session_store.get(sid)
    assert rec is not None and rec.key_generation == 1 and not rec.previous_wrapped
    assert rec.pending_node == "" and rec.version == 1
    new = await reattach(session_store, sid, 1, ts=ts, proof_generation=1)
    assert new.ok and new.epoch == rk.epoch + 1


async def test_epochs_are_never_granted_twice_through_grants_rekeys_and_activations(
        session_store: SessionStore) -> None:
    """Grants, superseded grants, REKEYs (which supersede a PENDING grant) and activations in
    an attacker's order: every epoch the store hands out is new, a superseded grant never
    activates, and a REKEY by a node that holds only a PENDING binding is NOT_OWNER."""
    sid = await born(session_store, reattach_rate=100)
    granted = [1]
    g1 = await reattach(session_store, sid, 1, node="n2", tag="udp:copier")
    granted.append(g1.epoch)
    # the pending node may not rekey; its refresh keeps the session alive and moves nothing
    pending_rk = await session_store.rekey(
        sid, epoch=g1.epoch, binding_id=g1.binding_id, node="n2", generation=0,
        wrapped_secret=os.urandom(60), wrapped_control=os.urandom(60),
        new_binding_id=os.urandom(16))
    assert pending_rk.status is StoreStatus.NOT_OWNER
    kept = await session_store.refresh(sid, g1.epoch, "n2")
    assert kept.ok and (kept.epoch, kept.node) == (1, "n1")
    rk = await _rekey(session_store, sid)  # the ACTIVE holder rekeys: the grant is superseded
    assert rk.ok
    granted.append(rk.epoch)
    late = await session_store.activate(sid, g1.epoch, g1.binding_id, "n2")
    assert late.status is StoreStatus.NOT_OWNER
    g2 = await reattach(session_store, sid, 2, node="n3", ts=rk.server_ms + 1,
                        proof_generation=1)
    granted.append(g2.epoch)
    g3 = await reattach(session_store, sid, 3, node="n4", ts=rk.server_ms + 1,
                        proof_generation=1)
    granted.append(g3.epoch)
    assert (await session_store.activate(sid, g2.epoch, g2.binding_id, "n3")).status is (
        StoreStatus.NOT_OWNER)
    act = await session_store.activate(sid, g3.epoch, g3.binding_id, "n4")
    assert act.ok and (act.prev_epoch, act.prev_node) == (rk.epoch, "n1")
    rk2 = await _rekey(session_store, sid, node="n4")
    assert rk2.ok
    granted.append(rk2.epoch)
    # an activate answer the node gets late, after a newer REKEY: idempotent no more
    again = await session_store.activate(sid, g3.epoch, g3.binding_id, "n4")
    assert again.status is StoreStatus.NOT_OWNER and again.epoch == rk2.epoch
    assert granted == sorted(set(granted)), granted
    rec = await session_store.get(sid)
    assert rec is not None and (rec.epoch, rec.node) == (rk2.epoch, "n4")


async def test_an_activation_racing_a_terminate_cannot_revive_the_session(
        session_store: SessionStore) -> None:
    """terminate, then the pending binding's activate (its path just validated): the
    tombstone stands, nothing becomes ACTIVE, and a REKEY after it is refused too."""
    sid = await born(session_store, reattach_rate=100)
    g = await reattach(session_store, sid, 1, node="n2")
    rec = await session_store.get(sid)
    assert rec is not None
    assert (await session_store.terminate(sid)).ok
    act = await session_store.activate(sid, g.epoch, g.binding_id, "n2")
    assert act.status is StoreStatus.TERMINATED
    rk = await session_store.rekey(sid, epoch=rec.epoch, binding_id=rec.binding_id, node="n1",
                                   generation=0, wrapped_secret=os.urandom(60),
                                   wrapped_control=os.urandom(60),
                                   new_binding_id=os.urandom(16))
    assert rk.status is StoreStatus.TERMINATED
    tomb = await session_store.get(sid)
    assert tomb is not None and tomb.terminated and not tomb.wrapped_secret
