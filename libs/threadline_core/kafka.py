"""aiokafka helpers: topic creation, the producer, and a consumer loop that commits after handling."""

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from pydantic import ValidationError

from threadline_core.events import EventEnvelope
from threadline_core.logging import log_context
from threadline_core.metrics import ServiceMetrics
from threadline_core.slots import FairSlots

_log = logging.getLogger(__name__)

Handler = Callable[[EventEnvelope], Awaitable[None]]
Accept = Callable[[dict[str, Any]], bool]
"""Looks at a record's decoded JSON object before the envelope is built: False skips the record."""
KeyOf = Callable[[dict[str, Any]], str | None]
"""`independent_keys`: the ordering key of a record, from its decoded JSON object (None: the record's Kafka key)."""
Park = Callable[[ConsumerRecord, EventEnvelope, BaseException, int], Awaitable[None]]
"""Stores a record whose handler keeps failing on its data (dead letter), given the last error and attempts."""


def project_of(event: dict[str, Any]) -> str | None:
    """The project of a decoded envelope: the tenant for `EventConsumer(tenant_of=...)`."""
    project = event.get("project_id")
    return project if isinstance(project, str) else None


DATA_ERRORS: tuple[type[BaseException], ...] = (asyncpg.DataError, ValueError, TypeError, KeyError, IndexError,
                                                 AttributeError)
"""Failures the same record causes every time (bad data, a bug it triggers); outages (connections, timeouts,
the database or broker away) are not among them and are retried for as long as they last."""
SPAN_PER_RECORD_LIMIT = 50
"""`independent_keys`: a partition also pauses when this many times `max_records` offsets lie between its lowest
unfinished record and the last one taken (handled records there cost only their offset until it commits)."""


async def ensure_topics(bootstrap: str, topics: Iterable[str], partitions: int, replication_factor: int = 1) -> None:
    """Create the topics that are missing (idempotent, safe to race)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [NewTopic(t, num_partitions=partitions, replication_factor=replication_factor) for t in topics
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
                 max_records: int = 200, retry_backoff_max: float = 5.0,
                 independent_keys: bool = False, fetch_max_wait_ms: int = 500,
                 idle_fetch_max_wait_ms: int | None = None, idle_after_seconds: float = 2.0,
                 key_concurrency: int = 1, commit_interval: float = 0.0, accept: Accept | None = None,
                 park: Park | None = None, park_after_attempts: int = 5, key_of: KeyOf | None = None,
                 tenant_of: KeyOf | None = None, session_timeout_ms: int = 6000) -> None:
        """`independent_keys`: records of one key (a thread; with `key_of`, a file) are handled in order, each key in
        its own task, at most `key_concurrency` records at once; the partitions keep being fetched meanwhile, so
        a slow record (a long tool call, a file that takes minutes to parse) holds back only the later records
        of its own key. Offsets are committed up to each partition's lowest unfinished record; a partition with
        `max_records` records waiting is paused until it has fewer. `key_of` orders records by a finer key than
        the Kafka one (a file within its vector store). `tenant_of` (e.g. `project_of`): a freed slot goes to the
        waiting record of the tenant that holds the fewest (`FairSlots`), so one project's burst of slow records
        does not queue every other project's behind all of it.

        `idle_fetch_max_wait_ms`: the fetch long-poll bound grows from `fetch_max_wait_ms` with the time
        since the last record, linearly, reaching this after `idle_after_seconds` (back to
        `fetch_max_wait_ms` at the first record). A broker that holds a fetch up to its bound (tansu) is
        then polled a few times a second instead of hundreds when nothing happens, and a record after a
        quiet spell waits at most a small share of that spell. None: always `fetch_max_wait_ms`.

        `key_concurrency` > 1 (without `independent_keys`): records of one batch with different keys (thread
        ids) are handled concurrently, at most this many at once over the consumer; records of one key stay
        strictly in order, and the next batch waits for the whole of this one. The batch's offsets are
        committed up to its lowest unfinished record (a stop that leaves a record unhandled redelivers it and
        everything after it; handlers are idempotent). 1: in order.

        `commit_interval` > 0: handled offsets are committed at most this often (and when stopping)
        instead of after every batch; a commit costs ~0.4 ms of client and broker CPU. A crash or a
        rebalance redelivers at most that much more (handlers are idempotent). Not with
        `independent_keys`, which commits as its records finish.

        `accept`: records it rejects (given the decoded JSON object) are consumed without building their
        envelope or calling the handler, a fraction of the CPU for a consumer that ignores most of a topic.

        `park`: a record whose handler failed `park_after_attempts` times in a row with a data error
        (`DATA_ERRORS`) is handed to it and counts as consumed, so one poisonous record does not hold up its
        partition forever. Other failures are retried until they pass; so is parking, if it fails."""
        self._consumer = AIOKafkaConsumer(
            *(topics if group_id is None else ()),  # a group's topics are subscribed in `start`, with a listener
            bootstrap_servers=bootstrap,
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset=auto_offset_reset,
            fetch_max_wait_ms=fetch_max_wait_ms,
            session_timeout_ms=session_timeout_ms,
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
        self._topics = list(topics)
        self._joined = asyncio.Event()
        self._lag_labels: set[tuple[str, str, str]] = set()
        self._lag_task: asyncio.Task[None] | None = None
        self._next_to_handle: dict[TopicPartition, int] = {}
        self._unfetched_since: dict[TopicPartition, float] = {}
        self._independent = independent_keys
        self._busy_wait_ms = fetch_max_wait_ms
        self._idle_wait_ms = max(idle_fetch_max_wait_ms or fetch_max_wait_ms, fetch_max_wait_ms)
        self._idle_after = idle_after_seconds
        self._last_active = time.monotonic()
        self._wait_ms = fetch_max_wait_ms
        self._commit_interval = commit_interval
        self._uncommitted: dict[TopicPartition, int] = {}
        self._last_commit = time.monotonic()
        self._key_slots = asyncio.Semaphore(max(1, key_concurrency)) \
            if key_concurrency > 1 or independent_keys else None
        self._accept = accept
        self._key_of = key_of
        self._tenant_of = tenant_of
        self._fair_slots = FairSlots(max(1, key_concurrency)) if tenant_of is not None and independent_keys else None
        self._park = park
        self._park_after = max(1, park_after_attempts)

    @property
    def consumer(self) -> AIOKafkaConsumer:
        """The underlying aiokafka consumer (for lag metrics and assignment checks)."""
        return self._consumer

    @property
    def joined(self) -> bool:
        """True once the group gave this member its first assignment (possibly of no partition: more members than
        partitions); at once without a group. Until then the member consumes nothing: /readyz waits for it."""
        return self._joined.is_set()

    async def start(self) -> None:
        """Connect and start handling in the background; the group is joined in the background too (see `joined`),
        so a service serves /healthz and /readyz meanwhile (a join takes seconds: half the session timeout on tansu)."""
        await self._consumer.start()
        if self._group_id is None:
            self._joined.set()
        else:
            self._consumer.subscribe(self._topics, listener=_JoinListener(self._joined))
        loop = self._run_independent_keys() if self._independent else self._run()
        self._task = asyncio.create_task(loop, name=f"consumer-{self._group_id}")
        self._lag_task = asyncio.create_task(self._lag_loop(), name=f"consumer-lag-{self._group_id}")

    async def stop(self, grace: float | None = None) -> None:
        """Finish the batch in hand, commit it, leave the group.

        After `grace` seconds the batch is cancelled instead: its offsets are not committed, so the
        group hands those records to another member (handlers are idempotent).
        """
        self._stopping.set()
        if self._lag_task:
            self._lag_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lag_task
        if self._task and not self._joined.is_set():
            self._task.cancel()  # still joining: nothing taken, nothing to commit (aiokafka waits for the assignment)
        if self._task:
            try:
                async with asyncio.timeout(grace):
                    await asyncio.shield(self._task)
            except TimeoutError:
                _log.warning("consumer %s did not finish its batch in %.1fs; handing it back", self._group_id,
                             grace)
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            except asyncio.CancelledError:
                if (caller := asyncio.current_task()) is not None and caller.cancelling():
                    raise  # whoever called stop is cancelled, not only the batch
        await self._consumer.stop()
        self._clear_lag()

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                batches = await self._consumer.getmany(timeout_ms=200, max_records=self._max_records)
            except KafkaError:
                _log.exception("fetch failed; retrying")
                await asyncio.sleep(1.0)
                continue
            self._pace(bool(batches))
            if batches:
                results = await asyncio.gather(*(self._handle_partition(tp, records)
                                                 for tp, records in batches.items()))
                self._last_active = time.monotonic()
                if self._group_id is not None:
                    self._uncommitted.update((tp, off) for tp, off in zip(batches, results, strict=True)
                                             if off is not None)
            if self._uncommitted and time.monotonic() - self._last_commit >= self._commit_interval:
                await self._commit()
        if self._uncommitted:
            await self._commit()

    async def _commit(self) -> None:
        """Commit the handled offsets of the partitions still assigned (one round trip for all)."""
        assigned = self._consumer.assignment()
        offsets = {tp: off for tp, off in self._uncommitted.items() if tp in assigned}
        self._uncommitted = {}
        self._last_commit = time.monotonic()
        if not offsets:
            return
        try:
            await self._consumer.commit(offsets)
        except KafkaError:
            _log.exception("offset commit failed; records will be redelivered and skipped as seen")

    async def _run_independent_keys(self) -> None:
        """Fetch continuously; every key's records run in order in a task of their own (see `independent_keys`)."""
        flows: dict[TopicPartition, _PartitionFlow] = {}
        drains: set[asyncio.Task[None]] = set()
        try:
            while not self._stopping.is_set():
                try:
                    batches = await self._consumer.getmany(timeout_ms=200, max_records=self._max_records)
                except KafkaError:
                    _log.exception("fetch failed; retrying")
                    await asyncio.sleep(1.0)
                    continue
                self._pace(bool(batches))  # a long handler alone is no reason to poll fast
                assigned = self._consumer.assignment()
                for tp in [tp for tp in flows if tp not in assigned]:  # revoked: drains stop after their record
                    flows[tp].revoked = True
                    if not flows[tp].active:
                        del flows[tp]
                for tp, records in batches.items():
                    previous = flows.get(tp)
                    if previous is not None and previous.revoked and previous.active:
                        self._consumer.seek(tp, records[0].offset)  # assigned again: first let the old drains end
                        continue
                    if previous is None or previous.revoked or self._log_replaced(tp, previous, records[0].offset):
                        flows[tp] = _PartitionFlow(records[0].offset)
                    flow = flows[tp]
                    for record in records:
                        if record.offset < flow.next_offset:
                            continue  # fetched again: already taken
                        key = self._ordering_key(record)
                        if flow.take(record, key):
                            drain = asyncio.create_task(self._drain(flow, key),
                                                        name=f"consumer-{self._group_id}-{tp.topic}-{tp.partition}")
                            drains.add(drain)
                            drain.add_done_callback(drains.discard)
                self._apply_backpressure(flows, assigned)
                await self._commit_flows(flows)
        except asyncio.CancelledError:
            for drain in drains:
                drain.cancel()
            await asyncio.gather(*drains, return_exceptions=True)
            raise
        await asyncio.gather(*drains, return_exceptions=True)
        await self._commit_flows(flows)

    async def _rewind_replaced_logs(self) -> None:
        """Fetch from the start again the partitions whose log now ends before our position (each pass of `_lag_loop`).

        A broker that came back empty (tansu restarted: its storage is memory) numbers its records from 0 again; tansu
        answers a fetch beyond the end with nothing, no error, so the consumer would wait, past every new record, until
        the new log grew to where the old one was. Within one log the fetch position never passes the high watermark.
        """
        for tp in self._consumer.assignment():
            try:
                highwater = self._consumer.highwater(tp)
                if highwater is None:
                    continue
                async with asyncio.timeout(1.0):
                    position = await self._consumer.position(tp)
            except (TimeoutError, KafkaError, AssertionError):
                continue
            if position > highwater:
                _log.warning("partition %s-%d ends at offset %d, before our position %d: the broker lost its log;"
                             " fetching it from the start", tp.topic, tp.partition, highwater, position)
                await self._consumer.seek_to_beginning(tp)

    def _log_replaced(self, tp: TopicPartition, flow: "_PartitionFlow", first_offset: int) -> bool:
        """True when the partition's log is no longer the one `flow` took from, so its records below `next_offset`
        are new, not fetched again: a broker that came back empty (tansu restarted) numbers them from 0 again.

        Seen as a fetch below the offset the group had committed for us, or a log ending before the records taken.
        The old flow's drains finish what they hold (the broker lost those records; nobody else has them) and are
        never committed; a fresh flow takes the new log."""
        highwater = self._consumer.highwater(tp)
        if first_offset >= flow.committed and (highwater is None or highwater >= flow.next_offset):
            return False
        _log.warning("partition %s-%d starts again at offset %d (had taken up to %d): the broker lost its log; taking"
                     " the new one from there", tp.topic, tp.partition, first_offset, flow.next_offset - 1)
        return True

    def _ordering_key(self, record: ConsumerRecord) -> bytes | None:
        """The key whose records run in order: `key_of`'s answer, else (or for an undecodable record) the Kafka key."""
        if self._key_of is not None:
            with contextlib.suppress(ValueError):
                decoded = orjson.loads(record.value)
                key = self._key_of(decoded) if isinstance(decoded, dict) else None
                if key is not None:
                    return key.encode()
        key_bytes: bytes | None = record.key
        return key_bytes

    def _slot(self, record: ConsumerRecord) -> contextlib.AbstractAsyncContextManager[Any]:
        """A slot to handle `record` in: shared fairly between its tenant and the others' when `tenant_of` is set."""
        assert self._key_slots is not None
        if self._fair_slots is None or self._tenant_of is None:
            return self._key_slots
        tenant = None
        with contextlib.suppress(ValueError):
            decoded = orjson.loads(record.value)
            tenant = self._tenant_of(decoded) if isinstance(decoded, dict) else None
        return self._fair_slots.slot(tenant or "")

    async def _drain(self, flow: "_PartitionFlow", key: bytes | None) -> None:
        """Handle one key's queued records in order, each holding a slot, until none is left or the consumer stops."""
        assert self._key_slots is not None
        queue = flow.queues[key]
        try:
            while queue and not self._stopping.is_set() and not flow.revoked:
                record = queue[0]
                async with self._slot(record):
                    if not await self._handle_record(record):
                        return
                queue.popleft()
                flow.finish(record.offset)
        except Exception:  # a bug, not a handler failure (those are retried): this key stops here until a restart
            _log.exception("handling key %r stopped", key)
            return
        finally:
            flow.active -= 1
        if not queue:
            del flow.queues[key]

    def _apply_backpressure(self, flows: dict[TopicPartition, "_PartitionFlow"], assigned: set[TopicPartition]) -> None:
        """Pause a partition with `max_records` records waiting (or far more handled above a stuck one, or the
        drains of an earlier assignment still running); resume it once below."""
        paused = self._consumer.paused()
        for tp, flow in flows.items():
            if tp not in assigned:
                continue
            full = (flow.revoked and flow.active > 0) or flow.waiting >= self._max_records \
                or flow.span >= SPAN_PER_RECORD_LIMIT * self._max_records
            if full and tp not in paused:
                self._consumer.pause(tp)
            elif not full and tp in paused:
                self._consumer.resume(tp)

    async def _commit_flows(self, flows: dict[TopicPartition, "_PartitionFlow"]) -> None:
        """Commit every partition up to its lowest unfinished record, where that moved (one round trip)."""
        moved = {tp: flow.position for tp, flow in flows.items()
                 if not flow.revoked and flow.position > flow.committed}
        self._next_to_handle.update(moved)
        if not moved or self._group_id is None:
            return
        try:
            await self._consumer.commit(moved)
        except KafkaError:
            _log.exception("offset commit failed; records will be redelivered and skipped as seen")
            return
        for tp, offset in moved.items():
            flows[tp].committed = offset

    def _pace(self, active: bool) -> None:
        """Poll at the short bound while records flow, at a bound growing with the quiet time otherwise."""
        if self._idle_wait_ms == self._busy_wait_ms:
            return
        now = time.monotonic()
        if active:
            self._last_active = now
        quiet = min(1.0, (now - self._last_active) / self._idle_after) if self._idle_after > 0 else 1.0
        wait_ms = self._busy_wait_ms + int((self._idle_wait_ms - self._busy_wait_ms) * quiet)
        if wait_ms != self._wait_ms:
            self._set_fetch_wait(wait_ms)
            self._wait_ms = wait_ms

    def _set_fetch_wait(self, wait_ms: int) -> None:
        # aiokafka reads the bound from its fetcher for every fetch request it builds.
        fetcher = getattr(self._consumer, "_fetcher", None)
        if fetcher is not None and hasattr(fetcher, "_fetch_max_wait_ms"):
            fetcher._fetch_max_wait_ms = wait_ms

    def unfetched_seconds(self) -> float:
        """How long the longest-waiting partition assigned to this member has gone without a fetch answered.

        Zero when every assigned partition was fetched since its assignment. A member whose offset fetches or
        fetches keep failing (a broker that lost the group's committed offsets) never gets a record and says so
        nowhere else: /readyz reports it past THREADLINE_CONSUMER_STALL_SECONDS."""
        if not self._unfetched_since:
            return 0.0
        return time.monotonic() - min(self._unfetched_since.values())

    def _track_fetching(self) -> None:
        """Note when each assigned partition not fetched yet was first seen so (aiokafka resets a partition's
        last fetch time when it is assigned again)."""
        now = time.monotonic()
        self._unfetched_since = {tp: self._unfetched_since.get(tp, now) for tp in self._consumer.assignment()
                                 if self._consumer.last_poll_timestamp(tp) is None}

    async def _lag_loop(self, interval: float = 1.0) -> None:
        """Every `interval` seconds, even while a batch is being handled: partitions whose log was replaced are
        fetched from its start, which partitions are not fetched yet, and threadline_consumer_lag."""
        while not self._stopping.is_set():
            try:
                await self._rewind_replaced_logs()
                self._track_fetching()
                await self._update_lag()
            except asyncio.CancelledError:
                raise
            except Exception:
                _log.debug("consumer lag update failed", exc_info=True)
            await asyncio.sleep(interval)

    async def _update_lag(self) -> None:
        """Lag per assigned partition: high watermark minus the next offset this consumer will handle.

        The high watermark comes from the fetch responses (`highwater`), not from `end_offsets()`,
        which tansu answers wrongly. Records fetched but not yet handled count as lag. Partitions no
        longer assigned are dropped from the gauge.
        """
        if self._metrics is None:
            return
        group = self._group_id or ""
        assigned = self._consumer.assignment()
        for tp in [tp for tp in self._next_to_handle if tp not in assigned]:
            del self._next_to_handle[tp]
        current: set[tuple[str, str, str]] = set()
        for tp in assigned:
            highwater = self._consumer.highwater(tp)
            if highwater is None:
                continue
            next_offset = self._next_to_handle.get(tp)
            if next_offset is None:
                try:
                    async with asyncio.timeout(1.0):
                        next_offset = await self._consumer.position(tp)
                except (TimeoutError, KafkaError, AssertionError):
                    continue
            labels = (group, tp.topic, str(tp.partition))
            self._metrics.consumer_lag.labels(*labels).set(max(0, highwater - next_offset))
            current.add(labels)
        for stale in self._lag_labels - current:
            with contextlib.suppress(KeyError):
                self._metrics.consumer_lag.remove(*stale)
        self._lag_labels = current

    def _clear_lag(self) -> None:
        if self._metrics is not None:
            for labels in self._lag_labels:
                with contextlib.suppress(KeyError):
                    self._metrics.consumer_lag.remove(*labels)
        self._lag_labels = set()

    async def _handle_partition(self, tp: TopicPartition, records: list[ConsumerRecord]) -> int | None:
        """Handle records in order; return the offset to commit (next to read), None if none done."""
        if self._key_slots is not None:
            return await self._handle_by_key(tp, records, self._key_slots)
        next_offset: int | None = None
        for record in records:
            self._next_to_handle[tp] = record.offset
            if not await self._handle_record(record):
                self._consumer.seek(tp, record.offset)
                return next_offset
            next_offset = record.offset + 1
            self._next_to_handle[tp] = next_offset
        return next_offset

    async def _handle_by_key(self, tp: TopicPartition, records: list[ConsumerRecord],
                             slots: asyncio.Semaphore) -> int | None:
        """Keys concurrently, each key in order; return the offset below the lowest unfinished record."""
        chains: dict[bytes | None, list[ConsumerRecord]] = {}
        for record in records:
            chains.setdefault(record.key, []).append(record)
        self._next_to_handle[tp] = records[0].offset
        stuck = [offset for offset in await asyncio.gather(*(self._handle_chain(chain, slots)
                                                             for chain in chains.values())) if offset is not None]
        if not stuck:
            next_offset = records[-1].offset + 1
        else:  # redeliver from the lowest unfinished record (the later ones done meanwhile are seen again)
            next_offset = min(stuck)
            self._consumer.seek(tp, next_offset)
        self._next_to_handle[tp] = next_offset
        return next_offset if next_offset > records[0].offset else None

    async def _handle_chain(self, chain: list[ConsumerRecord], slots: asyncio.Semaphore) -> int | None:
        """One key's records in order, each holding a slot; the offset of the first unhandled one (None: all done)."""
        for record in chain:
            async with slots:
                if not await self._handle_record(record):
                    return int(record.offset)
        return None

    async def _handle_record(self, record: ConsumerRecord) -> bool:
        try:
            decoded = orjson.loads(record.value)
            if self._accept is not None and isinstance(decoded, dict) and not self._accept(decoded):
                if self._metrics:
                    self._metrics.events_consumed.labels(topic=record.topic).inc()
                return True
            envelope = EventEnvelope.model_validate(decoded)
        except (ValidationError, ValueError):
            _log.error("skipping undecodable record %s[%s]@%s", record.topic, record.partition, record.offset)
            return True
        delay = 0.05
        data_failures = 0
        while True:
            with log_context(event_id=envelope.event_id, run_id=envelope.run_id, thread_id=envelope.thread_id):
                try:
                    await self._handler(envelope)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    data_failures = data_failures + 1 if isinstance(exc, DATA_ERRORS) else 0
                    if data_failures >= self._park_after and await self._parked(record, envelope, exc, data_failures):
                        return True
                    _log.exception("handler failed for %s; retrying in %.2fs", envelope.type, delay)
                    if self._metrics:
                        self._metrics.consumer_retries.labels(topic=record.topic).inc()
                else:
                    if self._metrics:
                        self._metrics.events_consumed.labels(topic=record.topic).inc()
                    return True
            if self._stopping.is_set():
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._retry_backoff_max)

    async def _parked(self, record: ConsumerRecord, envelope: EventEnvelope, error: BaseException,
                      attempts: int) -> bool:
        """Hand a poisonous record to `park`; True once it is stored (then it counts as consumed)."""
        if self._park is None:
            return False
        try:
            await self._park(record, envelope, error, attempts)
        except Exception:
            _log.exception("could not park %s[%s]@%s; retrying it", record.topic, record.partition, record.offset)
            return False
        _log.error("parked %s %s[%s]@%s as a dead letter after %d failures: %r", envelope.type, record.topic,
                   record.partition, record.offset, attempts, error)
        if self._metrics:
            self._metrics.dead_letters.labels(topic=record.topic).inc()
        return True


class _JoinListener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Sets `joined` at the group's first assignment to this member, even of no partition."""

    def __init__(self, joined: asyncio.Event) -> None:
        self._joined = joined

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        """Nothing to do: offsets are committed as records finish."""

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        """The member takes part in the group from now on."""
        self._joined.set()


class _PartitionFlow:
    """One partition's records taken by an `independent_keys` consumer: a queue per key, the commit point."""

    def __init__(self, first_offset: int) -> None:
        self.next_offset = first_offset  # past the last record taken; a record below it is a re-fetch
        self.committed = first_offset
        self.queues: dict[bytes | None, collections.deque[ConsumerRecord]] = {}
        self.waiting = 0  # records taken and not yet handled
        self.active = 0  # drains running (one per key with records waiting)
        self.revoked = False  # the partition left this consumer: take nothing more, commit nothing more
        self._unfinished: collections.deque[int] = collections.deque()
        self._finished: set[int] = set()

    def take(self, record: ConsumerRecord, key: bytes | None) -> bool:
        """Queue the record behind its key's earlier ones; True when the key had none (a drain must start)."""
        self.next_offset = record.offset + 1
        self.waiting += 1
        self._unfinished.append(record.offset)
        queue = self.queues.get(key)
        if queue is not None:
            queue.append(record)
            return False
        self.queues[key] = collections.deque([record])
        self.active += 1
        return True

    def finish(self, offset: int) -> None:
        """Mark a record handled; the commit point moves past every handled record below the first unfinished."""
        self.waiting -= 1
        self._finished.add(offset)
        while self._unfinished and self._unfinished[0] in self._finished:
            self._finished.discard(self._unfinished.popleft())

    @property
    def span(self) -> int:
        """Offsets from the lowest unfinished record to the last taken (handled ones above it included)."""
        return len(self._unfinished)

    @property
    def position(self) -> int:
        """Where the group resumes this partition: the lowest unfinished record, else past the last taken."""
        return self._unfinished[0] if self._unfinished else self.next_offset


class TopicTail:
    """A group-less consumer of every partition of some topics, read from their end (SSE fan-out, replies).

    While nobody wants its records it is paused, so nothing is fetched; `catch_up` seeks back to the ends
    (positions known) and fetches again, so whoever waits sees every record produced after the call."""

    def __init__(self, *, bootstrap: str, topics: Iterable[str], fetch_max_wait_ms: int, name: str) -> None:
        self._bootstrap = bootstrap
        self._topics = tuple(topics)
        self._fetch_max_wait_ms = fetch_max_wait_ms
        self._name = name
        self._consumer: AIOKafkaConsumer | None = None
        self._partitions: list[TopicPartition] = []
        self._paused = False
        self._resuming: asyncio.Task[None] | None = None

    @property
    def paused(self) -> bool:
        """True while nothing is fetched."""
        return self._paused

    async def start(self) -> None:
        """Assign every partition of the topics and position at their ends before anyone reads."""
        consumer = AIOKafkaConsumer(bootstrap_servers=self._bootstrap, group_id=None, enable_auto_commit=False,
                                    auto_offset_reset="latest", fetch_max_wait_ms=self._fetch_max_wait_ms)
        await consumer.start()
        try:
            await consumer.topics()
            partitions = [TopicPartition(topic, p) for topic in self._topics
                          for p in sorted(consumer.partitions_for_topic(topic) or ())]
            if not partitions:
                raise RuntimeError(f"topics {', '.join(self._topics)} have no partitions")
            consumer.assign(partitions)
            await consumer.seek_to_end(*partitions)
            for tp in partitions:
                await consumer.position(tp)
        except BaseException:
            await consumer.stop()
            raise
        self._consumer = consumer
        self._partitions = partitions

    async def stop(self) -> None:
        """Stop reading."""
        if self._resuming:
            self._resuming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._resuming
        if self._consumer:
            await self._consumer.stop()

    async def getmany(self, timeout_ms: int) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        """The records fetched so far (nothing while paused)."""
        assert self._consumer is not None
        batches: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = await self._consumer.getmany(
            timeout_ms=timeout_ms, max_records=1000)
        return batches

    def pause(self) -> None:
        """Stop fetching (records already fetched for paused partitions are dropped by aiokafka); not while a
        catch-up is under way."""
        if self._consumer is not None and not self._paused and self._resuming is None:
            self._consumer.pause(*self._partitions)
            self._paused = True

    async def catch_up(self, wanted: Callable[[], bool] = lambda: True) -> None:
        """Return once every partition is fetched from a position no later than now (at once unless paused)."""
        while self._paused:
            if self._resuming is None:
                self._resuming = asyncio.create_task(self._resume(wanted), name=f"{self._name}-resume")
            await asyncio.shield(self._resuming)

    async def _resume(self, wanted: Callable[[], bool]) -> None:
        """Seek every partition to its end (positions known), then fetch again if still `wanted`."""
        assert self._consumer is not None
        try:
            await self._consumer.seek_to_end(*self._partitions)
            for tp in self._partitions:
                await self._consumer.position(tp)
            if wanted():
                self._consumer.resume(*self._partitions)
                self._paused = False
        finally:
            self._resuming = None
