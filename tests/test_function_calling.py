"""Function calling: requires_action, submit_tool_outputs (and its checks), expiry, cancel, tool options.

The scripted model asks for tool calls with ``[[call:NAME:JSON]]`` in the last user message (repeat it
for parallel calls) as long as no tool result follows that message, then answers
``Tool results: <outputs joined by " | ">``. The test stack expires requires_action runs after 10 s
(THREADLINE_REQUIRES_ACTION_TIMEOUT_SECONDS in tests/conftest.py).
"""

import json
import time
from typing import Any

import openai
import pytest
from openai.types.beta import FunctionToolParam
from openai.types.beta.threads import Run
from run_helpers import TERMINAL, ToolCallRecorder, wait_for

from threadline_devstack.model_server import ScriptedModelServer
from threadline_devstack.sql import Db

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

REQUIRES_ACTION_TIMEOUT = 10

WEATHER: FunctionToolParam = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME: FunctionToolParam = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a time zone",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}}}


@pytest.fixture(scope="module")
def assistant_id(client: openai.OpenAI) -> str:
    """An assistant with two function tools."""
    return client.beta.assistants.create(model="gpt-4o", instructions="Use the tools.", tools=[WEATHER, TIME]).id


def ask(client: openai.OpenAI, assistant_id: str, text: str, **run_args: Any) -> Run:
    """A thread with `text`, a run on it, polled until it needs action (or ends)."""
    thread = client.beta.threads.create(messages=[{"role": "user", "content": text}])
    run = client.beta.threads.runs.create(thread_id=thread.id, assistant_id=assistant_id, **run_args)
    return wait_for(client, thread.id, run.id, {"requires_action"} | TERMINAL)


def calls_of(run: Run) -> list[Any]:
    """The function calls a run waits for."""
    assert run.status == "requires_action", (run.status, run.last_error)
    assert run.required_action is not None and run.required_action.type == "submit_tool_outputs"
    return list(run.required_action.submit_tool_outputs.tool_calls)


def test_one_function_call(client: openai.OpenAI, model: ScriptedModelServer, db: Db, assistant_id: str,
                           marker: str) -> None:
    before = int(time.time())
    run = ask(client, assistant_id, f'Weather? [[call:get_weather:{{"city": "Paris"}}]] {marker}')
    (call,) = calls_of(run)
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert run.expires_at is not None
    assert before + REQUIRES_ACTION_TIMEOUT <= run.expires_at <= int(time.time()) + REQUIRES_ACTION_TIMEOUT + 1
    (step,) = client.beta.threads.runs.steps.list(run_id=run.id, thread_id=run.thread_id).data
    assert step.type == "tool_calls" and step.status == "in_progress"
    assert step.step_details.type == "tool_calls"
    (step_call,) = step.step_details.tool_calls
    assert step_call.type == "function" and step_call.id == call.id and step_call.function.output is None
    events = [(r["type"], r["envelope"]["data"]) for r in db.fetch(
        "SELECT type, envelope FROM events WHERE run_id = $1 AND topic = 'threadline.events' ORDER BY seq", run.id)]
    opened = [t for t, _ in events].index("thread.run.step.created")
    assert [t for t, _ in events[opened:opened + 3]] == ["thread.run.step.created", "thread.run.step.in_progress",
                                                        "thread.run.step.delta"]  # the call, then its arguments
    assert {t for t, _ in events[opened + 3:-1]} == {"thread.run.step.delta"}
    assert events[-1][0] == "thread.run.requires_action"
    pieces = [d["delta"]["step_details"]["tool_calls"][0]["function"]["arguments"] for _, d in events[opened + 2:-1]]
    assert pieces[0] == "" and "".join(pieces) == call.function.arguments

    queued = client.beta.threads.runs.submit_tool_outputs(run.id, thread_id=run.thread_id,
                                                          tool_outputs=[{"tool_call_id": call.id, "output": "22C"}])
    assert queued.status == "queued" and queued.required_action is None
    run = wait_for(client, run.thread_id, run.id, TERMINAL)
    assert run.status == "completed", run.last_error
    messages = client.beta.threads.messages.list(thread_id=run.thread_id).data
    assert messages[0].role == "assistant"
    assert messages[0].content[0].type == "text" and messages[0].content[0].text.value == "Tool results: 22C"

    steps = client.beta.threads.runs.steps.list(run_id=run.id, thread_id=run.thread_id, order="asc").data
    assert [(s.type, s.status) for s in steps] == [("tool_calls", "completed"), ("message_creation", "completed")]
    assert steps[0].step_details.type == "tool_calls"
    done_call = steps[0].step_details.tool_calls[0]
    assert done_call.type == "function" and done_call.function.output == "22C"
    assert run.usage is not None and steps[0].usage is not None and steps[1].usage is not None
    assert run.usage.total_tokens == steps[0].usage.total_tokens + steps[1].usage.total_tokens

    first, second = model.find_requests(marker)
    assert [t["function"]["name"] for t in first["tools"]] == ["get_weather", "get_time"]
    assert second["messages"][-2:] == [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": "get_weather", "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "22C"}]


def test_parallel_calls_answered_together(client: openai.OpenAI, model: ScriptedModelServer, assistant_id: str,
                                          marker: str) -> None:
    run = ask(client, assistant_id,
              f'[[call:get_weather:{{"city": "Oslo"}}]] [[call:get_time:{{"tz": "CET"}}]] {marker}')
    weather, clock = calls_of(run)
    assert (weather.function.name, clock.function.name) == ("get_weather", "get_time")
    assert weather.id != clock.id
    run = client.beta.threads.runs.submit_tool_outputs_and_poll(
        run_id=run.id, thread_id=run.thread_id, poll_interval_ms=50,
        tool_outputs=[{"tool_call_id": clock.id, "output": "12:00"}, {"tool_call_id": weather.id, "output": "-3C"}])
    assert run.status == "completed"
    reply = client.beta.threads.messages.list(thread_id=run.thread_id).data[0]
    assert reply.content[0].type == "text" and reply.content[0].text.value == "Tool results: -3C | 12:00"
    second = model.find_requests(marker)[1]
    assert [m["role"] for m in second["messages"][-3:]] == ["assistant", "tool", "tool"]
    assert len(second["messages"][-3]["tool_calls"]) == 2


def test_chained_tool_turns(client: openai.OpenAI, assistant_id: str, marker: str) -> None:
    """After the outputs, a model that calls again puts the run back in requires_action with a new step."""
    run = ask(client, assistant_id, f'[[call:get_time:{{"tz": "UTC"}}]] {marker}')
    (call,) = calls_of(run)
    client.beta.threads.runs.submit_tool_outputs(run.id, thread_id=run.thread_id,
                                                 tool_outputs=[{"tool_call_id": call.id, "output": "noon"}])
    run = wait_for(client, run.thread_id, run.id, TERMINAL)
    assert run.status == "completed"
    # the model saw the tool result, so a follow-up message with a new directive asks again
    client.beta.threads.messages.create(thread_id=run.thread_id, role="user",
                                        content=f'[[call:get_weather:{{"city": "Rome"}}]] again {marker}')
    second = client.beta.threads.runs.create(thread_id=run.thread_id, assistant_id=assistant_id)
    second = wait_for(client, run.thread_id, second.id, {"requires_action"})
    (again,) = calls_of(second)
    assert again.function.name == "get_weather" and again.id != call.id


def _expect_400(http: Any, run: Run, body: dict[str, Any]) -> dict[str, Any]:
    response = http.post(f"/threads/{run.thread_id}/runs/{run.id}/submit_tool_outputs", json=body)
    assert response.status_code == 400, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    return error


def test_bad_submissions_leave_run_unchanged(client: openai.OpenAI, http: Any, assistant_id: str,
                                             marker: str) -> None:
    run = ask(client, assistant_id, f'[[call:get_weather:{{"city": "A"}}]] [[call:get_time:{{"tz": "B"}}]] {marker}')
    first, second = calls_of(run)
    steps_before = client.beta.threads.runs.steps.list(run_id=run.id, thread_id=run.thread_id).data
    both = [{"tool_call_id": first.id, "output": "1"}, {"tool_call_id": second.id, "output": "2"}]
    _expect_400(http, run, {"tool_outputs": [{"tool_call_id": "call_unknown", "output": "x"}, both[1]]})
    _expect_400(http, run, {"tool_outputs": [both[0]]})  # one call left unanswered
    _expect_400(http, run, {"tool_outputs": [both[0], both[0]]})  # the same call twice
    _expect_400(http, run, {"tool_outputs": [{"tool_call_id": first.id, "output": 42}, both[1]]})
    _expect_400(http, run, {"tool_outputs": [{"tool_call_id": first.id, "output": {"a": 1}}, both[1]]})
    _expect_400(http, run, {"tool_outputs": [{"output": "1"}, both[1]]})  # tool_call_id missing
    _expect_400(http, run, {})
    _expect_400(http, run, {"tool_outputs": "nope"})
    with pytest.raises(openai.BadRequestError):
        client.beta.threads.runs.submit_tool_outputs(run.id, thread_id=run.thread_id,
                                                     tool_outputs=[{"tool_call_id": "call_nope", "output": "x"}])
    unchanged = client.beta.threads.runs.retrieve(run.id, thread_id=run.thread_id)
    assert unchanged == run
    assert client.beta.threads.runs.steps.list(run_id=run.id, thread_id=run.thread_id).data == steps_before

    client.beta.threads.runs.submit_tool_outputs(run.id, thread_id=run.thread_id, tool_outputs=both)  # type: ignore[arg-type]
    error = _expect_400(http, run, {"tool_outputs": both})  # a second submission
    assert "do not accept tool outputs" in error["message"]
    assert wait_for(client, run.thread_id, run.id, TERMINAL).status == "completed"
    _expect_400(http, run, {"tool_outputs": both})  # a finished run


def test_submit_to_unknown_run_is_404(client: openai.OpenAI, http: Any, assistant_id: str) -> None:
    thread = client.beta.threads.create()
    response = http.post(f"/threads/{thread.id}/runs/run_nope/submit_tool_outputs",
                         json={"tool_outputs": [{"tool_call_id": "call_x", "output": "y"}]})
    assert response.status_code == 404
    response = http.post("/threads/thread_nope/runs/run_nope/submit_tool_outputs",
                         json={"tool_outputs": [{"tool_call_id": "call_x", "output": "y"}]})
    assert response.status_code == 404


def test_requires_action_expires(client: openai.OpenAI, assistant_id: str, marker: str) -> None:
    run = ask(client, assistant_id, f'[[call:get_weather:{{"city": "Lima"}}]] {marker}')
    (call,) = calls_of(run)
    run = wait_for(client, run.thread_id, run.id, TERMINAL, timeout=REQUIRES_ACTION_TIMEOUT + 20)
    assert run.status == "expired"
    assert run.required_action is None
    (step,) = client.beta.threads.runs.steps.list(run_id=run.id, thread_id=run.thread_id).data
    assert step.status == "expired" and step.expired_at is not None
    with pytest.raises(openai.BadRequestError):
        client.beta.threads.runs.submit_tool_outputs(run.id, thread_id=run.thread_id,
                                                     tool_outputs=[{"tool_call_id": call.id, "output": "late"}])


def test_cancel_while_waiting(client: openai.OpenAI, assistant_id: str, marker: str) -> None:
    run = ask(client, assistant_id, f'[[call:get_weather:{{"city": "Kyiv"}}]] {marker}')
    (call,) = calls_of(run)
    client.beta.threads.runs.cancel(run.id, thread_id=run.thread_id)
    run = wait_for(client, run.thread_id, run.id, TERMINAL)
    assert run.status == "cancelled" and run.cancelled_at is not None and run.required_action is None
    (step,) = client.beta.threads.runs.steps.list(run_id=run.id, thread_id=run.thread_id).data
    assert step.status == "cancelled"
    # the model call that made the step was spent: its tokens count though the step never completed
    assert step.usage is not None and step.usage.prompt_tokens > 0 and step.usage.completion_tokens > 0
    assert run.usage is not None and run.usage.model_dump() == step.usage.model_dump()
    with pytest.raises(openai.BadRequestError):
        client.beta.threads.runs.submit_tool_outputs(run.id, thread_id=run.thread_id,
                                                     tool_outputs=[{"tool_call_id": call.id, "output": "late"}])


@pytest.mark.parametrize(("run_args", "expected"), [
    ({"parallel_tool_calls": False}, ["get_weather"]),
    ({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}, ["get_time"]),
])
def test_tool_choice_and_parallel_tool_calls_bound_the_calls(client: openai.OpenAI, assistant_id: str, marker: str,
                                                             run_args: dict[str, Any], expected: list[str]) -> None:
    """The docs' forced function and one-call-at-a-time settings: the run waits for exactly those calls."""
    run = ask(client, assistant_id,
              f'[[call:get_weather:{{"city": "Oslo"}}]] [[call:get_time:{{"tz": "CET"}}]] {marker}', **run_args)
    assert [call.function.name for call in calls_of(run)] == expected


def test_tool_choice_none_answers_in_text(client: openai.OpenAI, assistant_id: str, marker: str) -> None:
    """tool_choice "none": no calls, one assistant message with the text answer (was: requires_action beside an
    empty message)."""
    run = ask(client, assistant_id, f'[[call:get_weather:{{"city": "Oslo"}}]] {marker}', tool_choice="none")
    assert run.status == "completed" and run.required_action is None
    (reply,) = [m for m in client.beta.threads.messages.list(thread_id=run.thread_id) if m.role == "assistant"]
    assert reply.content[0].type == "text" and reply.content[0].text.value.startswith("Echo:")
    steps = client.beta.threads.runs.steps.list(run_id=run.id, thread_id=run.thread_id).data
    assert [step.type for step in steps] == ["message_creation"]


@pytest.mark.parametrize("choice", ["none", "auto", "required", {"type": "function", "function": {"name": "get_time"}}])
def test_tool_choice_passed_to_model(client: openai.OpenAI, model: ScriptedModelServer, assistant_id: str,
                                     marker: str, choice: Any) -> None:
    run = ask(client, assistant_id, f"plain question {marker}", tool_choice=choice, parallel_tool_calls=False)
    assert run.status == "completed"
    requests = model.find_requests(marker)
    assert len(requests) == (1 if choice in ("none", "auto") else 2)  # a forced call answered in text: asked again
    for request in requests:
        assert request["tool_choice"] == choice
        assert request["parallel_tool_calls"] is False


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_forced_tool_choice_forces_only_the_first_call(client: openai.OpenAI, model: ScriptedModelServer,
                                                         assistant_id: str, marker: str, choice: Any) -> None:
    """"required" (or a named tool) asks for a call before the answer: once the outputs are in, the model is asked
    with "auto" and the run answers (sent the forced choice again, the model calls again after every output, as OpenAI
    and vLLM do, and the run never answers); the run still shows the tool_choice it was given."""
    run = ask(client, assistant_id, f'[[call:get_weather:{{"city": "Rome"}}]] {marker}', tool_choice=choice)
    (call,) = calls_of(run)
    run = client.beta.threads.runs.submit_tool_outputs_and_poll(
        run_id=run.id, thread_id=run.thread_id, tool_outputs=[{"tool_call_id": call.id, "output": "sunny"}])
    assert run.status == "completed" and run.model_dump(exclude_unset=True)["tool_choice"] == choice
    assert [r["tool_choice"] for r in model.find_requests(marker)] == [choice, "auto"]


@pytest.mark.parametrize("response_format", [
    {"type": "json_object"},
    {"type": "json_schema", "json_schema": {"name": "answer", "strict": True, "schema": {
        "type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"],
        "additionalProperties": False}}},
])
def test_response_format_passed_to_model(client: openai.OpenAI, model: ScriptedModelServer, assistant_id: str,
                                         marker: str, response_format: dict[str, Any]) -> None:
    run = ask(client, assistant_id, f'[[reply:{{"answer": "4"}}]] {marker}', response_format=response_format)
    assert run.status == "completed"
    (request,) = model.find_requests(marker)
    assert request["response_format"] == response_format
    reply = client.beta.threads.messages.list(thread_id=run.thread_id).data[0]
    assert reply.content[0].type == "text" and json.loads(reply.content[0].text.value) == {"answer": "4"}


def test_server_tools_offered_as_functions(client: openai.OpenAI, model: ScriptedModelServer, marker: str) -> None:
    assistant = client.beta.assistants.create(model="gpt-4o", tools=[{"type": "code_interpreter"},
                                                                     {"type": "file_search"}, WEATHER])
    run = ask(client, assistant.id, f"no tools needed {marker}", tool_choice={"type": "code_interpreter"})
    assert run.status == "completed"
    request, asked_again = model.find_requests(marker)  # answered in text: asked again, told to call it
    assert asked_again["messages"][-1] == {"role": "system", "content": (
        "You must call the tool named code_interpreter now. Answer with the tool call only, not with text.")}
    functions = {t["function"]["name"]: t["function"] for t in request["tools"]}
    assert set(functions) == {"code_interpreter", "file_search", "get_weather"}
    assert functions["code_interpreter"]["parameters"]["required"] == ["code"]
    assert functions["file_search"]["parameters"]["required"] == ["query"]
    assert request["tool_choice"] == {"type": "function", "function": {"name": "code_interpreter"}}


def test_streaming_function_calling(client: openai.OpenAI, assistant_id: str, marker: str) -> None:
    """The hosted docs' streaming pattern: an event handler answers requires_action with
    submit_tool_outputs_stream and prints the text deltas of the answer."""
    seen: dict[str, Any] = {"created": [], "text": "", "events": []}

    class Handler(openai.AssistantEventHandler):
        def on_event(self, event: Any) -> None:
            seen["events"].append(event.event)
            if event.event == "thread.run.requires_action":
                outputs = [{"tool_call_id": call.id, "output": f"out-{call.function.name}"}
                           for call in event.data.required_action.submit_tool_outputs.tool_calls]
                assert self.current_run is not None
                with client.beta.threads.runs.submit_tool_outputs_stream(
                        thread_id=self.current_run.thread_id, run_id=self.current_run.id,
                        tool_outputs=outputs, event_handler=Handler()) as stream:
                    for text in stream.text_deltas:
                        seen["text"] += text

        def on_tool_call_created(self, tool_call: Any) -> None:
            seen["created"].append(tool_call.function.name)

    thread = client.beta.threads.create(messages=[{"role": "user", "content":
                                                   f'[[call:get_weather:{{"city": "Bern"}}]] {marker}'}])
    with client.beta.threads.runs.stream(thread_id=thread.id, assistant_id=assistant_id,
                                         event_handler=Handler()) as stream:
        stream.until_done()
    assert seen["created"] == ["get_weather"]
    assert "thread.run.requires_action" in seen["events"]
    assert seen["text"] == "Tool results: out-get_weather"
    assert seen["events"][-1] == "thread.run.completed"
    run = client.beta.threads.runs.list(thread_id=thread.id).data[0]
    assert run.status == "completed"


def test_a_step_mixing_a_function_with_code_interpreter_streams_both(client: openai.OpenAI) -> None:
    """The function call of a step that also ran code_interpreter was never announced: no created/delta/done for it,
    and the streamed step kept empty arguments (only `requires_action` had them)."""
    assistant = client.beta.assistants.create(model="gpt-4o", tools=[{"type": "code_interpreter"}, WEATHER])
    arguments = {"city": "Bern"}
    code = json.dumps({"code": "print(1)"})
    thread = client.beta.threads.create(messages=[{"role": "user", "content": (
        f"x [[call:get_weather:{json.dumps(arguments)}]] [[call:code_interpreter:{code}]]")}])
    recorder = ToolCallRecorder()
    with client.beta.threads.runs.stream(thread_id=thread.id, assistant_id=assistant.id,
                                         event_handler=recorder) as stream:
        stream.until_done()
    assert sorted(recorder.created) == sorted(recorder.done) == ["code_interpreter", "function"]
    assert [json.loads(a) for a in recorder.arguments.values()] == [arguments]
    (step,) = stream.get_final_run_steps()
    assert step.step_details.type == "tool_calls"
    function = next(c for c in step.step_details.tool_calls if c.type == "function")
    assert json.loads(function.function.arguments) == arguments
    run = stream.get_final_run()
    assert run.status == "requires_action"
    client.beta.threads.runs.cancel(run.id, thread_id=thread.id)


# --- arguments streamed as the model writes them -------------------------------------------------------------

LONG_ARGUMENTS = json.dumps({"city": "Bern", "detail": "hourly forecast with wind, rain and the temperature felt"})
"""Arguments the scripted model writes in 16-character pieces (six of them)."""


class EventRecorder(ToolCallRecorder):
    """Also keeps every event, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[Any] = []

    def on_event(self, event: Any) -> None:
        self.events.append(event)


def stream_run(client: openai.OpenAI, assistant_id: str, text: str) -> tuple[EventRecorder, Run]:
    """A thread with `text` and a run on it, streamed through the SDK's helpers until it pauses or ends."""
    thread = client.beta.threads.create(messages=[{"role": "user", "content": text}])
    recorder = EventRecorder()
    with client.beta.threads.runs.stream(thread_id=thread.id, assistant_id=assistant_id,
                                         event_handler=recorder) as stream:
        stream.until_done()
    return recorder, stream.get_final_run()


def test_function_arguments_stream_as_the_model_writes_them(client: openai.OpenAI, assistant_id: str,
                                                           marker: str) -> None:
    """As hosted: the step opens with no calls, each call is announced whole (id, name, empty arguments), and its
    arguments follow in the pieces the model writes (they came in one delta once the model's turn had ended)."""
    recorder, run = stream_run(client, assistant_id, f"[[slow:0.15]] [[call:get_weather:{LONG_ARGUMENTS}]] {marker}")
    (call,) = calls_of(run)
    created = next(e.data for e in recorder.events if e.event == "thread.run.step.created")
    assert created.type == "tool_calls" and created.step_details.tool_calls == []
    deltas = [c for e in recorder.events if e.event == "thread.run.step.delta"
              for c in e.data.delta.step_details.tool_calls]
    announcement, *pieces = deltas
    assert (announcement.index, announcement.id, announcement.type) == (0, call.id, "function")
    assert (announcement.function.name, announcement.function.arguments) == ("get_weather", "")
    assert len(pieces) >= 3 and "".join(p.function.arguments for p in pieces) == LONG_ARGUMENTS
    assert recorder.created == recorder.done == ["function"] and recorder.arguments == {0: LONG_ARGUMENTS}
    assert call.function.arguments == LONG_ARGUMENTS
    (step,) = client.beta.threads.runs.steps.list(run_id=run.id, thread_id=run.thread_id).data
    assert step.id == created.id and step.status == "in_progress"
    assert step.step_details.type == "tool_calls"
    assert step.step_details.tool_calls[0].function.arguments == LONG_ARGUMENTS  # type: ignore[union-attr]
    client.beta.threads.runs.cancel(run.id, thread_id=run.thread_id)


def _half_written_call(client: openai.OpenAI, thread_id: str, run_id: str) -> Any:
    """Wait until the run's tool_calls step holds part of its call's arguments; that step."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for step in client.beta.threads.runs.steps.list(run_id=run_id, thread_id=thread_id).data:
            calls = step.step_details.tool_calls if step.step_details.type == "tool_calls" else []
            if calls and calls[0].type == "function" and calls[0].function.arguments:
                assert LONG_ARGUMENTS.startswith(calls[0].function.arguments)
                assert calls[0].function.arguments != LONG_ARGUMENTS, "the model wrote the call too fast"
                return step
        time.sleep(0.05)
    raise AssertionError("no step with part of a call")


def test_a_run_cancelled_while_the_model_writes_a_call(client: openai.OpenAI, assistant_id: str,
                                                       marker: str) -> None:
    """The open step is cancelled with the arguments as far as they were written; no call is asked for."""
    thread = client.beta.threads.create(messages=[{"role": "user", "content": (
        f"[[slow:0.5]] [[call:get_weather:{LONG_ARGUMENTS}]] {marker}")}])
    run = client.beta.threads.runs.create(thread_id=thread.id, assistant_id=assistant_id)
    half = _half_written_call(client, thread.id, run.id)
    client.beta.threads.runs.cancel(run.id, thread_id=thread.id)
    cancelled = wait_for(client, thread.id, run.id)
    assert cancelled.status == "cancelled" and cancelled.required_action is None
    (step,) = client.beta.threads.runs.steps.list(run_id=run.id, thread_id=thread.id).data
    assert step.id == half.id and step.status == "cancelled" and step.cancelled_at is not None
    (written,) = step.step_details.tool_calls  # type: ignore[union-attr]
    assert LONG_ARGUMENTS.startswith(written.function.arguments)  # type: ignore[union-attr]
    assert written.function.arguments != LONG_ARGUMENTS  # type: ignore[union-attr]


def test_a_call_its_driver_left_half_written_is_cancelled_and_made_again(
        client: openai.OpenAI, db: Db, model: ScriptedModelServer, assistant_id: str, marker: str) -> None:
    """The run's next driver cancels the half-written step and calls the model again (it asked for the half-written
    arguments: a function call with `output` null looked like one waiting for the user)."""
    tag = f"{marker}-redriven"
    thread = client.beta.threads.create(messages=[{"role": "user", "content": (
        f"[[slow:0.5]] [[call:get_weather:{LONG_ARGUMENTS}]] {tag}")}])
    run = client.beta.threads.runs.create(thread_id=thread.id, assistant_id=assistant_id)
    half = _half_written_call(client, thread.id, run.id)
    lost = db.fetchval("UPDATE runs SET lease_owner = 'run_orchestrator-gone', lease_expires_at = now() - interval"
                       " '1 second' WHERE id = $1 AND status = 'in_progress' RETURNING id", run.id)
    assert lost == run.id, "the model wrote the call too fast"  # as if its driver had died: the sweeper re-queues it
    waiting = wait_for(client, thread.id, run.id, {"requires_action"})
    (call,) = calls_of(waiting)
    assert call.function.arguments == LONG_ARGUMENTS
    first, second = client.beta.threads.runs.steps.list(run_id=run.id, thread_id=thread.id, order="asc").data
    assert first.id == half.id and first.status == "cancelled"
    assert second.status == "in_progress"
    assert second.step_details.tool_calls[0].id == call.id  # type: ignore[union-attr]
    assert len(model.find_requests(tag)) == 2
    client.beta.threads.runs.cancel(run.id, thread_id=thread.id)


def test_a_call_cut_off_by_max_completion_tokens(client: openai.OpenAI, assistant_id: str, marker: str) -> None:
    """The model ran out of tokens mid-arguments: the run is incomplete and its step cancelled with the arguments as
    written and the turn's usage (none of its calls is asked for), as a text answer cut off is incomplete; no empty
    assistant message is left behind."""
    note = " ".join(f"w{i}" for i in range(300))
    arguments = json.dumps({"city": "Bern", "note": note})
    thread = client.beta.threads.create(messages=[{"role": "user", "content": (
        f"[[call:get_weather:{arguments}]] {marker}")}])
    run = client.beta.threads.runs.create(thread_id=thread.id, assistant_id=assistant_id, max_completion_tokens=256)
    run = wait_for(client, thread.id, run.id)
    assert run.status == "incomplete" and run.required_action is None
    assert run.incomplete_details is not None and run.incomplete_details.reason == "max_completion_tokens"
    (tool_step,) = client.beta.threads.runs.steps.list(run_id=run.id, thread_id=thread.id).data
    assert tool_step.type == "tool_calls" and tool_step.status == "cancelled"
    assert [m.role for m in client.beta.threads.messages.list(thread_id=thread.id)] == ["user"]  # no empty answer
    assert run.usage is not None and tool_step.usage is not None
    assert run.usage.completion_tokens == tool_step.usage.completion_tokens == 256  # what the cut-off calls took
    (written,) = tool_step.step_details.tool_calls  # type: ignore[union-attr]
    assert arguments.startswith(written.function.arguments) and len(written.function.arguments) > 100  # type: ignore[union-attr]
    assert written.function.arguments != arguments  # type: ignore[union-attr]


@pytest.mark.parametrize("city", ["SF", "San Francisco, California, USA"])
def test_a_call_written_faster_than_the_flushes_streams_once(client: openai.OpenAI, assistant_id: str, marker: str,
                                                             city: str) -> None:
    """Chunks 10 ms apart, flushes 20 ms apart: the turn's end waits for the flush in flight (stopping it after its
    write had committed opened the step a second time, or sent a piece twice)."""
    arguments = json.dumps({"location": city})
    for attempt in range(4):
        recorder, run = stream_run(client, assistant_id,
                                   f"[[slow:0.01]] [[call:get_weather:{arguments}]] {marker}-{attempt}")
        created = [e.data.id for e in recorder.events if e.event == "thread.run.step.created"]
        steps = client.beta.threads.runs.steps.list(run_id=run.id, thread_id=run.thread_id).data
        assert len(created) == len(steps) == 1, (created, [s.status for s in steps])
        assert recorder.arguments == {0: arguments} and calls_of(run)[0].function.arguments == arguments
        client.beta.threads.runs.cancel(run.id, thread_id=run.thread_id)
