"""Admin HTTP (aiohttp): /metrics, /healthz, /readyz, plus routes the caller adds.

/healthz answers while the process runs (liveness). /readyz asks the node's
``ready()`` (e.g. "can I reach the store?") and answers 503 with the reason
when it says no, raises or does not answer in time: fail closed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.metrics import Metrics

log = logging.getLogger("jvpn.admin")

READY_TIMEOUT_S = 2.0

ReadyCheck = Callable[[], Awaitable[tuple[bool, str]]]
CleanupCtx = Callable[[web.Application], AsyncIterator[None]]

METRICS_KEY = web.AppKey("metrics", Metrics)
READY_KEY: web.AppKey[ReadyCheck] = web.AppKey("ready")


async def _metrics(request: web.Request) -> web.Response:
    metrics = request.app[METRICS_KEY]
    # Collection is in-memory and cheap (counters, one callback): no executor needed.
    body = generate_latest(metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def _readyz(request: web.Request) -> web.Response:
    ready = request.app[READY_KEY]
    try:
        ok, reason = await asyncio.wait_for(ready(), READY_TIMEOUT_S)
    except TimeoutError:
        ok, reason = False, f"readiness check timed out after {READY_TIMEOUT_S}s"
    except Exception as exc:
        log.exception("readiness check failed")
        ok, reason = False, f"readiness check failed: {exc.__class__.__name__}"
    return web.json_response({"ready": ok, "reason": reason}, status=200 if ok else 503)


def make_admin_app(
    metrics: Metrics,
    ready: ReadyCheck,
    extra_routes: Iterable[web.AbstractRouteDef] | None = None,
    cleanup_ctx: Iterable[CleanupCtx] = (),
) -> web.Application:
    """The admin aiohttp application; background work goes in ``cleanup_ctx``."""
    app = web.Application()
    app[METRICS_KEY] = metrics
    app[READY_KEY] = ready
    app.add_routes(
        [
            web.get("/metrics", _metrics),
            web.get("/healthz", _healthz),
            web.get("/readyz", _readyz),
        ]
    )
    if extra_routes:
        app.add_routes(extra_routes)
    app.cleanup_ctx.extend(cleanup_ctx)
    return app


async def start_admin(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Serve ``app`` on host:port (port 0 picks a free one; see ``bound_port``)."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The TCP port the admin server actually listens on."""
    return int(runner.addresses[0][1])


async def stop_admin(runner: web.AppRunner) -> None:
    """Stop serving and run the app's cleanup contexts."""
    await runner.cleanup()
