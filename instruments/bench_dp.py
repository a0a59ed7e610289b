"""The datagram bench's data-plane comparison: the compiled and the Python data plane side by
side on loopback, driven by the compiled load generator (``instruments.loadgen``).

Theory of operation. Each plane is a gateway and an agent process (``BenchEnv.
data_plane_pair``); the load generator sends 1400-byte datagrams to the agent's local port,
the agent seals them to the gateway, the gateway opens them and forwards them to its
upstream, the compiled echo, and the answers come back the same way. The same generator
also runs straight at the echo (the bare loopback echo: the context, the most two
processes on these cores can echo) and at the bench's uvloop echo (the Python baseline the
issue names). For each of the four the bench finds the highest paced rate carried at <
0.5% loss (``loadgen.highest_rate``: bounded in steps and time). Then, in windows paced at
50% of a plane's highest rate, it measures the plane's RTT percentiles beside the bare
echo's at the same rate (the added p99), and the gateway's and the agent's CPU and system
calls per packet; and the compiled plane once more at the Python plane's window rate, so
that the two planes' CPU and system calls per packet are compared at the same load.

One definition of "per packet", here and in the L3 bench: a packet is one datagram
crossing the tunnel once, either way (an echoed datagram is two); a process's CPU per
packet is its user + system CPU time (all threads) over a paced window divided by the
packets of that window; its system calls per packet are all its threads' system calls
over the same window (``loadgen.SyscallCount``: perf's ``raw_syscalls`` tracepoint, else
strace) divided by the same packets.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from instruments import loadgen

STEP_SECONDS = 1.5  # measured seconds of one search step
STEP_WARMUP = 0.3
SEARCH_STEPS = 12
SEARCH_BUDGET_S = 50.0
START_RATE = {"bare": 20_000.0, "uvloop_echo": 20_000.0, "compiled": 20_000.0, "python": 5_000.0}
MAX_RATE = 1_000_000.0
WINDOW_SECONDS = 3.0  # the longest window (CPU per packet is read in 10 ms ticks)
WINDOW_SHARE = 0.5  # the latency and per-packet windows run at this share of the highest rate


async def search(
    addr: tuple[str, int],
    start: float,
    payload: int,
    seconds: float = STEP_SECONDS,
    steps: int = SEARCH_STEPS,
) -> dict[str, Any]:
    """The highest paced rate the path at ``addr`` echoes at < 0.5% loss."""

    def measure(rate: float) -> dict[str, Any]:
        return loadgen.run_gen(addr, rate=rate, seconds=seconds, warmup=STEP_WARMUP, size=payload)

    return await asyncio.to_thread(
        loadgen.highest_rate,
        measure,
        start=start,
        max_rate=MAX_RATE,
        max_steps=steps,
        budget_s=SEARCH_BUDGET_S,
    )


async def window(
    addr: tuple[str, int],
    rate: float,
    seconds: float,
    payload: int,
    pids: dict[str, int] | None = None,
) -> dict[str, Any]:
    """One paced run at ``rate``: rate, loss, RTT percentiles; with ``pids``, each process's
    CPU and system calls per packet over the run (module docstring)."""
    pids = pids or {}
    calls = await asyncio.to_thread(loadgen.SyscallCount(pids).start) if pids else None
    cpu0 = {name: loadgen.cpu_seconds(pid) for name, pid in pids.items()}
    r = await asyncio.to_thread(
        loadgen.run_gen, addr, rate=rate, seconds=seconds, warmup=STEP_WARMUP, size=payload
    )
    cpu = {name: loadgen.cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
    counts = await asyncio.to_thread(calls.stop) if calls is not None else {}
    packets = int(r["total_sent"]) + int(r["total_answered"])
    out: dict[str, Any] = {
        "rate": r["rate"],
        "target_rate": r["target_rate"],
        "loss": r["loss"],
        "rtt_p50_us": r["rtt_p50_us"],
        "rtt_p99_us": r["rtt_p99_us"],
        "packets": packets,
        "loadgen_calls_per_packet": (r["send_calls"] + r["recv_calls"] + r["poll_calls"])
        / max(1, packets),
    }
    for name in pids:
        out[f"{name}_cpu_us_per_packet"] = cpu[name] * 1e6 / packets if packets else None
        n = counts.get(name)
        out[f"{name}_syscalls_per_packet"] = n / packets if n is not None and packets else None
    if calls is not None:
        out["syscall_method"] = calls.method
    return out


async def run_once(
    targets: dict[str, tuple[str, int]],
    bare: tuple[str, int],
    pids: dict[str, dict[str, int]],
    opts: Any,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """One repeat: the four searches, then the windows. ``targets``: name -> address
    (``bare``, ``uvloop_echo`` and the planes); ``pids``: plane -> its gateway and agent."""
    run: dict[str, Any] = {
        "search": {},
        "half": {},
        "bare_at_half": {},
        "ports": {name: addr[1] for name, addr in targets.items()},
    }
    seconds = min(opts.seconds, WINDOW_SECONDS)
    # which process owns a port that dropped datagrams (socket_drops of each step): the
    # sockets of each plane's processes, read after its search (a flow's upstream socket
    # is opened by its first datagram)
    owners: dict[str, set[int]] = {}
    for name, addr in targets.items():
        s = await search(
            addr,
            START_RATE.get(name, 10_000.0),
            opts.payload,
            min(STEP_SECONDS, opts.seconds),
            opts.search_steps,
        )
        run["search"][name] = {k: v for k, v in s.items() if k != "best"}
        for role, pid in pids.get(name, {}).items():
            owners.setdefault(f"{name} {role}", set()).update(loadgen.udp_ports(pid))
        say(
            f"    {name:12s} {s['rate']:>9,.0f} /s at < 0.5% loss ({len(s['steps'])} steps, "
            f"ended by {s['ended_by']})"
        )
    run["ports_by_process"] = {k: sorted(v) for k, v in owners.items()}
    for plane in pids:
        half = WINDOW_SHARE * run["search"][plane]["target_rate"]
        if half <= 0:
            continue
        run["half"][plane] = await window(targets[plane], half, seconds, opts.payload, pids[plane])
        run["bare_at_half"][plane] = await window(bare, half, seconds, opts.payload)
    if "compiled" in pids and "python" in run["half"]:
        common = run["half"]["python"]["target_rate"]
        run["compiled_at_python_rate"] = await window(
            targets["compiled"], common, seconds, opts.payload, pids["compiled"]
        )
    return run


def _median(values: list[float]) -> float:
    s = sorted(values)
    if not s:
        return 0.0
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def _stat(values: list[float | None]) -> dict[str, Any]:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "runs": []}
    return {"median": _median(vals), "min": min(vals), "max": max(vals), "runs": vals}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians and spreads over the repeats."""
    names = list(runs[0]["search"])
    out: dict[str, Any] = {"repeat": len(runs), "targets": names}

    def rate(r: dict[str, Any], n: str) -> float:
        return float(r["search"][n]["rate"])

    out["rate"] = {n: _stat([rate(r, n) for r in runs]) for n in names}
    ratios: dict[str, Any] = {}
    for a, b in (
        ("compiled", "python"),
        ("compiled", "bare"),
        ("python", "bare"),
        ("compiled", "uvloop_echo"),
        ("uvloop_echo", "bare"),
    ):
        if a in names and b in names:
            ratios[f"{a}_vs_{b}"] = _stat(
                [rate(r, a) / rate(r, b) if rate(r, b) else None for r in runs]
            )
    out["ratio"] = ratios
    planes = [p for p in ("compiled", "python") if p in names]
    half: dict[str, Any] = {}
    for p in planes:
        ws = [r["half"].get(p) for r in runs]
        bs = [r["bare_at_half"].get(p) for r in runs]
        half[p] = {
            key: _stat([w[key] if w else None for w in ws])
            for key in (
                "target_rate",
                "loss",
                "rtt_p50_us",
                "rtt_p99_us",
                "gateway_cpu_us_per_packet",
                "agent_cpu_us_per_packet",
                "gateway_syscalls_per_packet",
                "agent_syscalls_per_packet",
                "loadgen_calls_per_packet",
            )
        }
        half[p]["bare_rtt_p99_us"] = _stat([b["rtt_p99_us"] if b else None for b in bs])
        half[p]["added_p99_us"] = _stat(
            [
                w["rtt_p99_us"] - b["rtt_p99_us"] if w and b else None
                for w, b in zip(ws, bs, strict=True)
            ]
        )
    out["half"] = half
    if all("compiled_at_python_rate" in r for r in runs):
        cs = [r["compiled_at_python_rate"] for r in runs]
        ps = [r["half"]["python"] for r in runs]
        same: dict[str, Any] = {
            key: _stat([c[key] for c in cs])
            for key in (
                "target_rate",
                "loss",
                "gateway_cpu_us_per_packet",
                "agent_cpu_us_per_packet",
                "gateway_syscalls_per_packet",
                "agent_syscalls_per_packet",
            )
        }
        same["gateway_cpu_vs_python"] = _stat(
            [
                c["gateway_cpu_us_per_packet"] / p["gateway_cpu_us_per_packet"]
                if c["gateway_cpu_us_per_packet"] is not None and p["gateway_cpu_us_per_packet"]
                else None
                for c, p in zip(cs, ps, strict=True)
            ]
        )
        out["compiled_at_python_rate"] = same
    methods = {w.get("syscall_method") for r in runs for w in r["half"].values()}
    out["syscall_method"] = next(iter(methods)) if len(methods) == 1 else sorted(map(str, methods))
    out["runs"] = runs
    return out


def _f(x: float | None, spec: str) -> str:
    return "?" if x is None else format(x, spec)


def _spread(s: dict[str, Any], spec: str, unit: str = "") -> str:
    if s["median"] is None:
        return "?"
    if len(s["runs"]) < 2:
        return f"{format(s['median'], spec)}{unit}"
    return f"{format(s['median'], spec)}{unit} ({format(s['min'], spec)}-{format(s['max'], spec)})"


LABELS = {
    "bare": "bare loopback echo (compiled gen -> compiled echo)",
    "uvloop_echo": "uvloop echo (compiled gen -> Python echo)",
    "compiled": "compiled plane (gen -> agent -> gateway -> echo)",
    "python": "Python plane (the same, asyncio paths)",
}


def format_planes(pl: dict[str, Any], payload: int) -> list[str]:
    """The report's lines for the comparison (medians, the runs' range in brackets)."""
    if "skipped" in pl:
        return [f"  data planes, compiled load generator: skipped ({pl['skipped']})"]
    lines = [
        f"  data planes, compiled load generator and echo ({payload} B, highest paced rate "
        f"at < 0.5% loss; median of {pl['repeat']}, range):"
    ]
    for n in pl["targets"]:
        lines.append(f"    {LABELS.get(n, n):52s} {_spread(pl['rate'][n], ',.0f', ' /s')}")
    rt = pl["ratio"]
    if "compiled_vs_python" in rt:
        lines.append(
            f"    compiled / Python plane {_spread(rt['compiled_vs_python'], '.2f', 'x')} "
            "(target >= 3x)"
        )
    for key, text in (
        ("compiled_vs_bare", "compiled / bare echo"),
        ("python_vs_bare", "Python plane / bare echo"),
        ("compiled_vs_uvloop_echo", "compiled / uvloop echo"),
    ):
        if key in rt:
            lines.append(f"    {text} {_spread(rt[key], '.2f', 'x')}")
    for p, h in pl["half"].items():
        lines.append(
            f"    {p} at 50% ({_spread(h['target_rate'], ',.0f', ' /s')}): rtt p50 "
            f"{_spread(h['rtt_p50_us'], '.0f', ' us')}, p99 {_spread(h['rtt_p99_us'], '.0f', ' us')}"
            f" beside the bare echo's p99 {_spread(h['bare_rtt_p99_us'], '.0f', ' us')}: added p99 "
            f"{_spread(h['added_p99_us'], '.0f', ' us')}"
        )
        lines.append(
            f"      per packet: gateway CPU {_spread(h['gateway_cpu_us_per_packet'], '.2f', ' us')}, agent CPU "
            f"{_spread(h['agent_cpu_us_per_packet'], '.2f', ' us')}; syscalls/packet gateway "
            f"{_spread(h['gateway_syscalls_per_packet'], '.3f')}, agent "
            f"{_spread(h['agent_syscalls_per_packet'], '.3f')} (load generator "
            f"{_spread(h['loadgen_calls_per_packet'], '.3f')})"
        )
    same = pl.get("compiled_at_python_rate")
    if same:
        lines.append(
            f"    compiled at the Python plane's window rate "
            f"({_spread(same['target_rate'], ',.0f', ' /s')}): gateway CPU "
            f"{_spread(same['gateway_cpu_us_per_packet'], '.2f', ' us')}/packet = "
            f"{_spread(same['gateway_cpu_vs_python'], '.2f', 'x')} the Python plane's "
            f"(target <= 0.33x); syscalls/packet gateway "
            f"{_spread(same['gateway_syscalls_per_packet'], '.3f')}, agent "
            f"{_spread(same['agent_syscalls_per_packet'], '.3f')}"
        )
    lines.append(
        f"    (a packet: one datagram crossing the tunnel once; system calls counted with "
        f"{pl['syscall_method'] or 'nothing: neither perf nor strace is installed'})"
    )
    return lines
