"""``jvpn``: administration (keys, KEK, client registry, sessions, audit)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

from session.keys import KekRing
from session.noise import generate_keypair, public_key
from session.reasons import TerminateReason
from session.storeops import DEFAULT_MAX_AGE_S, DEFAULT_MAX_SESSIONS
from settings import decode_key, read_key_setting
from settings.cli import add_log_format, configure_logging, finish_parser, help_requested

DEFAULT_STORE = "redis://127.0.0.1:6379/0"


def _store(args: argparse.Namespace, registry: bool = False):  # type: ignore[no-untyped-def]
    """The store client; with ``registry``, keyed to MAC and check client registry entries."""
    from store.api import SessionStore, StoreConfig

    keys = _load_keks(args).registry_keys() if registry else (None,)
    cfg = StoreConfig(socket_timeout_s=args.timeout, connect_timeout_s=args.timeout,
                      tls_ca_file=args.tls_ca_file)
    store = SessionStore.from_url(args.store_url, cfg, registry_key=keys[0])
    if registry:
        store.previous_registry_keys = tuple(k for k in keys[1:] if k is not None)
        store.on_registry_refused = lambda pk, why: print(
            f"jvpn: client entry {pk.hex()} refused: {why}", file=sys.stderr)
    return store


def _load_keks(args: argparse.Namespace) -> KekRing:
    """The cluster KEK, which MACs the registry, and the previous ones of a rotation (they
    verify entries): --kek-file ($JVPN_KEK_FILE) and --kek-previous-file, else the gateway
    config's kek / kek_file and kek_previous / kek_previous_files (--config,
    $JVPN_GATEWAY_CONFIG)."""
    previous: list[bytes] = []
    if args.kek_file:
        kek = read_key_setting("", args.kek_file, "jvpn", "--kek-file")
        for path in args.kek_previous_file:
            prev = read_key_setting("", path, "jvpn", "--kek-previous-file")
            previous += [prev] if prev is not None else []
    else:
        from gateway.config import load_gateway_config, load_previous_keks
        from gateway.config import load_kek as gateway_kek

        cfg = load_gateway_config(args.config or None)
        kek, previous = gateway_kek(cfg), load_previous_keks(cfg)
    if kek is None:
        raise ValueError("the client registry is MAC'd with the cluster KEK: give --kek-file "
                         "(or $JVPN_KEK_FILE), or a gateway config with kek_file (--config)")
    return KekRing(kek, previous)


def _write_secret(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fp:
        fp.write(text + "\n")


def _read_key_arg(value: str) -> bytes:
    """A key given inline (hex/base64) or as a file path."""
    if os.path.exists(value):
        with open(value, encoding="ascii") as fp:
            value = fp.read()
    return decode_key(value.strip())


# ---- keys ----------------------------------------------------------------------------------


def cmd_keys_gen(args: argparse.Namespace) -> int:
    priv, pub = generate_keypair()
    if args.out:
        _write_secret(args.out, priv.hex())
        print(f"private key written to {args.out} (mode 600)", file=sys.stderr)
    else:
        print(f"private {priv.hex()}")
    print(f"public  {pub.hex()}" if not args.out else pub.hex())
    return 0


def cmd_keys_pub(args: argparse.Namespace) -> int:
    print(public_key(_read_key_arg(args.private)).hex())
    return 0


def cmd_kek_gen(args: argparse.Namespace) -> int:
    kek = os.urandom(32).hex()
    if args.out:
        _write_secret(args.out, kek)
        print(f"key-encryption key written to {args.out} (mode 600)", file=sys.stderr)
    else:
        print(kek)
    return 0


# ---- clients -------------------------------------------------------------------------------


def _policy_dict(p: Any) -> dict[str, Any]:
    return {"public_key": p.public_key.hex(), "name": p.name, "ttl_s": p.ttl_s,
            "max_age_s": p.max_age_s, "max_sessions": p.max_sessions,
            "reattach_rate": p.reattach_rate, "transports": list(p.transports),
            "upstreams": list(p.upstreams), "prefixes": list(p.prefixes),
            "created_ms": p.created_ms}


async def cmd_clients_add(args: argparse.Namespace) -> int:
    from store.policy import ClientPolicy

    pub = _read_key_arg(args.public_key)
    policy = ClientPolicy(pub, name=args.name or "", ttl_s=args.ttl, reattach_rate=args.rate,
                          max_age_s=args.max_age, max_sessions=args.max_sessions,
                          transports=tuple(args.transports.split(",")),
                          upstreams=tuple(args.upstream or ()),
                          prefixes=tuple(p for p in (args.prefixes or "").split(",") if p))
    store = _store(args, registry=True)
    try:
        saved = await store.add_client(policy)
    finally:
        await store.close()
    print(json.dumps(_policy_dict(saved)))
    return 0


async def cmd_clients_list(args: argparse.Namespace) -> int:
    store = _store(args, registry=True)
    try:
        clients = await store.list_clients()
    finally:
        await store.close()
    for p in clients:
        print(json.dumps(_policy_dict(p)))
    return 0


async def cmd_clients_remac(args: argparse.Namespace) -> int:
    store = _store(args, registry=True)
    try:
        rewritten, refused = await store.remac_clients()
    finally:
        await store.close()
    print(f"{rewritten} entries MAC'd under the current KEK, {refused} refused (bad MAC under "
          "every KEK given: left as they are)")
    return 0 if refused == 0 else 1


async def cmd_clients_remove(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        ok, ended = await store.revoke_client(_read_key_arg(args.public_key))
    finally:
        await store.close()
    print(f"removed, {len(ended)} live sessions ended" if ok else
          f"not registered ({len(ended)} live sessions ended)")
    return 0 if ok else 1


# ---- sessions ------------------------------------------------------------------------------


def _record_dict(r: Any) -> dict[str, Any]:
    return {
        "session_id": r.session_id.hex(), "state": r.state.name, "version": r.version,
        "epoch": r.epoch, "node": r.node, "transport": r.kind.name.lower() if r.kind else None,
        "upstream": r.upstream, "client": r.client_id[:16], "ttl_s": r.ttl_ms / 1000,
        "remaining_s": r.remaining_ms / 1000,
        # The store's last write (birth, reattach or refresh), not traffic: `jvpn status`
        # shows idle_s, the time since the last packet, which only the node knows.
        "last_store_write_age_s": r.idle_ms / 1000,
        "terminate_reason": r.terminate_reason.name if r.terminate_reason else None,
    }


async def _resolve(store: Any, prefix: str) -> bytes:
    """A full session id from a hex prefix (the short id `jvpn status` shows, or more)."""
    from jvpn.status import all_records, resolve_prefix

    text = prefix.strip().lower()
    if len(text) == 32:
        try:
            return bytes.fromhex(text)
        except ValueError:
            pass
    return resolve_prefix(text, [r.session_id for r in await all_records(store)])


async def cmd_sessions_list(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        page = await store.list_sessions(limit=args.limit)
    finally:
        await store.close()
    rows = sorted(page.sessions, key=lambda r: r.created_ms)
    if args.json:
        for r in rows:
            print(json.dumps(_record_dict(r)))
        return 0
    print(f"{'SESSION':34} {'STATE':11} {'VER':>5} {'EPOCH':>5} {'NODE':16} {'TRANSPORT':9} {'LEFT_S':>8}")
    for r in rows:
        d = _record_dict(r)
        print(f"{d['session_id']:34} {d['state']:11} {d['version']:>5} {d['epoch']:>5} "
              f"{d['node'][:16]:16} {d['transport'] or '-':9} {d['remaining_s']:>8.1f}")
    return 0


async def cmd_sessions_show(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        sid = await _resolve(store, args.session_id)
        rec = await store.get(sid)
    finally:
        await store.close()
    if rec is None:
        print(f"no session {args.session_id}", file=sys.stderr)
        return 1
    print(json.dumps(_record_dict(rec), indent=2))
    return 0


async def _terminate_one(store: Any, sid: bytes, reason: TerminateReason) -> Any:
    rec = await store.get(sid)
    res = await store.terminate(sid, reason)
    if res.ok and not res.already:
        # Wake the owning node: it re-reads the record and closes the client (authenticated).
        await store.publish_binding_change(sid, "-", 0)
        if rec is not None and rec.client_id:
            await store.release_slot(rec.client_id, sid)  # its place in the client's quota
    return res


async def _client_keys(store: Any, client: str) -> list[str]:
    """The registered key(s) a --client value names: a registry name, or a key (hex)."""
    text = client.strip()
    try:
        if len(decode_key(text)) == 32:
            return [decode_key(text).hex()]
    except ValueError:
        pass
    keys = [p.public_key.hex() for p in await store.list_clients() if p.name == text]
    if not keys:
        raise ValueError(f"no registered client is named {text!r} (`jvpn clients list`)")
    if len(keys) > 1:
        raise ValueError(f"{len(keys)} registered keys are named {text!r}: give the public key "
                         f"({', '.join(k[:16] for k in keys)})")
    return keys


async def cmd_sessions_terminate(args: argparse.Namespace) -> int:
    from jvpn.status import all_records

    reason = TerminateReason[args.reason.upper()]
    if (args.session_id is None) == (args.client is None):
        raise ValueError("give a session id (or prefix) or --client NAME, not both")
    if args.session_id is not None:
        store = _store(args)
        try:
            res = await _terminate_one(store, await _resolve(store, args.session_id), reason)
        finally:
            await store.close()
        print(json.dumps({"status": res.status.name, "version": res.version,
                          "reason": res.terminate_reason.name if res.terminate_reason else None}))
        return 0 if res.ok else 1
    store = _store(args, registry=True)
    try:
        keys = set(await _client_keys(store, args.client))
        ended: list[tuple[bytes, Any]] = []
        failed: list[tuple[bytes, Any]] = []
        for rec in await all_records(store):
            if rec.client_id not in keys or rec.terminated:
                continue
            res = await _terminate_one(store, rec.session_id, reason)
            (ended if res.ok else failed).append((rec.session_id, res))
    finally:
        await store.close()
    for sid, res in ended + failed:
        print(json.dumps({"session_id": sid.hex(), "status": res.status.name,
                          "version": res.version}))
    print(f"{len(ended)} sessions of {args.client} ended, {len(failed)} not "
          "(a session born meanwhile is not ended: `jvpn clients remove` revokes the key)",
          file=sys.stderr)
    return 0 if not failed else 1


# ---- status --------------------------------------------------------------------------------


def _status_token(args: argparse.Namespace) -> str:
    if args.token_file:
        with open(args.token_file, encoding="utf-8") as fp:
            return fp.read().strip()
    return os.environ.get("JVPN_STATUS_TOKEN", "")


async def cmd_status(args: argparse.Namespace) -> int:
    from jvpn import status as st

    filters = st.Filters(client=args.client or "", node=args.node or "",
                         states=st.parse_states(args.state or ""))
    kek_given = bool(args.kek_file or args.config or os.environ.get("JVPN_GATEWAY_CONFIG"))
    store = _store(args, registry=kek_given)
    token = _status_token(args)
    rounds = args.count if args.watch else 1
    try:
        if args.session_id:
            filters.session = await _resolve(store, args.session_id)
        names: dict[str, str] = {}
        if kek_given:
            names = {p.public_key.hex(): p.name for p in await store.list_clients() if p.name}
        elif filters.client and not (len(filters.client) >= 8 and all(
                c in "0123456789abcdef" for c in filters.client.lower())):
            raise st.StatusError("--client NAME reads names from the registry, MAC'd under the "
                                 "KEK: give --kek-file (or --config), or a client id of 8+ hex "
                                 "digits")
        for i in range(rounds or 1_000_000_000):
            snap = await st.collect(store, token, args.node_timeout, names)
            doc = st.view(snap, filters)
            if args.json:
                print(json.dumps(doc), flush=True)
            else:
                if args.watch and sys.stdout.isatty():
                    print("\x1b[H\x1b[2J", end="")
                st.render(doc)
                sys.stdout.flush()
            if not args.watch or i + 1 == rounds:
                break
            await asyncio.sleep(args.watch)
    finally:
        await store.close()
    return 0


# ---- parser --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jvpn", description="Jumping VPN administration: keys, KEK, the client registry, "
        "sessions, status, the audit log. `jvpn COMMAND --help` for each.",
        epilog="The demo, benchmarks and local cluster launcher are lab instruments: jvpn-lab.")
    add_log_format(p)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def with_store(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--store-url", default=os.environ.get("JVPN_STORE_URL", DEFAULT_STORE),
                        help=f"Redis URL (default $JVPN_STORE_URL or {DEFAULT_STORE})")
        sp.add_argument("--timeout", type=float, default=2.0, help="store timeout in seconds")
        sp.add_argument("--tls-ca-file", default=os.environ.get("JVPN_STORE_TLS_CA_FILE", ""),
                        help="CA bundle to verify a rediss:// store against "
                             "(default $JVPN_STORE_TLS_CA_FILE, else the system's)")
        return sp

    def with_kek(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--kek-file", default=os.environ.get("JVPN_KEK_FILE", ""),
                        help="the cluster KEK (MACs registry entries; default $JVPN_KEK_FILE, "
                             "else the gateway config's)")
        sp.add_argument("--kek-previous-file", action="append", default=[],
                        help="with --kek-file: a previous KEK of a rotation, whose registry "
                             "entries are still accepted (repeat)")
        sp.add_argument("--config", default="", help="gateway config to take kek/kek_file "
                        "(and kek_previous/kek_previous_files) from (default $JVPN_GATEWAY_CONFIG)")
        return sp

    keys = sub.add_parser("keys", help="static X25519 key pairs (gateway cluster, clients)")
    ks = keys.add_subparsers(dest="sub", required=True, metavar="ACTION")
    g = ks.add_parser("gen", help="generate a key pair")
    g.add_argument("--out", help="write the private key to this new file (mode 600)")
    g.set_defaults(fn=cmd_keys_gen)
    g = ks.add_parser("pub", help="print the public key of a private key (inline or file)")
    g.add_argument("private", help="the private key (hex or base64) or a file holding it")
    g.set_defaults(fn=cmd_keys_pub)

    kek = sub.add_parser("kek", help="cluster key-encryption key")
    kk = kek.add_subparsers(dest="sub", required=True, metavar="ACTION")
    g = kk.add_parser("gen", help="generate a 32-byte KEK")
    g.add_argument("--out", help="write it to this new file (mode 600)")
    g.set_defaults(fn=cmd_kek_gen)

    cl = sub.add_parser("clients", help="the client registry (allowlist with policies)")
    cs = cl.add_subparsers(dest="sub", required=True, metavar="ACTION")
    g = with_kek(with_store(cs.add_parser("add", help="register (or replace) a client public key")))
    g.add_argument("public_key", help="hex/base64 key or a file holding it")
    g.add_argument("--upstream", action="append", help="UDP-forward mode: allowed host:port "
                   "(repeat)")
    g.add_argument("--prefixes", help="L3 mode: destination prefixes its sessions may reach, "
                   "comma-separated (also its agent's routes; 0.0.0.0/0,::/0 = full tunnel)")
    g.add_argument("--name", help="a label")
    g.add_argument("--ttl", type=float, default=300.0, help="session TTL when detached, seconds")
    g.add_argument("--max-age", type=float, default=DEFAULT_MAX_AGE_S,
                   help="maximum session age, seconds, however often it reattaches "
                        "(default 86400; 0.001 to 31536000)")
    g.add_argument("--max-sessions", type=int, default=DEFAULT_MAX_SESSIONS,
                   help="live sessions the key may hold at once (default 0: no quota)")
    g.add_argument("--rate", type=int, default=30, help="reattach attempts per minute")
    g.add_argument("--transports", default="udp,tcp,quic", help="allowed transports")
    g.set_defaults(afn=cmd_clients_add)
    g = with_kek(with_store(cs.add_parser("list", help="list registered clients (JSON lines); "
                                                       "entries failing their MAC on stderr")))
    g.set_defaults(afn=cmd_clients_list)
    g = with_kek(with_store(cs.add_parser(
        "remac", help="KEK rotation: re-MAC every registry entry under the current KEK "
                      "(entries read with the previous KEKs too)")))
    g.set_defaults(afn=cmd_clients_remac)
    g = with_store(cs.add_parser("remove", help="remove a client key and end its live sessions"))
    g.add_argument("public_key", help="hex/base64 key or a file holding it")
    g.set_defaults(afn=cmd_clients_remove)

    se = sub.add_parser("sessions", help="inspect and terminate sessions")
    ss = se.add_subparsers(dest="sub", required=True, metavar="ACTION")
    g = with_store(ss.add_parser("list", help="list sessions (live and tombstones)"))
    g.add_argument("--limit", type=int, default=100, help="at most this many records (default 100)")
    g.add_argument("--json", action="store_true", help="one JSON object per line")
    g.set_defaults(afn=cmd_sessions_list)
    g = with_store(ss.add_parser("show", help="one session's record"))
    g.add_argument("session_id", help="session id, or a prefix of it (the short id jvpn status shows)")
    g.set_defaults(afn=cmd_sessions_show)
    g = with_kek(with_store(ss.add_parser(
        "terminate", help="terminate a session, or every session of a client (tombstones; each "
        "owning node closes its client with an authenticated CLOSE)")))
    g.add_argument("session_id", nargs="?", help="session id or a prefix of it")
    g.add_argument("--client", metavar="NAME", help="end every live session of this client "
                   "(its registry name, or its public key); needs the KEK to read the registry")
    g.add_argument("--reason", default="ADMIN", choices=[r.name.lower() for r in TerminateReason]
                   + [r.name for r in TerminateReason], help="recorded in the tombstone "
                   "(default ADMIN)")
    g.set_defaults(afn=cmd_sessions_terminate)

    g = with_kek(with_store(sub.add_parser(
        "status", help="every node and session at a glance: endpoint, state, bytes and "
        "packets, last packet and handshake, uptime, TTL left; nodes by health",
        description="Nodes come from their registration in the store (a registered node that "
        "does not answer is shown as such); sessions from the store, joined with what the node "
        "holding each one reports on its admin port's /status. Client names need the KEK "
        "(--kek-file or --config); without it clients are shown by key.")))
    g.add_argument("session_id", nargs="?", help="only this session (id or a prefix of it)")
    g.add_argument("--client", help="only this client's sessions (name, or key of 8+ hex digits)")
    g.add_argument("--node", help="only this node's sessions and status (node id)")
    g.add_argument("--state", help="only sessions in these states (comma-separated, e.g. "
                   "ATTACHED,RECOVERING; TERMINATED lists tombstones, hidden otherwise)")
    g.add_argument("--json", action="store_true", help="one JSON document {nodes, sessions} "
                   "per round")
    g.add_argument("--watch", type=float, metavar="SECONDS", help="redraw every SECONDS")
    g.add_argument("--count", type=int, default=0, help="with --watch: stop after this many "
                   "rounds (default 0: until interrupted)")
    g.add_argument("--node-timeout", type=float, default=2.0, help="seconds to wait for each "
                   "node's /status (default 2)")
    g.add_argument("--token-file", default=os.environ.get("JVPN_STATUS_TOKEN_FILE", ""),
                   help="file holding the nodes' status token (default $JVPN_STATUS_TOKEN_FILE, "
                   "else $JVPN_STATUS_TOKEN; none: nodes answer loopback only)")
    g.set_defaults(afn=cmd_status)

    from jvpn.audit import add_audit_parser

    add_audit_parser(sub, with_store)
    return finish_parser(p)


# Lab instruments, not administration: `jvpn` points to `jvpn-lab` (instruments/, never imported here).
LAB_COMMANDS = ("demo", "bench", "cluster")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LAB_COMMANDS:
        print(f"jvpn {argv[0]}: a lab instrument, run `jvpn-lab {' '.join(argv)}`", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    bare = help_requested(args, hasattr(args, "afn") or hasattr(args, "fn"))
    if bare is not None:
        return bare
    if args.log_format:  # else Python's default: warnings and errors as plain lines on stderr
        configure_logging("WARNING", args.log_format, "jvpn")
    t0 = time.monotonic()
    try:
        if hasattr(args, "afn"):
            return asyncio.run(args.afn(args))
        return int(args.fn(args))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # an operator tool: one clear line, not a traceback
        from jvpn.status import StatusError
        from settings import ConfigError
        from store.errors import StoreError

        if isinstance(exc, StatusError):
            print(f"jvpn {args.cmd}: {exc}", file=sys.stderr)
            return 1
        if isinstance(exc, (StoreError, ConfigError, ValueError, OSError, KeyError)):
            print(f"jvpn {args.cmd}: {type(exc).__name__}: {exc} "
                  f"(after {time.monotonic() - t0:.1f}s)", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
