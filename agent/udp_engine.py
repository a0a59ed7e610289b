"""The compiled data path of the agent (``jvpn_dataplane.AgentEngine``), seen from asyncio.

With the engine on, a Rust thread reads the local application's socket and every UDP
path's socket in batches. It seals and sends the application's datagrams, and delivers
the gateway's payloads to the application, by itself only while the client machine's
current path is *fast*: attached (a live state), a UDP path the engine reads, a compiled
channel (shared by the engine and the machine: one replay window, one send counter).
Everything else comes back through ``drain`` exactly as from the sockets: the
application's datagrams while not fast (the machine holds or drops them) and those of a
local source without a flow yet (the agent assigns it one, ``Agent.local_received``, and
installs it, ``set_flow``: the engine then seals that source's datagrams as FLOW_PAYLOADs
of its flow and sends the gateway's FLOW_PAYLOADs of the flow to it), and every
packet on a path that is not a payload of the current binding (handshake and reattach
answers, notices, keepalive answers, challenges, other paths). This module decides
nothing: after every input the agent tells the engine what the machine now holds.

In L3 mode the engine reads the agent's TUN instead of a local port: it seals the IP
packets applications send into the interface and writes the gateway's payloads to it,
under the same conditions, until the current secret reaches its reject-after age (the
machine then holds packets and rekeys); packets it does not carry come back as from the
TUN. The engine keeps the AEAD tags of the packets it sealed, which the agent hands to
the machine before a NOTICE: a NOT_BOUND_HERE hint about one of them is the client's.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Any

from agent.transports import Path
from session import wire

log = logging.getLogger("jvpn.agent")

DRAIN_MAX = 512
QUEUE_MAX = 16384


def is_notice(packet: bytes) -> bool:
    """Whether a packet from a path is a NOTICE (a NOT_BOUND_HERE hint among them)."""
    return len(packet) > 1 and packet[1] == wire.MessageType.NOTICE


def available() -> bool:
    """Whether the compiled module carries the agent's engine."""
    try:
        import jvpn_dataplane
    except ImportError:
        return False
    # an older build lacks the TUN, the probe's activity or the flows: rebuild it (make dataplane)
    return hasattr(getattr(jvpn_dataplane, "AgentEngine", None), "flow_times")




class EngineUdpPath(Path):
    """A UDP path whose socket the engine reads (the agent still sends its own packets)."""

    kind = wire.TransportKind.UDP

    def __init__(self, path_id: int, remote: tuple[str, int], on_receive: Any,
                 on_failed: Callable[[int, str], None], engine: Any = None,
                 mark: int = 0) -> None:
        super().__init__(path_id, remote, on_receive, on_failed, mark)
        self.engine = engine
        self.sock: socket.socket | None = None

    async def open(self) -> EngineUdpPath:
        family = socket.AF_INET6 if ":" in self.remote[0] else socket.AF_INET
        sock = self._socket(socket.SOCK_DGRAM) or socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.connect(self.remote)
            self.engine.add_path(self.path_id, sock.fileno())
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.local = sock.getsockname()[:2]
        return self

    def send(self, data: bytes) -> None:
        if self.sock is not None and not self.closed:
            try:
                self.sock.send(data)
            except OSError as exc:  # ICMP unreachable, a full buffer: the machine decides
                log.debug("path %d udp error: %s", self.path_id, exc)

    def close(self) -> None:
        self.closed = True
        if self.sock is not None:
            try:
                self.engine.remove_path(self.path_id)
            except RuntimeError:
                pass  # the engine stopped first
            self.sock.close()
            self.sock = None
