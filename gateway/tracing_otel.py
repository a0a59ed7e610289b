"""Tracing on: the OpenTelemetry side of ``gateway.tracing`` (imported only when it is on).

``OtelTracing`` makes the handshake, reattach and store-call spans with the
OpenTelemetry SDK and hands ended spans to a BatchSpanProcessor (a bounded queue
exported on its own thread); ``exporter_from_env`` reads the ``OTEL_*``
variables that turn it on and pick the exporter (see ``gateway.tracing``). The
node talks to it through the ``Tracing`` interface only; it talks to the
collector through the exporter.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from enum import Enum
from types import TracebackType
from typing import TYPE_CHECKING, Any

from gateway.tracing import (
    ATTR_DB_OPERATION,
    ATTR_DB_SYSTEM,
    ATTR_EPOCH,
    ATTR_NODE,
    ATTR_OUTCOME,
    ATTR_REASON,
    ATTR_SESSION_HASH,
    ATTR_SESSION_SHORT_ID,
    ATTR_TRANSPORT,
    ATTR_VERSION,
    INSTRUMENTATION_SCOPE,
    NOOP_SPAN,
    OTLP_PACKAGES,
    SERVICE_NAME,
    SHUTDOWN_TIMEOUT_S,
    SPAN_HANDSHAKE,
    SPAN_REATTACH,
    SPAN_STORE_PREFIX,
    PeerLike,
    SpanCtx,
    Tracing,
    session_hash,
    session_short_id,
)

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger("jvpn.tracing")


class OtelTracing(Tracing):
    enabled = True

    def __init__(self, node_id: str, service_name: str, exporter: SpanExporter,
                 batch: bool) -> None:
        """``batch``: a BatchSpanProcessor (export on its own thread), else export on end()."""
        super().__init__(node_id)
        from opentelemetry import context, trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.trace import SpanKind, Status, StatusCode

        resource = Resource.create({"service.name": service_name,
                                    "service.instance.id": node_id})
        self.exporter = exporter
        self.provider: TracerProvider = TracerProvider(resource=resource,
                                                       shutdown_on_exit=batch)
        self.provider.add_span_processor(
            BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer(INSTRUMENTATION_SCOPE)
        self._attach = context.attach
        self._detach = context.detach
        self._in_context = trace.set_span_in_context
        self._current = trace.get_current_span
        self._server = SpanKind.SERVER
        self._client = SpanKind.CLIENT
        self._error = (Status, StatusCode.ERROR)
        self._store_names: dict[str, str] = {}
        self._closed = False

    def handshake(self, peer: PeerLike) -> SpanCtx:
        return _Span(self, SPAN_HANDSHAKE, self._server,
                     {ATTR_NODE: self.node_id, ATTR_TRANSPORT: peer.kind.name.lower()}).start()

    def reattach(self, session_id: bytes, peer: PeerLike) -> SpanCtx:
        return _Span(self, SPAN_REATTACH, self._server,
                     {ATTR_NODE: self.node_id, ATTR_TRANSPORT: peer.kind.name.lower(),
                      ATTR_SESSION_HASH: session_hash(session_id),
                      ATTR_SESSION_SHORT_ID: session_short_id(session_id)}).start()

    def store_call(self, op: str, parent: Any = None) -> SpanCtx:
        if not isinstance(parent, _Span) or parent._span is None:
            return NOOP_SPAN  # no handshake/reattach span around it: no orphan root spans
        name = self._store_names.get(op)
        if name is None:
            name = self._store_names[op] = SPAN_STORE_PREFIX + op
        return _Span(self, name, self._client, {ATTR_DB_SYSTEM: "redis", ATTR_DB_OPERATION: op},
                     parent=parent).start()

    def shutdown(self, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
        if self._closed:
            return
        self._closed = True
        # The SDK's own shutdown can wait out an exporter's retries (many seconds when the
        # collector is down): run it on a daemon thread and stop waiting after timeout_s.
        worker = threading.Thread(target=self._shutdown, args=(timeout_s,), daemon=True,
                                  name="jvpn-tracing-shutdown")
        worker.start()
        worker.join(timeout_s)
        if worker.is_alive():
            log.warning("tracing: spans still being exported after %.1fs; not waiting", timeout_s)

    def _shutdown(self, timeout_s: float) -> None:
        try:
            self.provider.force_flush(int(timeout_s * 1000))
            self.provider.shutdown()
        except Exception:  # telemetry must never break a shutdown
            log.exception("tracing shutdown failed")


class _Span(SpanCtx):
    __slots__ = ("_owner", "_name", "_kind", "_attrs", "_span", "_token", "_parent", "_ended")

    def __init__(self, owner: OtelTracing, name: str, kind: Any, attrs: dict[str, Any],
                 parent: _Span | None = None) -> None:
        self._owner = owner
        self._name = name
        self._kind = kind
        self._attrs = attrs
        self._span: Any = None
        self._token: Any = None
        self._parent = parent
        self._ended = False

    def start(self) -> _Span:
        """Start the span, a child of its parent if it has one (no context attached)."""
        if self._span is None:
            o = self._owner
            ctx = o._in_context(self._parent._span) if self._parent is not None else None
            self._span = o.tracer.start_span(self._name, context=ctx, kind=self._kind,
                                             attributes=self._attrs, record_exception=False,
                                             set_status_on_exception=False)
        return self

    def end(self) -> None:
        if self._span is not None and not self._ended:
            self._ended = True
            self._span.end()

    def fail(self, exc: BaseException) -> None:
        span = self._span
        if span is None or not span.is_recording():
            return
        status, error = self._owner._error
        span.record_exception(exc)
        span.set_status(status(error, f"{type(exc).__name__}: {exc}"))
        if span.attributes.get(ATTR_OUTCOME) is None:
            span.set_attribute(ATTR_OUTCOME, "error")

    def __enter__(self) -> SpanCtx:
        self.start()
        o = self._owner
        self._token = o._attach(o._in_context(self._span))
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        span = self._span
        self._owner._detach(self._token)
        if exc is not None and span.is_recording():
            if isinstance(exc, Exception):
                status, error = self._owner._error
                span.record_exception(exc)
                span.set_status(status(error, f"{type(exc).__name__}: {exc}"))
                if span.attributes.get(ATTR_OUTCOME) is None:
                    span.set_attribute(ATTR_OUTCOME, "error")
            elif span.attributes.get(ATTR_OUTCOME) is None:  # CancelledError at node stop
                span.set_attribute(ATTR_OUTCOME, "cancelled")
        span.end()
        return None

    def set(self, outcome: str | None = None, reason: str | Enum | None = None,
            version: int | None = None, epoch: int | None = None,
            session_id: bytes | None = None) -> None:
        span = self._span
        if span is None:  # set() before __enter__: keep it for the start
            span_set = self._attrs.__setitem__
        else:
            span_set = span.set_attribute
        if outcome is not None:
            span_set(ATTR_OUTCOME, outcome)
        if reason is not None and reason != "":
            span_set(ATTR_REASON, reason.name if isinstance(reason, Enum) else reason)
        if version is not None:
            span_set(ATTR_VERSION, int(version))
        if epoch is not None:
            span_set(ATTR_EPOCH, int(epoch))
        if session_id is not None:
            span_set(ATTR_SESSION_HASH, session_hash(session_id))
            span_set(ATTR_SESSION_SHORT_ID, session_short_id(session_id))

    @property
    def trace_id(self) -> str | None:
        if self._span is None:
            return None
        ctx = self._span.get_span_context()
        return format(ctx.trace_id, "032x") if ctx.is_valid and ctx.trace_flags.sampled else None


# ---- environment -----------------------------------------------------------------------------


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"


def service_name(env: Mapping[str, str]) -> str:
    """OTEL_SERVICE_NAME, else service.name in OTEL_RESOURCE_ATTRIBUTES, else ours."""
    name = env.get("OTEL_SERVICE_NAME", "").strip()
    if name:
        return name
    for item in env.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, _, value = item.partition("=")
        if key.strip() == "service.name" and value.strip():
            return value.strip()
    return SERVICE_NAME


def exporter_from_env(env: Mapping[str, str]) -> SpanExporter | None:
    """The exporter the OTEL_* variables ask for, or None (tracing off)."""
    if _truthy(env.get("OTEL_SDK_DISABLED")):
        return None
    traces_endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    base_endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    chosen = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if chosen:
        names = {n.strip() for n in chosen.split(",") if n.strip()}
    else:
        names = {"otlp"} if traces_endpoint or base_endpoint else set()
    unknown = names - {"otlp", "console", "none"}
    if unknown:
        log.warning("OTEL_TRACES_EXPORTER: ignoring unsupported %s", ", ".join(sorted(unknown)))
    if "otlp" in names:
        return _otlp_exporter(env, traces_endpoint, base_endpoint)
    if "console" in names:
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    return None


def _otlp_exporter(env: Mapping[str, str], traces_endpoint: str,
                   base_endpoint: str) -> SpanExporter | None:
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "").strip()
                or env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "").strip() or "http/protobuf").lower()
    if protocol not in OTLP_PACKAGES:
        log.warning("tracing off: OTLP protocol %r is not supported (use http/protobuf or grpc)",
                    protocol)
        return None
    module_name, package = OTLP_PACKAGES[protocol]
    try:
        import importlib

        module = importlib.import_module(module_name)
    except ImportError:
        log.warning("tracing off: OTLP %s export asked for, but %s is not installed "
                    "(pip install %s)", protocol, package, package)
        return None
    if protocol == "http/protobuf":
        endpoint = traces_endpoint or (f"{base_endpoint.rstrip('/')}/v1/traces"
                                       if base_endpoint else None)
    else:
        endpoint = traces_endpoint or base_endpoint or None
    exporter: SpanExporter = module.OTLPSpanExporter(endpoint=endpoint)
    return exporter
