"""The gateway's local binding table entries: what the data path reads, never the store.

Theory of operation. A Binding is (session, epoch, binding_id, this node, a
peer). The gateway machine creates one on a successful handshake or reattach
and destroys it when the store says another node or a newer epoch owns the
session (a move notice or a refresh answering NOT_OWNER), when the session
ends, or when this node's lease lapses. The peer is the transport the session
currently uses. Until the client proves from that peer that it holds this
epoch's keys (its first packet that decrypts and passes the replay filter),
the peer is *unvalidated*: the node sends it at most ``AMPLIFICATION_FACTOR``
times the bytes it received from it (``within_budget``, the one place that
rule is written), and never tunnelled data.

A reattach grants a binding PENDING (store/lua/reattach.lua): the session's
current binding, here or on another node, keeps forwarding, and the pending one
forwards nothing. The client's first authenticated packet from the pending
binding's address (or its answer to a path challenge) validates the path; then
one store script (activate.lua) makes it the session's ACTIVE binding and ends
the previous one, so the store names at most one ACTIVE binding at any instant,
and a request an attacker copied and answered at its own address cannot take a
working session off the air. Until then the client's packets are held (a few).

Roaming: an authenticated packet from another address proves nothing about
that address (an on-path attacker can copy one). The address becomes a
``PathProbe``: it is sent a PATH_CHALLENGE, within 3x what it sent, and the
binding's peer moves there only when the client's PATH_RESPONSE comes back
from it (RFC 9000 section 8.2); until then the downlink stays on the old peer.

A Peer is pure data: a transport kind, an address and, for a stream, the id
of its connection. The adapter that owns the sockets maps it back to one.
Behind a balancer that carries the client's address, ``addr`` is the client's
(identity, budgets, tokens, events) and ``via`` the balancer's socket the
adapter sends to; ``via`` is part of the Peer's identity, so a new balancer
flow for the same client is a new path, as it was before the address was carried.
"""

from __future__ import annotations

from dataclasses import dataclass

from session import dataplane, wire
from session.framing import DataChannel
from session.keys import SessionKeys
from session.states import SessionState, StateMachine
from session.tunnel import SessionRoute

AMPLIFICATION_FACTOR = 3


def within_budget(received: int, sent: int, size: int) -> bool:
    """Anti-amplification: may ``size`` more bytes go to an address that sent ``received``
    and was already sent ``sent``?"""
    return sent + size <= AMPLIFICATION_FACTOR * received


class Peer:
    """One transport endpoint: a UDP address, or one TCP connection (``conn`` tells them apart)."""

    __slots__ = ("kind", "addr", "conn", "via", "_desc", "_hash")

    def __init__(self, kind: wire.TransportKind, addr: tuple[str, int], conn: int = 0,
                 via: tuple[str, int] | None = None) -> None:
        self.kind = kind
        self.addr = addr
        self.conn = conn
        self.via = via  # where to send, if not ``addr`` (a balancer's socket)
        self._desc = ""
        self._hash = hash((int(kind), addr, conn, via))

    @property
    def send_addr(self) -> tuple[str, int]:
        """Where datagrams to this peer go: the balancer's socket, else the address."""
        return self.via if self.via is not None else self.addr

    @property
    def key(self) -> tuple[int, str, int]:
        """The address, without the connection: who asked, for answer caches."""
        return (int(self.kind), self.addr[0], self.addr[1])

    def describe(self) -> str:
        """"udp:1.2.3.4:5678" (computed once: events and store tags ask for it often)."""
        if not self._desc:
            self._desc = f"{self.kind.name.lower()}:{self.addr[0]}:{self.addr[1]}"
        return self._desc

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Peer) and other.kind == self.kind and other.addr == self.addr
                and other.conn == self.conn and other.via == self.via)

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"Peer({self.describe()}{f'#{self.conn}' if self.conn else ''})"


class PathProbe:
    """A new address an authenticated packet came from, challenged before it is used."""

    __slots__ = ("challenge", "rx", "tx", "last_sent")

    def __init__(self, challenge: bytes) -> None:
        self.challenge = challenge
        self.rx = 0  # bytes received from the address (its 3x budget)
        self.tx = 0  # bytes sent to it
        self.last_sent = float("-inf")


@dataclass(slots=True)
class RekeyState:
    """One REKEY of a binding: the client's public key, and the answer once it is made."""

    client_pub: bytes
    answer: bytes = b""  # the REKEY_ACK plaintext (sealed again under prev_channel to repeat)
    confirming: bool = False
    prev_made_ms: int = 0  # store ms when the previous secret (prev_channel's) was made


@dataclass(slots=True)
class SessionSecrets:
    """What a node caches per session after unwrapping its secret."""

    secret: bytes
    keys: SessionKeys
    upstream: str
    client_id: str
    ttl_ms: int
    policy: bytes = b""  # policy_binding(...) of its record: what wraps it
    generation: int = 0  # REKEYs before this secret (the record's ``kg``)
    made_ms: int = 0  # store ms when this secret was made (birth or REKEY)
    _upstream_addr: tuple[str, int] | None = None
    route: SessionRoute | None = None  # L3 sessions: inner addresses and allowed prefixes

    def upstream_address(self) -> tuple[str, int] | None:
        """The policy's upstream ``host:port`` as an address (parsed once); None if invalid."""
        addr = self._upstream_addr
        if addr is None:
            host, _, port = self.upstream.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                return None
            addr = self._upstream_addr = (host.strip("[]"), int(port))
        return addr


@dataclass(slots=True)
class Binding:
    session_id: bytes
    epoch: int
    binding_id: bytes
    node_id: bytes  # this node, as the traffic keys bind it
    peer: Peer
    secrets: SessionSecrets
    sm: StateMachine  # the session's state as the store last told this node; see states.py
    last_rx: float
    validated: bool = False
    rx_unvalidated: int = 0
    tx_unvalidated: int = 0
    last_refresh: float = 0.0
    confirmed_at: float = 0.0  # when the store last confirmed we own this binding
    transition_pending: bool = False
    rx_packets: int = 0
    tx_packets: int = 0
    rx_bytes: int = 0  # wire bytes of authenticated packets received on this binding
    tx_bytes: int = 0  # wire bytes sent on it (probes to new addresses not included)
    lost: bool = False
    probes: dict[Peer, PathProbe] | None = None  # new addresses being validated
    # A reattach's binding is PENDING until its path validates and activate.lua makes it the
    # session's ACTIVE one; meanwhile the client's packets wait here (a few, bounded).
    held: list[wire.Inner] | None = None
    activating: bool = False  # activate.lua is running for it
    activation_unknown: bool = False  # a call's answer was lost: it may be ACTIVE already
    origin: tuple[str, str] = ("", "")  # what it replaces: (describe(), transport kind)
    # A REKEY in progress or just done: the channel of the previous secret's binding stays
    # to open packets still in flight (and to repeat the answer) until the client's first
    # packet under the new keys confirms them.
    prev_channel: DataChannel | None = None
    rekey: RekeyState | None = None
    _channel: DataChannel | None = None

    @property
    def state(self) -> SessionState:
        return self.sm.state

    @property
    def version(self) -> int:
        return self.sm.version

    @property
    def channel(self) -> DataChannel:
        """The binding's AEAD channel, its traffic keys derived on first use: a binding a
        client abandons before any DATA (a reattach storm, a rebind race it lost) never
        pays for the HKDF and the two cipher contexts."""
        ch = self._channel
        if ch is None:
            ch = self._channel = dataplane.channel_from_secret(
                self.secrets.secret, session_id=self.session_id, epoch=self.epoch,
                binding_id=self.binding_id, node_id=self.node_id, is_gateway=True)
        return ch

    @property
    def tx_channel(self) -> DataChannel:
        """The channel the downlink is sealed with: the previous secret's until the client's
        first packet under a REKEY's new keys shows it has them (it opens only those it
        knows), then the current one."""
        return self.prev_channel if self.prev_channel is not None else self.channel

    def may_send(self, size: int) -> bool:
        """Anti-amplification for this binding's peer (spends the budget when True)."""
        if self.validated:
            return True
        if not within_budget(self.rx_unvalidated, self.tx_unvalidated, size):
            return False
        self.tx_unvalidated += size
        return True
