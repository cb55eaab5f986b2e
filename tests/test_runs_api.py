"""Runs and run steps API through the official SDK: creation (copying assistant defaults), the outbox
events of a new run, one active run per thread, cancel, modify, list, steps. These tests do not depend on the
orchestrator finishing runs: where a test needs a finished run it marks it finished in the database."""

import asyncio
import time
from typing import Any

import openai
import pytest
from openai.types.beta import Assistant
from openai.types.beta.threads import Run
from openai.types.beta.threads.runs import RunStep

from threadline_core.ids import new_id
from threadline_devstack.sql import Db

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

RUN_KEYS = {"id", "object", "created_at", "assistant_id", "thread_id", "status", "started_at", "expires_at",
            "cancelled_at", "failed_at", "completed_at", "required_action", "last_error", "model", "instructions",
            "tools", "metadata", "usage", "temperature", "top_p", "max_prompt_tokens", "max_completion_tokens",
            "truncation_strategy", "incomplete_details", "response_format", "tool_choice", "parallel_tool_calls"}
ACTIVE = {"queued", "in_progress", "requires_action", "cancelling"}
HOLD = "[[sleep:2.5]] hold the run"  # the scripted model waits, so the run stays active for a while


@pytest.fixture(scope="module")
def assistant(client: openai.OpenAI) -> Assistant:
    """An assistant with non-default settings, to see them copied onto runs."""
    return client.beta.assistants.create(
        model="gpt-4o-mini", instructions="You are terse.", temperature=0.3, top_p=0.8,
        tools=[{"type": "code_interpreter"}, {"type": "function", "function": {"name": "lookup"}}],
        response_format={"type": "json_object"}, metadata={"owner": "runs-tests"})


FINISH_SQL = ("UPDATE runs SET status = 'completed', doc = doc || jsonb_build_object('status', 'completed')"
              " WHERE id = $1 AND status IN ('queued', 'in_progress', 'requires_action', 'cancelling')")


TERMINAL = {"completed", "failed", "cancelled", "expired", "incomplete"}


def _finish(client: openai.OpenAI, db: Db, run: Run, wait: float = 5.0) -> None:
    """Let the orchestrator finish the run if it does so soon; otherwise mark it finished in the database
    (these tests cover the API, not the orchestrator), so that the thread can take the next run."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if client.beta.threads.runs.retrieve(run.id, thread_id=run.thread_id).status in TERMINAL:
            return
        time.sleep(0.1)
    db.execute(FINISH_SQL, run.id)


def test_create_run_copies_assistant_defaults(client: openai.OpenAI, assistant: Assistant, db: Db) -> None:
    thread = client.beta.threads.create(messages=[{"role": "user", "content": "hello"}])
    raw = client.beta.threads.runs.with_raw_response.create(thread.id, assistant_id=assistant.id).http_response.json()
    assert RUN_KEYS <= raw.keys()
    run = Run.model_validate(raw)
    assert run.id.startswith("run_") and run.object == "thread.run"
    assert run.status == "queued"
    assert run.thread_id == thread.id and run.assistant_id == assistant.id
    assert run.expires_at == run.created_at + 600
    assert run.model == "gpt-4o-mini"
    assert run.instructions == "You are terse."
    assert run.tools == assistant.tools
    assert run.temperature == 0.3 and run.top_p == 0.8
    assert raw["response_format"] == {"type": "json_object"}
    assert raw["tool_choice"] == "auto" and raw["parallel_tool_calls"] is True
    assert raw["truncation_strategy"] == {"type": "auto", "last_messages": None}
    assert raw["metadata"] == {} and raw["usage"] is None and raw["last_error"] is None
    assert raw["max_prompt_tokens"] is None and raw["max_completion_tokens"] is None
    # One transaction wrote the run's announcements and the command for the orchestrator.
    rows = db.fetch("SELECT type, topic, key, project_id, thread_id, xmin::text AS tx, envelope FROM events"
                    " WHERE run_id = $1 ORDER BY seq", run.id)
    assert [(r["type"], r["topic"]) for r in rows[:3]] == [
        ("thread.run.created", "threadline.events"),
        ("thread.run.queued", "threadline.events"),
        ("command.run.requested", "threadline.run.commands"),
    ]
    assert len({r["tx"] for r in rows[:3]}) == 1
    assert all(r["key"] == thread.id and r["thread_id"] == thread.id and r["project_id"] == "proj_local"
               for r in rows[:3])
    created = Run.model_validate(rows[0]["envelope"]["data"])
    assert created.id == run.id and created.status == "queued"
    assert rows[2]["envelope"]["data"] == {"run_id": run.id, "thread_id": thread.id}


def test_create_run_overrides(client: openai.OpenAI, assistant: Assistant, db: Db) -> None:
    thread = client.beta.threads.create(messages=[{"role": "user", "content": "hello"}])
    run = client.beta.threads.runs.create(
        thread.id, assistant_id=assistant.id, model="gpt-4.1", instructions="Override.",
        tools=[{"type": "file_search"}], metadata={"case": "override"}, temperature=1.7, top_p=0.1,
        max_prompt_tokens=5000, max_completion_tokens=300,
        truncation_strategy={"type": "last_messages", "last_messages": 4},
        tool_choice={"type": "file_search"}, parallel_tool_calls=False, response_format={"type": "text"},
        additional_instructions="Also be kind.")
    assert run.model == "gpt-4.1"
    assert run.instructions == "Override.\n\nAlso be kind."
    assert [t.type for t in run.tools] == ["file_search"]
    assert run.metadata == {"case": "override"}
    assert run.temperature == 1.7 and run.top_p == 0.1
    assert run.max_prompt_tokens == 5000 and run.max_completion_tokens == 300
    assert run.truncation_strategy is not None and run.truncation_strategy.type == "last_messages"
    assert run.truncation_strategy.last_messages == 4
    assert run.tool_choice is not None and not isinstance(run.tool_choice, str)
    assert run.tool_choice.type == "file_search"
    assert run.parallel_tool_calls is False
    assert run.response_format is not None and not isinstance(run.response_format, str)
    assert run.response_format.type == "text"
    _finish(client, db, run)
    function_choice = client.beta.threads.runs.create(
        thread.id, assistant_id=assistant.id, tool_choice={"type": "function", "function": {"name": "lookup"}})
    assert function_choice.tool_choice is not None and not isinstance(function_choice.tool_choice, str)
    assert function_choice.tool_choice.function is not None
    assert function_choice.tool_choice.function.name == "lookup"
    _finish(client, db, function_choice)
    only_additional = client.beta.threads.runs.create(thread.id, assistant_id=assistant.id,
                                                      additional_instructions="Extra.", tool_choice="required")
    assert only_additional.instructions == "You are terse.\n\nExtra."
    assert only_additional.tool_choice == "required"


def test_additional_messages_join_the_thread(client: openai.OpenAI, assistant: Assistant, db: Db) -> None:
    thread = client.beta.threads.create(messages=[{"role": "user", "content": "first"}])
    run = client.beta.threads.runs.create(
        thread.id, assistant_id=assistant.id,
        additional_messages=[{"role": "assistant", "content": "seeded"},
                             {"role": "user", "content": [{"type": "text", "text": "second"}],
                              "metadata": {"extra": "yes"}}])
    assert run.status == "queued"
    texts = [(m.role, m.content[0].text.value) for m in client.beta.threads.messages.list(thread.id, order="asc")
             if m.content and m.content[0].type == "text"]  # the run's reply may be open, still empty
    assert texts[:3] == [("user", "first"), ("assistant", "seeded"), ("user", "second")]
    created = db.fetch("SELECT envelope->'data'->>'id' AS id FROM events WHERE key = $1"
                       " AND type = 'thread.message.created' AND envelope->'data'->>'run_id' IS NULL"
                       " ORDER BY seq", thread.id)  # the run's own reply may already exist: not counted
    assert len(created) == 3


def test_rows_and_events_written_in_one_statement_match_their_documents(client: openai.OpenAI,
                                                                        assistant: Assistant, db: Db) -> None:
    """Thread, messages, run and outbox rows are written by one statement each: every column comes from its doc."""
    run = client.beta.threads.create_and_run(assistant_id=assistant.id,
                                             thread={"messages": [{"role": "user", "content": "one"}]})
    _finish(client, db, run)
    second = client.beta.threads.runs.create(run.thread_id, assistant_id=assistant.id,
                                             additional_messages=[{"role": "user", "content": "two"}])
    client.beta.threads.messages.list(run.thread_id)  # (the thread is readable as usual)
    thread = db.fetch("SELECT id, project_id, created_at, doc FROM threads WHERE id = $1", run.thread_id)[0]
    assert (thread["project_id"], thread["created_at"]) == ("proj_local", thread["doc"]["created_at"])
    runs = db.fetch("SELECT id, project_id, thread_id, assistant_id, created_at, expires_at, doc FROM runs"
                    " WHERE thread_id = $1 ORDER BY id", run.thread_id)
    assert [r["id"] for r in runs] == [run.id, second.id]
    for row in runs:
        doc = row["doc"]
        assert (row["project_id"], row["thread_id"], row["assistant_id"], row["created_at"], row["expires_at"]) == (
            "proj_local", doc["thread_id"], doc["assistant_id"], doc["created_at"], doc["expires_at"])
    messages = db.fetch("SELECT id, project_id, thread_id, run_id, created_at, doc FROM messages"
                        " WHERE thread_id = $1 AND run_id IS NULL ORDER BY id", run.thread_id)
    assert [m["doc"]["content"][0]["text"]["value"] for m in messages] == ["one", "two"]
    for row in messages:
        assert (row["id"], row["project_id"], row["thread_id"], row["created_at"]) == (
            row["doc"]["id"], "proj_local", run.thread_id, row["doc"]["created_at"])
    events = db.fetch("SELECT event_id, topic, key, type, project_id, thread_id, run_id, occurred_at, envelope,"
                      " xmin::text AS tx FROM events WHERE key = $1 AND (run_id IS NULL OR run_id = $2) ORDER BY seq",
                      run.thread_id, second.id)
    command_tx = next(e["tx"] for e in events if e["type"] == "command.run.requested" and e["run_id"] == second.id)
    assert [(e["type"], e["topic"]) for e in events if e["tx"] == command_tx] == [
        ("thread.message.created", "threadline.events"), ("thread.run.created", "threadline.events"),
        ("thread.run.queued", "threadline.events"), ("command.run.requested", "threadline.run.commands")]
    for row in events:
        envelope = row["envelope"]
        assert (row["event_id"], row["key"], row["type"], row["project_id"], row["thread_id"], row["run_id"]) == (
            envelope["event_id"], envelope["key"], envelope["type"], envelope["project_id"], envelope["thread_id"],
            envelope["run_id"])
        assert row["occurred_at"].isoformat().replace("+00:00", "Z") == envelope["occurred_at"]
        assert envelope["sequence"] is None


def test_create_thread_and_run(client: openai.OpenAI, assistant: Assistant, db: Db) -> None:
    file_id = client.files.create(file=("data.csv", b"x\n1\n", "text/csv"), purpose="assistants").id
    run = client.beta.threads.create_and_run(
        assistant_id=assistant.id, instructions="Only here.", metadata={"via": "create_and_run"},
        thread={"messages": [{"role": "user", "content": "question"}], "metadata": {"t": "1"}},
        tool_resources={"code_interpreter": {"file_ids": [file_id]}})
    assert run.status == "queued" and run.assistant_id == assistant.id
    assert run.instructions == "Only here." and run.metadata == {"via": "create_and_run"}
    assert run.model == assistant.model and run.tools == assistant.tools
    thread = client.beta.threads.retrieve(run.thread_id)
    assert thread.metadata == {"t": "1"}
    assert thread.tool_resources is not None and thread.tool_resources.code_interpreter is not None
    assert thread.tool_resources.code_interpreter.file_ids == [file_id]
    messages = client.beta.threads.messages.list(run.thread_id, order="asc").data
    assert messages[0].content[0].type == "text" and messages[0].content[0].text.value == "question"
    assert client.beta.threads.runs.retrieve(run.id, thread_id=run.thread_id).id == run.id
    types = [r["type"] for r in db.fetch("SELECT type FROM events WHERE key = $1 ORDER BY seq", run.thread_id)]
    assert types[:5] == ["thread.created", "thread.message.created", "thread.run.created", "thread.run.queued",
                         "command.run.requested"]
    bare = client.beta.threads.create_and_run(assistant_id=assistant.id)
    assert bare.status == "queued"
    assert client.beta.threads.retrieve(bare.thread_id).metadata == {}
    with pytest.raises(openai.NotFoundError):
        client.beta.threads.create_and_run(assistant_id="asst_missing")
    with pytest.raises(openai.BadRequestError) as err:
        client.beta.threads.create_and_run(assistant_id=assistant.id,
                                           extra_body={"additional_messages": [{"role": "user", "content": "x"}]})
    assert isinstance(err.value.body, dict) and err.value.body["code"] == "unknown_parameter"


@pytest.mark.parametrize("body,param", [
    ({"tool_choice": {"type": "function", "function": {"name": "missing"}}}, "tool_choice"),
    ({"tools": [{"type": "code_interpreter"}], "tool_choice": {"type": "file_search"}}, "tool_choice"),
    ({"tools": [], "tool_choice": {"type": "code_interpreter"}}, "tool_choice"),
    ({"tools": [], "tool_choice": "required"}, "tool_choice"),
    ({"max_completion_tokens": 2**63}, "max_completion_tokens"),
    ({"truncation_strategy": {"type": "last_messages", "last_messages": 2**64 - 1}},
     "truncation_strategy.last_messages"),
])
def test_create_and_run_refuses_what_the_run_cannot_use(client: openai.OpenAI, assistant: Assistant, db: Db,
                                                        body: dict[str, Any], param: str) -> None:
    before = db.fetchval("SELECT count(*) FROM threads")
    with pytest.raises(openai.BadRequestError) as err:
        client.post("/threads/runs", body={"assistant_id": assistant.id, **body}, cast_to=Run)
    assert isinstance(err.value.body, dict) and err.value.body["param"] == param
    assert err.value.body["type"] == "invalid_request_error"
    assert db.fetchval("SELECT count(*) FROM threads") == before
    allowed = client.beta.threads.create_and_run(
        assistant_id=assistant.id, tool_choice={"type": "function", "function": {"name": "lookup"}},
        max_completion_tokens=2**63 - 1)
    assert allowed.max_completion_tokens == 2**63 - 1
    _finish(client, db, allowed)


def test_objects_of_a_missing_thread_or_run_are_404_naming_it(client: openai.OpenAI, assistant: Assistant) -> None:
    """As hosted, a 404 names the outermost object that is missing: after a thread is deleted, its messages, runs
    and steps are "No thread found" whatever the endpoint (each named itself, or the thread, by endpoint)."""
    thread = client.beta.threads.create(messages=[{"role": "user", "content": "hello"}])
    run = client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id,
                                                   poll_interval_ms=50)
    (step,) = client.beta.threads.runs.steps.list(run.id, thread_id=thread.id).data
    message = client.beta.threads.messages.list(thread.id).data[0]
    with pytest.raises(openai.NotFoundError) as err:
        client.beta.threads.runs.steps.retrieve(step.id, thread_id=thread.id, run_id="run_missing")
    assert isinstance(err.value.body, dict) and err.value.body["message"] == "No run found with id 'run_missing'."
    client.beta.threads.delete(thread.id)
    calls = [lambda: client.beta.threads.messages.retrieve(message.id, thread_id=thread.id),
             lambda: client.beta.threads.messages.update(message.id, thread_id=thread.id, metadata={"a": "b"}),
             lambda: client.beta.threads.messages.delete(message.id, thread_id=thread.id),
             lambda: client.beta.threads.runs.retrieve(run.id, thread_id=thread.id),
             lambda: client.beta.threads.runs.update(run.id, thread_id=thread.id, metadata={"a": "b"}),
             lambda: client.beta.threads.runs.cancel(run.id, thread_id=thread.id),
             lambda: client.beta.threads.runs.submit_tool_outputs(run.id, thread_id=thread.id, tool_outputs=[]),
             lambda: client.beta.threads.runs.steps.list(run.id, thread_id=thread.id),
             lambda: client.beta.threads.runs.steps.retrieve(step.id, thread_id=thread.id, run_id=run.id)]
    for call in calls:
        with pytest.raises(openai.NotFoundError) as err:
            call()
        assert isinstance(err.value.body, dict) and err.value.body["message"] == \
            f"No thread found with id '{thread.id}'.", err.value.body


def test_one_active_run_per_thread_and_cancel(client: openai.OpenAI, assistant: Assistant, db: Db) -> None:
    thread = client.beta.threads.create(messages=[{"role": "user", "content": HOLD}])
    run = client.beta.threads.runs.create(thread.id, assistant_id=assistant.id)
    with pytest.raises(openai.BadRequestError) as err:
        client.beta.threads.runs.create(thread.id, assistant_id=assistant.id)
    assert isinstance(err.value.body, dict)
    assert err.value.body["message"] == f"Thread {thread.id} already has an active run {run.id}."
    with pytest.raises(openai.BadRequestError) as err:
        client.beta.threads.messages.create(thread.id, role="user", content="too soon")
    assert isinstance(err.value.body, dict)
    assert err.value.body["message"] == f"Can't add messages to {thread.id} while a run {run.id} is active."
    raw = client.beta.threads.runs.with_raw_response.cancel(run.id, thread_id=thread.id).http_response.json()
    cancelled = Run.model_validate(raw)
    assert cancelled.status == "cancelling" and cancelled.id == run.id
    assert client.beta.threads.runs.retrieve(run.id, thread_id=thread.id).status in ("cancelling", "cancelled")
    rows = db.fetch("SELECT type, topic FROM events WHERE run_id = $1 AND type IN"
                    " ('thread.run.cancelling', 'command.run.cancel_requested') ORDER BY seq", run.id)
    assert [(r["type"], r["topic"]) for r in rows] == [("thread.run.cancelling", "threadline.events"),
                                                       ("command.run.cancel_requested", "threadline.run.commands")]
    with pytest.raises(openai.BadRequestError) as err:
        client.beta.threads.runs.cancel(run.id, thread_id=thread.id)
    assert isinstance(err.value.body, dict)
    assert err.value.body["message"] in ("Cannot cancel run with status 'cancelling'.",
                                         "Cannot cancel run with status 'cancelled'.")
    _finish(client, db, run)
    assert client.beta.threads.runs.retrieve(run.id, thread_id=thread.id).status in ("completed", "cancelled")
    with pytest.raises(openai.BadRequestError) as err:
        client.beta.threads.runs.cancel(run.id, thread_id=thread.id)
    assert isinstance(err.value.body, dict)
    assert err.value.body["message"] in ("Cannot cancel run with status 'completed'.",
                                         "Cannot cancel run with status 'cancelled'.")
    # Once the run is terminal, the thread takes messages and runs again.
    client.beta.threads.messages.create(thread.id, role="user", content="next")
    follow_up = client.beta.threads.runs.create(thread.id, assistant_id=assistant.id)
    assert follow_up.status == "queued"


def test_a_moving_run_tells_the_poll_helpers_when_to_look_again(client: openai.OpenAI, assistant: Assistant,
                                                                db: Db) -> None:
    """The SDK's create_and_poll and submit_tool_outputs_and_poll wait `openai-poll-after-ms` between retrieves (a whole
    second without it): a run that moves by itself sends it; one waiting for its caller, or ended, does not."""
    thread = client.beta.threads.create(messages=[{"role": "user", "content": HOLD}])
    run = client.beta.threads.runs.create(thread.id, assistant_id=assistant.id)
    raw = client.beta.threads.runs.with_raw_response.retrieve(run.id, thread_id=thread.id)
    assert raw.parse().status in ("queued", "in_progress")
    assert int(raw.headers["openai-poll-after-ms"]) > 0
    _finish(client, db, run)
    raw = client.beta.threads.runs.with_raw_response.retrieve(run.id, thread_id=thread.id)
    assert raw.parse().status in TERMINAL and "openai-poll-after-ms" not in raw.headers


async def test_concurrent_run_creation_keeps_one_active(async_client: openai.AsyncOpenAI, assistant: Assistant,
                                                        db: Db) -> None:
    thread = await async_client.beta.threads.create(messages=[{"role": "user", "content": HOLD}])
    calls = [async_client.beta.threads.runs.create(thread.id, assistant_id=assistant.id) for _ in range(5)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    created = [r for r in results if isinstance(r, Run)]
    refused = [r for r in results if isinstance(r, openai.BadRequestError)]
    assert len(created) == 1 and len(refused) == 4, results
    assert all("already has an active run" in str(r) for r in refused)


def test_retrieve_modify_list_runs(client: openai.OpenAI, assistant: Assistant, db: Db) -> None:
    thread = client.beta.threads.create(messages=[{"role": "user", "content": "hi"}])
    ids = []
    for i in range(3):
        run = client.beta.threads.runs.create(thread.id, assistant_id=assistant.id, metadata={"i": str(i)})
        ids.append(run.id)
        _finish(client, db, run)
    assert ids == sorted(ids)
    fetched = client.beta.threads.runs.retrieve(ids[0], thread_id=thread.id)
    assert fetched.id == ids[0] and fetched.metadata == {"i": "0"}
    updated = client.beta.threads.runs.update(ids[0], thread_id=thread.id, metadata={"changed": "yes"})
    assert updated.metadata == {"changed": "yes"} and updated.status == fetched.status
    assert client.beta.threads.runs.retrieve(ids[0], thread_id=thread.id).metadata == {"changed": "yes"}
    page = client.beta.threads.runs.list(thread.id, limit=2)
    assert [r.id for r in page.data] == [ids[2], ids[1]] and page.has_more
    assert [r.id for r in client.beta.threads.runs.list(thread.id, limit=1)] == ids[::-1]
    assert [r.id for r in client.beta.threads.runs.list(thread.id, order="asc", after=ids[0])] == ids[1:]
    with pytest.raises(openai.BadRequestError):
        client.beta.threads.runs.update(ids[0], thread_id=thread.id, extra_body={"status": "completed"})
    with pytest.raises(openai.BadRequestError):
        client.beta.threads.runs.update(ids[0], thread_id=thread.id, metadata={"k": 1})  # type: ignore[dict-item]
    other_thread = client.beta.threads.create()
    with pytest.raises(openai.NotFoundError) as err:
        client.beta.threads.runs.retrieve(ids[0], thread_id=other_thread.id)
    assert f"No run found with id '{ids[0]}'." in str(err.value)
    assert client.beta.threads.runs.list(other_thread.id).data == []
    with pytest.raises(openai.NotFoundError):
        client.beta.threads.runs.list("thread_missing")


@pytest.mark.parametrize("body,status,param", [
    ({}, 400, "assistant_id"),
    ({"assistant_id": 12}, 400, "assistant_id"),
    ({"assistant_id": "asst_missing"}, 404, "assistant_id"),
    ({"assistant_id": "ASSISTANT", "model": 3}, 400, "model"),
    ({"assistant_id": "ASSISTANT", "temperature": 9}, 400, "temperature"),
    ({"assistant_id": "ASSISTANT", "tool_choice": "sometimes"}, 400, "tool_choice"),
    ({"assistant_id": "ASSISTANT", "tool_choice": {"type": "function"}}, 400, "tool_choice.function"),
    ({"assistant_id": "ASSISTANT", "truncation_strategy": {"type": "first_messages"}}, 400,
     "truncation_strategy.type"),
    ({"assistant_id": "ASSISTANT", "truncation_strategy": {"type": "last_messages", "last_messages": 0}}, 400,
     "truncation_strategy.last_messages"),
    ({"assistant_id": "ASSISTANT", "max_completion_tokens": "many"}, 400, "max_completion_tokens"),
    ({"assistant_id": "ASSISTANT", "max_completion_tokens": 255}, 400, "max_completion_tokens"),  # minimum 256
    ({"assistant_id": "ASSISTANT", "max_prompt_tokens": 100}, 400, "max_prompt_tokens"),
    ({"assistant_id": "ASSISTANT", "max_completion_tokens": 2**63}, 400, "max_completion_tokens"),  # above int64
    ({"assistant_id": "ASSISTANT", "max_prompt_tokens": 2**64 - 1}, 400, "max_prompt_tokens"),
    ({"assistant_id": "ASSISTANT", "truncation_strategy": {"type": "last_messages", "last_messages": 2**63}}, 400,
     "truncation_strategy.last_messages"),
    ({"assistant_id": "ASSISTANT", "tools": [{"type": "file_search", "file_search": {"max_num_results": 2**63}}]},
     400, "tools[0].file_search.max_num_results"),
    # a tool_choice forcing a tool the run does not have (the assistant has code_interpreter and `lookup`)
    ({"assistant_id": "ASSISTANT", "tool_choice": {"type": "function", "function": {"name": "missing"}}}, 400,
     "tool_choice"),
    ({"assistant_id": "ASSISTANT", "tool_choice": {"type": "file_search"}}, 400, "tool_choice"),
    ({"assistant_id": "ASSISTANT", "tools": [{"type": "file_search"}], "tool_choice": {"type": "code_interpreter"}},
     400, "tool_choice"),
    ({"assistant_id": "ASSISTANT", "tools": [{"type": "code_interpreter"}],
      "tool_choice": {"type": "function", "function": {"name": "lookup"}}}, 400, "tool_choice"),
    ({"assistant_id": "ASSISTANT", "parallel_tool_calls": "yes"}, 400, "parallel_tool_calls"),
    ({"assistant_id": "ASSISTANT", "additional_messages": [{"role": "user"}]}, 400,
     "additional_messages[0].content"),
    ({"assistant_id": "ASSISTANT", "tools": [{"type": "retrieval"}]}, 400, "tools[0].type"),
    ({"assistant_id": "ASSISTANT", "metadata": {f"k{i}": "v" for i in range(17)}}, 400, "metadata"),
    ({"assistant_id": "ASSISTANT", "file_ids": []}, 400, "file_ids"),
])
def test_create_run_validation(client: openai.OpenAI, assistant: Assistant, db: Db, body: dict[str, Any],
                               status: int, param: str) -> None:
    thread = client.beta.threads.create()
    if body.get("assistant_id") == "ASSISTANT":
        body = {**body, "assistant_id": assistant.id}
    with pytest.raises(openai.APIStatusError) as err:
        client.post(f"/threads/{thread.id}/runs", body=body, cast_to=Run)
    assert err.value.status_code == status
    assert isinstance(err.value.body, dict) and err.value.body["param"] == param
    assert db.fetchval("SELECT count(*) FROM runs WHERE thread_id = $1", thread.id) == 0


def test_run_on_unknown_thread(client: openai.OpenAI, assistant: Assistant) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.beta.threads.runs.create("thread_missing", assistant_id=assistant.id)
    assert "No thread found with id 'thread_missing'." in str(err.value)
    with pytest.raises(openai.NotFoundError):
        client.beta.threads.runs.cancel("run_missing", thread_id="thread_missing")
    thread = client.beta.threads.create()
    with pytest.raises(openai.NotFoundError) as err:
        client.beta.threads.runs.cancel("run_missing", thread_id=thread.id)
    assert "No run found with id 'run_missing'." in str(err.value)


def _insert_step(db: Db, run: Run, index: int) -> str:
    step_id: str = new_id("step")
    message_id: str = new_id("msg")
    doc = {"id": step_id, "object": "thread.run.step", "created_at": int(time.time()), "run_id": run.id,
           "assistant_id": run.assistant_id, "thread_id": run.thread_id, "type": "message_creation",
           "status": "completed", "cancelled_at": None, "completed_at": int(time.time()), "expired_at": None,
           "failed_at": None, "last_error": None, "usage": {"prompt_tokens": index, "completion_tokens": 1,
                                                            "total_tokens": index + 1},
           "step_details": {"type": "message_creation", "message_creation": {"message_id": message_id}},
           "metadata": {}}
    db.execute("INSERT INTO run_steps (id, project_id, thread_id, run_id, status, created_at, doc)"
               " VALUES ($1, 'proj_local', $2, $3, 'completed', $4, $5)", step_id, run.thread_id, run.id,
               doc["created_at"], doc)
    return step_id


def test_run_steps(client: openai.OpenAI, assistant: Assistant, db: Db,
                   other_client: openai.OpenAI) -> None:
    thread = client.beta.threads.create(messages=[{"role": "user", "content": "steps"}])
    run = client.beta.threads.runs.create(thread.id, assistant_id=assistant.id)
    _finish(client, db, run)
    inserted = [_insert_step(db, run, i) for i in range(3)]
    everything = client.beta.threads.runs.steps.list(run.id, thread_id=thread.id, order="asc", limit=100).data
    all_ids = [s.id for s in everything]
    assert all_ids == sorted(all_ids)
    assert [i for i in all_ids if i in inserted] == inserted
    assert [s.id for s in client.beta.threads.runs.steps.list(run.id, thread_id=thread.id, order="asc",
                                                               limit=1)] == all_ids
    page = client.beta.threads.runs.steps.list(run.id, thread_id=thread.id, limit=2)
    assert [s.id for s in page.data] == all_ids[::-1][:2] and page.has_more
    raw = client.beta.threads.runs.steps.with_raw_response.retrieve(
        inserted[1], thread_id=thread.id, run_id=run.id,
        include=["step_details.tool_calls[*].file_search.results[*].content"]).http_response.json()
    step = RunStep.model_validate(raw)
    assert step.id == inserted[1] and step.type == "message_creation" and step.run_id == run.id
    with pytest.raises(openai.NotFoundError):
        client.beta.threads.runs.steps.retrieve("step_missing", thread_id=thread.id, run_id=run.id)
    with pytest.raises(openai.NotFoundError):
        client.beta.threads.runs.steps.list("run_missing", thread_id=thread.id)
    with pytest.raises(openai.NotFoundError):
        other_client.beta.threads.runs.steps.list(run.id, thread_id=thread.id)
    with pytest.raises(openai.NotFoundError):
        other_client.beta.threads.runs.steps.retrieve(inserted[0], thread_id=thread.id, run_id=run.id)


def test_other_project_cannot_touch_runs(client: openai.OpenAI, other_client: openai.OpenAI,
                                         assistant: Assistant, db: Db) -> None:
    thread = client.beta.threads.create(messages=[{"role": "user", "content": HOLD}])
    run = client.beta.threads.runs.create(thread.id, assistant_id=assistant.id)
    with pytest.raises(openai.NotFoundError):
        other_client.beta.threads.runs.retrieve(run.id, thread_id=thread.id)
    with pytest.raises(openai.NotFoundError):
        other_client.beta.threads.runs.update(run.id, thread_id=thread.id, metadata={"x": "y"})
    with pytest.raises(openai.NotFoundError):
        other_client.beta.threads.runs.cancel(run.id, thread_id=thread.id)
    with pytest.raises(openai.NotFoundError):
        other_client.beta.threads.runs.list(thread.id)
    with pytest.raises(openai.NotFoundError):
        other_client.beta.threads.runs.create(thread.id, assistant_id=assistant.id)
    their_thread = other_client.beta.threads.create()
    with pytest.raises(openai.NotFoundError) as err:
        other_client.beta.threads.runs.create(their_thread.id, assistant_id=assistant.id)
    assert f"No assistant found with id '{assistant.id}'." in str(err.value)
    assert client.beta.threads.runs.retrieve(run.id, thread_id=thread.id).metadata == {}
    assert client.beta.threads.runs.retrieve(run.id, thread_id=thread.id).status in ACTIVE | {"failed", "completed"}
