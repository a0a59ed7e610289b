"""Tracing on by the OTEL_* variables: spans reach an OTLP/HTTP collector on loopback."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from gateway.tracing import OTLP_PACKAGES, Tracing, session_hash
from session.binding import Peer
from session.wire import TransportKind

pytest.importorskip(OTLP_PACKAGES["http/protobuf"][0])
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (  # noqa: E402
    ExportTraceServiceRequest,
)

SID = bytes.fromhex("00112233445566778899aabbccddeeff")
PEER = Peer(TransportKind.UDP, ("192.0.2.1", 5000))


class _Collector(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[tuple[str, bytes]] = []


class _Handler(BaseHTTPRequestHandler):
    server: _Collector

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.requests.append((self.path, body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[_Collector]:
    server = _Collector()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_spans_are_exported_by_otlp_http(collector: _Collector) -> None:
    port = collector.server_address[1]
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
           "OTEL_SERVICE_NAME": "jvpn-otlp-test"}
    tracing = Tracing.from_env("gw-otlp", env=env)
    assert tracing.enabled
    span = tracing.reattach(SID, PEER)
    st = tracing.store_call("reattach", parent=span)
    st.set(outcome="OK")
    st.end()
    span.set(outcome="ok", version=5, epoch=2)
    span.end()
    tracing.shutdown(timeout_s=5.0)  # flushes the batch processor

    assert collector.requests and all(p == "/v1/traces" for p, _ in collector.requests)
    spans: dict[str, Any] = {}
    resources: list[dict[str, Any]] = []
    for _, body in collector.requests:
        req = ExportTraceServiceRequest.FromString(body)
        for rs in req.resource_spans:
            resources.append({a.key: a.value.string_value for a in rs.resource.attributes})
            for ss in rs.scope_spans:
                assert ss.scope.name == "jvpn.gateway"
                for s in ss.spans:
                    spans[s.name] = s
    assert set(spans) == {"jvpn.reattach", "jvpn.store.reattach"}
    assert resources[0]["service.name"] == "jvpn-otlp-test"
    assert resources[0]["service.instance.id"] == "gw-otlp"
    top, child = spans["jvpn.reattach"], spans["jvpn.store.reattach"]
    assert child.parent_span_id == top.span_id and child.trace_id == top.trace_id
    attrs = {a.key: a.value for a in top.attributes}
    assert attrs["jvpn.session_hash"].string_value == session_hash(SID)
    assert attrs["jvpn.outcome"].string_value == "ok"
    assert attrs["jvpn.state_version"].int_value == 5 and attrs["jvpn.epoch"].int_value == 2
    raw = b"".join(body for _, body in collector.requests)
    assert SID not in raw and SID.hex().encode() not in raw  # never the raw session id


def test_shutdown_is_bounded_when_the_collector_is_down(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket
    import time

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "0.3")  # the exporter's own retries
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once we leave: connection refused
    tracing = Tracing.from_env("gw-otlp", env={"OTEL_EXPORTER_OTLP_ENDPOINT":
                                               f"http://127.0.0.1:{port}"})
    span = tracing.reattach(SID, PEER)
    span.set(outcome="ok")
    span.end()
    t0 = time.monotonic()
    tracing.shutdown(timeout_s=0.1)
    assert time.monotonic() - t0 < 1.0
    deadline = time.monotonic() + 5  # the abandoned export gives up by itself, soon
    while any(t.name == "jvpn-tracing-shutdown" for t in threading.enumerate()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
