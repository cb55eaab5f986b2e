"""Unit tests (no stack) of the SSRF guard, Standard Webhooks signing, the retry policy, the lane dispatcher and
the subscription cache's barrier."""

import asyncio
import base64
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import asyncpg
import openai
import pytest
from error_helpers import lost_in_transaction
from loopback_http import loopback_server
from prometheus_client import CollectorRegistry

from notifier import repository
from notifier.handlers import Handlers
from notifier.repository import QueuedDelivery
from notifier.service import AttemptResult, Dispatcher, NotifierMetrics, Outcome, RetryPolicy, RetryScheduler
from notifier.settings import NotifierSettings
from notifier.subscriptions import Subscriptions
from threadline_core.events import WebhookDeliveriesDue
from threadline_core.ssrf import GuardedHttpClient, SsrfError, SsrfPolicy, parse_networks, parse_retry_after
from threadline_core.webhooks import (
    EVENT_TYPES,
    event_body,
    generate_secret,
    secret_hint,
    sign,
    signature_headers,
)

pytestmark = pytest.mark.unit

REFUSED = [
    "10.0.0.1", "10.255.255.255", "172.16.0.1", "172.31.255.254", "192.168.1.1",  # private
    "127.0.0.1", "127.1.2.3", "::1",  # loopback
    "169.254.1.1", "fe80::1",  # link-local
    "169.254.169.254", "fd00:ec2::254", "169.254.170.2",  # cloud metadata
    "100.64.0.1", "100.127.255.254",  # CGNAT
    "224.0.0.1", "239.255.255.250", "ff02::1",  # multicast
    "0.0.0.0", "::", "240.0.0.1", "255.255.255.255", "fc00::1", "fd12:3456::1",
    "::ffff:10.0.0.1", "::ffff:127.0.0.1", "64:ff9b::a00:1",  # IPv4 hidden in IPv6
    "192.0.2.1", "198.51.100.7", "203.0.113.9", "2001:db8::1",  # documentation
]
ALLOWED = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "100.128.0.1", "172.32.0.1"]


def fake_resolver(answers: dict[str, list[str]]):  # type: ignore[no-untyped-def]
    async def resolve(host: str, port: int) -> list[str]:
        if host not in answers:
            raise OSError("no such host")
        return answers[host]

    return resolve


@pytest.mark.parametrize("address", REFUSED)
def test_refused_addresses(address: str) -> None:
    assert SsrfPolicy().refusal(address) is not None


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses_allowed(address: str) -> None:
    assert SsrfPolicy().refusal(address) is None


def test_allowed_networks_override_but_never_metadata() -> None:
    policy = SsrfPolicy(parse_networks("127.0.0.0/8, 10.1.0.0/16 ::1"))
    assert policy.refusal("127.0.0.1") is None
    assert policy.refusal("10.1.2.3") is None
    assert policy.refusal("::1") is None
    assert policy.refusal("10.2.0.1") == "private"
    everything = SsrfPolicy(parse_networks("0.0.0.0/0,::/0"))
    assert everything.refusal("169.254.169.254") == "cloud metadata service"
    assert everything.refusal("fd00:ec2::254") == "cloud metadata service"
    with pytest.raises(ValueError):
        parse_networks("not-a-network")


async def test_check_url_resolves_and_requires_every_address_allowed() -> None:
    policy = SsrfPolicy(resolver=fake_resolver({
        "public.example": ["93.184.216.34"],
        "mixed.example": ["93.184.216.34", "10.0.0.5"],
        "metadata.example": ["169.254.169.254"],
    }))
    target = await policy.check_url("https://public.example/hook?x=1")
    assert target.host == "public.example" and target.port == 443 and [str(a) for a in target.addresses] == [
        "93.184.216.34"]
    for url in ("http://mixed.example/", "http://metadata.example/latest/meta-data", "http://10.0.0.1/",
                "http://[fd00:ec2::254]/", "http://100.64.0.1:8080/", "http://unknown.example/",
                "http://2130706433/", "http://0x7f.0.0.1/"):
        with pytest.raises(SsrfError):
            await policy.check_url(url)


@pytest.mark.parametrize("url", ["ftp://example.com/", "file:///etc/passwd", "gopher://x/", "example.com/hook",
                                 "http:///nohost", "http://exa mple.com/", "http://example.com:0/", ""])
async def test_check_url_rejects_bad_syntax(url: str) -> None:
    with pytest.raises(SsrfError):
        await SsrfPolicy(resolver=fake_resolver({})).check_url(url)


class _Recorder(BaseHTTPRequestHandler):
    seen: ClassVar[list[tuple[str, dict[str, str], bytes]]] = []
    hosts: ClassVar[list[list[str]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        type(self).seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        type(self).hosts.append(self.headers.get_all("host") or [])
        self.send_response(429)
        self.send_header("Retry-After", "7")
        self.send_header("Content-Length", "4000")
        self.end_headers()
        self.wfile.write(b"x" * 4000)

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture
def recorder() -> Iterator[int]:
    _Recorder.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


async def test_guarded_client_connects_to_the_checked_address_with_original_host(recorder: int) -> None:
    """DNS rebinding: the connection goes to the address that was checked, the Host header keeps the name."""
    answers = {"hooks.example": ["127.0.0.1"]}
    client = GuardedHttpClient(SsrfPolicy(parse_networks("127.0.0.0/8"), resolver=fake_resolver(answers)))
    try:
        result = await client.post(f"http://hooks.example:{recorder}/in?a=b", content=b"{}",
                                   headers={"content-type": "application/json"}, time_limit=5,
                                   max_response_bytes=100)
        assert result.status_code == 429 and result.retry_after == 7.0
        assert len(result.response_excerpt) == 100
        path, headers, body = _Recorder.seen[-1]
        assert path == "/in?a=b" and body == b"{}"
        assert headers["host"] == f"hooks.example:{recorder}" and len(_Recorder.hosts[-1]) == 1
        # The name now resolves to a refused address: nothing is sent.
        answers["hooks.example"] = ["10.0.0.7"]
        refused = await client.post(f"http://hooks.example:{recorder}/in", content=b"{}", headers={}, time_limit=5)
        assert refused.status_code is None and refused.error is not None and refused.error.startswith("refused")
        assert len(_Recorder.seen) == 1
        # Loopback is only reachable because the policy allows it.
        strict = GuardedHttpClient(SsrfPolicy())
        blocked = await strict.post(f"http://127.0.0.1:{recorder}/in", content=b"{}", headers={}, time_limit=5)
        assert blocked.error is not None and "loopback" in blocked.error and len(_Recorder.seen) == 1
        await strict.aclose()
    finally:
        await client.aclose()


def test_signatures_verify_with_the_official_sdk() -> None:
    sdk = openai.OpenAI(api_key="unused", base_url="http://127.0.0.1:9/v1")
    old, new = generate_secret(), generate_secret()
    assert new.startswith("whsec_") and len(base64.b64decode(new.removeprefix("whsec_"))) == 32
    assert secret_hint(new).endswith(new[-4:]) and new not in secret_hint(new)
    body = event_body(event_id="evt_1", event_type="thread.run.completed", created_at=1700000000,
                      data={"id": "run_1", "object": "thread.run", "status": "completed", "thread_id": "thread_1",
                            "instructions": "not in the webhook"})
    assert json.loads(body)["data"] == {"id": "run_1", "object": "thread.run", "status": "completed",
                                        "thread_id": "thread_1"}
    headers = signature_headers([new, old], "evt_1", int(time.time()), body)
    assert headers["webhook-signature"].count("v1,") == 2
    for secret in (new, old):
        event = sdk.webhooks.unwrap(body, headers, secret=secret)
        assert event.type == "thread.run.completed" and event.data.id == "run_1"  # type: ignore[comparison-overlap]
    with pytest.raises(openai.InvalidWebhookSignatureError):
        sdk.webhooks.unwrap(body, headers, secret=generate_secret())
    with pytest.raises(openai.InvalidWebhookSignatureError):
        sdk.webhooks.unwrap(body.replace(b"completed", b"failed"), headers, secret=new)
    only_new = signature_headers([new], "evt_1", int(time.time()), body)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        sdk.webhooks.unwrap(body, only_new, secret=old)
    assert sign(new, "evt_1", 5, b"x") != sign(new, "evt_2", 5, b"x")
    assert "thread.run.requires_action" in EVENT_TYPES


def test_retry_policy_schedule_jitter_and_retry_after() -> None:
    policy = RetryPolicy([0, 5, 300], jitter=0.1, rng=lambda: 1.0)
    assert policy.first_delay == 0
    assert policy.next_delay(1) == pytest.approx(5.5)
    assert policy.next_delay(2) == pytest.approx(330)
    assert policy.next_delay(3) is None
    assert policy.next_delay(1, retry_after=60) == 60
    low = RetryPolicy([0, 5], jitter=0.1, rng=lambda: 0.0, max_retry_after=10)
    assert low.next_delay(1) == pytest.approx(4.5)
    assert low.next_delay(1, retry_after=3600) == 10
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


async def test_dispatcher_keeps_lane_order_and_isolates_endpoints() -> None:
    """Lanes run in order; a failing head parks its lane; a stuck endpoint does not hold the others."""
    calls: list[str] = []
    released: list[str] = []
    stuck = asyncio.Event()
    inside: list[str] = []

    def stuck_inside() -> int:
        return len(inside)

    async def deliver(delivery_id: str, gate: asyncio.Semaphore, ready: object = None) -> AttemptResult:
        calls.append(delivery_id)
        if delivery_id.startswith("dead"):
            async with gate:
                inside.append(delivery_id)
                await stuck.wait()
        if delivery_id == "b1":
            return AttemptResult(Outcome.RETRY, 1)
        return AttemptResult(Outcome.SUCCEEDED, 1)

    async def release(ids: Sequence[str]) -> None:
        released.extend(ids)

    async def successors(endpoint: str, key: str) -> list[QueuedDelivery]:
        return []

    dispatcher = Dispatcher(deliver=deliver, release=release, successors=successors, concurrency=2, backlog=3)
    for i in range(4):
        dispatcher.submit("we_dead", f"thread_{i}", f"dead{i}")
    assert dispatcher.saturated() == ["we_dead"] and dispatcher.is_saturated("we_dead")
    for item in ("a1", "a2", "a3"):
        assert dispatcher.submit("we_ok", "thread_a", item)
    assert not dispatcher.submit("we_ok", "thread_a", "a1")  # already queued
    for item in ("b1", "b2", "b3"):
        dispatcher.submit("we_ok", "thread_b", item)
    for _ in range(50):
        await asyncio.sleep(0.01)
        if {"a3", "b1"} <= set(calls):
            break
    ok_calls = [c for c in calls if not c.startswith("dead")]
    assert [c for c in ok_calls if c.startswith("a")] == ["a1", "a2", "a3"]
    assert [c for c in ok_calls if c.startswith("b")] == ["b1"]  # b2, b3 wait for b1's retry
    assert sorted(released) == ["b2", "b3"]
    assert len([c for c in calls if c.startswith("dead")]) == 4  # one per lane, all started
    assert stuck_inside() == 2  # but only two requests open at a time (the endpoint's limit)
    await dispatcher.stop(grace=0.05)
    assert {"dead0", "dead1", "dead2", "dead3"} <= set(released)
    assert not dispatcher.accepting and not dispatcher.submit("we_ok", "thread_c", "c1")


async def test_dispatcher_sends_nothing_more_as_it_came_once_an_attempt_disabled_the_endpoint() -> None:
    """A 410 disables the endpoint: what waits behind it in its lane is handed back (the scheduler only leases for
    enabled endpoints), and later deliveries of the endpoint are claimed, which checks it is enabled again, instead
    of being sent as they came (the next event after a 410 was still POSTed)."""
    calls: list[tuple[str, bool]] = []
    released: list[str] = []

    async def deliver(delivery_id: str, gate: asyncio.Semaphore, ready: object = None) -> AttemptResult:
        calls.append((delivery_id, ready is not None))
        if delivery_id == "gone1":
            return AttemptResult(Outcome.FAILED, 1, disabled=True)
        return AttemptResult(Outcome.SKIPPED if delivery_id == "later" else Outcome.SUCCEEDED, 1)

    async def release(ids: Sequence[str]) -> None:
        released.extend(ids)

    async def successors(endpoint: str, key: str) -> list[QueuedDelivery]:
        return []

    def claimed(delivery_id: str) -> repository.ClaimedDelivery:
        return repository.ClaimedDelivery(id=delivery_id, endpoint_id="we_gone", event_id="evt", ordering_key="t",
                                          body=b"{}", attempt=1, url="https://example.com", secrets=(),
                                          event_created_at=datetime.now(UTC))

    dispatcher = Dispatcher(deliver=deliver, release=release, successors=successors, concurrency=2, backlog=10)
    for item in ("gone1", "gone2", "gone3"):
        dispatcher.submit("we_gone", "thread_a", item, claimed(item))
    for _ in range(50):
        await asyncio.sleep(0.01)
        if released:
            break
    assert calls == [("gone1", True)] and released == ["gone2", "gone3"]
    dispatcher.submit("we_gone", "thread_b", "later", claimed("later"))
    for _ in range(50):
        await asyncio.sleep(0.01)
        if len(calls) > 1:
            break
    assert calls[1:] == [("later", False)]  # claimed first: the claim finds the endpoint disabled
    assert dispatcher.disabled == {"we_gone"}
    conn = EndpointsConnection({"we_gone"}, disabled={"we_gone"})

    class Pool:
        @contextlib.asynccontextmanager
        async def acquire(self) -> AsyncIterator[EndpointsConnection]:
            yield conn

    scheduler = RetryScheduler(pool=Pool(), dispatcher=dispatcher, owner="o",  # type: ignore[arg-type]
                               settings=NotifierSettings())
    await scheduler.purge()
    assert dispatcher.disabled == {"we_gone"}  # still disabled: still claimed first
    conn.disabled.clear()  # enabled again: the purge pass forgets it (the set only grew before)
    await scheduler.purge()
    assert dispatcher.disabled == frozenset()
    dispatcher.submit("we_gone", "thread_c", "again", claimed("again"))
    for _ in range(50):
        await asyncio.sleep(0.01)
        if len(calls) > 2:
            break
    assert calls[2:] == [("again", True)]  # sent as it came, as for any enabled endpoint
    await dispatcher.stop(grace=0.05)


async def test_guarded_client_keep_alive_chunked_interim_and_cut_bodies() -> None:
    """The lean HTTP/1.1 client: reuses connections, reads chunked bodies, skips 1xx, never reads more than asked."""
    bodies: list[bytes] = []
    answers = [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n6\r\n world\r\n0\r\nT: 1\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 500 Oops\r\nContent-Length: 5000\r\n\r\n" + b"e" * 5000,
        b"HTTP/1.1 503 Busy\r\nRetry-After: 9\r\nContent-Length: 2\r\nConnection: close\r\n\r\nno",
        b"HTTP/1.0 200 OK\r\n\r\nuntil close",
    ]

    async def respond(head: bytes, reader: asyncio.StreamReader, _: int) -> bytes:
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length"))
        bodies.append(await reader.readexactly(length))
        return answers[len(bodies) - 1]

    client = GuardedHttpClient(SsrfPolicy(parse_networks("127.0.0.0/8")))
    try:
        async with loopback_server(respond) as server:
            url = f"http://127.0.0.1:{server.port}/hook"
            first = await client.post(url, content=b"1", headers={}, time_limit=5)
            assert (first.status_code, first.response_excerpt) == (200, "hello world")
            second = await client.post(url, content=b"22", headers={}, time_limit=5)
            assert (second.status_code, second.response_excerpt) == (204, "")
            assert server.connections == 1  # kept alive
            third = await client.post(url, content=b"333", headers={}, time_limit=5, max_response_bytes=10)
            assert (third.status_code, third.response_excerpt) == (500, "e" * 10)
            fourth = await client.post(url, content=b"4444", headers={}, time_limit=5)
            assert (fourth.status_code, fourth.retry_after, fourth.response_excerpt) == (503, 9.0, "no")
            assert server.connections == 2  # the cut body was not reused
            fifth = await client.post(url, content=b"5", headers={}, time_limit=5)
            assert (fifth.status_code, fifth.response_excerpt) == (200, "until close")
            assert server.connections == 3 and bodies == [b"1", b"22", b"333", b"4444", b"5"]
            server.server.close()
            await server.server.wait_closed()
            refused = await client.post(url, content=b"x", headers={}, time_limit=5)
            assert refused.status_code is None and refused.error is not None and "Connect" in refused.error
    finally:
        await client.aclose()


async def test_guarded_client_closes_idle_connections_of_targets_it_no_longer_posts_to() -> None:
    """A kept-alive connection to an endpoint that gets nothing more (deleted, moved) is closed once idle too long,
    when another target is posted to: before, every target ever reached kept its sockets for the life of the process."""
    closed = asyncio.Event()

    async def keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, on_close: asyncio.Event) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length"))
                await reader.readexactly(length)
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
                await writer.drain()
        on_close.set()
        writer.close()

    old = await asyncio.start_server(lambda r, w: keep_alive(r, w, closed), "127.0.0.1", 0)
    other = await asyncio.start_server(lambda r, w: keep_alive(r, w, asyncio.Event()), "127.0.0.1", 0)
    client = GuardedHttpClient(SsrfPolicy(parse_networks("127.0.0.0/8")), idle_seconds=0.2)
    try:
        first = await client.post(f"http://127.0.0.1:{old.sockets[0].getsockname()[1]}/hook", content=b"1",
                                  headers={}, time_limit=5)
        assert first.status_code == 204
        await asyncio.sleep(0.3)
        for _ in range(3):
            later = await client.post(f"http://127.0.0.1:{other.sockets[0].getsockname()[1]}/hook", content=b"2",
                                      headers={}, time_limit=5)
            assert later.status_code == 204
        await asyncio.wait_for(closed.wait(), 2.0)
    finally:
        await client.aclose()
        old.close()
        other.close()


async def test_guarded_client_times_out_on_silent_endpoints() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = GuardedHttpClient(SsrfPolicy(parse_networks("127.0.0.0/8")))
    try:
        result = await client.post(f"http://127.0.0.1:{port}/", content=b"{}", headers={}, time_limit=0.3)
        assert result.status_code is None and result.error == "timed out after 0.3s"
    finally:
        await client.aclose()
        server.close()


class FakeListenConnection:
    """Stands in for the LISTEN connection: tests call the NOTIFY listener themselves."""

    def __init__(self) -> None:
        self.notify: Callable[..., None] | None = None
        self.terminated = False

    async def add_listener(self, channel: str, callback: Callable[..., None]) -> None:
        assert channel == repository.ENDPOINTS_CHANNEL
        self.notify = callback

    def add_termination_listener(self, callback: Callable[..., None]) -> None:
        return None

    def terminate(self) -> None:
        self.terminated = True

    async def close(self, **options: object) -> None:
        return None


class FakePool:
    """`acquire()` for the loads; counts them."""

    def __init__(self) -> None:
        self.loads = 0

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[object]:
        self.loads += 1
        yield object()


class EndpointsConnection:
    """The scheduler's purge pass: deletes nothing, knows which endpoints exist and which are disabled."""

    def __init__(self, existing: set[str], disabled: set[str] | None = None) -> None:
        self.existing = existing
        self.disabled = disabled or set()

    async def execute(self, query: str, *args: object) -> str:
        return "DELETE 0"

    async def fetch(self, query: str, ids: list[str]) -> list[dict[str, str]]:
        assert "webhook_endpoints" in query
        wanted = self.disabled if "status <> 'enabled'" in query else self.existing
        return [{"id": endpoint_id} for endpoint_id in ids if endpoint_id in wanted]


async def test_the_purge_pass_drops_the_metrics_of_deleted_endpoints() -> None:
    """Per-endpoint series (attempts by outcome, attempt durations) of an endpoint deleted since the last pass go;
    a live endpoint's stay. Before, every endpoint ever deleted kept its series for the life of the notifier."""
    registry = CollectorRegistry()
    metrics = NotifierMetrics(registry)
    for endpoint_id in ("we_live", "we_gone"):
        metrics.attempted(endpoint_id, Outcome.SUCCEEDED, 0.01)
        metrics.attempted(endpoint_id, Outcome.RETRY, 0.5)
    conn = EndpointsConnection({"we_live"})

    class Pool:
        @contextlib.asynccontextmanager
        async def acquire(self) -> AsyncIterator[EndpointsConnection]:
            yield conn

    async def never(*args: object) -> AttemptResult:
        raise AssertionError("nothing is delivered here")

    dispatcher = Dispatcher(deliver=never, release=never, successors=never, concurrency=1, backlog=10)
    scheduler = RetryScheduler(pool=Pool(), dispatcher=dispatcher, owner="o",  # type: ignore[arg-type]
                               settings=NotifierSettings(), metrics=metrics)
    assert await scheduler.purge() == 0

    def series(endpoint_id: str) -> list[str]:
        return [f"{sample.name}{sorted(sample.labels.items())}" for family in registry.collect()
                for sample in family.samples if sample.labels.get("endpoint") == endpoint_id]

    assert series("we_gone") == []
    assert registry.get_sample_value("threadline_webhook_attempts_total",
                                     {"endpoint": "we_live", "outcome": "retry"}) == 1.0
    assert registry.get_sample_value("threadline_webhook_attempt_seconds_count", {"endpoint": "we_live"}) == 2.0
    assert metrics.endpoints == {"we_live"}
    metrics.attempted("we_gone", Outcome.SUCCEEDED, 0.01)  # an attempt in flight when it was deleted: next pass
    conn.existing.clear()
    await scheduler.purge()
    assert series("we_gone") == [] and series("we_live") == [] and metrics.endpoints == frozenset()


async def test_subscription_barrier_is_shared_and_does_not_trust_the_clocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skewed clocks cost a round trip, never an event: a barrier sent after the event arrived covers it."""
    listen = FakeListenConnection()
    subscribed: dict[str, frozenset[str]] = {"proj": frozenset()}
    barriers: list[float] = []
    answer = {"clock": 0.0}  # the database clock, far behind the events' clock
    broken = asyncio.Event()

    async def connect(dsn: str) -> FakeListenConnection:
        return listen

    async def barrier(conn: object) -> float:
        barriers.append(answer["clock"])
        await asyncio.sleep(0.01)
        if broken.is_set():
            raise ConnectionResetError("the LISTEN session is gone")
        return answer["clock"]

    async def subscribed_types(conn: object, project_id: str) -> frozenset[str]:
        return subscribed[project_id]

    monkeypatch.setattr("notifier.subscriptions.connect", connect)
    monkeypatch.setattr(repository, "barrier", barrier)
    monkeypatch.setattr(repository, "subscribed_types", subscribed_types)
    pool = FakePool()
    cache = Subscriptions(pool=pool, dsn="postgresql://unused", reconnect_seconds=0.01)  # type: ignore[arg-type]
    await cache.start()
    assert cache.listening
    now = datetime.now(UTC)
    assert not await cache.may_match("proj", "thread.run.created", now) and pool.loads == 1 and not barriers
    assert not await cache.may_match("proj", "thread.run.created", now) and len(barriers) == 1
    results = await asyncio.gather(*(cache.may_match("proj", "thread.run.queued", now) for _ in range(10)))
    assert results == [False] * 10 and len(barriers) == 2 and pool.loads == 1  # one round trip for all ten

    answer["clock"] = now.timestamp() + 1  # a barrier answered after the events occurred covers them all
    await cache.may_match("proj", "thread.run.queued", now)
    count = len(barriers)
    assert not await cache.may_match("proj", "thread.run.failed", now) and len(barriers) == count

    subscribed["proj"] = frozenset({"thread.run.failed"})  # registered; its NOTIFY arrives with the next answer
    later = datetime.fromtimestamp(answer["clock"] + 1, UTC)
    answer["clock"] += 2
    assert listen.notify is not None
    listen.notify(listen, 1, repository.ENDPOINTS_CHANNEL, "proj")
    assert await cache.may_match("proj", "thread.run.failed", later) and pool.loads == 2
    assert await cache.may_match("proj", "thread.run.failed", later) and pool.loads == 2  # subscribed: no barrier

    broken.set()  # the barrier fails: unsure, so the database decides, and the cache starts over
    assert await cache.may_match("proj", "thread.run.created", datetime.fromtimestamp(answer["clock"] + 1, UTC))
    assert listen.terminated
    broken.clear()
    for _ in range(100):
        if cache.listening:
            break
        await asyncio.sleep(0.01)
    assert cache.listening and not await cache.may_match("proj", "thread.run.created", later) and pool.loads == 3
    await cache.stop()
    assert not cache.listening and await cache.may_match("proj", "thread.run.created", later)


def test_the_consumer_builds_envelopes_only_for_webhook_event_types() -> None:
    handlers = Handlers(pool=None, subscriptions=None, dispatcher=None,  # type: ignore[arg-type]
                        policy=RetryPolicy([0.0]), owner="o", lease_seconds=60.0, wake=lambda: None)
    assert all(handlers.wants({"type": t, "project_id": "p"}) for t in EVENT_TYPES)
    assert handlers.wants({"type": WebhookDeliveriesDue.TYPE, "project_id": "p"})  # the gateway's wake-ups
    assert not handlers.wants({"type": "thread.run.step.created", "project_id": "p"})
    assert not handlers.wants({"type": "thread.message.delta"}) and not handlers.wants({})


async def test_a_wake_up_only_wakes_the_scheduler_and_may_come_twice() -> None:
    """A WebhookDeliveriesDue touches no database (the handler has none): a redelivered one just wakes again."""
    woken: list[int] = []
    handlers = Handlers(pool=None, subscriptions=None, dispatcher=None,  # type: ignore[arg-type]
                        policy=RetryPolicy([0.0]), owner="o", lease_seconds=60.0, wake=lambda: woken.append(1))
    envelope = WebhookDeliveriesDue(endpoint_id="we_1").envelope(project_id="p", key="we_1")
    assert envelope.key == "we_1" and WebhookDeliveriesDue.parse(envelope).endpoint_id == "we_1"
    await handlers.handle(envelope)
    await handlers.handle(envelope)
    assert len(woken) == 2


@pytest.mark.parametrize("error", [ConnectionRefusedError(111, "Connection refused"), lost_in_transaction(),
                                   asyncpg.InternalClientError("cannot switch to state 12")],
                         ids=["refused", "lost-in-transaction", "server-farewell"])
async def test_a_delivery_that_meets_a_database_outage_keeps_its_place_in_the_lane(error: Exception) -> None:
    """Postgres went away during an attempt: the delivery was forgotten (still leased to this notifier for a minute)
    and the thread's next events overtook it: a receiver saw `thread.run.completed` before `in_progress`. However
    asyncpg reports the loss (the chaos trial met all three in the gateway), the delivery waits in its place."""
    attempts: list[str] = []
    outage = [2]

    async def deliver(delivery_id: str, gate: asyncio.Semaphore, ready: object = None) -> AttemptResult:
        attempts.append(delivery_id)
        if delivery_id == "in_progress" and outage[0]:
            outage[0] -= 1
            raise error
        return AttemptResult(Outcome.SUCCEEDED, 1)

    async def release(ids: Sequence[str]) -> None:
        raise AssertionError(f"nothing is given back: {ids}")

    async def successors(endpoint: str, key: str) -> list[QueuedDelivery]:
        return []

    dispatcher = Dispatcher(deliver=deliver, release=release, successors=successors, concurrency=2, backlog=10)
    dispatcher.submit("we_1", "thread_a", "in_progress")
    await asyncio.sleep(0.1)
    dispatcher.submit("we_1", "thread_a", "completed")  # the thread's next event, while the database is away
    for _ in range(100):
        await asyncio.sleep(0.05)
        if "completed" in attempts:
            break
    assert attempts == ["in_progress", "in_progress", "in_progress", "completed"]
    await dispatcher.stop(grace=0.05)
