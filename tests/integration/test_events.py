"""Event bus: ECS documents, bounded non-blocking queue, and every sink on loopback."""

from __future__ import annotations

import asyncio
import io
import json
import re
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator, Sequence

import pytest
import redis.asyncio as aioredis
from aiohttp import web

from gateway.config import EventsConfig
from gateway.ecs import ECS_VERSION, Event, to_document
from gateway.events import EventBus
from gateway.sinks import (
    FileSink,
    HttpSink,
    MemorySink,
    RedisStreamSink,
    Sink,
    StdoutSink,
    SyslogSink,
    sinks_from_config,
)
from session.keys import fingerprint
from session.reasons import RejectReason
from session.states import SessionState

SID = bytes.fromhex("00112233445566778899aabbccddeeff")
NONCE = b"\xaa" * 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def audit_redis_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """The shared ``redis_url`` fixture if conftest provides one, else a private redis-server."""
    try:
        yield request.getfixturevalue("redis_url")
        return
    except pytest.FixtureLookupError:
        pass
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server not installed (make deps installs it)")
    port = _free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as c:
                    c.sendall(b"PING\r\n")
                    if c.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail("private redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
async def memory_bus() -> AsyncIterator[tuple[EventBus, MemorySink]]:
    sink = MemorySink()
    bus = EventBus("node-a", [sink], queue_size=100)
    await bus.start()
    yield bus, sink
    await bus.stop()


# ---- ECS documents ----------------------------------------------------------------------


async def test_ecs_fields(memory_bus: tuple[EventBus, MemorySink]) -> None:
    bus, sink = memory_bus
    bus.state_change(SID, "ATTACHED", "RECOVERING", 7, 3, "transport_lost", source_ip="10.0.0.9")
    bus.transport_switch(
        SID, "udp:127.0.0.1:5000", "tcp:127.0.0.1:6000", "udp_blocked", 8, 4,
        source_ip="127.0.0.1", source_port=6000, trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
    )  # fmt: skip
    bus.security_event("bad_proof", "BAD_PROOF", SID, "192.0.2.1", nonce=NONCE, proof=b"p" * 16)
    bus.emit("reattach", outcome="success", session_id=SID, **{"jvpn.client": "ab"})
    await bus.flush()
    state, switch, alert, reattach = sink.events

    for doc in sink.events:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc["@timestamp"])
        assert doc["ecs"] == {"version": ECS_VERSION}
        assert doc["service"] == {"name": "jumping-vpn", "node": {"name": "node-a"}}
        assert {"kind", "category", "type", "action", "outcome"} <= doc["event"].keys()
        assert isinstance(doc["event"]["category"], list)
        assert doc["jvpn"]["session_id"] == SID.hex()

    assert state["event"]["kind"] == "event" and state["event"]["action"] == "state_change"
    assert state["event"]["reason"] == "transport_lost"
    assert state["source"] == {"ip": "10.0.0.9"}
    assert state["jvpn"] == {
        "session_id": SID.hex(), "from_state": "ATTACHED", "to_state": "RECOVERING",
        "state_version": 7, "epoch": 3,
    }  # fmt: skip
    assert switch["event"]["action"] == "transport_switch"
    assert switch["jvpn"]["from_transport"] == "udp:127.0.0.1:5000"
    assert switch["jvpn"]["to_transport"] == "tcp:127.0.0.1:6000"
    assert switch["source"] == {"ip": "127.0.0.1", "port": 6000}
    assert switch["trace"] == {"id": "4bf92f3577b34da6a3ce929d0e0e4736"}
    assert "trace" not in state  # only when given

    assert alert["event"]["kind"] == "alert"  # SECURITY_EVENT is an alert
    assert alert["event"]["outcome"] == "failure" and alert["event"]["reason"] == "BAD_PROOF"
    assert alert["jvpn"]["security_kind"] == "bad_proof"
    assert alert["jvpn"]["nonce"] == fingerprint(NONCE)  # never raw
    assert NONCE.hex() not in sink.lines[2] and "pppp" not in sink.lines[2]

    assert reattach["event"]["outcome"] == "success" and reattach["jvpn"]["client"] == "ab"
    assert bus.emitted == 4 and bus.dropped == 0


async def test_terminated_state_change_is_an_end(memory_bus: tuple[EventBus, MemorySink]) -> None:
    bus, sink = memory_bus
    bus.state_change(SID, SessionState.RECOVERING, SessionState.TERMINATED, 9, 3, "EXPIRED")
    bus.state_change(SID, "BIRTH", "ATTACHED", 1, 1)
    await bus.flush()
    assert sink.events[0]["event"]["type"] == ["end"]
    assert sink.events[0]["jvpn"]["to_state"] == "TERMINATED"  # enums are logged by name
    assert sink.events[1]["event"]["type"] == ["start"]
    assert "reason" not in sink.events[1]["event"]


def test_json_lines_match_the_stdlib_encoder_and_fall_back_for_what_orjson_refuses() -> None:
    from gateway.ecs import encode_json

    doc = {"@timestamp": "2026-12-01T00:00:00.000Z", "event": {"category": ["session"],
           "reason": "caf\u00e9 \"quoted\" \n tab\t"}, "jvpn": {"epoch": 5, "rtt": 0.25,
           "ok": True, "none": None, "enum": RejectReason.BAD_PROOF}}
    stdlib = json.dumps(doc, separators=(",", ":"), default=str)
    assert json.loads(encode_json(doc)) == json.loads(stdlib)
    assert encode_json({"a": [1, "b"]}) == '{"a":[1,"b"]}'
    # orjson refuses these; the stdlib encoder writes them, and the line still parses
    big = {"jvpn": {"version": 2**70}, "x": "lone \ud800 surrogate"}
    assert json.loads(encode_json(big))["jvpn"]["version"] == 2**70


def test_fingerprint() -> None:
    assert fingerprint(b"x") == fingerprint(b"x") != fingerprint(b"y")
    assert re.fullmatch(r"[0-9a-f]{16}", fingerprint(b"x"))


# ---- bounded queue ----------------------------------------------------------------------


async def test_queue_full_drops_and_counts_without_blocking() -> None:
    drops: list[int] = []
    seen: list[Event] = []
    sink = MemorySink()
    bus = EventBus("n", [sink], queue_size=5, on_drop=lambda: drops.append(1))
    bus.subscribe(seen.append)
    # Not started: nothing drains, so the queue fills up.
    t0 = time.perf_counter()
    results = [bus.emit("drop", reason="MALFORMED", n=i) for i in range(20_000)]
    elapsed = time.perf_counter() - t0
    assert results[:5] == [True] * 5 and not any(results[5:])
    assert bus.emitted == 5 and bus.dropped == 19_995 and len(drops) == 19_995
    assert bus.pending == 5
    assert len(seen) == 20_000  # subscribers observe dropped events too
    assert elapsed < 2.0, f"emit is not O(1): {elapsed:.3f}s for 20k"
    await bus.start()
    await bus.flush()
    assert [e["jvpn"]["n"] for e in sink.events] == [0, 1, 2, 3, 4]
    await bus.stop()


class StallingSink(Sink):
    name = "stalling"
    timeout_s = 0.2

    async def write(self, batch: Sequence[Event]) -> None:
        await asyncio.sleep(3600)


async def test_stalled_sink_never_blocks_emit_or_other_sinks() -> None:
    stalled, good = StallingSink(), MemorySink()
    bus = EventBus("n", [stalled, good], queue_size=1000)
    await bus.start()
    t0 = time.perf_counter()
    for i in range(100):
        bus.emit("handshake", outcome="success", i=i)
    assert time.perf_counter() - t0 < 0.5
    await bus.flush()
    assert len(good.events) == 100
    assert stalled.errors >= 1 and stalled.dropped == 100
    await bus.stop()


async def test_subscriber_errors_are_counted_not_raised() -> None:
    bus = EventBus("n", [], queue_size=10)

    def broken(ev: Event) -> None:
        raise RuntimeError("boom")

    seen: list[str] = []
    unsubscribe = bus.subscribe(broken)
    bus.subscribe(lambda ev: seen.append(ev.action))
    assert bus.emit("handshake") is True
    assert bus.subscriber_errors == 1 and seen == ["handshake"]
    unsubscribe()
    bus.emit("handshake")
    assert bus.subscriber_errors == 1


async def test_stop_delivers_what_is_queued(tmp_path) -> None:
    path = tmp_path / "events.jsonl"
    bus = EventBus("n", [FileSink(str(path))], queue_size=100)
    await bus.start()
    for i in range(10):
        bus.emit("state_change", i=i)
    await bus.stop()
    assert len(path.read_text().splitlines()) == 10


# ---- sinks ------------------------------------------------------------------------------


async def test_file_sink(tmp_path) -> None:
    path = tmp_path / "audit" / "events.jsonl"
    path.parent.mkdir()
    path.write_text('{"existing": true}\n')
    sink = FileSink(str(path))
    bus = EventBus("n", [sink], queue_size=100)
    await bus.start()
    bus.state_change(SID, "ATTACHED", "VOLATILE", 2, 1, "loss")
    bus.security_event("replay", "REPLAYED_NONCE", SID, nonce=NONCE)
    await bus.flush()
    sink.reopen()  # as after log rotation: the next batch reopens the file
    bus.emit("handshake", outcome="success")
    await bus.stop()
    lines = path.read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[0]) == {"existing": True}
    docs = [json.loads(line) for line in lines[1:]]
    assert [d["event"]["action"] for d in docs] == ["state_change", "security_event", "handshake"]
    assert docs[1]["event"]["kind"] == "alert"
    assert sink.written == 3 and sink.errors == 0


async def test_file_sink_error_is_counted(tmp_path) -> None:
    sink = FileSink(str(tmp_path / "no" / "such" / "dir" / "x.jsonl"))
    bus = EventBus("n", [sink], queue_size=10)
    await bus.start()
    bus.emit("handshake")
    await bus.flush()
    await bus.stop()
    assert sink.errors == 1 and sink.written == 0


async def test_stdout_sink() -> None:
    buf = io.StringIO()
    bus = EventBus("n", [StdoutSink(buf)], queue_size=10)
    await bus.start()
    bus.emit("handshake", outcome="failure", reason="BAD_HANDSHAKE")
    await bus.stop()
    doc = json.loads(buf.getvalue())
    assert doc["event"]["outcome"] == "failure" and doc["event"]["reason"] == "BAD_HANDSHAKE"


async def test_syslog_sink_to_loopback_udp() -> None:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(5)
    port = receiver.getsockname()[1]
    sink = SyslogSink("127.0.0.1", port)
    bus = EventBus("n", [sink], queue_size=10)
    await bus.start()
    try:
        bus.state_change(SID, "ATTACHED", "DEGRADED", 3, 1, "rtt")
        bus.security_event("bad_proof", "BAD_PROOF", SID, "192.0.2.7")
        await bus.flush()
        messages = [
            await asyncio.get_running_loop().run_in_executor(None, receiver.recv, 65535)
            for _ in range(2)
        ]
    finally:
        await bus.stop()
        receiver.close()
    pattern = re.compile(rb"^<(\d+)>1 (\S+) (\S+) jumping-vpn (\d+) (\S+) - (\{.*\})$", re.DOTALL)
    parsed = [pattern.match(m) for m in messages]
    assert all(parsed), messages
    m1, m2 = parsed
    assert m1 is not None and m2 is not None
    assert int(m1.group(1)) == 16 * 8 + 6  # local0.info
    assert int(m2.group(1)) == 16 * 8 + 4  # local0.warning for an alert
    assert m1.group(5) == b"state_change" and m2.group(5) == b"security_event"
    doc = json.loads(m2.group(6))
    assert doc["event"]["kind"] == "alert" and doc["source"]["ip"] == "192.0.2.7"
    assert m2.group(2).decode() == doc["@timestamp"]
    assert sink.written == 2


async def test_redis_stream_sink(audit_redis_url: str) -> None:
    client = aioredis.from_url(audit_redis_url)
    stream = f"jvpn:audit:test:{time.monotonic_ns()}"
    sink = RedisStreamSink(client, stream=stream, maxlen=1000)
    bus = EventBus("node-r", [sink], queue_size=5000)
    await bus.start()
    try:
        for i in range(3000):
            bus.emit("reattach", outcome="success", session_id=SID, i=i)
        bus.security_event("replay", "REPLAYED_NONCE", SID)
        await bus.flush()
        assert sink.written == 3001 and sink.errors == 0
        length = await client.xlen(stream)
        assert 1000 <= length < 3001  # approximate MAXLEN trims whole nodes
        ((_, last),) = await client.xrevrange(stream, count=1)
        assert last[b"action"] == b"security_event"
        doc = json.loads(last[b"event"])
        assert doc["event"]["kind"] == "alert" and doc["service"]["node"]["name"] == "node-r"
    finally:
        await bus.stop()
        await client.delete(stream)
        await client.aclose()


async def test_redis_stream_sink_failure_is_counted_not_raised() -> None:
    client = aioredis.from_url(
        f"redis://127.0.0.1:{_free_port()}/0", socket_connect_timeout=0.2, socket_timeout=0.2
    )
    failing, good = RedisStreamSink(client), MemorySink()
    bus = EventBus("n", [failing, good], queue_size=10)
    await bus.start()
    assert bus.emit("handshake") is True
    await bus.flush()
    await bus.stop()
    await client.aclose()
    assert failing.errors == 1 and failing.dropped == 1 and len(good.events) == 1


async def test_http_sink_posts_ndjson_batches_and_counts_errors(caplog) -> None:
    received: list[list[dict]] = []
    status = {"code": 200}

    async def collect(request: web.Request) -> web.Response:
        assert request.content_type == "application/x-ndjson"
        body = await request.text()
        received.append([json.loads(line) for line in body.splitlines()])
        return web.Response(status=status["code"])

    app = web.Application()
    app.router.add_post("/siem", collect)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    sink = HttpSink(f"http://127.0.0.1:{port}/siem?token=hunter2", timeout_s=2.0)
    bus = EventBus("n", [sink], queue_size=100)
    await bus.start()
    try:
        for i in range(5):
            bus.emit("handshake", outcome="success", i=i)
        await bus.flush()
        assert sum(len(b) for b in received) == 5 and sink.written == 5
        status["code"] = 500
        bus.emit("handshake")
        await bus.flush()
        assert sink.errors == 1 and sink.dropped == 1
        assert "HTTP 500" in caplog.text and "hunter2" not in caplog.text  # the token is redacted
    finally:
        await bus.stop()
        await runner.cleanup()


def test_sinks_from_config() -> None:
    cfg = EventsConfig(stdout=True, file="/tmp/x.jsonl", siem_syslog="127.0.0.1:514",
                       siem_http="http://127.0.0.1:9/x")  # fmt: skip
    kinds = [type(s) for s in sinks_from_config(cfg, redis_client=object())]
    assert kinds == [StdoutSink, FileSink, RedisStreamSink, SyslogSink, HttpSink]
    assert sinks_from_config(EventsConfig(), redis_client=None) == []


# The JSON lines the previous emit (flat dotted fields, nested by to_document when
# serialized) wrote for the events of the test below: emit now nests as it goes.
GOLDEN_LINES = [
    '{"@timestamp":"2025-12-01T14:40:00.123Z","log":{"level":"info"},"message":"session 001122334455 udp:a -> tcp:b: reattach","ecs":{"version":"8.11"},"service":{"name":"jumping-vpn","node":{"name":"gw-1"}},"event":{"dataset":"jvpn.events","kind":"event","category":["network","session"],"type":["info"],"action":"transport_switch","outcome":"success","reason":"reattach"},"jvpn":{"session_id":"00112233445566778899aabbccddeeff","from_transport":"udp:a","to_transport":"tcp:b","state_version":5,"epoch":4},"source":{"ip":"127.0.0.1"}}',
    '{"@timestamp":"2025-12-01T14:40:00.123Z","log":{"level":"info"},"message":"session 001122334455 ATTACHED -> TERMINATED (v9): BAD_PROOF","ecs":{"version":"8.11"},"service":{"name":"jumping-vpn","node":{"name":"gw-1"}},"event":{"dataset":"jvpn.events","kind":"event","category":["session"],"type":["end"],"action":"state_change","outcome":"success","reason":"BAD_PROOF"},"jvpn":{"session_id":"00112233445566778899aabbccddeeff","from_state":"ATTACHED","to_state":"TERMINATED","state_version":9,"epoch":3}}',
    '{"@timestamp":"2025-12-01T14:40:00.123Z","log":{"level":"warning"},"message":"security: bad_proof: BAD_PROOF session 001122334455","ecs":{"version":"8.11"},"service":{"name":"jumping-vpn","node":{"name":"gw-1"}},"event":{"dataset":"jvpn.events","kind":"alert","category":["intrusion_detection"],"type":["denied"],"action":"security_event","outcome":"failure","reason":"BAD_PROOF"},"jvpn":{"security_kind":"bad_proof","session_id":"00112233445566778899aabbccddeeff","nonce":"bc1443a0d17aab2d"},"source":{"ip":"::1"}}',
    '{"@timestamp":"2025-12-01T14:40:00.123Z","log":{"level":"info"},"message":"hi","ecs":{"version":"8.11","y":2},"service":{"name":"jumping-vpn","node":{"name":"gw-1","role":"edge"},"extra":1},"event":{"dataset":"jvpn.events","kind":"event","category":["network"],"type":["end"],"action":"custom","outcome":"failure"},"jvpn":{"jvpn":"flat","z":3},"a":{"b":{"c":4}}}',
    '{"@timestamp":"2025-12-01T14:40:00.123Z","log":{"level":"info"},"message":"lease_lapsed success","ecs":{"version":"8.11"},"service":{"name":"jumping-vpn","node":{"name":"gw-1"}},"event":{"dataset":"jvpn.events","kind":"event","category":["network"],"type":["info"],"action":"lease_lapsed","outcome":"success"},"jvpn":{"bindings":3}}',
]


def test_documents_built_in_emit_are_the_lines_of_flat_fields_nested() -> None:
    """emit() builds each nested document directly (nesting afterwards cost more than the
    rest of emitting): the lines must be exactly what the flat fields gave, and a field
    under ecs.* or service.* must not leak into the bus's shared parts."""
    bus = EventBus("gw-1", queue_size=100, clock=lambda: 1764600000.123)
    bus.transport_switch(SID, "udp:a", "tcp:b", "reattach", 5, 4, source_ip="127.0.0.1",
                         previous_node=None)
    bus.state_change(SID, SessionState.ATTACHED, SessionState.TERMINATED, 9, 3, RejectReason.BAD_PROOF)
    bus.security_event("bad_proof", "BAD_PROOF", session_id=SID, source_ip="::1", nonce=NONCE)
    bus.emit("custom", **{"service.extra": 1, "service.node.role": "edge", "ecs.y": 2,
                          "jvpn": "flat", "jvpn.z": 3, "message": "hi", "a.b.c": 4,
                          "outcome": "failure", "type": ["end"]})
    bus.emit("lease_lapsed", outcome="success", bindings=3)
    events = [bus._queue.popleft() for _ in range(5)]
    assert [ev.serialize() for ev in events] == GOLDEN_LINES
    for ev in events:
        assert to_document(ev.fields) == ev.document() == json.loads(ev.line)
    last = events[-1].document()  # the custom event's service.* and ecs.* stayed its own
    assert last["service"] == {"name": "jumping-vpn", "node": {"name": "gw-1"}}
    assert last["ecs"] == {"version": ECS_VERSION}
    assert events[0].fields["event.action"] == events[0].action == "transport_switch"
    assert events[2].fields["jvpn.nonce"] == fingerprint(NONCE)  # never the nonce itself


def test_history_records_are_the_documents_the_general_path_builds(monkeypatch) -> None:
    """A history record (GatewayMachine._record) takes emit()'s short path: the same line,
    byte for byte, as the general path gives the same fields, and a record with a field
    outside its set takes the general path."""
    import gateway.events as events_module
    from session.records import BINDING_ACTION

    records = [
        dict(session_id=SID, phase="begin", reason="granted", epoch=5, holder="gw-1#0a0b0c0d",
             incarnation='gw "\u00e9"\\\n', store_ms=1764600000100, state_version=7,
             binding_id="00112233aabbccdd", binding_status="PENDING"),
        dict(session_id=None, phase="node_started", reason="started", epoch=0, holder="gw-1#e",
             incarnation="gw-1#e", store_ms=0, state_version=None, binding_id=None,
             binding_status=None),
        dict(session_id=SID, phase="release", reason=RejectReason.BAD_PROOF, epoch=5,
             holder='gw "1"', incarnation="gw-1#e", store_ms=1, state_version=3,
             binding_id=None, binding_status=None),
        dict(session_id=SID, phase="end", reason="moved", epoch=2, holder="x", incarnation="y",
             store_ms=2, state_version=None, binding_id=None, binding_status=None, extra=1),
    ]

    def lines() -> list[str]:
        bus = EventBus("gw-1", queue_size=100, clock=lambda: 1764600000.123)
        for fields in records:
            bus.emit(BINDING_ACTION, **fields)
        events = [bus._queue.popleft() for _ in records]
        made_as_lines.append([ev._doc is None for ev in events])
        for ev in events:
            assert ev.action == BINDING_ACTION
            assert ev.document() == json.loads(ev.serialize())
        return [ev.serialize() for ev in events]

    made_as_lines: list[list[bool]] = []
    short = lines()
    monkeypatch.setattr(events_module, "RECORD_ORDER", ())  # the general path only
    assert short == lines()
    assert made_as_lines == [[True, True, False, False], [False] * 4]
    doc = json.loads(short[0])
    assert doc["event"]["action"] == BINDING_ACTION and doc["event"]["reason"] == "granted"
    assert doc["jvpn"]["session_id"] == SID.hex() and doc["jvpn"]["binding_status"] == "PENDING"
    assert "state_version" not in json.loads(short[1])["jvpn"]


def test_every_event_type_is_one_ecs_expects_for_its_categories() -> None:
    """The ECS reference lists, per event.category, the event.type values expected with it;
    every action's pair (and the start/end a state change may carry) is one of them. Every
    event carries log.level and message; durations are event.duration in nanoseconds."""
    from gateway.ecs import ACTIONS, DEFAULT_ACTION, ECS_EXPECTED_TYPES

    for action, (_, categories, types, _) in [*ACTIONS.items(), ("other", DEFAULT_ACTION)]:
        for category in categories:
            assert set(types) <= ECS_EXPECTED_TYPES[category], (action, category, types)
    bus = EventBus("gw-1", queue_size=100)
    bus.state_change(SID, SessionState.BIRTH, SessionState.ATTACHED, 1, 1, "handshake")
    bus.state_change(SID, SessionState.ATTACHED, SessionState.RECOVERING, 2, 1, "silent")
    bus.emit("handshake", outcome="success", session_id=SID, duration_ns=1_500_000)
    docs = [bus._queue.popleft().document() for _ in range(3)]
    assert [d["event"]["type"] for d in docs] == [["start"], ["info"], ["start"]]
    assert all(set(d["event"]["type"]) <= ECS_EXPECTED_TYPES[c]
               for d in docs for c in d["event"]["category"])
    assert all(d["log"]["level"] == "info" and d["message"] for d in docs)
    assert docs[1]["message"] == f"session {SID.hex()[:12]} ATTACHED -> RECOVERING (v2): silent"
    assert docs[2]["event"]["duration"] == 1_500_000 and "jvpn" not in docs[2] or (
        "duration_ns" not in docs[2].get("jvpn", {}))
