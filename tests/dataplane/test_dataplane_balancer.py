"""Differential tests: the engine's reading of the balancer's client-address prefix
against ``gateway.balancer`` and the adapter's decision (``_UdpProtocol``).

For any datagram (random, a valid prefix, a valid prefix mutated or truncated, the magic
before random bytes), any source and any set of trusted networks, both accept the same
datagrams, name the same client and balancer socket, and drop the rest for the same
reason (MISSING_PREFIX from a trusted balancer, UNTRUSTED_PREFIX from anyone else).
"""

from __future__ import annotations

import ipaddress
from types import ModuleType
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.balancer import (
    PREFIX,
    PREFIX_LEN,
    PREFIX_MAGIC,
    Network,
    TrustedBalancers,
    has_prefix_magic,
    parse_prefix,
)
from session.reasons import DropReason

Addr = tuple[str, int]

# a few addresses near each other, so that networks and sources often overlap
v4 = st.builds(lambda a, b: f"10.{a}.0.{b}", st.integers(0, 3), st.integers(0, 3))
v6 = st.builds(lambda a, b: f"fd00:{a:x}::{b:x}", st.integers(0, 3), st.integers(0, 3))
mapped = v4.map(lambda h: f"::ffff:{h}")
hosts = st.one_of(v4, v6, mapped, st.ip_addresses().map(str))
ports = st.integers(0, 65535)


@st.composite
def networks(draw: Any) -> tuple[Network, ...]:
    out = []
    for host in draw(st.lists(st.one_of(v4, v6, mapped), max_size=3)):
        ip = ipaddress.ip_address(host)
        out.append(ipaddress.ip_network(f"{ip}/{draw(st.integers(0, ip.max_prefixlen))}",
                                        strict=False))
    return tuple(out)


@st.composite
def prefix(draw: Any) -> bytes:
    """A prefix as jvpn.js writes it, or one field of it changed."""
    family = draw(st.sampled_from([4, 6, 4, 6, 0, 5, 255]))
    ip = ipaddress.ip_address(draw(v4 if family == 4 else hosts))
    raw = ip.packed + bytes(16 - len(ip.packed))
    if draw(st.booleans()):  # stray bytes where IPv4 has zeros, or anywhere
        i = draw(st.integers(0, 15))
        raw = raw[:i] + bytes([draw(st.integers(0, 255))]) + raw[i + 1:]
    reserved = draw(st.sampled_from([0, 0, 0, 1, 255]))
    return PREFIX.pack(PREFIX_MAGIC, family, reserved, draw(ports), raw)


@st.composite
def datagrams(draw: Any) -> bytes:
    kind = draw(st.sampled_from(["random", "prefixed", "mutated", "truncated", "magic"]))
    tail = draw(st.binary(max_size=40))
    if kind == "random":
        return tail
    if kind == "magic":
        return PREFIX_MAGIC + tail
    data = draw(prefix()) + tail
    if kind == "mutated":
        i = draw(st.integers(0, PREFIX_LEN - 1))
        data = data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1:]
    elif kind == "truncated":
        data = data[:draw(st.integers(0, PREFIX_LEN))]
    return data


def reference(data: bytes, source: Addr, nets: tuple[Network, ...]) -> tuple[Any, ...]:
    """What gateway/node.py's ``_UdpProtocol.datagram_received`` decides."""
    if TrustedBalancers(nets).trusts(source[0]):
        parsed = parse_prefix(data)
        if parsed is None:
            return (DropReason.MISSING_PREFIX, None, None, 0)
        client, msg = parsed
        return (None, client, source, len(data) - len(msg))
    if has_prefix_magic(data):
        return (DropReason.UNTRUSTED_PREFIX, None, None, 0)
    return (None, source, None, 0)


def same_addr(a: Addr | None, b: Addr | None) -> bool:
    if a is None or b is None:
        return a is b
    return ipaddress.ip_address(a[0]) == ipaddress.ip_address(b[0]) and a[1] == b[1]


@settings(max_examples=1000)
@given(data=datagrams(), host=hosts, port=ports, nets=networks())
def test_the_engine_reads_the_prefix_as_the_adapter(compiled: ModuleType, data: bytes, host: str,
                                                    port: int, nets: tuple[Network, ...]) -> None:
    source = (host, port)
    want = reference(data, source, nets)
    reason, client, via, offset = compiled.balancer_sender(
        data, source, [(n.network_address.packed, n.prefixlen) for n in nets])
    assert (reason, offset) == (want[0], want[3]), (data, source, nets)
    assert same_addr(client, want[1]) and same_addr(via, want[2]), (data, source, nets)


def test_the_shapes_the_adapter_sees(compiled: ModuleType) -> None:
    """Examples of each outcome (so that the property above cannot pass on one kind)."""
    nets = [(bytes([10, 0, 0, 1]), 32)]
    good = PREFIX.pack(PREFIX_MAGIC, 4, 0, 40000, bytes([203, 0, 113, 7]) + bytes(12)) + b"m"
    assert compiled.balancer_sender(good, ("10.0.0.1", 5), nets) == (
        None, ("203.0.113.7", 40000), ("10.0.0.1", 5), PREFIX_LEN)
    assert compiled.balancer_sender(good, ("::ffff:10.0.0.1", 5), nets)[0] is None
    assert compiled.balancer_sender(b"m", ("10.0.0.1", 5), nets)[0] == DropReason.MISSING_PREFIX
    assert compiled.balancer_sender(good, ("10.0.0.2", 5), nets)[0] == DropReason.UNTRUSTED_PREFIX
    assert compiled.balancer_sender(b"m", ("10.0.0.2", 5), nets) == (None, ("10.0.0.2", 5), None, 0)
