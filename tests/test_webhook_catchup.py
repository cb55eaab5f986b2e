"""The notifier's catch-up from the event log, on a private migrated database: it inserts the deliveries the live
path would have (never twice, never to endpoints younger than the event, disabled at the time or not subscribed),
only for events past the grace period and published, a bounded batch at a time, one instance at a time.

The database is its own (as in test_retention), so the stack's notifier never sees these rows.
"""

import asyncio
import uuid
from collections.abc import Sequence

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from notifier import repository
from notifier.catchup import CatchupPass, WebhookCatchup
from notifier.handlers import Handlers, new_event
from notifier.service import AttemptResult, Dispatcher, NotifierMetrics, Outcome, RetryPolicy
from notifier.subscriptions import Subscriptions
from threadline_core.events import EventEnvelope
from threadline_core.topics import EVENTS, WEBHOOK_COMMANDS

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

GRACE = 0.3
PROJECT = "proj_catchup"


class Notifier:
    """The live path's handlers and a catch-up over one pool; what the catch-up woke and counted."""

    def __init__(self, pool: asyncpg.Pool, *, batch: int = 1000) -> None:
        async def deliver(delivery_id: str, gate: asyncio.Semaphore, ready: object = None) -> AttemptResult:
            return AttemptResult(Outcome.SKIPPED)

        async def release(ids: Sequence[str]) -> None:
            return None

        async def successors(endpoint_id: str, ordering_key: str) -> list[repository.QueuedDelivery]:
            return []

        self.registry = CollectorRegistry()
        self.metrics = NotifierMetrics(self.registry)
        self.dispatcher = Dispatcher(deliver=deliver, release=release, successors=successors, concurrency=1,
                                     backlog=10)
        self.woken = 0
        self.handlers = Handlers(pool=pool, subscriptions=Subscriptions(pool=pool, dsn="unused"),
                                 dispatcher=self.dispatcher, policy=RetryPolicy([0.0]), owner="test",
                                 lease_seconds=60.0, wake=self._wake)
        self.catchup = WebhookCatchup(pool=pool, fan_out=self.handlers.fan_out, wake=self._wake, grace_seconds=GRACE,
                                      interval_seconds=3600, batch=batch, created=self.metrics.catchup_deliveries)

    def _wake(self) -> None:
        self.woken += 1

    @property
    def counted(self) -> float:
        """threadline_webhook_catchup_deliveries_total."""
        return self.registry.get_sample_value("threadline_webhook_catchup_deliveries_total") or 0.0

    async def settle(self) -> list[CatchupPass]:
        """Passes until a grace period has gone by twice: every event committed before is then checked."""
        passes = [await self.catchup.run_pass()]
        for _ in range(2):
            await asyncio.sleep(GRACE + 0.05)
            passes.append(await self.catchup.run_pass())
        return passes


async def _endpoint(conn: asyncpg.Connection, event_types: list[str], *, project: str = PROJECT,
                    status: str = "enabled") -> str:
    endpoint_id = f"we_{uuid.uuid4().hex[:12]}"
    await conn.execute(
        "INSERT INTO webhook_endpoints (id, project_id, url, name, event_types, secret, status, created_at,"
        " updated_at) VALUES ($1, $2, 'https://example.com/hook', 'test', $3, 'whsec_dGVzdA==', $4, 0, 0)",
        endpoint_id, project, event_types, status)
    return endpoint_id


async def _event(conn: asyncpg.Connection, event_type: str, *, project: str = PROJECT, pending: bool = False,
                 topic: str = EVENTS) -> EventEnvelope:
    """An event committed to the log (published, out of outbox_pending, unless `pending`)."""
    key = f"thread_{uuid.uuid4().hex[:8]}"
    envelope = EventEnvelope(type=event_type, project_id=project, key=key, thread_id=key,
                             data={"id": f"run_{uuid.uuid4().hex[:8]}", "object": "thread.run", "status": "x"})
    occurred = await conn.fetchval("SELECT clock_timestamp()")
    envelope = envelope.model_copy(update={"occurred_at": occurred})
    seq = await conn.fetchval(
        "INSERT INTO events (event_id, topic, key, type, project_id, thread_id, occurred_at, envelope)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8::text::jsonb) RETURNING seq",
        envelope.event_id, topic, key, event_type, project, key, occurred, envelope.model_dump_json())
    if not pending:
        await conn.execute("DELETE FROM outbox_pending WHERE seq = $1", seq)
    return envelope.model_copy(update={"sequence": seq})


async def _deliveries(conn: asyncpg.Connection) -> set[tuple[str, str]]:
    return {(r["endpoint_id"], r["event_id"]) for r in await conn.fetch(
        "SELECT endpoint_id, event_id FROM webhook_deliveries")}


async def test_the_catchup_inserts_only_what_the_live_path_missed(pool: asyncpg.Pool) -> None:
    """Lost events get a delivery for each endpoint that wants them; the live path's are not doubled; endpoints
    created after an event, disabled, disabled while it occurred, not subscribed or of another project get nothing."""
    notifier = Notifier(pool)
    async with pool.acquire() as conn:
        both = await _endpoint(conn, ["thread.run.completed", "thread.run.failed"])
        completed_only = await _endpoint(conn, ["thread.run.completed"])
        disabled = await _endpoint(conn, ["thread.run.completed"], status="disabled")
        toggled = await _endpoint(conn, ["thread.run.completed"])
        other_project = await _endpoint(conn, ["thread.run.completed"], project="proj_other")
        await conn.execute("UPDATE webhook_endpoints SET status = 'disabled' WHERE id = $1", toggled)
        live = await _event(conn, "thread.run.completed")
        lost = await _event(conn, "thread.run.completed")
        lost_failed = await _event(conn, "thread.run.failed")
        await _event(conn, "thread.run.step.created")  # not a webhook event type
        await _event(conn, "thread.run.completed", project="proj_nobody")  # no endpoint
        await _event(conn, "thread.run.completed", topic=WEBHOOK_COMMANDS)  # not a public event
        await conn.execute("UPDATE webhook_endpoints SET status = 'enabled' WHERE id = $1", toggled)
        younger = await _endpoint(conn, ["thread.run.completed", "thread.run.failed"])
        # The live path handled `live`: its deliveries exist (and `toggled`, re-enabled since, gets none of it).
        assert await notifier.handlers.fan_out(conn, new_event(live), may_lease=False) == 2
        delivered_live = {r["id"] for r in await conn.fetch("SELECT id FROM webhook_deliveries")}

    assert [p.created for p in await notifier.settle()] == [0, 3, 0]  # once past the grace period
    async with pool.acquire() as conn:
        assert await _deliveries(conn) == {
            (both, live.event_id), (completed_only, live.event_id),
            (both, lost.event_id), (completed_only, lost.event_id), (both, lost_failed.event_id)}
        assert delivered_live <= {r["id"] for r in await conn.fetch("SELECT id FROM webhook_deliveries")}
        row = await conn.fetchrow("SELECT body, seq, ordering_key, status, lease_owner FROM webhook_deliveries"
                                  " WHERE endpoint_id = $1 AND event_id = $2", both, lost.event_id)
        assert row is not None and row["body"] == new_event(lost).body  # the body the live path would send
        assert (row["seq"], row["ordering_key"], row["status"]) == (lost.sequence, lost.key, "pending")
        assert row["lease_owner"] is None  # the scheduler, woken, sends it
        assert {disabled, toggled, other_project, younger}.isdisjoint(e for e, _ in await _deliveries(conn))
    assert notifier.counted == 3 and notifier.woken == 1
    assert (await notifier.catchup.run_pass()).created == 0  # checked once: the watermark moved past them
    async with pool.acquire() as conn:
        await conn.execute("DELETE FROM webhook_deliveries")
    assert [p.created for p in await notifier.settle()] == [0, 0, 0]


async def test_the_catchup_waits_for_the_grace_period_and_the_relay(pool: asyncpg.Pool) -> None:
    """An event is past the grace period once it has been in the log that long and was not seen awaiting the relay
    meanwhile; events after one still awaiting it wait too."""
    notifier = Notifier(pool)
    async with pool.acquire() as conn:
        endpoint = await _endpoint(conn, ["thread.run.completed"])
        waiting = await _event(conn, "thread.run.completed", pending=True)
        after = await _event(conn, "thread.run.completed")
    assert (await notifier.catchup.run_pass()).created == 0  # too recent
    for _ in range(3):
        await asyncio.sleep(GRACE + 0.05)
        assert (await notifier.catchup.run_pass()).created == 0  # `waiting` is not published: neither goes
    async with pool.acquire() as conn:
        await conn.execute("DELETE FROM outbox_pending WHERE seq = $1", waiting.sequence)  # the relay sent it now
    assert (await notifier.catchup.run_pass()).created == 0  # the live path gets a grace period from now
    await asyncio.sleep(GRACE + 0.05)
    assert (await notifier.catchup.run_pass()).created == 2
    async with pool.acquire() as conn:
        assert await _deliveries(conn) == {(endpoint, waiting.event_id), (endpoint, after.event_id)}


async def test_the_catchup_checks_a_batch_at_a_time_one_instance_at_a_time(pool: asyncpg.Pool) -> None:
    """A pass checks at most `batch` events (and says more are settled); a pass that finds another instance's lock
    does nothing; a watermark behind the log's head (retention deleted events) is fine."""
    notifier = Notifier(pool, batch=2)
    async with pool.acquire() as conn:
        await _endpoint(conn, ["thread.run.completed"])
        pruned = [await _event(conn, "thread.run.completed") for _ in range(2)]
        await conn.execute("DELETE FROM events WHERE seq = ANY($1::bigint[])", [e.sequence for e in pruned])
        lost = [await _event(conn, "thread.run.completed") for _ in range(5)]
    await notifier.catchup.run_pass()
    await asyncio.sleep(GRACE + 0.05)
    async with pool.acquire() as holder, holder.transaction():
        await holder.execute("SELECT pg_advisory_xact_lock($1)", repository.CATCHUP_LOCK)
        assert await notifier.catchup.run_pass() == CatchupPass()
    first = await notifier.catchup.run_pass()
    assert (first.created, first.more, first.checked_seq) == (2, True, lost[1].sequence)
    second = await notifier.catchup.run_pass()
    assert (second.created, second.more, second.checked_seq) == (2, True, lost[3].sequence)
    third = await notifier.catchup.run_pass()
    assert (third.created, third.more, third.checked_seq) == (1, False, lost[4].sequence)
    assert notifier.counted == 5 and notifier.woken == 3
