"""``make bench-cluster``: cluster figures, each beside a baseline measured in the same run.

Theory of operation. The cluster is the one ``jvpn-lab cluster up`` starts (one
redis-server, N ``jvpn-gateway`` processes from ``deploy/gateway.toml``, nginx
with the deploy template), in a throwaway run directory; the load generator
and the agents run in this process, and the load code is ``instruments.bench``'s
(imported, not copied), so the figures compare with ``make bench``:

- Reattach scaling: ``bench.ReattachLoad`` sessions split over the direct UDP
  ports of 1, 2, then 3 gateways (the others idle), beside the raw Redis
  ceiling for the same script (``bench.raw_pipelined``: pre-packed EVALSHA
  pipelines of reattach.lua, the same number of calls per session).
- Node death: agents (keepalive 0.1 s, dead after 3) send a datagram every
  20 ms through nginx; one gateway is SIGKILLed; for every session it held,
  the interruption is the longest time without an echo from the last echo
  before the kill on. p50/p99/max beside the target (every session flowing
  again within 1 s) and the detection floor (dead_after x keepalive).
- Datagrams: ``bench.Flow`` (1400-byte payloads, bounded window) through the
  nginx balancer beside the same flow straight to one gateway (target >= 60%).
- Durable mode: reattach.lua latency through ``SessionStore`` with
  ``StoreConfig(wait_replicas=1)`` (WAIT after the CAS) beside the default, one
  call at a time, against a redis-server with one replica started here.

Every process is started by this run and stopped by pid at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from instruments import bench
from instruments.cluster import (
    ClusterState,
    Launcher,
    UpOptions,
    _children,
    default_deploy_dir,
    down,
    find_binary,
    is_alive,
)
from session.noise import generate_keypair
from store.api import SessionStore, StoreConfig
from store.embedded import free_port
from store.policy import ClientPolicy

TARGET_INTERRUPTION_S = 1.0
TARGET_BALANCER_RATIO = 0.60
FAST_SETS = ("keepalive_interval_s=0.1", "lease_s=1.0", "handshake_retry_threshold=-1",
             "log_level=WARNING")
BENCH_SETS = ("silence_keepalives=1000", "handshake_retry_threshold=-1", "log_level=WARNING")


@dataclass
class ClusterBenchOptions:
    sessions: int = 300
    seconds: float = 4.0
    warmup: float = 1.0
    repeat: int = 3
    agents: int = 60
    window: int = 64
    payload: int = bench.PAYLOAD_SIZE
    wait_calls: int = 2000
    only: tuple[str, ...] = ("reattach", "failover", "datagram", "durable")

    @classmethod
    def quick(cls) -> ClusterBenchOptions:
        return cls(sessions=120, seconds=1.5, warmup=0.5, repeat=1, agents=30, wait_calls=500)


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


class Cluster:
    """``jvpn-lab cluster up`` in-process (same Launcher), stopped by its recorded pids."""

    def __init__(self, root: Path, name: str, gateways: int, sets: tuple[str, ...]) -> None:
        self.run_dir = root / name
        self.opts = UpOptions(run_dir=self.run_dir, deploy_dir=default_deploy_dir(),
                              gateways=gateways, port=0, gateway_sets=list(sets), timeout=30.0)
        self.launcher: Launcher | None = None
        self.state: ClusterState | None = None

    def __enter__(self) -> Cluster:
        self.launcher = Launcher(self.opts)
        self.state = self.launcher.up()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.state is not None:
            down(self.run_dir)
            if self.launcher is not None:
                self.launcher._reap()

    @property
    def st(self) -> ClusterState:
        assert self.state is not None
        return self.state

    @property
    def public(self) -> bytes:
        return bytes.fromhex(self.st.gateway_public_key)

    @property
    def registry_key(self) -> bytes:
        """The key MACing the registry, from the launcher's KEK file."""
        from session.keys import registry_key
        from settings import decode_key

        return registry_key(decode_key((self.run_dir / "keys" / "kek.key").read_text()))

    def pid(self, name: str) -> int:
        return next(p.pid for p in self.st.processes if p.name == name)

    def kill(self, name: str) -> None:
        p = next(p for p in self.st.processes if p.name == name)
        if is_alive(p.pid, p.start_ticks):
            os.kill(p.pid, signal.SIGKILL)


# ---- reattach scaling ------------------------------------------------------------------------


async def bench_reattach_scaling(o: ClusterBenchOptions, root: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"sessions": o.sessions, "seconds": o.seconds, "repeat": o.repeat}
    with Cluster(root, "reattach", 3, BENCH_SETS) as c:
        store = SessionStore.from_url(c.st.store_url, registry_key=c.registry_key)
        host, port = _addr(c.st.store_url.split("://", 1)[1].split("/", 1)[0])
        priv, pub = generate_keypair()
        policy = ClientPolicy(pub, name="bench-cluster", ttl_s=bench.BENCH_TTL_S,
                              reattach_rate=bench.BENCH_RATE, upstreams=("127.0.0.1:9",))
        try:
            await store.add_client(policy)
            gws = [_addr(g.udp) for g in c.st.gateways]
            pids = {g.node_id: g.pid for g in c.st.gateways}
            for k in (1, 2, 3):
                runs = []
                for rep in range(o.repeat):
                    loads = [bench.ReattachLoad(gws[i], c.public, priv, policy.upstreams[0])
                             for i in range(k)]
                    try:
                        share = [o.sessions // k + (1 if i < o.sessions % k else 0)
                                 for i in range(k)]
                        await asyncio.gather(*(ld.open(n) for ld, n in zip(loads, share,
                                                                              strict=True)))
                        cpu = bench.CpuMeter({**pids, "redis": c.pid("redis"),
                                              "loadgen": os.getpid()})
                        res = await asyncio.gather(*(ld.run(o.warmup, o.seconds) for ld in loads))
                        usage = cpu.read()
                    finally:
                        for ld in loads:
                            ld.close()
                    rate = sum(r["rate"] for r in res)
                    p99 = max(r["p99_ms"] for r in res)
                    ops = sum(r["ops"] for r in res) / max(1, o.sessions)
                    rounds = max(1, round(ops))
                    sids = await bench._birth_sessions(store, o.sessions, policy)
                    raw = await bench.raw_pipelined(store, host, port, sids, rounds)
                    runs.append({"rate": rate, "p99_ms": p99, "raw": raw["rate"], "cpu": usage})
                    say(f"  reattach {k} gateway(s) {rep + 1}/{o.repeat}: {rate:,.0f}/s "
                        f"(p99 {p99:.1f} ms), raw redis {raw['rate']:,.0f}/s; cpu {usage}")
                rate = bench.median([r["rate"] for r in runs])
                raw_rate = bench.median([r["raw"] for r in runs])
                out[f"gateways_{k}"] = {
                    "rate": rate, "p99_ms": bench.median([r["p99_ms"] for r in runs]),
                    "raw_redis_rate": raw_rate, "ratio": bench._ratio(rate, raw_rate),
                    "cpu": runs[len(runs) // 2]["cpu"]}
        finally:
            await store.close()
    one = out["gateways_1"]["rate"]
    for k in (2, 3):
        out[f"gateways_{k}"]["scaling"] = bench._ratio(out[f"gateways_{k}"]["rate"], one)
    return out


# ---- node death ------------------------------------------------------------------------------


def _stamp(times: list[float]) -> Callable[[bytes], None]:
    """An on_payload that records when each echo arrived."""
    def on_payload(_data: bytes) -> None:
        times.append(time.monotonic())
    return on_payload


async def bench_failover(o: ClusterBenchOptions, root: Path) -> dict[str, Any]:
    from agent.agent import Agent, AgentSettings
    from instruments.netsim import UdpEcho
    from session.client import ClientParams

    params = ClientParams(keepalive_interval=0.1, dead_after=3, handshake_timeout=0.5,
                          reattach_timeout=0.25, backoff_initial=0.05, backoff_max=0.5)
    with Cluster(root, "failover", 3, FAST_SETS) as c:
        echo, addr = await UdpEcho.start()
        upstream = f"{addr[0]}:{addr[1]}"
        store = SessionStore.from_url(c.st.store_url, registry_key=c.registry_key)
        agents: list[tuple[Agent, list[float]]] = []
        try:
            for i in range(o.agents):
                priv, pub = generate_keypair()
                await store.add_client(ClientPolicy(pub, upstreams=(upstream,),
                                                    reattach_rate=10_000))
                times: list[float] = []
                settings = AgentSettings(
                    private_key=priv, gateway_public_key=c.public,
                    gateways=[_addr(c.st.balancer["udp"])], tcp_gateways=[_addr(c.st.balancer["tcp"])],
                    upstream=upstream, local_udp=None, transports=["udp", "tcp"],
                    params=replace(params, upstream=upstream), name=f"a{i}")
                a = Agent(settings, on_payload=_stamp(times))
                await a.start()
                agents.append((a, times))
            await asyncio.gather(*(a.wait_connected(10) for a, _ in agents))
            # Settle on the session-id node (the first flow is hashed by address).
            await asyncio.gather(*(a.jump("udp", reason="settle") for a, _ in agents))
            await asyncio.sleep(1.0)

            async def traffic() -> None:
                n = 0
                while True:
                    for a, _ in agents:
                        a.send(n.to_bytes(4, "big") + b"x" * 60)
                    n += 1
                    await asyncio.sleep(0.02)
            task = asyncio.ensure_future(traffic())
            try:
                await asyncio.sleep(1.0)
                counts: dict[str, int] = {}
                for a, _ in agents:
                    counts[str(a.status()["node"])] = counts.get(str(a.status()["node"]), 0) + 1
                victim = max(counts, key=lambda n: counts[n])
                held = [(a, t) for a, t in agents if a.status()["node"] == victim]
                t_kill = time.monotonic()
                c.kill(victim)
                for _ in range(300):  # at most 15 s
                    if all(any(x > t_kill for x in t) and a.status()["node"] != victim
                           for a, t in held):
                        break
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.5)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            # The interruption: the longest time without an echo from the last one before
            # the kill to the end (echoes already in flight at the kill arrive just after it).
            t_end = time.monotonic()
            gaps = []
            for _, t in held:
                ts = [x for x in t if x <= t_kill][-1:] + [x for x in t if x > t_kill]
                if len(ts) < 2 or not any(x > t_kill + 0.05 for x in ts):
                    gaps.append(float("inf"))
                    continue
                gaps.append(max(max(b - a for a, b in zip(ts, ts[1:], strict=False)),
                                t_end - ts[-1]))
        finally:
            for a, _ in agents:
                await a.stop()
            echo.close()
            await store.close()
    finite = [g for g in gaps if g != float("inf")]
    return {"agents": o.agents, "sessions_on_victim": len(held), "victim": victim,
            "recovered": len(finite), "p50_s": bench.percentile(finite, 50) if finite else None,
            "p99_s": bench.percentile(finite, 99) if finite else None,
            "max_s": max(gaps) if gaps else None,
            "detection_floor_s": params.keepalive_interval * params.dead_after,
            "target_s": TARGET_INTERRUPTION_S,
            "met": bool(gaps) and max(gaps) < TARGET_INTERRUPTION_S}


# ---- datagrams through nginx -----------------------------------------------------------------


async def bench_balancer(o: ClusterBenchOptions, root: Path) -> dict[str, Any]:
    from agent.agent import Agent, AgentSettings
    from session.client import ClientParams

    echo_child = bench.Child("echo", {})
    info = await echo_child.start()
    upstream = f"{info['udp'][0]}:{info['udp'][1]}"
    runs = []
    try:
        with Cluster(root, "datagram", 1, BENCH_SETS) as c:
            store = SessionStore.from_url(c.st.store_url, registry_key=c.registry_key)
            priv, pub = generate_keypair()
            try:
                await store.add_client(ClientPolicy(pub, name="bench-balancer",
                                                    ttl_s=bench.BENCH_TTL_S, upstreams=(upstream,)))
            finally:
                await store.close()
            paths = {"balancer": _addr(c.st.balancer["udp"]), "direct": _addr(c.st.gateways[0].udp)}
            workers = [pid for pid, _ in _children(c.pid("nginx"))]  # they do the proxying
            pids = {"gateway": c.st.gateways[0].pid, "nginx": workers[0] if workers else c.pid("nginx"),
                    "echo": echo_child.pid, "loadgen": os.getpid()}
            for rep in range(o.repeat):
                run: dict[str, Any] = {}
                for name, gw in paths.items():
                    flow = bench.Flow(o.payload, o.window)
                    agent = Agent(AgentSettings(
                        private_key=priv, gateway_public_key=c.public, gateways=[gw],
                        tcp_gateways=[], upstream=upstream, local_udp=None, transports=["udp"],
                        params=ClientParams(upstream=upstream), name=f"bench-{name}"),
                        on_payload=flow.on_echo)
                    try:
                        await agent.start()
                        await agent.wait_connected(10)
                        cpu = bench.CpuMeter(pids)
                        run[name] = await flow.run(agent.send, o.warmup, o.seconds)
                        run[name]["cpu"] = cpu.read()
                    finally:
                        await agent.stop()
                run["ratio"] = bench._ratio(run["balancer"]["rate"], run["direct"]["rate"])
                runs.append(run)
                say(f"  datagram {rep + 1}/{o.repeat}: via nginx {run['balancer']['rate']:,.0f}/s "
                    f"(loss {run['balancer']['loss']:.2%}), direct {run['direct']['rate']:,.0f}/s "
                    f"(loss {run['direct']['loss']:.2%}) -> {run['ratio']:.0%}; "
                    f"cpu {run['balancer']['cpu']}")
    finally:
        await asyncio.to_thread(echo_child.stop)
    rate = bench.median([r["balancer"]["rate"] for r in runs])
    direct = bench.median([r["direct"]["rate"] for r in runs])
    return {"payload": o.payload, "window": o.window, "rate": rate, "direct_rate": direct,
            "loss": bench.median([r["balancer"]["loss"] for r in runs]),
            "direct_loss": bench.median([r["direct"]["loss"] for r in runs]),
            "rtt_p50_ms": bench.median([r["balancer"]["rtt_p50_ms"] for r in runs]),
            "direct_rtt_p50_ms": bench.median([r["direct"]["rtt_p50_ms"] for r in runs]),
            "cpu": runs[len(runs) // 2]["balancer"]["cpu"],
            "ratio": bench._ratio(rate, direct), "target": TARGET_BALANCER_RATIO,
            "met": bench._ratio(rate, direct) >= TARGET_BALANCER_RATIO}


# ---- durable mode ----------------------------------------------------------------------------


class _Redis:
    """A redis-server child of ours (primary or replica), stopped by its own handle."""

    def __init__(self, replica_of: int | None = None) -> None:
        self.port = free_port("127.0.0.1")
        self.dir = tempfile.mkdtemp(prefix="jvpn-bench-redis-")
        argv = [find_binary("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", self.dir, "--logfile", "",
                "--repl-diskless-sync-delay", "0"]
        if replica_of is not None:
            argv += ["--replicaof", "127.0.0.1", str(replica_of)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


async def _wait_redis(port: int, replica: bool, timeout: float = 20.0) -> None:
    import redis.asyncio as aredis

    deadline = time.monotonic() + timeout
    while True:
        client = aredis.Redis(host="127.0.0.1", port=port, socket_timeout=1.0)
        try:
            info = await client.info("replication")
            if not replica or info.get("master_link_status") == "up":
                return
        except Exception:
            pass
        finally:
            await client.aclose()
        if time.monotonic() > deadline:
            raise RuntimeError(f"redis on port {port} not ready (replica={replica})")
        await asyncio.sleep(0.1)


async def _reattach_latencies(store: SessionStore, sids: list[bytes],
                              calls: int) -> tuple[list[float], int]:
    """Latencies of ``calls`` sequential reattaches, and how many WAITs fell short."""
    from session import wire
    from store.errors import StoreNotDurable

    versions = dict.fromkeys(sids, 1)
    lat = []
    short = 0
    now = await store.server_time_ms()
    for i in range(calls):
        sid = sids[i % len(sids)]
        t0 = time.perf_counter()
        try:
            res = await store.reattach(
                sid, expected_version=versions[sid], nonce=os.urandom(16), timestamp_ms=now,
                kind=wire.TransportKind.UDP, node="bench-wait",
                addr_tag=f"udp:127.0.0.1:{20000 + i}")
        except StoreNotDurable:
            lat.append(time.perf_counter() - t0)
            short += 1
            rec = await store.get(sid)  # the CAS applied, only the WAIT fell short: re-read
            if rec is not None:
                versions[sid] = rec.version
            continue
        lat.append(time.perf_counter() - t0)
        if not res.ok:
            raise RuntimeError(f"reattach failed in the durable bench: {res.status.name}")
        versions[sid] = res.version
    return lat, short


async def bench_durable(o: ClusterBenchOptions) -> dict[str, Any]:
    primary = _Redis()
    replica: _Redis | None = None
    try:
        await _wait_redis(primary.port, False)
        replica = _Redis(replica_of=primary.port)
        await _wait_redis(replica.port, True)
        url = f"redis://127.0.0.1:{primary.port}/0"
        _, pub = generate_keypair()
        policy = ClientPolicy(pub, name="bench-wait", ttl_s=bench.BENCH_TTL_S,
                              reattach_rate=bench.BENCH_RATE, upstreams=("127.0.0.1:9",))
        out: dict[str, Any] = {"calls": o.wait_calls}
        setup = SessionStore(url, StoreConfig(coalesce=False), registry_key=bytes(32))
        try:
            await setup.add_client(policy)
        finally:
            await setup.close()
        for mode, cfg in (("async", StoreConfig(coalesce=False)),
                          ("wait1", StoreConfig(coalesce=False, wait_replicas=1))):
            plain = SessionStore(url, StoreConfig(coalesce=False))
            store = SessionStore(url, cfg)
            try:
                sids = await bench._birth_sessions(plain, 50, policy)  # setup: no WAIT
                lat, short = await _reattach_latencies(store, sids, o.wait_calls)
            finally:
                await store.close()
                await plain.close()
            out[mode] = {"p50_ms": bench.percentile(lat, 50) * 1000,
                         "p99_ms": bench.percentile(lat, 99) * 1000,
                         "rate_sequential": len(lat) / sum(lat), "wait_short": short}
            say(f"  durable {mode}: p50 {out[mode]['p50_ms']:.3f} ms, "
                f"p99 {out[mode]['p99_ms']:.3f} ms, WAIT short {short}")
        out["p50_cost_ms"] = out["wait1"]["p50_ms"] - out["async"]["p50_ms"]
        out["wait1"]["timeout_ms"] = StoreConfig().wait_timeout_ms
        return out
    finally:
        for r in (replica, primary):
            if r is not None:
                r.stop()


# ---- report ----------------------------------------------------------------------------------


def format_report(rep: dict[str, Any]) -> str:
    m = rep["machine"]
    lines = [f"Cluster bench on {m.get('cpu_model', '?')} ({m.get('nproc', '?')} CPUs), "
             f"python {m.get('python', '?')}, redis {m.get('redis_server', '?')}, "
             f"kernel {m.get('kernel', '?')}, {rep['elapsed_s']:.0f} s"]
    r = rep.get("reattach")
    if r:
        lines.append(f"Reattach, {r['sessions']} sessions, {r['seconds']:g} s x {r['repeat']} "
                     "(median), beside the raw Redis ceiling for reattach.lua in the same run:")
        for k in (1, 2, 3):
            g = r[f"gateways_{k}"]
            extra = f", x{g['scaling']:.2f} vs 1 gateway" if "scaling" in g else ""
            lines.append(f"  {k} gateway(s): {g['rate']:>9,.0f}/s (p99 {g['p99_ms']:.1f} ms)   "
                         f"raw redis {g['raw_redis_rate']:>9,.0f}/s   -> {g['ratio']:.0%}{extra}"
                         f"; cpu {g['cpu']}")
    f = rep.get("failover")
    if f:
        def s(v: float | None) -> str:
            return "-" if v is None else f"{v * 1000:.0f} ms"
        lines.append(f"Node death (SIGKILL {f['victim']}, {f['sessions_on_victim']} of "
                     f"{f['agents']} sessions on it): interruption p50 {s(f['p50_s'])}, "
                     f"p99 {s(f['p99_s'])}, max {s(f['max_s'])}; silence detection "
                     f"{s(f['detection_floor_s'])}; target < {s(f['target_s'])}: "
                     f"{'MET' if f['met'] else 'MISSED'}")
    d = rep.get("datagram")
    if d:
        lines.append(f"Datagrams {d['payload']} B, window {d['window']}: via nginx "
                     f"{d['rate']:,.0f}/s (loss {d['loss']:.2%}, rtt p50 {d['rtt_p50_ms']:.2f} ms)"
                     f"   direct to one gateway {d['direct_rate']:,.0f}/s (loss "
                     f"{d['direct_loss']:.2%}, rtt p50 {d['direct_rtt_p50_ms']:.2f} ms)   -> "
                     f"{d['ratio']:.0%} (target >= {d['target']:.0%}: "
                     f"{'MET' if d['met'] else 'MISSED'}); cpu {d['cpu']}")
    w = rep.get("durable")
    if w:
        lines.append(f"Durable mode, reattach.lua one call at a time ({w['calls']} calls): "
                     f"WAIT 1 replica p50 {w['wait1']['p50_ms']:.3f} ms / p99 "
                     f"{w['wait1']['p99_ms']:.3f} ms   beside async p50 {w['async']['p50_ms']:.3f} ms"
                     f" / p99 {w['async']['p99_ms']:.3f} ms   (+{w['p50_cost_ms']:.3f} ms p50; "
                     f"{w['wait1']['wait_short']} WAITs short of the replica in "
                     f"{w['wait1']['timeout_ms']} ms)")
    for name, err in rep.get("errors", {}).items():
        lines.append(f"{name}: FAILED ({err})")
    return "\n".join(lines)


async def run(o: ClusterBenchOptions) -> dict[str, Any]:
    rep: dict[str, Any] = {"machine": bench.machine_info(), "options": o.__dict__.copy()}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="jvpn-bench-cluster-") as tmp:
        root = Path(tmp)
        parts: list[tuple[str, str, Callable[[], Any]]] = [
            ("reattach", "reattach scaling: 1, 2, 3 gateway processes, one redis",
             lambda: bench_reattach_scaling(o, root)),
            ("failover", f"node death: {o.agents} agents through nginx, SIGKILL one of 3 "
             "gateways", lambda: bench_failover(o, root)),
            ("datagram", "datagrams: through nginx vs direct", lambda: bench_balancer(o, root)),
            ("durable", "durable mode: WAIT 1 replica vs async", lambda: bench_durable(o)),
        ]
        for name, title, fn in parts:
            if name not in o.only:
                continue
            say(title)
            try:
                rep[name] = await fn()
            except Exception as exc:  # one broken part must not lose the others' figures
                rep.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
                say(f"  {name} FAILED: {type(exc).__name__}: {exc}")
    rep["elapsed_s"] = time.perf_counter() - t0
    return rep


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="jvpn-lab bench-cluster", description=__doc__.split(
        "\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short runs (a smoke test)")
    p.add_argument("--only", action="append", choices=("reattach", "failover", "datagram",
                                                        "durable"))
    p.add_argument("--sessions", type=int)
    p.add_argument("--seconds", type=float)
    p.add_argument("--repeat", type=int)
    p.add_argument("--agents", type=int)
    p.add_argument("--json", action="store_true", help="also print the full report as JSON")
    args = p.parse_args(argv)
    o = ClusterBenchOptions.quick() if args.quick else ClusterBenchOptions()
    for name in ("sessions", "seconds", "repeat", "agents"):
        if getattr(args, name) is not None:
            setattr(o, name, getattr(args, name))
    if args.only:
        o.only = tuple(dict.fromkeys(args.only))
    report = asyncio.run(run(o))
    print(format_report(report))
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
