"""The lifecycle every service shares: pool, producer, outbox relay, consumers, ops server, signals."""

import asyncio
import contextlib
import faulthandler
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Self

import asyncpg
from aiokafka import AIOKafkaProducer, ConsumerRecord
from prometheus_client import CollectorRegistry

from threadline_core.db import create_pool, run_migrations, storable_text
from threadline_core.events import EventEnvelope
from threadline_core.kafka import Accept, EventConsumer, Handler, KeyOf, Park, create_producer, ensure_topics
from threadline_core.logging import register_secrets, secret_values
from threadline_core.metrics import ServiceMetrics
from threadline_core.ops import OpsServer
from threadline_core.outbox import OutboxRelay
from threadline_core.readiness import broker_topics, database_ready
from threadline_core.retention import EventLogRetention
from threadline_core.settings import CoreSettings
from threadline_core.topics import ALL_TOPICS

_log = logging.getLogger(__name__)

ExtraCheck = Callable[[], Awaitable[bool]]
ShutdownHook = Callable[[], Awaitable[None]]

WATCHDOG_MARGIN_SECONDS = 10.0
"""A service still running this long after its grace period dumps its threads and tasks and exits."""


class ServiceRuntime:
    """Owns a service's shared resources and starts/stops them in the right order."""

    def __init__(self, settings: CoreSettings, service: str) -> None:
        self.settings = settings
        self.service = service
        self.instance_id = settings.instance_id or f"{service}-{uuid.uuid4().hex[:8]}"
        self.registry = CollectorRegistry()
        self.metrics = ServiceMetrics(self.registry, service)
        self._pool: asyncpg.Pool | None = None
        self._producer: AIOKafkaProducer | None = None
        self._relay: OutboxRelay | None = None
        self._retention: EventLogRetention | None = None
        self._consumers: list[EventConsumer] = []
        self._ops: OpsServer | None = None
        self._extra_checks: dict[str, ExtraCheck] = {}
        self._stopped = asyncio.Event()
        self._stop_deadline: float | None = None
        self._shutdown_hooks: list[ShutdownHook] = []
        self._topics_task: asyncio.Task[None] | None = None
        register_secrets(secret_values(settings))

    @property
    def pool(self) -> asyncpg.Pool:
        """The database pool (available inside the `async with`)."""
        assert self._pool is not None, "runtime not started"
        return self._pool

    @property
    def producer(self) -> AIOKafkaProducer:
        """The Kafka producer (available inside the `async with`)."""
        assert self._producer is not None, "runtime not started"
        return self._producer

    async def __aenter__(self) -> Self:
        await run_migrations(self.settings.database_url)
        self._pool = await create_pool(self.settings.database_url, min_size=self.settings.db_pool_min_size,
                                       max_size=self.settings.db_pool_max_size)
        await ensure_topics(self.settings.kafka_bootstrap_servers, ALL_TOPICS, self.settings.topic_partitions,
                            self.settings.topic_replication_factor)
        self._producer = create_producer(self.settings.kafka_bootstrap_servers)
        await self._producer.start()
        self._relay = OutboxRelay(pool=self._pool, producer=self._producer, dsn=self.settings.database_url,
                                  metrics=self.metrics, stall_seconds=self.settings.outbox_leader_stall_seconds)
        await self._relay.start()
        self._retention = EventLogRetention(
            pool=self._pool, retention_seconds=self.settings.event_retention_days * 86400,
            interval_seconds=self.settings.event_retention_interval_seconds, pruned_rows=self.metrics.pruned_rows)
        await self._retention.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        """Graceful stop within THREADLINE_SHUTDOWN_GRACE_SECONDS of the stop request.

        Order: readiness turns false; shutdown hooks (services hand back in-flight work); consumers
        finish their batch and commit (or, past their share of the grace, are cancelled uncommitted so
        the group redelivers); the outbox relay publishes what is committed (what it cannot is
        published by the next relay); then producer, ops server and pool close.
        """
        self.request_stop()
        for hook in reversed(self._shutdown_hooks):
            await self._bounded(hook(), "shutdown hook", share=0.5)
        if self._consumers:
            budget = max(0.5, self.remaining_grace() * 0.7)
            results = await asyncio.gather(*(c.stop(grace=budget) for c in self._consumers), return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    _log.warning("consumer stop failed: %r", result)
        if self._topics_task:
            self._topics_task.cancel()
        if self._retention:
            await self._retention.stop()
        if self._relay:
            await self._bounded(self._relay.stop(), "outbox relay", share=0.6)
        if self._producer:
            await self._bounded(self._producer.stop(), "producer", share=0.8)
        if self._ops:
            await self._bounded(self._ops.stop(), "ops server", share=0.9)
        if self._pool:
            if not await self._bounded(self._pool.close(), "database pool", share=1.0):
                self._pool.terminate()
        _log.info("%s stopped", self.instance_id)

    def remaining_grace(self) -> float:
        """Seconds left of THREADLINE_SHUTDOWN_GRACE_SECONDS since the stop request (full grace before it)."""
        if self._stop_deadline is None:
            return self.settings.shutdown_grace_seconds
        return max(0.0, self._stop_deadline - time.monotonic())

    def on_shutdown(self, hook: ShutdownHook) -> None:
        """Run `hook` first on shutdown (last added, first run), bounded by half the remaining grace."""
        self._shutdown_hooks.append(hook)

    @property
    def stopping(self) -> bool:
        """True once a stop was requested (SIGTERM, SIGINT, `request_stop`, leaving the `async with`)."""
        return self._stopped.is_set()

    async def _bounded(self, step: Awaitable[object], what: str, *, share: float) -> bool:
        """Await `step` for at most `share` of the remaining grace; False (step cancelled) if it ran over."""
        try:
            async with asyncio.timeout(max(0.2, self.remaining_grace() * share)):
                await step
            return True
        except TimeoutError:
            _log.warning("%s did not stop within the grace period; abandoned", what)
        except Exception:
            _log.exception("%s failed while stopping", what)
        return False

    def add_readiness_check(self, name: str, check: ExtraCheck) -> None:
        """Add a dependency (e.g. qdrant) that /readyz must see reachable."""
        self._extra_checks[name] = check

    async def readiness(self) -> dict[str, bool]:
        """Broker (with our topics), database and extra dependencies reachable right now, every consumer in its group
        (first assignment received) and fetching; false once stopping."""
        topics = await broker_topics(self.producer)
        checks = {"database": await database_ready(self.pool),
                  "broker": topics is not None and set(ALL_TOPICS) <= topics}
        if topics is not None and not checks["broker"]:
            self._recreate_topics()
        if self._consumers:
            checks["consumers_joined"] = all(c.joined for c in self._consumers)
            checks["consumers"] = all(c.unfetched_seconds() < self.settings.consumer_stall_seconds
                                      for c in self._consumers)
        if self.stopping:
            checks["accepting_work"] = False
        for name, check in self._extra_checks.items():
            try:
                checks[name] = await check()
            except Exception:
                checks[name] = False
        return checks

    async def add_consumer(self, *, group_id: str | None, topics: list[str], handler: Handler,
                           auto_offset_reset: str = "earliest",
                           independent_keys: bool = False, key_concurrency: int = 1,
                           commit_interval: float = 0.0, fetch_max_wait_ms: int | None = None,
                           accept: Accept | None = None, key_of: KeyOf | None = None,
                           tenant_of: KeyOf | None = None, max_records: int = 200) -> EventConsumer:
        """Start a consumer that the runtime stops (and commits) on shutdown (see EventConsumer's options); it joins
        its group in the background, and /readyz fails (check `consumers_joined`) until it has.

        `fetch_max_wait_ms`: None for THREADLINE_KAFKA_FETCH_MAX_WAIT_MS; a consumer whose records nobody
        waits for (webhooks) can poll less often with a larger bound."""
        consumer = EventConsumer(bootstrap=self.settings.kafka_bootstrap_servers, group_id=group_id,
                                 topics=topics, handler=handler, metrics=self.metrics,
                                 auto_offset_reset=auto_offset_reset,
                                 independent_keys=independent_keys,
                                 fetch_max_wait_ms=fetch_max_wait_ms or self.settings.kafka_fetch_max_wait_ms,
                                 idle_fetch_max_wait_ms=self.settings.kafka_idle_fetch_max_wait_ms,
                                 idle_after_seconds=self.settings.kafka_idle_after_seconds,
                                 key_concurrency=key_concurrency, commit_interval=commit_interval, accept=accept,
                                 key_of=key_of, tenant_of=tenant_of, max_records=max_records,
                                 session_timeout_ms=self.settings.kafka_session_timeout_ms,
                                 park=self._dead_letter_parker(group_id or self.service))
        await consumer.start()
        self._consumers.append(consumer)
        return consumer

    def _dead_letter_parker(self, group: str) -> Park:
        """Park a poisonous record of `group` in the `dead_letters` table (again: its newest error)."""
        async def park(record: ConsumerRecord, envelope: EventEnvelope, error: BaseException, attempts: int) -> None:
            await self.pool.execute(
                "INSERT INTO dead_letters (consumer_group, topic, partition, record_offset, record_key, value,"
                " event_id, event_type, error, attempts) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
                " ON CONFLICT (consumer_group, topic, partition, record_offset) DO UPDATE SET error = EXCLUDED.error,"
                " attempts = dead_letters.attempts + EXCLUDED.attempts, parked_at = now(), replayed_at = NULL",
                group, record.topic, record.partition, record.offset, record.key, record.value or b"",
                storable_text(envelope.event_id), storable_text(envelope.type),
                storable_text(f"{type(error).__name__}: {error}")[:4000],
                attempts)
        return park

    async def serve_ops(self) -> None:
        """Serve /healthz, /readyz and /metrics on the service's port (services talk to each other only over Kafka)."""
        self._ops = OpsServer(host=self.settings.host, port=self.settings.port, registry=self.registry,
                              readiness=self.readiness)
        await self._ops.start()

    def _recreate_topics(self) -> None:
        """The broker answers but lost our topics (a restarted in-memory dev broker): create them again."""
        if self._topics_task is not None and not self._topics_task.done():
            return
        _log.warning("broker is missing Threadline topics; creating them")
        self._topics_task = asyncio.create_task(self._ensure_topics(), name="ensure-topics")

    async def _ensure_topics(self) -> None:
        try:
            await ensure_topics(self.settings.kafka_bootstrap_servers, ALL_TOPICS, self.settings.topic_partitions,
                                self.settings.topic_replication_factor)
        except Exception:
            _log.exception("could not create the topics; /readyz will try again")

    def request_stop(self) -> None:
        """Ask `wait_for_stop` to return (SIGTERM, SIGINT, tests); starts the shutdown grace period."""
        if self._stop_deadline is None:
            self._stop_deadline = time.monotonic() + self.settings.shutdown_grace_seconds
            self._arm_watchdog()
        self._stopped.set()

    def _arm_watchdog(self) -> None:
        """Guarantee the exit: past grace + margin, log where it hangs and leave (an orchestrator would SIGKILL)."""
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        timer = threading.Timer(self.settings.shutdown_grace_seconds + WATCHDOG_MARGIN_SECONDS, self._force_exit,
                                args=(loop,))
        timer.daemon = True
        timer.start()

    def _force_exit(self, loop: asyncio.AbstractEventLoop | None) -> None:
        _log.error("%s did not stop within its grace period; dumping threads and tasks to stderr, then exiting",
                   self.instance_id)
        with contextlib.suppress(Exception):
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            for task in asyncio.all_tasks(loop) if loop is not None else ():
                task.print_stack(limit=8, file=sys.stderr)
            sys.stderr.flush()
        os._exit(70)

    async def wait_for_stop(self) -> None:
        """Block until SIGTERM or SIGINT."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
        await self._stopped.wait()
        _log.info("%s stopping", self.instance_id)
