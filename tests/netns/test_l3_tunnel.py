"""The L3 tunnel in real namespaces: an inner TCP connection survives every jump and the
death of the node that carried it.

The client reaches the nodes only through the nginx balancer in its own namespace
(``instruments.netlab``: the deploy template, real nginx). One long-lived TCP
connection from the client's inner address to the server side's
byte-sequence checker, 200 kB/s, while the path jumps: a new source port, the client's
address replaced, UDP blocked (TCP fallback) and back to UDP, the owning node killed
with SIGKILL, a rolling restart of all three nodes (routed egress: the return path
follows the binding through the store).
After each: the same connection (one connection ever, same 4-tuple), every byte in
order, the largest gap reported and under 5 s, the session's inner addresses
unchanged. Also: a spoofed inner source and a disallowed prefix are dropped and
counted; IPv6 through the tunnel in routed egress (the IPv6 pool's return address),
also after the owner's death; IPv6 and a full-size TCP transfer over the TCP transport
(full tunnel, NAT egress); the agent leaves the client's addresses, routes and rules as it found them,
after a SIGTERM and after a SIGKILL (the next start cleans up).
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from instruments.netlab import IN_NET, RELAY_PORT, SERVER, SERVER6, VIP, Lab, Proc
from session.keys import relay_key
from session.relay import RelayCodec
from tests.netns.polling import until

MAX_GAP_S = 5.0
RATE = 200_000  # bytes/s of the checked stream




def conns(srv: Proc, phase: bool = False) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = srv.ask("phase" if phase else "report")["connections"]
    return out


def flowing(srv: Proc, more: int, timeout: float = 10.0) -> None:
    """The stream moves again: ``more`` bytes beyond what the checker has now."""
    start = conns(srv)[0]["bytes"]
    until(lambda: conns(srv)[0]["bytes"] >= start + more, timeout, f"{more} more bytes")


def tun_addresses(lab: Lab) -> list[str]:
    raw = json.loads(lab.run(lab.client, "ip", "-j", "addr", "show", "dev", "jvpn0"))
    return sorted(f"{a['local']}/{a['prefixlen']}" for a in raw[0]["addr_info"]
                  if a.get("scope") == "global")


def vip_holder(lab: Lab) -> int | None:
    for i, ns in enumerate(lab.gws, 1):
        if not lab.gw_procs[i].alive():
            continue
        out = lab.run(ns, "ip", "-o", "addr", "show", "dev", "jvpn0", check=False)
        if VIP in out:
            return i
    return None


def ipv6_answers(lab: Lab, what: str) -> None:
    """The server side answers the client's inner IPv6 address through the tunnel (routed:
    the IPv6 pool's return address, the relay if its holder is not the owner)."""
    until(lambda: " 0% packet loss" in lab.run(lab.client, "ping", "-6", "-c", "1", "-W", "1",
                                                 SERVER6, check=False), 10, f"IPv6 {what}")


def ipv4_udp(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    """An IPv4/UDP packet (header checksum set; UDP checksum 0: none, allowed in IPv4)."""
    total = 28 + len(payload)
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0x4000, 64, 17, 0,
                       ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    words = sum(struct.unpack("!10H", head))
    while words >> 16:
        words = (words & 0xFFFF) + (words >> 16)
    head = head[:10] + struct.pack("!H", ~words & 0xFFFF) + head[12:]
    return head + struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def replayed_relay_is_dropped(lab: Lab, node: int, inner_v4: str) -> None:
    """A relayed packet sent twice to the owner's relay port (as another node would, under
    the KEK-derived key): the client receives it once, the copy is dropped and counted."""
    rx = lab.spawn(lab.client, [sys.executable, "-u", "-c", (
        "import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
        f"s.bind(({inner_v4!r},9999))\ns.settimeout(0.2)\nprint('{{}}')\nn=0\n"
        "t=time.monotonic()+3\nwhile time.monotonic()<t:\n try:\n  s.recv(2048);n+=1\n"
        " except OSError:\n  pass\nprint('{\"received\": %d}' % n)\n")], "relay-rx")
    rx.line()  # bound
    before = lab.metric(node, "jvpn_dropped_total", reason="REPLAYED")
    now_ms = time.time_ns() // 1_000_000
    codec = RelayCodec(relay_key(lab.kek), b"tester-1", now_ms)
    datagram = codec.seal(ipv4_udp(SERVER, inner_v4, 5555, 9999, b"relayed once"), now_ms)
    code = ("import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
            "d=bytes.fromhex(sys.argv[1])\n"
            f"[s.sendto(d,('{IN_NET}.{node}',{RELAY_PORT})) for _ in range(2)]\n")
    lab.run(lab.server, sys.executable, "-c", code, datagram.hex())
    until(lambda: lab.metric(node, "jvpn_dropped_total", reason="REPLAYED") >= before + 1, 5,
          "the replayed relay datagram counted")
    assert rx.line(10)["received"] == 1, "the relayed packet arrives exactly once"


def send_from(lab: Lab, source: str, dest: str, port: int = 9999) -> None:
    """One UDP datagram from ``source`` (an address on the client's TUN) to ``dest``."""
    code = (f"import socket\ns=socket.socket()\ns=socket.socket(socket.AF_INET,"
            f"socket.SOCK_DGRAM)\ns.bind(({source!r},0))\ns.sendto(b'x'*100,({dest!r},{port}))")
    lab.run(lab.client, sys.executable, "-c", code)


@pytest.mark.parametrize("egress", ["routed", "nat"])
def test_an_inner_tcp_connection_survives_every_jump_and_the_owners_death(
        lab_factory: Callable[..., Lab], egress: str) -> None:
    """Routed: every jump, the owner's death and a rolling restart of all three nodes.
    NAT: the jumps that stay on the node (a move to another node keeps the session and its
    addresses, not the connection)."""
    routed = egress == "routed"
    lab = lab_factory(gateways=3 if routed else 1, egress=egress)
    nodes = [1, 2, 3] if routed else [1]
    for i in nodes:
        lab.start_gateway(i)
    lab.wait_gateways_ready(nodes)
    if routed:
        until(lambda: vip_holder(lab), 10, "a node to hold the return address")
    priv, _ = lab.add_client(f"{SERVER}/32,fd99::/64")
    srv = lab.python(lab.server, "instruments.seqcheck", "serve", "::", "7000", name="srv")
    srv.line()
    agent = lab.agent(priv)
    first = lab.wait_agent(agent)
    inner = first["inner"]
    assert inner.startswith("10.77.0.") and ",fd77::" in inner
    addrs = tun_addresses(lab)
    assert addrs == sorted(inner.split(","))

    ipv6_answers(lab, "at start")
    snd = lab.python(lab.client, "instruments.seqcheck", "send", SERVER, "7000", str(RATE),
                     name="snd")
    local = snd.line()["connected"]
    assert local.startswith(inner.split("/")[0] + ":")
    until(lambda: conns(srv) and conns(srv)[0]["bytes"] > 50_000, 10, "the stream to start")
    conns(srv, phase=True)
    stalls: dict[str, float] = {}

    def jumped(n: int) -> Any:
        return lambda: len(agent.ask("status")["jumps"]) >= n

    def phase(name: str) -> None:
        flowing(srv, RATE // 2)
        c = conns(srv, phase=True)
        assert len(c) == 1, f"{name}: the connection was re-opened: {c}"
        stalls[name] = c[0]["phase_gap_s"]
        st = agent.ask("status")
        assert st["inner"] == inner and tun_addresses(lab) == addrs, f"{name}: addresses moved"

    # 1. a new source port
    agent.ask("jump udp")
    until(jumped(1), 10, "the port change")
    phase("source port change")

    # 2. the client's address replaced under the agent
    lab.run(lab.client, "ip", "addr", "del", f"{lab.client_ip}/24", "dev", "eth0")
    lab.run(lab.client, "ip", "addr", "add", f"{lab.client_net}.11/24", "dev", "eth0")
    until(jumped(2), 15, "a reattach from the new address")
    assert f"{lab.client_net}.11:" in agent.ask("status")["transport"]
    phase("client address change")

    # 3. UDP blocked: the agent falls back to TCP; then back to UDP
    lab.run(lab.client, "nft", "add table inet l3test")
    lab.run(lab.client, "nft", "add chain inet l3test out { type filter hook output priority 0 ; }")
    lab.run(lab.client, "nft", "add rule inet l3test out udp dport 51820 drop")
    until(lambda: agent.ask("status")["transport"].startswith("tcp"), 15, "TCP fallback")
    phase("UDP blocked -> TCP")
    lab.run(lab.client, "nft", "delete table inet l3test")
    n = len(agent.ask("status")["jumps"])
    agent.ask("jump udp")
    until(jumped(n + 1), 10, "the jump back to UDP")
    # the jump went to UDP (a later reattach of the agent's own may have followed it)
    assert any(j["to_transport"].startswith("udp") for j in agent.ask("status")["jumps"][n:])
    phase("TCP -> UDP")

    # 4. the node carrying the session dies (SIGKILL): another takes it, the return path
    # follows through the store
    if routed:
        owner = int(agent.ask("status")["node"].split("#")[0].rsplit("-", 1)[1])
        lab.gw_procs[owner].kill()
        until(lambda: agent.ask("status")["node"].split("#")[0] != f"gw-{owner}"
              and agent.ask("status")["state"] == "ATTACHED", 15, "a move to another node")
        phase(f"owner gw-{owner} killed")
        ipv6_answers(lab, "after the owner's death")

        # 5. a rolling restart of all three nodes (the killed one comes back first)
        for i in (owner, *[n for n in nodes if n != owner]):
            p = lab.gw_procs[i]
            if p.alive():
                os.kill(p.pid, signal.SIGTERM)
                p.p.wait(15)
            lab.start_gateway(i)
            lab.wait_gateways_ready([i])
            until(lambda: agent.ask("status")["state"] == "ATTACHED", 15, "the session attached")
            phase(f"gw-{i} restarted")

    snd.ask("pause")
    sent = snd.ask("report")
    assert sent["error"] == "" and sent["local"] == local
    until(lambda: conns(srv)[0]["bytes"] == sent["bytes"], 10, "every byte sent to arrive")
    final = conns(srv)
    assert len(final) == 1 and final[0]["errors"] == 0, final
    if routed:  # NAT: the server sees the node's address and port
        assert final[0]["peer"].endswith(local)
    print(f"\nstalls, {egress} egress (largest gap the byte checker saw per jump):")
    for name, gap in stalls.items():
        print(f"  {name:28s} {gap:6.3f} s")
    print(f"  overall max gap {final[0]['max_gap_s']:.3f} s, {sent['bytes']} bytes in order")
    assert final[0]["max_gap_s"] < MAX_GAP_S, stalls

    # cryptokey routing: a spoofed inner source, a prefix the policy does not allow
    node = int(agent.ask("status")["node"].split("#")[0].rsplit("-", 1)[1])
    spoofed = lab.metric(node, "jvpn_dropped_total", reason="SPOOFED_SOURCE")
    denied = lab.metric(node, "jvpn_dropped_total", reason="POLICY")
    lab.run(lab.client, "ip", "addr", "add", "10.77.0.200/32", "dev", "jvpn0")
    lab.run(lab.client, "ip", "route", "add", "10.99.0.3/32", "dev", "jvpn0")
    for _ in range(3):
        send_from(lab, "10.77.0.200", SERVER)
        send_from(lab, inner.split("/")[0], "10.99.0.3")
    until(lambda: lab.metric(node, "jvpn_dropped_total", reason="SPOOFED_SOURCE") >= spoofed + 3,
          5, "the spoofed packets counted")
    until(lambda: lab.metric(node, "jvpn_dropped_total", reason="POLICY") >= denied + 3, 5,
          "the disallowed packets counted")
    if routed:
        replayed_relay_is_dropped(lab, node, inner.split("/")[0])
    agent.stop()


def _state(lab: Lab) -> tuple[str, ...]:
    """The client namespace's addresses, routes (every table) and rules, as text."""
    out = []
    for argv in (("ip", "-o", "addr"), ("ip", "-o", "route", "show", "table", "all"),
                 ("ip", "-o", "-6", "route", "show", "table", "all"), ("ip", "-o", "rule"),
                 ("ip", "-o", "-6", "rule"), ("ip", "-o", "link")):
        text = lab.run(lab.client, *argv)
        # link-local addresses and their routes are the kernel's (eth0's appears some time
        # after the link comes up), never the agent's
        out.append("\n".join(sorted(line for line in text.splitlines() if "fe80::" not in line)))
    return tuple(out)


def test_full_tunnel_ipv6_mtu_over_tcp_and_nothing_left_behind(
        lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(gateways=1, egress="nat")
    lab.start_gateway(1)
    lab.wait_gateways_ready([1])
    priv, _ = lab.add_client("0.0.0.0/0,::/0")
    srv = lab.python(lab.server, "instruments.seqcheck", "serve", "::", "7000", name="srv")
    srv.line()
    before = _state(lab)

    agent = lab.agent(priv, transports=("tcp",))
    st = lab.wait_agent(agent)
    assert st["transport"].startswith("tcp") and st["mtu"] >= 1280
    rules = lab.run(lab.client, "ip", "rule")
    assert "not from all fwmark 0xca6c lookup 51820" in rules
    assert "suppress_prefixlength 0" in rules
    # a packet of exactly the TUN's MTU, don't-fragment, both ways over the TCP transport
    out = lab.run(lab.client, "ping", "-M", "do", "-c", "3", "-W", "2", "-s", str(st["mtu"] - 28),
                  SERVER, check=False)
    assert " 0% packet loss" in out, f"a full-size inner packet over TCP:\n{out}"
    # full-size segments both families, as fast as it goes, over the TCP transport
    for host in (SERVER6, SERVER):
        snd = lab.python(lab.client, "instruments.seqcheck", "send", host, "7000", "0",
                         name=f"bulk-{host}")
        snd.line()
        until(lambda s=snd: s.ask("report")["bytes"] > 2_000_000, 20, f"2 MB to {host}")
        snd.ask("pause")
        sent = snd.ask("report")
        assert sent["error"] == ""
        until(lambda n=sent["bytes"]: any(c["bytes"] == n for c in conns(srv)), 10, "all bytes")
        snd.stop()
    assert all(c["errors"] == 0 for c in conns(srv))
    peers = {c["peer"].rsplit(":", 1)[0] for c in conns(srv)}
    assert any("fd99::1" in p for p in peers) and any("10.99.0.1" in p for p in peers)  # NAT

    # SIGTERM: everything it installed goes
    os.kill(agent.pid, signal.SIGTERM)
    agent.p.wait(10)
    assert _state(lab) == before
    # SIGKILL leaves its rules (the interface goes with the process): the next run cleans up
    agent2 = lab.agent(priv, transports=("tcp",))
    lab.wait_agent(agent2)
    agent2.kill()
    assert "lookup 51820" in lab.run(lab.client, "ip", "rule")
    agent3 = lab.agent(priv, transports=("tcp",))
    lab.wait_agent(agent3)
    agent3.stop()
    assert _state(lab) == before


def test_an_inner_tcp_connection_survives_udp_to_quic_to_tcp(
        lab_factory: Callable[..., Lab]) -> None:
    """The three transports in turn under one inner TCP connection: UDP to the session port
    blocked (QUIC on its own port passes: the agent falls back to QUIC before TCP), then
    QUIC blocked too (TCP). On QUIC a full-size inner packet (the TUN's MTU, don't-fragment)
    crosses in one DATAGRAM frame. Same connection, every byte in order, addresses kept."""
    lab = lab_factory(gateways=1, egress="nat")
    lab.start_gateway(1, quic=True)
    lab.wait_gateways_ready([1])
    priv, _ = lab.add_client(f"{SERVER}/32,fd99::/64")
    srv = lab.python(lab.server, "instruments.seqcheck", "serve", "::", "7000", name="srv")
    srv.line()
    agent = lab.agent(priv, transports=("udp", "quic", "tcp"))
    first = lab.wait_agent(agent)
    inner, mtu = first["inner"], first["mtu"]
    assert mtu == 1363, f"the MTU of a session that may use QUIC: {mtu}"
    snd = lab.python(lab.client, "instruments.seqcheck", "send", SERVER, "7000", str(RATE),
                     name="snd")
    local = snd.line()["connected"]
    until(lambda: conns(srv) and conns(srv)[0]["bytes"] > 50_000, 10, "the stream to start")
    conns(srv, phase=True)
    stalls: dict[str, float] = {}

    def phase(name: str) -> None:
        flowing(srv, RATE // 2)
        c = conns(srv, phase=True)
        assert len(c) == 1, f"{name}: the connection was re-opened: {c}"
        stalls[name] = c[0]["phase_gap_s"]
        assert agent.ask("status")["inner"] == inner, f"{name}: addresses moved"

    lab.run(lab.client, "nft", "add table inet l3quic")
    lab.run(lab.client, "nft", "add chain inet l3quic out { type filter hook output priority 0 ; }")
    lab.run(lab.client, "nft", "add rule inet l3quic out udp dport 51820 drop")
    until(lambda: agent.ask("status")["transport"].startswith("quic"), 15, "QUIC fallback")
    phase("UDP blocked -> QUIC")
    payload = mtu - 28  # IPv4 and ICMP headers: the packet is exactly the TUN's MTU
    out = lab.run(lab.client, "ping", "-M", "do", "-c", "3", "-W", "2", "-s", str(payload),
                  SERVER, check=False)
    assert " 0% packet loss" in out, f"a full-size inner packet over QUIC:\n{out}"
    lab.run(lab.client, "nft", "add rule inet l3quic out udp dport 51821 drop")
    until(lambda: agent.ask("status")["transport"].startswith("tcp"), 20, "TCP fallback")
    phase("QUIC blocked -> TCP")
    lab.run(lab.client, "nft", "delete table inet l3quic")

    snd.ask("pause")
    sent = snd.ask("report")
    assert sent["error"] == "" and sent["local"] == local
    until(lambda: conns(srv)[0]["bytes"] == sent["bytes"], 10, "every byte sent to arrive")
    final = conns(srv)
    assert len(final) == 1 and final[0]["errors"] == 0, final
    print("\nstalls (largest gap the byte checker saw per jump):")
    for name, gap in stalls.items():
        print(f"  {name:28s} {gap:6.3f} s")
    assert final[0]["max_gap_s"] < MAX_GAP_S, stalls
    agent.stop()
