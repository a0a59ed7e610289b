"""The L3 plane's network setup: forwarding, the NAT ruleset, the return address's announcements.

What ``gateway.l3`` asks of the host, each a small call that talks to the
kernel and nothing else: the forwarding sysctls (set, and put back), the
nftables masquerade for the pools (``nat_ruleset``, loaded atomically by one
``nft -f``), a gratuitous ARP for the routed IPv4 return address, and for the
IPv6 one an unsolicited neighbour advertisement and a responder to neighbour
solicitations (``NeighborResponder``). It knows nothing of sessions.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
import subprocess
from dataclasses import dataclass

from session.inner import InnerPool

log = logging.getLogger("jvpn.gateway.l3")

FORWARDING = ("/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding")
NFT_TIMEOUT_S = 10.0


class L3Error(RuntimeError):
    """The L3 plane could not be set up (no TUN, no nft, a bad interface)."""


@dataclass(frozen=True)
class L3Config:
    tun_name: str
    mtu: int
    pool: InnerPool
    offload: bool = True  # TUN offloads when the compiled engine drives the TUN
    egress: str = "nat"  # "nat" | "routed"
    egress_interface: str = ""
    relay_listen: tuple[str, int] | None = None
    relay_advertise: str = ""  # "host:port" other nodes send to ('' = relay_listen)
    vip: str = ""  # routed: the cluster's return address (IPv4)
    vip6: str = ""  # routed: its IPv6 return address (held with ``vip``; '' = none)
    vip_interface: str = ""  # where the holder announces it
    lease_s: float = 1.0


def nat_ruleset(table: str, cfg: L3Config, delete_first: bool) -> str:
    """The masquerade ruleset, loaded atomically by one ``nft -f``."""
    out = f'"{cfg.egress_interface}"' if cfg.egress_interface else f'!= "{cfg.tun_name}"'
    head = f"table inet {table}\ndelete table inet {table}\n" if delete_first else ""
    return (f"{head}table inet {table} {{\n"
            f"  chain postrouting {{\n"
            f"    type nat hook postrouting priority srcnat; policy accept;\n"
            f"    ip saddr {cfg.pool.v4} oifname {out} masquerade\n"
            f"    ip6 saddr {cfg.pool.v6} oifname {out} masquerade\n"
            f"  }}\n}}\n")


def nft(script: str) -> None:
    try:
        done = subprocess.run(["nft", "-f", "-"], input=script.encode(), capture_output=True,
                              timeout=NFT_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise L3Error(f"nft: {exc}") from None
    if done.returncode != 0:
        raise L3Error(f"nft -f failed: {done.stderr.decode(errors='replace').strip()}")


def sysctl(path: str, value: str) -> str:
    """Set a /proc/sys value (this network namespace's); returns the previous one."""
    with open(path) as f:
        old = f.read().strip()
    if old != value:
        with open(path, "w") as f:
            f.write(value)
    return old


def gratuitous_arp(ifname: str, address: str) -> None:
    """Announce that ``address`` is now at this interface's MAC (an ARP request for itself,
    broadcast): neighbours update the entry they hold."""
    ip = ipaddress.IPv4Address(address).packed
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind((ifname, 0))
        mac = s.getsockname()[4]
        eth = b"\xff" * 6 + mac + struct.pack("!H", 0x0806)
        arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + ip + b"\x00" * 6 + ip
        s.send(eth + arp)


ICMP6_NS, ICMP6_NA = 135, 136
ICMP6_FILTER = 1  # <netinet/icmp6.h>, level IPPROTO_ICMPV6
NA_ROUTER, NA_SOLICITED, NA_OVERRIDE = 0x80000000, 0x40000000, 0x20000000
ALL_NODES = "ff02::1"


def neighbor_advertisement(target: bytes, mac: bytes, solicited: bool) -> bytes:
    """An ICMPv6 NA for ``target`` at ``mac`` (RFC 4861 4.4; the kernel fills the checksum),
    override set: neighbours replace the entry they hold."""
    flags = NA_ROUTER | NA_OVERRIDE | (NA_SOLICITED if solicited else 0)
    return struct.pack("!BBHI16sBB6s", ICMP6_NA, 0, 0, flags, target, 2, 1, mac)


class NeighborResponder:
    """Answers neighbour solicitations for one IPv6 address on one interface while it is open
    (IPv6's gratuitous ARP and ARP reply: Linux answers solicitations only for the addresses
    of the receiving interface, and the return address lives on the TUN so that it vanishes
    with the process; this socket vanishes with it too)."""

    def __init__(self, ifname: str, address: str) -> None:
        self.target = ipaddress.IPv6Address(address).packed
        with open(f"/sys/class/net/{ifname}/address") as f:
            self.mac = bytes.fromhex(f.read().strip().replace(":", ""))
        index = socket.if_nametoindex(ifname)
        s = self.sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 255)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
            solicited_node = ipaddress.IPv6Address("ff02::1:ff00:0").packed[:13] + self.target[13:]
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP,
                         solicited_node + struct.pack("@I", index))
            words = [0xFFFFFFFF] * 8  # a set bit blocks its type: pass only solicitations
            words[ICMP6_NS >> 5] &= ~(1 << (ICMP6_NS & 31))
            s.setsockopt(socket.IPPROTO_ICMPV6, ICMP6_FILTER, struct.pack("@8I", *words))
            s.setblocking(False)
        except BaseException:
            s.close()
            raise
        self.answered = 0

    def announce(self) -> None:
        """An unsolicited advertisement to all nodes (after taking the address over)."""
        self.sock.sendto(neighbor_advertisement(self.target, self.mac, False), (ALL_NODES, 0))

    def readable(self) -> None:
        for _ in range(64):  # bounded per wake-up
            try:
                data, addr = self.sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("neighbour solicitation socket: %s", exc)
                return
            if len(data) < 24 or data[0] != ICMP6_NS or data[8:24] != self.target:
                continue
            src = addr[0].split("%", 1)[0]
            dad = src == "::"  # a duplicate address probe: answer to all nodes, unsolicited
            try:
                self.sock.sendto(neighbor_advertisement(self.target, self.mac, not dad),
                                 (ALL_NODES if dad else src, 0, 0, addr[3] if len(addr) > 3 else 0))
                self.answered += 1
            except OSError as exc:
                log.debug("neighbour advertisement to %s: %s", src, exc)

    def close(self) -> None:
        self.sock.close()
