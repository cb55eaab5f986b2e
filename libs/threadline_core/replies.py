"""Kafka request/reply: ask the service that holds some state and wait for its answer (vector search, for the gateway).

The asker sends a `ServiceRequest` carrying a request id, `reply_to` (its own id, the replies' Kafka key) and a
deadline, directly with the producer (a read: no outbox), then waits for the `ServiceReplied` records with that
request id. Its reply consumer reads every partition of the replies topic without a group (nothing committed),
from where they ended when it started, so it only ever sees replies sent after it was ready; replies keyed for
other instances are skipped on their key, undecoded. After `idle_pause_seconds` with nothing waiting the
partitions are paused (no fetches, no CPU); the next request first seeks them to their end, which is before its
own reply. The answering side replies with `send_reply`, which splits long `items` into records of at most
`REPLY_PART_BYTES` (a file's chunks can be megabytes; Kafka refuses records over 1 MB).
"""

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Self

import orjson
from aiokafka import AIOKafkaProducer, ConsumerRecord
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from threadline_core.events import EventEnvelope, ServiceReplied, ServiceRequest
from threadline_core.ids import new_id
from threadline_core.kafka import TopicTail, create_producer
from threadline_core.metrics import RequestMetrics
from threadline_core.topics import SEARCH_REPLIES, SEARCH_REQUESTS

_log = logging.getLogger(__name__)

REPLY_PART_BYTES = 256 * 1024
"""Most JSON bytes of `items` in one reply record: far below Kafka's default 1 MB limit, envelope included."""


class NoReply(Exception):
    """The request got no answer: the caller should tell its own client to retry later."""


class ReplyTimeout(NoReply, TimeoutError):
    """No whole reply within the timeout (the answering service is down, overloaded or slow)."""


class RequestNotSent(NoReply):
    """The broker could not take the request."""


@dataclass
class _Waiting:
    """One request in flight: its future and the parts of its reply received so far."""

    future: asyncio.Future[ServiceReplied]
    reply_id: str | None = None
    parts: dict[int, ServiceReplied] = field(default_factory=dict)


def split_reply(reply: ServiceReplied, part_bytes: int = REPLY_PART_BYTES) -> list[ServiceReplied]:
    """`reply` as parts whose `items` stay within `part_bytes` of JSON each (one item may exceed it alone)."""
    groups: list[list[dict[str, Any]]] = [[]]
    size = 0
    for item in reply.items:
        length = len(orjson.dumps(item))
        if groups[-1] and size + length > part_bytes:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += length
    return [reply.model_copy(update={"items": items, "part": i, "parts": len(groups)})
            for i, items in enumerate(groups)]


def join_reply(parts: dict[int, ServiceReplied]) -> ServiceReplied | None:
    """The whole reply once every part of it is there, else None."""
    if not parts:
        return None
    first = next(iter(parts.values()))
    if any(i not in parts for i in range(first.parts)):
        return None
    items = [item for i in range(first.parts) for item in parts[i].items]
    return parts[0].model_copy(update={"items": items, "part": 0, "parts": 1})


async def send_reply(producer: AIOKafkaProducer, topic: str, reply: ServiceReplied, *, project_id: str,
                     reply_to: str, part_bytes: int = REPLY_PART_BYTES) -> int:
    """Produce `reply` (in parts) keyed by the asker; returns how many records were sent."""
    key = reply_to.encode()
    sent = [await producer.send(topic, part.envelope(project_id=project_id, key=reply_to).to_bytes(), key=key)
            for part in split_reply(reply, part_bytes)]
    await asyncio.gather(*sent)
    return len(sent)


class ReplyClient:
    """Sends requests to one topic and hands each caller the reply with its request id from another."""

    def __init__(self, *, bootstrap: str, producer: AIOKafkaProducer, requests_topic: str, replies_topic: str,
                 reply_to: str, metrics: RequestMetrics | None = None, fetch_max_wait_ms: int = 6,
                 idle_pause_seconds: float = 5.0) -> None:
        """`reply_to`: this instance's id, unique among askers (a shared id still works, only with more decoding).

        `fetch_max_wait_ms` bounds each fetch while replies are awaited (small for tansu, which holds an empty
        fetch for its whole bound)."""
        self._producer = producer
        self._requests_topic = requests_topic
        self._reply_to = reply_to
        self._key = reply_to.encode()
        self._metrics = metrics
        self._idle_pause = idle_pause_seconds
        self._replies = TopicTail(bootstrap=bootstrap, topics=[replies_topic], fetch_max_wait_ms=fetch_max_wait_ms,
                                  name="reply-client")
        self._waiting: dict[str, _Waiting] = {}
        self._task: asyncio.Task[None] | None = None
        self._last_active = time.monotonic()

    @property
    def reply_to(self) -> str:
        """The key this client's replies carry."""
        return self._reply_to

    @property
    def paused(self) -> bool:
        """True while nothing waits and nothing is fetched."""
        return self._replies.paused

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def start(self) -> None:
        """Assign every partition of the replies topic at its end (positions known) before any request."""
        await self._replies.start()
        self._last_active = time.monotonic()
        self._task = asyncio.create_task(self._run(), name="reply-client")

    async def stop(self) -> None:
        """Stop reading; callers still waiting get ReplyTimeout."""
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for waiting in self._waiting.values():
            if not waiting.future.done():
                waiting.future.set_exception(ReplyTimeout("shutting down"))
        await self._replies.stop()

    async def call(self, request: ServiceRequest, *, project_id: str, wait_seconds: float) -> ServiceReplied:
        """Send `request` (its reply_to and deadline set here) and return its whole reply, error replies included.

        Raises ReplyTimeout when no whole reply came within `wait_seconds` (also the request's deadline, after
        which the answering side skips it), RequestNotSent when the broker refused the request."""
        operation = request.OPERATION
        started = time.monotonic()
        request = request.model_copy(update={"reply_to": self._reply_to,
                                             "deadline": datetime.now(UTC) + timedelta(seconds=wait_seconds)})
        waiting = _Waiting(asyncio.get_running_loop().create_future())
        self._waiting[request.request_id] = waiting
        if self._metrics:
            self._metrics.pending.inc()
        outcome = "timeout"
        try:
            async with asyncio.timeout(wait_seconds):
                await self._replies.catch_up()  # fetching from before the request: its reply cannot be missed
                envelope = request.envelope(project_id=project_id, key=request.request_id)
                await self._producer.send_and_wait(self._requests_topic, envelope.to_bytes(),
                                                   key=request.request_id.encode())
                reply = await waiting.future
            outcome = "error" if reply.error is not None else "ok"
            return reply
        except TimeoutError:
            raise ReplyTimeout(f"no reply to {request.request_id} within {wait_seconds:g}s") from None
        except KafkaError as exc:
            outcome = "unsent"
            raise RequestNotSent(f"{type(exc).__name__}: {exc}") from exc
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            del self._waiting[request.request_id]
            self._last_active = time.monotonic()
            if self._metrics:
                self._metrics.pending.dec()
                self._metrics.requests.labels(operation=operation, outcome=outcome).inc()
                self._metrics.duration.labels(operation=operation).observe(time.monotonic() - started)

    def _pause_if_idle(self) -> None:
        if not self._waiting and time.monotonic() - self._last_active >= self._idle_pause:
            self._replies.pause()

    def _route(self, record: ConsumerRecord[bytes, bytes]) -> None:
        """Hand a reply part of this instance's to the request waiting for it (others are dropped)."""
        if record.key != self._key:
            return
        try:
            envelope = EventEnvelope.model_validate(orjson.loads(record.value or b""))
            if envelope.type != ServiceReplied.TYPE:
                return
            part = ServiceReplied.parse(envelope)
        except (ValidationError, ValueError):
            _log.warning("skipping an undecodable reply at %s[%s]@%s", record.topic, record.partition, record.offset)
            return
        waiting = self._waiting.get(part.request_id)
        if waiting is None or waiting.future.done() or waiting.reply_id not in (None, part.reply_id):
            if self._metrics:
                self._metrics.late_replies.inc()
            return
        waiting.reply_id = part.reply_id
        waiting.parts[part.part] = part
        whole = join_reply(waiting.parts)
        if whole is not None:
            waiting.future.set_result(whole)

    async def _run(self) -> None:
        while True:
            try:
                batches = await self._replies.getmany(timeout_ms=500)
            except KafkaError:
                _log.exception("reply fetch failed; retrying")
                await asyncio.sleep(0.5)
                continue
            for records in batches.values():
                for record in records:
                    self._route(record)
            self._pause_if_idle()


async def ask_once(bootstrap: str, request: ServiceRequest, *, project_id: str, wait_seconds: float = 30.0,
                   requests_topic: str = SEARCH_REQUESTS, replies_topic: str = SEARCH_REPLIES) -> ServiceReplied:
    """One request with a producer and client of its own, for scripts, tests and benchmarks (a service keeps one
    ReplyClient for its lifetime instead)."""
    producer = create_producer(bootstrap)
    await producer.start()
    try:
        async with ReplyClient(bootstrap=bootstrap, producer=producer, requests_topic=requests_topic,
                               replies_topic=replies_topic, reply_to=new_id("asker")) as client:
            return await client.call(request, project_id=project_id, wait_seconds=wait_seconds)
    finally:
        await producer.stop()
