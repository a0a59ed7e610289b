"""The machine's store operations as ``SessionStore`` calls, and their outcomes as its answers.

The machine asks for a store operation with a ``StoreCall`` effect (an op from
``session.storeops``); the node runs it here as one ``SessionStore`` call and
feeds the outcome back with ``GatewayMachine.store_answered``. An outcome is read
as the machine expects it, failing closed: an answer as it is; a store that
could not be reached, or a call cancelled, as ``StoreFailure``; anything else (an
answer we cannot read) as an unreadable ``StoreFailure``, logged. Which way: the
node to the store and back; nothing here decides what an answer means.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from gateway.tracing import NOOP_SPAN, SpanCtx
from session.storeops import (
    ActivateOp,
    BirthOp,
    ClaimAddressesOp,
    ClaimHandshakeOp,
    ClaimSlotOp,
    ConfirmKeyOp,
    GetClientOp,
    GetRecordOp,
    PublishMoveOp,
    ReattachOp,
    RefreshOp,
    RekeyOp,
    ReleaseAddressesOp,
    ReleaseSlotOp,
    ServerTimeOp,
    StoreFailure,
    SweepOp,
    TerminateOp,
    TransitionOp,
)
from store.api import SessionStore
from store.errors import StoreError, StoreUnavailable

log = logging.getLogger("jvpn.gateway")


def store_ops(store: SessionStore) -> dict[type, Callable[[Any], Awaitable[Any]]]:
    """Each store operation of the machine as one SessionStore call."""
    return {
        ReattachOp: store.reattach_soon,
        GetRecordOp: lambda op: store.get(op.session_id),
        GetClientOp: lambda op: store.get_client(op.client_id),
        ClaimHandshakeOp: lambda op: store.claim_handshake(op.digest, op.ttl_ms),
        BirthOp: lambda op: store.birth(
            op.session_id, wrapped_secret=op.wrapped_secret, client_id=op.client_id,
            node=op.node, binding_id=op.binding_id, kind=op.kind, upstream=op.upstream,
            policy=op.policy, wrapped_control=op.wrapped_control, inner=op.inner),
        RekeyOp: lambda op: store.rekey(
            op.session_id, epoch=op.epoch, binding_id=op.binding_id, node=op.node,
            generation=op.generation, wrapped_secret=op.wrapped_secret,
            wrapped_control=op.wrapped_control, new_binding_id=op.new_binding_id),
        ConfirmKeyOp: lambda op: store.confirm_key(op.session_id, op.generation),
        TransitionOp: lambda op: store.transition(op.session_id, op.expected_version, op.event),
        RefreshOp: lambda op: store.refresh(op.session_id, op.epoch, op.node),
        ActivateOp: store.activate_soon,
        TerminateOp: lambda op: store.terminate(op.session_id, op.reason),
        PublishMoveOp: lambda op: store.publish_binding_change(op.session_id, op.node, op.epoch),
        ServerTimeOp: lambda op: store.server_time_ms(),
        SweepOp: lambda op: store.sweep(op.limit),
        ClaimSlotOp: lambda op: store.claim_slot(op.client_id, op.session_id, op.limit,
                                                 op.end_ms),
        ReleaseSlotOp: lambda op: store.release_slot(op.client_id, op.session_id),
        ClaimAddressesOp: lambda op: store.claim_addresses(op.session_id, op.pool, op.size),
        ReleaseAddressesOp: lambda op: store.release_addresses(op.session_id),
    }


OP_NAMES: dict[type, str] = {
    ReattachOp: "reattach", GetRecordOp: "get", GetClientOp: "get_client",
    ClaimHandshakeOp: "claim_handshake", BirthOp: "birth", TransitionOp: "transition",
    RefreshOp: "refresh", ActivateOp: "activate", RekeyOp: "rekey",
    ConfirmKeyOp: "confirm_key", TerminateOp: "terminate", PublishMoveOp: "publish",
    ServerTimeOp: "time", SweepOp: "sweep", ClaimSlotOp: "slot", ReleaseSlotOp: "release_slot",
    ClaimAddressesOp: "addr", ReleaseAddressesOp: "addr_free",
}


def answer_of(fut: asyncio.Future[Any], span: SpanCtx) -> Any:
    """A completed store call's outcome as the machine's answer (fail closed); ends ``span``."""
    exc = None if fut.cancelled() else fut.exception()
    if fut.cancelled():  # not by stop(): the machine must still hear of it (fail closed)
        answer: Any = StoreFailure("store call cancelled")
        span.set(outcome="cancelled")
    elif exc is None:
        answer = fut.result()
        if span is not NOOP_SPAN:
            span.set(outcome=getattr(getattr(answer, "status", None), "name", "OK"))
    elif isinstance(exc, StoreUnavailable):
        answer = StoreFailure(str(exc) or type(exc).__name__)
        span.fail(exc)
    else:  # an answer we cannot read: fail closed, and say so
        log.error("store call failed: %r", exc, exc_info=exc if not isinstance(exc, StoreError)
                  else None)
        answer = StoreFailure(f"{type(exc).__name__}: {exc}", unreadable=True)
        span.fail(exc)
    span.end()
    return answer


async def cancel_bounded(tasks: Iterable[asyncio.Future[Any]], timeout: float = 3.0) -> None:
    """Cancel ``tasks`` and wait for them, bounded; cancel again while they linger.

    redis-py can swallow a cancellation that lands while a command is being
    sent (its internal wait_for on Python 3.11), so one cancel() is not enough
    for a loop that talks to the store: stop must never hang on it.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pending = {t for t in tasks if not t.done()}
    while pending and loop.time() < deadline:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.2)
    if pending:
        log.warning("%d tasks did not stop within %.1fs", len(pending), timeout)

