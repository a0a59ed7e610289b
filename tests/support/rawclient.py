"""A raw protocol client for integration tests: real loopback sockets, hand-built messages.

``agent.Agent`` runs the well-behaved ``session.client.ClientSession``; tests of
the gateway's defences need a client that can also misbehave: send a request
twice, from another address, with a wrong MAC or a tampered field, race two
requests, replay DATA. ``RawSession`` speaks the wire itself with the same
building blocks as the real client (``session.handshake.Initiator``,
``SessionKeys``, ``traffic_keys``, ``control.seal``), and ``Endpoint`` is one
socket (a UDP socket or a TCP connection) that records every byte it sends and
receives, so tests can check what the gateway sent to an address (anti-
amplification) and what never reached it (hijack attempts).

Every wait is bounded; a missing answer raises ``NoAnswer``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from session import control, wire
from session.errors import DecodeError, RemoteProtocolError
from session.framing import DataChannel
from session.handshake import ClientHello, Initiator, Refusal, ServerHello
from session.keys import SessionKeys, traffic_keys
from session.stream import FramedStream

Answer = wire.ReattachAck | wire.Reject
DEFAULT_TIMEOUT = 3.0


class NoAnswer(AssertionError):
    """The gateway did not send the expected message in time."""


@dataclass(frozen=True)
class Received:
    """One message from the gateway, decoded, with its exact bytes (for MAC checks)."""

    msg: wire.Message
    raw: bytes


class Endpoint:
    """One transport to the gateway: a connected UDP socket or a TCP connection.

    Counts bytes and messages both ways; for TCP, bytes are whole frames
    (length prefix included) as they cross the wire.
    """

    def __init__(self, kind: wire.TransportKind, remote: tuple[str, int]) -> None:
        self.kind = kind
        self.remote = remote
        self.local: tuple[str, int] = ("", 0)
        self.tx_bytes = 0
        self.rx_bytes = 0
        self.tx_messages = 0
        self.received: list[bytes] = []  # every message the gateway sent here, in order
        self.framing_errors: list[DecodeError] = []  # TCP: bad lengths from the gateway
        self.eof = asyncio.Event()  # TCP: the gateway closed the connection
        self._cursor = 0
        self._arrived = asyncio.Event()
        self._transport: asyncio.BaseTransport | None = None
        self._sock: socket.socket | None = None
        self._quic: Any = None  # agent.quic.QuicPath, for a QUIC endpoint

    # ---- construction ----------------------------------------------------------------------

    @classmethod
    async def udp(cls, remote: tuple[str, int]) -> Endpoint:
        ep = cls(wire.TransportKind.UDP, remote)
        # Our own socket: asyncio's sendto() silently skips empty datagrams, we must not.
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.bind(("127.0.0.1", 0))
        sock.connect(remote)
        ep._sock = sock
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: _UdpProto(ep), sock=sock)
        return ep

    @classmethod
    async def tcp(cls, remote: tuple[str, int]) -> Endpoint:
        ep = cls(wire.TransportKind.TCP, remote)
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.create_connection(lambda: _TcpProto(ep), *remote), 5.0)
        return ep

    @classmethod
    async def quic(cls, remote: tuple[str, int]) -> Endpoint:
        """A QUIC connection (the agent's own QuicPath): messages in DATAGRAM frames."""
        from agent.quic import QuicPath

        ep = cls(wire.TransportKind.QUIC, remote)
        path = QuicPath(0, remote, lambda _, data: ep._deliver(data, len(data)),
                        lambda *_: ep.eof.set())
        await asyncio.wait_for(path.open(), 5.0)
        ep._quic = path
        ep.local = path.local or ("", 0)
        return ep

    @classmethod
    async def open(cls, kind: wire.TransportKind, gw_udp: tuple[str, int],
                   gw_tcp: tuple[str, int], gw_quic: tuple[str, int] | None = None) -> Endpoint:
        if kind is wire.TransportKind.UDP:
            return await cls.udp(gw_udp)
        if kind is wire.TransportKind.QUIC:
            assert gw_quic is not None, "the gateway has no QUIC listener"
            return await cls.quic(gw_quic)
        return await cls.tcp(gw_tcp)

    # ---- sending ---------------------------------------------------------------------------

    def send(self, message: bytes) -> None:
        """Send one message (framed on TCP)."""
        self.write(wire.frame(message) if self.kind is wire.TransportKind.TCP else message)
        self.tx_messages += 1

    def write(self, data: bytes) -> None:
        """Send bytes as they are: one datagram on UDP (one DATAGRAM frame on QUIC), raw
        stream bytes on TCP."""
        if self._quic is not None:
            self._quic.send(data)
            self.tx_bytes += len(data)
            return
        tr = self._transport
        assert tr is not None, "endpoint not connected"
        if self.kind is wire.TransportKind.UDP:
            if data:
                tr.sendto(data)  # type: ignore[attr-defined]
            else:
                assert self._sock is not None
                self._sock.send(b"")  # a zero-length datagram is input too
        else:
            tr.write(data)  # type: ignore[attr-defined]
        self.tx_bytes += len(data)

    # ---- receiving -------------------------------------------------------------------------

    def _deliver(self, message: bytes, wire_bytes: int) -> None:
        self.rx_bytes += wire_bytes
        self.received.append(message)
        self._arrived.set()

    async def expect(self, match: Callable[[wire.Message], bool],
                     timeout: float = DEFAULT_TIMEOUT, what: str = "a message") -> Received:
        """The next not-yet-consumed message that decodes and satisfies ``match``."""
        deadline = time.monotonic() + timeout
        while True:
            while self._cursor < len(self.received):
                raw = self.received[self._cursor]
                self._cursor += 1
                try:
                    msg = wire.decode(raw)
                except DecodeError:
                    continue
                if match(msg):
                    return Received(msg, raw)
            left = deadline - time.monotonic()
            if left <= 0:
                raise NoAnswer(f"no {what} from the gateway on {self.describe()} within {timeout}s")
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                pass

    async def quiet(self, seconds: float) -> list[bytes]:
        """Wait ``seconds`` and return what arrived meanwhile (without consuming it)."""
        start = len(self.received)
        await asyncio.sleep(seconds)
        return self.received[start:]

    def decoded(self) -> list[wire.Message]:
        """Every message received so far that decodes."""
        out: list[wire.Message] = []
        for raw in self.received:
            try:
                out.append(wire.decode(raw))
            except DecodeError:
                pass
        return out

    def describe(self) -> str:
        return f"{self.kind.name.lower()}:{self.local[0]}:{self.local[1]}"

    def close(self) -> None:
        if self._quic is not None:
            self._quic.close()
        if self._transport is not None:
            self._transport.close()


class _UdpProto(asyncio.DatagramProtocol):
    def __init__(self, ep: Endpoint) -> None:
        self.ep = ep

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.ep._transport = transport
        self.ep.local = transport.get_extra_info("sockname")[:2]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.ep._deliver(data, len(data))

    def error_received(self, exc: Exception) -> None:
        pass


class _TcpProto(FramedStream, asyncio.Protocol):
    def __init__(self, ep: Endpoint) -> None:
        self.ep = ep

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.ep._transport = transport
        self.ep.local = transport.get_extra_info("sockname")[:2]

    def frame_received(self, frame: bytes) -> None:
        self.ep._deliver(frame, len(frame) + wire.FRAME_HEAD.size)

    def framing_failed(self, error: DecodeError) -> None:
        self.ep.framing_errors.append(error)  # the mixin closes the connection

    def eof_received(self) -> bool:
        self.ep.eof.set()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.ep.eof.set()


# ---- the session ---------------------------------------------------------------------------


class RawSession:
    """One client session driven by hand: handshake, reattach requests, DATA."""

    def __init__(self, static_priv: bytes, gateway_pub: bytes, upstream: str,
                 l3: bool = False) -> None:
        self.l3 = l3  # ask for an L3 session (inner addresses in the ServerHello)
        self.static_priv = static_priv
        self.gateway_pub = gateway_pub
        self.upstream = upstream
        self.session_id = b""
        self.secret = b""
        self.keys: SessionKeys | None = None
        self.version = 0
        self.epoch = 0
        self.binding_id = b""
        self.node_id = b""
        self.channel: DataChannel | None = None
        self.endpoint: Endpoint | None = None  # the path the current binding uses
        self.offset_ms = 0.0  # gateway (store) clock minus our monotonic clock
        self.handshake_init = b""  # the HANDSHAKE_INIT bytes last sent (for replay tests)
        self.sent_data: list[bytes] = []  # every DATA packet sealed, in order
        self.payloads: list[bytes] = []  # every tunnelled payload received, in order

    # ---- handshake ------------------------------------------------------------------------

    async def handshake(self, ep: Endpoint, *, wall_ms: int | None = None,
                        kind: wire.TransportKind | None = None, upstream: str | None = None,
                        timeout: float = DEFAULT_TIMEOUT) -> ServerHello | Refusal:
        """Run the Noise IK handshake on ``ep``; install the session if accepted."""
        hid = os.urandom(wire.SESSION_ID_LEN)
        hello = ClientHello(int(time.time() * 1000) if wall_ms is None else wall_ms,
                            ep.kind if kind is None else kind,
                            self.upstream if upstream is None else upstream, l3=self.l3)
        init = Initiator(self.static_priv, self.gateway_pub, hid, hello)
        self.handshake_init = wire.encode(wire.HandshakeInit(hid, init.message1))
        ep.send(self.handshake_init)
        got = await ep.expect(lambda m: isinstance(m, wire.HandshakeResp) and m.handshake_id == hid,
                              timeout, "HANDSHAKE_RESP")
        assert isinstance(got.msg, wire.HandshakeResp)
        answer, secret = init.finish(got.msg.noise)
        if isinstance(answer, Refusal):
            return answer
        assert answer.session_id == got.msg.session_id
        self.session_id = answer.session_id
        self.secret = secret
        self.keys = SessionKeys(secret)
        self.version = answer.version
        self.offset_ms = answer.server_ms - time.monotonic() * 1000
        self._bind(answer.epoch, answer.binding_id, answer.node_id, ep)
        return answer

    async def connect(self, ep: Endpoint, validate: bool = True) -> ServerHello:
        """Handshake (must be accepted) and, by default, validate the path with a keepalive."""
        answer = await self.handshake(ep)
        assert isinstance(answer, ServerHello), f"handshake refused: {answer}"
        if validate:
            await self.keepalive(ep)
        return answer

    # ---- reattach -------------------------------------------------------------------------

    def server_ms(self) -> int:
        """Our estimate of the gateway's clock (what a proof timestamp must be near)."""
        return int(time.monotonic() * 1000 + self.offset_ms)

    def request(self, *, version: int | None = None, nonce: bytes | None = None,
                timestamp_ms: int | None = None, kind: wire.TransportKind | None = None,
                key: bytes | None = None, session_id: bytes | None = None,
                ) -> tuple[bytes, wire.ReattachRequest]:
        """A REATTACH_REQUEST, MAC'd under the proof key (or ``key``), and its fields (``kind``:
        by default the transport the session is on)."""
        assert self.keys is not None, "no session"
        if kind is None:
            kind = self.endpoint.kind if self.endpoint is not None else wire.TransportKind.UDP
        req = wire.ReattachRequest(
            self.session_id if session_id is None else session_id,
            self.version if version is None else version,
            os.urandom(wire.NONCE_LEN) if nonce is None else nonce,
            self.server_ms() if timestamp_ms is None else timestamp_ms,
            kind,
        )
        return control.seal(req, self.keys.proof_key if key is None else key), req

    async def answer(self, ep: Endpoint, nonce: bytes, timeout: float = DEFAULT_TIMEOUT,
                     session_id: bytes | None = None) -> Received:
        """The ACK or REJECT answering the request with ``nonce``."""
        sid = self.session_id if session_id is None else session_id
        return await ep.expect(
            lambda m: isinstance(m, wire.ReattachAck | wire.Reject) and m.nonce == nonce
            and m.session_id == sid, timeout, f"answer to nonce {nonce.hex()[:8]}")

    async def send_request(self, ep: Endpoint, raw: bytes, req: wire.ReattachRequest,
                           timeout: float = DEFAULT_TIMEOUT) -> Received:
        """Send ``raw`` on ``ep`` and wait for its answer (nothing is installed)."""
        ep.send(raw)
        return await self.answer(ep, req.nonce, timeout, req.session_id)

    async def reattach(self, ep: Endpoint, *, validate: bool = True,
                       timeout: float = DEFAULT_TIMEOUT, **fields: object) -> Received:
        """Request a move to ``ep``; on a (verified) ACK install the new binding there."""
        raw, req = self.request(kind=ep.kind, **fields)  # type: ignore[arg-type]
        got = await self.send_request(ep, raw, req, timeout)
        if isinstance(got.msg, wire.ReattachAck):
            self.install(got, ep)
            if validate:
                await self.keepalive(ep)
        return got

    def authentic(self, got: Received) -> bool:
        """Whether an answer carries a valid MAC under this session's control key."""
        assert self.keys is not None
        return control.verify(got.raw, self.keys.control_key)

    def install(self, got: Received, ep: Endpoint) -> None:
        """Adopt an ACK (after checking its MAC): new version, epoch and traffic keys."""
        ack = got.msg
        assert isinstance(ack, wire.ReattachAck)
        assert self.authentic(got), "REATTACH_ACK with a bad MAC"
        self.version = ack.version
        self.offset_ms = ack.server_ms - time.monotonic() * 1000
        self._bind(ack.epoch, ack.binding_id, ack.node_id, ep)

    # ---- data -----------------------------------------------------------------------------

    def _bind(self, epoch: int, binding_id: bytes, node_id: bytes, ep: Endpoint) -> None:
        c2g, g2c = traffic_keys(self.secret, epoch, binding_id, node_id)
        self.channel = DataChannel(c2g, g2c, self.session_id, epoch)
        self.epoch, self.binding_id, self.node_id, self.endpoint = epoch, binding_id, node_id, ep

    def gateway_channel(self) -> DataChannel:
        """A replica of the gateway's side of the current binding (to predict its checks)."""
        c2g, g2c = traffic_keys(self.secret, self.epoch, self.binding_id, self.node_id)
        return DataChannel(g2c, c2g, self.session_id, self.epoch)

    def seal(self, inner: bytes) -> bytes:
        assert self.channel is not None
        raw = self.channel.seal(inner)
        self.sent_data.append(raw)
        return raw

    def keepalive_packet(self, seq: int = 1) -> bytes:
        return self.seal(wire.inner_keepalive(seq, 0, 1))

    def payload_packet(self, payload: bytes) -> bytes:
        return self.seal(wire.inner_payload(payload))

    def open(self, raw: bytes) -> wire.Inner:
        """Authenticate and decrypt a DATA packet of the current binding."""
        assert self.channel is not None
        return wire.decode_inner(self.channel.open_raw(raw))

    async def keepalive(self, ep: Endpoint | None = None,
                        timeout: float = DEFAULT_TIMEOUT) -> wire.Inner:
        """Send a keepalive (this validates a new path) and wait for its ACK."""
        ep = ep or self.endpoint
        assert ep is not None
        ep.send(self.keepalive_packet())
        inner = await self.next_inner(ep, lambda i: i.kind is wire.InnerType.KEEPALIVE_ACK,
                                      timeout)
        self.version = max(self.version, inner.version)
        return inner

    async def next_inner(self, ep: Endpoint, match: Callable[[wire.Inner], bool],
                         timeout: float = DEFAULT_TIMEOUT) -> wire.Inner:
        """The next DATA packet on ``ep`` that opens under the current binding and matches.

        Every tunnelled payload opened on the way is kept in ``payloads``.
        """
        found: list[wire.Inner] = []

        def opens(m: wire.Message) -> bool:
            if not isinstance(m, wire.Data) or self.channel is None or m.epoch != self.epoch:
                return False
            try:
                inner = self.open(wire.encode(m))  # re-encoding a Data gives its exact bytes
            except RemoteProtocolError:
                return False
            if inner.kind is wire.InnerType.PAYLOAD:
                self.payloads.append(inner.payload)
            if match(inner):
                found.append(inner)
                return True
            return False

        await ep.expect(opens, timeout, "DATA")
        return found[0]

    async def wait_payloads(self, ep: Endpoint, count: int,
                            timeout: float = DEFAULT_TIMEOUT) -> list[bytes]:
        """Read DATA on ``ep`` until ``count`` payloads in all have arrived."""
        deadline = time.monotonic() + timeout
        while len(self.payloads) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise NoAnswer(f"{len(self.payloads)} of {count} payloads within {timeout}s")
            await self.next_inner(ep, lambda i: i.kind is wire.InnerType.PAYLOAD, left)
        return self.payloads


# ---- small async helpers --------------------------------------------------------------------


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 5.0,
                what: str = "condition", interval: float = 0.02) -> None:
    """Poll an async ``check`` until it is true, bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


MetricKey = tuple[str, frozenset[tuple[str, str]]]


async def scrape(admin_port: int) -> dict[MetricKey, float]:
    """Every sample of the gateway's /metrics, keyed by (name, labels)."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{admin_port}/metrics") as r:
            assert r.status == 200
            text = await r.text()
    out: dict[MetricKey, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def samples(metrics: dict[MetricKey, float], name: str, **labels: str) -> dict[
        frozenset[tuple[str, str]], float]:
    """The samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return {lab: v for (n, lab), v in metrics.items() if n == name and want <= lab}


def value(metrics: dict[MetricKey, float], name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` matching ``labels`` (0 if none)."""
    return sum(samples(metrics, name, **labels).values())


async def readyz(admin_port: int) -> tuple[int, dict[str, object]]:
    """(status, JSON body) of /readyz."""
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        async with http.get(f"http://127.0.0.1:{admin_port}/readyz") as r:
            return r.status, await r.json()
