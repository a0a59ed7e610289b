"""Differential tests: the compiled data plane against the Python reference.

Both directions, property-based: what one seals the other opens, and for any sequence of
genuine, replayed, forged, truncated, re-epoched or re-sessioned packets both accept the
same ones and reject the rest with the same error class and ``DropReason``. The Python
side is ``session.framing`` / ``session.replay`` on ``cryptography``'s AEAD, which shares
no code with the module.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from session import wire
from session.errors import RemoteProtocolError
from session.framing import MAX_INNER_LEN, DataChannel
from session.replay import MAX_COUNTER, ReplayWindow

keys = st.binary(min_size=32, max_size=32)
sids = st.binary(min_size=16, max_size=16)
epochs = st.integers(min_value=0, max_value=2**32 - 1)
inners = st.binary(min_size=1, max_size=MAX_INNER_LEN)


def outcome(fn: Any, *args: Any) -> tuple[str, object]:
    """What a call did: ("ok", value) or (error class name, DropReason)."""
    try:
        return ("ok", fn(*args))
    except RemoteProtocolError as exc:
        return (type(exc).__name__, exc.reason)


def opener(ch: Any) -> Any:
    def open_(raw: bytes) -> bytes:
        return ch.open(wire.decode(raw), raw)  # the machines' call: codec first, then the channel
    return open_


@settings(max_examples=150)
@given(k1=keys, k2=keys, sid=sids, epoch=epochs, payloads=st.lists(inners, min_size=1, max_size=6))
def test_what_one_seals_the_other_opens(compiled: ModuleType, k1: bytes, k2: bytes, sid: bytes,
                                        epoch: int, payloads: list[bytes]) -> None:
    if k1 == k2:
        return
    py_tx, rs_rx = DataChannel(k1, k2, sid, epoch), compiled.DataChannel(k2, k1, sid, epoch)
    rs_tx, py_rx = compiled.DataChannel(k1, k2, sid, epoch), DataChannel(k2, k1, sid, epoch)
    for inner in payloads:
        a, b = py_tx.seal(inner), rs_tx.seal(inner)
        assert a == b  # same keys, same counter: the same bytes on the wire
        assert opener(rs_rx)(a) == inner
        assert py_rx.open_raw(b) == inner
    for ch in (py_tx, rs_tx):
        assert ch.next_send_counter == len(payloads)
    assert (rs_rx.packets_received, rs_rx.bytes_received) == (py_rx.packets_received, py_rx.bytes_received)
    assert rs_rx.highest_received == py_rx.highest_received == len(payloads) - 1


# One step of an attacker's (or a network's) doing, applied to a pool of genuine packets.
mutation = st.one_of(
    st.tuples(st.just("deliver"), st.integers(0, 40)),
    st.tuples(st.just("flip"), st.integers(0, 40), st.integers(0, 2100), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 40), st.integers(0, 2100)),
    st.tuples(st.just("extend"), st.integers(0, 40), st.binary(min_size=1, max_size=40)),
    st.tuples(st.just("epoch"), st.integers(0, 40), epochs),
    st.tuples(st.just("counter"), st.integers(0, 40), st.one_of(
        st.integers(0, 2**64 - 1), st.integers(0, 5000), st.integers(2**60 - 2, 2**60 + 2))),
    st.tuples(st.just("session"), st.integers(0, 40), sids),
    st.tuples(st.just("noise"), st.binary(max_size=2100)),
)


def _mutate(pool: list[bytes], step: tuple[Any, ...]) -> bytes:
    kind = step[0]
    if kind == "noise":
        return bytes(step[1])
    raw = bytearray(pool[step[1] % len(pool)])
    if kind == "flip":
        raw[step[2] % len(raw)] ^= step[3]
    elif kind == "truncate":
        del raw[step[2] % len(raw):]
    elif kind == "extend":
        raw += step[2]
    elif kind == "epoch":
        raw[20:24] = step[2].to_bytes(4, "big")
    elif kind == "counter":
        raw[24:32] = step[2].to_bytes(8, "big")
    elif kind == "session":
        raw[4:20] = step[2]
    return bytes(raw)


def _decode_then_open(ch: Any, raw: bytes) -> bytes:
    msg = wire.decode(raw)
    if not isinstance(msg, wire.Data):
        raise AssertionError("not DATA")  # filtered out below: other types never reach a channel
    return ch.open(msg, raw)


@settings(max_examples=300)
@given(sid=sids, epoch=epochs, sizes=st.lists(st.integers(1, 1500), min_size=1, max_size=41),
       steps=st.lists(mutation, min_size=1, max_size=60))
def test_both_reject_the_same_packets_for_the_same_reason(
    compiled: ModuleType, sid: bytes, epoch: int, sizes: list[int], steps: list[tuple[Any, ...]]
) -> None:
    k1, k2 = b"\x01" * 32, b"\x02" * 32
    tx = DataChannel(k1, k2, sid, epoch)
    pool = [tx.seal(bytes([i % 251]) * n) for i, n in enumerate(sizes)]
    py_rx, rs_rx = DataChannel(k2, k1, sid, epoch), compiled.DataChannel(k2, k1, sid, epoch)
    for step in steps:
        raw = _mutate(pool, step)
        try:
            header = wire.peek_header(raw)[0]
        except RemoteProtocolError:
            header = None
        if header is not None and header is not wire.MessageType.DATA:
            continue  # the codec hands other types to the machine; no channel sees them
        via_codec = outcome(_decode_then_open, py_rx, raw)
        # the module parses the raw bytes itself (open_raw): the codec's reasons, too
        assert outcome(rs_rx.open_raw, raw) == via_codec, step
        assert rs_rx.highest_received == py_rx.highest_received
    assert (rs_rx.packets_received, rs_rx.bytes_received) == (py_rx.packets_received, py_rx.bytes_received)


@settings(max_examples=300)
@given(st.binary(max_size=2200))
def test_header_parse_matches_the_codec(compiled: ModuleType, raw: bytes) -> None:
    try:
        msg = wire.decode(raw)
        want: tuple[str, object] = ("ok", msg) if isinstance(msg, wire.Data) else ("other", None)
    except RemoteProtocolError as exc:
        want = (type(exc).__name__, exc.reason)
    got = outcome(compiled.parse_data, raw)
    if want[0] == "ok":
        assert isinstance(want[1], wire.Data)
        assert got == ("ok", (want[1].session_id, want[1].epoch, want[1].counter))
    elif want[0] == "other":
        assert got[0] == "DecodeError"  # the module only parses DATA: the rest is UNEXPECTED
    elif raw[1:2] != bytes([wire.MessageType.DATA]) and got[1] == wire.DropReason.UNEXPECTED:
        pass  # another type, malformed in its own layout: the codec's business, not the module's
    else:
        assert got == want


counters = st.one_of(
    st.integers(0, 10_000),
    st.integers(MAX_COUNTER - 10_000, MAX_COUNTER),
    st.integers(-5, -1),
    st.integers(MAX_COUNTER + 1, MAX_COUNTER + 5),
)


@settings(max_examples=300)
@given(steps=st.lists(st.tuples(st.booleans(), counters), max_size=300))
def test_replay_window_matches(compiled: ModuleType, steps: list[tuple[bool, int]]) -> None:
    py_w, rs_w = ReplayWindow(), compiled.ReplayWindow()
    for only_check, c in steps:
        if only_check:
            assert rs_w.check(c) == py_w.check(c), c
        else:
            assert rs_w.update(c) == py_w.update(c), c
        assert rs_w.highest == py_w.highest


def test_local_misuse_is_refused_alike(compiled: ModuleType) -> None:
    for cls in (DataChannel, compiled.DataChannel):
        with pytest.raises(ValueError):
            cls(b"k" * 32, b"k" * 32, b"s" * 16, 1)  # one key both ways: nonce reuse
        with pytest.raises(ValueError):
            cls(b"a" * 31, b"b" * 32, b"s" * 16, 1)
        with pytest.raises(ValueError):
            cls(b"a" * 32, b"b" * 32, b"s" * 16, 2**32)
        ch = cls(b"a" * 32, b"b" * 32, b"s" * 16, 1)
        for bad in (b"", b"x" * (MAX_INNER_LEN + 1)):
            with pytest.raises(ValueError):
                ch.seal(bad)
