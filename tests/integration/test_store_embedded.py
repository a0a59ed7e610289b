"""store.embedded.EmbeddedRedis: the private redis-server child the gateway and tests use."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from store import embedded
from store.embedded import (
    EmbeddedRedis,
    EmbeddedRedisError,
    find_redis_server,
    free_port,
    ping,
)


def test_start_stop_restart_same_port() -> None:
    server = EmbeddedRedis()
    try:
        server.start()
        pid, port = server.pid, server.port
        assert server.running and ping(server.host, port)
        assert server.url == f"redis://127.0.0.1:{port}/0"
        assert server.data_dir and os.path.isdir(server.data_dir)
        server.start()  # idempotent
        assert server.pid == pid
        server.stop()
        assert not server.running and not ping(server.host, port)
        server.start()
        assert server.port == port and server.pid != pid and ping(server.host, port)
    finally:
        server.close()
    assert server.data_dir is None


def test_context_manager_and_persistence_off() -> None:
    with EmbeddedRedis() as server:
        import redis

        client = redis.Redis.from_url(server.url)
        try:
            assert client.config_get("save") == {"save": ""}
            assert client.config_get("appendonly") == {"appendonly": "no"}
            assert client.config_get("bind")["bind"] == "127.0.0.1"
        finally:
            client.close()
    assert not server.running


async def test_async_start_stop() -> None:
    server = EmbeddedRedis()
    await server.astart()
    try:
        assert ping(server.host, server.port)
    finally:
        await server.aclose()
    assert not server.running


def test_port_in_use_is_reported() -> None:
    with EmbeddedRedis() as first:
        second = EmbeddedRedis(port=first.port)
        with pytest.raises(EmbeddedRedisError, match="in use"):
            second.start()
        assert second.data_dir is None and not second.running  # cleaned up after itself
        assert first.running  # untouched


def test_missing_binary_names_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("JVPN_REDIS_SERVER", "/nonexistent/redis-server")
    monkeypatch.setattr("store.embedded.DEFAULT_BINARY", "/nonexistent/redis-server")
    with pytest.raises(EmbeddedRedisError, match="apt-get install redis-server"):
        find_redis_server()
    with pytest.raises(EmbeddedRedisError, match="apt-get install redis-server"):
        EmbeddedRedis(binary="/nonexistent/redis-server").start()


def test_free_port_is_outside_the_kernels_ephemeral_range(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A server port left free during a restart cannot be taken by a client's outgoing socket."""
    with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as f:
        low, high = (int(x) for x in f.read().split())
    ports = [free_port("127.0.0.1", udp_too=True) for _ in range(20)]
    assert all(p < low for p in ports), (ports, low)
    assert len(set(ports)) == 20  # never the same port twice in one process
    # A client's outgoing socket is numbered inside the range, never among those.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
        c.connect(("127.0.0.1", ports[0]))
        assert low <= c.getsockname()[1] <= high
    # Taken on UDP only is taken; a port is handed out once; TCP-only asks check TCP only.
    busy, spare = ports[0], ports[1]
    monkeypatch.setattr(embedded, "_handed_out", set())
    monkeypatch.setattr(embedded, "_below_ephemeral", lambda: [busy, spare])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.bind(("127.0.0.1", busy))
        assert free_port("127.0.0.1", udp_too=True) == spare
        assert free_port("127.0.0.1", udp_too=True) not in (busy, spare)  # the OS's choice
        monkeypatch.setattr(embedded, "_below_ephemeral", lambda: [busy])
        assert free_port("127.0.0.1") == busy  # free on TCP
