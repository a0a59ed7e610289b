"""Shared fixtures: a real redis-server (integration tests use no mocks).

- ``redis_server``: a fresh redis-server for one test (stop/start it for outages).
- ``redis_url``: the session-wide shared server, flushed before each test; if
  ``REDIS_URL`` is set, that server is used instead (and flushed!).
- ``session_store``: a ``SessionStore`` on ``redis_url``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

# No per-example deadline: on a shared 2-core CI box one slow example (a GC pause,
# a neighbour's burst) is not a failure. Properties, not timings, are tested here.
settings.register_profile("jvpn", deadline=None)
settings.load_profile("jvpn")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `tests.support` importable however pytest is launched
    sys.path.insert(0, str(ROOT))

from store.api import SessionStore  # noqa: E402
from tests.support.redis_server import RedisServer, RedisServerMissing, flush  # noqa: E402

TEST_REGISTRY_KEY = b"r" * 32  # MACs registry entries in session_store (any 32 bytes)


def pytest_configure(config: pytest.Config) -> None:
    """SIGTERM (a CI timeout, a superseded run) ends the run like Ctrl-C: pytest then runs
    every fixture's teardown, so the redis-servers, gateways and nginx the tests started
    are stopped by their PIDs instead of outliving the run."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)


@pytest.fixture(scope="session", autouse=True)
def data_plane() -> Iterator[str]:
    """The data plane of this run (``JVPN_DATA_PLANE``: auto, compiled or python; default
    auto), for the machines driven in memory and, through the environment, for the
    gateways and agents the tests start as processes."""
    from session import dataplane

    choice = os.environ.get("JVPN_DATA_PLANE", "auto")
    active = dataplane.select(choice)
    saved = {k: os.environ.get(k) for k in ("JVPN_GATEWAY_DATA_PLANE", "JVPN_AGENT_DATA_PLANE")}
    if "JVPN_DATA_PLANE" in os.environ:
        for key in saved:
            os.environ[key] = choice
    try:
        yield active.value
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def pytest_report_header(config: pytest.Config) -> str:
    from session import dataplane

    choice = os.environ.get("JVPN_DATA_PLANE", "auto")
    built = "installed" if dataplane.compiled_module() is not None else "not installed"
    return f"data plane: {choice} (the compiled module jvpn_dataplane is {built})"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``long`` tests (many minutes) run only when asked for: ``-m long`` (make test-long)."""
    if "long" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="a long run: make test-long (pytest -m long)")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)


def _start_server() -> RedisServer:
    try:
        return RedisServer().start()
    except RedisServerMissing as exc:
        pytest.fail(f"{exc}\nThe integration tests need a real redis-server.", pytrace=False)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh redis-server owned by this test (stopped and removed after it)."""
    server = _start_server()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def _shared_redis_url() -> Iterator[str]:
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    server = _start_server()
    try:
        yield server.url
    finally:
        server.close()


@pytest.fixture
def redis_url(_shared_redis_url: str) -> str:
    """URL of the shared redis-server, its database flushed for this test."""
    flush(_shared_redis_url)
    return _shared_redis_url


@pytest.fixture
async def session_store(redis_url: str) -> AsyncIterator[SessionStore]:
    """A SessionStore on the flushed shared server."""
    store = SessionStore(redis_url, registry_key=TEST_REGISTRY_KEY)
    try:
        yield store
    finally:
        await store.close()
