"""A gateway whose redis-server goes away: fail closed and fast, keep the data path, recover.

The gateway runs on its own redis-server with persistence on (AOF, fsync
always), so the issue's "restart it; sessions still within TTL recover" is
something a restart can honour: EmbeddedRedis keeps its data directory across
stop/start. (Without persistence a restart empties the store, and every
session is then explicitly UNKNOWN_SESSION: see test_store_failures.py.)

The outage is kept shorter than the node lease (``lease_s``): within it,
established bindings keep forwarding because the data path never touches the
store. Past the lease the node stops forwarding (test_lease.py).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest

from session import wire
from session.handshake import ClientHello, Initiator
from session.keys import SessionKeys
from session.reasons import RejectReason
from session.states import SessionState
from tests.support.harness import FAST, Gateway, echo_upstream, start_gateway, wait_for
from tests.support.rawclient import Endpoint, RawSession, Received, readyz, scrape, until, value
from tests.support.redis_server import RedisServer

STORE_TIMEOUT_S = 0.3
# One store call is bounded by connect + socket timeout (+50 ms); a mutation whose outcome
# is unknown is re-run once (store/api.py); then the answer goes out. Plus loop slack.
ANSWER_BOUND_S = 2 * (2 * STORE_TIMEOUT_S + 0.05) + 0.5
LEASE_S = 30.0  # the outage below stays well inside it


@pytest.fixture
def durable_redis() -> Iterator[RedisServer]:
    """A dedicated redis-server that survives a restart with its data (AOF, fsync always)."""
    server = RedisServer(extra_args=("--appendonly", "yes", "--appendfsync", "always"))
    server.start()
    try:
        yield server
    finally:
        server.close()


@dataclass
class Setup:
    gw: Gateway
    upstream: str
    got: list[bytes]


@pytest.fixture
async def setup(durable_redis: RedisServer) -> AsyncIterator[Setup]:
    gw = await start_gateway(durable_redis.url, store_timeout_s=STORE_TIMEOUT_S, lease_s=LEASE_S)
    echo, upstream = await echo_upstream()
    try:
        yield Setup(gw, upstream, [])
    finally:
        await gw.app.stop()
        echo.close()


async def _timed_answer(s: RawSession, ep: Endpoint, **fields: object) -> tuple[Received, float]:
    raw, req = s.request(kind=ep.kind, **fields)  # type: ignore[arg-type]
    t0 = time.monotonic()
    got = await s.send_request(ep, raw, req, timeout=ANSWER_BOUND_S + 5)  # only a hang trips it
    return got, time.monotonic() - t0


async def _echoes(agent, got: list[bytes], tag: str, n: int = 20) -> None:  # type: ignore[no-untyped-def]
    # The first datagram alone: after a jump it activates the PENDING binding, which holds
    # at most MAX_HELD packets until the store has answered (the rest dropped, counted
    # NOT_VALIDATED); a burst sent before that answer could lose some on a busy machine.
    assert agent.send(f"{tag}-0".encode())
    await wait_for(lambda: f"{tag}-0".encode() in got, 5, f"the first echo '{tag}'")
    for i in range(1, n):
        assert agent.send(f"{tag}-{i}".encode())
    await wait_for(lambda: sum(g.startswith(tag.encode() + b"-") for g in got) >= n, 5,
                   f"{n} echoes '{tag}'")


async def test_gateway_fails_closed_during_store_outage_and_recovers(
    durable_redis: RedisServer, setup: Setup
) -> None:
    gw, upstream, got = setup.gw, setup.upstream, setup.got
    port = gw.app.admin_port
    assert port is not None
    priv, _ = await gw.add_client(upstream)
    agent = gw.agent(priv, upstream, FAST, transports=["udp"], on_payload=got.append)
    eps: list[Endpoint] = []
    try:
        await agent.start()
        await agent.wait_connected(5)
        sid = agent.machine.session_id
        await _echoes(agent, got, "before")
        s = RawSession(priv, gw.app.keys.public, upstream)  # a second session, driven by hand
        home = await Endpoint.udp(gw.udp)
        eps.append(home)
        await s.connect(home)
        assert (await readyz(port))[0] == 200

        # ---- the store goes away ----
        await asyncio.to_thread(durable_redis.stop)
        assert not durable_redis.running

        # A reattach gets an explicit REJECT STORE_UNAVAILABLE, fast, authenticated: the
        # session's key was cached, so the client can trust it (and just back off).
        ep2 = await Endpoint.udp(gw.udp)
        eps.append(ep2)
        timings = []
        for _ in range(3):
            got_answer, took = await _timed_answer(s, ep2)
            timings.append(took)
            rej = got_answer.msg
            assert isinstance(rej, wire.Reject) and rej.reason is RejectReason.STORE_UNAVAILABLE
            assert s.authentic(got_answer)
            assert took < ANSWER_BOUND_S, f"STORE_UNAVAILABLE took {took:.2f}s"
        print(f"STORE_UNAVAILABLE (store down) answered in {max(timings) * 1000:.1f} ms at most")
        # A session whose key this node never loaded: explicit too, unauthenticated.
        stranger = RawSession(priv, gw.app.keys.public, upstream)
        stranger.session_id, stranger.keys = os.urandom(16), SessionKeys(os.urandom(32))
        got_answer, took = await _timed_answer(stranger, ep2, version=1)
        rej = got_answer.msg
        assert isinstance(rej, wire.Reject) and rej.reason is RejectReason.STORE_UNAVAILABLE
        assert rej.mac == bytes(wire.MAC_LEN) and took < ANSWER_BOUND_S
        # A new handshake is refused the same way (a plain REJECT on the handshake id).
        hid = os.urandom(16)
        init = Initiator(priv, gw.app.keys.public, hid,
                         ClientHello(int(time.time() * 1000), wire.TransportKind.UDP, upstream))
        t0 = time.monotonic()
        ep2.send(wire.encode(wire.HandshakeInit(hid, init.message1)))
        hs = await ep2.expect(lambda m: isinstance(m, wire.Reject) and m.session_id == hid,
                              ANSWER_BOUND_S + 5, "handshake REJECT")
        assert isinstance(hs.msg, wire.Reject)
        assert hs.msg.reason is RejectReason.STORE_UNAVAILABLE
        assert time.monotonic() - t0 < ANSWER_BOUND_S

        # /readyz says no, and names the store.
        async def not_ready() -> bool:
            status, body = await readyz(port)
            return status == 503 and "store" in str(body.get("reason", ""))

        await until(not_ready, 5, "/readyz 503 naming the store")
        m = await scrape(port)
        assert value(m, "jvpn_store_up") == 0
        assert value(m, "jvpn_reattach_total", outcome="rejected", reason="STORE_UNAVAILABLE") >= 4

        # Established data keeps flowing: the data path never touches the store.
        await _echoes(agent, got, "during")
        # The agent, made to jump, is refused and stays on its working path.
        await agent.jump("udp", reason="jump during outage")
        await wait_for(lambda: any("STORE_UNAVAILABLE" in ln for ln in agent.log_lines), 5,
                       "the agent to see STORE_UNAVAILABLE")
        assert not agent.jumps and agent.machine.attached
        await _echoes(agent, got, "still")

        # ---- the store comes back, same port, with its data ----
        await asyncio.to_thread(durable_redis.start)

        async def ready() -> bool:
            return (await readyz(port))[0] == 200

        await until(ready, 10, "/readyz 200 again")
        rec = await gw.store.get(sid)
        assert rec is not None and rec.state is not SessionState.TERMINATED, rec
        v0 = agent.machine.version
        await agent.jump("udp", reason="jump after outage")
        await wait_for(lambda: len(agent.jumps) == 1, 5, "the agent's reattach after recovery")
        assert agent.machine.session_id == sid, "the same session, not a new one"
        assert agent.machine.version > v0 and agent.terminated_sessions == 0
        rec = await gw.store.get(sid)
        assert rec is not None and rec.version == agent.machine.version
        await _echoes(agent, got, "after")
        # The hand-driven session recovers too, with the version it knew before the outage.
        got_answer = await s.reattach(ep2)
        assert isinstance(got_answer.msg, wire.ReattachAck), got_answer.msg
        assert value(await scrape(port), "jvpn_store_up") == 1
    finally:
        await agent.stop()
        for e in eps:
            e.close()


async def test_paused_store_never_hangs_a_reattach_and_the_outcome_is_reread(
    durable_redis: RedisServer, setup: Setup
) -> None:
    """A store that accepts but never answers (SIGSTOP): the answer is still bounded.

    The paused CAS sits in the server's socket buffer and applies when the
    server resumes, after the client was told STORE_UNAVAILABLE. The client's
    retransmission of the same request gets the recorded decision; the gateway
    must then also hold that binding, or the ACK it sends names a binding
    nobody forwards for.
    """
    gw, upstream = setup.gw, setup.upstream
    priv, _ = await gw.add_client(upstream)
    s = RawSession(priv, gw.app.keys.public, upstream)
    home, ep2 = await Endpoint.udp(gw.udp), await Endpoint.udp(gw.udp)
    eps = [home, ep2]
    pid = durable_redis.pid
    assert pid is not None
    paused = False
    try:
        await s.connect(home)
        ep1 = await Endpoint.udp(gw.udp)
        eps.append(ep1)
        # One reattach first, so the server has the script cached (a NOSCRIPT never runs).
        assert isinstance((await s.reattach(ep1)).msg, wire.ReattachAck)
        v1 = s.version
        raw, req = s.request()
        os.kill(pid, signal.SIGSTOP)
        paused = True
        t0 = time.monotonic()
        got = await s.send_request(ep2, raw, req, timeout=ANSWER_BOUND_S + 5)
        took = time.monotonic() - t0
        assert isinstance(got.msg, wire.Reject), got.msg
        assert got.msg.reason is RejectReason.STORE_UNAVAILABLE and s.authentic(got)
        assert took < ANSWER_BOUND_S, f"STORE_UNAVAILABLE took {took:.2f}s"
        print(f"STORE_UNAVAILABLE (store paused) answered in {took * 1000:.0f} ms")
        os.kill(pid, signal.SIGCONT)
        paused = False

        async def applied() -> bool:
            rec = await gw.store.get(s.session_id)
            return rec is not None and rec.version > v1

        await until(applied, 5, "the paused CAS to apply late")
        # Retransmission: the recorded decision, an ACK for the binding the store now holds.
        again = await s.send_request(ep2, raw, req)
        assert isinstance(again.msg, wire.ReattachAck), again.msg
        s.install(again, ep2)
        rec = await gw.store.get(s.session_id)
        assert rec is not None
        assert (rec.pending_epoch, rec.pending_binding_id) == (s.epoch, s.binding_id)
        # ... the node adopted it PENDING: the first packet makes it ACTIVE, and it carries
        # traffic.
        await s.keepalive(ep2, timeout=2.0)
        rec = await gw.store.get(s.session_id)
        assert rec is not None and (rec.epoch, rec.binding_id) == (s.epoch, s.binding_id)
        ep2.send(s.payload_packet(b"after the pause"))
        assert await s.wait_payloads(ep2, 1) == [b"after the pause"]
    finally:
        if paused:
            os.kill(pid, signal.SIGCONT)
        for e in eps:
            e.close()


async def test_stopping_node_ignores_reattaches_still_at_the_store(
    durable_redis: RedisServer, setup: Setup
) -> None:
    """A reattach queued at a paused store when the node stops: its late answer binds
    nothing, answers nothing, and nothing is sent to the store again."""
    gw, upstream = setup.gw, setup.upstream
    priv, _ = await gw.add_client(upstream)
    s = RawSession(priv, gw.app.keys.public, upstream)
    home, ep1, ep2 = [await Endpoint.udp(gw.udp) for _ in range(3)]
    pid = durable_redis.pid
    assert pid is not None
    paused = False
    try:
        await s.connect(home)
        assert isinstance((await s.reattach(ep1)).msg, wire.ReattachAck)  # the script cached
        v1 = s.version
        os.kill(pid, signal.SIGSTOP)
        paused = True
        raw, req = s.request()
        queued = gw.store.reattach_paths["queued"]
        ep2.send(raw)
        await wait_for(lambda: gw.store.reattach_paths["queued"] == queued + 1, 2,
                       "the reattach queued")
        paths = dict(gw.store.reattach_paths)
        await gw.node.stop()
        os.kill(pid, signal.SIGCONT)
        paused = False
        await asyncio.sleep(1.0)  # the paused pipeline's reply arrives meanwhile
        assert gw.node.bindings == {} and gw.node.calls_in_flight == 0
        assert gw.store.reattach_paths == paths, "nothing re-run after stop"
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(s.answer(ep2, req.nonce), 0.5)
        rec = await gw.store.get(s.session_id)
        assert rec is not None and rec.version <= v1 + 1  # the one CAS already sent, at most
    finally:
        if paused:
            os.kill(pid, signal.SIGCONT)
        for e in (home, ep1, ep2):
            e.close()
