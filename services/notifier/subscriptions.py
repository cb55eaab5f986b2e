"""Which event types each project's enabled webhook endpoints want, cached and kept fresh by NOTIFY.

Most events have no subscribed endpoint; with this cache they cost no database work and no body.
Rule: an endpoint whose registration committed before an event occurred gets that event. Its NOTIFY
(trigger of migration 0006) may still be on the way when the event is handled, so the cache is
trusted for an event only after a round trip on the LISTEN connection (a barrier) answered after the
event occurred, by the database clock that also stamps `created_ts`, or sent after the event arrived
here (so after it occurred, whatever the clocks say): Postgres sends an idle session its pending
notifications before the answer. One barrier covers every event that occurred before it, and
concurrent handlers share the one in flight. Without a live LISTEN connection nothing is cached
and every event takes the database path.
"""

import asyncio
import contextlib
import logging
import math
from datetime import datetime

import asyncpg

from notifier import repository as repo
from threadline_core.db import connect

_log = logging.getLogger(__name__)


class Subscriptions:
    """Per-project subscribed event types; `may_match` is False only when no endpoint can want the event."""

    def __init__(self, *, pool: asyncpg.Pool, dsn: str, barrier_timeout: float = 2.0,
                 reconnect_seconds: float = 1.0, max_projects: int = 10_000) -> None:
        self._pool = pool
        self._dsn = dsn
        self._barrier_timeout = barrier_timeout
        self._reconnect_seconds = reconnect_seconds
        self._max_projects = max_projects
        self._conn: asyncpg.Connection | None = None
        self._types: dict[str, frozenset[str]] = {}
        self._changes = 0  # NOTIFYs and reconnections seen: a load that overlapped one is not cached
        self._covered = -math.inf  # database time of the latest barrier answered on this connection
        self._barrier: asyncio.Task[int] | None = None
        self._barriers_sent = 0  # barriers whose request went out on the LISTEN connection
        self._connector: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def listening(self) -> bool:
        """True while the LISTEN connection is up (the cache is in use)."""
        return self._conn is not None

    async def start(self) -> None:
        """Listen now if the database answers (else keep trying in the background; meanwhile no caching)."""
        self._reconnect()
        assert self._connector is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._connector), self._barrier_timeout)

    async def stop(self) -> None:
        """Stop listening; later events take the database path."""
        self._closed = True
        tasks = [task for task in (self._connector, self._barrier) if task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.close(timeout=2)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                conn.terminate()

    async def may_match(self, project_id: str, event_type: str, occurred_at: datetime) -> bool:
        """False only if no enabled endpoint of the project that existed when the event occurred wants it."""
        conn = self._conn
        if conn is None:
            return True
        types = self._types.get(project_id)
        if types is not None:
            if event_type in types:
                return True  # the deliveries' own query decides (status, created_ts)
            if not await self._settled(conn, occurred_at.timestamp()):
                return True
            types = self._types.get(project_id)  # a NOTIFY received before the barrier's answer dropped it
        if types is None:
            types = await self._load(conn, project_id)
        return event_type in types

    async def _load(self, conn: asyncpg.Connection, project_id: str) -> frozenset[str]:
        """Read the project's subscriptions (after LISTEN began); cache them unless a NOTIFY came meanwhile."""
        changes = self._changes
        async with self._pool.acquire() as db:
            types = await repo.subscribed_types(db, project_id)
        if changes == self._changes and conn is self._conn:
            if len(self._types) >= self._max_projects:
                self._types.clear()
            self._types[project_id] = types
        return types

    async def _settled(self, conn: asyncpg.Connection, occurred: float) -> bool:
        """Wait for a barrier that covers an event that occurred at `occurred`; False if the connection failed."""
        arrived = self._barriers_sent
        while self._covered < occurred:
            task = self._barrier
            if task is None:
                task = self._barrier = asyncio.create_task(self._round_trip(conn), name="webhook-barrier")
            try:
                number = await asyncio.shield(task)
            except Exception:
                return False
            if conn is not self._conn:
                return False
            if number > arrived:
                return True  # sent after the event arrived, so after it occurred (clocks may disagree)
        return True

    async def _round_trip(self, conn: asyncpg.Connection) -> int:
        """Send a barrier; its number in sending order (every event that arrived before has a smaller one)."""
        self._barriers_sent += 1
        number = self._barriers_sent
        try:
            async with asyncio.timeout(self._barrier_timeout):
                answered = await repo.barrier(conn)
        except Exception:
            _log.warning("webhook subscriptions: LISTEN connection failed; reconnecting", exc_info=True)
            conn.terminate()
            self._lost(conn)
            raise
        finally:
            if self._barrier is asyncio.current_task():
                self._barrier = None
        if conn is self._conn:
            self._covered = max(self._covered, answered)
        return number

    def _on_change(self, _conn: object, _pid: int, _channel: str, project_id: object) -> None:
        self._types.pop(str(project_id), None)
        self._changes += 1

    def _on_terminated(self, conn: object) -> None:
        self._lost(conn)

    def _lost(self, conn: object) -> None:
        """Notifications may have been missed: forget everything and listen again."""
        if conn is not self._conn or self._closed:
            return
        self._conn = None
        self._barrier = None  # its waiters see the connection change; the next connection has its own barriers
        self._types.clear()
        self._changes += 1
        self._covered = -math.inf
        self._reconnect()

    def _reconnect(self) -> None:
        if not self._closed and (self._connector is None or self._connector.done()):
            self._connector = asyncio.create_task(self._connect(), name="webhook-subscriptions-listen")

    async def _connect(self) -> None:
        while not self._closed:
            conn: asyncpg.Connection | None = None
            try:
                conn = await connect(self._dsn)
                await conn.add_listener(repo.ENDPOINTS_CHANNEL, self._on_change)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                if conn is not None:
                    conn.terminate()
                _log.warning("webhook subscriptions: cannot LISTEN; retrying in %.1fs", self._reconnect_seconds,
                             exc_info=True)
                await asyncio.sleep(self._reconnect_seconds)
                continue
            conn.add_termination_listener(self._on_terminated)
            self._types.clear()
            self._changes += 1
            self._covered = -math.inf
            self._conn = conn
            return
