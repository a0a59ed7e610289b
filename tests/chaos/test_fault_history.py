"""Randomized faults over three gateways behind the balancer, checked by the history check.

Setup: ``jvpn-lab cluster up`` with three gateways and nginx; agents reach the
cluster only through nginx, send numbered datagrams to a UDP echo every 20 ms,
and append their epoch installs to records files. A seeded schedule
(``JVPN_CHAOS_SEED``) injects one fault at a time, bounded in count and time:
kill -9 of a gateway (restarted a moment later, nginx reloaded), SIGSTOP past
the lease then SIGCONT, Redis paused (SIGSTOP/SIGCONT of redis-server), forced
jumps (new UDP port, UDP -> TCP), agent crashes (a new agent, new session, for
the same key; the old session is left to the cluster). Every gateway's events
file and every agent's records then go through ``history.check``
(``jvpn audit check``): 0 violations, with the figures reported: binding
decisions, interruptions (echo gaps), how long agents waited for a healthy
node while one existed (target: 1 s), security alerts (0 in this honest run).

The CI run lasts ``RUN_S``; the long run (``-m long``, ``make test-long``) lasts
``JVPN_HISTORY_LONG_S`` (default 900 s) with more agents, for >= 10^4 decisions.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from agent.agent import Agent, AgentSettings
from history.check import Report, check
from instruments.cluster import is_alive
from instruments.netsim import UdpEcho
from jvpn.check import Loaded, load_files, sessions_of, store_views
from store.api import SessionStore
from tests.chaos.conftest import (
    Echoes,
    Traffic,
    gateway_proc,
    signal_gateway,
    start_agents,
    stop_agents,
)
from tests.support.harness import wait_for
from tests.support.local_cluster import LocalCluster

SEED = int(os.environ.get("JVPN_CHAOS_SEED", "20261206"))
RUN_S = 60.0
LONG_S = float(os.environ.get("JVPN_HISTORY_LONG_S", "900"))
HEALTHY_NODE_TARGET_S = 1.0
REATTACH_TIMEOUT_S = 0.15  # behind the balancer: one unanswered try, then the next route
GATEWAYS = ("gw-1", "gw-2", "gw-3")


@dataclass
class Fault:
    kind: str
    node: str
    start: float
    end: float = 0.0


def _history_agent(records: Path) -> Callable[[AgentSettings, Echoes], Agent]:
    def make(settings: AgentSettings, got: Echoes) -> Agent:
        settings = replace(settings, records_file=str(records / f"{settings.name}.jsonl"),
                           params=replace(settings.params, reattach_retries=0,
                                          reattach_timeout=REATTACH_TIMEOUT_S))
        return Agent(settings, on_payload=got)
    return make


def _signal_store(cluster: LocalCluster, sig: int) -> None:
    p = next(p for p in cluster.state["processes"] if p["role"] == "store")
    assert is_alive(p["pid"], p["start_ticks"]), "redis-server is not running"
    os.kill(p["pid"], sig)


def _resume_gateway(cluster: LocalCluster, node: str) -> None:
    p = gateway_proc(cluster, node)
    if is_alive(p["pid"], p["start_ticks"]):
        os.kill(p["pid"], signal.SIGCONT)


class ChaosRun:
    """One seeded run: agents, traffic, the fault schedule, what was measured."""

    def __init__(self, cluster: LocalCluster, upstream: str, records: Path, seed: int) -> None:
        self.cluster = cluster
        self.upstream = upstream
        self.records = records
        self.rng = random.Random(seed)
        self.faults: list[Fault] = []
        self.agents: list[tuple[Agent, Echoes]] = []
        self.retired: list[tuple[Agent, Echoes]] = []
        self.crashes = 0
        self.lifetimes: dict[int, tuple[float, float]] = {}  # id(echoes) -> its agent's life
        self.t0 = time.monotonic()

    async def start(self, n: int) -> None:
        self.agents = await start_agents(self.cluster, self.upstream, n,
                                         make=_history_agent(self.records))

    async def _jumps(self) -> None:
        for a, _ in self.rng.sample(self.agents, k=min(len(self.agents), self.rng.randint(2, 6))):
            if a.machine.attached:
                await a.jump(self.rng.choice(("udp", "udp", "tcp")), reason="chaos")

    async def _crash_agent(self) -> None:
        i = self.rng.randrange(len(self.agents))
        old, got = self.agents[i]
        await old.stop(close_session=False)  # a crash: no CLOSE, the session is left behind
        self.lifetimes[id(got)] = (self.lifetimes.get(id(got), (0.0, 0.0))[0], time.monotonic())
        self.crashes += 1
        settings = replace(old.settings, name=f"{old.settings.name.split('.')[0]}.{self.crashes}",
                           records_file=None)
        echoes = Echoes()
        fresh = _history_agent(self.records)(settings, echoes)
        await fresh.start()
        self.retired.append((old, got))
        self.agents[i] = (fresh, echoes)
        try:  # its handshake may meet the next fault; it keeps trying (checked at the end)
            await fresh.wait_connected(10.0)
        except TimeoutError:
            pass
        self.lifetimes[id(echoes)] = (time.monotonic(), float("inf"))

    async def fault(self) -> None:
        """One fault, chosen by the seed, bounded in time; gateways are back at the end."""
        kind = self.rng.choice(("kill9", "sigstop", "redis_pause", "jumps", "jumps",
                                "agent_crash"))
        node = self.rng.choice(GATEWAYS)
        f = Fault(kind, node, time.monotonic())
        self.faults.append(f)
        if kind == "kill9":
            signal_gateway(self.cluster, node, signal.SIGKILL)
            await asyncio.sleep(self.rng.uniform(0.5, 1.5))
            await asyncio.to_thread(self.cluster.restart, node)
        elif kind == "sigstop":
            signal_gateway(self.cluster, node, signal.SIGSTOP)
            try:
                await asyncio.sleep(self.rng.uniform(1.5, 2.5))  # past the 1 s lease
            finally:
                _resume_gateway(self.cluster, node)
        elif kind == "redis_pause":
            _signal_store(self.cluster, signal.SIGSTOP)
            try:
                await asyncio.sleep(self.rng.uniform(0.3, 1.2))
            finally:
                _signal_store(self.cluster, signal.SIGCONT)
        elif kind == "jumps":
            await self._jumps()
        else:
            await self._crash_agent()
        f.end = time.monotonic()

    async def run(self, duration: float) -> None:
        deadline = time.monotonic() + duration
        while time.monotonic() < deadline:
            await self.fault()
            quiet = self.rng.uniform(0.5, 1.5)  # faults one at a time, some calm between
            await asyncio.sleep(min(quiet, max(0.0, deadline - time.monotonic())))
            for _ in range(3):  # and forced jumps in the calm too (binding decisions)
                await self._jumps()

    def waits_for_a_healthy_node(self) -> list[tuple[float, str, str]]:
        """Recovery latencies (loss noticed -> ACK) that began while one gateway was killed
        or paused and the store was up: a healthy node existed the whole time. Each with
        its agent and what it was (for the ones over the target)."""
        node_faults = [f for f in self.faults if f.kind in ("kill9", "sigstop")]
        store_down = [f for f in self.faults if f.kind == "redis_pause"]
        out = []
        for a, _ in self.agents + self.retired:
            for j in a.jumps:
                if j.reason != "recover":
                    continue
                began = j.at - j.latency
                during = [f for f in node_faults if f.start <= began <= f.end + 0.5]
                if not during:
                    continue
                if any(f.start - 3.0 <= began <= f.end + 3.0 for f in store_down):
                    continue
                f = during[0]
                out.append((j.latency, a.settings.name,
                            f"{f.kind} {f.node} at +{f.start - self.t0:.1f} s, loss noticed "
                            f"+{began - f.start:.2f} s into it, carried by {j.node} "
                            f"{j.to_transport} v{j.version} epoch {j.epoch}"))
        return out


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] if s else 0.0


def _load(cluster: LocalCluster, records: Path) -> Loaded:
    """Every gateway's events file and every agent's records."""
    files = [str(p) for p in (cluster.run_dir / "logs").glob("*.events.jsonl")]
    files += [str(p) for p in records.glob("*.jsonl")]
    return load_files(files)


async def _history(cluster: LocalCluster, records: Path) -> Report:
    loaded = await asyncio.to_thread(_load, cluster, records)
    store = SessionStore.from_url(cluster.store_url, registry_key=cluster.registry_key)
    try:
        views = await store_views(store, sessions_of(loaded.records))
    finally:
        await store.close()
    return check(loaded.records, views, bad_records=loaded.bad)


async def _run(chaos_cluster: Callable[..., LocalCluster], echo: tuple[UdpEcho, str],
               figure: Callable[..., None], tmp_path: Path, duration: float, agents: int,
               min_decisions: int, label: str) -> None:
    cluster = await asyncio.to_thread(chaos_cluster, 3)
    _, upstream = echo
    records = tmp_path / "records"
    records.mkdir()
    run = ChaosRun(cluster, upstream, records, SEED)
    await run.start(agents)
    traffic = Traffic(run.agents).start()
    t0 = time.monotonic()
    try:
        await run.run(duration)
        for node in GATEWAYS:  # every gateway up again (a fault may have ended with one down)
            p = gateway_proc(cluster, node)
            if not is_alive(p["pid"], p["start_ticks"]):
                await asyncio.to_thread(cluster.restart, node)
        await wait_for(lambda: all(a.machine.attached for a, _ in run.agents), 15.0,
                       "every agent attached after the faults")
        await asyncio.sleep(1.0)
        t1 = time.monotonic()
    finally:
        await traffic.stop()
        await stop_agents(run.agents)
    await asyncio.sleep(1.0)  # the gateways' last records reach their files
    report = await _history(cluster, records)
    print(report.summary())
    gaps = []
    for _, got in run.agents + run.retired:
        born, died = run.lifetimes.get(id(got), (t0, t1))
        gaps += _gaps(got, max(t0, born), min(t1, died))
    detailed = sorted(run.waits_for_a_healthy_node(), reverse=True)
    waits = [w for w, _, _ in detailed]
    for w, agent, what in detailed[:5]:  # the longest, to say what limits them
        print(f"wait for a healthy node {w:.3f} s: {agent}: {what}")
    kinds: dict[str, int] = {}
    for f in run.faults:
        kinds[f.kind] = kinds.get(f.kind, 0) + 1
    figure(f"{label}_binding_decisions", report.decisions, "decisions", seed=SEED,
           seconds=f"{t1 - t0:.0f}", agents=agents, faults=kinds, violations=0 if report.ok
           else sum(report.violations.values()), grants=report.counts["begin"],
           ends=report.counts["end"], refusals=report.counts["store_refusals"],
           lost_with_crash=report.counts["lost_with_crash"],
           security_alerts=sum(report.security.values()))
    figure(f"{label}_interruptions_p99", _pct(gaps, 0.99), "s", n=len(gaps),
           p50=f"{_pct(gaps, 0.5):.3f}", p90=f"{_pct(gaps, 0.9):.3f}",
           max=f"{max(gaps, default=0):.3f}", histogram=_histogram(gaps))
    figure(f"{label}_wait_for_a_healthy_node_max", max(waits, default=0.0), "s",
           target=HEALTHY_NODE_TARGET_S, n=len(waits), p50=f"{_pct(waits, 0.5):.3f}",
           p90=f"{_pct(waits, 0.9):.3f}",
           over_target=sum(w > HEALTHY_NODE_TARGET_S for w in waits))
    assert report.ok, report.summary()
    assert report.decisions >= min_decisions, report.summary()
    assert not report.security, f"security alerts in an honest run: {dict(report.security)}"


GAP_EDGES = (0.1, 0.25, 0.5, 1.0, 2.0)  # s: the interruption histogram's intervals


def _histogram(gaps: list[float]) -> str:
    """How many interruptions fell in each interval: "0.1-0.25 s: n, ..., > 2 s: n"."""
    pairs = list(zip(GAP_EDGES, GAP_EDGES[1:], strict=False))
    parts = [f"{lo:g}-{hi:g} s: {sum(lo < g <= hi for g in gaps)}" for lo, hi in pairs]
    return ", ".join([*parts, f"> {GAP_EDGES[-1]:g} s: {sum(g > GAP_EDGES[-1] for g in gaps)}"])


def _gaps(got: Echoes, start: float, end: float, floor: float = 0.1) -> list[float]:
    """Every interruption of an agent's echoes longer than ``floor`` within [start, end]."""
    ts = [start] + [t for t in got.times if start < t < end] + [end]
    return [b - a for a, b in zip(ts, ts[1:], strict=False) if b - a > floor]


@pytest.mark.timeout(240)
async def test_randomized_faults_leave_a_correct_history(
        chaos_cluster: Callable[..., LocalCluster], echo: tuple[UdpEcho, str],
        figure: Callable[..., None], tmp_path: Path) -> None:
    await _run(chaos_cluster, echo, figure, tmp_path, RUN_S, 12, 500, "history")


@pytest.mark.long
@pytest.mark.timeout(LONG_S + 300)
async def test_randomized_faults_long_run(
        chaos_cluster: Callable[..., LocalCluster], echo: tuple[UdpEcho, str],
        figure: Callable[..., None], tmp_path: Path) -> None:
    await _run(chaos_cluster, echo, figure, tmp_path, LONG_S, 20, 10_000, "history_long")


@pytest.mark.timeout(120)
async def test_agents_behind_a_paused_node_reach_a_healthy_one_within_a_second(
        chaos_cluster: Callable[..., LocalCluster], echo: tuple[UdpEcho, str],
        figure: Callable[..., None], tmp_path: Path) -> None:
    """The balancer keeps hashing a paused gateway's sessions to it; its agents ask again
    with the next route hint and are carried by another node long before it resumes."""
    cluster = await asyncio.to_thread(chaos_cluster, 3)
    _, upstream = echo
    records = tmp_path / "records"
    records.mkdir()
    agents = await start_agents(cluster, upstream, 9, make=_history_agent(records))
    traffic = Traffic(agents).start()
    pause_s = 3.0
    try:
        # Settle every session on its session-id node (its first flow was hashed by address).
        await asyncio.gather(*(a.jump("udp", reason="settle") for a, _ in agents))
        await wait_for(lambda: all(a.jumps for a, _ in agents), 10.0, "settle jumps")
        await asyncio.sleep(0.5)
        counts: dict[str, int] = {}
        for a, _ in agents:
            counts[str(a.status()["node"])] = counts.get(str(a.status()["node"]), 0) + 1
        victim = max(counts, key=lambda n: counts[n])
        behind = [a for a, _ in agents if a.status()["node"] == victim]
        before = {id(a): len(a.jumps) for a in behind}
        name = victim.split("#")[0]
        t_stop = time.monotonic()
        signal_gateway(cluster, name, signal.SIGSTOP)
        try:
            await wait_for(lambda: all(len(a.jumps) > before[id(a)] for a in behind),
                           pause_s - 0.5, "agents of the paused node carried elsewhere")
            t_moved = time.monotonic()
            await asyncio.sleep(max(0.0, pause_s - (t_moved - t_stop)))
        finally:
            _resume_gateway(cluster, name)
        waits = [j.latency for a in behind for j in a.jumps[before[id(a)]:]
                 if j.reason == "recover"]
    finally:
        await traffic.stop()
        await stop_agents(agents)
    figure("paused_node_wait_for_a_healthy_node_max", max(waits), "s", agents=len(behind),
           pause_s=pause_s, target=HEALTHY_NODE_TARGET_S, p50=f"{_pct(waits, 0.5):.3f}",
           all=",".join(f"{w:.2f}" for w in sorted(waits)))
    assert len(waits) >= len(behind)
    assert _pct(waits, 0.5) <= HEALTHY_NODE_TARGET_S, waits
    assert max(waits) < pause_s - 0.5, waits
