"""The agent's QUIC transport: one QUIC connection to one gateway address.

Session messages ride DATAGRAM frames (RFC 9221), so a lost one is lost, as
over UDP, and nothing waits for it; a message larger than one DATAGRAM frame
holds (``wire.QUIC_DATAGRAM_MAX``) goes on the connection's unidirectional
stream, framed ``length u16 | message`` as on TCP. The connection negotiates
the ALPN ``wire.QUIC_ALPN``.

The gateway's QUIC certificate is not verified, on purpose: QUIC is a
transport here, not the session. The agent pins the cluster's Noise static
key; every message that matters is sealed or MAC'd under keys derived from
that handshake, so an impostor QUIC server learns and can change no more than
an on-path attacker of the UDP transport (it can drop, delay or copy sealed
messages). A new QUIC connection carries the session only after the agent's
REATTACH over it was accepted, as for any new transport.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl

from qh3.quic import events
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.connection import QuicConnection

from agent.transports import Path
from session import wire
from session.errors import DecodeError

log = logging.getLogger("jvpn.agent")
# qh3 logs every peer's close and every peer protocol error at WARNING: remote input must
# not be able to flood our log (what we refuse is counted, in metrics or in our own log).
logging.getLogger("quic").setLevel(logging.ERROR)

HANDSHAKE_TIMEOUT_S = 2.0  # as a TCP connect: a QUIC path that cannot handshake is skipped
MIN_HANDSHAKE_TIMEOUT_S = 1.0  # what the agent gives a QUIC handshake at least
# The RTT a new connection assumes (RFC 9002 says 333 ms): from 100 ms a lost Initial is
# sent again after about 0.3 s, so a handshake within MIN_HANDSHAKE_TIMEOUT_S survives a loss.
INITIAL_RTT_S = 0.1
IDLE_TIMEOUT_S = 60.0
MAX_RX_STREAMS = 4


def client_configuration(idle_timeout: float = IDLE_TIMEOUT_S) -> QuicConfiguration:
    """Our ALPN, DATAGRAM frames on, and no certificate check (see the module docstring)."""
    return QuicConfiguration(is_client=True, alpn_protocols=[wire.QUIC_ALPN],
                             verify_mode=ssl.CERT_NONE, idle_timeout=idle_timeout,
                             initial_rtt=INITIAL_RTT_S,
                             max_datagram_frame_size=65536,
                             max_datagram_size=wire.QUIC_MAX_UDP_PAYLOAD, probe_datagram_size=False)


class QuicPath(Path, asyncio.DatagramProtocol):
    kind = wire.TransportKind.QUIC

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.transport: asyncio.DatagramTransport | None = None
        self.quic = QuicConnection(configuration=client_configuration())
        self.loop: asyncio.AbstractEventLoop | None = None
        self._connected: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._tx_stream: int | None = None
        self._rx_streams: dict[int, wire.FrameDecoder] = {}

    async def open(self, timeout: float = HANDSHAKE_TIMEOUT_S) -> QuicPath:
        """Connect and complete the QUIC handshake (TimeoutError if it does not in time)."""
        loop = self.loop = asyncio.get_running_loop()
        self._connected = loop.create_future()
        sock = self._socket(socket.SOCK_DGRAM)  # marked in an L3 full tunnel (agent/l3.py)
        if sock is None:
            await loop.create_datagram_endpoint(lambda: self, remote_addr=self.remote)
        else:
            try:
                sock.connect(self.remote)
                await loop.create_datagram_endpoint(lambda: self, sock=sock)
            except BaseException:
                sock.close()
                raise
        self.quic.connect(self.remote, now=loop.time())
        self._transmit()
        try:
            await asyncio.wait_for(asyncio.shield(self._connected), timeout)
        except BaseException:
            self.close()
            raise
        return self

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.local = transport.get_extra_info("sockname")[:2]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.closed or self.loop is None:
            return
        try:
            self.quic.receive_datagram(data, addr, now=self.loop.time())
        except Exception as exc:
            self._failed(f"quic error: {exc}")
            return
        self._events()
        self._transmit()

    def error_received(self, exc: Exception) -> None:
        log.debug("path %d quic socket error: %s", self.path_id, exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._failed(f"quic socket closed: {exc}" if exc else "quic socket closed")

    def _events(self) -> None:
        while (ev := self.quic.next_event()) is not None:
            if isinstance(ev, events.DatagramFrameReceived):
                if not self.closed:
                    self._on_receive(self.path_id, ev.data)
            elif isinstance(ev, events.StreamDataReceived):
                self._stream_data(ev)
            elif isinstance(ev, events.HandshakeCompleted):
                if self._connected is not None and not self._connected.done():
                    if ev.alpn_protocol == wire.QUIC_ALPN:
                        self._connected.set_result(None)
                    else:
                        self._connected.set_exception(OSError("gateway did not agree on ALPN"))
            elif isinstance(ev, events.ConnectionTerminated):
                if self._connected is not None and not self._connected.done():
                    self._connected.set_exception(
                        OSError(f"quic connection refused: {ev.reason_phrase}"))
                self._failed(f"quic connection closed: {ev.reason_phrase or ev.error_code}")

    def _stream_data(self, ev: events.StreamDataReceived) -> None:
        dec = self._rx_streams.get(ev.stream_id)
        if dec is None:
            if len(self._rx_streams) >= MAX_RX_STREAMS:
                self._failed("gateway opened too many streams")
                return
            dec = self._rx_streams[ev.stream_id] = wire.FrameDecoder()
        try:
            frames = dec.feed(ev.data)
        except DecodeError as exc:
            self._failed(f"bad frame from gateway: {exc}")
            return
        for f in frames:
            if not self.closed:
                self._on_receive(self.path_id, f)
        if dec.error is not None:
            self._failed(f"bad frame from gateway: {dec.error}")

    def _transmit(self) -> None:
        if self.loop is None or self.transport is None:
            return
        try:
            out = self.quic.datagrams_to_send(now=self.loop.time())
        except Exception as exc:
            self._failed(f"quic error: {exc}")
            return
        for data, _ in out:
            self.transport.sendto(data)
        when = self.quic.get_timer()
        if self._timer is not None and self._timer_at != when:
            self._timer.cancel()
            self._timer = None
        if self._timer is None and when is not None and not self.closed:
            self._timer = self.loop.call_at(when, self._on_timer)
        self._timer_at = when

    def _on_timer(self) -> None:
        self._timer = None
        if self.loop is None or self.closed:
            return
        try:
            self.quic.handle_timer(now=max(self._timer_at or 0.0, self.loop.time()))
        except Exception as exc:
            self._failed(f"quic error: {exc}")
            return
        self._events()
        self._transmit()

    def send(self, data: bytes) -> None:
        if self.closed or self._connected is None or not self._connected.done():
            return
        try:
            if len(data) <= wire.QUIC_DATAGRAM_MAX:
                self.quic.send_datagram_frame(data)
            else:
                if self._tx_stream is None:
                    self._tx_stream = self.quic.get_next_available_stream_id(
                        is_unidirectional=True)
                self.quic.send_stream_data(self._tx_stream, wire.frame(data))
        except Exception as exc:
            self._failed(f"quic error: {exc}")
            return
        self._transmit()

    def _failed(self, reason: str) -> None:
        was_closed = self.closed
        super()._failed(reason)
        if not was_closed:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self.transport is not None:
                self.transport.close()

    def close(self) -> None:
        was_closed = self.closed
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is None:
            return
        if not was_closed and self.loop is not None:
            try:  # CONNECTION_CLOSE, so the gateway frees the connection at once
                self.quic.close(error_code=0, reason_phrase="closed")
                for data, _ in self.quic.datagrams_to_send(now=self.loop.time()):
                    self.transport.sendto(data)
            except Exception:
                log.debug("quic close failed", exc_info=True)
        self.transport.close()
