"""`jvpn-lab cluster up|status|down` for real: redis-server, 3 jvpn-gateway processes, nginx.

Agents reach the cluster only through the nginx balancer (UDP and TCP on one
port) and exchange datagrams with a UDP echo; their reattaches from new
source ports and over TCP are routed by session id (deploy/nginx/jvpn.js), so
they land on one node. Then `down` must leave no process behind.
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from agent.agent import Agent, AgentSettings
from instruments.cluster import nginx_values, render_template
from instruments.netsim import UdpEcho
from session.noise import generate_keypair
from session.wire import node_name
from store.api import SessionStore
from store.policy import ClientPolicy
from tests.support.harness import FAST, LIVE_STATES, wait_for
from tests.support.local_cluster import ROOT, LocalCluster, require_cluster_binaries

pytestmark = pytest.mark.timeout(90)

GATEWAYS = 3
AGENTS = 4
DATAGRAMS = 50


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    require_cluster_binaries()
    c = LocalCluster(tmp_path_factory.mktemp("jvpn-cluster") / "run")
    c.up("--gateways", str(GATEWAYS), "--port", "0", "--timeout", "30")
    try:
        yield c
    finally:
        c.down()  # idempotent: test_down_leaves_no_process already ran it


@pytest.fixture
async def echo() -> AsyncIterator[str]:
    proto, addr = await UdpEcho.start()
    try:
        yield f"{addr[0]}:{addr[1]}"
    finally:
        proto.close()


async def _client(cluster: LocalCluster, upstream: str) -> bytes:
    """Register a fresh client key with the cluster's store (as `jvpn clients add` does)."""
    priv, pub = generate_keypair()
    store = SessionStore(cluster.store_url, registry_key=cluster.registry_key)
    try:
        await store.add_client(ClientPolicy(pub, upstreams=(upstream,), name="test"))
    finally:
        await store.close()
    return priv


class Echoed:
    """Collects tunnelled echoes by sequence number."""

    def __init__(self) -> None:
        self.seen: set[int] = set()

    def __call__(self, data: bytes) -> None:
        self.seen.add(int.from_bytes(data[:4], "big"))


# Every UDP source port this module's agents opened toward nginx. nginx keys a UDP
# flow by the client's address:port for UDP_IDLE_TIMEOUT after its last datagram, so
# a new socket the kernel numbers like a closed one joins that flow and goes where it
# went: a test of session-affine routing leaves such a path out.
_UDP_SOURCES: set[int] = set()


def _note_udp_sources(agent: Agent) -> None:
    _UDP_SOURCES.update(p.local[1] for p in agent.paths.values()
                        if p.kind.name == "UDP" and p.local)


async def _agent(cluster: LocalCluster, upstream: str, name: str) -> tuple[Agent, Echoed]:
    priv = await _client(cluster, upstream)
    got = Echoed()
    settings = AgentSettings(
        private_key=priv, gateway_public_key=cluster.public_key, gateways=[cluster.udp],
        tcp_gateways=[cluster.tcp], upstream=upstream, local_udp=None,
        transports=["udp", "tcp"], params=replace(FAST, upstream=upstream), name=name)
    agent = Agent(settings, on_payload=got)
    await agent.start()
    await agent.wait_connected(10.0)
    _note_udp_sources(agent)
    return agent, got


async def _exchange(agent: Agent, got: Echoed, first: int, count: int = DATAGRAMS) -> None:
    """Send ``count`` numbered datagrams through the session; all must come back."""
    want = set(range(first, first + count))
    for seq in sorted(want):
        assert agent.send(seq.to_bytes(4, "big") + b"x" * 60)
        await asyncio.sleep(0.002)
    await wait_for(lambda: want <= got.seen, 5.0,
                   f"{agent.settings.name}: echoes {first}..{first + count - 1}")


def _metric(admin: str, name: str, labels: str) -> float:
    body = urllib.request.urlopen(f"http://{admin}/metrics", timeout=3).read().decode()
    total = 0.0
    for line in body.splitlines():
        if line.startswith(name + "{") and labels in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_up_renders_the_deploy_configs(cluster: LocalCluster) -> None:
    s = cluster.state
    assert len(s["gateways"]) == GATEWAYS
    assert {g["node_id"] for g in s["gateways"]} == {f"gw-{i}" for i in range(1, GATEWAYS + 1)}
    assert s["balancer"]["udp"] == s["balancer"]["tcp"]
    assert [p["role"] for p in s["processes"]] == ["store"] + ["gateway"] * GATEWAYS + ["balancer"]
    deploy = ROOT / "deploy"
    assert Path(s["deploy_dir"]) == deploy
    # Gateways run deploy/gateway.toml itself; nginx runs the rendered template whose js_path
    # is deploy/nginx, so jvpn.js is the very file the container mounts.
    for p in s["processes"]:
        if p["role"] == "gateway":
            assert p["argv"][p["argv"].index("--config") + 1] == str(deploy / "gateway.toml")
    conf = (cluster.run_dir / "nginx" / "nginx.conf").read_text()
    template = (deploy / "nginx" / "nginx.conf.template").read_text()
    values = nginx_values(
        listen=s["balancer"]["udp"], udp_servers=[g["udp"] for g in s["gateways"]],
        tcp_servers=[g["tcp"] for g in s["gateways"]],
        modules="\n".join(re.findall(r"^load_module .*;$", conf, re.M)),
        js_dir=str(deploy / "nginx"), pid=str(cluster.run_dir / "nginx" / "nginx.pid"),
        error_log=str(cluster.run_dir / "logs" / "nginx.error.log"),
        access_log=str(cluster.run_dir / "logs" / "nginx.access.log"),
        quic_listen=s["balancer"]["quic"], quic_servers=[g["quic"] for g in s["gateways"]],
        quic_nodes=[(g["quic_server_id"], g["quic"]) for g in s["gateways"]])
    assert conf == render_template(template, values)
    # Each node's QUIC server id is distinct and in the balancer's map (QUIC-LB routing).
    assert sorted(g["quic_server_id"] for g in s["gateways"]) == list(range(1, GATEWAYS + 1))
    directives = [line.split("#", 1)[0] for line in conf.splitlines()]
    assert any("hash $jvpn_route consistent;" in d for d in directives)
    assert not any("proxy_responses" in d for d in directives)  # docs/ARCHITECTURE.md, Cluster: leave it unset


def test_status_reports_every_process(cluster: LocalCluster) -> None:
    res = cluster.cli("status", "--json", timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(res.stdout)
    assert report["ok"] is True
    rows = {r["name"]: r for r in report["processes"]}
    assert set(rows) == {"redis", "nginx"} | {f"gw-{i}" for i in range(1, GATEWAYS + 1)}
    for i in range(1, GATEWAYS + 1):
        assert rows[f"gw-{i}"]["alive"] and rows[f"gw-{i}"]["detail"].startswith("/readyz 200")
    text = cluster.cli("status", timeout=30)
    assert text.returncode == 0 and "all up and ready" in text.stdout
    # A second `up` in the same run dir refuses and touches nothing.
    again = cluster.cli("up", "--port", "0", timeout=30)
    assert again.returncode == 1 and "already running" in again.stderr
    assert json.loads((cluster.run_dir / "cluster.json").read_text()) == cluster.state


def test_up_on_an_external_store(tmp_path: Path, redis_url: str) -> None:
    """--store-url: no redis-server of ours; an unreachable store fails before anything starts."""
    require_cluster_binaries()
    bad = LocalCluster(tmp_path / "bad")
    res = bad.cli("up", "--port", "0", "--store-url", "redis://127.0.0.1:1/0", timeout=30)
    assert res.returncode == 1 and "--store-url redis://127.0.0.1:1/0" in res.stderr
    assert bad.load().get("processes", []) == []
    c = LocalCluster(tmp_path / "ext")
    c.up("--gateways", "1", "--port", "0", "--store-url", redis_url, "--timeout", "30")
    try:
        assert c.store_url == redis_url and c.state["store_kind"] == "external"
        assert [p["role"] for p in c.state["processes"]] == ["gateway", "balancer"]
        # restart: the gateway gets a new pid; nginx is reloaded unless told not to.
        nginx_log = c.run_dir / "logs" / "nginx.error.log"
        nginx_pid = c.state["processes"][1]["pid"]
        for args, reloads in (((), 1), (("--no-reload",), 1), ((), 2)):
            pid = c.state["gateways"][0]["pid"]
            out = c.restart("gw-1", *args)
            assert c.state["gateways"][0]["pid"] != pid
            assert ("reloaded: fresh upstream health" in out) is not bool(args), out
            assert nginx_log.read_text().count("(SIGHUP) received") == reloads
        assert c.state["processes"][1]["pid"] == nginx_pid  # reloaded, never restarted
        # A configuration nginx would refuse: the gateway restarts, nginx is left alone
        # (tested first, never signalled), and the exit code and message say so.
        conf = c.run_dir / "nginx" / "nginx.conf"
        good = conf.read_text()
        conf.write_text(good + "\nthis is not a directive;\n")
        try:
            pid = c.state["gateways"][0]["pid"]
            res = c.cli("restart", "gw-1")
            c.reap()
            c.load()
        finally:
            conf.write_text(good)
        assert res.returncode == 3, res.stdout + res.stderr
        assert "gw-1 restarted, but nginx was NOT reloaded: nginx -t failed" in res.stderr
        assert c.state["gateways"][0]["pid"] != pid and "ready" in res.stdout
        assert nginx_log.read_text().count("(SIGHUP) received") == 2
    finally:
        c.down()
    assert c.alive() == []


async def test_datagrams_through_the_balancer(cluster: LocalCluster, echo: str) -> None:
    agents = [await _agent(cluster, echo, f"agent-{i}") for i in range(AGENTS)]
    try:
        await asyncio.gather(*(_exchange(a, got, 0) for a, got in agents))
        for a, _ in agents:
            st = a.status()
            assert st["state"] in LIVE_STATES
            # The agent only knows the balancer: every path goes to nginx's address.
            assert f"->{cluster.udp[0]}:{cluster.udp[1]}" in str(st["transport"])
        nodes = {str(a.status()["node"]) for a, _ in agents}
        assert nodes <= {g["node_id"] for g in cluster.state["gateways"]}
    finally:
        for a, _ in agents:
            await a.stop()


async def test_reattach_through_the_balancer_lands_on_one_node(
    cluster: LocalCluster, echo: str
) -> None:
    agent, got = await _agent(cluster, echo, "jumper")
    try:
        await _exchange(agent, got, 0)
        v0 = int(agent.status()["version"])
        # New UDP source port, then UDP -> TCP, then back to UDP: every new nginx flow
        # starts with a REATTACH_REQUEST, hashed by its session id.
        affine = []  # the jumps that started a new nginx flow
        for n, kind in enumerate(["udp", "tcp", "udp"], start=1):
            await agent.jump(kind, reason="jump")
            await wait_for(lambda n=n: len(agent.jumps) >= n, 5.0, f"reattach {n} ({kind})")
            jump = agent.jumps[-1]
            assert jump.to_transport.startswith(kind)
            assert jump.to_transport.endswith(f"->{cluster.udp[0]}:{cluster.udp[1]}")
            source = int(jump.to_transport.split(" ", 1)[1].split("->")[0].rsplit(":", 1)[1])
            if kind == "tcp" or source not in _UDP_SOURCES:
                affine.append(jump)
            _note_udp_sources(agent)
            await _exchange(agent, got, n * 1000)
        st = agent.status()
        assert st["state"] in LIVE_STATES and int(st["version"]) > v0
        assert len(affine) >= 2  # the TCP jump always, and a reused UDP port is rare
        nodes = {j.node for j in affine}
        assert len(nodes) == 1, f"session-affine routing broke: reattaches landed on {nodes}"
        node = nodes.pop()
        admin = next(g["admin"] for g in cluster.state["gateways"]
                     if g["node_id"] == node_name(node))
        landed = sum(j.node == node for j in agent.jumps)  # 3, but for a reused UDP port
        assert _metric(admin, "jvpn_transport_switch_total", 'reason="reattach"') >= landed
    finally:
        await agent.stop()


def _gateway_accepts_cluster_urls() -> bool:
    from gateway.config import load_gateway_config
    from settings import ConfigError

    try:
        load_gateway_config(None, env={}, overrides={"store_url": "redis+cluster://h:1,h:2"})
    except ConfigError:
        return False
    return True


async def test_redis_cluster_store(tmp_path: Path, echo: str) -> None:
    """`up --redis-cluster`: a 6-node Redis Cluster as the store, once jvpn-gateway accepts
    redis+cluster:// URLs; until then a clear error before anything starts."""
    require_cluster_binaries()
    c = LocalCluster(tmp_path / "run")
    args = ("--gateways", "2", "--port", "0", "--redis-cluster", "--timeout", "30")
    if not _gateway_accepts_cluster_urls():
        res = c.cli("up", *args)
        assert res.returncode == 1
        assert "does not accept a redis+cluster:// store URL" in res.stderr
        assert not (c.run_dir / "cluster.json").exists()  # nothing was started
        return
    await asyncio.to_thread(c.up, *args)
    try:
        assert c.store_url.startswith("redis+cluster://")
        assert sum(p["role"] == "store" for p in c.state["processes"]) == 6
        agent, got = await _agent(c, echo, "on-cluster")
        try:
            await _exchange(agent, got, 0)
            await agent.jump("tcp", reason="jump")
            await wait_for(lambda: len(agent.jumps) >= 1, 5.0, "reattach over TCP")
            await _exchange(agent, got, 1000)
        finally:
            await agent.stop()
    finally:
        await asyncio.to_thread(c.down)
    assert c.alive() == []


def test_down_leaves_no_process(cluster: LocalCluster) -> None:
    nginx = next(p for p in cluster.state["processes"] if p["role"] == "balancer")
    workers = [int(x) for x in _children(nginx["pid"])]
    assert workers, "nginx master has no worker"
    res = cluster.down()
    assert res is not None and res.returncode == 0, res and (res.stdout + res.stderr)
    assert cluster.alive() == []
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or _state(pid) in ("Z", "X")
    status = cluster.cli("status", "--json", timeout=30)
    assert status.returncode == 1
    assert not any(r["alive"] for r in json.loads(status.stdout)["processes"])


def _children(pid: int) -> list[str]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                rest = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(rest[1]) == pid:
                out.append(entry.name)
    return out


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return "X"
