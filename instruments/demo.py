"""``jvpn-lab demo``: agents keep their sessions while their transports jump.

Everything runs on loopback, with nothing started beforehand: one gateway
(which starts its own redis-server child because no store URL is given), a
UDP echo upstream, and several agents sending sequence-numbered datagrams at a
steady rate. During a bounded run each agent's path is made to jump in its
own way, by user-space impairment (kernel netem is not available here):

- silent death: the agent's socket vanishes; it notices by keepalive silence
  and reattaches from a new source port;
- NAT rebinding: the relay in front of the agent changes its outbound port;
  the gateway roams on the first authenticated packet, no reattach needed;
- UDP blocked: the relay drops all UDP; the agent's UDP reattach gets no
  answer and it falls back to TCP;
- proactive jumps: the agent moves to a fresh UDP port, then to TCP, to QUIC
  and back to UDP;
- UDP blocked but QUIC passing: the relays in front of the agent pass only
  QUIC-shaped datagrams; its UDP reattach gets no answer and it falls back
  to QUIC before TCP.

The summary is measured, not assumed: jumps and their reattach latencies,
datagrams sent, echoed back and lost, and the final state, version and epoch.

As root, an L3 part follows (``instruments.demo_l3``): a real TCP connection
through the tunnel, in network namespaces the demo creates and removes, while the
path jumps and the node carrying it is killed. Not root: it says so.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from agent.agent import Agent, AgentSettings
from gateway.app import GatewayApp
from gateway.config import load_gateway_config
from instruments.netsim import QuicShape, UdpEcho, UdpRelay
from session import dataplane
from session.client import ClientParams
from session.noise import generate_keypair
from store.policy import ClientPolicy

SEQ = struct.Struct("!I")


@dataclass
class Traffic:
    """Sequence-numbered datagrams of one agent, and which came back."""

    sent: int = 0
    echoed: set[int] = field(default_factory=set)
    dup: int = 0

    def on_echo(self, data: bytes) -> None:
        if len(data) >= 4:
            (seq,) = SEQ.unpack_from(data)
            if seq in self.echoed:
                self.dup += 1
            self.echoed.add(seq)


@dataclass
class DemoAgent:
    name: str
    scenario: str
    agent: Agent
    traffic: Traffic
    relay: UdpRelay | None = None
    quic_relay: UdpRelay | None = None


async def _build(n_agents: int, rate: float, payload: int, keepalive: float):  # type: ignore[no-untyped-def]
    cfg = load_gateway_config(None, env={}, overrides={
        "node_id": "gw-demo", "listen_udp": "127.0.0.1:0", "listen_tcp": "127.0.0.1:0",
        "listen_quic": "127.0.0.1:0", "admin": "127.0.0.1:0", "store_url": "", "keepalive_interval_s": keepalive,
        "handshake_retry_threshold": -1,
    })
    app = await GatewayApp(cfg).start()
    assert app.node is not None and app.store is not None
    node = app.node
    assert node.udp_address is not None and node.tcp_address is not None
    assert node.quic_address is not None
    echo, echo_addr = await UdpEcho.start()
    upstream = f"{echo_addr[0]}:{echo_addr[1]}"
    scenarios = ["silent death", "NAT rebinding", "UDP blocked -> TCP", "proactive jumps",
                 "UDP blocked -> QUIC"]
    agents: list[DemoAgent] = []
    params = ClientParams(keepalive_interval=keepalive, dead_after=3, handshake_timeout=1.0,
                          reattach_timeout=0.3, backoff_initial=0.1, backoff_max=1.0,
                          upstream=upstream)
    for i in range(n_agents):
        scenario = scenarios[i % len(scenarios)]
        priv, pub = generate_keypair()
        await app.store.add_client(ClientPolicy(pub, name=f"agent-{i + 1}", ttl_s=60,
                                                reattach_rate=600, upstreams=(upstream,)))
        relay = quic_relay = None
        gateways, quic = [node.udp_address], [node.quic_address]
        if scenario != "silent death" and scenario != "proactive jumps":
            relay = await UdpRelay(node.udp_address).start()
            gateways = [relay.address]
        if scenario == "UDP blocked -> QUIC":  # QUIC's own port behind a QUIC-only path too
            quic_relay = await UdpRelay(node.quic_address).start()
            quic_relay.quic_only = QuicShape()
            quic = [quic_relay.address]
        traffic = Traffic()
        settings = AgentSettings(
            private_key=priv, gateway_public_key=app.keys.public, gateways=gateways,
            tcp_gateways=[node.tcp_address], quic_gateways=quic, upstream=upstream,
            local_udp=None, transports=["udp", "tcp"] if scenario == "UDP blocked -> TCP"
            else ["udp", "quic", "tcp"], params=params, name=f"agent-{i + 1}")
        agents.append(DemoAgent(f"agent-{i + 1}", scenario, Agent(settings, traffic.on_echo),
                                traffic, relay, quic_relay))
    return app, echo, agents


async def _send_loop(a: DemoAgent, rate: float, payload: int, until: float) -> None:
    loop = asyncio.get_running_loop()
    pad = b"\x00" * max(0, payload - SEQ.size)
    interval = 1.0 / rate
    next_t = loop.time()
    while loop.time() < until:
        a.agent.send(SEQ.pack(a.traffic.sent) + pad)
        a.traffic.sent += 1
        next_t += interval
        await asyncio.sleep(max(0.0, next_t - loop.time()))


def _actions(a: DemoAgent, t: float) -> list[tuple[float, str, Callable[[], Awaitable[None] | None]]]:
    """The scheduled path events of one agent, as (time offset, label, action)."""
    ag = a.agent
    if a.scenario == "silent death":
        return [(t * 0.25, "transport killed", ag.kill_transport),
                (t * 0.65, "transport killed", ag.kill_transport)]
    if a.scenario == "NAT rebinding":
        assert a.relay is not None
        return [(t * 0.3, "NAT rebinding", a.relay.rebind), (t * 0.7, "NAT rebinding", a.relay.rebind)]
    if a.scenario == "UDP blocked -> TCP":
        relay = a.relay
        assert relay is not None

        def block() -> None:
            relay.blackhole = True
        return [(t * 0.4, "UDP blocked", block)]
    if a.scenario == "UDP blocked -> QUIC":  # only QUIC-shaped datagrams pass
        quic_only = a.relay
        assert quic_only is not None

        def only_quic() -> None:
            quic_only.quic_only = QuicShape()
        return [(t * 0.4, "UDP blocked, QUIC passes", only_quic)]
    return [(t * 0.2, "jump to a new UDP port", lambda: ag.jump("udp", "port change")),
            (t * 0.4, "jump to TCP", lambda: ag.jump("tcp", "to tcp")),
            (t * 0.6, "jump to QUIC", lambda: ag.jump("quic", "to quic")),
            (t * 0.8, "jump back to UDP", lambda: ag.jump("udp", "back to udp"))]


def _fmt_ms(xs: list[float]) -> str:
    if not xs:
        return "-"
    ms = sorted(x * 1000 for x in xs)
    if len(ms) == 1:
        return f"{ms[0]:.0f}"
    return f"{ms[0]:.0f}/{statistics.median(ms):.0f}/{ms[-1]:.0f}"


async def run_demo(duration: float = 20.0, n_agents: int = 5, rate: float = 50.0,
                   payload: int = 200, keepalive: float = 0.2, out=print) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """Run the demo; return the measured summary (also printed through ``out``)."""
    t_start = time.monotonic()
    out(f"Jumping VPN demo: 1 gateway (embedded redis-server), a UDP echo upstream, "
        f"{n_agents} agents x {rate:.0f} datagrams/s x {payload} B, {duration:.0f} s of traffic")
    app, echo, agents = await _build(n_agents, rate, payload, keepalive)
    loop = asyncio.get_running_loop()
    try:
        assert app.node is not None
        out(f"gateway {app.cfg.node_id}: udp {app.node.udp_address} tcp {app.node.tcp_address} "
            f"admin http://127.0.0.1:{app.admin_port}/metrics  store {app.store_url}")
        for a in agents:
            await a.agent.start()
        await asyncio.gather(*(a.agent.wait_connected(10) for a in agents))
        for a in agents:
            out(f"  {a.name} [{a.scenario}] session {a.agent.machine.session_id.hex()[:12]}... "
                f"v{a.agent.machine.version} epoch {a.agent.machine.epoch}")
        t0 = loop.time()
        until = t0 + duration
        senders = [asyncio.ensure_future(_send_loop(a, rate, payload, until)) for a in agents]
        schedule = sorted(
            ((t0 + off, a, label, fn) for a in agents for off, label, fn in _actions(a, duration)),
            key=lambda x: x[0])
        next_status = t0 + 2.0
        while loop.time() < until:
            now = loop.time()
            while schedule and schedule[0][0] <= now:
                _, a, label, fn = schedule.pop(0)
                out(f"[{now - t0:5.1f}s] {a.name}: {label}")
                res = fn()
                if asyncio.iscoroutine(res):
                    await res
            if now >= next_status:
                next_status += 2.0
                out(f"[{now - t0:5.1f}s] " + " | ".join(
                    f"{a.name} {a.agent.machine.state.name} v{a.agent.machine.version} "
                    f"e{a.agent.machine.epoch} {a.agent.machine.kind.name.lower()}"
                    for a in agents))
            await asyncio.sleep(0.05)
        await asyncio.gather(*senders)
        await asyncio.sleep(1.0)  # let the last echoes drain
        summary = _summary(app, agents)
    finally:
        for a in agents:
            await a.agent.stop()
            for r in (a.relay, a.quic_relay):
                if r is not None:
                    r.close()
        echo.close()
        await app.stop()
    _print_summary(summary, out, time.monotonic() - t_start)
    return summary


def _summary(app: GatewayApp, agents: list[DemoAgent]) -> dict[str, object]:
    rows = []
    for a in agents:
        m = a.agent.machine
        lat = [j.latency for j in a.agent.jumps]
        outages = [j.outage for j in a.agent.jumps if j.outage]
        sent = a.traffic.sent
        got = len(a.traffic.echoed)
        rows.append({
            "agent": a.name, "scenario": a.scenario, "jumps": len(a.agent.jumps),
            "reattach_ms": _fmt_ms(lat), "latencies_s": lat, "outage_ms": _fmt_ms(outages),
            "outages_s": outages, "sent": sent, "received": got,
            "lost": sent - got, "loss_pct": 100.0 * (sent - got) / sent if sent else 0.0,
            "state": m.state.name, "version": m.version, "epoch": m.epoch,
            "transport": m.kind.name.lower(), "session_id": m.session_id.hex(),
            "sessions": a.agent.handshakes,
        })
    switches: dict[str, int] = {}
    exposition = app.metrics.exposition().decode()
    for line in exposition.splitlines():
        if line.startswith("jvpn_transport_switch_total{"):
            labels, value = line.rsplit(" ", 1)
            reason = labels.split('reason="', 1)[1].split('"', 1)[0]
            switches[reason] = switches.get(reason, 0) + int(float(value))
    return {"agents": rows, "gateway_switches": switches, "data_plane": dataplane.describe(),
            "udp_engine": app.node is not None and app.node.engine is not None}


def _print_summary(summary: dict[str, object], out, elapsed: float) -> None:  # type: ignore[no-untyped-def]
    rows = summary["agents"]
    assert isinstance(rows, list)
    out("")
    out("Summary (measured)")
    head = (f"{'agent':8} {'scenario':20} {'jumps':>5} {'reattach ms min/med/max':>24} "
            f"{'outage ms':>14} "
            f"{'sent':>6} {'recv':>6} {'lost':>5} {'loss%':>6} {'state':9} {'ver':>4} {'epoch':>5} "
            f"{'transport':9} {'sessions':>8}")
    out(head)
    out("-" * len(head))
    for r in rows:
        out(f"{r['agent']:8} {r['scenario']:20} {r['jumps']:>5} {r['reattach_ms']:>24} "
            f"{r['outage_ms']:>14} "
            f"{r['sent']:>6} {r['received']:>6} {r['lost']:>5} {r['loss_pct']:>6.2f} "
            f"{r['state']:9} {r['version']:>4} {r['epoch']:>5} {r['transport']:9} {r['sessions']:>8}")
    sw = summary["gateway_switches"]
    assert isinstance(sw, dict)
    out(f"{summary['data_plane']} (gateway and agents); gateway UDP path: "
        f"{'the compiled engine' if summary['udp_engine'] else 'asyncio'}")
    out("gateway TRANSPORT_SWITCH by reason: " + ", ".join(f"{k}={v}" for k, v in sorted(sw.items())))
    out("reattach ms: from the detected loss (or the jump request) to the authenticated ACK;")
    out("outage ms: from the last packet heard on a dead path to the ACK (detection included).")
    kept = all(r["sessions"] == 1 and r["state"] == "ATTACHED" for r in rows)
    out(f"every agent kept its one session: {'yes' if kept else 'NO'}  (demo took {elapsed:.1f} s)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="jvpn-lab demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=20.0, help="seconds of traffic (default 20)")
    p.add_argument("--agents", type=int, default=5, help="number of agents (>= 3, default 5)")
    p.add_argument("--rate", type=float, default=50.0, help="datagrams per second per agent")
    p.add_argument("--payload", type=int, default=200, help="datagram size in bytes")
    p.add_argument("--verbose", action="store_true", help="log every agent and gateway decision")
    p.add_argument("--no-l3", action="store_true", help="skip the L3 part (namespaces, as root)")
    args = p.parse_args(argv)
    if args.agents < 3 or not 1 <= args.duration <= 600 or not 4 <= args.payload <= 1400:
        p.error("--agents must be >= 3, --duration 1..600, --payload 4..1400")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    summary = asyncio.run(run_demo(args.duration, args.agents, args.rate, args.payload))
    rows = summary["agents"]
    assert isinstance(rows, list)
    ok = all(r["sessions"] == 1 and r["state"] == "ATTACHED" for r in rows)
    if not args.no_l3:
        from instruments.demo_l3 import run_l3_demo

        print("", flush=True)
        l3 = run_l3_demo(sys.stdout)
        ok = ok and (l3 is None or bool(l3["survived"]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
