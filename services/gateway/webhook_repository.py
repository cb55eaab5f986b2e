"""All SQL of the gateway's webhook API: endpoints, the delivery log, resend and recovery."""

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from gateway.pagination import Conn, PageParams, fetch_page
from threadline_core.events import WebhookDeliveriesDue
from threadline_core.outbox import append_events
from threadline_core.topics import EVENTS, WEBHOOK_COMMANDS
from threadline_core.webhooks import event_body

Tx = asyncpg.Connection | PoolConnectionProxy
"""A connection, not the pool: writes that announce due deliveries add to the outbox in its transaction."""

_ENDPOINT_COLUMNS = ("id, project_id, url, name, event_types, secret, previous_secret, previous_secret_expires_at,"
                     " status, disabled_reason, created_at, updated_at")
_DELIVERY_COLUMNS = ("id, endpoint_id, event_id, event_type, status, attempts, next_attempt_at, last_status_code,"
                     " last_error, event_created_at, created_at, completed_at")
_ATTEMPT_COLUMNS = ("id, delivery_id, endpoint_id, event_id, attempt, status_code, success, latency_ms, error,"
                    " response_body, created_at")


@dataclass(frozen=True)
class EndpointRecord:
    """A stored webhook endpoint (secrets included: only the API layer decides what to show)."""

    id: str
    project_id: str
    url: str
    name: str
    event_types: list[str]
    secret: str
    status: str
    disabled_reason: str | None
    created_at: int
    updated_at: int


@dataclass(frozen=True)
class DeliveryRecord:
    """One event for one endpoint and where its delivery stands."""

    id: str
    endpoint_id: str
    event_id: str
    event_type: str
    status: str
    attempts: int
    next_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    event_created_at: datetime
    created_at: datetime
    completed_at: datetime | None


@dataclass(frozen=True)
class AttemptRecord:
    """One HTTP attempt of a delivery."""

    id: str
    delivery_id: str
    endpoint_id: str
    event_id: str
    attempt: int
    status_code: int | None
    success: bool
    latency_ms: float
    error: str | None
    response_body: str | None
    created_at: datetime


def _endpoint(row: asyncpg.Record) -> EndpointRecord:
    return EndpointRecord(id=row["id"], project_id=row["project_id"], url=row["url"], name=row["name"],
                          event_types=list(row["event_types"]), secret=row["secret"], status=row["status"],
                          disabled_reason=row["disabled_reason"], created_at=row["created_at"],
                          updated_at=row["updated_at"])


def _delivery(row: asyncpg.Record) -> DeliveryRecord:
    return DeliveryRecord(**{k: row[k] for k in DeliveryRecord.__dataclass_fields__ if k != "endpoint_id"},
                          endpoint_id=row["endpoint_id"])


def _attempt(row: asyncpg.Record) -> AttemptRecord:
    return AttemptRecord(**{k: row[k] for k in AttemptRecord.__dataclass_fields__})


async def active_secrets(conn: Conn, project_id: str, endpoint_id: str) -> list[str]:
    """The secrets a delivery is signed with right now: current first, then a still-valid previous one."""
    row = await conn.fetchrow(
        "SELECT secret, CASE WHEN previous_secret_expires_at > clock_timestamp() THEN previous_secret END AS prev"
        " FROM webhook_endpoints WHERE id = $1 AND project_id = $2", endpoint_id, project_id)
    if row is None:
        return []
    return [row["secret"], *([row["prev"]] if row["prev"] else [])]


async def insert_endpoint(conn: Conn, *, endpoint_id: str, project_id: str, url: str, name: str,
                          event_types: Sequence[str], secret: str, created_at: int) -> EndpointRecord:
    """Store a new, enabled endpoint."""
    row = await conn.fetchrow(
        f"INSERT INTO webhook_endpoints (id, project_id, url, name, event_types, secret, created_at, updated_at)"
        f" VALUES ($1, $2, $3, $4, $5, $6, $7, $7) RETURNING {_ENDPOINT_COLUMNS}",
        endpoint_id, project_id, url, name, list(event_types), secret, created_at)
    assert row is not None
    return _endpoint(row)


async def get_endpoint(conn: Conn, project_id: str, endpoint_id: str) -> EndpointRecord | None:
    """One endpoint of the project."""
    row = await conn.fetchrow(f"SELECT {_ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE id = $1 AND project_id = $2",
                              endpoint_id, project_id)
    return _endpoint(row) if row is not None else None


async def list_endpoints(conn: Conn, project_id: str, page: PageParams) -> tuple[list[EndpointRecord], bool]:
    """A page of the project's endpoints."""
    result = await fetch_page(conn, select=f"{_ENDPOINT_COLUMNS} FROM webhook_endpoints", where="project_id = $1",
                              args=[project_id], page=page)
    return [_endpoint(r) for r in result.rows], result.has_more


async def update_endpoint(conn: Tx, project_id: str, endpoint_id: str, changes: dict[str, Any],
                          updated_at: int) -> EndpointRecord | None:
    """Apply column changes; `updated_at` only moves when a value really changed (call inside a transaction)."""
    current = await get_endpoint(conn, project_id, endpoint_id)
    if current is None:
        return None
    changed = {k: v for k, v in changes.items() if getattr(current, k) != v}
    if not changed:
        return current
    sets = [f"{column} = ${i}" for i, column in enumerate(changed, start=3)]
    args: list[Any] = [endpoint_id, project_id, *changed.values()]
    if changed.get("status") == "enabled":
        sets += ["disabled_reason = NULL", "failing_since = NULL"]
    elif changed.get("status") == "disabled":
        sets.append("disabled_reason = 'Disabled through the API.'")
    config = {k for k in changed if k != "status"}
    if config:
        args.append(updated_at)
        sets.append(f"updated_at = ${len(args)}")
    row = await conn.fetchrow(
        f"UPDATE webhook_endpoints SET {', '.join(sets)} WHERE id = $1 AND project_id = $2"
        f" RETURNING {_ENDPOINT_COLUMNS}", *args)
    if row is not None and changed.get("status") == "enabled":  # what waited for a later retry goes out now
        await conn.execute("UPDATE webhook_deliveries SET next_attempt_at = clock_timestamp() WHERE endpoint_id = $1"
                           " AND status = 'pending' AND next_attempt_at > clock_timestamp()", endpoint_id)
        await announce_due(conn, project_id, endpoint_id)
    return _endpoint(row) if row is not None else None


async def rotate_secret(conn: Conn, project_id: str, endpoint_id: str, *, secret: str, keep_old_for: float | None,
                        updated_at: int) -> EndpointRecord | None:
    """Install a new secret; keep signing with the old one for `keep_old_for` seconds if given."""
    row = await conn.fetchrow(
        f"UPDATE webhook_endpoints SET"
        f" previous_secret = CASE WHEN $4::float8 IS NULL THEN NULL ELSE secret END,"
        f" previous_secret_expires_at = CASE WHEN $4::float8 IS NULL THEN NULL"
        f"   ELSE clock_timestamp() + make_interval(secs => $4::float8) END,"
        f" secret = $3, updated_at = $5"
        f" WHERE id = $1 AND project_id = $2 RETURNING {_ENDPOINT_COLUMNS}",
        endpoint_id, project_id, secret, keep_old_for, updated_at)
    return _endpoint(row) if row is not None else None


async def delete_endpoint(conn: Conn, project_id: str, endpoint_id: str) -> bool:
    """Delete an endpoint and, with it, its deliveries and their log."""
    return await conn.fetchval("DELETE FROM webhook_endpoints WHERE id = $1 AND project_id = $2 RETURNING true",
                               endpoint_id, project_id) is not None


def _endpoint_filters(endpoint_id: str, **equals: str | None) -> tuple[str, list[str]]:
    """WHERE clause and arguments: this endpoint, plus each given column equal to its value."""
    where, args = ["endpoint_id = $1"], [endpoint_id]
    for column, value in equals.items():
        if value is not None:
            args.append(value)
            where.append(f"{column} = ${len(args)}")
    return " AND ".join(where), args


async def list_deliveries(conn: Conn, endpoint_id: str, page: PageParams, *, status: str | None,
                          event_id: str | None) -> tuple[list[DeliveryRecord], bool]:
    """A page of an endpoint's deliveries, optionally filtered."""
    where, args = _endpoint_filters(endpoint_id, status=status, event_id=event_id)
    result = await fetch_page(conn, select=f"{_DELIVERY_COLUMNS} FROM webhook_deliveries", where=where,
                              args=args, page=page)
    return [_delivery(r) for r in result.rows], result.has_more


async def list_attempts(conn: Conn, endpoint_id: str, page: PageParams, *, delivery_id: str | None,
                        event_id: str | None) -> tuple[list[AttemptRecord], bool]:
    """A page of an endpoint's delivery attempts (the delivery log), optionally for one delivery or event."""
    where, args = _endpoint_filters(endpoint_id, delivery_id=delivery_id, event_id=event_id)
    result = await fetch_page(conn, select=f"{_ATTEMPT_COLUMNS} FROM webhook_attempts", where=where,
                              args=args, page=page)
    return [_attempt(r) for r in result.rows], result.has_more


_RESET = ("status = 'pending', attempts = 0, next_attempt_at = clock_timestamp(), lease_owner = NULL,"
          " lease_expires_at = NULL, completed_at = NULL, updated_at = clock_timestamp()")


async def resend(conn: Tx, project_id: str, endpoint_id: str, event_id: str, *, delivery_id: str,
                 allowed_types: Sequence[str]) -> DeliveryRecord | None:
    """Deliver one event (again): reset its delivery, or create one from the event log; None if no such event."""
    row = await conn.fetchrow(
        f"UPDATE webhook_deliveries SET {_RESET} WHERE endpoint_id = $1 AND event_id = $2"
        f" RETURNING {_DELIVERY_COLUMNS}", endpoint_id, event_id)
    if row is None:
        event = await conn.fetchrow(
            "SELECT seq, key, type, occurred_at, envelope FROM events"
            " WHERE event_id = $1 AND project_id = $2 AND topic = $3 AND type = ANY($4::text[])",
            event_id, project_id, EVENTS, list(allowed_types))
        if event is None:
            return None
        occurred: datetime = event["occurred_at"]
        body = event_body(event_id=event_id, event_type=event["type"], created_at=int(occurred.timestamp()),
                          data=event["envelope"].get("data") or {})
        row = await conn.fetchrow(
            f"INSERT INTO webhook_deliveries (id, endpoint_id, project_id, event_id, event_type, ordering_key, seq,"
            f" body, event_created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
            f" ON CONFLICT (endpoint_id, event_id) DO UPDATE SET {_RESET}"
            f" RETURNING {_DELIVERY_COLUMNS}",
            delivery_id, endpoint_id, project_id, event_id, event["type"], event["key"], event["seq"],
            body.decode(), occurred)
    await announce_due(conn, project_id, endpoint_id)
    return _delivery(row) if row is not None else None


async def recover(conn: Tx, project_id: str, endpoint_id: str, *, since: datetime, until: datetime | None) -> int:
    """Queue every failed delivery of events since `since` (and before `until`) for delivery again."""
    ids = await conn.fetch(
        f"UPDATE webhook_deliveries SET {_RESET} WHERE endpoint_id = $1 AND status = 'failed'"
        f" AND event_created_at >= $2 AND ($3::timestamptz IS NULL OR event_created_at < $3) RETURNING id",
        endpoint_id, since, until)
    if ids:
        await announce_due(conn, project_id, endpoint_id)
    return len(ids)


async def announce_due(conn: Tx, project_id: str, endpoint_id: str) -> None:
    """Queue WebhookDeliveriesDue in the caller's transaction, so a notifier leases them at once (not at its timer)."""
    await append_events(conn, WEBHOOK_COMMANDS, [
        WebhookDeliveriesDue(endpoint_id=endpoint_id).envelope(project_id=project_id, key=endpoint_id)])
