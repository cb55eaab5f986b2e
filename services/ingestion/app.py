"""Wiring of the ingestion service: runtime, embedder, Qdrant, consumer, ops server (+ internal search)."""

import asyncio
import contextlib
import functools
import socket

from qdrant_client import QdrantClient

from ingestion.handlers import Handlers
from ingestion.internal import internal_routes
from ingestion.repository import IngestionRepository
from ingestion.service import IngestionService
from ingestion.settings import IngestionSettings
from threadline_core.readiness import qdrant_url_ready
from threadline_core.runtime import ServiceRuntime
from threadline_core.topics import INGESTION_REQUESTS
from threadline_search.embeddings import TokenCounter, close_embedder, create_embedder
from threadline_search.index import ChunkIndex, open_qdrant

CONSUMER_GROUP = "ingestion"


def advertised_url(settings: IngestionSettings) -> str:
    """Where the gateway reaches this instance's ops server."""
    if settings.search_advertised_url:
        return settings.search_advertised_url.rstrip("/")
    host = settings.host if settings.host not in ("", "0.0.0.0", "::") else socket.gethostname()
    return f"http://{host}:{settings.port}"


async def run(settings: IngestionSettings, *, qdrant: QdrantClient | None = None) -> None:
    """Run until SIGTERM/SIGINT, then stop taking work, commit offsets and exit.

    `qdrant`: a client shared with another app of the same process (Qdrant local mode is single-process);
    when None the service opens (and closes) its own from QDRANT_URL / THREADLINE_QDRANT_PATH.
    """
    own_client = qdrant is None
    client = qdrant if qdrant is not None else open_qdrant(settings)
    embedder = await create_embedder(settings)
    warm: asyncio.Task[None] | None = None
    try:
        index = ChunkIndex(client, settings.qdrant_collection)
        index.ensure(embedder.dim)
        tokens = await asyncio.to_thread(TokenCounter)
        async with ServiceRuntime(settings, "ingestion") as runtime:
            runtime.add_readiness_check("qdrant", functools.partial(qdrant_url_ready, settings.qdrant_url))
            repository = IngestionRepository(runtime.pool)
            service = IngestionService(repository=repository, index=index, embedder=embedder, tokens=tokens,
                                       metrics=runtime.metrics.ingestion,
                                       embed_batch_size=settings.embeddings_batch_size,
                                       max_attempts=settings.ingestion_max_attempts)
            if settings.ingestion_warm_up:
                warm = asyncio.create_task(service.warm_up(), name="ingestion-warm-up")
            handlers = Handlers(service)
            await runtime.add_consumer(group_id=CONSUMER_GROUP, topics=[INGESTION_REQUESTS], handler=handlers.handle)
            await runtime.serve_ops(routes=internal_routes(service))
            await repository.register_endpoint(runtime.instance_id, advertised_url(settings))
            try:
                await runtime.wait_for_stop()
            finally:
                with contextlib.suppress(Exception):
                    await repository.unregister_endpoint(runtime.instance_id)
    finally:
        if warm is not None and not warm.done():
            warm.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await warm
        await close_embedder(embedder)
        if own_client:
            client.close()
