"""The history check: is what every node and agent recorded a correct history?

Theory of operation. The store decides every binding, by compare-and-set, and
the node that ran the script records the decision with the script's own TIME
(session.records): a ``begin`` PENDING when a reattach grants a binding, a
``begin`` ACTIVE when its path validated and the store made it the session's
(or at birth), an ``end`` when a write replaces it (``moved``) or ends the
session (``terminated``, ``expired``). Those records alone give each binding
its ACTIVE life in the store, [ACTIVE begin, end), on the one clock every node
shares. The check replays them per
session in store order and asks:

1. At most one binding ACTIVE at any instant: a ``begin`` while another
   binding of the session is open is a dual binding. (An end record a node
   failed to write shows up exactly so: the next grant overlaps it.)
2. Versions strictly increase per session: every write has one version, no
   version is written twice, none goes back.
3. Every end is explicit and matches the store: each binding a node removes
   from its table (``release``) was begun for that node, and a release that
   says the store ended it (moved, revoked, expired, terminated) has the store's
   end, of the same kind, at or before it; every binding a node holds is
   released by it, unless its process ended (a newer incarnation of the node
   started) or it is still the store's current binding when the history ends.
   With a snapshot of the store, the history's last word on each session must
   be the store's.
4. No agent goes backwards: each agent installs epochs in strictly increasing
   order with versions that never decrease, and each epoch it installs was
   granted, by the node it names.

Records that are missing make one of these fail: that is the point. One
gap is a fact rather than a fault: a process killed with SIGKILL loses the
records still queued for its sinks (a few milliseconds' worth), so a grant by
an incarnation known to have ended (a newer one of its node started) that
only later records show is counted as ``lost_with_crash``, and the epochs it
superseded count as ended no later than its own end; a holder's release of one of them
as ``moved`` then needs no end on record (the lost activation wrote it). The check is pure (records in, a ``Report`` out); reading files and the audit
stream is ``jvpn.audit``'s.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from history.records import AgentRecord, BindingRecord, OtherRecord, Record
from session.records import EPOCH_INSTALL_ACTION, RecordPhase, RecordReason

# What a release says about the store, and the store end it must match.
# (A node that learns late may find the session ended after it moved on: "elsewhere" and
# "revoked" releases accept any end of the binding; a node's own write has its own kind.)
_ANY_END = frozenset({RecordReason.MOVED, RecordReason.REKEYED, RecordReason.EXPIRED,
                      RecordReason.TERMINATED})
_STORE_SAYS: dict[RecordReason, frozenset[RecordReason]] = {
    RecordReason.MOVED: frozenset({RecordReason.MOVED}),
    RecordReason.REKEYED: frozenset({RecordReason.REKEYED}),
    RecordReason.REVOKED: _ANY_END,
    RecordReason.EXPIRED: frozenset({RecordReason.EXPIRED}),
    RecordReason.EXPIRED_ELSEWHERE: _ANY_END,
    RecordReason.TERMINATED: frozenset({RecordReason.TERMINATED}),
    RecordReason.TERMINATED_ELSEWHERE: _ANY_END,
}
_STORE_END_REASONS = frozenset({RecordReason.MOVED, RecordReason.REKEYED,
                                RecordReason.EXPIRED, RecordReason.TERMINATED})
PENDING = "PENDING"
MAX_EXAMPLES = 20  # violations listed per kind (all are counted)


class Violation(StrEnum):
    """What the history check can find wrong."""

    DUAL_BINDING = "dual_binding"  # two bindings of a session ACTIVE at once
    END_WITHOUT_BEGIN = "end_without_begin"  # the store ended a binding nobody recorded
    END_BEFORE_BEGIN = "end_before_begin"
    ENDED_TWICE = "ended_twice"
    BEGUN_TWICE = "begun_twice"  # one epoch granted twice (to two holders or bindings)
    VERSION_REUSED = "version_reused"
    VERSION_BACKWARDS = "version_backwards"
    RELEASE_WITHOUT_BEGIN = "release_without_begin"  # a node let go what it never got
    RELEASE_WITHOUT_STORE_END = "release_without_store_end"
    RELEASE_MISMATCH = "release_mismatch"  # the node's reason is not the store's
    NOT_RELEASED = "not_released"  # a live node still holds what the store ended
    RELEASE_LATE = "release_late"  # held past the bound after the store ended it
    STORE_MISMATCH = "store_mismatch"  # the history's last word is not the store's
    AGENT_BACKWARDS = "agent_backwards"
    AGENT_UNKNOWN_BINDING = "agent_unknown_binding"  # an agent installed an epoch never granted
    ENGINE_WITHOUT_BINDING = "engine_without_binding"  # the data plane got keys its node never held
    ENGINE_NOT_REMOVED = "engine_not_removed"  # the data plane kept keys its node released
    BAD_RECORD = "bad_record"


@dataclass(frozen=True, slots=True)
class StoreView:
    """One session as the store holds it now (for the end-of-history comparison)."""

    terminated: bool
    epoch: int
    node: str


@dataclass
class Report:
    """What the check found: violations (with examples), and the history's figures."""

    violations: Counter[Violation] = field(default_factory=Counter)
    examples: dict[Violation, list[str]] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    release_lag_ms: list[int] = field(default_factory=list)  # store end -> holder's release
    reject_reasons: Counter[str] = field(default_factory=Counter)
    security: Counter[str] = field(default_factory=Counter)
    sessions: int = 0

    @property
    def ok(self) -> bool:
        return not self.violations

    @property
    def decisions(self) -> int:
        """Binding decisions recorded: grants, store ends and the store's refusals."""
        c = self.counts
        return c["begin"] + c["end"] + c["store_refusals"]

    def add(self, kind: Violation, detail: str) -> None:
        self.violations[kind] += 1
        shown = self.examples.setdefault(kind, [])
        if len(shown) < MAX_EXAMPLES:
            shown.append(detail)

    def summary(self) -> str:
        """A few human lines: the verdict, the figures, then each kind of violation."""
        c = self.counts
        lines = [
            f"{'OK' if self.ok else 'VIOLATIONS'}: {sum(self.violations.values())} violations "
            f"in {self.sessions} sessions, {self.decisions} binding decisions "
            f"({c['begin']} begins of which {c['pending']} PENDING grants, {c['end']} ends, "
            f"{c['store_refusals']} refusals), "
            f"{c['release']} releases, {c['lease_lapsed']} lease lapses / "
            f"{c['lease_confirmed']} confirmations",
            f"agents: {c['agent_installs']} epoch installs, {c['stale_epoch_drops']} "
            f"stale-epoch drops; compiled engines: {c['engine_install']} installs / "
            f"{c['engine_remove']} removals; security alerts: {sum(self.security.values())}"
            + (f" ({dict(self.security)})" if self.security else ""),
        ]
        if c["lost_with_crash"]:
            lines.append(f"records lost with a killed process: {c['lost_with_crash']}")
        if self.release_lag_ms:
            lag = sorted(self.release_lag_ms)
            lines.append(f"store end -> holder release: median {lag[len(lag) // 2]} ms, "
                         f"max {lag[-1]} ms over {len(lag)} releases")
        for kind, n in sorted(self.violations.items()):
            lines.append(f"  {kind.value}: {n}")
            lines.extend(f"    {ex}" for ex in self.examples.get(kind, []))
        return "\n".join(lines)

    def to_json(self) -> dict[str, object]:
        lag = sorted(self.release_lag_ms)
        return {
            "ok": self.ok, "sessions": self.sessions, "decisions": self.decisions,
            "violations": {k.value: n for k, n in self.violations.items()},
            "examples": {k.value: v for k, v in self.examples.items()},
            "counts": dict(self.counts), "reject_reasons": dict(self.reject_reasons),
            "security": dict(self.security),
            "release_lag_ms": {"n": len(lag), "median": lag[len(lag) // 2] if lag else None,
                               "max": lag[-1] if lag else None},
        }


@dataclass
class _Binding:
    begin: BindingRecord | None = None  # ACTIVE from here
    end: BindingRecord | None = None
    pending: BindingRecord | None = None  # granted PENDING here

    @property
    def granted(self) -> BindingRecord | None:
        """The grant: PENDING (a reattach's), else the ACTIVE begin (a birth's)."""
        return self.pending if self.pending is not None else self.begin


def _short(sid: str) -> str:
    return sid[:12]


def check(records: Iterable[Record], store: Mapping[str, StoreView | None] | None = None, *,
          bad_records: int = 0, max_release_lag_ms: int | None = None,
          down: Iterable[str] = ()) -> Report:
    """Check a history (every node's and agent's records, any order); ``store``: the
    store's sessions now (a missing key: not looked up; None: no record), when known;
    ``down``: nodes whose last process is known to have died (killed, not restarted)."""
    rep = Report()
    if bad_records:
        rep.violations[Violation.BAD_RECORD] += bad_records
    bindings: dict[tuple[str, int], _Binding] = defaultdict(_Binding)
    releases: list[BindingRecord] = []
    engine: list[BindingRecord] = []
    incarnations: dict[str, list[tuple[float, int, str]]] = defaultdict(list)
    agents: dict[tuple[str, str], list[AgentRecord]] = defaultdict(list)
    for rec in records:
        if isinstance(rec, BindingRecord):
            if rec.phase in (RecordPhase.ENGINE_INSTALL, RecordPhase.ENGINE_REMOVE):
                engine.append(rec)
                rep.counts[rec.phase.value] += 1
                continue
            _collect(rec, bindings, releases, incarnations, rep)
        elif isinstance(rec, AgentRecord):
            if rec.action == EPOCH_INSTALL_ACTION:
                agents[(rec.agent, rec.session_id)].append(rec)
                rep.counts["agent_installs"] += 1
            else:
                rep.counts["stale_epoch_drops"] += rec.stale_epoch_drops
                rep.counts["agent_summaries"] += 1
        elif isinstance(rec, OtherRecord):
            _count_other(rec, rep)
    sessions = {sid for sid, _ in bindings}
    rep.sessions = len(sessions)
    ended = _ended_incarnations(incarnations)
    for node in down:  # its newest incarnation died too
        ended.update(inc for _, _, inc in incarnations.get(node, []))
    _check_store_order(bindings, ended, rep)
    _check_versions(bindings, rep)
    _check_releases(bindings, releases, ended, rep, max_release_lag_ms)
    _check_agents(agents, bindings, ended, rep)
    _check_engine(engine, bindings, releases, ended, rep)
    if store is not None:
        _check_against_store(bindings, store, rep)
    return rep


def _collect(rec: BindingRecord, bindings: dict[tuple[str, int], _Binding],
             releases: list[BindingRecord], incarnations: dict[str, list[tuple[float, int, str]]],
             rep: Report) -> None:
    phase = rec.phase
    rep.counts[phase.value] += 1
    if phase is RecordPhase.NODE_STARTED:
        incarnations[rec.node].append((rec.wall_s, rec.seq, rec.incarnation))
        return
    if phase is RecordPhase.RELEASE:
        releases.append(rec)
        return
    if phase not in (RecordPhase.BEGIN, RecordPhase.END):
        return  # lease lapses and confirmations are counted only
    b = bindings[(rec.session_id, rec.epoch)]
    where = f"session {_short(rec.session_id)} epoch {rec.epoch}"
    if phase is RecordPhase.BEGIN:
        if rec.status == PENDING:
            rep.counts["pending"] += 1
        slot = "pending" if rec.status == PENDING else "begin"
        first = getattr(b, slot)
        if first is None:
            setattr(b, slot, rec)
        elif (first.holder, first.binding_id) != (rec.holder, rec.binding_id):
            rep.add(Violation.BEGUN_TWICE, f"{where}: granted to {first.holder} and to "
                                           f"{rec.holder}")
        return
    if rec.reason not in _STORE_END_REASONS:
        rep.add(Violation.BAD_RECORD, f"{where}: end with reason {rec.reason.value}")
        return
    if b.end is None:
        b.end = rec
    elif b.end.store_ms != rec.store_ms or b.end.reason is not rec.reason:
        rep.add(Violation.ENDED_TWICE, f"{where}: {b.end.reason.value} at {b.end.store_ms} "
                                       f"and {rec.reason.value} at {rec.store_ms}")


def _count_other(rec: OtherRecord, rep: Report) -> None:
    if rec.action == "security_event":
        rep.security[str(rec.fields.get("security_kind") or rec.reason)] += 1
    elif rec.action == "reattach" and "current_version" in rec.fields:
        rep.counts["store_refusals"] += 1  # the store's decision, with its current version
        rep.reject_reasons[rec.reason] += 1


def _ended_incarnations(incarnations: dict[str, list[tuple[float, int, str]]]) -> set[str]:
    """Incarnations whose node started again later (their process ended)."""
    ended: set[str] = set()
    for starts in incarnations.values():
        starts.sort()
        ended.update(inc for _, _, inc in starts[:-1])
    return ended


def _check_store_order(bindings: dict[tuple[str, int], _Binding], ended: set[str],
                       rep: Report) -> None:
    """Replay begins and ends per session in store order: at most one open at a time."""
    per_session: dict[str, list[tuple[int, int, int, str]]] = defaultdict(list)
    for (sid, epoch), b in bindings.items():
        where = f"session {_short(sid)} epoch {epoch}"
        if b.begin is not None:
            # end(e) sorts before begin(e+1) at the same ms (one write does both), and
            # begin(e) before end(e).
            per_session[sid].append((b.begin.store_ms, 2 * epoch, 1, b.begin.holder))
        if b.end is not None:
            if b.begin is None:
                if _lost_activation(b, ended):  # granted by a process killed before it wrote
                    rep.counts["lost_with_crash"] += 1
                    per_session[sid].append((b.end.store_ms, 2 * epoch + 1, -2, ""))
                    continue
                rep.add(Violation.END_WITHOUT_BEGIN,
                        f"{where}: ended ({b.end.reason.value}, by {b.end.node}) but its "
                        f"grant was never recorded")
                continue
            if b.end.store_ms < b.begin.store_ms:
                rep.add(Violation.END_BEFORE_BEGIN, f"{where}: ended at {b.end.store_ms}, "
                                                    f"begun at {b.begin.store_ms}")
            per_session[sid].append((b.end.store_ms, 2 * epoch + 1, -1, ""))
    for sid, events in per_session.items():
        events.sort()
        open_: dict[int, str] = {}
        for ms, key, delta, holder in events:
            epoch = key // 2
            if delta == -2:  # the end of a grant lost with a crash: what it superseded ended
                for e in [e for e in open_ if e < epoch]:
                    del open_[e]
                continue
            if delta > 0:
                if open_:
                    others = ", ".join(f"epoch {e} on {h}" for e, h in sorted(open_.items()))
                    rep.add(Violation.DUAL_BINDING,
                            f"session {_short(sid)}: epoch {epoch} on {holder} granted at "
                            f"{ms} while {others} was still ACTIVE")
                open_[epoch] = holder
            else:
                open_.pop(epoch, None)


def _check_versions(bindings: dict[tuple[str, int], _Binding], rep: Report) -> None:
    """Every store write has one version; per session they strictly increase in time."""
    writes: dict[str, set[tuple[int, int]]] = defaultdict(set)  # sid -> {(store_ms, version)}
    for (sid, _), b in bindings.items():
        for rec in (b.pending, b.begin, b.end):
            if rec is not None and rec.version is not None:
                writes[sid].add((rec.store_ms, rec.version))  # one write may have two records
    for sid, pairs in writes.items():
        first_at: dict[int, int] = {}
        last = -1
        for ms, v in sorted(pairs):
            if v in first_at:
                rep.add(Violation.VERSION_REUSED, f"session {_short(sid)}: version {v} written "
                                                  f"at {first_at[v]} and at {ms}")
                continue
            if v < last:
                rep.add(Violation.VERSION_BACKWARDS, f"session {_short(sid)}: version {v} at "
                                                     f"{ms} after version {last}")
            first_at[v] = ms
            last = max(last, v)


def _check_releases(bindings: dict[tuple[str, int], _Binding], releases: list[BindingRecord],
                    ended: set[str], rep: Report, max_lag_ms: int | None) -> None:
    released: set[tuple[str, str, int]] = set()
    for rel in releases:
        key = (rel.session_id, rel.epoch)
        where = f"session {_short(rel.session_id)} epoch {rel.epoch} on {rel.incarnation}"
        b = bindings.get(key)
        if b is None or b.granted is None or b.granted.holder != rel.incarnation:
            rep.add(Violation.RELEASE_WITHOUT_BEGIN,
                    f"{where}: released ({rel.reason.value}) but never granted to it")
            continue
        released.add((rel.incarnation, rel.session_id, rel.epoch))
        if b.begin is None:
            continue  # never ACTIVE: the store never had it to end
        wanted = _STORE_SAYS.get(rel.reason)
        if wanted is None:
            continue  # node stopped, lease lapsed: the store may still hold it
        if b.end is None:
            if rel.reason is RecordReason.MOVED and _moved_by_a_lost_activation(
                    bindings, ended, rel):
                rep.counts["lost_with_crash"] += 1  # its end died with the activation's node
                continue
            if rel.reason is not RecordReason.REVOKED:  # a record collected by the store
                rep.add(Violation.RELEASE_WITHOUT_STORE_END,
                        f"{where}: released ({rel.reason.value}) but the store's end was "
                        f"never recorded")
            continue
        if b.end.reason not in wanted:
            rep.add(Violation.RELEASE_MISMATCH, f"{where}: released as {rel.reason.value}, "
                                                f"the store ended it as {b.end.reason.value}")
        if rel.store_ms and rel.store_ms < b.end.store_ms:
            rep.add(Violation.RELEASE_MISMATCH, f"{where}: released at {rel.store_ms}, before "
                                                f"the store ended it at {b.end.store_ms}")
            continue
        if rel.store_ms:
            lag = rel.store_ms - b.end.store_ms
            rep.release_lag_ms.append(lag)
            if max_lag_ms is not None and lag > max_lag_ms:
                rep.add(Violation.RELEASE_LATE, f"{where}: held {lag} ms after the store "
                                                f"ended it ({b.end.reason.value})")
    for (sid, epoch), b in bindings.items():
        if b.begin is None or b.end is None:
            continue  # still current: compared with the store, if given
        holder = b.granted.holder if b.granted is not None else b.begin.holder
        if (holder, sid, epoch) in released or holder in ended:
            continue
        rep.add(Violation.NOT_RELEASED,
                f"session {_short(sid)} epoch {epoch}: {holder} never let go of it after the "
                f"store ended it ({b.end.reason.value} at {b.end.store_ms})")


def _check_engine(engine: list[BindingRecord], bindings: dict[tuple[str, int], _Binding],
                  releases: list[BindingRecord], ended: set[str], rep: Report) -> None:
    """The compiled data plane held a binding's keys only while its node held the binding:
    each install is of an epoch granted to that process, and each one its node released
    (but for a stop, which takes the engine with it) is followed by its removal, in that
    node's own record stream."""
    held: dict[tuple[str, str, int], list[BindingRecord]] = defaultdict(list)
    for rec in sorted(engine, key=lambda r: (r.source, r.seq)):
        key = (rec.incarnation, rec.session_id, rec.epoch)
        if rec.phase is RecordPhase.ENGINE_INSTALL:
            b = bindings.get((rec.session_id, rec.epoch))
            if b is None or b.granted is None or b.granted.holder != rec.incarnation:
                rep.add(Violation.ENGINE_WITHOUT_BINDING,
                        f"session {_short(rec.session_id)} epoch {rec.epoch}: the engine of "
                        f"{rec.incarnation} was given keys its node was never granted")
        held[key].append(rec)
    for rel in releases:
        if rel.reason is RecordReason.NODE_STOPPED or rel.incarnation in ended:
            continue
        recs = held.get((rel.incarnation, rel.session_id, rel.epoch))
        if not recs or recs[-1].phase is RecordPhase.ENGINE_REMOVE:
            continue  # never in the engine, or taken out again
        rep.add(Violation.ENGINE_NOT_REMOVED,
                f"session {_short(rel.session_id)} epoch {rel.epoch}: released by "
                f"{rel.incarnation} ({rel.reason.value}) but its engine kept the keys")


def _lost_activation(b: _Binding, ended: set[str]) -> bool:
    """Whether ``b`` became ACTIVE by a write whose records died with a killed process
    (its end is on record, its ACTIVE begin is not, and its holder's process ended)."""
    return b.begin is None and b.end is not None and b.end.holder in ended


def _moved_by_a_lost_activation(bindings: dict[tuple[str, int], _Binding], ended: set[str],
                                rel: BindingRecord) -> bool:
    """A release ``moved`` with no store end on record: the activation that ended it (a
    later epoch of the session, granted before the release) is one lost with a crash."""
    for (sid, epoch), b in bindings.items():
        if sid != rel.session_id or epoch <= rel.epoch or not _lost_activation(b, ended):
            continue
        if b.pending is None or not rel.store_ms or b.pending.store_ms <= rel.store_ms:
            return True
    return False


def _check_agents(agents: dict[tuple[str, str], list[AgentRecord]],
                  bindings: dict[tuple[str, int], _Binding], ended: set[str],
                  rep: Report) -> None:
    for (agent, sid), installs in agents.items():
        installs.sort(key=lambda r: (r.source, r.seq))
        prev: AgentRecord | None = None
        for rec in installs:
            where = f"agent {agent} session {_short(sid)}"
            if prev is not None and (rec.epoch <= prev.epoch or rec.version < prev.version):
                rep.add(Violation.AGENT_BACKWARDS,
                        f"{where}: installed v{rec.version} epoch {rec.epoch} after "
                        f"v{prev.version} epoch {prev.epoch}")
            prev = rec
            b = bindings.get((sid, rec.epoch))
            grant = b.granted if b is not None else None
            if grant is None and rec.node in ended:
                rep.counts["lost_with_crash"] += 1  # its grant's record died with the node
            elif grant is None:
                rep.add(Violation.AGENT_UNKNOWN_BINDING,
                        f"{where}: installed epoch {rec.epoch} from {rec.node}, never granted")
            elif rec.node and grant.holder[:len(rec.node)] != rec.node:
                rep.add(Violation.AGENT_UNKNOWN_BINDING,
                        f"{where}: installed epoch {rec.epoch} from {rec.node}, granted to "
                        f"{grant.holder}")


def _check_against_store(bindings: dict[tuple[str, int], _Binding],
                         store: Mapping[str, StoreView | None], rep: Report) -> None:
    last: dict[str, tuple[int, _Binding]] = {}
    for (sid, epoch), b in bindings.items():
        if b.begin is not None and (sid not in last or epoch > last[sid][0]):
            last[sid] = (epoch, b)
    for sid, (epoch, b) in last.items():
        if sid not in store:
            continue
        view = store[sid]
        where = f"session {_short(sid)}"
        if view is None:
            continue  # collected (a tombstone past its time): nothing left to compare
        if view.epoch > epoch:
            rep.add(Violation.STORE_MISMATCH, f"{where}: the store holds epoch {view.epoch}, "
                                              f"the history's last grant is epoch {epoch}")
        elif b.end is None and view.terminated:
            rep.add(Violation.STORE_MISMATCH, f"{where}: terminated in the store, but the end "
                                              f"of epoch {epoch} was never recorded")
        elif b.end is None and b.begin is not None and view.node != b.begin.holder:
            rep.add(Violation.STORE_MISMATCH, f"{where}: the store's holder is {view.node}, "
                                              f"the history's {b.begin.holder}")
        elif b.end is not None and not view.terminated and view.epoch == epoch:
            rep.add(Violation.STORE_MISMATCH, f"{where}: epoch {epoch} is current in the "
                                              f"store, but recorded ended "
                                              f"({b.end.reason.value})")
