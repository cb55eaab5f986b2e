"""The outbox relay on the real Postgres and broker: one leader publishes each committed event once, in
seq order; another relay takes over when the leader stops or its database session dies.

Each test gets its own database (migrated) and topic on the stack's servers, so the services' relays
never see these rows.
"""

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from threadline_core.db import create_pool, run_migrations
from threadline_core.events import EventEnvelope
from threadline_core.kafka import create_producer, ensure_topics
from threadline_core.outbox import OutboxRelay, append_events
from threadline_devstack.stack import Stack

RELAY_LOCK = 7_254_311_002
"""The relay's advisory lock key (threadline_core.outbox)."""


@dataclass
class RelayEnv:
    """A private database and topic on the stack's servers."""

    dsn: str
    bootstrap: str
    topic: str
    pool: asyncpg.Pool
    consumer: AIOKafkaConsumer
    producers: list[AIOKafkaProducer]
    made: int = 0

    def relay(self, *, sweep_interval: float, batch_size: int = 500, stall_seconds: float = 10.0) -> OutboxRelay:
        """A relay with its own producer, as in its own process."""
        producer = self.producers[self.made]
        self.made += 1
        return OutboxRelay(pool=self.pool, producer=producer, dsn=self.dsn, sweep_interval=sweep_interval,
                           batch_size=batch_size, stall_seconds=stall_seconds)


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


@pytest.fixture
async def env(stack: Stack) -> AsyncIterator[RelayEnv]:
    name = f"threadline_relay_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(_with_database(stack.database_url, "postgres"))
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = _with_database(stack.database_url, name)
    topic = f"threadline.test.relay.{uuid.uuid4().hex[:8]}"
    pool = None
    consumer = None
    producers: list[AIOKafkaProducer] = []
    try:
        await run_migrations(dsn)
        await ensure_topics(stack.kafka_bootstrap_servers, [topic], 3)
        pool = await create_pool(dsn, min_size=1, max_size=4)
        producers = [create_producer(stack.kafka_bootstrap_servers) for _ in range(3)]
        for producer in producers:
            await producer.start()
        consumer = AIOKafkaConsumer(bootstrap_servers=stack.kafka_bootstrap_servers, group_id=None,
                                    enable_auto_commit=False, auto_offset_reset="earliest", fetch_max_wait_ms=20)
        await consumer.start()
        await consumer.topics()
        consumer.assign([TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())])
        yield RelayEnv(dsn, stack.kafka_bootstrap_servers, topic, pool, consumer, producers)
    finally:
        if consumer is not None:
            await consumer.stop()
        for producer in producers:
            await producer.stop()
        if pool is not None:
            await pool.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def commit_events(env: RelayEnv, thread: str, count: int) -> list[str]:
    """One transaction appending `count` events keyed by `thread`; returns their ids."""
    envelopes = [EventEnvelope(type="test.event", project_id="proj_test", key=thread, thread_id=thread,
                               data={"n": i}) for i in range(count)]
    async with env.pool.acquire() as conn, conn.transaction():
        await append_events(conn, env.topic, envelopes)
    return [e.event_id for e in envelopes]


async def read_until(env: RelayEnv, seen: list[dict[str, object]], total: int, within: float = 20.0) -> None:
    """Consume the test topic until `total` records were read (or time out)."""
    async def loop() -> None:
        while len(seen) < total:
            batches = await env.consumer.getmany(timeout_ms=200)
            for records in batches.values():
                seen.extend(orjson.loads(r.value) for r in records)
    await asyncio.wait_for(loop(), within)


async def _none_pending(env: RelayEnv) -> bool:
    return bool(await env.pool.fetchval("SELECT count(*) = 0 FROM outbox_pending"))


async def eventually(predicate: Callable[[], Awaitable[bool]], within: float = 10.0) -> bool:
    """Poll an async predicate until it is true or the timeout passes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(0.05)
    return await predicate()


async def test_one_leader_publishes_each_event_once_in_seq_order(env: RelayEnv) -> None:
    first, second = env.relay(sweep_interval=0.2), env.relay(sweep_interval=0.2)
    await first.start()
    await second.start()
    try:
        ids = await commit_events(env, "thread_a", 2) + await commit_events(env, "thread_b", 1)
        ids += await commit_events(env, "thread_a", 3)
        seen: list[dict[str, object]] = []
        await read_until(env, seen, len(ids))
        await asyncio.sleep(0.5)  # anything published twice would arrive by now
        seen.extend(orjson.loads(r.value) for rs in (await env.consumer.getmany(timeout_ms=500)).values() for r in rs)
        assert sorted(str(e["event_id"]) for e in seen) == sorted(ids)  # every event, once
        assert [first.leader, second.leader].count(True) == 1
        rows = await env.pool.fetch("SELECT seq, event_id FROM events ORDER BY seq")
        seq_of = {r["event_id"]: r["seq"] for r in rows}
        assert all(e["sequence"] == seq_of[e["event_id"]] for e in seen)  # the envelope carries its seq
        for thread in ("thread_a", "thread_b"):  # order per key (one partition each)
            seqs = [int(str(e["sequence"])) for e in seen if e["thread_id"] == thread]
            assert seqs == sorted(seqs)
        assert await eventually(lambda: _none_pending(env))  # marked once Kafka acknowledged
    finally:
        await first.stop()
        await second.stop()


async def test_batches_follow_each_other_in_order_and_leave_the_queue(env: RelayEnv) -> None:
    relay = env.relay(sweep_interval=60.0, batch_size=4)  # many batches per drain, the next read while acks wait
    await relay.start()
    try:
        ids: list[str] = []
        for _ in range(5):
            ids += await commit_events(env, "thread_e", 5)
        seen: list[dict[str, object]] = []
        await read_until(env, seen, len(ids))
        await asyncio.sleep(0.5)  # anything published twice would arrive by now
        seen.extend(orjson.loads(r.value) for rs in (await env.consumer.getmany(timeout_ms=500)).values() for r in rs)
        assert [e["event_id"] for e in seen] == ids  # once each, in commit order (one key, one partition)
        assert [e["data"] for e in seen] == [{"n": i % 5} for i in range(len(ids))]  # the envelope as stored
        assert await eventually(lambda: _none_pending(env))  # acknowledged rows leave the queue soon after
    finally:
        await relay.stop()


async def test_rows_of_writers_that_skip_append_events_are_queued_too(env: RelayEnv) -> None:
    relay = env.relay(sweep_interval=0.2)  # the previous version's writers insert into events directly
    await relay.start()
    try:
        envelope = EventEnvelope(type="test.event", project_id="proj_test", key="thread_f", data={"n": 1})
        await env.pool.execute(
            "INSERT INTO events (event_id, topic, key, type, project_id, thread_id, run_id, occurred_at, envelope)"
            " VALUES ($1, $2, $3, $4, $5, NULL, NULL, $6, $7)", envelope.event_id, env.topic, envelope.key,
            envelope.type, envelope.project_id, envelope.occurred_at, envelope.model_dump(mode="json"))
        seen: list[dict[str, object]] = []
        await read_until(env, seen, 1)
        assert [e["event_id"] for e in seen] == [envelope.event_id]
        assert await eventually(lambda: _none_pending(env))
    finally:
        await relay.stop()


async def test_an_event_too_large_for_kafka_does_not_hold_up_the_others(env: RelayEnv) -> None:
    relay = env.relay(sweep_interval=0.2)
    await relay.start()
    try:
        huge = EventEnvelope(type="test.event", project_id="proj_test", key="thread_g",
                             data={"text": "x" * (2 * 1024 * 1024)})  # over the producer's 1 MiB: never publishable
        await env.pool.execute(  # written past append_events' own size check, as an older writer could
            "INSERT INTO events (event_id, topic, key, type, project_id, thread_id, run_id, occurred_at, envelope)"
            " VALUES ($1, $2, $3, $4, $5, NULL, NULL, $6, $7)", huge.event_id, env.topic, huge.key,
            huge.type, huge.project_id, huge.occurred_at, huge.model_dump(mode="json"))
        ids = await commit_events(env, "thread_g", 2)
        seen: list[dict[str, object]] = []
        await read_until(env, seen, len(ids))
        assert [e["event_id"] for e in seen] == ids
        assert await eventually(lambda: _none_pending(env))
        assert await env.pool.fetchval("SELECT count(*) FROM events WHERE event_id = $1", huge.event_id) == 1
    finally:
        await relay.stop()


async def test_another_relay_takes_over_when_the_leader_stops(env: RelayEnv) -> None:
    leader = env.relay(sweep_interval=0.2)
    await leader.start()
    assert await eventually(lambda: _is_leader(leader))  # start() returns before the first lock attempt
    standby = env.relay(sweep_interval=60.0)  # takes over on the leader's release notice, not its sweep
    await standby.start()
    try:
        assert leader.leader and not standby.leader
        ids = await commit_events(env, "thread_a", 2)
        seen: list[dict[str, object]] = []
        await read_until(env, seen, 2)
        await leader.stop()
        assert await eventually(lambda: _is_leader(standby))
        ids += await commit_events(env, "thread_a", 2)
        await read_until(env, seen, 4)
        assert sorted(str(e["event_id"]) for e in seen) == sorted(ids)
        assert await eventually(lambda: _none_pending(env))  # marked once Kafka acknowledged
    finally:
        await standby.stop()


async def test_a_dead_leader_session_hands_over_and_nothing_is_lost(env: RelayEnv) -> None:
    leader = env.relay(sweep_interval=0.2)
    await leader.start()
    assert await eventually(lambda: _is_leader(leader))  # start() returns before the first lock attempt
    standby = env.relay(sweep_interval=0.2)
    await standby.start()
    try:
        assert leader.leader
        pid = await env.pool.fetchval(  # the session holding the relay lock
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND ((classid::bigint << 32) | objid::bigint) = $1", RELAY_LOCK)
        assert pid is not None
        await env.pool.execute("SELECT pg_terminate_backend($1)", pid)
        ids = await commit_events(env, "thread_c", 3)
        seen: list[dict[str, object]] = []
        await read_until(env, seen, 3)
        assert sorted(str(e["event_id"]) for e in seen) == sorted(ids)
        assert await eventually(lambda: _one_leader(leader, standby))
        assert await eventually(lambda: _none_pending(env))  # marked once Kafka acknowledged
    finally:
        await leader.stop()
        await standby.stop()


async def test_a_frozen_leader_is_ousted_and_its_events_published(env: RelayEnv) -> None:
    """A SIGSTOPped leader keeps its session, so its lock: the standby ends that session once it ran nothing for
    `stall_seconds` with an event as old waiting (the chaos trial: 15-40 s without one event published)."""
    frozen = await asyncpg.connect(env.dsn)  # a frozen leader, as Postgres sees it: an idle session with the lock
    assert await frozen.fetchval("SELECT pg_try_advisory_lock($1)", RELAY_LOCK)
    standby = env.relay(sweep_interval=0.2, stall_seconds=1.0)
    await standby.start()
    try:
        ids = await commit_events(env, "thread_h", 3)
        seen: list[dict[str, object]] = []
        await read_until(env, seen, 3)
        assert sorted(str(e["event_id"]) for e in seen) == sorted(ids)
        assert standby.leader
        assert await eventually(lambda: _none_pending(env))
        with pytest.raises((asyncpg.InterfaceError, asyncpg.PostgresConnectionError, OSError)):
            await frozen.fetchval("SELECT 1")  # its session was ended
    finally:
        await standby.stop()
        frozen.terminate()


async def test_a_live_leader_is_not_ousted(env: RelayEnv) -> None:
    leader = env.relay(sweep_interval=0.2)
    await leader.start()
    assert await eventually(lambda: _is_leader(leader))
    standby = env.relay(sweep_interval=0.1, stall_seconds=1.5)
    await standby.start()
    try:
        ids: list[str] = []
        for _ in range(10):  # idle spells and commits, for longer than the standby's stall_seconds
            ids += await commit_events(env, "thread_i", 1)
            await asyncio.sleep(0.3)
        seen: list[dict[str, object]] = []
        await read_until(env, seen, len(ids))
        assert leader.leader and not standby.leader
    finally:
        await standby.stop()
        await leader.stop()


async def test_stopping_the_only_relay_publishes_what_is_pending(env: RelayEnv) -> None:
    ids = await commit_events(env, "thread_d", 2)  # committed before any relay runs
    relay = env.relay(sweep_interval=60.0)
    await relay.start()
    await relay.stop()
    assert await _none_pending(env)  # stop() returns after marking
    seen: list[dict[str, object]] = []
    await read_until(env, seen, 2)
    assert sorted(str(e["event_id"]) for e in seen) == sorted(ids)


async def _is_leader(relay: OutboxRelay) -> bool:
    return bool(relay.leader)


async def _one_leader(*relays: OutboxRelay) -> bool:
    return [r.leader for r in relays].count(True) == 1
