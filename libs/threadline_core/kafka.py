"""aiokafka helpers: topic creation, the producer, and a consumer loop that commits after handling."""

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from pydantic import ValidationError

from threadline_core.events import EventEnvelope
from threadline_core.logging import log_context
from threadline_core.metrics import ServiceMetrics

_log = logging.getLogger(__name__)

Handler = Callable[[EventEnvelope], Awaitable[None]]


async def ensure_topics(bootstrap: str, topics: Iterable[str], partitions: int) -> None:
    """Create the topics that are missing (idempotent, safe to race)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [NewTopic(t, num_partitions=partitions, replication_factor=1) for t in topics
                   if t not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(missing)
    finally:
        await admin.close()


def create_producer(bootstrap: str, *, acks: int | str = "all") -> AIOKafkaProducer:
    """A producer without idempotence/transactions (exactly-once comes from outbox + idempotent consumers)."""
    return AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False, acks=acks, linger_ms=0,
                            request_timeout_ms=15000)


async def publish(producer: AIOKafkaProducer, topic: str, envelope: EventEnvelope,
                  metrics: ServiceMetrics | None = None) -> None:
    """Send one envelope outside the outbox (only for ephemeral data such as streaming deltas)."""
    await producer.send_and_wait(topic, envelope.to_bytes(), key=envelope.key.encode())
    if metrics:
        metrics.events_produced.labels(topic=topic).inc()


class EventConsumer:
    """Consume envelopes in a group: partitions in parallel, each in order; commit after the handler."""

    def __init__(self, *, bootstrap: str, group_id: str | None, topics: list[str], handler: Handler,
                 metrics: ServiceMetrics | None = None, auto_offset_reset: str = "earliest",
                 max_records: int = 200, retry_backoff_max: float = 5.0) -> None:
        self._consumer = AIOKafkaConsumer(
            *topics,
            bootstrap_servers=bootstrap,
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset=auto_offset_reset,
            fetch_max_wait_ms=50,
            session_timeout_ms=10000,
            heartbeat_interval_ms=1000,
            max_poll_interval_ms=300000,
        )
        self._handler = handler
        self._metrics = metrics
        self._max_records = max_records
        self._retry_backoff_max = retry_backoff_max
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._group_id = group_id

    @property
    def consumer(self) -> AIOKafkaConsumer:
        """The underlying aiokafka consumer (for lag metrics and assignment checks)."""
        return self._consumer

    async def start(self) -> None:
        """Join the group and start handling in the background."""
        await self._consumer.start()
        self._task = asyncio.create_task(self._run(), name=f"consumer-{self._group_id}")

    async def stop(self) -> None:
        """Finish the batch in hand, commit it, leave the group."""
        self._stopping.set()
        if self._task:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._consumer.stop()

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                batches = await self._consumer.getmany(timeout_ms=200, max_records=self._max_records)
            except KafkaError:
                _log.exception("fetch failed; retrying")
                await asyncio.sleep(1.0)
                continue
            if not batches:
                continue
            results = await asyncio.gather(*(self._handle_partition(tp, records)
                                             for tp, records in batches.items()))
            offsets = {tp: off for tp, off in zip(batches, results, strict=True) if off is not None}
            if offsets and self._group_id is not None:
                try:
                    await self._consumer.commit(offsets)
                except KafkaError:
                    _log.exception("offset commit failed; records will be redelivered and skipped as seen")

    async def _handle_partition(self, tp: TopicPartition, records: list[ConsumerRecord]) -> int | None:
        """Handle records in order; return the offset to commit (next to read), None if none done."""
        next_offset: int | None = None
        for record in records:
            if not await self._handle_record(record):
                self._consumer.seek(tp, record.offset)
                return next_offset
            next_offset = record.offset + 1
        return next_offset

    async def _handle_record(self, record: ConsumerRecord) -> bool:
        try:
            envelope = EventEnvelope.from_bytes(record.value)
        except (ValidationError, ValueError):
            _log.error("skipping undecodable record %s[%s]@%s", record.topic, record.partition, record.offset)
            return True
        delay = 0.05
        while True:
            with log_context(event_id=envelope.event_id, run_id=envelope.run_id, thread_id=envelope.thread_id):
                try:
                    await self._handler(envelope)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    _log.exception("handler failed for %s; retrying in %.2fs", envelope.type, delay)
                else:
                    if self._metrics:
                        self._metrics.events_consumed.labels(topic=record.topic).inc()
                    return True
            if self._stopping.is_set():
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._retry_backoff_max)
