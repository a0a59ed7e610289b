"""The engines' L3 path, each alone: a datagram socket pair stands in for the TUN (one
packet per read and write, as a TUN without offloads).

Gateway: an uplink DATA of a fast binding is checked by cryptokey routing and written to
the TUN; a spoofed source and a disallowed destination are dropped and counted by
``TunnelDrop`` (the counter is spent, as in the machine); a packet read from the TUN goes
sealed to the session owning its destination, or is refused for its source, or, owned by
no binding the engine carries (or by one that is not fast), is handed up unchanged; an
expired lease drops it. Agent: packets read from the TUN go sealed on the current path
while it is fast and its keys are young, else up; the path's payloads go to the TUN.
"""

from __future__ import annotations

import ipaddress
import select
import socket
import time
from types import ModuleType
from typing import Any

from session import wire
from session.framing import DataChannel as PyChannel
from session.reasons import DropReason
from session.tunnel import TunnelDrop

SID = bytes(range(16))
EPOCH = 7
C2G, G2C = b"\x01" * 32, b"\x02" * 32
ME_V4, ME_V6 = ipaddress.ip_address("10.77.0.5"), ipaddress.ip_address("fd77::5")
SERVER = ipaddress.ip_address("10.99.0.100")


def ipv4(src: Any, dst: Any, body: bytes = b"hello") -> bytes:
    head = bytearray(20)
    head[0] = 0x45
    head[12:16] = ipaddress.ip_address(src).packed
    head[16:20] = ipaddress.ip_address(dst).packed
    return bytes(head) + body


def recv(sock: socket.socket, timeout: float = 2.0) -> bytes | None:
    r, _, _ = select.select([sock], [], [], timeout)
    return sock.recv(4096) if r else None


def wait_counter(engine: Any, key: str, at_least: int, timeout: float = 2.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        c: dict[str, int] = engine.counters()
        if c[key] >= at_least or time.monotonic() > deadline:
            return c
        time.sleep(0.005)


def drain(engine: Any, n: int, timeout: float = 2.0) -> list[Any]:
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        if select.select([engine.fileno()], [], [], 0.05)[0]:
            out.extend(engine.drain(64))
    return out


def test_the_gateway_engine_routes_between_the_tunnel_and_the_tun(compiled: ModuleType) -> None:
    listen = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listen.bind(("127.0.0.1", 0))
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    client.connect(listen.getsockname())
    tun, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    engine = compiled.GatewayEngine(listen.fileno())
    try:
        engine.set_tun(tun.fileno())
        gw = compiled.DataChannel(G2C, C2G, SID, EPOCH)
        cl = PyChannel(C2G, G2C, SID, EPOCH)  # the client: the Python reference
        route = compiled.CryptokeyRoute(ME_V4.packed, ME_V6.packed,
                                        [(ipaddress.ip_address("10.99.0.0").packed, 24)])
        peer = client.getsockname()
        t0 = time.monotonic()
        engine.set_lease(t0 + 60, t0)  # the node's lease; the binding confirmed at t0
        engine.install(SID, gw, peer, True, t0, route)

        # uplink: checked, written to the TUN
        good = ipv4(ME_V4, SERVER)
        client.send(cl.seal(wire.inner_payload(good)))
        assert recv(kernel) == good
        client.send(cl.seal(wire.inner_payload(ipv4("10.77.0.6", SERVER))))  # spoofed
        client.send(cl.seal(wire.inner_payload(ipv4(ME_V4, "10.98.0.1"))))  # not allowed
        c = wait_counter(engine, f"tunnel_drop_{TunnelDrop.PREFIX_DENIED.value}", 1)
        assert c[f"tunnel_drop_{TunnelDrop.SPOOFED_SOURCE.value}"] == 1, c
        assert c[f"tunnel_drop_{TunnelDrop.PREFIX_DENIED.value}"] == 1, c
        assert c["tun_writes"] == 1 and c["forwarded"] == 1, c
        assert gw.highest_received == 2  # the refused packets were the client's: spent
        assert recv(kernel, 0.1) is None

        # downlink: to the owner, sealed; a source outside its prefixes refused
        reply = ipv4(SERVER, ME_V4, b"reply")
        kernel.send(reply)
        raw = recv(client)
        assert raw is not None and wire.decode_inner(cl.open_raw(raw)).payload == reply
        kernel.send(ipv4("10.98.0.9", ME_V4))
        c = wait_counter(engine, f"tunnel_drop_{TunnelDrop.SOURCE_DENIED.value}", 1)
        assert c[f"tunnel_drop_{TunnelDrop.SOURCE_DENIED.value}"] == 1, c
        # owned by no binding here: handed up unchanged (the machine relays or drops it)
        other = ipv4(SERVER, "10.77.0.9")
        kernel.send(other)
        kernel.send(b"\x00" * 30)  # not an IP packet: dropped as MALFORMED
        assert drain(engine, 1) == [(2, other, None)]
        c = wait_counter(engine, f"tunnel_drop_{TunnelDrop.MALFORMED.value}", 1)
        assert c[f"tunnel_drop_{TunnelDrop.MALFORMED.value}"] == 1, c

        # not fast: the machine decides, so it sees the packet
        engine.install(SID, gw, peer, False, t0, route)
        kernel.send(reply)
        assert drain(engine, 1) == [(2, reply, None)]
        # the node's lease lapsed: dropped by the engine, counted as the machine counts it;
        # then a binding confirmed before the node trusted the store again: the same
        engine.install(SID, gw, peer, True, t0, route)
        engine.set_lease(t0 - 1, t0)
        kernel.send(reply)
        c = wait_counter(engine, f"drop_{DropReason.LEASE_EXPIRED.value}", 1)
        assert c[f"drop_{DropReason.LEASE_EXPIRED.value}"] == 1, c
        engine.set_lease(time.monotonic() + 60, t0 + 1)
        kernel.send(reply)
        c = wait_counter(engine, f"drop_{DropReason.LEASE_EXPIRED.value}", 2)
        assert c[f"drop_{DropReason.LEASE_EXPIRED.value}"] == 2, c
        assert recv(client, 0.1) is None
        engine.set_lease(time.monotonic() + 60, t0)
        # removed: its addresses route nowhere here any more
        engine.install(SID, gw, peer, True, t0, route)
        assert engine.take_active()[0][:3] == (SID, 3, 1)  # the stream's counts, once
        assert engine.take_active() == []
        assert engine.remove(SID)
        kernel.send(reply)
        assert drain(engine, 1) == [(2, reply, None)]
        assert recv(client, 0.1) is None
        engine.set_tun(None)
    finally:
        engine.stop()
        for s in (listen, client, tun, kernel):
            s.close()


def test_the_agent_engine_carries_the_tun(compiled: ModuleType) -> None:
    gateway = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    gateway.bind(("127.0.0.1", 0))
    gateway.settimeout(2.0)
    path = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    path.connect(gateway.getsockname())
    tun, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    engine = compiled.AgentEngine(tun.fileno(), 1024, tun=True)
    try:
        engine.add_path(1, path.fileno())
        cl = compiled.DataChannel(C2G, G2C, SID, EPOCH)
        gw = PyChannel(G2C, C2G, SID, EPOCH)
        engine.set_current(1, cl, True, time.monotonic() + 60)
        up = ipv4(ME_V4, SERVER)
        kernel.send(up)
        raw, addr = gateway.recvfrom(4096)
        assert wire.decode_inner(gw.open_raw(raw)).payload == up
        assert engine.recent_tags() == [raw[-wire.AEAD_TAG_LEN:]]
        sent, heard = engine.take_activity()  # for the machine's silence probe
        assert sent is not None and heard is None and engine.take_activity() == (None, None)
        down = ipv4(SERVER, ME_V4, b"down")
        gateway.sendto(gw.seal(wire.inner_payload(down)), addr)
        assert recv(kernel) == down
        sent, heard = engine.take_activity()
        assert sent is None and heard is not None and heard <= time.monotonic()
        # the keys reached their reject-after age: the machine holds and rekeys
        engine.set_current(1, cl, True, time.monotonic() - 1)
        kernel.send(up)
        assert drain(engine, 1) == [(2, up, None)]
        # not fast: up as well
        engine.set_current(1, cl, False, time.monotonic() + 60)
        kernel.send(up)
        assert drain(engine, 1) == [(2, up, None)]
        c = engine.counters()
        assert c["forwarded"] == 1 and c["returned"] == 1 and c["tun_writes"] == 1, c
    finally:
        engine.stop()
        for s in (gateway, path, tun, kernel):
            s.close()
