"""Admin HTTP on a real loopback port: /metrics, /healthz, /readyz, extra routes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from gateway import admin_http
from gateway.admin_http import bound_port, make_admin_app, start_admin, stop_admin
from gateway.metrics import Metrics


class Readiness:
    def __init__(self) -> None:
        self.state: tuple[bool, str] = (True, "ok")
        self.error: Exception | None = None
        self.hang = False

    async def __call__(self) -> tuple[bool, str]:
        if self.hang:
            await asyncio.sleep(3600)
        if self.error is not None:
            raise self.error
        return self.state


async def _info(request: web.Request) -> web.Response:
    return web.json_response({"node": request.app[admin_http.METRICS_KEY].node})


@pytest.fixture
async def admin() -> AsyncIterator[tuple[str, Metrics, Readiness, list[str]]]:
    metrics = Metrics("node-admin", lambda: {"ATTACHED": 3})
    ready = Readiness()
    lifecycle: list[str] = []

    async def background(app: web.Application) -> AsyncIterator[None]:
        lifecycle.append("start")
        yield
        lifecycle.append("stop")

    app = make_admin_app(
        metrics, ready, extra_routes=[web.get("/info", _info)], cleanup_ctx=[background]
    )
    runner = await start_admin(app, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{bound_port(runner)}", metrics, ready, lifecycle
    finally:
        await stop_admin(runner)
    assert lifecycle == ["start", "stop"]


async def test_metrics_endpoint(admin) -> None:
    base, metrics, _, lifecycle = admin
    assert lifecycle == ["start"]
    metrics.rx_packets += 7
    metrics.reattach("ok", "", 0.002)
    async with aiohttp.ClientSession() as http, http.get(base + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        assert "version=" in resp.headers["Content-Type"]
        text = await resp.text()
    assert 'jvpn_packets_total{direction="rx"} 7.0' in text
    assert 'jvpn_sessions{state="ATTACHED"} 3.0' in text
    assert 'jvpn_node_info{node="node-admin"' in text
    assert "jvpn_reattach_latency_seconds_bucket" in text


async def test_healthz_and_readyz(admin) -> None:
    base, _, ready, _ = admin
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/healthz") as resp:
            assert resp.status == 200 and (await resp.text()).strip() == "ok"
        async with http.get(base + "/readyz") as resp:
            assert resp.status == 200
            assert await resp.json() == {"ready": True, "reason": "ok"}

        ready.state = (False, "store unreachable: connection refused")
        async with http.get(base + "/readyz") as resp:
            assert resp.status == 503
            body = await resp.json()
            assert body == {"ready": False, "reason": "store unreachable: connection refused"}
        async with http.get(base + "/healthz") as resp:
            assert resp.status == 200  # liveness is independent of readiness

        ready.error = RuntimeError("boom")
        async with http.get(base + "/readyz") as resp:
            assert resp.status == 503
            assert "RuntimeError" in (await resp.json())["reason"]


async def test_readyz_times_out_closed(admin, monkeypatch: pytest.MonkeyPatch) -> None:
    base, _, ready, _ = admin
    monkeypatch.setattr(admin_http, "READY_TIMEOUT_S", 0.1)
    ready.hang = True
    async with aiohttp.ClientSession() as http, http.get(base + "/readyz") as resp:
        assert resp.status == 503
        assert "timed out" in (await resp.json())["reason"]


async def test_extra_routes_and_unknown_path(admin) -> None:
    base, _, _, _ = admin
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/info") as resp:
            assert await resp.json() == {"node": "node-admin"}
        async with http.get(base + "/nope") as resp:
            assert resp.status == 404


async def test_port_in_use_is_reported() -> None:
    metrics = Metrics("x", process_metrics=False)

    async def ready() -> tuple[bool, str]:
        return True, "ok"

    first = await start_admin(make_admin_app(metrics, ready), "127.0.0.1", 0)
    try:
        with pytest.raises(OSError):
            # reuse_address does not allow two listeners on one port
            await start_admin(make_admin_app(metrics, ready), "127.0.0.1", bound_port(first))
    finally:
        await stop_admin(first)
