"""A TUN interface: IP packets in and out of the kernel, without packet information.

Created with TUNSETIFF and *not* made persistent: the kernel removes the interface,
with every address and route on it, when the last descriptor closes, so a crash
leaves nothing behind on it (policy-routing rules are not on an interface: see
``netdev.netconf``). Everything else about it (state, MTU, addresses) is set over
netlink.

Offloads (``offload=True``, for the compiled engine only): the interface is opened with
``IFF_VNET_HDR`` and ``TUNSETOFFLOAD`` lets the kernel hand over TCP super-packets of up
to 64 KiB (TSO, checksums left to the reader) and take merged ones back, each behind a
10-byte virtio-net header; the engine cuts and merges them (dataplane/src/offload.rs).
UDP segmentation offload is asked for too and kept where the kernel takes it. This
object's own ``write`` and reader then add and strip the header (the Python plane never
asks for offloads: its reads would be super-packets).
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
IFF_VNET_HDR = 0x4000
TUNSETOFFLOAD = 0x400454D0
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40
TCP_OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
VNET_HDR_LEN = 10
IFNAMSIZ = 16
READS_PER_WAKEUP = 64  # packets read per readiness callback: the loop stays fair
READ_SIZE = 65536


class TunError(OSError):
    """The TUN interface could not be created (no /dev/net/tun, no CAP_NET_ADMIN, a name
    in use)."""


class TunDevice:
    """One TUN interface, non-blocking; ``attach`` hands each packet read to a callback.

    ``offloads`` is what ``TUNSETOFFLOAD`` took (0 without offloads)."""

    def __init__(self, name: str, offload: bool = False) -> None:
        raw = name.encode()
        if not 0 < len(raw) < IFNAMSIZ:
            raise ValueError(f"interface name must be 1-{IFNAMSIZ - 1} bytes, got {name!r}")
        try:
            fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise TunError(exc.errno, f"cannot open {TUN_PATH}: {exc.strerror}") from None
        try:
            flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if offload else 0)
            got = fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", raw, flags))
        except OSError as exc:
            os.close(fd)
            raise TunError(exc.errno, f"cannot create TUN {name!r}: {exc.strerror}") from None
        self.offloads = 0
        if offload:
            self.offloads = _set_offloads(fd)
        self._hdr = VNET_HDR_LEN if offload else 0
        self.fd = fd
        self.name = got[:IFNAMSIZ].rstrip(b"\0").decode()
        self.packets_in = 0
        self.packets_out = 0
        self.write_errors = 0
        self.read_errors = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def attach(self, loop: asyncio.AbstractEventLoop, on_packet: Callable[[bytes], object]) -> None:
        """Call ``on_packet`` for every packet the kernel routes into the interface."""
        self._loop = loop

        def readable() -> None:
            for _ in range(READS_PER_WAKEUP):
                try:
                    pkt = os.read(self.fd, READ_SIZE + self._hdr)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    return
                if self._hdr:
                    # a super-packet, or a checksum left to the reader: not this reader's
                    if len(pkt) < self._hdr or pkt[0] or pkt[1]:
                        self.read_errors += 1
                        continue
                    pkt = pkt[self._hdr:]
                self.packets_in += 1
                on_packet(pkt)

        loop.add_reader(self.fd, readable)

    def write(self, packet: bytes) -> bool:
        """Hand one IP packet to the kernel (False, counted, if it refused it)."""
        try:
            if self._hdr:
                os.writev(self.fd, (bytes(self._hdr), packet))
            else:
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


def _set_offloads(fd: int) -> int:
    """Ask for TCP segmentation and checksum offloads, with UDP's where the kernel has it
    (Linux 6.2+); what was set. A kernel that takes none leaves a plain TUN with a header."""
    for flags in (TCP_OFFLOADS | TUN_F_USO4 | TUN_F_USO6, TCP_OFFLOADS, 0):
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
        except OSError:
            continue
        return flags
    return 0


def describe_offloads(offloads: int) -> str:
    """The offloads a TUN took, as a log line says them."""
    if not offloads:
        return "none"
    names = [("csum", TUN_F_CSUM), ("tso4", TUN_F_TSO4), ("tso6", TUN_F_TSO6),
             ("uso4", TUN_F_USO4), ("uso6", TUN_F_USO6)]
    return ",".join(n for n, f in names if offloads & f)
