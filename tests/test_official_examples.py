"""Code OpenAI published for the Assistants API (openai-python's examples and helpers.md, the cookbook, the
platform docs' snippets), run through the official SDK against the real stack, where it found a difference.

The scripted model asks for tool calls with ``[[call:NAME:JSON]]`` in the last user message and answers
``Tool results: ...`` once their outputs follow.
"""

import json
from typing import Any

import openai
import pytest
from openai import AssistantEventHandler
from openai.types.beta import FunctionToolParam
from openai.types.beta.threads import Text, TextDelta
from openai.types.beta.threads.runs import ToolCall, ToolCallDelta
from run_helpers import assistant_reply

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TEMPERATURE: FunctionToolParam = {"type": "function", "function": {
    "name": "get_current_temperature", "description": "Get the current temperature for a specific location",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["Celsius", "Fahrenheit"]}},
                   "required": ["location", "unit"]}}}
RAIN: FunctionToolParam = {"type": "function", "function": {
    "name": "get_rain_probability", "description": "Get the probability of rain for a specific location",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}}


class ArgumentCollector(AssistantEventHandler):
    """Builds each function call's arguments from its deltas, as handlers written for the hosted stream do."""

    def __init__(self) -> None:
        super().__init__()
        self.created: list[tuple[str, str]] = []
        self.arguments: dict[int, str] = {}
        self.done: list[tuple[str, str]] = []

    def on_tool_call_created(self, tool_call: ToolCall) -> None:
        assert tool_call.type == "function"
        self.created.append((tool_call.function.name, tool_call.function.arguments))

    def on_tool_call_delta(self, delta: ToolCallDelta, snapshot: ToolCall) -> None:
        if delta.type == "function" and delta.function and delta.function.arguments:
            self.arguments[delta.index] = self.arguments.get(delta.index, "") + delta.function.arguments

    def on_tool_call_done(self, tool_call: ToolCall) -> None:
        assert tool_call.type == "function"
        self.done.append((tool_call.function.name, tool_call.function.arguments))


def test_function_call_arguments_stream_as_tool_call_deltas(client: openai.OpenAI) -> None:
    """The docs' weather bot, streamed: handlers adding up argument deltas got '' (only step.created had them)."""
    assistant = client.beta.assistants.create(
        model="gpt-4o", instructions="You are a weather bot. Use the provided functions to answer questions.",
        tools=[TEMPERATURE, RAIN])
    temperature = {"location": "San Francisco, CA", "unit": "Fahrenheit"}
    rain = {"location": "San Francisco, CA"}
    thread = client.beta.threads.create(messages=[{"role": "user", "content": (
        "What's the weather in San Francisco today and the likelihood it'll rain? "
        f"[[call:get_current_temperature:{json.dumps(temperature)}]] "
        f"[[call:get_rain_probability:{json.dumps(rain)}]]")}])
    handler = ArgumentCollector()
    with client.beta.threads.runs.stream(thread_id=thread.id, assistant_id=assistant.id,
                                         event_handler=handler) as stream:
        stream.until_done()
        run = stream.get_final_run()
        (step,) = stream.get_final_run_steps()
    assert run.status == "requires_action" and run.required_action is not None
    required = run.required_action.submit_tool_outputs.tool_calls
    assert [json.loads(c.function.arguments) for c in required] == [temperature, rain]
    assert [json.loads(handler.arguments[i]) for i in (0, 1)] == [temperature, rain]
    assert [name for name, _ in handler.created] == ["get_current_temperature", "get_rain_probability"]
    assert [(name, json.loads(arguments)) for name, arguments in handler.done[:2]] == [
        ("get_current_temperature", temperature), ("get_rain_probability", rain)]
    assert step.step_details.type == "tool_calls"
    snapshots: list[Any] = step.step_details.tool_calls
    assert [json.loads(c.function.arguments) for c in snapshots] == [temperature, rain]

    stored = client.beta.threads.runs.steps.list(thread_id=thread.id, run_id=run.id).data[0]
    assert stored.step_details.type == "tool_calls"  # the stored step always had the arguments
    assert [json.loads(c.function.arguments) for c in stored.step_details.tool_calls  # type: ignore[union-attr]
            ] == [temperature, rain]
    outputs = [{"tool_call_id": c.id, "output": o} for c, o in zip(required, ("57", "0.06"), strict=True)]
    with client.beta.threads.runs.submit_tool_outputs_stream(thread_id=thread.id, run_id=run.id,
                                                             tool_outputs=outputs) as stream:
        assert "".join(stream.text_deltas) == "Tool results: 57 | 0.06"


class CitationCollector(AssistantEventHandler):
    """Renders citations live from the text deltas, as handlers written for the hosted stream do."""

    def __init__(self) -> None:
        super().__init__()
        self.created: list[Any] = []
        self.snapshots: list[Any] = []
        self.cited: list[tuple[str, str]] = []
        self.live = ""

    def on_text_created(self, text: Text) -> None:
        self.created.append(text.annotations)

    def on_text_delta(self, delta: TextDelta, snapshot: Text) -> None:
        self.snapshots.append(snapshot.annotations)
        value = delta.value or ""
        for annotation in delta.annotations or []:
            assert annotation.type == "file_citation" and annotation.file_citation is not None
            assert annotation.text and annotation.text in value  # the marker streams whole, with its annotation
            value = value.replace(annotation.text, f"[{annotation.index}]")
            self.cited.append((annotation.text, annotation.file_citation.file_id or ""))
        self.live += value


def test_file_citations_stream_with_their_markers(client: openai.OpenAI) -> None:
    """Citations came only with message.completed: live rendering showed raw markers, snapshots None."""
    store = client.vector_stores.create(name="Financial Statements")
    report = client.vector_stores.files.upload_and_poll(
        vector_store_id=store.id, file=("brka-10k.txt", b"Berkshire owns the BNSF railroad and GEICO insurance.\n"))
    assert report.status == "completed", report.last_error
    assistant = client.beta.assistants.create(
        model="gpt-4o", instructions="You are an expert financial analyst. Use you knowledge base to answer questions.",
        tools=[{"type": "file_search"}], tool_resources={"file_search": {"vector_store_ids": [store.id]}})
    thread = client.beta.threads.create(messages=[{"role": "user", "content": (
        'Which railroad does Berkshire own? [[call:file_search:{"query": "Berkshire railroad"}]]')}])
    handler = CitationCollector()
    with client.beta.threads.runs.stream(thread_id=thread.id, assistant_id=assistant.id,
                                         event_handler=handler) as stream:
        stream.until_done()
        [message] = stream.get_final_messages()
    assert stream.get_final_run().status == "completed"
    assert handler.created == [[]] and all(isinstance(s, list) for s in handler.snapshots)
    assert message.content[0].type == "text"
    final = message.content[0].text
    assert final.annotations and {a.type for a in final.annotations} == {"file_citation"}
    assert handler.cited == [(a.text, a.file_citation.file_id) for a in final.annotations  # type: ignore[union-attr]
                             ]
    assert "【" not in handler.live and "[0]" in handler.live
    assert {a.file_citation.file_id for a in final.annotations} == {report.id}  # type: ignore[union-attr]


def test_the_docs_weather_bot_on_the_offline_model_asks_both_functions(client: openai.OpenAI) -> None:
    """The docs' streaming weather bot as written (outputs submitted with submit_tool_outputs_stream from on_event)
    on make run's offline model (`[[mode:offline]]` here): only the temperature was asked for, never the rain."""
    assistant = client.beta.assistants.create(
        model="gpt-4o", instructions="You are a weather bot. Use the provided functions to answer questions.",
        tools=[TEMPERATURE, RAIN])
    thread = client.beta.threads.create()
    client.beta.threads.messages.create(thread_id=thread.id, role="user", content=(
        "What's the weather in San Francisco today and the likelihood it'll rain? [[mode:offline]]"))
    asked: list[str] = []
    answer: list[str] = []

    class EventHandler(AssistantEventHandler):
        def on_event(self, event: Any) -> None:
            if event.event == "thread.run.requires_action":
                self.handle_requires_action(event.data)

        def handle_requires_action(self, data: Any) -> None:
            tool_outputs = []
            for tool in data.required_action.submit_tool_outputs.tool_calls:
                asked.append(tool.function.name)
                if tool.function.name == "get_current_temperature":
                    tool_outputs.append({"tool_call_id": tool.id, "output": "57"})
                elif tool.function.name == "get_rain_probability":
                    tool_outputs.append({"tool_call_id": tool.id, "output": "0.06"})
            assert self.current_run is not None
            with client.beta.threads.runs.submit_tool_outputs_stream(
                    thread_id=self.current_run.thread_id, run_id=self.current_run.id, tool_outputs=tool_outputs,
                    event_handler=EventHandler()) as stream:
                answer.extend(stream.text_deltas)

    with client.beta.threads.runs.stream(thread_id=thread.id, assistant_id=assistant.id,
                                         event_handler=EventHandler()) as stream:
        stream.until_done()
    assert asked == ["get_current_temperature", "get_rain_probability"]
    assert "".join(answer) == "Tool results: 57 | 0.06"
    assert client.beta.threads.runs.list(thread_id=thread.id).data[0].status == "completed"


def test_structured_outputs_on_the_offline_model_are_json(client: openai.OpenAI) -> None:
    """The docs' Structured Outputs math tutor (a strict json_schema `response_format`) on make run's offline model
    (`[[mode:offline]]` here): the answer was `Echo: ...`, which the docs' json.loads refused."""
    schema = {"type": "object", "properties": {
        "steps": {"type": "array", "items": {"type": "object", "properties": {
            "explanation": {"type": "string"}, "output": {"type": "string"}},
            "required": ["explanation", "output"], "additionalProperties": False}},
        "final_answer": {"type": "string"}}, "required": ["steps", "final_answer"], "additionalProperties": False}
    assistant = client.beta.assistants.create(
        name="Math Tutor", model="gpt-4o-2024-08-06",
        instructions="You are a helpful math tutor. Guide the user through the solution step by step.",
        response_format={"type": "json_schema",
                         "json_schema": {"name": "math_response", "strict": True, "schema": schema}})
    parsed = json.loads(assistant_reply(client, assistant.id, "how can I solve 8x + 7 = -23 [[mode:offline]]"))
    assert parsed == {"steps": [], "final_answer": "Echo: how can I solve 8x + 7 = -23"}
