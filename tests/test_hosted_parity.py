"""Differences from the hosted API found by a third new-user trial (runs, vector stores and uploads beyond the
quickstarts), each checked through the official SDK against the real stack."""

from collections.abc import Callable
from typing import Any

import openai
import pytest
from error_helpers import sdk_error
from pydantic import BaseModel

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16
PDF_START = b"%PDF-1.4\n"


def test_files_file_search_cannot_read_are_refused_when_attached(client: openai.OpenAI) -> None:
    """Hosted answered 400 `unsupported_file` ("Files with extensions [.png] are not supported for retrieval. See
    ...#supported-files", param `file_ids`) when such a file was attached, on every path that adds files to a store;
    we took it and the vector store file failed later."""
    image = client.files.create(file=("chart.png", PNG), purpose="assistants").id
    bare = client.files.create(file=("README", b"plain words"), purpose="assistants").id
    text = client.files.create(file=("notes.txt", b"plain words"), purpose="assistants").id
    store = client.vector_stores.create(name="parity")
    refusals = [
        (lambda: client.vector_stores.create(file_ids=[text, image]), "file_ids", ".png"),
        (lambda: client.vector_stores.files.create(vector_store_id=store.id, file_id=bare), "file_id", "none"),
        (lambda: client.vector_stores.file_batches.create(vector_store_id=store.id, file_ids=[image, bare]),
         "file_ids", ".png, none"),
        (lambda: client.vector_stores.file_batches.create(vector_store_id=store.id, files=[
            {"file_id": text}, {"file_id": image}]), "files[1].file_id", ".png"),
        (lambda: client.beta.assistants.create(model="gpt-4o", tool_resources={
            "file_search": {"vector_stores": [{"file_ids": [image]}]}}),
         "tool_resources.file_search.vector_stores[0].file_ids", ".png"),
        (lambda: client.beta.threads.create(messages=[{"role": "user", "content": "look", "attachments": [
            {"file_id": text, "tools": [{"type": "file_search"}]},
            {"file_id": image, "tools": [{"type": "code_interpreter"}, {"type": "file_search"}]}]}]),
         "messages[0].attachments[1].file_id", ".png"),
    ]
    for attach, param, extensions in refusals:
        with pytest.raises(openai.BadRequestError) as refused:
            attach()
        error = sdk_error(refused.value)
        assert (error["param"], error["code"]) == (param, "unsupported_file"), error
        assert error["message"].startswith(f"Files with extensions [{extensions}] are not supported for retrieval.")
    assert client.vector_stores.files.list(vector_store_id=store.id).data == []

    thread = client.beta.threads.create()
    with pytest.raises(openai.BadRequestError):
        client.beta.threads.messages.create(thread_id=thread.id, role="user", content="x", attachments=[
            {"file_id": image, "tools": [{"type": "file_search"}]}])
    assert client.beta.threads.messages.list(thread_id=thread.id).data == []
    # What code_interpreter reads, it may still get; a PDF named without an extension is indexed by its content.
    client.beta.threads.messages.create(thread_id=thread.id, role="user", content="x", attachments=[
        {"file_id": image, "tools": [{"type": "code_interpreter"}]}])
    pdf = client.files.create(file=("scan", PDF_START + b"%%EOF\n"), purpose="assistants").id
    attached = client.vector_stores.files.create(vector_store_id=store.id, file_id=pdf)
    assert attached.status == "in_progress"


def test_metadata_of_a_helper_vector_store_is_checked_as_every_metadata(client: openai.OpenAI) -> None:
    """Metadata (at most 16 keys of 64 characters, string values of 512) got the contract's own error everywhere but
    in `tool_resources.file_search.vector_stores[i]`, where any fault was "Invalid value for ..." with no code."""
    param = "tool_resources.file_search.vector_stores[0].metadata"
    faults = [
        ({f"k{i}": "v" for i in range(17)}, param, "object_above_max_properties"),
        ({"k" * 65: "v"}, param, "string_above_max_length"),
        ({"k": "v" * 513}, f"{param}.k", "string_above_max_length"),
        ({"k": 1}, f"{param}.k", "invalid_type"),
    ]
    for metadata, where, code in faults:
        with pytest.raises(openai.BadRequestError) as refused:
            client.beta.threads.create(tool_resources={"file_search": {"vector_stores": [{"metadata": metadata}]}})
        error = sdk_error(refused.value)
        assert (error["param"], error["code"]) == (where, code), error
    thread = client.beta.threads.create(tool_resources={"file_search": {"vector_stores": [
        {"metadata": {"k" * 64: "v" * 512}}]}})
    assert thread.tool_resources is not None and thread.tool_resources.file_search is not None
    [store_id] = thread.tool_resources.file_search.vector_store_ids or []
    assert client.vector_stores.retrieve(store_id).metadata == {"k" * 64: "v" * 512}


class Address(BaseModel):
    """A nested model, as `openai.pydantic_function_tool` makes strict schemas of them ($defs, $ref)."""

    city: str
    zip_code: str | None = None


class ShipTo(BaseModel):
    """A strict function's parameters made by the SDK's helper: they follow strict mode's rules."""

    name: str
    address: Address
    tags: list[str] = []


def test_strict_schemas_that_strict_mode_cannot_enforce_are_refused(client: openai.OpenAI) -> None:
    """Structured Outputs (the docs' "Supported schemas") needs every object to set `additionalProperties: false`
    and to list each property in `required`: hosted refused a strict function or json_schema breaking that ("Invalid
    schema for function 'f': In context=(), 'additionalProperties' is required to be supplied and to be false.");
    we stored it, and a model enforcing strict mode failed every run."""
    loose: dict[str, Any] = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    partly_required: dict[str, Any] = {"type": "object", "additionalProperties": False, "required": ["a"],
                                       "properties": {"a": {"type": "string"}, "b": {"type": "string"}}}
    nested: dict[str, Any] = {"type": "object", "additionalProperties": False, "required": ["items"],
                              "properties": {"items": {"type": "array", "items": {"type": "object",
                                                                                  "properties": {}}}}}
    thread = client.beta.threads.create()
    assistant = client.beta.assistants.create(model="gpt-4o")
    refusals: list[tuple[Callable[[], object], str, str, str]] = [
        (lambda: client.beta.assistants.create(model="gpt-4o", tools=[
            {"type": "code_interpreter"},
            {"type": "function", "function": {"name": "f", "parameters": loose, "strict": True}}]),
         "tools[1].function.parameters", "invalid_function_parameters",
         "Invalid schema for function 'f': In context=(), 'additionalProperties' is required to be supplied and to "
         "be false."),
        (lambda: client.beta.assistants.update(assistant.id, tools=[
            {"type": "function", "function": {"name": "g", "parameters": partly_required, "strict": True}}]),
         "tools[0].function.parameters", "invalid_function_parameters",
         "Invalid schema for function 'g': In context=(), 'required' is required to be supplied and to be an array "
         "including every key in properties. Missing 'b'."),
        (lambda: client.beta.threads.runs.create(thread_id=thread.id, assistant_id=assistant.id, response_format={
            "type": "json_schema", "json_schema": {"name": "out", "schema": nested, "strict": True}}),
         "response_format", "invalid_json_schema",
         "Invalid schema for response_format 'out': In context=('properties', 'items', 'items'), "
         "'additionalProperties' is required to be supplied and to be false."),
        (lambda: client.beta.threads.create_and_run(assistant_id=assistant.id, response_format={
            "type": "json_schema", "json_schema": {"name": "out", "schema": {"type": "array"}, "strict": True}}),
         "response_format", "invalid_json_schema",
         "Invalid schema for response_format 'out': schema must be a JSON Schema of 'type: \"object\"', got "
         "'type: \"array\"'."),
    ]
    for create, param, code, message in refusals:
        with pytest.raises(openai.BadRequestError) as refused:
            create()
        error = sdk_error(refused.value)
        assert (error["param"], error["code"], error["message"]) == (param, code, message)
    assert client.beta.threads.runs.list(thread_id=thread.id).data == []
    # Not strict: any schema, as before. Strict and following the rules (the SDK's helper): taken.
    client.beta.assistants.create(model="gpt-4o", tools=[
        {"type": "function", "function": {"name": "f", "parameters": loose}}], response_format={
        "type": "json_schema", "json_schema": {"name": "out", "schema": nested}})
    helper = openai.pydantic_function_tool(ShipTo)
    taken = client.beta.assistants.create(model="gpt-4o", tools=[helper], response_format={  # type: ignore[list-item]
        "type": "json_schema", "json_schema": {"name": "out", "schema": helper["function"]["parameters"],
                                               "strict": True}})
    assert taken.tools[0].type == "function" and taken.tools[0].function.strict is True
