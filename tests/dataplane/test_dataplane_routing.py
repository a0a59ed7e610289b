"""Cryptokey routing, differential: the compiled engine's checks against ``session.tunnel``.

Property-based, both directions: for any session addresses, allowed prefixes and IP-ish
packets (IPv4, IPv6, too short, another version), the engine's uplink check refuses the
same packets for the same ``TunnelDrop`` as ``SessionRoute.check_uplink``; for any
sequence of sessions added to and removed from the owner map, the engine routes a
downlink packet to the same session as ``TunnelRouter.owner`` (or to none, for the same
reason), and its source check agrees with ``SessionRoute.allows``.
"""

from __future__ import annotations

import ipaddress
from types import ModuleType
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from session.inner import InnerAddresses, InnerPool
from session.tunnel import SessionRoute, TunnelDrop, TunnelRouter

# A small universe of addresses, so that sources, destinations, own addresses and prefixes
# collide often.
V4 = [ipaddress.IPv4Address("10.77.0.0") + i for i in range(6)] + \
     [ipaddress.IPv4Address("10.99.0.0") + i for i in range(4)]
V6 = [ipaddress.IPv6Address("fd77::") + i for i in range(6)] + \
     [ipaddress.IPv6Address("fd99::") + i for i in range(4)]

v4s = st.sampled_from(V4)
v6s = st.sampled_from(V6)
addrs = st.one_of(v4s, v6s)


@st.composite
def prefixes(draw: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    a = draw(addrs)
    bits = a.max_prefixlen
    length = draw(st.integers(min_value=0, max_value=bits))
    return ipaddress.ip_network(f"{a}/{length}", strict=False)


@st.composite
def packets(draw: Any) -> bytes:
    kind = draw(st.sampled_from(["v4", "v6", "short", "other", "empty"]))
    if kind == "empty":
        return b""
    if kind == "other":
        return bytes([draw(st.sampled_from([0x00, 0x50, 0x75, 0xF0]))]) + draw(st.binary(max_size=60))
    if kind == "v4":
        head = bytearray(20)
        head[0] = 0x45
        head[12:16] = draw(v4s).packed
        head[16:20] = draw(v4s).packed
        body = bytes(head) + draw(st.binary(max_size=8))
    else:
        head = bytearray(40)
        head[0] = 0x60
        head[8:24] = draw(v6s).packed
        head[24:40] = draw(v6s).packed
        body = bytes(head) + draw(st.binary(max_size=8))
    if kind == "short":
        body = body[:draw(st.integers(min_value=1, max_value=len(body) - 9))]
    return body


@st.composite
def routes(draw: Any) -> SessionRoute:
    inner = InnerAddresses(ipaddress.IPv4Interface(f"{draw(v4s)}/24"),
                           ipaddress.IPv6Interface(f"{draw(v6s)}/64"))
    return SessionRoute(inner, tuple(draw(st.lists(prefixes(), max_size=4))))


def compiled_route(compiled: ModuleType, r: SessionRoute) -> Any:
    return compiled.CryptokeyRoute(r.inner.v4.ip.packed, r.inner.v6.ip.packed,
                                   [(n.network_address.packed, n.prefixlen) for n in r.prefixes])


@settings(max_examples=400)
@given(route=routes(), pkts=st.lists(packets(), min_size=1, max_size=8),
       probes=st.lists(addrs, max_size=6))
def test_the_uplink_check_refuses_the_same_packets_for_the_same_reason(
        compiled: ModuleType, route: SessionRoute, pkts: list[bytes], probes: list[Any]) -> None:
    rs = compiled_route(compiled, route)
    for p in pkts:
        want = route.check_uplink(p)
        got = rs.check_uplink(p)
        assert got == (int(want) if want is not None else None), (p.hex(), want, got)
    for a in probes:
        assert rs.allows(a.packed) == route.allows(a.packed)
        assert rs.owns(a.packed) == route.owns(a.packed)


POOL = InnerPool.parse("10.77.0.0/24", "fd77::/64")
SIDS = [bytes([i]) * 16 for i in range(1, 5)]


@settings(max_examples=300)
@given(ops=st.lists(st.tuples(st.booleans(), st.sampled_from(SIDS), routes()), max_size=10),
       pkts=st.lists(packets(), min_size=1, max_size=8))
def test_the_downlink_goes_to_the_same_session_or_to_none_for_the_same_reason(
        compiled: ModuleType, ops: list[tuple[bool, bytes, SessionRoute]],
        pkts: list[bytes]) -> None:
    py, rs = TunnelRouter(POOL), compiled.TunnelRouter()
    held: dict[bytes, SessionRoute] = {}
    for add, sid, route in ops:
        if add:
            py.add(sid, route)
            rs.add(sid, compiled_route(compiled, route))
            held[sid] = route
        elif sid in held:  # the machine removes what it added, with the same route
            py.remove(sid, held[sid])
            rs.remove(sid, compiled_route(compiled, held[sid]))
            del held[sid]
    assert len(rs) == len(py)
    for p in pkts:
        sid, dst, why = py.owner(p)
        got_sid, extra = rs.owner(p)
        if sid is None:
            assert got_sid is None and extra == int(why or TunnelDrop.NO_ROUTE), (p.hex(), why)
            continue
        assert got_sid == sid
        # the source the engine checks against the owner's prefixes (SOURCE_DENIED)
        src = p[12:16] if p[0] >> 4 == 4 else p[8:24]
        assert extra == src
        route = held.get(sid)
        if route is not None:
            assert compiled_route(compiled, route).allows(src) == route.allows(src)
