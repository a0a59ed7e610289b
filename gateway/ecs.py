"""The event schema: what an event is as an Elastic Common Schema document and JSON line.

``EventBus.emit`` (``gateway.events``) builds each event with what is here: the
ECS names of emit()'s short keys, each action's ``event.kind``, categories and
types (ones the ECS reference expects for each category), the human
``message``, values made safe (``bytes`` as a fingerprint, a session id as hex),
the nesting of dotted keys into the document and its one-line JSON. The sinks
(``gateway.sinks``) write ``Event`` lines. Nothing here does I/O or decides
about sessions: fields in, a document and a line out.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from enum import Enum
from typing import Any

import orjson

from session.keys import fingerprint

ECS_VERSION = "8.11"
SERVICE_NAME = "jumping-vpn"
EVENT_DATASET = "jvpn.events"

# kwargs of emit() that map onto ECS fields; any other bare name goes under jvpn.*
ECS_SHORTCUTS = {
    "outcome": "event.outcome",
    "reason": "event.reason",
    "category": "event.category",
    "type": "event.type",
    "source_ip": "source.ip",
    "source_port": "source.port",
    "trace_id": "trace.id",
    "message": "message",
    "duration_ns": "event.duration",  # ECS: nanoseconds
}

# action -> ECS event.kind, event.category, event.type, default event.outcome. Each type is
# one the ECS reference expects for every category listed ("Expected event types for
# category ...": authentication and session: start, end, info; network: access, allowed,
# connection, denied, end, info, protocol, start; intrusion_detection: allowed, denied, info):
# a reattach or a transport switch changes a session but is "info" (ECS has no "change" for
# these categories); the kind of change is event.action.
ACTIONS: dict[str, tuple[str, list[str], list[str], str]] = {
    "state_change": ("event", ["session"], ["info"], "success"),
    "transport_switch": ("event", ["network", "session"], ["info"], "success"),
    "security_event": ("alert", ["intrusion_detection"], ["denied"], "failure"),
    "reattach": ("event", ["authentication", "session"], ["info"], "unknown"),
    "handshake": ("event", ["authentication", "session"], ["start"], "unknown"),
    "drop": ("event", ["network"], ["denied"], "failure"),
    "binding_revoked": ("event", ["session"], ["end"], "success"),
}
DEFAULT_ACTION = ("event", ["network"], ["info"], "unknown")
# A history record's fields (GatewayMachine._record), in its order: bare names, all under
# jvpn.* but the reason (event.reason); its action has no entry above: the default's kind.
RECORD_ORDER = ("session_id", "phase", "reason", "epoch", "holder", "incarnation", "store_ms",
                 "state_version", "binding_id", "binding_status")
RECORD_CATEGORY, RECORD_TYPE = DEFAULT_ACTION[1], DEFAULT_ACTION[2]
_JSON_TEXT: dict[str, str] = {}  # a string -> its JSON text (a record's few distinct strings)


def json_text(value: str) -> str:
    """``value`` as JSON text, as orjson writes it (hex ids need no escaping; the phases,
    reasons and node names repeat: cached)."""
    if value.isascii() and value.isalnum():
        return f'"{value}"'
    text = _JSON_TEXT.get(value)
    if text is None:
        text = orjson.dumps(value).decode()
        if len(_JSON_TEXT) < 4096:
            _JSON_TEXT[value] = text
    return text


# Allowed (category -> event types), as the ECS reference lists them, for the categories used.
ECS_EXPECTED_TYPES: dict[str, frozenset[str]] = {
    "authentication": frozenset({"start", "end", "info"}),
    "session": frozenset({"start", "end", "info"}),
    "network": frozenset({"access", "allowed", "connection", "denied", "end", "info", "protocol",
                          "start"}),
    "intrusion_detection": frozenset({"allowed", "denied", "info"}),
}


def message_of(action: str, outcome: str, f: dict[str, Any]) -> str:
    """ECS ``message``: one human line per event (what a log viewer shows first)."""
    sid = f.get("session_id")
    who = f"session {sid.hex()[:12] if isinstance(sid, bytes) else str(sid)[:12]} " if sid else ""
    reason = f.get("reason")
    why = f": {name_of(reason)}" if reason not in (None, "") else ""
    if action == "state_change":
        return (f"{who}{f.get('from_state')} -> {f.get('to_state')} "
                f"(v{f.get('state_version')}){why}")
    if action == "transport_switch":
        return f"{who}{f.get('from_transport')} -> {f.get('to_transport')}{why}"
    if action == "security_event":
        return f"security: {f.get('security_kind')}{why} {who}".rstrip()
    return f"{action} {f.get('outcome', outcome)}{why} {who}".rstrip()


_TS_CACHE: list[Any] = [None, ""]  # (millisecond, its text): a busy node emits several per ms


def timestamp(t: float) -> str:
    ms = int(t * 1000)
    if _TS_CACHE[0] != ms:
        text = datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")
        _TS_CACHE[0], _TS_CACHE[1] = ms, text.replace("+00:00", "Z")
    return str(_TS_CACHE[1])


def field_value(key: str, value: Any) -> Any:
    """Make a value safe and serializable: bytes are hex (session ids) or fingerprints."""
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        return raw.hex() if key.endswith("session_id") else fingerprint(raw)
    if isinstance(value, Enum):
        return value.name
    return value


FIELD_PARTS: dict[str, tuple[str, ...]] = {}  # emit() keyword -> its ECS path, split
PLAIN = frozenset({str, int, float, bool, list})  # exact types field_value returns as they are


def name_of(value: str | Enum) -> str:
    return value.name if isinstance(value, Enum) else value


def optional(value: object) -> object:
    """ "" means "no value" (an enum member is always a value, even if its int is 0)."""
    return None if value is None or (isinstance(value, str) and value == "") else value


_PATHS: dict[str, list[str]] = {}  # dotted key -> its parts (keys come from a small set)
_JSON = json.JSONEncoder(separators=(",", ":"), default=str)  # one encoder, not one per event


def encode_json(doc: dict[str, Any]) -> str:
    """One compact JSON line: orjson (~0.3 us for an event, the stdlib encoder ~4 us: two
    events per reattach made it a tenth of a gateway's CPU), and the stdlib encoder for
    what orjson refuses (an int beyond 64 bits, a lone surrogate): same text otherwise."""
    try:
        return orjson.dumps(doc, default=str).decode()
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return _JSON.encode(doc)


def to_document(fields: dict[str, Any]) -> dict[str, Any]:
    """Nest flat dotted ECS keys into the canonical JSON document."""
    doc: dict[str, Any] = {}
    paths = _PATHS
    for key, value in fields.items():
        parts = paths.get(key)
        if parts is None:
            parts = [key] if key.startswith("@") else key.split(".")
            if len(paths) < 4096:
                paths[key] = parts
        place(doc, parts, value)
    return doc


def place(doc: dict[str, Any], parts: Sequence[str], value: Any) -> None:
    """Set ``value`` at the nested path ``parts`` of ``doc`` as ``to_document`` would."""
    node = doc
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):  # "a" and "a.b" both set: keep the rest dotted
            node[".".join(parts[i:])] = value
            return
        node = child
    node[parts[-1]] = value


def _flatten(doc: dict[str, Any], prefix: str, out: dict[str, Any]) -> dict[str, Any]:
    for key, value in doc.items():
        if type(value) is dict:
            _flatten(value, prefix + key + ".", out)
        else:
            out[prefix + key] = value
    return out


class Event:
    """One event: the nested ECS document, and its JSON line once serialized.

    ``fields`` is the same event as flat dotted ECS keys (``"event.action"``), made on
    first use: subscribers and tests read it; the sinks only need the document. A history
    record is made as its line (``EventBus.emit``): its document is read from the line
    when asked for."""

    __slots__ = ("_doc", "line", "_fields", "_action")

    def __init__(self, doc: dict[str, Any] | None, line: str = "", action: str = "") -> None:
        self._doc = doc
        self.line = line
        self._fields: dict[str, Any] | None = None
        self._action = action

    @property
    def doc(self) -> dict[str, Any]:
        if self._doc is None:
            self._doc = orjson.loads(self.line)
        return self._doc

    @property
    def fields(self) -> dict[str, Any]:
        if self._fields is None:
            self._fields = _flatten(self.doc, "", {})
        return self._fields

    @property
    def action(self) -> str:
        """event.action, e.g. "state_change"."""
        if self._action:
            return self._action
        event = self.doc.get("event")
        return str(event.get("action", "")) if type(event) is dict else ""

    def document(self) -> dict[str, Any]:
        """The nested ECS document (shared: read it, do not change it)."""
        return self.doc

    def serialize(self) -> str:
        """The event as one compact JSON line (cached)."""
        if not self.line:
            self.line = encode_json(self.doc)
        return self.line

    def __repr__(self) -> str:
        return f"Event({self.fields!r})"
