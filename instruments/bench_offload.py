"""TUN offloads on and off, in one namespace lab: what each costs per bit.

``python -m instruments.bench_offload [--seconds S] [--runs N] [--strace] [--json]`` (root):
one gateway node (NAT egress) and an L3 agent on the compiled data plane, as
``instruments.bench_l3`` sets them up; for each run and each setting (``tun_offload`` on
and off in both the gateway and the agent, alternating, each with a fresh gateway and
agent), iperf3 TCP up (client to server: the agent's engine reads TCP super-packets, the
gateway's writes merged ones) and down (``-R``: the other way), reporting Mbit/s, the
CPU time of the gateway and the agent processes (user + system, every thread, from
/proc) per Gbit carried, and the engines' system calls per tunnel datagram (their own
counters: epoll_wait, recvmmsg, sendmmsg, TUN read and write). ``--strace`` also runs
``strace -c`` on the agent's engine thread for a few seconds of each up run (which
slows it: only the call mix is read from it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from instruments import loadgen
from instruments.netlab import SERVER, Lab, missing_prerequisites

ENGINE_CALLS = ("recv_calls", "send_calls", "poll_calls", "tun_reads", "tun_writes")
GW_CALLS = ("recvmmsg", "sendmmsg", "epoll_wait", "tun_read", "tun_write")
STRACE_S = 3.0


def _engine_tid(pid: int) -> int | None:
    for task in Path(f"/proc/{pid}/task").iterdir():
        if (task / "comm").read_text().strip() == "jvpn-dataplane":
            return int(task.name)
    return None


def _gw_calls(lab: Lab) -> float:
    return sum(lab.metric(1, "jvpn_engine_syscalls_total", call=c) for c in GW_CALLS)


def _gw_counters(lab: Lab) -> dict[str, float]:
    out = {"calls": _gw_calls(lab)}
    for path in ("forwarded", "returned"):
        out[path] = lab.metric(1, "jvpn_engine_packets_total", path=path)
    return out


def _settled_gw(lab: Lab, timeout: float = 5.0) -> dict[str, float]:
    """The gateway's engine counters once two reads agree (it publishes them periodically)."""
    deadline = time.monotonic() + timeout
    last = _gw_counters(lab)
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = _gw_counters(lab)
        if now == last:
            return now
        last = now
    return last


def _strace(tid: int, seconds: float) -> dict[str, int]:
    """Calls by name of one thread over ``seconds`` (strace -c)."""
    p = subprocess.Popen(["strace", "-c", "-p", str(tid)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    time.sleep(seconds)
    p.send_signal(signal.SIGINT)
    try:
        _, err = p.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate()
    calls: dict[str, int] = {}
    for line in err.splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0].replace(".", "").isdigit() and parts[-1] != "total":
            calls[parts[-1]] = int(parts[3])
    return calls


def _direction(lab: Lab, agent: Any, seconds: float, reverse: bool,
               strace: bool) -> dict[str, Any]:
    gw_pid, ag_pid = lab.gw_procs[1].pid, agent.pid
    g0, a0 = _settled_gw(lab), agent.ask("status")["engine"]
    c0 = (loadgen.cpu_seconds(gw_pid), loadgen.cpu_seconds(ag_pid))
    argv = ["iperf3", "-c", SERVER, "-t", f"{seconds:g}", "-J", "--connect-timeout", "5000"]
    if reverse:
        argv.append("-R")
    traced: dict[str, int] | None = None
    if strace:
        p = subprocess.Popen(["ip", "netns", "exec", lab.client, *argv], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=lab.env)
        time.sleep(min(1.0, seconds / 4))
        tid = _engine_tid(ag_pid)
        traced = _strace(tid, min(STRACE_S, seconds / 2)) if tid is not None else None
        out, _ = p.communicate(timeout=seconds + 30)
    else:
        out = lab.run(lab.client, *argv, timeout=seconds + 30, check=False)
    c1 = (loadgen.cpu_seconds(gw_pid), loadgen.cpu_seconds(ag_pid))
    g1, a1 = _settled_gw(lab), agent.ask("status")["engine"]
    try:
        end = json.loads(out)["end"]
        bits = float(end["sum_received"]["bytes"]) * 8
        mbit = float(end["sum_received"]["bits_per_second"]) / 1e6
    except (ValueError, KeyError):
        return {"error": out[-300:]}
    ag_calls = sum(a1.get(k, 0) - a0.get(k, 0) for k in ENGINE_CALLS)
    # tunnel datagrams: up, sealed by the agent; down, sealed by the gateway
    ag_dgrams = (a1["forwarded"] - a0["forwarded"]) + (a1["returned"] - a0["returned"])
    gw_dgrams = (g1["forwarded"] - g0["forwarded"]) + (g1["returned"] - g0["returned"])
    r: dict[str, Any] = {
        "mbit": round(mbit, 1),
        "gateway_cpu_s_per_gbit": round((c1[0] - c0[0]) / bits * 1e9, 3) if bits else None,
        "agent_cpu_s_per_gbit": round((c1[1] - c0[1]) / bits * 1e9, 3) if bits else None,
        "gateway_syscalls_per_datagram": round((g1["calls"] - g0["calls"]) / gw_dgrams, 3)
        if gw_dgrams else None,
        "agent_syscalls_per_datagram": round(ag_calls / ag_dgrams, 3) if ag_dgrams else None,
        "agent_tun_gso_reads": a1.get("tun_gso_reads", 0) - a0.get("tun_gso_reads", 0),
        "agent_tun_gso_writes": a1.get("tun_gso_writes", 0) - a0.get("tun_gso_writes", 0),
        "datagrams": int(max(ag_dgrams, gw_dgrams)),
    }
    if traced is not None:
        r["agent_engine_strace"] = traced
    return r


def run(seconds: float = 5.0, runs: int = 3, strace: bool = False,
        say: Any = print) -> dict[str, Any]:
    why = missing_prerequisites()
    if why is None and shutil.which("iperf3") is None:
        why = "iperf3 is not installed"
    if why is None and strace and shutil.which("strace") is None:
        why = "strace is not installed"
    if why is not None:
        say(f"offload bench: skipped ({why})")
        return {"skipped": why}
    report: dict[str, Any] = {"seconds": seconds, "runs": []}
    with tempfile.TemporaryDirectory(prefix="jvpn-offload-bench-") as tmp:
        lab = Lab(Path(tmp), gateways=1, egress="nat", balancer=False)
        lab.env["JVPN_GATEWAY_DATA_PLANE"] = lab.env["JVPN_AGENT_DATA_PLANE"] = "compiled"
        lab.up()
        try:
            lab.spawn(lab.server, ["iperf3", "-s", "-B", SERVER], "iperf3-server")
            lab.wait_tcp(lab.server, SERVER, 5201)
            priv, _ = lab.add_client("10.99.0.0/24")
            for i in range(runs):
                row: dict[str, Any] = {}
                for setting in ("on", "off"):
                    flag = "true" if setting == "on" else "false"
                    lab.env["JVPN_GATEWAY_TUN_OFFLOAD"] = lab.env["JVPN_AGENT_TUN_OFFLOAD"] = flag
                    old = lab.gw_procs.get(1)
                    if old is not None and old.alive():
                        os.kill(old.pid, signal.SIGTERM)
                        old.p.wait(15)
                    lab.start_gateway(1)
                    lab.wait_gateways_ready([1])
                    agent = lab.agent(priv, transports=("udp",))
                    lab.wait_agent(agent)
                    try:
                        row[setting] = {
                            "up": _direction(lab, agent, seconds, False, strace),
                            "down": _direction(lab, agent, seconds, True, False),
                        }
                    finally:
                        agent.stop()
                    say(f"offload bench run {i + 1} {setting}: {json.dumps(row[setting])}")
                report["runs"].append(row)
        finally:
            lab.close()
    return report


def format_report(report: dict[str, Any]) -> str:
    if "skipped" in report:
        return f"offload bench: skipped ({report['skipped']})"
    lines = [f"TUN offloads, iperf3 TCP {report['seconds']:g} s each way, one node (NAT egress):",
             "  run setting dir   Mbit/s  gw CPU s/Gbit  agent CPU s/Gbit  gw calls/dgram"
             "  agent calls/dgram"]
    for i, row in enumerate(report["runs"], 1):
        for setting, dirs in row.items():
            for d, r in dirs.items():
                if "error" in r:
                    lines.append(f"  {i:3d} {setting:7s} {d:5s} error: {r['error']}")
                    continue
                lines.append(
                    f"  {i:3d} {setting:7s} {d:5s} {r['mbit']:7.1f} {r['gateway_cpu_s_per_gbit']:14}"
                    f" {r['agent_cpu_s_per_gbit']:17} {r['gateway_syscalls_per_datagram']:15}"
                    f" {r['agent_syscalls_per_datagram']:18}")
    return "\n".join(lines)


if __name__ == "__main__":
    args = sys.argv[1:]
    secs = float(args[args.index("--seconds") + 1]) if "--seconds" in args else 5.0
    n = int(args[args.index("--runs") + 1]) if "--runs" in args else 3
    rep = run(secs, n, "--strace" in args)
    print(format_report(rep))
    if "--json" in args:
        print(json.dumps(rep))
