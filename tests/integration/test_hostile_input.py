"""Hostile input at a real gateway: it neither crashes nor stalls, and counts every drop.

A bounded barrage (about 20k UDP datagrams and 2k TCP frames, loopback only,
seeded so a failure replays) of random bytes, truncated, oversized and
bit-flipped copies of valid messages, replayed DATA and handshakes, messages
of the wrong direction, and garbage TCP frames, including impossible length
prefixes that must close only their own connection. Meanwhile two real agents
(one over UDP, one over TCP) keep tunnelling datagrams to an echo upstream.

Every hostile message has exactly one predicted outcome, computed with the
reference codec and a replica of the gateway's side of the session's data
channel (``RawSession.gateway_channel``): a drop with a reason (counted in
``jvpn_dropped_total{reason,transport}``) or a reattach rejection (counted in
``jvpn_reattach_total{outcome="rejected",reason}``). The test checks the
gateway's /metrics against the prediction exactly: nothing uncounted, nothing
counted twice, nothing under the wrong reason or transport.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field, replace

import pytest

from session import wire
from session.errors import DecodeError, RemoteProtocolError
from session.framing import DataChannel
from session.reasons import NoticeKind, RejectReason
from tests.support.harness import FAST, Gateway, echo_upstream, start_gateway, wait_for
from tests.support.rawclient import Endpoint, RawSession, readyz, scrape, until

# The agents here share the event loop with the gateway under attack, and "no agent
# jumped" is a check: give them 1 s of silence before a jump (FAST gives 0.3 s), the
# same bound the loop-lag check puts on a stall, so a busy CI box is not a failure.
PATIENT = replace(FAST, dead_after=10)

UDP, TCP = wire.TransportKind.UDP, wire.TransportKind.TCP
SEED = 20261124
BATCH = 40  # hostile messages between two agent datagrams (and a pacing point)
UDP_MESSAGES = 20_000
TCP_FRAMES = 2_000

Outcome = tuple[str, str, str]  # ("drop" | "reject", reason name, transport)


@dataclass
class Oracle:
    """Predicts what the gateway does with one hostile message."""

    gw: Gateway
    channels: dict[bytes, DataChannel]  # replicas of the gateway's receive side, by session
    forbidden: set[bytes]  # valid never-sent messages: sending one would not be hostile
    replayed_handshakes: set[bytes]
    expected: Counter[Outcome] = field(default_factory=Counter)

    def predict(self, raw: bytes, transport: wire.TransportKind) -> Outcome:
        t = transport.name.lower()
        assert raw not in self.forbidden, "the generator produced a valid message"
        try:
            msg = wire.decode(raw)
        except DecodeError as exc:
            return ("drop", exc.reason.name, t)
        if isinstance(msg, wire.Data):
            b = self.gw.node.bindings.get(msg.session_id)
            if b is None:
                return ("drop", "UNKNOWN_SESSION", t)
            if b.epoch != msg.epoch:
                return ("drop", "STALE_EPOCH", t)
            channel = self.channels[msg.session_id]
            try:
                channel.open(msg, raw)
            except RemoteProtocolError as exc:
                return ("drop", exc.reason.name, t)
            raise AssertionError("a hostile DATA packet authenticated")
        if isinstance(msg, wire.ReattachRequest):
            # A changed bit anywhere breaks the MAC; a changed session id names no session.
            known = msg.session_id in self.channels
            return ("reject", "BAD_PROOF" if known else "UNKNOWN_SESSION", t)
        if isinstance(msg, wire.HandshakeInit):
            if raw in self.replayed_handshakes:
                return ("drop", "REPLAYED", t)
            return ("drop", "BAD_MAC" if msg.token else "BAD_HANDSHAKE", t)
        return ("drop", "UNEXPECTED", t)  # a gateway-to-client message sent to the gateway

    def send(self, ep: Endpoint, raw: bytes) -> None:
        self.expected[self.predict(raw, ep.kind)] += 1
        ep.send(raw)


def _flip(rng: random.Random, raw: bytes) -> bytes:
    out = bytearray(raw)
    bit = rng.randrange(len(out) * 8)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def _random_header(rng: random.Random, body: int) -> bytes:
    """A well-formed header (version, a type 0..9, no flags, random id) and a random body."""
    return wire.HEADER.pack(1, rng.randrange(10), 0, rng.randbytes(16)) + rng.randbytes(body)


async def test_barrage_is_dropped_counted_and_harmless(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    rng = random.Random(SEED)
    # The barrage comes from one address: the per-source budget is tested elsewhere
    # (test_machines.py), here every message must meet its parser and be counted.
    gw = await start_gateway(redis_url, source_rate=-1)
    echo, upstream = await echo_upstream()
    eps: list[Endpoint] = []
    agents = []
    try:
        # Two real agents, one per transport, tunnelling to the echo upstream.
        got: dict[str, list[bytes]] = {"udp": [], "tcp": []}
        for kind in ("udp", "tcp"):
            priv, _ = await gw.add_client(upstream)
            agent = gw.agent(priv, upstream, PATIENT, transports=[kind], name=f"agent-{kind}",
                             on_payload=got[kind].append)
            agents.append(agent)
            await agent.start()
            await agent.wait_connected(5)

        # A raw session whose valid messages are the templates of the hostile ones.
        priv, _ = await gw.add_client(upstream)
        s = RawSession(priv, gw.app.keys.public, upstream)
        home = await Endpoint.udp(gw.udp)
        eps.append(home)
        await s.connect(home)
        delivered = [s.keepalive_packet(seq) for seq in range(64)]
        for pkt in delivered:
            home.send(pkt)
        for _ in delivered:
            await s.next_inner(home, lambda i: i.kind is wire.InnerType.KEEPALIVE_ACK)
        assert s.endpoint is home
        channel = s.gateway_channel()
        for pkt in [*s.sent_data[:1], *delivered]:  # the connect keepalive, then these
            channel.open_raw(pkt)
        fresh = [s.keepalive_packet(1000 + i) for i in range(32)]  # sealed, never sent
        fresh += [s.payload_packet(rng.randbytes(rng.randrange(1, 600))) for _ in range(32)]
        request, _ = s.request()  # valid, never sent
        valid_init = await _valid_handshake_init(gw, upstream)
        sid = s.session_id
        server_msgs = [
            wire.encode(wire.ReattachAck(sid, os.urandom(16), 9, 9, os.urandom(16), b"gw", 1)),
            wire.encode(wire.Reject(sid, os.urandom(16), RejectReason.STALE_VERSION, 3, 1)),
            wire.encode(wire.Notice(sid, NoticeKind.TERMINATED, 1, 3, os.urandom(16), 1)),
            wire.encode(wire.HandshakeResp(sid, os.urandom(16), os.urandom(64))),
            wire.encode(wire.Retry(os.urandom(16), os.urandom(32))),
        ]
        templates = [*fresh, *delivered, request, valid_init, *server_msgs]
        oracle = Oracle(gw, {sid: channel}, {*fresh, request, valid_init},
                        {s.handshake_init})

        def hostile() -> bytes:
            """One hostile message (valid length for a TCP frame is the caller's business)."""
            r = rng.random()
            if r < 0.15:
                return rng.randbytes(rng.randrange(0, 2200))
            if r < 0.30:
                return _random_header(rng, rng.randrange(0, 200))
            if r < 0.35:
                return _random_header(rng, rng.randrange(wire.MAX_MESSAGE_SIZE, 4000))
            if r < 0.50:
                t = rng.choice(templates)
                return t[:rng.randrange(len(t))]
            if r < 0.85:
                return _flip(rng, rng.choice(templates))
            if r < 0.99:
                return rng.choice(delivered)  # replayed DATA
            return s.handshake_init  # a replayed handshake

        before = await scrape(gw.app.admin_port)  # type: ignore[arg-type]
        attackers = [await Endpoint.udp(gw.udp) for _ in range(8)]
        eps += attackers
        # A raw session over TCP: its own connection also carries garbage frames.
        priv, _ = await gw.add_client(upstream)
        st = RawSession(priv, gw.app.keys.public, upstream)
        tcp_home = await Endpoint.tcp(gw.tcp)
        eps.append(tcp_home)
        await st.connect(tcp_home)
        oracle.channels[st.session_id] = st.gateway_channel()
        for pkt in st.sent_data:
            oracle.channels[st.session_id].open_raw(pkt)

        lag = _LoopLag()
        lag.start()
        sent_payloads: dict[str, list[bytes]] = {"udp": [], "tcp": []}
        base, in_batch = gw.app.metrics.rx_packets, 0  # pacing (see below)
        tcp_sent = 0
        t0 = time.monotonic()
        for n in range(UDP_MESSAGES):
            oracle.send(attackers[n % len(attackers)], hostile())
            in_batch += 1
            if n % (UDP_MESSAGES // TCP_FRAMES) == 0:
                frame = hostile()
                while not wire.HEADER_LEN <= len(frame) <= wire.MAX_MESSAGE_SIZE:
                    frame = hostile()
                oracle.send(tcp_home, frame)
                in_batch += 1
                tcp_sent += 1
            if n % BATCH == BATCH - 1:
                for kind, agent in zip(("udp", "tcp"), agents, strict=True):
                    payload = b"%s-%d" % (kind.encode(), n)
                    sent_payloads[kind].append(payload)
                    assert agent.send(payload)
                # Pace: let the gateway read (about) this batch before the next, so no
                # socket buffer overflows. Other traffic also counts in rx_packets, so the
                # wait may end a few messages early; re-basing per batch keeps that bounded.
                await _until_read(gw, base + in_batch)
                base, in_batch = gw.app.metrics.rx_packets, 0
        barrage_s = time.monotonic() - t0

        # Impossible frame lengths: each closes its own connection, and only it.
        bad_lengths = {0: "TRUNCATED", 1: "TRUNCATED", wire.HEADER_LEN - 1: "TRUNCATED",
                       wire.MAX_MESSAGE_SIZE + 1: "OVERSIZED", 0xFFFF: "OVERSIZED"}
        doomed = []
        for n, reason in bad_lengths.items():
            conn = await Endpoint.tcp(gw.tcp)
            eps.append(conn)
            good = [_random_header(rng, 30) for _ in range(3)]  # complete frames first
            for g in good:
                oracle.expected[oracle.predict(g, TCP)] += 1
            # One write: the good frames, the bad prefix, then bytes that must be ignored.
            conn.write(b"".join(wire.frame(g) for g in good) + wire.FRAME_HEAD.pack(n)
                       + b"\x01" * 64)
            oracle.expected[("drop", reason, "tcp")] += 1
            doomed.append(conn)
        for conn in doomed:
            await asyncio.wait_for(conn.eof.wait(), 5.0)

        # After the barrage: everything the agents sent during it came back.
        for kind, agent in zip(("udp", "tcp"), agents, strict=True):
            want = sent_payloads[kind]
            try:
                await wait_for(lambda k=kind, w=want: set(w) <= set(got[k]), 5,  # type: ignore[misc]
                               f"{kind} agent echoes")
            except AssertionError:
                missing = sorted(set(want) - set(got[kind]))
                raise AssertionError(
                    f"{kind} agent: {len(missing)} of {len(want)} echoes missing "
                    f"({missing[:5]}...); agent log: {agent.log_lines[-10:]}") from None
            assert len(want) >= UDP_MESSAGES // BATCH
        assert all(not a.jumps for a in agents), "an agent had to jump: the gateway stalled"
        for kind, agent in zip(("udp", "tcp"), agents, strict=True):  # and after it
            for i in range(20):
                assert agent.send(b"%s-after-%d" % (kind.encode(), i))
            await wait_for(lambda k=kind: sum(b"-after-" in g for g in got[k]) >= 20, 5,  # type: ignore[misc]
                           f"{kind} echoes after the barrage")
        # The TCP connection that carried garbage frames is still open and working.
        assert not tcp_home.eof.is_set()
        await st.keepalive(tcp_home)

        # Every hostile message is counted exactly once, under the predicted reason.
        expected_drops = Counter({(r, t): n for (k, r, t), n in oracle.expected.items()
                                  if k == "drop"})
        expected_rejects: Counter[str] = Counter()
        for (k, r, _), n in oracle.expected.items():
            if k == "reject":
                expected_rejects[r] += n  # the metric has no transport label

        async def all_counted() -> bool:
            m = await scrape(gw.app.admin_port)  # type: ignore[arg-type]
            return (_drops(m) - _drops(before)).total() >= expected_drops.total() and (
                _rejects(m) - _rejects(before)).total() >= expected_rejects.total()

        try:
            await until(all_counted, 10, "every hostile message to be counted")
        except AssertionError:
            pass  # the comparison below says what is missing
        await asyncio.sleep(0.3)  # anything counted twice would show now
        after = await scrape(gw.app.admin_port)  # type: ignore[arg-type]
        _assert_counts("jvpn_dropped_total", _delta(_drops(after), _drops(before)),
                       expected_drops)
        _assert_counts("jvpn_reattach_total{outcome=rejected}",
                       _delta(_rejects(after), _rejects(before)), expected_rejects)

        # Nothing moved: no roaming on replayed DATA, the raw session still bound at home.
        assert gw.node.bindings[s.session_id].peer.addr == home.local
        assert not [e for e in gw.actions("transport_switch")
                    if e.get("jvpn.session_id") == s.session_id.hex()]
        await s.keepalive(home)
        # Still alive: loops running, ready, and a brand-new session works end to end.
        assert all(not t.done() for t in gw.node._background), "a background loop died"
        status, body = await readyz(gw.app.admin_port)  # type: ignore[arg-type]
        assert status == 200, body
        fresh_s = RawSession(priv, gw.app.keys.public, upstream)
        fresh_ep = await Endpoint.udp(gw.udp)
        eps.append(fresh_ep)
        await fresh_s.connect(fresh_ep)
        fresh_ep.send(fresh_s.payload_packet(b"after"))
        assert await fresh_s.wait_payloads(fresh_ep, 1) == [b"after"]
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert not errors, f"the gateway logged errors: {[r.getMessage() for r in errors[:5]]}"
        lag.stop()
        total = UDP_MESSAGES + tcp_sent + 4 * len(bad_lengths)
        print(f"{total} hostile messages in {barrage_s:.1f}s; max loop lag "
              f"{lag.max * 1000:.0f} ms; drops {dict(expected_drops)}; "
              f"rejects {dict(expected_rejects)}")
        assert lag.max < 1.0, f"the event loop stalled for {lag.max:.2f}s"
    finally:
        for agent in agents:
            await agent.stop()
        for e in eps:
            e.close()
        await gw.app.stop()
        echo.close()


# ---- helpers --------------------------------------------------------------------------------


async def _valid_handshake_init(gw: Gateway, upstream: str) -> bytes:
    """A valid HANDSHAKE_INIT of a registered client, never sent."""
    from session.handshake import ClientHello, Initiator

    priv, _ = await gw.add_client(upstream)
    hid = os.urandom(16)
    init = Initiator(priv, gw.app.keys.public, hid, ClientHello(int(time.time() * 1000), UDP,
                                                                upstream))
    return wire.encode(wire.HandshakeInit(hid, init.message1))


async def _until_read(gw: Gateway, target: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while gw.app.metrics.rx_packets < target:
        assert time.monotonic() < deadline, "the gateway stopped reading"
        await asyncio.sleep(0.0005)


def _drops(m: dict) -> Counter[tuple[str, str]]:  # type: ignore[type-arg]
    out: Counter[tuple[str, str]] = Counter()
    for (name, labels), v in m.items():
        if name == "jvpn_dropped_total":
            d = dict(labels)
            out[(d["reason"], d["transport"])] = int(v)
    return out


def _rejects(m: dict) -> Counter[str]:  # type: ignore[type-arg]
    out: Counter[str] = Counter()
    for (name, labels), v in m.items():
        d = dict(labels)
        if name == "jvpn_reattach_total" and d.get("outcome") == "rejected":
            out[d["reason"]] = int(v)
    return out


def _assert_counts(name: str, got: Counter, want: Counter) -> None:  # type: ignore[type-arg]
    diff = {k: (got.get(k, 0), want.get(k, 0)) for k in set(got) | set(want)
            if got.get(k, 0) != want.get(k, 0)}
    assert not diff, f"{name}: (counted, predicted) differ for {diff}"


def _delta(after: Counter, before: Counter) -> Counter:  # type: ignore[type-arg]
    return Counter({k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)})


class _LoopLag:
    """Measures the event loop's worst scheduling delay (a stall detector)."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.max = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            t = time.monotonic()
            await asyncio.sleep(self.interval)
            self.max = max(self.max, time.monotonic() - t - self.interval)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()



async def test_forged_data_cannot_make_a_healthy_client_drop_its_path(redis_url: str) -> None:
    """An off-path attacker who knows only a session id (it is cleartext in every packet).

    It sends a forged DATA (right session id, random bytes) from its own address to
    a node of the cluster that does not hold the session, and gets back that node's
    authenticated NOT_BOUND_HERE notice. If it can deliver the notice to the client
    (spoofing the gateway's address, or on the path), a client whose path is
    healthy must not abandon it: the notice answered an unauthenticated packet, so
    it proves nothing about the client's path. (Were it obeyed, one forged packet
    per notice interval would force a reattach each time, and soon exhaust the
    session's reattach rate: RATE_LIMITED, a session-wide denial of service.)
    """
    gw = await start_gateway(redis_url)
    other = await start_gateway(redis_url, node_id="gw-other")  # same cluster, not the owner
    echo, upstream = await echo_upstream()
    priv, _ = await gw.add_client(upstream)
    got: list[bytes] = []
    agent = gw.agent(priv, upstream, PATIENT, transports=["udp"], on_payload=got.append)
    attackers = [await Endpoint.udp(gw.udp), await Endpoint.udp(other.udp)]
    try:
        await agent.start()
        await agent.wait_connected(5)
        m = agent.machine
        await wait_for(lambda: m.quality.samples >= 3, 5, "a few keepalive round trips")
        for a in attackers:
            for epoch in (m.epoch, m.epoch + 1):
                a.send(wire.encode(wire.Data(m.session_id, epoch, 0, os.urandom(40))))

        def notices_back() -> list[bytes]:
            return [raw for a in attackers for raw in a.received
                    if isinstance(wire.decode(raw), wire.Notice)]
        await wait_for(lambda: bool(notices_back()), 5, "a NOT_BOUND_HERE back from a node")
        notices = notices_back()
        # A node that does not hold the session answers (authenticated: it can load the
        # key); the client is the fence. (Should no node answer forged DATA any more,
        # this test needs another way to obtain a notice.)
        assert notices, "no NOT_BOUND_HERE came back: the test exercises nothing"
        path = m.path
        assert path is not None
        for raw in notices:  # what a spoofer or an on-path injector would deliver
            agent._on_receive(path, raw)
        await asyncio.sleep(0.3)
        assert not agent.jumps and m.path == path, (
            f"a forged DATA made a healthy client abandon its path: {agent.log_lines[-3:]}")
        agent.send(b"still fine")
        await wait_for(lambda: b"still fine" in got, 5, "an echo on the original path")
    finally:
        await agent.stop()
        for a in attackers:
            a.close()
        echo.close()
        await other.app.stop()
        await gw.app.stop()
