"""Transport adapters: a UDP socket or a TCP connection to one gateway address.

They only move bytes: everything they receive goes to a callback with their
path id, and a socket error or a closed connection is reported once. UDP and
TCP differ only in how they send (TCP frames each message with its length,
and cuts the stream back into messages with session.stream.FramedStream).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

from session import wire
from session.errors import DecodeError
from session.stream import FramedStream

log = logging.getLogger("jvpn.agent")

Receive = Callable[[int, bytes], None]
Failed = Callable[[int, str], None]


class Path:
    """Base class: one transport with a path id."""

    kind: wire.TransportKind

    def __init__(self, path_id: int, remote: tuple[str, int], on_receive: Receive,
                 on_failed: Failed, mark: int = 0) -> None:
        self.path_id = path_id
        self.mark = mark  # SO_MARK: an L3 full tunnel routes marked sockets outside itself
        self.remote = remote
        self._on_receive = on_receive
        self._on_failed = on_failed
        self.closed = False
        self.local: tuple[str, int] | None = None

    def send(self, data: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.closed = True

    def _failed(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self._on_failed(self.path_id, reason)

    def _socket(self, kind: int) -> socket.socket | None:
        """A socket carrying the mark, or None (no mark: asyncio makes its own)."""
        if not self.mark:
            return None
        fam = socket.AF_INET6 if ":" in self.remote[0] else socket.AF_INET
        sock = socket.socket(fam, kind)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.mark)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    def describe(self) -> str:
        local = f"{self.local[0]}:{self.local[1]}" if self.local else "?"
        return f"{self.kind.name.lower()} {local}->{self.remote[0]}:{self.remote[1]}"


class UdpPath(Path, asyncio.DatagramProtocol):
    kind = wire.TransportKind.UDP

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.transport: asyncio.DatagramTransport | None = None

    async def open(self) -> UdpPath:
        loop = asyncio.get_running_loop()
        sock = self._socket(socket.SOCK_DGRAM)
        if sock is None:
            await loop.create_datagram_endpoint(lambda: self, remote_addr=self.remote)
            return self
        try:
            sock.connect(self.remote)
            await loop.create_datagram_endpoint(lambda: self, sock=sock)
        except BaseException:
            sock.close()
            raise
        return self

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.local = transport.get_extra_info("sockname")[:2]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if not self.closed:
            self._on_receive(self.path_id, data)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and friends: the path may be dead; the machine decides.
        log.debug("path %d udp error: %s", self.path_id, exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._failed(f"udp socket closed: {exc}" if exc else "udp socket closed")

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.sendto(data)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class TcpPath(Path, FramedStream, asyncio.Protocol):
    kind = wire.TransportKind.TCP

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.transport: asyncio.Transport | None = None

    async def open(self, timeout: float = 2.0) -> TcpPath:
        loop = asyncio.get_running_loop()
        sock = self._socket(socket.SOCK_STREAM)
        if sock is None:
            await asyncio.wait_for(
                loop.create_connection(lambda: self, self.remote[0], self.remote[1]), timeout)
            return self
        try:
            await asyncio.wait_for(loop.sock_connect(sock, self.remote), timeout)
            await loop.create_connection(lambda: self, sock=sock)
        except BaseException:
            sock.close()
            raise
        return self

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.local = transport.get_extra_info("sockname")[:2]

    def frame_received(self, frame: bytes) -> None:
        if not self.closed:
            self._on_receive(self.path_id, frame)

    def framing_failed(self, error: DecodeError) -> None:
        self._failed(f"bad frame from gateway: {error}")  # the mixin closes the stream

    def connection_lost(self, exc: Exception | None) -> None:
        self._failed(f"tcp connection lost: {exc}" if exc else "tcp connection closed")

    def send(self, data: bytes) -> None:
        if not self.closed:
            self.send_frame(data)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()
