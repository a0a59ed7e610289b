"""Upstream sockets: one UDP socket per (session, flow) to the session's upstream target.

Theory of operation. The machine's ``ToUpstream`` effects arrive here (through
``GatewayNode``) when the compiled engine does not carry the flow: the first
payload of a (session, flow) opens a connected UDP socket to the session's
upstream (a host name is resolved by asyncio), payloads that arrive while it
opens wait in a short backlog, and every reply read from it goes back to the
machine through ``GatewayNode.from_upstream``. ``CloseUpstream`` closes a
session's sockets. A flow is one local source at the agent.

The compiled engine opens upstream sockets by address only: ``engine_address``
gives it an upstream's address, resolving a name in the background and keeping
what it resolved to for ``RESOLVED_TTL_S``; a flow opened before the name was
resolved takes the socket here and stays on it.

This module decides nothing about sessions; it bounds what it holds (a backlog
per opening socket, one socket per flow id the wire allows), dropping and
counting the rest.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from typing import TYPE_CHECKING, Any

from session import wire
from session.gateway import ToUpstream
from session.reasons import DropReason

if TYPE_CHECKING:
    from gateway.node import GatewayNode

log = logging.getLogger("jvpn.gateway")

UPSTREAM_BACKLOG = 64  # payloads held per session while its upstream socket opens
RESOLVED_TTL_S = 30.0  # how long an upstream name's address is used for new engine flows
RESOLVED_MAX = 1024  # upstream names remembered at most

Flow = tuple[bytes, int]  # (session id, flow)


class Upstreams:
    """The node's upstream sockets, by (session, flow), and the names resolved for the engine."""

    def __init__(self, node: GatewayNode) -> None:
        self.node = node
        self.sockets: dict[Flow, asyncio.DatagramTransport] = {}
        self.opening: dict[Flow, list[bytes]] = {}  # the backlog of a socket being opened
        self.resolved: dict[str, tuple[str, float]] = {}  # name -> (address, until)
        self._resolving: set[str] = set()
        self._flows: dict[bytes, set[int]] = {}  # session -> its flows with a socket
        self.tasks: set[asyncio.Future[Any]] = set()  # openings and look-ups in flight

    def held(self, session_id: bytes, flow: int) -> bool:
        """Whether this flow has a socket here (open or opening)."""
        key = (session_id, flow)
        return key in self.sockets or key in self.opening

    def send(self, e: ToUpstream) -> None:
        """One payload to its flow's socket, opening the socket on the flow's first."""
        key = (e.session_id, e.flow)
        transport = self.sockets.get(key)
        if transport is not None:
            transport.sendto(e.data)
            return
        metrics = self.node.metrics
        backlog = self.opening.get(key)
        if backlog is not None:
            if len(backlog) < UPSTREAM_BACKLOG:
                backlog.append(e.data)
            else:
                metrics.count_drop(DropReason.RATE_LIMITED, wire.TransportKind.UDP)
            return
        flows = self._flows.setdefault(e.session_id, set())
        if len(flows) >= wire.MAX_FLOWS + 1:  # flow ids are bounded on the wire too
            metrics.count_drop(DropReason.RATE_LIMITED, wire.TransportKind.UDP)
            return
        flows.add(e.flow)
        self.opening[key] = [e.data]
        self._spawn(self._open(key, e.upstream))

    def engine_address(self, upstream: tuple[str, int]) -> tuple[str, int] | None:
        """The upstream as an address the compiled engine can open (it resolves no names):
        an address as it is; a name from what it resolved to within ``RESOLVED_TTL_S``,
        else None (this flow takes the asyncio path, which resolves it, and the name is
        looked up for the flows after it)."""
        host, port = upstream
        try:
            ipaddress.ip_address(host)
            return upstream
        except ValueError:
            pass
        now = time.monotonic()
        known = self.resolved.get(host)
        if known is not None and known[1] > now:
            return (known[0], port)
        if host not in self._resolving and (known is not None or len(self.resolved) < RESOLVED_MAX):
            self._resolving.add(host)
            self._spawn(self._resolve(host, port))
        return None

    def close(self, session_id: bytes) -> None:
        """Close every socket of ``session_id`` (and forget the backlogs of those opening)."""
        for flow in self._flows.pop(session_id, ()):
            key = (session_id, flow)
            self.opening.pop(key, None)
            transport = self.sockets.pop(key, None)
            if transport is not None:
                transport.close()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Future[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("opening an upstream socket failed", exc_info=task.exception())

    async def _resolve(self, host: str, port: int) -> None:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_DGRAM)
        except OSError as exc:
            log.warning("upstream %s: not resolved: %s", host, exc)
            return
        finally:
            self._resolving.discard(host)
        if infos:
            self.resolved[host] = (str(infos[0][4][0]), time.monotonic() + RESOLVED_TTL_S)

    async def _open(self, key: Flow, addr: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _UpstreamProtocol(self.node, key[0], key[1]), remote_addr=addr)
        except (OSError, ValueError, OverflowError) as exc:
            log.warning("upstream %s:%s unreachable: %s", addr[0], addr[1], exc)
            dropped = self.opening.pop(key, None) or []
            for _ in dropped:
                self.node.metrics.count_drop(DropReason.POLICY, wire.TransportKind.UDP)
            return
        backlog = self.opening.pop(key, None)
        if backlog is None:  # the binding went away meanwhile
            transport.close()
            return
        self.sockets[key] = transport
        for data in backlog:
            transport.sendto(data)


class _UpstreamProtocol(asyncio.DatagramProtocol):
    def __init__(self, node: GatewayNode, session_id: bytes, flow: int = 0) -> None:
        self.node = node
        self.session_id = session_id
        self.flow = flow

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.node.from_upstream(self.session_id, data, self.flow)

    def error_received(self, exc: Exception) -> None:
        log.debug("upstream error: %s", exc)
