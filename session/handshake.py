"""The session-opening handshake: Noise IK plus our strictly parsed payloads.

One round trip. The client (initiator) knows the gateway's pinned static key;
message 1 carries the client's static key and a ClientHello; message 2 carries
either a ServerHello (the new session's id, version, first binding) or a
refusal with a RejectReason, authenticated by the handshake itself. Both sides
then derive the session secret from the split keys and the handshake hash.
The prologue binds the cleartext handshake id, so it cannot be swapped.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import msgpack

from session import wire
from session.errors import AuthError, DecodeError, LocalProtocolError
from session.keys import derive_session_secret
from session.noise import HandshakeState
from session.reasons import DropReason, RejectReason

PROLOGUE = b"jvpn/1\x00"
MAX_UPSTREAM_LEN = 255
MAX_L3_TEXT_LEN = 1024  # inner addresses, routes (session.inner.MAX_PREFIXES prefixes)


_KIND_VALUES = frozenset(int(k) for k in wire.TransportKind)


def _prologue(handshake_id: bytes) -> bytes:
    return PROLOGUE + handshake_id


@dataclass(frozen=True)
class ClientHello:
    """What the client asks for in message 1."""

    wall_ms: int  # client clock, for handshake replay protection
    kind: wire.TransportKind
    upstream: str  # UDP-forward mode: the target "host:port"; L3 mode: ""
    l3: bool = False  # an L3 session: inner addresses and routes, IP packets as DATA


@dataclass(frozen=True)
class ServerHello:
    """The new session, as message 2 announces it."""

    session_id: bytes
    version: int
    state: int
    epoch: int
    binding_id: bytes
    node_id: bytes
    server_ms: int
    ttl_ms: int
    keepalive_ms: int
    inner: str = ""  # L3: the session's inner addresses (session.inner.InnerAddresses.text)
    routes: str = ""  # L3: the prefixes it may reach, comma-separated (the agent's routes)


@dataclass(frozen=True)
class Refusal:
    """An authenticated refusal in message 2."""

    reason: RejectReason
    server_ms: int


def _unpack(raw: bytes) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(
            raw, raw=False, strict_map_key=True, max_bin_len=64, max_str_len=MAX_L3_TEXT_LEN,
            max_array_len=0, max_map_len=16, max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types
        raise DecodeError(DropReason.MALFORMED, f"handshake payload: {type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise DecodeError(DropReason.MALFORMED, "handshake payload is not a map")
    return obj


def _field(obj: dict[str, Any], key: str, typ: type, *, size: int | None = None) -> Any:
    val = obj.get(key)
    if typ is int and (not isinstance(val, int) or isinstance(val, bool) or not 0 <= val < 2**64):
        raise DecodeError(DropReason.MALFORMED, f"handshake field {key!r}")
    if typ is not int and not isinstance(val, typ):
        raise DecodeError(DropReason.MALFORMED, f"handshake field {key!r}")
    if size is not None and len(val) != size:  # type: ignore[arg-type]
        raise DecodeError(DropReason.MALFORMED, f"handshake field {key!r} length")
    return val


def encode_client_hello(h: ClientHello) -> bytes:
    obj: dict[str, Any] = {"t": h.wall_ms, "k": int(h.kind), "u": h.upstream}
    if h.l3:  # absent in UDP-forward mode: the same bytes as before L3 existed
        obj["m"] = 1
    return msgpack.packb(obj)


def decode_client_hello(raw: bytes) -> ClientHello:
    obj = _unpack(raw)
    if set(obj) not in ({"t", "k", "u"}, {"t", "k", "u", "m"}):
        raise DecodeError(DropReason.MALFORMED, "ClientHello keys")
    kind = _field(obj, "k", int)
    if kind not in _KIND_VALUES:
        raise DecodeError(DropReason.MALFORMED, "ClientHello kind")
    mode = _field(obj, "m", int) if "m" in obj else 0
    if mode not in (0, 1):
        raise DecodeError(DropReason.MALFORMED, "ClientHello mode")
    upstream = _field(obj, "u", str)
    if len(upstream) > MAX_UPSTREAM_LEN:
        raise DecodeError(DropReason.MALFORMED, "ClientHello upstream length")
    return ClientHello(_field(obj, "t", int), wire.TransportKind(kind), upstream, l3=mode == 1)


_SERVER_HELLO_KEYS = {"sid", "v", "st", "ep", "bid", "nd", "ms", "ttl", "ka"}


def encode_server_hello(h: ServerHello) -> bytes:
    obj: dict[str, Any] = {
        "sid": h.session_id, "v": h.version, "st": h.state, "ep": h.epoch, "bid": h.binding_id,
        "nd": h.node_id, "ms": h.server_ms, "ttl": h.ttl_ms, "ka": h.keepalive_ms,
    }
    if h.inner:  # L3 only: inside message 2, so as authenticated as the session itself
        obj["ia"] = h.inner
        obj["rt"] = h.routes
    return msgpack.packb(obj)


def encode_refusal(r: Refusal) -> bytes:
    return msgpack.packb({"err": int(r.reason), "ms": r.server_ms})


def decode_server_payload(raw: bytes) -> ServerHello | Refusal:
    obj = _unpack(raw)
    if set(obj) == {"err", "ms"}:
        try:
            reason = RejectReason(_field(obj, "err", int))
        except ValueError:
            raise DecodeError(DropReason.MALFORMED, "refusal reason") from None
        return Refusal(reason, _field(obj, "ms", int))
    l3 = set(obj) == _SERVER_HELLO_KEYS | {"ia", "rt"}
    if set(obj) != _SERVER_HELLO_KEYS and not l3:
        raise DecodeError(DropReason.MALFORMED, "ServerHello keys")
    node = _field(obj, "nd", bytes)
    if not 0 < len(node) <= wire.MAX_NODE_ID_LEN:
        raise DecodeError(DropReason.MALFORMED, "ServerHello node")
    return ServerHello(
        _field(obj, "sid", bytes, size=wire.SESSION_ID_LEN), _field(obj, "v", int),
        _field(obj, "st", int), _field(obj, "ep", int),
        _field(obj, "bid", bytes, size=wire.BINDING_ID_LEN), node, _field(obj, "ms", int),
        _field(obj, "ttl", int), _field(obj, "ka", int),
        _field(obj, "ia", str) if l3 else "", _field(obj, "rt", str) if l3 else "",
    )


class Initiator:
    """Client side of the handshake."""

    def __init__(self, static_priv: bytes, gateway_pub: bytes, handshake_id: bytes,
                 hello: ClientHello, ephemeral: bytes | None = None) -> None:
        self.handshake_id = handshake_id
        self._hs = HandshakeState.initiator(static_priv, gateway_pub, _prologue(handshake_id), ephemeral)
        self.message1 = self._hs.write_message(encode_client_hello(hello))

    def finish(self, noise_msg2: bytes) -> tuple[ServerHello | Refusal, bytes]:
        """Read message 2; return the gateway's answer and the session secret.

        Side-effect free: message 2 is read on a copy of the handshake state, so an
        answer that does not authenticate or decode (or that the caller rejects, e.g. for
        a tampered cleartext header) leaves this Initiator ready for the genuine one.
        """
        hs = copy.copy(self._hs)  # read_message replaces, never mutates, the fields it changes
        payload = hs.read_message(noise_msg2)
        answer = decode_server_payload(payload)
        return answer, _secret(hs)


class Responder:
    """Gateway side: read message 1, learn who is asking, then accept or refuse."""

    def __init__(self, static_priv: bytes, handshake_id: bytes, noise_msg1: bytes) -> None:
        self.handshake_id = handshake_id
        self._hs = HandshakeState.responder(static_priv, _prologue(handshake_id))
        self.hello = decode_client_hello(self._hs.read_message(noise_msg1))
        rs = self._hs.remote_static
        if rs is None:  # pragma: no cover - IK always transmits s
            raise AuthError(DropReason.BAD_HANDSHAKE, "no initiator static key")
        self.client_static: bytes = rs
        self._done = False

    def accept(self, hello: ServerHello) -> tuple[bytes, bytes]:
        """Message 2 announcing the session, and the session secret."""
        msg2 = self._write(encode_server_hello(hello))
        return msg2, _secret(self._hs)

    def refuse(self, refusal: Refusal) -> bytes:
        """Message 2 carrying an authenticated refusal."""
        return self._write(encode_refusal(refusal))

    def _write(self, payload: bytes) -> bytes:
        if self._done:
            raise LocalProtocolError("handshake answer already written")
        self._done = True
        return self._hs.write_message(payload)


def _secret(hs: HandshakeState) -> bytes:
    k1, k2 = hs.split_keys()
    return derive_session_secret(k1, k2, hs.handshake_hash)
