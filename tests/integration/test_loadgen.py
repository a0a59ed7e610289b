"""The datagram bench's compiled load generator and echo (instruments/loadgen), and the
bounded search for the highest rate at < 0.5% loss.

Loopback only; the generator and echo are processes this test starts and stops by their
handles. No timing is asserted beyond what any machine does (a few thousand datagrams a
second on loopback): the figures are for BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import pytest

from instruments import bench_dp, loadgen


@pytest.fixture(scope="module")
def binary() -> str:
    try:
        return str(loadgen.binary())
    except loadgen.LoadgenUnavailable as exc:
        if os.environ.get("JVPN_REQUIRE_COMPILED") == "1":
            raise
        pytest.skip(str(exc))


@pytest.fixture
def echo(binary: str) -> Any:
    e = loadgen.Echo(max_seconds=60).start()
    yield e
    e.stop()


def test_gen_and_echo_answer_every_datagram_and_report_json(echo: loadgen.Echo) -> None:
    r = loadgen.run_gen(echo.address, rate=2000, seconds=0.5, warmup=0.1, size=1400)
    for key in (
        "sent",
        "received",
        "lost",
        "loss",
        "rate",
        "offered_rate",
        "rtt_p50_us",
        "rtt_p99_us",
        "send_calls",
        "recv_calls",
        "total_sent",
        "total_answered",
    ):
        assert key in r, key
    assert r["sent"] > 0 and r["received"] == r["sent"] and r["lost"] == 0 and r["loss"] == 0.0
    assert r["bad"] == 0 and r["duplicates"] == 0 and r["late"] == 0
    assert 0 < r["rtt_p50_us"] <= r["rtt_p99_us"] <= r["rtt_max_us"]
    assert r["rate"] == pytest.approx(r["received"] / 0.5)
    assert r["size"] == 1400 and r["target_rate"] == 2000
    # batched: fewer send calls than datagrams whenever more than one was due at once
    assert r["send_calls"] <= r["total_sent"]
    stats = echo.stop()
    assert stats["received"] == stats["echoed"] == r["total_sent"]
    assert stats["dropped"] == 0 and stats["truncated"] == 0


def test_gen_counts_loss_when_nothing_answers(binary: str) -> None:
    # a bound socket that never reads: every datagram is lost, and the run still ends
    # (its window frees by the loss timeout)
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.1", 0))
        r = loadgen.run_gen(
            sink.getsockname(), rate=1000, seconds=0.3, warmup=0.0, window=16, loss_timeout=0.05
        )
    assert r["sent"] > 16  # the window was freed by timeouts, not stalled
    assert r["received"] == 0 and r["loss"] == 1.0 and r["total_expired"] == r["total_sent"]
    assert not loadgen.passes(r)


def test_gen_refuses_bad_arguments(binary: str) -> None:
    for argv in (["gen"], ["gen", "--target", "nowhere"], ["gen", "--target", "127.0.0.1:9",
                 "--size", "10"], ["gen", "--target", "127.0.0.1:9", "--bogus", "1"],
                 ["echo", "--max-seconds", "-1"], ["neither"]):  # fmt: skip
        done = subprocess.run([binary, *argv], capture_output=True, text=True, timeout=10,
                              check=False)  # fmt: skip
        assert done.returncode == 2, argv
        assert done.stderr.startswith("jvpn-loadgen: ") and not done.stdout


def _fake(limit: float, calls: list[float]) -> Any:
    """A path that carries up to ``limit``/s without loss and loses 5% above it."""

    def measure(rate: float) -> dict[str, Any]:
        calls.append(rate)
        ok = rate <= limit
        return {
            "target_rate": rate,
            "offered_rate": rate,
            "sent": int(rate),
            "rate": rate if ok else rate * 0.95,
            "loss": 0.0 if ok else 0.05,
        }

    return measure


def test_search_finds_the_highest_rate_within_its_bounds() -> None:
    calls: list[float] = []
    s = loadgen.highest_rate(
        _fake(37_000, calls), start=10_000, max_steps=20, budget_s=60, resolution=0.05
    )
    assert s["ended_by"] == "resolved" and len(calls) == len(s["steps"]) <= 20
    # every failure was run twice before it counted
    failed = [st["rate"] for st in s["steps"] if not st["ok"]]
    assert all(failed.count(rate) == 2 for rate in failed)
    assert 37_000 / 1.05 <= s["rate"] <= 37_000 and s["best"]["loss"] == 0.0
    assert s["failed_at"] > 37_000
    # down from a start nothing carries, and up to a ceiling
    s = loadgen.highest_rate(_fake(3_000, []), start=10_000, max_steps=20)
    assert 3_000 / 1.08 <= s["rate"] <= 3_000
    s = loadgen.highest_rate(_fake(1e9, []), start=10_000, max_rate=50_000)
    assert s["ended_by"] == "max rate" and s["rate"] == 50_000


def test_search_is_bounded_in_steps_and_time() -> None:
    calls: list[float] = []
    s = loadgen.highest_rate(_fake(37_000, calls), start=10_000, max_steps=3)
    assert len(calls) == 3 and s["ended_by"] == "step limit"
    # nothing passes: it halves a bounded number of times and says so
    calls = []
    s = loadgen.highest_rate(_fake(0, calls), start=10_000, max_steps=100)
    assert s["rate"] == 0.0 and s["best"] is None and s["ended_by"] == "nothing passed"
    assert len(calls) <= 14
    # the time budget, on a clock each run advances by 2 s
    now = [0.0]
    calls = []

    def slow(rate: float) -> dict[str, Any]:
        now[0] += 2.0
        return _fake(37_000, calls)(rate)

    s = loadgen.highest_rate(slow, start=10_000, max_steps=100, budget_s=5.0, clock=lambda: now[0])
    assert len(calls) == 3 and s["ended_by"] == "time budget"


def test_search_runs_a_miss_again_before_it_counts() -> None:
    """One burst of a neighbour's load (a single lossy run) does not end the search low."""
    calls: list[float] = []
    carried = _fake(37_000, calls)
    burst = [True]

    def flaky(rate: float) -> dict[str, Any]:
        r = carried(rate)
        if burst[0]:  # the first run meets a burst: 10% lost
            burst[0] = False
            return dict(r, loss=0.1)
        return r

    s = loadgen.highest_rate(flaky, start=10_000, max_steps=20, resolution=0.05)
    assert calls[:2] == [10_000, 10_000] and s["steps"][1]["retry"] and s["steps"][1]["ok"]
    assert 37_000 / 1.05 <= s["rate"] <= 37_000
    # without confirmation the burst would have sent it down
    burst[0] = True
    s = loadgen.highest_rate(flaky, start=10_000, max_steps=20, resolution=0.05, confirm=False)
    assert not s["steps"][0]["ok"] and s["steps"][1]["rate"] == 5_000
    with pytest.raises(ValueError):
        loadgen.highest_rate(flaky, start=0, max_steps=3)


def test_a_run_that_fell_behind_its_pace_does_not_pass() -> None:
    r = {"target_rate": 10_000, "offered_rate": 8_000, "sent": 8_000, "rate": 8_000, "loss": 0.0}
    assert not loadgen.passes(r)
    assert loadgen.passes(dict(r, offered_rate=9_990))


@pytest.mark.skipif(loadgen.syscall_method() is None, reason="neither perf nor strace")
async def test_window_counts_cpu_and_system_calls_per_packet(echo: loadgen.Echo) -> None:
    w = await bench_dp.window(echo.address, 2000, 0.5, 1400, {"echo": echo.pid})
    assert w["packets"] > 0 and w["loss"] == 0.0 and w["syscall_method"] in ("perf", "strace")
    # the echo makes at least one receive and one send call per batch, and batches are
    # never more than 64 datagrams
    assert 1 / 64 <= w["echo_syscalls_per_packet"] < 10
    assert w["echo_cpu_us_per_packet"] is not None and w["echo_cpu_us_per_packet"] >= 0


def test_summary_and_report_of_synthetic_runs() -> None:
    def run(c: float, p: float) -> dict[str, Any]:
        search = {
            n: {"rate": v, "target_rate": v, "steps": [], "ended_by": "resolved"}
            for n, v in (
                ("bare", 100_000.0),
                ("uvloop_echo", 30_000.0),
                ("compiled", c),
                ("python", p),
            )
        }
        w = {
            "target_rate": 0.0,
            "loss": 0.0,
            "rtt_p50_us": 100,
            "rtt_p99_us": 900,
            "gateway_cpu_us_per_packet": 5.0,
            "agent_cpu_us_per_packet": 6.0,
            "gateway_syscalls_per_packet": 0.2,
            "agent_syscalls_per_packet": 0.3,
            "loadgen_calls_per_packet": 0.1,
            "syscall_method": "perf",
        }
        return {
            "search": search,
            "half": {"compiled": w, "python": dict(w, gateway_cpu_us_per_packet=20.0)},
            "bare_at_half": {"compiled": {"rtt_p99_us": 400}, "python": {"rtt_p99_us": 300}},
            "compiled_at_python_rate": w,
        }

    s = bench_dp.summarize([run(60_000, 15_000), run(40_000, 20_000), run(50_000, 10_000)])
    assert s["rate"]["compiled"]["median"] == 50_000 and s["rate"]["python"]["median"] == 15_000
    assert s["ratio"]["compiled_vs_python"]["median"] == 4.0
    assert (s["ratio"]["compiled_vs_python"]["min"], s["ratio"]["compiled_vs_python"]["max"]) == (
        2.0,
        5.0,
    )
    assert s["half"]["compiled"]["added_p99_us"]["median"] == 500
    assert s["compiled_at_python_rate"]["gateway_cpu_vs_python"]["median"] == 0.25
    text = "\n".join(bench_dp.format_planes(s, 1400))
    assert "4.00x (2.00-5.00)" in text and "perf" in text
    json.dumps(s)
    assert bench_dp.format_planes({"skipped": "no cargo"}, 1400)[0].endswith("(no cargo)")
