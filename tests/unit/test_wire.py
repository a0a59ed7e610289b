"""Wire codec: round trips, strictness, and no input raises anything but DecodeError."""

from __future__ import annotations

import dataclasses
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from session import wire
from session.errors import DecodeError
from session.reasons import DropReason, NoticeKind, RejectReason

b16 = st.binary(min_size=16, max_size=16)
b32 = st.binary(min_size=32, max_size=32)
u64 = st.integers(min_value=0, max_value=2**64 - 1)
u32 = st.integers(min_value=0, max_value=2**32 - 1)

messages = st.one_of(
    st.builds(wire.HandshakeInit, b16, st.binary(min_size=wire.MIN_NOISE_INIT, max_size=400),
              st.binary(max_size=wire.MAX_TOKEN_LEN)),
    st.builds(wire.HandshakeResp, b16, b16, st.binary(min_size=wire.MIN_NOISE_RESP, max_size=400)),
    st.builds(wire.Retry, b16, st.binary(min_size=1, max_size=wire.MAX_TOKEN_LEN)),
    st.builds(wire.Data, b16, u32, u64, st.binary(min_size=17, max_size=1600)),
    st.builds(wire.ReattachRequest, b16, u64, b16, u64, st.sampled_from(wire.TransportKind), b32),
    st.builds(wire.ReattachAck, b16, b16, u64, u32, b16,
              st.binary(max_size=wire.MAX_NODE_ID_LEN), u64, b32),
    st.builds(wire.Reject, b16, b16, st.sampled_from(RejectReason), u64, u64, b32),
    st.builds(wire.Notice, b16, st.sampled_from(NoticeKind), st.integers(0, 255), u64, b16, u64, b32),
)


@given(messages)
def test_round_trip(msg: wire.Message) -> None:
    raw = wire.encode(msg)
    assert wire.decode(raw) == msg
    assert wire.peek_header(raw) == (msg.TYPE, raw[4:20])


@settings(max_examples=2000)
@given(st.binary(max_size=2200))
def test_arbitrary_bytes_only_raise_decode_error(data: bytes) -> None:
    try:
        wire.decode(data)
    except DecodeError as exc:
        assert isinstance(exc.reason, DropReason)


@settings(max_examples=500)
@given(messages, st.data())
def test_mutations_never_crash(msg: wire.Message, data: st.DataObject) -> None:
    raw = bytearray(wire.encode(msg))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.integers(0, len(raw)))
    for candidate in (bytes(raw), bytes(raw[:cut]), bytes(raw) + b"\x00"):
        try:
            wire.decode(candidate)
        except DecodeError:
            pass


@settings(max_examples=500)
@given(st.binary(max_size=1600))
def test_inner_decoder_only_raises_decode_error(data: bytes) -> None:
    try:
        wire.decode_inner(data)
    except DecodeError:
        pass


def test_truncation_of_fixed_layouts_is_reported() -> None:
    raw = wire.encode(wire.ReattachRequest(os.urandom(16), 1, os.urandom(16), 5, wire.TransportKind.UDP))
    for n in range(len(raw)):
        with pytest.raises(DecodeError) as e:
            wire.decode(raw[:n])
        assert e.value.reason in (DropReason.TRUNCATED,)
    with pytest.raises(DecodeError) as e:
        wire.decode(raw + b"x")
    assert e.value.reason is DropReason.MALFORMED


def test_header_checks() -> None:
    raw = bytearray(wire.encode(wire.Retry(os.urandom(16), b"t")))
    with pytest.raises(DecodeError) as e:
        wire.decode(bytes([9]) + bytes(raw[1:]))
    assert e.value.reason is DropReason.BAD_VERSION
    raw[1] = 99
    with pytest.raises(DecodeError) as e:
        wire.decode(bytes(raw))
    assert e.value.reason is DropReason.UNKNOWN_TYPE
    with pytest.raises(DecodeError) as e:
        wire.decode(b"\x01" * (wire.MAX_MESSAGE_SIZE + 1))
    assert e.value.reason is DropReason.OVERSIZED


def test_unknown_enum_values_are_malformed() -> None:
    raw = bytearray(wire.encode(wire.Reject(os.urandom(16), os.urandom(16), RejectReason.EXPIRED, 1, 2)))
    raw[wire.HEADER_LEN + 16] = 200  # reason byte
    with pytest.raises(DecodeError) as e:
        wire.decode(bytes(raw))
    assert e.value.reason is DropReason.MALFORMED


def test_frame_decoder_reassembles_and_rejects_bad_lengths() -> None:
    msgs = [wire.encode(wire.Retry(os.urandom(16), os.urandom(8))) for _ in range(5)]
    stream = b"".join(wire.frame(m) for m in msgs)
    dec = wire.FrameDecoder()
    out: list[bytes] = []
    for i in range(0, len(stream), 7):  # dribble the stream in odd chunks
        out += dec.feed(stream[i:i + 7])
    assert out == msgs
    with pytest.raises(DecodeError):
        wire.FrameDecoder().feed(b"\xff\xff" + b"x" * 10)
    with pytest.raises(DecodeError):
        wire.FrameDecoder().feed(b"\x00\x00")


def test_inner_round_trips() -> None:
    assert wire.decode_inner(wire.inner_payload(b"abc")).payload == b"abc"
    ka = wire.decode_inner(wire.inner_keepalive(7, 99, 2))
    assert (ka.kind, ka.seq, ka.echo_ms, ka.state) == (wire.InnerType.KEEPALIVE, 7, 99, 2)
    ack = wire.decode_inner(wire.inner_keepalive_ack(7, 99, 12, 1))
    assert (ack.seq, ack.echo_ms, ack.version, ack.state) == (7, 99, 12, 1)
    assert wire.decode_inner(wire.inner_close(3)).reason == 3
    with pytest.raises(ValueError):
        wire.inner_payload(b"x" * (wire.MAX_PAYLOAD_SIZE + 1))


def test_a_reattach_request_carries_a_route_hint_in_its_flags() -> None:
    """The balancer reads the hint at a fixed offset (deploy/nginx/jvpn.js); the MAC covers it."""
    req = wire.ReattachRequest(b"s" * 16, 7, b"n" * 16, 123, wire.TransportKind.UDP, route=3)
    raw = wire.encode(req)
    assert raw[2:4] == b"\x00\x03"
    assert wire.decode(raw) == req
    assert wire.decode(wire.encode(dataclasses.replace(req, route=0))).route == 0
    with pytest.raises(ValueError):
        wire.encode(dataclasses.replace(req, route=wire.ROUTE_MAX + 1))
    too_big = raw[:2] + b"\x01\x00" + raw[4:]
    with pytest.raises(DecodeError):
        wire.decode(too_big)
    data = bytearray(wire.encode(wire.Data(b"s" * 16, 1, 0, b"c" * 17)))
    data[3] = 1  # no other message carries flags
    with pytest.raises(DecodeError):
        wire.decode(bytes(data))
