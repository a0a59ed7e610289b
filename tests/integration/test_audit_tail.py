"""``jvpn audit tail`` against a real redis-server, fed by a real EventBus + RedisStreamSink."""

from __future__ import annotations

import asyncio
import io
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from gateway.events import EventBus
from gateway.sinks import RedisStreamSink
from jvpn.audit import PAGE, TailOptions, decode_entry, format_line, parse_since, tail
from jvpn.cli import main
from store import AUDIT_STREAM

ROOT = Path(__file__).resolve().parents[2]
SID_A = bytes.fromhex("00112233445566778899aabbccddeeff")
SID_B = bytes.fromhex("ffeeddccbbaa99887766554433221100")

Emit = Callable[[EventBus], None]


async def _write_async(url: str, emit: Emit, node: str = "gw-1") -> None:
    client = aioredis.from_url(url)
    bus = EventBus(node, [RedisStreamSink(client)], queue_size=100_000)
    await bus.start()
    try:
        emit(bus)
        await bus.flush()
        assert bus.sinks[0].errors == 0
    finally:
        await bus.stop()
        await client.aclose()


def _write(url: str, emit: Emit, node: str = "gw-1") -> None:
    asyncio.run(_write_async(url, emit, node))


def _versions(n: int, sid: bytes = SID_A, start: int = 0) -> Emit:
    def emit(bus: EventBus) -> None:
        for i in range(start, start + n):
            bus.state_change(sid, "ATTACHED", "VOLATILE", i, 1, "client_reported")
    return emit


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str], str]:
    rc = main(["audit", "tail", *argv])
    captured = capsys.readouterr()
    return rc, captured.out.splitlines(), captured.err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_tail_prints_the_last_events_oldest_first(redis_url: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    _write(redis_url, _versions(30))
    rc, lines, err = _run(capsys, "--store-url", redis_url, "-n", "5")
    assert rc == 0 and err == ""
    assert [line.split("(v")[1].split()[0] for line in lines] == ["25", "26", "27", "28", "29"]
    first = lines[0].split()
    assert first[1] == "gw-1" and first[2] == "state_change" and first[3] == "success"
    assert first[4] == "client_reported" and first[5] == SID_A.hex()[:12]
    assert "ATTACHED \u2192 VOLATILE" in lines[0]
    rc, lines, _ = _run(capsys, "--store-url", redis_url)
    assert rc == 0 and len(lines) == 20 and "(v10 " in lines[0] and "(v29 " in lines[-1]


def test_json_prints_the_raw_ecs_lines(redis_url: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    def emit(bus: EventBus) -> None:
        bus.transport_switch(SID_A, "udp:192.0.2.1:5000", "tcp:192.0.2.1:443", "reattach", 4, 2,
                             source_ip="192.0.2.1", previous_node="gw-2")
        bus.security_event("bad_proof", "BAD_PROOF", session_id=SID_B, source_ip="198.51.100.9",
                           proof=b"p" * 16)

    _write(redis_url, emit)
    stored = [f[b"event"].decode() for _, f in
              redis.Redis.from_url(redis_url).xrange(AUDIT_STREAM)]
    rc, lines, _ = _run(capsys, "--store-url", redis_url, "--json")
    assert rc == 0 and lines == stored
    docs = [json.loads(line) for line in lines]
    assert docs[0]["event"]["action"] == "transport_switch"
    assert docs[1]["event"]["kind"] == "alert"
    rc, text, _ = _run(capsys, "--store-url", redis_url)
    assert "udp:192.0.2.1:5000 \u2192 tcp:192.0.2.1:443" in text[0] and "v4 e2" in text[0]
    assert "from node gw-2" in text[0]
    assert " security:bad_proof " in text[1] and " BAD_PROOF " in text[1]


def test_filters_search_back_through_pages(redis_url: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    def emit(bus: EventBus) -> None:
        bus.security_event("bad_proof", "BAD_PROOF", session_id=SID_B)  # oldest
        bus.emit("handshake", outcome="success", session_id=SID_B)
        _versions(2 * PAGE + 10)(bus)  # more than two pages of other events after them

    _write(redis_url, emit)
    rc, lines, _ = _run(capsys, "--store-url", redis_url, "--session", SID_B.hex()[:6])
    assert rc == 0 and len(lines) == 2
    assert " security:bad_proof " in lines[0] and " handshake " in lines[1]
    rc, lines, _ = _run(capsys, "--store-url", redis_url, "--action", "security_event")
    assert rc == 0 and len(lines) == 1 and SID_B.hex()[:12] in lines[0]
    rc, lines, _ = _run(capsys, "--store-url", redis_url, "--action", "handshake",
                        "--action", "security_event", "-n", "1")
    assert rc == 0 and len(lines) == 1 and " handshake " in lines[0]
    rc, lines, _ = _run(capsys, "--store-url", redis_url, "--session", SID_A.hex(), "-n", "3",
                        "--action", "state_change")
    assert rc == 0 and [ln.split("(v")[1].split()[0] for ln in lines] == ["1007", "1008", "1009"]
    rc, lines, _ = _run(capsys, "--store-url", redis_url, "--action", "nothing_like_this")
    assert rc == 0 and lines == []


def test_since(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    _write(redis_url, _versions(10))
    ids = [eid.decode() for eid, _ in redis.Redis.from_url(redis_url).xrange(AUDIT_STREAM)]
    rc, lines, _ = _run(capsys, "--store-url", redis_url, "--since", "-")
    assert rc == 0 and len(lines) == 10 and "(v0 " in lines[0]
    rc, lines, _ = _run(capsys, "--store-url", redis_url, "--since", ids[6])
    assert rc == 0 and [ln.split("(v")[1].split()[0] for ln in lines] == ["7", "8", "9"]
    rc, lines, _ = _run(capsys, "--store-url", redis_url, "--since", "-", "-n", "2")
    assert rc == 0 and len(lines) == 2 and "(v1 " in lines[1]
    rc, lines, _ = _run(capsys, "--store-url", redis_url, "--since", "1h")
    assert rc == 0 and len(lines) == 10
    assert parse_since("90s", now_s=1000.0) == "910000"
    assert parse_since("1700000000000-3") == "1700000000000-3"
    with pytest.raises(ValueError):
        parse_since("yesterday")


def test_empty_stream_prints_nothing(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, lines, err = _run(capsys, "--store-url", redis_url)
    assert (rc, lines, err) == (0, [], "")


async def test_follow_prints_new_events_as_they_come(redis_url: str) -> None:
    await _write_async(redis_url, _versions(3))
    out = io.StringIO()
    opts = TailOptions(store_url=redis_url, count=1, follow=True, block_ms=200)
    task = asyncio.ensure_future(tail(opts, out=out))
    try:
        deadline = time.monotonic() + 5
        while "(v2 " not in out.getvalue():  # the history first
            assert time.monotonic() < deadline and not task.done()
            await asyncio.sleep(0.02)
        await _write_async(redis_url, _versions(2, SID_B, start=100), node="gw-2")
        while out.getvalue().count("\n") < 3:
            assert time.monotonic() < deadline and not task.done()
            await asyncio.sleep(0.02)
    finally:
        task.cancel()  # what Ctrl-C does under asyncio.run
        with pytest.raises(asyncio.CancelledError):
            await task
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "(v2 " in lines[0]
    assert " gw-2 " in lines[1] and "(v100 " in lines[1] and "(v101 " in lines[2]


def test_follow_for_is_bounded(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    _write(redis_url, _versions(2))
    t0 = time.monotonic()
    rc, lines, _ = _run(capsys, "--store-url", redis_url, "--follow", "--for", "0.3",
                        "--action", "state_change")
    assert rc == 0 and len(lines) == 2 and time.monotonic() - t0 < 3


def test_store_down_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"redis://:hunter2@127.0.0.1:{_free_port()}/0"
    rc, lines, err = _run(capsys, "--store-url", url, "--timeout", "0.5")
    assert rc == 1 and lines == []
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("jvpn audit tail: store unreachable at redis://127.0.0.1:")
    assert "hunter2" not in err


def test_not_a_stream_is_one_line_and_exit_1(redis_url: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    redis.Redis.from_url(redis_url).set(AUDIT_STREAM, "oops")
    rc, _, err = _run(capsys, "--store-url", redis_url)
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "WRONGTYPE" in err


def test_entries_not_written_by_the_sink_still_print(redis_url: str) -> None:
    _, doc = decode_entry({b"action": b"custom", b"a": b"1", b"who": b"ops"})
    assert doc["a"] == 1 and doc["who"] == "ops"
    assert " custom " in format_line(doc)
    line, doc = decode_entry({b"action": b"x", b"event": b"not json"})
    assert doc["message"] == "not json" and json.loads(line)["message"] == "not json"


def test_ctrl_c_is_clean(redis_url: str) -> None:
    _write(redis_url, _versions(1))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jvpn.cli", "audit", "tail", "--store-url", redis_url, "-f"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        # A shell's background jobs inherit SIGINT ignored; a terminal's Ctrl-C does not.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        assert ready, "no output from jvpn audit tail -f"
        first = proc.stdout.readline().decode()
        assert "(v0 " in first
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=10)
        stderr = proc.stderr.read().decode() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 130 and "Traceback" not in stderr and stderr.strip() == ""
