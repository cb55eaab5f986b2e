"""Event log retention on the real Postgres: old events and idempotency claims are forgotten, nothing else is;
and a run whose events were forgotten still ends its stream (through the real stack).

The retention pass runs on a database of its own (migrated), so the services' relays never see its rows.
"""

import time
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import openai
import pytest
from prometheus_client import CollectorRegistry
from run_helpers import start, wait_for

from threadline_core.metrics import ServiceMetrics
from threadline_core.retention import EventLogRetention
from threadline_devstack.sql import Db

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

DAY = 86400.0


async def _add_event(conn: asyncpg.Connection, age_days: float, *, pending: bool = False) -> int:
    """An event `age_days` old; published (out of outbox_pending, as the relay leaves it) unless `pending`."""
    seq: int = await conn.fetchval(
        "INSERT INTO events (event_id, topic, key, type, project_id, occurred_at, envelope)"
        " VALUES ($1, 'threadline.events', 'k', 'test.event', 'proj_test', $2, '{}') RETURNING seq",
        f"evt_{uuid.uuid4().hex}", datetime.now(UTC) - timedelta(days=age_days))
    if not pending:
        await conn.execute("DELETE FROM outbox_pending WHERE seq = $1", seq)
    return seq


async def _add_claim(conn: asyncpg.Connection, age_days: float) -> str:
    event_id = f"evt_{uuid.uuid4().hex}"
    await conn.execute("INSERT INTO processed_events (consumer, event_id, processed_at) VALUES ('test', $1, $2)",
                       event_id, datetime.now(UTC) - timedelta(days=age_days))
    return event_id


async def test_retention_forgets_old_published_events_and_claims_only(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        old = [await _add_event(conn, 40) for _ in range(3)]
        old_pending = await _add_event(conn, 40, pending=True)
        recent = await _add_event(conn, 1)
        skewed_old = await _add_event(conn, 45)  # a later seq with an older clock: still old
        newest_old = await _add_event(conn, 40)  # the newest event is kept whatever its age
        old_claims = [await _add_claim(conn, 40) for _ in range(2)]
        recent_claim = await _add_claim(conn, 1)
    registry = CollectorRegistry()
    metrics = ServiceMetrics(registry, "test")
    retention = EventLogRetention(pool=pool, retention_seconds=30 * DAY, interval_seconds=3600,
                                  pruned_rows=metrics.pruned_rows)
    pruned = await retention.prune()
    async with pool.acquire() as conn:
        left = {r["seq"] for r in await conn.fetch("SELECT seq FROM events")}
        claims = {r["event_id"] for r in await conn.fetch("SELECT event_id FROM processed_events")}
    assert left == {old_pending, recent, newest_old}, (old, skewed_old)
    assert claims == {recent_claim}, old_claims
    assert (pruned.events, pruned.claims) == (4, 2)
    assert registry.get_sample_value("threadline_event_log_pruned_rows_total", {"table": "events"}) == 4
    assert registry.get_sample_value("threadline_event_log_pruned_rows_total", {"table": "processed_events"}) == 2
    assert (await retention.prune()).events == 0


async def test_retention_waits_while_another_pass_holds_the_lock(pool: asyncpg.Pool) -> None:
    """One instance prunes at a time: a pass that finds the lock taken deletes nothing and returns."""
    async with pool.acquire() as conn:
        await _add_event(conn, 40)
        await _add_event(conn, 1)
    retention = EventLogRetention(pool=pool, retention_seconds=30 * DAY, interval_seconds=3600,
                                  pruned_rows=ServiceMetrics(CollectorRegistry(), "test").pruned_rows)
    async with pool.acquire() as holder, holder.transaction():
        await holder.execute("SELECT pg_advisory_xact_lock(7254311003)")
        assert (await retention.prune()).events == 0
    assert (await retention.prune()).events == 1


def test_a_run_whose_events_were_forgotten_still_ends_its_stream(client: openai.OpenAI, db: Db,
                                                                 marker: str) -> None:
    """Following a run past the retention period gives its terminal state from the run itself and `done`,
    instead of beating forever for an event that was deleted."""
    assistant = client.beta.assistants.create(model="gpt-4o-mini")
    thread_id, run = start(client, assistant.id, f"[[reply:kept]] {marker}")
    assert wait_for(client, thread_id, run.id).status == "completed"
    db.execute("DELETE FROM events WHERE run_id = $1", run.id)  # what retention does 30 days later
    with httpx.stream("GET", f"{client.base_url}threads/{thread_id}/runs/{run.id}/events", timeout=20,
                      headers={"Authorization": f"Bearer {client.api_key}"}, trust_env=False) as response:
        assert response.status_code == 200
        lines: list[str] = []
        deadline = time.monotonic() + 15  # heartbeats would keep a stream that never ends open
        for line in response.iter_lines():
            if line.startswith(("event:", "data:")):
                lines.append(line)
            if line == "data: [DONE]" or time.monotonic() > deadline:
                break
    assert lines[0] == "event: thread.run.completed" and f'"id":"{run.id}"' in lines[1]
    assert lines[-2:] == ["event: done", "data: [DONE]"]
