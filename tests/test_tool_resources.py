"""tool_resources name only the project's own vector stores and files: an unknown id is a 404, as hosted."""

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from threadline_devstack.sql import Db
from threadline_devstack.stack import Stack

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

STORES_PARAM = "tool_resources.file_search.vector_store_ids"
FILES_PARAM = "tool_resources.code_interpreter.file_ids"
Call = Callable[[openai.OpenAI, dict[str, Any]], object]


@pytest.fixture(scope="module")
def other_client(stack: Stack) -> Iterator[openai.OpenAI]:
    """A client of another project (tests/conftest.py)."""
    sdk = openai.OpenAI(base_url=stack.base_url, api_key="sk-threadline-other", max_retries=0, timeout=30)
    yield sdk
    sdk.close()


def _not_found(kind: str, object_id: str, param: str) -> dict[str, Any]:
    return {"message": f"No {kind} found with id '{object_id}'.", "type": "invalid_request_error", "param": param,
            "code": None}


def _create_assistant(client: openai.OpenAI, resources: dict[str, Any]) -> object:
    return client.beta.assistants.create(model="gpt-4o", tool_resources=resources)  # type: ignore[arg-type]


def _update_assistant(client: openai.OpenAI, resources: dict[str, Any]) -> object:
    assistant = client.beta.assistants.create(model="gpt-4o")
    try:
        return client.beta.assistants.update(assistant.id, tool_resources=resources)  # type: ignore[arg-type]
    finally:
        assert client.beta.assistants.retrieve(assistant.id).tool_resources == assistant.tool_resources


def _create_thread(client: openai.OpenAI, resources: dict[str, Any]) -> object:
    return client.beta.threads.create(tool_resources=resources)  # type: ignore[arg-type]


def _update_thread(client: openai.OpenAI, resources: dict[str, Any]) -> object:
    thread = client.beta.threads.create()
    try:
        return client.beta.threads.update(thread.id, tool_resources=resources)  # type: ignore[arg-type]
    finally:
        assert client.beta.threads.retrieve(thread.id).tool_resources == thread.tool_resources


def _create_and_run(client: openai.OpenAI, resources: dict[str, Any]) -> object:
    assistant = client.beta.assistants.create(model="gpt-4o")
    return client.beta.threads.create_and_run(assistant_id=assistant.id, tool_resources=resources)  # type: ignore[call-overload]


def _create_and_run_thread(client: openai.OpenAI, resources: dict[str, Any]) -> object:
    assistant = client.beta.assistants.create(model="gpt-4o")
    thread: dict[str, Any] = {"tool_resources": resources}
    return client.beta.threads.create_and_run(assistant_id=assistant.id, thread=thread)  # type: ignore[call-overload]


CALLS: list[tuple[Call, str]] = [
    (_create_assistant, ""), (_update_assistant, ""), (_create_thread, ""), (_update_thread, ""),
    (_create_and_run, ""), (_create_and_run_thread, "thread."),
]
"""Every request that stores tool_resources, with the prefix of the param its errors name."""


@pytest.mark.parametrize("call,prefix", CALLS, ids=lambda c: getattr(c, "__name__", ""))
def test_unknown_vector_store_is_404(client: openai.OpenAI, call: Call, prefix: str) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        call(client, {"file_search": {"vector_store_ids": ["vs_nope"]}})
    assert caught.value.body == _not_found("vector store", "vs_nope", prefix + STORES_PARAM)


@pytest.mark.parametrize("call,prefix", CALLS, ids=lambda c: getattr(c, "__name__", ""))
def test_unknown_code_interpreter_file_is_404(client: openai.OpenAI, call: Call, prefix: str) -> None:
    real = client.files.create(file=("a.csv", b"a\n1\n", "text/csv"), purpose="assistants").id
    with pytest.raises(openai.NotFoundError) as caught:
        call(client, {"code_interpreter": {"file_ids": [real, "file-nope"]}})
    assert caught.value.body == _not_found("file", "file-nope", prefix + FILES_PARAM)


@pytest.mark.parametrize("call,prefix", CALLS, ids=lambda c: getattr(c, "__name__", ""))
def test_helper_store_errors_name_their_param(client: openai.OpenAI, call: Call, prefix: str) -> None:
    store = client.vector_stores.create(name="mine")
    with pytest.raises(openai.BadRequestError) as caught:
        call(client, {"file_search": {"vector_store_ids": [store.id], "vector_stores": [{"file_ids": []}]}})
    assert caught.value.body["param"] == prefix + "tool_resources.file_search.vector_stores"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as caught:
        call(client, {"file_search": {"vector_stores": [{"file_ids": "file-x"}]}})
    assert caught.value.body["param"] == prefix + "tool_resources.file_search.vector_stores[0].file_ids"  # type: ignore[index]


def test_another_projects_or_deleted_ids_are_404(client: openai.OpenAI, other_client: openai.OpenAI) -> None:
    store = client.vector_stores.create(name="mine")
    file_id = client.files.create(file=("a.csv", b"a\n1\n", "text/csv"), purpose="assistants").id
    with pytest.raises(openai.NotFoundError) as caught:
        _create_assistant(other_client, {"file_search": {"vector_store_ids": [store.id]}})
    assert caught.value.body == _not_found("vector store", store.id, STORES_PARAM)
    with pytest.raises(openai.NotFoundError) as caught:
        _create_thread(other_client, {"code_interpreter": {"file_ids": [file_id]}})
    assert caught.value.body == _not_found("file", file_id, FILES_PARAM)
    client.vector_stores.delete(store.id)
    with pytest.raises(openai.NotFoundError) as caught:
        _create_thread(client, {"file_search": {"vector_store_ids": [store.id]}})
    assert caught.value.body == _not_found("vector store", store.id, STORES_PARAM)


def test_known_ids_are_stored(client: openai.OpenAI) -> None:
    store = client.vector_stores.create(name="mine")
    file_id = client.files.create(file=("a.csv", b"a\n1\n", "text/csv"), purpose="assistants").id
    resources = {"file_search": {"vector_store_ids": [store.id]}, "code_interpreter": {"file_ids": [file_id]}}
    assistant = client.beta.assistants.create(model="gpt-4o", tool_resources=resources)  # type: ignore[arg-type]
    assert assistant.tool_resources is not None and assistant.tool_resources.model_dump() == resources
    thread_params: dict[str, Any] = {"tool_resources": resources}
    run = client.beta.threads.create_and_run(assistant_id=assistant.id, thread=thread_params)  # type: ignore[call-overload]
    thread = client.beta.threads.retrieve(run.thread_id)
    assert thread.tool_resources is not None and thread.tool_resources.model_dump() == resources


def test_deleting_a_vector_store_removes_it_from_tool_resources(client: openai.OpenAI, db: Db) -> None:
    """As hosted (the cookbook's recorded output shows `vector_store_ids: []` after the delete): code that walks the
    ids, or attaches a store only when none is, met a store that no longer existed."""
    deleted, kept = client.vector_stores.create(name="deleted"), client.vector_stores.create(name="kept")
    file_id = client.files.create(file=("d.csv", b"d\n1\n", "text/csv"), purpose="assistants").id
    resources: Any = {"file_search": {"vector_store_ids": [deleted.id]}, "code_interpreter": {"file_ids": [file_id]}}
    assistant = client.beta.assistants.create(model="gpt-4o", tool_resources=resources)
    thread = client.beta.threads.create(tool_resources=resources)
    other = client.beta.threads.create(tool_resources={"file_search": {"vector_store_ids": [kept.id]}})
    assert client.vector_stores.delete(deleted.id).deleted
    left = {"file_search": {"vector_store_ids": []}, "code_interpreter": {"file_ids": [file_id]}}
    for found in (client.beta.assistants.retrieve(assistant.id), client.beta.threads.retrieve(thread.id)):
        assert found.tool_resources is not None and found.tool_resources.model_dump() == left, found
    untouched = client.beta.threads.retrieve(other.id).tool_resources
    assert untouched is not None and untouched.file_search is not None
    assert untouched.file_search.vector_store_ids == [kept.id]
    assert db.fetchval("SELECT count(*) FROM pg_indexes WHERE indexname IN"
                       " ('assistants_vector_store_ids_idx', 'threads_vector_store_ids_idx')") == 2


def test_a_tool_without_resources_shows_empty_ones(client: openai.OpenAI, http: httpx.Client) -> None:
    """The cookbook adds code_interpreter to an assistant, then extends `tool_resources.code_interpreter.file_ids`:
    hosted shows `{"code_interpreter": {"file_ids": []}}` for a tool with no resources (`{}` without tools)."""
    assistant = client.beta.assistants.create(model="gpt-4o", name="Math Tutor")
    assert http.get(f"/assistants/{assistant.id}").json()["tool_resources"] == {}
    updated = client.beta.assistants.update(assistant.id, tools=[{"type": "code_interpreter"}])
    assert updated.tool_resources is not None and updated.tool_resources.code_interpreter is not None
    assert updated.tool_resources.code_interpreter.file_ids == []
    both = client.beta.assistants.update(assistant.id, tools=[{"type": "code_interpreter"}, {"type": "file_search"}])
    assert http.get(f"/assistants/{both.id}").json()["tool_resources"] == {
        "code_interpreter": {"file_ids": []}, "file_search": {"vector_store_ids": []}}
    listed = [a for a in client.beta.assistants.list(limit=100) if a.id == assistant.id]
    assert listed and listed[0].tool_resources == both.tool_resources


def test_an_update_that_does_not_name_tool_resources_keeps_them(client: openai.OpenAI) -> None:
    """Renaming an assistant or tagging a thread leaves its tool_resources as they are; naming them replaces them."""
    store = client.vector_stores.create(name="kept")
    file_id = client.files.create(file=("k.csv", b"k\n1\n", "text/csv"), purpose="assistants").id
    resources = {"file_search": {"vector_store_ids": [store.id]}, "code_interpreter": {"file_ids": [file_id]}}
    assistant = client.beta.assistants.create(model="gpt-4o", tool_resources=resources)  # type: ignore[arg-type]
    thread = client.beta.threads.create(tool_resources=resources)  # type: ignore[arg-type]
    for updated in (client.beta.assistants.update(assistant.id, name="renamed"),
                    client.beta.assistants.retrieve(assistant.id),
                    client.beta.threads.update(thread.id, metadata={"tag": "x"}),
                    client.beta.threads.retrieve(thread.id)):
        assert updated.tool_resources is not None and updated.tool_resources.model_dump() == resources, updated
    replaced = client.beta.assistants.update(assistant.id, tool_resources={"code_interpreter": {"file_ids": []}})
    assert replaced.tool_resources is not None and replaced.tool_resources.model_dump() == {
        "code_interpreter": {"file_ids": []}, "file_search": None}


def test_refused_request_creates_no_helper_store(client: openai.OpenAI, db: Db, marker: str) -> None:
    file_id = client.files.create(file=("a.txt", b"helper text", "text/plain"), purpose="assistants").id
    with pytest.raises(openai.NotFoundError) as caught:
        client.beta.threads.create(tool_resources={
            "code_interpreter": {"file_ids": ["file-nope"]},
            "file_search": {"vector_stores": [{"file_ids": [file_id], "metadata": {"marker": marker}}]}})
    assert caught.value.body == _not_found("file", "file-nope", FILES_PARAM)
    assert db.fetchval("SELECT count(*) FROM vector_stores WHERE doc->'metadata'->>'marker' = $1", marker) == 0


@pytest.mark.parametrize("call,prefix", CALLS, ids=lambda c: getattr(c, "__name__", ""))
def test_unknown_helper_store_file_is_404_naming_its_param(client: openai.OpenAI, db: Db, call: Call, prefix: str,
                                                          marker: str) -> None:
    """An unknown file in a vector_stores helper named `file_id`, a param the request does not have."""
    real = client.files.create(file=("a.txt", b"helper text", "text/plain"), purpose="assistants").id
    with pytest.raises(openai.NotFoundError) as caught:
        call(client, {"file_search": {"vector_stores": [{"file_ids": [real, "file-nope"],
                                                        "metadata": {"marker": marker}}]}})
    assert caught.value.body == _not_found(
        "file", "file-nope", prefix + "tool_resources.file_search.vector_stores[0].file_ids")
    assert db.fetchval("SELECT count(*) FROM vector_stores WHERE doc->'metadata'->>'marker' = $1", marker) == 0


def _updated_assistant(client: openai.OpenAI, resources: dict[str, Any]) -> object:
    assistant = client.beta.assistants.create(model="gpt-4o")
    return client.beta.assistants.update(assistant.id, tool_resources=resources)  # type: ignore[arg-type]


def _updated_thread(client: openai.OpenAI, resources: dict[str, Any]) -> object:
    return client.beta.threads.update(client.beta.threads.create().id, tool_resources=resources)  # type: ignore[arg-type]


STORING: list[Call] = [_create_assistant, _updated_assistant, _create_thread, _updated_thread, _create_and_run,
                       _create_and_run_thread]
"""Every request that stores tool_resources, as it succeeds."""


def _stored_resources(client: openai.OpenAI, call: Call, resources: dict[str, Any]) -> dict[str, Any]:
    """The tool_resources a request stored, read back from the assistant or thread it made or changed."""
    made = call(client, resources)
    if getattr(made, "object", "") == "thread.run":  # create-thread-and-run: both kinds go to the new thread
        stored = client.beta.threads.retrieve(made.thread_id).tool_resources  # type: ignore[attr-defined]
    else:
        stored = made.tool_resources  # type: ignore[attr-defined]
    assert stored is not None
    dumped: dict[str, Any] = stored.model_dump(exclude_none=True)
    return dumped


@pytest.mark.parametrize("call", STORING, ids=lambda c: getattr(c, "__name__", ""))
def test_repeated_code_interpreter_files_are_stored_once(client: openai.OpenAI, call: Call) -> None:
    """`file_ids: [a, b, a]` was stored as given, so the sandbox was handed `a` twice."""
    a, b = (client.files.create(file=(f"{n}.csv", b"a\n1\n", "text/csv"), purpose="assistants").id for n in "ab")
    stored = _stored_resources(client, call, {"code_interpreter": {"file_ids": [a, b, a, b, b]}})
    assert stored["code_interpreter"] == {"file_ids": [a, b]}


@pytest.mark.parametrize("call", STORING, ids=lambda c: getattr(c, "__name__", ""))
def test_repeated_helper_store_files_are_attached_once(client: openai.OpenAI, call: Call) -> None:
    a, b = (client.files.create(file=(f"{n}.txt", b"some text", "text/plain"), purpose="assistants").id
            for n in "ab")
    stored = _stored_resources(client, call, {"file_search": {"vector_stores": [{"file_ids": [a, b, a]}]}})
    [store_id] = stored["file_search"]["vector_store_ids"]
    assert sorted(f.id for f in client.vector_stores.files.list(store_id)) == sorted([a, b])
