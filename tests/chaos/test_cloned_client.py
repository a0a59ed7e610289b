"""A cloned client: two holders of one session's keys reattach at two gateway processes at once.

Each round both clones send a REATTACH_REQUEST for the same expected version,
one to gw-1's and one to gw-2's own UDP port (not through nginx), at the same
moment. The store's CAS must grant exactly one: one ACK (authentic, its epoch
and binding id are the store record's), one REJECT, and the losing node
writes a SECURITY_EVENT (DUAL_ACTIVE_CONFLICT) to its JSON-lines event file.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.request
from collections.abc import Callable

import pytest

from instruments.netsim import UdpEcho
from session import wire
from session.reasons import RejectReason
from store.api import SessionStore
from tests.chaos.conftest import action, read_events, register_client
from tests.support.harness import wait_for
from tests.support.local_cluster import LocalCluster
from tests.support.rawclient import Endpoint, RawSession

pytestmark = pytest.mark.timeout(120)

ROUNDS = 200


def _metric(admin: str, name: str, label: str) -> float:
    body = urllib.request.urlopen(f"http://{admin}/metrics", timeout=3).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
               if line.startswith(name + "{") and label in line)


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def test_cloned_client_on_two_gateway_processes(
        chaos_cluster: Callable[..., LocalCluster], echo: tuple[UdpEcho, str],
        figure: Callable[..., None]) -> None:
    cluster = await asyncio.to_thread(chaos_cluster, 2)
    _, upstream = echo
    gw = {g["node_id"]: _addr(g["udp"]) for g in cluster.state["gateways"]}
    priv = await register_client(cluster, upstream)
    clone = RawSession(priv, cluster.public_key, upstream)
    first = await Endpoint.udp(gw["gw-1"])
    await clone.connect(first)
    sid = clone.session_id
    store = SessionStore.from_url(cluster.store_url)
    winners: dict[str, int] = {}
    reasons: dict[str, int] = {}
    t0 = time.monotonic()
    try:
        version = clone.version
        for n in range(ROUNDS):
            ea, eb = await Endpoint.udp(gw["gw-1"]), await Endpoint.udp(gw["gw-2"])
            try:
                raw1, req1 = clone.request(version=version)
                raw2, req2 = clone.request(version=version)
                ea.send(raw1)
                eb.send(raw2)
                got = await asyncio.gather(clone.answer(ea, req1.nonce),
                                           clone.answer(eb, req2.nonce))
            finally:
                ea.close()
                eb.close()
            acks = [g for g in got if isinstance(g.msg, wire.ReattachAck)]
            rejects = [g.msg for g in got if isinstance(g.msg, wire.Reject)]
            assert len(acks) == 1 and len(rejects) == 1, f"round {n}: {[g.msg for g in got]}"
            ack = acks[0].msg
            assert isinstance(ack, wire.ReattachAck) and clone.authentic(acks[0])
            rec = await store.get(sid)
            assert rec is not None, f"round {n}: session record gone"
            # Exactly one grant, the ACK's: PENDING (its path never speaks), the store's.
            assert (rec.pending_epoch, rec.pending_binding_id, rec.pending_node) == (
                ack.epoch, ack.binding_id, ack.node_id.decode()), f"round {n}"
            winners[rec.pending_node] = winners.get(rec.pending_node, 0) + 1
            name = RejectReason(rejects[0].reason).name
            reasons[name] = reasons.get(name, 0) + 1
            version = ack.version
        elapsed = time.monotonic() - t0

        # Every losing claimant is a security event: counted each time (the metric), and
        # in the audit log aggregated per kind and source (one event per second with the
        # count it folds in), so a flood cannot roll the log over.
        admins = [g["admin"] for g in cluster.state["gateways"]]

        def counted() -> float:
            return sum(_metric(a, "jvpn_security_events_total", 'kind="dual_active_conflict"')
                       for a in admins)

        with contextlib.suppress(AssertionError):
            await wait_for(lambda: counted() >= ROUNDS, 10.0, "security events counted")
        count = counted()

        def alerts() -> int:
            return sum(1 for node in gw for ev in read_events(cluster, node)
                       if action(ev) == "security_event"
                       and ev.get("jvpn", {}).get("session_id") == sid.hex())
        with contextlib.suppress(AssertionError):  # the event sink writes in the background
            await wait_for(lambda: alerts() >= 1, 10.0, "a SECURITY_EVENT")
        logged = alerts()
    finally:
        await store.close()
        first.close()
    figure("cloned_client_rounds_one_binding", ROUNDS, "rounds", security_events=count,
           security_event_lines=logged, winners=winners, rejects=reasons,
           seconds=f"{elapsed:.2f}")
    assert count >= ROUNDS, f"{count} security events counted for {ROUNDS} races"
    assert 1 <= logged <= 2 * (elapsed + 2) * len(admins), f"{logged} SECURITY_EVENT lines"
