"""The client's address through the real nginx: `jvpn-lab cluster up` with deploy/ as is.

Clients on 127.0.0.2 and 127.0.0.3 reach one gateway only through nginx (which
speaks to it from 127.0.0.254, its `proxy_bind`). The gateway must see each
client's own address, not nginx's: on the session's binding, in its events, and
in its per-source budget of unauthenticated store work, so one source spending
its budget leaves another's whole. Over TCP the PROXY v1 header does the same.
Every wait is a poll with a deadline.
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Iterator

import pytest

from session.noise import generate_keypair
from store.api import SessionStore
from store.policy import ClientPolicy
from tests.integration.test_balancer_address import tcp_from, udp_from
from tests.support.harness import wait_for
from tests.support.local_cluster import LocalCluster, require_cluster_binaries
from tests.support.rawclient import RawSession

pytestmark = pytest.mark.timeout(90)

RATE, BURST = 1.0, 5  # the gateway's per-source budget for this test: small, to spend fast


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    require_cluster_binaries()
    c = LocalCluster(tmp_path_factory.mktemp("jvpn-balancer") / "run")
    c.up("--gateways", "1", "--port", "0", "--timeout", "30",
         "--set", f"source_rate={RATE}", "--set", f"source_burst={BURST}")
    try:
        yield c
    finally:
        c.down()


async def _client(cluster: LocalCluster) -> tuple[bytes, str]:
    priv, pub = generate_keypair()
    upstream = "127.0.0.1:9"  # never reached: the test sends keepalives only
    store = SessionStore(cluster.store_url, registry_key=cluster.registry_key)
    try:
        await store.add_client(ClientPolicy(pub, upstreams=(upstream,), name="test"))
    finally:
        await store.close()
    return priv, upstream


def _events(cluster: LocalCluster) -> list[dict]:  # type: ignore[type-arg]
    path = cluster.run_dir / "logs" / "gw-1.events.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line being written
            pass
    return out


def _sources(cluster: LocalCluster, session_hex: str) -> set[str]:
    return {e["source"]["ip"] for e in _events(cluster)
            if e.get("jvpn", {}).get("session_id") == session_hex and e.get("source")}


def _dropped(cluster: LocalCluster, reason: str) -> float:
    admin = cluster.state["gateways"][0]["admin"]
    body = urllib.request.urlopen(f"http://{admin}/metrics", timeout=3).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
               if line.startswith("jvpn_dropped_total{") and f'reason="{reason}"' in line)


async def test_the_gateway_sees_each_clients_address_through_nginx(
        cluster: LocalCluster) -> None:
    priv, upstream = await _client(cluster)
    gw_pub = cluster.public_key
    # A client on 127.0.0.2 over UDP: the binding and the events carry 127.0.0.2.
    a = RawSession(priv, gw_pub, upstream)
    ep_a = await udp_from(cluster.udp, "127.0.0.2")
    await a.connect(ep_a)
    await wait_for(lambda: _sources(cluster, a.session_id.hex()) == {"127.0.0.2"}, 5.0,
                   "the handshake's events with the client's address")
    # Over TCP from 127.0.0.3: nginx's PROXY header names it.
    b = RawSession(priv, gw_pub, upstream)
    ep_b = await tcp_from(cluster.tcp, "127.0.0.3")
    await b.connect(ep_b)
    await wait_for(lambda: _sources(cluster, b.session_id.hex()) == {"127.0.0.3"}, 5.0,
                   "the TCP handshake's events with the client's address")
    assert all(e["source"]["ip"] != "127.0.0.254" for e in _events(cluster) if e.get("source"))
    for ep in (ep_a, ep_b):
        ep.close()


async def test_per_source_budgets_apply_per_client_through_nginx(cluster: LocalCluster) -> None:
    priv, upstream = await _client(cluster)
    gw_pub = cluster.public_key
    # 127.0.0.4 spends its budget: reattaches for sessions that do not exist cost a store
    # read each, so past its burst they are refused (RATE_LIMITED)...
    flooder = RawSession(priv, gw_pub, upstream)
    home = await udp_from(cluster.udp, "127.0.0.4")
    await flooder.connect(home)  # its keys, to MAC requests with
    before = _dropped(cluster, "RATE_LIMITED")
    flood = []
    for _ in range(4 * BURST):
        ep = await udp_from(cluster.udp, "127.0.0.4")  # a new flow (and node key) each
        ep.write(flooder.request(session_id=os.urandom(16))[0])
        flood.append(ep)
    await wait_for(lambda: _dropped(cluster, "RATE_LIMITED") - before >= 2 * BURST, 5.0,
                   "the flooding source to be rate limited")
    # ...while a client on 127.0.0.5, behind the same nginx, has its whole budget: its
    # handshake succeeds at once (before, every client shared nginx's one budget).
    c = RawSession(priv, gw_pub, upstream)
    ep_c = await udp_from(cluster.udp, "127.0.0.5")
    await c.connect(ep_c)
    assert _sources(cluster, c.session_id.hex()) <= {"127.0.0.5"}
    for ep in (*flood, home, ep_c):
        ep.close()
