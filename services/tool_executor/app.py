"""Wiring of the tool-executor service: runtime, sandbox, searcher, consumer, ops server."""

import functools
import logging
from typing import TYPE_CHECKING

from threadline_core.readiness import qdrant_url_ready
from threadline_core.runtime import ServiceRuntime
from threadline_core.topics import TOOL_REQUESTS
from threadline_sandbox import Isolation, Sandbox
from tool_executor.handlers import Handlers
from tool_executor.repository import ToolRepository
from tool_executor.service import SearcherProvider, ToolService
from tool_executor.settings import ToolExecutorSettings

if TYPE_CHECKING:
    from qdrant_client import QdrantClient

CONSUMER_GROUP = "tool-executor"
_log = logging.getLogger(__name__)


async def run(settings: ToolExecutorSettings, *, qdrant: "QdrantClient | None" = None) -> None:
    """Run until SIGTERM/SIGINT, then stop taking work, hand back or finish calls in hand, and exit.

    `qdrant`: a client shared with another app of the same process (Qdrant local mode is single-process);
    when None, file_search opens its own from QDRANT_URL / THREADLINE_QDRANT_PATH on first use.
    """
    isolation = None if settings.sandbox_isolation == "auto" else Isolation(settings.sandbox_isolation)
    sandbox = Sandbox(scratch_root=settings.sandbox_dir or None, isolation=isolation,
                      max_concurrency=settings.max_concurrent_tool_calls)
    searchers = SearcherProvider(settings, qdrant)
    try:
        async with ServiceRuntime(settings, "tool-executor") as runtime:
            runtime.add_readiness_check("qdrant", functools.partial(qdrant_url_ready, settings.qdrant_url))
            _log.info("code_interpreter sandbox isolation: %s", (await sandbox.isolation()).value)
            repository = ToolRepository(runtime.pool)
            service = ToolService(repository=repository, sandbox=sandbox, limits=settings.sandbox_limits(),
                                  searchers=searchers, input_max_bytes=settings.sandbox_input_max_mb << 20,
                                  output_max_chars=settings.code_output_max_chars,
                                  file_search_max_results=settings.file_search_max_results)
            handlers = Handlers(service=service, repository=repository, metrics=runtime.metrics.tools)
            consumer = await runtime.add_consumer(group_id=CONSUMER_GROUP, topics=[TOOL_REQUESTS],
                                                  handler=handlers.handle, independent_partitions=True)
            await runtime.serve_ops()
            try:
                await runtime.wait_for_stop()
            finally:
                await consumer.stop(grace=settings.shutdown_grace_seconds)
    finally:
        await searchers.close()
