"""The demo's L3 part: a real TCP connection through the tunnel while the path jumps and
the node carrying it is killed.

In network namespaces it creates and removes (``instruments.netlab``): three gateway
nodes with routed egress behind the nginx balancer, a client whose agent owns a TUN
interface, a server side with a byte-sequence checker. One TCP connection from the
client's inner address sends a checked byte stream at a steady rate while the agent
moves to a new source port, the client's address is replaced, its UDP is blocked (TCP
fallback), it jumps back to UDP, and the node holding its binding is killed with
SIGKILL. The summary shows, measured by the checker: one connection from
start to end (same 4-tuple), every byte in order, and the largest gap at each jump.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from instruments.netlab import BALANCER, SERVER, VIP, Lab, Proc, missing_prerequisites

RATE = 200_000  # bytes/s


def _until(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def _conns(srv: Proc, phase: bool = False) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = srv.ask("phase" if phase else "report")["connections"]
    return out


def _node(agent: Proc) -> str:
    return str(agent.ask("status")["node"]).split("#")[0]


def run_l3_demo(out: TextIO, settle_s: float = 2.0) -> dict[str, Any] | None:
    """Run the L3 part; None (said on ``out``) when this machine cannot."""
    why = missing_prerequisites()
    if why is not None:
        print(f"L3 part skipped: {why}", file=out)
        return None
    with tempfile.TemporaryDirectory(prefix="jvpn-l3-demo-") as tmp:
        lab = Lab(Path(tmp), gateways=3, egress="routed").up()
        try:
            return _run(lab, out, settle_s)
        finally:
            lab.close()


def _run(lab: Lab, out: TextIO, settle_s: float) -> dict[str, Any]:
    for i in (1, 2, 3):
        lab.start_gateway(i)
    lab.wait_gateways_ready([1, 2, 3])
    priv, _ = lab.add_client(f"{SERVER}/32,fd99::/64")
    srv = lab.python(lab.server, "instruments.seqcheck", "serve", "::", "7000", name="srv")
    srv.line()
    agent = lab.agent(priv)
    first = lab.wait_agent(agent)
    snd = lab.python(lab.client, "instruments.seqcheck", "send", SERVER, "7000", str(RATE),
                     name="snd")
    local = snd.line()["connected"]
    print(f"L3: client -> nginx ({BALANCER}) -> 3 nodes, routed egress; "
          f"session {first['session'][:12]} inner {first['inner']} mtu {first['mtu']} "
          f"via {first['transport']} ({_node(agent)}); TCP {local} -> {SERVER}:7000 at "
          f"{RATE // 1000} kB/s", file=out)
    _until(lambda: _conns(srv) and _conns(srv)[0]["bytes"] > 50_000, 10, "the stream")
    _conns(srv, phase=True)
    stalls: list[tuple[str, float, str]] = []

    def settle(name: str) -> None:
        start = _conns(srv)[0]["bytes"]
        _until(lambda: _conns(srv)[0]["bytes"] > start + RATE // 2, 15, f"traffic after {name}")
        time.sleep(settle_s)
        gap = _conns(srv, phase=True)[0]["phase_gap_s"]
        st = agent.ask("status")
        stalls.append((name, gap, f"{st['transport']} ({_node(agent)})"))
        print(f"  {name:30s} largest gap {gap:6.3f} s, now via {st['transport']} "
              f"({_node(agent)})", file=out, flush=True)

    time.sleep(settle_s)
    agent.ask("jump udp")
    settle("new source port")
    lab.run(lab.client, "ip", "addr", "del", f"{lab.client_ip}/24", "dev", "eth0")
    lab.run(lab.client, "ip", "addr", "add", f"{lab.client_net}.11/24", "dev", "eth0")
    _until(lambda: f"{lab.client_net}.11:" in str(agent.ask("status")["transport"]), 15,
           "a reattach from the new address")
    settle("client address replaced")
    lab.run(lab.client, "nft", "add table inet demo")
    lab.run(lab.client, "nft", "add chain inet demo out { type filter hook output priority 0 ; }")
    lab.run(lab.client, "nft", "add rule inet demo out udp dport 51820 drop")
    _until(lambda: str(agent.ask("status")["transport"]).startswith("tcp"), 15, "TCP fallback")
    settle("UDP blocked -> TCP")
    lab.run(lab.client, "nft", "delete table inet demo")
    agent.ask("jump udp")
    settle("back to UDP")
    owner = _node(agent)
    holder = next((i for i, ns in enumerate(lab.gws, 1)
                   if VIP in lab.run(ns, "ip", "-o", "addr", "show", "dev", "jvpn0",
                                     check=False)), 0)
    print(f"  (the return address {VIP} is held by gw-{holder}: what reaches it for a session "
          f"bound elsewhere is relayed to the owner)", file=out)
    lab.gw_procs[int(owner.rsplit("-", 1)[1])].kill()
    _until(lambda: _node(agent) != owner and agent.ask("status")["state"] == "ATTACHED", 15,
           "a move to another node")
    settle(f"{owner} killed (SIGKILL)")

    snd.ask("pause")
    sent = snd.ask("report")
    _until(lambda: _conns(srv)[0]["bytes"] >= sent["bytes"], 10, "the last bytes")
    final = _conns(srv)
    st = agent.ask("status")
    survived = (len(final) == 1 and final[0]["errors"] == 0 and sent["error"] == ""
                and final[0]["bytes"] == sent["bytes"] and sent["local"] == local
                and st["inner"] == first["inner"])
    summary = {"survived": survived, "connections": len(final), "bytes": final[0]["bytes"],
               "order_errors": final[0]["errors"], "max_gap_s": final[0]["max_gap_s"],
               "stalls": stalls, "inner": st["inner"], "return_address_holder": f"gw-{holder}"}
    verdict = "SURVIVED" if survived else "BROKEN"
    print(f"L3 summary: the TCP connection {verdict}: {len(final)} connection(s), "
          f"{final[0]['bytes']} bytes in order ({final[0]['errors']} order errors), same "
          f"4-tuple {local}, inner addresses unchanged ({st['inner']}); largest gap "
          f"{final[0]['max_gap_s']:.3f} s", file=out, flush=True)
    return summary
