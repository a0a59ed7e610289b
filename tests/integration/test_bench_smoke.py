"""`jvpn bench` at tiny sizes: every part runs and returns sane structured results.

No timing assertions: the figures themselves are for BENCHMARKS.md, not for CI.
"""

from __future__ import annotations

import json

import pytest

from jvpn.bench import BenchOptions, build_parser, format_report, main, options_from_args, run_bench


async def test_bench_smoke_runs_every_part() -> None:
    opts = BenchOptions(sessions=8, seconds=0.5, warmup=0.2, repeat=1, window=8,
                        memory_sessions=300, progress=None)  # fmt: skip
    report = await run_bench(opts)

    m = report["machine"]
    assert m["nproc"] >= 1 and m["python"] and m["redis_server"]
    assert set(report["machine"]["children_uvloop"]) == {"gateway", "echo", "relay"}

    ra = report["reattach"]
    assert ra["sessions"] == 8 and ra["repeat"] == 1
    assert ra["rate"] > 0 and ra["raw_pipelined_rate"] > 0 and ra["raw_evalsha_rate"] > 0
    assert ra["raw_fresh_rate"] > 0
    assert 0 < ra["p50_ms"] <= ra["p99_ms"]
    assert ra["ratio"] == pytest.approx(ra["rate"] / ra["raw_pipelined_rate"])
    assert ra["handshake_rate"] > 0 and ra["gateway_cpu_us"] >= 0
    run = ra["runs"][0]
    assert run["raw_pipelined"]["ok_fraction"] == 1.0  # the baseline ran the success path
    assert run["raw_evalsha"]["ok_fraction"] == 1.0 and run["raw_fresh"]["ok_fraction"] == 1.0
    assert not {k for k in run["errors"] if k.startswith(("bad_", "reject_", "gave_up"))}
    assert set(run["cpu"]) == {"gateway", "redis", "loadgen", "other"}
    if ra["redis_benchmark_rate"] is not None:
        assert ra["redis_benchmark_rate"] > 0

    dg = report["datagram"]
    assert dg["rate"] > 0 and dg["plain_rate"] > 0 and dg["relay_rate"] > 0
    assert dg["plain_asyncio_rate"] > 0
    assert dg["ratio_vs_asyncio_echo"] == pytest.approx(dg["rate"] / dg["plain_asyncio_rate"])
    assert 0 <= dg["loss"] <= 1 and 0 <= dg["plain_loss"] <= 1
    assert dg["ratio"] == pytest.approx(dg["rate"] / dg["plain_rate"])
    assert dg["runs"][0]["tunnel"]["sent"] > 0

    me = report["memory"]
    assert me["sessions"] == 300
    assert me["bytes_per_session"] > 0 and me["sample_record_bytes"] > 0
    assert me["sample_nonce_bytes"] > 0  # one reattach each: the nonce hash exists
    assert me["record_encoding"] == "listpack"

    text = format_report(report)
    for heading in ("Reattach:", "Datagrams:", "Redis memory:"):
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
