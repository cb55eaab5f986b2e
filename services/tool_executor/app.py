"""Wiring of the tool-executor service: runtime, sandbox, searcher, consumer, ops server."""

import contextlib
import ctypes
import functools
import logging
from typing import TYPE_CHECKING

from prometheus_client import Gauge

from threadline_core.kafka import project_of
from threadline_core.readiness import qdrant_url_ready
from threadline_core.runtime import ServiceRuntime
from threadline_core.topics import TOOL_REQUESTS
from threadline_sandbox import Isolation, Sandbox, stronger_or_equal
from tool_executor.handlers import Handlers
from tool_executor.repository import ToolRepository
from tool_executor.service import SearcherProvider, ToolService
from tool_executor.settings import ToolExecutorSettings

if TYPE_CHECKING:
    from qdrant_client import QdrantClient

CONSUMER_GROUP = "tool-executor"
_PR_SET_DUMPABLE = 4
_log = logging.getLogger(__name__)


async def create_sandbox(settings: ToolExecutorSettings) -> Sandbox:
    """The sandbox with the strongest isolation available (or the one asked for, if the host allows it)."""
    def build(isolation: Isolation | None) -> Sandbox:
        return Sandbox(scratch_root=settings.sandbox_dir or None, isolation=isolation,
                       max_concurrency=settings.max_concurrent_tool_calls,
                       max_per_tenant=settings.max_concurrent_tool_calls_per_project)

    sandbox = build(None)
    available = await sandbox.isolation()
    if settings.sandbox_isolation != "auto":
        wanted = Isolation(settings.sandbox_isolation)
        if not stronger_or_equal(available, wanted):
            raise RuntimeError(f"THREADLINE_SANDBOX_ISOLATION={wanted.value} but this host only allows "
                               f"{available.value} (namespaces need root or unprivileged user namespaces and a "
                               "seccomp profile that allows unshare)")
        sandbox = build(wanted)
        available = wanted
    if available is Isolation.PROCESS:
        _log.warning("code_interpreter sandbox without namespaces: code runs as this service's user, network "
                     "blocked in Python only; allow unshare (user namespaces) for real isolation")
        _harden_process()
    else:
        _log.info("code_interpreter sandbox isolation: %s", available.value)
    return sandbox


def _harden_process() -> None:
    """Make this process non-dumpable: code running as the same uid cannot read its memory or environment."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)


async def run(settings: ToolExecutorSettings, *, qdrant: "QdrantClient | None" = None) -> None:
    """Run until SIGTERM/SIGINT, then stop taking work, hand back or finish calls in hand, and exit.

    `qdrant`: a client shared with another app of the same process (Qdrant local mode is single-process);
    when None, file_search opens its own from QDRANT_URL / THREADLINE_QDRANT_PATH on first use.
    """
    sandbox = await create_sandbox(settings)
    searchers = SearcherProvider(settings, qdrant)
    try:
        async with ServiceRuntime(settings, "tool-executor") as runtime:
            runtime.add_readiness_check("qdrant", functools.partial(qdrant_url_ready, settings.qdrant_url))
            Gauge("threadline_sandbox_isolation", "Always 1: how code_interpreter sandboxes are isolated",
                  ["level"], registry=runtime.registry).labels(level=(await sandbox.isolation()).value).set(1)
            repository = ToolRepository(runtime.pool)
            service = ToolService(repository=repository, sandbox=sandbox, limits=settings.sandbox_limits(),
                                  searchers=searchers, input_max_bytes=settings.sandbox_input_max_mb << 20,
                                  output_max_chars=settings.code_output_max_chars,
                                  file_search_max_results=settings.file_search_max_results,
                                  file_search_token_budget=settings.file_search_token_budget,
                                  thread_store_wait_seconds=settings.file_search_thread_store_wait_seconds,
                                  session_idle_seconds=settings.code_session_idle_seconds,
                                  session_max_cells=settings.code_session_max_cells)
            handlers = Handlers(service=service, repository=repository, metrics=runtime.metrics.tools)
            consumer = await runtime.add_consumer(group_id=CONSUMER_GROUP, topics=[TOOL_REQUESTS],
                                                  handler=handlers.handle, independent_keys=True,
                                                  key_concurrency=settings.tool_request_concurrency,
                                                  tenant_of=project_of,
                                                  max_records=settings.fair_window_records)
            await runtime.serve_ops()
            try:
                await runtime.wait_for_stop()
            finally:
                await consumer.stop(grace=settings.shutdown_grace_seconds)
    finally:
        await searchers.close()
