"""Kafka fan-out for SSE: every gateway instance reads all public events and deltas and hands them to its clients.

One consumer per instance, no consumer group (all partitions assigned, nothing committed), positioned
at the end of every partition before the gateway serves a stream. Streams subscribe by thread (run
streams) or by project (`GET /v1/events`) and then replay from the `events` table, so nothing
committed before the subscription is missed and nothing after it is missed either.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from types import TracebackType
from typing import Self

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import ValidationError

from threadline_core.events import EventEnvelope
from threadline_core.topics import EVENTS, MESSAGE_DELTAS

_log = logging.getLogger(__name__)

DELTA_TYPES = frozenset({"thread.message.delta", "thread.run.step.delta"})


class Subscription:
    """One SSE client's inbox: a bounded queue; if the client falls that far behind it is cut off."""

    def __init__(self, *, thread_id: str | None, project_id: str | None, types: Iterable[str] | None,
                 maxsize: int) -> None:
        self.thread_id = thread_id
        self.project_id = project_id
        self.types = frozenset(types) if types else None
        self.queue: asyncio.Queue[EventEnvelope] = asyncio.Queue(maxsize)
        self.overflowed = False

    def wants(self, envelope: EventEnvelope) -> bool:
        """Project subscriptions: the type filter (deltas only when asked for by name)."""
        if self.types is not None:
            return envelope.type in self.types
        return envelope.type not in DELTA_TYPES

    def offer(self, envelope: EventEnvelope) -> None:
        """Queue without blocking the fan-out; a full queue marks the client as lost."""
        if self.overflowed:
            return
        try:
            self.queue.put_nowait(envelope)
        except asyncio.QueueFull:
            self.overflowed = True


class EventFanout:
    """Reads EVENTS and MESSAGE_DELTAS from the end and dispatches each record to matching subscriptions."""

    def __init__(self, *, bootstrap: str, registry: CollectorRegistry | None = None, queue_size: int = 10000,
                 fetch_max_wait_ms: int = 2, idle_fetch_max_wait_ms: int = 50, idle_after_seconds: float = 2.0) -> None:
        """`fetch_max_wait_ms` while anyone is subscribed or records flow (tansu answers a fetch only after
        its full long-poll bound), `idle_fetch_max_wait_ms` otherwise (nobody waits, so polling is relaxed)."""
        self._bootstrap = bootstrap
        self._queue_size = queue_size
        self._fetch_max_wait_ms = fetch_max_wait_ms
        self._idle_wait_ms = max(idle_fetch_max_wait_ms, fetch_max_wait_ms)
        self._idle_after = idle_after_seconds
        self._last_active = time.monotonic()
        self._idle = False
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._by_thread: dict[str, set[Subscription]] = {}
        self._by_project: dict[str, set[Subscription]] = {}
        self._subscribers = Gauge("threadline_sse_subscribers", "Open SSE streams on this gateway",
                                  registry=registry) if registry is not None else None
        self._dispatched = Counter("threadline_sse_fanout_records_total", "Records read by the SSE fan-out",
                                   ["topic"], registry=registry) if registry is not None else None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def start(self) -> None:
        """Assign every partition of both topics and position at their ends before serving streams."""
        consumer = AIOKafkaConsumer(bootstrap_servers=self._bootstrap, group_id=None, enable_auto_commit=False,
                                    auto_offset_reset="latest", fetch_max_wait_ms=self._fetch_max_wait_ms)
        await consumer.start()
        try:
            await consumer.topics()
            partitions: list[TopicPartition] = []
            for topic in (EVENTS, MESSAGE_DELTAS):
                for partition in sorted(consumer.partitions_for_topic(topic) or ()):
                    partitions.append(TopicPartition(topic, partition))
            if not partitions:
                raise RuntimeError(f"topics {EVENTS} and {MESSAGE_DELTAS} have no partitions")
            consumer.assign(partitions)
            await consumer.seek_to_end(*partitions)
            for tp in partitions:
                await consumer.position(tp)
        except BaseException:
            await consumer.stop()
            raise
        self._consumer = consumer
        self._task = asyncio.create_task(self._run(), name="sse-fanout")

    async def stop(self) -> None:
        """Stop reading."""
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer:
            await self._consumer.stop()

    def subscribe(self, *, thread_id: str | None = None, project_id: str | None = None,
                  types: Iterable[str] | None = None) -> Subscription:
        """Start receiving one thread's records (run streams) or a project's events (project stream)."""
        sub = Subscription(thread_id=thread_id, project_id=project_id, types=types, maxsize=self._queue_size)
        if thread_id is not None:
            self._by_thread.setdefault(thread_id, set()).add(sub)
        elif project_id is not None:
            self._by_project.setdefault(project_id, set()).add(sub)
        else:
            raise ValueError("subscribe needs a thread_id or a project_id")
        if self._subscribers is not None:
            self._subscribers.inc()
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Stop receiving (idempotent)."""
        index, key = (self._by_thread, sub.thread_id) if sub.thread_id is not None else \
            (self._by_project, sub.project_id)
        if key is None:
            return
        subs = index.get(key)
        if subs is not None and sub in subs:
            subs.discard(sub)
            if not subs:
                del index[key]
            if self._subscribers is not None:
                self._subscribers.dec()

    def dispatch(self, envelope: EventEnvelope) -> None:
        """Hand one record to every matching subscription."""
        thread = envelope.thread_id or envelope.key
        for sub in self._by_thread.get(thread, ()):
            sub.offer(envelope)
        for sub in self._by_project.get(envelope.project_id, ()):
            if sub.wants(envelope):
                sub.offer(envelope)

    def _pace(self, active: bool) -> None:
        """Short fetch long-polls while clients wait or records flow; relaxed after a quiet spell without clients."""
        now = time.monotonic()
        if active:
            self._last_active = now
            if self._idle:
                self._set_fetch_wait(self._fetch_max_wait_ms)
                self._idle = False
        elif not self._idle and now - self._last_active >= self._idle_after:
            self._set_fetch_wait(self._idle_wait_ms)
            self._idle = True

    def _set_fetch_wait(self, wait_ms: int) -> None:
        fetcher = getattr(self._consumer, "_fetcher", None)  # aiokafka reads it for every fetch request
        if fetcher is not None and hasattr(fetcher, "_fetch_max_wait_ms"):
            fetcher._fetch_max_wait_ms = wait_ms

    async def _run(self) -> None:
        assert self._consumer is not None
        while True:
            try:
                batches = await self._consumer.getmany(timeout_ms=1000, max_records=1000)
            except KafkaError:
                _log.exception("SSE fan-out fetch failed; retrying")
                await asyncio.sleep(0.5)
                continue
            self._pace(bool(batches) or bool(self._by_thread) or bool(self._by_project))
            # Deltas first: the orchestrator publishes a message's last delta before committing its completion.
            for tp, records in sorted(batches.items(), key=lambda item: item[0].topic != MESSAGE_DELTAS):
                if self._dispatched is not None:
                    self._dispatched.labels(topic=tp.topic).inc(len(records))
                if not (self._by_thread or self._by_project):
                    continue
                for record in records:
                    try:
                        envelope = EventEnvelope.from_bytes(record.value)
                    except (ValidationError, ValueError):
                        continue
                    self.dispatch(envelope)
