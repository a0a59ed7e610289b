"""Roaming against a real gateway: a new address is challenged before the downlink moves.

An on-path attacker who copies one authenticated packet and sends it from its own
address used to move the session's downlink there (and receive everything the
upstream sent). Now the copy only opens a challenge: the attacker's address gets
at most 3x what it sent, the downlink stays home. A genuine NAT rebinding answers
the challenge from its new address and the downlink follows.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from session import wire
from tests.support.harness import Gateway, echo_upstream, start_gateway, wait_for
from tests.support.rawclient import Endpoint, RawSession


@dataclass
class Env:
    gw: Gateway
    s: RawSession
    home: Endpoint


@pytest.fixture
async def env(redis_url: str) -> AsyncIterator[Env]:
    gw = await start_gateway(redis_url)
    echo, upstream = await echo_upstream()
    priv, _ = await gw.add_client(upstream)
    s = RawSession(priv, gw.app.keys.public, upstream)
    home = await Endpoint.udp(gw.udp)
    try:
        await s.connect(home)
        yield Env(gw, s, home)
    finally:
        home.close()
        echo.close()
        await gw.app.stop()


async def test_a_copied_packet_from_another_address_moves_nothing(env: Env) -> None:
    gw, s, home = env.gw, env.s, env.home
    attacker = await Endpoint.udp(gw.udp)
    try:
        copy = s.payload_packet(b"copied")
        attacker.send(copy)  # the copy arrives first, from the attacker's address
        home.send(copy)
        for i in range(50):  # the session keeps talking: the upstream echoes 1 KB each
            home.send(s.payload_packet(b"%04d" % i + b"x" * 1000))
        await s.wait_payloads(home, 51, timeout=5)
        await asyncio.sleep(0.2)
        to_attacker = sum(len(m) for m in attacker.received)
        assert to_attacker <= 3 * len(copy), f"{to_attacker} bytes for {len(copy)}"
        assert gw.node.bindings[s.session_id].peer.addr == home.local
        assert not gw.actions("transport_switch")
    finally:
        attacker.close()


async def test_a_nat_rebinding_answers_the_challenge_and_the_downlink_follows(env: Env) -> None:
    gw, s, home = env.gw, env.s, env.home
    rebound = await Endpoint.udp(gw.udp)  # the same client, a new source port
    try:
        rebound.send(s.payload_packet(b"from the new port"))
        challenge = await s.next_inner(rebound, lambda i: i.kind is wire.InnerType.PATH_CHALLENGE)
        assert gw.node.bindings[s.session_id].peer.addr == home.local  # not yet
        rebound.send(s.seal(wire.inner_path_response(challenge.payload)))
        await wait_for(lambda: gw.node.bindings[s.session_id].peer.addr == rebound.local, 5,
                       "the downlink to move")
        rebound.send(s.payload_packet(b"after"))
        assert b"after" in await s.wait_payloads(rebound, 2)  # its echo, and the first one
        [switch] = gw.actions("transport_switch")
        assert switch["event.reason"] == "nat_rebind"
    finally:
        rebound.close()


async def test_a_wrong_answer_moves_nothing(env: Env) -> None:
    gw, s, home = env.gw, env.s, env.home
    other = await Endpoint.udp(gw.udp)
    try:
        other.send(s.payload_packet(b"x"))
        await s.next_inner(other, lambda i: i.kind is wire.InnerType.PATH_CHALLENGE)
        other.send(s.seal(wire.inner_path_response(bytes(8))))
        await asyncio.sleep(0.2)
        assert gw.node.bindings[s.session_id].peer.addr == home.local
    finally:
        other.close()
