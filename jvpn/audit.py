"""``jvpn audit tail``: read the cluster-wide audit log (the ``jvpn:audit`` Redis stream).

Every gateway's ``RedisStreamSink`` XADDs one entry per event with two fields:
``action`` (the ECS ``event.action``) and ``event`` (the nested ECS document as
one compact JSON line). ``tail`` prints the last N entries (XREVRANGE, read
backwards in pages, then reversed) or those after ``--since``, and with
``--follow`` blocks on XREAD for new ones. Everything is bounded: pages,
blocking reads shorter than the socket timeout, a scan cap for filtered
searches, and an optional ``--for`` duration. Ctrl-C ends it quietly (exit
130); a store error is one line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any
from urllib.parse import urlsplit

from store import AUDIT_STREAM

DEFAULT_COUNT = 20
PAGE = 500  # entries per XRANGE/XREVRANGE/XREAD call
SCAN_LIMIT = 200_000  # entries a filtered backward search looks at, at most
BLOCK_MS = 1_000  # one XREAD BLOCK; shorter than the socket timeout (which adds to it)
SESSION_SHORT = 12  # hex digits of a session id shown per line
EXIT_INTERRUPTED = 130  # as a shell reports Ctrl-C

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_STREAM_ID = re.compile(r"^\d+(?:-\d+)?$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass
class TailOptions:
    """What to read and how to print it (one ``jvpn audit tail`` invocation)."""

    store_url: str
    stream: str = AUDIT_STREAM
    count: int | None = None  # None: DEFAULT_COUNT, or everything after ``since``
    since: str | None = None  # a stream id, "-", a ms timestamp or a duration ("10m")
    follow: bool = False
    follow_for: float | None = None  # stop following after this many seconds
    json: bool = False
    actions: Sequence[str] = ()
    session: str | None = None  # hex prefix of jvpn.session_id
    timeout_s: float = 2.0
    block_ms: int = BLOCK_MS
    clock: Callable[[], float] = field(default=time.time, repr=False)


# ---- decoding and formatting ---------------------------------------------------------------


def _text(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def decode_entry(fields: dict[Any, Any]) -> tuple[str, dict[str, Any]]:
    """A stream entry as (raw JSON line, document); tolerates entries not written by the sink."""
    raw = fields.get(b"event", fields.get("event"))
    if raw is not None:
        line = _text(raw)
        try:
            doc = json.loads(line)
            if isinstance(doc, dict):
                return line, doc
        except ValueError:
            pass
        doc = {"message": line}
    else:  # e.g. SessionStore.xadd_event(): flat fields, values JSON-encoded or plain
        doc = {}
        for k, v in fields.items():
            text = _text(v)
            try:
                doc[_text(k)] = json.loads(text)
            except ValueError:
                doc[_text(k)] = text
    action = fields.get(b"action", fields.get("action"))
    if action is not None and get_field(doc, "event.action") is None:
        doc["event.action"] = _text(action)  # get_field() reads dotted keys left flat
    return json.dumps(doc, separators=(",", ":"), default=str), doc


def get_field(doc: dict[str, Any], path: str) -> Any:
    """A dotted ECS field from a nested document (or a dotted key left flat)."""
    node: Any = doc
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return doc.get(path)
        node = node[part]
    return node


def format_line(doc: dict[str, Any]) -> str:
    """One readable line: time node action outcome reason session from->to (version epoch)."""
    action = get_field(doc, "event.action") or "-"
    if action == "security_event":
        action = f"security:{get_field(doc, 'jvpn.security_kind') or '?'}"
    sid = get_field(doc, "jvpn.session_id")
    parts = [
        str(get_field(doc, "@timestamp") or "-"),
        f"{get_field(doc, 'service.node.name') or '-':<12}",
        f"{action:<18}",
        f"{get_field(doc, 'event.outcome') or '-':<8}",
        f"{get_field(doc, 'event.reason') or '-':<22}",
        str(sid)[:SESSION_SHORT] if sid else "-" * SESSION_SHORT,
    ]
    for a, b in (("jvpn.from_state", "jvpn.to_state"),
                 ("jvpn.from_transport", "jvpn.to_transport")):
        frm, to = get_field(doc, a), get_field(doc, b)
        if frm is not None or to is not None:
            parts.append(f"{frm or '-'} \u2192 {to or '-'}")
            break
    else:
        via = get_field(doc, "jvpn.transport")
        if via:
            parts.append(f"via {via}")
    extra = []
    for key, label in (("jvpn.state_version", "v"), ("jvpn.epoch", "e")):
        value = get_field(doc, key)
        if value is not None:
            extra.append(f"{label}{value}")
    node = get_field(doc, "jvpn.previous_node")
    if node:
        extra.append(f"from node {node}")
    ip = get_field(doc, "source.ip")
    if ip:
        extra.append(f"src {ip}")
    if extra:
        parts.append("(" + " ".join(extra) + ")")
    return " ".join(parts)


def parse_since(value: str, now_s: float | None = None) -> str:
    """``-`` (the beginning), a stream id or ms timestamp, or a duration ago ("90s", "10m")."""
    value = value.strip()
    if value == "-" or _STREAM_ID.match(value):
        return value
    m = _DURATION.match(value)
    if m:
        now = time.time() if now_s is None else now_s
        return str(max(0, int((now - float(m.group(1)) * _UNIT_S[m.group(2)]) * 1000)))
    raise ValueError(f"--since {value!r}: expected -, a stream id (1700000000000-0), "
                     "a ms timestamp, or a duration such as 90s, 10m, 2h, 1d")


def _where(url: str) -> str:
    """The store's address without credentials."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or '?'}:{parts.port or 6379}{parts.path or ''}"


# ---- reading -------------------------------------------------------------------------------


class _Printer:
    def __init__(self, opts: TailOptions, out: IO[str]) -> None:
        self.opts = opts
        self.out = out
        self.actions = {a.lower() for a in opts.actions}
        self.session = opts.session.lower() if opts.session else None
        self.printed = 0

    def matches(self, fields: dict[Any, Any]) -> tuple[str, dict[str, Any]] | None:
        if self.actions:
            action = fields.get(b"action", fields.get("action"))
            if action is None or _text(action).lower() not in self.actions:
                return None
        line, doc = decode_entry(fields)
        if self.session is not None:
            sid = get_field(doc, "jvpn.session_id")
            if not isinstance(sid, str) or not sid.lower().startswith(self.session):
                return None
        return line, doc

    def emit(self, decoded: tuple[str, dict[str, Any]]) -> None:
        line, doc = decoded
        self.out.write((line if self.opts.json else format_line(doc)) + "\n")
        self.printed += 1


async def _history(r: Any, opts: TailOptions, p: _Printer, err: IO[str]) -> str:
    """Print the history asked for; returns the id to follow from."""
    stream = opts.stream
    if opts.since is not None:
        start = parse_since(opts.since, opts.clock())
        last = "0-0" if start == "-" else start
        lo = start if start == "-" or not _STREAM_ID.match(opts.since.strip()) else f"({start}"
        limit = opts.count
        while limit is None or p.printed < limit:
            entries = await r.xrange(stream, min=lo, max="+", count=PAGE)
            for eid, fields in entries:
                if limit is not None and p.printed >= limit:
                    return await _newest(r, stream)  # --follow: only what comes next
                last = _text(eid)
                decoded = p.matches(fields)
                if decoded is not None:
                    p.emit(decoded)
            if len(entries) < PAGE:
                break
            lo = f"({last}"
        return last
    want = DEFAULT_COUNT if opts.count is None else opts.count
    picked: list[tuple[str, dict[str, Any]]] = []
    newest: str | None = None
    hi, scanned = "+", 0
    while len(picked) < want:
        page = PAGE if (p.actions or p.session) else min(PAGE, want - len(picked))
        entries = await r.xrevrange(stream, max=hi, min="-", count=page)
        if newest is None:
            newest = _text(entries[0][0]) if entries else "0-0"
        for _, fields in entries:
            decoded = p.matches(fields)
            if decoded is not None and len(picked) < want:
                picked.append(decoded)
        scanned += len(entries)
        if len(entries) < page:
            break
        if scanned >= SCAN_LIMIT:
            err.write(f"jvpn audit tail: searched the newest {scanned} entries only\n")
            break
        hi = f"({_text(entries[-1][0])}"
    for decoded in reversed(picked):
        p.emit(decoded)
    return await _newest(r, stream) if newest is None else newest  # None: count 0


async def _newest(r: Any, stream: str) -> str:
    """The id of the newest entry, "0-0" if there is none (XREAD after it sees only new ones)."""
    entries = await r.xrevrange(stream, max="+", min="-", count=1)
    return _text(entries[0][0]) if entries else "0-0"


async def _follow(r: Any, opts: TailOptions, p: _Printer, last: str,
                  stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    deadline = None if opts.follow_for is None else loop.time() + opts.follow_for
    while not stop.is_set():
        block = opts.block_ms
        if deadline is not None:
            left = deadline - loop.time()
            if left <= 0:
                return
            block = max(1, min(block, int(left * 1000)))
        reply = await r.xread({opts.stream: last}, count=PAGE, block=block)
        for _, entries in reply or ():
            for eid, fields in entries:
                last = _text(eid)
                decoded = p.matches(fields)
                if decoded is not None:
                    p.emit(decoded)
        p.out.flush()


async def tail(opts: TailOptions, out: IO[str] | None = None, err: IO[str] | None = None,
               stop: asyncio.Event | None = None) -> int:
    """Print audit events as ``opts`` asks; the exit code (0, 1 on a store error, 130 on Ctrl-C).

    Setting ``stop`` ends ``--follow`` within one blocking read (130); cancelling the
    task ends it at once (CancelledError).
    """
    import redis.asyncio as aioredis
    from redis import exceptions as rexc

    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    r = aioredis.Redis.from_url(
        opts.store_url, socket_connect_timeout=opts.timeout_s,
        socket_timeout=opts.timeout_s + opts.block_ms / 1000, decode_responses=False)
    p = _Printer(opts, out)
    stop = asyncio.Event() if stop is None else stop
    try:
        last = await _history(r, opts, p, err)
        out.flush()
        if opts.follow:
            await _follow(r, opts, p, last, stop)
        out.flush()
        return EXIT_INTERRUPTED if stop.is_set() else 0
    except BrokenPipeError:  # `| head`: the reader is gone, not an error
        _silence_stdout()
        return 0
    except (rexc.RedisError, OSError) as exc:
        down = isinstance(exc, rexc.ConnectionError | rexc.TimeoutError | OSError)
        err.write(f"jvpn audit tail: store {'unreachable' if down else 'error'} at "
                  f"{_where(opts.store_url)} (stream {opts.stream}): "
                  f"{type(exc).__name__}: {exc}\n")
        return 1
    finally:
        try:
            await asyncio.wait_for(r.aclose(), opts.timeout_s)
        except (Exception, asyncio.CancelledError):  # closing after an error or Ctrl-C
            pass


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not complain."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


# ---- command line --------------------------------------------------------------------------


async def cmd_audit_tail(args: argparse.Namespace) -> int:
    """``jvpn audit tail``."""
    opts = TailOptions(
        store_url=args.store_url, stream=args.stream, count=args.count, since=args.since,
        follow=args.follow, follow_for=args.follow_for, json=args.json,
        actions=tuple(args.action or ()), session=args.session, timeout_s=args.timeout)
    # Ctrl-C both cancels the task (at once) and sets ``stop``: on Python 3.11 a cancel that
    # lands while redis-py sends a command is swallowed by asyncio.wait_for (fixed in 3.12),
    # and the follow loop must still end.
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    stop = asyncio.Event()

    def interrupt() -> None:
        stop.set()
        if task is not None:
            task.cancel()

    handled = False
    try:
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # e.g. under nohup: leave it
            loop.add_signal_handler(signal.SIGINT, interrupt)
            handled = True
    except (NotImplementedError, RuntimeError, ValueError):  # no signals here (not main thread)
        pass
    try:
        return await tail(opts, stop=stop)
    except asyncio.CancelledError:
        sys.stdout.flush()
        return EXIT_INTERRUPTED
    finally:
        if handled:
            loop.remove_signal_handler(signal.SIGINT)


def _nonneg_int(text: str) -> int:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return n


def _positive_float(text: str) -> float:
    x = float(text)
    if x <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return x


def _hex_prefix(text: str) -> str:
    if not re.fullmatch(r"[0-9a-fA-F]{1,64}", text):
        raise argparse.ArgumentTypeError("expected hex digits (a session id or its prefix)")
    return text.lower()


def _since(text: str) -> str:
    try:
        parse_since(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_audit_parser(sub: Any, with_store: Callable[[argparse.ArgumentParser],
                                                    argparse.ArgumentParser]) -> None:
    """Register ``jvpn audit tail`` and ``jvpn audit check`` on the top-level subparsers."""
    au = sub.add_parser("audit", help="the cluster-wide audit log (Redis stream)")
    aus = au.add_subparsers(dest="sub", required=True, metavar="ACTION")
    g = with_store(aus.add_parser(
        "tail", help="print recent audit events; --follow for new ones (Ctrl-C to stop)"))
    g.add_argument("-n", "--count", type=_nonneg_int, default=None,
                   help=f"how many events (default {DEFAULT_COUNT}; with --since: all)")
    g.add_argument("--since", type=_since, metavar="ID|-|DURATION",
                   help="events after this stream id or ms timestamp, - for the oldest kept, "
                        "or a duration ago such as 10m")
    g.add_argument("-f", "--follow", action="store_true", help="then wait for new events")
    g.add_argument("--for", dest="follow_for", type=_positive_float, metavar="SECONDS",
                   help="with --follow: stop after this many seconds")
    g.add_argument("--json", action="store_true", help="print each event's raw ECS JSON line")
    g.add_argument("--action", action="append", metavar="A",
                   help="only this event.action, e.g. state_change (repeatable)")
    g.add_argument("--session", type=_hex_prefix, metavar="HEX",
                   help="only this session (hex id or a prefix of it)")
    g.add_argument("--stream", default=os.environ.get("JVPN_AUDIT_STREAM", AUDIT_STREAM),
                   help=f"stream key (default $JVPN_AUDIT_STREAM or {AUDIT_STREAM})")
    g.set_defaults(afn=cmd_audit_tail)
    from jvpn.check import add_check_parser

    add_check_parser(aus, with_store)
