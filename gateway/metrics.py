"""Prometheus metrics of one gateway node (names prefixed ``jvpn_``).

Each ``Metrics`` owns its own ``CollectorRegistry``, so several nodes can run
in one process (tests). Control-plane counters are ordinary prometheus-client
metrics. Data-path counters (bytes, packets, drops) are plain attributes the
caller increments (``m.rx_packets += 1``: no lock, no label lookup per packet);
a custom collector turns them into samples at scrape time, together with the
sessions-by-state gauge read from ``sessions_callback``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from enum import Enum
from importlib import metadata
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from session.states import SessionState

log = logging.getLogger("jvpn.metrics")

# 0.5 ms .. 5 s: a same-node reattach is sub-millisecond, a cross-node one a few ms.
REATTACH_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
STORE_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip

SessionsCallback = Callable[[], Mapping[str, int]]


Label = str | Enum  # enums are exported by name


def _label(value: object) -> str:
    return value.name if isinstance(value, Enum) else str(value)


def _transport(value: object) -> str:
    return _label(value).lower()


class Metrics:
    """All of a node's metrics and its registry."""

    def __init__(
        self,
        node: str,
        sessions_callback: SessionsCallback | None = None,
        *,
        process_metrics: bool = True,
    ) -> None:
        self.node = node
        self.registry = CollectorRegistry()
        # Data path: plain ints, incremented by the caller, read at scrape time.
        self.rx_bytes = 0
        self.tx_bytes = 0
        self.rx_packets = 0
        self.tx_packets = 0
        self.drops: dict[tuple[object, object], int] = {}  # (reason, transport) -> count
        self.events_dropped = 0
        # Returns {state name: count}; set by the node (read at scrape time).
        self.sessions_callback: SessionsCallback | None = sessions_callback

        r = self.registry
        self._transport_switch = Counter(
            "jvpn_transport_switch", "Transport switches (rebinds) of sessions",
            ["from", "to", "reason"], registry=r,
        )  # fmt: skip
        self._state_change = Counter(
            "jvpn_state_change", "Session state transitions", ["from", "to"], registry=r
        )
        self._reattach = Counter(
            "jvpn_reattach", "Reattach requests by result", ["outcome", "reason"], registry=r
        )
        self._reattach_latency = Histogram(
            "jvpn_reattach_latency_seconds", "Reattach handling time, request to answer",
            ["outcome"], buckets=REATTACH_BUCKETS, registry=r,
        )  # fmt: skip
        self._handshake = Counter(
            "jvpn_handshake", "Handshakes by result", ["outcome", "reason"], registry=r
        )
        self._security = Counter(
            "jvpn_security_events", "Security events by kind", ["kind"], registry=r
        )
        self._store_latency = Histogram(
            "jvpn_store_latency_seconds", "Store round trips by operation",
            ["op"], buckets=STORE_BUCKETS, registry=r,
        )  # fmt: skip
        self._store_up = Gauge("jvpn_store_up", "1 if the store answered last check", registry=r)
        # (metric, label values) -> labelled child: labels() costs ~1.5 us, a dict hit ~0.1 us.
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        info = Info("jvpn_node", "This gateway node", registry=r)
        info.info({"node": node, "version": _version()})
        r.register(_HotPathCollector(self))
        if process_metrics:
            ProcessCollector(registry=r)

    # ---- control plane ------------------------------------------------------------------

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached (label sets are bounded: enums and kinds)."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def transport_switch(self, from_: Label, to: Label, reason: Label) -> None:
        """Count a rebind from transport kind ``from_`` to ``to`` (e.g. "udp" -> "tcp")."""
        self._child(self._transport_switch, _transport(from_), _transport(to), _label(reason)).inc()

    def state_change(self, from_: Label, to: Label) -> None:
        """Count a session state transition."""
        self._child(self._state_change, _label(from_), _label(to)).inc()

    def reattach(self, outcome: str, reason: Label, latency_s: float | None = None) -> None:
        """Count a reattach result (ok / rejected / retry ...) and observe its latency."""
        self._child(self._reattach, outcome, _label(reason)).inc()
        if latency_s is not None:
            self._child(self._reattach_latency, outcome).observe(latency_s)

    def handshake(self, outcome: str, reason: Label) -> None:
        """Count a handshake result."""
        self._child(self._handshake, outcome, _label(reason)).inc()

    def security(self, kind: Label) -> None:
        """Count a security event of ``kind``."""
        self._child(self._security, _label(kind)).inc()

    def store_latency(self, op: str, seconds: float) -> None:
        """Observe one store round trip."""
        self._child(self._store_latency, op).observe(seconds)

    def set_store_up(self, up: bool) -> None:
        """Record whether the store answers."""
        self._store_up.set(1 if up else 0)

    def event_dropped(self) -> None:
        """EventBus on_drop callback: one event lost to a full queue."""
        self.events_dropped += 1

    # ---- data path ----------------------------------------------------------------------

    def count_drop(self, reason: object, transport: object) -> None:
        """Count one dropped datagram/frame (malformed or rejected input)."""
        key = (reason, transport)
        self.drops[key] = self.drops.get(key, 0) + 1

    # ---- exposition ---------------------------------------------------------------------

    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)


class _HotPathCollector(Collector):
    """Turns the plain-int counters and the sessions callback into samples."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def describe(self) -> list[Metric]:
        # Names only, so registering does not call the sessions callback.
        return [
            CounterMetricFamily("jvpn_bytes", "", labels=["direction"]),
            CounterMetricFamily("jvpn_packets", "", labels=["direction"]),
            CounterMetricFamily("jvpn_dropped", "", labels=["reason", "transport"]),
            CounterMetricFamily("jvpn_events_dropped", ""),
            GaugeMetricFamily("jvpn_sessions", "", labels=["state"]),
        ]

    def collect(self) -> Iterator[Metric]:
        m = self._m
        nbytes = CounterMetricFamily(
            "jvpn_bytes", "Payload bytes by direction", labels=["direction"]
        )
        nbytes.add_metric(["rx"], m.rx_bytes)
        nbytes.add_metric(["tx"], m.tx_bytes)
        yield nbytes
        packets = CounterMetricFamily("jvpn_packets", "Packets by direction", labels=["direction"])
        packets.add_metric(["rx"], m.rx_packets)
        packets.add_metric(["tx"], m.tx_packets)
        yield packets
        drops = CounterMetricFamily(
            "jvpn_dropped", "Dropped input (malformed, rejected) by reason and transport",
            labels=["reason", "transport"],
        )  # fmt: skip
        for (reason, transport), n in list(m.drops.items()):
            drops.add_metric([_label(reason), _transport(transport)], n)
        yield drops
        yield CounterMetricFamily(
            "jvpn_events_dropped", "Events lost to a full event queue", value=m.events_dropped
        )
        sessions = GaugeMetricFamily(
            "jvpn_sessions", "Sessions bound here, by state", labels=["state"]
        )
        counts: dict[str, int] = {s.name: 0 for s in SessionState}
        if m.sessions_callback is not None:
            try:
                counts.update(m.sessions_callback())
            except Exception:
                log.exception("sessions callback failed")
        for state, n in counts.items():
            sessions.add_metric([state], n)
        yield sessions


def _version() -> str:
    try:
        return metadata.version("jumping-vpn")
    except metadata.PackageNotFoundError:
        return "unknown"
