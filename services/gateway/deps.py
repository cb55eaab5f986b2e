"""FastAPI dependencies: the runtime's resources and the caller's project, as Annotated aliases.

All are `async def`: FastAPI runs plain `def` dependencies in a worker thread, which costs more than they do.
Each reads `request.app.state` directly instead of depending on another dependency: FastAPI resolves every
dependency per request, so a chain costs per link on every call.
"""

from dataclasses import dataclass
from typing import Annotated

import asyncpg
from fastapi import Depends, Request

from gateway.errors import ApiError
from gateway.settings import GatewaySettings
from threadline_core.replies import ReplyClient
from threadline_core.runtime import ServiceRuntime


@dataclass(frozen=True)
class Caller:
    """Who is calling: the project their API key belongs to."""

    project_id: str


async def get_runtime(request: Request) -> ServiceRuntime:
    """The runtime the lifespan started."""
    runtime: ServiceRuntime = request.app.state.runtime
    return runtime


async def get_settings(request: Request) -> GatewaySettings:
    """The gateway settings."""
    settings: GatewaySettings = request.app.state.settings
    return settings


async def get_pool(request: Request) -> asyncpg.Pool:
    """The database pool."""
    runtime: ServiceRuntime = request.app.state.runtime
    return runtime.pool


async def get_search(request: Request) -> ReplyClient:
    """The Kafka request/reply client that asks the ingestion service to search (the lifespan owns it)."""
    search: ReplyClient = request.app.state.search
    return search


async def get_models(request: Request) -> ReplyClient:
    """The Kafka request/reply client that asks the run orchestrator for the model endpoint's models."""
    models: ReplyClient = request.app.state.models
    return models


async def get_caller(request: Request) -> Caller:
    """Authenticate `Authorization: Bearer <key>` and map it to a project."""
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise ApiError(401, "You didn't provide an API key. You need to provide your API key in an "
                       "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                       code=None)
    project = request.app.state.api_keys.get(key.strip())
    if project is None:
        raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
    return Caller(project_id=project)


RuntimeDep = Annotated[ServiceRuntime, Depends(get_runtime)]
SettingsDep = Annotated[GatewaySettings, Depends(get_settings)]
PoolDep = Annotated[asyncpg.Pool, Depends(get_pool)]
SearchDep = Annotated[ReplyClient, Depends(get_search)]
ModelsDep = Annotated[ReplyClient, Depends(get_models)]
CallerDep = Annotated[Caller, Depends(get_caller)]
