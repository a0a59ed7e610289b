"""Chaos tests: real ``jvpn-gateway`` processes (``jvpn-lab cluster up``), faults injected by pid.

Shared pieces:

- ``chaos_cluster(n, *args)``: a ``LocalCluster`` with short timings (keepalive
  0.1 s, lease 1 s), stopped (``down``) after the test; only the pids it recorded
  are ever signalled.
- ``figure(name, value, unit, **detail)``: prints ``FIGURE: ...`` and appends the
  figure to ``<pytest base temp>/chaos-figures.json`` (and to
  ``$JVPN_CHAOS_FIGURES`` if set), so BENCHMARKS.md can quote it.
- ``Traffic``: numbered datagrams from each agent every ``interval`` seconds,
  echoed back; records when each echo arrived, to measure interruptions.
- After every test, once its cluster is down, the history check (``history``,
  ``jvpn audit check``) runs over every gateway's events file: a chaos test
  passes only if the binding decisions it caused form a correct history.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from agent.agent import Agent, AgentSettings
from instruments.cluster import is_alive
from instruments.netsim import UdpEcho
from jvpn.check import check_files
from session.client import ClientParams
from session.noise import generate_keypair
from store.api import SessionStore
from store.policy import ClientPolicy
from tests.support.harness import FAST
from tests.support.local_cluster import LocalCluster, require_cluster_binaries

KEEPALIVE_S = 0.1
LEASE_S = 1.0
FAST_SETS = (f"keepalive_interval_s={KEEPALIVE_S}", f"lease_s={LEASE_S}", "sweep_interval_s=0.2",
             "handshake_retry_threshold=-1", "log_level=WARNING")
PARAMS: ClientParams = FAST  # keepalive 0.1 s, dead after 3, reattach timeout 0.25 s


@pytest.fixture
def chaos_cluster(tmp_path: Path) -> Iterator[Callable[..., LocalCluster]]:
    """Factory: ``chaos_cluster(n, *extra up args)`` -> a running cluster; all stopped after."""
    require_cluster_binaries()
    made: list[LocalCluster] = []

    def make(n: int = 3, *extra: str, name: str = "run") -> LocalCluster:
        c = LocalCluster(tmp_path / name)
        made.append(c)
        sets = [a for s in FAST_SETS for a in ("--set", s)]
        c.up("--gateways", str(n), "--port", "0", "--timeout", "30", *sets, *extra, timeout=90)
        return c

    down: dict[int, list[str]] = {}
    try:
        yield make
    finally:
        for c in made:
            down[id(c)] = [p["name"] for p in c.state.get("processes", [])  # killed, not back
                           if p.get("role") == "gateway"
                           and not is_alive(p["pid"], p["start_ticks"])]
            for p in c.state.get("processes", []):  # a paused process cannot stop: resume it
                if is_alive(p["pid"], p["start_ticks"]):
                    try:
                        os.kill(p["pid"], signal.SIGCONT)
                    except ProcessLookupError:
                        pass
            c.down()
    for c in made:  # the gateways stopped: their records are all in their files
        report = check_files([str(p) for p in (c.run_dir / "logs").glob("*.events.jsonl")],
                             down=down.get(id(c), []))
        print(f"history check ({c.run_dir.name}): {report.summary()}")
        assert report.ok, f"the history of this run is not correct:\n{report.summary()}"


@pytest.fixture
def figure(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> Callable[..., None]:
    """Record one figure of this test: a ``FIGURE:`` line and a JSON entry."""
    def record(name: str, value: float, unit: str, **detail: Any) -> None:
        extra = " ".join(f"{k}={v}" for k, v in detail.items())
        print(f"FIGURE: {name} = {value:.4g} {unit} ({request.node.name}) {extra}".rstrip())
        entry = {"test": request.node.nodeid, "name": name, "value": value, "unit": unit,
                 "detail": detail, "at": time.time()}
        paths = [tmp_path_factory.getbasetemp() / "chaos-figures.json"]
        if os.environ.get("JVPN_CHAOS_FIGURES"):
            paths.append(Path(os.environ["JVPN_CHAOS_FIGURES"]))
        for path in paths:
            data = json.loads(path.read_text()) if path.exists() else []
            data.append(entry)
            path.write_text(json.dumps(data, indent=2) + "\n")
    return record


@pytest.fixture
async def echo() -> AsyncIterator[tuple[UdpEcho, str]]:
    proto, addr = await UdpEcho.start()
    try:
        yield proto, f"{addr[0]}:{addr[1]}"
    finally:
        proto.close()


async def register_client(cluster: LocalCluster, upstream: str) -> bytes:
    """A fresh client key allowed to reach ``upstream`` (generous reattach rate)."""
    priv, pub = generate_keypair()
    store = SessionStore.from_url(cluster.store_url, registry_key=cluster.registry_key)
    try:
        await store.add_client(ClientPolicy(pub, upstreams=(upstream,), name="chaos",
                                            reattach_rate=10_000))
    finally:
        await store.close()
    return priv


class Echoes:
    """Arrival times (monotonic) of an agent's echoed datagrams, by sequence number."""

    def __init__(self) -> None:
        self.at: dict[int, float] = {}
        self.times: list[float] = []

    def __call__(self, data: bytes) -> None:
        now = time.monotonic()
        self.at.setdefault(int.from_bytes(data[:4], "big"), now)
        self.times.append(now)

    def longest_gap(self, start: float, end: float) -> float:
        """The longest time without an echo within [start, end] (edges count as echoes)."""
        ts = [start] + [t for t in self.times if start < t < end] + [end]
        return max(b - a for a, b in zip(ts, ts[1:], strict=False))

    def last_before(self, t: float) -> float | None:
        before = [x for x in self.times if x <= t]
        return before[-1] if before else None

    def first_after(self, t: float) -> float | None:
        return next((x for x in self.times if x > t), None)


def agent_settings(cluster: LocalCluster, priv: bytes, upstream: str, name: str,
                   udp: list[tuple[str, int]] | None = None,
                   tcp: list[tuple[str, int]] | None = None) -> AgentSettings:
    """An agent of this cluster: through the balancer unless ``udp``/``tcp`` are given."""
    return AgentSettings(
        private_key=priv, gateway_public_key=cluster.public_key,
        gateways=udp if udp is not None else [cluster.udp],
        tcp_gateways=tcp if tcp is not None else [cluster.tcp], upstream=upstream,
        local_udp=None, transports=["udp", "tcp"], params=replace(PARAMS, upstream=upstream),
        name=name)


async def start_agents(cluster: LocalCluster, upstream: str, count: int,
                       make: Callable[[AgentSettings, Echoes], Agent] | None = None,
                       **where: Any) -> list[tuple[Agent, Echoes]]:
    """``count`` connected agents (each with its own client key)."""
    privs = await asyncio.gather(*(register_client(cluster, upstream)
                                   for _ in range(count)))
    out = []
    for i, priv in enumerate(privs):
        got = Echoes()
        settings = agent_settings(cluster, priv, upstream, f"agent-{i}", **where)
        agent = make(settings, got) if make else Agent(settings, on_payload=got)
        await agent.start()
        out.append((agent, got))
    await asyncio.gather(*(a.wait_connected(10.0) for a, _ in out))
    return out


class Traffic:
    """Every agent sends a numbered 64-byte datagram each ``interval`` s until stopped."""

    def __init__(self, agents: list[tuple[Agent, Echoes]], interval: float = 0.02) -> None:
        self.agents = agents
        self.interval = interval
        self.sent = [0] * len(agents)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> Traffic:
        self._task = asyncio.ensure_future(self._run())
        return self

    async def _run(self) -> None:
        while True:
            for i, (agent, _) in enumerate(self.agents):
                agent.send(self.sent[i].to_bytes(4, "big") + b"c" * 60)
                self.sent[i] += 1
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass


async def stop_agents(agents: list[tuple[Agent, Echoes]]) -> None:
    for a, _ in agents:
        await a.stop()


def gateway_proc(cluster: LocalCluster, node: str) -> dict[str, Any]:
    """The recorded process of gateway ``node`` (pid + start ticks)."""
    return next(p for p in cluster.state["processes"] if p["name"] == node)


def signal_gateway(cluster: LocalCluster, node: str, sig: int) -> int:
    """Send ``sig`` to the gateway this test's cluster started (checked by start time)."""
    p = gateway_proc(cluster, node)
    assert is_alive(p["pid"], p["start_ticks"]), f"{node} (pid {p['pid']}) is not running"
    os.kill(p["pid"], sig)
    return int(p["pid"])


def read_events(cluster: LocalCluster, node: str) -> list[dict[str, Any]]:
    """The JSON-lines events gateway ``node`` wrote (``events.file`` set by the launcher)."""
    path = cluster.run_dir / "logs" / f"{node}.events.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a torn last line of a killed process
    return out


def action(ev: dict[str, Any]) -> str:
    return str(ev.get("event", {}).get("action", ""))
