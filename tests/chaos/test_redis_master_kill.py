"""Kill a Redis Cluster master under load (``jvpn-lab cluster up --redis-cluster``: 3 masters, 3 replicas).

A raw client whose session's slot lives on the victim master asks for a
reattach every 100 ms at one gateway: while the replica has not taken over
the answer is an authenticated REJECT STORE_UNAVAILABLE (never a guess), then
an ACK once the replica is promoted (cluster-node-timeout 2 s). Meanwhile the
agents' established sessions keep flowing: the data path never touches the
store, and the gateways' lease holds because the store as a whole still
answers (lease_s is raised to 5 s here, above the failover time, since the
health check may land on the dead master while the cluster has not noticed).
The figures: the failover as the clients saw it (first STORE_UNAVAILABLE to
first ACK) and the longest interruption of an established session.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable

import pytest
import redis
from redis.crc import key_slot

from instruments.cluster import log_tail
from instruments.netsim import UdpEcho
from session import wire
from session.reasons import RejectReason
from store import record_key
from tests.chaos.conftest import Traffic, register_client, start_agents, stop_agents
from tests.support.harness import LIVE_STATES
from tests.support.local_cluster import LocalCluster
from tests.support.rawclient import Endpoint, NoAnswer, RawSession

# 2 of ~12 runs on 2026-11-24 got UNKNOWN_SESSION after the failover: the promoted replica
# held neither the session's record nor the store generation key. The launcher returned
# while a replica was still waiting for its first full sync (repl-diskless-sync-delay 5 s),
# and a replica promoted before that sync is empty. `jvpn-lab cluster up --redis-cluster` now
# waits until every master has a synced replica (and the delay is 0): 33/33 green since.
pytestmark = pytest.mark.timeout(150)

AGENTS = 8
FAILOVER_BOUND_S = 20.0


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _slot_owner(ports: list[int], slot: int) -> int | None:
    """The port of the master serving ``slot``, asked of any node that answers."""
    for port in ports:
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1.0,
                             socket_connect_timeout=1.0)
        try:
            for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if int(start) <= slot <= int(end):
                    return int(master[1])
        except redis.RedisError:
            continue
        finally:
            client.close()
    return None


def _replicas_synced(ports: list[int]) -> bool:
    """Every replica's link to its master is up (a fresh cluster's first full sync waits for
    repl-diskless-sync-delay, 5 s by default: a master killed before that has no successor)."""
    replicas = 0
    for port in ports:
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1.0,
                             socket_connect_timeout=1.0)
        try:
            info = client.info("replication")
        except redis.RedisError:
            return False
        finally:
            client.close()
        if info.get("role") == "slave":
            replicas += 1
            if info.get("master_link_status") != "up":
                return False
    return replicas > 0


async def test_kill_a_redis_cluster_master(
        chaos_cluster: Callable[..., LocalCluster], echo: tuple[UdpEcho, str],
        figure: Callable[..., None]) -> None:
    cluster = await asyncio.to_thread(chaos_cluster, 2, "--redis-cluster", "--set", "lease_s=5.0")
    _, upstream = echo
    stores = [p for p in cluster.state["processes"] if p["role"] == "store"]
    ports = {int(p["argv"][p["argv"].index("--port") + 1]): p for p in stores}
    gw = _addr(cluster.state["gateways"][0]["udp"])
    priv = await register_client(cluster, upstream)
    raw = RawSession(priv, cluster.public_key, upstream)
    ep = await Endpoint.udp(gw)
    await raw.connect(ep)
    slot = key_slot(record_key(raw.session_id).encode())
    victim_port = await asyncio.to_thread(_slot_owner, list(ports), slot)
    assert victim_port is not None
    victim = ports[victim_port]

    deadline = time.monotonic() + 20.0
    while not await asyncio.to_thread(_replicas_synced, list(ports)):
        assert time.monotonic() < deadline, "replicas never finished their first sync"
        await asyncio.sleep(0.2)
    agents = await start_agents(cluster, upstream, AGENTS)
    traffic = Traffic(agents).start()
    answers: list[tuple[float, str]] = []
    try:
        await asyncio.sleep(0.5)
        t_kill = time.monotonic()
        os.kill(victim["pid"], signal.SIGKILL)  # a pid this test's cluster started
        deadline = t_kill + FAILOVER_BOUND_S
        while time.monotonic() < deadline:
            ep2 = await Endpoint.udp(gw)
            try:
                got = await raw.reattach(ep2, timeout=1.5, validate=False)
            except NoAnswer:
                answers.append((time.monotonic() - t_kill, "no answer"))
                ep2.close()
                continue
            if isinstance(got.msg, wire.ReattachAck):
                answers.append((time.monotonic() - t_kill, "ACK"))
                ep.close()
                ep = ep2
                break
            assert isinstance(got.msg, wire.Reject)
            answers.append((time.monotonic() - t_kill, RejectReason(got.msg.reason).name))
            assert got.msg.authenticated and raw.authentic(got)
            ep2.close()
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
        t_end = time.monotonic()
    finally:
        await traffic.stop()
        ep.close()
    try:
        kinds = [k for _, k in answers]
        if not kinds or kinds[-1] != "ACK":  # say what the cluster and the gateway saw
            owner = await asyncio.to_thread(_slot_owner, [p for p in ports if p != victim_port],
                                            slot)
            tail = log_tail(cluster.run_dir / "logs" / "gw-1.log", 30)
            seen = await asyncio.to_thread(_inspect, owner, record_key(raw.session_id), ports)
            pytest.fail(f"no ACK within {FAILOVER_BOUND_S} s: {answers}\nslot {slot} now on "
                        f"port {owner} (victim {victim_port}); {seen}\ngw-1 log:\n{tail}")
        assert "STORE_UNAVAILABLE" in kinds, answers
        assert set(kinds[:-1]) <= {"STORE_UNAVAILABLE", "no answer"}, answers
        first_unavailable = next(t for t, k in answers if k == "STORE_UNAVAILABLE")
        failover = answers[-1][0] - first_unavailable
        gaps = [got.longest_gap(t_kill, t_end) for _, got in agents]
        for a, got in agents:
            assert a.status()["state"] in LIVE_STATES and a.terminated_sessions == 0
            assert got.first_after(t_end - 0.5) is not None
    finally:
        await stop_agents(agents)
    figure("redis_master_kill_reattach_unavailable_window", failover, "s",
           first_ack_after_kill=f"{answers[-1][0]:.2f}s",
           store_unavailable=kinds.count("STORE_UNAVAILABLE"), no_answer=kinds.count("no answer"))
    figure("redis_master_kill_established_longest_gap", max(gaps), "s", agents=AGENTS)


def _inspect(owner: int | None, key: str, ports: dict) -> str:  # type: ignore[type-arg]
    """What the surviving cluster holds: the record's generation and the store generation."""
    import redis as sync_redis

    out = []
    if owner is not None:
        r = sync_redis.Redis(host="127.0.0.1", port=owner, socket_timeout=1)
        out.append(f"record gen={r.hget(key, 'gen')!r} exists={r.exists(key)}")
    for port in ports:
        try:
            r = sync_redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
            if r.info("replication").get("role") == "master":
                try:
                    out.append(f"{port}: jvpn:gen={r.get('jvpn:gen')!r}")
                except sync_redis.ResponseError:
                    pass
        except Exception:
            pass
    return "; ".join(out)
