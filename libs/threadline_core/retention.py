"""Retention of the event log and of the consumers' idempotency claims: both grow with every event otherwise.

The `events` table is the outbox and the log that SSE resumes (`Last-Event-ID`) and webhook replays read; an
event is forgotten once it is older than THREADLINE_EVENT_RETENTION_DAYS and published (never the newest one:
it is what a resumed stream's cursor is checked against). `processed_events` claims are forgotten after the
same time: keep it longer than the topics' own retention (Kafka's default: 7 days), since a record is only ever
redelivered from a topic, and a claim forgotten earlier could let one be applied twice.
Every service runs a pruner; a transaction-level advisory lock lets one prune at a time.
"""

import logging
from dataclasses import dataclass
from datetime import datetime

import asyncpg
import asyncpg.pool
from prometheus_client import Counter

from threadline_core.periodic import PeriodicPass

_log = logging.getLogger(__name__)
_PRUNE_LOCK = 7_254_311_003
_BATCH = 5000
"""Rows deleted per statement: short transactions, so the outbox and the consumers never wait on a pass."""

# The log's head, in seq order (its primary key): rows there are the oldest (occurred_at follows seq but for
# clock skew between services: a skewed row waits for the next pass). Rows awaiting the relay are never taken.
_PRUNE_EVENTS = (
    "WITH head AS (SELECT seq, occurred_at FROM events WHERE seq < (SELECT max(seq) FROM events) ORDER BY seq"
    " LIMIT $2)"
    " DELETE FROM events e USING head WHERE e.seq = head.seq AND head.occurred_at < $1"
    " AND NOT EXISTS (SELECT 1 FROM outbox_pending p WHERE p.seq = e.seq)")
_PRUNE_CLAIMS = ("DELETE FROM processed_events WHERE ctid = ANY(ARRAY(SELECT ctid FROM processed_events"
                 " WHERE processed_at < $1 LIMIT $2))")


@dataclass
class Pruned:
    """Rows one pass deleted."""

    events: int = 0
    claims: int = 0


class EventLogRetention:
    """Deletes events and idempotency claims older than the retention period, every `interval_seconds`."""

    def __init__(self, *, pool: asyncpg.Pool, retention_seconds: float, interval_seconds: float,
                 pruned_rows: Counter) -> None:
        self._pool = pool
        self._retention_seconds = retention_seconds
        self._pruned_rows = pruned_rows
        self._periodic = PeriodicPass("event-log-retention", self._pass, interval_seconds)

    async def start(self) -> None:
        """Prune in the background."""
        await self._periodic.start()

    async def stop(self) -> None:
        """Stop pruning (the batches a pass committed stay deleted)."""
        await self._periodic.stop()

    async def prune(self) -> Pruned:
        """One pass over both tables (cut short where another instance's pass holds the lock)."""
        async with self._pool.acquire() as conn:
            cutoff = await conn.fetchval("SELECT clock_timestamp() - make_interval(secs => $1)",
                                         float(self._retention_seconds))
            events = await self._prune_table(conn, "events", _PRUNE_EVENTS, cutoff)
            claims = await self._prune_table(conn, "processed_events", _PRUNE_CLAIMS, cutoff)
        return Pruned(events=events, claims=claims)

    async def _prune_table(self, conn: asyncpg.pool.PoolConnectionProxy, table: str, statement: str,
                           cutoff: datetime) -> int:
        """Delete batch after batch until one finds nothing to delete; stop early if another pass holds the lock."""
        total = 0
        while True:
            async with conn.transaction():
                if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _PRUNE_LOCK):
                    return total
                deleted = int((await conn.execute(statement, cutoff, _BATCH)).split()[-1])
            if not deleted:
                return total
            total += deleted
            self._pruned_rows.labels(table=table).inc(deleted)

    async def _pass(self) -> bool:
        pruned = await self.prune()
        if pruned.events or pruned.claims:
            _log.info("forgot %d events and %d idempotency claims past the retention period", pruned.events,
                      pruned.claims)
        return False
