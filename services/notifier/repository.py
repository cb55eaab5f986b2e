"""All SQL of the notifier: deliveries (inserted, leased, claimed, recorded) and endpoint health."""

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from threadline_core.events import EventEnvelope

Conn = asyncpg.Connection | PoolConnectionProxy

ENDPOINTS_CHANNEL = "threadline_webhook_endpoints"
"""NOTIFY channel (trigger of migration 0006), payload the project id: its endpoints' matching changed."""
CATCHUP_LOCK = 7_254_311_004
"""Transaction-level advisory lock of the catch-up pass: one notifier instance checks the event log at a time."""


@dataclass(frozen=True)
class ClaimedDelivery:
    """A delivery to attempt now, with what is needed to send it (`attempt`: 1 for the first attempt)."""

    id: str
    endpoint_id: str
    event_id: str
    ordering_key: str
    body: bytes
    attempt: int
    url: str
    secrets: tuple[str, ...]
    event_created_at: datetime


@dataclass(frozen=True)
class QueuedDelivery:
    """A delivery row this instance may hand to a worker (leased to it unless `leased` is False).

    `ready` (fresh inserts only): everything needed to send it, so the first attempt needs no claim.
    """

    id: str
    endpoint_id: str
    ordering_key: str
    leased: bool
    ready: ClaimedDelivery | None = None


@dataclass(frozen=True)
class NewEvent:
    """One event to fan out to the endpoints subscribed to it."""

    project_id: str
    event_id: str
    event_type: str
    ordering_key: str
    seq: int
    body: str
    occurred_at: datetime


def _secrets(row: asyncpg.Record) -> tuple[str, ...]:
    return (row["secret"],) + ((row["previous_secret"],) if row["previous_secret"] else ())


async def subscribed_types(conn: Conn, project_id: str) -> frozenset[str]:
    """The event types at least one enabled endpoint of the project subscribes to."""
    rows = await conn.fetch("SELECT DISTINCT unnest(event_types) AS event_type FROM webhook_endpoints"
                            " WHERE project_id = $1 AND status = 'enabled'", project_id)
    return frozenset(row["event_type"] for row in rows)


async def barrier(conn: asyncpg.Connection) -> float:
    """A round trip on a LISTEN connection; Postgres sends an idle session its pending notifications first.

    Returns the database clock (epoch seconds) while answering: every NOTIFY committed before then
    has been received (and its listener scheduled) when this returns.
    """
    return float(await conn.fetchval("SELECT extract(epoch FROM clock_timestamp())::float8"))


async def insert_deliveries(conn: Conn, event: NewEvent, *, ids: Sequence[str], first_delay: float, owner: str,
                            lease_seconds: float, no_lease: Sequence[str] = (), may_lease: bool = True,
                            offset: int = 0) -> tuple[list[QueuedDelivery], int]:
    """One statement: a delivery per subscribed endpoint (idempotent per endpoint and event), leased to
    `owner` when it may go right now; returns the new rows and how many endpoints matched.

    Endpoints: enabled, of the project, subscribed to the type, existing and enabled when the event happened; the
    (offset+1)-th to (offset+len(ids))-th of them by id get `ids`. A delivery may go now when the first
    attempt is immediate, `may_lease`, its endpoint is not in `no_lease`, and every earlier pending delivery of the
    same ordering key for that endpoint is leased to `owner` (queued ahead in our own lane); otherwise
    the retry scheduler takes it, in order, once the earlier ones are done.
    """
    rows = await conn.fetch(
        """
        WITH matched AS (
            SELECT e.id, e.url, e.secret,
                   CASE WHEN e.previous_secret_expires_at > clock_timestamp() THEN e.previous_secret END
                       AS previous_secret,
                   row_number() OVER (ORDER BY e.id) AS n
            FROM webhook_endpoints e
            WHERE e.project_id = $1 AND e.status = 'enabled' AND $2 = ANY(e.event_types) AND e.created_ts <= $3
              AND (e.enabled_ts IS NULL OR e.enabled_ts <= $3)
        ), fresh AS (
            SELECT ids.id, m.id AS endpoint_id, m.url, m.secret, m.previous_secret,
                   $14::boolean AND m.id <> ALL($12::text[]) AND $9::float8 = 0 AND NOT EXISTS (
                       SELECT 1 FROM webhook_deliveries p
                       WHERE p.endpoint_id = m.id AND p.ordering_key = $6 AND p.status = 'pending' AND p.seq < $7
                         AND (p.lease_owner IS DISTINCT FROM $10 OR p.lease_expires_at < clock_timestamp())) AS go
            FROM matched m JOIN unnest($4::text[]) WITH ORDINALITY AS ids(id, n) ON ids.n + $13::int = m.n
        ), inserted AS (
            INSERT INTO webhook_deliveries (id, endpoint_id, project_id, event_id, event_type, ordering_key, seq,
                                            body, event_created_at, next_attempt_at, lease_owner, lease_expires_at)
            SELECT f.id, f.endpoint_id, $1, $5, $2, $6, $7, $8, $3,
                   clock_timestamp() + make_interval(secs => $9::float8),
                   CASE WHEN f.go THEN $10 END,
                   CASE WHEN f.go THEN clock_timestamp() + make_interval(secs => $11::float8) END
            FROM fresh f
            ON CONFLICT (endpoint_id, event_id) DO NOTHING
            RETURNING id, lease_owner IS NOT NULL AS leased
        )
        SELECT i.id, i.leased, f.endpoint_id, f.url, f.secret, f.previous_secret,
               (SELECT count(*) FROM matched) AS matched
        FROM inserted i JOIN fresh f ON f.id = i.id
        """,
        event.project_id, event.event_type, event.occurred_at, list(ids), event.event_id, event.ordering_key,
        event.seq, event.body, float(first_delay), owner, float(lease_seconds), list(no_lease), offset, may_lease)
    body = event.body.encode()
    queued = [QueuedDelivery(r["id"], r["endpoint_id"], event.ordering_key, r["leased"],
                             ClaimedDelivery(id=r["id"], endpoint_id=r["endpoint_id"], event_id=event.event_id,
                                             ordering_key=event.ordering_key, body=body, attempt=1, url=r["url"],
                                             secrets=_secrets(r), event_created_at=event.occurred_at)
                             if r["leased"] else None)
              for r in rows]
    return queued, max((int(r["matched"]) for r in rows), default=0)


async def claim(conn: Conn, delivery_id: str, *, owner: str, lease_seconds: float) -> ClaimedDelivery | None:
    """Take one due delivery for an attempt (renews our lease); None if it is not ours to send now.

    Not ours: already done, not due, leased by another live instance, endpoint disabled, or an
    earlier delivery of the same ordering key is still pending (order is kept per thread).
    """
    row = await conn.fetchrow(
        """
        UPDATE webhook_deliveries d
        SET lease_owner = $2, lease_expires_at = clock_timestamp() + make_interval(secs => $3),
            updated_at = clock_timestamp()
        FROM webhook_endpoints e
        WHERE d.id = $1 AND e.id = d.endpoint_id AND e.status = 'enabled' AND d.status = 'pending'
          AND d.next_attempt_at <= clock_timestamp()
          AND (d.lease_owner = $2 OR d.lease_expires_at IS NULL OR d.lease_expires_at < clock_timestamp())
          AND NOT EXISTS (
              SELECT 1 FROM webhook_deliveries p
              WHERE p.endpoint_id = d.endpoint_id AND p.ordering_key = d.ordering_key AND p.status = 'pending'
                AND p.seq < d.seq)
        RETURNING d.id, d.endpoint_id, d.event_id, d.ordering_key, d.body, d.attempts, d.event_created_at,
                  e.url, e.secret,
                  CASE WHEN e.previous_secret_expires_at > clock_timestamp() THEN e.previous_secret END
                      AS previous_secret
        """,
        delivery_id, owner, float(lease_seconds))
    if row is None:
        return None
    return ClaimedDelivery(id=row["id"], endpoint_id=row["endpoint_id"], event_id=row["event_id"],
                           ordering_key=row["ordering_key"], body=row["body"].encode(), attempt=row["attempts"] + 1,
                           url=row["url"], secrets=_secrets(row), event_created_at=row["event_created_at"])


async def release(conn: Conn, delivery_ids: Sequence[str], *, owner: str) -> None:
    """Give up our lease on deliveries we will not attempt now (others or the scheduler may take them)."""
    if delivery_ids:
        await conn.execute(
            "UPDATE webhook_deliveries SET lease_owner = NULL, lease_expires_at = NULL"
            " WHERE id = ANY($1::text[]) AND lease_owner = $2 AND status = 'pending'",
            list(delivery_ids), owner)


async def record_attempt(conn: Conn, delivery: ClaimedDelivery, *, attempt_id: str, owner: str, instance_id: str,
                         status_code: int | None, latency_ms: float, error: str | None, response_body: str,
                         outcome: str, retry_in: float | None, disable_after_seconds: float,
                         transport_error: str | None = None) -> bool:
    """Log and count the attempt and apply its outcome in one statement; True if the endpoint failed too long.

    `outcome`: 'succeeded' (done; the endpoint is healthy again), 'retry' (next attempt in `retry_in`
    seconds) or 'failed' (given up). Our lease ends either way. The attempt logs `transport_error` (no
    HTTP answer); the delivery keeps `error` as its last error.
    """
    expired = await conn.fetchval(
        """
        WITH attempt AS (
            INSERT INTO webhook_attempts (id, delivery_id, endpoint_id, event_id, attempt, status_code, success,
                                          latency_ms, error, response_body, instance_id)
            VALUES ($1, $2, $3, $4, $5, $6, $7 = 'succeeded', $8, $15, $10, $11)
        ), delivery AS (
            UPDATE webhook_deliveries SET
                attempts = attempts + 1,
                status = CASE WHEN $7 = 'retry' THEN 'pending' ELSE $7 END,
                lease_owner = NULL, lease_expires_at = NULL, last_status_code = $6, last_error = $9,
                next_attempt_at = CASE WHEN $7 = 'retry' THEN clock_timestamp() + make_interval(secs => $12)
                                       ELSE next_attempt_at END,
                completed_at = CASE WHEN $7 = 'retry' THEN NULL ELSE clock_timestamp() END,
                updated_at = clock_timestamp()
            WHERE id = $2 AND status = 'pending' AND ($7 = 'succeeded' OR lease_owner = $13)
        ), endpoint AS (
            UPDATE webhook_endpoints
            SET failing_since = CASE WHEN $7 = 'succeeded' THEN NULL ELSE coalesce(failing_since, clock_timestamp()) END
            WHERE id = $3 AND ($7 <> 'succeeded' OR failing_since IS NOT NULL)
            RETURNING failing_since
        )
        SELECT coalesce((SELECT failing_since < clock_timestamp() - make_interval(secs => $14) FROM endpoint), false)
        """,
        attempt_id, delivery.id, delivery.endpoint_id, delivery.event_id, delivery.attempt, status_code, outcome,
        latency_ms, error, response_body, instance_id, float(retry_in or 0.0), owner, float(disable_after_seconds),
        transport_error)
    return bool(expired)


async def disable_endpoint(conn: Conn, endpoint_id: str, reason: str) -> None:
    """Stop delivering to this endpoint (pending deliveries stay, and go out if it is enabled again)."""
    await conn.execute(
        "UPDATE webhook_endpoints SET status = 'disabled', disabled_reason = $2 WHERE id = $1 AND status = 'enabled'",
        endpoint_id, reason)


async def lease_due(conn: Conn, *, owner: str, lease_seconds: float, limit: int,
                    skip_endpoints: Sequence[str]) -> list[QueuedDelivery]:
    """Lease due retries (oldest first) that no live instance holds; several notifiers share them."""
    rows = await conn.fetch(
        """
        WITH due AS (
            SELECT d.id FROM webhook_deliveries d
            JOIN webhook_endpoints e ON e.id = d.endpoint_id AND e.status = 'enabled'
            WHERE d.status = 'pending' AND d.next_attempt_at <= clock_timestamp()
              AND (d.lease_expires_at IS NULL OR d.lease_expires_at < clock_timestamp())
              AND d.endpoint_id <> ALL($4::text[])
              AND NOT EXISTS (
                  SELECT 1 FROM webhook_deliveries p
                  WHERE p.endpoint_id = d.endpoint_id AND p.ordering_key = d.ordering_key AND p.status = 'pending'
                    AND p.seq < d.seq)
            ORDER BY d.next_attempt_at
            LIMIT $3
            FOR UPDATE OF d SKIP LOCKED
        )
        UPDATE webhook_deliveries d SET lease_owner = $1,
               lease_expires_at = clock_timestamp() + make_interval(secs => $2)
        FROM due WHERE d.id = due.id
        RETURNING d.id, d.endpoint_id, d.ordering_key, d.seq
        """,
        owner, float(lease_seconds), limit, list(skip_endpoints))
    ordered = sorted(rows, key=lambda r: (r["endpoint_id"], r["ordering_key"], r["seq"]))
    return [QueuedDelivery(r["id"], r["endpoint_id"], r["ordering_key"], True) for r in ordered]


async def lease_key(conn: Conn, *, endpoint_id: str, ordering_key: str, owner: str, lease_seconds: float,
                    limit: int) -> list[QueuedDelivery]:
    """Lease the due deliveries of one (endpoint, ordering key) in order: they were waiting for the one just done."""
    rows = await conn.fetch(
        """
        WITH due AS (
            SELECT d.id FROM webhook_deliveries d
            WHERE d.endpoint_id = $1 AND d.ordering_key = $2 AND d.status = 'pending'
              AND d.next_attempt_at <= clock_timestamp()
              AND (d.lease_owner = $3 OR d.lease_expires_at IS NULL OR d.lease_expires_at < clock_timestamp())
            ORDER BY d.seq
            LIMIT $5
            FOR UPDATE OF d SKIP LOCKED
        )
        UPDATE webhook_deliveries d SET lease_owner = $3,
               lease_expires_at = clock_timestamp() + make_interval(secs => $4)
        FROM due WHERE d.id = due.id
        RETURNING d.id, d.seq
        """,
        endpoint_id, ordering_key, owner, float(lease_seconds), limit)
    return [QueuedDelivery(r["id"], endpoint_id, ordering_key, True) for r in sorted(rows, key=lambda r: r["seq"])]


async def next_due_in(conn: Conn) -> float | None:
    """Seconds until the next scheduled retry falls due (None if none is scheduled in the future)."""
    value = await conn.fetchval(
        "SELECT extract(epoch FROM min(next_attempt_at) - clock_timestamp()) FROM webhook_deliveries"
        " WHERE status = 'pending' AND next_attempt_at > clock_timestamp()")
    return None if value is None else float(value)


async def purge_finished(conn: Conn, *, older_than_seconds: float) -> int:
    """Delete succeeded/failed deliveries completed before the retention period (attempts go with them)."""
    status = await conn.execute(
        "DELETE FROM webhook_deliveries WHERE status <> 'pending'"
        " AND completed_at < clock_timestamp() - make_interval(secs => $1)", float(older_than_seconds))
    return int(status.split()[-1])


async def still_disabled(conn: Conn, endpoint_ids: Sequence[str]) -> set[str]:
    """Which of these endpoints exist and are not enabled (again)."""
    rows = await conn.fetch("SELECT id FROM webhook_endpoints WHERE id = ANY($1::text[]) AND status <> 'enabled'",
                            list(endpoint_ids))
    return {row["id"] for row in rows}


async def existing_endpoints(conn: Conn, endpoint_ids: Sequence[str]) -> set[str]:
    """Which of these endpoints still exist (deleted ones are gone from the table)."""
    rows = await conn.fetch("SELECT id FROM webhook_endpoints WHERE id = ANY($1::text[])", list(endpoint_ids))
    return {row["id"] for row in rows}


@dataclass(frozen=True)
class CatchupMark:
    """The catch-up's watermark row (migration 0022) and the database's view of the log when it was read."""

    checked_seq: int
    settled_seq: int
    horizon_seq: int | None
    horizon_at: datetime | None
    now: datetime
    last_seq: int

    def aged(self, grace_seconds: float) -> bool:
        """True once the horizon is a grace period old (its events were in the log at least that long)."""
        return self.horizon_at is not None and self.horizon_at <= self.now - timedelta(seconds=grace_seconds)


async def lock_catchup(conn: Conn) -> CatchupMark | None:
    """Take the catch-up's lock and watermark for this transaction; None if another instance's pass holds it."""
    if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", CATCHUP_LOCK):
        return None
    row = await conn.fetchrow(
        "SELECT checked_seq, settled_seq, horizon_seq, horizon_at, clock_timestamp() AS now,"
        " coalesce((SELECT max(seq) FROM events), 0) AS last_seq FROM webhook_catchup FOR UPDATE")
    if row is None:
        return None
    return CatchupMark(checked_seq=row["checked_seq"], settled_seq=row["settled_seq"], horizon_seq=row["horizon_seq"],
                       horizon_at=row["horizon_at"], now=row["now"], last_seq=row["last_seq"])


async def save_catchup(conn: Conn, *, checked_seq: int, settled_seq: int, horizon_seq: int | None,
                       horizon_at: datetime | None) -> None:
    """Move the watermark (in the transaction that inserted the deliveries up to it)."""
    await conn.execute(
        "UPDATE webhook_catchup SET checked_seq = $1, settled_seq = $2, horizon_seq = $3, horizon_at = $4,"
        " updated_at = clock_timestamp()", checked_seq, settled_seq, horizon_seq, horizon_at)


async def first_unpublished(conn: Conn, *, after: int, upto: int) -> int | None:
    """The first event in (after, upto] still awaiting the relay (queued in outbox_pending, or never published)."""
    value = await conn.fetchval(
        "SELECT least((SELECT min(seq) FROM outbox_pending WHERE seq > $1 AND seq <= $2),"
        " (SELECT min(seq) FROM events WHERE published_at IS NULL AND seq > $1 AND seq <= $2))", after, upto)
    return None if value is None else int(value)


async def catchup_end(conn: Conn, *, after: int, upto: int, limit: int) -> int:
    """Where a pass that checks at most `limit` events after `after` (up to `upto`) stops."""
    row = await conn.fetchrow(
        "SELECT count(*) AS n, max(seq) AS last FROM (SELECT seq FROM events WHERE seq > $1 AND seq <= $2"
        " ORDER BY seq LIMIT $3) scope", after, upto, limit)
    assert row is not None
    return int(row["last"]) if row["n"] >= limit else upto


async def undelivered_events(conn: Conn, *, after: int, upto: int, topic: str,
                             event_types: Sequence[str]) -> list[EventEnvelope]:
    """Events in (after, upto] of `topic` that an endpoint wants (insert_deliveries' rule) but has no delivery of."""
    rows = await conn.fetch(
        """
        SELECT ev.seq, ev.event_id, ev.type, ev.key, ev.project_id, ev.occurred_at, ev.envelope FROM events ev
        WHERE ev.seq > $1 AND ev.seq <= $2 AND ev.topic = $3 AND ev.type = ANY($4::text[])
          AND EXISTS (
              SELECT 1 FROM webhook_endpoints e
              WHERE e.project_id = ev.project_id AND e.status = 'enabled' AND ev.type = ANY(e.event_types)
                AND e.created_ts <= ev.occurred_at AND (e.enabled_ts IS NULL OR e.enabled_ts <= ev.occurred_at)
                AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.endpoint_id = e.id
                                AND d.event_id = ev.event_id))
        ORDER BY ev.seq
        """,
        after, upto, topic, list(event_types))
    return [EventEnvelope.model_validate({**row["envelope"], "sequence": row["seq"], "event_id": row["event_id"],
                                          "type": row["type"], "key": row["key"], "project_id": row["project_id"],
                                          "occurred_at": row["occurred_at"]})
            for row in rows]
