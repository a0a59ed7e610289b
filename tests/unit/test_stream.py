"""The stream framing mixin in memory: reassembly, batching, and a bad length."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from session import wire
from session.errors import DecodeError
from session.reasons import DropReason
from session.stream import FramedStream

MSGS = [bytes([i]) * (wire.HEADER_LEN + i * 37) for i in range(5)]  # lengths the decoder accepts
BAD_LENGTH = wire.FRAME_HEAD.pack(wire.MAX_MESSAGE_SIZE + 1)


class FakeTransport:
    def __init__(self) -> None:
        self.written = bytearray()
        self.closes = 0

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closes += 1


class Recorder(FramedStream):
    """A stream protocol as the agent, the gateway and the tests write one."""

    def __init__(self) -> None:
        self.out = self.transport = FakeTransport()
        self.frames: list[bytes] = []
        self.failures: list[DecodeError] = []

    def frame_received(self, frame: bytes) -> None:
        self.frames.append(frame)

    def framing_failed(self, error: DecodeError) -> None:
        self.failures.append(error)


def stream(*msgs: bytes) -> bytes:
    return b"".join(wire.frame(m) for m in msgs)


def test_frames_split_across_reads_are_reassembled() -> None:
    p = Recorder()
    data = stream(*MSGS)
    for i in range(len(data)):  # one byte per read: every split point
        p.data_received(data[i:i + 1])
    assert p.frames == MSGS and not p.failures and p.out.closes == 0


@given(st.lists(st.integers(0, len(stream(*MSGS))), max_size=8))
def test_any_split_of_the_stream_gives_the_same_frames(cuts: list[int]) -> None:
    p = Recorder()
    data = stream(*MSGS)
    edges = [0, *sorted(cuts), len(data)]
    for a, b in zip(edges, edges[1:], strict=False):
        p.data_received(data[a:b])
    assert p.frames == MSGS


def test_several_frames_in_one_read_are_delivered_in_order() -> None:
    p = Recorder()
    p.data_received(stream(*MSGS) + wire.frame(MSGS[0])[:5])  # and the start of one more
    assert p.frames == MSGS
    p.data_received(wire.frame(MSGS[0])[5:])
    assert p.frames == [*MSGS, MSGS[0]]


def test_bad_length_closes_the_stream_and_counts_once() -> None:
    p = Recorder()
    p.data_received(BAD_LENGTH + b"x" * 10)
    assert [e.reason for e in p.failures] == [DropReason.OVERSIZED]
    assert p.out.closes == 1 and p.frames == []
    p.data_received(stream(MSGS[0]))  # late bytes (already queued when we closed): ignored
    p.data_received(BAD_LENGTH)
    assert len(p.failures) == 1 and p.out.closes == 1 and p.frames == []


def test_frames_before_a_bad_length_are_still_delivered() -> None:
    p = Recorder()
    p.data_received(stream(MSGS[0], MSGS[1]) + wire.FRAME_HEAD.pack(1) + stream(MSGS[2]))
    assert p.frames == [MSGS[0], MSGS[1]]  # nothing after the bad length
    assert [e.reason for e in p.failures] == [DropReason.TRUNCATED]
    assert p.out.closes == 1


def test_send_frame_writes_length_then_message() -> None:
    p = Recorder()
    p.send_frame(MSGS[1])
    p.send_frame(MSGS[2])
    assert bytes(p.out.written) == stream(MSGS[1], MSGS[2])
    echo = Recorder()
    echo.data_received(bytes(p.out.written))
    assert echo.frames == [MSGS[1], MSGS[2]]


def test_without_hooks_or_transport_a_bad_length_only_stops_the_stream() -> None:
    class Bare(FramedStream):
        def frame_received(self, frame: bytes) -> None:
            raise AssertionError("no frame expected")

    b = Bare()
    b.send_frame(MSGS[0])  # before connection_made: nothing to write to
    b.data_received(BAD_LENGTH)
    b.data_received(stream(MSGS[0]))
