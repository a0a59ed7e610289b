"""TUN offloads on the compiled engines, on and off: a bulk TCP stream through the tunnel.

With offloads on, the client's kernel hands the agent's engine TCP super-packets (TSO),
which it cuts into segments, each sealed as one tunnel datagram; the gateway's engine
merges each batch's in-order segments of the stream into super-packets for its TUN
(fewer write calls than packets), and the stream arrives whole and in order. Off, every
read and write is one packet. Both ways, what the kernel delivers is checked byte by
byte (instruments/seqcheck.py), and a reverse stream (iperf3 -R: the server sends,
the gateway's engine reads the TUN and the agent's writes it) completes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from instruments.netlab import SERVER, Lab, Proc
from session import dataplane
from tests.netns.polling import until

BULK = 30_000_000  # bytes of the checked stream, sent as fast as it goes




@pytest.fixture
def offload(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    if dataplane.compiled_module() is None:
        pytest.skip("the compiled data plane is not built")
    if os.environ.get("JVPN_DATA_PLANE") == "python":
        pytest.skip("this run is on the Python data plane")
    on = bool(request.param)
    monkeypatch.setenv("JVPN_GATEWAY_DATA_PLANE", "compiled")
    monkeypatch.setenv("JVPN_AGENT_DATA_PLANE", "compiled")
    monkeypatch.setenv("JVPN_GATEWAY_TUN_OFFLOAD", "true" if on else "false")
    monkeypatch.setenv("JVPN_AGENT_TUN_OFFLOAD", "true" if on else "false")
    return on


@pytest.fixture
def lab(tmp_path: Path, offload: bool) -> Iterator[Lab]:
    lab = Lab(tmp_path, gateways=1, egress="nat", balancer=False).up()  # after the env is set
    try:
        yield lab
    finally:
        lab.close()


@pytest.mark.parametrize("offload", [True, False], ids=["offload-on", "offload-off"],
                         indirect=True)
def test_a_bulk_tcp_stream_crosses_with_offloads_on_and_off(lab: Lab, offload: bool) -> None:
    gw = lab.start_gateway(1)
    lab.wait_gateways_ready([1])
    said = until(lambda: [ln for ln in gw.tail(200).splitlines() if "TUN offloads" in ln], 5,
                 "the gateway's offload line")
    assert ("TUN offloads on (csum,tso4,tso6" in said[0]) == offload, said
    priv, _ = lab.add_client(f"{SERVER}/32,fd99::/64")
    srv = lab.python(lab.server, "instruments.seqcheck", "serve", "::", "7000", name="srv")
    srv.line()
    agent = lab.agent(priv)
    lab.wait_agent(agent)
    want = "TUN offloads on (csum,tso4,tso6" if offload else "TUN offloads off (tun_offload = false)"
    until(lambda: want in agent.tail(200), 5, f"the agent's line {want!r}")
    snd = lab.python(lab.client, "instruments.seqcheck", "send", SERVER, "7000", "0", name="snd")
    snd.line()

    def received() -> dict[str, Any]:
        c = srv.ask("report")["connections"]
        return c[0] if c else {"bytes": 0, "errors": 0}

    until(lambda: received()["bytes"] >= BULK, 60, f"{BULK} bytes through the tunnel")
    snd.stop()
    got = received()
    assert got["errors"] == 0, got  # every byte in order, as sent
    engine = agent.ask("status")["engine"]

    def counters() -> tuple[float, float, float]:
        return (lab.metric(1, "jvpn_engine_tun_offload_total", what="packets_out"),
                lab.metric(1, "jvpn_engine_syscalls_total", call="tun_write"),
                lab.metric(1, "jvpn_engine_tun_offload_total", what="gso_writes"))

    seen: list[tuple[float, float, float]] = []

    def settled() -> bool:  # the node publishes its engine's counters periodically
        seen.append(counters())
        return len(seen) > 1 and seen[-1] == seen[-2] and seen[-1][0] > BULK // 1500
    until(settled, 10, "the gateway's engine counters to settle")
    packets_out, writes, merged = seen[-1]
    assert lab.metric(1, "jvpn_engine_tun_offload_total", what="malformed_reads") == 0
    assert engine["tun_offload_drops"] == 0, engine
    if offload:
        # the agent's engine cut super-packets; the gateway's merged segments again
        assert engine["tun_gso_reads"] > 0 and engine["tun_segments"] > engine["tun_gso_reads"]
        assert merged > 0 and writes < packets_out, (merged, writes, packets_out)
    else:
        assert engine["tun_gso_reads"] == 0 and engine["tun_segments"] == 0, engine
        assert merged == 0 and writes == packets_out, (merged, writes, packets_out)

    # the other way: the server sends, the gateway's engine reads the TUN, the agent's writes
    lab.spawn(lab.server, ["iperf3", "-s", "-B", SERVER], "iperf3-server")
    until(lambda: ":5201 " in lab.run(lab.server, "ss", "-Htln", check=False), 10,
          "iperf3 listening")
    out = lab.run(lab.client, "iperf3", "-c", SERVER, "-R", "-t", "2", "-J",
                  "--connect-timeout", "5000", timeout=40, check=False)
    result = json.loads(out)
    assert result["end"]["sum_received"]["bytes"] > 1_000_000, out[-400:]
    engine = agent.ask("status")["engine"]
    assert engine["tun_offload_drops"] == 0, engine
    if offload:
        assert engine["tun_packets_out"] > engine["tun_writes"], engine  # merged on the agent


def udp_checksum_errors(lab: Lab, ns: str) -> int:
    """The kernel's count of UDP datagrams refused for their checksum in ``ns``."""
    lines = [ln.split() for ln in lab.run(ns, "cat", "/proc/net/snmp").splitlines()
             if ln.startswith("Udp:")]
    return int(dict(zip(lines[0], lines[1], strict=True))["InCsumErrors"])


def udp_lab(lab: Lab) -> Proc:
    """One gateway, an agent connected to it, an iperf3 server listening: the agent."""
    lab.start_gateway(1)
    lab.wait_gateways_ready([1])
    priv, _ = lab.add_client(f"{SERVER}/32,fd99::/64")
    agent = lab.agent(priv)
    lab.wait_agent(agent)
    lab.spawn(lab.server, ["iperf3", "-s", "-B", SERVER], "iperf3-server")
    until(lambda: ":5201 " in lab.run(lab.server, "ss", "-Htln", check=False), 10,
          "iperf3 listening")
    return agent


def iperf_udp(lab: Lab, rate: str, size: int, *extra: str) -> dict[str, Any]:
    """A 2 s paced iperf3 UDP run from the client (``extra``: ``-R`` the other way): the
    receiver's totals."""
    out = lab.run(lab.client, "iperf3", "-c", SERVER, "-u", "-b", rate, "-l", str(size),
                  "-t", "2", "-J", "--connect-timeout", "5000", *extra, timeout=40, check=False)
    result: dict[str, Any] = json.loads(out)["end"]["sum"]
    return result


@pytest.mark.parametrize("offload", [True], ids=["offload-on"], indirect=True)
def test_udp_bursts_are_merged_on_tun_write_and_arrive_intact(lab: Lab, offload: bool) -> None:
    """Bursts of one UDP flow (iperf3 sends 64 back to back; 1300 bytes: the datagrams fit
    the tunnel's MTU, a fragment is never merged) reach the gateway's engine in
    batches; it writes each batch's run as one UDP super-packet, which the kernel cuts
    again: the server's kernel refuses none of them for a checksum, and the reverse
    direction (the agent's engine writing) does the same."""
    agent = udp_lab(lab)
    until(lambda: "TUN offloads on (csum,tso4,tso6" in agent.tail(200), 5, "the agent's offloads")
    errors_before = (udp_checksum_errors(lab, lab.server), udp_checksum_errors(lab, lab.client))

    def udp(*extra: str) -> dict[str, Any]:
        return iperf_udp(lab, "200M/64", 1300, *extra)

    up = udp()
    assert up["packets"] - up["lost_packets"] > 1000, up

    def counters() -> tuple[float, float, float]:
        return (lab.metric(1, "jvpn_engine_tun_offload_total", what="packets_out"),
                lab.metric(1, "jvpn_engine_syscalls_total", call="tun_write"),
                lab.metric(1, "jvpn_engine_tun_offload_total", what="gso_writes"))

    seen: list[tuple[float, float, float]] = []

    def settled() -> bool:  # the node publishes its engine's counters periodically
        seen.append(counters())
        return len(seen) > 1 and seen[-1] == seen[-2] and seen[-1][0] > 1000
    until(settled, 10, "the gateway's engine counters to settle")
    packets_out, writes, merged = seen[-1]
    print(f"gateway TUN: {packets_out:.0f} packets in {writes:.0f} writes ({merged:.0f} merged)")
    assert merged > 0 and writes < packets_out, (merged, writes, packets_out)

    down = udp("-R")  # the server sends: the agent's engine writes its TUN
    assert down["packets"] - down["lost_packets"] > 1000, down
    engine = agent.ask("status")["engine"]
    assert engine["tun_offload_drops"] == 0, engine
    assert engine["tun_gso_writes"] > 0 and engine["tun_packets_out"] > engine["tun_writes"], engine
    print(f"agent TUN: {engine['tun_packets_out']} packets in {engine['tun_writes']} writes")
    assert (udp_checksum_errors(lab, lab.server),
            udp_checksum_errors(lab, lab.client)) == errors_before


@pytest.mark.parametrize("offload", [True, False], ids=["offload-on", "offload-off"],
                         indirect=True)
def test_fragmented_datagrams_are_rejoined_and_arrive_intact(lab: Lab, offload: bool) -> None:
    """3,000-byte datagrams do not fit the tunnel's MTU: the sender's kernel cuts each
    into three IPv4 fragments, each crossing the tunnel alone. The receiving engine writes
    the fragments of a datagram that arrive in one batch as the datagram they make
    (dataplane/src/frag.rs), with offloads on or off: the server's kernel takes every
    datagram (no checksum refused, none lost to reassembly), both ways."""
    agent = udp_lab(lab)
    errors_before = (udp_checksum_errors(lab, lab.server), udp_checksum_errors(lab, lab.client))

    def udp(*extra: str) -> dict[str, Any]:
        return iperf_udp(lab, "40M", 3000, *extra)

    up = udp()
    assert up["packets"] > 2000 and up["lost_packets"] <= up["packets"] // 100, up
    seen: list[float] = []

    def settled() -> bool:  # the node publishes its engine's counters periodically
        seen.append(lab.metric(1, "jvpn_engine_tun_offload_total", what="rejoined"))
        return len(seen) > 1 and seen[-1] == seen[-2] and seen[-1] > 0
    until(settled, 10, "the gateway's rejoined count to settle")
    print(f"gateway: {seen[-1]:.0f} of {up['packets']} datagrams rejoined")
    assert seen[-1] >= up["packets"] // 2, (seen[-1], up)

    down = udp("-R")  # the server sends: the agent's engine writes its TUN
    assert down["packets"] > 2000 and down["lost_packets"] <= down["packets"] // 100, down
    engine = agent.ask("status")["engine"]
    print(f"agent: {engine['tun_rejoined']} of {down['packets']} datagrams rejoined")
    assert engine["tun_rejoined"] >= down["packets"] // 2, engine
    assert (udp_checksum_errors(lab, lab.server),
            udp_checksum_errors(lab, lab.client)) == errors_before
