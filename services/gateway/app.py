"""Wiring of the gateway: the runtime in the lifespan, error handlers, routers."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from gateway.api import ops
from gateway.errors import install_error_handlers
from gateway.settings import GatewaySettings
from threadline_core.runtime import ServiceRuntime


def create_app(settings: GatewaySettings) -> FastAPI:
    """Build the ASGI app; the lifespan owns the pool, producer and relay."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with ServiceRuntime(settings, "gateway") as runtime:
            app.state.runtime = runtime
            yield

    app = FastAPI(title="Threadline", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.api_keys = settings.key_to_project()
    install_error_handlers(app)
    app.include_router(ops.router)
    # Public API routers (prefix /v1) are included below, one line each.
    return app
