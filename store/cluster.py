"""Redis Cluster mode: route each script call to its slot's master, one coalescing pipeline per node.

Theory of operation. Every key of one session shares the hash tag
``{<sid hex>}``, so each script touches one slot and runs on that slot's
master. ``ClusterScriptBatcher`` keeps the batching of ``store.batcher`` but
per node: a call is routed by the slot of its first key (the slot map of
redis-py's ``NodesManager``) to that master's ``NodeBatcher``, which
coalesces concurrent calls into one pipeline on one connection, exactly like
the single-instance batcher. A slow or dead node therefore stalls only its
own queue, never the flushers of the healthy ones. Companion commands (the
expiry-index hints) are routed by their own key, in parallel with the script.

Redirections are retried in the caller's coroutine, within one call timeout:
MOVED, ASK, TRYAGAIN, CLUSTERDOWN, MASTERDOWN, an uncovered slot and a refused
connection all mean the command did not run, so re-routing and re-sending it
is safe (MOVED patches the slot map, ASK sends ``ASKING`` before the call on
the target, the others refresh the slot map, single flight, and back off).
When the budget is spent the call raises ``StoreUnavailable`` with
``maybe_applied=False``. A connection lost after sending, or a timeout, is an
unknown outcome: it raises ``StoreUnavailable(maybe_applied=True)`` and the
caller's re-read logic (``store.api``) applies unchanged. NOSCRIPT (a node that
never saw the script, e.g. a replica promoted by a failover: Redis does not
replicate ``SCRIPT LOAD``) loads the script on that node and resends.

The store URL ``redis+cluster://host:port[,host:port...]`` (``rediss+cluster``
for TLS) selects this mode; ``SessionStore`` also accepts a
``redis.asyncio.cluster.RedisCluster``. Node connections come from pools of our
own (same connection settings as the cluster client), so redis-py's cluster
client resetting its connections after an error never cuts our pipelines.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import unquote

from redis import exceptions as rexc
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot

from store.batcher import PipelineQueue, ScriptCall, pack_command, pack_evalsha, translate
from store.errors import StoreError, StoreUnavailable
from store.scripts import LuaScript

__all__ = [
    "CLUSTER_SCHEMES",
    "ClusterScriptBatcher",
    "NodeBatcher",
    "NotRun",
    "connect_cluster",
    "is_cluster_url",
    "parse_cluster_url",
]

CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}  # scheme -> TLS
MAX_ATTEMPTS = 8  # sends of one call (redirections and refusals) within its deadline
MIN_REFRESH_INTERVAL_S = 0.1  # slot-map refreshes, at most this often
_BACKOFF_S = (0.02, 0.05, 0.1, 0.2)  # before retrying a TRYAGAIN / CLUSTERDOWN / refusal


# ---- URLs ------------------------------------------------------------------------------------


def is_cluster_url(url: str) -> bool:
    """Whether ``url`` selects cluster mode (``redis+cluster://`` or ``rediss+cluster://``)."""
    return url.split("://", 1)[0].lower() in CLUSTER_SCHEMES


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """``redis+cluster://[user:password@]host:port[,host:port...][/0]`` -> (nodes, kwargs)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in CLUSTER_SCHEMES:
        raise ValueError(f"not a cluster URL (redis+cluster://host:port,...): {url!r}")
    rest, _, query = rest.partition("?")
    if query:
        raise ValueError("cluster URL: query parameters are not supported")
    netloc, _, path = rest.partition("/")
    if path not in ("", "0"):
        raise ValueError("cluster URL: Redis Cluster has only database 0")
    userinfo, _, hosts = netloc.rpartition("@")
    kwargs: dict[str, Any] = {"ssl": CLUSTER_SCHEMES[scheme.lower()]}
    if userinfo:
        user, has_pw, password = userinfo.partition(":")
        if user:
            kwargs["username"] = unquote(user)
        if has_pw:
            kwargs["password"] = unquote(password)
    nodes: list[tuple[str, int]] = []
    for part in hosts.split(","):
        host, colon, port = part.strip().rpartition(":")
        if not colon or not host or not port.isdigit():
            raise ValueError(f"cluster URL: expected host:port, got {part!r}")
        nodes.append((host.strip("[]"), int(port)))
    return nodes, kwargs


def connect_cluster(
    url: str, *, socket_timeout: float, connect_timeout: float, max_connections: int,
    **tls: Any,
) -> RedisCluster:
    """A RedisCluster client for a cluster URL; its own retries are off (fail fast)."""
    nodes, kwargs = parse_cluster_url(url)
    kwargs.update(tls)
    return RedisCluster(
        startup_nodes=[ClusterNode(h, p) for h, p in nodes],
        require_full_coverage=False,  # the slots still served stay usable
        retry=Retry(NoBackoff(), 0),
        max_connections=max_connections,
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
        decode_responses=False,
        **kwargs,
    )


# ---- one node --------------------------------------------------------------------------------


class _Op:
    """One command for one node: a packed EVALSHA (``script`` set) or a plain command."""

    __slots__ = ("packed", "script", "mutates", "asking", "future")

    def __init__(
        self,
        packed: bytes,
        script: LuaScript | None,
        mutates: bool,
        asking: bool,
        future: asyncio.Future[Any] | None = None,  # the caller's own, on a first attempt
    ) -> None:
        self.packed = packed
        self.script = script
        self.mutates = mutates
        self.asking = asking
        self.future = future if future is not None else asyncio.get_running_loop().create_future()


class NotRun(StoreUnavailable):
    """The node refused the command before running it (redirect, cluster down, refused)."""

    def __init__(self, message: str, reply: BaseException | None = None) -> None:
        super().__init__(message, maybe_applied=False)
        self.reply = reply


_REFUSALS = (rexc.AskError, rexc.TryAgainError, rexc.ClusterDownError)  # MOVED is an AskError


class NodeBatcher(PipelineQueue):
    """Coalesces the commands for one node into pipelines on one connection at a time."""

    def __init__(
        self,
        name: str,
        pool: BlockingConnectionPool,
        *,
        max_batch: int,
        max_inflight: int,
        wait_replicas: int,
        wait_timeout_ms: int,
        batch_timeout_s: float,
        on_failure: Callable[[], object],
    ) -> None:
        super().__init__(max_batch=max_batch, max_inflight=max_inflight,
                         wait_replicas=wait_replicas, wait_timeout_ms=wait_timeout_ms,
                         batch_timeout_s=batch_timeout_s)
        self.name = name
        self.pool = pool
        self._on_failure = on_failure  # the connection failed: refresh the slot map

    def _pool(self) -> Any:
        return self.pool

    async def submit(self, op: _Op) -> Any:
        self.enqueue(op)
        return await op.future

    async def run_direct(self, op: _Op) -> Any:
        try:
            await self._run([op])
        except asyncio.CancelledError:
            if op.future.done() and not op.future.cancelled():
                op.future.exception()  # retrieved: the caller is gone
            raise
        return await op.future

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self._fail_pending(StoreUnavailable("store closed"))
        await self.pool.aclose()

    async def _run(self, batch: list[_Op], *, load: Sequence[LuaScript] = ()) -> None:
        commands = [pack_command(("SCRIPT", "LOAD", s.source)) for s in load]
        for op in batch:
            if op.asking:
                commands.append(b"*1\r\n$6\r\nASKING\r\n")
            commands.append(op.packed)
        try:
            replies, durable = await self._send(batch, commands)
        except StoreError as exc:
            err = exc
            if isinstance(err, StoreUnavailable) and not err.maybe_applied:
                err = NotRun(f"{self.name}: {err}")  # nothing was sent: re-route and retry
            _fail(batch, err)
            self._on_failure()
            return

        acked_error = self._wait_error(replies[-1], f" on {self.name}") if durable else None
        missing: list[_Op] = []
        i = len(load)
        for op in batch:
            if op.asking:
                i += 1  # ASKING's +OK
            reply = replies[i]
            i += 1
            if op.future.done():
                continue
            if type(reply) is bytes or not isinstance(reply, Exception):
                if acked_error is not None and op.mutates:
                    op.future.set_exception(acked_error)
                else:
                    op.future.set_result(reply)
            elif isinstance(reply, rexc.NoScriptError) and op.script is not None and not load:
                missing.append(op)
            elif isinstance(reply, _REFUSALS):
                code = getattr(reply, "status_code", None) or type(reply).__name__
                op.future.set_exception(NotRun(f"{self.name}: {code} {reply}", reply))
            else:
                op.future.set_exception(translate(reply))
        if missing:
            # This node lacks the script (new node, promoted replica, SCRIPT FLUSH): load it in
            # the same pipeline as the resend. NOSCRIPT means it did not run.
            scripts = list({op.script.sha: op.script for op in missing if op.script}.values())
            await self._run(missing, load=scripts)


# ---- the router ------------------------------------------------------------------------------


class ClusterScriptBatcher:
    """Routes script calls to per-master NodeBatchers; ``call`` is coroutine-safe."""

    def __init__(
        self,
        cluster: RedisCluster,
        *,
        max_batch: int = 512,
        max_inflight: int = 2,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 100,
        batch_timeout_s: float = 3.0,
        max_connections: int = 64,
    ) -> None:
        if max_batch < 1 or max_inflight < 1:
            raise ValueError("max_batch and max_inflight must be >= 1")
        self.cluster = cluster
        self.max_batch = max_batch
        self.max_inflight = max_inflight
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self.batch_timeout_s = batch_timeout_s
        kwargs: dict[str, Any] = dict(cluster.get_connection_kwargs())
        self._conn_class: Any = kwargs.pop("connection_class")
        for unused in ("max_connections", "response_callbacks", "host", "port"):
            kwargs.pop(unused, None)
        kwargs["retry"] = Retry(NoBackoff(), 0)  # never resend on our own: outcomes are re-read
        self._conn_kwargs = kwargs
        self._max_connections = max_connections
        self._nodes: dict[str, NodeBatcher] = {}
        self._refresh_task: asyncio.Task[None] | None = None
        self._refreshed_at = -math.inf
        self.redirects = 0  # MOVED/ASK/TRYAGAIN/CLUSTERDOWN/refusals retried (metrics, tests)
        self.refreshes = 0  # slot-map refreshes

    @property
    def batches(self) -> int:
        return sum(n.batches for n in self._nodes.values())

    @property
    def calls(self) -> int:
        return sum(n.calls for n in self._nodes.values())

    async def call(self, call: ScriptCall) -> Any:
        """Route ``call`` (and its companion commands) and wait for its own reply."""
        # The fast path is flat (one coroutine, the caller's own future): this runs at the
        # rate of the whole cluster, and every await frame costs on each resume.
        packed = pack_evalsha(call.script.sha, call.keys, call.args)
        slot = _slot(call.keys[0])
        hints = [self._enqueue_hint(e) for e in call.extras] if call.extras else ()
        nodes = self.cluster.nodes_manager.slots_cache.get(slot)
        cancelled = False
        try:
            if not nodes:
                return await self.send(packed, slot, call.script, call.mutates, False)
            op = _Op(packed, call.script, call.mutates, False, call.future)
            name = nodes[0].name
            (self._nodes.get(name) or self._node(name)).enqueue(op)
            try:
                return await op.future
            except NotRun as exc:
                return await self._rerun(exc, packed, slot, call.script, call.mutates, False)
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:
            for hint in hints:
                if cancelled:  # the caller is gone: let the hint finish on its own
                    if hint[0] is not None:
                        hint[0].future.add_done_callback(_retrieve)
                else:
                    await self._settle_hint(hint)

    async def call_direct(self, call: ScriptCall) -> Any:
        """Like ``call`` but in a pipeline of its own (baseline, tests)."""
        packed = pack_evalsha(call.script.sha, call.keys, call.args)
        main = self.send(packed, _slot(call.keys[0]), call.script, call.mutates, True)
        hints = [self.send(pack_command(e), _slot(e[1]), None, False, True) for e in call.extras]
        out = await asyncio.gather(main, *hints, return_exceptions=True)
        if isinstance(out[0], BaseException):
            raise out[0]
        return out[0]

    def _enqueue_hint(self, extra: Sequence[Any]) -> tuple[_Op | None, bytes, int]:
        """Queue a companion command (an expiry-index hint: its reply is ignored)."""
        packed, slot = pack_command(extra), _slot(extra[1])
        nodes = self.cluster.nodes_manager.slots_cache.get(slot)
        if not nodes:
            return None, packed, slot
        op = _Op(packed, None, False, False)
        name = nodes[0].name
        (self._nodes.get(name) or self._node(name)).enqueue(op)
        return op, packed, slot

    async def _settle_hint(self, hint: tuple[_Op | None, bytes, int]) -> None:
        """Wait for a hint (as the single-instance pipeline does); re-route it if it did not
        run; its errors are ignored (a lost hint costs garbage collection, never safety)."""
        op, packed, slot = hint
        try:
            if op is None:
                await self.send(packed, slot, None, False, False)
                return
            try:
                await op.future
            except NotRun as exc:
                await self._rerun(exc, packed, slot, None, False, False)
        except StoreError:
            pass

    async def send(
        self, packed: bytes, slot: int, script: LuaScript | None, mutates: bool, direct: bool
    ) -> Any:
        """Send one packed command to the master of ``slot``, re-routing while it did not run."""
        if not self.cluster.nodes_manager.slots_cache:
            await self._initialize()
        try:
            return await self._attempt(self._owner(slot), packed, script, mutates, False, direct)
        except NotRun as exc:
            return await self._rerun(exc, packed, slot, script, mutates, direct)

    async def _rerun(
        self, first: NotRun, packed: bytes, slot: int, script: LuaScript | None, mutates: bool,
        direct: bool,
    ) -> Any:  # fmt: skip
        """The rare path: redirected or refused (not run). Retry within one call timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.batch_timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                return await self._retry(first, packed, slot, script, mutates, direct, deadline)
        except TimeoutError:
            raise StoreUnavailable(
                "store timeout (cluster redirections)", maybe_applied=True
            ) from None

    async def _retry(
        self, exc: NotRun, packed: bytes, slot: int, script: LuaScript | None, mutates: bool,
        direct: bool, deadline: float,
    ) -> Any:  # fmt: skip
        loop = asyncio.get_running_loop()
        for attempt in range(1, MAX_ATTEMPTS):
            self.redirects += 1
            reply, asking = exc.reply, None
            if isinstance(reply, rexc.MovedError):
                await self.cluster.nodes_manager.move_slot(reply)
            elif isinstance(reply, rexc.AskError):
                asking = f"{reply.host}:{reply.port}"
            else:  # TRYAGAIN, CLUSTERDOWN, MASTERDOWN, refused, uncovered: wait, maybe remap
                delay = _BACKOFF_S[min(attempt - 1, len(_BACKOFF_S) - 1)]
                if loop.time() + delay >= deadline:
                    raise exc
                if not isinstance(reply, rexc.TryAgainError):
                    self.schedule_refresh()
                await asyncio.sleep(delay)
                if self._refresh_task is not None:
                    await asyncio.shield(self._refresh_task)
            try:
                node = asking or self._owner(slot)
                return await self._attempt(node, packed, script, mutates, asking is not None,
                                           direct)  # fmt: skip
            except NotRun as again:
                exc = again
        raise exc

    async def _attempt(
        self, node: str, packed: bytes, script: LuaScript | None, mutates: bool, asking: bool,
        direct: bool,
    ) -> Any:  # fmt: skip
        op = _Op(packed, script, mutates, asking)
        nb = self._nodes.get(node) or self._node(node)
        return await (nb.run_direct(op) if direct else nb.submit(op))

    def _owner(self, slot: int) -> str:
        nodes = self.cluster.nodes_manager.slots_cache.get(slot)
        if not nodes:
            raise NotRun(f"slot {slot} is not covered (slot map being refreshed)")
        return nodes[0].name

    def _node(self, name: str) -> NodeBatcher:
        nb = self._nodes.get(name)
        if nb is None:
            host, _, port = name.rpartition(":")
            pool = BlockingConnectionPool(
                connection_class=self._conn_class,
                max_connections=self._max_connections,
                timeout=self.batch_timeout_s,
                host=host,
                port=int(port),
                **self._conn_kwargs,
            )
            nb = self._nodes[name] = NodeBatcher(
                name, pool, max_batch=self.max_batch, max_inflight=self.max_inflight,
                wait_replicas=self.wait_replicas, wait_timeout_ms=self.wait_timeout_ms,
                batch_timeout_s=self.batch_timeout_s, on_failure=self.schedule_refresh,
            )  # fmt: skip
        return nb

    # ---- topology ----------------------------------------------------------------------------

    async def _initialize(self) -> None:
        try:
            await self.cluster.initialize()
        except Exception as exc:
            raise StoreUnavailable(f"store cluster unreachable: {exc}") from exc

    def schedule_refresh(self) -> asyncio.Task[None] | None:
        """Refresh the slot map soon (single flight, at most every MIN_REFRESH_INTERVAL_S)."""
        task = self._refresh_task
        if task is not None:
            return task
        loop = asyncio.get_running_loop()
        if loop.time() - self._refreshed_at < MIN_REFRESH_INTERVAL_S:
            return None
        task = self._refresh_task = loop.create_task(self._refresh())
        return task

    async def _refresh(self) -> None:
        try:
            await self.cluster.nodes_manager.initialize()
            self.refreshes += 1
        except Exception:
            pass  # no node answered: the callers' own retries and timeouts decide
        finally:
            self._refreshed_at = asyncio.get_running_loop().time()
            self._refresh_task = None

    async def primaries(self) -> list[str]:
        """Names (host:port) of the masters in the current slot map, sorted."""
        if not self.cluster.nodes_manager.slots_cache:
            await self._initialize()
        return sorted({nodes[0].name for nodes in self.cluster.nodes_manager.slots_cache.values()
                       if nodes})  # fmt: skip

    def node_client(self, name: str) -> Redis:
        """A plain client on node ``name``, sharing our pool for it (do not close the pool)."""
        return Redis(connection_pool=self._node(name).pool)

    async def any_node_client(self) -> Redis:
        """A client on a random master (classic pub/sub reaches every node of the cluster)."""
        return self.node_client(random.choice(await self.primaries()))

    async def close(self) -> None:
        task = self._refresh_task
        if task is not None:
            task.cancel()
        for nb in list(self._nodes.values()):
            await nb.close()
        self._nodes.clear()


def _slot(key: Any) -> int:
    return key_slot(key.encode() if type(key) is str else bytes(key))


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _fail(ops: list[_Op], error: StoreError) -> None:
    for op in ops:
        if not op.future.done():
            op.future.set_exception(error)
