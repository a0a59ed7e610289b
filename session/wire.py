"""Versioned wire codec: strict, bounded, no attacker-chosen allocation.

Every message starts with the same 20-byte cleartext header::

    version u8 | type u8 | flags u16 (zero) | session_id 16 bytes

so a load balancer can route any datagram by ``session_id`` at a fixed offset
(for HANDSHAKE_INIT and RETRY the id is the client's random handshake id).
Fields are big-endian. Messages that carry a MAC end with it (``MAC_LEN``
bytes); the MAC covers every byte before it (``signed_part``). Decoding checks
the exact length of each layout: a byte string either decodes to one message
or raises ``DecodeError`` carrying a ``DropReason``, nothing else.

Over TCP the same messages travel as frames: ``length u16 | message``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from session import PROTOCOL_VERSION
from session.errors import DecodeError
from session.reasons import DropReason, NoticeKind, RejectReason

SESSION_ID_LEN = 16
NONCE_LEN = 16
MAC_LEN = 32
BINDING_ID_LEN = 16
MAX_NODE_ID_LEN = 32
NODE_INSTANCE_LEN = 4  # random bytes per process in the node's identity (8 hex digits)
_NODE_NAME_MAX = MAX_NODE_ID_LEN - 1 - 2 * NODE_INSTANCE_LEN


def node_instance(node_id: str, instance: bytes) -> str:
    """This process's identity: the configured node id and a random instance, "gw-1#1a2b3c4d".

    It is what the store records as a binding's node and what traffic keys are derived
    from, so a restarted node (a new instance) never owns, nor rebuilds the keys of, a
    binding its previous process granted: no send counter restarts under a used key.
    """
    name = node_id.encode()[:_NODE_NAME_MAX].decode("utf-8", "ignore")
    return f"{name}#{instance.hex()}"


def node_name(instance_id: str) -> str:
    """The configured node id part of a node instance id."""
    return instance_id.rpartition("#")[0] or instance_id

MAX_TOKEN_LEN = 64
AEAD_TAG_LEN = 16
MAX_MESSAGE_SIZE = 2048  # never accept or build anything larger (UDP or TCP frame)
MAX_PAYLOAD_SIZE = 1500  # largest tunnelled datagram
MIN_NOISE_INIT = 32 + 48 + 16  # e, encrypted s, empty-payload tag
MIN_NOISE_RESP = 32 + 16

HEADER = struct.Struct("!BBH16s")
HEADER_LEN = HEADER.size  # 20


# A REATTACH_REQUEST's flags carry a route hint: the balancer sends a request with hint
# k > 0 to the k-th other node of the session instead of its usual node, so a client whose
# usual node does not answer (paused, overloaded) reaches another one by asking again
# with k + 1, and the next one with k + 2 (deploy/nginx/jvpn.js).
# Routing only: any node accepts any reattach, and the hint is under the request's MAC.
ROUTE_MAX = 0xFF


class MessageType(IntEnum):
    HANDSHAKE_INIT = 1
    HANDSHAKE_RESP = 2
    RETRY = 3
    DATA = 4
    REATTACH_REQUEST = 5
    REATTACH_ACK = 6
    REJECT = 7
    NOTICE = 8


class TransportKind(IntEnum):
    UDP = 1
    TCP = 2
    QUIC = 3  # messages in QUIC DATAGRAM frames (RFC 9221); see QUIC_ALPN


# The ALPN of a QUIC connection that carries session messages. QUIC is only a transport:
# its TLS certificate authenticates nothing here, the pinned Noise key does.
QUIC_ALPN = "jvpn/1"
# QUIC packets are at most this many bytes of UDP payload (a 1500-byte path over IPv6; fixed
# from the first packet, no path MTU probing), so a DATAGRAM frame holds at most
# QUIC_DATAGRAM_MAX bytes of message; a larger message rides the connection's stream, framed.
QUIC_MAX_UDP_PAYLOAD = 1452
QUIC_DATAGRAM_MAX = 1412  # measured 1422 with qh3 and 8-byte connection IDs; kept below


class InnerType(IntEnum):
    """What a DATA packet's plaintext carries (first byte)."""

    PAYLOAD = 1  # a tunnelled datagram
    KEEPALIVE = 2  # seq u32 | echo_ms u64 | sender state u8
    KEEPALIVE_ACK = 3  # seq u32 | echo_ms u64 | version u64 | state u8 (gateway view)
    CLOSE = 4  # reason u8: authenticated in-band terminate
    PATH_CHALLENGE = 5  # data 8: the gateway probes a new address (RFC 9000 section 8.2)
    PATH_RESPONSE = 6  # data 8: the client echoes it, from the address it reached
    REKEY = 7  # generation u32 | ephemeral X25519 public 32: a fresh DH (client -> gateway)
    REKEY_ACK = 8  # generation u32 | epoch u64 | binding id 16 | ephemeral public 32
    FLOW_PAYLOAD = 9  # flow u16 | datagram: UDP-forward mode, one flow per local source


@dataclass(frozen=True, slots=True)
class HandshakeInit:
    handshake_id: bytes
    noise: bytes
    token: bytes = b""
    TYPE = MessageType.HANDSHAKE_INIT


@dataclass(frozen=True, slots=True)
class HandshakeResp:
    session_id: bytes
    handshake_id: bytes
    noise: bytes
    TYPE = MessageType.HANDSHAKE_RESP


@dataclass(frozen=True, slots=True)
class Retry:
    handshake_id: bytes
    token: bytes
    TYPE = MessageType.RETRY


@dataclass(frozen=True, slots=True)
class Data:
    session_id: bytes
    epoch: int
    counter: int
    ciphertext: bytes
    TYPE = MessageType.DATA


@dataclass(frozen=True, slots=True)
class ReattachRequest:
    session_id: bytes
    expected_version: int
    nonce: bytes
    timestamp_ms: int
    kind: TransportKind
    mac: bytes = b"\x00" * MAC_LEN
    route: int = 0  # the route hint in the header's flags (0..ROUTE_MAX; 0: the usual node)
    TYPE = MessageType.REATTACH_REQUEST


@dataclass(frozen=True, slots=True)
class ReattachAck:
    session_id: bytes
    nonce: bytes  # the request's nonce: binds the answer to one request
    version: int
    epoch: int
    binding_id: bytes
    node_id: bytes
    server_ms: int
    mac: bytes = b"\x00" * MAC_LEN
    TYPE = MessageType.REATTACH_ACK


@dataclass(frozen=True, slots=True)
class Reject:
    session_id: bytes
    nonce: bytes  # the request's nonce (zeros for a handshake reject)
    reason: RejectReason
    version: int  # current version when known and authenticated, else 0
    server_ms: int
    mac: bytes = b"\x00" * MAC_LEN  # all zeros: unauthenticated
    TYPE = MessageType.REJECT

    @property
    def authenticated(self) -> bool:
        return self.mac != b"\x00" * MAC_LEN


@dataclass(frozen=True, slots=True)
class Notice:
    session_id: bytes
    kind: NoticeKind
    reason: int
    version: int
    nonce: bytes
    server_ms: int
    mac: bytes = b"\x00" * MAC_LEN
    TYPE = MessageType.NOTICE


Message = (
    HandshakeInit | HandshakeResp | Retry | Data | ReattachRequest | ReattachAck | Reject | Notice
)

_DATA_HEAD = struct.Struct("!IQ")  # epoch, counter
_REQ = struct.Struct("!Q16sQB32s")
_ACK_HEAD = struct.Struct("!16sQI16sB")  # nonce version epoch binding_id node_len
_ACK_TAIL = struct.Struct("!Q32s")
_REJECT = struct.Struct("!16sBQQ32s")
_NOTICE = struct.Struct("!BBQ16sQ32s")
_KEEPALIVE = struct.Struct("!BIQB")
_KEEPALIVE_ACK = struct.Struct("!BIQQB")

DATA_OVERHEAD = HEADER_LEN + _DATA_HEAD.size + AEAD_TAG_LEN + 1
REATTACH_REQUEST_LEN = HEADER_LEN + _REQ.size
_DATA_PREFIX_LEN = HEADER_LEN + _DATA_HEAD.size  # header | epoch | counter
_MESSAGE_TYPES = {int(t): t for t in MessageType}
_ENUM_TABLES: dict[type[IntEnum], dict[int, IntEnum]] = {}  # for _enum: a dict hit per lookup


def _header(mtype: MessageType, sid: bytes, flags: int = 0) -> bytes:
    if len(sid) != SESSION_ID_LEN:
        raise ValueError("session_id must be 16 bytes")
    return HEADER.pack(PROTOCOL_VERSION, mtype, flags, sid)


def encode(msg: Message) -> bytes:
    """Serialize a message. Raises ValueError for out-of-range local input."""
    if isinstance(msg, Data):
        out = _header(msg.TYPE, msg.session_id) + _DATA_HEAD.pack(msg.epoch, msg.counter) + msg.ciphertext
    elif isinstance(msg, ReattachRequest):
        if not 0 <= msg.route <= ROUTE_MAX:
            raise ValueError(f"route hint {msg.route} out of range")
        out = _header(msg.TYPE, msg.session_id, msg.route) + _REQ.pack(
            msg.expected_version, msg.nonce, msg.timestamp_ms, msg.kind, msg.mac
        )
    elif isinstance(msg, ReattachAck):
        if len(msg.node_id) > MAX_NODE_ID_LEN:
            raise ValueError("node_id too long")
        out = (
            _header(msg.TYPE, msg.session_id)
            + _ACK_HEAD.pack(msg.nonce, msg.version, msg.epoch, msg.binding_id, len(msg.node_id))
            + msg.node_id
            + _ACK_TAIL.pack(msg.server_ms, msg.mac)
        )
    elif isinstance(msg, Reject):
        out = _header(msg.TYPE, msg.session_id) + _REJECT.pack(
            msg.nonce, msg.reason, msg.version, msg.server_ms, msg.mac
        )
    elif isinstance(msg, Notice):
        out = _header(msg.TYPE, msg.session_id) + _NOTICE.pack(
            msg.kind, msg.reason, msg.version, msg.nonce, msg.server_ms, msg.mac
        )
    elif isinstance(msg, HandshakeInit):
        if len(msg.token) > MAX_TOKEN_LEN:
            raise ValueError("token too long")
        out = _header(msg.TYPE, msg.handshake_id) + bytes([len(msg.token)]) + msg.token + msg.noise
    elif isinstance(msg, HandshakeResp):
        out = _header(msg.TYPE, msg.session_id) + msg.handshake_id + msg.noise
    elif isinstance(msg, Retry):
        if not 0 < len(msg.token) <= MAX_TOKEN_LEN:
            raise ValueError("bad token length")
        out = _header(msg.TYPE, msg.handshake_id) + msg.token
    else:  # pragma: no cover - exhaustive
        raise TypeError(f"not a message: {msg!r}")
    if len(out) > MAX_MESSAGE_SIZE:
        raise ValueError(f"message of {len(out)} bytes exceeds {MAX_MESSAGE_SIZE}")
    return out


def peek_header(data: bytes) -> tuple[MessageType, bytes]:
    """Validate the fixed header and return (type, session_id) without decoding the body."""
    n = len(data)
    if n > MAX_MESSAGE_SIZE:
        raise DecodeError(DropReason.OVERSIZED, f"{n} bytes")
    if n < HEADER_LEN:
        raise DecodeError(DropReason.TRUNCATED, f"{n} bytes, header needs {HEADER_LEN}")
    version, mtype, flags, sid = HEADER.unpack_from(data)
    if version != PROTOCOL_VERSION:
        raise DecodeError(DropReason.BAD_VERSION, f"version {version}")
    if flags != 0 and (mtype != MessageType.REATTACH_REQUEST or flags > ROUTE_MAX):
        raise DecodeError(DropReason.MALFORMED, "reserved flags set")
    member = _MESSAGE_TYPES.get(mtype)  # a dict hit: MessageType(x) costs ~0.3 us per packet
    if member is None:
        raise DecodeError(DropReason.UNKNOWN_TYPE, f"type {mtype}")
    return member, sid


def _exact(data: bytes, size: int, what: str) -> None:
    if len(data) < size:
        raise DecodeError(DropReason.TRUNCATED, f"{what}: {len(data)} < {size} bytes")
    if len(data) > size:
        raise DecodeError(DropReason.MALFORMED, f"{what}: {len(data) - size} trailing bytes")


def decode(data: bytes) -> Message:
    """Parse one message; raise DecodeError (with a DropReason) for anything else."""
    data = bytes(data)
    mtype, sid = peek_header(data)
    if mtype is MessageType.DATA:  # the hot path: one copy of the ciphertext, not two
        if len(data) < _DATA_PREFIX_LEN + AEAD_TAG_LEN + 1:
            raise DecodeError(DropReason.TRUNCATED, "DATA")
        epoch, counter = _DATA_HEAD.unpack_from(data, HEADER_LEN)
        return Data(sid, epoch, counter, data[_DATA_PREFIX_LEN:])
    body = data[HEADER_LEN:]
    if mtype is MessageType.REATTACH_REQUEST:
        _exact(body, _REQ.size, "REATTACH_REQUEST")
        ver, nonce, ts, kind, mac = _REQ.unpack(body)
        return ReattachRequest(sid, ver, nonce, ts, _enum(TransportKind, kind), mac,
                               HEADER.unpack_from(data)[2])
    if mtype is MessageType.REATTACH_ACK:
        if len(body) < _ACK_HEAD.size + _ACK_TAIL.size:
            raise DecodeError(DropReason.TRUNCATED, "REATTACH_ACK")
        nonce, ver, epoch, bid, nlen = _ACK_HEAD.unpack_from(body)
        if nlen > MAX_NODE_ID_LEN:
            raise DecodeError(DropReason.MALFORMED, "node_id too long")
        _exact(body, _ACK_HEAD.size + nlen + _ACK_TAIL.size, "REATTACH_ACK")
        node = body[_ACK_HEAD.size:_ACK_HEAD.size + nlen]
        server_ms, mac = _ACK_TAIL.unpack_from(body, _ACK_HEAD.size + nlen)
        return ReattachAck(sid, nonce, ver, epoch, bid, node, server_ms, mac)
    if mtype is MessageType.REJECT:
        _exact(body, _REJECT.size, "REJECT")
        nonce, reason, ver, server_ms, mac = _REJECT.unpack(body)
        return Reject(sid, nonce, _enum(RejectReason, reason), ver, server_ms, mac)
    if mtype is MessageType.NOTICE:
        _exact(body, _NOTICE.size, "NOTICE")
        kind, reason, ver, nonce, server_ms, mac = _NOTICE.unpack(body)
        return Notice(sid, _enum(NoticeKind, kind), reason, ver, nonce, server_ms, mac)
    if mtype is MessageType.HANDSHAKE_INIT:
        if not body:
            raise DecodeError(DropReason.TRUNCATED, "HANDSHAKE_INIT")
        tlen = body[0]
        if tlen > MAX_TOKEN_LEN:
            raise DecodeError(DropReason.MALFORMED, "token too long")
        noise = body[1 + tlen:]
        if len(body) < 1 + tlen or len(noise) < MIN_NOISE_INIT:
            raise DecodeError(DropReason.TRUNCATED, "HANDSHAKE_INIT")
        return HandshakeInit(sid, noise, body[1:1 + tlen])
    if mtype is MessageType.HANDSHAKE_RESP:
        if len(body) < SESSION_ID_LEN + MIN_NOISE_RESP:
            raise DecodeError(DropReason.TRUNCATED, "HANDSHAKE_RESP")
        return HandshakeResp(sid, body[:SESSION_ID_LEN], body[SESSION_ID_LEN:])
    if mtype is MessageType.RETRY:
        if not 0 < len(body) <= MAX_TOKEN_LEN:
            raise DecodeError(DropReason.MALFORMED, "RETRY token length")
        return Retry(sid, body)
    raise DecodeError(DropReason.UNKNOWN_TYPE, mtype.name)  # pragma: no cover


def _enum(cls: type[IntEnum], value: int):  # type: ignore[no-untyped-def]
    table = _ENUM_TABLES.get(cls)
    if table is None:
        table = _ENUM_TABLES[cls] = {int(m): m for m in cls}
    member = table.get(value)
    if member is None:
        raise DecodeError(DropReason.MALFORMED, f"{cls.__name__} {value}")
    return member


def signed_part(raw: bytes) -> bytes:
    """The bytes a trailing MAC covers."""
    return raw[:-MAC_LEN]


def data_associated(raw: bytes) -> bytes:
    """The cleartext prefix of a DATA packet that its AEAD tag also covers."""
    return raw[: HEADER_LEN + _DATA_HEAD.size]


# ---- inner (decrypted DATA) messages ---------------------------------------------------


def inner_payload(payload: bytes) -> bytes:
    if len(payload) > MAX_PAYLOAD_SIZE:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_SIZE}")
    return bytes([InnerType.PAYLOAD]) + payload


MAX_FLOWS = 256  # flows (local source addresses) per UDP-forward session, ids 1..MAX_FLOWS
_FLOW = struct.Struct("!BH")


def inner_flow_payload(flow: int, payload: bytes) -> bytes:
    """A datagram of one flow: the agent's local source ``flow`` (1..MAX_FLOWS); its
    replies come back with the same id, so two programs never get each other's."""
    if len(payload) > MAX_PAYLOAD_SIZE:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_SIZE}")
    if not 0 < flow <= MAX_FLOWS:
        raise ValueError(f"flow {flow} outside 1..{MAX_FLOWS}")
    return _FLOW.pack(InnerType.FLOW_PAYLOAD, flow) + payload


def inner_keepalive(seq: int, echo_ms: int, state: int) -> bytes:
    return _KEEPALIVE.pack(InnerType.KEEPALIVE, seq, echo_ms, state)


def inner_keepalive_ack(seq: int, echo_ms: int, version: int, state: int) -> bytes:
    return _KEEPALIVE_ACK.pack(InnerType.KEEPALIVE_ACK, seq, echo_ms, version, state)


def inner_close(reason: int) -> bytes:
    return bytes([InnerType.CLOSE, reason])


PATH_DATA_LEN = 8


def inner_path_challenge(data: bytes) -> bytes:
    if len(data) != PATH_DATA_LEN:
        raise ValueError("path challenge data must be 8 bytes")
    return bytes([InnerType.PATH_CHALLENGE]) + data


def inner_path_response(data: bytes) -> bytes:
    if len(data) != PATH_DATA_LEN:
        raise ValueError("path response data must be 8 bytes")
    return bytes([InnerType.PATH_RESPONSE]) + data


_REKEY = struct.Struct("!BI32s")
_REKEY_ACK = struct.Struct("!BIQ16s32s")


def inner_rekey(generation: int, public: bytes) -> bytes:
    """Ask to move from key ``generation`` to the next with a fresh X25519 public key."""
    return _REKEY.pack(InnerType.REKEY, generation, public)


def inner_rekey_ack(generation: int, epoch: int, binding_id: bytes, public: bytes) -> bytes:
    """The gateway's half: the new ``generation``, the binding it now holds, its key."""
    return _REKEY_ACK.pack(InnerType.REKEY_ACK, generation, epoch, binding_id, public)


@dataclass(frozen=True, slots=True)
class Inner:
    kind: InnerType
    payload: bytes = b""  # a PAYLOAD's datagram, path data, a REKEY's public key
    seq: int = 0
    echo_ms: int = 0
    state: int = 0
    reason: int = 0
    version: int = 0
    generation: int = 0  # REKEY, REKEY_ACK
    epoch: int = 0  # REKEY_ACK
    binding_id: bytes = b""  # REKEY_ACK
    flow: int = 0  # FLOW_PAYLOAD: the flow id (0: a plain PAYLOAD)


def decode_inner(plain: bytes) -> Inner:
    """Parse a decrypted DATA plaintext strictly."""
    if not plain:
        raise DecodeError(DropReason.TRUNCATED, "empty inner")
    kind = _enum(InnerType, plain[0])
    if kind is InnerType.PAYLOAD:
        if len(plain) - 1 > MAX_PAYLOAD_SIZE:
            raise DecodeError(DropReason.OVERSIZED, "inner payload")
        return Inner(kind, payload=plain[1:])
    if kind is InnerType.FLOW_PAYLOAD:
        if len(plain) < _FLOW.size:
            raise DecodeError(DropReason.TRUNCATED, "FLOW_PAYLOAD")
        if len(plain) - _FLOW.size > MAX_PAYLOAD_SIZE:
            raise DecodeError(DropReason.OVERSIZED, "inner flow payload")
        _, flow = _FLOW.unpack_from(plain)
        if not 0 < flow <= MAX_FLOWS:
            raise DecodeError(DropReason.MALFORMED, "FLOW_PAYLOAD flow")
        return Inner(kind, payload=plain[_FLOW.size:], flow=flow)
    if kind is InnerType.KEEPALIVE:
        _exact(plain, _KEEPALIVE.size, "KEEPALIVE")
        _, seq, echo, state = _KEEPALIVE.unpack(plain)
        return Inner(kind, seq=seq, echo_ms=echo, state=state)
    if kind is InnerType.KEEPALIVE_ACK:
        _exact(plain, _KEEPALIVE_ACK.size, "KEEPALIVE_ACK")
        _, seq, echo, version, state = _KEEPALIVE_ACK.unpack(plain)
        return Inner(kind, seq=seq, echo_ms=echo, version=version, state=state)
    if kind is InnerType.PATH_CHALLENGE or kind is InnerType.PATH_RESPONSE:
        _exact(plain, 1 + PATH_DATA_LEN, kind.name)
        return Inner(kind, payload=plain[1:])
    if kind is InnerType.REKEY:
        _exact(plain, _REKEY.size, "REKEY")
        _, gen, pub = _REKEY.unpack(plain)
        return Inner(kind, payload=pub, generation=gen)
    if kind is InnerType.REKEY_ACK:
        _exact(plain, _REKEY_ACK.size, "REKEY_ACK")
        _, gen, epoch, bid, pub = _REKEY_ACK.unpack(plain)
        return Inner(kind, payload=pub, generation=gen, epoch=epoch, binding_id=bid)
    _exact(plain, 2, "CLOSE")
    return Inner(kind, reason=plain[1])


# ---- TCP framing -------------------------------------------------------------------------

FRAME_HEAD = struct.Struct("!H")


def frame(message: bytes) -> bytes:
    """Length-prefix one message for a stream transport."""
    return FRAME_HEAD.pack(len(message)) + message


class FrameDecoder:
    """Cut a byte stream back into messages; a bad length poisons the stream.

    The frames completed before a bad length are still returned: the call
    raises only if there are none, else the error is kept in ``error`` for the
    caller to act on after handling them. Every later call raises it.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self.error: DecodeError | None = None

    def feed(self, chunk: bytes) -> list[bytes]:
        """Return the complete frames in ``chunk``; raise DecodeError on an impossible length."""
        if self.error is not None:
            raise self.error
        self._buf += chunk
        out: list[bytes] = []
        while len(self._buf) >= FRAME_HEAD.size:
            (n,) = FRAME_HEAD.unpack_from(self._buf)
            if n < HEADER_LEN or n > MAX_MESSAGE_SIZE:
                self._buf.clear()
                reason = DropReason.OVERSIZED if n > MAX_MESSAGE_SIZE else DropReason.TRUNCATED
                self.error = DecodeError(reason, f"frame length {n}")
                if not out:
                    raise self.error
                break
            if len(self._buf) < FRAME_HEAD.size + n:
                break
            out.append(bytes(self._buf[FRAME_HEAD.size:FRAME_HEAD.size + n]))
            del self._buf[: FRAME_HEAD.size + n]
        return out
