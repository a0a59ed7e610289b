"""A real three-master Redis Cluster (six redis-server children) for the cluster tests.

- ``redis_cluster``: the module's cluster (``tests.support.redis_cluster``); a
  test that kills a master brings it back before it ends.
- ``cluster_url``: its ``redis+cluster://`` URL, every master flushed first.
- ``cluster_store``: a ``SessionStore`` on it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from store.api import SessionStore
from tests.support.redis_cluster import RedisClusterProcesses
from tests.support.redis_server import RedisServerMissing


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisClusterProcesses]:
    try:
        cluster = RedisClusterProcesses().start()
    except RedisServerMissing as exc:
        pytest.fail(f"{exc}\nThe cluster tests need redis-server and redis-cli.", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster_url(redis_cluster: RedisClusterProcesses) -> str:
    redis_cluster.flush()
    return redis_cluster.url


@pytest.fixture
async def cluster_store(cluster_url: str) -> AsyncIterator[SessionStore]:
    store = SessionStore(cluster_url, registry_key=b"r" * 32)
    try:
        yield store
    finally:
        await store.close()
