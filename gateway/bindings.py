"""The node's local binding table: what the data path reads, never the store.

Theory of operation. A Binding is (session, epoch, binding_id, this node, a
peer). It is created by a successful handshake or reattach and destroyed when
the store says another node or a newer epoch owns the session (pub/sub or a
refresh answering NOT_OWNER), when the session ends, or when this node's lease
lapses. The peer is the transport the session currently uses. Until the client
proves from that peer that it holds this epoch's keys (its first packet that
decrypts and passes the replay filter), the peer is *unvalidated*: the node
sends it at most ``AMPLIFICATION_FACTOR`` times the bytes it received from it,
and never tunnelled data. An authenticated packet from another address moves
the peer there (NAT rebinding), as wireguard-go's SetEndpointFromPacket does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from session import wire
from session.framing import DataChannel
from session.keys import SessionKeys
from session.states import SessionState

AMPLIFICATION_FACTOR = 3


class Peer:
    """One transport endpoint: a UDP address on our socket, or one TCP connection."""

    __slots__ = ("kind", "addr", "_send", "closed", "_desc")

    def __init__(self, kind: wire.TransportKind, addr: tuple[str, int],
                 send: Callable[[bytes], None]) -> None:
        self.kind = kind
        self.addr = addr
        self._send = send
        self.closed = False
        self._desc = ""

    def send(self, data: bytes) -> None:
        if not self.closed:
            self._send(data)

    @property
    def key(self) -> tuple[int, str, int]:
        return (int(self.kind), self.addr[0], self.addr[1])

    def describe(self) -> str:
        """"udp:1.2.3.4:5678" (computed once: events and store tags ask for it often)."""
        if not self._desc:
            self._desc = f"{self.kind.name.lower()}:{self.addr[0]}:{self.addr[1]}"
        return self._desc

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Peer) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)


@dataclass
class SessionSecrets:
    """What a node caches per session after unwrapping its secret."""

    secret: bytes
    keys: SessionKeys
    upstream: str
    client_id: str
    ttl_ms: int


@dataclass
class Binding:
    session_id: bytes
    epoch: int
    binding_id: bytes
    node_id: bytes  # this node, as the traffic keys bind it
    peer: Peer
    secrets: SessionSecrets
    version: int
    state: SessionState
    last_rx: float
    validated: bool = False
    rx_unvalidated: int = 0
    tx_unvalidated: int = 0
    last_refresh: float = 0.0
    confirmed_at: float = 0.0  # monotonic time the store last confirmed we own this binding
    transition_pending: bool = False
    upstream: asyncio.DatagramTransport | None = None
    rx_packets: int = 0
    tx_packets: int = 0
    lost: bool = False
    extra: dict[str, object] = field(default_factory=dict)
    _channel: DataChannel | None = None

    @property
    def channel(self) -> DataChannel:
        """The binding's AEAD channel, its traffic keys derived on first use: a binding a
        client abandons before any DATA (a reattach storm, a rebind race it lost) never
        pays for the HKDF and the two cipher contexts."""
        ch = self._channel
        if ch is None:
            ch = self._channel = DataChannel.from_secret(
                self.secrets.secret, session_id=self.session_id, epoch=self.epoch,
                binding_id=self.binding_id, node_id=self.node_id, is_gateway=True)
        return ch

    def may_send(self, size: int) -> bool:
        """Anti-amplification: to an unvalidated peer, at most 3x what it sent us."""
        if self.validated:
            return True
        if self.tx_unvalidated + size > AMPLIFICATION_FACTOR * self.rx_unvalidated:
            return False
        self.tx_unvalidated += size
        return True

    def close(self) -> None:
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None
