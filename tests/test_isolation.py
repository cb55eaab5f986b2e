"""Project isolation, swept over every route: another project's id answers exactly as an id that does not exist.

Project A (`client`, the default key) owns one object of every kind; project B (`other_client`, `sk-threadline-other`,
tests/conftest.py) calls each route that takes an id, once with A's ids and once with ids nobody has, and must get the
same status and the same error body (the ids aside): never a 200, never a 500, never a hint that A's object exists.
"""

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from conftest import OTHER_KEY
from run_helpers import poll, wait_for
from sse_helpers import read_sse

from threadline_core.ids import new_id
from threadline_devstack.sql import Db
from threadline_devstack.stack import Stack

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

Ids = dict[str, str]
Call = Callable[[openai.OpenAI, Ids], object]
TARGETS = ("asst", "thread", "msg", "run", "step", "file", "vs", "batch", "upload", "part", "webhook", "event")
"""The kinds of A's objects B names (each also as an id that does not exist)."""


def _endpoint(sdk: openai.OpenAI) -> str:
    """A webhook endpoint no event ever goes to (nothing listens; no run expires here)."""
    return sdk.webhooks.create(url="http://127.0.0.1:9/never", name="isolation",
                               event_types=["thread.run.expired"]).id


@pytest.fixture(scope="module")
def theirs(client: openai.OpenAI, db: Db) -> Iterator[Ids]:
    """Project A's objects, one of each kind, by kind."""
    assistant = client.beta.assistants.create(model="gpt-4o-mini", name="a's", tools=[{"type": "code_interpreter"}])
    file = client.files.create(file=("a.txt", b"project A's secret text", "text/plain"), purpose="assistants")
    store = client.vector_stores.create(name="a's", file_ids=[file.id])
    batch = client.vector_stores.file_batches.create(store.id, file_ids=[file.id])
    thread = client.beta.threads.create(messages=[{"role": "user", "content": "[[reply:a's answer]]"}])
    run = wait_for(client, thread.id, client.beta.threads.runs.create(thread.id, assistant_id=assistant.id).id)
    assert run.status == "completed"
    [step] = client.beta.threads.runs.steps.list(run.id, thread_id=thread.id).data
    message = client.beta.threads.messages.list(thread.id).data[-1]
    upload = client.uploads.create(bytes=4, filename="a.txt", mime_type="text/plain", purpose="assistants")
    part = client.uploads.parts.create(upload.id, data=b"abcd")
    event_id = db.fetchval("SELECT event_id FROM events WHERE run_id = $1 AND type = 'thread.run.completed'", run.id)
    ids = {"asst": assistant.id, "thread": thread.id, "msg": message.id, "run": run.id, "step": step.id,
           "file": file.id, "vs": store.id, "batch": batch.id, "upload": upload.id, "part": part.id,
           "webhook": _endpoint(client), "event": event_id}
    yield ids
    client.webhooks.delete(ids["webhook"])


@pytest.fixture(scope="module")
def own(other_client: openai.OpenAI) -> Iterator[Ids]:
    """B's own objects, for the routes that take one of B's ids beside A's (`own_*`)."""
    assistant = other_client.beta.assistants.create(model="gpt-4o-mini", tools=[{"type": "code_interpreter"}])
    thread = other_client.beta.threads.create(messages=[{"role": "user", "content": "[[reply:b's answer]]"}])
    run = wait_for(other_client, thread.id,
                   other_client.beta.threads.runs.create(thread.id, assistant_id=assistant.id).id)
    upload = other_client.uploads.create(bytes=4, filename="b.txt", mime_type="text/plain", purpose="assistants")
    other_client.uploads.parts.create(upload.id, data=b"efgh")
    ids = {"own_asst": assistant.id, "own_thread": thread.id, "own_run": run.id,
           "own_vs": other_client.vector_stores.create().id, "own_upload": upload.id,
           "own_webhook": _endpoint(other_client)}
    yield ids
    other_client.webhooks.delete(ids["own_webhook"])


def _unknown(kind: str) -> str:
    return new_id(kind).replace("file_", "file-", 1) if kind == "file" else new_id(kind)


def _get(path: str, **params: Any) -> Call:
    return lambda sdk, ids: sdk.get(path.format(**ids), cast_to=object, options={"params": _fill(params, ids)})


def _post(path: str, body: dict[str, Any] | None = None) -> Call:
    return lambda sdk, ids: sdk.post(path.format(**ids), cast_to=object, body=_fill(body or {}, ids))


def _fill(value: Any, ids: Ids) -> Any:
    """`value` with every string formatted with the ids (`"{file}"` -> the file id named)."""
    if isinstance(value, str):
        return value.format(**ids)
    if isinstance(value, list):
        return [_fill(v, ids) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, ids) for k, v in value.items()}
    return value


def _message(**extra: Any) -> dict[str, Any]:
    return {"role": "user", "content": "hi", **extra}


_CODE_FILE = {"code_interpreter": {"file_ids": ["{file}"]}}
_STORE = {"file_search": {"vector_store_ids": ["{vs}"]}}
_HELPER_STORE = {"file_search": {"vector_stores": [{"file_ids": ["{file}"]}]}}
_ATTACHED = {"attachments": [{"file_id": "{file}", "tools": [{"type": "code_interpreter"}]}]}
_SEARCH_ATTACHED = {"attachments": [{"file_id": "{file}", "tools": [{"type": "file_search"}]}]}
_IMAGE = {"content": [{"type": "image_file", "image_file": {"file_id": "{file}"}}]}

CASES: dict[str, Call] = {
    # assistants, and assistant_id in runs
    "assistants.retrieve": _get("/assistants/{asst}"),
    "assistants.update": _post("/assistants/{asst}", {"name": "stolen"}),
    "assistants.delete": lambda sdk, ids: sdk.beta.assistants.delete(ids["asst"]),
    "assistants.create tool_resources file": _post("/assistants", {"model": "gpt-4o", "tool_resources": _CODE_FILE}),
    "assistants.create tool_resources store": _post("/assistants", {"model": "gpt-4o", "tool_resources": _STORE}),
    "assistants.create tool_resources helper store": _post("/assistants", {"model": "gpt-4o",
                                                                           "tool_resources": _HELPER_STORE}),
    "assistants.update tool_resources file": _post("/assistants/{own_asst}", {"tool_resources": _CODE_FILE}),
    "assistants.update tool_resources store": _post("/assistants/{own_asst}", {"tool_resources": _STORE}),
    "runs.create assistant_id": _post("/threads/{own_thread}/runs", {"assistant_id": "{asst}"}),
    "threads.create_and_run assistant_id": _post("/threads/runs", {"assistant_id": "{asst}"}),
    "threads.create_and_run tool_resources": _post("/threads/runs", {"assistant_id": "{own_asst}",
                                                                     "tool_resources": _CODE_FILE}),
    "threads.create_and_run thread.tool_resources": _post("/threads/runs", {
        "assistant_id": "{own_asst}", "thread": {"tool_resources": _STORE}}),
    "threads.create_and_run thread.messages attachment": _post("/threads/runs", {
        "assistant_id": "{own_asst}", "thread": {"messages": [_message(**_ATTACHED)]}}),
    # threads
    "threads.retrieve": _get("/threads/{thread}"),
    "threads.update": _post("/threads/{thread}", {"metadata": {"x": "y"}}),
    "threads.delete": lambda sdk, ids: sdk.beta.threads.delete(ids["thread"]),
    "threads.create tool_resources file": _post("/threads", {"tool_resources": _CODE_FILE}),
    "threads.create tool_resources store": _post("/threads", {"tool_resources": _STORE}),
    "threads.create tool_resources helper store": _post("/threads", {"tool_resources": _HELPER_STORE}),
    "threads.create message attachment": _post("/threads", {"messages": [_message(**_ATTACHED)]}),
    "threads.create message file_search attachment": _post("/threads", {"messages": [_message(**_SEARCH_ATTACHED)]}),
    "threads.create message image_file": _post("/threads", {"messages": [_message(**_IMAGE)]}),
    "threads.update tool_resources file": _post("/threads/{own_thread}", {"tool_resources": _CODE_FILE}),
    "threads.update tool_resources store": _post("/threads/{own_thread}", {"tool_resources": _STORE}),
    # messages
    "messages.create": _post("/threads/{thread}/messages", _message()),
    "messages.list": _get("/threads/{thread}/messages"),
    "messages.retrieve": _get("/threads/{thread}/messages/{msg}"),
    "messages.retrieve own thread": _get("/threads/{own_thread}/messages/{msg}"),
    "messages.update own thread": _post("/threads/{own_thread}/messages/{msg}", {"metadata": {"x": "y"}}),
    "messages.delete own thread": lambda sdk, ids: sdk.beta.threads.messages.delete(ids["msg"],
                                                                                    thread_id=ids["own_thread"]),
    "messages.create attachment": _post("/threads/{own_thread}/messages", _message(**_ATTACHED)),
    "messages.create file_search attachment": _post("/threads/{own_thread}/messages", _message(**_SEARCH_ATTACHED)),
    "messages.create image_file": _post("/threads/{own_thread}/messages", _message(**_IMAGE)),
    # runs and steps
    "runs.create": _post("/threads/{thread}/runs", {"assistant_id": "{own_asst}"}),
    "runs.create additional_messages attachment": _post("/threads/{own_thread}/runs", {
        "assistant_id": "{own_asst}", "additional_messages": [_message(**_ATTACHED)]}),
    "runs.list": _get("/threads/{thread}/runs"),
    "runs.retrieve": _get("/threads/{thread}/runs/{run}"),
    "runs.retrieve own thread": _get("/threads/{own_thread}/runs/{run}"),
    "runs.update own thread": _post("/threads/{own_thread}/runs/{run}", {"metadata": {"x": "y"}}),
    "runs.cancel own thread": _post("/threads/{own_thread}/runs/{run}/cancel"),
    "runs.submit_tool_outputs": _post("/threads/{thread}/runs/{run}/submit_tool_outputs", {"tool_outputs": []}),
    "runs.submit_tool_outputs own thread": _post("/threads/{own_thread}/runs/{run}/submit_tool_outputs",
                                                 {"tool_outputs": []}),
    "runs.events": _get("/threads/{thread}/runs/{run}/events"),
    "runs.events own thread": _get("/threads/{own_thread}/runs/{run}/events"),
    "steps.list": _get("/threads/{thread}/runs/{run}/steps"),
    "steps.list own thread": _get("/threads/{own_thread}/runs/{run}/steps"),
    "steps.retrieve": _get("/threads/{thread}/runs/{run}/steps/{step}"),
    "steps.retrieve own run": _get("/threads/{own_thread}/runs/{own_run}/steps/{step}"),
    # files and uploads
    "files.retrieve": _get("/files/{file}"),
    "files.content": lambda sdk, ids: sdk.files.content(ids["file"]),
    "files.delete": lambda sdk, ids: sdk.files.delete(ids["file"]),
    "uploads.parts.create": lambda sdk, ids: sdk.uploads.parts.create(ids["upload"], data=b"x"),
    "uploads.complete": _post("/uploads/{upload}/complete", {"part_ids": ["{part}"]}),
    "uploads.cancel": _post("/uploads/{upload}/cancel"),
    "uploads.complete own upload": _post("/uploads/{own_upload}/complete", {"part_ids": ["{part}"]}),
    # vector stores, their files and batches
    "vector_stores.create file_ids": _post("/vector_stores", {"file_ids": ["{file}"]}),
    "vector_stores.retrieve": _get("/vector_stores/{vs}"),
    "vector_stores.update": _post("/vector_stores/{vs}", {"name": "stolen"}),
    "vector_stores.delete": lambda sdk, ids: sdk.vector_stores.delete(ids["vs"]),
    "vector_stores.search": _post("/vector_stores/{vs}/search", {"query": "secret"}),
    "vector_stores.files.create": _post("/vector_stores/{vs}/files", {"file_id": "{file}"}),
    "vector_stores.files.create own store": _post("/vector_stores/{own_vs}/files", {"file_id": "{file}"}),
    "vector_stores.files.list": _get("/vector_stores/{vs}/files"),
    "vector_stores.files.list after": _get("/vector_stores/{own_vs}/files", after="{file}"),
    "vector_stores.files.retrieve": _get("/vector_stores/{vs}/files/{file}"),
    "vector_stores.files.retrieve own store": _get("/vector_stores/{own_vs}/files/{file}"),
    "vector_stores.files.update": _post("/vector_stores/{vs}/files/{file}", {"attributes": {"x": "y"}}),
    "vector_stores.files.update own store": _post("/vector_stores/{own_vs}/files/{file}", {"attributes": {}}),
    "vector_stores.files.delete": lambda sdk, ids: sdk.vector_stores.files.delete(ids["file"],
                                                                                  vector_store_id=ids["vs"]),
    "vector_stores.files.delete own store": lambda sdk, ids: sdk.vector_stores.files.delete(
        ids["file"], vector_store_id=ids["own_vs"]),
    "vector_stores.files.content": _get("/vector_stores/{vs}/files/{file}/content"),
    "vector_stores.files.content own store": _get("/vector_stores/{own_vs}/files/{file}/content"),
    "file_batches.create": _post("/vector_stores/{vs}/file_batches", {"file_ids": ["{file}"]}),
    "file_batches.create own store": _post("/vector_stores/{own_vs}/file_batches", {"file_ids": ["{file}"]}),
    "file_batches.create own store files": _post("/vector_stores/{own_vs}/file_batches",
                                                 {"files": [{"file_id": "{file}"}]}),
    "file_batches.retrieve": _get("/vector_stores/{vs}/file_batches/{batch}"),
    "file_batches.retrieve own store": _get("/vector_stores/{own_vs}/file_batches/{batch}"),
    "file_batches.cancel": _post("/vector_stores/{vs}/file_batches/{batch}/cancel"),
    "file_batches.cancel own store": _post("/vector_stores/{own_vs}/file_batches/{batch}/cancel"),
    "file_batches.list_files": _get("/vector_stores/{vs}/file_batches/{batch}/files"),
    "file_batches.list_files own store": _get("/vector_stores/{own_vs}/file_batches/{batch}/files"),
    # webhook endpoints and their delivery log
    "webhooks.retrieve": lambda sdk, ids: sdk.webhooks.retrieve(ids["webhook"]),
    "webhooks.update": _post("/webhook_endpoints/{webhook}", {"name": "stolen"}),
    "webhooks.delete": lambda sdk, ids: sdk.webhooks.delete(ids["webhook"]),
    "webhooks.rotate_secret": _post("/webhook_endpoints/{webhook}/rotate_secret"),
    "webhooks.test": _post("/webhook_endpoints/{webhook}/test", {"event_type": "thread.run.completed"}),
    "webhooks.deliveries": _get("/webhook_endpoints/{webhook}/deliveries"),
    "webhooks.attempts": _get("/webhook_endpoints/{webhook}/attempts"),
    "webhooks.resend": _post("/webhook_endpoints/{webhook}/events/{event}/resend"),
    "webhooks.resend own endpoint": _post("/webhook_endpoints/{own_webhook}/events/{event}/resend"),
    "webhooks.recover": _post("/webhook_endpoints/{webhook}/recover", {"since": 0}),
}


def _outcome(call: Call, sdk: openai.OpenAI, ids: Ids) -> tuple[int, str]:
    """(status, body) of the call, every target id in the body replaced by its kind."""
    try:
        result = call(sdk, ids)
    except openai.APIStatusError as exc:
        status, body = exc.status_code, exc.response.text
    else:
        status, body = 200, json.dumps(result, default=str)
    for kind in TARGETS:
        body = body.replace(ids[kind], f"<{kind}>")
    return status, body


@pytest.mark.parametrize("name", sorted(CASES))
def test_another_projects_id_is_an_unknown_id(name: str, other_client: openai.OpenAI, theirs: Ids, own: Ids) -> None:
    foreign = _outcome(CASES[name], other_client, {**own, **theirs})
    unknown = _outcome(CASES[name], other_client, {**own, **{kind: _unknown(kind) for kind in TARGETS}})
    assert foreign == unknown
    assert foreign[0] in (400, 404), foreign


def test_lists_hold_only_the_projects_own(client: openai.OpenAI, other_client: openai.OpenAI, theirs: Ids,
                                          own: Ids) -> None:
    assert theirs["asst"] not in {a.id for a in other_client.beta.assistants.list(limit=100)}
    assert theirs["file"] not in {f.id for f in other_client.files.list()}
    assert theirs["vs"] not in {s.id for s in other_client.vector_stores.list(limit=100)}
    assert theirs["webhook"] not in {e.id for e in other_client.webhooks.list(limit=100)}
    assert other_client.beta.threads.messages.list(own["own_thread"], run_id=theirs["run"]).data == []
    # and A's objects are as they were after the sweep (every change B tried failed)
    assert client.beta.assistants.retrieve(theirs["asst"]).name == "a's"
    assert client.beta.threads.retrieve(theirs["thread"]).metadata == {}
    assert client.files.content(theirs["file"]).content == b"project A's secret text"
    assert client.vector_stores.retrieve(theirs["vs"]).name == "a's"
    assert client.uploads.parts.create(theirs["upload"], data=b"x").upload_id == theirs["upload"]  # still pending
    assert client.webhooks.retrieve(theirs["webhook"]).name == "isolation"


def test_a_cursor_of_another_projects_event_is_an_unknown_cursor(client: openai.OpenAI, other_client: openai.OpenAI,
                                                                 stack: Stack, db: Db) -> None:
    """B resuming its project stream after the id of one of A's events gets what an id no event has gets: what
    follows it. Before, the stream took the time of A's event and sent B's own events of the 5 s before it again
    (as for a cursor of B's own), which told B that A's event exists, and when."""
    before = other_client.beta.threads.create()
    their_thread = client.beta.threads.create()
    cursor = db.fetchval("SELECT seq FROM events WHERE thread_id = $1 AND type = 'thread.created'", their_thread.id)
    with httpx.Client(base_url=stack.base_url, headers={"Authorization": f"Bearer {OTHER_KEY}"}, trust_env=False,
                      timeout=30) as http, \
            http.stream("GET", "/events", params={"types": "thread.created"},
                        headers={"Last-Event-ID": str(cursor)}) as response:
        assert response.status_code == 200
        after = other_client.beta.threads.create()
        received = read_sse(response, until=lambda e: json.loads(e["data"])["id"] == after.id)
    threads = [json.loads(e["data"])["id"] for e in received]
    assert before.id not in threads and their_thread.id not in threads


def test_a_run_never_waits_for_another_projects_store(client: openai.OpenAI, other_client: openai.OpenAI,
                                                      db: Db) -> None:
    """A thread whose tool_resources name another project's vector store (stored before ids were checked) has its
    file_search search nothing there, and wait for nothing there either. Before, the call waited up to 60 s while a
    file of that store was in progress: how long B's run took told B what A was ingesting."""
    file = client.files.create(file=("a.txt", b"project A's text", "text/plain"), purpose="assistants")
    store = client.vector_stores.create(name="a's ingesting", file_ids=[file.id])
    poll(lambda: client.vector_stores.files.retrieve(file.id, vector_store_id=store.id).status == "completed",
         timeout=60, what="A's file indexed")
    db.execute("UPDATE vector_store_files SET status = 'in_progress', request_id = NULL WHERE vector_store_id = $1",
               store.id)  # in progress for good: no request in force (until the store is deleted below)
    assistant = other_client.beta.assistants.create(model="gpt-4o-mini", tools=[{"type": "file_search"}])
    thread = other_client.beta.threads.create(messages=[
        {"role": "user", "content": '[[call:file_search:{"query": "text"}]]'}])
    db.execute("UPDATE threads SET doc = jsonb_set(doc, '{tool_resources}', $2::jsonb) WHERE id = $1", thread.id,
               {"file_search": {"vector_store_ids": [store.id]}})
    started = time.monotonic()
    try:
        run = other_client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id,
                                                      poll_interval_ms=100)
    finally:
        client.vector_stores.delete(store.id)
    assert run.status == "completed", run.last_error
    assert time.monotonic() - started < 20
    [step] = [s for s in other_client.beta.threads.runs.steps.list(run.id, thread_id=thread.id).data
              if s.type == "tool_calls"]
    assert step.step_details.type == "tool_calls"
    [call] = step.step_details.tool_calls
    assert call.type == "file_search" and call.file_search.results == []
