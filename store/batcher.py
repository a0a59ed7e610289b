"""Coalesce concurrent script calls into pipelines.

Theory of operation. One redis.asyncio call costs a full client round trip
and most of it is Python, so one call at a time tops out far below what Redis
can execute. Callers therefore enqueue (script, keys, args, future); a
flusher task, started on the next loop iteration after the first enqueue
(no added latency when idle), takes everything pending (at most
``max_batch``), sends it as ONE non-transactional pipeline of EVALSHA
commands, resolves each future with its own reply or error, and loops while
work remains. Up to ``max_inflight`` flushers run at once, so one batch is
being built or parsed while the previous is on the wire.

A NOSCRIPT reply (the server restarted or flushed its script cache) means
that script did not run: it is loaded and only those calls are sent again.
A connection failure fails every call of the batch: the caller maps it to
``StoreUnavailable`` and, for a mutation, re-reads the outcome.

Durable mode: when ``wait_replicas > 0`` and the batch holds a mutation, a
``WAIT n timeout`` ends the pipeline (same connection, so it covers every
write of the batch); fewer acknowledgements fail the batch's mutations with
``StoreUnavailable(maybe_applied=True)``.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from redis import exceptions as rexc
from redis.asyncio import Redis

from store.errors import StoreError, StoreNotDurable, StoreProtocolError, StoreUnavailable
from store.scripts import LuaScript

Arg = bytes | str | int | float

# Replies (first word) that mean "the store cannot answer now": fail closed.
UNAVAILABLE_PREFIXES = frozenset(
    {"BUSY", "LOADING", "READONLY", "NOREPLICAS", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "OOM"}
)


def translate(exc: BaseException) -> StoreError:
    """Map a redis-py / socket error to StoreUnavailable or StoreError."""
    if isinstance(exc, StoreError):
        return exc
    text = str(exc) or type(exc).__name__
    if isinstance(exc, rexc.RedisClusterException | rexc.ClusterError | rexc.AskError):
        # No reachable node, slot not covered, redirections exhausted (MOVED/ASK): not run.
        return StoreUnavailable(f"store cluster unavailable: {type(exc).__name__} {text}")
    if isinstance(exc, rexc.ResponseError):
        # redis-py strips known prefixes into the class (and status_code); the rest
        # (BUSY, NOREPLICAS) stay at the start of the message.
        code = str(getattr(exc, "status_code", "") or text.split(" ", 1)[0]).upper()
        if code in UNAVAILABLE_PREFIXES or isinstance(
            exc,
            rexc.ReadOnlyError | rexc.OutOfMemoryError | rexc.ClusterDownError | rexc.TryAgainError,
        ):
            return StoreUnavailable(f"store refused: {code} {text}")
        return StoreProtocolError(f"store error: {text}")
    if isinstance(exc, rexc.BusyLoadingError):
        return StoreUnavailable(f"store loading: {text}")
    if isinstance(exc, rexc.ConnectionError):
        # Refused at connect: nothing was sent. Anything else: it may have been.
        sent = " connecting to " not in text
        return StoreUnavailable(f"store unreachable: {text}", maybe_applied=sent)
    if isinstance(exc, rexc.TimeoutError | asyncio.TimeoutError | TimeoutError):
        return StoreUnavailable(f"store timeout: {text}", maybe_applied=True)
    if isinstance(exc, OSError):
        return StoreUnavailable(f"store unreachable: {text}", maybe_applied=True)
    if isinstance(exc, rexc.RedisError):
        return StoreProtocolError(f"store error: {text}")
    return StoreError(f"store call failed: {type(exc).__name__}: {text}")


class ScriptCall:
    """One enqueued script invocation and the future its caller awaits.

    ``settle``: called with ``(reply, None)`` or ``(None, error)`` in place of completing
    ``future`` (which is then the caller's own, and only tells whether it still waits), so
    a caller that decodes the reply itself needs no second future and no callback hop."""

    __slots__ = ("script", "keys", "args", "extras", "mutates", "future", "settle")

    def __init__(
        self,
        script: LuaScript,
        keys: Sequence[str],
        args: Sequence[Arg],
        extras: Sequence[Sequence[Arg]] = (),  # companion commands (hints), replies ignored
        mutates: bool = True,
        *,
        future: asyncio.Future[Any] | None = None,
        settle: Callable[[Any, StoreError | None], None] | None = None,
    ) -> None:
        self.script = script
        self.keys = keys
        self.args = args
        self.extras = extras
        self.mutates = mutates
        self.future: asyncio.Future[Any] = (
            future if future is not None else asyncio.get_running_loop().create_future())
        self.settle = settle

    def resolve(self, reply: Any) -> None:
        """The call's reply (it is not done yet)."""
        if self.settle is None:
            self.future.set_result(reply)
            return
        try:
            self.settle(reply, None)
        except Exception as exc:  # the caller's own code must not stop the batch's others
            self._settle_failed(exc)

    def fail(self, error: StoreError) -> None:
        """The call's error (it is not done yet)."""
        if self.settle is None:
            self.future.set_exception(error)
            return
        try:
            self.settle(None, error)
        except Exception as exc:
            self._settle_failed(exc)

    def _settle_failed(self, exc: Exception) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


class PipelineQueue:
    """A queue of calls served by at most ``max_inflight`` flushers, each sending up to
    ``max_batch`` calls as one pipeline over one connection of ``_pool()``.

    Subclasses build and settle a batch in ``_run``; this class owns the queue, the
    flushers, the single-write execution and the durable-mode WAIT check.
    """

    def __init__(
        self,
        *,
        max_batch: int,
        max_inflight: int,
        wait_replicas: int,
        wait_timeout_ms: int,
        batch_timeout_s: float,
    ) -> None:
        if max_batch < 1 or max_inflight < 1:
            raise ValueError("max_batch and max_inflight must be >= 1")
        self.batch_timeout_s = batch_timeout_s  # one guard per pipeline, not one timer per call
        self.max_batch = max_batch
        self.max_inflight = max_inflight
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self._pending: deque[Any] = deque()
        self._flushers = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0  # pipelines sent (for tests and metrics)
        self.calls = 0

    def _pool(self) -> Any:
        raise NotImplementedError

    async def _run(self, batch: list[Any]) -> None:
        raise NotImplementedError

    def enqueue(self, item: Any) -> None:
        """Queue ``item`` (its future gets the reply); a flusher starts on the next iteration."""
        self._pending.append(item)
        if self._flushers < self.max_inflight:
            self._flushers += 1
            task = asyncio.get_running_loop().create_task(self._flush())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _fail_pending(self, error: StoreError) -> None:
        _fail(list(self._pending), error)
        self._pending.clear()

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch: list[Any] = []
                while self._pending and len(batch) < self.max_batch:
                    c = self._pending.popleft()
                    if not c.future.done():  # a cancelled caller is not sent at all
                        batch.append(c)
                if batch:
                    await self._run(batch)
        except asyncio.CancelledError:
            if self._flushers == 1:  # the last flusher: nobody else will serve the queue
                self._fail_pending(StoreUnavailable("store closed"))
            raise
        finally:
            self._flushers -= 1

    def _wait_command(self, batch: list[Any]) -> bytes | None:
        """Durable mode: the WAIT ending a pipeline that holds a mutation, else None."""
        if self.wait_replicas > 0 and any(c.mutates for c in batch):
            return pack_command(("WAIT", self.wait_replicas, self.wait_timeout_ms))
        return None

    def _wait_error(self, acks: Any, where: str = "") -> StoreError | None:
        """The error every mutation of the batch gets if WAIT fell short."""
        if isinstance(acks, Exception) or int(acks) < self.wait_replicas:
            return StoreNotDurable(
                f"durable mode: WAIT {self.wait_replicas} replicas{where}, got {acks!r}"
            )
        return None

    async def _send(self, batch: list[Any], commands: list[bytes]) -> tuple[list[Any], bool]:
        """Send ``commands`` (plus WAIT when durable) under the batch timeout: (replies, durable).

        Cancelled: the batch's callers learn the outcome is unknown, and it propagates.
        Any other failure raises it as a StoreError for the subclass to hand out.
        """
        wait = self._wait_command(batch)
        if wait is not None:
            commands.append(wait)
        self.batches += 1
        self.calls += len(batch)
        try:
            async with asyncio.timeout(self.batch_timeout_s):
                return await self._execute(commands), wait is not None
        except asyncio.CancelledError:
            _fail(batch, StoreUnavailable("store call cancelled", maybe_applied=True))
            raise
        except BaseException as exc:  # every caller must get an answer
            raise translate(exc) from exc

    async def _execute(self, commands: list[bytes]) -> list[Any]:
        """Send pre-packed commands in one write and read every reply (errors in place).

        A lean pipeline over redis-py's public connection API: one write, no
        per-reply timer (the caller bounds the whole batch). On any failure the
        connection is dropped, never reused half-read.
        """
        pool = self._pool()
        conn = await pool.get_connection()
        try:
            await conn.send_packed_command(commands)
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(await conn.read_response(timeout=math.inf))
                except rexc.ResponseError as exc:
                    replies.append(exc)
            return replies
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        finally:
            await pool.release(conn)


class ScriptBatcher(PipelineQueue):
    """Runs script calls through shared pipelines; ``call`` is coroutine-safe."""

    def __init__(
        self,
        redis: Redis,
        *,
        max_batch: int = 512,
        max_inflight: int = 2,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 100,
        batch_timeout_s: float = 3.0,
    ) -> None:
        super().__init__(max_batch=max_batch, max_inflight=max_inflight,
                         wait_replicas=wait_replicas, wait_timeout_ms=wait_timeout_ms,
                         batch_timeout_s=batch_timeout_s)
        self._redis = redis

    def _pool(self) -> Any:
        return self._redis.connection_pool

    async def call(self, call: ScriptCall) -> Any:
        """Enqueue ``call`` and wait for its own reply (raises StoreError)."""
        self.enqueue(call)
        return await call.future

    async def call_direct(self, call: ScriptCall) -> Any:
        """Run ``call`` alone in its own pipeline, bypassing the queue (baseline, tests)."""
        await self._run([call])
        return await call.future

    async def close(self) -> None:
        """Cancel flushers; pending callers get StoreUnavailable."""
        for task in list(self._tasks):
            task.cancel()
        self._fail_pending(StoreUnavailable("store closed"))

    async def _run(self, batch: list[ScriptCall], *, reloaded: bool = False) -> None:
        commands: list[bytes] = []
        for c in batch:
            commands.append(pack_evalsha(c.script.sha, c.keys, c.args))
            for extra in c.extras:
                commands.append(pack_command(extra))
        try:
            replies, durable = await self._send(batch, commands)
        except StoreError as err:
            _fail(batch, err)
            return

        acked_error = self._wait_error(replies[-1]) if durable else None
        missing: list[ScriptCall] = []
        i = 0
        for c in batch:
            reply = replies[i]
            i += 1 + len(c.extras)
            if c.future.done():
                continue
            if isinstance(reply, rexc.NoScriptError) and not reloaded:
                missing.append(c)
            elif isinstance(reply, Exception):
                c.fail(translate(reply))
            elif acked_error is not None and c.mutates:
                c.fail(acked_error)
            else:
                c.resolve(reply)
        if missing:
            await self._reload(missing)

    async def _reload(self, missing: list[ScriptCall]) -> None:
        """Load the scripts a NOSCRIPT named (they did not run) and send those calls again."""
        try:
            for script in {c.script.sha: c.script for c in missing}.values():
                await self._redis.script_load(script.source)
        except BaseException as exc:
            _fail(
                missing,
                translate(exc)
                if not isinstance(exc, asyncio.CancelledError)
                else StoreUnavailable("store call cancelled"),
            )
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        await self._run(missing, reloaded=True)


def _arg(a: Arg) -> bytes:
    t = type(a)  # exact-type fast paths first: this runs ~15 times per script call
    if t is bytes:
        return a  # type: ignore[return-value]
    if t is str:
        return a.encode()  # type: ignore[union-attr]
    if t is int:
        return b"%d" % a  # type: ignore[str-format]
    if isinstance(a, bool):
        raise TypeError("bool is not a Redis argument")
    if isinstance(a, bytes | bytearray | memoryview):
        return bytes(a)
    if isinstance(a, str):
        return a.encode()
    if isinstance(a, int):  # IntEnum
        return b"%d" % int(a)
    if isinstance(a, float):
        return repr(a).encode()
    raise TypeError(f"unsupported Redis argument {type(a).__name__}")


def pack_args(args: Sequence[Arg]) -> bytes:
    """The RESP bulk strings of ``args`` (no array header)."""
    out = []
    for a in args:
        b = _arg(a)
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def pack_command(args: Sequence[Arg]) -> bytes:
    """One command in RESP (what redis-py's pack_command does, minus its generality)."""
    return b"*%d\r\n" % len(args) + pack_args(args)


_EVALSHA_HEADS: dict[tuple[str, int, int], bytes] = {}


def pack_evalsha(sha: str, keys: Sequence[str], args: Sequence[Arg]) -> bytes:
    """EVALSHA sha numkeys keys... args..., with the fixed head cached per shape."""
    shape = (sha, len(keys), len(args))
    head = _EVALSHA_HEADS.get(shape)
    if head is None:
        head = b"*%d\r\n" % (3 + len(keys) + len(args)) + pack_args(("EVALSHA", sha, len(keys)))
        if len(_EVALSHA_HEADS) < 1024:
            _EVALSHA_HEADS[shape] = head
    return head + pack_args(keys) + pack_args(args)


def _fail(batch: list[ScriptCall], error: StoreError) -> None:
    for c in batch:
        if not c.future.done():
            c.fail(error)
