"""The history check (history/): what the machines record passes it, and each injected
fault (a dual binding, a dropped end, a reused version, an agent going backwards, a
holder that never lets go) is caught."""

from __future__ import annotations

import copy
import json
from typing import Any

from gateway.events import EventBus
from history.check import StoreView, Violation, check
from history.records import parse
from jvpn.check import Loaded
from session import wire
from session.client import HandshakeComplete, Reattached
from session.records import EPOCH_INSTALL_ACTION
from session.storeops import ActivateOp, StoreFailure
from tests.support.memnet import Gw, Net
from tests.unit.test_machines import OTHER, setup


def node_docs(gw: Gw) -> list[dict[str, Any]]:
    """The gateway machine's events as the sinks get them (its calls replayed on a bus)."""
    bus = EventBus(gw.name)
    docs: list[dict[str, Any]] = []
    bus.subscribe(lambda ev: docs.append(copy.deepcopy(ev.doc)))
    for method, args, kwargs in gw.events.calls:
        getattr(bus, method)(*args, **kwargs)
    return docs


def agent_doc(name: str, ev: Any, sid: bytes) -> dict[str, Any]:
    return {"@timestamp": 0, "service": {"node": {"name": name}},
            "event": {"action": EPOCH_INSTALL_ACTION},
            "jvpn": {"session_id": sid.hex(), "state_version": ev.version, "epoch": ev.epoch,
                     "node": ev.node_id.decode(), "stale_epoch_drops": 0}}


def history_of_a_move() -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]],
                                 bytes, Net, list[Gw]]:
    """A handshake on gw-a, a reattach through gw-b (gw-a fenced), then a client close."""
    net = Net(seed=71)
    c, gws = setup(net, ("gw-a", "gw-b"))
    sid = c.machine.session_id
    net.add_path(c, 2, OTHER, "gw-b")
    c.machine.reattach(net.now, 2, wire.TransportKind.UDP)
    net.run(net.now + 0.2)
    assert c.of(Reattached)
    installs = [agent_doc("agent-1", ev, sid) for ev in c.events
                if isinstance(ev, HandshakeComplete | Reattached)]
    c.machine.close(net.now)
    net.run(net.now + 0.2)
    return node_docs(gws[0]), node_docs(gws[1]), installs, sid, net, gws


def run(*streams: list[dict[str, Any]], **kw: Any) -> Any:
    loaded = Loaded()
    for i, docs in enumerate(streams):
        for seq, doc in enumerate(docs):
            loaded.add(doc, f"s{i}", seq)
    return check(loaded.records, bad_records=loaded.bad, **kw)


def binding(docs: list[dict[str, Any]], phase: str, epoch: int | None = None,
            status: str | None = None) -> dict[str, Any]:
    return next(d for d in docs if d["event"]["action"] == "binding"
                and d["jvpn"]["phase"] == phase
                and (epoch is None or d["jvpn"]["epoch"] == epoch)
                and (status is None or d["jvpn"].get("binding_status") == status))


def drop_begins(docs: list[dict[str, Any]], epoch: int) -> None:
    """Both begins of a reattach's binding: its PENDING grant and its activation."""
    docs[:] = [d for d in docs if not (d["event"]["action"] == "binding"
                                       and d["jvpn"]["phase"] == "begin"
                                       and d["jvpn"]["epoch"] == epoch)]


def test_the_machines_records_of_a_move_and_a_close_pass() -> None:
    a, b, agents, sid, net, gws = history_of_a_move()
    report = run(a, b, agents)
    assert report.ok, report.summary()
    c = report.counts
    assert (c["begin"], c["pending"], c["end"], c["release"]) == (3, 1, 2, 2)
    assert c["node_started"] == 2 and c["agent_installs"] == 2
    # gw-a's begin carries the birth's store time; gw-b's grant of epoch 2 is PENDING, and
    # its activation (when the new path validated) is the write that ended epoch 1.
    begin1, end1 = binding(a, "begin", 1), binding(b, "end", 1)
    granted2 = binding(b, "begin", 2, "PENDING")
    begin2 = binding(b, "begin", 2, "ACTIVE")
    assert begin2["event"]["reason"] == "validated" and granted2["event"]["reason"] == "granted"
    assert granted2["jvpn"]["store_ms"] <= begin2["jvpn"]["store_ms"]
    assert begin1["jvpn"]["holder"] == gws[0].machine.instance_id
    assert end1["event"]["reason"] == "moved" and end1["jvpn"]["holder"] == begin1["jvpn"]["holder"]
    assert end1["jvpn"]["store_ms"] == begin2["jvpn"]["store_ms"] > begin1["jvpn"]["store_ms"]
    assert binding(a, "release")["event"]["reason"] == "revoked"
    assert binding(b, "end", 2)["event"]["reason"] == "terminated"
    # The store agrees with the history's end.
    rec = net.store.records[sid]
    full = check(_records(a, b, agents),
                 {sid.hex(): StoreView(True, rec.epoch, rec.node)})
    assert full.ok, full.summary()
    live = check(_records(a, b, agents), {sid.hex(): StoreView(False, rec.epoch, rec.node)})
    assert live.violations[Violation.STORE_MISMATCH] == 1


def _records(*streams: list[dict[str, Any]]) -> list[Any]:
    out = []
    for i, docs in enumerate(streams):
        for seq, doc in enumerate(docs):
            r = parse(doc, f"s{i}", seq)
            if r is not None:
                out.append(r)
    return out


def test_a_dual_binding_is_caught() -> None:
    """A second node granted an epoch while the first binding was still ACTIVE."""
    a, b, agents, *_ = history_of_a_move()
    end1 = binding(b, "end", 1)
    b.remove(end1)  # as if the grant of epoch 2 had not ended epoch 1
    report = run(a, b, agents)
    assert report.violations[Violation.DUAL_BINDING] == 1, report.summary()


def test_a_dropped_end_record_is_caught() -> None:
    a, b, agents, *_ = history_of_a_move()
    b.remove(binding(b, "end", 2))  # the tombstone's record lost
    report = run(a, b, agents)
    assert report.violations[Violation.RELEASE_WITHOUT_STORE_END] == 1, report.summary()


def test_a_grant_without_its_record_is_caught() -> None:
    a, b, agents, *_ = history_of_a_move()
    drop_begins(b, 2)
    report = run(a, b, agents)
    assert report.violations[Violation.END_WITHOUT_BEGIN] == 1
    assert report.violations[Violation.AGENT_UNKNOWN_BINDING] == 1
    assert report.violations[Violation.RELEASE_WITHOUT_BEGIN] == 1


def test_a_reused_version_is_caught() -> None:
    a, b, agents, *_ = history_of_a_move()
    begin2 = binding(b, "begin", 2, "PENDING")  # the reattach's write: a version reused
    begin2["jvpn"]["state_version"] = binding(a, "begin", 1)["jvpn"]["state_version"]
    report = run(a, b, agents)
    assert report.violations[Violation.VERSION_REUSED] >= 1, report.summary()


def test_a_version_going_back_is_caught() -> None:
    a, b, agents, *_ = history_of_a_move()
    binding(b, "end", 2)["jvpn"]["state_version"] = 1
    report = run(a, b, agents)
    assert report.violations[Violation.VERSION_REUSED] + \
        report.violations[Violation.VERSION_BACKWARDS] >= 1, report.summary()


def test_an_agent_going_backwards_is_caught() -> None:
    a, b, agents, *_ = history_of_a_move()
    report = run(a, b, list(reversed(agents)))
    assert report.violations[Violation.AGENT_BACKWARDS] == 1, report.summary()


def test_a_holder_that_never_lets_go_is_caught() -> None:
    """The store ended gw-a's binding (moved) but gw-a, still running, never released it."""
    a, b, agents, *_ = history_of_a_move()
    a.remove(binding(a, "release"))
    report = run(a, b, agents)
    assert report.violations[Violation.NOT_RELEASED] == 1, report.summary()
    assert run(a, b, agents, down=["gw-a"]).ok  # ... unless its process died (killed)
    # ... or ended: a newer incarnation of gw-a started.
    restarted = copy.deepcopy(binding(a, "node_started"))
    restarted["jvpn"]["incarnation"] = "gw-a#ffffffff"
    restarted["@timestamp"] = "2030-01-01T00:00:00.000Z"
    assert run(a + [restarted], b, agents).ok


def test_a_late_release_is_caught_only_with_a_bound() -> None:
    a, b, agents, *_ = history_of_a_move()
    binding(a, "release")["jvpn"]["store_ms"] += 60_000
    assert run(a, b, agents).ok
    report = run(a, b, agents, max_release_lag_ms=5_000)
    assert report.violations[Violation.RELEASE_LATE] == 1


def test_a_release_that_contradicts_the_store_is_caught() -> None:
    a, b, agents, *_ = history_of_a_move()
    binding(b, "release", 2)["event"]["reason"] = "expired"  # its own tombstone was TERMINATED
    report = run(a, b, agents)
    assert report.violations[Violation.RELEASE_MISMATCH] == 1


def test_an_unreadable_record_fails_the_check() -> None:
    loaded = Loaded()
    lines = [json.dumps({"event": {"action": "binding"}, "jvpn": {"phase": "sideways"}}), "{",
             json.dumps({"event": {"action": "state_change"}})]
    loaded.add_lines(lines, "f")
    report = check(loaded.records, bad_records=loaded.bad)
    assert report.violations[Violation.BAD_RECORD] == 2
    torn = Loaded()
    torn.add_lines([json.dumps({"event": {"action": "x"}}), '{"torn'], "f")
    assert torn.bad == 0  # a killed writer's last line


def test_a_grant_lost_with_a_killed_process_is_counted_not_a_violation() -> None:
    """gw-b was killed (SIGKILL) before its grant's records reached its sink: once a newer
    gw-b process has started, what only later records show is ``lost_with_crash``."""
    a, b, agents, *_ = history_of_a_move()
    drop_begins(b, 2)
    b.remove(binding(b, "end", 1))
    b.remove(binding(b, "release"))
    b.remove(binding(b, "end", 2))
    a.remove(binding(a, "release"))  # its refresh said NOT_OWNER: it let go, recorded below
    restarted = copy.deepcopy(binding(b, "node_started"))
    restarted["jvpn"]["incarnation"] = "gw-b#ffffffff"
    restarted["@timestamp"] = "2030-01-01T00:00:00.000Z"
    assert not run(a, b, agents).ok  # with gw-b's process still the newest: missing records
    report = run(a, b + [restarted], agents)
    assert report.ok, report.summary()
    assert report.counts["lost_with_crash"] == 1


def test_an_activation_whose_answer_was_lost_is_recorded_as_it_happened() -> None:
    """activate.lua applied but its answer was lost, and the client then went quiet: the
    node asks again before letting the pending binding go, learns (from the record's
    ``act``) what the activation ended and when, and records it; the history checks."""
    net = Net(seed=73)
    c, gws = setup(net, ("gw-a", "gw-b"))
    lost: list[Any] = []

    def lose_first_activation(op: Any, answer: Any) -> Any:
        if isinstance(op, ActivateOp) and not lost:
            lost.append(answer)
            c.paths[2].uplink = False  # and the client goes quiet: nothing asks again but upkeep
            return StoreFailure("answer lost (test)")
        return answer

    net.store.rewrite = lose_first_activation
    net.add_path(c, 2, OTHER, "gw-b")
    c.machine.reattach(net.now, 2, wire.TransportKind.UDP)
    net.run(net.now + 0.3)
    assert lost and lost[0].ok  # applied in the store
    net.run(net.now + 2.0)
    a, b = node_docs(gws[0]), node_docs(gws[1])
    began = binding(b, "begin", 2, "ACTIVE")
    assert binding(b, "end", 1)["jvpn"]["store_ms"] == began["jvpn"]["store_ms"]
    assert began["jvpn"]["store_ms"] == lost[0].activated_ms
    report = run(a, b)
    assert report.ok, report.summary()


def test_an_activation_answered_late_is_recorded() -> None:
    """The store is slow to answer activate.lua, longer than the silence that lets a
    quiet pending binding go: the binding is kept until the answer, which is recorded."""
    net = Net(seed=75)
    c, gws = setup(net, ("gw-a", "gw-b"))
    net.store.delay = lambda op: 1.5 if isinstance(op, ActivateOp) else 0.0
    net.add_path(c, 2, OTHER, "gw-b")
    c.machine.reattach(net.now, 2, wire.TransportKind.UDP)
    net.run(net.now + 0.1)
    c.paths[2].uplink = False  # quiet after its first packets: only the answer decides
    net.run(net.now + 2.5)
    a, b = node_docs(gws[0]), node_docs(gws[1])
    assert binding(b, "begin", 2, "ACTIVE")["event"]["reason"] == "validated"
    report = run(a, b)
    assert report.ok, report.summary()


def test_an_activation_lost_with_a_killed_process_excuses_the_end_it_wrote() -> None:
    """gw-b's activation of epoch 2 ended epoch 1 (moved), then gw-b was killed before
    those records reached its sink; gw-a, which let epoch 1 go as moved, and gw-a's later
    activation of epoch 3 (which ended epoch 2) are on record. Once a newer gw-b process
    started, epoch 1's missing end is the lost activation's: counted, not a violation."""
    net = Net(seed=71)
    c, gws = setup(net, ("gw-a", "gw-b"))
    net.add_path(c, 2, OTHER, "gw-b")
    c.machine.reattach(net.now, 2, wire.TransportKind.UDP)
    net.run(net.now + 0.2)
    net.add_path(c, 3, ("198.51.100.3", 40002), "gw-a")
    c.machine.reattach(net.now, 3, wire.TransportKind.UDP)
    net.run(net.now + 0.2)
    a, b = node_docs(gws[0]), node_docs(gws[1])
    b[:] = [d for d in b if d["event"]["action"] != "binding" or d["jvpn"]["phase"]
            in ("node_started", "begin") and d["jvpn"].get("binding_status") == "PENDING"
            or d["jvpn"]["phase"] == "node_started"]
    assert [d["jvpn"]["phase"] for d in b if d["event"]["action"] == "binding"] == [
        "node_started", "begin"]
    binding(a, "release", 1)["event"]["reason"] = "moved"  # it learned by its own next write
    assert run(a, b).violations[Violation.RELEASE_WITHOUT_STORE_END] == 1  # gw-b still running
    restarted = copy.deepcopy(binding(b, "node_started"))
    restarted["jvpn"]["incarnation"] = "gw-b#ffffffff"
    restarted["@timestamp"] = "2030-01-01T00:00:00.000Z"
    report = run(a, b + [restarted])
    assert report.ok, report.summary()
    assert report.counts["lost_with_crash"] == 2  # epoch 2's activation, epoch 1's end


def _engine_doc(like: dict[str, Any], phase: str) -> dict[str, Any]:
    """An engine record of ``like``'s binding, as the node's engine mirror writes it."""
    doc = copy.deepcopy(like)
    doc["jvpn"]["phase"] = phase
    doc["event"]["reason"] = "engine"
    doc["jvpn"].pop("binding_status", None)
    return doc


def test_the_engine_holds_only_what_its_node_holds() -> None:
    """The compiled data plane's installs and removals are records too: an install of an
    epoch its node was never granted, and keys kept after the node released the binding,
    are each caught; the engine that follows its node passes."""
    a, b, agents, *_ = history_of_a_move()
    begin1, release1 = binding(a, "begin", 1), binding(a, "release")
    followed = list(a)
    followed.insert(followed.index(begin1) + 1, _engine_doc(begin1, "engine_install"))
    followed.insert(followed.index(release1) + 1, _engine_doc(begin1, "engine_remove"))
    report = run(followed, b, agents)
    assert report.ok, report.summary()
    assert (report.counts["engine_install"], report.counts["engine_remove"]) == (1, 1)

    kept = [d for d in followed if d["jvpn"].get("phase") != "engine_remove"]
    report = run(kept, b, agents)
    assert report.violations[Violation.ENGINE_NOT_REMOVED] == 1, report.summary()

    stranger = _engine_doc(begin1, "engine_install")  # gw-b's engine, gw-a's epoch
    stranger["jvpn"]["incarnation"] = binding(b, "begin", 2, "PENDING")["jvpn"]["incarnation"]
    report = run(followed, b + [stranger], agents)
    assert report.violations[Violation.ENGINE_WITHOUT_BINDING] == 1, report.summary()
