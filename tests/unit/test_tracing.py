"""Tracing: off and free by default; spans, parents and attributes with the in-memory exporter."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.tracing import (
    ATTR_DB_OPERATION,
    ATTR_EPOCH,
    ATTR_NODE,
    ATTR_OUTCOME,
    ATTR_REASON,
    ATTR_SESSION_HASH,
    ATTR_SESSION_SHORT_ID,
    ATTR_TRANSPORT,
    ATTR_VERSION,
    NOOP_SPAN,
    OTLP_PACKAGES,
    SPAN_HANDSHAKE,
    SPAN_REATTACH,
    Tracing,
    session_hash,
)
from session.binding import Peer
from session.reasons import RejectReason
from session.wire import TransportKind
from store.errors import StoreUnavailable

SID = bytes.fromhex("00112233445566778899aabbccddeeff")
SID2 = bytes.fromhex("ffeeddccbbaa99887766554433221100")
UDP = Peer(TransportKind.UDP, ("192.0.2.1", 5000))
TCP = Peer(TransportKind.TCP, ("192.0.2.2", 443))


@pytest.fixture
def tracing() -> Iterator[Tracing]:
    t = Tracing.in_memory("gw-1")
    try:
        yield t
    finally:
        t.shutdown()


def _spans(t: Tracing) -> list[Any]:
    assert t.memory is not None
    return list(t.memory.get_finished_spans())


def _by_name(t: Tracing) -> dict[str, Any]:
    return {s.name: s for s in _spans(t)}


def _assert_no_raw_session_id(spans: list[Any], *sids: bytes) -> None:
    for s in spans:
        values = [*s.attributes.values(), *s.resource.attributes.values()]
        for ev in s.events:
            values.extend(ev.attributes.values())
        for v in values:
            for sid in sids:
                assert sid.hex() not in str(v) and sid.hex().upper() not in str(v)
                assert not (isinstance(v, bytes) and sid in v)


# ---- off -----------------------------------------------------------------------------------


def test_off_by_default_everything_is_the_shared_noop() -> None:
    t = Tracing.from_env("gw-1", env={})
    assert not t.enabled and t.memory is None
    assert t.handshake(UDP) is NOOP_SPAN
    assert t.reattach(SID, UDP) is NOOP_SPAN
    assert t.store_call("reattach") is NOOP_SPAN
    with t.reattach(SID, UDP) as span:
        assert span is NOOP_SPAN and span.trace_id is None
        with t.store_call("reattach") as st:
            st.set(outcome="OK")
        span.set(outcome="ok", reason=RejectReason.BAD_PROOF, version=3, epoch=2, session_id=SID)
    t.shutdown()


def test_off_does_not_swallow_exceptions() -> None:
    t = Tracing.disabled("gw-1")
    with pytest.raises(StoreUnavailable), t.reattach(SID, UDP), t.store_call("reattach"):
        raise StoreUnavailable("down")


def test_off_allocates_nothing_per_call() -> None:
    t = Tracing.disabled("gw-1")

    def one() -> None:
        with t.reattach(SID, UDP) as span:
            with t.store_call("reattach") as st:
                st.set(outcome="OK")
            span.set(outcome="ok", reason="", version=3, epoch=2)

    for _ in range(100):  # warm up caches
        one()
    before = sys.getallocatedblocks()
    for _ in range(10_000):
        one()
    assert sys.getallocatedblocks() - before < 50  # 10k calls: no per-call allocation


@pytest.mark.parametrize("env", [
    {},
    {"OTEL_SERVICE_NAME": "x"},  # a name alone asks for nothing
    {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"},
    {"OTEL_SDK_DISABLED": "TRUE", "OTEL_TRACES_EXPORTER": "otlp"},
    {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"},
    {"OTEL_TRACES_EXPORTER": "zipkin"},
])
def test_env_that_keeps_it_off(env: dict[str, str]) -> None:
    assert not Tracing.from_env("gw-1", env=env).enabled


# ---- on, from the environment --------------------------------------------------------------


@pytest.mark.parametrize("env, endpoint", [
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318/"}, "http://127.0.0.1:4318/v1/traces"),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/t"}, "http://c:4318/t"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4318",
      "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://b:4318/v1/traces"}, "http://b:4318/v1/traces"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "false"}, None),
])
def test_env_that_turns_otlp_on(env: dict[str, str], endpoint: str | None) -> None:
    pytest.importorskip(OTLP_PACKAGES["http/protobuf"][0])
    t = Tracing.from_env("gw-1", env={**env, "OTEL_SERVICE_NAME": "jvpn-test"})
    try:
        assert t.enabled
        assert type(t.exporter).__name__ == "OTLPSpanExporter"
        if endpoint is not None:
            assert t.exporter._endpoint == endpoint  # type: ignore[union-attr]
        assert t.provider.resource.attributes["service.name"] == "jvpn-test"  # type: ignore[attr-defined]
        assert t.provider.resource.attributes["service.instance.id"] == "gw-1"  # type: ignore[attr-defined]
    finally:
        t.shutdown(timeout_s=0.1)


def test_service_name_from_resource_attributes() -> None:
    t = Tracing.from_env("gw-1", env={"OTEL_TRACES_EXPORTER": "console",
                                      "OTEL_RESOURCE_ATTRIBUTES": "a=b, service.name=from-res"})
    try:
        assert t.enabled
        assert t.provider.resource.attributes["service.name"] == "from-res"  # type: ignore[attr-defined]
    finally:
        t.shutdown()


def test_missing_otlp_package_warns_and_stays_off(monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    module, package = OTLP_PACKAGES["http/protobuf"]
    monkeypatch.setitem(sys.modules, module, None)  # makes the import raise ImportError
    with caplog.at_level(logging.WARNING, logger="jvpn.tracing"):
        t = Tracing.from_env("gw-1", env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert not t.enabled
    assert package in caplog.text and "tracing off" in caplog.text


def test_unsupported_protocol_warns_and_stays_off(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="jvpn.tracing"):
        t = Tracing.from_env("gw-1", env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318",
                                          "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})
    assert not t.enabled and "http/json" in caplog.text


# ---- spans ---------------------------------------------------------------------------------


def _child(tracing: Tracing, op: str, parent: Any, outcome: str | None = None) -> None:
    st = tracing.store_call(op, parent=parent)
    if outcome is not None:
        st.set(outcome=outcome)
    st.end()


def test_reattach_span_with_store_child(tracing: Tracing) -> None:
    span = tracing.reattach(SID, UDP)
    _child(tracing, "get", span, "HIT")
    _child(tracing, "reattach", span, "OK")
    span.set(outcome="ok", version=7, epoch=3)
    trace_id = span.trace_id
    span.end()
    spans = _by_name(tracing)
    assert set(spans) == {SPAN_REATTACH, "jvpn.store.get", "jvpn.store.reattach"}
    top, store = spans[SPAN_REATTACH], spans["jvpn.store.reattach"]
    assert top.parent is None and top.kind.name == "SERVER"
    assert store.parent.span_id == top.context.span_id and store.kind.name == "CLIENT"
    assert spans["jvpn.store.get"].parent.span_id == top.context.span_id
    assert store.context.trace_id == top.context.trace_id
    assert trace_id == format(top.context.trace_id, "032x")
    assert store.start_time >= top.start_time and store.end_time <= top.end_time
    assert dict(top.attributes) == {
        ATTR_NODE: "gw-1", ATTR_TRANSPORT: "udp", ATTR_SESSION_HASH: session_hash(SID),
        ATTR_SESSION_SHORT_ID: SID.hex()[:12], ATTR_OUTCOME: "ok", ATTR_VERSION: 7, ATTR_EPOCH: 3}
    assert len(top.attributes[ATTR_SESSION_HASH]) == 16
    assert store.attributes[ATTR_DB_OPERATION] == "reattach"
    assert store.attributes[ATTR_OUTCOME] == "OK"
    assert top.resource.attributes["service.instance.id"] == "gw-1"
    _assert_no_raw_session_id(_spans(tracing), SID)


def test_rejected_reattach_records_the_reason(tracing: Tracing) -> None:
    span = tracing.reattach(SID, TCP)
    span.set(outcome="rejected", reason=RejectReason.BAD_PROOF)
    span.end()
    span.end()  # once only
    (top,) = _spans(tracing)
    assert top.attributes[ATTR_OUTCOME] == "rejected"
    assert top.attributes[ATTR_REASON] == "BAD_PROOF"
    assert top.attributes[ATTR_TRANSPORT] == "tcp"
    assert ATTR_VERSION not in top.attributes and ATTR_EPOCH not in top.attributes
    assert top.status.status_code.name == "UNSET"  # a rejection is an answer, not an error


def test_handshake_span_gets_the_session_on_success(tracing: Tracing) -> None:
    span = tracing.handshake(UDP)
    _child(tracing, "get_client", span)
    _child(tracing, "birth", span, "OK")
    span.set(outcome="ok", session_id=SID, version=1, epoch=1)
    span.end()
    spans = _by_name(tracing)
    top = spans[SPAN_HANDSHAKE]
    assert spans["jvpn.store.birth"].parent.span_id == top.context.span_id
    assert spans["jvpn.store.get_client"].parent.span_id == top.context.span_id
    assert top.attributes[ATTR_SESSION_HASH] == session_hash(SID)
    assert top.attributes[ATTR_SESSION_SHORT_ID] == SID.hex()[:12]  # as `jvpn status` shows it
    assert top.attributes[ATTR_VERSION] == 1 and top.attributes[ATTR_EPOCH] == 1
    _assert_no_raw_session_id(_spans(tracing), SID)


def test_store_error_marks_the_child(tracing: Tracing) -> None:
    span = tracing.reattach(SID, UDP)
    st = tracing.store_call("reattach", parent=span)
    st.fail(StoreUnavailable("connection refused"))
    st.end()
    span.set(outcome="rejected", reason=RejectReason.STORE_UNAVAILABLE)
    span.end()
    spans = _by_name(tracing)
    store, top = spans["jvpn.store.reattach"], spans[SPAN_REATTACH]
    assert store.status.status_code.name == "ERROR"
    assert "StoreUnavailable" in (store.status.description or "")
    assert store.attributes[ATTR_OUTCOME] == "error"
    assert [e.name for e in store.events] == ["exception"]
    assert top.status.status_code.name == "UNSET"
    assert top.attributes[ATTR_REASON] == "STORE_UNAVAILABLE"


def test_store_call_outside_a_span_records_nothing(tracing: Tracing) -> None:
    assert tracing.store_call("get") is NOOP_SPAN
    assert tracing.store_call("get", parent=NOOP_SPAN) is NOOP_SPAN
    assert _spans(tracing) == []


def test_interleaved_operations_keep_their_own_parent(tracing: Tracing) -> None:
    """Two reattaches in flight at once (as the gateway machine runs them): each store
    call is the child of the operation that asked for it, whatever the order."""
    a, b = tracing.reattach(SID, UDP), tracing.reattach(SID2, UDP)
    _child(tracing, "reattach", b)
    _child(tracing, "reattach", a)
    a.end()
    b.end()
    spans = _spans(tracing)
    tops = {s.attributes[ATTR_SESSION_HASH]: s for s in spans if s.name == SPAN_REATTACH}
    stores = [s for s in spans if s.name == "jvpn.store.reattach"]
    assert len(tops) == 2 and len(stores) == 2
    by_parent = {s.parent.span_id: s for s in stores}
    for h in (session_hash(SID), session_hash(SID2)):
        child = by_parent[tops[h].context.span_id]
        assert child.context.trace_id == tops[h].context.trace_id
    assert tops[session_hash(SID)].context.trace_id != tops[session_hash(SID2)].context.trace_id


def test_shutdown_is_idempotent_and_stops_recording() -> None:
    t = Tracing.in_memory("gw-1")
    t.shutdown()
    t.shutdown()
    t.reattach(SID, UDP).end()
    assert _spans(t) == []


def test_off_does_not_import_opentelemetry() -> None:
    import subprocess

    code = ("import sys; from gateway.tracing import Tracing; "
            "t = Tracing.from_env('gw', env={}); "
            "print(t.enabled, sorted(m for m in sys.modules if m.startswith('opentelemetry')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.strip() == "False []"
