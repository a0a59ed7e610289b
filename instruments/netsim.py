"""User-space path impairment: a UDP relay that can drop, blackhole or rebind.

Kernel netem is not available here, so the demo and the tests put this relay
between agents and a gateway. Each client source address gets its own
outbound socket toward the target, as a NAT would; ``rebind()`` replaces those
sockets (the gateway sees new source ports: NAT rebinding), ``blackhole`` drops
everything in both directions (UDP blocked), ``loss`` drops a fraction, and
``quic_only`` passes nothing but QUIC, as a firewall that allows only QUIC on
UDP would (``QuicShape``). Only loopback targets are expected.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

QUIC_V1 = 1
MIN_INITIAL = 1200  # RFC 9000 section 14.1: a client's Initial datagram is at least this long
SERVER_CID_LEN = 8  # the connection IDs the gateway chooses (gateway/quic.py CID_LEN)


class QuicShape:
    """Which datagrams are QUIC: a flow is admitted by a QUIC v1 long-header Initial of at
    least 1200 bytes; then its long-header packets (version 1) and the short-header packets
    addressed to a connection ID the server chose for it (learnt from its downlink long
    headers) pass. Everything else is not QUIC, or not that connection's, and is dropped."""

    def __init__(self) -> None:
        self.cids: dict[tuple[str, int], set[bytes]] = {}  # admitted flow -> server CIDs

    @staticmethod
    def _long_v1(data: bytes) -> bool:
        return (len(data) >= 7 and data[0] & 0xC0 == 0xC0
                and int.from_bytes(data[1:5], "big") == QUIC_V1)

    def up(self, data: bytes, client: tuple[str, int]) -> bool:
        cids = self.cids.get(client)
        if self._long_v1(data):
            if cids is None:  # only an Initial (type bits 00) opens a flow
                if data[0] & 0x30 != 0 or len(data) < MIN_INITIAL:
                    return False
                if len(self.cids) > 10_000:
                    self.cids.clear()
                self.cids[client] = set()
            return True
        if cids is None or not data or data[0] & 0xC0 != 0x40:
            return False
        return data[1:1 + SERVER_CID_LEN] in cids

    def down(self, data: bytes, client: tuple[str, int]) -> bool:
        cids = self.cids.get(client)
        if cids is None:
            return False
        if self._long_v1(data):
            dcid_len = data[5]
            at = 6 + dcid_len
            if len(data) > at and len(cids) < 64:
                scid_len = data[at]
                cids.add(data[at + 1:at + 1 + scid_len])
            return True
        return bool(data) and data[0] & 0xC0 == 0x40


@dataclass
class RelayStats:
    forwarded_up: int = 0
    forwarded_down: int = 0
    dropped: int = 0
    rebinds: int = 0


class _Inside(asyncio.DatagramProtocol):
    def __init__(self, relay: UdpRelay) -> None:
        self.relay = relay

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.relay._from_client(data, addr)


class _Outside(asyncio.DatagramProtocol):
    def __init__(self, relay: UdpRelay, client: tuple[str, int]) -> None:
        self.relay = relay
        self.client = client
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.relay._from_target(data, self.client, self)


class UdpRelay:
    """A one-target UDP relay with impairments, listening on loopback."""

    def __init__(self, target: tuple[str, int], listen: tuple[str, int] = ("127.0.0.1", 0),
                 loss: float = 0.0, seed: int | None = None) -> None:
        self.target = target
        self.listen = listen
        self.loss = loss
        self.blackhole = False
        self.quic_only: QuicShape | None = None  # set: only QUIC passes (see QuicShape)
        self.stats = RelayStats()
        self._rng = random.Random(seed)
        self._inside: asyncio.DatagramTransport | None = None
        self._outside: dict[tuple[str, int], _Outside] = {}
        self._pending: dict[tuple[str, int], list[bytes]] = {}

    async def start(self) -> UdpRelay:
        loop = asyncio.get_running_loop()
        self._inside, _ = await loop.create_datagram_endpoint(
            lambda: _Inside(self), local_addr=self.listen)
        return self

    @property
    def address(self) -> tuple[str, int]:
        assert self._inside is not None
        return self._inside.get_extra_info("sockname")[:2]

    def rebind(self) -> None:
        """Forget every mapping: the next packets leave from new source ports."""
        for out in self._outside.values():
            if out.transport is not None:
                out.transport.close()
        self._outside.clear()
        self.stats.rebinds += 1

    def close(self) -> None:
        self.rebind()
        if self._inside is not None:
            self._inside.close()

    def _lost(self) -> bool:
        if self.blackhole:
            return True
        return self.loss > 0 and self._rng.random() < self.loss

    def _from_client(self, data: bytes, client: tuple[str, int]) -> None:
        if self._lost() or (self.quic_only is not None and not self.quic_only.up(data, client)):
            self.stats.dropped += 1
            return
        out = self._outside.get(client)
        if out is None:
            out = _Outside(self, client)
            self._outside[client] = out
            self._pending[client] = [data]
            asyncio.ensure_future(self._open(client, out))
            return
        if out.transport is None:
            self._pending.setdefault(client, []).append(data)
            return
        out.transport.sendto(data)
        self.stats.forwarded_up += 1

    async def _open(self, client: tuple[str, int], out: _Outside) -> None:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: out, remote_addr=self.target)
        for data in self._pending.pop(client, []):
            if out.transport is not None:
                out.transport.sendto(data)
                self.stats.forwarded_up += 1

    def _from_target(self, data: bytes, client: tuple[str, int], out: _Outside) -> None:
        if self._outside.get(client) is not out or self._lost() or (
                self.quic_only is not None and not self.quic_only.down(data, client)):
            self.stats.dropped += 1
            return
        if self._inside is not None:
            self._inside.sendto(data, client)
            self.stats.forwarded_down += 1


class UdpEcho(asyncio.DatagramProtocol):
    """The demo's and tests' upstream: echoes every datagram to its sender."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.received = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received += 1
        assert self.transport is not None
        self.transport.sendto(data, addr)

    @classmethod
    async def start(cls, listen: tuple[str, int] = ("127.0.0.1", 0)) -> tuple[UdpEcho, tuple[str, int]]:
        loop = asyncio.get_running_loop()
        transport, proto = await loop.create_datagram_endpoint(cls, local_addr=listen)
        return proto, transport.get_extra_info("sockname")[:2]

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
