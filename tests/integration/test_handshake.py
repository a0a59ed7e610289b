"""Handshake through the gateway's UDP socket: refusals, replay, RETRY under load."""

from __future__ import annotations

import asyncio
import os
import socket
import time

from session import wire
from session.handshake import ClientHello, Initiator, Refusal, ServerHello
from session.noise import generate_keypair
from session.reasons import RejectReason
from tests.support.harness import echo_upstream, start_gateway, wait_for


def _init(priv: bytes, gw_pub: bytes, upstream: str, token: bytes = b"") -> tuple[Initiator, bytes]:
    hid = os.urandom(16)
    ini = Initiator(priv, gw_pub, hid, ClientHello(int(time.time() * 1000), wire.TransportKind.UDP, upstream))
    return ini, wire.encode(wire.HandshakeInit(hid, ini.message1, token))


async def _exchange(sock: socket.socket, addr: tuple[str, int], data: bytes,
                    timeout: float = 5.0) -> bytes | None:
    loop = asyncio.get_running_loop()
    sock.sendto(data, addr)
    try:
        return await asyncio.wait_for(loop.sock_recv(sock, 4096), timeout)
    except TimeoutError:
        return None


def _udp() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setblocking(False)
    return s


async def test_unknown_client_gets_an_authenticated_refusal(redis_url: str) -> None:
    gw = await start_gateway(redis_url)
    sock = _udp()
    try:
        priv, _ = generate_keypair()  # never registered
        ini, raw = _init(priv, gw.app.keys.public, "127.0.0.1:9")
        resp = await _exchange(sock, gw.udp, raw)
        assert resp is not None
        msg = wire.decode(resp)
        assert isinstance(msg, wire.HandshakeResp)
        answer, _ = ini.finish(msg.noise)  # authenticated by the handshake itself
        assert isinstance(answer, Refusal) and answer.reason is RejectReason.UNKNOWN_CLIENT
        assert any(e.get("jvpn.security_kind") == "unknown_client"
                   for e in gw.actions("security_event"))
        assert len(resp) <= 3 * len(raw)
    finally:
        sock.close()
        await gw.app.stop()


async def test_upstream_outside_policy_is_refused(redis_url: str) -> None:
    gw = await start_gateway(redis_url)
    sock = _udp()
    try:
        priv, _ = await gw.add_client("127.0.0.1:9000")
        ini, raw = _init(priv, gw.app.keys.public, "127.0.0.1:22")
        resp = await _exchange(sock, gw.udp, raw)
        assert resp is not None
        answer, _ = ini.finish(wire.decode(resp).noise)  # type: ignore[union-attr]
        assert isinstance(answer, Refusal) and answer.reason is RejectReason.POLICY_DENIED
    finally:
        sock.close()
        await gw.app.stop()


async def test_replayed_handshake_init_is_dropped_and_reported(redis_url: str) -> None:
    gw = await start_gateway(redis_url)
    sock, attacker = _udp(), _udp()
    try:
        priv, _ = await gw.add_client("127.0.0.1:9000")
        ini, raw = _init(priv, gw.app.keys.public, "127.0.0.1:9000")
        first = await _exchange(sock, gw.udp, raw)
        assert first is not None
        answer, _ = ini.finish(wire.decode(first).noise)  # type: ignore[union-attr]
        assert isinstance(answer, ServerHello)
        # The same bytes from another address: a replay, dropped, no second session.
        assert await _exchange(attacker, gw.udp, raw, 0.5) is None
        # From the same address it is a retransmission (the answer was lost): same answer.
        assert await _exchange(sock, gw.udp, raw, 3.0) == first
        page = await gw.store.list_sessions()
        assert len(page.sessions) == 1
        assert any(e.get("jvpn.security_kind") == "handshake_replay"
                   for e in gw.actions("security_event"))
    finally:
        sock.close()
        attacker.close()
        await gw.app.stop()


async def test_retry_token_under_load_then_connect(redis_url: str) -> None:
    gw = await start_gateway(redis_url, handshake_retry_threshold=0)  # always ask for a token
    echo, upstream = await echo_upstream()
    sock = _udp()
    try:
        priv, _ = await gw.add_client(upstream)
        # A raw INIT without a token gets a stateless RETRY, small (no amplification).
        _, raw = _init(priv, gw.app.keys.public, upstream)
        resp = await _exchange(sock, gw.udp, raw)
        assert resp is not None and isinstance(wire.decode(resp), wire.Retry)
        assert len(resp) <= len(raw)
        # A forged token is dropped.
        _, forged = _init(priv, gw.app.keys.public, upstream, token=os.urandom(32))
        assert await _exchange(sock, gw.udp, forged, 0.5) is None
        # The agent follows the RETRY and gets its session.
        got: list[bytes] = []
        agent = gw.agent(priv, upstream, on_payload=got.append)
        await agent.start()
        await agent.wait_connected(5)
        agent.send(b"ping")
        await wait_for(lambda: got == [b"ping"], 5, "echo")
        await agent.stop()
    finally:
        sock.close()
        echo.close()
        await gw.app.stop()
