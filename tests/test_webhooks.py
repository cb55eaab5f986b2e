"""Signed webhooks through the official SDK against the real stack, received by a loopback receiver in this file.

Receivers verify every delivery with `client.webhooks.unwrap(body, headers, secret=...)`. The test
stack allows 127.0.0.0/8 (tests/conftest.py) and retries on the schedule 0, 0.5, 1, 2 seconds.
"""

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import asyncpg
import httpx
import openai
import pytest
from openai.types.webhooks import WebhookEndpoint, WebhookEndpointWithSecret
from webhook_receiver import SignedReceiver

from notifier.subscriptions import Subscriptions
from threadline_core.db import create_pool
from threadline_core.events import WebhookDeliveriesDue
from threadline_core.ids import new_id, now_seconds
from threadline_core.topics import WEBHOOK_COMMANDS
from threadline_core.webhooks import EVENT_TYPES
from threadline_devstack.sql import Db
from threadline_devstack.stack import Stack

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

OTHER_KEY = "sk-threadline-other"  # project proj_other (tests/conftest.py)
RUN_EVENTS = ["thread.run.created", "thread.run.queued", "thread.run.in_progress", "thread.run.completed"]
Reply = tuple[int, dict[str, str], bytes]


@dataclass(frozen=True)
class Hit:
    """One request the receiver got."""

    name: str
    headers: dict[str, str]
    body: bytes
    at: float


class Receiver:
    """A loopback HTTP server; each URL path name has its own scripted answers."""

    def __init__(self) -> None:
        self.hits: list[Hit] = []
        self.release = threading.Event()
        self._rules: dict[str, Callable[[int], Reply | None]] = {}
        self._per_id: set[str] = set()
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                name = self.path.strip("/").split("?")[0]
                with receiver._cond:
                    headers = {k.lower(): v for k, v in self.headers.items()}
                    per_id = name in receiver._per_id
                    count = sum(1 for h in receiver.hits if h.name == name and
                                (not per_id or h.headers.get("webhook-id") == headers.get("webhook-id")))
                    receiver.hits.append(Hit(name, headers, body, time.time()))
                    receiver._cond.notify_all()
                    rule = receiver._rules.get(name)
                reply = rule(count) if rule else (200, {}, b"ok")
                if reply is None:  # never answer (until the test ends)
                    receiver.release.wait(60)
                    return
                status, headers, payload = reply
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def url(self, name: str) -> str:
        """The URL of one scripted path."""
        return f"http://127.0.0.1:{self.port}/{name}"

    def answer(self, name: str, rule: Callable[[int], Reply | None], *, per_event: bool = False) -> None:
        """Script a path's answers: rule(earlier requests, of the same webhook-id if per_event) -> reply or None."""
        self._rules[name] = rule
        if per_event:
            self._per_id.add(name)

    def of(self, name: str) -> list[Hit]:
        """Requests received on a path so far."""
        with self._cond:
            return [h for h in self.hits if h.name == name]

    def wait(self, name: str, until: Callable[[list[Hit]], bool], timeout: float = 30.0) -> list[Hit]:
        """Block until the path's requests satisfy `until`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                hits = [h for h in self.hits if h.name == name]
                if until(hits):
                    return hits
                left = deadline - time.monotonic()
                assert left > 0, f"receiver path {name!r} got {len(hits)} requests: {[h.body[:120] for h in hits]}"
                self._cond.wait(left)

    def close(self) -> None:
        """Stop serving."""
        self.release.set()
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    """This file's webhook receiver on 127.0.0.1."""
    server = Receiver()
    yield server
    server.close()


@pytest.fixture(scope="module")
def assistant_id(client: openai.OpenAI) -> str:
    """An assistant for the runs that produce events."""
    return client.beta.assistants.create(model="gpt-4o-mini", instructions="Be brief.").id


@pytest.fixture
def endpoints(client: openai.OpenAI) -> Iterator[Callable[..., WebhookEndpointWithSecret]]:
    """Create endpoints (deleted after the test): make(url, event_types=...)."""
    created: list[str] = []

    def make(url: str, event_types: list[str] | None = None, name: str = "test") -> WebhookEndpointWithSecret:
        endpoint = client.webhooks.create(url=url, name=name,
                                          event_types=event_types or list(RUN_EVENTS))  # type: ignore[arg-type]
        created.append(endpoint.id)
        return endpoint

    yield make
    for endpoint_id in created:
        try:
            client.webhooks.delete(endpoint_id)
        except openai.NotFoundError:
            pass


def run_once(client: openai.OpenAI, assistant_id: str, text: str = "hello") -> tuple[str, str]:
    """A new thread and a run to completion; (thread_id, run_id)."""
    run = client.beta.threads.create_and_run_poll(
        assistant_id=assistant_id, thread={"messages": [{"role": "user", "content": text}]}, poll_interval_ms=50)
    assert run.status == "completed", run.last_error
    return run.thread_id, run.id


def about(hit: Hit) -> str:
    """The id of the object a delivery is about."""
    return str(json.loads(hit.body)["data"]["id"])


def unwrap_all(client: openai.OpenAI, hits: list[Hit], secret: str) -> list[Any]:
    """Verify every delivery's signature with the SDK and parse it."""
    return [client.webhooks.unwrap(h.body, h.headers, secret=secret) for h in hits]


def for_object(events: list[Any], object_id: str) -> list[Any]:
    """The events whose data is this object."""
    return [e for e in events if e.data.id == object_id]


def raw(client: openai.OpenAI, method: str, path: str, **kwargs: Any) -> Any:
    """A call to a Threadline addition (not in the SDK) with the SDK's transport and auth."""
    response = client._client.request(method, client.base_url.join(path.lstrip("/")),
                                      headers={"Authorization": f"Bearer {client.api_key}"}, **kwargs)
    assert response.status_code == 200, response.text
    return response.json()


def extra(endpoint: WebhookEndpoint, key: str) -> Any:
    """A Threadline extension field of an endpoint (status, disabled_reason)."""
    return (endpoint.model_extra or {}).get(key)


# --- registration ---------------------------------------------------------------------------------------


def test_event_type_catalogue(client: openai.OpenAI) -> None:
    listed = client.webhooks.event_types.list()
    assert listed.object == "list" and listed.data == list(EVENT_TYPES)
    assert {"thread.run.completed", "thread.run.requires_action", "thread.message.completed",
            "vector_store.file.completed", "vector_store.file_batch.completed"} <= set(listed.data)


def test_register_secret_once_retrieve_update_list_delete(client: openai.OpenAI, receiver: Receiver) -> None:
    created = client.webhooks.create(url=receiver.url("crud"), name="crud hook",
                                     event_types=["thread.run.completed", "thread.run.completed",  # type: ignore[list-item]
                                                  "thread.run.failed"])
    try:
        assert isinstance(created, WebhookEndpointWithSecret)
        assert created.id.startswith("we_") and created.object == "webhook_endpoint"
        assert created.signing_secret.startswith("whsec_")
        assert created.signing_secret_hint and created.signing_secret[-4:] in created.signing_secret_hint
        assert created.event_types == ["thread.run.completed", "thread.run.failed"]
        assert created.updated_at == created.created_at and abs(created.created_at - now_seconds()) < 60
        assert extra(created, "status") == "enabled"

        raw_get = client.webhooks.with_raw_response.retrieve(created.id).http_response.json()
        assert "signing_secret" not in raw_get and raw_get["signing_secret_hint"] == created.signing_secret_hint
        fetched = client.webhooks.retrieve(created.id)
        assert WebhookEndpoint.model_validate(raw_get) == fetched
        assert fetched.url == receiver.url("crud") and fetched.name == "crud hook"

        unchanged = client.webhooks.update(created.id, name="crud hook")
        assert unchanged.updated_at == created.updated_at
        time.sleep(1.05)
        updated = client.webhooks.update(created.id, name="renamed",
                                         event_types=["thread.run.requires_action"])  # type: ignore[list-item]
        assert updated.name == "renamed" and updated.event_types == ["thread.run.requires_action"]
        assert updated.updated_at is not None and updated.updated_at > created.created_at

        listed = client.webhooks.list(limit=100)
        assert created.id in [e.id for e in listed.data]
        assert all("signing_secret" not in e.model_dump(exclude_unset=True) for e in listed.data)

        other = openai.OpenAI(base_url=str(client.base_url), api_key=OTHER_KEY, max_retries=0)
        with pytest.raises(openai.NotFoundError):
            other.webhooks.retrieve(created.id)
        assert created.id not in [e.id for e in other.webhooks.list(limit=100).data]
        with pytest.raises(openai.NotFoundError):
            other.webhooks.delete(created.id)
        other.close()
    finally:
        deleted = client.webhooks.delete(created.id)
    assert deleted.id == created.id and deleted.deleted is True and deleted.object == "webhook_endpoint.deleted"
    with pytest.raises(openai.NotFoundError):
        client.webhooks.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        client.webhooks.delete(created.id)


@pytest.mark.parametrize("url,reason", [
    ("http://10.0.0.1/hook", "private"),
    ("http://169.254.169.254/latest/meta-data/", "cloud metadata"),
    ("http://[fd00:ec2::254]/", "cloud metadata"),
    ("http://100.64.0.10/hook", "carrier-grade NAT"),
    ("http://192.168.0.10:8080/", "private"),
    ("http://224.0.0.251/", "multicast"),
    ("http://[::1]:9/hook", "loopback"),  # only 127.0.0.0/8 is allowed in the test stack
    ("http://[::ffff:10.0.0.1]/", "private"),
    ("ftp://127.0.0.1/hook", "scheme"),
    ("not-a-url", "scheme"),
    ("http://exa mple.com/", "whitespace"),
])
def test_ssrf_refused_at_registration(client: openai.OpenAI, url: str, reason: str) -> None:
    before = {e.id for e in client.webhooks.list(limit=100).data}
    with pytest.raises(openai.BadRequestError) as err:
        client.webhooks.create(url=url, name="evil", event_types=["thread.run.completed"])  # type: ignore[list-item]
    assert err.value.status_code == 400
    body: Any = err.value.body
    assert body["param"] == "url" and body["code"] == "invalid_url" and reason in body["message"]
    assert {e.id for e in client.webhooks.list(limit=100).data} == before


def test_invalid_bodies_are_400(client: openai.OpenAI, receiver: Receiver,
                                endpoints: Callable[..., WebhookEndpointWithSecret]) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.webhooks.create(url=receiver.url("x"), name="x", event_types=["batch.completed"])
    assert err.value.body["param"] == "event_types[0]"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        client.webhooks.create(url=receiver.url("x"), name="x", event_types=[])
    with pytest.raises(openai.BadRequestError) as err:
        client.post("/webhook_endpoints", body={"name": "x", "event_types": ["thread.run.completed"]},
                    cast_to=object)
    assert err.value.body["code"] == "missing_required_parameter"  # type: ignore[index]
    endpoint = endpoints(receiver.url("x"))
    with pytest.raises(openai.BadRequestError) as err:
        client.webhooks.update(endpoint.id, url="http://10.1.2.3/steal")
    assert err.value.body["param"] == "url"  # type: ignore[index]
    assert client.webhooks.retrieve(endpoint.id).url == receiver.url("x")
    with pytest.raises(openai.BadRequestError):
        client.webhooks.test(endpoint.id, event_type="response.completed")
    with pytest.raises(openai.NotFoundError):
        client.webhooks.update("we_missing", name="x")


def test_credentials_in_the_url_are_refused(client: openai.OpenAI, receiver: Receiver,
                                            endpoints: Callable[..., WebhookEndpointWithSecret]) -> None:
    """A user:password in the URL would be shown with the endpoint and in logs: refused at registration and update."""
    good = receiver.url("creds")
    before = {e.id for e in client.webhooks.list(limit=100).data}
    for url in (good.replace("://", "://user:s3cret@", 1), good.replace("://", "://user@", 1),
                good.replace("://", "://:s3cret@", 1)):
        with pytest.raises(openai.BadRequestError) as err:
            client.webhooks.create(url=url, name="creds", event_types=["thread.run.completed"])
        body: Any = err.value.body
        assert body["param"] == "url" and body["code"] == "invalid_url" and "password" in body["message"]
        assert "s3cret" not in body["message"]
    assert {e.id for e in client.webhooks.list(limit=100).data} == before
    endpoint = endpoints(good)
    with pytest.raises(openai.BadRequestError) as err:
        client.webhooks.update(endpoint.id, url=good.replace("://", "://user:s3cret@", 1))
    assert err.value.body["param"] == "url"  # type: ignore[index]
    assert client.webhooks.retrieve(endpoint.id).url == good


# --- delivery ---------------------------------------------------------------------------------------------


def test_deliveries_are_signed_ordered_and_summarised(client: openai.OpenAI, db: Db, receiver: Receiver,
                                                      assistant_id: str,
                                                      endpoints: Callable[..., WebhookEndpointWithSecret]) -> None:
    endpoint = endpoints(receiver.url("signed"), [*RUN_EVENTS, "thread.message.completed"])
    thread_id, run_id = run_once(client, assistant_id, "[[reply:signed and delivered]]")
    hits = receiver.wait("signed", lambda hs: sum(1 for h in hs if about(h) == run_id) >= 4
                         and any(b"thread.message.completed" in h.body and thread_id.encode() in h.body for h in hs))
    mine = [h for h in hits if thread_id.encode() in h.body]
    events = unwrap_all(client, mine, endpoint.signing_secret)
    for hit, event in zip(mine, events, strict=True):
        assert hit.headers["webhook-id"] == event.id and event.id.startswith("evt_")
        assert hit.headers["content-type"] == "application/json"
        assert event.object == "event" and abs(event.created_at - now_seconds()) < 60
    run_events = for_object(events, run_id)
    assert [e.type for e in run_events] == RUN_EVENTS  # per-thread order kept
    completed = run_events[-1].model_dump()
    assert completed["data"] == {"id": run_id, "object": "thread.run", "status": "completed",
                                 "thread_id": thread_id, "assistant_id": assistant_id}
    message = [e for e in events if e.type == "thread.message.completed"]
    assert len(message) == 1 and message[0].data.model_dump()["status"] == "completed"
    # Same order as the outbox: the event log of the thread, filtered to the subscribed types.
    logged = db.fetch("SELECT event_id FROM events WHERE thread_id = $1 AND type = ANY($2::text[]) AND"
                      " topic = 'threadline.events' ORDER BY seq", thread_id, [*RUN_EVENTS, "thread.message.completed"])
    assert [e.id for e in events] == [r["event_id"] for r in logged]
    with pytest.raises(openai.InvalidWebhookSignatureError):
        client.webhooks.unwrap(mine[0].body, mine[0].headers, secret=client.webhooks.rotate_secret(
            endpoint.id).signing_secret)


def test_test_delivery(client: openai.OpenAI, receiver: Receiver,
                       endpoints: Callable[..., WebhookEndpointWithSecret]) -> None:
    endpoint = endpoints(receiver.url("ping"))
    receiver.answer("ping", lambda n: (204, {}, b""))
    result = client.webhooks.test(endpoint.id, event_type="thread.run.failed")  # type: ignore[arg-type]
    assert result.object == "webhook_endpoint.test" and result.success is True and result.status_code == 204
    assert result.event_type == "thread.run.failed" and result.webhook_endpoint_id == endpoint.id
    event = client.webhooks.unwrap(receiver.of("ping")[-1].body, receiver.of("ping")[-1].headers,
                                   secret=endpoint.signing_secret)
    assert event.type == "thread.run.failed" and event.data.model_dump()["status"] == "failed"  # type: ignore[comparison-overlap]


def test_secret_rotation(client: openai.OpenAI, receiver: Receiver, assistant_id: str,
                         endpoints: Callable[..., WebhookEndpointWithSecret]) -> None:
    endpoint = endpoints(receiver.url("rotate"), ["thread.run.completed"])
    old = endpoint.signing_secret
    rotated = client.webhooks.rotate_secret(endpoint.id, keep_old_secret_active_for_24_hours=True)  # both sign
    assert rotated.signing_secret != old and rotated.signing_secret.startswith("whsec_")
    assert rotated.signing_secret_hint != endpoint.signing_secret_hint
    _, run_id = run_once(client, assistant_id)
    hit = receiver.wait("rotate", lambda hs: any(run_id.encode() in h.body for h in hs))
    delivery = next(h for h in hit if run_id.encode() in h.body)
    assert len(delivery.headers["webhook-signature"].split()) == 2  # both signatures during the overlap
    for secret in (old, rotated.signing_secret):
        assert client.webhooks.unwrap(delivery.body, delivery.headers, secret=secret).data.id == run_id  # type: ignore[comparison-overlap]

    again = client.webhooks.rotate_secret(endpoint.id)  # the SDK's documented default: the old one stops at once
    _, run_id = run_once(client, assistant_id)
    hit = receiver.wait("rotate", lambda hs: any(run_id.encode() in h.body for h in hs))
    delivery = next(h for h in hit if run_id.encode() in h.body)
    assert len(delivery.headers["webhook-signature"].split()) == 1
    client.webhooks.unwrap(delivery.body, delivery.headers, secret=again.signing_secret)
    for stale in (old, rotated.signing_secret):
        with pytest.raises(openai.InvalidWebhookSignatureError):
            client.webhooks.unwrap(delivery.body, delivery.headers, secret=stale)


def test_retries_until_the_receiver_recovers(client: openai.OpenAI, receiver: Receiver, assistant_id: str,
                                             endpoints: Callable[..., WebhookEndpointWithSecret]) -> None:
    endpoint = endpoints(receiver.url("flaky"), ["thread.run.completed"])
    receiver.answer("flaky", lambda n: (500, {}, b"boom " * 400) if n < 2 else (200, {}, b"thanks"))
    _, run_id = run_once(client, assistant_id)
    hits = receiver.wait("flaky", lambda hs: len(hs) >= 3)
    assert all(run_id.encode() in h.body for h in hits)
    assert len({h.headers["webhook-id"] for h in hits}) == 1  # same id on every attempt
    assert len({h.body for h in hits}) == 1
    for h in hits:
        client.webhooks.unwrap(h.body, h.headers, secret=endpoint.signing_secret)
    deliveries = raw(client, "GET", f"/webhook_endpoints/{endpoint.id}/deliveries")["data"]
    delivery = next(d for d in deliveries if d["event_id"] == hits[0].headers["webhook-id"])
    _wait(lambda: raw(client, "GET", f"/webhook_endpoints/{endpoint.id}/deliveries",
                      params={"event_id": delivery["event_id"]})["data"][0]["status"] == "succeeded")
    log = raw(client, "GET", f"/webhook_endpoints/{endpoint.id}/attempts",
              params={"delivery_id": delivery["id"], "order": "asc"})["data"]
    assert [a["status_code"] for a in log] == [500, 500, 200]
    assert [a["attempt"] for a in log] == [1, 2, 3] and [a["success"] for a in log] == [False, False, True]
    assert log[0]["response_body"].startswith("boom") and len(log[0]["response_body"]) == 1024
    assert log[2]["response_body"] == "thanks" and all(a["latency_ms"] >= 0 for a in log)
    assert log[0]["error"] is None and log[0]["object"] == "webhook_endpoint.delivery_attempt"
    time.sleep(1.0)
    assert len(receiver.of("flaky")) == 3  # nothing after the success


def test_retry_after_is_honoured(client: openai.OpenAI, receiver: Receiver, assistant_id: str,
                                 endpoints: Callable[..., WebhookEndpointWithSecret]) -> None:
    endpoints(receiver.url("busy"), ["thread.run.completed"])
    receiver.answer("busy", lambda n: (429, {"Retry-After": "2"}, b"slow down") if n == 0 else (200, {}, b""))
    run_once(client, assistant_id)
    first, second = receiver.wait("busy", lambda hs: len(hs) >= 2)[:2]
    assert second.at - first.at >= 1.9  # the schedule alone would retry after 0.5 s


def test_gone_disables_the_endpoint(client: openai.OpenAI, receiver: Receiver, assistant_id: str,
                                    endpoints: Callable[..., WebhookEndpointWithSecret]) -> None:
    endpoint = endpoints(receiver.url("gone"), ["thread.run.created", "thread.run.completed"])
    receiver.answer("gone", lambda n: (410, {}, b"gone"))
    run_once(client, assistant_id)
    receiver.wait("gone", lambda hs: len(hs) >= 1)
    _wait(lambda: extra(client.webhooks.retrieve(endpoint.id), "status") == "disabled")
    assert "410" in extra(client.webhooks.retrieve(endpoint.id), "disabled_reason")
    time.sleep(1.0)
    count = len(receiver.of("gone"))
    run_once(client, assistant_id)
    time.sleep(1.5)
    assert len(receiver.of("gone")) == count  # disabled: nothing more is sent
    failed = raw(client, "GET", f"/webhook_endpoints/{endpoint.id}/deliveries", params={"status": "failed"})["data"]
    assert failed and failed[0]["last_status_code"] == 410

    receiver.answer("gone", lambda n: (200, {}, b""))
    enabled = client.webhooks.update(endpoint.id, extra_body={"status": "enabled"})
    assert extra(enabled, "status") == "enabled" and extra(enabled, "disabled_reason") is None
    _, run_id = run_once(client, assistant_id)
    receiver.wait("gone", lambda hs: any(run_id.encode() in h.body for h in hs))


def test_re_enabling_sends_what_waited_for_a_retry(client: openai.OpenAI, db: Db, receiver: Receiver,
                                                   assistant_id: str,
                                                   endpoints: Callable[..., WebhookEndpointWithSecret]) -> None:
    """A delivery whose next retry is an hour away goes out as soon as its endpoint is enabled again."""
    endpoint = endpoints(receiver.url("later"), ["thread.run.completed"])
    receiver.answer("later", lambda n: (500, {}, b""))
    _, run_id = run_once(client, assistant_id)
    receiver.wait("later", lambda hs: len(hs) >= 1)
    client.webhooks.update(endpoint.id, extra_body={"status": "disabled"})
    assert db.fetchval("UPDATE webhook_deliveries SET next_attempt_at = now() + interval '1 hour' WHERE endpoint_id"
                       " = $1 AND status = 'pending' RETURNING 1", endpoint.id) == 1
    tried = len(receiver.of("later"))
    receiver.answer("later", lambda n: (200, {}, b""))
    client.webhooks.update(endpoint.id, extra_body={"status": "enabled"})
    receiver.wait("later", lambda hs: len(hs) > tried and run_id.encode() in hs[-1].body, 10)
    _wait(lambda: db.fetchval("SELECT status FROM webhook_deliveries WHERE endpoint_id = $1", endpoint.id)
          == "succeeded")


def test_delivery_log_resend_and_recover(client: openai.OpenAI, receiver: Receiver, assistant_id: str,
                                         endpoints: Callable[..., WebhookEndpointWithSecret]) -> None:
    endpoint = endpoints(receiver.url("down"), ["thread.run.completed"])
    receiver.answer("down", lambda n: (503, {}, b"maintenance"))
    since = now_seconds() - 1
    _, run_a = run_once(client, assistant_id)
    _, run_b = run_once(client, assistant_id)
    receiver.wait("down", lambda hs: sum(1 for h in hs if run_b.encode() in h.body) >= 4)  # schedule used up

    def failed() -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = raw(client, "GET", f"/webhook_endpoints/{endpoint.id}/deliveries",
                                         params={"status": "failed"})["data"]
        return data

    _wait(lambda: len(failed()) == 2)
    assert all(d["attempts"] == 4 and d["last_status_code"] == 503 for d in failed())
    assert len(raw(client, "GET", f"/webhook_endpoints/{endpoint.id}/attempts", params={"limit": 100})["data"]) == 8

    receiver.answer("down", lambda n: (200, {}, b""))
    recovered = raw(client, "POST", f"/webhook_endpoints/{endpoint.id}/recover", json={"since": since})
    assert recovered["recovered"] == 2 and recovered["object"] == "webhook_endpoint.recovery"
    hits = receiver.wait("down", lambda hs: len(hs) >= 10)
    assert {run_a.encode() in h.body for h in hits[8:]} == {True, False}
    _wait(lambda: not failed())

    event_id = hits[-1].headers["webhook-id"]
    resent = raw(client, "POST", f"/webhook_endpoints/{endpoint.id}/events/{event_id}/resend")
    assert resent["event_id"] == event_id and resent["status"] == "pending" and resent["attempts"] == 0
    again = receiver.wait("down", lambda hs: len(hs) >= 11)[-1]
    assert again.headers["webhook-id"] == event_id and again.body == hits[-1].body
    nothing = client._client.post(
        client.base_url.join(f"webhook_endpoints/{endpoint.id}/events/evt_missing/resend"),
        headers={"Authorization": f"Bearer {client.api_key}"})
    assert nothing.status_code == 404
    # a timestamp past 9999-12-31 names no time: a 400 on that field, not a 500
    for body, param in (({"since": 253402300800}, "since"), ({"since": 2**62}, "since"),
                        ({"since": 0, "until": 10**15}, "until")):
        refused = client._client.post(client.base_url.join(f"webhook_endpoints/{endpoint.id}/recover"), json=body,
                                      headers={"Authorization": f"Bearer {client.api_key}"})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param, refused.text


def test_connect_time_guard_refuses_what_registration_would(client: openai.OpenAI, db: Db, receiver: Receiver,
                                                            assistant_id: str) -> None:
    """An endpoint whose address became disallowed (e.g. DNS now answers a private IP) gets no traffic."""
    endpoint_id = new_id("we")
    db.execute("INSERT INTO webhook_endpoints (id, project_id, url, name, event_types, secret, created_at, updated_at)"
               " VALUES ($1, 'proj_local', $2, 'rebound', $3, 'whsec_c2VjcmV0', $4, $4)",
               endpoint_id, f"http://10.255.255.1:{receiver.port}/rebound", ["thread.run.completed"], now_seconds())
    try:
        run_once(client, assistant_id)
        _wait(lambda: len(raw(client, "GET", f"/webhook_endpoints/{endpoint_id}/attempts")["data"]) >= 1)
        attempt = raw(client, "GET", f"/webhook_endpoints/{endpoint_id}/attempts")["data"][0]
        assert attempt["status_code"] is None and attempt["error"].startswith("refused")
        assert "private" in attempt["error"]
        assert receiver.of("rebound") == []
    finally:
        client.webhooks.delete(endpoint_id)


def test_dead_endpoint_does_not_delay_healthy_ones(client: openai.OpenAI, receiver: Receiver, assistant_id: str,
                                                   endpoints: Callable[..., WebhookEndpointWithSecret]) -> None:
    endpoints(receiver.url("dead"), ["thread.run.created", "thread.run.completed"])
    endpoints(receiver.url("alive"), ["thread.run.created", "thread.run.completed"])
    receiver.answer("dead", lambda n: None)  # accepts the connection, never answers
    runs = [run_once(client, assistant_id)[1] for _ in range(3)]
    receiver.wait("alive", lambda hs: all(sum(1 for h in hs if r.encode() in h.body) == 2 for r in runs))
    assert all(h.name == "dead" for h in receiver.of("dead"))
    receiver.release.set()


def test_events_of_other_projects_are_not_delivered(client: openai.OpenAI, stack: Stack, receiver: Receiver,
                                                    endpoints: Callable[..., WebhookEndpointWithSecret]) -> None:
    endpoints(receiver.url("mine"), ["thread.run.created"])
    other = openai.OpenAI(base_url=stack.base_url, api_key=OTHER_KEY, max_retries=0)
    try:
        assistant = other.beta.assistants.create(model="gpt-4o-mini")
        run = other.beta.threads.create_and_run(assistant_id=assistant.id,
                                                thread={"messages": [{"role": "user", "content": "x"}]})
        marker = uuid.uuid4().hex
        other_endpoint = other.webhooks.create(url=receiver.url(f"theirs{marker}"), name="theirs",
                                               event_types=["thread.run.created"])  # type: ignore[list-item]
        run2 = other.beta.threads.create_and_run(assistant_id=assistant.id,
                                                 thread={"messages": [{"role": "user", "content": "y"}]})
        receiver.wait(f"theirs{marker}", lambda hs: any(run2.id.encode() in h.body for h in hs))
        assert not any(run.id.encode() in h.body for h in receiver.of(f"theirs{marker}"))  # before it existed
        assert not any(run2.id.encode() in h.body for h in receiver.of("mine"))
        other.webhooks.delete(other_endpoint.id)
    finally:
        other.close()


def test_pending_retries_survive_a_notifier_restart(client: openai.OpenAI, stack: Stack, receiver: Receiver,
                                                    assistant_id: str,
                                                    endpoints: Callable[..., WebhookEndpointWithSecret]) -> None:
    endpoint = endpoints(receiver.url("restart"), ["thread.run.completed"])
    healthy = threading.Event()
    receiver.answer("restart", lambda n: (200, {}, b"") if healthy.is_set() else (503, {"Retry-After": "3"}, b""))
    _, before = run_once(client, assistant_id)
    receiver.wait("restart", lambda hs: len(hs) >= 1)
    notifier = stack.services["notifier"]
    notifier.stop()
    try:
        _, during = run_once(client, assistant_id)  # published while no notifier runs
        healthy.set()
    finally:
        notifier.start(wait=True)
    hits = receiver.wait("restart", lambda hs: any(before.encode() in h.body and h.headers.get("x-ok") is None
                                                   for h in hs[1:]) and any(during.encode() in h.body for h in hs))
    retried = [h for h in hits if before.encode() in h.body]
    assert len(retried) >= 2 and len({h.headers["webhook-id"] for h in retried}) == 1
    for h in hits:
        client.webhooks.unwrap(h.body, h.headers, secret=endpoint.signing_secret)
    log = raw(client, "GET", f"/webhook_endpoints/{endpoint.id}/attempts", params={"order": "asc", "limit": 100})
    by_event: dict[str, list[Any]] = {}
    for attempt in log["data"]:
        by_event.setdefault(attempt["event_id"], []).append(attempt["status_code"])
    assert by_event[retried[0].headers["webhook-id"]][0] == 503
    assert by_event[retried[0].headers["webhook-id"]][-1] == 200


def _wait(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def test_failing_for_days_disables_the_endpoint(client: openai.OpenAI, db: Db, receiver: Receiver,
                                                assistant_id: str,
                                                endpoints: Callable[..., WebhookEndpointWithSecret]) -> None:
    endpoint = endpoints(receiver.url("failing"), ["thread.run.completed"])
    receiver.answer("failing", lambda n: (500, {}, b""))
    db.execute("UPDATE webhook_endpoints SET failing_since = now() - interval '5 days 1 minute' WHERE id = $1",
               endpoint.id)  # as if every delivery had failed since then
    run_once(client, assistant_id)
    _wait(lambda: extra(client.webhooks.retrieve(endpoint.id), "status") == "disabled")
    assert "5 days" in extra(client.webhooks.retrieve(endpoint.id), "disabled_reason")


def test_several_notifiers_share_the_work(client: openai.OpenAI, db: Db, stack: Stack, receiver: Receiver,
                                          assistant_id: str,
                                          endpoints: Callable[..., WebhookEndpointWithSecret]) -> None:
    endpoint = endpoints(receiver.url("shared"), ["thread.run.completed"])
    receiver.answer("shared", lambda n: (503, {}, b"") if n == 0 else (200, {}, b""), per_event=True)  # retried once
    second = stack.start_extra("notifier")
    try:
        runs = {run_once(client, assistant_id)[1] for _ in range(12)}
        receiver.wait("shared", lambda hs: runs <= {about(h) for h in hs}, 60)
        _wait(lambda: db.fetchval("SELECT count(*) FROM webhook_deliveries WHERE endpoint_id = $1 AND"
                                  " status = 'succeeded'", endpoint.id) == len(runs))
        instances = {r["instance_id"] for r in db.fetch(
            "SELECT DISTINCT instance_id FROM webhook_attempts WHERE endpoint_id = $1", endpoint.id)}
        assert instances == {"notifier-1", "notifier-2"}
        assert db.fetchval("SELECT count(*) FROM webhook_deliveries WHERE endpoint_id = $1", endpoint.id) == len(runs)
    finally:
        second.stop()


def test_resend_wakes_the_notifier_over_kafka_before_its_timer(client: openai.OpenAI, db: Db, stack: Stack,
                                                               receiver: Receiver, assistant_id: str,
                                                               endpoints: Callable[..., WebhookEndpointWithSecret]
                                                               ) -> None:
    """The resend commits WebhookDeliveriesDue with the delivery (outbox, threadline.webhook.commands); the only
    notifier left has a 60 s retry timer, so the resent event arrives this soon only through that command."""
    endpoint = endpoints(receiver.url("woken"), ["thread.run.completed"])
    run_once(client, assistant_id)
    event_id = receiver.wait("woken", lambda hs: len(hs) >= 1)[0].headers["webhook-id"]
    _wait(lambda: db.fetchval("SELECT status FROM webhook_deliveries WHERE endpoint_id = $1 AND event_id = $2",
                              endpoint.id, event_id) == "succeeded")
    notifier = stack.services["notifier"]
    notifier.stop()
    try:
        slow = stack.start_extra("notifier", env={"THREADLINE_WEBHOOK_SCHEDULER_INTERVAL_SECONDS": "60"})
        try:
            _wait(lambda: not db.fetchval("SELECT count(*) FROM webhook_deliveries WHERE status = 'pending'"))
            raw(client, "POST", f"/webhook_endpoints/{endpoint.id}/events/{event_id}/resend")
            commands = db.fetch("SELECT key, project_id, envelope FROM events WHERE topic = $1 AND key = $2",
                                WEBHOOK_COMMANDS, endpoint.id)
            assert [(c["key"], c["project_id"], c["envelope"]["type"]) for c in commands] == [
                (endpoint.id, "proj_local", WebhookDeliveriesDue.TYPE)]
            again = receiver.wait("woken", lambda hs: len(hs) >= 2, timeout=30)[-1]  # half the timer's interval
            assert again.headers["webhook-id"] == event_id
            # the attempt row is written once the receiver's answer is read, a moment after the request arrived
            _wait(lambda: db.fetchval("SELECT count(*) FROM webhook_attempts WHERE endpoint_id = $1", endpoint.id) >= 2,
                  timeout=10)
            last = db.fetchval("SELECT instance_id FROM webhook_attempts WHERE endpoint_id = $1"
                               " ORDER BY id DESC LIMIT 1", endpoint.id)
            assert last == slow.name
        finally:
            slow.stop()
    finally:
        notifier.start(wait=True)


async def _commit_lost(dsn: str, run_id: str, event_type: str) -> str:
    """Commit a copy of the run's `thread.run.completed` event as `event_type` that the outbox never publishes: what a
    broker that lost an acknowledged record (a restarted in-memory tansu) leaves behind. Its event id."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            event_id = f"evt_lost{uuid.uuid4().hex[:16]}"
            seq = await conn.fetchval(
                "INSERT INTO events (event_id, topic, key, type, project_id, thread_id, run_id, occurred_at, envelope)"
                " SELECT $3, topic, key, $2, project_id, thread_id, run_id, now(), envelope"
                " || jsonb_build_object('type', $2::text, 'event_id', $3::text, 'occurred_at', now())"
                " FROM events WHERE run_id = $1 AND type = 'thread.run.completed' RETURNING seq",
                run_id, event_type, event_id)
            await conn.execute("DELETE FROM outbox_pending WHERE seq = $1", seq)
        return event_id
    finally:
        await conn.close()


def _catchup_deliveries(stack: Stack) -> float:
    text = httpx.get(f"{stack.service('notifier').url}/metrics", timeout=5, trust_env=False).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("threadline_webhook_catchup_deliveries_total "))


def test_an_event_the_broker_lost_is_delivered_from_the_event_log(
        client: openai.OpenAI, db: Db, stack: Stack, assistant_id: str,
        endpoints: Callable[..., WebhookEndpointWithSecret]) -> None:
    """An event committed to the log but never on Kafka reaches the endpoint once, signed, through the notifier's
    catch-up (the test stack's grace period is 1 s); the live path's deliveries are not sent again."""
    receiver = SignedReceiver()
    try:
        endpoint = endpoints(receiver.url, ["thread.run.completed", "thread.run.expired"])
        receiver.secret = endpoint.signing_secret
        _, run_id = run_once(client, assistant_id)
        live = db.fetchval("SELECT event_id FROM events WHERE run_id = $1 AND type = 'thread.run.completed'", run_id)
        _wait(lambda: receiver.received[live] == 1)
        before = _catchup_deliveries(stack)
        lost = asyncio.run(_commit_lost(stack.database_url, run_id, "thread.run.expired"))
        _wait(lambda: receiver.received[lost] >= 1, timeout=30)
        time.sleep(2.5)  # more catch-up passes (every 0.25 s) and scheduler ticks: nothing is sent twice
        assert receiver.unsigned == 0
        assert dict(receiver.received) == {live: 1, lost: 1}
        (body,) = receiver.bodies[lost]
        event = json.loads(body)
        assert (event["id"], event["type"], event["data"]["id"]) == (lost, "thread.run.expired", run_id)
        assert db.fetchval("SELECT count(*) FROM webhook_deliveries WHERE endpoint_id = $1", endpoint.id) == 2
        assert _catchup_deliveries(stack) - before == 1
    finally:
        receiver.close()


# --- subscription cache: events nobody subscribed to cost no database work -------------------------------


@pytest.fixture
async def subscriptions(stack: Stack) -> AsyncIterator[Subscriptions]:
    """The notifier's subscription cache against the stack's database (listening)."""
    pool = await create_pool(stack.database_url, min_size=1, max_size=2)
    cache = Subscriptions(pool=pool, dsn=stack.database_url, reconnect_seconds=0.1)
    await cache.start()
    assert cache.listening
    try:
        yield cache
    finally:
        await cache.stop()
        await pool.close()


def _insert_endpoint(db: Db, project_id: str, event_types: list[str]) -> str:
    """Register an endpoint straight in the database (sync: the test's event loop handles nothing meanwhile)."""
    endpoint_id = new_id("we")
    db.execute("INSERT INTO webhook_endpoints (id, project_id, url, name, event_types, secret, created_at, updated_at)"
               " VALUES ($1, $2, 'http://127.0.0.1:9/none', 'cache', $3, 'whsec_c2VjcmV0', $4, $4)",
               endpoint_id, project_id, event_types, now_seconds())
    return endpoint_id


async def test_subscription_cache_sees_registrations_committed_before_the_event(db: Db,
                                                                                 subscriptions: Subscriptions) -> None:
    """The NOTIFY of a registration may not have been read when the next event is handled: the barrier waits."""
    project = f"proj_cache_{uuid.uuid4().hex[:8]}"
    completed = "thread.run.completed"
    assert not await subscriptions.may_match(project, completed, datetime.now(UTC))  # nothing: cached as such
    endpoint_id = _insert_endpoint(db, project, [completed])  # committed; its NOTIFY is not handled yet
    assert await subscriptions.may_match(project, completed, datetime.now(UTC))
    assert not await subscriptions.may_match(project, "thread.run.failed", datetime.now(UTC))

    db.execute("UPDATE webhook_endpoints SET status = 'disabled' WHERE id = $1", endpoint_id)
    assert not await subscriptions.may_match(project, "thread.run.failed", datetime.now(UTC))
    db.execute("UPDATE webhook_endpoints SET event_types = $2 WHERE id = $1", endpoint_id, ["thread.run.failed"])
    assert not await subscriptions.may_match(project, "thread.run.failed", datetime.now(UTC))  # still disabled
    db.execute("UPDATE webhook_endpoints SET status = 'enabled' WHERE id = $1", endpoint_id)
    assert await subscriptions.may_match(project, "thread.run.failed", datetime.now(UTC))
    db.execute("DELETE FROM webhook_endpoints WHERE id = $1", endpoint_id)
    assert not await subscriptions.may_match(project, "thread.run.expired", datetime.now(UTC))


async def test_subscription_cache_shares_barriers_and_survives_a_lost_connection(
        db: Db, subscriptions: Subscriptions) -> None:
    project = f"proj_cache_{uuid.uuid4().hex[:8]}"
    earlier = datetime.now(UTC)
    assert not await subscriptions.may_match(project, "thread.run.created", earlier)
    await subscriptions.may_match(project, "thread.run.queued", datetime.now(UTC))  # one barrier after `earlier`
    sent = subscriptions._barriers_sent
    results = await asyncio.gather(*(subscriptions.may_match(project, "thread.run.failed", earlier)
                                     for _ in range(20)))
    assert results == [False] * 20 and subscriptions._barriers_sent == sent  # covered by the earlier barrier
    now = datetime.now(UTC)
    await asyncio.gather(*(subscriptions.may_match(project, "thread.run.failed", now) for _ in range(20)))
    assert subscriptions._barriers_sent == sent + 1  # concurrent events share one round trip

    assert subscriptions._conn is not None
    db.execute("SELECT pg_terminate_backend($1)", subscriptions._conn.get_server_pid())
    endpoint_id = _insert_endpoint(db, project, ["thread.run.failed"])  # its NOTIFY is lost with the session
    try:
        assert await subscriptions.may_match(project, "thread.run.failed", datetime.now(UTC))  # unsure: database
        deadline = time.monotonic() + 10
        while not subscriptions.listening:
            assert time.monotonic() < deadline, "the LISTEN connection was not re-established"
            await asyncio.sleep(0.05)
        assert await subscriptions.may_match(project, "thread.run.failed", datetime.now(UTC))  # reloaded
        assert not await subscriptions.may_match(project, "thread.run.created", datetime.now(UTC))
    finally:
        db.execute("DELETE FROM webhook_endpoints WHERE id = $1", endpoint_id)


def test_endpoint_registered_just_before_an_event_gets_it(client: openai.OpenAI, receiver: Receiver,
                                                          assistant_id: str,
                                                          endpoints: Callable[..., WebhookEndpointWithSecret]) -> None:
    run_once(client, assistant_id)  # the notifier has this project's subscriptions cached
    for attempt in range(5):
        name = f"fresh{attempt}{uuid.uuid4().hex[:6]}"
        endpoints(receiver.url(name), ["thread.run.created"])
        run = client.beta.threads.create_and_run(assistant_id=assistant_id,  # no pause after the registration
                                                 thread={"messages": [{"role": "user", "content": "now"}]})
        receiver.wait(name, lambda hs, run_id=run.id: any(about(h) == run_id for h in hs))


def test_disabled_and_deleted_endpoints_get_nothing_more(client: openai.OpenAI, db: Db, receiver: Receiver,
                                                         assistant_id: str,
                                                         endpoints: Callable[..., WebhookEndpointWithSecret]) -> None:
    toggled = endpoints(receiver.url("toggled"), ["thread.run.completed"])
    endpoints(receiver.url("control"), ["thread.run.completed"])  # proves each event was handled

    def run_and_wait() -> str:
        _, run_id = run_once(client, assistant_id)
        receiver.wait("control", lambda hs: any(about(h) == run_id for h in hs))
        time.sleep(0.3)
        return run_id

    def got(run_id: str) -> bool:
        return any(about(h) == run_id for h in receiver.of("toggled"))

    assert got(run_and_wait())
    client.webhooks.update(toggled.id, extra_body={"status": "disabled"})
    quiet = run_and_wait()
    client.webhooks.update(toggled.id, extra_body={"status": "enabled"})
    heard = run_and_wait()
    client.webhooks.delete(toggled.id)
    gone = run_and_wait()
    assert not got(quiet) and got(heard) and not got(gone)
    assert db.fetchval("SELECT count(*) FROM webhook_deliveries WHERE event_id IN (SELECT event_id FROM events"
                       " WHERE run_id = ANY($1::text[]))", [quiet, gone]) == 2  # the control endpoint's only
