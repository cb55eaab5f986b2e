"""The published OpenAPI contract of the Assistants v2 surface, checked on the real stack.

Every response body of the main operations is checked field by field against the `openai` SDK's own types
(generated from that contract): no unknown field, every required field present (nullable ones as null),
literals and enums respected, recursively. The rest are regressions of differences found against the spec:
`include[]` (values checked; run streams carry file_search result contents only when asked), the error
`param` of a body field called `query`, a run's 20-tool limit, a file batch's minimum of one file.
"""

import json
import time
import types
from collections.abc import Callable
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import httpx
import openai
import pytest
from error_helpers import sdk_error
from openai.types import (
    FileDeleted,
    FileObject,
    Upload,
    VectorStore,
    VectorStoreDeleted,
    VectorStoreSearchResponse,
)
from openai.types.beta import Assistant, AssistantDeleted, Thread, ThreadDeleted
from openai.types.beta.assistant_stream_event import ThreadRunStepCompleted
from openai.types.beta.threads import Message, MessageDeleted, MessageDeltaEvent, Run
from openai.types.beta.threads.runs import (
    FileSearchToolCall,
    RunStep,
    RunStepDeltaEvent,
    RunStepInclude,
    ToolCallsStepDetails,
)
from openai.types.beta.threads.runs.function_tool_call import Function as FunctionCall
from openai.types.uploads import UploadPart
from openai.types.vector_stores import (
    FileContentResponse,
    VectorStoreFile,
    VectorStoreFileBatch,
    VectorStoreFileDeleted,
)
from pydantic import BaseModel

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

INCLUDE: RunStepInclude = "step_details.tool_calls[*].file_search.results[*].content"
SEARCH = '[[call:file_search:{"query": "vacation days"}]]'
TERMINAL = {"completed", "failed", "cancelled", "expired", "incomplete"}
EXTENSIONS: dict[type[BaseModel], frozenset[str]] = {
    # Not in the contract's AssistantObject/RunObject (nor the SDK types): the request field, echoed back.
    Assistant: frozenset({"reasoning_effort"}),
    Run: frozenset({"reasoning_effort"}),
}
"""Fields we return beyond the contract, on purpose."""
PRESENT: dict[type[BaseModel], frozenset[str]] = {
    # The contract's `required` lists. The SDK gives nullable fields a None default, so it cannot tell a field
    # that must be present as null from one that may be left out: these must be in the JSON (null allowed).
    Assistant: frozenset({"id", "object", "created_at", "name", "description", "model", "instructions", "tools",
                          "metadata"}),
    Thread: frozenset({"id", "object", "created_at", "tool_resources", "metadata"}),
    Message: frozenset({"id", "object", "created_at", "thread_id", "status", "incomplete_details", "completed_at",
                        "incomplete_at", "role", "content", "assistant_id", "run_id", "attachments", "metadata"}),
    Run: frozenset({"id", "object", "created_at", "thread_id", "assistant_id", "status", "required_action",
                    "last_error", "expires_at", "started_at", "cancelled_at", "failed_at", "completed_at", "model",
                    "instructions", "tools", "metadata", "usage", "incomplete_details", "max_prompt_tokens",
                    "max_completion_tokens", "truncation_strategy", "tool_choice", "parallel_tool_calls",
                    "response_format"}),
    RunStep: frozenset({"id", "object", "created_at", "assistant_id", "thread_id", "run_id", "type", "status",
                        "step_details", "last_error", "expired_at", "cancelled_at", "failed_at", "completed_at",
                        "metadata", "usage"}),
    FunctionCall: frozenset({"name", "arguments", "output"}),
    FileObject: frozenset({"id", "object", "bytes", "created_at", "filename", "purpose", "status"}),
    VectorStore: frozenset({"id", "object", "usage_bytes", "created_at", "status", "last_active_at", "name",
                            "file_counts", "metadata"}),
    VectorStoreFile: frozenset({"id", "object", "usage_bytes", "created_at", "vector_store_id", "status",
                                "last_error"}),
    VectorStoreFileBatch: frozenset({"id", "object", "created_at", "vector_store_id", "status", "file_counts"}),
}


# --- a strict check of JSON against the SDK's types ------------------------------------------------------------


def _conforms(tp: Any, value: Any, path: str) -> None:
    """Raise AssertionError unless `value` (parsed JSON) is exactly an instance of the SDK type `tp`."""
    origin = get_origin(tp)
    if tp is Any or tp is object:
        return
    if origin is Annotated:
        _conforms(get_args(tp)[0], value, path)
    elif origin is Union or origin is types.UnionType:
        failures = []
        for member in get_args(tp):
            try:
                _conforms(member, value, path)
                return
            except AssertionError as exc:
                failures.append(str(exc))
        raise AssertionError(f"{path}: matches no member of {tp}: {failures}")
    elif origin is Literal:
        assert value in get_args(tp), f"{path}: {value!r} is not one of {get_args(tp)}"
    elif tp is type(None):
        assert value is None, f"{path}: expected null, got {value!r}"
    elif origin is list:
        assert isinstance(value, list), f"{path}: expected an array, got {value!r}"
        for index, item in enumerate(value):
            _conforms(get_args(tp)[0], item, f"{path}[{index}]")
    elif origin is dict:
        assert isinstance(value, dict), f"{path}: expected an object, got {value!r}"
        for key, item in value.items():
            _conforms(get_args(tp)[1], item, f"{path}.{key}")
    elif isinstance(tp, type) and issubclass(tp, BaseModel):
        assert isinstance(value, dict), f"{path}: expected an object ({tp.__name__}), got {value!r}"
        fields = {info.alias or name: info for name, info in tp.model_fields.items()}
        unknown = set(value) - set(fields) - EXTENSIONS.get(tp, frozenset())
        assert not unknown, f"{path}: fields unknown to {tp.__name__}: {sorted(unknown)}"
        present = PRESENT.get(tp, frozenset())
        missing = [name for name, info in fields.items()
                   if (info.is_required() or name in present) and name not in value]
        assert not missing, f"{path}: required fields of {tp.__name__} missing: {missing}"
        for name, info in fields.items():
            if name in value:
                _conforms(info.annotation, value[name], f"{path}.{name}")
    elif tp is bool:
        assert isinstance(value, bool), f"{path}: expected a boolean, got {value!r}"
    elif tp is int:
        assert isinstance(value, int) and not isinstance(value, bool), f"{path}: expected an integer, got {value!r}"
    elif tp is float:
        assert isinstance(value, int | float) and not isinstance(value, bool), f"{path}: expected a number"
    elif tp is str:
        assert isinstance(value, str), f"{path}: expected a string, got {value!r}"
    else:
        raise AssertionError(f"{path}: no rule for type {tp!r}")


def conforms(model: type[BaseModel], value: Any, path: str = "$") -> Any:
    """`value` after checking it strictly against `model`."""
    _conforms(model, value, path)
    return value


def conforms_list(model: type[BaseModel], body: Any) -> list[Any]:
    """A list envelope (`object`, `data`, `first_id`, `last_id`, `has_more`) of `model` items."""
    assert isinstance(body, dict) and set(body) == {"object", "data", "first_id", "last_id", "has_more"}, body
    assert body["object"] == "list" and isinstance(body["has_more"], bool)
    data: list[Any] = body["data"]
    for index, item in enumerate(data):
        conforms(model, item, f"$.data[{index}]")
    assert body["first_id"] == (data[0]["id"] if data else None)
    assert body["last_id"] == (data[-1]["id"] if data else None)
    return data


def raw(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """The JSON body of an SDK `with_raw_response` call."""
    return call(*args, **kwargs).http_response.json()


def test_conformance_check_is_strict() -> None:
    """The checker itself: an unknown field, a missing required (nullable) field, a wrong literal or type fail."""
    thread = {"id": "thread_1", "object": "thread", "created_at": 1, "metadata": {}, "tool_resources": None}
    conforms(Thread, thread)
    for broken in ({**thread, "extra": 1}, {k: v for k, v in thread.items() if k != "tool_resources"},
                   {**thread, "object": "threads"}, {**thread, "created_at": "1"}, {**thread, "metadata": {"a": 1}}):
        with pytest.raises(AssertionError):
            conforms(Thread, broken)


# --- fixtures -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def indexed(client: openai.OpenAI) -> tuple[str, str]:
    """A vector store with one indexed text file: (vector_store_id, file_id)."""
    store = client.vector_stores.create(name="contract")
    vs_file = client.vector_stores.files.upload_and_poll(
        vector_store_id=store.id, file=("policy.txt", b"Vacation. Every employee gets 27 paid vacation days per year."),
        poll_interval_ms=100)
    assert vs_file.status == "completed", vs_file.last_error
    return store.id, vs_file.id


@pytest.fixture(scope="module")
def searcher(client: openai.OpenAI, indexed: tuple[str, str]) -> str:
    """An assistant with file_search over the indexed store."""
    return client.beta.assistants.create(model="gpt-4o", tools=[{"type": "file_search"}],
                                         tool_resources={"file_search": {"vector_store_ids": [indexed[0]]}}).id


def _wait(client: openai.OpenAI, thread_id: str, run_id: str, until: set[str]) -> Run:
    deadline = time.monotonic() + 20
    while True:
        run = client.beta.threads.runs.retrieve(run_id, thread_id=thread_id)
        if run.status in until or time.monotonic() > deadline:
            assert run.status in until, run
            return run
        time.sleep(0.05)


# --- every response body against the SDK's types ----------------------------------------------------------------


def test_assistant_thread_message_responses_conform(client: openai.OpenAI) -> None:
    beta = client.beta.with_raw_response
    full = conforms(Assistant, raw(beta.assistants.create, model="gpt-4o", name="n", description="d",
                                   instructions="i", metadata={"k": "v"}, temperature=0.5, top_p=0.9,
                                   tools=[{"type": "code_interpreter"}, {"type": "file_search"},
                                          {"type": "function", "function": {"name": "f", "parameters": {}}}],
                                   response_format={"type": "json_schema", "json_schema": {
                                       "name": "s", "schema": {"type": "object", "additionalProperties": False},
                                       "strict": True}}))
    conforms(Assistant, raw(beta.assistants.create, model="gpt-4o"))
    conforms(Assistant, raw(beta.assistants.retrieve, full["id"]))
    conforms(Assistant, raw(beta.assistants.update, full["id"], name=None, response_format="auto"))
    conforms_list(Assistant, raw(beta.assistants.list, limit=3))
    assert conforms(AssistantDeleted, raw(beta.assistants.delete, full["id"]))["deleted"] is True

    thread = conforms(Thread, raw(beta.threads.create, metadata={"a": "b"}, messages=[
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": [{"type": "text", "text": "hi"},
                                          {"type": "image_url", "image_url": {"url": "https://x.test/a.png"}}]}]))
    conforms(Thread, raw(beta.threads.retrieve, thread["id"]))
    conforms(Thread, raw(beta.threads.update, thread["id"], metadata={"c": "d"}))
    message = conforms(Message, raw(beta.threads.messages.create, thread["id"], role="user", content="more"))
    assert len(conforms_list(Message, raw(beta.threads.messages.list, thread["id"], order="asc"))) == 3
    conforms(Message, raw(beta.threads.messages.retrieve, message["id"], thread_id=thread["id"]))
    conforms(Message, raw(beta.threads.messages.update, message["id"], thread_id=thread["id"], metadata={"x": "y"}))
    conforms(MessageDeleted, raw(beta.threads.messages.delete, message["id"], thread_id=thread["id"]))
    conforms(ThreadDeleted, raw(beta.threads.delete, thread["id"]))


def test_run_and_step_responses_conform(client: openai.OpenAI) -> None:
    beta = client.beta.with_raw_response
    plain = client.beta.assistants.create(model="gpt-4o", tools=[
        {"type": "function", "function": {"name": "lookup", "parameters": {
            "type": "object", "properties": {"q": {"type": "string"}}}}}])
    # a function call: requires_action, then the answer
    run = conforms(Run, raw(beta.threads.create_and_run, assistant_id=plain.id, thread={
        "messages": [{"role": "user", "content": '[[call:lookup:{"q": "a"}]]'}]}))
    thread_id = run["thread_id"]
    waiting = _wait(client, thread_id, run["id"], {"requires_action"} | TERMINAL)
    assert waiting.status == "requires_action" and waiting.required_action is not None
    conforms(Run, raw(beta.threads.runs.retrieve, run["id"], thread_id=thread_id))
    calls = waiting.required_action.submit_tool_outputs.tool_calls
    conforms(Run, raw(beta.threads.runs.submit_tool_outputs, run["id"], thread_id=thread_id,
                      tool_outputs=[{"tool_call_id": c.id, "output": "42"} for c in calls]))
    assert _wait(client, thread_id, run["id"], TERMINAL).status == "completed"
    done = conforms(Run, raw(beta.threads.runs.retrieve, run["id"], thread_id=thread_id))
    assert done["usage"] is not None
    steps = conforms_list(RunStep, raw(beta.threads.runs.steps.list, run["id"], thread_id=thread_id, order="asc"))
    assert [s["type"] for s in steps] == ["tool_calls", "message_creation"]
    conforms(RunStep, raw(beta.threads.runs.steps.retrieve, steps[0]["id"], thread_id=thread_id, run_id=run["id"]))
    conforms_list(Message, raw(beta.threads.messages.list, thread_id, run_id=run["id"]))
    conforms(Run, raw(beta.threads.runs.update, run["id"], thread_id=thread_id, metadata={"k": "v"}))
    # a run cancelled while the model is still answering
    slow = conforms(Run, raw(beta.threads.runs.create, thread_id, assistant_id=plain.id, additional_messages=[
        {"role": "user", "content": "[[sleep:3]] wait"}], truncation_strategy={"type": "last_messages",
                                                                            "last_messages": 4}))
    cancelling = conforms(Run, raw(beta.threads.runs.cancel, slow["id"], thread_id=thread_id))
    assert cancelling["status"] == "cancelling"
    assert _wait(client, thread_id, slow["id"], TERMINAL).status == "cancelled"
    conforms(Run, raw(beta.threads.runs.retrieve, slow["id"], thread_id=thread_id))
    conforms_list(RunStep, raw(beta.threads.runs.steps.list, slow["id"], thread_id=thread_id))
    assert len(conforms_list(Run, raw(beta.threads.runs.list, thread_id))) == 2


def test_file_and_vector_store_responses_conform(client: openai.OpenAI, indexed: tuple[str, str]) -> None:
    store_id, file_id = indexed
    files, stores = client.files.with_raw_response, client.vector_stores.with_raw_response
    upload = conforms(FileObject, raw(files.create, file=("b.txt", b"Parking is free in the east garage."),
                                      purpose="assistants"))
    conforms(FileObject, raw(files.retrieve, upload["id"]))
    conforms_list(FileObject, raw(files.list, purpose="assistants", limit=2))

    store = conforms(VectorStore, raw(stores.create, name="s", metadata={"a": "b"},
                                      expires_after={"anchor": "last_active_at", "days": 2}))
    conforms(VectorStore, raw(stores.retrieve, store_id))
    conforms(VectorStore, raw(stores.update, store["id"], name="t", expires_after=None))
    conforms_list(VectorStore, raw(stores.list, limit=2))
    conforms(VectorStoreFile, raw(stores.files.retrieve, file_id, vector_store_id=store_id))
    conforms_list(VectorStoreFile, raw(stores.files.list, vector_store_id=store_id, filter="completed"))
    conforms(VectorStoreFile, raw(stores.files.update, file_id, vector_store_id=store_id, attributes={"year": 2024}))
    content = raw(stores.files.content, file_id, vector_store_id=store_id)
    assert set(content) == {"object", "data", "has_more", "next_page"}, content
    assert content["object"] == "vector_store.file_content.page" and content["data"]
    for item in content["data"]:
        conforms(FileContentResponse, item)
    found = raw(stores.search, store_id, query="vacation", max_num_results=2)
    assert set(found) == {"object", "search_query", "data", "has_more", "next_page"}, found
    assert found["object"] == "vector_store.search_results.page" and found["search_query"] == ["vacation"]
    assert found["data"]
    for item in found["data"]:
        conforms(VectorStoreSearchResponse, item)

    attached = conforms(VectorStoreFile, raw(stores.files.create, vector_store_id=store["id"], file_id=upload["id"]))
    batch = conforms(VectorStoreFileBatch, raw(stores.file_batches.create, store["id"], file_ids=[file_id]))
    conforms(VectorStoreFileBatch, raw(stores.file_batches.retrieve, batch["id"], vector_store_id=store["id"]))
    conforms_list(VectorStoreFile, raw(stores.file_batches.list_files, batch["id"], vector_store_id=store["id"]))
    conforms(VectorStoreFileBatch, raw(stores.file_batches.cancel, batch["id"], vector_store_id=store["id"]))
    conforms(VectorStoreFileDeleted, raw(stores.files.delete, attached["id"], vector_store_id=store["id"]))
    conforms(VectorStoreDeleted, raw(stores.delete, store["id"]))
    conforms(FileDeleted, raw(files.delete, upload["id"]))


# --- include[] on run steps and run creation --------------------------------------------------------------------


def test_upload_responses_conform(client: openai.OpenAI) -> None:
    uploads = client.uploads.with_raw_response
    upload = conforms(Upload, raw(uploads.create, bytes=8, filename="u.txt", mime_type="text/plain",
                                  purpose="assistants"))
    assert upload["status"] == "pending" and upload["file"] is None
    parts = [conforms(UploadPart, raw(uploads.parts.create, upload["id"], data=data)) for data in (b"abcd", b"efgh")]
    done = conforms(Upload, raw(uploads.complete, upload["id"], part_ids=[p["id"] for p in parts]))
    assert done["status"] == "completed" and done["file"]["bytes"] == 8  # the nested File checked as a FileObject
    other = conforms(Upload, raw(uploads.create, bytes=1, filename="v.txt", mime_type="text/plain",
                                 purpose="user_data"))
    assert conforms(Upload, raw(uploads.cancel, other["id"]))["status"] == "cancelled"


def test_include_values_outside_the_contract_are_400(client: openai.OpenAI) -> None:
    assistant = client.beta.assistants.create(model="gpt-4o")
    thread = client.beta.threads.create(messages=[{"role": "user", "content": "[[reply:ok]]"}])
    bogus: Any = ["step_details.everything"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.beta.threads.runs.create(thread.id, assistant_id=assistant.id, include=bogus)
    error = sdk_error(caught.value)
    assert (error["param"], error["code"]) == ("include[0]", "invalid_value")
    assert "'step_details.everything'" in error["message"] and INCLUDE in error["message"]
    assert list(client.beta.threads.runs.list(thread.id)) == []  # refused before anything was created

    run = client.beta.threads.runs.create(thread.id, assistant_id=assistant.id, include=[INCLUDE])
    _wait(client, thread.id, run.id, TERMINAL)
    [step] = client.beta.threads.runs.steps.list(run.id, thread_id=thread.id, include=[INCLUDE])
    with pytest.raises(openai.BadRequestError) as caught:
        client.beta.threads.runs.steps.list(run.id, thread_id=thread.id, include=bogus)
    assert sdk_error(caught.value)["param"] == "include[0]"
    with pytest.raises(openai.BadRequestError) as caught:
        client.beta.threads.runs.steps.retrieve(step.id, thread_id=thread.id, run_id=run.id, include=[INCLUDE, *bogus])
    assert sdk_error(caught.value)["param"] == "include[1]"


def _sse(http: httpx.Client, path: str, body: dict[str, Any],
         params: dict[str, str] | None = None) -> list[tuple[str, Any]]:
    """(event, data) of a streamed response, until `done`."""
    events: list[tuple[str, Any]] = []
    with http.stream("POST", path, json=body, params=params) as response:
        assert response.status_code == 200, response.read()
        event = ""
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data = line.removeprefix("data: ")
                events.append((event, data if event == "done" else json.loads(data)))
    assert events and events[-1] == ("done", "[DONE]")
    return events


def _search_results(events: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    """file_search results in the step objects and step deltas of a stream."""
    results: list[dict[str, Any]] = []
    for event, data in events:
        if not event.startswith("thread.run.step."):
            continue
        details = data["delta"].get("step_details") if event == "thread.run.step.delta" else data["step_details"]
        for call in (details or {}).get("tool_calls") or ():
            results.extend((call.get("file_search") or {}).get("results") or ())
    return results


STREAM_TYPES: dict[str, type[BaseModel]] = {"thread.created": Thread, "thread.message.delta": MessageDeltaEvent,
                                            "thread.run.step.delta": RunStepDeltaEvent}


def _stream_type(event: str) -> type[BaseModel]:
    if event in STREAM_TYPES:
        return STREAM_TYPES[event]
    if event.startswith("thread.run.step."):
        return RunStep
    if event.startswith("thread.run."):
        return Run
    if event.startswith("thread.message."):
        return Message
    raise AssertionError(f"unexpected event {event}")


def test_streamed_file_search_steps_carry_content_only_with_include(client: openai.OpenAI, http: httpx.Client,
                                                                      searcher: str) -> None:
    # create thread and run: the contract has no include[] there, so never any content
    events = _sse(http, "/threads/runs", {"assistant_id": searcher, "stream": True, "thread": {
        "messages": [{"role": "user", "content": f"How many vacation days? {SEARCH}"}]}})
    results = _search_results(events)
    assert results and all("content" not in r for r in results), results
    assert all(r["file_name"] == "policy.txt" and 0 <= r["score"] <= 1 for r in results)
    assert any(event == "thread.run.step.delta" for event, _ in events)
    for event, data in events[:-1]:
        conforms(_stream_type(event), data, event)
    thread_id = next(data["id"] for event, data in events if event == "thread.created")

    # create run without include[]: none either
    body = {"assistant_id": searcher, "stream": True,
            "additional_messages": [{"role": "user", "content": f"And again? {SEARCH}"}]}
    results = _search_results(_sse(http, f"/threads/{thread_id}/runs", body))
    assert results and all("content" not in r for r in results), results

    # create run with include[] (through the SDK, which sends it as the query parameter include[])
    stream = client.beta.threads.runs.create(thread_id, assistant_id=searcher, stream=True, include=[INCLUDE],
                                             additional_messages=[{"role": "user", "content": f"Once more {SEARCH}"}])
    [step] = [e.data for e in stream if isinstance(e, ThreadRunStepCompleted) and e.data.type == "tool_calls"]
    assert isinstance(step.step_details, ToolCallsStepDetails)
    [call] = step.step_details.tool_calls
    assert isinstance(call, FileSearchToolCall) and call.file_search.results
    assert all(r.content and "27 paid vacation days" in (r.content[0].text or "") for r in call.file_search.results)


# --- errors of the request contract ------------------------------------------------------------------------------


def test_search_query_errors_name_the_query_parameter(client: openai.OpenAI, http: httpx.Client,
                                                      indexed: tuple[str, str]) -> None:
    store_id = indexed[0]
    missing = http.post(f"/vector_stores/{store_id}/search", json={})
    assert missing.status_code == 400
    assert missing.json()["error"] == {"message": "Missing required parameter: 'query'.", "param": "query",
                                       "type": "invalid_request_error", "code": "missing_required_parameter"}
    wrong: Any = 5
    with pytest.raises(openai.BadRequestError) as caught:
        client.vector_stores.search(store_id, query=wrong)
    error = sdk_error(caught.value)
    assert (error["param"], error["code"]) == ("query", "invalid_type")
    assert error["message"].startswith("Invalid type for 'query'")


def test_a_run_takes_at_most_20_tools(client: openai.OpenAI) -> None:
    tools: Any = [{"type": "function", "function": {"name": f"f{i}"}} for i in range(21)]
    assistant = client.beta.assistants.create(model="gpt-4o", tools=tools)  # an assistant may have 128
    assert len(assistant.tools) == 21
    thread = client.beta.threads.create()
    creates: list[Callable[[], Run]] = [
        lambda: client.beta.threads.runs.create(thread.id, assistant_id=assistant.id, tools=tools),
        lambda: client.beta.threads.create_and_run(assistant_id=assistant.id, tools=tools)]
    for create in creates:
        with pytest.raises(openai.BadRequestError) as caught:
            create()
        error = sdk_error(caught.value)
        assert (error["param"], error["code"]) == ("tools", "array_above_max_length")
        assert "maximum length 20" in error["message"]
    assert list(client.beta.threads.runs.list(thread.id)) == []


def test_a_file_batch_needs_at_least_one_file(client: openai.OpenAI, indexed: tuple[str, str]) -> None:
    store_id = indexed[0]
    with pytest.raises(openai.BadRequestError) as caught:
        client.vector_stores.file_batches.create(store_id, file_ids=[])
    assert (sdk_error(caught.value)["param"], sdk_error(caught.value)["code"]) == ("file_ids", "array_below_min_length")
    with pytest.raises(openai.BadRequestError) as caught:
        client.vector_stores.file_batches.create(store_id, files=[])
    assert (sdk_error(caught.value)["param"], sdk_error(caught.value)["code"]) == ("files", "array_below_min_length")
    counts = client.vector_stores.retrieve(store_id).file_counts
    assert (counts.total, counts.completed) == (1, 1)
