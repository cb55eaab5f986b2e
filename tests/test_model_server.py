"""The scripted/offline model server, driven through the real openai client (no stack needed)."""

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from run_orchestrator.prompt import code_files_note
from threadline_devstack.model_server import (
    BRIEF_SOURCE_CHARS,
    MAX_SCRIPTED_WORDS,
    OFFLINE_CODE,
    ScriptedModelServer,
    parse_directives,
    sample_arguments,
)

pytestmark = pytest.mark.unit

TOOLS: Any = [{"type": "function", "function": {"name": "lookup", "parameters": {
    "type": "object", "properties": {"q": {"type": "string"}, "n": {"type": "integer"},
                                     "mode": {"type": "string", "enum": ["fast", "slow"]}},
    "required": ["q", "n", "mode"]}}}]


@pytest.fixture(scope="module")
def server() -> Iterator[ScriptedModelServer]:
    with ScriptedModelServer() as running:
        yield running


@pytest.fixture(scope="module")
def offline() -> Iterator[ScriptedModelServer]:
    with ScriptedModelServer(auto_tools=True) as running:
        yield running


@pytest.fixture(scope="module")
def sdk(server: ScriptedModelServer) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0, timeout=10)
    yield client
    client.close()


def _user(text: str) -> Any:
    return [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]


def test_parse_directives_extracts_values_and_keeps_text() -> None:
    found = parse_directives('hi [[reply:Hello  there]] x [[call:f:{"a": [[1]]}]] [[call:g: {"b": "]]"}]] '
                             "[[sleep:0.5]] [[slow:0.1]] [[status:503]] [[tokens:7]] [[unknown:1]] [[tokens:x]]")
    assert found.reply == "Hello  there"
    assert found.calls == [("f", '{"a": [[1]]}'), ("g", '{"b": "]]"}')]
    assert (found.sleep, found.slow, found.status, found.tokens) == (0.5, 0.1, 503, 7)
    assert found.text == "hi x [[unknown:1]] [[tokens:x]]"


def test_sample_arguments_fills_required_properties() -> None:
    schema = TOOLS[0]["function"]["parameters"]
    assert sample_arguments(schema, "find cats") == {"q": "find cats", "n": 1, "mode": "fast"}


def test_default_echo_non_streaming_with_usage(sdk: openai.OpenAI, server: ScriptedModelServer) -> None:
    reply = sdk.chat.completions.create(model="gpt-4o", messages=_user("hello   brave new world"))
    assert reply.choices[0].message.content == "Echo: hello brave new world"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.model == "gpt-4o"
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (6, 5, 11)
    assert server.requests[-1]["messages"][-1]["content"] == "hello   brave new world"


def test_streaming_word_by_word_with_usage_chunk(sdk: openai.OpenAI) -> None:
    stream = sdk.chat.completions.create(model="gpt-4o", messages=_user("[[reply:one two  three]]"),
                                         stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert contents == ["one ", "two  ", "three"]
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


def test_refusal_directive_refuses_as_structured_outputs_does(sdk: openai.OpenAI) -> None:
    """`refusal` instead of content, non-streaming and in `delta.refusal` word by word."""
    reply = sdk.chat.completions.create(model="gpt-4o", messages=_user("[[refusal:I can't do that.]] x"))
    message = reply.choices[0].message
    assert (message.content, message.refusal, reply.choices[0].finish_reason) == (None, "I can't do that.", "stop")
    chunks = list(sdk.chat.completions.create(model="gpt-4o", messages=_user("[[refusal:I can't do that.]]"),
                                              stream=True))
    assert [c.choices[0].delta.refusal for c in chunks if c.choices and c.choices[0].delta.refusal] == [
        "I ", "can't ", "do ", "that."]
    assert all(c.choices[0].delta.content is None for c in chunks if c.choices)


def test_finish_directive_sets_the_finish_reason_of_a_text_reply(sdk: openai.OpenAI) -> None:
    reply = sdk.chat.completions.create(model="gpt-4o", messages=_user("[[reply:cut]] [[finish:content_filter]]"))
    assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == ("cut", "content_filter")


def test_streaming_without_include_usage_has_no_usage_chunk(sdk: openai.OpenAI) -> None:
    chunks = list(sdk.chat.completions.create(model="m", messages=_user("hi"), stream=True))
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Echo: hi"


def test_parallel_tool_calls_streamed_and_accumulated(sdk: openai.OpenAI) -> None:
    text = '[[call:lookup:{"q": "cats and dogs", "n": 2, "mode": "slow"}]] [[call:lookup:{"q": "x"}]]'
    with sdk.chat.completions.stream(model="gpt-4o", messages=_user(text), tools=TOOLS) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert [c.function.name for c in calls] == ["lookup", "lookup"]
    assert json.loads(calls[0].function.arguments) == {"q": "cats and dogs", "n": 2, "mode": "slow"}
    assert json.loads(calls[1].function.arguments) == {"q": "x"}
    assert all(c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id


def test_tool_calls_non_streaming_then_tool_results(sdk: openai.OpenAI) -> None:
    text = '[[call:lookup:{"q": "a"}]] [[call:lookup:{"q": "b"}]]'
    first = sdk.chat.completions.create(model="m", messages=_user(text), tools=TOOLS)
    calls = first.choices[0].message.tool_calls or []
    assert len(calls) == 2 and first.choices[0].message.content is None
    history: Any = [*_user(text), first.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": calls[0].id, "content": "result A"},
               {"role": "tool", "tool_call_id": calls[1].id, "content": [{"type": "text", "text": "result B"}]}]
    second = sdk.chat.completions.create(model="m", messages=history, tools=TOOLS)
    assert second.choices[0].message.content == "Tool results: result A | result B"
    assert second.choices[0].finish_reason == "stop"


def test_call_directive_without_tools_offered_replies_text(sdk: openai.OpenAI) -> None:
    reply = sdk.chat.completions.create(model="m", messages=_user('hey [[call:lookup:{"q": 1}]]'))
    assert reply.choices[0].message.content == "Echo: hey"
    assert not reply.choices[0].message.tool_calls


@pytest.mark.parametrize(("code", "error"), [(500, openai.InternalServerError), (429, openai.RateLimitError),
                                              (400, openai.BadRequestError), (503, openai.InternalServerError)])
def test_status_directive_returns_openai_error(sdk: openai.OpenAI, code: int, error: type[Exception]) -> None:
    with pytest.raises(error) as caught:
        sdk.chat.completions.create(model="m", messages=_user(f"[[status:{code}]] boom"))
    assert isinstance(caught.value, openai.APIStatusError)
    assert caught.value.status_code == code
    body = caught.value.body
    assert isinstance(body, dict) and set(body) >= {"message", "type", "param", "code"}


def test_status_directive_also_fails_streaming(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError):
        sdk.chat.completions.create(model="m", messages=_user("[[status:500]]"), stream=True)


def test_sleep_directive_triggers_client_timeout(server: ScriptedModelServer) -> None:
    impatient = openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0, timeout=0.3)
    with pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(model="m", messages=_user("[[sleep:5]]"))
    impatient.close()


def test_sleep_then_reply(sdk: openai.OpenAI) -> None:
    reply = sdk.chat.completions.create(model="m", messages=_user("[[sleep:0.2]][[reply:late]]"))
    assert reply.choices[0].message.content == "late"


def test_slow_directive_streams_all_tokens(sdk: openai.OpenAI) -> None:
    chunks = list(sdk.chat.completions.create(model="m", messages=_user("[[slow:0.01]][[tokens:5]]"), stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "word1 word2 word3 word4 word5"


@pytest.mark.parametrize("stream", [False, True])
def test_max_completion_tokens_cuts_with_length(sdk: openai.OpenAI, stream: bool) -> None:
    kwargs: Any = {"model": "m", "messages": _user("[[tokens:10]]"), "max_completion_tokens": 4}
    if stream:
        chunks = list(sdk.chat.completions.create(**kwargs, stream=True,
                                                  stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        usage = chunks[-1].usage
    else:
        reply = sdk.chat.completions.create(**kwargs)
        text, finish, usage = reply.choices[0].message.content, [reply.choices[0].finish_reason], reply.usage
    assert text == "word1 word2 word3 word4"
    assert finish == ["length"]
    assert usage is not None and usage.completion_tokens == 4


def test_huge_token_counts_and_odd_statuses_are_bounded(sdk: openai.OpenAI) -> None:
    """`make run` hosts the offline model in its supervisor: [[tokens:10^20]] once took it down (out of memory)."""
    reply = sdk.chat.completions.create(model="m", messages=_user("[[tokens:99999999999999999999]]"))
    assert reply.usage is not None and reply.usage.completion_tokens == MAX_SCRIPTED_WORDS
    assert (reply.choices[0].message.content or "").endswith(f" word{MAX_SCRIPTED_WORDS}")
    odd = sdk.chat.completions.create(model="m", messages=_user("[[status:1000]] [[reply:fine]]"))
    assert odd.choices[0].message.content == "fine"


def test_a_reply_with_a_lone_surrogate_is_escaped(server: ScriptedModelServer) -> None:
    """orjson refuses lone surrogates; the reply (a broken emoji, as models send) goes out as an escape."""
    body = {"model": "m", "messages": _user('[[reply_json:"x \\ud83d"]]'), "stream": True}
    response = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=10)
    assert response.status_code == 200 and '"content": "\\ud83d"' in response.text


def test_max_tokens_legacy_parameter(sdk: openai.OpenAI) -> None:
    reply = sdk.chat.completions.create(model="m", messages=_user("a b c d e"), max_tokens=2)
    assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == ("Echo: a", "length")


def test_text_parts_content_is_read(sdk: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": [{"type": "text", "text": "[[reply:from"}, {"type": "text",
                                                                                     "text": "parts]]"}]}]
    reply = sdk.chat.completions.create(model="m", messages=messages)
    assert reply.choices[0].message.content == "from\nparts"


def test_directives_only_read_from_last_user_message(sdk: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": "[[status:500]]"}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "second"}]
    reply = sdk.chat.completions.create(model="m", messages=messages)
    assert reply.choices[0].message.content == "Echo: second"


def test_models_endpoint(sdk: openai.OpenAI) -> None:
    ids = [m.id for m in sdk.models.list()]
    assert "gpt-4-turbo" in ids
    assert sdk.models.retrieve("anything").id == "anything"


def test_bad_body_is_400(server: ScriptedModelServer) -> None:
    response = httpx.post(f"{server.base_url}/chat/completions", content=b"{nope", trust_env=False)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(("url", "refusal"), [
    ("https://example.com/cat.png", "image URLs are not currently supported, please use base64 encoded data instead"),
    ("data:image/gif;base64,R0lGODlh", "invalid image input"),
    ("data:image/png;base64,iVBORw0KGgo=", None),
])
def test_no_image_urls_quirk_takes_images_as_ollama_does(server: ScriptedModelServer, url: str,
                                                         refusal: str | None) -> None:
    """Ollama's /v1: an http(s) image URL is refused with its exact 400 body, a data URL of a type it does not take
    too; the request is recorded either way."""
    body = {"model": "llava", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "[[quirk:no_image_urls]] what is this? img-quirk"},
        {"type": "image_url", "image_url": {"url": url, "detail": "auto"}}]}]}
    response = httpx.post(f"{server.base_url}/chat/completions", json=body, trust_env=False)
    if refusal is None:
        assert response.status_code == 200, response.text
    else:
        assert response.status_code == 400
        assert response.json() == {"error": {"message": refusal, "type": "invalid_request_error", "param": None,
                                             "code": None}}
    assert server.requests[-1] == body


def test_find_requests_by_marker(sdk: openai.OpenAI, server: ScriptedModelServer) -> None:
    sdk.chat.completions.create(model="m", messages=_user("unique-marker-42"))
    found = server.find_requests("unique-marker-42")
    assert len(found) == 1 and found[0]["model"] == "m"


def test_offline_mode_calls_code_interpreter_then_summarises(offline: ScriptedModelServer) -> None:
    client = openai.OpenAI(base_url=offline.base_url, api_key="k", max_retries=0, timeout=10)
    tools: Any = [{"type": "function", "function": {"name": "code_interpreter", "parameters": {
        "type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}}}, *TOOLS]
    with client.chat.completions.stream(model="gpt-4-turbo", messages=_user("compute"), tools=tools) as stream:
        for _ in stream:
            pass
        first = stream.get_final_completion()
    calls = first.choices[0].message.tool_calls or []
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("code_interpreter", {"code": OFFLINE_CODE})]
    history: Any = [*_user("compute"), first.choices[0].message.model_dump(exclude_none=True,
                                                                       exclude={"parsed"}),
               {"role": "tool", "tool_call_id": calls[0].id, "content": "hello from the offline model"}]
    second = client.chat.completions.create(model="gpt-4-turbo", messages=history, tools=tools)
    assert second.choices[0].message.content == "Tool results: hello from the offline model"
    client.close()


def test_offline_mode_fills_function_schema_and_respects_reply(offline: ScriptedModelServer) -> None:
    client = openai.OpenAI(base_url=offline.base_url, api_key="k", max_retries=0, timeout=10)
    first = client.chat.completions.create(model="m", messages=_user("weather in Paris"), tools=TOOLS)
    call = (first.choices[0].message.tool_calls or [])[0]
    assert json.loads(call.function.arguments) == {"q": "weather in Paris", "n": 1, "mode": "fast"}  # type: ignore[union-attr]
    plain = client.chat.completions.create(model="m", messages=_user("[[reply:no tools]]"), tools=TOOLS)
    assert plain.choices[0].message.content == "no tools" and not plain.choices[0].message.tool_calls
    no_tools = client.chat.completions.create(model="m", messages=_user("just chat"))
    assert no_tools.choices[0].message.content == "Echo: just chat"
    client.close()


@pytest.mark.parametrize(("choice", "called"), [("auto", False), ("required", True),
                                                 ({"type": "function", "function": {"name": "lookup"}}, True)])
def test_a_forced_tool_choice_calls_again_after_tool_results(sdk: openai.OpenAI, choice: Any, called: bool) -> None:
    """As OpenAI does: tool results end the calls of an "auto" request, not those of one whose tool_choice forces a
    call (a run that sent it after every tool output would never answer)."""
    text = '[[call:lookup:{"q": "a"}]]'
    first = sdk.chat.completions.create(model="m", messages=_user(text), tools=TOOLS, tool_choice=choice)
    (call,) = first.choices[0].message.tool_calls or []
    history: Any = [*_user(text), first.choices[0].message.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": call.id, "content": "result A"}]
    second = sdk.chat.completions.create(model="m", messages=history, tools=TOOLS, tool_choice=choice).choices[0]
    assert [c.function.name for c in second.message.tool_calls or []] == (["lookup"] if called else [])
    assert second.message.content == (None if called else "Tool results: result A")


TWO_TOOLS: Any = [*TOOLS, {"type": "function", "function": {"name": "clock", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}]
TWO_CALLS = '[[call:lookup:{"q": "a", "n": 1, "mode": "fast"}]] [[call:clock:{"zone": "UTC"}]]'


@pytest.mark.parametrize(("settings", "expected"), [
    ({}, ["lookup", "clock"]),
    ({"parallel_tool_calls": False}, ["lookup"]),
    ({"tool_choice": {"type": "function", "function": {"name": "clock"}}}, ["clock"]),
    ({"tool_choice": "none"}, []),
])
def test_asked_for_calls_follow_tool_choice_and_parallel_tool_calls(sdk: openai.OpenAI, settings: dict[str, Any],
                                                                    expected: list[str]) -> None:
    """As chat completions has it: "none" answers in text, a named tool is the only one called, and
    parallel_tool_calls false makes one call at most."""
    reply = sdk.chat.completions.create(model="m", messages=_user(TWO_CALLS), tools=TWO_TOOLS, **settings)
    message = reply.choices[0].message
    assert [c.function.name for c in message.tool_calls or []] == expected
    assert (message.content is None) == bool(expected)


@pytest.mark.parametrize(("choice", "expected"), [("auto", ["lookup"]), ("none", []),
                                                  ({"type": "function", "function": {"name": "clock"}}, ["clock"])])
def test_offline_model_calls_the_tool_tool_choice_names(offline: ScriptedModelServer, choice: Any,
                                                        expected: list[str]) -> None:
    """The offline model (make run) calls the first offered tool, the named one when tool_choice names one, and
    none for "none"."""
    client = openai.OpenAI(base_url=offline.base_url, api_key="sk-test", max_retries=0, timeout=10)
    reply = client.chat.completions.create(model="m", messages=_user("weather in Paris?"), tools=TWO_TOOLS,
                                           tool_choice=choice)
    assert [c.function.name for c in reply.choices[0].message.tool_calls or []] == expected


@pytest.mark.parametrize(("settings", "before", "after"), [
    ({"tool_choice": "required"}, [], ["lookup", "clock"]),
    ({"tool_choice": {"type": "function", "function": {"name": "clock"}}}, ["lookup"], ["lookup", "clock"]),
    ({}, ["lookup", "clock"], ["lookup", "clock"]),
])
def test_a_model_that_ignores_tool_choice_makes_forced_calls_only_when_told(
        sdk: openai.OpenAI, settings: dict[str, Any], before: list[str], after: list[str]) -> None:
    """Quirk no_tool_choice (Ollama's /v1 takes no tool_choice; a small model answers in text): the calls tool_choice
    forces are made only once a system message ends the request, then whatever tool_choice names."""
    asked = _user(f"{TWO_CALLS} [[quirk:no_tool_choice]]")
    first = sdk.chat.completions.create(model="m", messages=asked, tools=TWO_TOOLS, **settings).choices[0].message
    assert [c.function.name for c in first.tool_calls or []] == before  # type: ignore[union-attr]
    assert (first.content is not None) == (not before)
    told = [*asked, {"role": "system", "content": "Call the tool."}]
    second = sdk.chat.completions.create(model="m", messages=told, tools=TWO_TOOLS, **settings).choices[0].message
    assert [c.function.name for c in second.tool_calls or []] == after  # type: ignore[union-attr]
    text_only = [*_user("[[reply:no]] [[quirk:no_tool_choice]]"), {"role": "system", "content": "Call the tool."}]
    reply = sdk.chat.completions.create(model="m", messages=text_only, tools=TWO_TOOLS, **settings).choices[0].message
    assert reply.content == "no" and not reply.tool_calls


CODE_TOOL: Any = [{"type": "function", "function": {"name": "code_interpreter", "parameters": {
    "type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}}}]
CHART_ASK = "Create a line chart of the monthly sales in my CSV file, and save it as a CSV I can download."


def _offline_code(server: ScriptedModelServer, text: str, note: str | None) -> str:
    client = openai.OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0, timeout=10)
    system = "You are a data analyst." + (f"\n\n{note}" if note else "")
    reply = client.chat.completions.create(model="m", tools=CODE_TOOL, messages=[
        {"role": "system", "content": system}, {"role": "user", "content": text}])
    client.close()
    (call,) = reply.choices[0].message.tool_calls or []
    assert call.type == "function" and call.function.name == "code_interpreter"
    return str(json.loads(call.function.arguments)["code"])


def test_offline_model_plots_the_csv_and_links_a_file_when_asked(offline: ScriptedModelServer,
                                                                 server: ScriptedModelServer) -> None:
    """The docs' code_interpreter flow on make run: asked for a chart it printed a greeting, so no image_file ever
    came (nor a file_path to download). Now its code plots the first CSV the run's note names (else sample data) and
    links a file it saves when asked; anything else still prints the greeting; `[[mode:offline]]` asks it of the
    scripted server."""
    note = code_files_note(["file-t", "file-a", "file-b"], {
        "file-t": ("notes.txt", 5), "file-a": ("sales 2024.csv", 5), "file-b": ("other.csv", 5)}, max_total_bytes=100)
    code = _offline_code(offline, CHART_ASK, note)
    assert "pd.read_csv('/mnt/data/sales 2024.csv')" in code and "plt.show()" in code
    assert "print('[Download sales_2024_summary.csv](sandbox:/mnt/data/sales_2024_summary.csv)')" in code
    compile(code, "offline", "exec")
    sample = _offline_code(offline, "Plot a graph for me", None)
    assert "read_csv" not in sample and "pd.DataFrame(" in sample and "plt.show()" in sample
    assert "sandbox:" not in sample
    saved = _offline_code(offline, "Export the data, please", note)
    assert "plt" not in saved and "sandbox:/mnt/data/sales_2024_summary.csv" in saved
    assert _offline_code(offline, "Can you help me?", note) == OFFLINE_CODE
    assert _offline_code(server, f"{CHART_ASK} [[mode:offline]]", note) == code


def test_offline_model_solves_the_docs_equation(offline: ScriptedModelServer, capsys: pytest.CaptureFixture[str]
                                                ) -> None:
    """The docs' math tutor on make run: its code printed a greeting for `3x + 11 = 14`; now it solves the equation in
    backticks (sympy, as the sandbox has it), so the answer says x = 1."""
    code = _offline_code(offline, "I need to solve the equation `3x + 11 = 14`. Can you help me?", None)
    exec(code, {})
    assert capsys.readouterr().out == "3x + 11 = 14: x = 1\n"
    exec(_offline_code(offline, "Can you figure out `x^2 - 4 = 0`?", None), {})  # not a figure to plot
    assert capsys.readouterr().out == "x^2 - 4 = 0: x = -2; x = 2\n"


def test_offline_model_quotes_each_search_result_briefly(offline: ScriptedModelServer, sdk: openai.OpenAI) -> None:
    """The docs' file_search flow on make run: the answer repeated every chunk whole (20 results of 800 tokens: pages
    of text around the citations). Offline, each result is one line, its marker first, cut to BRIEF_SOURCE_CHARS; the
    scripted server (tests) still answers the outputs whole, and outputs that are not search results stay as they
    are."""
    chunk = "Berkshire owns the BNSF railroad.\n\n" + "More text. " * 100
    output = f"【0:0†source】 brka-10k.txt: {chunk}\n\n【0:1†source】 notes.md: GEICO is an insurer."
    history: Any = [*_user("Which railroad?"), {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "file_search", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": output}]
    client = openai.OpenAI(base_url=offline.base_url, api_key="sk-test", max_retries=0, timeout=10)
    answer = client.chat.completions.create(model="m", messages=history).choices[0].message.content or ""
    client.close()
    first, second = answer.removeprefix("Tool results: ").split("\n")
    assert first.startswith("【0:0†source】 brka-10k.txt: Berkshire owns the BNSF railroad. More text.")
    assert len(first) == BRIEF_SOURCE_CHARS + 3 and first.endswith("...")
    assert second == "【0:1†source】 notes.md: GEICO is an insurer."
    assert sdk.chat.completions.create(model="m", messages=history).choices[0].message.content == (
        f"Tool results: {output}")
    asked_offline = [history[0], {"role": "user", "content": "Which railroad? [[mode:offline]]"}, *history[2:]]
    assert sdk.chat.completions.create(model="m", messages=asked_offline).choices[0].message.content == answer
    none_found = [*asked_offline[:-1], {**history[-1], "content": "No results found in the attached files."}]
    assert sdk.chat.completions.create(model="m", messages=none_found).choices[0].message.content == (
        "Tool results: No results found in the attached files.")


WEATHER_TOOLS: Any = [{"type": "function", "function": {"name": "get_current_temperature", "parameters": {
    "type": "object", "properties": {"location": {"type": "string"},
                                     "unit": {"type": "string", "enum": ["Celsius", "Fahrenheit"]}},
    "required": ["location", "unit"]}}},
    {"type": "function", "function": {"name": "get_rain_probability", "parameters": {
        "type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}},
    {"type": "function", "function": {"name": "file_search", "parameters": {
        "type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}]
WEATHER_ASK = "What's the weather in San Francisco today and the likelihood it'll rain? Search for it."


@pytest.mark.parametrize(("settings", "expected"), [
    ({}, ["get_current_temperature", "get_rain_probability"]),
    ({"parallel_tool_calls": False}, ["get_current_temperature"]),
    ({"tool_choice": {"type": "function", "function": {"name": "get_rain_probability"}}}, ["get_rain_probability"]),
])
def test_offline_model_also_calls_the_functions_the_message_names(
        offline: ScriptedModelServer, settings: dict[str, Any], expected: list[str]) -> None:
    """The docs' weather bot on make run: asked of the weather and the rain, the offline model called only the first
    function, so the rain was never asked for. It calls beside it each function a word of whose name the message
    says (not file_search or code_interpreter), as parallel calls, one call when parallel_tool_calls is false."""
    client = openai.OpenAI(base_url=offline.base_url, api_key="sk-test", max_retries=0, timeout=10)
    reply = client.chat.completions.create(model="m", messages=_user(WEATHER_ASK), tools=WEATHER_TOOLS, **settings)
    client.close()
    calls = reply.choices[0].message.tool_calls or []
    assert [c.function.name for c in calls] == expected  # type: ignore[union-attr]
    assert all(json.loads(c.function.arguments)["location"] == WEATHER_ASK for c in calls)  # type: ignore[union-attr]


MATH_RESPONSE: Any = {"type": "json_schema", "json_schema": {"name": "math_response", "strict": True, "schema": {
    "type": "object", "properties": {
        "steps": {"type": "array", "items": {"type": "object", "properties": {
            "explanation": {"type": "string"}, "output": {"type": "string"}},
            "required": ["explanation", "output"], "additionalProperties": False}},
        "final_answer": {"type": "string"}},
    "required": ["steps", "final_answer"], "additionalProperties": False}}}


def test_offline_model_answers_json_when_asked(offline: ScriptedModelServer, sdk: openai.OpenAI) -> None:
    """Structured Outputs on make run: the offline model answered `Echo: ...` whatever `response_format` asked, so
    code parsing the answer as JSON failed. It answers an object the schema allows (JSON mode: `{"answer": ...}`),
    after tool results too; the scripted server and a `[[reply]]` are unchanged."""
    client = openai.OpenAI(base_url=offline.base_url, api_key="sk-test", max_retries=0, timeout=10)
    asked = _user("how can I solve 8x + 7 = -23")
    schema = client.chat.completions.create(model="m", messages=asked, response_format=MATH_RESPONSE)
    assert json.loads(schema.choices[0].message.content or "") == {
        "steps": [], "final_answer": "Echo: how can I solve 8x + 7 = -23"}
    mode = client.chat.completions.create(model="m", messages=asked, response_format={"type": "json_object"})
    assert json.loads(mode.choices[0].message.content or "") == {"answer": "Echo: how can I solve 8x + 7 = -23"}
    after_tool: Any = [*asked, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "x = -3.75"}]
    summary = client.chat.completions.create(model="m", messages=after_tool, tools=TOOLS,
                                             response_format={"type": "json_object"})
    assert json.loads(summary.choices[0].message.content or "") == {"answer": "Tool results: x = -3.75"}
    replied = client.chat.completions.create(model="m", messages=_user("[[reply:as is]]"),
                                             response_format={"type": "json_object"})
    assert replied.choices[0].message.content == "as is"
    client.close()
    scripted = sdk.chat.completions.create(model="m", messages=asked, response_format={"type": "json_object"})
    assert scripted.choices[0].message.content == "Echo: how can I solve 8x + 7 = -23"
