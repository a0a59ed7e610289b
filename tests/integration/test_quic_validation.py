"""Every validation of the reattach flow again, with the session and its requests on QUIC.

The tests of test_reattach_validation.py run here unchanged except for the transport
(``TRANSPORT``: every endpoint a test does not name is a QUIC connection to the gateway's
QUIC listener, each one a new connection, so "another address" is another connection);
the transport-specific ones are written for QUIC below.
"""

from __future__ import annotations

from session import wire
from session.reasons import RejectReason
from tests.integration import test_reattach_validation as rv
from tests.integration.test_reattach_validation import (
    Env,
    _req_on,
    assert_ack,
    assert_reject,
    record,
)

# The fixtures and the transport-neutral tests, collected here again (over QUIC).
make_env, env = rv.make_env, rv.env
test_unknown_session = rv.test_unknown_session
test_bad_proof_wrong_mac = rv.test_bad_proof_wrong_mac
test_bad_proof_tampered_field = rv.test_bad_proof_tampered_field
test_replayed_nonce_other_address_vs_idempotent_retry = (
    rv.test_replayed_nonce_other_address_vs_idempotent_retry)
test_stale_version = rv.test_stale_version
test_dual_active_conflict = rv.test_dual_active_conflict
test_clock_skew = rv.test_clock_skew
test_rate_limited = rv.test_rate_limited
test_terminated = rv.test_terminated
test_replayed_request_from_another_address_never_gets_traffic = (
    rv.test_replayed_request_from_another_address_never_gets_traffic)
test_a_new_store_generation_voids_a_cached_session = (
    rv.test_a_new_store_generation_voids_a_cached_session)

TRANSPORT = wire.TransportKind.QUIC
UDP, TCP, QUIC = wire.TransportKind.UDP, wire.TransportKind.TCP, wire.TransportKind.QUIC


async def test_policy_denied_quic(env: Env) -> None:
    s = await env.session(UDP, transports=("udp", "tcp"))
    before = await record(env.gw, s)
    quic, udp, tcp = await env.ep(QUIC), await env.ep(UDP), await env.ep(TCP)
    # QUIC is not in the client's policy.
    got = await s.send_request(*_req_on(quic, s))
    assert_reject(s, got, RejectReason.POLICY_DENIED, authenticated=True)
    # The proof names a transport other than the one it arrived on.
    for ep, claimed in ((quic, UDP), (quic, TCP), (udp, QUIC), (tcp, QUIC)):
        got = await s.send_request(*_req_on(ep, s, kind=claimed))
        assert_reject(s, got, RejectReason.POLICY_DENIED, authenticated=True)
    assert await record(env.gw, s) == before
    assert not quic.eof.is_set(), "a refused request does not close the connection"
    assert_ack(s, await s.reattach(udp))


async def test_a_quic_session_jumps_to_udp_and_tcp_and_back(env: Env) -> None:
    s = await env.session()
    assert env.gw.node.bindings[s.session_id].peer.kind is QUIC
    for n, kind in enumerate((UDP, QUIC, TCP, QUIC), start=1):
        ep = await env.ep(kind)
        before = await record(env.gw, s)
        ack = assert_ack(s, await s.reattach(ep))
        assert (ack.version, ack.epoch) == (before[0] + 1, before[1] + 1)
        b = env.gw.node.bindings[s.session_id]
        assert b.peer.kind is kind and (await record(env.gw, s))[0] == ack.version
        ep.send(s.payload_packet(b"hello " + kind.name.encode()))
        got = await s.wait_payloads(ep, n)  # payloads of the session so far, in order
        assert got[-1] == b"hello " + kind.name.encode()
