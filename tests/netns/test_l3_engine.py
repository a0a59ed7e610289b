"""The L3 data path on the data plane in use: the compiled engines carry the packets.

With the compiled data plane, the gateway's engine reads and writes the node's TUN and
the agent's engine reads and writes the client's TUN: an inner TCP stream crosses both
without Python per packet (the engines' own counters say so), and the cryptokey routing
done in the gateway's engine drops and counts a spoofed inner source and a disallowed
prefix as the machine would. With the Python data plane the same stream crosses asyncio
(no engine). One gateway, NAT egress; the client behind the nginx balancer (the
production topology: the gateway's engine reads the client-address prefix nginx puts
before each datagram and answers to nginx's socket) or on the node's own segment.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from instruments.netlab import SERVER, Lab
from session import dataplane
from tests.netns.polling import until

RATE = 400_000  # bytes/s of the checked stream




def send_from(lab: Lab, source: str, dest: str, port: int = 9999) -> None:
    code = (f"import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
            f"s.bind(({source!r},0))\ns.sendto(b'x'*100,({dest!r},{port}))")
    lab.run(lab.client, sys.executable, "-c", code)


@pytest.fixture
def plane(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    choice: str = request.param
    if choice == "compiled" and dataplane.compiled_module() is None:
        pytest.skip("the compiled data plane is not built")
    if choice == "compiled" and os.environ.get("JVPN_DATA_PLANE") == "python":
        pytest.skip("this run is on the Python data plane")
    monkeypatch.setenv("JVPN_GATEWAY_DATA_PLANE", choice)
    monkeypatch.setenv("JVPN_AGENT_DATA_PLANE", choice)
    return choice


@pytest.fixture
def balancer(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
def lab(tmp_path: Path, plane: str, balancer: bool) -> Iterator[Lab]:
    lab = Lab(tmp_path, gateways=1, egress="nat", balancer=balancer).up()  # after the env is set
    try:
        yield lab
    finally:
        lab.close()


@pytest.mark.parametrize(("plane", "balancer"),
                         [("compiled", True), ("compiled", False), ("python", False)],
                         ids=["compiled-behind-nginx", "compiled-direct", "python-direct"],
                         indirect=True)
def test_an_l3_stream_crosses_the_data_plane_in_use(lab: Lab, plane: str, balancer: bool) -> None:
    lab.start_gateway(1)
    lab.wait_gateways_ready([1])
    priv, _ = lab.add_client(f"{SERVER}/32,fd99::/64")
    srv = lab.python(lab.server, "instruments.seqcheck", "serve", "::", "7000", name="srv")
    srv.line()
    agent = lab.agent(priv)
    inner = lab.wait_agent(agent)["inner"].split(",")[0].split("/")[0]
    snd = lab.python(lab.client, "instruments.seqcheck", "send", SERVER, "7000", str(RATE),
                     name="snd")
    snd.line()

    def received() -> int:
        c = srv.ask("report")["connections"]
        return int(c[0]["bytes"]) if c else 0

    until(lambda: received() > RATE // 2, 10, "the stream to flow")
    engine = agent.ask("status")["engine"]
    forwarded = lab.metric(1, "jvpn_engine_packets_total", path="forwarded")
    returned = lab.metric(1, "jvpn_engine_packets_total", path="returned")
    if plane == "compiled":
        # both engines carried the stream in both directions, and wrote it to a TUN
        assert engine["forwarded"] > 50 and engine["returned"] > 50, engine
        assert engine["tun_writes"] > 50 and engine["tun_reads"] > 50, engine
        until(lambda: lab.metric(1, "jvpn_engine_packets_total", path="forwarded") > 50, 5,
              "the gateway's engine counters")
        assert lab.metric(1, "jvpn_engine_syscalls_total", call="tun_write") > 0
        # segments of one flow in one batch are written as one super-packet (offloads on)
        assert lab.metric(1, "jvpn_engine_tun_offload_total", what="packets_out") > 50
        until(lambda: lab.metric(1, "jvpn_engine_packets_total", path="returned") > 50, 5,
              "the gateway's returned counter")  # its counters reach metrics on a tick
        if balancer:  # every datagram came through nginx, with the client's address
            assert lab.metric(1, "jvpn_dropped_total", reason="MISSING_PREFIX") == 0
    else:
        assert engine == {} and forwarded == 0 and returned == 0

    # cryptokey routing, on whichever plane: a spoofed source, a disallowed prefix
    spoofed = lab.metric(1, "jvpn_dropped_total", reason="SPOOFED_SOURCE")
    denied = lab.metric(1, "jvpn_dropped_total", reason="POLICY")
    lab.run(lab.client, "ip", "addr", "add", "10.77.0.200/32", "dev", "jvpn0")
    lab.run(lab.client, "ip", "route", "add", "10.99.0.3/32", "dev", "jvpn0")
    for _ in range(3):
        send_from(lab, "10.77.0.200", SERVER)
        send_from(lab, inner, "10.99.0.3")
    until(lambda: lab.metric(1, "jvpn_dropped_total", reason="SPOOFED_SOURCE") >= spoofed + 3,
          5, "the spoofed packets counted")
    until(lambda: lab.metric(1, "jvpn_dropped_total", reason="POLICY") >= denied + 3, 5,
          "the disallowed packets counted")
    snd.ask("pause")
    sent = snd.ask("report")
    until(lambda: received() == sent["bytes"], 10, "every byte sent to arrive")
    final = srv.ask("report")["connections"]
    assert len(final) == 1 and final[0]["errors"] == 0, final
    agent.stop()
