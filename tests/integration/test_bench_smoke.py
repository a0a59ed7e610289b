"""`jvpn-lab bench` at tiny sizes: every part runs and returns sane structured results.

No timing assertions: the figures themselves are for BENCHMARKS.md, not for CI.
"""

from __future__ import annotations

import asyncio
import json
import os

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from instruments.bench import (
    AeadClient,
    AeadHop,
    BenchOptions,
    _Datagrams,
    build_parser,
    format_report,
    main,
    options_from_args,
    run_bench,
)
from instruments.netsim import UdpEcho


async def test_bench_smoke_runs_every_part() -> None:
    opts = BenchOptions(sessions=8, seconds=0.5, warmup=0.2, repeat=1, window=8,
                        memory_sessions=300, search_steps=1, progress=None)  # fmt: skip
    report = await run_bench(opts)

    m = report["machine"]
    assert m["nproc"] >= 1 and m["python"] and m["redis_server"]
    assert set(report["machine"]["children_uvloop"]) == {"gateway", "echo", "relay", "aead-hop"}

    ra = report["reattach"]
    assert ra["sessions"] == 8 and ra["repeat"] == 1
    assert ra["rate"] > 0 and ra["raw_pipelined_rate"] > 0 and ra["raw_evalsha_rate"] > 0
    assert ra["raw_fresh_rate"] > 0
    assert 0 < ra["p50_ms"] <= ra["p99_ms"]
    assert ra["ratio"] == pytest.approx(ra["rate"] / ra["raw_pipelined_rate"])
    assert ra["handshake_rate"] > 0 and ra["gateway_cpu_us"] >= 0
    assert ra["gateway_rss_bytes_per_session"] >= 0  # structure only (a tiny run may not grow)
    run = ra["runs"][0]
    assert run["raw_pipelined"]["ok_fraction"] == 1.0  # the baseline ran the success path
    assert run["raw_evalsha"]["ok_fraction"] == 1.0 and run["raw_fresh"]["ok_fraction"] == 1.0
    # The load is the client machine: nothing refused, timed out, ended or dropped by it.
    assert not {k for k in run["errors"] if k.startswith(
        ("reject_", "gave_up", "timeouts", "terminated", "security_", "drop_"))}
    assert set(run["cpu"]) == {"gateway", "redis", "loadgen", "other"}
    if ra["redis_benchmark_rate"] is not None:
        assert ra["redis_benchmark_rate"] > 0

    dg = report["datagram"]
    assert dg["rate"] > 0 and dg["plain_rate"] > 0 and dg["relay_rate"] > 0
    assert dg["plain_asyncio_rate"] > 0
    assert dg["aead_hop_rate"] > 0 and dg["runs"][0]["aead_hop"]["sent"] > 0
    assert dg["ratio_vs_aead_hop"] == pytest.approx(dg["rate"] / dg["aead_hop_rate"])
    assert dg["runs"][0]["aead_hop"]["bad_answers"] == 0  # every answer opened
    assert dg["ratio_vs_asyncio_echo"] == pytest.approx(dg["rate"] / dg["plain_asyncio_rate"])
    assert 0 <= dg["loss"] <= 1 and 0 <= dg["plain_loss"] <= 1
    assert dg["ratio"] == pytest.approx(dg["rate"] / dg["plain_rate"])
    assert dg["runs"][0]["tunnel"]["sent"] > 0
    pl = dg["planes"]  # the compiled load generator's comparison (skipped without cargo)
    if "skipped" not in pl:
        assert {"bare", "uvloop_echo", "python"} <= set(pl["targets"])
        run = pl["runs"][0]
        for name in pl["targets"]:
            assert len(run["search"][name]["steps"]) == 1  # search_steps bounds each search
        if run["search"]["python"]["target_rate"] > 0:
            h = pl["half"]["python"]
            assert h["gateway_cpu_us_per_packet"]["median"] > 0 and h["rtt_p99_us"]["median"] > 0

    tr = report["transports"]
    for kind in ("udp", "tcp", "quic"):
        assert tr[kind]["rate"] > 0 and 0 <= tr[kind]["loss"] <= 1
        assert 0 < tr[kind]["rtt_p50_ms"] <= tr[kind]["rtt_p99_ms"]
    assert tr["payload"] <= 1400  # what one QUIC DATAGRAM frame carries
    assert tr["fallback_quic"]["to"] == ["quic"] and tr["fallback_tcp"]["to"] == ["tcp"]
    assert tr["fallback_tcp_via_quic"]["to"] == ["tcp"]
    assert tr["fallback_quic"]["latency_s"] > 0 and tr["fallback_tcp"]["latency_s"] > 0

    me = report["memory"]
    assert me["sessions"] == 300
    assert me["bytes_per_session"] > 0 and me["sample_record_bytes"] > 0
    assert me["sample_nonce_bytes"] > 0  # one reattach each: the nonce hash exists
    assert me["record_encoding"] == "listpack"

    text = format_report(report)
    for heading in ("Reattach:", "Datagrams:", "Transports:", "Redis memory:"):
        assert heading in text
    json.loads(json.dumps(report, default=str))  # --json output is valid JSON


def test_bench_options_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    opts = options_from_args(build_parser().parse_args(
        ["--quick", "--only", "memory", "--gateway-set", "events.redis_stream=false"]))
    assert opts.only == ("memory",) and opts.memory_sessions == 10_000
    assert opts.gateway_set == {"events.redis_stream": "false"}
    full = options_from_args(build_parser().parse_args(["--sessions", "300", "--repeat", "5"]))
    assert (full.sessions, full.repeat, full.memory_sessions) == (300, 5, 100_000)
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "--quick" in capsys.readouterr().out


async def test_aead_hop_opens_seals_and_drops_forgeries() -> None:
    """The datagram bench's AEAD baseline does its crypto for real: what the hop forwards
    was opened under the client's key, what it returns opens under the reply key, a
    tampered datagram goes nowhere, and the client never reuses a nonce."""
    echo, echo_addr = await UdpEcho.start()
    client = AeadClient(os.urandom(64))
    hop = await AeadHop(echo_addr, client.key).start()
    loop = asyncio.get_running_loop()
    got: asyncio.Queue[bytes] = asyncio.Queue()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _Datagrams(lambda data, _addr: got.put_nowait(data)), remote_addr=hop.address)
    try:
        first = client.seal(b"hello")
        transport.sendto(first)
        reply = await asyncio.wait_for(got.get(), 5)
        assert client.open(reply) == b"hello"
        with pytest.raises(InvalidTag):  # the reply is sealed under the other key
            ChaCha20Poly1305(client.key[:32]).decrypt(bytes(4) + reply[:8], reply[8:], None)
        forged = bytearray(client.seal(b"again"))
        forged[-1] ^= 1
        transport.sendto(bytes(forged))
        last = client.seal(b"after")
        transport.sendto(last)
        assert client.open(await asyncio.wait_for(got.get(), 5)) == b"after"
        assert hop.bad == 1 and echo.received == 2 and got.empty()
        assert [p[:8] for p in (first, last)] == [(1).to_bytes(8, "little"), (3).to_bytes(8, "little")]
    finally:
        transport.close()
        hop.close()
        echo.close()
