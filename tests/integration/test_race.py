"""Two claimants, one session, one version: exactly one wins, every round.

Each round sends two different valid REATTACH_REQUESTs for the same session
and the same expected version, back to back, from two transports, to a real
gateway backed by a real redis-server. Exactly one gets a REATTACH_ACK; the
other gets an explicit, authenticated REJECT (DUAL_ACTIVE_CONFLICT, or
STALE_VERSION once outside the dual-active window); and the store's record
then names exactly the winner's binding (one epoch, one binding id) and so
does the gateway's local binding table. The next round races on the winner's
new version. Send order alternates, so either side can win. The winner's
binding is PENDING until its first packet validates the path (a keepalive),
then the store names it ACTIVE.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest

from session import wire
from session.reasons import RejectReason
from tests.support.harness import echo_upstream, start_gateway, wait_for
from tests.support.rawclient import Endpoint, RawSession, Received

UDP, TCP = wire.TransportKind.UDP, wire.TransportKind.TCP
LOSER_REASONS = (RejectReason.DUAL_ACTIVE_CONFLICT, RejectReason.STALE_VERSION)
TIME_BUDGET_S = 60.0
SPOT_CHECK_EVERY = 50


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kinds", "two_nodes", "rounds"),
    [((UDP, UDP), False, 500), ((UDP, TCP), False, 500), ((UDP, UDP), True, 500)],
    ids=["udp-udp", "udp-tcp", "udp-udp-two-nodes"],
)
async def test_concurrent_reattaches_have_exactly_one_winner(
    redis_url: str, kinds: tuple[wire.TransportKind, wire.TransportKind], two_nodes: bool,
    rounds: int,
) -> None:
    # Short proof window: the nonce cache stays small. It records at most 1024 decisions
    # per 2 windows (store.scripts.NonceCache.MAX), so 500 rounds of two claimants stay
    # under its cap however fast they run. No silence-driven version bumps mid-race.
    opts: dict[str, object] = {"reattach_window_s": 1.0, "silence_keepalives": 1000}
    gw = await start_gateway(redis_url, node_id="gw-a", **opts)
    gws = [gw, await start_gateway(redis_url, node_id="gw-b", **opts) if two_nodes else gw]
    echo, upstream = await echo_upstream()
    eps: list[Endpoint] = []
    try:
        priv, _ = await gw.add_client(upstream, reattach_rate=100_000)
        s = RawSession(priv, gw.app.keys.public, upstream)
        home = await Endpoint.udp(gw.udp)
        eps.append(home)
        await s.connect(home)
        # Claimant a talks to the first node, b to the second (the same one unless two_nodes).
        a = await Endpoint.open(kinds[0], gws[0].udp, gws[0].tcp)
        b = await Endpoint.open(kinds[1], gws[1].udp, gws[1].tcp)
        eps += [a, b]
        node_of = {id(a): gws[0], id(b): gws[1]}
        wins: Counter[str] = Counter()
        loser_reasons: Counter[str] = Counter()
        t0 = time.monotonic()

        for i in range(rounds):
            assert time.monotonic() - t0 < TIME_BUDGET_S, f"only {i} rounds in {TIME_BUDGET_S}s"
            v, epoch = s.version, s.epoch
            raw_a, req_a = s.request(kind=a.kind)
            raw_b, req_b = s.request(kind=b.kind)
            assert req_a.expected_version == req_b.expected_version == v
            if i % 2 == 0:
                a.send(raw_a)
                b.send(raw_b)
            else:
                b.send(raw_b)
                a.send(raw_a)
            got_a = await s.answer(a, req_a.nonce, timeout=5.0)
            got_b = await s.answer(b, req_b.nonce, timeout=5.0)

            is_ack = [isinstance(g.msg, wire.ReattachAck) for g in (got_a, got_b)]
            assert sum(is_ack) == 1, f"round {i}: answers {got_a.msg} / {got_b.msg}"
            won, winner, lost, loser_raw, loser_ep = (
                (got_a, a, got_b, raw_b, b) if is_ack[0] else (got_b, b, got_a, raw_a, a))
            ack = won.msg
            rej = lost.msg
            assert isinstance(ack, wire.ReattachAck) and isinstance(rej, wire.Reject)
            assert s.authentic(won) and s.authentic(lost), f"round {i}: unauthenticated answer"
            assert (ack.version, ack.epoch) == (v + 1, epoch + 1), f"round {i}: {ack}"
            assert rej.reason in LOSER_REASONS, f"round {i}: loser got {rej.reason.name}"
            assert rej.version == ack.version, f"round {i}: loser told version {rej.version}"

            # The winner's binding is PENDING until its first packet validates the path;
            # then one binding, the winner's, in the store and on the node.
            s.install(won, winner)
            await s.keepalive(winner)
            rec = await gw.store.get(s.session_id)
            assert rec is not None
            owner = node_of[id(winner)]
            assert (rec.version, rec.epoch, rec.binding_id, rec.node, rec.kind) == (
                ack.version, ack.epoch, ack.binding_id, owner.node.machine.instance_id,
                winner.kind), f"round {i}: {rec}"
            assert ack.node_id == owner.node.machine.instance_id.encode()
            b_local = owner.node.bindings[s.session_id]
            assert (b_local.epoch, b_local.binding_id) == (ack.epoch, ack.binding_id)
            assert b_local.peer.addr == winner.local and b_local.peer.kind == winner.kind
            for other in gws:
                held = other.node.bindings.get(s.session_id)
                if other is not owner and held is not None:
                    assert held.epoch < ack.epoch, f"round {i}: two nodes hold epoch {held.epoch}"

            if i % SPOT_CHECK_EVERY == 0:
                # The loser retransmitting gets its recorded refusal, never an ACK.
                again = await _resend(s, loser_ep, loser_raw)
                assert isinstance(again.msg, wire.Reject) and again.msg.reason is rej.reason
                assert (await gw.store.get(s.session_id)).epoch == ack.epoch  # type: ignore[union-attr]

            wins["a" if winner is a else "b"] += 1
            loser_reasons[rej.reason.name] += 1

        elapsed = time.monotonic() - t0
        assert sum(wins.values()) == rounds
        # The race ran through the task-less path (cached secrets): it is the one proven here.
        paths: Counter[str] = Counter()
        for g in {id(g): g for g in gws}.values():
            paths.update(g.store.reattach_paths)
        assert paths["queued"] >= 2 * rounds - 2, paths
        if kinds == (UDP, UDP):
            assert wins["a"] and wins["b"], f"one side never won: {wins}"
        # The other node lets go of its stale binding (pub/sub, or its refresh is fenced).
        if two_nodes:
            loser_node = gws[1] if node_of[id(s.endpoint)] is gws[0] else gws[0]
            await wait_for(lambda: s.session_id not in loser_node.node.bindings, 5,
                           "the previous owner to drop its binding")
        # The survivor works end to end: validate its path and tunnel a datagram.
        assert s.endpoint is not None
        await s.keepalive(s.endpoint)
        s.endpoint.send(s.payload_packet(b"after the race"))
        assert await s.wait_payloads(s.endpoint, 1) == [b"after the race"]
        print(f"{rounds} rounds {kinds[0].name}/{kinds[1].name} two_nodes={two_nodes} "
              f"in {elapsed:.1f}s: wins {dict(wins)}, loser reasons {dict(loser_reasons)}")
    finally:
        for e in eps:
            e.close()
        for g in ([gw] if gws[1] is gw else gws):
            await g.app.stop()
        echo.close()


async def _resend(s: RawSession, ep: Endpoint, raw: bytes) -> Received:
    msg = wire.decode(raw)
    assert isinstance(msg, wire.ReattachRequest)
    ep.send(raw)
    return await s.answer(ep, msg.nonce, timeout=5.0)
