"""The node's view for operators: ``/status`` on the admin port, and its registration.

``/status`` answers, as ``wg show`` does per peer, what this node knows of each
session it holds a binding for (endpoint, transport, state, version, epoch,
bytes and packets each way, time since the last packet and since the binding
was made) and, per node, sessions by state, the store's health and latency.
The store knows the rest (client, uptime, time left); ``jvpn status`` joins
the two. Nothing here touches the data path: the machine already counts per
binding, and a snapshot is read only when asked.

Access: without a token ``/status`` answers only requests from loopback (it
names clients' addresses); with ``status_token`` set it answers any address
that presents ``Authorization: Bearer <token>``.

Registration: every node writes ``jvpn:node:<node id>`` (its admin address,
instance, start time) with a TTL and renews it, so ``jvpn status`` finds every
node of any deployment; a node that stops renewing disappears, one that is
registered but does not answer is shown as such.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from gateway.node import GatewayNode
from session.binding import Binding
from session.states import SessionState
from store.api import SessionStore
from store.errors import StoreError

log = logging.getLogger("jvpn.status")

STATUS_FORMAT = 1  # the JSON layout's version, for tools that read it

NODE_KEY = web.AppKey("status_node", GatewayNode)
TOKEN_KEY = web.AppKey("status_token", str)


def binding_status(b: Binding, now: float, pending: bool = False) -> dict[str, Any]:
    """One binding as ``/status`` shows it (ages in seconds on the node's clock); a
    ``pending`` one was granted by a reattach and waits for its path to validate."""
    state = SessionState.RECOVERING if b.lost else b.state
    return {
        "binding": "pending" if pending else "active",
        "session_id": b.session_id.hex(),
        "client_id": b.secrets.client_id,
        "endpoint": f"{b.peer.addr[0]}:{b.peer.addr[1]}",
        "transport": b.peer.kind.name.lower(),
        "validated": b.validated,
        "state": state.name,
        "version": b.version,
        "epoch": b.epoch,
        "rx_bytes": b.rx_bytes,
        "tx_bytes": b.tx_bytes,
        "rx_packets": b.rx_packets,
        "tx_packets": b.tx_packets,
        "last_packet_age_s": round(max(0.0, now - b.last_rx), 3),
        "upstream": b.secrets.upstream,
        "inner_addresses": _inner(b),  # the L3 tunnel's addresses ([] in UDP-forward mode)
    }


def _inner(b: Binding) -> list[str]:
    route = b.secrets.route
    if route is None:
        return []
    return [route.inner.v4.with_prefixlen, route.inner.v6.with_prefixlen]


def node_status(node: GatewayNode) -> dict[str, Any]:
    """The node's snapshot: itself, the store as it sees it, and every binding."""
    node.engine_stats()  # the compiled UDP engine's share of the bindings' counters
    m = node.machine
    now = node.clock()
    h = m.health
    return {
        "format": STATUS_FORMAT,
        "node": m.settings.node_id,
        "instance": m.instance_id,
        "time_ms": int(time.time() * 1000),
        "ready": h.ok,
        "store": {
            "up": h.ok,
            "error": h.error,
            "latency_ms": None if h.latency_s is None else round(h.latency_s * 1000, 3),
            "last_answer_age_s": None if h.ok_at == float("-inf") else round(now - h.ok_at, 3),
        },
        "sessions_by_state": m.sessions_by_state(),
        "sessions": [binding_status(b, now) for b in list(m.bindings.values())]
        + [binding_status(b, now, pending=True) for b in list(m.pending.values())],
    }


def _loopback(remote: str | None) -> bool:
    if not remote:
        return False
    try:
        return ipaddress.ip_address(remote.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


async def _status(request: web.Request) -> web.Response:
    token = request.app[TOKEN_KEY]
    if token:
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return web.json_response({"error": "a status token is required"}, status=401,
                                     headers={"WWW-Authenticate": "Bearer"})
    elif not _loopback(request.remote):
        return web.json_response(
            {"error": "/status answers loopback only unless status_token is configured"},
            status=403)
    return web.json_response(node_status(request.app[NODE_KEY]))


def status_routes() -> list[web.RouteDef]:
    return [web.get("/status", _status)]


def configure(app: web.Application, node: GatewayNode, token: str) -> None:
    """Give the admin app what ``/status`` reads."""
    app[NODE_KEY] = node
    app[TOKEN_KEY] = token


def advertised_admin(admin: str, advertise: str, bound_port: int) -> str:
    """host:port at which ``jvpn status`` reaches this node: ``advertise`` if set, else the
    admin address with the port actually bound and a wildcard host replaced by this host's
    name."""
    if advertise:
        return advertise
    host = admin.rsplit(":", 1)[0].strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    return f"[{host}]:{bound_port}" if ":" in host else f"{host}:{bound_port}"


def registration(store: SessionStore, node: str, info: Callable[[], dict[str, Any]],
                 ttl_s: float, serving: asyncio.Event,
                 ) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context that registers the node once its admin port is serving and renews
    the entry every third of ``ttl_s`` (a store outage only delays it: the node is listed
    again once the store answers); the entry goes when the node stops."""

    stopping = asyncio.Event()

    async def renew_until_stopped() -> None:
        await serving.wait()
        while not stopping.is_set():
            try:
                await store.register_node(node, info(), ttl_s)
            except (StoreError, OSError) as exc:
                log.debug("node registration not renewed: %s", exc)
            try:  # the stop event, not cancellation alone: a store call may absorb a cancel
                await asyncio.wait_for(stopping.wait(), ttl_s / 3)
            except TimeoutError:
                pass

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(renew_until_stopped(), name="node registration")
        yield
        stopping.set()
        serving.set()  # a node stopped before it served: let the task see the stop
        done, _ = await asyncio.wait({task}, timeout=2.0)
        if not done:
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)
        try:
            await asyncio.wait_for(store.unregister_node(node), 1.0)
        except (StoreError, OSError, TimeoutError) as exc:
            log.debug("node registration left to expire: %s", exc)

    return ctx
