"""``jvpn-lab bench --only l3``: iperf3 through the L3 tunnel, beside its baselines.

In one namespace lab (``instruments.netlab``: client, one gateway node, server side),
measured in the same run, on the same path:

- **bare**: the client routed to the server through the gateway's namespace, no
  tunnel (the kernel forwards; the ceiling of the topology);
- **jvpn compiled**: the client's TUN through the gateway node, NAT egress, on the
  compiled data plane (the engines read and write both TUNs and the UDP sockets);
- **jvpn python**: the same on the Python data plane (asyncio and ``cryptography``);
- **wireguard-go**: Debian's userspace WireGuard between the same two namespaces.

For each: iperf3 TCP (bits/s received), the highest paced 1400-byte UDP rate with < 0.5%
loss in one of two runs (a doubling ladder, then three halvings of the interval where it
failed), and the RTT percentiles of 1400-byte datagrams echoed
from the server's namespace at 50% of that rate (the compiled load generator and echo,
``instruments.loadgen``; each datagram crosses the path twice, so the path carries the
rate each way): the p99 added by a tunnel is its p99 minus the bare path's at its own
rate. For both jvpn planes also, over one paced 1400-byte UDP run at a rate both carry
(``PER_PACKET_MBIT``): the gateway's and the agent's CPU time per packet (user + system,
all threads, from /proc) and their system calls per packet (every call of every thread,
``loadgen.SyscallCount``), a packet being one datagram through the tunnel, as in the
datagram bench (``instruments.bench_dp``); on the compiled plane also the engines' own
count of their calls. Root only; iperf3, wireguard-go and wireguard-tools must be
installed (the Makefile's deps), and cargo or a built load generator for the latencies.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from instruments import loadgen
from instruments.netlab import GW_PORT, OUT_NET, SERVER, VIP, Lab, missing_prerequisites

UDP_LADDER_MBIT = (25, 50, 100, 200, 400, 800, 1600)
UDP_BISECT_STEPS = 3  # halvings between the ladder's last pass and first miss
PER_PACKET_MBIT = 50  # the per-packet figures' paced UDP rate: both planes carry it
PLANES = ("compiled", "python")
ENGINE_CALLS = ("recv_calls", "send_calls", "poll_calls", "tun_reads", "tun_writes")
MAX_LOSS_PCT = 0.5
WG_PORT = 51900
ECHO_PORT = 7100
LATENCY_SHARE = 0.5  # the latency run's rate, a share of the highest paced UDP rate
PAYLOAD = 1400
ECHO_STEP_S = 1.5  # one step of the echo-rate search
ECHO_SEARCH_STEPS = 10
ECHO_SEARCH_BUDGET_S = 45.0
LATENCY_RUNS = 3
LATENCY_RUN_S = 2.0


def _iperf(lab: Lab, seconds: float, udp_mbit: int | None = None) -> dict[str, Any]:
    argv = ["iperf3", "-c", SERVER, "-t", f"{seconds:g}", "-J", "--connect-timeout", "5000"]
    if udp_mbit is not None:
        argv += ["-u", "-b", f"{udp_mbit}M", "-l", "1400", "-w", "4M"]
    try:
        out = lab.run(lab.client, *argv, timeout=seconds + 30, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"iperf3 did not finish within {seconds + 30:g} s"}
    try:
        result: dict[str, Any] = json.loads(out)
    except ValueError:
        return {"error": out[-200:]}
    return result


def _measure(lab: Lab, seconds: float, no_echo: str | None) -> dict[str, Any]:
    """Throughput, then latency (``no_echo``: why there is no echo to measure it with)."""
    out = _throughput(lab, seconds)
    out["latency"] = ({"skipped": no_echo} if no_echo is not None else
                      _latency(lab, out["udp_mbit_under_0_5pct_loss"], seconds))
    return out


def _gen(lab: Lab, rate: float, seconds: float) -> dict[str, Any]:
    return loadgen.run_gen((SERVER, ECHO_PORT), rate=rate, seconds=seconds, size=PAYLOAD,
                           prefix=["ip", "netns", "exec", lab.client])


def _latency(lab: Lab, udp_mbit: float, seconds: float) -> dict[str, Any]:
    """The highest paced rate of 1400-byte echoes (client to the server's namespace and
    back) at < 0.5% loss, found as the datagram bench finds it, and the RTT percentiles at
    LATENCY_SHARE of it: the same definition as the loopback datagram bench's."""
    step = min(seconds, ECHO_STEP_S)
    start = max(1000.0, udp_mbit * 1e6 / (PAYLOAD * 8) / 2)  # iperf3's rate, split both ways
    found = loadgen.highest_rate(lambda rate: _gen(lab, rate, step), start=start,
                                 max_steps=ECHO_SEARCH_STEPS, budget_s=ECHO_SEARCH_BUDGET_S)
    if found["target_rate"] <= 0:
        return {"skipped": "no echo rate passed", "search": found["steps"]}
    rate = LATENCY_SHARE * found["target_rate"]
    return {"highest_echo_rate": found["rate"], **_rtt_at(lab, rate, seconds),
            "search": found["steps"]}


def _rtt_at(lab: Lab, rate: float, seconds: float) -> dict[str, Any]:
    """RTT percentiles of paced echoes at ``rate``: the median of LATENCY_RUNS short runs
    (one neighbour's burst on a shared machine moves a single run's p99 by milliseconds)."""
    runs = [_gen(lab, rate, min(seconds, LATENCY_RUN_S)) for _ in range(LATENCY_RUNS)]
    p99 = sorted(r["rtt_p99_us"] for r in runs)
    return {"rate": round(rate), "delivered": statistics.median(r["rate"] for r in runs),
            "loss": statistics.median(r["loss"] for r in runs),
            "rtt_p50_us": int(statistics.median(r["rtt_p50_us"] for r in runs)),
            "rtt_p99_us": int(statistics.median(p99)), "rtt_p99_runs_us": p99}


def _udp_step(lab: Lab, seconds: float, mbit: int, ladder: list[dict[str, Any]]) -> bool:
    """One paced iperf3 UDP run at ``mbit``, appended to ``ladder``: whether loss < 0.5%."""
    r = _iperf(lab, seconds, mbit)
    s = r.get("end", {}).get("sum", {})
    loss = float(s.get("lost_percent", 100.0))
    ladder.append({"offered_mbit": mbit, "loss_pct": round(loss, 3),
                   "received_mbit": round(float(s.get("bits_per_second", 0.0)) / 1e6, 1)})
    return loss < MAX_LOSS_PCT


def _throughput(lab: Lab, seconds: float) -> dict[str, Any]:
    """TCP, then the highest paced UDP rate at < 0.5% loss: a rate passes if one of two
    runs has (a single miss can be a busy machine's); doubling steps to the first rate
    that does not pass, then UDP_BISECT_STEPS halvings of the interval between the last
    pass and it."""
    tcp = _iperf(lab, seconds)
    tcp_bps = tcp.get("end", {}).get("sum_received", {}).get("bits_per_second", 0.0)
    ladder: list[dict[str, Any]] = []

    def passes(mbit: int) -> bool:
        return _udp_step(lab, seconds, mbit, ladder) or _udp_step(lab, seconds, mbit, ladder)

    best, failed = 0, None
    for mbit in UDP_LADDER_MBIT:
        if not passes(mbit):
            failed = mbit
            break
        best = mbit
    if best and failed:
        lo, hi = best, failed
        for _ in range(UDP_BISECT_STEPS):
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if passes(mid) else (lo, mid)
        best = lo
    return {"tcp_mbit": round(tcp_bps / 1e6, 1), "udp_mbit_under_0_5pct_loss": best,
            "udp_ladder": ladder}


def _wg_keys(lab: Lab, ns: str) -> tuple[str, str]:
    priv = lab.run(ns, "wg", "genkey").strip()
    pub = lab.run(ns, "sh", "-c", f"echo {priv} | wg pubkey").strip()
    return priv, pub


def run_l3_bench(seconds: float = 5.0, say: Any = print) -> dict[str, Any]:
    why = missing_prerequisites()
    if why is None:
        for tool in ("iperf3", "wireguard-go", "wg"):
            if shutil.which(tool) is None:
                why = f"{tool} is not installed"
    if why is not None:
        say(f"l3: skipped ({why})")
        return {"skipped": why}
    with tempfile.TemporaryDirectory(prefix="jvpn-l3-bench-") as tmp:
        lab = Lab(Path(tmp), gateways=1, egress="nat", balancer=False).up()
        try:
            return _run(lab, seconds, say)
        finally:
            lab.close()


def _run(lab: Lab, seconds: float, say: Any) -> dict[str, Any]:
    gw = lab.gws[0]
    lab.start_gateway(1)
    lab.wait_gateways_ready([1])
    lab.spawn(lab.server, ["iperf3", "-s", "-B", SERVER], "iperf3-server")
    lab.wait_tcp(lab.server, SERVER, 5201)
    no_echo: str | None = None
    try:
        echo = lab.spawn(lab.server, [str(loadgen.binary()), "echo", "--bind",
                                      f"{SERVER}:{ECHO_PORT}"], "loadgen-echo")
        echo.line()  # it listens
    except loadgen.LoadgenUnavailable as exc:
        no_echo = str(exc)
        say(f"l3: no latencies ({exc})")
    report: dict[str, Any] = {"seconds": seconds}

    # jvpn: the client's TUN through the gateway node (UDP transport), on each data plane
    priv, _ = lab.add_client("10.99.0.0/24")
    for plane in PLANES:
        lab.env["JVPN_GATEWAY_DATA_PLANE"] = lab.env["JVPN_AGENT_DATA_PLANE"] = plane
        if plane != PLANES[0]:
            gw_proc = lab.gw_procs[1]
            os.kill(gw_proc.pid, signal.SIGTERM)
            gw_proc.p.wait(15)
            lab.start_gateway(1)
            lab.wait_gateways_ready([1])
        agent = lab.agent(priv, transports=("udp",))
        st = lab.wait_agent(agent)
        say(f"l3: jvpn ({plane} data plane) through {st['transport']} (mtu {st['mtu']})")
        r = _measure(lab, seconds, no_echo)
        r["per_packet"] = _per_packet(lab, agent, seconds)
        report[f"jvpn_{plane}"] = r
        agent.stop()
    report["jvpn"] = report["jvpn_compiled"]

    # bare: the same two namespaces, routed through the node, no tunnel
    lab.run(lab.client, "ip", "route", "replace", "10.99.0.0/24", "via", f"{OUT_NET}.1")
    lab.run(lab.server, "ip", "route", "replace", f"{OUT_NET}.0/24", "via", "10.99.0.1")
    say("l3: bare path")
    report["bare"] = _measure(lab, seconds, no_echo)
    lab.run(lab.client, "ip", "route", "del", "10.99.0.0/24")

    # wireguard-go between the same namespaces
    gpriv, gpub = _wg_keys(lab, gw)
    cpriv, cpub = _wg_keys(lab, lab.client)
    # distinct names: wireguard-go's control socket (/var/run/wireguard/<name>.sock) is
    # in the file system, which namespaces share
    wg = {gw: f"wg{lab.tag[-6:]}g", lab.client: f"wg{lab.tag[-6:]}c"}
    for ns, name in wg.items():
        lab.spawn(ns, ["wireguard-go", "-f", name], name)
    for ns, name in wg.items():
        _wait_link(lab, ns, name)
    (lab.tmp / "g.key").write_text(gpriv)
    (lab.tmp / "c.key").write_text(cpriv)
    lab.run(gw, "wg", "set", wg[gw], "private-key", str(lab.tmp / "g.key"), "listen-port",
            str(WG_PORT), "peer", cpub, "allowed-ips", "10.66.0.2/32")
    lab.run(lab.client, "wg", "set", wg[lab.client], "private-key", str(lab.tmp / "c.key"), "peer", gpub,
            "endpoint", f"{OUT_NET}.1:{WG_PORT}", "allowed-ips", "10.99.0.0/24")
    for ns, addr in ((gw, "10.66.0.1/24"), (lab.client, "10.66.0.2/24")):
        lab.run(ns, "ip", "addr", "add", addr, "dev", wg[ns])
        lab.run(ns, "ip", "link", "set", wg[ns], "up")
    lab.run(lab.client, "ip", "route", "replace", "10.99.0.0/24", "dev", wg[lab.client])
    lab.run(lab.server, "ip", "route", "replace", "10.66.0.0/24", "via", "10.99.0.1")
    say("l3: wireguard-go")
    report["wireguard_go"] = _measure(lab, seconds, no_echo)
    c, py, wg = report["jvpn_compiled"], report["jvpn_python"], report["wireguard_go"]
    report["ratios"] = {
        "tcp_jvpn_vs_wireguard_go": _ratio(c["tcp_mbit"], wg["tcp_mbit"]),
        "udp_jvpn_vs_wireguard_go": _ratio(c["udp_mbit_under_0_5pct_loss"],
                                           wg["udp_mbit_under_0_5pct_loss"]),
        "tcp_compiled_vs_python": _ratio(c["tcp_mbit"], py["tcp_mbit"]),
        "udp_compiled_vs_python": _ratio(c["udp_mbit_under_0_5pct_loss"],
                                         py["udp_mbit_under_0_5pct_loss"]),
        "gateway_cpu_per_packet_compiled_vs_python": _ratio(
            c["per_packet"]["gateway_cpu_us"], py["per_packet"]["gateway_cpu_us"]),
    }
    # the bare path again, at each tunnel's latency rate: what each tunnel adds to the p99
    lab.run(lab.client, "ip", "route", "replace", "10.99.0.0/24", "via", f"{OUT_NET}.1")
    report["added_p99_us"], report["bare_at_rate"] = {}, {}
    for key in ("jvpn_compiled", "jvpn_python", "wireguard_go"):
        lat = report[key]["latency"]
        if "rtt_p99_us" not in lat:
            report["added_p99_us"][key] = None
            continue
        say(f"l3: bare path at {key}'s echo rate, {lat['rate']:,d}/s")
        b = _rtt_at(lab, lat["rate"], seconds)
        report["bare_at_rate"][key] = b
        report["added_p99_us"][key] = lat["rtt_p99_us"] - b["rtt_p99_us"]
    report["gateway_port"] = GW_PORT
    return report


def _engine_calls(lab: Lab) -> float:
    """System calls of the gateway's engine so far (its /metrics)."""
    return sum(lab.metric(1, "jvpn_engine_syscalls_total", call=c) for c in (
        "recvmmsg", "sendmmsg", "epoll_wait", "tun_read", "tun_write"))


def _per_packet(lab: Lab, agent: Any, seconds: float) -> dict[str, Any]:
    """One paced 1400-byte UDP run through the tunnel: the gateway's and the agent's CPU
    time and system calls per packet (all their threads), and on the compiled plane the
    engines' own count of their calls (None on the Python one)."""
    pids = {"gateway": lab.gw_procs[1].pid, "agent": agent.pid}
    gw_calls, ag = _engine_calls(lab), agent.ask("status").get("engine") or {}
    calls = loadgen.SyscallCount(pids).start()
    cpu0 = {k: loadgen.cpu_seconds(pid) for k, pid in pids.items()}
    r = _iperf(lab, seconds, PER_PACKET_MBIT)
    cpu = {k: loadgen.cpu_seconds(pid) - cpu0[k] for k, pid in pids.items()}
    counts = calls.stop()
    ag2 = agent.ask("status").get("engine") or {}
    gw_calls = _engine_calls(lab) - gw_calls
    s = r.get("end", {}).get("sum", {})
    packets = int(s.get("packets", 0)) - int(s.get("lost_packets", 0))
    out: dict[str, Any] = {"offered_mbit": PER_PACKET_MBIT, "packets": packets,
                           "loss_pct": round(float(s.get("lost_percent", 100.0)), 3),
                           "syscall_method": calls.method,
                           "gateway_engine_syscalls": None, "agent_engine_syscalls": None}
    for k in pids:
        n = counts.get(k)
        out[f"{k}_cpu_us"] = round(cpu[k] / packets * 1e6, 2) if packets else None
        out[f"{k}_syscalls"] = round(n / packets, 3) if packets and n is not None else None
    if packets and ag2:
        agent_calls = sum(ag2.get(k, 0) - ag.get(k, 0) for k in ENGINE_CALLS)
        out["gateway_engine_syscalls"] = round(gw_calls / packets, 3)
        out["agent_engine_syscalls"] = round(agent_calls / packets, 3)
    return out


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else 0.0


def _wait_link(lab: Lab, ns: str, name: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while lab.run(ns, "ip", "link", "show", name, check=False) == "":
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not appear in {ns}")
        time.sleep(0.05)


def format_l3(report: dict[str, Any]) -> str:
    if "skipped" in report:
        return f"L3: skipped ({report['skipped']})"
    lines = [f"L3 tunnel, iperf3 {report['seconds']:g} s each, one node (NAT egress); 1400 B "
             f"echoes: the highest rate at < 0.5% loss and the RTT at {LATENCY_SHARE:.0%} of it "
             "(added p99: minus the bare path's p99 at the same rate):",
             f"  {'path':14s} {'TCP Mbit/s':>11s} {'UDP 1400 B Mbit/s <0.5% loss':>30s}"
             f"  {'echo max':>10s} {'at 50%':>10s} {'RTT p50 us':>10s} {'p99 us':>8s} "
             f"{'added p99':>10s}"]
    added = report.get("added_p99_us", {})
    for key, name in (("bare", "bare (routed)"), ("wireguard_go", "wireguard-go"),
                      ("jvpn_compiled", "jvpn compiled"), ("jvpn_python", "jvpn python")):
        r = report[key]
        lat = r.get("latency", {})
        more = (f"  {lat['highest_echo_rate']:>8,.0f}/s {lat['rate']:>8,.0f}/s "
                f"{lat['rtt_p50_us']:>10.0f} {lat['rtt_p99_us']:>8.0f} "
                f"{'' if added.get(key) is None else format(added[key], '+.0f'):>10s}"
                if "rtt_p99_us" in lat else f"  (latency: {lat.get('skipped', '?')})")
        lines.append(f"  {name:14s} {r['tcp_mbit']:>11.1f} {r['udp_mbit_under_0_5pct_loss']:>30d}"
                     + more)
    if report.get("bare_at_rate"):
        lines.append("  bare path at each tunnel's echo rate: " + ", ".join(
            f"{key.replace('jvpn_', 'jvpn ').replace('_', '-')} {b['rate']:,.0f}/s p99 "
            f"{b['rtt_p99_us']} us" for key, b in report["bare_at_rate"].items()))
    rt = report["ratios"]
    lines.append(f"  jvpn compiled / wireguard-go: TCP {rt['tcp_jvpn_vs_wireguard_go']:.2f}x, "
                 f"UDP {rt['udp_jvpn_vs_wireguard_go']:.2f}x (target 2x)")
    lines.append(f"  compiled / python: TCP {rt['tcp_compiled_vs_python']:.2f}x, "
                 f"UDP {rt['udp_compiled_vs_python']:.2f}x")
    for plane in PLANES:
        pp = report[f"jvpn_{plane}"]["per_packet"]

        def f(x: float | None, spec: str) -> str:
            return "?" if x is None else format(x, spec)

        engine = ("" if pp.get("gateway_engine_syscalls") is None else
                  f"; the engines' own counters (their threads, read over a slightly wider window): gateway {pp['gateway_engine_syscalls']:.3f}, "
                  f"agent {pp['agent_engine_syscalls']:.3f}")
        lines.append(f"  {plane} at {pp['offered_mbit']} Mbit/s: CPU per packet gateway "
                     f"{f(pp.get('gateway_cpu_us'), '.1f')} us, agent "
                     f"{f(pp.get('agent_cpu_us'), '.1f')} us; syscalls/packet gateway "
                     f"{f(pp.get('gateway_syscalls'), '.3f')}, agent "
                     f"{f(pp.get('agent_syscalls'), '.3f')}{engine} ({pp['packets']} packets, "
                     f"{pp['loss_pct']}% loss; system calls by {pp.get('syscall_method')})")
    lines.append(f"  gateway CPU per packet, compiled / python: "
                 f"{rt['gateway_cpu_per_packet_compiled_vs_python']:.2f} (target <= 0.33)")
    return "\n".join(lines)




# ---- per-jump stalls ------------------------------------------------------------------------

STALL_RATE = 200_000  # bytes/s of the checked stream


def _conns(srv: Any, phase: bool = False) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = srv.ask("phase" if phase else "report")["connections"]
    return out


def _until(cond: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def run_stall_bench(runs: int = 5, say: Any = print) -> dict[str, Any]:
    """The largest gap an inner TCP stream's byte checker sees, per jump kind, ``runs`` times
    each (routed egress, three nodes); medians and maxima."""
    why = missing_prerequisites()
    if why is not None:
        say(f"l3 stalls: skipped ({why})")
        return {"skipped": why}
    with tempfile.TemporaryDirectory(prefix="jvpn-l3-stalls-") as tmp:
        lab = Lab(Path(tmp), gateways=3, egress="routed").up()
        try:
            return _stalls(lab, runs, say)
        finally:
            lab.close()


def _stalls(lab: Lab, runs: int, say: Any) -> dict[str, Any]:
    for i in (1, 2, 3):
        lab.start_gateway(i)
    lab.wait_gateways_ready([1, 2, 3])
    priv, _ = lab.add_client(f"{SERVER}/32")
    srv = lab.python(lab.server, "instruments.seqcheck", "serve", "::", "7000", name="srv")
    srv.line()
    agent = lab.agent(priv)
    lab.wait_agent(agent)
    snd = lab.python(lab.client, "instruments.seqcheck", "send", SERVER, "7000",
                     str(STALL_RATE), name="snd")
    snd.line()
    _until(lambda: _conns(srv) and _conns(srv)[0]["bytes"] > 50_000, 10, "the stream")

    def node() -> int:
        return int(str(agent.ask("status")["node"]).split("#")[0].rsplit("-", 1)[1])

    def measure() -> float:
        start = _conns(srv)[0]["bytes"]
        _until(lambda: _conns(srv)[0]["bytes"] > start + STALL_RATE // 2, 20, "traffic")
        time.sleep(0.5)
        return float(_conns(srv, phase=True)[0]["phase_gap_s"])

    addr = [f"{lab.client_net}.10", f"{lab.client_net}.11"]
    gaps: dict[str, list[float]] = {k: [] for k in (
        "new source port", "client address change", "UDP blocked -> TCP", "TCP -> UDP",
        "owning node killed")}
    def on_udp() -> None:
        """Back on UDP before a jump that starts from it (a recovery after the TCP fallback
        stays on TCP), the phase restarted after it."""
        def on() -> bool:
            st = agent.ask("status")
            return str(st["transport"]).startswith("udp") and st["state"] == "ATTACHED"

        if on():
            return
        for _ in range(5):  # a jump asked while the agent is between paths does nothing
            agent.ask("jump udp")
            try:
                _until(on, 3, "a jump back to UDP")
                break
            except RuntimeError:
                continue
        else:
            raise RuntimeError(f"the agent does not go back to UDP: {agent.ask('status')}")
        measure()

    held: list[bool] = []  # per run: the killed owner held the return addresses too
    _conns(srv, phase=True)
    for n in range(runs):
        on_udp()
        agent.ask("jump udp")
        gaps["new source port"].append(measure())
        on_udp()
        old, new = addr[n % 2], addr[(n + 1) % 2]
        lab.run(lab.client, "ip", "addr", "del", f"{old}/24", "dev", "eth0")
        lab.run(lab.client, "ip", "addr", "add", f"{new}/24", "dev", "eth0")
        gaps["client address change"].append(measure())
        on_udp()
        lab.run(lab.client, "nft", "add table inet stall")
        lab.run(lab.client, "nft",
                "add chain inet stall out { type filter hook output priority 0 ; }")
        lab.run(lab.client, "nft", "add rule inet stall out udp dport 51820 drop")
        _until(lambda: str(agent.ask("status")["transport"]).startswith("tcp"), 15, "TCP")
        gaps["UDP blocked -> TCP"].append(measure())
        lab.run(lab.client, "nft", "delete table inet stall")
        agent.ask("jump udp")
        gaps["TCP -> UDP"].append(measure())
        dead = node()
        held.append(VIP in lab.run(lab.gws[dead - 1], "ip", "-o", "addr", "show", "dev",
                                   "jvpn0", check=False))
        lab.gw_procs[dead].kill()
        _until(lambda d=dead: node() != d and agent.ask("status")["state"] == "ATTACHED", 15,
               "a move")
        gaps["owning node killed"].append(measure())
        lab.start_gateway(dead)
        lab.wait_gateways_ready([dead])
        _conns(srv, phase=True)
        say(f"l3 stalls: run {n + 1}/{runs}: " + ", ".join(
            f"{k} {v[-1]:.3f}" for k, v in gaps.items()))
    final = _conns(srv)
    out: dict[str, Any] = {"runs": runs, "connections": len(final),
                           "order_errors": final[0]["errors"], "rate_bytes_s": STALL_RATE,
                           "killed_held_return_address": held}
    for k, v in gaps.items():
        s = sorted(v)
        out[k] = {"median_s": round(s[len(s) // 2], 3), "max_s": round(s[-1], 3),
                  "runs_s": [round(g, 3) for g in v]}
    return out


def format_stalls(r: dict[str, Any]) -> str:
    if "skipped" in r:
        return f"L3 stalls: skipped ({r['skipped']})"
    lines = [f"L3 per-jump stall of one inner TCP stream ({r['rate_bytes_s'] // 1000} kB/s, "
             f"routed, 3 nodes), largest gap the byte checker saw, {r['runs']} runs each "
             f"({r['connections']} connection, {r['order_errors']} order errors):"]
    for k in ("new source port", "client address change", "UDP blocked -> TCP", "TCP -> UDP",
              "owning node killed"):
        target = 0.5 if k == "owning node killed" else 0.3
        m = r[k]["median_s"]
        lines.append(f"  {k:24s} median {m:6.3f} s  max {r[k]['max_s']:6.3f} s  "
                     f"(target {target} s: {'met' if m <= target else 'missed'})")
    if r.get("killed_held_return_address"):
        lines.append("  (owning node killed, per run: " + ", ".join(
            f"{g:.3f} s{' (it held the return addresses)' if h else ''}" for g, h in
            zip(r["owning node killed"]["runs_s"], r["killed_held_return_address"],
                strict=True)) + ")")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m instruments.bench_l3",
        description="The L3 tunnel beside wireguard-go, the Python plane and the bare path "
        "(root; iperf3, wireguard-go and wireguard-tools installed), or with 'stalls' the "
        "longest gap of a TCP connection per kind of jump.")
    parser.add_argument("part", nargs="?", choices=["throughput", "stalls"],
                        default="throughput", help="what to measure (default: throughput)")
    parser.add_argument("--json", action="store_true",
                        help="print the whole report as JSON after the table")
    args = parser.parse_args()
    if args.part == "stalls":
        print(format_stalls(run_stall_bench()))
    else:
        report = run_l3_bench()
        print(format_l3(report))
        if args.json:
            print(json.dumps(report))
