"""Wiring of the ingestion service: runtime, embedder, Qdrant, the file and search consumers, ops server."""

import asyncio
import contextlib
import functools

from qdrant_client import QdrantClient

from ingestion.handlers import Handlers, SearchHandlers
from ingestion.repository import IngestionRepository
from ingestion.service import IngestionService, UnstartedRequestResender
from ingestion.settings import IngestionSettings
from threadline_core.kafka import project_of
from threadline_core.readiness import qdrant_url_ready
from threadline_core.runtime import ServiceRuntime
from threadline_core.topics import INGESTION_REQUESTS, SEARCH_REQUESTS
from threadline_search.embeddings import close_embedder, create_embedder
from threadline_search.index import ChunkIndex, open_qdrant
from threadline_search.parsing import ParserPool

CONSUMER_GROUP = "ingestion"
SEARCH_CONSUMER_GROUP = "search"
"""Its own group: a file being parsed for minutes never delays a search; every instance shares the requests."""


async def run(settings: IngestionSettings, *, qdrant: QdrantClient | None = None) -> None:
    """Run until SIGTERM/SIGINT, then stop taking work, commit offsets and exit.

    `qdrant`: a client shared with another app of the same process (Qdrant local mode is single-process);
    when None the service opens (and closes) its own from QDRANT_URL / THREADLINE_QDRANT_PATH.
    """
    own_client = qdrant is None
    client = qdrant if qdrant is not None else open_qdrant(settings)
    embedder = await create_embedder(settings)
    parsers = ParserPool(workers=settings.ingestion_parse_workers, limits=settings.parse_limits())
    warm: asyncio.Task[None] | None = None
    try:
        index = ChunkIndex(client, settings.qdrant_collection)
        index.ensure(embedder.dim)
        async with ServiceRuntime(settings, "ingestion") as runtime:
            runtime.add_readiness_check("qdrant", functools.partial(qdrant_url_ready, settings.qdrant_url))
            repository = IngestionRepository(runtime.pool)
            service = IngestionService(repository=repository, index=index, embedder=embedder, parsers=parsers,
                                       metrics=runtime.metrics.ingestion,
                                       embed_batch_size=settings.embeddings_batch_size,
                                       max_attempts=settings.ingestion_max_attempts, owner=runtime.instance_id,
                                       keyword_weight=settings.file_search_keyword_weight)
            if settings.ingestion_warm_up:
                warm = asyncio.create_task(parsers.warm_up(), name="ingestion-warm-up")
            handlers = Handlers(service)
            # Each file in its own task: a file parsing for minutes holds up only that file's later commands.
            await runtime.add_consumer(group_id=CONSUMER_GROUP, topics=[INGESTION_REQUESTS], handler=handlers.handle,
                                       independent_keys=True, key_concurrency=settings.ingestion_file_concurrency,
                                       key_of=Handlers.ordering_key, tenant_of=project_of,
                                       max_records=settings.fair_window_records)
            search = SearchHandlers(service, runtime.producer, runtime.metrics.search_served)
            await runtime.add_consumer(group_id=SEARCH_CONSUMER_GROUP, topics=[SEARCH_REQUESTS], handler=search.handle,
                                       independent_keys=True, key_concurrency=settings.search_concurrency)
            resender = UnstartedRequestResender(repository=repository,
                                                older_than_seconds=settings.unclaimed_ingestion_seconds,
                                                interval_seconds=settings.unclaimed_sweep_interval_seconds(),
                                                resent=runtime.metrics.ingestion.requests_resent)
            await resender.start()
            runtime.on_shutdown(resender.stop)
            await runtime.serve_ops()
            await runtime.wait_for_stop()
    finally:
        if warm is not None and not warm.done():
            warm.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await warm
        await parsers.close()
        await close_embedder(embedder)
        if own_client:
            client.close()
