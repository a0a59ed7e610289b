"""The client machine driven in memory: handshake, data, death, reattach, fencing."""

from __future__ import annotations

import os

import pytest

from session import control, wire
from session.client import (
    ClientParams,
    ClientSession,
    HandshakeComplete,
    PayloadReceived,
    ReattachAction,
    Reattached,
    ReattachRejected,
    ReattachTimedOut,
    SessionTerminated,
    StateChanged,
    TransportLost,
)
from session.noise import generate_keypair
from session.reasons import DropReason, NoticeKind, RejectReason, TerminateReason
from session.states import TRANSITIONS, SessionState
from session.storeops import StoreStatus
from tests.support.memnet import WALL_MS, GatewayPeer

GW_PRIV, GW_PUB = generate_keypair()
CL_PRIV, CL_PUB = generate_keypair()
NODE = b"gw-test"
KEK = bytes(range(32))


HOME = ("198.51.100.1", 40000)
NEW = ("198.51.100.2", 40001)
UPSTREAM = "u:1"


def gateway() -> GatewayPeer:
    """The real gateway machine with the store model (tests/support/memnet.py)."""
    return GatewayPeer(GW_PRIV, KEK, CL_PUB, UPSTREAM, keepalive_interval=0.5, lease_s=60.0)


def ack(gw: GatewayPeer, req: bytes, t: float, forge: bool = False) -> bytes:
    """The gateway's answer to a reattach request from the new path (an ACK here)."""
    [answer] = gw.answer(req, NEW, t)
    assert isinstance(wire.decode(answer), wire.ReattachAck), wire.decode(answer)
    return answer[:-1] + bytes([answer[-1] ^ 1]) if forge else answer


def reject(gw: GatewayPeer, req: bytes, t: float) -> bytes:
    """The gateway's answer to a request the store refuses (set up by the test)."""
    [answer] = gw.answer(req, NEW, t)
    assert isinstance(wire.decode(answer), wire.Reject), wire.decode(answer)
    return answer


def forged_reject(gw: GatewayPeer, req: bytes, reason: RejectReason) -> bytes:
    """What an off-path attacker can send: an unauthenticated REJECT echoing the nonce."""
    r = wire.decode(req)
    assert isinstance(r, wire.ReattachRequest)
    return wire.encode(wire.Reject(gw.sid, r.nonce, reason, 0, 1))


def events(c: ClientSession) -> list[object]:
    out = []
    while (e := c.next_event()) is not None:
        out.append(e)
    return out


def connected(probe_silence: float = 0.0) -> tuple[ClientSession, GatewayPeer]:
    c = ClientSession(CL_PRIV, GW_PUB, ClientParams(keepalive_interval=0.5, dead_after=3,
                                                    upstream=UPSTREAM,
                                                    probe_silence=probe_silence))
    gw = gateway()
    c.connect(0.0, WALL_MS, path=1, kind=wire.TransportKind.UDP)
    [(path, init)] = c.datagrams_to_send()
    assert path == 1
    [answer] = gw.answer(init, HOME, 0.0)
    c.receive(answer, 1, 0.01)
    assert any(isinstance(e, HandshakeComplete) for e in events(c))
    assert c.state is SessionState.ATTACHED and c.version == 1 and c.epoch == 1
    c.datagrams_to_send()  # the path-validating keepalive
    return c, gw


def test_handshake_then_payload_both_ways() -> None:
    c, gw = connected()
    assert c.send(b"hello", 0.02)
    [(_, raw)] = c.datagrams_to_send()
    msg = wire.decode(raw)
    assert isinstance(msg, wire.Data)
    assert wire.decode_inner(gw.channel.open(msg, raw)).payload == b"hello"
    c.receive(gw.data(b"world"), 1, 0.03)
    assert [e.data for e in events(c) if isinstance(e, PayloadReceived)] == [b"world"]


def handshaking() -> tuple[ClientSession, bytes]:
    """A client in BIRTH with its handshake outstanding, and the gateway's genuine answer."""
    c = ClientSession(CL_PRIV, GW_PUB, ClientParams(keepalive_interval=0.5, dead_after=3,
                                                    upstream=UPSTREAM))
    c.connect(0.0, WALL_MS, path=1, kind=wire.TransportKind.UDP)
    [(_, init)] = c.datagrams_to_send()
    [answer] = gateway().answer(init, HOME, 0.0)
    return c, answer


def test_tampered_handshake_answer_racing_the_genuine_one_leaves_the_handshake_outstanding() -> None:
    # An on-path attacker copies the answer, changes its cleartext session id (or breaks its
    # Noise message) and gets it to the client first: dropped, and the genuine answer that
    # follows still completes the handshake with the authenticated session id.
    c, answer = handshaking()
    msg = wire.decode(answer)
    assert isinstance(msg, wire.HandshakeResp)
    tampered = [
        wire.encode(wire.HandshakeResp(os.urandom(16), msg.handshake_id, msg.noise)),
        wire.encode(wire.HandshakeResp(msg.session_id, msg.handshake_id,
                                       msg.noise[:-1] + bytes([msg.noise[-1] ^ 1]))),
    ]
    for i, bad in enumerate(tampered, 1):
        c.receive(bad, 1, 0.01)
        assert c.stats["dropped_input"] == i
        assert c.state is SessionState.BIRTH and c.session_id == b""
        assert not events(c) and not c.datagrams_to_send()
    c.receive(answer, 1, 0.02)
    assert any(isinstance(e, HandshakeComplete) for e in events(c))
    assert c.state is SessionState.ATTACHED and c.session_id == msg.session_id


def test_silence_moves_to_recovering_after_dead_after_intervals() -> None:
    c, _ = connected()
    t = 0.01
    while c.state is not SessionState.RECOVERING and t < 5:
        t = c.get_timer() or t + 0.1
        c.handle_timer(t)
    assert c.state is SessionState.RECOVERING
    assert 1.5 <= t <= 1.6  # 3 x 0.5 s of silence
    assert any(isinstance(e, TransportLost) for e in events(c))


def test_unanswered_data_probes_at_once_and_loses_the_path_sooner() -> None:
    c, gw = connected(probe_silence=0.1)
    assert c.send(b"x", 0.02)
    c.datagrams_to_send()
    probe_at = c.get_timer()
    assert probe_at is not None and 0.119 <= probe_at <= 0.121  # no RTT measured yet
    c.handle_timer(probe_at)
    [(_, probe)] = c.datagrams_to_send()  # a keepalive, at once
    assert isinstance(wire.decode(probe), wire.Data) and c.state is SessionState.ATTACHED
    # anything heard ends the suspicion: no loss, the next probe waits for new data
    c.receive(gw.data(b"ack"), 1, 0.15)
    t = 0.15
    while t < 0.6:
        t = min(c.get_timer() or 0.6, 0.6)
        c.handle_timer(t)
    assert c.state is SessionState.ATTACHED
    c.datagrams_to_send()
    events(c)
    # silence under data: probe, then lost after one more period (not 3 x 0.5 s)
    assert c.send(b"y", 0.6)
    t = 0.6
    while c.state is not SessionState.RECOVERING and t < 2:
        t = c.get_timer() or t + 0.1
        c.handle_timer(t)
    assert c.state is SessionState.RECOVERING and t <= 0.85
    lost = [e for e in events(c) if isinstance(e, TransportLost)]
    assert lost and "probe" in lost[0].reason
    # the first reattach gets one short try (no retransmission), then the next transport
    c.datagrams_to_send()
    c.reattach(t, path=2, kind=wire.TransportKind.UDP, reason="recover")
    c.datagrams_to_send()
    deadline = c.get_timer()
    assert deadline is not None and deadline - t <= 0.15
    c.handle_timer(deadline)
    assert not c.datagrams_to_send()
    assert any(isinstance(e, ReattachTimedOut) for e in events(c))
    # the next one has the usual timeout and retransmissions
    c.reattach(deadline, path=3, kind=wire.TransportKind.TCP, reason="recover")
    c.datagrams_to_send()
    c.handle_timer(deadline + 0.5)
    assert [p for p, _ in c.datagrams_to_send()] == [3]


def lose(c: ClientSession) -> float:
    t = 0.01
    while c.state is not SessionState.RECOVERING:
        t = c.get_timer() or t + 0.1
        c.handle_timer(t)
    c.datagrams_to_send()
    events(c)
    return t


def test_reattach_installs_new_epoch_and_fences_old_keys() -> None:
    c, gw = connected()
    old_packet = gw.data(b"from-old-epoch")
    t = lose(c)
    c.reattach(t, path=2, kind=wire.TransportKind.UDP)
    [(path, req)] = c.datagrams_to_send()
    assert path == 2
    c.receive(ack(gw, req, t), 2, t + 0.01)
    evs = events(c)
    r = [e for e in evs if isinstance(e, Reattached)][0]
    assert (r.version, r.epoch, c.state) == (2, 2, SessionState.ATTACHED)
    # A packet sealed under the previous binding's keys is no longer accepted.
    c.receive(old_packet, 2, t + 0.02)
    assert c.drops.get(DropReason.STALE_EPOCH) == 1
    c.receive(gw.data(b"new"), 2, t + 0.03)
    assert [e.data for e in events(c) if isinstance(e, PayloadReceived)] == [b"new"]


def test_forged_or_misdirected_ack_is_ignored() -> None:
    c, gw = connected()
    t = lose(c)
    c.reattach(t, 2, wire.TransportKind.UDP)
    [(_, req)] = c.datagrams_to_send()
    c.receive(ack(gw, req, t, forge=True), 2, t + 0.01)
    assert c.state is SessionState.RECOVERING and c.drops.get(DropReason.BAD_MAC) == 1
    other = wire.ReattachAck(gw.sid, os.urandom(16), 9, 9, os.urandom(16), NODE, 1)
    c.receive(control.seal(other, gw.keys.control_key), 2, t + 0.02)
    assert c.state is SessionState.RECOVERING and c.drops.get(DropReason.UNEXPECTED) == 1


def test_retransmission_reuses_the_same_bytes_then_times_out() -> None:
    c, gw = connected()
    t = lose(c)
    c.reattach(t, 2, wire.TransportKind.UDP)
    [(_, first)] = c.datagrams_to_send()
    sent = [first]
    for _ in range(10):
        t = c.get_timer() or t + 0.1
        c.handle_timer(t)
        sent += [d for p, d in c.datagrams_to_send() if p == 2]
        if any(isinstance(e, ReattachTimedOut) for e in events(c)):
            break
    reqs = [d for d in sent if wire.peek_header(d)[0] is wire.MessageType.REATTACH_REQUEST]
    assert len(reqs) == 4 and len(set(reqs)) == 1


def test_an_unauthenticated_reject_is_a_hint_that_cancels_nothing() -> None:
    """Forged REJECTs carrying our request's nonce (it travels in clear): no session end,
    no transport switch, no backoff; the request stays outstanding and the genuine ACK
    that follows is taken."""
    c, gw = connected()
    t = lose(c)
    c.reattach(t, 2, wire.TransportKind.UDP)
    [(_, req)] = c.datagrams_to_send()
    for reason in (RejectReason.TERMINATED, RejectReason.POLICY_DENIED, RejectReason.RATE_LIMITED):
        c.receive(forged_reject(gw, req, reason), 2, t + 0.01)
    evs = events(c)
    assert c.state is SessionState.RECOVERING
    assert not any(isinstance(e, (SessionTerminated, ReattachTimedOut)) for e in evs)
    rejs = [e for e in evs if isinstance(e, ReattachRejected)]
    assert len(rejs) == 3 and all(e.action is ReattachAction.WAIT and not e.authenticated
                                  for e in rejs)
    assert c.datagrams_to_send() == []  # no new request, no backoff retry
    c.receive(ack(gw, req, t + 0.02), 2, t + 0.02)
    assert c.state is SessionState.ATTACHED and any(isinstance(e, Reattached) for e in events(c))


def test_authenticated_terminated_ends_the_session() -> None:
    c, gw = connected()
    t = lose(c)
    c.reattach(t, 2, wire.TransportKind.UDP)
    [(_, req)] = c.datagrams_to_send()
    gw.record.state, gw.record.tr = SessionState.TERMINATED, TerminateReason.EXPIRED
    c.receive(reject(gw, req, t), 2, t + 0.01)
    assert c.state is SessionState.TERMINATED
    assert any(isinstance(e, SessionTerminated) and e.authenticated for e in events(c))


def test_authenticated_stale_version_adopts_version_and_retries() -> None:
    c, gw = connected()
    t = lose(c)
    gw.record.version = 5  # the store recorded transitions we did not hear about
    c.reattach(t, 2, wire.TransportKind.UDP)
    [(_, req)] = c.datagrams_to_send()
    c.receive(reject(gw, req, t), 2, t + 0.01)
    [(_, retry)] = c.datagrams_to_send()
    r = wire.decode(retry)
    assert isinstance(r, wire.ReattachRequest) and r.expected_version == 5
    c.receive(ack(gw, retry, t + 0.01), 2, t + 0.02)
    assert c.state is SessionState.ATTACHED and c.version == 6


def test_forged_notice_is_dropped_and_authentic_one_terminates() -> None:
    c, gw = connected()
    bad = wire.Notice(gw.sid, NoticeKind.TERMINATED, 3, 99, os.urandom(16), 1)
    c.receive(control.seal(bad, os.urandom(32)), 1, 0.1)
    assert c.state is SessionState.ATTACHED
    c.receive(control.seal(bad, gw.keys.control_key), 1, 0.2)
    assert c.state is SessionState.TERMINATED


def test_payloads_are_held_while_recovering_and_flushed_after() -> None:
    c, gw = connected()
    t = lose(c)
    assert c.send(b"held", t)
    c.reattach(t, 2, wire.TransportKind.UDP)
    [(_, req)] = c.datagrams_to_send()
    c.receive(ack(gw, req, t), 2, t + 0.01)
    out = c.datagrams_to_send()
    inner = [wire.decode_inner(gw.channel.open(wire.decode(d), d)) for _, d in out]  # type: ignore[arg-type]
    assert b"held" in [i.payload for i in inner]


def test_quality_thresholds_move_to_volatile_and_back() -> None:
    c, gw = connected()
    t = 0.0
    # Answer keepalives slowly (400 ms RTT > 300 ms volatile threshold).
    for rtt, expect in ((0.4, SessionState.VOLATILE), (0.01, SessionState.ATTACHED)):
        for _ in range(40):
            t += 0.5
            c.handle_timer(t)
            for _, raw in c.datagrams_to_send():
                m = wire.decode(raw)
                inner = wire.decode_inner(gw.channel.open(m, raw))  # type: ignore[arg-type]
                if inner.kind is wire.InnerType.KEEPALIVE:
                    ack = wire.inner_keepalive_ack(inner.seq, inner.echo_ms, c.version, inner.state)
                    c.receive(gw.channel.seal(ack), 1, t + rtt)
        assert c.state is expect, (rtt, c.status())
        assert c.version == 1  # the client reports its grade; only the gateway counts versions


def test_reattach_before_handshake_is_local_misuse() -> None:
    c = ClientSession(CL_PRIV, GW_PUB, ClientParams())
    from session.errors import LocalProtocolError

    with pytest.raises(LocalProtocolError):
        c.reattach(0.0, 1, wire.TransportKind.UDP)


def test_not_bound_hint_moves_us_only_for_a_packet_we_sent() -> None:
    c, gw = connected()
    assert c.send(b"x", 0.05)
    [(_, ours)] = c.datagrams_to_send()
    # A hint echoing a tag we never sent (the gateway answered forged DATA): ignored.
    forged = wire.Notice(gw.sid, NoticeKind.NOT_BOUND_HERE, 0, c.version, os.urandom(16), 1)
    c.receive(control.seal(forged, gw.keys.control_key), 1, 0.06)
    assert c.state is SessionState.ATTACHED and c.drops.get(DropReason.UNEXPECTED) == 1
    # A hint about our own packet (its AEAD tag): the binding is gone, reattach.
    real = wire.Notice(gw.sid, NoticeKind.NOT_BOUND_HERE, 0, c.version, ours[-16:], 1)
    c.receive(control.seal(real, gw.keys.control_key), 1, 0.07)
    assert c.state is SessionState.RECOVERING
    assert any(isinstance(e, TransportLost) for e in events(c))


def test_every_state_change_follows_the_transition_table() -> None:
    c, gw = connected()
    with pytest.raises(AttributeError):
        c.state = SessionState.TERMINATED  # type: ignore[misc]
    t = 0.01
    while c.state is not SessionState.RECOVERING:
        t = c.get_timer() or t + 0.1
        c.handle_timer(t)
    c.reattach(t, 2, wire.TransportKind.UDP)
    req = c.datagrams_to_send()[-1][1]
    c.receive(ack(gw, req, t), 2, t + 0.01)
    c.close(t + 0.02)
    changes = [e for e in events(c) if isinstance(e, StateChanged)]
    assert [(e.old, e.new, e.version) for e in changes] == [
        (SessionState.ATTACHED, SessionState.RECOVERING, 1),  # the client's loss: no new version
        (SessionState.RECOVERING, SessionState.ATTACHED, 2),  # the gateway's, adopted from the ACK
        (SessionState.ATTACHED, SessionState.TERMINATED, 2),
    ]
    for e in changes:
        assert e.new in TRANSITIONS[e.old].values()
    c.close(t + 0.03)  # closing twice changes nothing
    assert events(c) == []


def test_an_expired_session_ends_by_the_expire_edge() -> None:
    c, gw = connected()
    t = lose(c)
    c.reattach(t, 2, wire.TransportKind.UDP)
    [(_, req)] = c.datagrams_to_send()
    gw.record.state, gw.record.tr = SessionState.TERMINATED, TerminateReason.EXPIRED
    c.receive(reject(gw, req, t), 2, t + 0.01)
    evs = events(c)
    [rej] = [e for e in evs if isinstance(e, ReattachRejected)]
    assert rej.action is ReattachAction.REHANDSHAKE
    assert [(e.old, e.new) for e in evs if isinstance(e, StateChanged)] == [
        (SessionState.RECOVERING, SessionState.TERMINATED)]
    assert c._machine.terminate_reason == 2  # TerminateReason.EXPIRED


def test_an_ack_that_does_not_advance_the_version_is_not_adopted() -> None:
    c, gw = connected()
    t = lose(c)
    c.reattach(t, 2, wire.TransportKind.UDP)
    [(_, req)] = c.datagrams_to_send()
    r = wire.decode(req)
    assert isinstance(r, wire.ReattachRequest)
    # A new epoch, but the version we already hold: the gateway counted no transition.
    ack = wire.ReattachAck(gw.sid, r.nonce, c.version, c.epoch + 1, os.urandom(16), NODE, 1)
    c.receive(control.seal(ack, gw.keys.control_key), 2, t + 0.01)
    assert c.state is SessionState.RECOVERING and c.version == 1
    assert c.drops.get(DropReason.STALE_EPOCH) == 1


def test_a_stale_version_that_goes_backwards_is_not_adopted() -> None:
    c, gw = connected()
    t = lose(c)
    c.reattach(t, 2, wire.TransportKind.UDP)
    [(_, req)] = c.datagrams_to_send()
    gw.record.version = 0  # older than ours: a rolled-back store or a replay; never retry on it
    c.receive(reject(gw, req, t), 2, t + 0.01)
    [rej] = [e for e in events(c) if isinstance(e, ReattachRejected)]
    assert rej.action is ReattachAction.BACKOFF and c.version == 1
    assert c.datagrams_to_send() == []


def test_a_refused_jump_stays_on_the_current_path() -> None:
    c, gw = connected()
    c.reattach(0.1, 2, wire.TransportKind.UDP, reason="jump")
    [(_, req)] = c.datagrams_to_send()
    gw.store.force = (StoreStatus.RATE_LIMITED, RejectReason.RATE_LIMITED)
    c.receive(reject(gw, req, 0.1), 2, 0.11)
    [rej] = [e for e in events(c) if isinstance(e, ReattachRejected)]
    assert rej.action is ReattachAction.STAY
    assert c.state is SessionState.ATTACHED and c.path == 1 and c.get_timer() is not None
    assert c.send(b"still here", 0.12)
    assert [p for p, _ in c.datagrams_to_send()] == [1]


def test_authenticated_refusals_end_the_agent_after_a_bounded_backoff() -> None:
    """A key the registry does not hold gets an authenticated UNKNOWN_CLIENT: the machine
    retries with a growing delay, then, after ``refusals_final`` in a row, gives up for good
    with advice; a connect() after that is local misuse."""
    from session.client import HandshakeFailed, RefusedForGood
    from session.errors import LocalProtocolError

    stranger, _ = generate_keypair()
    params = ClientParams(upstream=UPSTREAM, backoff_initial=0.1, backoff_max=5.0, refusals_final=4)
    c = ClientSession(stranger, GW_PUB, params)
    gw = gateway()
    delays: list[float] = []
    now = 0.0
    for attempt in range(1, 5):
        c.connect(now, WALL_MS + int(now * 1000), path=attempt, kind=wire.TransportKind.UDP)
        [(_, init)] = c.datagrams_to_send()
        [answer] = gw.answer(init, HOME, now)
        c.receive(answer, attempt, now + 0.01)
        evs = events(c)
        [failed] = [e for e in evs if isinstance(e, HandshakeFailed)]
        assert failed.reason is RejectReason.UNKNOWN_CLIENT and failed.authenticated
        refused = [e for e in evs if isinstance(e, RefusedForGood)]
        if attempt < 4:
            assert not refused and c.refused is None
            delays.append(failed.retry_in)
            now += failed.retry_in + 0.01
        else:
            assert refused == [c.refused] and refused[0].attempts == 4
            assert "jvpn clients add" in refused[0].advice
    assert delays == [0.1, 0.2, 0.4]
    with pytest.raises(LocalProtocolError):
        c.connect(now, WALL_MS, path=9, kind=wire.TransportKind.UDP)


def test_unauthenticated_refusals_and_timeouts_only_feed_the_backoff() -> None:
    """An unauthenticated REJECT of a handshake (anyone can send one) neither fails nor ends
    anything: it delays the retransmission. A timeout between authenticated refusals resets
    their count, so only refusals in a row end the agent."""
    from session.client import HandshakeFailed, RefusedForGood

    stranger, _ = generate_keypair()
    c = ClientSession(stranger, GW_PUB, ClientParams(upstream=UPSTREAM, refusals_final=2))
    gw = gateway()
    now = 0.0
    c.connect(now, WALL_MS, path=1, kind=wire.TransportKind.UDP)
    [(_, init)] = c.datagrams_to_send()
    hid = wire.decode(init).handshake_id  # type: ignore[union-attr]
    for _ in range(50):
        c.receive(wire.encode(wire.Reject(hid, bytes(wire.NONCE_LEN), RejectReason.UNKNOWN_CLIENT,
                                          0, 0)), 1, now)
    assert not events(c) and c.refused is None
    [answer] = gw.answer(init, HOME, now)  # one authenticated refusal
    c.receive(answer, 1, now)
    assert [type(e) for e in events(c)] == [HandshakeFailed]
    c.connect(now, WALL_MS, path=2, kind=wire.TransportKind.UDP)  # then silence: a timeout
    c.datagrams_to_send()
    for _ in range(10):
        t = c.get_timer()
        if t is None:
            break
        c.handle_timer(t)
    [timeout] = [e for e in events(c) if isinstance(e, HandshakeFailed)]
    assert timeout.reason is None and not timeout.authenticated and timeout.retry_in > 0
    c.datagrams_to_send()  # the retransmissions
    c.connect(now, WALL_MS, path=3, kind=wire.TransportKind.UDP)  # one more refusal: not yet 2 in a row
    [(_, init)] = c.datagrams_to_send()
    [answer] = gw.answer(init, HOME, now)
    c.receive(answer, 3, now)
    assert not any(isinstance(e, RefusedForGood) for e in events(c)) and c.refused is None
