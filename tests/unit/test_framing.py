"""AEAD framing of DATA packets."""

from __future__ import annotations

import pytest

from session import wire
from session.errors import (
    AuthError,
    DecodeError,
    LocalProtocolError,
    RemoteProtocolError,
    ReplayError,
)
from session.framing import MAX_INNER_LEN, REJECT_AFTER_MESSAGES, DataChannel
from session.keys import traffic_keys
from session.reasons import DropReason
from session.replay import REPLAY_WINDOW

SECRET = bytes(range(32))
SID = b"s" * 16
BID = b"b" * 16


def _pair(epoch: int = 7, binding_id: bytes = BID, node: bytes = b"node-1") -> tuple[DataChannel, DataChannel]:
    """(client side, gateway side) of one binding."""
    return (
        DataChannel.from_secret(
            SECRET, session_id=SID, epoch=epoch, binding_id=binding_id, node_id=node, is_gateway=False
        ),
        DataChannel.from_secret(
            SECRET, session_id=SID, epoch=epoch, binding_id=binding_id, node_id=node, is_gateway=True
        ),
    )


def _open(ch: DataChannel, raw: bytes) -> bytes:
    msg = wire.decode(raw)
    assert isinstance(msg, wire.Data)
    return ch.open(msg, raw)


def test_round_trip_both_directions() -> None:
    client, gateway = _pair()
    for i in range(5):
        inner = wire.inner_payload(b"x" * (i * 300))
        assert _open(gateway, client.seal(inner)) == inner
        back = wire.inner_keepalive(i, 1000 + i, 1)
        assert _open(client, gateway.seal(back)) == back
    assert client.packets_sent == gateway.packets_received == 5
    assert client.bytes_sent == gateway.bytes_received
    assert gateway.packets_sent == client.packets_received == 5
    assert gateway.highest_received == 4


def test_packet_layout_is_the_wire_codec() -> None:
    client, _ = _pair(epoch=9)
    inner = wire.inner_payload(b"hello")
    for n in range(3):
        assert client.next_send_counter == n
        raw = client.seal(inner)
        msg = wire.decode(raw)
        assert isinstance(msg, wire.Data)
        assert (msg.session_id, msg.epoch, msg.counter) == (SID, 9, n)
        assert wire.encode(msg) == raw
        assert len(msg.ciphertext) == len(inner) + wire.AEAD_TAG_LEN
        assert wire.data_associated(raw) == raw[: wire.HEADER_LEN + 12]


def test_direction_keys_match_traffic_keys() -> None:
    c2g, g2c = traffic_keys(SECRET, 7, BID, b"node-1")
    client = DataChannel(c2g, g2c, SID, 7)
    _, gateway = _pair()
    assert _open(gateway, client.seal(b"\x01abc")) == b"\x01abc"


def test_tamper_every_byte() -> None:
    client, gateway = _pair()
    inner = wire.inner_payload(b"secret payload")
    raw = client.seal(inner)
    epoch_at, counter_at, ct_at = wire.HEADER_LEN, wire.HEADER_LEN + 4, wire.HEADER_LEN + 12
    for i in range(len(raw)):
        for flip in (0x01, 0x80):
            bad = bytearray(raw)
            bad[i] ^= flip
            with pytest.raises(RemoteProtocolError) as exc:
                _open(gateway, bytes(bad))
            err = exc.value
            if i < epoch_at:  # version, type, flags, session_id
                assert isinstance(err, DecodeError)
            elif i < counter_at:
                assert isinstance(err, ReplayError) and err.reason is DropReason.STALE_EPOCH
            elif i < ct_at:  # a counter >= 2**60 is refused before any crypto
                assert isinstance(err, (AuthError, ReplayError))
            else:
                assert isinstance(err, AuthError) and err.reason is DropReason.BAD_AEAD
    # nothing was marked seen: the genuine packet is still accepted
    assert gateway.packets_received == 0
    assert _open(gateway, raw) == inner


def test_truncated_packets() -> None:
    client, gateway = _pair()
    raw = client.seal(wire.inner_payload(b"abc"))
    for n in range(len(raw)):
        with pytest.raises(RemoteProtocolError):
            _open(gateway, raw[:n])


def test_replay_rejected() -> None:
    client, gateway = _pair()
    raw = client.seal(b"\x01x")
    _open(gateway, raw)
    with pytest.raises(ReplayError) as exc:
        _open(gateway, raw)
    assert exc.value.reason is DropReason.REPLAYED
    assert gateway.packets_received == 1


def test_reordered_within_window_accepted_older_rejected() -> None:
    client, gateway = _pair()
    packets = [client.seal(b"\x01" + bytes([i % 256])) for i in range(REPLAY_WINDOW + 10)]
    _open(gateway, packets[-1])
    for raw in reversed(packets[10:-1]):  # all inside the window, newest first
        _open(gateway, raw)
    for raw in packets[:10]:  # now older than the window
        with pytest.raises(ReplayError):
            _open(gateway, raw)


def test_forgery_does_not_move_the_window() -> None:
    client, gateway = _pair()
    genuine = client.seal(b"\x01a")
    forged = wire.encode(wire.Data(SID, 7, 10**9, b"\x00" * 40))
    with pytest.raises(AuthError):
        _open(gateway, forged)
    assert gateway.highest_received is None
    assert _open(gateway, genuine) == b"\x01a"


def test_stale_epoch_rejected() -> None:
    old_client, _ = _pair(epoch=6)
    _, gateway = _pair(epoch=7)
    with pytest.raises(ReplayError) as exc:
        _open(gateway, old_client.seal(b"\x01old"))
    assert exc.value.reason is DropReason.STALE_EPOCH


def test_other_session_rejected() -> None:
    c2g, g2c = traffic_keys(SECRET, 7, BID, b"node-1")
    other = DataChannel(c2g, g2c, b"o" * 16, 7)
    _, gateway = _pair()
    with pytest.raises(DecodeError) as exc:
        _open(gateway, other.seal(b"\x01x"))
    assert exc.value.reason is DropReason.UNKNOWN_SESSION


def test_bindings_never_share_keys_or_nonces() -> None:
    a_client, a_gateway = _pair(binding_id=b"A" * 16)
    b_client, b_gateway = _pair(binding_id=b"B" * 16)
    inner = wire.inner_payload(b"same plaintext, same counter")
    a_raw, b_raw = a_client.seal(inner), b_client.seal(inner)
    # same session, epoch and counter 0 on both: the keys differ, so the ciphertexts do
    assert a_raw[: wire.HEADER_LEN + 12] == b_raw[: wire.HEADER_LEN + 12]
    assert a_raw != b_raw
    with pytest.raises(AuthError):
        _open(b_gateway, a_raw)
    with pytest.raises(AuthError):
        _open(a_gateway, b_raw)
    # and the other node of the same epoch is just as distinct
    _, n2_gateway = _pair(binding_id=b"A" * 16, node=b"node-2")
    with pytest.raises(AuthError):
        _open(n2_gateway, a_raw)


def test_direction_separation() -> None:
    client, gateway = _pair()
    raw = client.seal(b"\x01ping")
    with pytest.raises(AuthError):
        _open(client, raw)  # a reflected packet does not decrypt under the other direction
    with pytest.raises(ValueError):
        DataChannel(b"k" * 32, b"k" * 32, SID, 1)


def test_counter_exhaustion() -> None:
    client, gateway = _pair()
    client._send_counter = REJECT_AFTER_MESSAGES - 1  # no API for this: it takes 2**60 packets
    raw = client.seal(b"\x01last")
    with pytest.raises(LocalProtocolError):
        client.seal(b"\x01over")
    with pytest.raises(ReplayError):
        _open(gateway, wire.encode(wire.Data(SID, 7, REJECT_AFTER_MESSAGES, b"\x00" * 17)))
    assert _open(gateway, raw) == b"\x01last"


def test_inner_size_bounds() -> None:
    client, gateway = _pair()
    with pytest.raises(ValueError):
        client.seal(b"")
    with pytest.raises(ValueError):
        client.seal(b"x" * (MAX_INNER_LEN + 1))
    raw = client.seal(b"x" * MAX_INNER_LEN)
    assert len(raw) == wire.MAX_MESSAGE_SIZE
    assert _open(gateway, raw) == b"x" * MAX_INNER_LEN
    assert client.next_send_counter == 1  # refused seals consumed no counter


def test_open_raw() -> None:
    client, gateway = _pair()
    assert gateway.open_raw(client.seal(b"\x01z")) == b"\x01z"
    notice = wire.encode(wire.Retry(SID, b"t"))
    with pytest.raises(DecodeError):
        gateway.open_raw(notice)


def test_constructor_validation() -> None:
    with pytest.raises(ValueError):
        DataChannel(b"a" * 31, b"b" * 32, SID, 1)
    with pytest.raises(ValueError):
        DataChannel(b"a" * 32, b"b" * 32, SID, 2**32)
    with pytest.raises(ValueError):
        DataChannel(b"a" * 32, b"b" * 32, b"short", 1)
