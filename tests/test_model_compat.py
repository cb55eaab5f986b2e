"""Runs against the OpenAI-compatible servers the README names (vLLM, Ollama, llama.cpp, LM Studio), where they
differ from OpenAI in ways their documentation or their issue trackers record; the scripted model server emulates
each (`[[quirk:NAME]]`), and every test goes through the official SDK against the real stack."""

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import openai
import pytest
from openai.types.beta.threads import Run
from run_helpers import poll

from threadline_devstack.model_server import ScriptedModelServer, content_text

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def run_of(client: openai.OpenAI, assistant_id: str, ask: str | list[dict[str, Any]], **options: Any) -> Run:
    """A run, polled to its end or pause, on a new thread whose one user message is `ask` (text, or content parts)."""
    thread = client.beta.threads.create(messages=[{"role": "user", "content": ask}])
    return client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant_id, poll_interval_ms=50,
                                                    **options)


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
    run = run_of(client, assistant.id, (
        f'[[call:get_weather:{{"city": "Oslo"}}]] [[call:get_time:{{"tz": "CET"}}]] [[quirk:{quirk}]] {marker}'))
    assert run.status == "requires_action" and run.required_action is not None
    calls = run.required_action.submit_tool_outputs.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Oslo"}), ("get_time", {"tz": "CET"})]
    assert calls[0].id != calls[1].id
    run = client.beta.threads.runs.submit_tool_outputs_and_poll(
        run_id=run.id, thread_id=run.thread_id, poll_interval_ms=50,
        tool_outputs=[{"tool_call_id": calls[0].id, "output": "-3C"}, {"tool_call_id": calls[1].id, "output": "noon"}])
    assert run.status == "completed", run.last_error


def test_a_model_that_ignores_max_completion_tokens_gets_max_tokens(client: openai.OpenAI, model: ScriptedModelServer,
                                                                    marker: str) -> None:
    """Ollama's /v1 takes `max_tokens` and silently ignores `max_completion_tokens` (its compatibility page lists only
    the former; ollama/ollama#7125: 10 asked, 422 written, finish_reason stop), so a run's max_completion_tokens
    bounded nothing and the run completed. Written past, the run ends incomplete as a cut one would, and that model
    gets `max_tokens` from then on (OpenAI refuses both at once, and `max_tokens` on reasoning models)."""
    assistant = client.beta.assistants.create(model=f"llama3-{marker}")
    ask = f"[[tokens:300]] [[ignore:max_completion_tokens]] {marker}"
    run = run_of(client, assistant.id, ask, max_completion_tokens=256)
    assert run.status == "incomplete", run.last_error
    assert run.incomplete_details is not None and run.incomplete_details.reason == "max_completion_tokens"
    assert run.usage is not None and run.usage.completion_tokens == 300
    [answer] = client.beta.threads.messages.list(thread_id=run.thread_id, run_id=run.id).data
    assert answer.status == "incomplete"
    [sent] = model.find_requests(marker)
    assert sent["max_completion_tokens"] == 256 and "max_tokens" not in sent

    run = run_of(client, assistant.id, f"{ask} next", max_completion_tokens=256)
    assert run.status == "incomplete" and run.usage is not None and run.usage.completion_tokens == 256
    [answer] = client.beta.threads.messages.list(thread_id=run.thread_id, run_id=run.id).data
    assert answer.content[0].type == "text"
    assert answer.content[0].text.value.split() == [f"word{i}" for i in range(1, 257)]
    [sent] = model.find_requests(f"{marker} next")
    assert sent["max_tokens"] == 256 and "max_completion_tokens" not in sent


def test_json_mode_on_a_server_that_takes_only_json_schema(client: openai.OpenAI, model: ScriptedModelServer,
                                                           marker: str) -> None:
    """LM Studio answers `response_format` `{"type": "json_object"}` with 400 "'response_format.type' must be
    'json_schema' or 'text'" (lmstudio-ai/lmstudio-bug-tracker#189), so every run of a JSON-mode assistant failed.
    JSON mode is asked again as Structured Outputs with the schema of any object, and from then on for that model."""
    assistant = client.beta.assistants.create(model=f"lmstudio-{marker}", response_format={"type": "json_object"})
    ask = f'[[reply:{{"a": 1}}]] [[quirk:no_json_object]] {marker}'
    run = run_of(client, assistant.id, ask)
    assert run.status == "completed", run.last_error
    [answer] = client.beta.threads.messages.list(thread_id=run.thread_id, run_id=run.id).data
    assert answer.content[0].type == "text" and json.loads(answer.content[0].text.value) == {"a": 1}
    sent = model.find_requests(marker)
    assert [r["response_format"]["type"] for r in sent] == ["json_object", "json_schema"]
    assert sent[1]["response_format"]["json_schema"]["schema"] == {"type": "object"}

    run = run_of(client, assistant.id, f"{ask} next")
    assert run.status == "completed", run.last_error
    assert [r["response_format"]["type"] for r in model.find_requests(f"{marker} next")] == ["json_schema"]


def test_a_failure_streamed_in_an_error_field_fails_the_run(client: openai.OpenAI, marker: str) -> None:
    """llama.cpp's server streams a failure after its 200 as an SSE `error` field (`error: {"code": ..., "message":
    ...}`, its server_sent_event(sink, "error", ...)), not as `data`: the stream read as empty, and the run completed
    with an empty message. It is the model's failure (retried as any failure before output, then the run's error)."""
    assistant = client.beta.assistants.create(model="gpt-4o")
    run = run_of(client, assistant.id, f"[[quirk:error_field]] {marker}")
    assert run.status == "failed" and run.last_error is not None and run.last_error.code == "server_error"
    assert "scripted error event" in run.last_error.message


def test_a_server_that_streams_no_usage_gets_estimated_usage(client: openai.OpenAI, marker: str) -> None:
    """LM Studio streamed no usage, whatever stream_options asked (lmstudio-ai/lmstudio-bug-tracker#676, #713): runs
    reported 0 tokens, and a run's max_prompt_tokens and max_completion_tokens were never spent over its turns. Such a
    turn's usage is estimated as prompts are (about four bytes of text a token)."""
    assistant = client.beta.assistants.create(model="gpt-4o")
    run = run_of(client, assistant.id, f"[[reply:abcdefgh]] [[quirk:no_usage]] {marker}")
    assert run.status == "completed", run.last_error
    assert run.usage is not None and run.usage.completion_tokens == 2 and run.usage.prompt_tokens > 4
    assert run.usage.total_tokens == run.usage.prompt_tokens + 2
    [step] = client.beta.threads.runs.steps.list(thread_id=run.thread_id, run_id=run.id).data
    assert step.usage is not None and step.usage.completion_tokens == 2


def test_a_server_that_ignores_a_named_tool_choice_cannot_call_other_tools(client: openai.OpenAI,
                                                                           marker: str) -> None:
    """Ollama's /v1 takes no `tool_choice` (its compatibility page leaves it unchecked): told to call get_time, the
    model could call get_weather too, and the run asked the user for both. Only calls to the named tool are kept."""
    assistant = client.beta.assistants.create(model="gpt-4o", tools=TOOLS)  # type: ignore[arg-type]
    run = run_of(client, assistant.id, (
        f'[[call:get_weather:{{"city": "Oslo"}}]] [[call:get_time:{{"tz": "CET"}}]] [[ignore:tool_choice]] {marker}'),
                 tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert run.status == "requires_action" and run.required_action is not None
    assert [c.function.name for c in run.required_action.submit_tool_outputs.tool_calls] == ["get_time"]
    [step] = client.beta.threads.runs.steps.list(thread_id=run.thread_id, run_id=run.id).data
    assert step.step_details.type == "tool_calls"
    assert [c.type == "function" and c.function.name for c in step.step_details.tool_calls] == ["get_time"]


def test_a_server_that_cannot_stream_tools_is_asked_for_whole_answers(client: openai.OpenAI,
                                                                      model: ScriptedModelServer, marker: str) -> None:
    """llama.cpp's server, before it streamed tool calls, refused every streamed request with tools ("Cannot use
    tools with stream", its oaicompat_completion_params_parse): every run with a tool (file_search and
    code_interpreter are tools too) failed. Such a model is asked without `stream` from then on, its whole
    `chat.completion` read as one chunk."""
    assistant = client.beta.assistants.create(model=f"llamacpp-{marker}", tools=TOOLS)  # type: ignore[arg-type]
    run = run_of(client, assistant.id, (
        f'[[call:get_weather:{{"city": "Oslo"}}]] [[quirk:no_stream_tools]] {marker}'))
    assert run.status == "requires_action" and run.required_action is not None
    [call] = run.required_action.submit_tool_outputs.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Oslo"})
    run = client.beta.threads.runs.submit_tool_outputs_and_poll(
        run_id=run.id, thread_id=run.thread_id, poll_interval_ms=50,
        tool_outputs=[{"tool_call_id": call.id, "output": "-3C"}])
    assert run.status == "completed", run.last_error
    assert run.usage is not None and run.usage.completion_tokens > 0
    [answer, _] = client.beta.threads.messages.list(thread_id=run.thread_id).data
    assert answer.content[0].type == "text" and answer.content[0].text.value == "Tool results: -3C"
    assert [r.get("stream") for r in model.find_requests(marker)] == [True, None, None]


def test_a_server_that_refuses_max_completion_tokens_gets_max_tokens(client: openai.OpenAI,
                                                                     model: ScriptedModelServer, marker: str) -> None:
    """vLLM before it took `max_completion_tokens` refused every field it did not know with 400 and its validation
    error ("[{'type': 'extra_forbidden', 'loc': ('body', 'max_completion_tokens'), 'msg': 'Extra inputs are not
    permitted', ...}]"): every run with max_completion_tokens failed with invalid_prompt. It is asked again with
    `max_tokens`, and that model is sent `max_tokens` from then on."""
    assistant = client.beta.assistants.create(model=f"old-vllm-{marker}")
    ask = f"[[tokens:300]] [[forbid:max_completion_tokens]] {marker}"
    run = run_of(client, assistant.id, ask, max_completion_tokens=256)
    assert run.status == "incomplete", run.last_error
    assert run.usage is not None and run.usage.completion_tokens == 256
    sent = model.find_requests(marker)
    assert [(r.get("max_completion_tokens"), r.get("max_tokens")) for r in sent] == [(256, None), (None, 256)]
    run = run_of(client, assistant.id, f"{ask} next", max_completion_tokens=256)
    assert run.status == "incomplete", run.last_error
    assert [r.get("max_tokens") for r in model.find_requests(f"{marker} next")] == [256]


def test_a_server_that_refuses_required_tool_choice_gets_auto(client: openai.OpenAI, model: ScriptedModelServer,
                                                              marker: str) -> None:
    """vLLM before 0.8.3 refused `tool_choice` "required" (400 "tool_choice must either be a named tool, 'auto', or
    'none'", vllm-project/vllm#11700): every run with it failed. The call is made again with "auto" (the model may then
    answer without a call), and that model is sent "auto" for "required" from then on."""
    assistant = client.beta.assistants.create(model=f"vllm-0.7-{marker}", tools=TOOLS)  # type: ignore[arg-type]
    ask = f'[[call:get_time:{{"tz": "CET"}}]] [[quirk:no_required]] {marker}'
    run = run_of(client, assistant.id, ask, tool_choice="required")
    assert run.status == "requires_action", run.last_error
    assert run.tool_choice == "required"  # the run keeps what was asked
    assert [r["tool_choice"] for r in model.find_requests(marker)] == ["required", "auto"]
    run = run_of(client, assistant.id, f"{ask} next", tool_choice="required")
    assert run.status == "requires_action", run.last_error
    assert [r["tool_choice"] for r in model.find_requests(f"{marker} next")] == ["auto"]


GET_TIME: Any = {"type": "function", "function": {"name": "get_time"}}
WEATHER_CALL = '[[call:get_weather:{"city": "Oslo"}]]'
TIME_CALL = '[[call:get_time:{"tz": "CET"}]]'


@pytest.mark.parametrize(("choice", "calls", "expected", "told"), [
    ("required", WEATHER_CALL, [("get_weather", {"city": "Oslo"})], "one or more of the tools offered"),
    (GET_TIME, TIME_CALL, [("get_time", {"tz": "CET"})], "the tool named get_time"),
    (GET_TIME, f"{WEATHER_CALL} {TIME_CALL}", [("get_time", {"tz": "CET"})], "the tool named get_time"),
], ids=["required", "named", "named-but-another-called"])
def test_a_forced_tool_call_on_a_server_that_ignores_tool_choice_is_asked_for_again(
        client: openai.OpenAI, model: ScriptedModelServer, marker: str, choice: Any, calls: str,
        expected: list[tuple[str, dict[str, Any]]], told: str) -> None:
    """Ollama's /v1 ignores `tool_choice` (and vLLM before 0.8.3 is sent "auto" for "required"): a small model answered
    in text, the run completed with that message, and code written for the hosted API, which waits for requires_action,
    found no `required_action`. Its text is held, and the model asked once more with a system message saying what is
    required; a call to another tool than the named one is asked again alike."""
    assistant = client.beta.assistants.create(model=f"llama3.2-{marker}", tools=TOOLS)  # type: ignore[arg-type]
    run = run_of(client, assistant.id, f"{calls} [[quirk:no_tool_choice]] {marker}", tool_choice=choice)
    assert run.status == "requires_action" and run.required_action is not None, run.last_error
    made = run.required_action.submit_tool_outputs.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in made] == expected
    first, second = model.find_requests(marker)
    assert first["messages"][-1]["role"] == "user"
    assert second["messages"][:-1] == first["messages"] and second["tool_choice"] == first["tool_choice"]
    assert second["messages"][-1]["role"] == "system" and told in second["messages"][-1]["content"]
    assert client.beta.threads.messages.list(thread_id=run.thread_id, run_id=run.id).data == []  # the text dropped
    [step] = client.beta.threads.runs.steps.list(thread_id=run.thread_id, run_id=run.id).data
    assert step.step_details.type == "tool_calls"
    run = client.beta.threads.runs.submit_tool_outputs_and_poll(
        run_id=run.id, thread_id=run.thread_id, poll_interval_ms=50,
        tool_outputs=[{"tool_call_id": c.id, "output": "done"} for c in made])
    assert run.status == "completed", run.last_error  # called once: the model may answer
    assert len(model.find_requests(marker)) == 3
    assert run.usage is not None
    assert run.usage.prompt_tokens == sum(_scripted_prompt_tokens(r) for r in model.find_requests(marker))


def _scripted_prompt_tokens(request: dict[str, Any]) -> int:
    """The prompt tokens the scripted model counts in a request (words of its messages and tool-call arguments)."""
    return sum(len(content_text(m.get("content")).split())
               + sum(len(str(c["function"]["arguments"]).split()) for c in m.get("tool_calls") or [])
               for m in request["messages"])


def test_a_forced_tool_call_streams_no_message_for_the_text_it_drops(client: openai.OpenAI, marker: str) -> None:
    """A stream of such a run (the hosted streaming pattern: wait for thread.run.requires_action) shows nothing of the
    text the model answered first: no message is created for it, no delta brings it."""
    assistant = client.beta.assistants.create(model=f"llama3.2-{marker}", tools=TOOLS)  # type: ignore[arg-type]
    thread = client.beta.threads.create(messages=[{"role": "user", "content": (
        f"{WEATHER_CALL} [[quirk:no_tool_choice]] [[slow:0.02]] some words first {marker}")}])
    with client.beta.threads.runs.stream(thread_id=thread.id, assistant_id=assistant.id,
                                         tool_choice="required") as stream:
        names = [event.event for event in stream]
    assert names[-1] == "thread.run.requires_action"
    assert [name for name in names if name.startswith("thread.message")] == []
    assert "thread.run.step.created" in names


def test_a_model_that_answers_in_text_even_when_told_to_call_a_tool(client: openai.OpenAI, model: ScriptedModelServer,
                                                                   marker: str) -> None:
    """A model asked again that still answers in text: that answer is the run's message, streamed as it comes (the
    first one never shows), and the run completes; its usage counts both model calls, both spent."""
    assistant = client.beta.assistants.create(model=f"llama3.2-{marker}", tools=TOOLS)  # type: ignore[arg-type]
    thread = client.beta.threads.create(messages=[{"role": "user", "content": (
        f"[[reply:I would rather not call anything]] [[quirk:no_tool_choice]] [[slow:0.02]] {marker}")}])
    with client.beta.threads.runs.stream(thread_id=thread.id, assistant_id=assistant.id,
                                         tool_choice="required") as stream:
        events = list(stream)
        run = stream.get_final_run()
    names = [event.event for event in events]
    deltas = [block.text.value or "" for event in events if event.event == "thread.message.delta"
              for block in event.data.delta.content or [] if block.type == "text" and block.text]
    assert run.status == "completed", run.last_error
    assert names.count("thread.message.created") == 1 and names.count("thread.message.completed") == 1
    assert names.index("thread.message.created") < names.index("thread.message.delta") \
        < names.index("thread.message.completed")
    assert "".join(deltas) == "I would rather not call anything"
    [answer] = client.beta.threads.messages.list(thread_id=thread.id, run_id=run.id).data
    assert answer.content[0].type == "text" and answer.content[0].text.value == "I would rather not call anything"
    requests = model.find_requests(marker)
    assert len(requests) == 2 and requests[1]["messages"][-1]["role"] == "system"
    assert run.usage is not None and run.usage.completion_tokens == 2 * 6
    assert run.usage.prompt_tokens == sum(_scripted_prompt_tokens(r) for r in requests)


def test_a_forced_tool_call_asked_again_and_refused_still_counts_the_first_answer(
        client: openai.OpenAI, model: ScriptedModelServer, marker: str) -> None:
    """A run whose model is asked again for the call it must make, and whose second request fails (here: the reminder
    makes the prompt longer than the context the server allows), fails; the first answer was spent all the same, so
    the failed run's usage counts it (it counted nothing)."""
    assistant = client.beta.assistants.create(model=f"llama3.2-refused-{marker}", tools=TOOLS)  # type: ignore[arg-type]
    ask = f"[[reply:I would rather not call anything]] [[quirk:no_tool_choice]] {marker}"
    context = len(ask.split()) + 5  # room for the question, not for the reminder that follows the first answer
    run = run_of(client, assistant.id, f"{ask} [[context:{context}:vllm]]", tool_choice="required")
    assert run.status == "failed" and run.last_error is not None
    assert f"maximum context length is {context} tokens" in run.last_error.message
    first, *again = model.find_requests(marker)
    assert again and all(r["messages"][-1]["role"] == "system" for r in again)
    assert run.usage is not None
    assert (run.usage.prompt_tokens, run.usage.completion_tokens) == (_scripted_prompt_tokens(first), 6)


def test_code_written_for_openai_model_names_runs_on_a_server_of_other_models(
        client: openai.OpenAI, model: ScriptedModelServer, marker: str) -> None:
    """A server of open models (Ollama, vLLM, llama.cpp) knows none of OpenAI's names, so code written for the hosted
    API failed every run (404 model not found) until each `model=` was edited. THREADLINE_MODEL_ALIASES (the test stack
    maps gpt-4-32k to llama3.1:8b) names what the server serves; the assistant and the run keep the name the code
    gave, as hosted."""
    assistant = client.beta.assistants.create(model="gpt-4-32k")
    run = run_of(client, assistant.id, f"[[reply:hello]] {marker}")
    assert run.status == "completed", run.last_error
    assert run.model == "gpt-4-32k"
    assert client.beta.assistants.retrieve(assistant.id).model == "gpt-4-32k"
    [sent] = model.find_requests(marker)
    assert sent["model"] == "llama3.1:8b"
    [answer] = client.beta.threads.messages.list(thread_id=run.thread_id, run_id=run.id).data
    assert answer.content[0].type == "text" and answer.content[0].text.value == "hello"


def test_a_reasoning_model_that_writes_its_thinking_inline_answers_without_it(
        client: openai.OpenAI, marker: str) -> None:
    """DeepSeek-R1 and Qwen3 on Ollama (fishjar/kiss-translator#219), LM Studio, or vLLM without a reasoning parser
    write their reasoning into the content, `<think>...</think>` first: the message and its streamed deltas held the
    model's thinking, which hosted reasoning models never showed."""
    assistant = client.beta.assistants.create(model="deepseek-r1:8b")
    thread = client.beta.threads.create(messages=[{"role": "user", "content": (
        f'[[reply_json:"<think>\\nThe user says hi.\\n</think>\\n\\nHello! How can I help?"]] {marker}')}])
    with client.beta.threads.runs.stream(thread_id=thread.id, assistant_id=assistant.id) as stream:
        deltas = list(stream.text_deltas)
        run = stream.get_final_run()
    assert run.status == "completed", run.last_error
    assert "".join(deltas) == "Hello! How can I help?"
    [answer] = client.beta.threads.messages.list(thread_id=thread.id, run_id=run.id).data
    assert answer.content[0].type == "text" and answer.content[0].text.value == "Hello! How can I help?"


def test_a_thread_longer_than_the_context_vllm_lists_is_cut_to_fit(client: openai.OpenAI, model: ScriptedModelServer,
                                                                    marker: str) -> None:
    """vLLM lists each model's context length (`max_model_len` in GET /v1/models) and refuses a longer prompt, so
    such a thread's runs failed unless THREADLINE_MODEL_CONTEXT_TOKENS was set by hand. The orchestrator takes it from
    the list (at its start, and whenever it lists models): `auto` truncation cuts the thread's middle to fit, as
    hosted."""
    served, listed = "Qwen/Qwen2.5-0.5B-Instruct", list(model.model_ids)
    model.model_ids, model.model_context = [*listed, served], {served: 400}
    try:
        poll(lambda: served in [m.id for m in client.models.list()], timeout=20,  # the test stack lists every 1 s
             what="the orchestrator to list the model")
        assistant = client.beta.assistants.create(model=served)
        history = [{"role": "user", "content": f"{marker} message {i}: " + "lorem ipsum " * 40} for i in range(8)]
        thread = client.beta.threads.create(messages=history)  # type: ignore[arg-type]
        run = client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id,
                                                       poll_interval_ms=50)
        assert run.status == "completed", run.last_error
        [sent] = model.find_requests(f"{marker} message 7")
        kept = [m["content"].split(":")[0] for m in sent["messages"] if m["role"] == "user"]
        assert kept[0] == f"{marker} message 0" and kept[-1] == f"{marker} message 7" and len(kept) < 8
    finally:
        model.model_ids, model.model_context = listed, {}


def _long_thread(client: openai.OpenAI, marker: str, last: str, filler: str = "lorem ipsum " * 40) -> str:
    """A thread of eight long user messages and a short last one (`last` after the marker): its id."""
    history = [{"role": "user", "content": f"{marker} message {i}: {filler}"} for i in range(8)]
    history.append({"role": "user", "content": f"{marker} last {last}"})
    return client.beta.threads.create(messages=history).id  # type: ignore[arg-type]


@pytest.mark.parametrize("server", ["llamacpp", "vllm", "openai"])
def test_a_thread_longer_than_the_context_a_server_refuses_is_cut_to_what_it_said(
        client: openai.OpenAI, model: ScriptedModelServer, marker: str, server: str) -> None:
    """llama.cpp, vLLM and OpenAI refuse a prompt longer than the model's context (400) and say how long the context
    is. A thread that outgrew it failed every later run unless THREADLINE_MODEL_CONTEXT_TOKENS was set by hand; hosted
    `auto` truncation cut it. The orchestrator learns the context from the refusal (counted as the server counts,
    here in words, not in its own estimate of four bytes a token), cuts the thread's middle and asks again; later runs
    on that model are cut before they are sent."""
    assistant = client.beta.assistants.create(model=f"context-{server}-{marker}")  # learnt per model: its own name
    directive = f"[[context:300:{server}]]"
    thread_id = _long_thread(client, marker, directive)
    run = client.beta.threads.runs.create_and_poll(thread_id=thread_id, assistant_id=assistant.id,
                                                   poll_interval_ms=50)
    assert run.status == "completed", run.last_error
    refused, sent = model.find_requests(f"{marker} last")
    assert len(refused["messages"]) == 9
    kept = [m["content"] for m in sent["messages"] if m["role"] == "user"]
    assert kept[0].startswith(f"{marker} message 0:") and kept[-1] == f"{marker} last {directive}" and len(kept) < 9
    assert sum(len(m["content"].split()) for m in sent["messages"]) <= 300

    again = _long_thread(client, f"{marker}-again", directive)
    run = client.beta.threads.runs.create_and_poll(thread_id=again, assistant_id=assistant.id, poll_interval_ms=50)
    assert run.status == "completed", run.last_error
    [only] = model.find_requests(f"{marker}-again last")
    assert len(only["messages"]) < 9


def test_a_token_limit_larger_than_the_room_the_prompt_leaves_is_cut_to_it(
        client: openai.OpenAI, model: ScriptedModelServer, marker: str) -> None:
    """vLLM refuses a `max_completion_tokens` larger than the context less the prompt ("'max_tokens' or
    'max_completion_tokens' is too large"), a thread too short to cut or not: code that asks for long answers on a
    model with a small window failed every run. The limit is cut to the room the server said is left."""
    assistant = client.beta.assistants.create(model=f"context-limit-{marker}")
    thread = client.beta.threads.create(messages=[{"role": "user", "content": f"{marker} [[context:300:vllm]]"}])
    run = client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id, poll_interval_ms=50,
                                                   max_completion_tokens=1000)
    assert run.status == "completed", run.last_error
    refused, sent = model.find_requests(marker)
    assert refused["max_completion_tokens"] == 1000
    prompt_words = sum(len(str(m["content"]).split()) for m in sent["messages"])
    assert sent["max_completion_tokens"] == 300 - prompt_words


def test_a_context_counted_otherwise_than_the_estimate_is_fitted_at_the_first_retry(
        client: openai.OpenAI, model: ScriptedModelServer, marker: str) -> None:
    """Text of one-letter words holds more of the server's tokens (here words) than the orchestrator's estimate of
    four bytes a token. The context it learns is scaled by how the two counted the refused prompt, so the thread is
    cut to fit at once, not at a second refusal."""
    assistant = client.beta.assistants.create(model=f"context-dense-{marker}")
    thread_id = _long_thread(client, marker, "[[context:300:llamacpp]]", filler="x " * 100)
    run = client.beta.threads.runs.create_and_poll(thread_id=thread_id, assistant_id=assistant.id,
                                                   poll_interval_ms=50)
    assert run.status == "completed", run.last_error
    refused, sent = model.find_requests(f"{marker} last")
    assert len(refused["messages"]) == 9 and len(sent["messages"]) < 9


def test_a_thread_with_last_messages_truncation_is_not_cut_past_it(client: openai.OpenAI,
                                                                   model: ScriptedModelServer, marker: str) -> None:
    """`last_messages` truncation says which messages the model sees: a model that refuses them fails the run with
    the server's words, as before (only `auto` truncation is the platform's to decide)."""
    assistant = client.beta.assistants.create(model=f"context-last-{marker}")
    thread_id = _long_thread(client, marker, "[[context:300:vllm]]")
    run = client.beta.threads.runs.create_and_poll(thread_id=thread_id, assistant_id=assistant.id, poll_interval_ms=50,
                                                   truncation_strategy={"type": "last_messages", "last_messages": 9})
    assert run.status == "failed"
    assert run.last_error is not None and run.last_error.code == "invalid_prompt"
    assert "maximum context length is 300 tokens" in run.last_error.message
    assert len(model.find_requests(f"{marker} last")) == 1


PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(range(200))
JPEG = b"\xff\xd8\xff\xe0" + bytes(range(100))
GIF = b"GIF89a" + bytes(range(50))


class _Images(BaseHTTPRequestHandler):
    """Images on a loopback server, as a user's message may link to them; `hits` counts each path's requests."""

    served: ClassVar[dict[str, tuple[int, str, bytes]]] = {
        "/cat.png": (200, "image/png", PNG),
        "/photo": (200, "application/octet-stream", JPEG),  # no image type given: its bytes tell
        "/anim.gif": (200, "image/gif", GIF),
        "/page.png": (200, "text/html", b"<html>not an image</html>"),
        "/moved.png": (302, "text/plain", b""),
    }
    hits: ClassVar[dict[str, int]] = {}

    def do_GET(self) -> None:
        self.hits[self.path] = self.hits.get(self.path, 0) + 1
        status, kind, body = self.served.get(self.path, (404, "text/plain", b"no such image"))
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        if status == 302:
            self.send_header("Location", "/cat.png")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture(scope="module")
def images() -> Iterator[str]:
    """The base URL of the image server."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _image_urls(request: dict[str, Any]) -> list[tuple[str, str | None]]:
    """URL and detail of each image part the model server received."""
    return [(part["image_url"]["url"], part["image_url"].get("detail")) for message in request["messages"]
            if isinstance(message["content"], list) for part in message["content"] if part["type"] == "image_url"]


def _data_url(kind: str, content: bytes) -> str:
    return f"data:{kind};base64,{base64.b64encode(content).decode()}"


def test_image_urls_reach_a_server_that_takes_only_data_urls(client: openai.OpenAI, model: ScriptedModelServer,
                                                             images: str, marker: str) -> None:
    """Ollama's /v1 refuses an `image_url` holding a URL (400 "image URLs are not currently supported, please use base64
    encoded data instead"; OpenAI fetches it), so every run with a linked image failed there. The orchestrator fetches
    each linked image once (through the SSRF guard), sends it as a data URL of its type (its `detail` kept), and does
    so at once for that model from then on."""
    assistant = client.beta.assistants.create(model=f"ollama-{marker}")
    ask = [{"type": "text", "text": f"[[quirk:no_image_urls]] [[reply:seen]] {marker}"},
           {"type": "image_url", "image_url": {"url": f"{images}/cat.png", "detail": "low"}},
           {"type": "image_url", "image_url": {"url": f"{images}/photo"}},
           {"type": "image_url", "image_url": {"url": f"{images}/moved.png", "detail": "high"}},
           {"type": "image_url", "image_url": {"url": f"{images}/cat.png"}}]
    before = dict(_Images.hits)
    run = run_of(client, assistant.id, ask)
    assert run.status == "completed", run.last_error
    refused, taken = model.find_requests(marker)
    assert _image_urls(refused) == [(f"{images}/cat.png", "low"), (f"{images}/photo", "auto"),
                                    (f"{images}/moved.png", "high"), (f"{images}/cat.png", "auto")]
    assert _image_urls(taken) == [(_data_url("image/png", PNG), "low"), (_data_url("image/jpeg", JPEG), "auto"),
                                  (_data_url("image/png", PNG), "high"), (_data_url("image/png", PNG), "auto")]
    assert base64.b64decode(_image_urls(taken)[0][0].split(",", 1)[1]) == PNG
    assert {path: _Images.hits.get(path, 0) - before.get(path, 0) for path in ("/cat.png", "/photo", "/moved.png")} == {
        "/cat.png": 2, "/photo": 1, "/moved.png": 1}  # cat.png: once for its two links, once as the redirect's target

    ask[0] = {"type": "text", "text": f"[[quirk:no_image_urls]] [[reply:seen]] {marker} next"}
    run = run_of(client, assistant.id, ask[:2])
    assert run.status == "completed", run.last_error
    [sent] = model.find_requests(f"{marker} next")  # inlined before the first try: nothing refused
    assert _image_urls(sent) == [(_data_url("image/png", PNG), "low")]


@pytest.mark.parametrize(("path", "why"), [
    ("/missing.png", "HTTP 404."),
    ("/page.png", "it is not a PNG, JPEG, GIF or WebP image (Content-Type: text/html)."),
    ("http://10.0.0.1/cat.png", "refused (THREADLINE_IMAGE_FETCH_ALLOWED_NETWORKS): The URL host '10.0.0.1' resolves to"
                                " 10.0.0.1, which is not allowed (private)."),
])
def test_an_image_that_cannot_be_fetched_fails_the_run_as_the_prompts_fault(
        client: openai.OpenAI, model: ScriptedModelServer, images: str, marker: str, path: str, why: str) -> None:
    """A linked image that is missing, not an image, or at an address the SSRF guard refuses fails the run with
    `invalid_prompt` and says which URL and why; it is not retried (a server that takes image URLs gets them as
    they are: its failure would be the model's)."""
    url = path if path.startswith("http") else f"{images}{path}"
    assistant = client.beta.assistants.create(model=f"ollama-{marker}")
    run = run_of(client, assistant.id, [{"type": "text", "text": f"[[quirk:no_image_urls]] {marker}"},
                                        {"type": "image_url", "image_url": {"url": url}}])
    assert run.status == "failed" and run.last_error is not None and run.last_error.code == "invalid_prompt"
    assert run.last_error.message == f"Could not fetch the image at {url} for the model: {why}"
    assert len(model.find_requests(marker)) == 1  # the refused request only


def test_a_refusal_of_the_inlined_image_fails_the_run_without_asking_again(client: openai.OpenAI,
                                                                           model: ScriptedModelServer, images: str,
                                                                           marker: str) -> None:
    """Ollama takes no GIF even as a data URL ("invalid image input"): the run fails with the server's word, after the
    one request with the image inlined (no loop of fetching and asking)."""
    assistant = client.beta.assistants.create(model=f"ollama-{marker}")
    run = run_of(client, assistant.id, [{"type": "text", "text": f"[[quirk:no_image_urls]] {marker}"},
                                        {"type": "image_url", "image_url": {"url": f"{images}/anim.gif"}}])
    assert run.status == "failed" and run.last_error is not None and run.last_error.code == "invalid_prompt"
    assert "invalid image input" in run.last_error.message
    refused, inlined = model.find_requests(marker)
    assert _image_urls(refused) == [(f"{images}/anim.gif", "auto")]
    assert _image_urls(inlined) == [(_data_url("image/gif", GIF), "auto")]
