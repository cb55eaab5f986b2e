"""Assistants API through the official SDK: shapes, defaults, modify semantics, pagination, errors, isolation."""

from typing import Any

import openai
import pytest
from openai.types.beta import Assistant, AssistantDeleted

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ASSISTANT_KEYS = {"id", "object", "created_at", "name", "description", "model", "instructions", "tools",
                  "tool_resources", "metadata", "temperature", "top_p", "response_format"}


def _raw_create(client: openai.OpenAI, **kwargs: Any) -> dict[str, Any]:
    response = client.beta.assistants.with_raw_response.create(**kwargs)
    body: dict[str, Any] = response.http_response.json()
    return body


def test_create_minimal_has_hosted_defaults(client: openai.OpenAI) -> None:
    raw = _raw_create(client, model="gpt-4-turbo")
    assert ASSISTANT_KEYS <= raw.keys()
    assistant = Assistant.model_validate(raw)
    assert assistant.id.startswith("asst_")
    assert assistant.object == "assistant"
    assert assistant.model == "gpt-4-turbo"
    assert assistant.tools == []
    assert raw["metadata"] == {}
    assert raw["name"] is None and raw["description"] is None and raw["instructions"] is None
    assert raw["temperature"] == 1.0 and raw["top_p"] == 1.0
    assert raw["response_format"] == "auto"


def test_create_full_round_trips(client: openai.OpenAI) -> None:
    tools: list[Any] = [
        {"type": "code_interpreter"},
        {"type": "file_search", "file_search": {"max_num_results": 7,
                                                "ranking_options": {"ranker": "auto", "score_threshold": 0.25}}},
        {"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                          "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                         "required": ["city"], "additionalProperties": False},
                                          "strict": True}},
    ]
    file_id = client.files.create(file=("data.csv", b"x,y\n1,2\n", "text/csv"), purpose="assistants").id
    store_id = client.vector_stores.create(name="docs").id
    created = client.beta.assistants.create(
        model="gpt-4o", name="Math Tutor", description="helps", instructions="Be brief.", tools=tools,
        tool_resources={"code_interpreter": {"file_ids": [file_id]}, "file_search": {"vector_store_ids": [store_id]}},
        metadata={"team": "a", "k" * 64: "v" * 512}, temperature=0.2, top_p=0.5,
        response_format={"type": "json_schema", "json_schema": {
            "name": "answer", "schema": {"type": "object", "additionalProperties": False}, "strict": True}},
    )
    fetched = client.beta.assistants.retrieve(created.id)
    assert fetched == created
    assert fetched.name == "Math Tutor" and fetched.description == "helps" and fetched.instructions == "Be brief."
    assert [t.type for t in fetched.tools] == ["code_interpreter", "file_search", "function"]
    file_search = fetched.tools[1]
    assert file_search.type == "file_search" and file_search.file_search is not None
    assert file_search.file_search.max_num_results == 7
    assert file_search.file_search.ranking_options is not None
    assert file_search.file_search.ranking_options.score_threshold == 0.25
    function = fetched.tools[2]
    assert function.type == "function"
    assert function.function.name == "get_weather" and function.function.strict is True
    assert function.function.parameters == tools[2]["function"]["parameters"]
    assert fetched.tool_resources is not None and fetched.tool_resources.code_interpreter is not None
    assert fetched.tool_resources.code_interpreter.file_ids == [file_id]
    assert fetched.tool_resources.file_search is not None
    assert fetched.tool_resources.file_search.vector_store_ids == [store_id]
    assert fetched.metadata == {"team": "a", "k" * 64: "v" * 512}
    assert fetched.temperature == 0.2 and fetched.top_p == 0.5
    assert fetched.response_format is not None and not isinstance(fetched.response_format, str)
    assert fetched.response_format.type == "json_schema"


def test_file_search_tool_gets_default_ranking_options(client: openai.OpenAI) -> None:
    raw = _raw_create(client, model="gpt-4o", tools=[{"type": "file_search"}])
    assert raw["tools"][0]["type"] == "file_search"
    assert raw["tools"][0]["file_search"]["ranking_options"] == {"ranker": "default_2024_08_21",
                                                                 "score_threshold": 0.0}


def test_response_format_variants(client: openai.OpenAI) -> None:
    schema = {"type": "json_schema", "json_schema": {"name": "answer", "strict": True, "schema": {
        "type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"],
        "additionalProperties": False}}}
    for fmt in ("auto", {"type": "text"}, {"type": "json_object"}, schema):
        raw = _raw_create(client, model="gpt-4o", response_format=fmt)
        assert raw["response_format"] == fmt
        listed = client.beta.assistants.with_raw_response.list(limit=1).http_response.json()["data"][0]
        assert listed["id"] == raw["id"] and listed["response_format"] == fmt  # wire names ("schema")


def test_modify_replaces_only_given_fields(client: openai.OpenAI) -> None:
    created = client.beta.assistants.create(model="gpt-4o", name="before", instructions="keep me",
                                            tools=[{"type": "code_interpreter"}], metadata={"a": "1", "b": "2"})
    updated = client.beta.assistants.update(created.id, name="after", metadata={"c": "3"},
                                            tools=[{"type": "function", "function": {"name": "f"}}],
                                            temperature=1.5)
    assert updated.id == created.id and updated.created_at == created.created_at
    assert updated.name == "after"
    assert updated.instructions == "keep me"
    assert updated.model == "gpt-4o"
    assert updated.metadata == {"c": "3"}  # replaced, not merged
    assert [t.type for t in updated.tools] == ["function"]
    assert updated.temperature == 1.5
    assert client.beta.assistants.retrieve(created.id) == updated
    again = client.beta.assistants.update(created.id, model="gpt-4.1")
    assert again.model == "gpt-4.1" and again.name == "after"
    unchanged = client.beta.assistants.update(created.id)
    assert unchanged == again


def test_delete(client: openai.OpenAI) -> None:
    created = client.beta.assistants.create(model="gpt-4o")
    response = client.beta.assistants.with_raw_response.delete(created.id)
    raw = response.http_response.json()
    assert raw == {"id": created.id, "object": "assistant.deleted", "deleted": True}
    assert AssistantDeleted.model_validate(raw).deleted
    with pytest.raises(openai.NotFoundError) as err:
        client.beta.assistants.retrieve(created.id)
    assert err.value.body == {"message": f"No assistant found with id '{created.id}'.",
                              "type": "invalid_request_error", "param": None, "code": None}
    with pytest.raises(openai.NotFoundError):
        client.beta.assistants.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        client.beta.assistants.update(created.id, name="x")


def test_unknown_id_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.beta.assistants.retrieve("asst_doesnotexist")
    assert err.value.status_code == 404
    assert "No assistant found with id 'asst_doesnotexist'." in str(err.value)


def test_list_pagination(client: openai.OpenAI) -> None:
    ids = [client.beta.assistants.create(model="gpt-4o", name=f"p{i}").id for i in range(5)]
    assert ids == sorted(ids)
    # Newest first by default: nothing newer than ids[-1] exists yet.
    page = client.beta.assistants.list(limit=2)
    assert [a.id for a in page.data] == [ids[4], ids[3]]
    assert page.has_more is True
    assert page.model_extra == {"object": "list", "first_id": ids[4], "last_id": ids[3]}
    # Ascending after a cursor, page by page and with the SDK's auto-pagination.
    asc = client.beta.assistants.list(order="asc", after=ids[0], limit=3)
    assert [a.id for a in asc.data] == ids[1:4] and asc.has_more is True
    last = client.beta.assistants.list(order="asc", after=ids[3], limit=3)
    assert [a.id for a in last.data] == [ids[4]] and last.has_more is False
    assert [a.id for a in client.beta.assistants.list(order="asc", after=ids[0], limit=2)] == ids[1:]
    # `before`: the items just before the cursor, in list order.
    before = client.beta.assistants.list(order="desc", before=ids[1], limit=2)
    assert [a.id for a in before.data] == [ids[3], ids[2]] and before.has_more is True
    window = client.beta.assistants.list(order="asc", after=ids[0], before=ids[4])
    assert [a.id for a in window.data] == ids[1:4] and window.has_more is False
    empty = client.beta.assistants.list(order="asc", after=ids[4])
    assert empty.data == [] and empty.has_more is False
    assert empty.model_extra == {"object": "list", "first_id": None, "last_id": None}


@pytest.mark.parametrize("params,param_name", [
    ({"limit": 0}, "limit"),
    ({"limit": 101}, "limit"),
    ({"order": "sideways"}, "order"),
])
def test_list_bad_query(client: openai.OpenAI, params: dict[str, Any], param_name: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.beta.assistants.list(extra_query=params)
    assert isinstance(err.value.body, dict) and err.value.body["param"] == param_name


@pytest.mark.parametrize("kwargs,param,code", [
    ({}, "model", "missing_required_parameter"),
    ({"model": 5}, "model", "invalid_type"),
    ({"model": "m", "extra_body": {"colour": "red"}}, "colour", "unknown_parameter"),
    ({"model": "m", "name": "n" * 257}, "name", "string_above_max_length"),
    ({"model": "m", "temperature": 2.5}, "temperature", None),
    ({"model": "m", "temperature": "hot"}, "temperature", "invalid_type"),
    ({"model": "m", "top_p": -0.1}, "top_p", None),
    ({"model": "m", "tools": [{"type": "code_interpreter"}] * 129}, "tools", "array_above_max_length"),
    ({"model": "m", "tools": [{"type": "browser"}]}, "tools[0].type", "invalid_value"),
    ({"model": "m", "tools": [{"type": "function"}]}, "tools[0].function", "missing_required_parameter"),
    ({"model": "m", "tools": [{"type": "function", "function": {"name": "has space"}}]},
     "tools[0].function.name", "invalid_value"),
    ({"model": "m", "tools": [{"type": "file_search", "file_search": {"max_num_results": 51}}]},
     "tools[0].file_search.max_num_results", None),
    ({"model": "m", "tools": [{"type": "code_interpreter", "extra": 1}]}, "tools[0].extra", "unknown_parameter"),
    ({"model": "m", "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", "object_above_max_properties"),
    ({"model": "m", "metadata": {"k" * 65: "v"}}, "metadata", "string_above_max_length"),
    ({"model": "m", "metadata": {"k": "v" * 513}}, "metadata.k", "string_above_max_length"),
    ({"model": "m", "metadata": {"k": 1}}, "metadata.k", "invalid_type"),
    ({"model": "m", "response_format": "yaml"}, "response_format", "invalid_value"),
    ({"model": "m", "response_format": {"type": "json_schema"}}, "response_format.json_schema",
     "missing_required_parameter"),
    ({"model": "m", "tool_resources": {"file_search": {"vector_store_ids": ["a", "b"]}}},
     "tool_resources.file_search.vector_store_ids", "array_above_max_length"),
])
def test_create_validation(client: openai.OpenAI, kwargs: dict[str, Any], param: str, code: str | None) -> None:
    extra_body = kwargs.pop("extra_body", {})
    model = kwargs.pop("model", None)
    body = dict(kwargs)
    if model is not None:
        body["model"] = model
    with pytest.raises(openai.BadRequestError) as err:
        client.post("/assistants", body={**body, **extra_body}, cast_to=Assistant)
    error = err.value.body
    assert isinstance(error, dict)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    assert error["message"]


def test_modify_validation(client: openai.OpenAI) -> None:
    created = client.beta.assistants.create(model="gpt-4o")
    with pytest.raises(openai.BadRequestError) as err:
        client.beta.assistants.update(created.id, metadata={f"k{i}": "v" for i in range(17)})
    assert isinstance(err.value.body, dict) and err.value.body["param"] == "metadata"
    with pytest.raises(openai.BadRequestError):
        client.beta.assistants.update(created.id, extra_body={"object": "assistant"})
    assert client.beta.assistants.retrieve(created.id) == created


def test_function_parameters_must_be_an_object_schema_strict_or_not(client: openai.OpenAI) -> None:
    """Hosted refused a function whose parameters are not an object schema at assistant creation, strict or not
    (openai-java#407: "Invalid schema for function 'get_weather': schema must be a JSON Schema of 'type:
    "object"', got 'type: "string"'."): stored, every run on it would fail at the model."""
    bad: Any = [{"type": "code_interpreter"},
                {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "string"}}}]
    expected = ("Invalid schema for function 'get_weather': schema must be a JSON Schema of 'type: \"object\"', "
                "got 'type: \"string\"'.")
    with pytest.raises(openai.BadRequestError) as err:
        client.beta.assistants.create(model="gpt-4o", tools=bad)
    assert isinstance(err.value.body, dict)
    assert err.value.body["message"] == expected
    assert err.value.body["param"] == "tools[1].function.parameters"
    assert err.value.body["code"] == "invalid_function_parameters"
    created = client.beta.assistants.create(model="gpt-4o")
    with pytest.raises(openai.BadRequestError) as err:
        client.beta.assistants.update(created.id, tools=bad)
    assert isinstance(err.value.body, dict) and err.value.body["param"] == "tools[1].function.parameters"
    assert client.beta.assistants.retrieve(created.id) == created
    thread = client.beta.threads.create()
    with pytest.raises(openai.BadRequestError) as err:
        client.beta.threads.runs.create(thread_id=thread.id, assistant_id=created.id, tools=bad)
    assert isinstance(err.value.body, dict) and err.value.body["message"] == expected
    assert client.beta.threads.runs.list(thread.id).data == []
    # An object schema (typed, or with only properties) and an empty or absent one are a function's parameters.
    fine: Any = [{"type": "function", "function": {"name": f"f{i}", "parameters": parameters}}
                 for i, parameters in enumerate([{"type": "object", "properties": {"city": {"type": "string"}}},
                                                 {"properties": {}}, {}])]
    fine.append({"type": "function", "function": {"name": "g"}})
    assert len(client.beta.assistants.create(model="gpt-4o", tools=fine).tools) == 4


def test_an_assistant_too_large_to_run_is_refused(client: openai.OpenAI) -> None:
    """256,000 characters of instructions fit the contract but, in a 3-byte script, not a run's events: refused
    at create and modify (it was stored, and every run on it got a 413), naming the larger of the two."""
    cjk = "学" * 200_000
    with pytest.raises(openai.BadRequestError) as err:
        client.beta.assistants.create(model="gpt-4o", instructions=cjk)
    assert isinstance(err.value.body, dict)
    assert err.value.body["param"] == "instructions" and err.value.body["code"] == "request_too_large"
    created = client.beta.assistants.create(model="gpt-4o", instructions="学" * 150_000)
    big_tools: Any = [{"type": "function", "function": {"name": f"f{i}", "description": "d" * 2000}}
                      for i in range(120)]
    with pytest.raises(openai.BadRequestError) as err:
        client.beta.assistants.update(created.id, tools=big_tools)
    assert isinstance(err.value.body, dict) and err.value.body["param"] == "tools"
    assert client.beta.assistants.retrieve(created.id) == created  # the refused change was not kept
    thread = client.beta.threads.create(messages=[{"role": "user", "content": "hi"}])
    run = client.beta.threads.runs.create(thread_id=thread.id, assistant_id=created.id)
    assert run.instructions == created.instructions


def test_other_project_cannot_see_assistants(client: openai.OpenAI, other_client: openai.OpenAI) -> None:
    mine = client.beta.assistants.create(model="gpt-4o", name="mine")
    with pytest.raises(openai.NotFoundError):
        other_client.beta.assistants.retrieve(mine.id)
    with pytest.raises(openai.NotFoundError):
        other_client.beta.assistants.update(mine.id, name="stolen")
    with pytest.raises(openai.NotFoundError):
        other_client.beta.assistants.delete(mine.id)
    theirs = other_client.beta.assistants.create(model="gpt-4o", name="theirs")
    assert mine.id not in {a.id for a in other_client.beta.assistants.list(limit=100)}
    assert theirs.id not in {a.id for a in client.beta.assistants.list(limit=100)}
    assert client.beta.assistants.retrieve(mine.id).name == "mine"
