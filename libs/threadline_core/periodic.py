"""A pass repeated in the background (retention, catch-ups, re-sends): one loop, one way to stop, one error policy."""

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from threadline_core.db import database_lost

_log = logging.getLogger(__name__)


class PeriodicPass:
    """Runs `run_pass` every `interval_seconds` in a task of its own; at once again while it returns True (more
    to do). A failed pass is logged, except during a database outage (every service already says so), and tried
    again at the next; `stop` cancels the pass in hand (each pass commits what it did in transactions)."""

    def __init__(self, name: str, run_pass: Callable[[], Awaitable[bool]], interval_seconds: float, *,
                 wait_first: bool = False) -> None:
        self._name = name
        self._run_pass = run_pass
        self._interval = interval_seconds
        self._wait_first = wait_first
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Repeat the pass in the background (after a first interval if `wait_first`)."""
        self._task = asyncio.create_task(self._loop(), name=self._name)

    async def stop(self) -> None:
        """Cancel the loop and wait for it to end."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        if self._wait_first:
            await asyncio.sleep(self._interval)
        while True:
            more = False
            try:
                more = await self._run_pass()
            except Exception as exc:
                if not database_lost(exc):
                    _log.exception("%s: the pass failed; tried again at the next one", self._name)
            await asyncio.sleep(0 if more else self._interval)
