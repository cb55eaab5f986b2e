"""Runs driven end to end by the run orchestrator, through the official SDK against the real stack.

The scripted model server (threadline_devstack.model_server) answers by directives in the last user
message; every request it receives is recorded, so the tests check what the platform sent to it.
"""

import time
from typing import Any

import openai
import pytest
from openai.types.beta.threads import Message, Run
from openai.types.beta.threads.runs import RunStep
from run_helpers import start, wait_for

from threadline_core.db import connect
from threadline_core.events import EventEnvelope, RunRequested
from threadline_core.kafka import create_producer, publish
from threadline_core.topics import RUN_COMMANDS
from threadline_devstack._proc import run_async
from threadline_devstack.model_server import ScriptedModelServer
from threadline_devstack.sql import Db
from threadline_devstack.stack import Stack

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def assistant_id(client: openai.OpenAI) -> str:
    """A plain assistant with instructions."""
    return client.beta.assistants.create(model="gpt-4o-mini", instructions="You are terse.").id


def assistant_texts(client: openai.OpenAI, thread_id: str) -> list[str]:
    """Texts of the thread's assistant messages, oldest first."""
    messages = client.beta.threads.messages.list(thread_id=thread_id, order="asc")
    return [block.text.value for m in messages.data if m.role == "assistant" for block in m.content
            if block.type == "text"]


def the_request(model: ScriptedModelServer, marker: str) -> dict[str, Any]:
    """The one model request of a test (found by its marker)."""
    found = model.find_requests(marker)
    assert len(found) == 1, f"expected one model request, got {len(found)}"
    return found[0]


def test_hosted_quickstart_flow(client: openai.OpenAI, model: ScriptedModelServer, marker: str) -> None:
    """The flow of the hosted API's docs: assistant with code_interpreter, thread, message, run, poll, list."""
    assistant = client.beta.assistants.create(
        name="Math Tutor", instructions="You are a personal math tutor. Write and run code to answer math questions.",
        tools=[{"type": "code_interpreter"}], model="gpt-4-turbo")
    thread = client.beta.threads.create()
    question = f"I need to solve the equation `3x + 11 = 14`. Can you help me? {marker}"
    client.beta.threads.messages.create(thread_id=thread.id, role="user", content=question)
    run = client.beta.threads.runs.create(thread_id=thread.id, assistant_id=assistant.id,
                                          instructions="Please address the user as Jane Doe.")
    assert run.status == "queued"
    run = wait_for(client, thread.id, run.id)
    assert run.status == "completed", run.last_error
    assert run.started_at is not None and run.completed_at is not None and run.completed_at >= run.started_at
    assert run.usage is not None and run.usage.total_tokens == run.usage.prompt_tokens + run.usage.completion_tokens
    assert run.usage.completion_tokens > 0
    assert run.expires_at is None and run.required_action is None and run.last_error is None

    messages = client.beta.threads.messages.list(thread_id=thread.id)
    assert [m.role for m in messages.data] == ["assistant", "user"]
    reply = messages.data[0]
    assert reply.status == "completed" and reply.run_id == run.id and reply.assistant_id == assistant.id
    assert reply.content[0].type == "text"
    assert reply.content[0].text.value == f"Echo: {question}"

    request = the_request(model, marker)
    assert request["model"] == "gpt-4-turbo"
    assert request["stream"] is True and request["stream_options"] == {"include_usage": True}
    assert request["messages"][0] == {"role": "system", "content": "Please address the user as Jane Doe."}
    assert [t["function"]["name"] for t in request["tools"]] == ["code_interpreter"]

    steps = client.beta.threads.runs.steps.list(run_id=run.id, thread_id=thread.id)
    assert len(steps.data) == 1
    step = steps.data[0]
    assert step.type == "message_creation" and step.status == "completed"
    assert step.step_details.type == "message_creation"
    assert step.step_details.message_creation.message_id == reply.id
    assert step.usage is not None and step.usage.total_tokens == run.usage.total_tokens


def test_create_and_poll(client: openai.OpenAI, assistant_id: str, marker: str) -> None:
    thread = client.beta.threads.create(messages=[{"role": "user", "content": f"[[reply:Hello there {marker}]]"}])
    run = client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant_id,
                                                   poll_interval_ms=50)
    assert run.status == "completed"
    assert assistant_texts(client, thread.id) == [f"Hello there {marker}"]


def test_create_thread_and_run_poll(client: openai.OpenAI, assistant_id: str, marker: str) -> None:
    run = client.beta.threads.create_and_run_poll(
        assistant_id=assistant_id, thread={"messages": [{"role": "user", "content": f"hi {marker}"}]},
        poll_interval_ms=50)
    assert run.status == "completed"
    assert assistant_texts(client, run.thread_id) == [f"Echo: hi {marker}"]


def test_run_options_reach_the_model(client: openai.OpenAI, model: ScriptedModelServer, assistant_id: str,
                                     marker: str) -> None:
    thread = client.beta.threads.create(messages=[{"role": "user", "content": "first"},
                                                  {"role": "assistant", "content": "an earlier answer"}])
    run = client.beta.threads.runs.create(
        thread_id=thread.id, assistant_id=assistant_id, model="gpt-4.1-mini",
        instructions="Override instructions.", additional_instructions="Also be kind.",
        additional_messages=[{"role": "user", "content": f"second {marker}"}],
        temperature=0.3, top_p=0.7, max_completion_tokens=300)
    run = wait_for(client, thread.id, run.id)
    assert run.status == "completed", run.last_error
    request = the_request(model, marker)
    assert request["model"] == "gpt-4.1-mini"
    assert request["temperature"] == 0.3 and request["top_p"] == 0.7
    assert request["max_completion_tokens"] == 300
    assert "tools" not in request
    system = request["messages"][0]
    assert system["role"] == "system"
    assert "Override instructions." in system["content"] and "Also be kind." in system["content"]
    assert request["messages"][1:] == [{"role": "user", "content": "first"},
                                       {"role": "assistant", "content": "an earlier answer"},
                                       {"role": "user", "content": f"second {marker}"}]


def test_assistant_instructions_used_by_default(client: openai.OpenAI, model: ScriptedModelServer,
                                                assistant_id: str, marker: str) -> None:
    thread_id, run = start(client, assistant_id, f"x {marker}")
    assert wait_for(client, thread_id, run.id).status == "completed"
    request = the_request(model, marker)
    assert request["messages"][0] == {"role": "system", "content": "You are terse."}
    assert request["model"] == "gpt-4o-mini"


def test_truncation_last_messages(client: openai.OpenAI, model: ScriptedModelServer, assistant_id: str,
                                  marker: str) -> None:
    thread = client.beta.threads.create(messages=[{"role": "user", "content": f"old {i}"} for i in range(5)])
    client.beta.threads.messages.create(thread_id=thread.id, role="user", content=f"newest {marker}")
    run = client.beta.threads.runs.create(thread_id=thread.id, assistant_id=assistant_id,
                                          truncation_strategy={"type": "last_messages", "last_messages": 2})
    assert wait_for(client, thread.id, run.id).status == "completed"
    request = the_request(model, marker)
    assert [m["content"] for m in request["messages"][1:]] == ["old 4", f"newest {marker}"]


def test_max_prompt_tokens_drops_oldest_messages(client: openai.OpenAI, model: ScriptedModelServer,
                                                 assistant_id: str, marker: str) -> None:
    long = "lorem ipsum " * 100
    thread = client.beta.threads.create(messages=[{"role": "user", "content": long}])
    client.beta.threads.messages.create(thread_id=thread.id, role="user", content=f"short {marker}")
    run = client.beta.threads.runs.create(thread_id=thread.id, assistant_id=assistant_id, max_prompt_tokens=256)
    assert wait_for(client, thread.id, run.id).status == "completed"
    request = the_request(model, marker)
    assert [m["content"] for m in request["messages"][1:]] == [f"short {marker}"]


def test_max_prompt_tokens_bounds_the_whole_run(client: openai.OpenAI, model: ScriptedModelServer,
                                               marker: str) -> None:
    """As hosted, the budget is the run's, across its turns: the turn after a tool call gets what the first
    left, and a prompt that cannot fit in it ends the run incomplete (it overspent and completed)."""
    tool: Any = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    assistant = client.beta.assistants.create(model="gpt-4o-mini", tools=[tool])
    words = " ".join(["abc"] * 180)
    thread = client.beta.threads.create(messages=[
        {"role": "user", "content": f'{words} [[call:lookup:{{"q": "x"}}]] {marker}'}])
    run = client.beta.threads.runs.create(thread_id=thread.id, assistant_id=assistant.id, max_prompt_tokens=256)
    run = wait_for(client, thread.id, run.id, {"requires_action"})
    assert run.required_action is not None
    (call,) = run.required_action.submit_tool_outputs.tool_calls
    run = client.beta.threads.runs.submit_tool_outputs(run.id, thread_id=thread.id,
                                                       tool_outputs=[{"tool_call_id": call.id, "output": "ok"}])
    run = wait_for(client, thread.id, run.id)
    assert run.status == "incomplete", run.last_error
    assert run.incomplete_details is not None and run.incomplete_details.reason == "max_prompt_tokens"
    (step,) = client.beta.threads.runs.steps.list(run.id, thread_id=thread.id).data
    assert step.type == "tool_calls" and step.usage is not None
    assert 256 - step.usage.prompt_tokens < 180  # what the first turn left: the second prompt cannot fit
    assert run.usage is not None and run.usage.prompt_tokens == step.usage.prompt_tokens
    assert len(model.find_requests(marker)) == 1  # the second turn was not sent


def test_model_error_fails_run(client: openai.OpenAI, model: ScriptedModelServer, assistant_id: str,
                               marker: str) -> None:
    thread_id, run = start(client, assistant_id, f"[[status:500]] {marker}")
    run = wait_for(client, thread_id, run.id)
    assert run.status == "failed"
    assert run.last_error is not None and run.last_error.code == "server_error"
    assert "500" in run.last_error.message
    assert run.failed_at is not None and run.completed_at is None
    assert len(model.find_requests(marker)) >= 1
    assert assistant_texts(client, thread_id) == []
    no_tokens = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    assert run.usage is not None and run.usage.model_dump() == no_tokens, "a run that ended reports usage"
    (step,) = client.beta.threads.runs.steps.list(run.id, thread_id=thread_id).data
    assert step.status == "failed" and step.usage is not None and step.usage.model_dump() == no_tokens


def test_the_next_run_does_not_show_the_model_an_answer_that_never_came(
        client: openai.OpenAI, model: ScriptedModelServer, assistant_id: str, marker: str) -> None:
    """A run that failed before a word leaves an empty assistant message; the thread's next run sent it to the model
    as an empty assistant turn (llama.cpp takes a last assistant message as a prefill; some servers refuse empty
    content), which the model never said."""
    thread_id, run = start(client, assistant_id, f"[[status:500]] {marker}")
    assert wait_for(client, thread_id, run.id).status == "failed"
    client.beta.threads.messages.create(thread_id, role="user", content=f"again {marker}-2")
    run = client.beta.threads.runs.create_and_poll(thread_id=thread_id, assistant_id=assistant_id, poll_interval_ms=50)
    assert run.status == "completed", run.last_error
    sent = the_request(model, f"{marker}-2")["messages"]
    assert [m["role"] for m in sent if m["role"] != "system"] == ["user", "user"]
    assert assistant_texts(client, thread_id) == [f"Echo: again {marker}-2"]


def test_a_model_the_server_does_not_serve_fails_the_run_saying_what_to_set(
        client: openai.OpenAI, marker: str) -> None:
    """Code written for OpenAI names `gpt-4o`; a server of open models answers 404 to it (Ollama: model not found).
    The run's last_error names the model and the setting that maps it (it said only what the server said)."""
    assistant = client.beta.assistants.create(model="gpt-4o-2024-05-13")
    thread_id, run = start(client, assistant.id, f"[[status:404]] {marker}")
    run = wait_for(client, thread_id, run.id)
    assert run.status == "failed" and run.last_error is not None and run.last_error.code == "server_error"
    assert run.last_error.message.startswith("The model returned HTTP 404: scripted model not found. Check that the "
                                             "model server serves 'gpt-4o-2024-05-13' (THREADLINE_MODEL_ALIASES")


def test_rate_limited_model_fails_run(client: openai.OpenAI, assistant_id: str, marker: str) -> None:
    thread_id, run = start(client, assistant_id, f"[[status:429]] {marker}")
    run = wait_for(client, thread_id, run.id)
    assert run.status == "failed"
    assert run.last_error is not None and run.last_error.code == "rate_limit_exceeded"


def test_model_refusing_the_prompt_fails_run(client: openai.OpenAI, assistant_id: str, marker: str) -> None:
    """A model's 400 (a prompt too long for it, say) fails the run with `invalid_prompt`; its step, whose
    `last_error` has no such code, fails with `server_error` and the same message."""
    thread_id, run = start(client, assistant_id, f"[[status:400]] {marker}")
    run = wait_for(client, thread_id, run.id)
    assert run.status == "failed" and run.failed_at is not None
    assert run.last_error is not None and run.last_error.code == "invalid_prompt" and "400" in run.last_error.message
    (step,) = client.beta.threads.runs.steps.list(run.id, thread_id=thread_id).data
    assert step.status == "failed" and step.last_error is not None
    assert step.last_error.code == "server_error" and step.last_error.message == run.last_error.message


def test_deleting_the_answer_being_written_fails_the_run(client: openai.OpenAI, assistant_id: str,
                                                         marker: str) -> None:
    """The assistant message a run streams into is deleted mid-answer: the run fails at once, saying so, and the
    thread takes new messages (its driver crashed on the missing message and the run held the thread until it
    expired, 10 minutes later)."""
    thread_id, run = start(client, assistant_id, f"[[slow:0.1]] [[tokens:30]] {marker}")
    deadline = time.monotonic() + 20
    while not (answers := [m for m in client.beta.threads.messages.list(thread_id).data if m.role == "assistant"]):
        assert time.monotonic() < deadline, "the run never opened its message"
        time.sleep(0.05)
    assert client.beta.threads.messages.delete(answers[0].id, thread_id=thread_id).deleted
    run = wait_for(client, thread_id, run.id, timeout=20)
    assert run.status == "failed" and run.last_error is not None and run.last_error.code == "server_error"
    assert run.last_error.message == f"The run's message {answers[0].id} was deleted while the run was in progress."
    (step,) = client.beta.threads.runs.steps.list(run.id, thread_id=thread_id).data
    assert step.status == "failed" and step.last_error is not None
    client.beta.threads.messages.create(thread_id, role="user", content="still usable")


def test_model_timeout_fails_run(client: openai.OpenAI, assistant_id: str, marker: str) -> None:
    """THREADLINE_MODEL_TIMEOUT_SECONDS is 3 in the test stack; the model sleeps longer."""
    thread_id, run = start(client, assistant_id, f"[[sleep:6]] {marker}")
    run = wait_for(client, thread_id, run.id)
    assert run.status == "failed"
    assert run.last_error is not None and run.last_error.code == "server_error"
    assert "did not answer" in run.last_error.message


def test_cancel_in_progress(client: openai.OpenAI, model: ScriptedModelServer, assistant_id: str,
                            marker: str) -> None:
    """Cancel while the model streams slowly: the model call stops, the partial answer is kept."""
    thread_id, run = start(client, assistant_id, f"[[slow:0.2]] [[tokens:200]] {marker}")
    wait_for(client, thread_id, run.id, {"in_progress"})
    deadline = time.monotonic() + 10
    while not model.find_requests(marker):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)  # a few tokens stream
    cancelling = client.beta.threads.runs.cancel(run.id, thread_id=thread_id)
    assert cancelling.status == "cancelling"
    run = wait_for(client, thread_id, run.id)
    assert run.status == "cancelled"
    assert run.cancelled_at is not None and run.completed_at is None and run.failed_at is None
    message = client.beta.threads.messages.list(thread_id=thread_id, run_id=run.id).data[0]
    assert message.status == "incomplete"
    assert message.incomplete_details is not None and message.incomplete_details.reason == "run_cancelled"
    step = client.beta.threads.runs.steps.list(run_id=run.id, thread_id=thread_id).data[0]
    assert step.status == "cancelled" and step.cancelled_at is not None
    assert run.usage is not None and step.usage is not None, "a run or step that ended reports usage (SDK)"
    text = message.content[0].text.value if message.content and message.content[0].type == "text" else ""
    full = " ".join(f"word{i}" for i in range(1, 201))
    assert full.startswith(text) and len(text) < len(full)
    # the run stays cancelled (no late write from the stopped model call)
    time.sleep(0.5)
    assert client.beta.threads.runs.retrieve(run.id, thread_id=thread_id).status == "cancelled"


def test_cancel_queued_run(client: openai.OpenAI, assistant_id: str, marker: str) -> None:
    thread_id, run = start(client, assistant_id, f"[[sleep:1]] {marker}")
    client.beta.threads.runs.cancel(run.id, thread_id=thread_id)
    run = wait_for(client, thread_id, run.id)
    assert run.status == "cancelled"
    assert run.usage is not None and run.usage.total_tokens == 0


def test_incomplete_on_max_completion_tokens(client: openai.OpenAI, assistant_id: str, marker: str) -> None:
    thread_id, run = start(client, assistant_id, f"[[tokens:300]] {marker}", max_completion_tokens=256)
    run = wait_for(client, thread_id, run.id)
    assert run.status == "incomplete"
    assert run.incomplete_details is not None and run.incomplete_details.reason == "max_completion_tokens"
    assert run.usage is not None and run.usage.completion_tokens == 256
    message = client.beta.threads.messages.list(thread_id=thread_id).data[0]
    assert message.role == "assistant" and message.status == "incomplete"
    assert message.incomplete_details is not None and message.incomplete_details.reason == "max_tokens"
    assert message.content[0].type == "text"
    assert message.content[0].text.value == " ".join(f"word{i}" for i in range(1, 257))


def test_usage_recorded(client: openai.OpenAI, db: Db, assistant_id: str, marker: str) -> None:
    thread_id, run = start(client, assistant_id, f"[[tokens:7]] {marker}")
    run = wait_for(client, thread_id, run.id)
    assert run.usage is not None and run.usage.completion_tokens == 7
    # prompt: "You are terse." (3 words) + the user message (2 words), as the scripted model counts
    assert run.usage.prompt_tokens == 5 and run.usage.total_tokens == 12
    stored = db.fetchval("SELECT doc->'usage' FROM runs WHERE id = $1", run.id)
    assert stored == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}


def test_events_of_a_run_in_order(client: openai.OpenAI, db: Db, assistant_id: str, marker: str) -> None:
    thread_id, run = start(client, assistant_id, f"hello {marker}")
    wait_for(client, thread_id, run.id)
    rows = db.fetch("SELECT type, envelope FROM events WHERE run_id = $1 AND topic = 'threadline.events'"
                    " ORDER BY seq", run.id)
    types = [r["type"] for r in rows]
    assert types == ["thread.run.created", "thread.run.queued", "thread.run.in_progress",
                     "thread.run.step.created", "thread.run.step.in_progress", "thread.message.created",
                     "thread.message.in_progress", "thread.message.completed", "thread.run.step.completed",
                     "thread.run.completed"]
    for row in rows:
        data = row["envelope"]["data"]
        models: dict[str, type[Run] | type[Message] | type[RunStep]] = {
            "thread.run": Run, "thread.message": Message, "thread.run.step": RunStep}
        models[data["object"]].model_validate(data)
    assert rows[-1]["envelope"]["data"]["status"] == "completed"
    # the closing statement puts the documents it wrote into its events
    written = {"thread.message.completed": db.fetchval("SELECT doc FROM messages WHERE run_id = $1", run.id),
               "thread.run.step.completed": db.fetchval("SELECT doc FROM run_steps WHERE run_id = $1", run.id),
               "thread.run.completed": db.fetchval("SELECT doc FROM runs WHERE id = $1", run.id)}
    for row in rows[-3:]:
        envelope = row["envelope"]
        assert envelope["data"] == written[row["type"]]
        assert (envelope["key"], envelope["thread_id"], envelope["run_id"]) == (thread_id, thread_id, run.id)
    assert written["thread.message.completed"]["content"][0]["text"]["value"]


def test_empty_answer_of_a_run_that_could_call_tools(client: openai.OpenAI, db: Db, marker: str) -> None:
    """Nothing streamed, so the message is opened with the answer: its events come first, as written then."""
    assistant = client.beta.assistants.create(model="gpt-4o", tools=[{"type": "function", "function": {
        "name": "noop", "parameters": {"type": "object", "properties": {}}}}])
    thread_id, run = start(client, assistant.id, f"[[reply:]] {marker}")
    assert wait_for(client, thread_id, run.id).status == "completed"
    rows = db.fetch("SELECT type, envelope FROM events WHERE run_id = $1 AND topic = 'threadline.events'"
                    " ORDER BY seq", run.id)
    assert [r["type"] for r in rows][3:] == [
        "thread.run.step.created", "thread.run.step.in_progress", "thread.message.created",
        "thread.message.in_progress", "thread.message.completed", "thread.run.step.completed", "thread.run.completed"]
    assert rows[5]["envelope"]["data"]["status"] == "in_progress" and rows[3]["envelope"]["data"]["usage"] is None
    message = db.fetchval("SELECT doc FROM messages WHERE run_id = $1", run.id)
    assert message["content"] == [] and rows[-3]["envelope"]["data"] == message
    assert rows[-1]["envelope"]["data"] == db.fetchval("SELECT doc FROM runs WHERE id = $1", run.id)


def test_redelivered_run_requested_changes_nothing(client: openai.OpenAI, model: ScriptedModelServer, db: Db,
                                                   stack: Stack, assistant_id: str, marker: str) -> None:
    """Publish the very RunRequested envelope the gateway wrote once more: no model call, nothing changes."""
    thread_id, run = start(client, assistant_id, f"once {marker}")
    done = wait_for(client, thread_id, run.id)
    envelope = EventEnvelope.model_validate(
        db.fetchval("SELECT envelope FROM events WHERE run_id = $1 AND type = $2", run.id, RunRequested.TYPE))
    before = _snapshot(db, run.id)
    run_async(_publish(stack.kafka_bootstrap_servers, envelope))
    # a later command on the same thread (same partition, so consumed after the redelivery) proves it was seen
    other = f"o{marker}"
    client.beta.threads.messages.create(thread_id=thread_id, role="user", content=other)
    later = client.beta.threads.runs.create(thread_id=thread_id, assistant_id=assistant_id)
    assert wait_for(client, thread_id, later.id).status == "completed"
    assert len(model.find_requests(f"once {marker}")) == 2  # the run and the later run (whose prompt holds it)
    assert len(model.find_requests(other)) == 1
    assert _snapshot(db, run.id) == before
    assert client.beta.threads.runs.retrieve(run.id, thread_id=thread_id) == done


def test_claim_from_a_stale_read_writes_nothing(client: openai.OpenAI, db: Db, assistant_id: str,
                                                marker: str) -> None:
    """A fresh run is claimed from an unlocked read: the claim applies only if nobody wrote the run since."""
    from run_orchestrator.objects import new_message, new_message_step

    thread_id, run = start(client, assistant_id, f"stale {marker}")
    wait_for(client, thread_id, run.id)
    state = run_async(_read_for_turn(db.dsn, run.id))
    client.beta.threads.runs.update(run.id, thread_id=thread_id, metadata={"edited": "meanwhile"})
    before = _snapshot(db, run.id)
    state.run.status = state.run.doc["status"] = "in_progress"
    state.run.lease_owner = "stale-reader"
    message = new_message(state.run.doc, 1)
    step = new_message_step(state.run.doc, message["id"], 1)
    assert run_async(_claim(db.dsn, state, step, message)) is False
    assert _snapshot(db, run.id) == before


def test_answer_of_a_run_no_longer_driven_is_not_opened(client: openai.OpenAI, db: Db, assistant_id: str,
                                                          marker: str) -> None:
    """The first text of a run that could call tools opens its message only while the run is still ours."""
    from run_orchestrator import repository as repo
    from run_orchestrator.objects import new_message, new_message_step

    thread_id, run = start(client, assistant_id, f"late {marker}")
    wait_for(client, thread_id, run.id)
    owner = db.fetchval("SELECT lease_owner FROM runs WHERE id = $1", run.id)
    state = run_async(_read_for_turn(db.dsn, run.id))
    message = new_message(state.run.doc, 1)
    step = new_message_step(state.run.doc, message["id"], 1)
    before = _snapshot(db, run.id)

    async def open_late() -> bool:
        conn = await connect(db.dsn)
        try:
            return await repo.open_answer(conn, state.run, owner, step, message, [])
        finally:
            await conn.close()

    assert run_async(open_late()) is False  # completed: nobody drives it any more
    assert _snapshot(db, run.id) == before


async def _read_for_turn(dsn: str, run_id: str) -> Any:
    from run_orchestrator import repository as repo
    conn = await connect(dsn)
    try:
        return await repo.read_for_turn(conn, run_id, resume=False, lock=False)
    finally:
        await conn.close()


async def _claim(dsn: str, state: Any, step: dict[str, Any], message: dict[str, Any]) -> bool:
    from run_orchestrator import repository as repo
    from run_orchestrator.objects import event
    conn = await connect(dsn)
    try:
        return await repo.claim_run(conn, state.run, lease_seconds=30, step=step, message=message,
                                    events=[event("thread.run.in_progress", state.run.doc, project_id="p")],
                                    version=state.version)
    finally:
        await conn.close()


async def _publish(bootstrap: str, envelope: EventEnvelope) -> None:
    producer = create_producer(bootstrap)
    await producer.start()
    try:
        await publish(producer, RUN_COMMANDS, envelope)
    finally:
        await producer.stop()


def _snapshot(db: Db, run_id: str) -> tuple[Any, ...]:
    run = db.fetchrow("SELECT status, lease_owner, doc FROM runs WHERE id = $1", run_id)
    steps = db.fetch("SELECT id, status, doc FROM run_steps WHERE run_id = $1 ORDER BY id", run_id)
    messages = db.fetch("SELECT id, doc FROM messages WHERE run_id = $1 ORDER BY id", run_id)
    events = db.fetchval("SELECT count(*) FROM events WHERE run_id = $1", run_id)
    return dict(run or {}), [dict(s) for s in steps], [dict(m) for m in messages], events


# --- the prompt builder and tool split (pure functions) ------------------------------------------------------


def _msg(mid: str, role: str, text: str, run_id: str | None = None) -> Any:
    from run_orchestrator.repository import MessageRow
    return MessageRow(id=mid, run_id=run_id, doc={"id": mid, "role": role, "run_id": run_id,
                                                  "content": [{"type": "text", "text": {"value": text,
                                                                                        "annotations": []}}]})


@pytest.mark.unit
def test_prompt_order_truncation_and_tool_turns() -> None:
    from run_orchestrator.prompt import build_prompt, chat_request
    from run_orchestrator.repository import StepRow

    run = {"id": "run_1", "model": "m", "instructions": "Be brief.", "tools": [], "truncation_strategy":
           {"type": "last_messages", "last_messages": 2}, "temperature": 0.5, "top_p": None,
           "tool_choice": None, "parallel_tool_calls": True, "response_format": "auto"}
    messages = [_msg("msg_001", "user", "a"), _msg("msg_002", "assistant", "b"), _msg("msg_003", "user", "c"),
                _msg("msg_005", "assistant", "thinking", run_id="run_1")]
    step = StepRow(id="step_004", status="completed", tool_state=None, doc={
        "id": "step_004", "type": "tool_calls", "step_details": {"type": "tool_calls", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}", "output": "42"}}]}})
    prompt = build_prompt(run, messages, [step])
    assert prompt.fits
    assert prompt.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
        {"role": "assistant", "content": "thinking"}]
    request = chat_request(run, prompt, max_completion_tokens=None)
    assert request["temperature"] == 0.5 and "top_p" not in request and "tools" not in request
    assert "response_format" not in request and "max_completion_tokens" not in request


@pytest.mark.unit
def test_max_prompt_tokens_that_cannot_fit() -> None:
    from run_orchestrator.prompt import build_prompt

    run = {"id": "run_1", "instructions": "", "max_prompt_tokens": 10, "truncation_strategy": {"type": "auto"}}
    prompt = build_prompt(run, [_msg("msg_1", "user", "x" * 400)], [])
    assert not prompt.fits


@pytest.mark.unit
def test_max_prompt_tokens_drops_the_middle_of_the_thread_first() -> None:
    """As the contract says of `auto` truncation: the thread's first message (often the task) stays while others
    fit; the newest stays always."""
    from run_orchestrator.prompt import build_prompt

    run = {"id": "run_1", "instructions": "", "max_prompt_tokens": 300, "truncation_strategy": {"type": "auto"}}
    messages = [_msg("msg_1", "user", "the task"), _msg("msg_2", "assistant", "x" * 800),
                _msg("msg_3", "user", "y" * 400), _msg("msg_4", "user", "newest")]
    prompt = build_prompt(run, messages, [])
    assert prompt.fits and [m["content"] for m in prompt.messages] == ["the task", "y" * 400, "newest"]
    prompt = build_prompt(run, messages, [], spent_prompt_tokens=200)  # what an earlier turn of the run left
    assert prompt.fits and [m["content"] for m in prompt.messages] == ["the task", "newest"]


@pytest.mark.unit
def test_auto_truncation_fits_a_known_context_length() -> None:
    """THREADLINE_MODEL_CONTEXT_TOKENS: `auto` cuts the thread's middle until the prompt leaves the answer room (a
    quarter of the window, or max_completion_tokens); it never ends the run, and `last_messages` is left alone."""
    from run_orchestrator.prompt import build_prompt

    run: dict[str, Any] = {"id": "run_1", "instructions": "", "truncation_strategy": {"type": "auto"}}
    messages = [_msg("msg_1", "user", "the task"), _msg("msg_2", "assistant", "x" * 800),
                _msg("msg_3", "user", "y" * 400), _msg("msg_4", "user", "newest")]
    contents = [m["content"] for m in build_prompt(run, messages, [], context_tokens=200).messages]
    assert contents == ["the task", "y" * 400, "newest"]  # 150 tokens for the prompt, 50 for the answer
    prompt = build_prompt({**run, "max_completion_tokens": 100}, messages, [], context_tokens=200)
    assert prompt.fits and [m["content"] for m in prompt.messages] == ["the task", "newest"]
    prompt = build_prompt(run, messages, [], context_tokens=10)
    assert prompt.fits and [m["content"] for m in prompt.messages] == ["newest"]  # best effort: sent all the same
    assert len(build_prompt(run, messages, []).messages) == 4  # unknown window: nothing cut
    last = {**run, "truncation_strategy": {"type": "last_messages", "last_messages": 3}}
    assert len(build_prompt(last, messages, [], context_tokens=200).messages) == 3


@pytest.mark.unit
def test_token_estimate_counts_utf8_bytes() -> None:
    """Four bytes a token: English text four characters a token, Chinese about one (tokenizers give CJK about a
    token a character; four characters a token made such a prompt look a quarter of its size)."""
    from run_orchestrator.prompt import estimate_tokens

    english = estimate_tokens({"role": "user", "content": "word " * 200}) - estimate_tokens({"role": "user"})
    chinese = estimate_tokens({"role": "user", "content": "学" * 1000}) - estimate_tokens({"role": "user"})
    parts = estimate_tokens({"role": "user", "content": [{"type": "text", "text": "学" * 1000}]})
    assert english == 250 and chinese == 750 and parts >= chinese


@pytest.mark.unit
def test_split_tool_calls_and_model_tools() -> None:
    from run_orchestrator.tools import ModelToolCall, model_tool_choice, model_tools, split_tool_calls

    tools = [{"type": "code_interpreter"}, {"type": "function", "function": {"name": "f", "parameters": {},
                                                                             "description": None}}]
    offered = model_tools(tools)
    assert [t["function"]["name"] for t in offered] == ["code_interpreter", "f"]
    assert "description" not in offered[1]["function"]
    calls = [ModelToolCall("c1", "f", "{}"), ModelToolCall("c2", "code_interpreter", '{"code": "1"}')]
    split = split_tool_calls(calls, tools)
    assert [c.id for c in split.function] == ["c1"] and [c.id for c in split.server] == ["c2"]
    assert model_tool_choice({"type": "file_search"}) == {"type": "function", "function": {"name": "file_search"}}
    assert model_tool_choice("required") == "required"


@pytest.mark.unit
def test_a_forced_tool_call_until_the_run_made_one() -> None:
    """tool_choice "required" or a named tool forces a call (held text, asked again when the model answers in text)
    while the model can call tools and until the run made a call: "required" means a call before the answer."""
    from run_orchestrator.prompt import allowed_calls, forces_tool_call, tool_call_reminder, turn_tool_choice
    from run_orchestrator.repository import StepRow
    from run_orchestrator.tools import ModelToolCall

    tools = [{"type": "function", "function": {"name": "extract", "parameters": {}}}]
    made = StepRow(id="step_1", status="completed", tool_state=None, doc={"type": "tool_calls"})
    answered = StepRow(id="step_2", status="completed", tool_state=None, doc={"type": "message_creation"})
    cancelled = StepRow(id="step_3", status="cancelled", tool_state=None, doc={"type": "tool_calls"})
    named = {"type": "function", "function": {"name": "extract"}}
    for choice in ("required", named, {"type": "code_interpreter"}):
        assert forces_tool_call({"tools": tools, "tool_choice": choice}, [answered, cancelled])
        assert not forces_tool_call({"tools": tools, "tool_choice": choice}, [made])
        assert not forces_tool_call({"tools": [], "tool_choice": choice}, [])
    for choice in (None, "auto", "none"):
        assert not forces_tool_call({"tools": tools, "tool_choice": choice}, [])
    other = [{"type": "function", "function": {"name": "other", "parameters": {}}}]
    run = {"tools": tools + other, "tool_choice": named}
    calls = [ModelToolCall("c1", "other", "{}"), ModelToolCall("c2", "extract", "{}")]
    assert [c.id for c in allowed_calls(calls, run)] == ["c2"]  # the named tool only, until the run made a call
    assert [c.id for c in allowed_calls(calls, run, called=True)] == ["c1", "c2"]  # then "auto"
    assert [turn_tool_choice({"tool_choice": c}, True) for c in ("required", named, "none")] == ["auto", "auto", "none"]
    assert tool_call_reminder({"tool_choice": "required"}) == {"role": "system", "content": (
        "You must call one or more of the tools offered to you now. Answer with the tool call only, not with text.")}
    assert "the tool named extract now" in tool_call_reminder({"tool_choice": named})["content"]
    assert "the tool named file_search now" in tool_call_reminder({"tool_choice": {"type": "file_search"}})["content"]


@pytest.mark.unit
async def test_text_deltas_first_at_once_then_coalesced_in_order() -> None:
    """The first text goes out at once (no timer); text within `delta_flush_seconds` is coalesced after it."""
    import asyncio

    from prometheus_client import CollectorRegistry

    from run_orchestrator.metrics import OrchestratorMetrics
    from run_orchestrator.repository import RunRow
    from run_orchestrator.service import RunService, Turn
    from run_orchestrator.settings import RunOrchestratorSettings

    sent: list[str] = []

    class Producer:
        async def send(self, topic: str, value: bytes, key: bytes) -> "asyncio.Future[None]":
            sent.append(EventEnvelope.from_bytes(value).data["delta"]["content"][0]["text"]["value"])
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done

    service = RunService(pool=None, producer=Producer(),  # type: ignore[arg-type]
                         settings=RunOrchestratorSettings(delta_flush_seconds=0.2), instance_id="i",
                         model=None, metrics=OrchestratorMetrics(CollectorRegistry()))  # type: ignore[arg-type]
    run = RunRow(id="run_1", project_id="p", thread_id="thread_1", status="in_progress", lease_owner="i",
                 lease_expired=False, expires_at=None, doc={})
    turn = Turn(run=run, request={}, prior_usage=None, message_id="msg_1")
    await service._on_text(turn, "a")
    assert sent == ["a"] and turn.pump is None  # a one-piece answer: one delta, no pump task
    for piece in "bcd":
        await service._on_text(turn, piece)
    assert sent == ["a"] and turn.pump is not None
    await asyncio.sleep(0.3)
    assert sent == ["a", "bcd"] and turn.pump is None
    await service._on_text(turn, "e")  # within the window after the last delta: coalesced again
    await service._on_text(turn, "f")
    await service._stop_pump(turn)  # the model finished: what is left goes out now
    assert sent == ["a", "bcd", "ef"] and turn.text == "abcdef"


@pytest.mark.unit
@pytest.mark.parametrize("error", [ValueError("bad data"), KeyError("doc"), ConnectionResetError("database away")])
async def test_a_turn_that_cannot_be_recorded_fails_the_run(error: Exception) -> None:
    """Recording a model turn that fails on its data (it would fail alike each time the run came back after its
    lease ran out, until the run expired) fails the run at once; an outage leaves it for the lease to re-queue."""
    from prometheus_client import CollectorRegistry

    from run_orchestrator.metrics import OrchestratorMetrics
    from run_orchestrator.model import ModelTurn
    from run_orchestrator.repository import RunRow
    from run_orchestrator.service import RunService, Turn
    from run_orchestrator.settings import RunOrchestratorSettings

    class Model:
        async def stream(self, request: dict[str, Any], on_text: Any, on_call: Any) -> ModelTurn:
            return ModelTurn(text="hi")

    failed: list[dict[str, str]] = []

    class Service(RunService):
        async def _finish_turn(self, turn: Turn, result: ModelTurn) -> None:
            raise error

        async def _finish_failed(self, turn: Turn, last_error: dict[str, str]) -> None:
            failed.append(last_error)

    service = Service(pool=None, producer=None, settings=RunOrchestratorSettings(),  # type: ignore[arg-type]
                      instance_id="i", model=Model(), metrics=OrchestratorMetrics(CollectorRegistry()))  # type: ignore[arg-type]
    run = RunRow(id="run_1", project_id="p", thread_id="thread_1", status="in_progress", lease_owner="i",
                 lease_expired=False, expires_at=None, doc={})
    turn = Turn(run=run, request={}, prior_usage=None)
    if isinstance(error, ConnectionResetError):
        with pytest.raises(ConnectionResetError):
            await service._drive(turn)
        assert failed == []
    else:
        await service._drive(turn)
        assert failed == [{"code": "server_error", "message": "The server had an error while processing the run."}]


@pytest.mark.unit
@pytest.mark.parametrize(("first", "asked"), [
    ({"text": "Sure, the weather:"}, 2),
    ({"text": "Calling another:", "tool_calls": [("lookup", "{}")]}, 2),  # a tool the named tool_choice excludes
    ({"text": "", "tool_calls": [("extract", "{}")]}, 1),
    ({"text": "cut", "finish_reason": "length"}, 1),  # no token left for a second answer: it stands
    ({"text": "all of it", "usage": {"prompt_tokens": 10, "completion_tokens": 50, "total_tokens": 60}}, 1),
])
async def test_a_forced_call_answered_in_text_is_asked_for_once_more(caplog: pytest.LogCaptureFixture,
                                                                      first: dict[str, Any], asked: int) -> None:
    """A turn that must call `extract`: its first answer's text is held (no message opens); without an allowed call it
    is dropped and the model asked once more, told so, with the tokens left; text again is the answer (a warning names
    the model) and the usage counts both calls."""
    import logging

    from prometheus_client import CollectorRegistry

    from run_orchestrator.metrics import OrchestratorMetrics
    from run_orchestrator.model import ModelTurn
    from run_orchestrator.repository import RunRow
    from run_orchestrator.service import RunService, Turn
    from run_orchestrator.settings import RunOrchestratorSettings
    from run_orchestrator.tools import ModelToolCall

    requests: list[dict[str, Any]] = []
    shown: list[str] = []

    class Model:
        async def stream(self, request: dict[str, Any], on_text: Any, on_call: Any) -> ModelTurn:
            requests.append(request)
            answer = first if len(requests) == 1 else {"text": "No tools for me."}
            await on_text(answer["text"])
            usage = answer.get("usage", {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15})
            return ModelTurn(text=answer["text"], finish_reason=answer.get("finish_reason", "stop"), usage=usage,
                             tool_calls=[ModelToolCall(f"call_{n}", n, a) for n, a in answer.get("tool_calls", [])])

    class Service(RunService):
        async def _open_message(self, turn: Turn) -> None:
            turn.message_id = "msg_1"

        async def _flush_text(self, turn: Turn) -> None:
            shown.extend(turn.unsent)
            turn.unsent.clear()

    service = Service(pool=None, producer=None, settings=RunOrchestratorSettings(),  # type: ignore[arg-type]
                      instance_id="i", model=Model(), metrics=OrchestratorMetrics(CollectorRegistry()))  # type: ignore[arg-type]
    tools = [{"type": "function", "function": {"name": name, "parameters": {}}} for name in ("extract", "lookup")]
    run = RunRow(id="run_1", project_id="p", thread_id="thread_1", status="in_progress", lease_owner="i",
                 lease_expired=False, expires_at=None, doc={"model": "llama3.2", "tools": tools, "tool_choice": {
                     "type": "function", "function": {"name": "extract"}}})
    prompt = [{"role": "user", "content": "extract it"}]
    turn = Turn(run=run, request={"messages": prompt, "max_completion_tokens": 50}, prior_usage={}, held=True)
    with caplog.at_level(logging.INFO, logger="run_orchestrator.service"):
        result = await service._call_model(turn)
    assert result is not None and len(requests) == asked
    if asked == 1:
        assert result.text == first["text"] and shown == [] and not turn.held
        return
    assert requests[1] == {"messages": [*prompt, {"role": "system", "content": (
        "You must call the tool named extract now. Answer with the tool call only, not with text.")}],
        "max_completion_tokens": 45}
    assert shown == ["No tools for me."] and result.text == "No tools for me." and turn.calls == {}
    assert result.usage == {"prompt_tokens": 20, "completion_tokens": 10, "total_tokens": 30}
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "model llama3.2 answered in text" in warning.getMessage()


@pytest.mark.unit
def test_only_the_first_start_opens_a_fresh_window() -> None:
    """A run coming back after its driver died kept getting a new 10 minutes, so one that crashed its driver each
    time never expired; it now keeps its deadline (answered tool outputs get theirs from the gateway)."""
    from prometheus_client import CollectorRegistry

    from run_orchestrator.metrics import OrchestratorMetrics
    from run_orchestrator.repository import RunRow
    from run_orchestrator.service import RunService
    from run_orchestrator.settings import RunOrchestratorSettings

    settings = RunOrchestratorSettings()
    service = RunService(pool=None, producer=None, settings=settings, instance_id="i",  # type: ignore[arg-type]
                         model=None, metrics=OrchestratorMetrics(CollectorRegistry()))  # type: ignore[arg-type]

    def queued(doc: dict[str, Any]) -> RunRow:
        shape = {"id": "run_1", "object": "thread.run", "assistant_id": "asst_1", "thread_id": "thread_1",
                 "created_at": 1_000, "instructions": "", "model": "m", "parallel_tool_calls": True, "tools": [],
                 "status": "queued"}
        return RunRow(id="run_1", project_id="p", thread_id="thread_1", status="queued", lease_owner=None,
                      lease_expired=False, expires_at=doc["expires_at"], doc={**shape, **doc})

    fresh = queued({"expires_at": 1_000 + 600, "started_at": None})
    assert service._start(fresh, 1_500).data["expires_at"] == 1_500 + settings.run_timeout_seconds
    assert fresh.doc["started_at"] == 1_500
    again = queued({"expires_at": 2_100, "started_at": 1_500})
    event = service._start(again, 2_000)
    assert (event.data["expires_at"], event.data["started_at"], event.data["status"]) == (2_100, 1_500, "in_progress")
