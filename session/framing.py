"""AEAD framing of DATA packets for one binding (the data hot path).

A DATA packet is ``header 20 | epoch u32 | counter u64 | ChaCha20-Poly1305(inner)``.
The AEAD nonce is ``0u32 | counter u64 little-endian`` (the Noise/WireGuard
layout), and the associated data is the whole cleartext prefix
(``wire.data_associated``), so the session_id, epoch and counter are all
authenticated. Keys are per binding and per direction (``keys.traffic_keys``),
so the per-channel counter that starts at 0 never repeats a (key, nonce) pair,
across nodes or rebinds alike.

Receive order follows WireGuard: epoch check, replay check (cheap, before any
crypto), decrypt, and only then mark the counter seen, so forged packets can
never move the replay window.
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from session import wire
from session.errors import AuthError, DecodeError, LocalProtocolError, ReplayError
from session.keys import traffic_keys
from session.reasons import DropReason
from session.replay import ReplayWindow

REJECT_AFTER_MESSAGES = 2**60  # as WireGuard: rekey (new epoch) long before the nonce space ends
MAX_EPOCH = 2**32 - 1  # the wire carries the epoch as u32
MAX_INNER_LEN = wire.MAX_MESSAGE_SIZE - wire.DATA_OVERHEAD + 1  # largest plaintext that fits

_NONCE = struct.Struct("<4xQ")  # 4 zero bytes, counter little-endian
_COUNTER = struct.Struct("!Q")


class DataChannel:
    """Seal and open DATA packets of one binding, for one side."""

    __slots__ = (
        "session_id", "epoch", "_send", "_recv", "_prefix", "_send_counter", "_window",
        "packets_sent", "bytes_sent", "packets_received", "bytes_received",
    )

    def __init__(self, send_key: bytes, recv_key: bytes, session_id: bytes, epoch: int) -> None:
        if len(send_key) != 32 or len(recv_key) != 32:
            raise ValueError("traffic keys must be 32 bytes")
        if send_key == recv_key:
            raise ValueError("send and receive keys must differ (nonce reuse across directions)")
        if not 0 <= epoch <= MAX_EPOCH:
            raise ValueError("epoch out of range")
        self.session_id = bytes(session_id)
        self.epoch = epoch
        self._send = ChaCha20Poly1305(send_key)
        self._recv = ChaCha20Poly1305(recv_key)
        # header | epoch never change for a channel: encode them once, through the codec
        self._prefix = wire.data_associated(wire.encode(wire.Data(self.session_id, epoch, 0, b"")))[:-8]
        self._send_counter = 0
        self._window = ReplayWindow()
        self.packets_sent = 0
        self.bytes_sent = 0  # wire bytes, header included
        self.packets_received = 0
        self.bytes_received = 0

    @classmethod
    def from_secret(
        cls,
        secret: bytes,
        *,
        session_id: bytes,
        epoch: int,
        binding_id: bytes,
        node_id: bytes,
        is_gateway: bool,
    ) -> DataChannel:
        """The channel of one side of a binding, keys derived from the session secret."""
        c2g, g2c = traffic_keys(secret, epoch, binding_id, node_id)
        send, recv = (g2c, c2g) if is_gateway else (c2g, g2c)
        return cls(send, recv, session_id, epoch)

    @property
    def next_send_counter(self) -> int:
        """The counter the next sealed packet will carry."""
        return self._send_counter

    @property
    def highest_received(self) -> int | None:
        """The highest counter accepted so far."""
        return self._window.highest

    def seal(self, inner: bytes) -> bytes:
        """Encrypt one inner message into a complete encoded DATA packet."""
        n = self._send_counter
        if n >= REJECT_AFTER_MESSAGES:
            raise LocalProtocolError("send counter exhausted: start a new epoch")
        if not 0 < len(inner) <= MAX_INNER_LEN:
            raise ValueError(f"inner message of {len(inner)} bytes (1..{MAX_INNER_LEN})")
        self._send_counter = n + 1  # before encrypting: a counter is never used twice
        aad = self._prefix + _COUNTER.pack(n)
        raw = aad + self._send.encrypt(_NONCE.pack(n), inner, aad)
        self.packets_sent += 1
        self.bytes_sent += len(raw)
        return raw

    def open(self, msg: wire.Data, raw: bytes) -> bytes:
        """Authenticate and decrypt a decoded DATA packet (``raw`` is its encoding)."""
        if msg.epoch != self.epoch:
            raise ReplayError(DropReason.STALE_EPOCH, f"epoch {msg.epoch}, channel {self.epoch}")
        if msg.session_id != self.session_id:
            raise DecodeError(DropReason.UNKNOWN_SESSION, "session_id does not match the channel")
        n = msg.counter
        if n >= REJECT_AFTER_MESSAGES or not self._window.check(n):
            raise ReplayError(DropReason.REPLAYED, f"counter {n}")
        try:
            plain = self._recv.decrypt(_NONCE.pack(n), msg.ciphertext, wire.data_associated(raw))
        except InvalidTag:
            raise AuthError(DropReason.BAD_AEAD, f"counter {n}") from None
        if not self._window.update(n):  # pragma: no cover - check() passed just above
            raise ReplayError(DropReason.REPLAYED, f"counter {n}")
        self.packets_received += 1
        self.bytes_received += len(raw)
        return plain

    def open_raw(self, raw: bytes) -> bytes:
        """Decode and open a DATA packet in one call."""
        msg = wire.decode(raw)
        if not isinstance(msg, wire.Data):
            raise DecodeError(DropReason.UNEXPECTED, f"{type(msg).__name__} is not DATA")
        return self.open(msg, raw)
