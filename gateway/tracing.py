"""OpenTelemetry traces for handshake and reattach (docs/ARCHITECTURE.md, Observability).

Theory of operation. Tracing is off unless the standard ``OTEL_*`` variables
ask for it, and off is free: a disabled ``Tracing`` answers every call with
one shared do-nothing ``SpanCtx`` (``NOOP_SPAN``), so the node's
``with tracing.reattach(sid, peer) as span: ... span.set(outcome="ok")``
allocates no span, builds no attribute dict, and OpenTelemetry is not even
imported. When on, each handshake and reattach is a SERVER span made current
for the handler's task (asyncio copies contextvars into every task, so
concurrent handlers never see each other's span), and ``store_call`` opens a
CLIENT child of whatever span is current, or nothing when none is. Ended spans
go to the SDK's BatchSpanProcessor: a bounded queue that drops when full and
exports on its own thread, so the event loop never waits on a collector.
A session is recorded by its short id (``jvpn.session_short_id``: the first
12 hex digits, what ``jvpn status`` and the agent's log show, so a trace is
found from the id an operator sees) and a short SHA-256 of the whole id
(``jvpn.session_hash``), never the whole id: the id is cleartext on the wire,
but a trace backend has no need of all of it.

What turns it on (read from ``env``, by default the process environment):
``OTEL_SDK_DISABLED=true`` wins and keeps it off; else ``OTEL_TRACES_EXPORTER``
(``otlp``, ``console``, ``none``) decides when set; else it is on, with OTLP,
when ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT``
is set. ``OTEL_EXPORTER_OTLP[_TRACES]_PROTOCOL`` picks ``http/protobuf`` (the
default) or ``grpc``; ``OTEL_SERVICE_NAME`` names the service. The exporter
and the SDK read their other knobs (headers, timeout, compression, TLS,
``OTEL_BSP_*``, ``OTEL_TRACES_SAMPLER``) from the process environment.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Mapping
from enum import Enum
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

log = logging.getLogger("jvpn.tracing")

SERVICE_NAME = "jumping-vpn"
INSTRUMENTATION_SCOPE = "jvpn.gateway"
SPAN_HANDSHAKE = "jvpn.handshake"
SPAN_REATTACH = "jvpn.reattach"
SPAN_STORE_PREFIX = "jvpn.store."
SESSION_HASH_HEX_CHARS = 16  # 64 bits of SHA-256: enough to correlate, reveals nothing
SHUTDOWN_TIMEOUT_S = 5.0

# Span attribute keys (our own under jvpn.*, OpenTelemetry semantic conventions otherwise).
ATTR_NODE = "jvpn.node"
ATTR_SESSION_HASH = "jvpn.session_hash"
ATTR_SESSION_SHORT_ID = "jvpn.session_short_id"
SESSION_SHORT_ID_HEX_CHARS = 12  # the short id `jvpn status` shows
ATTR_OUTCOME = "jvpn.outcome"
ATTR_REASON = "jvpn.reason"
ATTR_VERSION = "jvpn.state_version"
ATTR_EPOCH = "jvpn.epoch"
ATTR_TRANSPORT = "network.transport"  # "udp" or "tcp"
ATTR_DB_SYSTEM = "db.system.name"
ATTR_DB_OPERATION = "db.operation.name"

OTLP_PACKAGES = {
    "http/protobuf": ("opentelemetry.exporter.otlp.proto.http.trace_exporter",
                      "opentelemetry-exporter-otlp-proto-http"),
    "grpc": ("opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
             "opentelemetry-exporter-otlp-proto-grpc"),
}


class PeerLike(Protocol):
    """What a span needs of a transport endpoint (``session.binding.Peer``)."""

    @property
    def kind(self) -> Enum: ...


def session_hash(session_id: bytes) -> str:
    """The short SHA-256 hex that stands for a session id in traces."""
    return hashlib.sha256(session_id).hexdigest()[:SESSION_HASH_HEX_CHARS]


def session_short_id(session_id: bytes) -> str:
    """The session's short id, as the CLI shows it (its first 12 hex digits)."""
    return session_id[: SESSION_SHORT_ID_HEX_CHARS // 2].hex()


class SpanCtx:
    """A span as a context manager. This base class is the no-op used when tracing is off."""

    __slots__ = ()

    def __enter__(self) -> SpanCtx:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        return None

    def end(self) -> None:
        """End the span (once; later calls do nothing)."""
        return None

    def fail(self, exc: BaseException) -> None:
        """Record ``exc`` on the span as an error (its outcome "error" unless set)."""
        return None

    def set(self, outcome: str | None = None, reason: str | Enum | None = None,
            version: int | None = None, epoch: int | None = None,
            session_id: bytes | None = None) -> None:
        """Record the outcome, its reason, the state version and epoch, the session (short id
        and hash)."""
        return None

    @property
    def trace_id(self) -> str | None:
        """The trace id as 32 hex digits (the events' ``trace.id``); None when not recording."""
        return None


NOOP_SPAN = SpanCtx()


class Tracing:
    """Span factory for one node. This base class is tracing off: every call is NOOP_SPAN."""

    enabled = False

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.exporter: SpanExporter | None = None
        self.memory: InMemorySpanExporter | None = None  # set by in_memory(), for tests

    @classmethod
    def disabled(cls, node_id: str = "") -> Tracing:
        """Tracing off."""
        return cls(node_id)

    @classmethod
    def from_env(cls, node_id: str, env: Mapping[str, str] | None = None) -> Tracing:
        """On, exporting by OTLP (or to the console), only when the OTEL_* variables ask."""
        env = os.environ if env is None else env
        exporter = _exporter_from_env(env)
        if exporter is None:
            return cls(node_id)
        tracing = _OtelTracing(node_id, _service_name(env), exporter, batch=True)
        log.info("tracing on: %s spans as service %r", type(exporter).__name__,
                 _service_name(env))
        return tracing

    @classmethod
    def in_memory(cls, node_id: str) -> Tracing:
        """On, keeping finished spans in ``self.memory`` (an InMemorySpanExporter), for tests."""
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        memory = InMemorySpanExporter()
        tracing = _OtelTracing(node_id, SERVICE_NAME, memory, batch=False)
        tracing.memory = memory
        return tracing

    def handshake(self, peer: PeerLike) -> SpanCtx:
        """A started span for one handshake from ``peer`` (the session is set on success);
        whoever finishes the handshake ends it."""
        return NOOP_SPAN

    def reattach(self, session_id: bytes, peer: PeerLike) -> SpanCtx:
        """A started span for one reattach of ``session_id`` from ``peer``."""
        return NOOP_SPAN

    def store_call(self, op: str, parent: Any = None) -> SpanCtx:
        """A started child span of ``parent`` (a handshake/reattach span) for store
        operation ``op``; the no-op span when ``parent`` does not record."""
        return NOOP_SPAN

    def shutdown(self, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Flush what is queued and stop exporting; blocks for at most ``timeout_s``."""
        return None


# ---- tracing on ------------------------------------------------------------------------------


class _OtelTracing(Tracing):
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

    def __init__(self, owner: _OtelTracing, name: str, kind: Any, attrs: dict[str, Any],
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


def _service_name(env: Mapping[str, str]) -> str:
    """OTEL_SERVICE_NAME, else service.name in OTEL_RESOURCE_ATTRIBUTES, else ours."""
    name = env.get("OTEL_SERVICE_NAME", "").strip()
    if name:
        return name
    for item in env.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, _, value = item.partition("=")
        if key.strip() == "service.name" and value.strip():
            return value.strip()
    return SERVICE_NAME


def _exporter_from_env(env: Mapping[str, str]) -> SpanExporter | None:
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
