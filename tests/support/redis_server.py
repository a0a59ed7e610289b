"""A real redis-server for tests: ``store.embedded.EmbeddedRedis`` plus test conveniences.

Usable outside pytest too::

    with RedisServer() as server:
        print(server.url)
        server.stop()    # outage
        server.start()   # back, same port
"""

from __future__ import annotations

from collections.abc import Sequence

import redis

from store.embedded import INSTALL_HINT, EmbeddedRedis, EmbeddedRedisError, find_redis_server

__all__ = ["INSTALL_HINT", "RedisServer", "RedisServerMissing", "flush", "redis_server_binary"]


class RedisServerMissing(EmbeddedRedisError):
    """redis-server is not installed."""


def redis_server_binary() -> str:
    """Path of redis-server, or RedisServerMissing with the install hint."""
    try:
        return find_redis_server()
    except EmbeddedRedisError as exc:
        raise RedisServerMissing(str(exc)) from None


class RedisServer(EmbeddedRedis):
    """A throwaway redis-server on a free loopback port (persistence off)."""

    def __init__(self, *, port: int | None = None, extra_args: Sequence[str] = ()) -> None:
        super().__init__(port=port, binary=redis_server_binary(), extra_args=extra_args)

    def replica(self) -> RedisServer:
        """Start a replica of this server (for durable-mode WAIT tests)."""
        return RedisServer(extra_args=("--replicaof", self.host, str(self.port))).start()


def flush(url: str) -> None:
    """FLUSHDB the database of ``url`` (sync client: usable from any fixture)."""
    client = redis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=5.0)
    try:
        client.flushdb()
    finally:
        client.close()
