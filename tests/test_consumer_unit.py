"""EventConsumer's key-ordered concurrency (per batch, and independent keys), commits and pre-filter, and
the relay's sequence splice.

Most tests need no broker: the aiokafka consumer is built but never started, batches are handed to
`_handle_partition` directly and `seek` is recorded instead of sent. One runs on a private tansu broker.
"""

import asyncio
import dataclasses
import itertools
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator

import orjson
import pytest
from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from threadline_core.events import EventEnvelope
from threadline_core.kafka import EventConsumer, _PartitionFlow, create_producer, ensure_topics, project_of, publish
from threadline_core.metrics import ServiceMetrics
from threadline_core.outbox import _with_sequence
from threadline_core.runtime import ServiceRuntime
from threadline_core.settings import CoreSettings
from threadline_devstack.broker import TansuBroker

pytestmark = pytest.mark.unit

TP = TopicPartition("threadline.test", 0)


def record(offset: int, key: str, n: int) -> ConsumerRecord[bytes, bytes]:
    """A record of `key` carrying `n` in its envelope."""
    value = EventEnvelope(type="test.event", project_id="proj_test", key=key, data={"n": n}).to_bytes()
    return ConsumerRecord(topic=TP.topic, partition=TP.partition, offset=offset, timestamp=0, timestamp_type=0,
                          key=key.encode(), value=value, checksum=None, serialized_key_size=len(key),
                          serialized_value_size=len(value), headers=())


class Harness:
    """An EventConsumer whose handler logs start/end per record and can fail chosen records."""

    def __init__(self, key_concurrency: int, *, fail: dict[int, int] | None = None, delay: float = 0.01) -> None:
        self.fail = dict(fail or {})  # n -> failures left (-1: forever)
        self.delay = delay
        self.log: list[tuple[str, int]] = []
        self.running = 0
        self.most = 0
        self.seeks: list[int] = []
        self.consumer = EventConsumer(bootstrap="127.0.0.1:1", group_id="g", topics=[TP.topic], handler=self.handle,
                                      key_concurrency=key_concurrency, retry_backoff_max=0.02)
        self.consumer.consumer.seek = lambda tp, offset: self.seeks.append(offset)

    async def handle(self, envelope: EventEnvelope) -> None:
        n = int(envelope.data["n"])
        self.running += 1
        self.most = max(self.most, self.running)
        self.log.append(("start", n))
        try:
            await asyncio.sleep(self.delay)
            if self.fail.get(n, 0):
                self.fail[n] -= 1
                raise RuntimeError(f"record {n} fails")
            self.log.append(("done", n))
        finally:
            self.running -= 1

    def done(self) -> list[int]:
        return [n for what, n in self.log if what == "done"]


@pytest.fixture
async def harness() -> AsyncIterator[Callable[..., Harness]]:
    """Build harnesses; close their (never started) aiokafka consumers afterwards."""
    made: list[Harness] = []

    def make(key_concurrency: int, **options: object) -> Harness:
        made.append(Harness(key_concurrency, **options))  # type: ignore[arg-type]
        return made[-1]
    yield make
    for h in made:
        await h.consumer.consumer.stop()


def starts_after_done(log: list[tuple[str, int]], first: int, then: int) -> bool:
    """`then` started only after `first` was done."""
    return log.index(("start", then)) > log.index(("done", first))


async def test_keys_run_concurrently_each_key_in_order_and_bounded(harness: Callable[..., Harness]) -> None:
    h = harness(key_concurrency=2)
    keys = ["a", "b", "c", "a", "b", "c", "a"]  # offsets 10..16, n = index
    records = [record(10 + i, key, i) for i, key in enumerate(keys)]
    started = time.monotonic()
    assert await h.consumer._handle_partition(TP, records) == 17  # everything done: commit after the last
    assert sorted(h.done()) == list(range(7))
    for key in "abc":
        ns = [i for i, k in enumerate(keys) if k == key]
        assert [n for n in h.done() if n in ns] == ns  # one key strictly in order...
        assert all(starts_after_done(h.log, a, b) for a, b in itertools.pairwise(ns))  # ...never overlapping
    assert h.most == 2  # different keys at once, never more than the bound
    assert time.monotonic() - started < 7 * h.delay  # faster than one at a time
    assert h.seeks == []


async def test_one_at_a_time_without_key_concurrency(harness: Callable[..., Harness]) -> None:
    h = harness(key_concurrency=1)
    records = [record(10 + i, key, i) for i, key in enumerate("abab")]
    assert await h.consumer._handle_partition(TP, records) == 14
    assert h.done() == [0, 1, 2, 3] and h.most == 1


async def test_a_failing_record_is_retried_and_holds_back_only_its_key(harness: Callable[..., Harness]) -> None:
    h = harness(key_concurrency=4, fail={1: 2})  # record 1 (key b) fails twice, then succeeds
    records = [record(10 + i, key, i) for i, key in enumerate("abab")]
    assert await h.consumer._handle_partition(TP, records) == 14
    assert h.log.count(("start", 1)) == 3  # retried until it succeeded
    assert starts_after_done(h.log, 1, 3)  # b's next record waited for it
    assert h.log.index(("done", 2)) < h.log.index(("done", 1))  # a went on meanwhile


async def test_commit_stops_below_the_lowest_unfinished_record(harness: Callable[..., Harness]) -> None:
    h = harness(key_concurrency=4, fail={1: -1})  # record 1 (key b, offset 11) never succeeds
    records = [record(10 + i, key, i) for i, key in enumerate("abaab")]
    task = asyncio.create_task(h.consumer._handle_partition(TP, records))
    await asyncio.sleep(0.3)
    assert sorted(h.done()) == [0, 2, 3]  # key a finished past the stuck record; b's later record waits
    assert ("start", 4) not in h.log
    h.consumer._stopping.set()  # stop: the stuck record gives up at its next retry
    assert await task == 11  # offsets below 11 are committed, not the done records above it
    assert h.seeks == [11]  # 11 and everything after it are fetched again (handlers are idempotent)


async def test_nothing_committed_when_the_first_record_is_unfinished(harness: Callable[..., Harness]) -> None:
    h = harness(key_concurrency=4, fail={0: -1})
    records = [record(10 + i, key, i) for i, key in enumerate("ab")]
    task = asyncio.create_task(h.consumer._handle_partition(TP, records))
    await asyncio.sleep(0.1)
    h.consumer._stopping.set()
    assert await task is None
    assert h.seeks == [10] and h.done() == [1]


def test_sequence_is_spliced_into_the_envelope_text_not_into_data() -> None:
    stored = (b'{"key": "thread_1", "data": {"x": "\\"sequence\\": null", "sequence": null}, "type": "t",'
              b' "run_id": null, "event_id": "evt_1", "sequence": null, "thread_id": "thread_1",'
              b' "project_id": "p", "occurred_at": "2026-01-01T00:00:00+00:00"}')  # jsonb's key order
    value = orjson.loads(_with_sequence(stored, 42))
    assert value["sequence"] == 42
    assert value["data"] == {"x": '"sequence": null', "sequence": None}
    assert orjson.loads(_with_sequence(b'{"sequence": 7, "data": {}}', 42)) == {"sequence": 42, "data": {}}


class FakeFetches:
    """Stands in for the aiokafka consumer's fetch and commit: hands out `batches`, then nothing."""

    def __init__(self, consumer: EventConsumer, batches: list[list[ConsumerRecord[bytes, bytes]]]) -> None:
        self.batches = batches
        self.commits: list[dict[TopicPartition, int]] = []
        self.drained = asyncio.Event()
        kafka = consumer.consumer
        kafka.getmany = self.getmany
        kafka.commit = self.commit
        kafka.assignment = lambda: {TP}

    async def getmany(self, *_: object, **__: object) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        await asyncio.sleep(0.01)
        if not self.batches:
            self.drained.set()
            return {}
        return {TP: self.batches.pop(0)}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append(dict(offsets))


@pytest.mark.parametrize(("interval", "expected"), [(0.0, [{TP: 11}, {TP: 12}, {TP: 13}]), (60.0, [{TP: 13}])])
async def test_commits_per_batch_or_coalesced_until_stop(harness: Callable[..., Harness], interval: float,
                                                         expected: list[dict[TopicPartition, int]]) -> None:
    h = harness(1, delay=0.0)
    h.consumer._commit_interval = interval
    fake = FakeFetches(h.consumer, [[record(10, "a", 0)], [record(11, "b", 1)], [record(12, "a", 2)]])
    task = asyncio.create_task(h.consumer._run())
    await asyncio.wait_for(fake.drained.wait(), 5)
    h.consumer._stopping.set()
    await asyncio.wait_for(task, 5)
    assert fake.commits == expected  # coalesced: one commit of the latest offsets, made when stopping
    assert h.done() == [0, 1, 2]


@pytest.fixture(scope="module")
def private_broker() -> Iterator[TansuBroker]:
    """A tansu broker of this module's own (cheap: it starts in milliseconds)."""
    with TansuBroker() as broker:
        yield broker


async def test_key_concurrency_on_a_real_broker_commits_below_the_stuck_record(private_broker: TansuBroker) -> None:
    bootstrap, topic, group = private_broker.bootstrap_servers, f"keys-{time.monotonic_ns()}", "keys"
    await ensure_topics(bootstrap, [topic], 1)
    keys = ["a", "b", "a", "b", "c", "a"]  # offsets 0..5, n = offset
    producer = create_producer(bootstrap)
    await producer.start()
    try:
        for n, key in enumerate(keys):
            envelope = EventEnvelope(type="test.event", project_id="proj_test", key=key, data={"n": n})
            await publish(producer, topic, envelope)
    finally:
        await producer.stop()
    first: list[int] = []
    past_the_stuck_one = asyncio.Event()

    async def stuck_on_1(envelope: EventEnvelope) -> None:
        if envelope.data["n"] == 1:
            raise RuntimeError("record 1 fails until the consumer stops")
        await asyncio.sleep(0.02)
        first.append(int(envelope.data["n"]))
        if sorted(first) == [0, 2, 4, 5]:  # a and c went past b's stuck record
            past_the_stuck_one.set()

    consumer = EventConsumer(bootstrap=bootstrap, group_id=group, topics=[topic], handler=stuck_on_1,
                             key_concurrency=3, retry_backoff_max=0.05, fetch_max_wait_ms=5)
    await consumer.start()
    try:
        await asyncio.wait_for(past_the_stuck_one.wait(), 30)
    finally:
        await consumer.stop(grace=5)
    second: list[int] = []
    all_again = asyncio.Event()

    async def record_n(envelope: EventEnvelope) -> None:
        second.append(int(envelope.data["n"]))
        if len(second) == 5:
            all_again.set()

    consumer = EventConsumer(bootstrap=bootstrap, group_id=group, topics=[topic], handler=record_n,
                             key_concurrency=3, fetch_max_wait_ms=5)
    await consumer.start()
    try:
        await asyncio.wait_for(all_again.wait(), 30)
        consumer._track_fetching()  # a member that fetches is not reported unfetched (readiness)
        assert consumer.consumer.assignment() and consumer.unfetched_seconds() == 0.0
    finally:
        await consumer.stop(grace=5)
    assert sorted(second) == [1, 2, 3, 4, 5]  # redelivered from the stuck record, the done ones above it too
    assert second.index(1) < second.index(3)  # key b still in order


async def test_a_member_counts_as_joined_at_its_first_assignment_even_of_no_partition(
        private_broker: TansuBroker) -> None:
    """/readyz waits for `joined`: a group member is joined once the group assigned it partitions, or none (more
    members than partitions: it stands by, and is still part of the group); a consumer without a group at once."""
    bootstrap, topic, group = private_broker.bootstrap_servers, f"join-{time.monotonic_ns()}", "join"
    await ensure_topics(bootstrap, [topic], 1)
    members = [EventConsumer(bootstrap=bootstrap, group_id=group, topics=[topic], handler=_never_called,
                             fetch_max_wait_ms=5) for _ in range(2)]
    alone = EventConsumer(bootstrap=bootstrap, group_id=None, topics=[topic], handler=_never_called,
                          fetch_max_wait_ms=5)
    try:
        await alone.start()
        assert alone.joined
        for member in members:
            await member.start()
            assert not member.joined  # start returns before the join (seconds on tansu)
            await until(lambda joining=member: joining.joined, 30)
        await until(lambda: sorted(len(m.consumer.assignment()) for m in members) == [0, 1], 30)
        assert all(m.joined for m in members)
    finally:
        for consumer in (*members, alone):
            await consumer.stop(grace=5)


async def test_group_members_take_their_session_timeout_from_the_settings(
        private_broker: TansuBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    """THREADLINE_KAFKA_SESSION_TIMEOUT_MS reaches every service consumer's JoinGroup (tansu finishes a rebalance half
    of it after it began); below 3000 (three heartbeats) the settings are refused, and the default is Apache Kafka's
    least."""
    assert CoreSettings().kafka_session_timeout_ms == 6000
    monkeypatch.setenv("THREADLINE_KAFKA_SESSION_TIMEOUT_MS", "2000")
    with pytest.raises(ValidationError, match="kafka_session_timeout_ms"):
        CoreSettings()
    monkeypatch.setenv("THREADLINE_KAFKA_SESSION_TIMEOUT_MS", "7000")
    bootstrap, topic = private_broker.bootstrap_servers, f"session-{time.monotonic_ns()}"
    await ensure_topics(bootstrap, [topic], 1)
    runtime = ServiceRuntime(CoreSettings(kafka_bootstrap_servers=bootstrap), "test")
    consumer = await runtime.add_consumer(group_id="session", topics=[topic], handler=_never_called)
    try:
        await until(lambda: consumer.joined, 30)
        assert consumer.consumer._coordinator._session_timeout_ms == 7000
    finally:
        await consumer.stop(grace=5)


async def test_a_member_stopped_before_it_joined_stops_at_once(private_broker: TansuBroker) -> None:
    """A service stopped while its consumers still join (SIGTERM during start-up) stops cleanly: its handling loop,
    waiting in aiokafka for the first assignment, is cancelled (nothing taken, nothing to commit); only aiokafka's own
    leaving waits for the JoinGroup in flight (half the session timeout on tansu: 3 s)."""
    bootstrap, topic = private_broker.bootstrap_servers, f"unjoined-{time.monotonic_ns()}"
    await ensure_topics(bootstrap, [topic], 1)
    consumer = EventConsumer(bootstrap=bootstrap, group_id="unjoined", topics=[topic], handler=_never_called,
                             fetch_max_wait_ms=5)
    await consumer.start()
    assert not consumer.joined
    await asyncio.wait_for(consumer.stop(grace=None), 15)
    assert consumer._task is not None and consumer._task.cancelled()


async def test_stop_passes_on_its_callers_cancellation() -> None:
    """Cancelling whoever waits in `stop` for the batch in hand cancels it (a bounded shutdown step stays bounded);
    the batch's own cancellation is what `stop` absorbs."""
    consumer = EventConsumer(bootstrap="127.0.0.1:1", group_id="g", topics=[TP.topic], handler=_never_called)
    consumer._joined.set()
    batch = asyncio.create_task(asyncio.sleep(60))
    consumer._task = batch
    stopper = asyncio.create_task(consumer.stop(grace=30))
    await asyncio.sleep(0.05)
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopper
    assert not batch.done()
    batch.cancel()
    consumer._task = asyncio.create_task(asyncio.sleep(60))
    consumer._task.cancel()
    await consumer.stop(grace=30)  # the batch cancelled, not the caller: stop finishes


def test_a_partition_flow_commits_below_its_first_unfinished_record() -> None:
    flow = _PartitionFlow(10)
    assert [flow.take(record(10 + i, key, i), key.encode()) for i, key in enumerate("abac")] == [True, True, False,
                                                                                                 True]
    assert flow.position == 10 and flow.waiting == 4 and flow.span == 4
    flow.finish(11)  # b done: a (10) still holds the commit point
    flow.finish(13)
    assert flow.position == 10 and flow.waiting == 2 and flow.span == 4
    flow.finish(10)  # 10 and 11 done: up to the unfinished 12
    assert flow.position == 12 and flow.span == 2
    flow.finish(12)
    assert flow.position == 14 and flow.waiting == 0 and flow.span == 0  # past the last record taken


async def test_independent_keys_pause_a_partition_with_max_records_waiting() -> None:
    async def handle(envelope: EventEnvelope) -> None:
        pass

    consumer = EventConsumer(bootstrap="127.0.0.1:1", group_id="g", topics=[TP.topic], handler=handle,
                             independent_keys=True, max_records=2)
    paused: set[TopicPartition] = set()
    consumer.consumer.paused = lambda: set(paused)  # type: ignore[method-assign]
    consumer.consumer.pause = paused.add  # type: ignore[method-assign, assignment]
    consumer.consumer.resume = paused.discard  # type: ignore[method-assign, assignment]
    try:
        flow = _PartitionFlow(0)
        flow.take(record(0, "stuck", 0), b"stuck")
        consumer._apply_backpressure({TP: flow}, {TP})
        assert paused == set()
        flow.take(record(1, "a", 1), b"a")
        consumer._apply_backpressure({TP: flow}, {TP})
        assert paused == {TP}  # two records waiting
        flow.finish(1)
        consumer._apply_backpressure({TP: flow}, {TP})
        assert paused == set()  # one waits: fetch on, though the stuck record holds the commit point
        for offset in range(2, 100):  # many handled records above the stuck one
            flow.take(record(offset, "a", offset), b"a")
            flow.finish(offset)
        consumer._apply_backpressure({TP: flow}, {TP})
        assert paused == {TP} and flow.span == 100  # 50 x max_records offsets held by one unfinished record
    finally:
        await consumer.consumer.stop()


async def test_records_the_pre_filter_rejects_skip_the_handler_and_are_committed_past() -> None:
    handled: list[int] = []
    looked: list[str] = []

    async def handle(envelope: EventEnvelope) -> None:
        handled.append(int(envelope.data["n"]))

    def accept(event: dict[str, object]) -> bool:
        looked.append(str(event["key"]))
        return event["key"] != "skip"

    metrics = ServiceMetrics(CollectorRegistry(), "test")
    consumer = EventConsumer(bootstrap="127.0.0.1:1", group_id="g", topics=[TP.topic], handler=handle,
                             metrics=metrics, accept=accept)
    try:
        garbage = dataclasses.replace(record(13, "x", 3), value=b"[1, 2]")  # not an object: undecodable as before
        records = [record(10, "a", 0), record(11, "skip", 1), record(12, "a", 2), garbage]
        assert await consumer._handle_partition(TP, records) == 14
        assert handled == [0, 2] and looked == ["a", "skip", "a"]
        consumed = metrics.events_consumed.labels(topic=TP.topic)._value.get()
        assert consumed == 3  # the skipped record counts as consumed
    finally:
        await consumer.consumer.stop()


@pytest.mark.parametrize(("error", "parks"), [(ValueError("bad data"), True), (OSError("database away"), False)])
async def test_a_record_failing_on_its_data_is_parked_an_outage_is_retried(error: Exception, parks: bool) -> None:
    attempts: list[int] = []
    parked: list[tuple[int, str, int]] = []

    async def handler(envelope: EventEnvelope) -> None:
        attempts.append(1)
        raise error

    async def park(rec: ConsumerRecord[bytes, bytes], envelope: EventEnvelope, exc: BaseException, tries: int) -> None:
        parked.append((rec.offset, str(exc), tries))

    consumer = EventConsumer(bootstrap="127.0.0.1:1", group_id="g", topics=[TP.topic], handler=handler,
                             retry_backoff_max=0.01, park=park, park_after_attempts=3)
    try:
        handling = asyncio.create_task(consumer._handle_record(record(7, "a", 1)))
        done, _ = await asyncio.wait([handling], timeout=1.0)
        if parks:
            assert done and handling.result() is True  # consumed: the partition moves on
            assert parked == [(7, str(error), 3)] and len(attempts) == 3
        else:
            assert not done and parked == [] and len(attempts) > 3  # still retrying, nothing dropped
            consumer._stopping.set()
            assert await asyncio.wait_for(handling, 1.0) is False
    finally:
        await consumer.consumer.stop()


async def test_a_record_that_cannot_be_parked_is_retried() -> None:
    calls: list[int] = []

    async def handler(envelope: EventEnvelope) -> None:
        calls.append(1)
        raise KeyError("missing")

    async def park(rec: ConsumerRecord[bytes, bytes], envelope: EventEnvelope, exc: BaseException, tries: int) -> None:
        raise OSError("database away")

    consumer = EventConsumer(bootstrap="127.0.0.1:1", group_id="g", topics=[TP.topic], handler=handler,
                             retry_backoff_max=0.01, park=park, park_after_attempts=1)
    try:
        handling = asyncio.create_task(consumer._handle_record(record(8, "a", 1)))
        await asyncio.sleep(0.3)
        assert not handling.done() and len(calls) > 2
        consumer._stopping.set()
        assert await asyncio.wait_for(handling, 1.0) is False
    finally:
        await consumer.consumer.stop()


async def test_independent_keys_on_a_real_broker_go_past_a_stuck_key_and_resume_from_it(
        private_broker: TansuBroker) -> None:
    bootstrap, topic, group = private_broker.bootstrap_servers, f"indep-{time.monotonic_ns()}", "indep"
    await ensure_topics(bootstrap, [topic], 1)
    producer = create_producer(bootstrap)
    await producer.start()

    async def send(*keys: str) -> None:
        for key in keys:
            await publish(producer, topic, EventEnvelope(type="test.event", project_id="proj_test", key=key))

    first: list[str] = []
    stuck_started = asyncio.Event()
    others_done = asyncio.Event()

    async def stuck_key_fails(envelope: EventEnvelope) -> None:
        if envelope.key == "stuck":
            stuck_started.set()
            raise RuntimeError("the stuck key fails until the consumer stops")
        first.append(envelope.key)
        if len(first) == 4:
            others_done.set()

    consumer = EventConsumer(bootstrap=bootstrap, group_id=group, topics=[topic], handler=stuck_key_fails,
                             independent_keys=True, key_concurrency=4, retry_backoff_max=0.05, fetch_max_wait_ms=5)
    await consumer.start()
    try:
        await send("a", "stuck")  # offsets 0, 1
        await asyncio.wait_for(stuck_started.wait(), 30)
        await send("b", "stuck", "a", "c")  # offsets 2..5, fetched while the stuck key is failing
        await asyncio.wait_for(others_done.wait(), 30)
    finally:
        await consumer.stop(grace=5)
        await producer.stop()
    assert sorted(first) == ["a", "a", "b", "c"]  # every other key went on, records fetched later too
    second: list[str] = []
    all_again = asyncio.Event()

    async def record_key(envelope: EventEnvelope) -> None:
        second.append(envelope.key)
        if len(second) == 5:
            all_again.set()

    consumer = EventConsumer(bootstrap=bootstrap, group_id=group, topics=[topic], handler=record_key,
                             independent_keys=True, key_concurrency=4, fetch_max_wait_ms=5)
    await consumer.start()
    try:
        await asyncio.wait_for(all_again.wait(), 30)
    finally:
        await consumer.stop(grace=5)
    # committed up to the stuck record (offset 1): it and everything after it come again, the done ones too
    assert sorted(second) == ["a", "b", "c", "stuck", "stuck"]


class ScriptedPartition:
    """Stands in for the aiokafka consumer on one partition: fetches from a position in `log`, honours seek, pause
    and commit, and can be revoked and assigned again (fetching then resumes from the committed offset)."""

    def __init__(self, consumer: EventConsumer, log: list[ConsumerRecord[bytes, bytes]]) -> None:
        self.log = log
        self.position = log[0].offset
        self.assigned = True
        self.paused: set[TopicPartition] = set()
        self.seeks: list[int] = []
        self.committed: int | None = None
        kafka = consumer.consumer
        kafka.getmany = self.getmany
        kafka.commit = self.commit
        kafka.assignment = lambda: {TP} if self.assigned else set()
        kafka.seek = self.seek
        kafka.paused = lambda: set(self.paused)
        kafka.pause = self.paused.add
        kafka.resume = self.paused.discard
        kafka.highwater = lambda tp: self.log[-1].offset + 1  # where the partition's log ends

    async def getmany(self, *_: object, max_records: int | None = None,
                      **__: object) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        await asyncio.sleep(0.01)
        if not self.assigned or TP in self.paused:
            return {}
        records = [r for r in self.log if r.offset >= self.position][:max_records]
        if records:
            self.position = records[-1].offset + 1
        return {TP: records} if records else {}

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append(offset)
        self.position = offset

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        assert self.assigned, "a revoked partition is never committed"
        self.committed = offsets[TP]

    def assign_again(self) -> None:
        """The group hands the partition back: fetching resumes from the committed offset."""
        self.assigned = True
        self.paused.clear()
        self.position = self.committed if self.committed is not None else self.log[0].offset


async def test_independent_keys_revoked_and_assigned_again_wait_for_the_old_drains() -> None:
    release = asyncio.Event()
    starts: list[int] = []
    running: dict[int, int] = {}
    most = 0

    async def handle(envelope: EventEnvelope) -> None:
        nonlocal most
        n = int(envelope.data["n"])
        starts.append(n)
        running[n] = running.get(n, 0) + 1
        most = max(most, running[n])
        try:
            if n == 0:
                await release.wait()
        finally:
            running[n] -= 1

    consumer = EventConsumer(bootstrap="127.0.0.1:1", group_id="g", topics=[TP.topic], handler=handle,
                             independent_keys=True, key_concurrency=4)
    kafka = ScriptedPartition(consumer, [record(10, "slow", 0), record(11, "a", 1)])
    task = asyncio.create_task(consumer._run_independent_keys())
    try:
        await until(lambda: starts == [0, 1])
        kafka.assigned = False  # revoked while record 0 is still being handled
        await asyncio.sleep(0.1)
        kafka.log.append(record(12, "b", 2))
        kafka.assign_again()  # from offset 10: nothing was committed past the unfinished record 0
        await until(lambda: bool(kafka.seeks) and TP in kafka.paused)
        await asyncio.sleep(0.1)
        assert starts == [0, 1] and kafka.seeks[0] == 10  # nothing taken while the old drain runs
        release.set()
        await until(lambda: 2 in starts and kafka.committed == 13)
        assert sorted(starts) == [0, 0, 1, 1, 2]  # 10 and 11 came again (handlers are idempotent), then 12
        assert most == 1  # never the same record twice at once
    finally:
        release.set()
        consumer._stopping.set()
        await asyncio.wait_for(task, 5)
        await consumer.consumer.stop()


async def until(check: Callable[[], bool], seconds: float = 5.0) -> None:
    """Poll `check` until it holds; fail after `seconds`."""
    for _ in range(int(seconds / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    pytest.fail("condition not reached")


@pytest.mark.parametrize("fair", [True, False])
async def test_independent_keys_share_their_slots_fairly_between_projects(fair: bool) -> None:
    """Project A's burst of slow records (one key each, as files are) takes both slots; a record of project B that
    arrives after the burst gets the first slot freed, not the one after all of A's (a plain semaphore's order)."""
    started: list[str] = []

    async def handle(envelope: EventEnvelope) -> None:
        started.append(envelope.key)
        await asyncio.sleep(0.02)

    consumer = EventConsumer(bootstrap="127.0.0.1:1", group_id="g", topics=[TP.topic], handler=handle,
                             independent_keys=True, key_concurrency=2, tenant_of=project_of if fair else None)
    try:
        flow = _PartitionFlow(0)
        drains = []
        for offset, (project, key) in enumerate([("proj_a", "a1"), ("proj_a", "a2"), ("proj_a", "a3"),
                                                 ("proj_a", "a4"), ("proj_b", "b1")]):
            value = EventEnvelope(type="test.event", project_id=project, key=key, data={}).to_bytes()
            item = dataclasses.replace(record(offset, key, offset), value=value)
            assert flow.take(item, key.encode())
            drains.append(asyncio.create_task(consumer._drain(flow, key.encode())))
        await asyncio.wait_for(asyncio.gather(*drains), 5)
    finally:
        await consumer.consumer.stop()
    assert started == (["a1", "a2", "b1", "a3", "a4"] if fair else ["a1", "a2", "a3", "a4", "b1"])


async def test_a_partition_no_fetch_answered_since_its_assignment_counts_as_unfetched() -> None:
    """A member whose fetches never answer (a broker failing the group's offset fetches) is told apart from one that
    fetches, however idle: the wait starts when the partition is seen assigned and ends at its first fetch."""
    consumer = EventConsumer(bootstrap="127.0.0.1:1", group_id="g", topics=[TP.topic], handler=_never_called)
    kafka = consumer.consumer
    assigned: set[TopicPartition] = set()
    polled: dict[TopicPartition, int] = {}
    kafka.assignment = lambda: set(assigned)
    kafka.last_poll_timestamp = polled.get
    try:
        consumer._track_fetching()
        assert consumer.unfetched_seconds() == 0.0  # nothing assigned: nothing to fetch
        assigned.add(TP)
        consumer._track_fetching()
        await asyncio.sleep(0.2)
        consumer._track_fetching()
        assert consumer.unfetched_seconds() >= 0.2  # counted from the first sight, not from each check
        polled[TP] = 1
        consumer._track_fetching()
        assert consumer.unfetched_seconds() == 0.0
        assigned.clear()  # revoked, then assigned again: aiokafka forgets its last fetch
        polled.clear()
        consumer._track_fetching()
        assigned.add(TP)
        consumer._track_fetching()
        await asyncio.sleep(0.05)
        assert 0.05 <= consumer.unfetched_seconds() < 0.2
    finally:
        await kafka.stop()


async def _never_called(envelope: EventEnvelope) -> None:
    raise AssertionError(f"no record is handled here: {envelope.event_id}")


@pytest.mark.parametrize("window", [10, 40])
async def test_fairness_reaches_as_far_as_the_window_of_waiting_records(window: int) -> None:
    """Fair slots serve only the records fetched: project A's 30 slow records ahead of project B's one in the same
    partition hold B back until fewer than `max_records` of A's wait (a window of 10: behind 20 of them); a window
    wider than the burst (ingestion and the tool executor take THREADLINE_FAIR_WINDOW_RECORDS, 2000) serves B next."""
    started: list[str] = []
    done = asyncio.Event()

    async def handle(envelope: EventEnvelope) -> None:
        started.append(envelope.project_id)
        await asyncio.sleep(0.005)
        if len(started) == 31:
            done.set()

    log = [dataclasses.replace(record(offset, f"a{offset}", offset), value=EventEnvelope(
        type="test.event", project_id="proj_a", key=f"a{offset}", data={}).to_bytes()) for offset in range(30)]
    log.append(dataclasses.replace(record(30, "b", 30), value=EventEnvelope(
        type="test.event", project_id="proj_b", key="b", data={}).to_bytes()))
    consumer = EventConsumer(bootstrap="127.0.0.1:1", group_id="g", topics=[TP.topic], handler=handle,
                             independent_keys=True, key_concurrency=2, tenant_of=project_of, max_records=window)
    ScriptedPartition(consumer, log)
    task = asyncio.create_task(consumer._run_independent_keys())
    try:
        await asyncio.wait_for(done.wait(), 10)
    finally:
        consumer._stopping.set()
        await asyncio.wait_for(task, 5)
        await consumer.consumer.stop()
    position = started.index("proj_b")
    assert position >= 20 if window == 10 else position == 2, started  # the first slot A frees


async def test_independent_keys_take_the_records_of_a_broker_that_came_back_empty() -> None:
    """A broker that lost its log (tansu restarted: its storage is memory) numbers the new records from 0 again: below
    where the consumer had got to, yet new. The chaos trial: after a broker restart the tool executor and ingestion
    took nothing more (tool calls and files stuck for minutes, until the process was restarted)."""
    with TansuBroker() as broker:
        bootstrap, topic = broker.bootstrap_servers, "restarted"
        await ensure_topics(bootstrap, [topic], 1)
        seen: list[int] = []

        async def note(envelope: EventEnvelope) -> None:
            seen.append(int(envelope.data["n"]))

        consumer = EventConsumer(bootstrap=bootstrap, group_id="restarted", topics=[topic], handler=note,
                                 independent_keys=True, key_concurrency=4, fetch_max_wait_ms=5)
        producer = create_producer(bootstrap)
        await consumer.start()
        await producer.start()

        async def send(n: int) -> None:
            for _ in range(100):  # the producer reconnects to the revived broker
                try:
                    envelope = EventEnvelope(type="test.event", project_id="proj_test", key=f"k{n}", data={"n": n})
                    await publish(producer, topic, envelope)
                    return
                except KafkaError:
                    await asyncio.sleep(0.2)
            pytest.fail(f"record {n} could not be published")

        try:
            for n in range(6):
                await send(n)
            await until(lambda: len(seen) == 6, 30)
            assert broker.pid is not None
            os.kill(broker.pid, signal.SIGKILL)
            await until(lambda: not broker.running(), 10)
            broker.start()
            await ensure_topics(bootstrap, [topic], 1)
            for n in (6, 7):
                await send(n)  # offsets 0 and 1 of the new log
            await until(lambda: {6, 7} <= set(seen), 60)
        finally:
            await consumer.stop(grace=5)
            await producer.stop()


@pytest.mark.parametrize("independent", [True, False])
async def test_a_log_that_now_ends_before_the_position_is_fetched_from_its_start(independent: bool) -> None:
    """A broker that came back empty while the group lived on (tansu restarted between two heartbeats) answers a
    fetch past its new end with nothing: without a rewind the consumer waited until the new log grew past where the
    old one was (the chaos trial: tool calls, tool results and ingestion requests not taken for minutes)."""
    handled: list[int] = []

    async def handle(envelope: EventEnvelope) -> None:
        handled.append(int(envelope.data["n"]))

    consumer = EventConsumer(bootstrap="127.0.0.1:1", group_id="g", topics=[TP.topic], handler=handle,
                             independent_keys=independent, key_concurrency=4 if independent else 1)
    kafka = ScriptedPartition(consumer, [record(10, "a", 0), record(11, "b", 1)])
    kafka_consumer = consumer.consumer
    kafka_consumer.highwater = lambda tp: kafka.log[-1].offset + 1 if kafka.log else 0

    async def position(tp: TopicPartition) -> int:
        return kafka.position

    async def seek_to_beginning(*tps: TopicPartition) -> None:
        kafka.position = kafka.log[0].offset if kafka.log else 0

    kafka_consumer.position = position
    kafka_consumer.seek_to_beginning = seek_to_beginning
    kafka_consumer.last_poll_timestamp = lambda tp: 1
    task = asyncio.create_task(consumer._run_independent_keys() if independent else consumer._run())
    lag = asyncio.create_task(consumer._lag_loop(interval=0.05))  # where the rewind is checked
    try:
        await until(lambda: sorted(handled) == [0, 1])
        kafka.log[:] = [record(0, "a", 2), record(1, "c", 3)]  # the new log, numbered from 0; position stays 12
        await until(lambda: sorted(handled) == [0, 1, 2, 3])
    finally:
        consumer._stopping.set()
        lag.cancel()
        await asyncio.wait_for(task, 5)
        await consumer.consumer.stop()
