"""Wiring of the gateway: the runtime in the lifespan, error handlers, routers."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from gateway.api import (
    assistants,
    files,
    messages,
    models,
    ops,
    runs,
    streams,
    threads,
    tool_outputs,
    uploads,
    vector_stores,
    webhooks,
)
from gateway.errors import install_error_handlers
from gateway.fanout import EventFanout
from gateway.http import BodyLimitMiddleware, RequestIdMiddleware
from gateway.settings import GatewaySettings
from gateway.uploads_service import ExpirySweeper
from threadline_core.ops import HttpMetricsMiddleware
from threadline_core.replies import ReplyClient
from threadline_core.runtime import ServiceRuntime
from threadline_core.topics import MODEL_REQUESTS, SEARCH_REPLIES, SEARCH_REQUESTS

MODELS_REPLY_SUFFIX = ".models"
"""The model client's replies carry the instance id with this suffix: the search client skips them undecoded."""


def create_app(settings: GatewaySettings) -> FastAPI:
    """Build the ASGI app; the lifespan owns the pool, producer, relay, SSE fan-out, search and model clients and the
    sweeper of expired uploads and files."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with ServiceRuntime(settings, "gateway") as runtime, \
                EventFanout(bootstrap=settings.kafka_bootstrap_servers, registry=runtime.registry,
                            queue_size=settings.sse_queue_size,
                            fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms) as fanout, \
                ReplyClient(bootstrap=settings.kafka_bootstrap_servers, producer=runtime.producer,
                            requests_topic=SEARCH_REQUESTS, replies_topic=SEARCH_REPLIES,
                            reply_to=runtime.instance_id, metrics=runtime.metrics.search_requests,
                            fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms) as search, \
                ReplyClient(bootstrap=settings.kafka_bootstrap_servers, producer=runtime.producer,
                            requests_topic=MODEL_REQUESTS, replies_topic=SEARCH_REPLIES,
                            reply_to=runtime.instance_id + MODELS_REPLY_SUFFIX,
                            metrics=runtime.metrics.model_requests,
                            fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms) as models_client, \
                ExpirySweeper(runtime.pool, settings.upload_sweep_interval_seconds):
            app.state.runtime = runtime
            app.state.fanout = fanout  # SSE: this instance's Kafka fan-out (gateway/fanout.py)
            app.state.search = search  # vector store search: Kafka request/reply with the ingestion service
            app.state.models = models_client  # GET /v1/models: Kafka request/reply with the run orchestrator
            yield

    # FastAPI's native OpenTelemetry is off: metrics are Prometheus (HttpMetricsMiddleware), and its per-request
    # check of the global providers costs on every call.
    # No slash redirects: the SDK follows a 307, so an update of the id "/" created a new thread.
    app = FastAPI(title="Threadline", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  telemetry={"tracing": False, "metrics": False, "logs": False}, redirect_slashes=False)
    app.state.settings = settings
    app.state.api_keys = settings.key_to_project()
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes,
                       overrides=[(prefix, settings.max_upload_bytes) for prefix in settings.upload_paths])
    app.add_middleware(RequestIdMiddleware)  # outside the body limit: its 413s have an id too
    app.add_middleware(HttpMetricsMiddleware)  # outermost: every response counted (413s too); path ids in logs
    # Routes are matched in order, router by router: the run and thread paths the SDK calls most come first.
    # runs before threads: POST /v1/threads/runs must not match /v1/threads/{thread_id}.
    app.include_router(runs.router)
    app.include_router(threads.router)
    app.include_router(messages.router)
    app.include_router(streams.router)
    app.include_router(tool_outputs.router)
    app.include_router(assistants.router)
    app.include_router(webhooks.router)
    app.include_router(files.router)
    app.include_router(uploads.router)
    app.include_router(vector_stores.router)
    app.include_router(models.router)
    app.include_router(ops.router)
    return app
