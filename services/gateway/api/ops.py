"""Liveness, readiness and metrics of the gateway itself (no auth)."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.deps import RuntimeDep
from threadline_core.ops import readiness_response

router = APIRouter()


@router.get("/healthz", include_in_schema=False)
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz", include_in_schema=False)
async def readyz(runtime: RuntimeDep) -> JSONResponse:
    """Broker and database reachable."""
    return readiness_response(await runtime.readiness())


@router.get("/metrics", include_in_schema=False)
async def metrics(runtime: RuntimeDep) -> Response:
    """Prometheus metrics."""
    return Response(generate_latest(runtime.registry), media_type=CONTENT_TYPE_LATEST)
