"""``jvpn audit check``: run the history check (``history.check``) over recorded events.

Sources: JSON-lines files (each gateway's ``events.file``, each agent's
``records_file``), and/or a deployment's audit stream (``jvpn:audit``) read
whole, in pages. With a store, the history's last word on every session is
compared with the store's record. Exit code 0 when the history is correct, 1
when a violation was found (or a source could not be read), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from history.check import Report, StoreView, check
from history.records import BadRecord, BindingRecord, Record, parse
from jvpn.audit import PAGE, decode_entry
from store import AUDIT_STREAM

MAX_STREAM_ENTRIES = 10_000_000  # the stream is read whole, but not without end


class Loaded:
    """Records read from every source, and how many documents could not be read."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.bad = 0
        self.bad_examples: list[str] = []

    def add(self, doc: Any, source: str, seq: int) -> None:
        if not isinstance(doc, dict):
            return self._bad(f"{source}:{seq}: not a JSON object")
        try:
            rec = parse(doc, source, seq)
        except BadRecord as exc:
            return self._bad(f"{source}:{seq}: {exc}")
        if rec is not None:
            self.records.append(rec)

    def _bad(self, why: str) -> None:
        self.bad += 1
        if len(self.bad_examples) < 10:
            self.bad_examples.append(why)

    def add_lines(self, lines: Iterable[str], source: str) -> None:
        """JSON lines; a torn last line (a process killed while writing) is not an error."""
        pending: tuple[int, str] | None = None
        for seq, line in enumerate(lines):
            if pending is not None:
                self._bad(f"{source}:{pending[0]}: unreadable JSON line")
                pending = None
            line = line.strip()
            if not line:
                continue
            try:
                doc = json.loads(line)
            except ValueError:
                pending = (seq, line)
                continue
            self.add(doc, source, seq)


def load_files(paths: Iterable[str]) -> Loaded:
    loaded = Loaded()
    for p in paths:
        with open(p, encoding="utf-8", errors="replace") as f:
            loaded.add_lines(f, Path(p).name)
    return loaded


async def load_stream(r: Any, stream: str, loaded: Loaded,
                      limit: int = MAX_STREAM_ENTRIES) -> int:
    """Every entry of the audit stream, oldest first, in pages; returns how many."""
    lo, n = "-", 0
    while n < limit:
        entries = await r.xrange(stream, min=lo, max="+", count=PAGE)
        for eid, fields in entries:
            _, doc = decode_entry(fields)
            loaded.add(doc, stream, n)
            n += 1
            lo = f"({eid.decode() if isinstance(eid, bytes) else eid}"
        if len(entries) < PAGE:
            break
    return n


def sessions_of(records: Iterable[Record]) -> set[str]:
    """The sessions the node records speak of."""
    return {r.session_id for r in records if isinstance(r, BindingRecord) and r.session_id}


async def store_views(store: Any, sessions: Iterable[str]) -> dict[str, StoreView | None]:
    """Each session as the store holds it now (None: no record left)."""
    out: dict[str, StoreView | None] = {}
    for sid in sorted(sessions):
        rec = await store.get(bytes.fromhex(sid))
        out[sid] = None if rec is None else StoreView(rec.terminated, rec.epoch, rec.node)
    return out


async def cmd_audit_check(args: argparse.Namespace) -> int:
    """``jvpn audit check``."""
    loaded = load_files(args.files)
    store_view: dict[str, StoreView | None] | None = None
    if args.stream_too or not args.files:
        from jvpn.cli import _store

        store = _store(args)
        try:
            n = await load_stream(store.redis, args.stream, loaded)
            print(f"read {n} entries of {args.stream}", file=sys.stderr)
            if not args.no_store:
                store_view = await store_views(store, sessions_of(loaded.records))
        finally:
            await store.close()
    lag = int(args.max_release_lag * 1000) if args.max_release_lag is not None else None
    report = check(loaded.records, store_view, bad_records=loaded.bad, max_release_lag_ms=lag,
                   down=args.down)
    for why in loaded.bad_examples:
        print(f"unreadable record: {why}", file=sys.stderr)
    print(json.dumps(report.to_json(), indent=2) if args.json else report.summary())
    return 0 if report.ok else 1


def check_files(paths: Iterable[str], max_release_lag_ms: int | None = None,
                down: Iterable[str] = ()) -> Report:
    """The check over event and record files (what the chaos tests call)."""
    loaded = load_files(paths)
    return check(loaded.records, bad_records=loaded.bad, max_release_lag_ms=max_release_lag_ms,
                 down=down)


def add_check_parser(aus: Any, with_store: Any) -> None:
    g = with_store(aus.add_parser(
        "check", help="check the recorded history of binding decisions (at most one ACTIVE "
                      "binding per session, versions, explicit ends, agents never backwards)"))
    g.add_argument("files", nargs="*", metavar="FILE",
                   help="event files (gateways' events.file, agents' records_file); "
                        "none: the audit stream of --store-url")
    g.add_argument("--stream-too", action="store_true",
                   help="with FILEs: read the audit stream as well")
    g.add_argument("--stream", default=os.environ.get("JVPN_AUDIT_STREAM", AUDIT_STREAM),
                   help=f"stream key (default $JVPN_AUDIT_STREAM or {AUDIT_STREAM})")
    g.add_argument("--no-store", action="store_true",
                   help="do not compare the history's end with the store's records")
    g.add_argument("--max-release-lag", type=float, metavar="SECONDS",
                   help="a node holding a binding this long after the store ended it is a "
                        "violation (default: only never letting go is)")
    g.add_argument("--down", action="append", default=[], metavar="NODE",
                   help="a node whose last process died (killed, not restarted): what it "
                        "held ended with it (repeat)")
    g.add_argument("--json", action="store_true", help="the report as JSON")
    g.set_defaults(afn=cmd_audit_check)
