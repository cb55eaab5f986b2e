"""Kafka fan-out for SSE: every gateway instance reads all public events and deltas and hands them to its clients.

One consumer per instance, no consumer group (all partitions assigned, nothing committed). While
nobody is subscribed its partitions are paused (no fetch requests, no decoding); the first subscriber
seeks every partition to its end and resumes them, and `subscribe` returns only once the positions are
known. Streams subscribe by thread (run streams) or by project (`GET /v1/events`) and then replay from
the `events` table, so nothing committed before the subscription is missed and nothing after it is
missed either. Records are decoded only when a subscriber may want them: every thread-scoped record is
keyed by its thread id (DESIGN: topics), so the Kafka key alone rules out records of other threads.
"""

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from types import TracebackType
from typing import Self

import orjson
from aiokafka import ConsumerRecord
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import ValidationError

from threadline_core.events import EventEnvelope
from threadline_core.kafka import TopicTail
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
        self.queue: asyncio.Queue[EventEnvelope | None] = asyncio.Queue(maxsize)
        """Records in order; None after `close`."""
        self.overflowed = False
        self.closed = False

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

    def close(self) -> None:
        """End the stream after what is queued (the client resumes elsewhere with Last-Event-ID)."""
        self.closed = True
        try:
            self.queue.put_nowait(None)
        except asyncio.QueueFull:
            self.overflowed = True


class EventFanout:
    """Reads EVENTS and MESSAGE_DELTAS from the end and dispatches each record to matching subscriptions."""

    def __init__(self, *, bootstrap: str, registry: CollectorRegistry | None = None, queue_size: int = 10000,
                 fetch_max_wait_ms: int = 2) -> None:
        """`fetch_max_wait_ms` bounds each fetch long-poll while anyone is subscribed (tansu answers a fetch
        only after its full bound); with nobody subscribed the partitions are paused and nothing is fetched."""
        self._queue_size = queue_size
        self._tail = TopicTail(bootstrap=bootstrap, topics=[EVENTS, MESSAGE_DELTAS],
                               fetch_max_wait_ms=fetch_max_wait_ms, name="sse-fanout")
        self._count = 0
        self._task: asyncio.Task[None] | None = None
        self._by_thread: dict[str, set[Subscription]] = {}
        self._by_project: dict[str, set[Subscription]] = {}
        self._projects_ended = False
        self._runs_ended = False
        self._ending_runs: asyncio.TimerHandle | None = None
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
        await self._tail.start()
        self._tail.pause()  # until the first subscriber
        self._task = asyncio.create_task(self._run(), name="sse-fanout")

    async def stop(self) -> None:
        """Stop reading."""
        if self._ending_runs is not None:
            self._ending_runs.cancel()
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._tail.stop()

    @property
    def paused(self) -> bool:
        """True while nobody is subscribed and nothing is fetched."""
        return self._tail.paused

    async def subscribe(self, *, thread_id: str | None = None, project_id: str | None = None,
                        types: Iterable[str] | None = None) -> Subscription:
        """Start receiving one thread's records (run streams) or a project's events (project stream).

        Returns once the consumer reads every partition from a position no later than the call, so a
        replay from the `events` table done afterwards leaves no gap.
        """
        sub = Subscription(thread_id=thread_id, project_id=project_id, types=types, maxsize=self._queue_size)
        if thread_id is not None:
            self._by_thread.setdefault(thread_id, set()).add(sub)
        elif project_id is not None:
            self._by_project.setdefault(project_id, set()).add(sub)
        else:
            raise ValueError("subscribe needs a thread_id or a project_id")
        self._count += 1
        if self._subscribers is not None:
            self._subscribers.inc()
        ended = self._runs_ended if thread_id is not None else self._projects_ended
        if ended:
            sub.close()  # the gateway is stopping: the stream replays what it can, then ends
        try:
            await self._tail.catch_up(lambda: self._count > 0)
        except BaseException:
            self.unsubscribe(sub)
            raise
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
            self._count -= 1
            if self._subscribers is not None:
                self._subscribers.dec()
            if not self._count:
                self._tail.pause()

    def end_project_streams(self) -> None:
        """Close every project subscription (`GET /v1/events`, which never ends by itself): at shutdown, so
        that the server need not wait its whole grace period for those clients."""
        self._projects_ended = True
        for subs in self._by_project.values():
            for sub in subs:
                sub.close()

    def end_run_streams(self, after: float) -> None:
        """At shutdown: close every run subscription `after` seconds from now (short runs still end on their own
        connection), before uvicorn's graceful period is over and it cancels the responses still streaming."""
        if self._ending_runs is None:
            self._ending_runs = asyncio.get_running_loop().call_later(max(0.0, after), self._end_run_streams)

    def _end_run_streams(self) -> None:
        """Close the run subscriptions (and those still to come): their streams end without `done`, and their
        clients resume with Last-Event-ID on another instance."""
        self._runs_ended = True
        for subs in self._by_thread.values():
            for sub in subs:
                sub.close()

    def dispatch(self, envelope: EventEnvelope) -> None:
        """Hand one record to every matching subscription."""
        thread = envelope.thread_id or envelope.key
        for sub in self._by_thread.get(thread, ()):
            sub.offer(envelope)
        for sub in self._by_project.get(envelope.project_id, ()):
            if sub.wants(envelope):
                sub.offer(envelope)

    def _route(self, record: ConsumerRecord[bytes, bytes]) -> None:
        """Decode and dispatch a record only when its thread (the Kafka key) or its project has a subscriber."""
        try:
            if not self._by_project and (record.key is None or record.key.decode() not in self._by_thread):
                return
            raw = orjson.loads(record.value or b"")
            if not isinstance(raw, dict) or ((raw.get("thread_id") or raw.get("key")) not in self._by_thread
                                             and raw.get("project_id") not in self._by_project):
                return
            envelope = EventEnvelope.model_validate(raw)
        except (ValidationError, ValueError, TypeError):
            return
        self.dispatch(envelope)

    async def _run(self) -> None:
        while True:
            try:
                batches = await self._tail.getmany(timeout_ms=1000)
            except KafkaError:
                _log.exception("SSE fan-out fetch failed; retrying")
                await asyncio.sleep(0.5)
                continue
            # Deltas first: the orchestrator publishes a message's last delta before committing its completion.
            for tp, records in sorted(batches.items(), key=lambda item: item[0].topic != MESSAGE_DELTAS):
                if self._dispatched is not None:
                    self._dispatched.labels(topic=tp.topic).inc(len(records))
                for record in records:
                    self._route(record)
