"""Prometheus metrics of one gateway node (names prefixed ``jvpn_``).

Each ``Metrics`` owns its own ``CollectorRegistry``, so several nodes can run
in one process (tests). Rare control-plane counters (handshakes, security
events) are ordinary prometheus-client metrics. What every packet or every
reattach touches is kept in plain ints and dicts instead (``m.rx_packets += 1``;
reattach, state-change and transport-switch counts; the reattach and store
latency histograms as bucket counts): no lock and no labelled child per
update, which prometheus-client pays on each ``inc``/``observe`` (~5 of them
per reattach; an A/B at 3000 sessions measured 10-20% of a gateway's CPU per
reattach). The event loop is the only writer. A custom collector turns them
into samples at scrape time, together with the sessions-by-state gauge read
from ``sessions_callback``. Unlike prometheus-client's own counters these
export no ``_created`` samples (nothing here reads them).
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping
from enum import Enum
from importlib import metadata
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Info,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

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
        # The compiled UDP engine's own counters (cumulative, copied in by the node): packets
        # it forwarded, returned and handed to the machine; its system calls by kind.
        self.engine: dict[str, int] = {}
        # Returns {state name: count}; set by the node (read at scrape time).
        self.sessions_callback: SessionsCallback | None = sessions_callback

        # Per reattach: plain counts by their raw label values, named at scrape time.
        self.transport_switches: dict[tuple[object, object, object], int] = {}
        self.state_changes: dict[tuple[object, object], int] = {}
        self.reattaches: dict[tuple[str, object], int] = {}
        self.reattach_latency = _Histogram(REATTACH_BUCKETS)
        self.store_latency_s = _Histogram(STORE_BUCKETS)

        r = self.registry
        self._handshake = Counter(
            "jvpn_handshake", "Handshakes by result", ["outcome", "reason"], registry=r
        )
        self._security = Counter(
            "jvpn_security_events", "Security events by kind", ["kind"], registry=r
        )
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
        key = (from_, to, reason)
        self.transport_switches[key] = self.transport_switches.get(key, 0) + 1

    def state_change(self, from_: Label, to: Label) -> None:
        """Count a session state transition."""
        key = (from_, to)
        self.state_changes[key] = self.state_changes.get(key, 0) + 1

    def reattach(self, outcome: str, reason: Label, latency_s: float | None = None) -> None:
        """Count a reattach result (ok / rejected / retry ...) and observe its latency."""
        key = (outcome, reason)
        self.reattaches[key] = self.reattaches.get(key, 0) + 1
        if latency_s is not None:
            self.reattach_latency.observe(outcome, latency_s)

    def handshake(self, outcome: str, reason: Label) -> None:
        """Count a handshake result."""
        self._child(self._handshake, outcome, _label(reason)).inc()

    def security(self, kind: Label) -> None:
        """Count a security event of ``kind``."""
        self._child(self._security, _label(kind)).inc()

    def store_latency(self, op: str, seconds: float) -> None:
        """Observe one store round trip."""
        self.store_latency_s.observe(op, seconds)

    def set_store_up(self, up: bool) -> None:
        """Record whether the store answers."""
        self._store_up.set(1 if up else 0)

    def event_dropped(self) -> None:
        """EventBus on_drop callback: one event lost to a full queue."""
        self.events_dropped += 1

    # ---- data path ----------------------------------------------------------------------

    def count_drop(self, reason: object, transport: object, n: int = 1) -> None:
        """Count ``n`` dropped datagrams/frames (malformed or rejected input)."""
        key = (reason, transport)
        self.drops[key] = self.drops.get(key, 0) + n

    # ---- exposition ---------------------------------------------------------------------

    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)


class _Histogram:
    """Bucket counts per label value (one label), exported as a Prometheus histogram."""

    __slots__ = ("bounds", "series")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.series: dict[str, list[float]] = {}  # label -> [count per bucket..., +Inf, sum]

    def observe(self, label: str, value: float) -> None:
        if value != value:  # NaN: in no bucket (as prometheus-client), and not in the sum
            return
        counts = self.series.get(label)
        if counts is None:
            counts = self.series[label] = [0.0] * (len(self.bounds) + 2)
        counts[bisect_left(self.bounds, value)] += 1  # the first bucket with le >= value
        counts[-1] += value

    def family(self, name: str, documentation: str, label: str) -> HistogramMetricFamily:
        fam = HistogramMetricFamily(name, documentation, labels=[label])
        les = [_le(b) for b in self.bounds] + ["+Inf"]
        for value, counts in list(self.series.items()):
            buckets, total = [], 0.0
            for le, n in zip(les, counts[:-1], strict=True):
                total += n
                buckets.append((le, total))
            fam.add_metric([value], buckets, counts[-1])
        return fam


def _le(bound: float) -> str:
    return floatToGoString(bound)  # what prometheus-client's Histogram writes


def _merged(counts: Mapping[tuple[Any, ...], int],
            name: Callable[[tuple[Any, ...]], tuple[str, ...]]) -> dict[tuple[str, ...], int]:
    """Counts keyed by raw label values (an enum or its name) -> keyed by exported labels."""
    out: dict[tuple[str, ...], int] = {}
    for key, n in list(counts.items()):
        labels = name(key)
        out[labels] = out.get(labels, 0) + n
    return out


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
            CounterMetricFamily("jvpn_engine_packets", "", labels=["path"]),
            CounterMetricFamily("jvpn_engine_syscalls", "", labels=["call"]),
            CounterMetricFamily("jvpn_engine_tun_offload", "", labels=["what"]),
            GaugeMetricFamily("jvpn_sessions", "", labels=["state"]),
            CounterMetricFamily("jvpn_transport_switch", "", labels=["from", "to", "reason"]),
            CounterMetricFamily("jvpn_state_change", "", labels=["from", "to"]),
            CounterMetricFamily("jvpn_reattach", "", labels=["outcome", "reason"]),
            HistogramMetricFamily("jvpn_reattach_latency_seconds", "", labels=["outcome"]),
            HistogramMetricFamily("jvpn_store_latency_seconds", "", labels=["op"]),
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
        if m.engine:
            e = m.engine
            paths = CounterMetricFamily(
                "jvpn_engine_packets", "Packets the compiled UDP engine forwarded to upstreams, "
                "returned to clients, and handed to the machine", labels=["path"])
            for path in ("forwarded", "returned", "handed_up"):
                paths.add_metric([path], e.get(path, 0))
            yield paths
            calls = CounterMetricFamily(
                "jvpn_engine_syscalls", "System calls of the compiled UDP engine's thread",
                labels=["call"])
            for call, key in (("recvmmsg", "recv_calls"), ("sendmmsg", "send_calls"),
                              ("epoll_wait", "poll_calls"), ("tun_read", "tun_reads"),
                              ("tun_write", "tun_writes")):
                calls.add_metric([call], e.get(key, 0))
            yield calls
            tun = CounterMetricFamily(
                "jvpn_engine_tun_offload", "The compiled engine's TUN: packets written (in "
                "tun_write calls), TCP super-packets read and the segments cut from them, "
                "super-packets written, reads refused (an offloading TUN), datagrams written whole "
                "that arrived as fragments", labels=["what"])
            for what, key in (("packets_out", "tun_packets_out"), ("gso_reads", "tun_gso_reads"),
                              ("segments", "tun_segments"), ("gso_writes", "tun_gso_writes"),
                              ("malformed_reads", "tun_offload_drops"),
                              ("rejoined", "tun_rejoined")):
                tun.add_metric([what], e.get(key, 0))
            yield tun
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
        switches = CounterMetricFamily(
            "jvpn_transport_switch", "Transport switches (rebinds) of sessions",
            labels=["from", "to", "reason"],
        )  # fmt: skip
        for labels, n in _merged(m.transport_switches, lambda k: (
                _transport(k[0]), _transport(k[1]), _label(k[2]))).items():
            switches.add_metric(list(labels), n)
        yield switches
        changes = CounterMetricFamily(
            "jvpn_state_change", "Session state transitions", labels=["from", "to"]
        )
        for labels, n in _merged(m.state_changes, lambda k: (_label(k[0]), _label(k[1]))).items():
            changes.add_metric(list(labels), n)
        yield changes
        reattaches = CounterMetricFamily(
            "jvpn_reattach", "Reattach requests by result", labels=["outcome", "reason"]
        )
        for labels, n in _merged(m.reattaches, lambda k: (str(k[0]), _label(k[1]))).items():
            reattaches.add_metric(list(labels), n)
        yield reattaches
        yield m.reattach_latency.family("jvpn_reattach_latency_seconds",
                                        "Reattach handling time, request to answer", "outcome")
        yield m.store_latency_s.family("jvpn_store_latency_seconds",
                                       "Store round trips by operation", "op")


def _version() -> str:
    try:
        return metadata.version("jumping-vpn")
    except metadata.PackageNotFoundError:
        return "unknown"
