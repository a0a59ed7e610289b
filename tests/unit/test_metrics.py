"""Metrics: every jvpn_ family shows up in the exposition, with the right values."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import Metrics
from session.reasons import DropReason, RejectReason
from session.states import SessionState


def samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(m.exposition().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_exposition_contains_every_family() -> None:
    m = Metrics("node-a", lambda: {"ATTACHED": 2, "RECOVERING": 1})
    m.transport_switch("udp", "tcp", "transport_lost")
    m.state_change("ATTACHED", "RECOVERING")
    m.reattach("ok", "", 0.0012)
    m.reattach("rejected", "BAD_PROOF", 0.0004)
    m.handshake("ok", "")
    m.security("bad_proof")
    m.store_latency("reattach", 0.0007)
    m.set_store_up(True)
    m.event_dropped()
    m.rx_bytes += 100
    m.rx_packets += 1
    m.tx_bytes += 300
    m.tx_packets += 2
    m.count_drop(DropReason.MALFORMED, "udp")
    m.count_drop(DropReason.MALFORMED, "udp")
    text = m.exposition().decode()
    for name in (
        "jvpn_transport_switch_total",
        "jvpn_state_change_total",
        "jvpn_reattach_total",
        "jvpn_reattach_latency_seconds_bucket",
        "jvpn_handshake_total",
        "jvpn_sessions",
        "jvpn_security_events_total",
        "jvpn_events_dropped_total",
        "jvpn_store_latency_seconds_bucket",
        "jvpn_dropped_total",
        "jvpn_bytes_total",
        "jvpn_packets_total",
        "jvpn_store_up",
        "jvpn_node_info",
    ):
        assert f"\n{name}" in text, name

    s = samples(m)
    assert (
        s[
            (
                "jvpn_transport_switch_total",
                (("from", "udp"), ("reason", "transport_lost"), ("to", "tcp")),
            )
        ]
        == 1
    )
    assert s[("jvpn_state_change_total", (("from", "ATTACHED"), ("to", "RECOVERING")))] == 1
    assert s[("jvpn_reattach_total", (("outcome", "rejected"), ("reason", "BAD_PROOF")))] == 1
    assert (
        s[("jvpn_reattach_latency_seconds_bucket", (("le", "0.0005"), ("outcome", "rejected")))]
        == 1
    )
    assert s[("jvpn_reattach_latency_seconds_bucket", (("le", "0.0005"), ("outcome", "ok")))] == 0
    assert s[("jvpn_reattach_latency_seconds_bucket", (("le", "5.0"), ("outcome", "ok")))] == 1
    assert s[("jvpn_security_events_total", (("kind", "bad_proof"),))] == 1
    assert s[("jvpn_sessions", (("state", "ATTACHED"),))] == 2
    assert s[("jvpn_sessions", (("state", "TERMINATED"),))] == 0  # every state is exported
    assert s[("jvpn_bytes_total", (("direction", "rx"),))] == 100
    assert s[("jvpn_bytes_total", (("direction", "tx"),))] == 300
    assert s[("jvpn_packets_total", (("direction", "tx"),))] == 2
    assert s[("jvpn_dropped_total", (("reason", "MALFORMED"), ("transport", "udp")))] == 2
    assert s[("jvpn_events_dropped_total", ())] == 1
    assert s[("jvpn_store_up", ())] == 1
    info = [dict(labels) for (name, labels), v in s.items() if name == "jvpn_node_info" and v == 1]
    assert len(info) == 1 and info[0]["node"] == "node-a" and info[0]["version"]


def test_registries_are_per_instance() -> None:
    a, b = Metrics("a"), Metrics("b")
    a.handshake("ok", "")
    a.rx_packets += 5
    sb = samples(b)
    assert ("jvpn_handshake_total", (("outcome", "ok"), ("reason", ""))) not in sb
    assert sb[("jvpn_packets_total", (("direction", "rx"),))] == 0
    assert samples(a)[("jvpn_packets_total", (("direction", "rx"),))] == 5


def test_sessions_callback_set_later_and_failing() -> None:
    m = Metrics("n", process_metrics=False)
    m.sessions_callback = lambda: {"VOLATILE": 4}
    assert samples(m)[("jvpn_sessions", (("state", "VOLATILE"),))] == 4

    def broken() -> dict[str, int]:
        raise RuntimeError("boom")

    m.sessions_callback = broken
    assert samples(m)[("jvpn_sessions", (("state", "VOLATILE"),))] == 0  # scrape still works


def test_enum_labels_are_names() -> None:
    m = Metrics("n", process_metrics=False)
    m.state_change(SessionState.ATTACHED, SessionState.VOLATILE)
    m.reattach("rejected", RejectReason.STALE_VERSION, None)
    m.count_drop(DropReason.REPLAYED, DropReason.REPLAYED)  # any enum: transport is lowercased
    s = samples(m)
    assert s[("jvpn_state_change_total", (("from", "ATTACHED"), ("to", "VOLATILE")))] == 1
    assert s[("jvpn_reattach_total", (("outcome", "rejected"), ("reason", "STALE_VERSION")))] == 1
    assert s[("jvpn_dropped_total", (("reason", "REPLAYED"), ("transport", "replayed")))] == 1


def test_hot_counters_and_histograms_match_prometheus_semantics() -> None:
    """The per-reattach counters and histograms are plain dicts read at scrape time: the
    exposition must be what prometheus-client's Counter/Histogram would have written."""
    m = Metrics("n", process_metrics=False)
    for v in (0.0005, 0.0004, 0.0012, 7.0):  # 0.0005 sits on a bound: le is inclusive
        m.reattach("ok", "", v)
    m.state_change(SessionState.ATTACHED, SessionState.VOLATILE)
    m.state_change("ATTACHED", "VOLATILE")  # an enum and its name are one series
    m.transport_switch("UDP", "tcp", "reattach")
    m.transport_switch("udp", "TCP", "reattach")
    m.store_latency("get", 0.00001)
    s = samples(m)
    bucket = "jvpn_reattach_latency_seconds_bucket"
    assert s[(bucket, (("le", "0.0005"), ("outcome", "ok")))] == 2
    assert s[(bucket, (("le", "0.001"), ("outcome", "ok")))] == 2
    assert s[(bucket, (("le", "0.002"), ("outcome", "ok")))] == 3
    assert s[(bucket, (("le", "5.0"), ("outcome", "ok")))] == 3
    assert s[(bucket, (("le", "+Inf"), ("outcome", "ok")))] == 4
    assert s[("jvpn_reattach_latency_seconds_count", (("outcome", "ok"),))] == 4
    assert abs(s[("jvpn_reattach_latency_seconds_sum", (("outcome", "ok"),))] - 7.0021) < 1e-9
    assert s[("jvpn_reattach_total", (("outcome", "ok"), ("reason", "")))] == 4
    assert s[("jvpn_state_change_total", (("from", "ATTACHED"), ("to", "VOLATILE")))] == 2
    assert s[("jvpn_transport_switch_total",
              (("from", "udp"), ("reason", "reattach"), ("to", "tcp")))] == 2
    assert s[("jvpn_store_latency_seconds_bucket", (("le", "0.0001"), ("op", "get")))] == 1
