"""The lifecycle every service shares: pool, producer, outbox relay, consumers, ops server, signals."""

import asyncio
import contextlib
import logging
import signal
import uuid
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Self

import asyncpg
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry

from threadline_core.db import create_pool, run_migrations
from threadline_core.kafka import EventConsumer, Handler, create_producer, ensure_topics
from threadline_core.metrics import ServiceMetrics
from threadline_core.ops import OpsServer
from threadline_core.outbox import OutboxRelay
from threadline_core.readiness import broker_ready, database_ready
from threadline_core.settings import CoreSettings
from threadline_core.topics import ALL_TOPICS

_log = logging.getLogger(__name__)

ExtraCheck = Callable[[], Awaitable[bool]]


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
        self._consumers: list[EventConsumer] = []
        self._ops: OpsServer | None = None
        self._extra_checks: dict[str, ExtraCheck] = {}
        self._stopped = asyncio.Event()

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
        await ensure_topics(self.settings.kafka_bootstrap_servers, ALL_TOPICS, self.settings.topic_partitions)
        self._producer = create_producer(self.settings.kafka_bootstrap_servers)
        await self._producer.start()
        self._relay = OutboxRelay(pool=self._pool, producer=self._producer, dsn=self.settings.database_url,
                                  metrics=self.metrics)
        await self._relay.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        for consumer in self._consumers:
            with contextlib.suppress(Exception):
                await consumer.stop()
        if self._ops:
            await self._ops.stop()
        if self._relay:
            await self._relay.stop()
        if self._producer:
            await self._producer.stop()
        if self._pool:
            await self._pool.close()

    def add_readiness_check(self, name: str, check: ExtraCheck) -> None:
        """Add a dependency (e.g. qdrant) that /readyz must see reachable."""
        self._extra_checks[name] = check

    async def readiness(self) -> dict[str, bool]:
        """Broker, database and extra dependencies reachable right now."""
        checks = {"database": await database_ready(self.pool), "broker": await broker_ready(self.producer)}
        for name, check in self._extra_checks.items():
            try:
                checks[name] = await check()
            except Exception:
                checks[name] = False
        return checks

    async def add_consumer(self, *, group_id: str | None, topics: list[str], handler: Handler,
                           auto_offset_reset: str = "earliest") -> EventConsumer:
        """Start a consumer that the runtime stops (and commits) on shutdown."""
        consumer = EventConsumer(bootstrap=self.settings.kafka_bootstrap_servers, group_id=group_id,
                                 topics=topics, handler=handler, metrics=self.metrics,
                                 auto_offset_reset=auto_offset_reset)
        await consumer.start()
        self._consumers.append(consumer)
        return consumer

    async def serve_ops(self) -> None:
        """Serve /healthz, /readyz and /metrics on the service's port."""
        self._ops = OpsServer(host=self.settings.host, port=self.settings.port, registry=self.registry,
                              readiness=self.readiness)
        await self._ops.start()

    def request_stop(self) -> None:
        """Ask `wait_for_stop` to return (SIGTERM, SIGINT, tests)."""
        self._stopped.set()

    async def wait_for_stop(self) -> None:
        """Block until SIGTERM or SIGINT."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
        await self._stopped.wait()
        _log.info("%s stopping", self.instance_id)
