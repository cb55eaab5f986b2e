"""tool_executor and ingestion in ONE process sharing one QdrantClient (Qdrant local mode is single-process).

Started by the local stack when QDRANT_URL is empty. Each app keeps its own settings, consumers and ops
server: THREADLINE_TOOL_EXECUTOR_PORT and THREADLINE_INGESTION_PORT give their ops ports. With a Qdrant
server the two run as separate processes (`python -m tool_executor`, `python -m ingestion`) instead.
"""

import asyncio
import contextlib
import inspect
import logging
import os
import sys
import traceback
import uuid
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


class _SharedSignals:
    """Both apps register SIGTERM/SIGINT handlers on one loop; asyncio keeps only the last, so fan out."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.received = False
        self._loop = loop
        self._register = loop.add_signal_handler
        self._callbacks: dict[int, list[tuple[Callable[..., object], tuple[object, ...]]]] = {}
        loop.add_signal_handler = self._add  # type: ignore[method-assign]

    def _add(self, sig: int, callback: Callable[..., object], *args: object) -> None:
        if sig not in self._callbacks:
            self._callbacks[sig] = []
            self._register(sig, self._dispatch, sig)
        self._callbacks[sig].append((callback, args))

    def _dispatch(self, sig: int) -> None:
        self.received = True
        for callback, args in list(self._callbacks.get(sig, [])):
            callback(*args)


async def main() -> int:
    """Run both apps until SIGTERM/SIGINT; if one of them ends on its own, stop the other and exit."""
    instance = os.environ.get("THREADLINE_INSTANCE_ID") or f"search-workers-{uuid.uuid4().hex[:8]}"
    tool_settings = ToolExecutorSettings(port=int(os.environ.get("THREADLINE_TOOL_EXECUTOR_PORT", "9102")),
                                         instance_id=f"{instance}-tool-executor")
    ingestion_settings = IngestionSettings(port=int(os.environ.get("THREADLINE_INGESTION_PORT", "9103")),
                                           instance_id=f"{instance}-ingestion")
    configure_logging("search-workers", tool_settings.log_level)
    signals = _SharedSignals(asyncio.get_running_loop())
    if not tool_settings.qdrant_url:
        os.makedirs(tool_settings.qdrant_path, exist_ok=True)
    qdrant = open_qdrant(tool_settings)
    try:
        tasks = [asyncio.create_task(_call(run_tool_executor, tool_settings, qdrant), name="tool_executor"),
                 asyncio.create_task(_call(run_ingestion, ingestion_settings, qdrant), name="ingestion")]
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if pending and signals.received:  # both were told to stop: let the other finish its shutdown
            grace = tool_settings.shutdown_grace_seconds + 2
            done_later, pending = await asyncio.wait(pending, timeout=grace)
            done |= done_later
        for task in pending:  # the other one ended by itself (crash): stop this one too
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


def _exit_now(code: int) -> None:
    """Both apps have shut down gracefully: exit without joining leftover executor threads.

    asyncio.run (and the interpreter at exit) would otherwise wait for blocking work still running in
    the default executor, such as a model warm-up, which cannot be interrupted.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        exit_code = loop.run_until_complete(main())
    except KeyboardInterrupt:
        exit_code = 130
    _exit_now(exit_code)
