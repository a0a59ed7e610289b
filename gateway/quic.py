"""The gateway's QUIC listener: session messages in QUIC DATAGRAM frames (RFC 9221).

Theory of operation. QUIC is one more transport under the session, as UDP and
TCP are; it decides nothing. Each QUIC connection is one peer,
``Peer(QUIC, client address, conn)``: every DATAGRAM frame it carries goes to
``GatewayNode.on_message`` exactly as a UDP datagram or a TCP frame does, and
the machine's sends to that peer leave as DATAGRAM frames on that connection.
A message larger than what one DATAGRAM frame holds (the path MTU bounds it)
rides the connection's unidirectional stream, framed as on TCP
(``length u16 | message``): only those messages pay head-of-line blocking.

The connection's TLS certificate is self-generated (or ``quic_cert_file``) and
authenticates nothing: agents do not verify it. The session's Noise handshake,
its pinned static key and the per-binding keys remain the only authority, so
a man in the middle of the QUIC layer sees what an on-path attacker of the
UDP transport sees: sealed session messages. The connection must negotiate
``wire.QUIC_ALPN``; a connection that negotiates anything else is closed.

A new QUIC connection never inherits a binding: the machine moves a session
onto it only by a REATTACH sent over it (``GatewayMachine`` drops DATA from a
QUIC connection other than the binding's). QUIC's own connection migration
(a NAT rebinding under the same connection) is seen as a new address of the
same connection, and the machine validates it as it does for UDP.

Connection IDs route flows through the balancer, in the spirit of QUIC-LB:
every connection ID this node chooses for a connection is
``0x07 | server id (2 bytes) | 5 random bytes`` (first octet: config rotation
0, length 7 follows; ``gateway.quic_config``), so a balancer maps short-header
packets to this node without state; initial packets carry a client-chosen ID
and are routed by hash.

Unauthenticated input is bounded (``QuicLimits``): a datagram that is not
QUIC, an Initial under 1200 bytes (RFC 9000 section 14.1) or for an unknown
version is dropped and counted; open connections are capped in total and per
source address (the client's, behind a trusted balancer), connections still
handshaking in total, and past ``retry_threshold`` of those a new client must
first echo a stateless Retry token (RFC 9000 section 8.1.2); a connection that
has not completed its handshake by ``handshake_timeout`` is discarded. Each
refusal counts a ``QUIC_LIMIT`` drop.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from qh3._hazmat import Buffer  # qh3 keeps its Buffer there (aioquic: aioquic.buffer)
from qh3.quic import events
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.connection import QuicConnection
from qh3.quic.packet import (
    QuicPacketType,
    encode_quic_retry,
    encode_quic_version_negotiation,
    pull_quic_header,
)
from qh3.quic.retry import QuicRetryTokenHandler

from gateway.balancer import has_prefix_magic, parse_prefix
from gateway.quic_config import CID_LEN, QuicLimits, node_cid
from session import wire
from session.binding import Peer
from session.errors import DecodeError
from session.reasons import DropReason

if TYPE_CHECKING:
    from gateway.node import GatewayNode

log = logging.getLogger("jvpn.gateway.quic")
# qh3 logs every peer's close and every peer protocol error at WARNING: remote input must
# not be able to flood our log (what we refuse is counted, in metrics or in our own log).
logging.getLogger("quic").setLevel(logging.ERROR)

QUIC = wire.TransportKind.QUIC
MIN_INITIAL_SIZE = 1200  # RFC 9000 section 14.1: smaller client Initials are dropped
MAX_RX_STREAMS = 4  # a peer's unidirectional streams we decode; more closes the connection


class QuicListener(asyncio.DatagramProtocol):
    """One UDP socket speaking QUIC: connections by connection ID, each one Peer of the node."""

    def __init__(self, node: GatewayNode, configuration: QuicConfiguration, server_id: int,
                 limits: QuicLimits | None = None) -> None:
        self.node = node
        self.configuration = configuration
        self.server_id = server_id
        self.limits = limits or QuicLimits()
        self.transport: asyncio.DatagramTransport | None = None
        self.loop = asyncio.get_running_loop()
        self._by_cid: dict[bytes, _Conn] = {}
        self.conns: dict[int, _Conn] = {}  # by connection number (Peer.conn)
        self._next_conn = 1 << 40  # apart from the TCP connection numbers
        self._per_source: dict[str, int] = {}  # open connections by source address
        self.handshaking = 0
        self._retry = QuicRetryTokenHandler()

    # ---- socket ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def error_received(self, exc: Exception) -> None:
        log.debug("quic socket error: %s", exc)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        node = self.node
        if node._stopping:
            return
        via: tuple[str, int] | None = None
        client = (addr[0], addr[1])
        if node.trusted and node.trusted.trusts(addr[0]):
            parsed = parse_prefix(data)
            if parsed is None:
                node.prefix_dropped(DropReason.MISSING_PREFIX, QUIC, addr[0])
                return
            client, data = parsed
            via = (addr[0], addr[1])
        elif has_prefix_magic(data):
            node.prefix_dropped(DropReason.UNTRUSTED_PREFIX, QUIC, addr[0])
            return
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=CID_LEN)
        except Exception:  # qh3 raises ValueError, or its own errors, on what is not QUIC
            initial = bool(data) and data[0] & 0xF0 == 0xC0  # a cut long-header Initial
            self._drop(DropReason.TRUNCATED if initial else DropReason.MALFORMED)
            return
        conn = self._by_cid.get(header.destination_cid)
        if conn is None:
            conn = self._new_connection(data, header, client, via)
            if conn is None:
                return
        conn.receive(data, via or client, client, via)

    def _drop(self, reason: DropReason) -> None:
        self.node.metrics.count_drop(reason, QUIC)

    def _new_connection(self, data: bytes, header: Any, client: tuple[str, int],
                        via: tuple[str, int] | None) -> _Conn | None:
        send_to = via or client
        if header.version is None or header.packet_type != QuicPacketType.INITIAL:
            self._drop(DropReason.UNKNOWN_SESSION)  # a packet of a connection we do not hold
            return None
        if len(data) < MIN_INITIAL_SIZE:
            self._drop(DropReason.TRUNCATED)
            return None
        if header.version not in self.configuration.supported_versions:
            if self.transport is not None:  # smaller than the 1200 bytes received
                self.transport.sendto(encode_quic_version_negotiation(
                    source_cid=header.destination_cid, destination_cid=header.source_cid,
                    supported_versions=self.configuration.supported_versions), send_to)
            self._drop(DropReason.BAD_VERSION)
            return None
        lim = self.limits
        source = client[0]
        if (len(self.conns) >= lim.max_connections or self.handshaking >= lim.max_handshaking
                or (lim.max_per_source
                    and self._per_source.get(source, 0) >= lim.max_per_source)):
            self._drop(DropReason.QUIC_LIMIT)
            return None
        odcid: bytes = header.destination_cid
        retry_scid: bytes | None = None
        if self.handshaking >= lim.retry_threshold:
            if not header.token:  # prove the address first: a Retry is smaller than the Initial
                scid = node_cid(self.server_id)
                if self.transport is not None:
                    self.transport.sendto(encode_quic_retry(
                        version=header.version, source_cid=scid,
                        destination_cid=header.source_cid,
                        original_destination_cid=header.destination_cid,
                        retry_token=self._retry.create_token(send_to, header.destination_cid,
                                                             scid)), send_to)
                return None
            try:
                odcid, retry_scid = self._retry.validate_token(send_to, header.token)
            except ValueError:
                self._drop(DropReason.QUIC_LIMIT)
                return None
        try:
            quic = QuicConnection(configuration=self.configuration,
                                  original_destination_connection_id=odcid,
                                  retry_source_connection_id=retry_scid)
        except Exception:
            log.exception("cannot create a QUIC connection")
            self._drop(DropReason.MALFORMED)
            return None
        quic.host_cid = node_cid(self.server_id)  # before the first packet: it becomes the SCID
        number = self._next_conn
        self._next_conn += 1
        conn = _Conn(self, quic, number, source, self.loop.time())
        self.conns[number] = conn
        self._by_cid[header.destination_cid] = conn
        self._by_cid[quic.host_cid] = conn
        conn.cids.update((header.destination_cid, quic.host_cid))
        self.handshaking += 1
        self._per_source[source] = self._per_source.get(source, 0) + 1
        conn.deadline = self.loop.call_later(lim.handshake_timeout, conn.handshake_late)
        return conn

    # ---- what the node calls ---------------------------------------------------------------

    def send(self, conn_number: int, data: bytes) -> bool:
        """One session message to a connection; False if it is gone."""
        conn = self.conns.get(conn_number)
        if conn is None or not conn.established:
            return False
        return conn.send_message(data)

    def close(self) -> None:
        for conn in list(self.conns.values()):
            conn.shut("gateway stopping")
        if self.transport is not None:
            self.transport.close()

    # ---- bookkeeping -----------------------------------------------------------------------

    def _forget(self, conn: _Conn) -> None:
        if self.conns.pop(conn.number, None) is None:
            return
        if not conn.established:
            self.handshaking -= 1
        n = self._per_source.get(conn.source, 0) - 1
        if n > 0:
            self._per_source[conn.source] = n
        else:
            self._per_source.pop(conn.source, None)
        for cid in conn.cids:
            if self._by_cid.get(cid) is conn:
                del self._by_cid[cid]
        conn.cids.clear()


class _Conn:
    """One QUIC connection: the qh3 machine, its timer, its peer as the node sees it."""

    def __init__(self, listener: QuicListener, quic: QuicConnection, number: int, source: str,
                 now: float) -> None:
        self.listener = listener
        self.quic = quic
        self.number = number
        self.source = source
        self.created = now
        self.established = False
        self.closed = False
        self.cids: set[bytes] = set()
        self.peer: Peer | None = None
        self.deadline: asyncio.TimerHandle | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at: float | None = None
        self.tx_stream: int | None = None
        self.rx_streams: dict[int, wire.FrameDecoder] = {}

    def receive(self, data: bytes, addr: tuple[str, int], client: tuple[str, int],
                via: tuple[str, int] | None) -> None:
        lst = self.listener
        try:
            self.quic.receive_datagram(data, addr, now=lst.loop.time())
        except Exception:  # the library refused it: the connection cannot go on
            lst._drop(DropReason.MALFORMED)
            self.shut("protocol error")
            return
        peer = self.peer
        if peer is None or peer.addr != client or peer.via != via:
            self.peer = Peer(QUIC, client, self.number, via=via)
        self._events()
        self.transmit()

    def _events(self) -> None:
        lst = self.listener
        node = lst.node
        while (ev := self.quic.next_event()) is not None:
            if isinstance(ev, events.DatagramFrameReceived):
                if self.established and self.peer is not None:
                    node.on_message(ev.data, self.peer)
            elif isinstance(ev, events.StreamDataReceived):
                self._stream_data(ev)
            elif isinstance(ev, events.HandshakeCompleted):
                if ev.alpn_protocol != wire.QUIC_ALPN:
                    lst._drop(DropReason.QUIC_LIMIT)
                    self.shut("no jvpn ALPN")
                    return
                self.established = True
                lst.handshaking -= 1
                if self.deadline is not None:
                    self.deadline.cancel()
                    self.deadline = None
            elif isinstance(ev, events.ConnectionIdIssued):
                lst._by_cid[ev.connection_id] = self
                self.cids.add(ev.connection_id)
            elif isinstance(ev, events.ConnectionIdRetired):
                if lst._by_cid.get(ev.connection_id) is self:
                    del lst._by_cid[ev.connection_id]
                self.cids.discard(ev.connection_id)
            elif isinstance(ev, events.ConnectionTerminated):
                self._gone()
                return

    def _stream_data(self, ev: events.StreamDataReceived) -> None:
        """Session messages too large for a DATAGRAM frame, framed on a stream."""
        if not self.established or self.peer is None:
            return
        dec = self.rx_streams.get(ev.stream_id)
        if dec is None:
            if len(self.rx_streams) >= MAX_RX_STREAMS:
                self.listener._drop(DropReason.QUIC_LIMIT)
                self.shut("too many streams")
                return
            dec = self.rx_streams[ev.stream_id] = wire.FrameDecoder()
        try:
            frames = dec.feed(ev.data)
        except DecodeError as exc:
            self.listener._drop(exc.reason)
            self.shut("bad frame")
            return
        for f in frames:
            self.listener.node.on_message(f, self.peer)
        if dec.error is not None:
            self.listener._drop(dec.error.reason)
            self.shut("bad frame")

    def send_message(self, data: bytes) -> bool:
        if self.closed:
            return False
        try:
            if len(data) <= wire.QUIC_DATAGRAM_MAX:
                self.quic.send_datagram_frame(data)
            else:
                if self.tx_stream is None:
                    self.tx_stream = self.quic.get_next_available_stream_id(is_unidirectional=True)
                self.quic.send_stream_data(self.tx_stream, wire.frame(data))
        except Exception:
            log.debug("quic send failed", exc_info=True)
            return False
        self.transmit()
        return True

    def transmit(self) -> None:
        lst = self.listener
        if self.closed and self.timer is None:
            return
        tx = lst.transport
        try:
            out = self.quic.datagrams_to_send(now=lst.loop.time())
        except Exception:
            log.debug("quic transmit failed", exc_info=True)
            self._gone()
            return
        if tx is not None:
            for data, addr in out:
                tx.sendto(data, addr)
        when = self.quic.get_timer()
        if self.timer is not None and self.timer_at != when:
            self.timer.cancel()
            self.timer = None
        if self.timer is None and when is not None and not self.closed:
            self.timer = lst.loop.call_at(when, self._on_timer)
        self.timer_at = when

    def _on_timer(self) -> None:
        self.timer = None
        lst = self.listener
        try:
            self.quic.handle_timer(now=max(self.timer_at or 0.0, lst.loop.time()))
        except Exception:
            log.debug("quic timer failed", exc_info=True)
            self._gone()
            return
        self._events()
        self.transmit()

    def handshake_late(self) -> None:
        self.deadline = None
        if not self.established and not self.closed:
            self.listener._drop(DropReason.QUIC_LIMIT)
            self._gone()  # silently: the peer may not even exist

    def shut(self, why: str) -> None:
        """Close with CONNECTION_CLOSE (sent at once), then forget."""
        if self.closed:
            return
        try:
            self.quic.close(error_code=0, reason_phrase=why)
            tx = self.listener.transport
            for data, addr in self.quic.datagrams_to_send(now=self.listener.loop.time()):
                if tx is not None:
                    tx.sendto(data, addr)
        except Exception:
            log.debug("quic close failed", exc_info=True)
        self._gone()

    def _gone(self) -> None:
        self.closed = True
        for h in (self.timer, self.deadline):
            if h is not None:
                h.cancel()
        self.timer = self.deadline = None
        self.listener._forget(self)
