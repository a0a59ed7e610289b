"""What the history check showed, each as a rule of the machines, in memory
(tests/support/memnet.py): a holder learns that its session ended elsewhere; a
node resumed after a pause does not grant what its sockets held; an honest
client's retransmissions raise no alerts; every store change has its event."""

from __future__ import annotations

from typing import Any

from session import wire
from session.client import HandshakeComplete, Reattached, SessionTerminated
from session.noise import generate_keypair
from session.reasons import RejectReason, TerminateReason
from session.states import SessionState
from session.storeops import ClaimHandshakeOp, ClientPolicy, TransitionOp
from tests.support.memnet import WALL_MS, Net
from tests.unit.test_machines import (
    CL_PRIV,
    CL_PUB,
    GW_PRIV,
    GW_PUB,
    GW_SETTINGS,
    KEK,
    OTHER,
    PARAMS,
    UPSTREAM,
    setup,
)

THIRD = ("198.51.100.3", 40002)
UDP = wire.TransportKind.UDP


def alerts(gw: Any, kind: str | None = None) -> list[Any]:
    return [(a, k) for a, k in gw.events.named("security_event") if kind is None or a[0] == kind]


def test_the_holder_is_told_when_another_node_ends_its_session() -> None:
    """gw-b ends (a revocation, an expiry, an admin) a session gw-a holds: gw-a is woken,
    lets the binding go and closes the client, at once rather than at its next refresh."""
    net = Net(seed=81)
    c, (gwa, gwb) = setup(net, ("gw-a", "gw-b"))
    sid = c.machine.session_id
    net.run(net.now + 0.5)
    gwb.machine.terminate(sid, TerminateReason.POLICY_REVOKED)
    net.run(net.now + 0.2)
    assert sid not in gwa.machine.bindings
    [ended] = c.of(SessionTerminated)
    assert ended.authenticated


def test_a_silent_binding_of_a_session_ended_elsewhere_is_let_go() -> None:
    """A silent binding is not refreshed (that would keep a dead session alive), so a
    missed notice used to leave it held for good; it is now checked by a read."""
    net = Net(seed=83)
    c, [gw] = setup(net)
    sid = c.machine.session_id
    c.paths[1].up = False  # the client goes away
    net.run(net.now + 2.0)
    assert gw.machine.bindings[sid].lost
    rec = net.store.records[sid]
    rec.state, rec.tr = SessionState.TERMINATED, TerminateReason.ADMIN  # its notice missed
    net.run(net.now + 80.0)  # a refresh period (a quarter of the 300 s TTL) and a bit
    assert sid not in gw.machine.bindings


def test_a_resumed_node_does_not_grant_what_its_sockets_held_while_paused() -> None:
    """gw-a is paused (SIGSTOP) past its lease while the balancer keeps routing the
    client's requests to it: an older one on a path the client then left, a newer one.
    Resumed, it must not bind the abandoned path (which made the client's real request
    a DUAL_ACTIVE_CONFLICT, with an alert): it refuses both until the store answers it."""
    net = Net(seed=87)
    c, (gwa, _) = setup(net, ("gw-a", "gw-b"), lease_s=1.0)
    sid = c.machine.session_id
    gwa.paused = True
    net.add_path(c, 2, OTHER, "gw-a")
    c.machine.reattach(net.now, 2, UDP)
    net.run(net.now + 0.3)
    net.add_path(c, 3, THIRD, "gw-a")
    c.machine.reattach(net.now, 3, UDP)  # the client moved on: path 2 is abandoned
    net.run(net.now + 3.0)
    assert gwa.buffered
    gwa.resume()
    net.run(net.now + 0.5)
    rec = net.store.records[sid]
    assert rec.epoch == 1, "a request the node held while paused was granted"
    assert not alerts(gwa, "dual_active_conflict")
    # The client's next request, once the node answers the store again, is granted.
    c.machine.reattach(net.now, 3, UDP)
    net.run(net.now + 0.5)
    assert c.of(Reattached) and net.store.records[sid].epoch == 2


def test_an_older_request_superseded_by_a_newer_one_does_not_win() -> None:
    """Two requests of one session reach a node out of order: the older must not bind."""
    net = Net(seed=89)
    c, (gwa, _) = setup(net, ("gw-a", "gw-b"))
    sid = c.machine.session_id
    net.add_path(c, 2, OTHER, "gw-a")
    net.add_path(c, 3, THIRD, "gw-a")
    c.paths[2].up = c.paths[3].up = False  # captured, delivered below in the other order
    c.machine.reattach(net.now, 2, UDP)
    [(_, older)] = c.machine.datagrams_to_send()
    net.run(net.now + 0.5)
    c.machine.reattach(net.now, 3, UDP)
    [(_, newer)] = c.machine.datagrams_to_send()
    c.paths[3].up = True
    net.inject("gw-a", THIRD, newer)
    net.run(net.now + 0.05)
    net.inject("gw-a", OTHER, older)
    net.run(net.now + 0.05)
    assert net.store.records[sid].kind is UDP and net.store.records[sid].epoch == 2
    assert gwa.machine.bindings[sid].peer.addr == THIRD


def test_a_handshake_retransmitted_during_a_store_stall_is_no_replay() -> None:
    """The store stalls on the handshake's claim; the client retransmits its INIT: a copy
    of a handshake being answered, from its own address, is not a replay."""
    net = Net(seed=91)
    net.store.delay = lambda op: 1.2 if isinstance(op, ClaimHandshakeOp) else 0.0
    gw = net.gateway("gw-a", GW_PRIV, KEK, **GW_SETTINGS)
    net.store.clients[CL_PUB.hex()] = ClientPolicy(CL_PUB, upstreams=(UPSTREAM,))
    c = net.client(CL_PRIV, GW_PUB, PARAMS)
    net.add_path(c, 1, ("198.51.100.1", 40000), "gw-a")
    c.machine.connect(net.now, WALL_MS + int(net.now * 1000), 1, UDP)
    net.run(net.now + 3.0)
    assert c.of(HandshakeComplete)
    assert not alerts(gw), alerts(gw)


def test_a_replayed_handshake_from_elsewhere_is_still_reported() -> None:
    net = Net(seed=93)
    net.store.delay = lambda op: 0.5 if isinstance(op, ClaimHandshakeOp) else 0.0
    gw = net.gateway("gw-a", GW_PRIV, KEK, **GW_SETTINGS)
    net.store.clients[CL_PUB.hex()] = ClientPolicy(CL_PUB, upstreams=(UPSTREAM,))
    c = net.client(CL_PRIV, GW_PUB, PARAMS)
    net.add_path(c, 1, ("198.51.100.1", 40000), "gw-a")
    c.machine.connect(net.now, WALL_MS, 1, UDP)
    [(_, init)] = c.machine.datagrams_to_send()
    net.inject("gw-a", ("198.51.100.1", 40000), init)
    net.inject("gw-a", ("203.0.113.66", 6666), init)  # a copy from another address
    net.run(net.now + 1.0)
    assert alerts(gw, "handshake_replay")


def test_a_refused_request_is_reported_once_not_per_copy() -> None:
    """Two claimants for one version: the loser's DUAL_ACTIVE_CONFLICT is reported once,
    however often its copies come back (each gets the recorded answer)."""
    net = Net(seed=95)
    c, (gwa, gwb) = setup(net, ("gw-a", "gw-b"))
    c.machine.reattach(net.now, 1, UDP)
    [(_, raw_a)] = c.machine.datagrams_to_send()
    c.machine._claim_version = -1  # the clone's request: another claim id
    c.machine.reattach(net.now, 1, UDP)
    [(_, raw_b)] = c.machine.datagrams_to_send()
    net.inject("gw-a", ("198.51.100.7", 1), raw_a)
    net.inject("gw-b", ("198.51.100.8", 2), raw_b)
    net.run(net.now + 0.1)
    loser = [g for g in (gwa, gwb) if alerts(g, "dual_active_conflict")]
    assert len(loser) == 1
    addr, raw = (("198.51.100.7", 1), raw_a) if loser[0] is gwa else (("198.51.100.8", 2), raw_b)
    for _ in range(4):  # retransmissions, more than a second apart
        net.run(net.now + 1.1)
        net.inject(loser[0].name, addr, raw)
    net.run(net.now + 0.1)
    assert len(alerts(loser[0], "dual_active_conflict")) == 1
    rejects = [wire.decode(d) for a, d in net.injected if a == addr]
    assert [r.reason for r in rejects if isinstance(r, wire.Reject)] == \
        [RejectReason.DUAL_ACTIVE_CONFLICT] * 5


def test_a_store_change_made_while_the_binding_changed_has_its_event() -> None:
    """The node reports a silent binding lost (TRANSPORT_LOST, applied in the store) and,
    before that answer is back, the client reattaches through the same node: the store
    changed twice, and both changes have their event."""
    net = Net(seed=97)
    c, [gw] = setup(net)
    sid = c.machine.session_id
    net.store.delay = lambda op: 0.5 if isinstance(op, TransitionOp) else 0.0
    c.paths[1].uplink = False  # the node hears nothing more on this path
    for _ in range(100):
        net.run(net.now + 0.05)
        if any(isinstance(op, TransitionOp) for op in net.store.calls):
            break
    lost_version = net.store.records[sid].version
    assert net.store.records[sid].state is SessionState.RECOVERING
    net.add_path(c, 2, OTHER, "gw-a")
    c.machine.reattach(net.now, 2, UDP)
    net.run(net.now + 1.0)
    assert c.of(Reattached)
    changes = [a for a, _ in gw.events.named("state_change") if a[0] == sid]
    assert any(a[2] == "RECOVERING" and a[3] == lost_version for a in changes), changes


def test_every_attack_still_raises_an_alert() -> None:
    """A copier replays a client's request from elsewhere: reported, once."""
    net = Net(seed=99)
    c, [gw] = setup(net)
    net.add_path(c, 2, OTHER, "gw-a")
    c.machine.reattach(net.now, 2, UDP)
    raw = c.machine.datagrams_to_send()[-1][1]
    net.inject("gw-a", OTHER, raw)
    net.run(net.now + 0.1)
    for _ in range(3):
        net.inject("gw-a", ("203.0.113.66", 6666), raw)
    net.run(net.now + 0.1)
    assert len(alerts(gw, "replayed_nonce")) == 1
    _, other_pub = generate_keypair()
    assert other_pub != CL_PUB


def test_a_holder_that_missed_the_move_lets_go_on_its_next_report() -> None:
    """The session moved to gw-b and gw-a missed the notice: its binding falls silent and
    gw-a reports it lost. The store's answer names another binding: gw-a copies none of
    the session's state from it (a report at the current version would be written, marking
    RECOVERING a session gw-b carries) and lets its binding go at once, not a check period
    (a quarter of the TTL) later."""
    net = Net(seed=97)
    c, (gwa, gwb) = setup(net, ("gw-a", "gw-b"))
    sid = c.machine.session_id
    net.store._PublishMoveOp = lambda op: 0  # type: ignore[method-assign]  # notice lost
    net.add_path(c, 2, OTHER, "gw-b")
    c.machine.reattach(net.now, 2, UDP)
    net.run(net.now + 0.2)
    assert c.of(Reattached) and sid in gwa.machine.bindings
    moved_at = net.now
    while sid in gwa.machine.bindings and net.now < moved_at + 5.0:
        net.run(net.now + 0.05)
    assert sid not in gwa.machine.bindings, "gw-a kept a binding the store moved"
    assert net.now - moved_at < 2.0
    rec = net.store.records[sid]
    assert rec.node == gwb.machine.instance_id and rec.state is not SessionState.RECOVERING
    assert rec.lost is None, "gw-a's report of its own silence was written"
    releases = [k for a, k in gwa.events.named("emit")
                if a == ("binding",) and k["phase"] == "release" and k["session_id"] == sid]
    assert [k["reason"] for k in releases] == ["revoked"]
