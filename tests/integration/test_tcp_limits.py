"""TCP limits at a real gateway: what one peer can hold of its descriptors, timers and memory.

An unauthenticated peer used to be able to hold any number of idle TCP
connections (1,100 one-byte ones exhausted a 1024-descriptor gateway: /healthz
failed and TCP clients could not attach) and make the gateway queue without
bound for a peer that never reads (40 MB in 15 s). Here, with small limits so
the tests run fast: connections over the node's cap or over one source's are
closed at once while /healthz answers and a legitimate client attaches; a
connection without a whole frame in time, or silent too long, is closed; a
peer that never reads gets a bounded queue, then the connection is aborted.
Every wait is a poll with a deadline.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import cast

import aiohttp
import pytest

from gateway.config import load_gateway_config
from gateway.tcp import FD_RESERVE, FDS_PER_TCP, TcpLimits, fd_bounded_cap
from session import wire
from session.reasons import DropReason
from settings import ConfigError
from tests.support.harness import Gateway, echo_upstream, start_gateway, wait_for
from tests.support.rawclient import Endpoint, RawSession, _TcpProto, readyz

TCP = wire.TransportKind.TCP


def drops(gw: Gateway, reason: DropReason) -> int:
    return int(gw.app.metrics.drops.get((reason, TCP), 0))


async def healthz(admin_port: int | None) -> int:
    assert admin_port is not None
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        async with http.get(f"http://127.0.0.1:{admin_port}/healthz") as r:
            return r.status


class Idle:
    """A hostile connection: one byte sent, never more; ``closed`` once the gateway closed it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.closed_at: float | None = None
        self.task = asyncio.ensure_future(self._watch(reader))

    @classmethod
    async def open(cls, remote: tuple[str, int], source: str = "127.0.0.1") -> Idle:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(*remote, local_addr=(source, 0)), 5.0)
        writer.write(b"\x00")  # half a frame head: never a whole frame
        return cls(reader, writer)

    async def _watch(self, reader: asyncio.StreamReader) -> None:
        try:
            while await reader.read(4096):  # the gateway never writes to it: b"" is its close
                pass
        except (ConnectionError, OSError):
            pass
        self.closed_at = time.monotonic()

    @property
    def closed(self) -> bool:
        return self.closed_at is not None

    def close(self) -> None:
        self.task.cancel()
        self.writer.close()


@contextmanager
def idle_pool() -> Iterator[list[Idle]]:
    pool: list[Idle] = []
    try:
        yield pool
    finally:
        for c in pool:
            c.close()


async def tcp_endpoint(remote: tuple[str, int], source: str = "127.0.0.1",
                       rcvbuf: int | None = None) -> Endpoint:
    """``Endpoint.tcp`` from a chosen source address, optionally with a small receive buffer
    (set before connecting, so the window the gateway sees is small from the start)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((source, 0))
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await asyncio.wait_for(loop.sock_connect(sock, remote), 5.0)
    ep = Endpoint(TCP, remote)
    await loop.create_connection(lambda: _TcpProto(ep), sock=sock)
    return ep


async def attached(gw: Gateway, priv: bytes, upstream: str, source: str = "127.0.0.1",
                   ) -> tuple[RawSession, Endpoint]:
    st = RawSession(priv, gw.app.keys.public, upstream)
    ep = await tcp_endpoint(gw.tcp, source)
    await st.connect(ep)  # handshake over TCP, then a keepalive answered: attached
    return st, ep


# ---- caps on open connections ---------------------------------------------------------------


async def test_connections_over_the_cap_are_closed_at_once_and_the_node_stays_usable(
        redis_url: str) -> None:
    cap, extra, first_frame = 8, 4, 2.0
    gw = await start_gateway(redis_url, tcp_max_connections=cap, tcp_max_per_source=0,
                             tcp_first_frame_timeout_s=first_frame)
    echo, upstream = await echo_upstream()
    try:
        priv, _ = await gw.add_client(upstream)
        st, home = await attached(gw, priv, upstream)  # one legitimate session holds a slot
        with idle_pool() as flood:
            for _ in range(cap - 1 + extra):
                flood.append(await Idle.open(gw.tcp))
            held, over = flood[:cap - 1], flood[cap - 1:]
            await wait_for(lambda: all(c.closed for c in over), first_frame * 0.75,
                           "the connections over the cap to be closed")
            assert not any(c.closed for c in held), "a connection within the cap was closed"
            assert drops(gw, DropReason.TCP_LIMIT) == extra
            assert len(gw.node.tcp.conns) == cap

            # The node is still alive and usable while its TCP cap is full.
            assert await healthz(gw.app.admin_port) == 200
            assert gw.app.admin_port is not None
            assert (await readyz(gw.app.admin_port))[0] == 200
            await st.keepalive(home)  # the established session keeps working

            # The first-frame deadline frees the idle ones; a new client then attaches.
            await wait_for(lambda: all(c.closed for c in held), first_frame + 3.0,
                           "the idle connections to be closed by the first-frame deadline")
            st2, ep2 = await attached(gw, priv, upstream)
            assert not ep2.eof.is_set() and not home.eof.is_set()
            assert drops(gw, DropReason.TCP_LIMIT) == extra + len(held)
    finally:
        echo.close()
        await gw.app.stop()


async def test_connections_over_the_per_source_cap_are_closed_and_other_sources_attach(
        redis_url: str) -> None:
    per_source, extra = 3, 2
    gw = await start_gateway(redis_url, tcp_max_connections=64, tcp_max_per_source=per_source,
                             tcp_first_frame_timeout_s=30.0)
    echo, upstream = await echo_upstream()
    try:
        priv, _ = await gw.add_client(upstream)
        with idle_pool() as flood:
            for _ in range(per_source + extra):
                flood.append(await Idle.open(gw.tcp, "127.0.0.1"))
            held, over = flood[:per_source], flood[per_source:]
            await wait_for(lambda: all(c.closed for c in over), 3.0,
                           "the connections over the per-source cap to be closed")
            assert not any(c.closed for c in held)
            assert drops(gw, DropReason.TCP_LIMIT) == extra

            # Another source attaches at once while this one holds its share.
            st, ep = await attached(gw, priv, upstream, source="127.0.0.2")
            await st.keepalive(ep)
            assert not any(c.closed for c in held)

            # A slot given back is usable again by its source.
            held[0].close()
            await wait_for(lambda: gw.node.tcp.per_source.get("127.0.0.1") == per_source - 1, 3.0,
                           "the closed connection to be forgotten")
            again = await Idle.open(gw.tcp, "127.0.0.1")
            flood.append(again)
            await wait_for(lambda: gw.node.tcp.per_source.get("127.0.0.1") == per_source, 3.0,
                           "the new connection to be admitted")
            assert not again.closed
            assert drops(gw, DropReason.TCP_LIMIT) == extra
    finally:
        echo.close()
        await gw.app.stop()


# ---- timeouts -------------------------------------------------------------------------------


async def test_first_frame_and_idle_timeouts_close_silent_connections(redis_url: str) -> None:
    first_frame, idle = 0.5, 1.0  # idle > silence detection: 0.1 s keepalives x 3
    gw = await start_gateway(redis_url, tcp_first_frame_timeout_s=first_frame,
                             tcp_idle_timeout_s=idle)
    echo, upstream = await echo_upstream()
    try:
        priv, _ = await gw.add_client(upstream)
        with idle_pool() as pool:
            t0 = time.monotonic()
            silent = await Idle.open(gw.tcp)
            pool.append(silent)
            await wait_for(lambda: silent.closed, first_frame + 3.0,
                           "the connection without a frame to be closed")
            assert silent.closed_at is not None and silent.closed_at - t0 >= first_frame * 0.8

        # A live session's frames keep its connection open well past the idle timeout...
        st, ep = await attached(gw, priv, upstream)
        t1 = last = time.monotonic()
        while last - t1 < 2 * idle:
            assert not ep.eof.is_set(), "a connection carrying keepalives was closed"
            last = time.monotonic()  # the keepalive leaves now; the gateway stamps it later
            await st.keepalive(ep)
            await asyncio.sleep(idle / 5)
        # ... and once it falls silent, it is closed after the idle timeout.
        await asyncio.wait_for(ep.eof.wait(), idle + 3.0)
        assert time.monotonic() - last >= idle * 0.95
        await wait_for(lambda: not gw.node.tcp.conns, 3.0, "the node to forget the connections")
        assert drops(gw, DropReason.TCP_LIMIT) == 2
    finally:
        echo.close()
        await gw.app.stop()


def test_the_idle_timeout_must_leave_room_for_keepalives() -> None:
    with pytest.raises(ConfigError, match="tcp_idle_timeout_s"):
        load_gateway_config(None, env={}, overrides={
            "keepalive_interval_s": 1.0, "tcp_idle_timeout_s": 3.0})
    load_gateway_config(None, env={}, overrides={  # silence detection off (benchmarks): fine
        "keepalive_interval_s": 1.0, "silence_keepalives": 1000})


# ---- write back-pressure --------------------------------------------------------------------


async def test_a_peer_that_never_reads_gets_a_bounded_queue_then_is_aborted(
        redis_url: str) -> None:
    high, stall = 64 * 1024, 1.0
    gw = await start_gateway(redis_url, tcp_write_buffer=high, tcp_write_stall_s=stall)
    echo, upstream = await echo_upstream()
    try:
        priv, _ = await gw.add_client(upstream)
        st = RawSession(priv, gw.app.keys.public, upstream)
        ep = await tcp_endpoint(gw.tcp, rcvbuf=4096)
        await st.connect(ep)
        (cid, conn), = gw.node.tcp.conns.items()
        tx = cast(asyncio.Transport, conn.transport)  # the gateway's side of this connection
        assert ep._transport is not None
        ep._transport.pause_reading()  # type: ignore[attr-defined]  # never read again

        # Every payload comes back from the echo upstream as a DATA frame to this peer.
        payload = bytes(wire.MAX_PAYLOAD_SIZE)
        limit = TcpLimits(write_buffer=high).write_buffer_max
        peak = 0
        deadline = time.monotonic() + 20.0
        sent = 0
        while cid in gw.node.tcp.conns and sent < 40_000:
            assert time.monotonic() < deadline, (
                f"not aborted after {sent} payloads; write buffer {tx.get_write_buffer_size()}")
            for _ in range(16):
                ep.send(st.payload_packet(payload))
            sent += 16
            await asyncio.sleep(0.002)
            if cid in gw.node.tcp.conns:
                peak = max(peak, tx.get_write_buffer_size())
                assert peak <= limit, f"write buffer {peak} over {limit}"
        assert cid not in gw.node.tcp.conns, "the connection was not aborted"
        assert peak >= high * 0.9, f"the test never filled the buffer (peak {peak})"
        assert drops(gw, DropReason.QUEUE_FULL) > 0
        assert drops(gw, DropReason.TCP_LIMIT) == 1

        # The node goes on serving others.
        ep.close()
        st2, ep2 = await attached(gw, priv, upstream)
        await st2.keepalive(ep2)
        assert await healthz(gw.app.admin_port) == 200
    finally:
        echo.close()
        await gw.app.stop()


# ---- the cap follows the descriptor limit ---------------------------------------------------


def test_the_connection_cap_leaves_descriptors_for_everything_else(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import resource

    monkeypatch.setattr(resource, "getrlimit", lambda _which: (1024, 4096))
    assert fd_bounded_cap(1024) == (1024 - FD_RESERVE) // FDS_PER_TCP < 1024
    assert fd_bounded_cap(100) == 100
    monkeypatch.setattr(resource, "getrlimit",
                        lambda _which: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert fd_bounded_cap(5000) == 5000
