"""Vector store search over Kafka request/reply (threadline.search.requests / threadline.search.replies).

The reply client on its own (topics of its own on the real broker, a responder written here), then the real
stack: concurrent searches each get their own answer, a search nobody answers in time is a 504 in the OpenAI
error format, bad input is still a 4xx, and the ingestion service skips requests past their deadline and answers
an unreadable one with an error reply instead of failing.
"""

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import fixtures_docs as docs
import httpx
import openai
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from threadline_core.events import (
    EventEnvelope,
    PointCountRequested,
    ServiceReplied,
    ServiceRequest,
    VectorSearchRequested,
)
from threadline_core.kafka import create_producer, ensure_topics
from threadline_core.metrics import ServiceMetrics
from threadline_core.replies import ReplyClient, ReplyTimeout, join_reply, send_reply, split_reply
from threadline_core.topics import SEARCH_REPLIES, SEARCH_REQUESTS
from threadline_devstack.stack import ServiceProcess, Stack

# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of the samples `name` with `labels` that <url>/metrics shows now."""
    text = httpx.get(f"{url}/metrics", timeout=10, trust_env=False).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and labels.items() <= s.labels.items())


def ingestion_url(stack: Stack) -> str:
    """The ingestion service's ops server (its own port when it shares a process with the tool executor)."""
    return f"http://127.0.0.1:{stack.service('ingestion').ready_ports[-1]}"


async def eventually(check: Any, what: str, seconds: float = 30.0) -> None:
    """Poll `check()` (sync) until it is true; fail with `what` after `seconds`."""
    for _ in range(int(seconds / 0.1)):
        if check():
            return
        await asyncio.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture
async def producer(stack: Stack) -> AsyncIterator[AIOKafkaProducer]:
    """A producer on the stack's broker."""
    started = create_producer(stack.kafka_bootstrap_servers)
    await started.start()
    yield started
    await started.stop()


@pytest.fixture
async def own_topics(stack: Stack) -> tuple[str, str]:
    """A requests and a replies topic of this test's own (nothing of the stack reads them)."""
    suffix = uuid.uuid4().hex[:8]
    topics = (f"test.search.requests.{suffix}", f"test.search.replies.{suffix}")
    await ensure_topics(stack.kafka_bootstrap_servers, topics, 3)
    return topics


R = TypeVar("R", bound=ServiceRequest)


async def read_requests(bootstrap: str, topic: str, count: int, model: type[R]) -> list[R]:
    """The first `count` requests of a fresh topic, read as `model`."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
                                fetch_max_wait_ms=10)
    await consumer.start()
    try:
        await consumer.topics()
        consumer.assign([TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())])
        seen: list[R] = []
        async with asyncio.timeout(30):
            while len(seen) < count:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    seen.extend(model.parse(EventEnvelope.from_bytes(r.value)) for r in records)
        return seen
    finally:
        await consumer.stop()


async def reply_for(bootstrap: str, request_id: str, send: Any) -> ServiceReplied:
    """Call `send()` while reading SEARCH_REPLIES from its end; return the first reply part to `request_id`."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="latest",
                                fetch_max_wait_ms=10)
    await consumer.start()
    try:
        await consumer.topics()
        partitions = [TopicPartition(SEARCH_REPLIES, p) for p in sorted(consumer.partitions_for_topic(SEARCH_REPLIES)
                                                                        or ())]
        consumer.assign(partitions)
        await consumer.seek_to_end(*partitions)
        for tp in partitions:
            await consumer.position(tp)
        await send()
        async with asyncio.timeout(60):
            while True:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    for record in records:
                        reply = ServiceReplied.parse(EventEnvelope.from_bytes(record.value))
                        if reply.request_id == request_id:
                            return reply
    finally:
        await consumer.stop()


# ---------------------------------------------------------------------------------------------------
# the pieces on their own
# ---------------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_long_replies_are_split_and_joined_in_order() -> None:
    """A file's chunks can be megabytes: parts stay under the budget and join back in order, whatever the order
    they arrive in; a reply missing a part is not whole."""
    items = [{"chunk_index": i, "text": "x" * 1000} for i in range(50)]
    reply = ServiceReplied(request_id="req_1", items=items, result={"count": 50})
    parts = split_reply(reply, part_bytes=10_000)
    assert len(parts) == 6 and all(p.parts == 6 for p in parts)
    assert all(len(orjson.dumps(p.items)) <= 10_000 + 100 for p in parts)
    assert {p.reply_id for p in parts} == {reply.reply_id}
    shuffled = {p.part: p for p in reversed(parts)}
    whole = join_reply(shuffled)
    assert whole is not None and whole.items == items and whole.result == {"count": 50}
    del shuffled[3]
    assert join_reply(shuffled) is None
    assert split_reply(ServiceReplied(request_id="req_2"))[0].parts == 1, "an empty reply is one part"


@pytest.mark.unit
def test_deadline() -> None:
    """A request expires at its deadline (a naive one read as UTC); without one it never does."""
    now = datetime.now(UTC)
    assert PointCountRequested(deadline=now - timedelta(seconds=1)).expired()
    assert PointCountRequested(deadline=(now - timedelta(seconds=1)).replace(tzinfo=None)).expired()
    assert not PointCountRequested(deadline=now + timedelta(seconds=60)).expired()
    assert not PointCountRequested().expired()


async def test_replies_find_their_own_request(stack: Stack, producer: AIOKafkaProducer,
                                              own_topics: tuple[str, str]) -> None:
    """Three requests in flight at once, answered in reverse order, one in several parts, with replies for another
    instance and a second answer to the same request in between: each caller gets its own whole answer."""
    requests_topic, replies_topic = own_topics
    registry = CollectorRegistry()
    metrics = ServiceMetrics(registry, "test").search_requests
    async with ReplyClient(bootstrap=stack.kafka_bootstrap_servers, producer=producer, requests_topic=requests_topic,
                           replies_topic=replies_topic, reply_to=f"test-{uuid.uuid4().hex[:6]}", metrics=metrics,
                           idle_pause_seconds=0.2) as client:
        await eventually(lambda: client.paused, "the idle client to stop fetching", seconds=5)
        calls = [asyncio.create_task(client.call(VectorSearchRequested(vector_store_ids=["vs_x"], query=[q]),
                                                 project_id="proj_test", wait_seconds=30))
                 for q in ("alpha", "beta", "gamma")]
        requests = await read_requests(stack.kafka_bootstrap_servers, requests_topic, 3, VectorSearchRequested)
        assert {r.reply_to for r in requests} == {client.reply_to}
        assert all(r.deadline is not None and not r.expired() for r in requests)
        for request in reversed(requests):
            items = [{"query": request.query[0], "n": i, "pad": "p" * 300} for i in range(10)]
            await send_reply(producer, replies_topic, ServiceReplied(request_id=request.request_id, items=[
                {"query": "from another instance"}]), project_id="proj_test", reply_to="someone-else")
            await send_reply(producer, replies_topic, ServiceReplied(request_id=request.request_id, items=items),
                             project_id="proj_test", reply_to=client.reply_to, part_bytes=1000)
            await send_reply(producer, replies_topic, ServiceReplied(request_id=request.request_id, items=[
                {"query": "a second answer"}]), project_id="proj_test", reply_to=client.reply_to)
        answers = await asyncio.gather(*calls)
    for query, answer in zip(("alpha", "beta", "gamma"), answers, strict=True):
        assert answer.error is None
        assert [i["query"] for i in answer.items] == [query] * 10
        assert [i["n"] for i in answer.items] == list(range(10))
    assert registry.get_sample_value("threadline_search_requests_total", {"operation": "search", "outcome": "ok"}) == 3
    assert registry.get_sample_value("threadline_search_requests_pending") == 0


async def test_no_reply_is_a_timeout(stack: Stack, producer: AIOKafkaProducer, own_topics: tuple[str, str]) -> None:
    """Nobody answers: ReplyTimeout after the wait, and the request's deadline says when to give up."""
    requests_topic, replies_topic = own_topics
    async with ReplyClient(bootstrap=stack.kafka_bootstrap_servers, producer=producer, requests_topic=requests_topic,
                           replies_topic=replies_topic, reply_to="test-nobody-answers") as client:
        with pytest.raises(ReplyTimeout):
            await client.call(PointCountRequested(), project_id="proj_test", wait_seconds=0.5)
    [request] = await read_requests(stack.kafka_bootstrap_servers, requests_topic, 1, PointCountRequested)
    assert request.expired()


# ---------------------------------------------------------------------------------------------------
# the real stack
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_stores(client: openai.OpenAI) -> dict[str, str]:
    """Two vector stores of one indexed file each: store id -> file id."""
    stores: dict[str, str] = {}
    for name, text in (("kitchen.md", "The espresso machine in the office kitchen is descaled every Friday."),
                       ("garden.md", "Tomatoes on the roof garden are watered at dawn by the facilities team.")):
        store = client.vector_stores.create(name=name)
        done = client.vector_stores.files.upload_and_poll(vector_store_id=store.id,
                                                          file=(name, docs.markdown(name, text)))
        assert done.status == "completed", done.last_error
        stores[store.id] = done.id
    return stores


async def test_concurrent_searches_each_get_their_own_answer(async_client: openai.AsyncOpenAI, stack: Stack,
                                                             two_stores: dict[str, str]) -> None:
    """Many searches of two stores in flight at once through one gateway: each answer holds its own store's file."""
    before = metric(stack.gateway_url, "threadline_search_requests_total", operation="search", outcome="ok")
    order = [*two_stores] * 4
    pages = await asyncio.gather(*(async_client.vector_stores.search(store_id, query="When is something done?")
                                   for store_id in order))
    for store_id, page in zip(order, pages, strict=True):
        assert [r.file_id for r in page.data] == [two_stores[store_id]]
    after = metric(stack.gateway_url, "threadline_search_requests_total", operation="search", outcome="ok")
    assert after - before == len(order)
    store_id, file_id = next(iter(two_stores.items()))
    content = await async_client.vector_stores.files.content(file_id, vector_store_id=store_id)
    assert "espresso" in "".join(part.text or "" for part in content.data)
    assert metric(ingestion_url(stack), "threadline_search_served_total", operation="chunks", outcome="ok") >= 1


@pytest.fixture(scope="module")
def impatient_gateway(stack: Stack) -> Iterator[ServiceProcess]:
    """A second gateway that waits only 1 ms for search replies (no search can answer that fast)."""
    with stack.extra_instance("gateway", env={"THREADLINE_SEARCH_TIMEOUT_SECONDS": "0.001"}) as process:
        yield process


def test_search_timeout_is_a_504_in_the_openai_format(impatient_gateway: ServiceProcess, stack: Stack,
                                                      two_stores: dict[str, str]) -> None:
    """No reply within THREADLINE_SEARCH_TIMEOUT_SECONDS: 504 server_error saying so, for search and for a file's
    content, and the SDK raises InternalServerError (retried by default)."""
    store_id, file_id = next(iter(two_stores.items()))
    with httpx.Client(base_url=f"{impatient_gateway.url}/v1", headers={"Authorization": f"Bearer {stack.api_key}"},
                      trust_env=False, timeout=30) as http:
        for response in (http.post(f"/vector_stores/{store_id}/search", json={"query": "espresso"}),
                         http.get(f"/vector_stores/{store_id}/files/{file_id}/content")):
            assert response.status_code == 504, response.text
            assert response.json() == {"error": {
                "message": "Search did not answer within 0.001 seconds (the ingestion service is busy or "
                           "unavailable); retry shortly.", "type": "server_error", "param": None, "code": None}}
        sdk = openai.OpenAI(base_url=f"{impatient_gateway.url}/v1", api_key=stack.api_key, max_retries=0)
        with pytest.raises(openai.InternalServerError) as err:
            sdk.vector_stores.search(store_id, query="espresso")
        assert err.value.status_code == 504
        sdk.close()
    assert metric(impatient_gateway.url, "threadline_search_requests_total", outcome="timeout") >= 3


@pytest.mark.parametrize(("body", "param"), [
    ({"query": ""}, "query"),
    ({"query": []}, "query"),
    ({"query": ["q"] * 11}, "query"),
    ({"query": "q", "max_num_results": 0}, "max_num_results"),
    ({"query": "q", "max_num_results": 51}, "max_num_results"),
    ({"query": "q", "filters": {"type": "zz", "key": "a", "value": 1}}, None),
    ({"query": "q", "ranking_options": {"score_threshold": 2}}, "ranking_options.score_threshold"),
    ({"query": "q", "unknown": 1}, "unknown"),
    ({}, "query"),
])
def test_bad_search_input_is_a_400(http: httpx.Client, two_stores: dict[str, str], body: dict[str, Any],
                                   param: str | None) -> None:
    store_id = next(iter(two_stores))
    response = http.post(f"/vector_stores/{store_id}/search", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param


def test_unknown_store_or_file_is_a_404(http: httpx.Client, two_stores: dict[str, str]) -> None:
    store_id = next(iter(two_stores))
    assert http.post("/vector_stores/vs_nope/search", json={"query": "q"}).status_code == 404
    assert http.get(f"/vector_stores/{store_id}/files/file-nope/content").status_code == 404
    assert http.post(f"/vector_stores/{store_id}/search", content=b"{not json",
                     headers={"content-type": "application/json"}).status_code == 400


async def test_ingestion_skips_requests_past_their_deadline(stack: Stack, producer: AIOKafkaProducer) -> None:
    """A request whose asker gave up is not answered (the search is not run)."""
    url = ingestion_url(stack)
    before = metric(url, "threadline_search_served_total", operation="search", outcome="expired")
    request = VectorSearchRequested(vector_store_ids=["vs_x"], query=["late"], reply_to="test-gone",
                                    deadline=datetime.now(UTC) - timedelta(seconds=1))
    envelope = request.envelope(project_id="proj_local", key=request.request_id)
    await producer.send_and_wait(SEARCH_REQUESTS, envelope.to_bytes(), key=request.request_id.encode())
    await eventually(lambda: metric(url, "threadline_search_served_total", operation="search",
                                    outcome="expired") > before, "the expired request to be skipped")


async def test_ingestion_answers_an_unreadable_request_with_a_400(stack: Stack, producer: AIOKafkaProducer) -> None:
    """A request it cannot read gets an error reply (the asker answers 400) instead of failing or being retried."""
    request_id = f"req_test{uuid.uuid4().hex[:8]}"
    envelope = EventEnvelope(type=VectorSearchRequested.TYPE, project_id="proj_local", key=request_id, data={
        "request_id": request_id, "reply_to": "test-asker", "vector_store_ids": "not a list", "query": ["q"]})

    async def send() -> None:
        await producer.send_and_wait(SEARCH_REQUESTS, envelope.to_bytes(), key=request_id.encode())

    reply = await reply_for(stack.kafka_bootstrap_servers, request_id, send)
    assert reply.error is not None and reply.error.status == 400 and reply.error.type == "invalid_request_error"
    assert reply.error.param == "vector_store_ids"


def test_an_invalid_search_timeout_stops_the_gateway_at_start() -> None:
    """Settings are read when the gateway starts, so a bad value is a start-up error naming it, not a 500 on every
    search and file request afterwards."""
    started = subprocess.run([sys.executable, "-m", "gateway"], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "THREADLINE_SEARCH_TIMEOUT_SECONDS": "0"})
    assert started.returncode != 0
    assert "search_timeout_seconds" in started.stderr and "greater than 0" in started.stderr
