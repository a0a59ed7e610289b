"""The one stream adapter: a byte stream in, messages out (and back), for any TCP peer.

Theory of operation. Over a stream every message travels as a frame,
``length u16 | message`` (``wire.frame``). ``FramedStream`` is a mixin, after
aioice's ``TurnStreamMixin``: the class that mixes it in is a stream protocol
(an ``asyncio.Protocol`` in the agent, the gateway and the tests) whose
``data_received`` this mixin provides. It cuts the bytes back into frames with
``wire.FrameDecoder`` and hands each to ``frame_received``. A bad length cannot
be resynchronised: the frames completed before it are still delivered, then
``framing_failed`` is called once and the stream is closed; anything that
still arrives is ignored. The mixin touches nothing but ``self.transport``'s
``write`` and ``close``, so it needs no event loop and is tested in memory.
"""

from __future__ import annotations

from typing import Protocol

from session import wire
from session.errors import DecodeError


class StreamTransport(Protocol):
    """What the mixin needs of a transport (``asyncio.Transport`` has both)."""

    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...


class FramedStream:
    """Mixin: ``data_received`` cuts a stream into frames, ``send_frame`` frames a message.

    The class mixing it in sets ``self.transport`` (in ``connection_made``) and
    implements ``frame_received``; it may override ``framing_failed`` to count
    the error (the mixin closes the stream itself). Put the mixin before
    ``asyncio.Protocol`` so its ``data_received`` is the one called::

        class _TcpProtocol(FramedStream, asyncio.Protocol):
            def connection_made(self, transport):
                self.transport = transport
                self.peer = Peer(TCP, transport.get_extra_info("peername"), self.send_frame)

            def frame_received(self, frame: bytes) -> None:
                self.node.on_message(frame, self.peer)

            def framing_failed(self, error: DecodeError) -> None:
                self.node.metrics.count_drop(error.reason, wire.TransportKind.TCP)

        proto.send_frame(message)  # writes length | message
    """

    transport: StreamTransport | None = None
    _frames: wire.FrameDecoder | None = None  # made on first use: no __init__ to chain

    def frame_received(self, frame: bytes) -> None:
        """One whole message arrived (called in stream order)."""
        raise NotImplementedError

    def framing_failed(self, error: DecodeError) -> None:
        """The stream carried an impossible length; it is being closed (called once)."""

    def send_frame(self, message: bytes) -> None:
        """Write one message as a frame (no-op before ``connection_made``)."""
        if self.transport is not None:
            self.transport.write(wire.frame(message))

    def data_received(self, data: bytes) -> None:
        """Feed stream bytes; deliver every completed frame, fail once on a bad length."""
        decoder = self._frames
        if decoder is None:
            decoder = self._frames = wire.FrameDecoder()
        elif decoder.error is not None:
            return  # already failed and closed: late bytes are not counted again
        try:
            frames = decoder.feed(data)
        except DecodeError as exc:
            self._framing_error(exc)
            return
        for f in frames:
            self.frame_received(f)
        if decoder.error is not None:  # a bad length right after these frames
            self._framing_error(decoder.error)

    def _framing_error(self, error: DecodeError) -> None:
        self.framing_failed(error)
        if self.transport is not None:
            self.transport.close()
