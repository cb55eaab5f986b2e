"""Transactional outbox: events are committed with the state change, then relayed to Kafka."""

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime

import asyncpg
from aiokafka import AIOKafkaProducer

from threadline_core.db import connect
from threadline_core.events import EventEnvelope
from threadline_core.metrics import ServiceMetrics

NOTIFY_CHANNEL = "threadline_outbox"
_RELAY_LOCK = 7_254_311_002
_log = logging.getLogger(__name__)


async def append_events(conn: asyncpg.Connection, topic: str, envelopes: Sequence[EventEnvelope]) -> None:
    """Add events to the outbox inside the caller's transaction; relays wake when it commits."""
    if not envelopes:
        return
    await conn.executemany(
        "INSERT INTO events (event_id, topic, key, type, project_id, thread_id, run_id, occurred_at, envelope)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        [(e.event_id, topic, e.key, e.type, e.project_id, e.thread_id, e.run_id, e.occurred_at,
          e.model_dump(mode="json")) for e in envelopes],
    )
    await conn.execute("SELECT pg_notify($1, '')", NOTIFY_CHANNEL)


class OutboxRelay:
    """Publishes committed outbox rows in order. Woken by NOTIFY, with a slow sweep as a safety net."""

    def __init__(self, *, pool: asyncpg.Pool, producer: AIOKafkaProducer, dsn: str,
                 metrics: ServiceMetrics | None = None, batch_size: int = 500,
                 sweep_interval: float = 1.0) -> None:
        self._pool = pool
        self._producer = producer
        self._dsn = dsn
        self._metrics = metrics
        self._batch_size = batch_size
        self._sweep_interval = sweep_interval
        self._wake = asyncio.Event()
        self._stopping = False
        self._listen_conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Listen for commits and start relaying."""
        self._listen_conn = await connect(self._dsn)
        await self._listen_conn.add_listener(NOTIFY_CHANNEL, self._on_notify)
        self._wake.set()
        self._task = asyncio.create_task(self._loop(), name="outbox-relay")

    async def stop(self) -> None:
        """Publish what is pending, then stop."""
        self._stopping = True
        self._wake.set()
        if self._task:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._listen_conn:
            await self._listen_conn.close()

    def _on_notify(self, *_: object) -> None:
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._sweep_interval)
            self._wake.clear()
            try:
                await self.drain()
            except Exception:
                _log.exception("outbox relay failed; retrying")
                await asyncio.sleep(0.5)
                self._wake.set()
                if self._stopping:
                    return
                continue
            if self._stopping:
                return

    async def drain(self) -> int:
        """Publish every unpublished row (if no other relay holds the lock); return how many."""
        total = 0
        while True:
            async with self._pool.acquire() as conn, conn.transaction():
                if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _RELAY_LOCK):
                    return total
                rows = await conn.fetch(
                    "SELECT seq, topic, key, envelope, occurred_at FROM events WHERE published_at IS NULL"
                    " ORDER BY seq LIMIT $1", self._batch_size)
                if not rows:
                    return total
                futures = []
                for row in rows:
                    envelope = dict(row["envelope"])
                    envelope["sequence"] = row["seq"]
                    futures.append(await self._producer.send(
                        row["topic"], EventEnvelope.model_validate(envelope).to_bytes(),
                        key=row["key"].encode()))
                await asyncio.gather(*futures)
                await conn.execute("UPDATE events SET published_at = now() WHERE seq = ANY($1::bigint[])",
                                   [r["seq"] for r in rows])
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
