"""Records as the checker reads them: one typed value per event document.

A document is a node's ECS event (``gateway/events.py``: a JSON line of an
events file, or the ``event`` field of an audit stream entry) or an agent's
record (``agent/agent.py``, the same shape). ``parse`` keeps what the history
check needs and ignores the rest; a document it cannot read raises
``BadRecord`` with the reason, so that a torn or foreign line is counted and
reported, never guessed at.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from session.records import (
    AGENT_SUMMARY_ACTION,
    BINDING_ACTION,
    EPOCH_INSTALL_ACTION,
    RecordPhase,
    RecordReason,
)

REATTACH_ACTION = "reattach"
SECURITY_ACTION = "security_event"
STATE_CHANGE_ACTION = "state_change"


class BadRecord(ValueError):
    """A document that claims to be a record but cannot be read as one."""


@dataclass(frozen=True, slots=True)
class BindingRecord:
    """One node record (session.records): begin, end, release, lease, node start."""

    source: str  # the stream it came from (a file name, or the audit stream)
    seq: int  # its position in that stream
    node: str  # service.node.name of the writer
    incarnation: str  # the writer's process (node instance id)
    phase: RecordPhase
    reason: RecordReason
    session_id: str  # hex; "" for a node record
    epoch: int
    holder: str  # the binding's node instance ("" when the writer did not know it)
    store_ms: int  # the store's TIME of the write (0: not known)
    version: int | None
    binding_id: str | None
    wall_s: float  # @timestamp, seconds
    status: str = "ACTIVE"  # a begin's: PENDING (granted, not validated yet) or ACTIVE


@dataclass(frozen=True, slots=True)
class AgentRecord:
    """One agent record: an epoch it installed, or its counters at the end."""

    source: str
    seq: int
    agent: str
    action: str
    session_id: str
    version: int
    epoch: int
    node: str
    stale_epoch_drops: int
    wall_s: float
    drops: dict[str, int] | None = None


@dataclass(frozen=True, slots=True)
class OtherRecord:
    """An event the checker only counts: a reattach refusal, a security alert, a state change."""

    source: str
    seq: int
    node: str
    action: str
    reason: str
    session_id: str
    fields: dict[str, Any]


Record = BindingRecord | AgentRecord | OtherRecord


def get(doc: dict[str, Any], path: str) -> Any:
    """A dotted field of a nested document (or a dotted key left flat)."""
    node: Any = doc
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return doc.get(path)
        node = node[part]
    return node


def _wall(value: Any) -> float:
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and value:
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            raise BadRecord(f"bad @timestamp {value!r}") from None
    return 0.0


def _int(doc: dict[str, Any], path: str, default: int | None = None) -> int:
    value = get(doc, path)
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRecord(f"{path}: expected an integer, got {value!r}")
    return value


def parse(doc: dict[str, Any], source: str, seq: int) -> Record | None:
    """The record ``doc`` holds, or None if it is an event the checker does not need."""
    action = get(doc, "event.action")
    node = str(get(doc, "service.node.name") or "")
    if action == BINDING_ACTION:
        try:
            phase = RecordPhase(get(doc, "jvpn.phase"))
            reason = RecordReason(get(doc, "event.reason"))
        except ValueError as exc:
            raise BadRecord(str(exc)) from None
        version = get(doc, "jvpn.state_version")
        return BindingRecord(
            source, seq, node, str(get(doc, "jvpn.incarnation") or ""), phase, reason,
            str(get(doc, "jvpn.session_id") or ""), _int(doc, "jvpn.epoch", 0),
            str(get(doc, "jvpn.holder") or ""), _int(doc, "jvpn.store_ms", 0),
            version if isinstance(version, int) else None,
            get(doc, "jvpn.binding_id"), _wall(get(doc, "@timestamp")),
            str(get(doc, "jvpn.binding_status") or "ACTIVE"))
    if action in (EPOCH_INSTALL_ACTION, AGENT_SUMMARY_ACTION):
        drops = get(doc, "jvpn.drops")
        return AgentRecord(
            source, seq, node, str(action), str(get(doc, "jvpn.session_id") or ""),
            _int(doc, "jvpn.state_version", 0), _int(doc, "jvpn.epoch", 0),
            str(get(doc, "jvpn.node") or ""), _int(doc, "jvpn.stale_epoch_drops", 0),
            _wall(get(doc, "@timestamp")), drops if isinstance(drops, dict) else None)
    if action in (REATTACH_ACTION, SECURITY_ACTION, STATE_CHANGE_ACTION):
        jvpn = get(doc, "jvpn")
        return OtherRecord(source, seq, node, str(action), str(get(doc, "event.reason") or ""),
                           str(get(doc, "jvpn.session_id") or ""),
                           dict(jvpn) if isinstance(jvpn, dict) else {})
    return None
