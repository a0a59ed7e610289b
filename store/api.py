"""The authoritative session table: an async API over Redis, one Lua script per mutation.

Theory of operation. A session is one hash, ``jvpn:{<sid hex>}`` (short field
names, see ``store/lua/common.lua``), plus a hash of recent reattach nonces,
``jvpn:{<sid hex>}:n``; both share the hash tag, so every script touches one
slot in Redis Cluster. Every mutation is one script (``store/lua/*.lua``)
which reads "now" from Redis TIME, enforces the transition table of
``session.states`` (injected into the script), bumps ``state_version`` and
returns a status code; nothing raises for a refusal. Safety never depends on
key expiry: deadlines are fields checked by the scripts, and a session past
its deadline is turned into a tombstone (TERMINATED, reason EXPIRED) by the
first script that sees it or by ``sweep``; EXPIRE only collects garbage.

Calls go through a ``ScriptBatcher`` that coalesces concurrent callers into
pipelines. Any store failure raises ``StoreUnavailable`` (fail closed). A
mutation whose outcome is unknown (timeout or connection lost after the call
may have been sent) is re-read, never guessed: reattach is re-run with the
same nonce (the script records its decision under the nonce, so a second run
returns the first run's decision if it applied, and decides afresh if it did
not), birth re-reads the record, transition re-reads the version, and the
idempotent refresh/terminate are simply re-run.

The expiry index ``jvpn:expiry`` (sid hex scored by a deadline lower bound)
lives in another slot, so it is maintained here, beside the scripts, never in
them: birth adds the session (``ZADD LT``, in the same pipeline), terminate
removes it, and ``sweep`` moves an entry to the real deadline (the earlier of
the TTL deadline and the maximum-age deadline, ``created + max age``) when it
finds the session still live. Reattach and refresh never touch it: deadlines only
grow, so the birth entry stays a valid lower bound.

Redis Cluster: a ``redis+cluster://host:port[,host:port...]`` URL (or a
``redis.asyncio.cluster.RedisCluster``) selects cluster mode, where
``store.cluster.ClusterScriptBatcher`` routes each script call to its slot's
master and batches per node. Every script keeps to one slot (the ``{sid}``
tag); the expiry index, the generation, the registry, the handshake guard and
the audit stream live in their own slots and are only touched by separate
commands. ``list_sessions`` scans every master; pub/sub subscribes on any
master (a classic PUBLISH reaches every node of the cluster).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from dataclasses import fields as dataclass_fields
from typing import Any, NamedTuple, TypeVar, cast

import msgpack
from redis import exceptions as rexc
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster

from session.reasons import RejectReason, TerminateReason
from session.states import TRANSITIONS, SessionEvent, SessionState
from session.storeops import (
    ActivateOp,
    ActivateResult,
    AddressResult,
    BirthResult,
    ClientPolicy,
    ExpiredSession,
    ExpireResult,
    ReattachOp,
    ReattachResult,
    RefreshResult,
    RekeyResult,
    SessionRecord,
    SlotResult,
    StoreStatus,
    TerminateResult,
    TransitionResult,
)
from session.wire import BINDING_ID_LEN, NONCE_LEN, TransportKind
from store import keys as K
from store.batcher import Arg, ScriptBatcher, ScriptCall, translate
from store.cluster import ClusterScriptBatcher, connect_cluster, is_cluster_url
from store.errors import StoreError, StoreNotDurable, StoreProtocolError, StoreUnavailable
from store.policy import RegistryEntryRefused, decode_policy, encode_policy
from store.scripts import load_scripts

__all__ = [
    "ActivateResult",
    "BindingChange",
    "BirthResult",
    "ClientPolicy",
    "ExpireResult",
    "ExpiredSession",
    "ReattachResult",
    "RefreshResult",
    "SessionPage",
    "SessionRecord",
    "SessionStore",
    "StoreConfig",
    "StoreError",
    "StoreNotDurable",
    "StoreStatus",
    "StoreUnavailable",
    "TerminateResult",
    "TransitionResult",
]

T = TypeVar("T")

MAX_NODE_LEN = 64
MAX_ADDR_TAG_LEN = 256
MAX_VERSION = 2**53  # Lua numbers are doubles: exact below this

log = logging.getLogger("jvpn.store")



@dataclass(frozen=True, slots=True)
class StoreConfig:
    """Tunables of a SessionStore (times in the unit their name says)."""

    socket_timeout_s: float = 1.0  # every command; an outage never hangs a caller
    connect_timeout_s: float = 1.0
    tombstone_ttl_s: float = 3600.0  # how long a TERMINATED record answers late requests
    gc_slack_s: float = 86400.0  # live key expiry = ttl + slack (garbage collection only)
    timestamp_window_ms: int = 30_000  # proof timestamp window (reattach default)
    dual_active_window_ms: int = 2_000  # reattach default
    coalesce: bool = True  # batch concurrent script calls into pipelines
    max_batch: int = 512
    max_inflight: int = 2  # pipelines in flight at once
    max_connections: int = 64  # pool size when built from a URL
    wait_replicas: int = 0  # durable mode: WAIT for this many replicas after mutations
    wait_timeout_ms: int = 100
    sweep_lease_ms: int = 30_000  # a claimed sweep candidate comes due again after this
    generation_check_s: float = 5.0  # re-read the store generation at most this often
    tls_ca_file: str = ""  # rediss:// only: verify the server against this CA bundle

    def tls_kwargs(self, url: str) -> dict[str, Any]:
        """redis-py TLS options for ``url``: a ``rediss`` URL verifies the server's certificate
        (and host name) against ``tls_ca_file`` when set, else the system store."""
        if not url.startswith("rediss") or not self.tls_ca_file:
            return {}
        return {"ssl_ca_certs": self.tls_ca_file, "ssl_cert_reqs": "required"}

    @property
    def call_timeout_s(self) -> float:
        """Upper bound of one store call: get a connection, send, read every reply.

        A mutation whose outcome is unknown is re-read once, so it can take
        twice this before raising StoreUnavailable.
        """
        wait = self.wait_timeout_ms / 1000 if self.wait_replicas > 0 else 0.0
        return self.connect_timeout_s + self.socket_timeout_s + wait + 0.05


# ---- decoding: every script reply becomes a typed answer here, field by name ----------------

# Enum lookups by dict: Enum.__call__ costs ~0.5 us, several per result.
_STATUS = {int(s): s for s in StoreStatus}
_STATES: dict[int, SessionState | None] = {int(s): s for s in SessionState}
_STATES[-1] = None
_REJECT: dict[int, RejectReason | None] = {int(r): r for r in RejectReason}
_REJECT[0] = None
_TREASON: dict[int, TerminateReason | None] = {int(r): r for r in TerminateReason}
_TREASON[0] = None
_KINDS: dict[int, TransportKind | None] = {int(k): k for k in TransportKind}
_KINDS[0] = None


def _status(code: Any) -> StoreStatus:
    try:
        return _STATUS[code]
    except KeyError:
        raise StoreProtocolError(f"unknown store status {code!r}") from None


def _state(code: Any) -> SessionState | None:
    try:
        return _STATES[code]
    except KeyError:
        raise StoreProtocolError(f"unknown session state {code!r}") from None


def _treason(code: Any) -> TerminateReason | None:
    return _TREASON.get(code) if code in _TREASON else TerminateReason(int(code))


def _reason(code: Any) -> RejectReason | None:
    return _REJECT.get(code) if code in _REJECT else RejectReason(int(code))


def _client_id(raw: Any) -> str:
    """A record's ``cid``: the client's 32-byte public key, stored raw (half the bytes of
    its hex, which records written before stored and still read)."""
    if type(raw) is bytes and len(raw) == 32:
        return raw.hex()
    return _text(raw)


def _cid_field(client_id: str) -> bytes | str:
    """What a record stores as ``cid`` for ``client_id`` (see ``_client_id``)."""
    if len(client_id) == 64:
        try:
            return bytes.fromhex(client_id)
        except ValueError:
            pass
    return client_id


def _text(raw: Any) -> str:
    return raw.decode("utf-8", "replace") if type(raw) is bytes else str(raw)


def _flag(raw: Any) -> bool:
    return int(raw) == 1


Field = tuple[str, Callable[[Any], Any]]


class Reply:
    """One script's reply layout: the answer type and its fields, in the script's order.

    The names are checked against the answer's dataclass fields at import, so a
    reply can never be decoded into the wrong field; ``decode`` builds the answer
    positionally (keyword construction costs more at the cluster's reattach rate).
    """

    __slots__ = ("script", "cls", "fields", "_convs")

    def __init__(self, script: str, cls: type, fields: Sequence[Field]) -> None:
        names = [f.name for f in dataclass_fields(cls)][: len(fields)]
        if names != [n for n, _ in fields]:
            raise TypeError(f"{script}: reply fields {[n for n, _ in fields]} != {names}")
        self.script = script
        self.cls = cls
        self.fields = tuple(fields)
        self._convs = tuple(c for _, c in fields)

    def decode(self, r: Sequence[Any], *extra: Any) -> Any:
        """The typed answer of reply ``r`` (StoreProtocolError if it has the wrong shape);
        ``extra``: the answer's fields that the script does not return."""
        if len(r) != len(self._convs):
            raise StoreProtocolError(f"{self.script}: {len(r)} reply fields, expected "
                                     f"{len(self._convs)}")
        try:
            return self.cls(*[c(v) for c, v in zip(self._convs, r, strict=True)], *extra)
        except (TypeError, ValueError) as exc:
            raise StoreProtocolError(f"{self.script}: unreadable reply: {exc}") from exc


BIRTH_REPLY = Reply("birth", BirthResult, [
    ("status", _status), ("version", int), ("epoch", int), ("state", _state),
    ("server_ms", int), ("deadline_ms", int)])
REATTACH_REPLY = Reply("reattach", ReattachResult, [
    ("status", _status), ("reason", _reason), ("version", int), ("epoch", int),
    ("binding_id", bytes), ("node", _text), ("prev_node", _text), ("server_ms", int),
    ("state", _state), ("retry", _flag), ("expired_now", _flag), ("binding_current", _flag),
    ("terminate_reason", _treason), ("prev_state", _state), ("prev_kind", _KINDS.get),
    ("binding_pending", _flag), ("decided_ms", int)])
REKEY_REPLY = Reply("rekey", RekeyResult, [
    ("status", _status), ("version", int), ("state", _state), ("epoch", int), ("node", _text),
    ("generation", int), ("server_ms", int), ("expired_now", _flag),
    ("terminate_reason", _treason)])
ACTIVATE_REPLY = Reply("activate", ActivateResult, [
    ("status", _status), ("version", int), ("state", _state), ("epoch", int), ("node", _text),
    ("prev_epoch", int), ("prev_node", _text), ("server_ms", int), ("expired_now", _flag),
    ("terminate_reason", _treason), ("activated_ms", int)])
REFRESH_REPLY = Reply("refresh", RefreshResult, [
    ("status", _status), ("version", int), ("state", _state), ("epoch", int), ("node", _text),
    ("deadline_ms", int), ("server_ms", int), ("expired_now", _flag),
    ("terminate_reason", _treason)])
TERMINATE_REPLY = Reply("terminate", TerminateResult, [
    ("status", _status), ("version", int), ("prev_state", _state),
    ("terminate_reason", _treason), ("epoch", int), ("node", _text), ("server_ms", int)])
EXPIRE_REPLY = Reply("expire", ExpireResult, [
    ("status", _status), ("expired_now", _flag), ("version", int), ("deadline_ms", int),
    ("epoch", int), ("node", _text), ("prev_state", _state), ("server_ms", int),
    ("client_id", _client_id)])
SLOT_REPLY = Reply("slot", SlotResult, [("ok", lambda v: _status(v) is StoreStatus.OK),
                                         ("count", int)])
ADDR_REPLY = Reply("addr", AddressResult, [("status", _status), ("index", int), ("used", int)])
# transition.lua's reply; the event is the caller's (``decode(r, event)``).
TRANSITION_REPLY = Reply("transition", TransitionResult, [
    ("status", _status), ("version", int), ("state", _state), ("prev_state", _state),
    ("expired_now", _flag), ("terminate_reason", _treason), ("epoch", int), ("server_ms", int)])


def decode_record(session_id: bytes, f: Mapping[bytes, bytes], server_ms: int) -> SessionRecord:
    """One session record from its hash fields."""

    def i(name: bytes, default: int = 0) -> int:
        v = f.get(name)
        return int(v) if v is not None else default

    def opt(name: bytes) -> int | None:
        v = f.get(name)
        return int(v) if v is not None else None

    kind = i(b"k")
    tr = i(b"tr")
    return SessionRecord(
        session_id=session_id,
        state=SessionState(i(b"st")),
        version=i(b"v"),
        epoch=i(b"ep"),
        binding_id=f.get(b"bid", b""),
        node=_text(f.get(b"nd", b"")),
        kind=TransportKind(kind) if kind else None,
        upstream=_text(f.get(b"up", b"")),
        client_id=_client_id(f.get(b"cid", b"")),
        wrapped_secret=f.get(b"ws", b""),
        ttl_ms=i(b"ttl"),
        deadline_ms=i(b"dl"),
        created_ms=i(b"cr"),
        server_ms=server_ms,
        reattach_rate=i(b"rr"),
        transports_mask=i(b"tk"),
        generation=i(b"gen"),
        terminate_reason=TerminateReason(tr) if tr else None,
        terminated_ms=opt(b"te"),
        lost_version=opt(b"lost"),
        last_reattach_ms=opt(b"lt"),
        max_age_ms=opt(b"ma"),
        pending_epoch=i(b"pep"),
        pending_node=_text(f.get(b"pnd", b"")),
        pending_binding_id=f.get(b"pbid", b""),
        wrapped_control=f.get(b"wc", b""),
        key_generation=i(b"kg"),
        keys_ms=i(b"kt", i(b"cr")),
        previous_wrapped=f.get(b"wsp", b""),
        previous_keys_ms=i(b"ktp", i(b"cr")),
        inner=_text(f.get(b"ia", b"")),
        prefixes=_text(f.get(b"ap", b"")),
    )


class PendingReattach:
    """A queued reattach CAS (``SessionStore.reattach_nowait``): its call and reply future."""

    __slots__ = ("keys", "args", "future")

    def __init__(self, keys: tuple[str, ...], args: list[Arg],
                 future: asyncio.Future[Any]) -> None:
        self.keys = keys
        self.args = args
        self.future = future


@dataclass(slots=True)
class SessionPage:
    sessions: list[SessionRecord]
    cursor: int  # pass back to continue; 0 when the scan is complete


class BindingChange(NamedTuple):
    """A binding moved: ``node`` now holds ``session_id`` at ``epoch`` (drop older ones)."""

    session_id: bytes
    node: str
    epoch: int


# ---- the store -------------------------------------------------------------------------------


class SessionStore:
    """Async API of the session table and the client registry."""

    BIRTH_VERSION = 1  # created at BIRTH v0, HANDSHAKE_COMPLETE applied: ATTACHED v1
    BIRTH_EPOCH = 1

    def __init__(
        self, redis: Redis | RedisCluster | str, config: StoreConfig | None = None,
        *, registry_key: bytes | None = None,
    ) -> None:
        self.config = config or StoreConfig()
        # MACs the client registry (``session.keys.registry_key(kek)``): add_client and
        # get_client need it. Whoever loads the KEK (a gateway, ``jvpn clients``) sets it.
        self.registry_key = registry_key
        # The registry keys of previous KEKs (KEK rotation): entries MAC'd under one of them
        # are still read; add_client and remac_clients write under ``registry_key``.
        self.previous_registry_keys: tuple[bytes, ...] = ()
        # Called with (public key, why) when a registry entry fails its MAC check (the
        # gateway emits a security event); get_client then answers None (unknown client).
        self.on_registry_refused: Callable[[bytes, str], None] | None = None
        self.registry_refused = 0  # entries refused for a missing or bad MAC
        self._owns_client = isinstance(redis, str)
        self.redis: Redis | RedisCluster = (
            self._connect(redis, self.config) if isinstance(redis, str) else redis
        )
        cluster = isinstance(self.redis, RedisCluster)
        kwargs = (self.redis.get_connection_kwargs() if isinstance(self.redis, RedisCluster)
                  else self.redis.connection_pool.connection_kwargs)  # fmt: skip
        if kwargs.get("decode_responses"):
            raise ValueError("SessionStore needs a client with decode_responses=False")
        self._scripts = load_scripts()
        batching: dict[str, Any] = dict(
            max_batch=self.config.max_batch,
            max_inflight=self.config.max_inflight,
            wait_replicas=self.config.wait_replicas,
            wait_timeout_ms=self.config.wait_timeout_ms,
            batch_timeout_s=self.config.call_timeout_s,
        )
        self._batcher: ScriptBatcher | ClusterScriptBatcher
        if isinstance(self.redis, RedisCluster):
            self._batcher = ClusterScriptBatcher(
                self.redis, max_connections=self.config.max_connections, **batching
            )
        else:
            self._batcher = ScriptBatcher(self.redis, **batching)
        self.cluster = cluster  # Redis Cluster mode (routing per slot, scans per master)
        self._tomb_ms = int(self.config.tombstone_ttl_s * 1000)
        self._slack_ms = int(self.config.gc_slack_s * 1000)
        self._clock_offset_ms: float | None = None  # server ms minus our monotonic ms
        self._generation: int | None = None
        self._gen_expires = 0.0  # monotonic time after which the generation is re-read
        self._gen_forced_at = -1e9
        # How reattach_soon ran each CAS: "queued" (no task), "task" (the coroutine), and
        # "resumed" (queued, then finished by the coroutine: an error, a moved generation).
        self.reattach_paths = {"queued": 0, "task": 0, "resumed": 0}
        self.activate_paths = {"queued": 0, "task": 0, "resumed": 0}  # activate_soon's, alike
        self._gen_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # reattach_soon's, looked up once
        self.generation_changes = 0  # the store's generation changed under us (wipe, rollback)

    @classmethod
    def from_url(cls, url: str, config: StoreConfig | None = None, *,
                 registry_key: bytes | None = None) -> SessionStore:
        """``redis://`` / ``rediss://`` / ``unix://``: one instance; ``redis+cluster://h:p[,h:p...]``
        (``rediss+cluster://`` for TLS): a Redis Cluster, the listed nodes as startup nodes."""
        return cls(url, config, registry_key=registry_key)

    @staticmethod
    def _connect(url: str, config: StoreConfig) -> Redis | RedisCluster:
        if is_cluster_url(url):
            return connect_cluster(
                url, socket_timeout=config.socket_timeout_s,
                connect_timeout=config.connect_timeout_s, max_connections=config.max_connections,
                **config.tls_kwargs(url),
            )  # fmt: skip
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=config.max_connections,
            timeout=config.connect_timeout_s + config.socket_timeout_s,
            socket_timeout=config.socket_timeout_s,
            socket_connect_timeout=config.connect_timeout_s,
            decode_responses=False,
            **config.tls_kwargs(url),
        )  # connections built by the pool itself never retry: an outage fails fast
        return Redis(connection_pool=pool)

    async def close(self) -> None:
        if self._gen_task is not None:
            self._gen_task.cancel()
        await self._batcher.close()
        if self._owns_client:
            await self.redis.aclose()

    async def __aenter__(self) -> SessionStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def batcher(self) -> ScriptBatcher | ClusterScriptBatcher:
        return self._batcher

    # ---- plumbing ----------------------------------------------------------------------------

    async def _guard(self, aw: Awaitable[T]) -> T:
        """Await one direct command with the call timeout; map errors to StoreError."""
        try:
            async with asyncio.timeout(self.config.call_timeout_s):
                return await aw
        except StoreError:
            raise
        except TimeoutError as exc:
            raise StoreUnavailable("store call timed out", maybe_applied=True) from exc
        except Exception as exc:
            raise translate(exc) from exc

    async def _script(
        self,
        name: str,
        keys: Sequence[str],
        args: Sequence[Arg],
        *,
        extras: Sequence[Sequence[Arg]] = (),
        mutates: bool = True,
    ) -> list[Any]:
        call = ScriptCall(self._scripts[name], keys, args, extras, mutates)
        run = self._batcher.call if self.config.coalesce else self._batcher.call_direct
        try:
            reply = await run(call)  # the batcher bounds every pipeline with a timeout
        except Exception as exc:
            raise translate(exc) from exc
        return _unpack(name, reply)

    def _saw_server_time(self, server_ms: int) -> None:
        if server_ms > 0:
            self._clock_offset_ms = server_ms - time.monotonic() * 1000

    def estimated_server_ms(self) -> int | None:
        """The store clock as last observed, advanced by our monotonic clock."""
        if self._clock_offset_ms is None:
            return None
        return int(time.monotonic() * 1000 + self._clock_offset_ms)

    async def raw_evalsha(self, name: str, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        """Call one script with a plain EVALSHA, no batching (benchmark baseline)."""
        script = self._scripts[name]
        try:
            reply = await self._guard(self.redis.evalsha(script.sha, len(keys), *keys, *args))
        except StoreProtocolError as exc:
            if not isinstance(exc.__cause__, rexc.NoScriptError):
                raise
            await self._guard(self.redis.script_load(script.source))
            reply = await self._guard(self.redis.evalsha(script.sha, len(keys), *keys, *args))
        return _unpack(name, reply)

    async def load_scripts(self) -> None:
        """SCRIPT LOAD every script now (optional: NOSCRIPT is handled on first use)."""
        for script in self._scripts.values():
            await self._guard(self.redis.script_load(script.source))

    # ---- server ------------------------------------------------------------------------------

    async def ping(self) -> bool:
        """True if the store answers (raises StoreUnavailable otherwise)."""
        return bool(await self._guard(self.redis.ping()))

    async def server_time_ms(self) -> int:
        """The store's clock (Redis TIME), the one clock every gateway shares."""
        sec, usec = await self._guard(self.redis.time())
        ms = int(sec) * 1000 + int(usec) // 1000
        self._saw_server_time(ms)
        return ms

    async def generation(self) -> int:
        """The store generation: stamped into every new record, checked by reattach and refresh.

        Random, created by the first caller; re-read in the background every
        ``generation_check_s`` (callers never wait for that). If ``jvpn:gen`` is
        gone but we know the generation, ours is put back (one lost key must not void
        every session); ``new_generation`` starts a new one on purpose (after a restore).
        """
        gen = self._generation
        if gen is not None:
            if time.monotonic() >= self._gen_expires:
                self._read_generation_soon()
            return gen
        await asyncio.shield(self._read_generation_soon())  # first use: everyone waits once
        assert self._generation is not None
        return self._generation

    def _read_generation_soon(self) -> asyncio.Task[None]:
        """The single-flight (re-)read of the generation; a burst joins one task."""
        task = self._gen_task
        if task is None or task.done():
            task = self._gen_task = asyncio.get_running_loop().create_task(self._read_generation())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved
        return task

    async def _read_generation(self) -> None:
        try:
            raw = await self._guard(self.redis.get(K.GENERATION))
            if raw is None:
                # First use: create one. If we already know one, the key alone was lost (a
                # failover that dropped an unreplicated write, a flushed shard): put ours back.
                # Minting a new one here would void every live session of every shard over
                # one lost key; a restored backup calls new_generation() on purpose instead.
                fresh = self._generation or _random_generation(None)
                if self._generation is not None:
                    log.warning("store generation key missing: restoring %d", fresh)
                await self._guard(self.redis.set(K.GENERATION, fresh, nx=True))
                raw = await self._guard(self.redis.get(K.GENERATION))
            gen = int(raw) if raw is not None else fresh
            if self._clock_offset_ms is None:
                await self.server_time_ms()  # learn the store clock once, too
        except StoreUnavailable:
            if self._generation is None:
                raise
            # Keep the known one (the key's node may be failing over while the session's
            # node is fine); try again soon.
            self._gen_expires = time.monotonic() + min(1.0, self.config.generation_check_s)
            return
        if self._generation is not None and gen != self._generation:
            self.generation_changes += 1
        self._generation = gen
        self._gen_expires = time.monotonic() + self.config.generation_check_s

    async def _generation_moved_from(self, used: int) -> bool:
        """A record had another generation than ``used``: re-read now (at most every 100 ms);
        True if the store's generation is no longer ``used`` (run again with the new one)."""
        if time.monotonic() - self._gen_forced_at >= 0.1:
            self._gen_forced_at = time.monotonic()
            try:
                await asyncio.shield(self._read_generation_soon())
            except StoreUnavailable:
                return False
        return self._generation is not None and self._generation != used

    async def new_generation(self) -> int:
        """Start a new store generation (operators: after restoring a backup, or any rollback).

        From then on reattach and refresh treat every record of an older
        generation as UNKNOWN_SESSION (its client must handshake again); other
        gateways follow within ``generation_check_s``.
        """
        fresh = _random_generation(self._generation)
        await self._guard(self.redis.set(K.GENERATION, fresh))
        self._generation = fresh
        self._gen_expires = time.monotonic() + self.config.generation_check_s
        return fresh

    # ---- sessions ----------------------------------------------------------------------------

    async def birth(
        self,
        session_id: bytes,
        *,
        wrapped_secret: bytes,
        node: str,
        binding_id: bytes,
        kind: TransportKind,
        upstream: str,
        policy: ClientPolicy,
        client_id: str | None = None,
        ttl_ms: int | None = None,
        max_age_ms: int | None = None,
        wrapped_control: bytes = b"",
        inner: str = "",
    ) -> BirthResult:
        """Create a session ATTACHED at version 1, epoch 1 (EXISTS if the id is taken).

        ``ttl_ms`` and ``max_age_ms`` default to the policy's; the session ends at its
        birth + ``max_age_ms`` whatever renews it. ``inner``: an L3 session's inner addresses
        (claimed with ``claim_addresses``), written with the policy's prefixes.
        """
        _check_node(node)
        _check_len("binding_id", binding_id, BINDING_ID_LEN)
        ttl = int(ttl_ms if ttl_ms is not None else policy.ttl_ms)
        if ttl <= 0:
            raise ValueError("ttl_ms must be positive")
        max_age = int(max_age_ms if max_age_ms is not None else policy.max_age_ms)
        if max_age <= 0:
            raise ValueError("max_age_ms must be positive")
        gen = await self.generation()  # also learns the store clock once
        hint = max(0, (self.estimated_server_ms() or 0) + min(ttl, max_age) - 1000)  # a lower bound
        keys = K.session_keys(session_id)
        args: list[Arg] = [
            binding_id, node, int(kind), wrapped_secret,
            _cid_field(client_id or policy.client_id),
            upstream, ttl, policy.reattach_rate, policy.transport_mask, gen, self._slack_ms,
            max_age, wrapped_control,
        ]  # fmt: skip
        if inner:
            args += [inner, ",".join(policy.prefixes)]
        extras = [("ZADD", K.EXPIRY_INDEX, "LT", hint, K.session_hex(session_id))]
        try:
            r = await self._script("birth", keys, args, extras=extras)
        except StoreUnavailable as exc:
            if not _outcome_unknown(exc):
                raise
            # Outcome unknown: re-read. Our binding id at epoch 1 means it applied.
            rec = await self.get(session_id)
            if rec is not None and rec.binding_id == binding_id and rec.epoch == self.BIRTH_EPOCH:
                return BirthResult(StoreStatus.OK, rec.version, rec.epoch, rec.state,
                                   rec.server_ms, rec.ends_ms)  # fmt: skip
            if rec is not None:
                return BirthResult(StoreStatus.EXISTS, 0, 0, None, rec.server_ms, 0)
            r = await self._script("birth", keys, args, extras=extras)
        res: BirthResult = BIRTH_REPLY.decode(r)
        self._saw_server_time(res.server_ms)
        return res

    async def reattach(
        self,
        session_id: bytes,
        *,
        expected_version: int,
        nonce: bytes,
        timestamp_ms: int,
        kind: TransportKind,
        node: str,
        addr_tag: str | bytes,
        binding_id: bytes | None = None,
        window_ms: int | None = None,
        dual_active_window_ms: int | None = None,
        proof_generation: int = -1,
    ) -> ReattachResult:
        """The reattach CAS (docs/ARCHITECTURE.md, Reattach step by step; store/lua/reattach.lua).

        ``proof_generation``: the key generation of the secret the proof verified under
        (-1: not checked; see reattach.lua, ARGV[13]).
        """
        gen = self._generation
        if gen is None or time.monotonic() >= self._gen_expires:
            gen = await self.generation()
        keys, args = self._reattach_call(session_id, expected_version, nonce, timestamp_ms, kind,
                                         node, addr_tag, binding_id, window_ms,
                                         dual_active_window_ms, gen, proof_generation)  # fmt: skip
        try:
            r: list[Any] | None = await self._script("reattach", keys, args)
            error: StoreUnavailable | None = None
        except StoreUnavailable as exc:
            r, error = None, exc
        return await self._reattach_after(keys, args, r, error)

    def reattach_soon(self, op: ReattachOp) -> asyncio.Future[ReattachResult]:
        """``reattach`` as a future: the gateway's one way to run the CAS.

        In the usual case (a single Redis, coalescing on, the generation fresh) the CAS is
        queued on the batcher with no task and no await frame per call, and the batch hands
        the reply straight to this future's decoding (``ScriptCall.settle``: no second
        future, no callback hop); anything unusual on the way (an error, an unknown
        outcome, a moved generation, Redis Cluster) continues as ``reattach`` does, in a
        task. The future raises what ``reattach`` raises.
        """
        gen = self._generation
        if gen is None or not self._queue_ready():
            self.reattach_paths["task"] += 1
            return asyncio.ensure_future(self.reattach(
                op.session_id, expected_version=op.expected_version, nonce=op.nonce,
                timestamp_ms=op.timestamp_ms, kind=op.kind, node=op.node, addr_tag=op.addr_tag,
                binding_id=op.binding_id, window_ms=op.window_ms,
                dual_active_window_ms=op.dual_active_window_ms,
                proof_generation=op.proof_generation))
        keys, args = self._reattach_call(op.session_id, op.expected_version, op.nonce,
                                         op.timestamp_ms, op.kind, op.node, op.addr_tag,
                                         op.binding_id, op.window_ms, op.dual_active_window_ms,
                                         gen, op.proof_generation)  # fmt: skip
        self.reattach_paths["queued"] += 1
        return self._queued("reattach", keys, args, self._reattach_reply, self._reattach_rest,
                            self.reattach_paths)

    def _queued(self, name: str, keys: tuple[str, ...], args: list[Arg],
                decode: Callable[[Any], T | None],
                rest: Callable[[tuple[str, ...], list[Arg], Any, StoreError | None],
                               Awaitable[T]],
                paths: dict[str, int]) -> asyncio.Future[T]:
        """Queue script ``name`` on the batcher with no task: the batch hands its reply to
        ``decode`` (``ScriptCall.settle``), whose result completes the future; a reply it
        refuses (None), or an error, continues in a task as ``rest`` (the coroutine's own
        code after its first call)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            # one look-up per store, not per call (each costs a getpid system call)
            loop = self._loop = asyncio.get_running_loop()
        out: asyncio.Future[T] = loop.create_future()

        def settle(reply: Any, error: StoreError | None) -> None:
            if out.done():  # cancelled: the reply is ignored
                return
            res = decode(reply) if error is None else None
            if res is not None:
                out.set_result(res)
                return
            paths["resumed"] += 1
            task = asyncio.ensure_future(rest(keys, args, reply, error))
            task.add_done_callback(lambda t: _settle(out, t))
            out.add_done_callback(lambda f: f.cancelled() and task.cancel())

        batcher = self._batcher
        assert isinstance(batcher, ScriptBatcher)  # _queue_ready
        batcher.enqueue(ScriptCall(self._scripts[name], keys, args, future=out, settle=settle))
        return out

    def _queue_ready(self) -> bool:
        """Whether a reattach may be queued on the batcher with no coroutine (see
        ``reattach_nowait``)."""
        return (isinstance(self._batcher, ScriptBatcher) and self.config.coalesce
                and self._generation is not None and time.monotonic() < self._gen_expires)

    def _reattach_reply(self, reply: Any) -> ReattachResult | None:
        """The typed result of a queued reattach's reply, or None if it needs the rest of
        ``reattach`` (unreadable, or a moved generation)."""
        try:
            res: ReattachResult = REATTACH_REPLY.decode(_unpack("reattach", reply))
        except StoreError:
            return None
        if res.status is StoreStatus.GENERATION_MOVED:  # reattach re-checks ours
            return None
        self._saw_server_time(res.server_ms)
        return res

    async def _reattach_rest(self, keys: tuple[str, ...], args: list[Arg], reply: Any,
                             error: StoreError | None) -> ReattachResult:
        """The rest of ``reattach`` after its queued first call gave ``reply`` or ``error``."""
        if error is not None and not isinstance(error, StoreUnavailable):
            raise error
        r = _unpack("reattach", reply) if error is None else None
        return await self._reattach_after(keys, args, r, error)

    def reattach_nowait(
        self,
        session_id: bytes,
        *,
        expected_version: int,
        nonce: bytes,
        timestamp_ms: int,
        kind: TransportKind,
        node: str,
        addr_tag: str | bytes,
        binding_id: bytes,
        window_ms: int | None = None,
        dual_active_window_ms: int | None = None,
        proof_generation: int = -1,
    ) -> PendingReattach | None:
        """The first step of ``reattach`` without a coroutine: queue the CAS, return at once.

        For a caller that handles many reattaches from a socket callback (the gateway):
        no task and no await frames per call. When the future is done, ``reattach_done``
        gives the result, or None if the call needs the rest of ``reattach`` (an unknown
        outcome, a moved store generation, an error): then ``finish_reattach`` continues
        exactly where ``reattach`` would. None here means this store has no such fast
        path now (Redis Cluster routing, coalescing off, the generation due for a re-read):
        call ``reattach``.
        """
        gen = self._generation
        if gen is None or not self._queue_ready():
            return None
        keys, args = self._reattach_call(session_id, expected_version, nonce, timestamp_ms, kind,
                                         node, addr_tag, binding_id, window_ms,
                                         dual_active_window_ms, gen, proof_generation)  # fmt: skip
        call = ScriptCall(self._scripts["reattach"], keys, args)
        assert isinstance(self._batcher, ScriptBatcher)  # _queue_ready
        self._batcher.enqueue(call)
        return PendingReattach(keys, args, call.future)

    def reattach_done(self, pending: PendingReattach) -> ReattachResult | None:
        """The result of a completed ``reattach_nowait``, or None: ``finish_reattach``."""
        fut = pending.future
        if fut.cancelled() or fut.exception() is not None:
            return None
        return self._reattach_reply(fut.result())

    async def finish_reattach(self, pending: PendingReattach) -> ReattachResult:
        """The rest of ``reattach`` after a ``reattach_nowait`` that ``reattach_done`` refused
        (raises as ``reattach`` does)."""
        fut = pending.future
        r: list[Any] | None = None
        error: StoreUnavailable | None = None
        if fut.cancelled():
            error = StoreUnavailable("store call cancelled", maybe_applied=True)
        else:
            exc = fut.exception()
            if exc is None:
                r = _unpack("reattach", fut.result())
            else:
                err = translate(exc)
                if not isinstance(err, StoreUnavailable):
                    raise err from exc
                error = err
        return await self._reattach_after(pending.keys, pending.args, r, error)

    def _reattach_call(
        self, session_id: bytes, expected_version: int, nonce: bytes, timestamp_ms: int,
        kind: TransportKind, node: str, addr_tag: str | bytes, binding_id: bytes | None,
        window_ms: int | None, dual_active_window_ms: int | None, gen: int,
        proof_generation: int = -1,
    ) -> tuple[tuple[str, ...], list[Arg]]:
        """The checked KEYS and ARGV of one reattach.lua call."""
        _check_node(node)
        _check_len("nonce", nonce, NONCE_LEN)
        bid = binding_id if binding_id is not None else os.urandom(BINDING_ID_LEN)
        _check_len("binding_id", bid, BINDING_ID_LEN)
        if not 0 <= expected_version < MAX_VERSION:
            expected_version = MAX_VERSION  # can never match: STALE_VERSION
        if len(addr_tag) > MAX_ADDR_TAG_LEN:
            raise ValueError("addr_tag too long")
        window = self.config.timestamp_window_ms if window_ms is None else int(window_ms)
        dual = (self.config.dual_active_window_ms if dual_active_window_ms is None
                else int(dual_active_window_ms))  # fmt: skip
        args: list[Arg] = [
            expected_version, nonce, int(timestamp_ms), int(kind), node, bid, addr_tag,
            window, dual, self._tomb_ms, self._slack_ms, gen, int(proof_generation),
        ]  # fmt: skip
        return K.session_keys(session_id), args

    async def _reattach_after(
        self, keys: tuple[str, ...], args: list[Arg], r: list[Any] | None,
        error: StoreUnavailable | None,
    ) -> ReattachResult:
        """Everything ``reattach`` does after its first script call (reply ``r`` or ``error``)."""
        recovered = False
        if error is not None:
            if not _outcome_unknown(error):
                raise error
            # Outcome unknown: run it again with the same nonce and addr tag. If the
            # first run applied, its recorded decision comes back (retry=1): ours.
            r = await self._script("reattach", keys, args)
            recovered = True
        assert r is not None
        gen = int(args[11])
        res: ReattachResult = REATTACH_REPLY.decode(r)
        if (res.status is StoreStatus.GENERATION_MOVED
                and await self._generation_moved_from(gen)):
            # The record is of another generation than ours, and ours was stale: again.
            args[11] = self._generation or gen
            res = REATTACH_REPLY.decode(await self._script("reattach", keys, args))
        if res.status is StoreStatus.GENERATION_MOVED:  # ours is current: the record is void
            res.status = StoreStatus.UNKNOWN_SESSION
        self._saw_server_time(res.server_ms)
        if recovered and res.retry:
            res = replace(res, retry=False, recovered=True)
        return res

    async def transition(
        self,
        session_id: bytes,
        expected_version: int,
        event: SessionEvent,
        reason: TerminateReason | None = None,
    ) -> TransitionResult:
        """Apply ``event`` if the version is ``expected_version`` and the table allows it."""
        event = SessionEvent(event)
        if event in (SessionEvent.REATTACH, SessionEvent.HANDSHAKE_COMPLETE):
            raise ValueError(f"{event.name} has its own operation (reattach/birth)")
        args: list[Arg] = [int(expected_version), int(event), int(reason or 0), self._tomb_ms]
        keys = K.session_keys(session_id)
        try:
            r = await self._script("transition", keys, args)
        except StoreUnavailable as exc:
            if not _outcome_unknown(exc):
                raise
            return await self._transition_unknown(session_id, expected_version, event, args)
        return self._transition_result(event, r)

    def _transition_result(self, event: SessionEvent, r: Sequence[Any]) -> TransitionResult:
        res: TransitionResult = TRANSITION_REPLY.decode(r, event)
        self._saw_server_time(res.server_ms)
        return res

    async def _transition_unknown(
        self, session_id: bytes, expected: int, event: SessionEvent, args: Sequence[Arg]
    ) -> TransitionResult:
        """Re-read after an unknown outcome: applied, not applied (run again), or moved on."""
        rec = await self.get(session_id)
        if rec is not None and rec.version == expected and not rec.terminated:
            r = await self._script("transition", K.session_keys(session_id), args)
            return self._transition_result(event, r)
        if rec is None:
            return TransitionResult(StoreStatus.UNKNOWN_SESSION, 0, None, None, False, None, 0, 0,
                                    event, recovered=True)  # fmt: skip
        # One mutation happened since: ours if it left the state our event leads to
        # (exact for TRANSPORT_LOST, which records the version it consumed).
        status = StoreStatus.STALE_VERSION
        if rec.version == expected + 1:
            targets = {row[event] for row in TRANSITIONS.values() if event in row}
            if event is SessionEvent.TRANSPORT_LOST:
                if rec.lost_version == expected:
                    status = StoreStatus.OK
            elif rec.state in targets:
                status = StoreStatus.OK
        return TransitionResult(status, rec.version, rec.state, None, False, rec.terminate_reason,
                                rec.epoch, rec.server_ms, event, recovered=True)  # fmt: skip

    async def activate(self, session_id: bytes, epoch: int, binding_id: bytes,
                       node: str) -> ActivateResult:
        """A PENDING binding's path validated: make it the session's ACTIVE binding, ending
        the previous one (store/lua/activate.lua). Idempotent: run again on an unknown
        outcome."""
        gen = self._generation
        if gen is None or time.monotonic() >= self._gen_expires:
            gen = await self.generation()
        keys, args = self._activate_call(session_id, epoch, binding_id, node, gen)
        try:
            r: list[Any] | None = await self._script("activate", keys, args)
            error: StoreUnavailable | None = None
        except StoreUnavailable as exc:
            r, error = None, exc
        return await self._activate_after(keys, args, r, error)

    def activate_soon(self, op: ActivateOp) -> asyncio.Future[ActivateResult]:
        """``activate`` as a future, queued with no task as ``reattach_soon`` is (the
        gateway's way to run it)."""
        gen = self._generation
        if gen is None or not self._queue_ready():
            self.activate_paths["task"] += 1
            return asyncio.ensure_future(self.activate(op.session_id, op.epoch, op.binding_id,
                                                       op.node))
        keys, args = self._activate_call(op.session_id, op.epoch, op.binding_id, op.node, gen)
        self.activate_paths["queued"] += 1
        return self._queued("activate", keys, args, self._activate_reply, self._activate_rest,
                            self.activate_paths)

    def _activate_call(self, session_id: bytes, epoch: int, binding_id: bytes, node: str,
                       gen: int) -> tuple[tuple[str, ...], list[Arg]]:
        """The checked KEYS and ARGV of one activate.lua call."""
        _check_node(node)
        _check_len("binding_id", binding_id, BINDING_ID_LEN)
        return K.session_keys(session_id), [int(epoch), binding_id, node, self._tomb_ms, gen]

    def _activate_reply(self, reply: Any) -> ActivateResult | None:
        """The typed result of a queued activation's reply, or None (as ``_reattach_reply``)."""
        try:
            res: ActivateResult = ACTIVATE_REPLY.decode(_unpack("activate", reply))
        except StoreError:
            return None
        if res.status is StoreStatus.GENERATION_MOVED:
            return None
        self._saw_server_time(res.server_ms)
        return res

    async def _activate_rest(self, keys: tuple[str, ...], args: list[Arg], reply: Any,
                             error: StoreError | None) -> ActivateResult:
        """The rest of ``activate`` after its queued first call gave ``reply`` or ``error``."""
        if error is not None and not isinstance(error, StoreUnavailable):
            raise error
        r = _unpack("activate", reply) if error is None else None
        return await self._activate_after(keys, args, r, error)

    async def _activate_after(self, keys: tuple[str, ...], args: list[Arg],
                              r: list[Any] | None,
                              error: StoreUnavailable | None) -> ActivateResult:
        """Everything ``activate`` does after its first script call (reply ``r`` or ``error``)."""
        if error is not None:
            if not _outcome_unknown(error):
                raise error
            r = await self._script("activate", keys, args)  # idempotent: run it again
        assert r is not None
        gen = int(args[-1])
        res: ActivateResult = ACTIVATE_REPLY.decode(r)
        if (res.status is StoreStatus.GENERATION_MOVED
                and await self._generation_moved_from(gen)):
            args[-1] = self._generation or gen
            res = ACTIVATE_REPLY.decode(await self._script("activate", keys, args))
        if res.status is StoreStatus.GENERATION_MOVED:
            res.status = StoreStatus.UNKNOWN_SESSION
        self._saw_server_time(res.server_ms)
        return res

    async def rekey(self, session_id: bytes, *, epoch: int, binding_id: bytes, node: str,
                    generation: int, wrapped_secret: bytes, wrapped_control: bytes,
                    new_binding_id: bytes) -> RekeyResult:
        """Install the session secret a REKEY derived (store/lua/rekey.lua): by the holder of
        the ACTIVE binding (``epoch``, ``binding_id``, ``node``), from key ``generation``.
        Not idempotent (the second run sees the next generation: STALE_VERSION): an
        unknown outcome is re-read from the record."""
        _check_node(node)
        _check_len("binding_id", binding_id, BINDING_ID_LEN)
        _check_len("new_binding_id", new_binding_id, BINDING_ID_LEN)
        gen = self._generation
        if gen is None or time.monotonic() >= self._gen_expires:
            gen = await self.generation()
        args: list[Arg] = [int(epoch), binding_id, node, int(generation), wrapped_secret,
                           wrapped_control, new_binding_id, self._tomb_ms, gen]
        keys = K.session_keys(session_id)
        try:
            r = await self._script("rekey", keys, args)
        except StoreUnavailable as exc:
            if not _outcome_unknown(exc):
                raise
            rec = await self.get(session_id)
            if rec is None:
                return RekeyResult(StoreStatus.UNKNOWN_SESSION, 0, None, 0, "", 0, 0, False, None)
            applied = (rec.wrapped_secret == wrapped_secret and rec.binding_id == new_binding_id)
            return RekeyResult(StoreStatus.OK if applied else StoreStatus.STALE_VERSION,
                               rec.version, rec.state, rec.epoch, rec.node, rec.key_generation,
                               rec.server_ms, False, rec.terminate_reason)
        res: RekeyResult = REKEY_REPLY.decode(r)
        if res.status is StoreStatus.GENERATION_MOVED:
            res.status = StoreStatus.UNKNOWN_SESSION
        self._saw_server_time(res.server_ms)
        return res

    async def confirm_key(self, session_id: bytes, generation: int) -> bool:
        """The client holds key ``generation``: forget the previous wrapped secret
        (store/lua/confirm_key.lua). True if one was forgotten now."""
        keys = K.session_keys(session_id)[:1]
        try:
            r = await self._script("confirm_key", keys, [int(generation)])
        except StoreUnavailable as exc:
            if not _outcome_unknown(exc):
                raise
            r = await self._script("confirm_key", keys, [int(generation)])  # idempotent
        return int(r[0]) == 1

    async def refresh(self, session_id: bytes, epoch: int, node: str) -> RefreshResult:
        """Keepalive by the binding owner: push the deadline (no version bump) or NOT_OWNER."""
        gen = self._generation
        if gen is None or time.monotonic() >= self._gen_expires:
            gen = await self.generation()
        args: list[Arg] = [int(epoch), node, self._tomb_ms, self._slack_ms, gen]
        keys = K.session_keys(session_id)
        try:
            r = await self._script("refresh", keys, args)
        except StoreUnavailable as exc:
            if not _outcome_unknown(exc):
                raise
            r = await self._script("refresh", keys, args)  # idempotent: run again
        res: RefreshResult = REFRESH_REPLY.decode(r)
        if (res.status is StoreStatus.GENERATION_MOVED
                and await self._generation_moved_from(gen)):
            args[-1] = self._generation or gen
            res = REFRESH_REPLY.decode(await self._script("refresh", keys, args))
        if res.status is StoreStatus.GENERATION_MOVED:
            res.status = StoreStatus.UNKNOWN_SESSION
        self._saw_server_time(res.server_ms)
        return res

    async def terminate(
        self, session_id: bytes, reason: TerminateReason = TerminateReason.ADMIN
    ) -> TerminateResult:
        """Write the tombstone with ``reason`` (idempotent: an existing tombstone stays)."""
        args: list[Arg] = [int(reason), self._tomb_ms]
        keys = K.session_keys(session_id)
        extras = [("ZREM", K.EXPIRY_INDEX, K.session_hex(session_id))]
        try:
            r = await self._script("terminate", keys, args, extras=extras)
        except StoreUnavailable as exc:
            if not _outcome_unknown(exc):
                raise
            r = await self._script("terminate", keys, args, extras=extras)
        res: TerminateResult = TERMINATE_REPLY.decode(r)
        self._saw_server_time(res.server_ms)
        return res

    async def expire(self, session_id: bytes) -> ExpireResult:
        """Tombstone the session if it is past its deadline (one sweeper step)."""
        r = await self._script("expire", K.session_keys(session_id), [self._tomb_ms])
        res: ExpireResult = EXPIRE_REPLY.decode(r)
        self._saw_server_time(res.server_ms)
        return res

    async def sweep(self, limit: int = 256) -> list[ExpiredSession]:
        """Expire due sessions from the expiry index; return those terminated by this call."""
        now = await self.server_time_ms()
        due = cast(list[bytes], await self._guard(
            self.redis.zrangebyscore(K.EXPIRY_INDEX, "-inf", now, 0, limit)
        ))  # fmt: skip
        if not due:
            return []
        # Claim: push the hints past a lease so concurrent sweepers skip them; if we
        # die here they come due again. Two sweepers on one entry are harmless.
        lease = now + self.config.sweep_lease_ms
        await self._guard(self.redis.zadd(K.EXPIRY_INDEX, dict.fromkeys(due, lease), xx=True))
        sids: list[tuple[bytes, bytes | None]] = []
        for member in due:
            try:
                sid: bytes | None = bytes.fromhex(_text(member))
                if sid is not None and len(sid) != K.SESSION_ID_LEN:
                    sid = None
            except ValueError:
                sid = None
            sids.append((member, sid))
        results = await asyncio.gather(
            *(self.expire(sid) for _, sid in sids if sid is not None), return_exceptions=True
        )
        out: list[ExpiredSession] = []
        done: list[bytes] = [m for m, sid in sids if sid is None]
        later: dict[bytes, int] = {}
        it = iter(results)
        for member, sid in sids:
            if sid is None:
                continue
            res = next(it)
            if isinstance(res, BaseException):
                continue  # left claimed: it comes due again after the lease
            if res.status is StoreStatus.OK:
                later[member] = res.deadline_ms
                continue
            done.append(member)
            if res.expired_now and res.prev_state is not None:
                out.append(ExpiredSession(sid, res.version, res.epoch, res.node, res.prev_state,
                                          res.client_id, res.deadline_ms, res.server_ms))  # fmt: skip
        pipe = self.redis.pipeline(transaction=False)
        if done:
            pipe.zrem(K.EXPIRY_INDEX, *done)
        if later:
            pipe.zadd(K.EXPIRY_INDEX, later, xx=True)  # type: ignore[arg-type]
        if done or later:
            await self._guard(pipe.execute())
        return out

    async def get(self, session_id: bytes) -> SessionRecord | None:
        """The decoded record (live or tombstone), or None if there is none."""
        r = await self._script("read", [K.record_key(session_id)], [], mutates=False)
        server_ms = int(r[0])
        self._saw_server_time(server_ms)
        flat = r[1]
        if not flat:
            return None
        return decode_record(session_id, _pairs(flat), server_ms)

    async def list_sessions(self, limit: int = 100, cursor: int = 0) -> SessionPage:
        """A page of records by SCAN (``cursor`` 0 starts; the returned 0 means done).

        On a cluster every master is scanned in turn (the cursor packs the node's
        index in its low 16 bits); a failover or reshard while paging may skip or
        repeat records, as SCAN itself may.
        """
        if isinstance(self._batcher, ClusterScriptBatcher):
            return await self._list_sessions_cluster(self._batcher, limit, cursor)
        found: list[bytes] = []
        while True:
            cursor, batch = await self._guard(
                self.redis.scan(cursor, match=K.SESSION_MATCH, count=max(limit, 100))
            )
            for key in batch:
                sid = K.session_id_from_key(key)
                if sid is not None:
                    found.append(sid)
            if int(cursor) == 0 or len(found) >= limit:
                break
        records = await asyncio.gather(*(self.get(sid) for sid in found))
        return SessionPage([r for r in records if r is not None], int(cursor))

    async def _list_sessions_cluster(
        self, batcher: ClusterScriptBatcher, limit: int, cursor: int
    ) -> SessionPage:
        nodes = await batcher.primaries()
        index, node_cursor = cursor & 0xFFFF, cursor >> 16
        found: list[bytes] = []
        while index < len(nodes) and len(found) < limit:
            client = batcher.node_client(nodes[index])
            node_cursor, batch = await self._guard(
                client.scan(node_cursor, match=K.SESSION_MATCH, count=max(limit, 100))
            )
            node_cursor = int(node_cursor)
            for key in batch:
                sid = K.session_id_from_key(key)
                if sid is not None:
                    found.append(sid)
            if node_cursor == 0:
                index += 1
        records = await asyncio.gather(*(self.get(sid) for sid in found))
        nxt = 0 if index >= len(nodes) else (node_cursor << 16) | index
        return SessionPage([r for r in records if r is not None], nxt)

    async def claim_slot(self, client_id: str, session_id: bytes, limit: int,
                         end_ms: int) -> SlotResult:
        """Count a new session against its client's quota (store/lua/slot.lua)."""
        key = K.client_sessions_key(client_id)
        args: list[Arg] = [K.session_hex(session_id), int(limit), int(end_ms)]
        try:
            r = await self._script("slot", (key,), args)
        except StoreUnavailable as exc:
            if not _outcome_unknown(exc):
                raise
            r = await self._script("slot", (key,), args)  # idempotent: the same member
        res: SlotResult = SLOT_REPLY.decode(r)
        return res

    async def release_slot(self, client_id: str, session_id: bytes) -> int:
        """The session ended: it no longer counts against its client's quota."""
        key = K.client_sessions_key(client_id)
        return int(await self._guard(self.redis.zrem(key, K.session_hex(session_id))))

    async def claim_addresses(self, session_id: bytes, pool: str, size: int) -> AddressResult:
        """Allocate the session's inner-address index (store/lua/addr.lua; idempotent)."""
        args: list[Arg] = [K.session_hex(session_id), pool, int(size)]
        try:
            r = await self._script("addr", K.POOL_KEYS, args)
        except StoreUnavailable as exc:
            if not _outcome_unknown(exc):
                raise
            r = await self._script("addr", K.POOL_KEYS, args)  # idempotent: the same index
        res: AddressResult = ADDR_REPLY.decode(r)
        return res

    async def release_addresses(self, session_id: bytes) -> int:
        """The session ended: its inner addresses go back to the pool (1 if freed now)."""
        r = await self._script("addr_free", K.POOL_KEYS[1:], [K.session_hex(session_id)])
        return int(r[0])

    async def address_owner(self, index: int) -> bytes | None:
        """The session holding pool index ``index`` (None if free)."""
        raw = await self._guard(self.redis.hget(K.POOL_KEYS[2], str(int(index))))
        if not raw:
            return None
        try:
            return bytes.fromhex(_text(raw))
        except ValueError:
            return None

    async def reclaim_addresses(self, grace_ms: int = 60_000, limit: int = 1000) -> int:
        """Free the inner addresses of sessions that ended without releasing them (a node
        died between the end and the release): held longer than ``grace_ms`` (a claim
        precedes its birth) by a session whose record is a tombstone or gone. Bounded by
        ``limit`` entries per call; returns how many were freed."""
        now = await self.server_time_ms()
        freed, cursor = 0, 0
        for _ in range(max(1, limit // 100)):  # pages of ~100, bounded
            cursor, page = await self._guard(self.redis.hscan(K.POOL_KEYS[3], cursor, count=100))
            freed += await self._reclaim_page(cast(Mapping[bytes, bytes], page), now, grace_ms)
            if not cursor:
                break
        return freed

    async def _reclaim_page(self, page: Mapping[bytes, bytes], now: int, grace_ms: int) -> int:
        freed = 0
        for sid_hex, held in page.items():
            idx, _, since = _text(held).partition(":")
            if not since.isdigit() or now - int(since) < grace_ms:
                continue
            try:
                sid = bytes.fromhex(_text(sid_hex))
                rec = await self.get(sid)
            except ValueError:
                continue
            if rec is None or rec.terminated:
                freed += await self.release_addresses(sid)
        return freed

    async def set_relay(self, node: str, address: str | None) -> None:
        """Announce (or, None, withdraw) this node's relay address for routed egress."""
        if address is None:
            await self._guard(self.redis.hdel(K.RELAYS, node))
        else:
            await self._guard(self.redis.hset(K.RELAYS, node, address))

    async def relay_of(self, node: str) -> str | None:
        """A node's relay address (None if it announced none)."""
        raw = await self._guard(self.redis.hget(K.RELAYS, node))
        return _text(raw) if raw else None

    async def egress_lease(self, node: str, lease_ms: int) -> tuple[str, int]:
        """Hold or take the routed egress lease (store/lua/lead.lua); 0 gives it up.
        Returns (holder, its remaining ms)."""
        r = await self._script("lead", (K.EGRESS_LEAD,), [node, int(lease_ms)])
        return _text(r[0]), int(r[1])

    async def claim_handshake(self, digest: bytes, ttl_ms: int) -> bool:
        """Record a handshake message digest once (replay guard); False if seen already."""
        ok = await self._guard(self.redis.set(K.handshake_key(digest), b"1", nx=True,
                                              px=max(1, int(ttl_ms))))  # fmt: skip
        return bool(ok)

    # ---- client registry (the allowlist) -----------------------------------------------------

    async def add_client(self, policy: ClientPolicy) -> ClientPolicy:
        """Register (or replace) a client key and its policy; returns it with ``created_ms``."""
        if not policy.created_ms:
            policy = replace(policy, created_ms=await self.server_time_ms())
        key = K.client_key(policy.public_key)
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(key)
        pipe.hset(key, mapping=encode_policy(policy, self._registry_key()))  # type: ignore[arg-type]
        await self._guard(pipe.execute())
        return policy

    def _registry_key(self) -> bytes:
        if self.registry_key is None:
            raise ValueError("the client registry is MAC'd under a key derived from the KEK: "
                             "set SessionStore.registry_key (session.keys.registry_key(kek))")
        return self.registry_key

    async def remove_client(self, public_key: bytes | str) -> bool:
        """Remove a client key from the registry; False if it was not there."""
        pk = _public_key(public_key)
        return bool(await self._guard(self.redis.delete(K.client_key(pk))))

    async def revoke_client(self, public_key: bytes | str,
                            max_pages: int = 100_000) -> tuple[bool, list[bytes]]:
        """Remove a client key and end its live sessions cluster-wide.

        The registry entry goes first (no new handshake, and every gateway's registry
        check fails from then on); then every live session of that client is tombstoned
        (POLICY_REVOKED) and its owner is woken by a binding-change notice, so it closes
        the client with an authenticated CLOSE at once. Returns (was registered, the
        session ids ended). A session born while this runs is ended by the gateways'
        registry check at its next reattach or refresh.
        """
        pk = _public_key(public_key)
        removed = await self.remove_client(pk)
        await self._guard(self.redis.delete(K.client_sessions_key(pk.hex())))
        cid, ended, cursor = pk.hex(), [], 0
        for _ in range(max_pages):
            page = await self.list_sessions(500, cursor)
            for rec in page.sessions:
                if rec.client_id != cid or rec.terminated:
                    continue
                res = await self.terminate(rec.session_id, TerminateReason.POLICY_REVOKED)
                if res.ok and not res.already:
                    ended.append(rec.session_id)
                    await self.publish_binding_change(rec.session_id, "-", 0)
            cursor = page.cursor
            if cursor == 0:
                break
        return removed, ended

    async def get_client(self, public_key: bytes | str) -> ClientPolicy | None:
        """The policy of a client key (bytes or hex), or None if it is not registered."""
        pk = _public_key(public_key)
        raw = cast(dict[bytes, bytes], await self._guard(self.redis.hgetall(K.client_key(pk))))
        if not raw:
            return None
        try:
            return decode_policy(pk, raw, self._registry_key(), self.previous_registry_keys)
        except RegistryEntryRefused as exc:  # forged or changed in the store: unknown client
            self.registry_refused += 1
            log.warning("client entry %s refused: %s", pk.hex()[:16], exc)
            if self.on_registry_refused is not None:
                self.on_registry_refused(pk, str(exc))
            return None
        except (ValueError, KeyError) as exc:
            raise StoreProtocolError(f"malformed client entry {pk.hex()}: {exc}") from exc

    async def list_clients(self) -> list[ClientPolicy]:
        """Every registered client, sorted by name then key."""
        out: list[ClientPolicy] = []
        async for key in _scan_iter(self, K.CLIENT_MATCH):
            hexkey = _text(key)[len(K.CLIENT_PREFIX) :]
            try:
                policy = await self.get_client(hexkey)
            except (ValueError, StoreProtocolError):
                continue
            if policy is not None:
                out.append(policy)
        return sorted(out, key=lambda p: (p.name, p.public_key))

    async def remac_clients(self) -> tuple[int, int]:
        """Rewrite every registry entry under ``registry_key`` (the current KEK's), reading
        each with the previous keys too: the last step of a KEK rotation, after which the
        previous KEK can be dropped. Returns (rewritten, refused: a bad MAC under every key,
        left as they are and reported as get_client does)."""
        rewritten = refused = 0
        async for key in _scan_iter(self, K.CLIENT_MATCH):
            hexkey = _text(key)[len(K.CLIENT_PREFIX) :]
            try:
                policy = await self.get_client(hexkey)
            except (ValueError, StoreProtocolError):
                refused += 1
                continue
            if policy is None:  # refused, or removed meanwhile
                refused += 1
                continue
            await self.add_client(policy)
            rewritten += 1
        return rewritten, refused

    # ---- pub/sub and audit -------------------------------------------------------------------

    async def register_node(self, node: str, info: Mapping[str, Any], ttl_s: float) -> None:
        """Announce a gateway node (its admin address, for ``jvpn status``) for ``ttl_s``:
        a node that stops renewing disappears; one that renews but does not answer is
        still listed, and shown as not answering."""
        _check_node(node)
        body = json.dumps({**info, "node": node}, separators=(",", ":"))
        await self._guard(self.redis.set(K.node_key(node), body, px=max(1, int(ttl_s * 1000))))

    async def unregister_node(self, node: str) -> None:
        """Remove a node's registration (it stops)."""
        await self._guard(self.redis.delete(K.node_key(node)))

    async def list_nodes(self) -> list[dict[str, Any]]:
        """Every registered gateway node (sorted by name); malformed entries are skipped."""
        out: list[dict[str, Any]] = []
        async for key in _scan_iter(self, K.NODE_MATCH):
            raw = await self._guard(self.redis.get(key))
            if raw is None:
                continue  # expired between SCAN and GET
            try:
                info = json.loads(raw)
            except ValueError:
                continue
            if isinstance(info, dict) and isinstance(info.get("node"), str):
                out.append(info)
        return sorted(out, key=lambda i: i["node"])

    async def publish_binding_change(self, session_id: bytes, new_node: str, epoch: int) -> int:
        """Tell every node that ``new_node`` holds the session at ``epoch``; returns receivers."""
        payload = json.dumps({"sid": K.session_hex(session_id), "node": new_node,
                              "epoch": int(epoch)}, separators=(",", ":"))  # fmt: skip
        return int(await self._guard(self.redis.publish(K.BINDINGS_CHANNEL, payload)))

    async def binding_changes(self, poll_s: float = 0.5) -> AsyncIterator[BindingChange]:
        """Binding changes published by any node, as they come (raises StoreUnavailable).

        A subscriber misses what is published while it is disconnected: the
        refresh (NOT_OWNER) and the lease fence a node anyway.
        """
        batcher = self._batcher
        if isinstance(batcher, ClusterScriptBatcher):
            # Any master will do: a classic PUBLISH is broadcast to every node of the cluster.
            client: Redis | RedisCluster = await batcher.any_node_client()
        else:
            client = self.redis
        pubsub = client.pubsub()
        try:
            try:
                await self._guard(pubsub.subscribe(K.BINDINGS_CHANNEL))
            except StoreUnavailable:
                if isinstance(batcher, ClusterScriptBatcher):
                    batcher.schedule_refresh()  # the next subscription picks a live master
                raise
            while True:
                try:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=poll_s)
                except Exception as exc:
                    if isinstance(batcher, ClusterScriptBatcher):
                        batcher.schedule_refresh()
                    raise translate(exc) from exc
                if msg is None or msg.get("type") != "message":
                    continue
                change = _decode_change(msg.get("data"))
                if change is not None:
                    yield change
        finally:
            try:
                await asyncio.wait_for(pubsub.aclose(), self.config.socket_timeout_s)
            except Exception:
                pass

    async def xadd_event(
        self, fields: Mapping[str, Any], maxlen: int = 100_000, stream: str = K.AUDIT_STREAM
    ) -> str:
        """Append one event to the audit stream (approximate MAXLEN); returns its id."""
        enc: dict[str, bytes | str] = {}
        for k, v in fields.items():
            if isinstance(v, bytes | str):
                enc[k] = v
            elif isinstance(v, bool) or v is None or isinstance(v, dict | list | tuple):
                enc[k] = json.dumps(v)
            else:
                enc[k] = str(v)
        entry = await self._guard(
            self.redis.xadd(stream, enc, maxlen=maxlen, approximate=True)  # type: ignore[arg-type]
        )
        return _text(entry)


# ---- helpers ---------------------------------------------------------------------------------


def _settle(out: asyncio.Future[T], src: asyncio.Future[T]) -> None:
    """Complete ``out`` as ``src`` completed (unless ``out`` is done already)."""
    if out.done():
        return
    if src.cancelled():
        out.cancel()
    elif (exc := src.exception()) is not None:
        out.set_exception(exc)
    else:
        out.set_result(src.result())


def _random_generation(avoid: int | None = None) -> int:
    while True:
        gen = int.from_bytes(os.urandom(4), "big") & 0x7FFFFFFF
        if gen and gen != avoid:
            return gen


def _outcome_unknown(exc: StoreUnavailable) -> bool:
    """Whether a failed mutation may have applied and should be re-read here."""
    return exc.maybe_applied and not isinstance(exc, StoreNotDurable)


def _unpack(name: str, reply: Any) -> list[Any]:
    """A script's flat array (msgpack-encoded by reply() in common.lua)."""
    try:
        out = msgpack.unpackb(reply, raw=True) if isinstance(reply, bytes) else None
    except (ValueError, msgpack.UnpackException) as exc:
        raise StoreProtocolError(f"{name}.lua returned undecodable {reply[:64]!r}") from exc
    if not isinstance(out, list):
        raise StoreProtocolError(f"{name}.lua returned {reply!r}")
    return out


def _pairs(flat: Sequence[bytes]) -> dict[bytes, bytes]:
    return {flat[i]: flat[i + 1] for i in range(0, len(flat) - 1, 2)}


def _check_len(name: str, value: bytes, n: int) -> None:
    if not isinstance(value, bytes) or len(value) != n:
        raise ValueError(f"{name} must be {n} bytes")


def _check_node(node: str) -> None:
    if not node or len(node.encode()) > MAX_NODE_LEN:
        raise ValueError(f"node id must be 1..{MAX_NODE_LEN} bytes")


def _public_key(pk: bytes | str) -> bytes:
    raw = bytes.fromhex(pk) if isinstance(pk, str) else pk
    if len(raw) != 32:
        raise ValueError("client public key must be 32 bytes (or 64 hex digits)")
    return raw


def _decode_change(data: Any) -> BindingChange | None:
    try:
        d = json.loads(data)
        sid = bytes.fromhex(d["sid"])
        if len(sid) != K.SESSION_ID_LEN:
            return None
        return BindingChange(sid, str(d["node"]), int(d["epoch"]))
    except (ValueError, KeyError, TypeError):
        return None


async def _scan_iter(store: SessionStore, match: str) -> AsyncIterator[bytes]:
    """Every key matching ``match`` (on a cluster: on every master)."""
    batcher = store.batcher
    clients: list[Redis | RedisCluster] = (
        [batcher.node_client(n) for n in await batcher.primaries()]
        if isinstance(batcher, ClusterScriptBatcher) else [store.redis]
    )  # fmt: skip
    for client in clients:
        cursor = 0
        while True:
            cursor, batch = await store._guard(client.scan(cursor, match=match, count=500))
            for key in batch:
                yield key if isinstance(key, bytes) else key.encode()
            if int(cursor) == 0:
                break
