"""A TUN interface: IP packets in and out of the kernel, without packet information.

Created with TUNSETIFF and *not* made persistent: the kernel removes the interface,
with every address and route on it, when the last descriptor closes, so a crash
leaves nothing behind on it (policy-routing rules are not on an interface: see
``netdev.netconf``). Everything else about it (state, MTU, addresses) is set over
netlink.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import struct
from collections.abc import Callable

TUN_PATH = "/dev/net/tun"
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFNAMSIZ = 16
READS_PER_WAKEUP = 64  # packets read per readiness callback: the loop stays fair
READ_SIZE = 65536


class TunError(OSError):
    """The TUN interface could not be created (no /dev/net/tun, no CAP_NET_ADMIN, a name
    in use)."""


class TunDevice:
    """One TUN interface, non-blocking; ``attach`` hands each packet read to a callback."""

    def __init__(self, name: str) -> None:
        raw = name.encode()
        if not 0 < len(raw) < IFNAMSIZ:
            raise ValueError(f"interface name must be 1-{IFNAMSIZ - 1} bytes, got {name!r}")
        try:
            fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise TunError(exc.errno, f"cannot open {TUN_PATH}: {exc.strerror}") from None
        try:
            got = fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", raw, IFF_TUN | IFF_NO_PI))
        except OSError as exc:
            os.close(fd)
            raise TunError(exc.errno, f"cannot create TUN {name!r}: {exc.strerror}") from None
        self.fd = fd
        self.name = got[:IFNAMSIZ].rstrip(b"\0").decode()
        self.packets_in = 0
        self.packets_out = 0
        self.write_errors = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def attach(self, loop: asyncio.AbstractEventLoop, on_packet: Callable[[bytes], object]) -> None:
        """Call ``on_packet`` for every packet the kernel routes into the interface."""
        self._loop = loop

        def readable() -> None:
            for _ in range(READS_PER_WAKEUP):
                try:
                    pkt = os.read(self.fd, READ_SIZE)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    return
                self.packets_in += 1
                on_packet(pkt)

        loop.add_reader(self.fd, readable)

    def write(self, packet: bytes) -> bool:
        """Hand one IP packet to the kernel (False, counted, if it refused it)."""
        try:
            os.write(self.fd, packet)
        except OSError:  # a full queue, a malformed packet: dropped like a lossy link
            self.write_errors += 1
            return False
        self.packets_out += 1
        return True

    def detach(self) -> None:
        """Stop reading (on the loop's thread, before ``close`` in any thread)."""
        if self._loop is not None and self.fd >= 0:
            self._loop.remove_reader(self.fd)
        self._loop = None

    def close(self) -> None:
        """Close the descriptor: the kernel removes the interface with its addresses and
        routes. Call ``detach`` first, on the loop's thread."""
        if self.fd < 0:
            return
        if self._loop is not None:
            self._loop.remove_reader(self.fd)  # only safe on the loop's thread
            self._loop = None
        os.close(self.fd)
        self.fd = -1
