"""User JSON keeps the key order it was sent in (jsonb would sort keys shorter first, then bytewise): a function's
`parameters` and a json_schema `schema` (models fill properties in schema order) and metadata, through the API's
responses and the chat-completions request the model gets."""

import json
from typing import Any

import openai
import pytest
from openai.types.beta import FunctionToolParam
from run_helpers import TERMINAL, wait_for

from threadline_devstack.model_server import ScriptedModelServer

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

PARAMETERS = {"type": "object",
              "properties": {"zeta_long_name": {"type": "string", "description": "first"},
                             "b": {"type": "integer"}, "alpha": {"type": "boolean"}},
              "required": ["zeta_long_name", "b", "alpha"], "additionalProperties": False}
TOOL: FunctionToolParam = {"type": "function", "function": {"name": "fill_in", "description": "Fill the form",
                                                            "parameters": PARAMETERS, "strict": True}}
RESPONSE_FORMAT: Any = {"type": "json_schema", "json_schema": {
    "name": "answer", "description": "reasoning first", "strict": True,
    "schema": {"type": "object", "properties": {"reasoning": {"type": "string"}, "answer": {"type": "string"}},
               "required": ["reasoning", "answer"], "additionalProperties": False}}}
METADATA = {"zz_long_key": "1", "b": "2", "aa": "3"}
OTHER_PARAMETERS = {"type": "object", "properties": {"yankee_long": {"type": "string"}, "x": {"type": "string"}},
                    "required": ["yankee_long", "x"], "additionalProperties": False}


def assert_sent_order(tools: list[Any], response_format: Any, parameters: dict[str, Any] = PARAMETERS) -> None:
    """The function's parameters and the json_schema's schema in the order they were sent, at every depth."""
    (function,) = [t.function for t in tools if t.type == "function"]
    assert json.dumps(function.parameters) == json.dumps(parameters)
    assert json.dumps(response_format.json_schema.schema_) == json.dumps(RESPONSE_FORMAT["json_schema"]["schema"])


def run_and_request(client: openai.OpenAI, model: ScriptedModelServer, thread_id: str, run_id: str,
                    marker: str) -> dict[str, Any]:
    """The chat-completions request of a run that ends (the model answers in text)."""
    wait_for(client, thread_id, run_id, TERMINAL)
    (request,) = model.find_requests(marker)
    return request


def assert_request_order(request: dict[str, Any], parameters: dict[str, Any] = PARAMETERS) -> None:
    """The model got the function's parameters and the json_schema in the order they were sent."""
    (function,) = [t["function"] for t in request["tools"] if t["function"]["name"] == "fill_in"]
    assert json.dumps(function["parameters"]) == json.dumps(parameters)
    assert list(function["parameters"]["properties"]) == list(parameters["properties"])
    assert request["response_format"] == RESPONSE_FORMAT
    assert json.dumps(request["response_format"]["json_schema"]["schema"]) \
        == json.dumps(RESPONSE_FORMAT["json_schema"]["schema"])
    assert list(request["response_format"]["json_schema"]["schema"]["properties"]) == ["reasoning", "answer"]


@pytest.fixture(scope="module")
def assistant_id(client: openai.OpenAI) -> str:
    """An assistant with the ordered function, json_schema and metadata."""
    return client.beta.assistants.create(model="gpt-4o", tools=[{"type": "code_interpreter"}, TOOL],
                                         response_format=RESPONSE_FORMAT, metadata=METADATA).id


def test_assistant_keeps_the_order_sent(client: openai.OpenAI, assistant_id: str) -> None:
    for assistant in (client.beta.assistants.retrieve(assistant_id),
                      next(a for a in client.beta.assistants.list(limit=100) if a.id == assistant_id)):
        assert_sent_order(assistant.tools, assistant.response_format)
        assert list(assistant.metadata or {}) == list(METADATA)


def test_assistant_modify_keeps_the_order_sent(client: openai.OpenAI) -> None:
    assistant = client.beta.assistants.create(model="gpt-4o", tools=[TOOL], metadata=METADATA)
    tool = {"type": "function", "function": {**TOOL["function"], "parameters": OTHER_PARAMETERS}}
    updated = client.beta.assistants.update(assistant.id, tools=[tool],  # type: ignore[list-item]
                                            response_format=RESPONSE_FORMAT, name="renamed")
    for found in (updated, client.beta.assistants.retrieve(assistant.id)):
        assert_sent_order(found.tools, found.response_format, OTHER_PARAMETERS)
        assert list(found.metadata or {}) == list(METADATA)
    renamed = client.beta.assistants.update(assistant.id, metadata={"zz_long_key": "x", "a": "y"})
    assert list(renamed.metadata or {}) == ["zz_long_key", "a"]
    assert_sent_order(renamed.tools, renamed.response_format, OTHER_PARAMETERS)


def test_run_inherits_the_assistants_order(client: openai.OpenAI, model: ScriptedModelServer, assistant_id: str,
                                           marker: str) -> None:
    thread = client.beta.threads.create(messages=[{"role": "user", "content": f"hello {marker}"}])
    run = client.beta.threads.runs.create(thread_id=thread.id, assistant_id=assistant_id)
    assert_sent_order(run.tools, run.response_format)
    assert_request_order(run_and_request(client, model, thread.id, run.id, marker))
    done = client.beta.threads.runs.retrieve(run.id, thread_id=thread.id)
    assert_sent_order(done.tools, done.response_format)


def test_run_overrides_keep_the_order_sent(client: openai.OpenAI, model: ScriptedModelServer, marker: str) -> None:
    assistant = client.beta.assistants.create(model="gpt-4o")
    thread = client.beta.threads.create(messages=[{"role": "user", "content": f"hello {marker}"}],
                                        metadata=METADATA)
    run = client.beta.threads.runs.create(thread_id=thread.id, assistant_id=assistant.id, tools=[TOOL],
                                          response_format=RESPONSE_FORMAT, metadata=METADATA)
    assert_sent_order(run.tools, run.response_format)
    assert_request_order(run_and_request(client, model, thread.id, run.id, marker))
    for found in (client.beta.threads.runs.retrieve(run.id, thread_id=thread.id),
                  client.beta.threads.runs.list(thread_id=thread.id).data[0]):
        assert_sent_order(found.tools, found.response_format)
        assert list(found.metadata or {}) == list(METADATA)
    updated = client.beta.threads.runs.update(run.id, thread_id=thread.id, metadata={"zz_long_key": "x", "a": "y"})
    assert list(updated.metadata or {}) == ["zz_long_key", "a"]
    assert_sent_order(updated.tools, updated.response_format)
    assert list(client.beta.threads.retrieve(thread.id).metadata or {}) == list(METADATA)


def test_create_and_run_keeps_the_order_sent(client: openai.OpenAI, model: ScriptedModelServer,
                                             marker: str) -> None:
    assistant = client.beta.assistants.create(model="gpt-4o")
    run = client.beta.threads.create_and_run(
        assistant_id=assistant.id, tools=[TOOL], response_format=RESPONSE_FORMAT, metadata=METADATA,
        thread={"messages": [{"role": "user", "content": f"hello {marker}", "metadata": METADATA}],
                "metadata": METADATA})
    assert_sent_order(run.tools, run.response_format)
    assert list(run.metadata or {}) == list(METADATA)
    assert_request_order(run_and_request(client, model, run.thread_id, run.id, marker))
    assert list(client.beta.threads.retrieve(run.thread_id).metadata or {}) == list(METADATA)
    (message,) = [m for m in client.beta.threads.messages.list(thread_id=run.thread_id) if m.role == "user"]
    assert list(message.metadata or {}) == list(METADATA)


def test_thread_and_message_metadata_keep_the_order_sent(client: openai.OpenAI) -> None:
    thread = client.beta.threads.create(metadata=METADATA)
    updated = client.beta.threads.update(thread.id, metadata={"zz_long_key": "x", "a": "y"})
    assert list(updated.metadata or {}) == ["zz_long_key", "a"]
    assert list(client.beta.threads.retrieve(thread.id).metadata or {}) == ["zz_long_key", "a"]
    message = client.beta.threads.messages.create(thread.id, role="user", content="hi", metadata=METADATA)
    assert list(client.beta.threads.messages.retrieve(message.id, thread_id=thread.id).metadata or {}) \
        == list(METADATA)
    changed = client.beta.threads.messages.update(message.id, thread_id=thread.id,
                                                  metadata={"zz_long_key": "x", "a": "y"})
    assert list(changed.metadata or {}) == ["zz_long_key", "a"]
    assert list(client.beta.threads.messages.list(thread_id=thread.id).data[0].metadata or {}) \
        == ["zz_long_key", "a"]
