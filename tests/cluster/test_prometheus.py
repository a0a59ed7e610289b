"""The real Prometheus (Debian binary) on deploy/prometheus, scraping a local cluster.

`jvpn-lab cluster up --prometheus --scrape-interval 1s` renders
deploy/prometheus/prometheus.yml with file_sd targets (DNS SD in compose),
storage in the test's temp dir, listening on a free loopback port. Agents
jump (reattach over new UDP ports and TCP, through nginx); then the HTTP API
must show the switch rate by reason, every gateway's series, the recording
rules from deploy/prometheus/rules, and every Grafana panel query must run.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from agent.agent import Agent, AgentSettings
from instruments.netsim import UdpEcho
from session.noise import generate_keypair
from store.api import SessionStore
from store.policy import ClientPolicy
from tests.support.harness import FAST, LIVE_STATES, wait_for
from tests.support.local_cluster import ROOT, LocalCluster, require_cluster_binaries

pytestmark = pytest.mark.timeout(90)

GATEWAYS = 3
AGENTS = 3
SCRAPE_S = 1.0
SWITCH_RATE = "sum by (reason) (rate(jvpn_transport_switch_total[1m]))"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    require_cluster_binaries(prometheus=True)
    c = LocalCluster(tmp_path_factory.mktemp("jvpn-prom") / "run")
    c.up("--gateways", str(GATEWAYS), "--port", "0", "--prometheus",
         "--scrape-interval", f"{SCRAPE_S:g}s", "--timeout", "30")
    try:
        yield c
    finally:
        c.down()


def query(cluster: LocalCluster, expr: str) -> list[dict[str, Any]]:
    """Instant query through /api/v1/query; the result vector."""
    url = cluster.state["prometheus"]["url"] + "/api/v1/query?" + urllib.parse.urlencode(
        {"query": expr})
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def poll(cluster: LocalCluster, expr: str, ok: Any, timeout: float, what: str) -> list[Any]:
    deadline = time.monotonic() + timeout
    while True:
        res = query(cluster, expr)
        if ok(res):
            return res
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}: {expr} -> {res}")
        time.sleep(0.25)


@pytest.fixture
async def agents(cluster: LocalCluster) -> AsyncIterator[list[Agent]]:
    echo, addr = await UdpEcho.start()
    upstream = f"{addr[0]}:{addr[1]}"
    store = SessionStore(cluster.store_url, registry_key=cluster.registry_key)
    out: list[Agent] = []
    try:
        for i in range(AGENTS):
            priv, pub = generate_keypair()
            await store.add_client(ClientPolicy(pub, upstreams=(upstream,)))
            a = Agent(AgentSettings(
                private_key=priv, gateway_public_key=cluster.public_key, gateways=[cluster.udp],
                tcp_gateways=[cluster.tcp], upstream=upstream, local_udp=None,
                params=replace(FAST, upstream=upstream), name=f"agent-{i}"))
            await a.start()
            out.append(a)
        for a in out:
            await a.wait_connected(10.0)
        yield out
    finally:
        for a in out:
            await a.stop()
        await store.close()
        echo.close()


def test_prometheus_runs_the_deploy_config(cluster: LocalCluster) -> None:
    prom = next(p for p in cluster.state["processes"] if p["role"] == "prometheus")
    argv = prom["argv"]
    assert f"--storage.tsdb.path={cluster.run_dir / 'prometheus' / 'data'}" in argv
    assert any(re.fullmatch(r"--web\.listen-address=127\.0\.0\.1:\d+", a) for a in argv)
    rendered = Path(cluster.state["prometheus"]["config"]).read_text()
    assert "file_sd_configs" in rendered and "dns_sd_configs" not in rendered
    assert str(ROOT / "deploy" / "prometheus" / "rules" / "*.yml") in rendered
    # Every gateway is a target, and every one answers.
    up = poll(cluster, 'up{job="jvpn-gateway"} == 1', lambda r: len(r) == GATEWAYS, 15,
              "every gateway scraped")
    admins = {g["admin"] for g in cluster.state["gateways"]}
    assert {r["metric"]["instance"] for r in up} == admins
    nodes = poll(cluster, "count by (instance, node) (jvpn_node_info)",
                 lambda r: len(r) == GATEWAYS, 15, "node info from every gateway")
    assert {r["metric"]["node"] for r in nodes} == {g["node_id"] for g in cluster.state["gateways"]}
    status = cluster.cli("status", timeout=30)
    assert status.returncode == 0 and f"{GATEWAYS}/{GATEWAYS} targets up" in status.stdout


async def test_switch_rate_by_reason_after_jumps(
    cluster: LocalCluster, agents: list[Agent]
) -> None:
    # rate() sees only increases between scrapes of a series that already exists, and a
    # series is one (from, to, reason): jump udp->udp twice (born at 1, then 2), more than
    # two scrape intervals apart, plus a UDP -> TCP -> UDP excursion.
    for rnd, kind in enumerate(["udp", "udp", "tcp", "udp"], start=1):
        await asyncio.gather(*(a.jump(kind, reason="jump") for a in agents))
        await wait_for(lambda rnd=rnd: all(len(a.jumps) >= rnd for a in agents), 5.0,
                       f"round {rnd} of reattaches ({kind})")
        await asyncio.sleep(2.5 * SCRAPE_S)
    res = await asyncio.to_thread(
        poll, cluster, SWITCH_RATE,
        lambda r: any(x["metric"].get("reason") == "reattach" and float(x["value"][1]) > 0
                      for x in r), 15, "a positive reattach switch rate")
    rates = {x["metric"].get("reason", ""): float(x["value"][1]) for x in res}
    assert rates["reattach"] > 0
    print(f"\n{SWITCH_RATE} = {rates}")

    # The recording rule from deploy/prometheus/rules is loaded and evaluated.
    rec = await asyncio.to_thread(
        poll, cluster, "jvpn:transport_switch:rate1m_by_node",
        lambda r: any(float(x["value"][1]) > 0 for x in r), 15, "the recording rule")
    assert any(x["metric"].get("reason") == "reattach" for x in rec)

    # The per-node rules the dashboard reads carry each node's id (joined on instance).
    per_node = await asyncio.to_thread(
        poll, cluster, "jvpn:reattach:rate5m_by_node",
        lambda r: any(float(x["value"][1]) > 0 for x in r), 15, "the per-node reattach rule")
    nodes = {g["node_id"] for g in cluster.state["gateways"]}
    assert {x["metric"]["node"] for x in per_node} <= nodes
    assert any(x["metric"]["outcome"] == "ok" for x in per_node)
    held = await asyncio.to_thread(
        poll, cluster, "sum by (node) (jvpn:sessions:by_node)",
        lambda r: {x["metric"].get("node") for x in r} == nodes, 15, "sessions per node")
    assert sum(float(x["value"][1]) for x in held) >= AGENTS

    # Every gateway node has series.
    # (polled: one scrape slower than the 1 s scrape timeout marks a target's series
    # stale until the next one succeeds)
    await asyncio.to_thread(poll, cluster, "count by (instance) (jvpn_node_info)",
                            lambda r: len(r) == GATEWAYS, 15, "series from every gateway")

    def live(r: list[dict[str, Any]]) -> float:
        return sum(float(x["value"][1]) for x in r if x["metric"]["state"] in LIVE_STATES)
    sessions = await asyncio.to_thread(poll, cluster, "sum by (state) (jvpn_sessions)",
                                       lambda r: live(r) == AGENTS, 15,
                                       "every session live (ATTACHED, VOLATILE or DEGRADED)")
    p99 = query(cluster, 'histogram_quantile(0.99, sum by (le) '
                         '(rate(jvpn_reattach_latency_seconds_bucket{outcome="ok"}[5m])))')
    assert p99 and math.isfinite(float(p99[0]["value"][1])) and float(p99[0]["value"][1]) > 0
    print(f"reattach p99 (gateway side) = {float(p99[0]['value'][1]) * 1000:.2f} ms, "
          f"sessions by state = { {x['metric']['state']: x['value'][1] for x in sessions} }")


def test_every_dashboard_query_runs(cluster: LocalCluster) -> None:
    dash = json.loads((ROOT / "deploy" / "grafana" / "jumping-vpn.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 5
    for expr in exprs:  # with the node variable at "All", as Grafana sends it
        query(cluster, expr.replace("$node", ".*"))  # asserts status == success: valid PromQL
