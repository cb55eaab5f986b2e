"""Parallel tool calls (one `tool_calls` step holding several calls) through the SDK's streaming helpers, real stack.

The SDK's AssistantEventHandler follows one tool call at a time: a step delta whose `index` differs from the last
one it saw ends that call (`on_tool_call_done`) and starts the other (`on_tool_call_created`), whether or not it
saw it before. So the step's deltas must come call by call, as on the hosted API: call 0's announcement, its
arguments or code, its outputs or results, then call 1's, and so on. The calls' outputs were streamed as the tool
executor answered, after every call was announced: each code_interpreter or file_search call of a parallel step
was created and done twice, and in a step whose code_interpreter call came before a function call, the
code_interpreter call was too.

Counted here per call id: `on_tool_call_created` and `on_tool_call_done` once each until the step completes (or
the run pauses at requires_action); the SDK never forgets the last call it followed and fires `on_tool_call_done`
for it again on every later `step.completed` and on the run's end, whatever the server sends, so those repeats
(the last call's only) are told apart by the event that fired them.
"""

import json
import threading
from collections import Counter, defaultdict
from typing import Any

import openai
import pytest
from openai import AssistantEventHandler
from openai.types.beta import AssistantStreamEvent
from openai.types.beta.threads.runs import RunStep, ToolCall, ToolCallDelta
from typing_extensions import override

from run_orchestrator.server_tools import call_deltas, done_calls, streamed

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

WEATHER: Any = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
SLOW_CODE = "import time\ntime.sleep(1.5)\nprint('first, slow')"
FAST_CODE = "print('second, fast')"


def call(name: str, arguments: dict[str, Any]) -> str:
    """The scripted model's directive for one call (repeated: parallel calls in one turn)."""
    return f"[[call:{name}:{json.dumps(arguments)}]]"


class CallCounter(AssistantEventHandler):
    """What the SDK tells about each tool call, by call id, with the event that made it say so."""

    def __init__(self) -> None:
        super().__init__()
        self.created: list[ToolCall] = []
        self.done: list[tuple[ToolCall, str, str | None]] = []  # the call, the event, that event's object id
        self.deltas: dict[str, list[ToolCallDelta]] = defaultdict(list)
        self.step_delta_indexes: list[int] = []

    @override
    def on_event(self, event: AssistantStreamEvent) -> None:
        if event.event == "thread.run.step.delta" and event.data.delta.step_details is not None \
                and event.data.delta.step_details.type == "tool_calls":
            self.step_delta_indexes += [c.index for c in event.data.delta.step_details.tool_calls or []]

    @override
    def on_tool_call_created(self, tool_call: ToolCall) -> None:
        self.created.append(tool_call)

    @override
    def on_tool_call_delta(self, delta: ToolCallDelta, snapshot: ToolCall) -> None:
        self.deltas[snapshot.id].append(delta)

    @override
    def on_tool_call_done(self, tool_call: ToolCall) -> None:
        event = self.current_event
        assert event is not None
        self.done.append((tool_call, event.event, getattr(event.data, "id", None)))

    def done_in_step(self, step: RunStep) -> list[ToolCall]:
        """The calls done while the step streamed: on its deltas, its completion, or the run's requires_action."""
        return [c for c, name, object_id in self.done
                if object_id == step.id or name == "thread.run.requires_action"]

    def check(self, step: RunStep) -> dict[str, ToolCall]:
        """Each of the step's calls created once and done once (in the step's order, with the whole call), the
        SDK's repeats aside; its calls as done, by id."""
        assert step.step_details.type == "tool_calls"
        ids = [c.id for c in step.step_details.tool_calls]
        assert len(ids) >= 2 and len(set(ids)) == len(ids)
        assert [c.id for c in self.created] == ids, (Counter(c.id for c in self.created), ids)
        done = self.done_in_step(step)
        assert [c.id for c in done] == ids, (Counter(c.id for c in done), ids)
        later = [(c.id, name) for c, name, object_id in self.done
                 if object_id != step.id and name != "thread.run.requires_action"]
        assert {call_id for call_id, _ in later} <= {ids[-1]}, later  # the SDK's repeats: its last call only
        assert self.step_delta_indexes == sorted(self.step_delta_indexes), self.step_delta_indexes
        assert sorted(set(self.step_delta_indexes)) == list(range(len(ids)))
        for made, expected in zip(self.created, step.step_details.tool_calls, strict=True):
            assert made.type == expected.type
        return {c.id: c for c in done}


def final_tool_step(stream: Any) -> RunStep:
    """The one tool_calls step of the SDK's snapshots (each step once)."""
    steps = stream.get_final_run_steps()
    assert len({s.id for s in steps}) == len(steps)
    [step] = [s for s in steps if s.type == "tool_calls"]
    return step  # type: ignore[no-any-return]


def stream_run(client: openai.OpenAI, assistant_id: str, text: str, **run_args: Any
               ) -> tuple[CallCounter, RunStep, Any]:
    """Stream a run on a new thread to its end (or requires_action): the handler, the streamed tool step, the run."""
    thread = client.beta.threads.create(messages=[{"role": "user", "content": text}])
    counter = CallCounter()
    with client.beta.threads.runs.stream(thread_id=thread.id, assistant_id=assistant_id, event_handler=counter,
                                         **run_args) as stream:
        stream.until_done()
        step = final_tool_step(stream)
        run = stream.get_final_run()
    return counter, step, run


def stored_step(client: openai.OpenAI, step: RunStep, **kwargs: Any) -> RunStep:
    return client.beta.threads.runs.steps.retrieve(step.id, thread_id=step.thread_id, run_id=step.run_id, **kwargs)


def logs(tool_call: Any) -> list[str]:
    return [o.logs for o in tool_call.code_interpreter.outputs or [] if o.type == "logs"]


@pytest.mark.slow
def test_parallel_code_interpreter_calls_are_each_created_and_done_once(client: openai.OpenAI, marker: str) -> None:
    assistant = client.beta.assistants.create(model="gpt-4o", tools=[{"type": "code_interpreter"}])
    counter, step, run = stream_run(client, assistant.id, f"{marker} {call('code_interpreter', {'code': SLOW_CODE})}"
                                    f" {call('code_interpreter', {'code': FAST_CODE})}")
    assert run.status == "completed", run.last_error
    stored = stored_step(client, step)
    done = counter.check(stored)
    assert stored.step_details.type == step.step_details.type == "tool_calls"
    first, second = stored.step_details.tool_calls
    assert [logs(first), logs(second)] == [["first, slow\n"], ["second, fast\n"]]
    for kept, code in ((first, SLOW_CODE), (second, FAST_CODE)):
        assert kept.type == "code_interpreter"
        finished = done[kept.id]
        assert finished.type == "code_interpreter"
        assert (finished.code_interpreter.input, logs(finished)) == (code, logs(kept))  # done: the whole call
        inputs = [d.code_interpreter.input or "" for d in counter.deltas[kept.id] if d.code_interpreter]
        outputs = [o.logs for d in counter.deltas[kept.id] if d.code_interpreter
                   for o in d.code_interpreter.outputs or [] if o.type == "logs"]
        assert ("".join(inputs), outputs) == (code, logs(kept))  # each call's own deltas, none of the other's
    streamed = step.step_details.tool_calls  # the snapshot: every call once, whole
    assert [(c.id, c.code_interpreter.input, logs(c)) for c in streamed if c.type == "code_interpreter"] == [
        (c.id, c.code_interpreter.input, logs(c)) for c in (first, second) if c.type == "code_interpreter"]


@pytest.mark.slow
def test_parallel_file_search_calls_are_each_created_and_done_once(client: openai.OpenAI, marker: str) -> None:
    store = client.vector_stores.create(name="fruit")
    client.vector_stores.files.upload_and_poll(vector_store_id=store.id, file=(
        "fruit.txt", f"Kiwis are green inside. Bananas are yellow outside. {marker}".encode(), "text/plain"))
    assistant = client.beta.assistants.create(model="gpt-4o", tools=[{"type": "file_search"}],
                                              tool_resources={"file_search": {"vector_store_ids": [store.id]}})
    counter, step, run = stream_run(client, assistant.id, f"{marker} {call('file_search', {'query': 'kiwi'})}"
                                    f" {call('file_search', {'query': 'banana'})}")
    assert run.status == "completed", run.last_error
    stored = stored_step(client, step)
    done = counter.check(stored)
    assert stored.step_details.type == step.step_details.type == "tool_calls"
    assert len(stored.step_details.tool_calls) == 2
    streamed = {c.id: c for c in step.step_details.tool_calls}
    assert list(streamed) == [c.id for c in stored.step_details.tool_calls]
    for kept in stored.step_details.tool_calls:
        assert kept.type == "file_search" and kept.file_search.results
        finished = done[kept.id]
        assert finished.type == "file_search"
        assert finished.file_search.model_dump() == kept.file_search.model_dump()  # done: with its results
        assert streamed[kept.id].file_search.model_dump() == kept.file_search.model_dump()


@pytest.mark.slow
def test_parallel_function_calls_are_each_created_and_done_once(client: openai.OpenAI, marker: str) -> None:
    assistant = client.beta.assistants.create(model="gpt-4o", tools=[WEATHER])
    cities = [{"city": "Paris, with a long enough name to stream in pieces"}, {"city": "Oslo"}]
    counter, step, run = stream_run(client, assistant.id,
                                    f"{marker} {call('get_weather', cities[0])} {call('get_weather', cities[1])}")
    assert run.status == "requires_action" and run.required_action is not None
    required = run.required_action.submit_tool_outputs.tool_calls
    stored = stored_step(client, step)
    done = counter.check(stored)
    assert [c.id for c in stored.step_details.tool_calls] == [c.id for c in required]  # type: ignore[union-attr]
    for kept, city in zip(required, cities, strict=True):
        finished = done[kept.id]
        assert finished.type == "function" and json.loads(finished.function.arguments) == city
        arguments = "".join(d.function.arguments or "" for d in counter.deltas[kept.id] if d.function)
        assert json.loads(arguments) == city
    assert step.step_details.type == "tool_calls"
    assert [(c.id, json.loads(c.function.arguments)) for c in step.step_details.tool_calls if c.type == "function"
            ] == list(zip([c.id for c in required], cities, strict=True))
    client.beta.threads.runs.cancel(run.id, thread_id=run.thread_id)


@pytest.mark.slow
@pytest.mark.parametrize("first", ["code_interpreter", "file_search"])
def test_a_server_call_before_a_function_call_is_created_and_done_once(client: openai.OpenAI, marker: str,
                                                                      first: str) -> None:
    """A code_interpreter or file_search call ahead of a function call in one step: its outputs came after the
    function call's deltas, and the SDK created and finished it again."""
    tools: list[Any] = [{"type": first}, WEATHER]
    resources: Any = {}
    if first == "file_search":
        store = client.vector_stores.create(name="kiwis")
        client.vector_stores.files.upload_and_poll(vector_store_id=store.id, file=(
            "kiwi.txt", f"Kiwis are green inside. {marker}".encode(), "text/plain"))
        resources = {"file_search": {"vector_store_ids": [store.id]}}
    assistant = client.beta.assistants.create(model="gpt-4o", tools=tools, tool_resources=resources)
    server = {"code": FAST_CODE} if first == "code_interpreter" else {"query": "kiwi"}
    counter, step, run = stream_run(client, assistant.id,
                                    f"{marker} {call(first, server)} {call('get_weather', {'city': 'Bern'})}")
    assert run.status == "requires_action" and run.required_action is not None
    stored = stored_step(client, step)
    done = counter.check(stored)
    assert stored.step_details.type == step.step_details.type == "tool_calls"
    made, function = stored.step_details.tool_calls
    assert made.type == first and function.type == "function"
    assert [c.id for c in run.required_action.submit_tool_outputs.tool_calls] == [function.id]
    finished = done[made.id]
    if made.type == "code_interpreter" and finished.type == "code_interpreter":
        assert (finished.code_interpreter.input, logs(finished)) == (FAST_CODE, ["second, fast\n"])
    elif made.type == "file_search" and finished.type == "file_search":
        assert made.file_search.results and finished.file_search.model_dump() == made.file_search.model_dump()
    else:
        pytest.fail(f"{finished.type} done for a {made.type} call")
    answered = done[function.id]
    assert answered.type == "function" and json.loads(answered.function.arguments) == {"city": "Bern"}
    assert [c.id for c in step.step_details.tool_calls] == [made.id, function.id]
    with client.beta.threads.runs.submit_tool_outputs_stream(
            thread_id=run.thread_id, run_id=run.id, tool_outputs=[{"tool_call_id": function.id, "output": "sunny"}],
    ) as resumed:
        resumed.until_done()
    assert resumed.get_final_run().status == "completed"


@pytest.mark.slow
def test_a_step_cancelled_while_its_first_call_runs_announces_the_calls_it_held_back(client: openai.OpenAI,
                                                                                   marker: str) -> None:
    """The second call's deltas wait for the first call's outputs; the run is cancelled before they come: the
    step's last deltas announce the second call (its code, no outputs) before `thread.run.step.cancelled`."""
    assistant = client.beta.assistants.create(model="gpt-4o", tools=[{"type": "code_interpreter"}])
    long_code = "import time\ntime.sleep(20)\nprint('never')"
    thread = client.beta.threads.create(messages=[{"role": "user", "content": (
        f"{marker} {call('code_interpreter', {'code': long_code})} {call('code_interpreter', {'code': FAST_CODE})}")}])
    counter = CallCounter()
    timer: list[threading.Timer] = []
    with client.beta.threads.runs.stream(thread_id=thread.id, assistant_id=assistant.id,
                                         event_handler=counter) as stream:
        for event in stream:
            if event.event == "thread.run.step.delta" and not timer and stream.current_run is not None:
                timer.append(threading.Timer(2.0, client.beta.threads.runs.cancel, args=(stream.current_run.id,),
                                             kwargs={"thread_id": thread.id}))  # the model is done writing by then
                timer[0].start()
        step = final_tool_step(stream)
        run = stream.get_final_run()
    assert run.status == "cancelled"
    stored = stored_step(client, step)
    assert stored.status == "cancelled"
    done = counter.check(stored)
    assert stored.step_details.type == step.step_details.type == "tool_calls"
    assert [(c.id, c.code_interpreter.input) for c in step.step_details.tool_calls if c.type == "code_interpreter"
            ] == [(c.id, code) for c, code in zip(stored.step_details.tool_calls, (long_code, FAST_CODE), strict=True)]
    first = done[stored.step_details.tool_calls[0].id]
    assert first.type == "code_interpreter" and first.code_interpreter.input == long_code

# --- the order of a step's deltas, without a stack -----------------------------------------------------------


def code_step(*codes: str) -> dict[str, Any]:
    return {"id": "step_unit", "step_details": {"type": "tool_calls", "tool_calls": [
        {"id": f"call_{i}", "type": "code_interpreter", "code_interpreter": {"input": code, "outputs": []}}
        for i, code in enumerate(codes)]}}


def shown(deltas: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """(index, what) of each delta: `id` (its announcement), `input` or `outputs`."""
    out = []
    for delta in deltas:
        [made] = delta["delta"]["step_details"]["tool_calls"]
        out.append((made["index"], "id" if "id" in made else next(iter(made["code_interpreter"]))))
    return out


@pytest.mark.unit
def test_a_server_call_holds_back_the_calls_after_it_until_its_result_is_sent() -> None:
    step = code_step("print(1)", "print(2)", "print(3)")
    sent: dict[str, int] = {}
    results: list[str] = []
    assert shown(call_deltas(step, sent, results, ())) == [(0, "id"), (0, "input")]  # as the model wrote them
    calls = step["step_details"]["tool_calls"]
    calls[2]["code_interpreter"]["outputs"] = [{"type": "logs", "logs": "3"}]
    assert call_deltas(step, sent, results, {"call_2"}) == []  # the last one answered first: it waits
    calls[0]["code_interpreter"]["outputs"] = [{"type": "logs", "logs": "1"}]
    assert shown(call_deltas(step, sent, results, {"call_0", "call_2"})) == [
        (0, "outputs"), (1, "id"), (1, "input")]
    calls[1]["code_interpreter"]["outputs"] = [{"type": "logs", "logs": "2"}]
    after = call_deltas(step, sent, results, {"call_0", "call_1", "call_2"})
    assert shown(after) == [(1, "outputs"), (2, "id"), (2, "input"), (2, "outputs")]
    assert after[-1]["delta"]["step_details"]["tool_calls"][0]["code_interpreter"] == {
        "outputs": [{"index": 0, "type": "logs", "logs": "3"}]}
    assert results == ["call_0", "call_1", "call_2"]
    assert call_deltas(step, sent, results, {"call_0", "call_1", "call_2"}) == []  # nothing twice


@pytest.mark.unit
def test_function_calls_hold_nothing_back_and_an_ending_step_announces_every_call() -> None:
    step = code_step("print(1)", "print(2)")
    step["step_details"]["tool_calls"].insert(0, {"id": "call_f", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Bern"}', "output": None}})
    sent: dict[str, int] = {}
    results: list[str] = []
    deltas = call_deltas(step, sent, results, ())
    assert [d["delta"]["step_details"]["tool_calls"][0]["index"] for d in deltas] == [0, 0, 1, 1]
    # the run is cancelled while call_0 runs: the step ends with every call announced, and no result made up
    closing = call_deltas(step, sent, results, (), ending=True)
    assert shown(closing) == [(2, "id"), (2, "input")] and results == []


@pytest.mark.unit
def test_a_step_whose_bookkeeping_does_not_say_is_taken_as_streamed_whole() -> None:
    """A step recorded before its bookkeeping kept what was streamed (every call was announced at once)."""
    step = code_step("print(1)", "print(2)")
    state = {"calls": [{"id": "call_0", "server": True, "done": True}, {"id": "call_1", "server": True,
                                                                        "done": False}]}
    sent, results = streamed(step, state)
    assert (sent, results) == ({"call_0": 8, "call_1": 8}, ["call_0"])
    state["calls"][1]["done"] = True
    step["step_details"]["tool_calls"][1]["code_interpreter"]["outputs"] = [{"type": "logs", "logs": "2"}]
    assert shown(call_deltas(step, sent, results, done_calls(state))) == [(1, "outputs")]
