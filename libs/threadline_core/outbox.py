"""Transactional outbox: events are committed with the state change, then relayed to Kafka."""

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError
from asyncpg.pool import PoolConnectionProxy

from threadline_core.db import connect
from threadline_core.events import EventEnvelope
from threadline_core.metrics import ServiceMetrics

NOTIFY_CHANNEL = "threadline_outbox"
RELEASED_CHANNEL = "threadline_outbox_relay"
"""Notified when a leader lets go, so another relay takes over at once instead of at its next sweep."""
_RELAY_LOCK = 7_254_311_002
_log = logging.getLogger(__name__)
MAX_EVENT_BYTES = 640 * 1024
"""Largest envelope (compact JSON) the outbox takes. Each event is one Kafka message (the producer's limit is
1 MiB, and Postgres prints the stored jsonb with a space after every ':' and ','): an event too large to
publish would hold up every event committed after it, so it is refused before it is committed."""


class EventTooLarge(ValueError):
    """An event would exceed MAX_EVENT_BYTES (or `limit`, less); the transaction that adds it must not commit."""

    def __init__(self, event_type: str, size: int, limit: int = MAX_EVENT_BYTES) -> None:
        super().__init__(f"event {event_type} is {size} bytes as JSON; the maximum is {limit}")
        self.event_type = event_type
        self.size = size
        self.limit = limit


def _envelope_json(envelope: EventEnvelope, limit: int = MAX_EVENT_BYTES) -> str:
    text = envelope.model_dump_json()
    if len(text) > limit // 4 and len(text.encode()) > limit:  # 4 bytes a character at most
        raise EventTooLarge(envelope.type, len(text.encode()), limit)
    return text


def ensure_room(envelope: EventEnvelope, reserve: int) -> None:
    """Refuse (EventTooLarge) an event whose object must still fit in one after growing by `reserve` bytes: a run
    or step whose next event is refused cannot move on, and would stay as it is for good."""
    _envelope_json(envelope, MAX_EVENT_BYTES - reserve)

# The NOTIFY rides along; the trigger of migration 0007 queues the row in outbox_pending (same transaction).
_INSERT = ("WITH added AS (INSERT INTO events (event_id, topic, key, type, project_id, thread_id, run_id, occurred_at,"
           " envelope) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::text::jsonb)) SELECT pg_notify($10, '')")
# One round trip per batch: forget the rows Kafka acknowledged ($1) and read the next pending ones. The
# DELETE's effect is invisible to the SELECT of the same statement, hence the explicit exclusion of $1 and
# of rows still awaiting their acknowledgement ($2). The events rows are looked up one by one (the fenced
# LATERAL): a merge join would walk events from its first row on every drain. The envelope comes as
# Postgres' own text; the relay only splices `sequence` in (`_with_sequence`).
_NEXT = ("WITH done AS (DELETE FROM outbox_pending WHERE seq = ANY($1::bigint[]))"
         " SELECT p.seq, e.topic, e.key, convert_to(e.envelope::text, 'UTF8') AS value, e.occurred_at"
         " FROM (SELECT seq FROM outbox_pending WHERE seq <> ALL($1::bigint[]) AND seq <> ALL($2::bigint[])"
         " ORDER BY seq LIMIT $3) p"
         " CROSS JOIN LATERAL (SELECT topic, key, envelope, occurred_at FROM events WHERE events.seq = p.seq"
         " OFFSET 0) e"
         " ORDER BY p.seq")
_FORGET = "DELETE FROM outbox_pending WHERE seq = ANY($1::bigint[])"
# The session holding the relay lock, ended if its state has not changed for $2 seconds (no statement began or
# ended; a frozen client also leaves a statement `active` whose rows it does not read) while the oldest queued event
# is that old too: a leader that is alive runs a short statement at every commit it is told of and every sweep, so it
# is frozen (SIGSTOP, a paused VM, a hung event loop) or cut off; its session would otherwise keep the lock, and every
# event unpublished, for as long as that lasts. Waits up to $3 ms for the session to end (its lock goes with it).
_OUST_STALLED = ("SELECT a.pid, pg_terminate_backend(a.pid, $3) AS ended FROM pg_locks l"
                 " JOIN pg_stat_activity a ON a.pid = l.pid"
                 " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1"
                 " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                 " AND ((l.classid::bigint << 32) | l.objid::bigint) = $1"
                 " AND a.state_change < clock_timestamp() - make_interval(secs => $2)"
                 " AND (SELECT e.occurred_at FROM events e WHERE e.seq = (SELECT min(seq) FROM outbox_pending))"
                 " < clock_timestamp() - make_interval(secs => $2)")
_NULL_SEQUENCE = b'"sequence": null'


def _retrieve(future: "asyncio.Future[list[Any]]") -> None:
    """Mark an abandoned batch's outcome as seen (its rows stay queued and are sent again)."""
    if not future.cancelled():
        future.exception()


def _with_sequence(value: bytes, seq: int) -> bytes:
    """The stored envelope text with `sequence` set to its outbox seq.

    jsonb prints keys by length, then bytewise: after "sequence" only thread_id, project_id and
    occurred_at follow, all strings (quotes inside them are escaped), so the last unescaped
    `"sequence": null` is the envelope's own field, never text from `data`.
    """
    at = value.rfind(_NULL_SEQUENCE)
    if at < 0:  # an envelope stored with a sequence already (or another layout): rewrite it
        envelope = orjson.loads(value)
        envelope["sequence"] = seq
        return orjson.dumps(envelope)
    return b"%s\"sequence\": %d%s" % (value[:at], seq, value[at + len(_NULL_SEQUENCE):])


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
          _envelope_json(e), NOTIFY_CHANNEL) for topic, e in items],
    )


class OutboxRelay:
    """Publishes committed outbox rows in `seq` order; one relay per database (the leader) does the work.

    Every process that writes events runs one. The leader holds a session advisory lock on its own
    connection, LISTENs for commits and publishes every pending row (of any process); a row leaves the
    `outbox_pending` queue only after Kafka acknowledged it. The others stay quiet and try to take over
    every `sweep_interval` (or at once when a leader lets go), so a commit costs one relay's work instead
    of one per process. A crashed leader's session ends and its lock with it; a stopping leader
    publishes what is pending first. The leader also sweeps every `sweep_interval` (safety net). A leader
    whose process is frozen keeps its session, and so the lock: once it has run no statement for
    `stall_seconds` while an event that old waits, the next relay to try ends its session and takes over (the
    frozen one, thawed, finds its session gone and follows; what it had in flight may be published twice).

    Statements per batch: one. Acknowledged rows are deleted by the statement that reads the next batch
    (at the latest `forget_after` seconds later, and before the lead is let go); while a batch awaits its
    acknowledgement, the next one is already read when more commits were notified meanwhile (it is sent
    only after the acknowledgement, so a failed batch is never overtaken). A leader that dies between the
    acknowledgement and the delete has its last rows published again by the next one: consumers are
    idempotent, as for any redelivery.
    """

    def __init__(self, *, pool: asyncpg.Pool, producer: AIOKafkaProducer, dsn: str,
                 metrics: ServiceMetrics | None = None, batch_size: int = 500,
                 sweep_interval: float = 1.0, forget_after: float = 0.1, stall_seconds: float = 10.0) -> None:
        self._pool = pool  # kept for API compatibility; the relay uses its own connection
        self._stall_seconds = stall_seconds
        self._producer = producer
        self._dsn = dsn
        self._metrics = metrics
        self._batch_size = batch_size
        self._sweep_interval = sweep_interval
        self._forget_after = min(forget_after, sweep_interval)
        self._wake = asyncio.Event()
        self._stopping = False
        self._conn: asyncpg.Connection | None = None
        self._leader = False
        self._draining = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._acked: list[int] = []
        """Seqs Kafka acknowledged that are still queued (deleted with the next statement)."""

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
            self._acked = []
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
        if self._leader:
            return True
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _RELAY_LOCK):
            if not await self._oust_stalled(conn):
                return False
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _RELAY_LOCK):
                return False
        await conn.add_listener(NOTIFY_CHANNEL, self._on_notify)
        self._leader = True
        _log.info("outbox relay is the leader")
        return True

    async def _oust_stalled(self, conn: asyncpg.Connection) -> bool:
        """End the leader's session if it stalled with events waiting (see the class); True if it did."""
        try:
            ousted = await conn.fetchrow(_OUST_STALLED, _RELAY_LOCK, self._stall_seconds, 5000)
        except asyncpg.InsufficientPrivilegeError:  # another role's session: only the lock's release hands over
            return False
        if ousted is None:
            return False
        _log.warning("outbox relay leader (backend pid %s) ran nothing for %.0f s while events waited: ended its"
                     " session to take over", ousted["pid"], self._stall_seconds)
        return bool(ousted["ended"])

    async def _release(self) -> None:
        """Forget what was acknowledged, let go of the lead (telling the others) and close the connection."""
        conn, self._conn = self._conn, None
        if conn is None or conn.is_closed():
            self._leader = False
            return
        try:
            if self._leader:
                self._leader = False
                if self._acked:
                    await conn.execute(_FORGET, self._acked)
                    self._acked = []
                await conn.execute("SELECT pg_advisory_unlock($1), pg_notify($2, '')", _RELAY_LOCK, RELEASED_CHANNEL)
            await conn.close(timeout=5)
        except (OSError, asyncpg.PostgresError, TimeoutError):
            conn.terminate()

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._forget_after if self._acked else self._sweep_interval):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.drain()
            except Exception as exc:
                _log.exception("outbox relay failed; retrying")
                if isinstance(exc, (OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError)) or (
                        self._conn is not None and self._conn.is_closed()):
                    conn, self._conn, self._leader = self._conn, None, False  # lost the session: lead again later
                    self._acked = []
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
            sent: list[asyncpg.Record] = []
            acks: asyncio.Future[list[Any]] | None = None
            try:
                while True:
                    self._wake.clear()  # a commit notified from now on may be missed by this read: read again
                    rows = await self._conn.fetch(_NEXT, self._acked, [row["seq"] for row in sent], self._batch_size)
                    self._acked = []
                    if acks is not None:
                        await acks
                        total += self._acknowledged(sent)
                        acks = None
                    if not rows:
                        return total
                    futures = [await self._send(row) for row in rows]
                    sent, acks = rows, asyncio.gather(*futures)
                    if len(rows) < self._batch_size and not self._wake.is_set():
                        await acks
                        acks = None
                        return total + self._acknowledged(sent)
            finally:
                if acks is not None:  # failed before the acknowledgement: those rows stay queued, sent again
                    acks.add_done_callback(_retrieve)
                if self._stopping and self._acked and not self._conn.is_closed():
                    await self._conn.execute(_FORGET, self._acked)
                    self._acked = []

    async def _send(self, row: asyncpg.Record) -> "asyncio.Future[Any]":
        """Hand one row to the producer. One too large for Kafka can never be published: it leaves the queue
        (the event log keeps it) instead of holding up every event committed after it."""
        try:
            sent: asyncio.Future[Any] = await self._producer.send(
                row["topic"], _with_sequence(row["value"], row["seq"]), key=row["key"].encode())
            return sent
        except MessageSizeTooLargeError:
            _log.error("outbox event seq %s (%d bytes) is too large for Kafka: skipped, kept in the event log only",
                       row["seq"], len(row["value"]))
            skipped: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            skipped.set_result(None)
            return skipped

    def _acknowledged(self, rows: list[asyncpg.Record]) -> int:
        """Kafka has `rows`: queue their deletion (with the next statement) and count them."""
        self._acked += [row["seq"] for row in rows]
        self._observe(rows)
        return len(rows)

    def _observe(self, rows: list[asyncpg.Record]) -> None:
        if not self._metrics:
            return
        now = time.time()
        per_topic: dict[str, int] = {}
        for row in rows:
            per_topic[row["topic"]] = per_topic.get(row["topic"], 0) + 1
            occurred: datetime = row["occurred_at"]
            if occurred.tzinfo is None:
                occurred = occurred.replace(tzinfo=UTC)
            self._metrics.outbox_publish_seconds.observe(max(0.0, now - occurred.timestamp()))
        for topic, count in per_topic.items():  # one labelled child per topic, not per row
            self._metrics.events_produced.labels(topic=topic).inc(count)


def outbox_statement(ctes: Sequence[str], param: int) -> str:
    """One statement: the caller's data-modifying CTEs (`name AS (INSERT ...)`, parameters below `$param`), then
    the outbox items of `$param` (`outbox_param(items)`) in order, then the relays' NOTIFY.

    For a state change and its events in one round trip: a single statement is atomic without BEGIN/COMMIT.
    """
    return f"WITH {', '.join([*ctes, outbox_cte(f'${param}::text::jsonb')])} SELECT pg_notify('{NOTIFY_CHANNEL}', '')"


def outbox_param(items: Sequence[tuple[str, EventEnvelope]]) -> str:
    """The `$param` of `outbox_statement`: `[[topic, envelope], ...]` as JSON text."""
    return "[" + ",".join(f"[{orjson.dumps(topic).decode()},{_envelope_json(e)}]" for topic, e in items) + "]"


def outbox_cte(items: str) -> str:
    """The CTE `added` of `outbox_statement` for `items`, a SQL expression of a jsonb array `[[topic, envelope],
    ...]` (NULL: none), so a statement can put into its events what its other CTEs return."""
    return ("added AS (INSERT INTO events (event_id, topic, key, type, project_id, thread_id, run_id, occurred_at,"
            " envelope) SELECT e->>'event_id', i->>0, e->>'key', e->>'type', e->>'project_id', e->>'thread_id',"
            f" e->>'run_id', (e->>'occurred_at')::timestamptz, e FROM jsonb_array_elements({items})"
            " WITH ORDINALITY AS o(i, n), LATERAL (SELECT i->1) AS x(e) ORDER BY n)")  # queued by the trigger
