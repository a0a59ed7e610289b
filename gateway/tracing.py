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
exports on its own thread, so the event loop never waits on a collector
(that side is ``gateway.tracing_otel``, imported only when tracing is on).
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
from collections.abc import Mapping
from enum import Enum
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
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
        from gateway.tracing_otel import OtelTracing, exporter_from_env, service_name

        env = os.environ if env is None else env
        exporter = exporter_from_env(env)
        if exporter is None:
            return cls(node_id)
        tracing = OtelTracing(node_id, service_name(env), exporter, batch=True)
        log.info("tracing on: %s spans as service %r", type(exporter).__name__,
                 service_name(env))
        return tracing

    @classmethod
    def in_memory(cls, node_id: str) -> Tracing:
        """On, keeping finished spans in ``self.memory`` (an InMemorySpanExporter), for tests."""
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        from gateway.tracing_otel import OtelTracing

        memory = InMemorySpanExporter()
        tracing = OtelTracing(node_id, SERVICE_NAME, memory, batch=False)
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
