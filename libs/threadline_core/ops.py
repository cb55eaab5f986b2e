"""Ops endpoints: the small HTTP server of the worker services (/healthz, /readyz, /metrics) and the
HTTP-metrics middleware of the gateway."""

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from threadline_core.logging import request_log_context
from threadline_core.metrics import HttpMetrics, ServiceMetrics

ReadinessCheck = Callable[[], Awaitable[dict[str, bool]]]
MetricsResolver = Callable[[Scope], HttpMetrics | None]

UNMATCHED_ROUTE = "unmatched"
"""Route label of requests no route matched (404s for random paths must not create new series)."""


def readiness_response(checks: dict[str, bool]) -> JSONResponse:
    """/readyz: 200 when every check passes, else 503; the pid tells a probe it reached this very process."""
    ready = all(checks.values())
    return JSONResponse({"ready": ready, "checks": checks, "pid": os.getpid()}, status_code=200 if ready else 503)


def ops_routes(registry: CollectorRegistry, readiness: ReadinessCheck) -> list[Route]:
    """Routes for liveness, readiness (every dependency reachable) and Prometheus metrics."""

    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(_: Request) -> Response:
        return readiness_response(await readiness())

    async def metrics(_: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return [Route("/healthz", healthz), Route("/readyz", readyz), Route("/metrics", metrics)]


def _runtime_http_metrics(scope: Scope) -> HttpMetrics | None:
    """Default resolver: `app.state.runtime.metrics.http` (the gateway's ServiceRuntime), once it exists."""
    app = scope.get("app")
    runtime = getattr(getattr(app, "state", None), "runtime", None)
    metrics = getattr(runtime, "metrics", None)
    return metrics.http if isinstance(metrics, ServiceMetrics) else None


def route_label(scope: Scope) -> str:
    """The matched route's template (`/v1/threads/{thread_id}`), never the raw path."""
    route = scope.get("route")
    path = getattr(route, "path_format", None) or getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED_ROUTE


class HttpMetricsMiddleware:
    """Pure ASGI middleware: request count and latency by method, route template and status; and the
    ids in the request path (thread_id, run_id, ...) on every log line the request writes.

    Gateway: `app.add_middleware(HttpMetricsMiddleware)`; the metrics are found per request on
    `app.state.runtime.metrics` (created in the lifespan), or given with `metrics=` / `resolve=`.
    Latency is measured to the response headers, so a long SSE stream counts as the time to open it.
    """

    def __init__(self, app: ASGIApp, *, metrics: HttpMetrics | None = None,
                 resolve: MetricsResolver | None = None) -> None:
        self.app = app
        self._metrics = metrics
        self._resolve = resolve or _runtime_http_metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with request_log_context(scope):
            await self._observe(scope, receive, send)

    async def _observe(self, scope: Scope, receive: Receive, send: Send) -> None:
        metrics = self._metrics or self._resolve(scope)
        if metrics is None:
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status: list[int] = []

        def observe(code: int) -> None:
            labels: dict[str, Any] = {"method": scope["method"], "route": route_label(scope), "status": str(code)}
            metrics.requests.labels(**labels).inc()
            metrics.duration.labels(**labels).observe(time.perf_counter() - start)

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start" and not status:
                status.append(int(message["status"]))
                observe(status[0])
            await send(message)

        metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException:
            if not status:
                status.append(500)
                observe(500)
            raise
        finally:
            metrics.in_flight.dec()


class _EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the service it is embedded in."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class OpsServer:
    """Serves the ops routes on host:port in the background of a worker."""

    def __init__(self, *, host: str, port: int, registry: CollectorRegistry, readiness: ReadinessCheck) -> None:
        config = uvicorn.Config(Starlette(routes=ops_routes(registry, readiness)), host=host, port=port,
                                log_level="warning", access_log=False, lifespan="off", log_config=None)
        self._server = _EmbeddedServer(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start serving; returns once the port is bound (raises if it cannot be)."""
        self._task = asyncio.create_task(self._server.serve(), name="ops-server")
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("ops server exited before it started (port in use?)")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stop serving."""
        self._server.should_exit = True
        if self._task:
            with contextlib.suppress(asyncio.CancelledError, SystemExit):
                await self._task
