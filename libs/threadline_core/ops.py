"""The small HTTP server every non-HTTP service runs: /healthz, /readyz and /metrics."""

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

ReadinessCheck = Callable[[], Awaitable[dict[str, bool]]]


def ops_routes(registry: CollectorRegistry, readiness: ReadinessCheck) -> list[Route]:
    """Routes for liveness, readiness (every dependency reachable) and Prometheus metrics."""

    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(_: Request) -> Response:
        checks = await readiness()
        ready = all(checks.values())
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    async def metrics(_: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return [Route("/healthz", healthz), Route("/readyz", readyz), Route("/metrics", metrics)]


class _EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the service it is embedded in."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class OpsServer:
    """Serves the ops routes on host:port in the background of a worker service."""

    def __init__(self, *, host: str, port: int, registry: CollectorRegistry, readiness: ReadinessCheck) -> None:
        config = uvicorn.Config(Starlette(routes=ops_routes(registry, readiness)), host=host, port=port,
                                log_level="warning", access_log=False, lifespan="off")
        self._server = _EmbeddedServer(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start serving."""
        self._task = asyncio.create_task(self._server.serve(), name="ops-server")

    async def stop(self) -> None:
        """Stop serving."""
        self._server.should_exit = True
        if self._task:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
