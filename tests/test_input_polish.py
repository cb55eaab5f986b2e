"""Error messages quote at most the start of a value the client sent, and an over-long request line gets a JSON
414: both were answered, but in ways a client could not use (a 100 KB id sent back whole, a 400). And the
ingestion service answers search requests without holding its event loop while Qdrant works."""

import asyncio
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import httpx
import openai
import pytest
from aiokafka import AIOKafkaProducer
from error_helpers import http_error
from prometheus_client import CollectorRegistry
from qdrant_client import QdrantClient

from ingestion.handlers import SearchHandlers
from ingestion.repository import IngestionRepository
from ingestion.service import IngestionService
from threadline_core.events import (
    EventEnvelope,
    FileChunksRequested,
    PointCountRequested,
    ServiceReplied,
    ServiceRequest,
    VectorSearchRequested,
)
from threadline_core.metrics import IngestionMetrics, SearchServedMetrics
from threadline_devstack.stack import Stack
from threadline_search.chunking import Chunk
from threadline_search.index import ChunkIndex
from threadline_search.parsing import ParserPool

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

HUGE = "x" * 100_000
"""A client-supplied value far longer than any real one (bodies carry it; URLs carry LONG)."""
LONG = "y" * 50_000
"""As long a value as a URL may carry and still be served (the request line limit is 64 KiB)."""
ECHO_CAP = 400
"""An error message quoting a capped value stays well below this many characters."""


def _assert_capped(message: str, value: str, before: str) -> None:
    """`message` quotes the start of `value`, right after `before`, cut with an ellipsis."""
    assert len(message) < ECHO_CAP, message[:500]
    assert re.search(re.escape(before) + re.escape(value[:64]) + "[^ ]*…", message), message


# --- 3. client-supplied values in error messages ----------------------------------------------------------


def test_unknown_huge_id_in_the_path_is_quoted_capped(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.beta.assistants.retrieve("asst_" + LONG)
    error: dict[str, Any] = caught.value.body  # type: ignore[assignment]
    _assert_capped(error["message"], "asst_" + LONG, "No assistant found with id '")
    thread = client.beta.threads.create()
    with pytest.raises(openai.NotFoundError) as caught:
        client.beta.threads.runs.retrieve("run_" + LONG, thread_id=thread.id)
    error = caught.value.body  # type: ignore[assignment]
    _assert_capped(error["message"], "run_" + LONG, "No run found with id '")


def test_unknown_huge_ids_in_the_body_are_quoted_capped(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.beta.assistants.create(model="gpt-4o", tool_resources={"code_interpreter": {"file_ids": [HUGE]}})
    error: dict[str, Any] = caught.value.body  # type: ignore[assignment]
    _assert_capped(error["message"], HUGE, "No file found with id '")
    assert error["param"] == "tool_resources.code_interpreter.file_ids"
    with pytest.raises(openai.NotFoundError) as caught:
        client.beta.threads.create(messages=[{"role": "user", "content": "x", "attachments": [
            {"file_id": HUGE, "tools": [{"type": "file_search"}]}]}])
    _assert_capped(caught.value.body["message"], HUGE, "No file found with id '")  # type: ignore[index]
    with pytest.raises(openai.NotFoundError) as caught:
        client.beta.threads.create_and_run(assistant_id="asst_" + HUGE)
    _assert_capped(caught.value.body["message"], "asst_" + HUGE, "No assistant found with id '")  # type: ignore[index]


def test_invalid_huge_values_are_quoted_capped(http: httpx.Client) -> None:
    """Validation errors quote the bad value (and the name of an unknown parameter) the same way."""
    error = http_error(http.post("/assistants", json={"model": "m", "tools": [{"type": HUGE}]}), 400)
    _assert_capped(error["message"], HUGE, "Invalid value: '")
    error = http_error(http.post("/assistants", json={"model": "m", HUGE: 1}), 400)
    _assert_capped(error["message"], HUGE, "Unknown parameter: '")
    assert len(error["param"]) < 5000
    error = http_error(http.get("/assistants", params={"order": LONG}), 400)
    _assert_capped(error["message"], LONG, "Invalid value: '")
    assert error["param"] == "order"


def test_unknown_huge_url_is_quoted_capped(http: httpx.Client) -> None:
    error = http_error(http.get(f"/nothing/{LONG}"), 404)
    _assert_capped(error["message"], f"/v1/nothing/{LONG}", "Invalid URL (GET ")


def test_short_values_are_quoted_whole(client: openai.OpenAI) -> None:
    """The cap leaves every ordinary id alone: no ellipsis, the id as sent."""
    with pytest.raises(openai.NotFoundError) as caught:
        client.beta.assistants.retrieve("asst_" + "z" * 90)
    assert caught.value.body["message"] == f"No assistant found with id 'asst_{'z' * 90}'."  # type: ignore[index]


# --- 4. over-long request lines --------------------------------------------------------------------------


def _exchange(port: int, raw: bytes) -> bytes:
    """Send `raw` as it is and read until the gateway closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def _response(raw: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    return status, {n.strip().lower(): v.strip() for n, _, v in (line.partition(":") for line in lines)}, body


@pytest.mark.parametrize("length", [70_000, 1_000_000])
def test_over_long_url_is_a_json_414(stack: Stack, http: httpx.Client, length: int) -> None:
    """uvicorn's parser refused the line with a 400 (a client error that says nothing of what was wrong)."""
    auth = f"Authorization: Bearer {stack.api_key}\r\n".encode()
    raw = b"GET /v1/assistants/asst_" + b"a" * length + b" HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n"
    status, headers, body = _response(_exchange(stack.gateway.port, raw))
    assert status.startswith("HTTP/1.1 414 "), status
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and set(error) == {"message", "type", "param", "code"}
    assert "URL" in error["message"] and len(error["message"]) < ECHO_CAP
    assert http.get("/assistants", params={"limit": 1}).status_code == 200  # the gateway still serves


def test_requests_pipelined_before_an_over_long_url_get_their_own_responses(stack: Stack) -> None:
    """As with any unparsable request: the valid ones before it are answered, in order, and the 414 comes last."""
    auth = f"Authorization: Bearer {stack.api_key}\r\nOpenAI-Beta: assistants=v2\r\n".encode()
    good = b"GET /v1/assistants?limit=1 HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n"
    long = b"GET /v1/assistants/asst_" + b"c" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n"
    received = _exchange(stack.gateway.port, good + good + long + good)
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", received) == [b"200", b"200", b"414"], received[-500:]
    assert received.endswith(b"}}"), received[-500:]


# --- 5. search requests and the event loop ---------------------------------------------------------------

SLOW_SECONDS = 0.3
"""How long each instrumented Qdrant read takes: long enough that a loop held for it misses many ticks."""


class _FakeEmbedder:
    """Four dimensions, one fixed unit vector: enough for Qdrant to answer."""

    model_id = "fake"
    dim = 4

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        return [[1.0, 0.0, 0.0, 0.0] for _ in texts]


class _Producer:
    """Takes the replies the handler sends (what SEARCH_REPLIES would carry)."""

    def __init__(self) -> None:
        self.replies: list[ServiceReplied] = []

    async def send(self, topic: str, value: bytes, key: bytes) -> "asyncio.Future[None]":
        self.replies.append(ServiceReplied.parse(EventEnvelope.from_bytes(value)))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


class _Watch:
    """Makes the client's reads slow and records which thread ran each and how many ran at once."""

    def __init__(self, client: QdrantClient) -> None:
        self.threads: list[int] = []
        self.most_at_once = 0
        self._running = 0
        self._guard = threading.Lock()
        for name in ("scroll", "count", "collection_exists", "query_points"):
            setattr(client, name, self._slow(getattr(client, name)))

    def _slow(self, call: Callable[..., Any]) -> Callable[..., Any]:
        def slow(*args: Any, **kwargs: Any) -> Any:
            with self._guard:
                self._running += 1
                self.most_at_once = max(self.most_at_once, self._running)
                self.threads.append(threading.get_ident())
            try:
                time.sleep(SLOW_SECONDS)
                return call(*args, **kwargs)
            finally:
                with self._guard:
                    self._running -= 1
        return slow


async def _ticks_while(work: "asyncio.Future[Any]") -> int:
    """How many 10 ms ticks the event loop made while `work` ran (a loop held by blocking calls makes ~none)."""
    ticks = 0
    while not work.done():
        await asyncio.sleep(0.01)
        ticks += 1
    await work
    return ticks


@pytest.mark.unit
async def test_search_requests_run_qdrant_off_the_event_loop() -> None:
    """chunks, count and search called the synchronous Qdrant client on the loop: every consumer of the process
    (file ingestion, the tool executor sharing it) stalled for as long as a scroll over a large file took."""
    client = QdrantClient(":memory:")
    index = ChunkIndex(client, "chunks")
    index.ensure(4)
    chunks = [Chunk(index=i, text=f"part {i}", start_char=i * 10, end_char=i * 10 + 6, tokens=2) for i in range(3)]
    index.upsert(vector_store_id="vs_a", file_id="file-a", chunks=chunks, vectors=[[1.0, 0.0, 0.0, 0.0]] * 3,
                 payload={"project_id": "p", "filename": "a.txt"})
    service = IngestionService(repository=cast(IngestionRepository, None), index=index, embedder=_FakeEmbedder(),
                               parsers=cast(ParserPool, None), metrics=IngestionMetrics(CollectorRegistry()))
    producer = _Producer()
    handlers = SearchHandlers(service, cast(AIOKafkaProducer, producer), SearchServedMetrics(CollectorRegistry()))
    watch = _Watch(client)
    requests: list[ServiceRequest] = [
        FileChunksRequested(vector_store_id="vs_a", file_id="file-a", reply_to="asker"),
        PointCountRequested(vector_store_id="vs_a", reply_to="asker"),
        VectorSearchRequested(vector_store_ids=["vs_a"], query=["part"], reply_to="asker")]
    for request in requests:
        envelope = request.envelope(project_id="p", key="asker")
        assert await _ticks_while(asyncio.ensure_future(handlers.handle(envelope))) >= 10, request.OPERATION
    assert [r.error for r in producer.replies] == [None, None, None]
    assert [c["text"] for c in producer.replies[0].items] == ["part 0", "part 1", "part 2"]
    assert producer.replies[1].result == {"count": 3}
    assert {r["file_id"] for r in producer.replies[2].items} == {"file-a"}
    assert watch.threads and threading.get_ident() not in watch.threads

    # Local mode is not safe from two threads: requests handled at once still reach Qdrant one at a time.
    await asyncio.gather(*(handlers.handle(r.envelope(project_id="p", key="asker")) for r in requests * 2))
    assert watch.most_at_once == 1
    assert [r.error for r in producer.replies] == [None] * 9
