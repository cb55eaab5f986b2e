"""Server-sent events through the official SDK's streaming helpers and the subscribe endpoints, real stack.

The scripted model answers by directives (`[[reply:...]]`, `[[tokens:N]]`, `[[slow:S]]`,
`[[call:NAME:JSON]]`); the test gateway sends a heartbeat comment every second (tests/conftest.py).
"""

import asyncio
import json
import threading
import time
from typing import Any

import asyncpg
import httpx
import openai
import pytest
from aiokafka import AIOKafkaProducer
from conftest import OTHER_KEY
from openai import AssistantEventHandler, AsyncAssistantEventHandler
from openai.types.beta import AssistantStreamEvent, Thread
from openai.types.beta.threads import Message, MessageDeltaEvent, Run, Text, TextDelta
from openai.types.beta.threads.runs import FileSearchToolCall, RunStep
from sse_helpers import outbox_events, read_sse
from typing_extensions import override

from gateway.api.streams import REORDER_WINDOW_SECONDS
from gateway.fanout import EventFanout
from threadline_core.events import public_event
from threadline_core.outbox import append_events
from threadline_core.topics import EVENTS
from threadline_devstack._proc import run_async
from threadline_devstack.sql import Db
from threadline_devstack.stack import Stack

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SEARCH_CONTENT = "step_details.tool_calls[*].file_search.results[*].content"
WEATHER_TOOL: Any = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


@pytest.fixture(scope="module")
def assistant_id(client: openai.OpenAI) -> str:
    """An assistant with one function tool (the scripted model only calls it when told to)."""
    return client.beta.assistants.create(model="gpt-4o-mini", instructions="Be brief.", tools=[WEATHER_TOOL]).id


def new_thread(client: openai.OpenAI, text: str) -> Thread:
    """A thread with one user message."""
    return client.beta.threads.create(messages=[{"role": "user", "content": text}])


def test_stream_true_emits_the_hosted_event_sequence(client: openai.OpenAI, assistant_id: str) -> None:
    thread = new_thread(client, "[[tokens:12]] [[slow:0.05]] count")
    stream = client.beta.threads.runs.create(thread_id=thread.id, assistant_id=assistant_id, stream=True)
    events: list[AssistantStreamEvent] = list(stream)
    names = [e.event for e in events]
    assert names[:3] == ["thread.run.created", "thread.run.queued", "thread.run.in_progress"]
    assert names[-1] == "thread.run.completed"
    for expected in ("thread.run.step.created", "thread.run.step.in_progress", "thread.message.created",
                     "thread.message.in_progress", "thread.message.delta", "thread.message.completed",
                     "thread.run.step.completed"):
        assert expected in names, names
    assert names.index("thread.message.created") < names.index("thread.message.delta") \
        < names.index("thread.message.completed") < names.index("thread.run.completed")
    assert names.index("thread.run.step.created") < names.index("thread.run.step.completed")
    assert names.count("thread.message.delta") > 1  # tools offered, none forced: the text streams as it comes
    kinds = {e.event: type(e.data) for e in events}
    assert kinds["thread.run.created"] is Run and kinds["thread.message.created"] is Message
    assert kinds["thread.run.step.created"] is RunStep and kinds["thread.message.delta"] is MessageDeltaEvent
    run_ids = {e.data.id for e in events if isinstance(e.data, Run)}
    assert len(run_ids) == 1
    deltas = "".join(block.text.value or "" for e in events if isinstance(e.data, MessageDeltaEvent)
                     for block in e.data.delta.content or [] if block.type == "text" and block.text)
    completed = next(e.data for e in events if e.event == "thread.message.completed")
    assert isinstance(completed, Message) and completed.content[0].type == "text"
    assert deltas == completed.content[0].text.value == " ".join(f"word{i}" for i in range(1, 13))
    final = events[-1].data
    assert isinstance(final, Run) and final.status == "completed"


class Collector(AssistantEventHandler):
    """Records what the SDK's event handler is told."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []
        self.text_deltas: list[str] = []
        self.texts_done: list[str] = []
        self.created: list[str] = []

    @override
    def on_event(self, event: AssistantStreamEvent) -> None:
        self.names.append(event.event)

    @override
    def on_text_created(self, text: Text) -> None:
        self.created.append(text.value)

    @override
    def on_text_delta(self, delta: TextDelta, snapshot: Text) -> None:
        self.text_deltas.append(delta.value or "")

    @override
    def on_text_done(self, text: Text) -> None:
        self.texts_done.append(text.value)


def test_event_handler_until_done_and_final_messages(client: openai.OpenAI, assistant_id: str) -> None:
    thread = new_thread(client, "[[reply:Streaming works end to end]] [[slow:0.05]]")
    handler = Collector()
    with client.beta.threads.runs.stream(thread_id=thread.id, assistant_id=assistant_id,
                                         event_handler=handler) as stream:
        stream.until_done()
        messages = stream.get_final_messages()
        run = stream.get_final_run()
        steps = stream.get_final_run_steps()
    assert run.status == "completed" and run.thread_id == thread.id
    assert len(messages) == 1 and messages[0].role == "assistant" and messages[0].run_id == run.id
    assert messages[0].content[0].type == "text"
    assert messages[0].content[0].text.value == "Streaming works end to end"
    assert "".join(handler.text_deltas) == "Streaming works end to end"
    assert handler.texts_done == ["Streaming works end to end"]
    assert [s.type for s in steps] == ["message_creation"]  # snapshots as created (the SDK keeps those)
    assert handler.names[0] == "thread.run.created" and handler.names[-1] == "thread.run.completed"
    stored = client.beta.threads.messages.list(thread_id=thread.id, order="asc").data
    assert stored[-1].id == messages[0].id


def test_text_deltas_iterator(client: openai.OpenAI, assistant_id: str) -> None:
    thread = new_thread(client, "[[tokens:6]]")
    with client.beta.threads.runs.stream(thread_id=thread.id, assistant_id=assistant_id) as stream:
        text = "".join(stream.text_deltas)
    assert text == "word1 word2 word3 word4 word5 word6"


def test_create_thread_and_run_stream(client: openai.OpenAI, assistant_id: str) -> None:
    with client.beta.threads.create_and_run_stream(
            assistant_id=assistant_id, thread={"messages": [{"role": "user", "content": "[[reply:fresh thread]]"}]},
    ) as stream:
        events = list(stream)
        final = stream.get_final_messages()
    assert events[0].event == "thread.created" and isinstance(events[0].data, Thread)
    assert [e.event for e in events[1:4]] == ["thread.run.created", "thread.run.queued", "thread.run.in_progress"]
    assert events[-1].event == "thread.run.completed"
    run = events[-1].data
    assert isinstance(run, Run) and run.thread_id == events[0].data.id
    assert [m.content[0].text.value for m in final if m.content[0].type == "text"] == ["fresh thread"]
    # The thread's user message is not a run event (as hosted): only the assistant's message is streamed.
    assert sum(1 for e in events if e.event == "thread.message.created") == 1


def test_requires_action_then_submit_tool_outputs_stream(client: openai.OpenAI, assistant_id: str) -> None:
    thread = new_thread(client, '[[call:get_weather:{"city": "Paris"}]] weather?')
    with client.beta.threads.runs.stream(thread_id=thread.id, assistant_id=assistant_id) as stream:
        first = list(stream)
    assert first[-1].event == "thread.run.requires_action"  # the stream ends when the run pauses
    run = first[-1].data
    assert isinstance(run, Run) and run.required_action is not None
    call = run.required_action.submit_tool_outputs.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    with client.beta.threads.runs.submit_tool_outputs_stream(
            thread_id=thread.id, run_id=run.id, tool_outputs=[{"tool_call_id": call.id, "output": "sunny"}],
    ) as stream:
        second = list(stream)
        final = stream.get_final_messages()
    names = [e.event for e in second]
    assert "thread.run.created" not in names and "thread.run.requires_action" not in names
    # as the hosted API reference's submit_tool_outputs stream: the answered step completes, then the run is queued
    assert names[:3] == ["thread.run.step.completed", "thread.run.queued", "thread.run.in_progress"], names
    assert names[-1] == "thread.run.completed"
    step = second[0].data
    assert isinstance(step, RunStep) and step.status == "completed" and step.step_details.type == "tool_calls"
    assert step.completed_at is not None and step.usage is not None and step.usage.total_tokens > 0
    stored = client.beta.threads.runs.steps.retrieve(step.id, thread_id=thread.id, run_id=run.id)
    assert step == stored and [c.function.output for c in stored.step_details.tool_calls  # type: ignore[union-attr]
                               ] == ["sunny"]
    assert final[-1].content[0].type == "text" and final[-1].content[0].text.value == "Tool results: sunny"


@pytest.mark.parametrize("include", [[SEARCH_CONTENT], []], ids=["with-content", "without-content"])
def test_submit_tool_outputs_stream_keeps_the_runs_include(client: openai.OpenAI, marker: str,
                                                           include: list[Any]) -> None:
    store = client.vector_stores.create(name="kiwis")
    client.vector_stores.files.upload_and_poll(vector_store_id=store.id, file=(
        "kiwi.txt", f"Kiwis are green inside. {marker}".encode(), "text/plain"))
    assistant = client.beta.assistants.create(model="gpt-4o-mini", tools=[WEATHER_TOOL, {"type": "file_search"}],
                                              tool_resources={"file_search": {"vector_store_ids": [store.id]}})
    # one step: a function call (the run waits for its output) and a file_search call (searched meanwhile)
    thread = new_thread(client, '[[call:get_weather:{"city": "Paris"}]] [[call:file_search:{"query": "kiwi"}]]')
    with client.beta.threads.runs.stream(thread_id=thread.id, assistant_id=assistant.id, include=include) as stream:
        first = list(stream)
    run = first[-1].data
    assert isinstance(run, Run) and run.required_action is not None
    [call] = run.required_action.submit_tool_outputs.tool_calls
    # a new stream: the step's late deltas (of the first stream) must not reach it (the SDK has no snapshot)
    with client.beta.threads.runs.submit_tool_outputs_stream(
            thread_id=thread.id, run_id=run.id, tool_outputs=[{"tool_call_id": call.id, "output": "sunny"}],
    ) as stream:
        second = list(stream)
    assert second[-1].event == "thread.run.completed"
    # the tool_calls step completes on the submission's stream, shaped by the run's include[] as its first one was
    [step] = [e.data for e in second if e.event == "thread.run.step.completed" and isinstance(e.data, RunStep)
              and e.data.step_details.type == "tool_calls"]
    assert step.step_details.type == "tool_calls"
    [search] = [c for c in step.step_details.tool_calls if c.type == "file_search"]
    assert search.file_search.results
    contents = [r.content for r in search.file_search.results]
    if include:
        assert all(contents) and marker in ((contents[0] or [])[0].text or "")
    else:
        assert contents == [None] * len(contents)


def test_the_streamed_file_search_call_adds_up_to_the_step_retrieved(client: openai.OpenAI, marker: str) -> None:
    """Its deltas brought results but never ranking_options (hosted streams them): the SDK's snapshot lacked them."""
    store = client.vector_stores.create(name="railroads")
    client.vector_stores.files.upload_and_poll(vector_store_id=store.id, file=(
        "brka.txt", f"Berkshire owns the BNSF railroad. {marker}".encode(), "text/plain"))
    assistant = client.beta.assistants.create(model="gpt-4o-mini", tools=[{"type": "file_search", "file_search": {
        "ranking_options": {"ranker": "default_2024_08_21", "score_threshold": 0.05}}}],
        tool_resources={"file_search": {"vector_store_ids": [store.id]}})
    thread = new_thread(client, '[[call:file_search:{"query": "railroad"}]]')
    with client.beta.threads.runs.stream(thread_id=thread.id, assistant_id=assistant.id,
                                         include=[SEARCH_CONTENT]) as stream:
        stream.until_done()
        [snapshot] = [s for s in stream.get_final_run_steps() if s.type == "tool_calls"]
    assert stream.get_final_run().status == "completed"
    stored = client.beta.threads.runs.steps.retrieve(snapshot.id, thread_id=thread.id, run_id=snapshot.run_id,
                                                     include=[SEARCH_CONTENT])
    assert snapshot.step_details.type == stored.step_details.type == "tool_calls"
    [streamed] = snapshot.step_details.tool_calls
    [kept] = stored.step_details.tool_calls
    assert isinstance(streamed, FileSearchToolCall) and isinstance(kept, FileSearchToolCall)
    assert kept.file_search.ranking_options is not None and kept.file_search.ranking_options.score_threshold == 0.05
    results = kept.file_search.results or []
    assert results and marker in "".join(part.text or "" for part in results[0].content or [])
    assert (streamed.id, streamed.file_search.model_dump()) == (kept.id, kept.file_search.model_dump())


async def test_async_stream_helpers(async_client: openai.AsyncOpenAI, assistant_id: str) -> None:
    deltas: list[str] = []

    class Handler(AsyncAssistantEventHandler):
        @override
        async def on_text_delta(self, delta: TextDelta, snapshot: Text) -> None:
            deltas.append(delta.value or "")

    thread = await async_client.beta.threads.create(messages=[{"role": "user", "content": "[[reply:async ok]]"}])
    async with async_client.beta.threads.runs.stream(thread_id=thread.id, assistant_id=assistant_id,
                                                     event_handler=Handler()) as stream:
        await stream.until_done()
        messages = await stream.get_final_messages()
    assert "".join(deltas) == "async ok"
    assert messages[0].content[0].type == "text" and messages[0].content[0].text.value == "async ok"


def test_subscribe_to_a_run_and_resume_with_last_event_id(client: openai.OpenAI, http: httpx.Client, db: Db,
                                                         assistant_id: str) -> None:
    thread = new_thread(client, "[[reply:subscribed]]")
    run = client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant_id,
                                                   poll_interval_ms=50)
    path = f"/threads/{thread.id}/runs/{run.id}/events"
    with http.stream("GET", path) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        full = read_sse(response)
    assert full[-1] == {"event": "done", "data": "[DONE]"}
    ids = outbox_events(full)
    # A finished run replays from the log; its message's text comes as one delta (no id) before completion.
    deltas = [e for e in full if e["event"] == "thread.message.delta"]
    assert len(ids) == len(full) - 2 and len(deltas) == 1 and "id" not in deltas[0]
    assert json.loads(deltas[0]["data"])["delta"]["content"][0]["text"]["value"] == "subscribed"
    names = [e["event"] for e in full]
    assert names.index("thread.message.delta") == names.index("thread.message.completed") - 1
    assert [i for i, _ in ids] == sorted({i for i, _ in ids})
    logged = db.fetch("SELECT seq, type FROM events WHERE run_id = $1 AND topic = 'threadline.events' ORDER BY seq",
                      run.id)
    assert ids == [(r["seq"], r["type"]) for r in logged]
    assert ids[0][1] == "thread.run.created" and ids[-1][1] == "thread.run.completed"
    assert json.loads(full[0]["data"])["id"] == run.id

    with http.stream("GET", path, headers={"Last-Event-ID": str(ids[2][0])}) as response:
        tail = read_sse(response)
    assert outbox_events(tail) == ids[3:] and tail[-1]["event"] == "done"
    with http.stream("GET", path, params={"after": str(ids[-1][0])}) as response:
        assert read_sse(response) == [{"event": "done", "data": "[DONE]"}]  # nothing missed, still ends


def test_resume_a_live_run_without_gaps_or_duplicates(client: openai.OpenAI, http: httpx.Client,
                                                      assistant_id: str) -> None:
    thread = new_thread(client, "[[tokens:25]] [[slow:0.08]] long answer")
    run = client.beta.threads.runs.create(thread_id=thread.id, assistant_id=assistant_id)
    path = f"/threads/{thread.id}/runs/{run.id}/events"
    with http.stream("GET", path) as response:
        first = read_sse(response, stop_after=7)  # disconnect mid-run
    last_id = outbox_events(first)[-1][0]
    with http.stream("GET", path, headers={"Last-Event-ID": str(last_id)}) as response:
        second = read_sse(response)
    assert second[-1]["event"] == "done"
    with http.stream("GET", path) as response:
        reference = outbox_events(read_sse(response))
    seen = outbox_events(first) + outbox_events(second)
    assert len(seen) == len(set(seen))  # nothing twice
    assert seen == reference  # nothing missed
    message_ids = {json.loads(e["data"])["id"] for e in first + second if e["event"] == "thread.message.created"}
    for e in second:
        if e["event"] == "thread.message.delta":
            assert json.loads(e["data"])["id"] in message_ids  # only deltas of a message the client knows


class ProjectListener:
    """Follows the project stream (`/v1/events`) in a thread, keeping every event ({'id'?, 'event', 'data'}), until
    `stop` (the test stack's heartbeat, every second, lets it notice)."""

    def __init__(self, http: httpx.Client, params: dict[str, str] | None = None) -> None:
        self.received: list[dict[str, str]] = []
        self._http, self._params = http, params
        self._ready, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)
        time.sleep(0.2)  # the stream subscribes once its response started

    def stop(self) -> None:
        """Stop listening (at the next line: an event or a heartbeat)."""
        self._stop.set()
        self._thread.join(10)

    def _listen(self) -> None:
        with self._http.stream("GET", "/events", params=self._params) as response:
            self._ready.set()
            current: dict[str, str] = {}
            for line in response.iter_lines():
                if self._stop.is_set():
                    return
                if line == "" and current:
                    self.received.append(current)
                    current = {}
                elif line and not line.startswith(":"):
                    field, _, value = line.partition(": ")
                    current[field] = value


def test_project_stream_filters_types_and_resumes(client: openai.OpenAI, other_client: openai.OpenAI,
                                                  http: httpx.Client, assistant_id: str) -> None:
    listener = ProjectListener(http, {"types": "thread.run.created,thread.run.completed"})
    received = listener.received
    other_assistant = other_client.beta.assistants.create(model="gpt-4o-mini")
    other_run = other_client.beta.threads.create_and_run_poll(
        assistant_id=other_assistant.id, thread={"messages": [{"role": "user", "content": "x"}]}, poll_interval_ms=50)
    run = client.beta.threads.create_and_run_poll(
        assistant_id=assistant_id, thread={"messages": [{"role": "user", "content": "y"}]}, poll_interval_ms=50)
    deadline = time.monotonic() + 30
    while not any(e["event"] == "thread.run.completed" and json.loads(e["data"])["id"] == run.id
                  for e in list(received)):
        assert time.monotonic() < deadline, received
        time.sleep(0.05)
    listener.stop()
    mine = [e for e in received if json.loads(e["data"])["id"] == run.id]
    assert [e["event"] for e in mine] == ["thread.run.created", "thread.run.completed"]
    assert {e["event"] for e in received} <= {"thread.run.created", "thread.run.completed"}
    assert not any(json.loads(e["data"])["id"] == other_run.id for e in received)

    # Disconnected: a run happens; reconnecting with Last-Event-ID replays it, then follows live. Events of the
    # few seconds before the cursor come again (other threads' events may have come after it): ids to skip.
    cursor = mine[-1]["id"]
    missed = client.beta.threads.create_and_run_poll(
        assistant_id=assistant_id, thread={"messages": [{"role": "user", "content": "z"}]}, poll_interval_ms=50)
    with http.stream("GET", "/events", params={"types": "thread.run.completed"},
                     headers={"Last-Event-ID": cursor}) as response:
        replayed = read_sse(response, until=lambda e: bool(json.loads(e["data"])["id"] == missed.id))
    ids = [int(e["id"]) for e in replayed]
    assert ids == sorted(set(ids)) and int(cursor) in ids, "the window before the cursor is sent again, in order"
    assert {e["event"] for e in replayed} == {"thread.run.completed"}


async def test_a_resumed_project_stream_gets_what_a_long_transaction_commits_later(
        client: openai.OpenAI, http: httpx.Client, stack: Stack, assistant_id: str, marker: str) -> None:
    """A transaction's events take their ids when written and show at its commit, after later ids were sent. Found
    rolling the gateways under load on a busy machine (a writer stalled for seconds): the streams resumed past such
    events (Last-Event-ID more than the 5 s window beyond them) skipped them when they came, and the project stream
    missed 9 of 4723 run completions. A resumed stream reaches back to the start of the oldest writing transaction."""
    def completed_seq(run: Run) -> int:
        return int(Db(stack.database_url).fetchval(
            "SELECT seq FROM events WHERE run_id = $1 AND type = 'thread.run.completed'", run.id))

    def finish(text: str) -> Run:
        return client.beta.threads.create_and_run_poll(
            assistant_id=assistant_id, thread={"messages": [{"role": "user", "content": text}]}, poll_interval_ms=50)

    writer = await asyncpg.connect(stack.database_url)
    try:
        held = writer.transaction()
        await held.start()
        late = public_event(type="thread.run.completed", project_id="proj_local", key=f"thread_{marker}",
                            thread_id=f"thread_{marker}", run_id=f"run_{marker}",
                            data={"id": f"run_{marker}", "object": "thread.run", "status": "completed"})
        await append_events(writer, EVENTS, [late])  # its id is taken now; it commits after the resume
        await asyncio.to_thread(finish, f"{marker} committed at once, after the held event's id")
        await asyncio.sleep(REORDER_WINDOW_SECONDS + 1)
        resume_at = completed_seq(await asyncio.to_thread(finish, f"{marker} the last one the client saw"))

        closing = await asyncio.to_thread(client.beta.threads.create, messages=[
            {"role": "user", "content": f"{marker} after the commit"}])

        def follow() -> list[dict[str, str]]:
            with http.stream("GET", "/events", params={"types": "thread.run.completed"},
                             headers={"Last-Event-ID": str(resume_at)}) as response:
                return read_sse(response, until=lambda e: json.loads(e["data"]).get("thread_id") == closing.id)

        following = asyncio.create_task(asyncio.to_thread(follow))
        await asyncio.sleep(0.5)  # the stream subscribes once its response started
        await held.commit()
        await asyncio.to_thread(client.beta.threads.runs.create_and_poll, thread_id=closing.id,
                                assistant_id=assistant_id, poll_interval_ms=50)
        received = await following
    finally:
        await writer.close()
    assert late.run_id in [json.loads(e["data"])["id"] for e in received], "the late commit never reached the stream"


def test_a_new_project_stream_starts_at_its_subscription(client: openai.OpenAI, http: httpx.Client,
                                                          assistant_id: str) -> None:
    earlier = [client.beta.threads.create_and_run_poll(  # recent completions on most partitions
        assistant_id=assistant_id, thread={"messages": [{"role": "user", "content": "before"}]}, poll_interval_ms=50)
        for _ in range(6)]
    with http.stream("GET", "/events", params={"types": "thread.run.completed"}) as response:
        time.sleep(0.5)  # the stream subscribes once its response started
        run = client.beta.threads.create_and_run_poll(
            assistant_id=assistant_id, thread={"messages": [{"role": "user", "content": "after"}]},
            poll_interval_ms=50)
        first = read_sse(response, stop_after=1)[0]
    assert json.loads(first["data"])["id"] == run.id, [r.id for r in earlier]


def test_heartbeat_on_idle_streams(http: httpx.Client) -> None:
    comments: list[str] = []
    with http.stream("GET", "/events", params={"types": "vector_store.file_batch.completed"}) as response:
        for line in response.iter_lines():
            if line.startswith(":"):
                comments.append(line)
                break
    assert comments == [": keep-alive"]


def test_a_project_stream_of_an_unknown_event_type_is_refused(http: httpx.Client) -> None:
    """A misspelt type would match nothing: the stream stayed silent forever instead of saying so."""
    refused = http.get("/events", params={"types": "thread.run.completed,thread.run.complete"})
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["param"] == "types" and error["code"] == "invalid_value"
    assert error["message"].startswith("Invalid value: 'thread.run.complete'. Supported values are")
    every_type = "thread.created,thread.run.step.delta,thread.message.incomplete,vector_store.file.failed"
    with http.stream("GET", "/events", params={"types": every_type}) as accepted:
        assert accepted.status_code == 200


def test_a_last_event_id_after_the_log_is_refused(client: openai.OpenAI, http: httpx.Client,
                                                  assistant_id: str) -> None:
    """An id no stream sent (beyond the event log) would make a resumed stream skip every event to come (a run's
    stream then never ended): it is a 400, as other ids that were never sent are."""
    thread = new_thread(client, "[[reply:x]]")
    run = client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant_id,
                                                   poll_interval_ms=50)
    for path in (f"/threads/{thread.id}/runs/{run.id}/events", "/events"):
        refused = http.get(path, headers={"Last-Event-ID": "999999999999"})
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"] == {
            "message": "Invalid Last-Event-ID: '999999999999' is after the last event. Expected the id of an event "
                       "received on this stream.", "type": "invalid_request_error", "param": "Last-Event-ID",
            "code": "invalid_value"}


def test_a_run_stream_ends_with_an_error_when_its_thread_is_deleted(client: openai.OpenAI, http: httpx.Client,
                                                                     assistant_id: str) -> None:
    """Deleting the thread of a streaming or waiting run deletes the run, so no terminal event will come: its streams
    end with an `error` event (the SDK raises APIError) instead of sending keep-alives forever."""
    thread = new_thread(client, "[[slow:0.2]] [[tokens:50]]")
    waiting = new_thread(client, '[[call:get_weather:{"city": "Oslo"}]]')
    paused = client.beta.threads.runs.create_and_poll(thread_id=waiting.id, assistant_id=assistant_id,
                                                      poll_interval_ms=50)
    assert paused.status == "requires_action"
    with http.stream("GET", f"/threads/{waiting.id}/runs/{paused.id}/events") as followed:
        threading.Timer(0.5, client.beta.threads.delete, args=(waiting.id,)).start()
        events = read_sse(followed)
    assert events[0]["event"] == "thread.run.created" and [e["event"] for e in events[-2:]] == ["error", "done"]
    assert json.loads(events[-2]["data"])["error"]["message"] == (
        f"Run '{paused.id}' no longer exists: its thread '{waiting.id}' was deleted.")
    started, deleted = time.monotonic(), []
    with pytest.raises(openai.APIError, match="was deleted") as raised, \
            client.beta.threads.runs.stream(thread_id=thread.id, assistant_id=assistant_id) as stream:
        for event in stream:
            if event.event == "thread.message.delta" and not deleted:
                deleted.append(client.beta.threads.delete(thread.id))
    assert raised.value.body is not None and time.monotonic() - started < 30


def test_subscribe_errors(client: openai.OpenAI, stack: Stack, http: httpx.Client, assistant_id: str) -> None:
    thread = new_thread(client, "[[reply:x]]")
    run = client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant_id,
                                                   poll_interval_ms=50)
    missing = http.get(f"/threads/{thread.id}/runs/run_missing/events")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "invalid_request_error"
    wrong_thread = http.get(f"/threads/thread_missing/runs/{run.id}/events")
    assert wrong_thread.status_code == 404
    other = http.get(f"/threads/{thread.id}/runs/{run.id}/events", headers={"Authorization": f"Bearer {OTHER_KEY}"})
    assert other.status_code == 404
    bad = http.get(f"/threads/{thread.id}/runs/{run.id}/events", headers={"Last-Event-ID": "abc"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "Last-Event-ID"
    anonymous = httpx.get(f"{stack.base_url}/events", timeout=10, trust_env=False)
    assert anonymous.status_code == 401


def test_any_gateway_instance_serves_any_stream(client: openai.OpenAI, stack: Stack, http: httpx.Client,
                                                assistant_id: str) -> None:
    """Start on this gateway, resume on another instance: its fan-out comes from Kafka, not from the writer."""
    second = stack.start_extra("gateway")
    try:
        thread = new_thread(client, "[[tokens:20]] [[slow:0.08]] long answer")
        run = client.beta.threads.runs.create(thread_id=thread.id, assistant_id=assistant_id)
        path = f"/threads/{thread.id}/runs/{run.id}/events"
        with http.stream("GET", path) as response:
            first = read_sse(response, stop_after=5)
        with httpx.Client(base_url=f"{second.url}/v1", headers={"Authorization": f"Bearer {stack.api_key}"},
                          trust_env=False, timeout=30) as other, \
                other.stream("GET", path, headers={"Last-Event-ID": str(outbox_events(first)[-1][0])}) as response:
            rest = read_sse(response)
        assert rest[-1]["event"] == "done"
        with http.stream("GET", path) as response:
            reference = outbox_events(read_sse(response))
        assert outbox_events(first) + outbox_events(rest) == reference
    finally:
        second.stop()


async def test_fanout_fetches_only_while_subscribed_and_from_the_subscription_on(stack: Stack) -> None:
    """Paused while nobody listens; a subscriber gets what follows its subscription, nothing older or unrelated."""
    def event(thread_id: str, n: int) -> bytes:
        return public_event(type="thread.run.queued", project_id="proj_fanout", key=thread_id,
                            thread_id=thread_id, data={"n": n}).to_bytes()

    producer = AIOKafkaProducer(bootstrap_servers=stack.kafka_bootstrap_servers)
    await producer.start()
    try:
        async with EventFanout(bootstrap=stack.kafka_bootstrap_servers) as fanout:
            assert fanout.paused
            await producer.send_and_wait(EVENTS, event("thread_fan_a", 1), key=b"thread_fan_a")
            sub = await fanout.subscribe(thread_id="thread_fan_a")
            assert not fanout.paused
            other = await fanout.subscribe(thread_id="thread_fan_b")
            await producer.send_and_wait(EVENTS, event("thread_fan_c", 2), key=b"thread_fan_c")
            await producer.send_and_wait(EVENTS, event("thread_fan_a", 3), key=b"thread_fan_a")
            received = await asyncio.wait_for(sub.queue.get(), 10)
            assert received.data == {"n": 3}  # not the record published before subscribing
            assert other.queue.empty() and sub.queue.empty()
            fanout.unsubscribe(sub)
            assert not fanout.paused
            fanout.unsubscribe(other)
            assert fanout.paused
            await producer.send_and_wait(EVENTS, event("thread_fan_a", 4), key=b"thread_fan_a")
            again = await fanout.subscribe(thread_id="thread_fan_a")
            await producer.send_and_wait(EVENTS, event("thread_fan_a", 5), key=b"thread_fan_a")
            assert (await asyncio.wait_for(again.queue.get(), 10)).data == {"n": 5}
    finally:
        await producer.stop()


async def _commit_unpublished(dsn: str, run_id: str, event_type: str, logged_ago: float = 0.0) -> int:
    """Commit a copy of the run's `requires_action` event as `event_type` (occurred `logged_ago` seconds ago) that
    the outbox never publishes: what a broker that lost an acknowledged record (a restarted in-memory broker, a
    torn write) leaves behind."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            seq = await conn.fetchval(
                "INSERT INTO events (event_id, topic, key, type, project_id, thread_id, run_id, occurred_at, envelope)"
                " SELECT 'evt_lost_' || substr(md5(random()::text), 1, 16), topic, key, $2, project_id, thread_id,"
                " run_id, now() - make_interval(secs => $3), envelope || jsonb_build_object('type', $2::text)"
                " FROM events WHERE run_id = $1 AND type = 'thread.run.requires_action' RETURNING seq",
                run_id, event_type, logged_ago)
            await conn.execute("DELETE FROM outbox_pending WHERE seq = $1", seq)
        return int(seq)
    finally:
        await conn.close()


def test_a_run_stream_takes_from_the_event_log_what_the_broker_never_brought(
        client: openai.OpenAI, http: httpx.Client, stack: Stack, assistant_id: str) -> None:
    """An idle run stream looks in the event log for events the broker lost, so a lost terminal event ends the stream
    (within a heartbeat) instead of keep-alives forever."""
    thread = new_thread(client, '[[call:get_weather:{"city": "Oslo"}]]')
    paused = client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant_id,
                                                      poll_interval_ms=50)
    assert paused.status == "requires_action"
    started = time.monotonic()
    with http.stream("GET", f"/threads/{thread.id}/runs/{paused.id}/events") as followed:
        threading.Timer(0.5, run_async, args=(_commit_unpublished(stack.database_url, paused.id,
                                                                  "thread.run.cancelled"),)).start()
        events = read_sse(followed)  # requires_action runs expire after 10 s in the test stack
    lost = outbox_events(events)[-1]
    assert [e["event"] for e in events[-2:]] == ["thread.run.cancelled", "done"], events[-3:]
    assert time.monotonic() - started < 8
    assert lost[1] == "thread.run.cancelled"
    client.beta.threads.runs.cancel(paused.id, thread_id=thread.id)


def test_a_project_stream_takes_from_the_event_log_what_the_broker_never_brought(
        client: openai.OpenAI, http: httpx.Client, stack: Stack, assistant_id: str) -> None:
    """A project stream looks in the event log every heartbeat for events the broker lost and sends each once, then
    goes on live."""
    thread = new_thread(client, '[[call:get_weather:{"city": "Oslo"}]]')
    paused = client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant_id,
                                                      poll_interval_ms=50)
    assert paused.status == "requires_action"
    with http.stream("GET", "/events", params={"types": "thread.run.cancelled"}) as followed:
        time.sleep(0.5)  # the stream subscribes once its response started
        lost = run_async(_commit_unpublished(stack.database_url, paused.id, "thread.run.cancelled", logged_ago=10))
        threading.Timer(3.5, client.beta.threads.runs.cancel, args=(paused.id,),  # after several more looks
                        kwargs={"thread_id": thread.id}).start()
        events = read_sse(followed, stop_after=2)
    assert (int(events[0]["id"]), events[0]["event"]) == (lost, "thread.run.cancelled"), events
    assert int(events[1]["id"]) > lost and events[1]["event"] == "thread.run.cancelled", events  # not sent again
    assert {json.loads(e["data"])["id"] for e in events} == {paused.id}


def test_a_project_stream_without_types_leaves_out_deltas_live_and_from_the_log(client: openai.OpenAI,
                                                                                http: httpx.Client,
                                                                                assistant_id: str) -> None:
    """Without `types` the project stream has no deltas live; its look in the event log (for what the broker lost)
    sent every tool call's step deltas once they were 5 s old, out of id order, and a disconnect lost some for good
    (the chaos trial: 18 of 22759 events never reached a resuming project stream, all step deltas)."""
    listener = ProjectListener(http)
    received = listener.received
    thread = new_thread(client, '[[call:get_weather:{"city": "Oslo"}]] weather?')
    run = client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant_id,
                                                   poll_interval_ms=50)
    assert run.status == "requires_action"
    time.sleep(8)  # past the 5 s reorder window and a few heartbeats: the stream looked in the log
    listener.stop()
    mine = [e for e in received if json.loads(e["data"]).get("thread_id") == thread.id
            or json.loads(e["data"]).get("id") == thread.id]
    assert "thread.run.requires_action" in {e["event"] for e in mine}
    assert not [e for e in received if e["event"] in ("thread.run.step.delta", "thread.message.delta")]
    first = min(int(e["id"]) for e in mine)
    with http.stream("GET", "/events", headers={"Last-Event-ID": str(first)}) as response:
        replayed = read_sse(response, until=lambda e: e["event"] == "thread.run.requires_action"
                            and json.loads(e["data"])["id"] == run.id)
    assert not [e for e in replayed if e["event"] == "thread.run.step.delta"], "a resumed stream replays none either"


def test_a_client_too_far_behind_gets_an_error_event_then_resumes(stack: Stack, assistant_id: str) -> None:
    """A run stream whose client falls more than THREADLINE_SSE_QUEUE_SIZE records behind ends with an `error` event
    (code stream_interrupted) and no `done`: the SDK raises APIError instead of taking the end for the run's, and
    Last-Event-ID brings the rest of the run, each event once and in order."""
    with stack.extra_instance("gateway", env={"THREADLINE_SSE_QUEUE_SIZE": "1"}) as gateway:
        sdk = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=stack.api_key, max_retries=0)
        thread = new_thread(sdk, "[[slow:0.05]][[tokens:40]] a client that cannot keep up")
        with pytest.raises(openai.APIError) as cut, \
                sdk.beta.threads.runs.stream(thread_id=thread.id, assistant_id=assistant_id) as stream:
            stream.until_done()
        assert cut.value.code == "stream_interrupted" and "too far behind" in cut.value.message
        headers = {"Authorization": f"Bearer {stack.api_key}"}
        raw_thread = new_thread(sdk, "[[slow:0.05]][[tokens:40]] a raw SSE client that cannot keep up")
        with httpx.Client(base_url=f"{gateway.url}/v1", headers=headers, trust_env=False, timeout=30) as http:
            with http.stream("POST", f"/threads/{raw_thread.id}/runs",
                             json={"assistant_id": assistant_id, "stream": True}) as response:
                first = read_sse(response)
            assert first[-1]["event"] == "error" and "done" not in [e["event"] for e in first], first
            assert json.loads(first[-1]["data"])["error"]["code"] == "stream_interrupted"
            run_id = json.loads(next(e["data"] for e in first if e["event"] == "thread.run.created"))["id"]
        sent = outbox_events(first)
        with httpx.Client(base_url=stack.base_url, headers=headers, trust_env=False, timeout=30) as http:
            events_url = f"/threads/{raw_thread.id}/runs/{run_id}/events"  # on a gateway that keeps up
            with http.stream("GET", events_url, headers={"Last-Event-ID": str(sent[-1][0])}) as response:
                rest = outbox_events(read_sse(response))
            with http.stream("GET", events_url) as response:
                whole = outbox_events(read_sse(response))
        assert rest[-1][1] == "thread.run.completed" and sent + rest == whole
        sdk.close()
