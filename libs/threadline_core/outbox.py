"""Transactional outbox: events are committed with the state change, then relayed to Kafka."""

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime

import asyncpg
from aiokafka import AIOKafkaProducer
from asyncpg.pool import PoolConnectionProxy

from threadline_core.db import connect
from threadline_core.events import EventEnvelope
from threadline_core.metrics import ServiceMetrics

NOTIFY_CHANNEL = "threadline_outbox"
RELEASED_CHANNEL = "threadline_outbox_relay"
"""Notified when a leader lets go, so another relay takes over at once instead of at its next sweep."""
_RELAY_LOCK = 7_254_311_002
_log = logging.getLogger(__name__)

_INSERT = ("WITH added AS (INSERT INTO events (event_id, topic, key, type, project_id, thread_id, run_id, occurred_at,"
           " envelope) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)) SELECT pg_notify($10, '')")
# The published value is the stored envelope with `sequence` set, serialised by Postgres: no JSON work here.
_PENDING = ("SELECT seq, topic, key, convert_to(jsonb_set(envelope, '{sequence}', to_jsonb(seq))::text, 'UTF8')"
            " AS value, occurred_at FROM events WHERE published_at IS NULL ORDER BY seq LIMIT $1")
_MARK = "UPDATE events SET published_at = now() WHERE seq = ANY($1::bigint[])"


async def append_events(conn: asyncpg.Connection | PoolConnectionProxy, topic: str,
                        envelopes: Sequence[EventEnvelope]) -> None:
    """Add events to the outbox inside the caller's transaction (one round trip); relays wake when it commits."""
    await append_outbox(conn, [(topic, e) for e in envelopes])


async def append_outbox(conn: asyncpg.Connection | PoolConnectionProxy,
                        items: Sequence[tuple[str, EventEnvelope]]) -> None:
    """`append_events` for (topic, envelope) pairs of several topics, in one round trip, in this order.

    The NOTIFY rides along with each row; Postgres folds identical notifications of a transaction into one.
    """
    if not items:
        return
    await conn.executemany(
        _INSERT,
        [(e.event_id, topic, e.key, e.type, e.project_id, e.thread_id, e.run_id, e.occurred_at,
          e.model_dump(mode="json"), NOTIFY_CHANNEL) for topic, e in items],
    )


class OutboxRelay:
    """Publishes committed outbox rows in `seq` order; one relay per database (the leader) does the work.

    Every process that writes events runs one. The leader holds a session advisory lock on its own
    connection, LISTENs for commits and publishes every pending row (of any process), marking rows
    published after Kafka acknowledged them. The others stay quiet and try to take over every
    `sweep_interval` (or at once when a leader lets go), so a commit costs one relay's work instead
    of one per process. A crashed leader's session ends and its lock with it; a stopping leader
    publishes what is pending first. The leader also sweeps every `sweep_interval` (safety net).
    """

    def __init__(self, *, pool: asyncpg.Pool, producer: AIOKafkaProducer, dsn: str,
                 metrics: ServiceMetrics | None = None, batch_size: int = 500,
                 sweep_interval: float = 1.0) -> None:
        self._pool = pool  # kept for API compatibility; the relay uses its own connection
        self._producer = producer
        self._dsn = dsn
        self._metrics = metrics
        self._batch_size = batch_size
        self._sweep_interval = sweep_interval
        self._wake = asyncio.Event()
        self._stopping = False
        self._conn: asyncpg.Connection | None = None
        self._leader = False
        self._draining = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    @property
    def leader(self) -> bool:
        """True while this relay is the one publishing."""
        return self._leader

    async def start(self) -> None:
        """Connect, try to lead, and start relaying (or waiting to take over)."""
        await self._connect()
        self._wake.set()
        self._task = asyncio.create_task(self._loop(), name="outbox-relay")

    async def stop(self) -> None:
        """Publish what is pending (if leading, or if nobody else leads), let go, then stop."""
        self._stopping = True
        self._wake.set()
        if self._task:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._release()

    async def _connect(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._leader = False
            self._conn = await connect(self._dsn)
            await self._conn.add_listener(RELEASED_CHANNEL, self._on_released)
        return self._conn

    def _on_notify(self, *_: object) -> None:
        self._wake.set()

    def _on_released(self, *_: object) -> None:
        if not self._leader:
            self._wake.set()

    async def _lead(self) -> bool:
        """Become the leader if nobody is; start listening for commits when we do."""
        conn = await self._connect()
        if not self._leader and await conn.fetchval("SELECT pg_try_advisory_lock($1)", _RELAY_LOCK):
            await conn.add_listener(NOTIFY_CHANNEL, self._on_notify)
            self._leader = True
            _log.info("outbox relay is the leader")
        return self._leader

    async def _release(self) -> None:
        """Let go of the lead (telling the others) and close the connection."""
        conn, self._conn = self._conn, None
        if conn is None or conn.is_closed():
            self._leader = False
            return
        try:
            if self._leader:
                self._leader = False
                await conn.execute("SELECT pg_advisory_unlock($1), pg_notify($2, '')", _RELAY_LOCK, RELEASED_CHANNEL)
            await conn.close(timeout=5)
        except (OSError, asyncpg.PostgresError, TimeoutError):
            conn.terminate()

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._sweep_interval)
            self._wake.clear()
            try:
                await self.drain()
            except Exception as exc:
                _log.exception("outbox relay failed; retrying")
                if isinstance(exc, (OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError)) or (
                        self._conn is not None and self._conn.is_closed()):
                    conn, self._conn, self._leader = self._conn, None, False  # lost the session: lead again later
                    if conn is not None:
                        conn.terminate()
                if self._stopping:
                    return
                await asyncio.sleep(0.5)
                self._wake.set()
                continue
            if self._stopping:
                return

    async def drain(self) -> int:
        """Publish every unpublished row if this relay leads (or can take the lead now); return how many."""
        async with self._draining:
            if not await self._lead():
                return 0
            assert self._conn is not None
            total = 0
            while True:
                rows = await self._conn.fetch(_PENDING, self._batch_size)
                if not rows:
                    return total
                futures = [await self._producer.send(row["topic"], row["value"], key=row["key"].encode())
                           for row in rows]
                await asyncio.gather(*futures)
                await self._conn.execute(_MARK, [row["seq"] for row in rows])
                self._observe(rows)
                total += len(rows)
                if len(rows) < self._batch_size:
                    return total

    def _observe(self, rows: list[asyncpg.Record]) -> None:
        if not self._metrics:
            return
        now = time.time()
        for row in rows:
            self._metrics.events_produced.labels(topic=row["topic"]).inc()
            occurred: datetime = row["occurred_at"]
            if occurred.tzinfo is None:
                occurred = occurred.replace(tzinfo=UTC)
            self._metrics.outbox_publish_seconds.observe(max(0.0, now - occurred.timestamp()))
