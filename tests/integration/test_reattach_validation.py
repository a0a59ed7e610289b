"""Every validation of the reattach flow, through the gateway's real UDP/TCP sockets.

Each test sends hand-built REATTACH_REQUESTs (tests/support/rawclient.py) to a
real gateway on loopback backed by a real redis-server, and checks the answer
on the wire: the REJECT reason, and whether it is authenticated. The rule
(docs/ARCHITECTURE.md, Security rules): a REJECT about an established session carries a valid
MAC under ``SessionKeys.control_key``. Three cannot: UNKNOWN_SESSION (there is
no key), STORE_UNAVAILABLE before the key could be loaded, and BAD_PROOF: its
requester proved nothing, and a MAC'd answer to an unproven request would be
a MAC oracle over nonces of the attacker's choice (the client treats every
unauthenticated REJECT as "back off", so the answer can hurt no session).

Where each RejectReason the gateway produces is reached (see
``test_every_reject_reason_is_reached``):

    UNKNOWN_SESSION       test_unknown_session
    EXPIRED               test_ttl_expired_noticed_by_reattach, test_ttl_expired_noticed_by_sweeper
    TERMINATED            test_terminated
    BAD_PROOF             test_bad_proof_wrong_mac, test_bad_proof_tampered_field
    REPLAYED_NONCE        test_replayed_nonce_other_address_vs_idempotent_retry
    STALE_VERSION         test_stale_version
    DUAL_ACTIVE_CONFLICT  test_dual_active_conflict
    POLICY_DENIED         test_policy_denied_transport, test_handshake_refusals
    RATE_LIMITED          test_rate_limited
    CLOCK_SKEW            test_clock_skew, test_handshake_refusals
    UNKNOWN_CLIENT        test_handshake_refusals
    OVERLOADED            test_handshake_refusals
    STORE_UNAVAILABLE     test_store_outage.py::test_gateway_fails_closed_during_store_outage_and_recovers,
                          test_store_outage.py::test_paused_store_never_hangs_a_reattach_and_the_outcome_is_reread
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from session import wire
from session.handshake import Refusal, ServerHello
from session.keys import SessionKeys
from session.noise import generate_keypair
from session.reasons import RejectReason, TerminateReason
from session.states import SessionState
from tests.support.harness import Gateway, echo_upstream, start_gateway, wait_for
from tests.support.rawclient import Endpoint, RawSession, Received, scrape, value

UDP, TCP = wire.TransportKind.UDP, wire.TransportKind.TCP
ROOT = Path(__file__).resolve().parents[2]
SKEW_MS = 10 * 60 * 1000  # far outside any reattach window


@dataclass
class Env:
    """A gateway, an echo upstream, and every endpoint a test opened."""

    gw: Gateway
    upstream: str
    extra: list[Gateway] = field(default_factory=list)
    endpoints: list[Endpoint] = field(default_factory=list)
    kind: wire.TransportKind = UDP  # the transport of endpoints a test does not name

    async def ep(self, kind: wire.TransportKind | None = None,
                 gw: Gateway | None = None) -> Endpoint:
        g = gw or self.gw
        e = await Endpoint.open(kind or self.kind, g.udp, g.tcp, g.node.quic_address)
        self.endpoints.append(e)
        return e

    async def session(self, kind: wire.TransportKind | None = None,
                      **policy: object) -> RawSession:
        """Register a client with ``policy``, handshake on a fresh endpoint, validate it."""
        priv, _ = await self.gw.add_client(self.upstream, **policy)
        s = RawSession(priv, self.gw.app.keys.public, self.upstream)
        await s.connect(await self.ep(kind))
        return s

    async def peer_gateway(self, **overrides: object) -> Gateway:
        """Another node of the same cluster (same store and keys, a cold secret cache)."""
        g = await start_gateway(self.gw.app.cfg.store_url, node_id="gw-peer", **overrides)
        self.extra.append(g)
        return g


Factory = Callable[..., Awaitable[Env]]


@pytest.fixture
async def make_env(redis_url: str, request: pytest.FixtureRequest) -> AsyncIterator[Factory]:
    made: list[tuple[Env, object]] = []
    # A module that reuses these tests over another transport names it (test_quic_validation).
    kind = getattr(request.module, "TRANSPORT", UDP)

    async def make(**overrides: object) -> Env:
        # No silence-driven TRANSPORT_LOST unless a test asks: versions move only
        # when the test moves them.
        overrides.setdefault("silence_keepalives", 1000)
        gw = await start_gateway(redis_url, **overrides)
        echo, upstream = await echo_upstream()
        env = Env(gw, upstream, kind=kind)
        made.append((env, echo))
        return env

    try:
        yield make
    finally:
        for env, echo in made:
            for e in env.endpoints:
                e.close()
            for g in [*env.extra, env.gw]:
                await g.app.stop()
            echo.close()  # type: ignore[attr-defined]


@pytest.fixture
async def env(make_env: Factory) -> Env:
    return await make_env()


# ---- assertions ---------------------------------------------------------------------------


def assert_reject(s: RawSession, got: Received, reason: RejectReason, *, authenticated: bool,
                  version: int | None = None) -> wire.Reject:
    msg = got.msg
    assert isinstance(msg, wire.Reject), f"expected REJECT {reason.name}, got {msg}"
    assert msg.reason is reason, f"expected {reason.name}, got {msg.reason.name}"
    assert msg.session_id == s.session_id
    if authenticated:
        assert msg.authenticated and s.authentic(got), f"{reason.name} must carry a valid MAC"
        if version is not None:
            assert msg.version == version
    else:
        assert msg.mac == bytes(wire.MAC_LEN), f"{reason.name} must not be MAC'd"
        assert msg.version == 0, "an unauthenticated REJECT reveals no version"
    return msg


def assert_ack(s: RawSession, got: Received) -> wire.ReattachAck:
    msg = got.msg
    assert isinstance(msg, wire.ReattachAck), f"expected REATTACH_ACK, got {msg}"
    assert s.authentic(got), "REATTACH_ACK must carry a valid MAC"
    return msg


async def record(gw: Gateway, s: RawSession) -> tuple[int, int, bytes, str, SessionState]:
    rec = await gw.store.get(s.session_id)
    assert rec is not None
    return rec.version, rec.epoch, rec.binding_id, rec.node, rec.state


def events_for(gw: Gateway, action: str, s: RawSession) -> list[dict]:  # type: ignore[type-arg]
    return [f for f in gw.actions(action) if f.get("jvpn.session_id") == s.session_id.hex()]


def bound_peer(gw: Gateway, s: RawSession) -> tuple[str, int]:
    b = gw.node.bindings.get(s.session_id)
    assert b is not None, "the gateway holds no binding for the session"
    return b.peer.addr


# ---- the validations ----------------------------------------------------------------------


async def test_unknown_session(env: Env) -> None:
    s = RawSession(os.urandom(32), env.gw.app.keys.public, env.upstream)
    s.session_id, s.keys = os.urandom(wire.SESSION_ID_LEN), SessionKeys(os.urandom(32))
    s.version = 1
    ep = await env.ep()
    raw, req = s.request()
    got = await s.send_request(ep, raw, req)
    assert_reject(s, got, RejectReason.UNKNOWN_SESSION, authenticated=False)
    m = await scrape(env.gw.app.admin_port)  # type: ignore[arg-type]
    assert value(m, "jvpn_reattach_total", outcome="rejected", reason="UNKNOWN_SESSION") == 1


async def _wait_deadline_passed(gw: Gateway, s: RawSession, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        rec = await gw.store.get(s.session_id)
        assert rec is not None
        if rec.terminated or rec.server_ms >= rec.deadline_ms:
            return
        assert time.monotonic() < deadline, "the session's deadline never passed"
        await asyncio.sleep(0.05)


async def _assert_expired_tombstone(env: Env, s: RawSession) -> int:
    rec = await env.gw.store.get(s.session_id)
    assert rec is not None, "an expired session must leave a tombstone, not vanish"
    assert rec.state is SessionState.TERMINATED
    assert rec.terminate_reason is TerminateReason.EXPIRED
    assert rec.terminated_ms is not None
    ends = [e for e in events_for(env.gw, "state_change", s) if e["jvpn.to_state"] == "TERMINATED"]
    assert len(ends) == 1, f"exactly one STATE_CHANGE to TERMINATED, got {ends}"
    assert ends[0]["event.reason"] == "EXPIRED"
    assert ends[0]["jvpn.state_version"] == rec.version
    assert s.session_id not in env.gw.node.bindings
    # Later requests, on this node and on a node with a cold cache: an explicit,
    # authenticated EXPIRED, never UNKNOWN_SESSION.
    peer = await env.peer_gateway()
    for g in (env.gw, peer):
        got = await s.send_request(*_req_on(await env.ep(gw=g), s))
        assert_reject(s, got, RejectReason.EXPIRED, authenticated=True, version=rec.version)
    ends = [e for e in events_for(env.gw, "state_change", s) if e["jvpn.to_state"] == "TERMINATED"]
    assert len(ends) == 1, "a late request must not emit a second TERMINATED"
    return rec.version


def _req_on(ep: Endpoint, s: RawSession, **fields: object) -> tuple[Endpoint, bytes,
                                                                     wire.ReattachRequest]:
    fields.setdefault("kind", ep.kind)
    raw, req = s.request(**fields)  # type: ignore[arg-type]
    return ep, raw, req


async def test_ttl_expired_noticed_by_reattach(make_env: Factory) -> None:
    # No sweeper: the reattach script is the first to see the lapsed deadline.
    env = await make_env(sweep_interval_s=3600, silence_keepalives=3)
    s = await env.session(ttl_s=0.5)
    # The client goes silent: the binding is marked lost, refreshes stop, the TTL lapses.
    await _wait_deadline_passed(env.gw, s)
    got = await s.send_request(*_req_on(await env.ep(), s))
    rej = assert_reject(s, got, RejectReason.EXPIRED, authenticated=True)
    assert await _assert_expired_tombstone(env, s) == rej.version


async def test_ttl_expired_noticed_by_sweeper(make_env: Factory) -> None:
    env = await make_env(sweep_interval_s=0.1, silence_keepalives=3)
    s = await env.session(ttl_s=0.5)
    await wait_for(lambda: any(e["jvpn.to_state"] == "TERMINATED"
                               for e in events_for(env.gw, "state_change", s)),
                   5, "the sweeper's STATE_CHANGE to TERMINATED")
    await _assert_expired_tombstone(env, s)


async def test_bad_proof_wrong_mac(env: Env) -> None:
    s = await env.session()
    before = await record(env.gw, s)
    ep = await env.ep()
    # A random key, and the gateway's own control key (a reflected gateway MAC is no proof).
    for key in (os.urandom(32), s.keys.control_key):  # type: ignore[union-attr]
        got = await s.send_request(*_req_on(ep, s, key=key))
        assert_reject(s, got, RejectReason.BAD_PROOF, authenticated=False)
    raw, req = s.request()
    zero_mac = raw[:-wire.MAC_LEN] + bytes(wire.MAC_LEN)
    got = await s.send_request(ep, zero_mac, req)
    assert_reject(s, got, RejectReason.BAD_PROOF, authenticated=False)

    # Three in a second from one address: all counted, one event (aggregated per source).
    alerts = events_for(env.gw, "security_event", s)
    assert len(alerts) == 1 and alerts[0]["jvpn.security_kind"] == "bad_proof"
    assert alerts[0]["event.kind"] == "alert"
    assert env.gw.app.metrics._security.labels("bad_proof")._value.get() == 3
    assert await record(env.gw, s) == before
    assert bound_peer(env.gw, s) == s.endpoint.local  # type: ignore[union-attr]


# Byte ranges of the REATTACH_REQUEST fields after the 20-byte header.
FIELDS = {"expected_version": (20, 28), "nonce": (28, 44), "timestamp": (44, 52),
          "kind": (52, 53), "mac": (53, 85)}


async def test_bad_proof_tampered_field(env: Env) -> None:
    s = await env.session()
    before = await record(env.gw, s)
    ep = await env.ep()
    raw, req = s.request()
    assert len(raw) == wire.REATTACH_REQUEST_LEN
    for name, (lo, hi) in FIELDS.items():
        tampered = bytearray(raw)
        if name == "kind":
            tampered[lo] = int(TCP)  # still a valid kind: only the MAC can tell
        else:
            tampered[hi - 1] ^= 0x01
        msg = wire.decode(bytes(tampered))
        assert isinstance(msg, wire.ReattachRequest)
        ep.send(bytes(tampered))
        got = await s.answer(ep, msg.nonce)
        assert_reject(s, got, RejectReason.BAD_PROOF, authenticated=False)
    assert await record(env.gw, s) == before
    # None of that consumed the genuine request's nonce or its rate budget.
    got = await s.send_request(ep, raw, req)
    ack = assert_ack(s, got)
    assert (ack.version, ack.epoch) == (before[0] + 1, before[1] + 1)


async def test_replayed_nonce_other_address_vs_idempotent_retry(env: Env) -> None:
    s = await env.session()
    old_ep = s.endpoint
    assert old_ep is not None
    ep2, attacker = await env.ep(), await env.ep()
    raw, req = s.request()
    first = await s.send_request(ep2, raw, req)
    ack1 = assert_ack(s, first)
    s.install(first, ep2)
    await s.keepalive(ep2)
    after = await record(env.gw, s)
    assert after[:4] == (ack1.version, ack1.epoch, ack1.binding_id, env.gw.node.machine.instance_id)

    # The same bytes from other addresses (an attacker, the old path): REPLAYED_NONCE.
    for other in (attacker, old_ep):
        got = await s.send_request(other, raw, req)
        assert_reject(s, got, RejectReason.REPLAYED_NONCE, authenticated=True,
                      version=ack1.version)
        assert bound_peer(env.gw, s) == ep2.local, "a replay must not move the binding"
        assert await record(env.gw, s) == after
    alerts = [a for a in events_for(env.gw, "security_event", s)
              if a["jvpn.security_kind"] == "replayed_nonce"]
    assert len(alerts) == 1  # both from 127.0.0.1 within a second: one event, both counted
    assert env.gw.app.metrics._security.labels("replayed_nonce")._value.get() == 2

    # The same bytes from the same address: a retransmission, answered with the same
    # ACK (only the clock reading differs), and nothing changes twice.
    binding = env.gw.node.bindings[s.session_id]
    again = await s.send_request(ep2, raw, req)
    ack2 = assert_ack(s, again)
    same = ("session_id", "nonce", "version", "epoch", "binding_id", "node_id")
    assert [getattr(ack2, f) for f in same] == [getattr(ack1, f) for f in same]
    assert ack2.server_ms >= ack1.server_ms
    assert await record(env.gw, s) == after
    assert env.gw.node.bindings[s.session_id] is binding
    m = await scrape(env.gw.app.admin_port)  # type: ignore[arg-type]
    assert value(m, "jvpn_reattach_total", outcome="retry") == 1
    assert value(m, "jvpn_reattach_total", outcome="ok") == 1
    # The binding still carries traffic on ep2.
    ep2.send(s.payload_packet(b"still here"))
    assert await s.wait_payloads(ep2, 1) == [b"still here"]


async def test_stale_version(make_env: Factory) -> None:
    env = await make_env(dual_active_window_s=0.2)
    s = await env.session()
    v1 = s.version
    assert_ack(s, await s.reattach(await env.ep()))
    v2 = s.version
    await asyncio.sleep(0.3)  # past the dual-active window: an old version is just stale
    before = await record(env.gw, s)
    ep = await env.ep()
    for stale in (v1, v2 + 5, 0):
        got = await s.send_request(*_req_on(ep, s, version=stale))
        assert_reject(s, got, RejectReason.STALE_VERSION, authenticated=True, version=v2)
    assert await record(env.gw, s) == before
    # The authenticated answer told the client the current version: retrying with it works.
    got = await s.reattach(ep, version=v2)
    assert assert_ack(s, got).version == v2 + 1


async def test_dual_active_conflict(env: Env) -> None:
    s = await env.session()
    a, b = await env.ep(), await env.ep()
    raw_a, req_a = s.request()
    raw_b, req_b = s.request()
    assert req_a.expected_version == req_b.expected_version and req_a.nonce != req_b.nonce
    a.send(raw_a)
    b.send(raw_b)  # back to back: two claimants for one version
    got_a, got_b = await s.answer(a, req_a.nonce), await s.answer(b, req_b.nonce)
    acks = [(g, e) for g, e in ((got_a, a), (got_b, b)) if isinstance(g.msg, wire.ReattachAck)]
    assert len(acks) == 1, f"exactly one claimant wins: {got_a.msg} / {got_b.msg}"
    (won, winner) = acks[0]
    lost = got_b if won is got_a else got_a
    ack = assert_ack(s, won)
    assert_reject(s, lost, RejectReason.DUAL_ACTIVE_CONFLICT, authenticated=True,
                  version=ack.version)
    s.install(won, winner)
    await s.keepalive(winner)  # validates the winner's PENDING binding: now ACTIVE
    rec = await record(env.gw, s)
    assert rec[:3] == (ack.version, ack.epoch, ack.binding_id)
    assert bound_peer(env.gw, s) == winner.local
    alerts = [e for e in events_for(env.gw, "security_event", s)
              if e["jvpn.security_kind"] == "dual_active_conflict"]
    assert len(alerts) == 1 and alerts[0]["event.kind"] == "alert"
    assert alerts[0]["event.reason"] == "DUAL_ACTIVE_CONFLICT"
    m = await scrape(env.gw.app.admin_port)  # type: ignore[arg-type]
    assert value(m, "jvpn_security_events_total", kind="dual_active_conflict") == 1


async def test_clock_skew(env: Env) -> None:
    s = await env.session()
    before = await record(env.gw, s)
    ep = await env.ep()
    for skew in (-SKEW_MS, SKEW_MS):
        got = await s.send_request(*_req_on(ep, s, timestamp_ms=s.server_ms() + skew))
        assert_reject(s, got, RejectReason.CLOCK_SKEW, authenticated=True)
    assert await record(env.gw, s) == before
    assert_ack(s, await s.reattach(ep))


async def test_policy_denied_transport(env: Env) -> None:
    s = await env.session(transports=("udp",))
    before = await record(env.gw, s)
    tcp, udp = await env.ep(TCP), await env.ep(UDP)
    # TCP is not in the client's policy.
    got = await s.send_request(*_req_on(tcp, s))
    assert_reject(s, got, RejectReason.POLICY_DENIED, authenticated=True)
    # The proof names a transport other than the one it arrived on.
    for ep, claimed in ((tcp, UDP), (udp, TCP)):
        got = await s.send_request(*_req_on(ep, s, kind=claimed))
        assert_reject(s, got, RejectReason.POLICY_DENIED, authenticated=True)
    assert await record(env.gw, s) == before
    assert not tcp.eof.is_set(), "a refused request does not close the connection"
    assert_ack(s, await s.reattach(udp))


async def test_rate_limited(env: Env) -> None:
    s = await env.session(reattach_rate=2)
    ep1, ep2, ep3 = await env.ep(), await env.ep(), await env.ep()
    raw1, req1 = s.request()
    first = await s.send_request(ep1, raw1, req1)
    s.install(first, ep1)
    assert_ack(s, await s.reattach(ep2))
    before = await record(env.gw, s)
    got = await s.send_request(*_req_on(ep3, s))
    assert_reject(s, got, RejectReason.RATE_LIMITED, authenticated=True, version=before[0])
    assert await record(env.gw, s) == before
    # A retransmission is not a new attempt: it still gets its recorded answer.
    again = await s.send_request(ep1, raw1, req1)
    assert assert_ack(s, again).binding_id == assert_ack(s, first).binding_id


async def test_terminated(env: Env) -> None:
    s = await env.session()
    res = await env.gw.store.terminate(s.session_id)
    assert res.ok and not res.already
    rec = await env.gw.store.get(s.session_id)
    assert rec is not None and rec.terminate_reason is TerminateReason.ADMIN
    peer = await env.peer_gateway()
    for g in (env.gw, peer, env.gw):
        got = await s.send_request(*_req_on(await env.ep(gw=g), s))
        assert_reject(s, got, RejectReason.TERMINATED, authenticated=True, version=rec.version)
    assert (await env.gw.store.get(s.session_id)).version == rec.version  # type: ignore[union-attr]


async def test_handshake_refusals(make_env: Factory) -> None:
    env = await make_env(max_sessions=1)
    gw = env.gw
    stranger, _ = generate_keypair()  # not in the registry
    s = RawSession(stranger, gw.app.keys.public, env.upstream)
    assert _refusal(await s.handshake(await env.ep())) is RejectReason.UNKNOWN_CLIENT

    priv, _ = await gw.add_client(env.upstream, transports=("udp",))
    s = RawSession(priv, gw.app.keys.public, env.upstream)
    skewed = int(time.time() * 1000) - SKEW_MS
    assert _refusal(await s.handshake(await env.ep(), wall_ms=skewed)) is RejectReason.CLOCK_SKEW
    refused = await s.handshake(await env.ep(), upstream="127.0.0.1:9")
    assert _refusal(refused) is RejectReason.POLICY_DENIED
    assert _refusal(await s.handshake(await env.ep(TCP))) is RejectReason.POLICY_DENIED
    assert isinstance(await s.handshake(await env.ep()), ServerHello)
    s2 = RawSession(priv, gw.app.keys.public, env.upstream)
    assert _refusal(await s2.handshake(await env.ep())) is RejectReason.OVERLOADED


def _refusal(answer: ServerHello | Refusal) -> RejectReason:
    assert isinstance(answer, Refusal), f"expected a refusal, got {answer}"
    return answer.reason


# ---- captured requests, amplification --------------------------------------------------------


async def test_replayed_request_from_another_address_never_gets_traffic(env: Env) -> None:
    """Whatever the order, an attacker replaying a captured request gets no session data."""
    s = await env.session()
    attacker = await env.ep()

    # 1. The replay arrives after the genuine request: refused, traffic stays put.
    ep2 = await env.ep()
    raw, req = s.request()
    s.install(await s.send_request(ep2, raw, req), ep2)
    await s.keepalive(ep2)
    attacker.send(raw)
    for i in range(20):
        ep2.send(s.payload_packet(b"a%d" % i))
        attacker.send(raw)
    assert len(await s.wait_payloads(ep2, 20)) == 20
    assert bound_peer(env.gw, s) == ep2.local

    # 2. The attacker's copy wins the race (the genuine one is held back): it gets an
    # ACK, but only for a PENDING binding at its address, which it cannot validate
    # (it cannot prove the new keys). The working binding stays ACTIVE and forwards.
    ep3 = await env.ep()
    raw, req = s.request()
    attacker.send(raw)
    stolen = await s.answer(attacker, req.nonce)
    ack = assert_ack(s, stolen)
    pending = env.gw.node.machine.pending[s.session_id]
    assert pending.peer.addr == attacker.local and not pending.validated
    assert bound_peer(env.gw, s) == ep2.local
    for i in range(5):
        ep2.send(s.payload_packet(b"still%d" % i))
    assert len(await s.wait_payloads(ep2, 25)) == 25
    # The victim moves to a new path: its own copy is now a replay, whose authenticated
    # answer carries the current version; a fresh request with it wins.
    got = await s.send_request(ep3, raw, req)
    assert_reject(s, got, RejectReason.REPLAYED_NONCE, authenticated=True, version=ack.version)
    got = await s.reattach(ep3, validate=False)
    rej = got.msg
    assert isinstance(rej, wire.Reject) and s.authentic(got)
    assert rej.reason in (RejectReason.DUAL_ACTIVE_CONFLICT, RejectReason.STALE_VERSION)
    assert_ack(s, await s.reattach(ep3, version=rej.version))
    for i in range(20):
        ep3.send(s.payload_packet(b"b%d" % i))
        attacker.send(raw)
    assert len(await s.wait_payloads(ep3, 45)) == 45
    assert bound_peer(env.gw, s) == ep3.local
    await asyncio.sleep(0.2)  # anything late would arrive now

    kinds = [type(m).__name__ for m in attacker.decoded()]
    assert "Data" not in kinds, f"session traffic reached the attacker: {kinds}"
    assert set(kinds) <= {"ReattachAck", "Reject"}
    # Its retransmissions of "its" request get the recorded ACK again (idempotent),
    # which names a binding the session has long left.
    acks = [m for m in attacker.decoded() if isinstance(m, wire.ReattachAck)]
    assert acks and all((m.nonce, m.epoch, m.binding_id) == (req.nonce, ack.epoch, ack.binding_id)
                        for m in acks)
    assert attacker.rx_bytes <= 3 * attacker.tx_bytes


async def test_anti_amplification_to_unvalidated_address(env: Env) -> None:
    """Whatever an unvalidated address sends, it gets at most 3x those bytes back."""
    s = await env.session()
    ep2 = await env.ep()
    captured_data = [s.keepalive_packet(seq) for seq in range(5)]
    for pkt in captured_data:
        s.endpoint.send(pkt)  # type: ignore[union-attr]
    raw, req = s.request()
    s.install(await s.send_request(ep2, raw, req), ep2)  # epoch 2: the captures are stale now
    stranger, _ = generate_keypair()
    probe = RawSession(stranger, env.gw.app.keys.public, env.upstream)

    attackers = [await env.ep() for _ in range(4)]
    for i, a in enumerate(attackers):
        for _ in range(10):
            a.send(raw)  # a replayed request: an authenticated REJECT each
            a.send(s.request(key=os.urandom(32))[0])  # a forged proof: BAD_PROOF each
        for pkt in captured_data:
            a.send(pkt)  # stale-epoch DATA: at most one NOT_BOUND_HERE notice
        a.send(s.handshake_init)  # a replayed handshake: dropped, no answer
        try:
            await probe.handshake(a, timeout=1.0)  # unknown client: one refusal
        except AssertionError:
            pass
        a.send(os.urandom(200))
        a.send(b"\x01" * (wire.HEADER_LEN + i))
    await asyncio.sleep(0.3)
    for a in attackers:
        assert a.rx_bytes > 0, "the gateway answered nothing at all (the test proves nothing)"
        assert a.rx_bytes <= 3 * a.tx_bytes, (
            f"{a.describe()}: received {a.rx_bytes} bytes for {a.tx_bytes} sent")
        assert not any(isinstance(m, wire.Data) for m in a.decoded())


# ---- coverage of the reason codes -----------------------------------------------------------


def test_every_reject_reason_is_reached() -> None:
    """Each RejectReason the gateway or the store scripts can produce has a test above."""
    sources = [ROOT / "gateway" / "node.py", *sorted((ROOT / "store" / "lua").glob("*.lua"))]
    produced: set[str] = set()
    for path in sources:
        text = path.read_text()
        pattern = r"RejectReason\.([A-Z_]+)" if path.suffix == ".py" else r"\bR\.([A-Z_]+)"
        produced |= set(re.findall(pattern, text))
    doc = __doc__ or ""
    table: dict[str, str] = {}
    last = ""
    for line in doc.splitlines():
        if m := re.match(r"^    ([A-Z_]+)\s+(.+)$", line):
            last = m.group(1)
            table[last] = m.group(2)
        elif last and re.match(r"^ {5,}test", line):
            table[last] += " " + line.strip()  # a continuation line
        else:
            last = ""
    assert produced <= set(RejectReason.__members__), produced
    missing = produced - set(table)
    assert not missing, f"reasons with no test: {sorted(missing)}"
    names = set(globals())
    for reason, tests in table.items():
        for t in re.findall(r"(?:([\w.]+)::)?(test_\w+)", tests):
            module, name = t
            if not module:
                assert name in names, f"{reason}: no test named {name}"
            else:
                text = (ROOT / "tests" / "integration" / module).read_text()
                assert f"def {name}(" in text, f"{reason}: {module} has no {name}"


# ---- the two store paths agree ------------------------------------------------------------


@pytest.mark.parametrize("path", ["queued", "task", "resumed"])
async def test_queued_task_and_resumed_paths_give_the_same_answers(
        make_env: Factory, monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """The gateway answers a reattach of a cached session with the reply decoded in the
    batch that read it (no task: "queued"); a store that cannot queue sends it down the
    coroutine path ("task"); a queued call whose reply needs more (an error, an unknown
    outcome, a moved generation) is finished by the coroutine path ("resumed"). All three
    must give the same answers: forced here one at a time through the same validations."""
    env = await make_env(dual_active_window_s=0.2)
    store = env.gw.node.store
    if path == "task":
        monkeypatch.setattr(store, "_queue_ready", lambda: False)
    elif path == "resumed":
        monkeypatch.setattr(store, "_reattach_reply", lambda reply: None)
    s = await env.session()
    before = dict(env.gw.store.reattach_paths)

    # success, then the same bytes: from the same address a retry, from another a replay
    ep = await env.ep()
    raw, req = s.request()
    first = await s.send_request(ep, raw, req)
    ack = assert_ack(s, first)
    s.install(first, ep)
    assert_ack(s, await s.send_request(ep, raw, req))
    assert_reject(s, await s.send_request(await env.ep(), raw, req),
                  RejectReason.REPLAYED_NONCE, authenticated=True, version=ack.version)
    # two claimants for one version: exactly one wins
    a, b = await env.ep(), await env.ep()
    raw_a, req_a = s.request()
    raw_b, req_b = s.request()
    a.send(raw_a)
    b.send(raw_b)
    got = [await s.answer(a, req_a.nonce), await s.answer(b, req_b.nonce)]
    kinds = sorted(type(g.msg).__name__ for g in got)
    assert kinds == ["ReattachAck", "Reject"], [g.msg for g in got]
    won = next(g for g in got if isinstance(g.msg, wire.ReattachAck))
    lost = next(g for g in got if isinstance(g.msg, wire.Reject))
    assert_reject(s, lost, RejectReason.DUAL_ACTIVE_CONFLICT, authenticated=True,
                  version=won.msg.version)
    s.install(won, a if won is got[0] else b)
    await s.keepalive()  # validates the winner's PENDING binding: now ACTIVE
    await asyncio.sleep(0.3)  # past the dual-active window: an old version is just stale
    assert_reject(s, await s.send_request(*_req_on(await env.ep(), s, version=ack.version)),
                  RejectReason.STALE_VERSION, authenticated=True, version=s.version)
    assert (await record(env.gw, s))[:3] == (s.version, s.epoch, s.binding_id)

    used = {k: v - before[k] for k, v in env.gw.store.reattach_paths.items()}
    assert used[path] == 6 and sum(used.values()) == 6 + (path == "resumed") * 6, used


async def test_a_new_store_generation_voids_a_cached_session(env: Env) -> None:
    """After a restored backup the operator starts a new store generation
    (``SessionStore.new_generation``; other gateways follow within generation_check_s):
    a session this gateway still caches is UNKNOWN_SESSION at once. The queued CAS
    answers "a record of another generation", and the resumed path confirms ours moved."""
    s = await env.session()
    assert_ack(s, await s.reattach(await env.ep()))
    await env.gw.node.store.new_generation()
    resumed = env.gw.store.reattach_paths["resumed"]
    got = await s.send_request(*_req_on(await env.ep(), s))
    # authenticated: the gateway still held the session's keys when the store said so
    assert_reject(s, got, RejectReason.UNKNOWN_SESSION, authenticated=True)
    assert env.gw.store.reattach_paths["resumed"] == resumed + 1


async def test_the_same_clients_superseded_attempt_is_stale_not_a_conflict(env: Env) -> None:
    """Two requests for one version with one claim id (the nonce's first 8 bytes: one
    client's first attempt and the one it made when that went unanswered): the loser is
    STALE_VERSION with the current version, no DUAL_ACTIVE_CONFLICT and no alert."""
    s = await env.session()
    a, b = await env.ep(), await env.ep()
    claim = os.urandom(8)
    raw_a, req_a = s.request(nonce=claim + os.urandom(8))
    raw_b, req_b = s.request(nonce=claim + os.urandom(8))
    a.send(raw_a)
    b.send(raw_b)
    got_a, got_b = await s.answer(a, req_a.nonce), await s.answer(b, req_b.nonce)
    acks = [g for g in (got_a, got_b) if isinstance(g.msg, wire.ReattachAck)]
    assert len(acks) == 1
    lost = got_b if acks[0] is got_a else got_a
    ack = assert_ack(s, acks[0])
    assert_reject(s, lost, RejectReason.STALE_VERSION, authenticated=True, version=ack.version)
    assert not events_for(env.gw, "security_event", s)
