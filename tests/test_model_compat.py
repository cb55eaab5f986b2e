"""Runs against the OpenAI-compatible servers the README names (vLLM, Ollama, llama.cpp, LM Studio), where they
differ from OpenAI in ways their documentation or their issue trackers record; the scripted model server emulates
each (`[[quirk:NAME]]`), and every test goes through the official SDK against the real stack."""

import json

import openai
import pytest

from threadline_devstack.model_server import ScriptedModelServer

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
             "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}}}]


@pytest.mark.parametrize("quirk", ["tool_index_0", "no_tool_index"])
def test_parallel_tool_calls_streamed_at_one_index_stay_apart(client: openai.OpenAI, marker: str,
                                                              quirk: str) -> None:
    """Ollama streams each of parallel tool calls whole, every one at `index` 0 with its own id (ollama/ollama#15457,
    vercel/ai#14277); other servers send no `index` (openai/openai-python#2806). Folded by index, the calls became
    one call named `get_weatherget_time` with arguments `{...}{...}`."""
    assistant = client.beta.assistants.create(model="gpt-4o", tools=TOOLS)  # type: ignore[arg-type]
    thread = client.beta.threads.create(messages=[{"role": "user", "content": (
        f'[[call:get_weather:{{"city": "Oslo"}}]] [[call:get_time:{{"tz": "CET"}}]] [[quirk:{quirk}]] {marker}')}])
    run = client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id,
                                                   poll_interval_ms=50)
    assert run.status == "requires_action" and run.required_action is not None
    calls = run.required_action.submit_tool_outputs.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Oslo"}), ("get_time", {"tz": "CET"})]
    assert calls[0].id != calls[1].id
    run = client.beta.threads.runs.submit_tool_outputs_and_poll(
        run_id=run.id, thread_id=thread.id, poll_interval_ms=50,
        tool_outputs=[{"tool_call_id": calls[0].id, "output": "-3C"}, {"tool_call_id": calls[1].id, "output": "noon"}])
    assert run.status == "completed", run.last_error
