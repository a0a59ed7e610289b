"""``jvpn status``: every node and every session of a deployment at a glance.

The store lists the nodes (each registers its admin address, with a TTL) and
the sessions (state, version, epoch, owner, uptime, time left); each node's
``/status`` adds what only the node knows of the sessions it holds (endpoint,
bytes and packets each way, time since the last packet). A node that is
registered but does not answer is shown as not answering, with the reason;
its sessions are still listed from the store.
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from session import wire
from session.states import SessionState
from session.storeops import SessionRecord

SHORT_ID = 12  # hex digits of the session id shown in tables and agent logs
MAX_PAGES = 10_000  # bound on SCAN pages read for one view


class StatusError(ValueError):
    """A request the operator can fix (unknown or ambiguous prefix, bad filter)."""


def short_id(session_id: bytes | str) -> str:
    text = session_id.hex() if isinstance(session_id, bytes) else session_id
    return text[:SHORT_ID]


def resolve_prefix(prefix: str, ids: list[bytes]) -> bytes:
    """The one session id starting with the hex ``prefix``; a clear error otherwise."""
    text = prefix.strip().lower()
    if not text or any(c not in "0123456789abcdef" for c in text):
        raise StatusError(f"{prefix!r} is not a hex session id or prefix")
    if len(text) > 2 * wire.SESSION_ID_LEN:
        raise StatusError(f"{prefix!r} is longer than a session id ({2 * wire.SESSION_ID_LEN} hex digits)")
    found = sorted(sid for sid in ids if sid.hex().startswith(text))
    if not found:
        raise StatusError(f"no session id starts with {text}")
    if len(found) > 1:
        shown = ", ".join(short_id(s) for s in found[:5])
        more = f" and {len(found) - 5} more" if len(found) > 5 else ""
        raise StatusError(f"session id prefix {text} is ambiguous: it matches {shown}{more}; "
                          "give more digits")
    return found[0]


async def all_records(store: Any, page_size: int = 500) -> list[SessionRecord]:
    """Every session record (live and tombstones), paging through the store's SCAN."""
    out: list[SessionRecord] = []
    cursor = 0
    for _ in range(MAX_PAGES):
        page = await store.list_sessions(page_size, cursor)
        out.extend(page.sessions)
        cursor = page.cursor
        if cursor == 0:
            break
    seen: dict[bytes, SessionRecord] = {r.session_id: r for r in out}  # SCAN may repeat
    return list(seen.values())


@dataclass
class NodeView:
    name: str
    admin: str
    instance: str = ""
    started_ms: int = 0
    answer: dict[str, Any] | None = None
    error: str = ""

    @property
    def answering(self) -> bool:
        return self.answer is not None

    def as_dict(self) -> dict[str, Any]:
        a = self.answer or {}
        store = a.get("store", {})
        return {
            "node": self.name, "instance": a.get("instance", self.instance), "admin": self.admin,
            "answering": self.answering, "error": self.error or None,
            "ready": a.get("ready") if self.answering else None,
            "store_up": store.get("up"), "store_error": store.get("error") or None,
            "store_latency_ms": store.get("latency_ms"),
            "sessions_by_state": {k: v for k, v in a.get("sessions_by_state", {}).items() if v},
            "sessions": len(a.get("sessions", [])),
        }


async def fetch_node(http: aiohttp.ClientSession, info: dict[str, Any], token: str,
                     timeout: float) -> NodeView:
    """One node's ``/status``; any failure is kept as the node's error, never raised."""
    view = NodeView(str(info["node"]), str(info.get("admin", "")), str(info.get("instance", "")),
                    int(info.get("started_ms", 0) or 0))
    if not view.admin:
        view.error = "no admin address registered"
        return view
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        async with http.get(f"http://{view.admin}/status", headers=headers,
                            timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            if r.status != 200:
                body = await r.text()
                try:
                    detail = json.loads(body).get("error", body)
                except (ValueError, AttributeError):
                    detail = body
                view.error = f"HTTP {r.status}: {str(detail)[:200]}"
                return view
            answer = await r.json()
    except TimeoutError:
        view.error = f"no answer within {timeout:g} s"
        return view
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        view.error = f"{type(exc).__name__}: {exc}"[:200]
        return view
    if not isinstance(answer, dict) or not isinstance(answer.get("sessions"), list):
        view.error = "malformed /status answer"
        return view
    view.answer = answer
    return view


@dataclass
class Snapshot:
    nodes: list[NodeView]
    records: list[SessionRecord]
    names: dict[str, str] = field(default_factory=dict)  # client id hex -> registry name


async def collect(store: Any, token: str, timeout: float,
                  names: dict[str, str] | None = None) -> Snapshot:
    """Nodes (with their /status, fetched concurrently) and session records."""
    registered = await store.list_nodes()
    async with aiohttp.ClientSession() as http:
        nodes, records = await asyncio.gather(
            asyncio.gather(*(fetch_node(http, n, token, timeout) for n in registered)),
            all_records(store))
    return Snapshot(list(nodes), records, names or {})


def _held(snap: Snapshot) -> dict[bytes, tuple[NodeView, dict[str, Any]]]:
    """Session id -> (a node that holds it, its /status entry), ACTIVE bindings first."""
    out: dict[bytes, tuple[NodeView, dict[str, Any]]] = {}
    for node in snap.nodes:
        for s in (node.answer or {}).get("sessions", []):
            try:
                sid = bytes.fromhex(s["session_id"])
            except (KeyError, ValueError, TypeError):
                continue
            if sid not in out or out[sid][1].get("binding") == "pending":
                out[sid] = (node, s)  # an ACTIVE binding over a PENDING one
    return out


def session_rows(snap: Snapshot) -> list[dict[str, Any]]:
    """One row per session record, joined with the node that holds its binding."""
    held = _held(snap)
    rows = []
    for r in sorted(snap.records, key=lambda r: r.created_ms):
        node_view, live = held.get(r.session_id, (None, None))
        if live is not None and live.get("epoch") != r.epoch:
            live = None  # a binding the store has moved on from: the node's view is stale
        owner = wire.node_name(r.node) if r.node else ""
        last_key = r.last_reattach_ms or r.created_ms
        rows.append({
            "session_id": r.session_id.hex(),
            "short_id": short_id(r.session_id),
            "client": snap.names.get(r.client_id) or r.client_id[:16],
            "client_id": r.client_id,
            "state": (live or {}).get("state", r.state.name) if not r.terminated else r.state.name,
            "version": r.version,
            "epoch": r.epoch,
            "node": owner,
            "node_instance": r.node,
            "node_answering": node_view.answering if node_view is not None else
            any(n.name == owner and n.answering for n in snap.nodes),
            "endpoint": live["endpoint"] if live else None,
            "transport": live["transport"] if live else (r.kind.name.lower() if r.kind else None),
            "upstream": r.upstream,
            "inner_addresses": live.get("inner_addresses", []) if live else [],
            "rx_bytes": live["rx_bytes"] if live else None,
            "tx_bytes": live["tx_bytes"] if live else None,
            "rx_packets": live["rx_packets"] if live else None,
            "tx_packets": live["tx_packets"] if live else None,
            "idle_s": live["last_packet_age_s"] if live else None,
            "last_handshake_age_s": max(0, r.server_ms - last_key) / 1000 if last_key else None,
            "uptime_s": max(0, r.server_ms - r.created_ms) / 1000 if r.created_ms else None,
            "ttl_left_s": r.remaining_ms / 1000,
            "last_store_write_age_s": r.idle_ms / 1000,
            "terminate_reason": r.terminate_reason.name if r.terminate_reason else None,
        })
    return rows


@dataclass
class Filters:
    client: str = ""
    node: str = ""
    states: tuple[str, ...] = ()
    session: bytes | None = None

    def keep(self, row: dict[str, Any]) -> bool:
        if self.session is not None and row["session_id"] != self.session.hex():
            return False
        if self.client and self.client not in (row["client"], row["client_id"]) and not (
                len(self.client) >= 8 and row["client_id"].startswith(self.client.lower())):
            return False
        if self.node and self.node not in (row["node"], row["node_instance"]):
            return False
        if self.states:
            return row["state"] in self.states
        # Tombstones only when asked for (--state TERMINATED) or named.
        return row["state"] != SessionState.TERMINATED.name or self.session is not None


def parse_states(text: str) -> tuple[str, ...]:
    out = []
    for item in (s.strip().upper() for s in text.split(",") if s.strip()):
        if item not in SessionState.__members__:
            raise StatusError(f"unknown state {item!r}: one of "
                              f"{', '.join(s.name for s in SessionState)}")
        out.append(item)
    return tuple(out)


def view(snap: Snapshot, filters: Filters) -> dict[str, Any]:
    """The JSON view: nodes (filtered by --node) and sessions (by every filter)."""
    nodes = [n.as_dict() for n in snap.nodes
             if not filters.node or filters.node in (n.name, n.instance)]
    return {"nodes": nodes, "sessions": [r for r in session_rows(snap) if filters.keep(r)]}


# ---- text ---------------------------------------------------------------------------------


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    parts = [(s // 86400, "d"), (s % 86400 // 3600, "h"), (s % 3600 // 60, "m"), (s % 60, "s")]
    shown = [f"{v} {u}" for v, u in parts if v][:2]
    return " ".join(shown)


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    return f"{n} B"


def render(doc: dict[str, Any], out: Any = sys.stdout) -> None:
    """The text view, as ``wg show`` lays out an interface and its peers."""
    for n in doc["nodes"]:
        if n["answering"]:
            health = "ready" if n["ready"] else f"NOT READY ({n['store_error'] or 'store down'})"
            lat = n["store_latency_ms"]
            store = f"store {lat:.2f} ms" if lat is not None else "store latency unknown"
            print(f"node: {n['node']}  ({n['instance']})  admin {n['admin']}  {health}  {store}",
                  file=out)
            states = ", ".join(f"{k} {v}" for k, v in n["sessions_by_state"].items()) or "none"
            print(f"  sessions: {states}", file=out)
        else:
            print(f"node: {n['node']}  admin {n['admin'] or '-'}  NOT ANSWERING: {n['error']}",
                  file=out)
    if not doc["nodes"]:
        print("no node registered in the store", file=out)
    for r in doc["sessions"]:
        print(file=out)
        print(f"session: {r['short_id']}  client {r['client']}", file=out)
        node = r["node"] or "-"
        if r["node"] and not r["node_answering"]:
            node += " (not answering)"
        print(f"  state: {r['state']}  version {r['version']}  epoch {r['epoch']}  node {node}",
              file=out)
        if r["terminate_reason"]:
            print(f"  ended: {r['terminate_reason']}", file=out)
        if r["endpoint"]:
            print(f"  endpoint: {r['transport']} {r['endpoint']}", file=out)
        if r["inner_addresses"]:
            print(f"  inner addresses: {', '.join(r['inner_addresses'])}", file=out)
        if r["rx_bytes"] is not None:
            print(f"  transfer: {_bytes(r['rx_bytes'])} received, {_bytes(r['tx_bytes'])} sent "
                  f"({r['rx_packets']} / {r['tx_packets']} packets)", file=out)
            print(f"  last packet: {_age(r['idle_s'])} ago", file=out)
        print(f"  last handshake: {_age(r['last_handshake_age_s'])} ago  uptime: "
              f"{_age(r['uptime_s'])}  ttl left: {_age(r['ttl_left_s'])}", file=out)
