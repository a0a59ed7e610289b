"""A UDP socket another reader owns (the compiled engine's thread), sent on from asyncio.

The engine reads the socket in batches; the adapter still sends its own packets (answers,
handshakes, replies to the application) on it, through this object, which stands in for
the ``asyncio.DatagramTransport`` the adapter would otherwise hold.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Any

log = logging.getLogger("jvpn.netdev")


class SocketSender:
    """``sendto`` on a nonblocking socket; a full buffer is a UDP drop (``on_drop``)."""

    def __init__(self, sock: socket.socket, on_drop: Callable[[], None] | None = None) -> None:
        self.sock = sock
        self._on_drop = on_drop

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            self.sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            if self._on_drop is not None:
                self._on_drop()  # a full socket buffer: UDP drops, and the caller counts it
        except OSError as exc:  # a vanished peer or application: UDP drops
            log.debug("udp send to %s failed: %s", addr, exc)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "sockname":
            return self.sock.getsockname()
        if name == "socket":
            return self.sock
        return default

    def close(self) -> None:
        self.sock.close()
