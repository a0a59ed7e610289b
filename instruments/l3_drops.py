"""``python -m instruments.l3_drops [RATE ...]``: where paced UDP through the L3 tunnel is
lost, and who spends the CPU.

The L3 bench's lab (client, one gateway node with NAT egress, server side; the agent on
the UDP transport), one paced iperf3 UDP run of 1400-byte datagrams per rate (Mbit/s),
and for each: iperf3's loss, the gateway's and the agent's CPU (cores, all threads), and
what changed in every namespace's kernel counters over the run: IP (fragments made and
reassembled, forwarded), UDP (datagrams in and out, receive-buffer drops) and each link's
packets and drops (a TUN's ``tx dropped``: its queue was full, its reader too slow), plus
the gateway node's engine paths and dropped input and the agent engine's counters. ``--plane python`` runs the Python data plane. Root only, like
the lab; for an A/B of two builds of the compiled module, put the other build first on
``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from instruments import loadgen
from instruments.bench_l3 import _iperf
from instruments.netlab import SERVER, Lab, missing_prerequisites

SHOWN = re.compile(r"^(Ip\.(Reasm|Frag|ForwDatagrams|InDiscards|OutDiscards)|"
                   r"Udp\.(InDatagrams|OutDatagrams|RcvbufErrors|SndbufErrors|InErrors)|"
                   r"link\.)")


def counters(lab: Lab, ns: str) -> dict[str, int]:
    """IP and UDP counters (/proc/net/snmp, /proc/net/netstat) and each link's packets,
    drops and errors, of one namespace."""
    out: dict[str, int] = {}
    for table in ("snmp", "netstat"):
        rows = lab.run(ns, "cat", f"/proc/net/{table}").splitlines()
        for head, values in zip(rows[::2], rows[1::2], strict=True):
            group, *names = head.split()
            for name, value in zip(names, values.split()[1:], strict=True):
                out[f"{group[:-1]}.{name}"] = int(value)
    for link in json.loads(lab.run(ns, "ip", "-j", "-s", "link")):
        for way in ("rx", "tx"):
            for what in ("packets", "dropped", "errors"):
                out[f"link.{link['ifname']}.{way}.{what}"] = link["stats64"][way][what]
    return out


def node_counters(lab: Lab) -> dict[str, float]:
    """The gateway node's engine paths and its dropped input (its /metrics; the node
    publishes its engine's counters periodically, so a run's share is approximate)."""
    out = {p: lab.metric(1, "jvpn_engine_packets_total", path=p)
           for p in ("forwarded", "returned", "handed_up")}
    out["dropped"] = lab.metric(1, "jvpn_dropped_total")
    return out


def probe(rates: list[int], plane: str, seconds: float, say: Any = print) -> None:
    with tempfile.TemporaryDirectory(prefix="jvpn-l3-drops-") as tmp:
        lab = Lab(Path(tmp), gateways=1, egress="nat", balancer=False).up()
        try:
            lab.env["JVPN_GATEWAY_DATA_PLANE"] = lab.env["JVPN_AGENT_DATA_PLANE"] = plane
            lab.start_gateway(1)
            lab.wait_gateways_ready([1])
            lab.spawn(lab.server, ["iperf3", "-s", "-B", SERVER], "iperf3-server")
            lab.wait_tcp(lab.server, SERVER, 5201)
            priv, _ = lab.add_client("10.99.0.0/24")
            agent = lab.agent(priv, transports=("udp",))
            st = lab.wait_agent(agent)
            say(f"{plane} data plane, {st['transport']}, tunnel MTU {st['mtu']}")
            spaces = {"client": lab.client, "gateway": lab.gws[0], "server": lab.server}
            pids = {"gateway": lab.gw_procs[1].pid, "agent": agent.pid}
            for rate in rates:
                before = {k: counters(lab, ns) for k, ns in spaces.items()}
                node0 = node_counters(lab)
                cpu0, engine0 = {k: loadgen.cpu_seconds(p) for k, p in pids.items()}, agent.ask("status")
                t0 = time.monotonic()
                end = _iperf(lab, seconds, rate).get("end", {}).get("sum", {})
                dt = time.monotonic() - t0
                cores = {k: (loadgen.cpu_seconds(p) - cpu0[k]) / dt for k, p in pids.items()}
                engine1 = agent.ask("status")
                say(f"{rate} Mbit/s: loss {end.get('lost_percent', 100.0):.3f}% "
                    f"({end.get('lost_packets')} of {end.get('packets')} datagrams); CPU "
                    + ", ".join(f"{k} {c:.2f} cores" for k, c in cores.items()))
                for name, ns in spaces.items():
                    after = counters(lab, ns)
                    moved = {k: v - before[name].get(k, 0) for k, v in after.items()
                             if SHOWN.match(k) and v != before[name].get(k, 0)}
                    say(f"  {name}: {json.dumps(moved)}")
                node1 = node_counters(lab)
                say("  gateway node: " + json.dumps({k: v - node0[k] for k, v in node1.items()}))
                e0, e1 = engine0.get("engine") or {}, engine1.get("engine") or {}
                say("  agent engine: " + json.dumps(
                    {k: v - e0.get(k, 0) for k, v in e1.items() if v != e0.get(k, 0)}))
        finally:
            lab.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m instruments.l3_drops",
                                     description="Where paced UDP through the L3 tunnel is lost, and "
                                     "who spends the CPU (root).")
    parser.add_argument("rates", nargs="*", type=int, default=[300, 400, 500],
                        help="paced UDP rates, Mbit/s (default: 300 400 500)")
    parser.add_argument("--plane", choices=["compiled", "python"], default="compiled")
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    why = missing_prerequisites()
    if why is not None:
        raise SystemExit(f"l3_drops: {why}")
    probe(args.rates, args.plane, args.seconds)
