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
from openai.types.beta.threads.runs import ToolCall, ToolCallDelta

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
    """The docs' weather assistant, streamed: each call's arguments reach `on_tool_call_delta` (they came only
    inside step.created, so a handler adding up the deltas got '' and json.loads failed), and the SDK's
    snapshots hold them once, not twice."""
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
