"""The client and gateway machines together, in memory (tests/support/memnet.py).

No sockets, no sleeps: a seeded simulated network with loss, duplication,
reordering and path changes, time passed in, and a model of the store's
decisions. Each test states the rule of docs/ARCHITECTURE.md it proves.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import pytest

from session import control, wire
from session.binding import Peer
from session.client import (
    ClientParams,
    HandshakeComplete,
    HandshakeFailed,
    Reattached,
    ReattachRejected,
    Rekeyed,
    SessionTerminated,
    TransportLost,
)
from session.gateway import (
    MAX_CONTROL_CALLS,
    MAX_UNAUTH_CALLS,
    REFRESHES_PER_TICK,
    GatewaySettings,
    Outcome,
    Send,
)
from session.handshake import ClientHello, Initiator
from session.noise import generate_keypair
from session.reasons import DropReason, RejectReason, TerminateReason
from session.states import LIVE_STATES, SessionEvent, SessionState
from session.storeops import (
    ClientPolicy,
    GetRecordOp,
    ReattachOp,
    RefreshOp,
    RekeyOp,
    StoreStatus,
    TransitionOp,
)
from tests.support.memnet import WALL_MS, Cl, Gw, Net

GW_PRIV, GW_PUB = generate_keypair()
CL_PRIV, CL_PUB = generate_keypair()
KEK = bytes(range(32))
UPSTREAM = "10.9.9.9:9"
PARAMS = ClientParams(keepalive_interval=0.2, dead_after=3, handshake_timeout=0.5,
                      reattach_timeout=0.25, backoff_initial=0.05, backoff_max=0.5,
                      upstream=UPSTREAM)
HOME = ("198.51.100.1", 40000)
OTHER = ("198.51.100.2", 40001)
ATTACKER = ("203.0.113.66", 6666)
GW_SETTINGS_SOURCE_BURST = GatewaySettings(node_id="-").source_burst
GW_SETTINGS = dict(keepalive_interval=0.2, silence_keepalives=3, lease_s=3.0,
                   sweep_interval=1.0)


def setup(net: Net, gateways: tuple[str, ...] = ("gw-a",), **settings: Any) -> tuple[Cl, list[Gw]]:
    gws = [net.gateway(name, GW_PRIV, KEK, **{**GW_SETTINGS, **settings}) for name in gateways]
    net.store.clients[CL_PUB.hex()] = ClientPolicy(CL_PUB, upstreams=(UPSTREAM,))
    c = net.client(CL_PRIV, GW_PUB, PARAMS)
    net.add_path(c, 1, HOME, gateways[0])
    c.machine.connect(net.now, WALL_MS + int(net.now * 1000), 1, wire.TransportKind.UDP)
    while not c.of(HandshakeComplete) and net.now < 3.0:  # the INIT or its answer may be lost
        net.run(net.now + 0.1)
    assert c.of(HandshakeComplete), c.events
    return c, gws


def pump(net: Net, c: Cl, until: float, every: float = 0.01) -> list[bytes]:
    """Send a numbered payload every ``every`` seconds until ``until``; return them."""
    sent = []
    t = net.now
    i = 0
    while t < until:
        t += every
        net.run(t)
        payload = b"p%06d" % i
        i += 1
        if c.machine.send(payload, net.now):
            sent.append(payload)
    return sent


def test_handshake_data_and_keepalives_over_a_lossy_reordering_network() -> None:
    """Birth, then payloads through the gateway to the upstream and back, under 10% loss,
    5% duplication and reordering: the session stays live, nothing arrives twice."""
    net = Net(seed=7, loss=0.10, dup=0.05, jitter=0.004)
    c, [gw] = setup(net)
    sid = c.machine.session_id
    sent = pump(net, c, 3.0)
    net.run(3.5)
    assert c.machine.state in (SessionState.ATTACHED, SessionState.VOLATILE,
                               SessionState.DEGRADED)
    assert gw.machine.bindings[sid].validated
    got = c.received
    assert len(got) == len(set(got)), "a duplicated datagram was delivered twice"
    assert set(got) <= set(sent)
    assert len(got) >= 0.7 * len(sent), (len(got), len(sent))  # two lossy legs: ~81%
    assert gw.metrics.named("count_drop")  # duplicates hit the replay window
    replayed = [a for a, _ in gw.metrics.named("count_drop") if a[0] is DropReason.REPLAYED]
    assert replayed


def test_a_dead_path_is_noticed_and_the_session_reattaches_on_a_new_one() -> None:
    """Silence for dead_after keepalives moves the client to RECOVERING; a reattach from a
    new address is one CAS: version+1, epoch+1, the same session id, data flows again."""
    net = Net(seed=3)
    c, [gw] = setup(net)
    sid, v0, ep0 = c.machine.session_id, c.machine.version, c.machine.epoch
    net.run(1.0)
    c.paths[1].up = False
    net.run(2.0)
    lost = c.of(TransportLost)
    assert lost and c.machine.state is SessionState.RECOVERING
    net.add_path(c, 2, OTHER, "gw-a")
    c.machine.reattach(net.now, 2, wire.TransportKind.UDP, reason="test")
    net.run(2.5)
    [done] = c.of(Reattached)
    assert c.machine.session_id == sid and c.machine.epoch == ep0 + 1
    assert c.machine.version > v0
    b = gw.machine.bindings[sid]
    assert (b.epoch, b.peer.addr) == (ep0 + 1, OTHER)
    assert net.store.records[sid].version == c.machine.version
    sent = pump(net, c, 3.0)
    net.run(3.2)
    assert len(c.received) >= len(sent) - 1


def test_the_gateway_reports_a_silent_binding_lost() -> None:
    """No authenticated packet for silence_keepalives intervals: TRANSPORT_LOST in the
    store (one TRANSITION call), and the binding is counted RECOVERING."""
    net = Net(seed=5)
    c, [gw] = setup(net)
    sid = c.machine.session_id
    net.run(1.0)
    c.paths[1].up = False
    net.run(2.0)
    assert net.store.records[sid].state is SessionState.RECOVERING
    losts = [op for op in net.store.calls if isinstance(op, TransitionOp)]
    assert [op.event.name for op in losts] == ["TRANSPORT_LOST"]
    assert gw.machine.sessions_by_state()["RECOVERING"] == 1


def test_a_lost_ack_is_answered_again_idempotently() -> None:
    """The ACK is lost: the retransmitted request (same bytes) gets the same decision and
    changes nothing twice; from another address the same bytes are a replay."""
    net = Net(seed=11)
    c, [gw] = setup(net)
    sid = c.machine.session_id
    net.add_path(c, 2, OTHER, "gw-a")
    c.machine.reattach(net.now, 2, wire.TransportKind.UDP)
    [(_, raw)] = c.machine.datagrams_to_send()
    sent_before = len(gw.sent)
    net.inject("gw-a", OTHER, raw)
    net.run(net.now + 0.05)
    first = [d for _, d in gw.sent[sent_before:]]
    rec = net.store.records[sid]
    version, epoch = rec.version, rec.epoch
    net.inject("gw-a", OTHER, raw)
    net.run(net.now + 0.05)
    second = [d for _, d in gw.sent[sent_before + len(first):]]
    assert (rec.version, rec.epoch) == (version, epoch), "a retransmission changed the record"
    a1, a2 = wire.decode(first[0]), wire.decode(second[0])
    assert isinstance(a1, wire.ReattachAck) and isinstance(a2, wire.ReattachAck)
    assert (a1.nonce, a1.version, a1.epoch, a1.binding_id) == (
        a2.nonce, a2.version, a2.epoch, a2.binding_id)
    assert ("reattach", (Outcome.RETRY, "", pytest.approx(0.001, abs=0.01)), {}) in [
        (n, a, k) for n, a, k in gw.metrics.calls if n == "reattach"]
    net.inject("gw-a", ATTACKER, raw)
    net.run(net.now + 0.05)
    answer = wire.decode(net.injected[-1][1])
    assert isinstance(answer, wire.Reject) and answer.reason is RejectReason.REPLAYED_NONCE


def test_answers_to_an_unvalidated_address_respect_three_times() -> None:
    """Every answer to an address that has not proven itself is at most 3x the bytes it
    sent: a reattach request, a rejected one, a handshake from a spoofed source."""
    net = Net(seed=13)
    c, [gw] = setup(net)
    net.add_path(c, 2, OTHER, "gw-a")
    c.machine.reattach(net.now, 2, wire.TransportKind.UDP)
    [(_, raw)] = c.machine.datagrams_to_send()
    forged = raw[:-1] + bytes([raw[-1] ^ 1])  # a bad proof
    for data in (raw, forged, raw):
        net.inject("gw-a", ATTACKER, data)
    net.run(net.now + 0.1)
    to_attacker = sum(len(d) for a, d in net.injected if a == ATTACKER)
    assert 0 < to_attacker <= 3 * 3 * len(raw)
    for p, d in gw.sent:
        if p.addr == ATTACKER:
            assert len(d) <= 3 * len(raw)


def test_a_stale_node_is_fenced_and_cannot_reach_the_client() -> None:
    """The client reattaches through another node: the store grants gw-b epoch+1 and
    publishes the move; gw-a's refresh is NOT_OWNER and it drops the binding. Even before
    that, the client accepts only the newest epoch's keys: gw-a's DATA is dropped."""
    net = Net(seed=17)
    c, (gwa, gwb) = setup(net, ("gw-a", "gw-b"))
    sid = c.machine.session_id
    old = gwa.machine.bindings[sid]
    stale_packet = old.channel.seal(wire.inner_payload(b"from the stale node"))
    net.add_path(c, 2, OTHER, "gw-b")
    c.machine.reattach(net.now, 2, wire.TransportKind.UDP)
    net.run(net.now + 0.1)
    assert c.of(Reattached) and gwb.machine.bindings[sid].epoch == old.epoch + 1
    assert sid not in gwa.machine.bindings, "the old owner kept its binding"
    revoked = gwa.events.named("emit")
    assert any(a == ("binding_revoked",) and k["reason"] == "NOT_OWNER" for a, k in revoked)
    drops = c.machine.stats["dropped_input"]
    c.machine.receive(stale_packet, 2, net.now)
    assert c.machine.stats["dropped_input"] == drops + 1
    assert b"from the stale node" not in c.received


def test_two_claimants_for_one_version_have_exactly_one_winner() -> None:
    """Two valid requests for the same version from two addresses through two nodes: one
    ACK, one authenticated DUAL_ACTIVE_CONFLICT; the store holds the winner's binding."""
    net = Net(seed=19)
    c, (gwa, gwb) = setup(net, ("gw-a", "gw-b"))
    sid = c.machine.session_id
    c.machine.reattach(net.now, 1, wire.TransportKind.UDP)
    [(_, raw_a)] = c.machine.datagrams_to_send()
    c.machine._claim_version = -1  # the clone's request: another claim id
    c.machine.reattach(net.now, 1, wire.TransportKind.UDP)
    [(_, raw_b)] = c.machine.datagrams_to_send()
    net.inject("gw-a", ("198.51.100.7", 1), raw_a)
    net.inject("gw-b", ("198.51.100.8", 2), raw_b)
    net.run(net.now + 0.1)
    answers = [wire.decode(d) for _, d in net.injected]
    acks = [a for a in answers if isinstance(a, wire.ReattachAck)]
    rejects = [a for a in answers if isinstance(a, wire.Reject)]
    assert len(acks) == 1 and len(rejects) == 1
    assert rejects[0].reason is RejectReason.DUAL_ACTIVE_CONFLICT
    # The winner holds the binding PENDING (its address never spoke again); the store names
    # it as the pending one, and the previous binding is still the ACTIVE one.
    holders = [g for g in (gwa, gwb) if sid in g.machine.pending
               and g.machine.pending[sid].epoch == acks[0].epoch]
    assert len(holders) == 1 and net.store.records[sid].pnd == holders[0].machine.instance_id


def test_the_lease_stops_forwarding_when_the_store_is_away() -> None:
    """The store stops answering: within lease_s the node stops forwarding (fail closed);
    when it answers again, bindings are re-confirmed before they carry data."""
    net = Net(seed=23)
    c, [gw] = setup(net)
    pump(net, c, 1.0)
    net.store.up = False
    net.run(5.0)
    assert not gw.machine.health.ok
    before = len(gw.upstream)
    pump(net, c, 5.5)
    assert len(gw.upstream) == before, "forwarded without a lease"
    dropped = [a for a, _ in gw.metrics.named("count_drop") if a[0] is DropReason.LEASE_EXPIRED]
    assert dropped
    net.store.up = True
    net.run(6.1)
    assert gw.machine.health.ok
    if c.of(TransportLost):  # as the agent does: reattach (here on the same path)
        c.machine.reattach(net.now, 1, wire.TransportKind.UDP, reason="test")
    net.run(7.0)
    before = len(gw.upstream)
    pump(net, c, 7.5)
    assert len(gw.upstream) > before


def test_a_send_decided_under_the_lease_does_not_leave_once_it_lapsed() -> None:
    """The node is stopped (SIGSTOP, a paused VM) between deciding a binding's send and
    making it, and resumes past its lease: that send is dropped and counted, what is not a
    binding's traffic still leaves, and within the lease the same send leaves."""
    net = Net(seed=29)
    c, [gw] = setup(net)
    pump(net, c, 1.0)
    m = gw.machine
    b = m.bindings[c.machine.session_id]
    m.effects(net.now)
    m._send(b, b"a binding's datagram")
    m._out.append(Send(b.peer, b"an answer of no binding"))
    resumed = m.health.ok_at + m.settings.lease_s  # no store answer came meanwhile
    out = m.effects(resumed)
    assert [e.data for e in out if isinstance(e, Send)] == [b"an answer of no binding"]
    dropped = [a for a, _ in gw.metrics.named("count_drop") if a[0] is DropReason.LEASE_EXPIRED]
    assert len(dropped) == 1
    m._send(b, b"a binding's datagram")
    out = m.effects(resumed - 0.001)
    assert [e.data for e in out if isinstance(e, Send)] == [b"a binding's datagram"]


def test_an_unknown_session_costs_one_read_and_gets_no_authenticated_answer() -> None:
    """A REATTACH_REQUEST for a session nobody knows: one record read, an unauthenticated
    UNKNOWN_SESSION (no key to sign with), no CAS."""
    net = Net(seed=29)
    c, [gw] = setup(net)
    c.machine.reattach(net.now, 1, wire.TransportKind.UDP)
    [(_, raw)] = c.machine.datagrams_to_send()
    bogus = raw[:4] + bytes(16) + raw[20:]
    calls = len(net.store.calls)
    net.inject("gw-a", ATTACKER, bogus)
    net.run(net.now + 0.05)
    new = net.store.calls[calls:]
    assert [type(op) for op in new if not type(op).__name__.startswith(("Refresh", "Server",
                                                                           "Sweep"))] == [
        GetRecordOp]
    assert not any(isinstance(op, ReattachOp) for op in new)
    answer = wire.decode(net.injected[-1][1])
    assert isinstance(answer, wire.Reject) and answer.reason is RejectReason.UNKNOWN_SESSION
    assert not control.verify(net.injected[-1][1], bytes(32))


def test_unauthenticated_work_in_flight_is_bounded() -> None:
    """Store calls caused by packets nobody has authenticated yet never exceed
    MAX_UNAUTH_CALLS: beyond it they are dropped and counted RATE_LIMITED, never queued,
    and the slots of authenticated work stay free."""
    net = Net(seed=31, store_latency=10.0)  # a store that answers very late
    gws = net.gateway("gw-a", GW_PRIV, KEK, **GW_SETTINGS)
    for i in range(MAX_UNAUTH_CALLS + 50):  # distinct INITs (a copy of one in flight is free)
        c = net.client(CL_PRIV, GW_PUB, PARAMS)
        c.machine.connect(0.0, WALL_MS, 1, wire.TransportKind.UDP)
        [(_, init)] = c.machine.datagrams_to_send()
        gws.machine.receive(init, _peer(i), net.now)
    assert gws.machine.control_calls_in_flight == MAX_UNAUTH_CALLS < MAX_CONTROL_CALLS
    limited = [a for a, _ in gws.metrics.named("count_drop") if a[0] is DropReason.RATE_LIMITED]
    assert len(limited) == 50


def test_a_flood_from_one_source_costs_a_bounded_number_of_store_calls() -> None:
    """20,000 REATTACH_REQUESTs for random session ids from one address: the store is asked
    at most the source's burst plus its rate, the rest cost nothing but a counter; a
    legitimate client's reattaches (another address) all succeed meanwhile."""
    net = Net(seed=101)
    c, [gw] = setup(net)
    c.machine.reattach(net.now, 1, wire.TransportKind.UDP)
    template = c.machine.datagrams_to_send()[-1][1]
    net.run(net.now + 0.1)
    calls = len(net.store.calls)
    rng = random.Random(5)
    net.add_path(c, 2, OTHER, "gw-a")
    ok = 0
    for round_ in range(10):
        for _ in range(2000):  # 20,000 in a simulated second
            bogus = template[:4] + rng.randbytes(16) + template[20:]
            gw.machine.receive(bogus, Peer(wire.TransportKind.UDP, ATTACKER), net.now)
        c.machine.reattach(net.now, 1 + round_ % 2, wire.TransportKind.UDP)
        before = len(c.of(Reattached))
        net.run(net.now + 0.1)
        ok += len(c.of(Reattached)) > before
    flood_calls = [op for op in net.store.calls[calls:] if isinstance(op, GetRecordOp)]
    assert len(flood_calls) <= GW_SETTINGS_SOURCE_BURST + 200 * 1.5, len(flood_calls)
    assert ok >= 9, ok


def test_an_unknown_session_is_asked_of_the_store_once() -> None:
    """The store said UNKNOWN_SESSION: the same id again costs no store call for a while,
    and is still answered (unauthenticated: there is no key to sign with)."""
    net = Net(seed=103)
    c, [gw] = setup(net)
    c.machine.reattach(net.now, 1, wire.TransportKind.UDP)
    raw = c.machine.datagrams_to_send()[-1][1]
    bogus = raw[:4] + bytes(16) + raw[20:]
    calls = len(net.store.calls)
    for _ in range(5):
        net.inject("gw-a", ATTACKER, bogus)
        net.run(net.now + 0.05)
    reads = [op for op in net.store.calls[calls:] if isinstance(op, GetRecordOp)]
    assert len(reads) == 1
    answers = [wire.decode(d) for a, d in net.injected if a == ATTACKER]
    assert len(answers) == 5 and all(a.reason is RejectReason.UNKNOWN_SESSION for a in answers)


def test_a_retry_token_buys_one_handshake() -> None:
    """A RETRY token is bound to the address and the handshake and is good once: the same
    token with a fresh INIT from the same address is refused as a replay."""
    net = Net(seed=107)
    c, [gw] = setup(net, handshake_retry_threshold=0)  # every INIT gets a RETRY first
    with_token = [raw for _, raw in net.uplink_log
                  if wire.peek_header(raw)[0] is wire.MessageType.HANDSHAKE_INIT
                  and wire.decode(raw).token]
    first = wire.decode(with_token[0])
    hello = ClientHello(WALL_MS + int(net.now * 1000), wire.TransportKind.UDP, UPSTREAM)
    fresh = Initiator(CL_PRIV, GW_PUB, first.handshake_id, hello)  # a second INIT, same token
    second = wire.HandshakeInit(first.handshake_id, fresh.message1, first.token)
    births = len(net.store.records)
    gw.machine.receive(wire.encode(second), Peer(wire.TransportKind.UDP, HOME), net.now)
    net.run(net.now + 0.1)
    assert len(net.store.records) == births
    assert gw.metrics.named("count_drop")[-1][0][0] is DropReason.REPLAYED


def test_security_events_are_aggregated_per_source() -> None:
    """1,000 bad proofs from one address in a second: every one counted, one event (and
    the next one says how many it stands for), so a flood cannot roll the audit log."""
    net = Net(seed=109)
    c, [gw] = setup(net)
    c.machine.reattach(net.now, 1, wire.TransportKind.UDP)
    raw = c.machine.datagrams_to_send()[-1][1]
    def forged(i: int) -> bytes:  # distinct forgeries (copies of one are reported once)
        return raw[:-2] + (int.from_bytes(raw[-2:], "big") ^ (i + 1)).to_bytes(2, "big")

    for i in range(1000):
        gw.machine.receive(forged(i), Peer(wire.TransportKind.UDP, ATTACKER), net.now)
    net.run(net.now + 0.01)
    counted = [a for a, _ in gw.metrics.named("security") if a[0] == "bad_proof"]
    events = [(a, k) for a, k in gw.events.named("security_event") if a[0] == "bad_proof"]
    assert len(counted) == 1000 and len(events) == 1
    net.run(net.now + 1.1)
    gw.machine.receive(forged(0), Peer(wire.TransportKind.UDP, ATTACKER), net.now)  # a copy
    gw.machine.receive(forged(1000), Peer(wire.TransportKind.UDP, ATTACKER), net.now)
    net.run(net.now + 0.01)  # (a cached secret a proof fails under is re-read once a second)
    events = [(a, k) for a, k in gw.events.named("security_event") if a[0] == "bad_proof"]
    assert len(events) == 2 and events[-1][1]["suppressed"] == 999
    assert len([a for a, _ in gw.metrics.named("security") if a[0] == "bad_proof"]) == 1002


def test_client_close_ends_the_session_in_the_store() -> None:
    """An in-band CLOSE: the gateway writes the tombstone and drops the binding."""
    net = Net(seed=37)
    c, [gw] = setup(net)
    sid = c.machine.session_id
    c.machine.close(net.now)
    net.run(net.now + 0.1)
    assert c.of(SessionTerminated)
    assert net.store.records[sid].state is SessionState.TERMINATED
    assert net.store.records[sid].tr is TerminateReason.CLIENT_CLOSE
    assert sid not in gw.machine.bindings


def test_an_administrative_terminate_reaches_the_client_authenticated() -> None:
    """terminate(): tombstone, then an authenticated CLOSE on the validated path."""
    net = Net(seed=41)
    c, [gw] = setup(net)
    sid = c.machine.session_id
    net.run(0.8)
    gw.machine.terminate(sid)
    net.run(1.0)
    [ended] = c.of(SessionTerminated)
    assert ended.authenticated and c.machine.state is SessionState.TERMINATED


def test_nat_rebinding_moves_the_downlink() -> None:
    """The NAT in front of the client maps it to a new port: the gateway challenges the
    new address and moves the downlink when the client's answer comes back from it,
    losing at most the datagrams of that one round trip (docs/ARCHITECTURE.md: roaming)."""
    net = Net(seed=43)
    c, [gw] = setup(net)
    sid = c.machine.session_id
    pump(net, c, 1.0)
    del net.by_addr[HOME]
    c.paths[1].addr = OTHER
    net.by_addr[OTHER] = (c, 1)
    received = len(c.received)
    sent = pump(net, c, 2.0)
    net.run(2.1)
    assert gw.machine.bindings[sid].peer.addr == OTHER
    assert len(c.received) - received >= len(sent) - 2
    switches = gw.events.named("transport_switch")
    assert any(a[3] == "nat_rebind" for a, _ in switches)


def test_a_copied_packet_does_not_move_the_downlink() -> None:
    """The roaming rule (docs/ARCHITECTURE.md, Security rules): an authenticated packet copied from another address proves
    nothing about that address. Until it answers a challenge it gets at most 3x what it
    sent, and the downlink keeps going to the old path."""
    net = Net(seed=47)
    c, [gw] = setup(net)
    sid = c.machine.session_id
    pump(net, c, 0.5)
    c.machine.send(b"copy me", net.now)
    raw = c.machine.datagrams_to_send()[-1][1]
    net.inject("gw-a", ATTACKER, raw)  # an on-path attacker forwards a copy from its address
    net.run(net.now + 0.02)
    for _ in range(20):  # the upstream keeps talking to the client meanwhile
        gw.machine.upstream_received(sid, b"x" * 1000, net.now)
    net.run(net.now + 0.02)
    to_attacker = sum(len(d) for a, d in net.injected if a == ATTACKER)
    assert to_attacker <= 3 * len(raw), f"{to_attacker} bytes sent for {len(raw)} received"
    assert gw.machine.bindings[sid].peer.addr == HOME


def test_reattach_through_a_rejection_keeps_the_session() -> None:
    """An authenticated STALE_VERSION makes the client adopt the store's version and retry:
    the reattach then succeeds (the client's rule; the gateway sends the version)."""
    net = Net(seed=53)
    c, [gw] = setup(net)
    sid = c.machine.session_id
    net.store.records[sid].version += 1  # another mutation the client has not seen
    net.add_path(c, 2, OTHER, "gw-a")
    c.machine.reattach(net.now, 2, wire.TransportKind.UDP)
    net.run(net.now + 0.5)
    rejected = c.of(ReattachRejected)
    assert rejected and rejected[0].reason is RejectReason.STALE_VERSION
    assert rejected[0].authenticated
    assert c.of(Reattached)
    assert c.machine.version == net.store.records[sid].version


def _peer(i: int) -> Peer:
    return Peer(wire.TransportKind.UDP, (f"198.18.{i // 250}.{i % 250}", 1000 + i))


def test_a_late_answer_for_a_held_epoch_never_rebuilds_the_binding() -> None:
    """A CAS whose outcome was unknown and then recovered (a success, not marked retry)
    arrives after this node already binds that epoch: the binding and its send counter
    are kept (rebinding would restart the counter under the same traffic keys)."""
    net = Net(seed=59)
    c, [gw] = setup(net)
    sid = c.machine.session_id
    net.add_path(c, 2, OTHER, "gw-a")
    c.machine.reattach(net.now, 2, wire.TransportKind.UDP)
    [(_, raw)] = c.machine.datagrams_to_send()
    net.inject("gw-a", OTHER, raw)
    net.run(net.now + 0.05)
    held = gw.machine.bindings[sid]
    for _ in range(3):
        gw.machine.upstream_received(sid, b"x", net.now)  # counters advance (unvalidated: 3x)
    sent = held.tx_packets
    net.store.rewrite = lambda op, res: (replace(res, retry=False, recovered=True)
                                         if isinstance(op, ReattachOp) else res)
    net.inject("gw-a", OTHER, raw)  # the retransmission, answered as a fresh success
    net.run(net.now + 0.05)
    assert gw.machine.bindings[sid] is held and held.tx_packets >= sent
    answer = wire.decode(net.injected[-1][1]) if net.injected else None
    acks = [wire.decode(d) for p, d in gw.sent if p.addr == OTHER]
    assert answer is None and len(acks) >= 2 and isinstance(acks[-1], wire.ReattachAck)


def test_upkeep_of_many_bindings_does_not_starve_handshakes() -> None:
    """Refreshing thousands of bindings is the node's own upkeep: it never uses the bound
    on control work, so a handshake arriving meanwhile is served."""
    net = Net(seed=61, store_latency=0.5)
    c, [gw] = setup(net)
    model = gw.machine.bindings[c.machine.session_id]
    for i in range(MAX_CONTROL_CALLS + 100):
        sid = i.to_bytes(16, "big")
        gw.machine.bindings[sid] = replace(model, session_id=sid, last_refresh=float("-inf"))
    gw.machine.handle_timer(net.now + 0.2)
    assert gw.machine.calls_in_flight >= REFRESHES_PER_TICK  # refreshes, bounded per tick
    c2 = net.client(CL_PRIV, GW_PUB, PARAMS)
    net.add_path(c2, 1, OTHER, "gw-a")
    c2.machine.connect(net.now, WALL_MS + int(net.now * 1000), 1, wire.TransportKind.UDP)
    net.run(net.now + 3.0)  # four store round trips of 0.5 s: registry, replay guard, quota, birth
    assert c2.of(HandshakeComplete)


@pytest.mark.parametrize("case", ["bad_proof", "clock_skew", "kind", "terminated",
                                  "store_down"])
def test_every_refusal_is_explicit_and_authenticated_when_it_can_be(case: str) -> None:
    """A REATTACH_REQUEST the gateway refuses gets a REJECT with its reason: MAC'd under
    the control key whenever the gateway holds the session's key and the proof held
    (BAD_PROOF deliberately is not: a MAC over the sender's nonce would be an oracle)."""
    net = Net(seed=67)
    c, [gw] = setup(net)
    sid = c.machine.session_id
    kind = wire.TransportKind.TCP if case == "kind" else wire.TransportKind.UDP
    c.machine.reattach(net.now, 1, kind)
    raw = c.machine.datagrams_to_send()[-1][1]
    expected, authenticated = {
        "bad_proof": (RejectReason.BAD_PROOF, False),
        "clock_skew": (RejectReason.CLOCK_SKEW, True),
        "kind": (RejectReason.POLICY_DENIED, True),
        "terminated": (RejectReason.TERMINATED, True),
        "store_down": (RejectReason.STORE_UNAVAILABLE, True),
    }[case]
    if case == "bad_proof":
        raw = raw[:-1] + bytes([raw[-1] ^ 1])
    elif case == "clock_skew":
        gw.machine.health.offset_ms += 60_000
    elif case == "terminated":
        net.store.records[sid].state = SessionState.TERMINATED
        net.store.records[sid].tr = TerminateReason.ADMIN
    elif case == "store_down":
        net.store.up = False
    net.inject("gw-a", ATTACKER, raw)
    net.run(net.now + 0.05)
    out = net.injected[-1][1]
    answer = wire.decode(out)
    assert isinstance(answer, wire.Reject) and answer.reason is expected
    keys = gw.machine._secrets[sid].keys
    assert control.verify(out, keys.control_key) is authenticated
    if case == "bad_proof":
        assert gw.events.named("security_event")[-1][0][0] == "bad_proof"


def test_retry_tokens_are_bound_to_the_address() -> None:
    """Under load the first INIT gets a RETRY; the INIT echoing the token completes. The
    same token from another address is dropped (BAD_MAC) and creates nothing."""
    net = Net(seed=71)
    c, [gw] = setup(net, handshake_retry_threshold=0)  # every INIT gets a RETRY first
    retries = [d for p, d in gw.sent if isinstance(wire.decode(d), wire.Retry)]
    assert len(retries) == 1
    births = len(net.store.records)
    inits = [op for op in net.store.calls if type(op).__name__ == "GetClientOp"]
    assert len(inits) == 1  # only the INIT with the token cost a store call
    c2 = net.client(CL_PRIV, GW_PUB, PARAMS)
    c2.machine.connect(net.now, WALL_MS, 1, wire.TransportKind.UDP)
    [(_, init)] = c2.machine.datagrams_to_send()
    gw.machine.receive(init, Peer(wire.TransportKind.UDP, OTHER), net.now)
    [retry] = [wire.decode(e.data) for e in gw.machine.effects() if hasattr(e, "data")]
    assert isinstance(retry, wire.Retry)
    c2.machine.receive(wire.encode(retry), 1, net.now)
    [(_, init2)] = c2.machine.datagrams_to_send()
    gw.machine.receive(init2, Peer(wire.TransportKind.UDP, ATTACKER), net.now)  # moved
    assert gw.machine.effects() == []
    assert gw.metrics.named("count_drop")[-1][0][0] is DropReason.BAD_MAC
    assert len(net.store.records) == births


def test_a_handshake_answer_is_repeated_to_its_sender_and_refused_to_a_copier() -> None:
    """The INIT again from the same address (its answer was lost): the same answer, no
    second session. The same INIT from another address: a replay, refused and alerted."""
    net = Net(seed=73)
    c, [gw] = setup(net)
    init = next(raw for _, raw in net.uplink_log
                if wire.peek_header(raw)[0] is wire.MessageType.HANDSHAKE_INIT)
    answers = [d for p, d in gw.sent if wire.peek_header(d)[0] is wire.MessageType.HANDSHAKE_RESP]
    gw.machine.receive(init, Peer(wire.TransportKind.UDP, HOME), net.now)
    again = [e.data for e in gw.machine.effects() if hasattr(e, "data")]
    assert again == answers[:1] and len(net.store.records) == 1
    gw.machine.receive(init, Peer(wire.TransportKind.UDP, ATTACKER), net.now)
    assert not [e for e in gw.machine.effects() if hasattr(e, "data")]
    assert gw.events.named("security_event")[-1][0][0] == "handshake_replay"


def test_the_same_binding_speaking_again_is_restored() -> None:
    """Only the uplink fails: the gateway hears silence and records TRANSPORT_LOST; when
    the client's packets arrive again on the same binding it records TRANSPORT_RESTORED."""
    net = Net(seed=79)
    c, [gw] = setup(net)
    sid = c.machine.session_id
    net.run(1.0)
    c.paths[1].uplink = False
    t = net.now
    while net.now < t + 1.5:  # the upstream keeps the client's side alive
        gw.machine.upstream_received(sid, b"downlink", net.now)
        net.run(net.now + 0.05)
    assert net.store.records[sid].state is SessionState.RECOVERING
    c.paths[1].uplink = True
    pump(net, c, net.now + 0.5)
    events = [op.event.name for op in net.store.calls if isinstance(op, TransitionOp)]
    assert events[:2] == ["TRANSPORT_LOST", "TRANSPORT_RESTORED"]
    assert net.store.records[sid].state in LIVE_STATES  # the quality grade may follow
    assert not c.of(Reattached)


def test_a_lapsed_lease_is_reconfirmed_before_the_binding_carries_data() -> None:
    """The store is away longer than the lease but shorter than the client's patience:
    forwarding stops; when the store answers, the existing binding is re-confirmed by a
    refresh and carries data again, the same epoch, no reattach."""
    net = Net(seed=83)
    settings = dict(GW_SETTINGS, lease_s=0.3)
    gw = net.gateway("gw-a", GW_PRIV, KEK, **settings)
    net.store.clients[CL_PUB.hex()] = ClientPolicy(CL_PUB, upstreams=(UPSTREAM,))
    params = ClientParams(keepalive_interval=1.0, dead_after=3, upstream=UPSTREAM)
    c = net.client(CL_PRIV, GW_PUB, params)
    net.add_path(c, 1, HOME, "gw-a")
    c.machine.connect(net.now, WALL_MS, 1, wire.TransportKind.UDP)
    net.run(0.5)
    sid, epoch = c.machine.session_id, c.machine.epoch
    pump(net, c, 1.0)
    net.store.up = False
    net.run(1.6)
    before = len(gw.upstream)
    pump(net, c, 1.9)
    assert len(gw.upstream) == before
    net.store.up = True
    refreshes = sum(isinstance(op, RefreshOp) for op in net.store.calls)
    net.run(2.3)
    assert any(a == ("lease_lapsed",) for a, _ in gw.events.named("emit"))
    assert sum(isinstance(op, RefreshOp) for op in net.store.calls) > refreshes
    before = len(gw.upstream)
    pump(net, c, 2.6)
    assert len(gw.upstream) > before
    assert c.machine.epoch == epoch and gw.machine.bindings[sid].epoch == epoch
    assert not c.of(Reattached)
    # Both recorded for the session (session.records): the lapse, then the re-confirmation.
    phases = [k["phase"] for a, k in gw.events.named("emit")
              if a == ("binding",) and k["session_id"] == sid]
    assert phases.index("lease_lapsed") < phases.index("lease_confirmed")


def test_a_restarted_node_never_rebuilds_keys_it_may_have_used() -> None:
    """A node restarts (same configured id) while a reattach it granted is still in the
    store's nonce record; the request is then replayed from the same address. The new
    process must not adopt that binding: its keys were used by the previous process, and
    a rebuilt channel would start its send counter at 0 again (two packets under one key
    and nonce). Each process has its own instance in its node identity, so it cannot."""
    net = Net(seed=89)
    c, [old] = setup(net)
    sid = c.machine.session_id
    net.add_path(c, 2, OTHER, "gw-a")
    c.machine.reattach(net.now, 2, wire.TransportKind.UDP)
    request = c.machine.datagrams_to_send()[-1][1]
    net.to_gateway(c.paths[2], request)
    net.run(net.now + 0.1)
    assert c.of(Reattached)
    pump(net, c, net.now + 0.3)
    used = old.machine.bindings[sid]
    assert used.channel.next_send_counter > 0  # the old process sent under these keys
    inputs = (used.epoch, used.binding_id, used.node_id)
    c.paths[2].up = False  # the client is quiet while the node restarts
    new = net.gateway("gw-a", GW_PRIV, KEK, **GW_SETTINGS)  # the restart
    assert new.machine.instance_id != old.machine.instance_id
    net.run(net.now + 0.01)
    net.inject("gw-a", OTHER, request)  # replayed from the client's own address
    net.run(net.now + 0.1)
    held = [(b.epoch, b.binding_id, b.node_id) for b in new.machine.bindings.values()]
    assert inputs not in held
    c.paths[2].up = True
    c.auto_reattach = True  # as the agent does once the new process says NOT_BOUND_HERE
    if c.machine.state is SessionState.RECOVERING:
        c.machine.reattach(net.now, 2, wire.TransportKind.UDP)
    sent = pump(net, c, net.now + 2.0)  # the client is told (NOT_BOUND_HERE) and reattaches
    net.run(net.now + 0.2)
    assert new.machine.bindings[sid].node_id == new.machine.instance_id.encode()
    assert sent[-1] in c.received


def test_a_nat_rebinding_at_1000_pps_loses_at_most_one_datagram() -> None:
    """While the new address is challenged the downlink goes to both paths (the new one
    within 3x what it sent), so a rebinding under 1000 datagrams/s loses at most one."""
    net = Net(seed=97, latency=0.002)
    c, [gw] = setup(net)
    sid = c.machine.session_id
    pump(net, c, 1.0, every=0.001)
    net.run(1.05)  # everything in flight has arrived
    before_sent, before_got = 0, len(c.received)
    del net.by_addr[HOME]
    c.paths[1].addr = OTHER
    net.by_addr[OTHER] = (c, 1)
    sent = pump(net, c, 2.0, every=0.001)
    net.run(2.1)
    got = c.received[before_got:]
    assert gw.machine.bindings[sid].peer.addr == OTHER
    assert len(sent) - before_sent - len(got) <= 1, (len(sent), len(got))


def _revocation_setup(ttl_s: float) -> tuple[Net, Gw, Cl]:
    net = Net(seed=113)
    gw = net.gateway("gw-a", GW_PRIV, KEK, **dict(GW_SETTINGS, registry_staleness_s=0.5))
    net.store.clients[CL_PUB.hex()] = ClientPolicy(CL_PUB, upstreams=(UPSTREAM,), ttl_s=ttl_s)
    c = net.client(CL_PRIV, GW_PUB, PARAMS)
    net.add_path(c, 1, HOME, "gw-a")
    c.machine.connect(net.now, WALL_MS, 1, wire.TransportKind.UDP)
    net.run(0.5)
    assert c.of(HandshakeComplete)
    return net, gw, c


def test_a_revoked_client_cannot_reattach() -> None:
    """The client key leaves the registry (revocation tombstones its sessions in the store;
    this is the gateways' own check, for a session that missed it): once the node's view
    of the registry is older than registry_staleness_s, a reattach reads it, is refused
    (authenticated TERMINATED) and ends the session."""
    net, gw, c = _revocation_setup(ttl_s=300.0)  # refreshes are far apart
    pump(net, c, 1.0)
    del net.store.clients[CL_PUB.hex()]
    net.run(1.6)
    net.add_path(c, 2, OTHER, "gw-a")
    c.machine.reattach(net.now, 2, wire.TransportKind.UDP)
    net.run(net.now + 0.1)
    [rej] = c.of(ReattachRejected)
    assert rej.reason is RejectReason.TERMINATED and rej.authenticated
    assert net.store.records[c.machine.session_id].tr is TerminateReason.POLICY_REVOKED
    assert c.machine.state is SessionState.TERMINATED


def test_a_stale_registry_view_is_read_once_for_all_of_a_clients_reattaches() -> None:
    """When the node's view of a client's registry entry goes stale, its reattaches in
    flight wait for one read of it (not one each), then each goes on to its CAS."""
    net = Net(seed=117, store_latency=0.05)
    gw = net.gateway("gw-a", GW_PRIV, KEK, **dict(GW_SETTINGS, registry_staleness_s=0.5))
    net.store.clients[CL_PUB.hex()] = ClientPolicy(CL_PUB, upstreams=(UPSTREAM,), ttl_s=300.0)
    clients = []
    for i in range(4):
        c = net.client(CL_PRIV, GW_PUB, PARAMS)
        net.add_path(c, 1, (HOME[0], HOME[1] + i), "gw-a")
        c.machine.connect(net.now, WALL_MS + int(net.now * 1000), 1, wire.TransportKind.UDP)
        clients.append(c)
    net.run(1.0)
    assert all(c.of(HandshakeComplete) for c in clients)
    net.run(1.6)  # the view of the registry is stale now
    reads = sum(type(op).__name__ == "GetClientOp" for op in net.store.calls)
    for i, c in enumerate(clients):
        net.add_path(c, 2, (OTHER[0], OTHER[1] + i), "gw-a")
        c.machine.reattach(net.now, 2, wire.TransportKind.UDP)
    net.run(net.now + 0.5)
    assert all(c.of(Reattached) for c in clients)
    assert sum(type(op).__name__ == "GetClientOp" for op in net.store.calls) == reads + 1
    assert not gw.machine._registry_waiters and gw.machine._registry_waiting == 0


def test_a_revoked_clients_quiet_session_ends_at_its_next_refresh() -> None:
    """A session that never reattaches is ended at its next refresh after the registry
    view goes stale, and the client is told in band (authenticated CLOSE)."""
    net, gw, c = _revocation_setup(ttl_s=2.0)  # a refresh every 0.5 s
    del net.store.clients[CL_PUB.hex()]
    net.run(2.5)
    [ended] = c.of(SessionTerminated)
    assert ended.authenticated
    assert net.store.records[c.machine.session_id].tr is TerminateReason.POLICY_REVOKED


def test_a_client_key_holds_at_most_its_quota_of_sessions() -> None:
    """ClientPolicy.max_sessions: a handshake past the quota is refused (authenticated
    POLICY_DENIED); a session that ends (here a client close) frees its place at once."""
    net = Net(seed=127)
    net.gateway("gw-a", GW_PRIV, KEK, **GW_SETTINGS)
    net.store.clients[CL_PUB.hex()] = ClientPolicy(CL_PUB, upstreams=(UPSTREAM,), max_sessions=2)
    clients = []
    for i in range(3):
        c = net.client(CL_PRIV, GW_PUB, PARAMS)
        net.add_path(c, 1, ("198.51.100.50", 1000 + i), "gw-a")
        c.machine.connect(net.now, WALL_MS + int(net.now * 1000), 1, wire.TransportKind.UDP)
        net.run(net.now + 0.2)
        clients.append(c)
    assert [bool(c.of(HandshakeComplete)) for c in clients] == [True, True, False]
    [failed] = clients[2].of(HandshakeFailed)
    assert failed.reason is RejectReason.POLICY_DENIED and failed.authenticated
    clients[0].machine.close(net.now)
    net.run(net.now + 0.1)
    again = net.client(CL_PRIV, GW_PUB, PARAMS)
    net.add_path(again, 1, ("198.51.100.50", 2000), "gw-a")
    again.machine.connect(net.now, WALL_MS + int(net.now * 1000), 1, wire.TransportKind.UDP)
    net.run(net.now + 0.2)
    assert again.of(HandshakeComplete)


def test_the_previous_binding_forwards_until_the_new_one_validates() -> None:
    """A reattach's binding is PENDING: until the client's first packet from the new path
    validates it, the store still names the previous binding ACTIVE and that binding keeps
    forwarding; then activate.lua makes the new one ACTIVE and the old node is fenced. At
    every instant the store names one ACTIVE binding (docs/ARCHITECTURE.md, Reattach)."""
    net = Net(seed=71)
    c, (gwa, gwb) = setup(net, ("gw-a", "gw-b"))
    sid = c.machine.session_id
    rec = net.store.records[sid]
    old_epoch, a_id = rec.epoch, gwa.machine.instance_id
    net.add_path(c, 2, OTHER, "gw-b")
    c.machine.reattach(net.now, 2, wire.TransportKind.UDP)
    t0 = net.now
    actives: set[tuple[int, str]] = set()
    granted = False
    while net.now < t0 + 0.2:
        net.run(net.now + 0.001)
        actives.add((rec.epoch, rec.node))
        if sid in gwb.machine.pending and not granted:  # the client's packet is not there yet
            granted = True
            assert (rec.epoch, rec.node, rec.pnd) == (old_epoch, a_id, gwb.machine.instance_id)
            assert sid not in gwb.machine.bindings
            before = len(gwa.sent)
            gwa.machine.upstream_received(sid, b"still forwarding", net.now)
            gwa.flush()
            assert [p.addr for p, _ in gwa.sent[before:]] == [HOME]
    assert granted
    assert c.of(Reattached)
    assert (rec.epoch, rec.node) == (old_epoch + 1, gwb.machine.instance_id)
    assert actives == {(old_epoch, a_id), (old_epoch + 1, gwb.machine.instance_id)}
    assert sid in gwb.machine.bindings and sid not in gwb.machine.pending
    assert sid not in gwa.machine.bindings, "the previous owner was not fenced"
    sent = pump(net, c, net.now + 0.3)
    net.run(net.now + 0.1)
    assert set(sent) <= set(c.received) and len(c.received) >= len(sent)


def test_a_raced_reattach_cannot_take_a_working_session_off_the_air() -> None:
    """An on-path attacker copies the client's REATTACH_REQUEST and gets it to another node
    first, from its own address. The copy wins the CAS, but only a PENDING binding the
    attacker cannot validate: the working binding keeps forwarding, the attacker gets at
    most 3x what it sent, the genuine request's authenticated REPLAYED_NONCE carries the
    version, the client retries and moves; the copier's binding never becomes ACTIVE."""
    net = Net(seed=73)
    c, (gwa, gwb) = setup(net, ("gw-a", "gw-b"))
    sid = c.machine.session_id
    rec = net.store.records[sid]
    old_epoch, a_id = rec.epoch, gwa.machine.instance_id
    path = net.add_path(c, 2, OTHER, "gw-b")
    c.machine.reattach(net.now, 2, wire.TransportKind.UDP)
    [(_, raw)] = c.machine.datagrams_to_send()
    net.inject("gw-b", ATTACKER, raw)  # the copy, first
    net.at(0.02, lambda: net.to_gateway(path, raw))  # the original, later
    net.run(net.now + 0.015)
    assert rec.pnd == gwb.machine.instance_id and (rec.epoch, rec.node) == (old_epoch, a_id)
    before = len(gwa.sent)
    gwa.machine.upstream_received(sid, b"the working path", net.now)
    gwa.flush()
    assert [p.addr for p, _ in gwa.sent[before:]] == [HOME]
    net.run(net.now + 0.6)
    rejected = c.of(ReattachRejected)
    assert rejected and rejected[0].reason is RejectReason.REPLAYED_NONCE
    assert rejected[0].authenticated
    [done] = c.of(Reattached)
    assert done.epoch == old_epoch + 2, "the copier's epoch was reused"
    assert (rec.epoch, rec.node) == (old_epoch + 2, gwb.machine.instance_id)
    assert gwb.machine.bindings[sid].peer.addr == OTHER
    sent_to_attacker = sum(len(d) for a, d in net.injected if a == ATTACKER)
    assert 0 < sent_to_attacker <= 3 * len(raw)
    sent = pump(net, c, net.now + 0.3)
    net.run(net.now + 0.1)
    assert set(sent) <= set(c.received)


def test_an_unvalidated_grant_lapses_and_changes_nothing() -> None:
    """A PENDING binding that never hears from its client (a copier's) is forgotten after
    the silence timeout and never becomes ACTIVE: the client's own retransmission (a
    REPLAYED_NONCE from its address, then a retry) keeps the session on its node."""
    net = Net(seed=79)
    c, (gwa, gwb) = setup(net, ("gw-a", "gw-b"))
    sid = c.machine.session_id
    rec = net.store.records[sid]
    old_epoch, a_id = rec.epoch, gwa.machine.instance_id
    c.machine.reattach(net.now, 1, wire.TransportKind.UDP)
    [(_, raw)] = c.machine.datagrams_to_send()
    net.inject("gw-b", ATTACKER, raw)
    net.run(net.now + 0.05)
    assert sid in gwb.machine.pending
    net.run(net.now + 1.0)  # silence_keepalives * keepalive_interval = 0.6 s
    assert sid not in gwb.machine.pending
    assert any(a == ("binding_superseded",) and k["reason"] == "NOT_VALIDATED"
               for a, k in gwb.events.named("emit"))
    assert rec.node == a_id and rec.epoch != old_epoch + 1, "the copier's grant became ACTIVE"
    assert gwa.machine.bindings[sid].epoch == rec.epoch == c.machine.epoch
    assert c.machine.state in LIVE_STATES


REKEY_PARAMS = replace(PARAMS, rekey_after=1.1, reject_after=1.6, rekey_timeout=0.1)


def test_a_rekey_makes_a_fresh_secret_without_interrupting_traffic() -> None:
    """WireGuard's schedule, compressed: a REKEY every second (a fresh X25519 exchange in
    band), the store installs each new secret with a new binding and forgets the previous
    one once the client's first packet under the new keys arrives; 100 payloads a second
    meanwhile, none lost, none under keys past their reject-after age."""
    net = Net(seed=83)
    gw = net.gateway("gw-a", GW_PRIV, KEK, **GW_SETTINGS, keys_reject_after_s=1.6)
    net.store.clients[CL_PUB.hex()] = ClientPolicy(CL_PUB, upstreams=(UPSTREAM,))
    c = net.client(CL_PRIV, GW_PUB, REKEY_PARAMS)
    net.add_path(c, 1, HOME, "gw-a")
    c.machine.connect(net.now, WALL_MS, 1, wire.TransportKind.UDP)
    net.run(0.5)
    sid = c.machine.session_id
    rec = net.store.records[sid]
    secrets_seen = {gw.machine.bindings[sid].secrets.secret}
    sent: list[bytes] = []
    t_end = net.now + 3.8
    while net.now < t_end:
        sent += pump(net, c, net.now + 0.1)
        secrets_seen.add(gw.machine.bindings[sid].secrets.secret)
    net.run(net.now + 0.2)
    secrets_seen.add(gw.machine.bindings[sid].secrets.secret)
    rekeys = c.of(Rekeyed)
    assert len(rekeys) >= 3, rekeys
    assert [r.generation for r in rekeys] == list(range(1, len(rekeys) + 1))
    assert rec.kg == len(rekeys) and rec.wsp == b"", "the previous secret outlived its rekey"
    assert len(secrets_seen) == len(rekeys) + 1
    assert c.received == sent, f"{len(sent) - len(c.received)} payloads lost across rekeys"
    assert not any(a[0] is DropReason.KEYS_EXPIRED for a, _ in gw.metrics.named("count_drop"))
    assert gw.machine.bindings[sid].prev_channel is None


def test_a_rekey_answer_lost_with_its_node_is_undone_by_the_next_reattach() -> None:
    """The node commits a REKEY and dies before its answer reaches the client: the client
    still holds the previous secret, which the store kept. Its reattach (proven under the
    previous secret) succeeds on another node and gives that secret back; the session lives."""
    net = Net(seed=89)
    gwa = net.gateway("gw-a", GW_PRIV, KEK, **GW_SETTINGS)
    gwb = net.gateway("gw-b", GW_PRIV, KEK, **GW_SETTINGS)
    net.store.clients[CL_PUB.hex()] = ClientPolicy(CL_PUB, upstreams=(UPSTREAM,))
    c = net.client(CL_PRIV, GW_PUB, replace(REKEY_PARAMS, dead_after=10))  # no loss noticed
    net.add_path(c, 1, HOME, "gw-a")
    c.machine.connect(net.now, WALL_MS, 1, wire.TransportKind.UDP)
    net.run(0.5)
    sid = c.machine.session_id
    rec = net.store.records[sid]
    old_secret = gwa.machine.bindings[sid].secrets.secret
    c.paths[1].downlink = False  # the REKEY_ACK (and everything else from gw-a) is lost
    net.run(1.4)
    assert rec.kg == 1 and rec.wsp, "the node did not commit the rekey"
    assert not c.of(Rekeyed)
    net.add_path(c, 2, OTHER, "gw-b")
    c.machine.reattach(net.now, 2, wire.TransportKind.UDP)
    while not c.of(Reattached) and net.now < 3.0:
        net.run(net.now + 0.001)
    assert c.of(Reattached) and not c.of(Rekeyed)
    assert rec.kg == 0 and rec.wsp == b"" and rec.pnd == gwb.machine.instance_id
    assert gwb.machine.pending[sid].secrets.secret == old_secret
    proved = [op for op in net.store.calls if isinstance(op, ReattachOp)]
    assert proved and {op.proof_generation for op in proved} == {0}
    sent = pump(net, c, net.now + 0.2)
    net.run(net.now + 0.1)
    assert set(sent) <= set(c.received)
    # The secret is due for a rekey: it happens at once, on gw-b, and completes.
    assert [r.generation for r in c.of(Rekeyed)] == [1] and rec.kg == 1 and rec.wsp == b""


def test_a_reattach_of_an_attached_session_is_a_switch_not_a_state_change() -> None:
    """A proactive jump (the session stays ATTACHED) is counted as a transport switch; an
    ATTACHED -> ATTACHED "state change" is no change and is not counted or emitted."""
    net = Net(seed=131)
    c, [gw] = setup(net)
    net.run(0.5)
    assert c.machine.state is SessionState.ATTACHED
    net.add_path(c, 2, OTHER, "gw-a")
    c.machine.reattach(net.now, 2, wire.TransportKind.UDP, reason="jump")
    net.run(net.now + 0.5)
    assert c.of(Reattached)
    changes = [a[:2] for a, _ in gw.metrics.named("state_change")]
    assert changes and all(old != new for old, new in changes), changes
    assert all(a[1] != a[2] for a, _ in gw.events.named("state_change"))
    assert any(a[2] == "reattach" for a, _ in gw.metrics.named("transport_switch"))


def _rekeyed_elsewhere(net: Net) -> tuple[Cl, Gw, Gw]:
    """A session that visited gw-b (which caches its secret) and then rekeyed on gw-a:
    gw-b's cached secret is one generation behind the store's."""
    gwa = net.gateway("gw-a", GW_PRIV, KEK, **GW_SETTINGS)
    gwb = net.gateway("gw-b", GW_PRIV, KEK, **GW_SETTINGS)
    net.store.clients[CL_PUB.hex()] = ClientPolicy(CL_PUB, upstreams=(UPSTREAM,))
    c = net.client(CL_PRIV, GW_PUB, replace(REKEY_PARAMS, rekey_after=1.5))
    net.add_path(c, 1, HOME, "gw-a")
    c.machine.connect(net.now, WALL_MS, 1, wire.TransportKind.UDP)
    net.run(0.3)
    sid = c.machine.session_id
    for path, addr, gw in ((2, OTHER, "gw-b"), (3, ("198.51.100.3", 40002), "gw-a")):
        net.add_path(c, path, addr, gw)
        c.machine.reattach(net.now, path, wire.TransportKind.UDP)
        while len(c.of(Reattached)) < path - 1 and net.now < 3.0:
            net.run(net.now + 0.01)
    assert gwb.machine._secrets[sid].generation == 0  # noqa: SLF001
    while not c.of(Rekeyed) and net.now < 4.0:
        net.run(net.now + 0.01)
    net.run(net.now + 0.1)
    assert net.store.records[sid].kg == 1 and not net.store.records[sid].wsp
    return c, gwa, gwb


def test_requests_during_a_reread_of_a_rekeyed_secret_wait_for_it() -> None:
    """A session rekeyed on another node: the cached secret is a generation behind, so the
    first request read the record again; the client's next tries, arriving while that read
    is in flight, are checked on its answer too: no BAD_PROOF for an honest client."""
    net = Net(seed=151)
    c, _, gwb = _rekeyed_elsewhere(net)
    net.store.delay = lambda op: 0.3 if isinstance(op, GetRecordOp) else 0.0
    for i, path in enumerate((4, 5, 6)):  # a try, then two more before the read answers
        net.add_path(c, path, ("198.51.100.4", 40010 + i), "gw-b")
        c.machine.reattach(net.now, path, wire.TransportKind.UDP)
        net.run(net.now + 0.05)
    while len(c.of(Reattached)) < 3 and net.now < 6.0:
        net.run(net.now + 0.01)
    alerts = gwb.events.named("security_event")
    assert not alerts, alerts
    assert not [a for a, _ in gwb.metrics.named("security") if a[0] == "bad_proof"]
    assert c.of(Reattached)[-1].node_id == gwb.machine.instance_id.encode()
    assert gwb.machine._secrets[c.machine.session_id].generation == 1  # noqa: SLF001



def test_a_rekey_undone_then_made_again_is_not_taken_for_the_one_cached() -> None:
    """A generation number alone does not name a secret: a REKEY undone (its answer was
    lost) and made again on another node reuses it. The node that made the undone one still
    caches it; the client's reattach there is checked on the secret the store holds now."""
    net = Net(seed=89)
    gwa = net.gateway("gw-a", GW_PRIV, KEK, **GW_SETTINGS)
    gwb = net.gateway("gw-b", GW_PRIV, KEK, **GW_SETTINGS)
    net.store.clients[CL_PUB.hex()] = ClientPolicy(CL_PUB, upstreams=(UPSTREAM,))
    c = net.client(CL_PRIV, GW_PUB, replace(REKEY_PARAMS, dead_after=10))
    net.add_path(c, 1, HOME, "gw-a")
    c.machine.connect(net.now, WALL_MS, 1, wire.TransportKind.UDP)
    net.run(0.5)
    sid = c.machine.session_id
    rec = net.store.records[sid]
    c.paths[1].downlink = False  # gw-a commits a REKEY whose answer is lost
    net.run(1.4)
    undone = gwa.machine._secrets[sid]  # noqa: SLF001
    assert rec.kg == 1 and undone.generation == 1 and not c.of(Rekeyed)
    net.add_path(c, 2, OTHER, "gw-b")  # undone on gw-b, then made again there
    c.machine.reattach(net.now, 2, wire.TransportKind.UDP)
    while not c.of(Rekeyed) and net.now < 4.0:
        net.run(net.now + 0.01)
    net.run(net.now + 0.1)
    assert rec.kg == 1 and not rec.wsp and c.of(Rekeyed)
    assert gwa.machine._secrets[sid] is undone  # noqa: SLF001  (same number, another secret)
    net.add_path(c, 3, ("198.51.100.3", 40002), "gw-a")
    c.machine.reattach(net.now, 3, wire.TransportKind.UDP)
    while len(c.of(Reattached)) < 2 and net.now < 6.0:
        net.run(net.now + 0.01)
    assert not [a for a, _ in gwa.metrics.named("security") if a[0] == "bad_proof"]
    assert c.of(Reattached)[-1].node_id == gwa.machine.instance_id.encode()
    assert gwa.machine._secrets[sid].secret == gwb.machine._secrets[sid].secret  # noqa: SLF001


def test_a_rekey_answer_that_outlives_a_refused_reattach_is_taken_with_its_own_key() -> None:
    """The client sends a REKEY, then jumps at once (the jump stops the REKEY). The node
    commits the REKEY; the jump, made before that commit, is refused (KEY_MOVED); the
    client asks to REKEY again, and only then the first answer arrives. It answers the
    first key: the client must derive the secret the store holds (the same ephemeral key
    for both REKEYs of a generation), or none of its proofs and packets would pass."""
    net = Net(seed=163)
    gw = net.gateway("gw-a", GW_PRIV, KEK, **GW_SETTINGS)
    net.store.clients[CL_PUB.hex()] = ClientPolicy(CL_PUB, upstreams=(UPSTREAM,))
    c = net.client(CL_PRIV, GW_PUB, REKEY_PARAMS)
    net.add_path(c, 1, HOME, "gw-a")
    c.machine.connect(net.now, WALL_MS, 1, wire.TransportKind.UDP)
    net.run(0.5)
    sid = c.machine.session_id
    net.store.delay = lambda op: 0.05 if isinstance(op, RekeyOp) else 0.0  # a slow answer
    while c.machine._rekey is None and net.now < 2.0:  # noqa: SLF001
        net.run(net.now + 0.001)
    assert c.machine._rekey is not None  # noqa: SLF001  the REKEY is on its way
    net.add_path(c, 2, OTHER, "gw-a")
    c.machine.reattach(net.now, 2, wire.TransportKind.UDP)  # the jump, at once
    while not c.of(Rekeyed) and net.now < 3.0:
        net.run(net.now + 0.001)
    assert any(r.reason is RejectReason.STORE_UNAVAILABLE for r in c.of(ReattachRejected))
    assert c.of(Rekeyed)
    assert c.machine._secret == gw.machine.bindings[sid].secrets.secret  # noqa: SLF001
    sent = pump(net, c, net.now + 0.3)
    net.run(net.now + 0.1)
    assert set(sent) <= set(c.received), "the traffic under the new keys does not pass"


def test_a_proof_under_the_previous_secret_soon_after_a_reread_still_passes() -> None:
    """The node committed a REKEY whose answer the client never got; the client's reattach
    to it (proven under the previous secret) made the node read the record again, and was
    refused by the store. The client asks again at once: within the re-read interval the
    node checks it under the previous secret that read found, not BAD_PROOF."""
    net = Net(seed=167)
    gw = net.gateway("gw-a", GW_PRIV, KEK, **GW_SETTINGS)
    net.store.clients[CL_PUB.hex()] = ClientPolicy(CL_PUB, upstreams=(UPSTREAM,))
    c = net.client(CL_PRIV, GW_PUB, replace(REKEY_PARAMS, dead_after=10))
    net.add_path(c, 1, HOME, "gw-a")
    c.machine.connect(net.now, WALL_MS, 1, wire.TransportKind.UDP)
    net.run(0.5)
    sid = c.machine.session_id
    rec = net.store.records[sid]
    c.paths[1].downlink = False  # the REKEY_ACK is lost
    net.run(1.4)
    assert rec.kg == 1 and rec.wsp and not c.of(Rekeyed)
    c.paths[1].downlink = True
    net.store.force = (StoreStatus.CLOCK_SKEW, RejectReason.CLOCK_SKEW)  # the first is refused
    net.add_path(c, 2, OTHER, "gw-a")
    c.machine.reattach(net.now, 2, wire.TransportKind.UDP)
    while not c.of(Reattached) and net.now < 3.0:
        net.run(net.now + 0.001)
    assert any(r.reason is RejectReason.CLOCK_SKEW for r in c.of(ReattachRejected))
    assert not [a for a, _ in gw.metrics.named("security") if a[0] == "bad_proof"]
    assert c.of(Reattached) and rec.kg == 0  # the REKEY undone by the proof, as it should


def test_a_client_cannot_make_the_gateway_rekey_more_than_once_a_second() -> None:
    """Each REKEY is a store write: REKEYs from an authenticated client beyond one per
    REKEY_MIN_INTERVAL_S are dropped and counted, with no store call."""
    net = Net(seed=97)
    c, [gw] = setup(net, **{"keys_reject_after_s": 180.0})
    sid = c.machine.session_id
    net.run(net.now + 0.2)
    b = gw.machine.bindings[sid]
    _, pub = generate_keypair()
    calls = len(net.store.calls)
    for seq in range(50):  # sealed under the client's own keys, as a hostile client would
        raw = c.machine._seal(wire.inner_rekey(0, pub))  # noqa: SLF001
        gw.machine.receive(raw, Peer(wire.TransportKind.UDP, HOME), net.now + seq * 0.001)
    gw.flush()
    assert not any(isinstance(op, RekeyOp) for op in net.store.calls[calls:])
    limited = [a for a, _ in gw.metrics.named("count_drop") if a[0] is DropReason.RATE_LIMITED]
    assert len(limited) == 50 and b.rekey is None


def test_the_machine_says_which_bindings_forward_plainly() -> None:
    """The compiled engine carries a binding alone only while the machine would forward
    its payloads without a decision (GatewayMachine.forwards_plainly)."""
    net = Net(seed=41)
    c, [gw] = setup(net)
    pump(net, c, 0.5)
    b = gw.machine.bindings[c.machine.session_id]
    assert b.validated and gw.machine.forwards_plainly(b)
    peer = b.peer
    b.peer = Peer(wire.TransportKind.TCP, peer.addr, 1)
    assert not gw.machine.forwards_plainly(b), "only a UDP peer"
    b.peer = peer
    # a new address under validation: the machine decides where the downlink goes
    b.probes = {Peer(wire.TransportKind.UDP, OTHER): None}  # type: ignore[dict-item]
    assert not gw.machine.forwards_plainly(b)
    b.probes = None
    b.validated = False
    assert not gw.machine.forwards_plainly(b)
    b.validated = True
    assert gw.machine.forwards_plainly(b)
    b.sm.apply(SessionEvent.TRANSPORT_LOST)
    assert b.state not in LIVE_STATES and not gw.machine.forwards_plainly(b), "a live state"


def test_the_lease_the_engine_holds_is_the_one_the_machine_forwards_under() -> None:
    """GatewayMachine.lease(): until when the node may forward and since when it trusts
    the store; the machine's own forwarding check (_leased) agrees with it at every step,
    through a store outage and back."""
    net = Net(seed=43)
    c, [gw] = setup(net)
    sid = c.machine.session_id
    pump(net, c, 1.0)
    for t, up in ((1.5, True), (4.0, False), (5.0, False), (6.5, True), (7.5, True)):
        net.store.up = up
        net.run(t)
        b = gw.machine.bindings.get(sid)
        if b is None:
            continue
        until, since = gw.machine.lease()
        assert until == gw.machine.health.ok_at + gw.machine.settings.lease_s
        for now in (net.now, until - 1e-6, until):
            expect = now < until and b.confirmed_at >= since
            assert gw.machine._leased(b, now) == expect, (t, now)
        if t == 5.0:  # the store away for longer than lease_s: the lease lapsed
            assert until <= net.now and not gw.machine._leased(b, net.now)
        if t == 7.5:
            assert gw.machine._leased(b, net.now), "confirmed again once the store is back"


def test_traffic_the_engine_forwarded_keeps_a_binding_from_being_reported_lost() -> None:
    """The engine forwards a binding's packets without the machine: what it reports
    (GatewayMachine.engine_forwarded) counts, and a binding it received on is heard, so
    the silence timer reports no TRANSPORT_LOST; once it reports nothing, it does."""
    net = Net(seed=47)
    c, [gw] = setup(net)
    sid = c.machine.session_id
    net.run(1.0)
    c.paths[1].up = False  # the machine hears nothing more itself
    b = gw.machine.bindings[sid]
    rx0, tx0 = b.rx_packets, b.tx_packets
    t = net.now
    while t < 2.5:
        t += 0.1
        net.run(t)
        gw.machine.engine_forwarded(sid, 5, 4, net.now, 500, 400)
    assert b.rx_packets == rx0 + 5 * 15 and b.tx_packets == tx0 + 4 * 15
    assert not b.lost and b.last_rx == net.now
    assert not [op for op in net.store.calls if isinstance(op, TransitionOp)]
    gw.machine.engine_forwarded(sid, 0, 1, 0.0, 0, 100)  # sent only: nothing heard
    gw.machine.engine_forwarded(sid, 1, 0, 0.5, 10, 0)  # an older time never moves it back
    assert b.last_rx == net.now
    gw.machine.engine_forwarded(b"\x00" * 16, 1, 1, net.now, 1, 1)  # no such binding: ignored
    net.run(4.0)
    losts = [op for op in net.store.calls if isinstance(op, TransitionOp)]
    assert [op.event.name for op in losts] == ["TRANSPORT_LOST"]
