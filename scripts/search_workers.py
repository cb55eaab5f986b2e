"""tool_executor and ingestion in ONE process sharing one QdrantClient (Qdrant local mode is single-process).

Started by the local stack when QDRANT_URL is empty. Each app keeps its own settings, consumers and ops
server: THREADLINE_TOOL_EXECUTOR_PORT and THREADLINE_INGESTION_PORT give their ops ports. With a Qdrant
server the two run as separate processes (`python -m tool_executor`, `python -m ingestion`) instead.
"""

import asyncio
import contextlib
import inspect
import os
import sys
import traceback
from collections.abc import Callable, Coroutine
from typing import Any

from qdrant_client import QdrantClient

from ingestion.app import run as run_ingestion
from ingestion.settings import IngestionSettings
from threadline_core.logging import configure_logging
from threadline_search.index import open_qdrant
from tool_executor.app import run as run_tool_executor
from tool_executor.settings import ToolExecutorSettings


def _call(run: Callable[..., Coroutine[Any, Any, None]], settings: Any,
          qdrant: QdrantClient) -> Coroutine[Any, Any, None]:
    """run(settings, qdrant=client) when the app accepts an injected client, else run(settings)."""
    if "qdrant" in inspect.signature(run).parameters:
        return run(settings, qdrant=qdrant)
    return run(settings)


async def main() -> int:
    """Run both apps until SIGTERM/SIGINT (or one of them stops), then stop the other and exit."""
    tool_settings = ToolExecutorSettings(port=int(os.environ.get("THREADLINE_TOOL_EXECUTOR_PORT", "9102")))
    ingestion_settings = IngestionSettings(port=int(os.environ.get("THREADLINE_INGESTION_PORT", "9103")))
    configure_logging("search-workers", tool_settings.log_level)
    if not tool_settings.qdrant_url:
        os.makedirs(tool_settings.qdrant_path, exist_ok=True)
    qdrant = open_qdrant(tool_settings)
    try:
        tasks = [asyncio.create_task(_call(run_tool_executor, tool_settings, qdrant), name="tool_executor"),
                 asyncio.create_task(_call(run_ingestion, ingestion_settings, qdrant), name="ingestion")]
        # Both apps install SIGTERM/SIGINT handlers on the same loop; the last one wins, so when one app
        # returns (signal) or fails, the other is cancelled, which runs its graceful shutdown.
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        failed = [t for t in done if not t.cancelled() and t.exception() is not None]
        for task in failed:
            print(f"{task.get_name()} failed:", file=sys.stderr)
            traceback.print_exception(task.exception(), file=sys.stderr)
        return 1 if failed else 0
    finally:
        qdrant.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
