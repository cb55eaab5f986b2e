"""file_search end to end through the official SDK: a real PDF, a vector store, an assistant, a cited answer."""

import json
import re
import time
from typing import Any

import fixtures_docs as docs
import openai
import pytest
from openai.types.beta.threads import Message, Run
from openai.types.beta.threads.runs import FileSearchToolCall
from run_helpers import wait_for

from threadline_devstack.model_server import ScriptedModelServer
from threadline_devstack.sql import Db

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

INCLUDE = "step_details.tool_calls[*].file_search.results[*].content"
SEARCH = '[[call:file_search:{"query": "vacation days"}]]'


@pytest.fixture(scope="module")
def hr_store(client: openai.OpenAI) -> tuple[str, str]:
    """A vector store holding the HR policy PDF: (vector_store_id, file_id)."""
    store = client.vector_stores.create(name="HR")
    vs_file = client.vector_stores.files.upload_and_poll(vector_store_id=store.id,
                                                         file=("hr-policy.pdf", docs.pdf(), "application/pdf"))
    assert vs_file.status == "completed", vs_file.last_error
    return store.id, vs_file.id


def _run(client: openai.OpenAI, thread_id: str, assistant_id: str) -> Run:
    run = client.beta.threads.runs.create_and_poll(thread_id=thread_id, assistant_id=assistant_id,
                                                   poll_interval_ms=200)
    assert run.status == "completed", run.last_error
    return run


def _answer(client: openai.OpenAI, thread_id: str, run_id: str) -> Message:
    messages = list(client.beta.threads.messages.list(thread_id=thread_id, run_id=run_id))
    assert len(messages) == 1 and messages[0].role == "assistant"
    return messages[0]


def _file_search_call(client: openai.OpenAI, thread_id: str, run_id: str, **kwargs: Any) -> FileSearchToolCall:
    steps = list(client.beta.threads.runs.steps.list(run_id=run_id, thread_id=thread_id, order="asc", **kwargs))
    calls = [c for s in steps if s.step_details.type == "tool_calls" for c in s.step_details.tool_calls]
    assert len(calls) == 1 and calls[0].type == "file_search"
    assert isinstance(calls[0], FileSearchToolCall)
    return calls[0]


def test_vacation_days_answer_cites_the_hr_policy(client: openai.OpenAI, model: ScriptedModelServer,
                                                  hr_store: tuple[str, str], marker: str) -> None:
    store_id, file_id = hr_store
    assistant = client.beta.assistants.create(model="gpt-4o", tools=[{"type": "file_search"}],
                                              tool_resources={"file_search": {"vector_store_ids": [store_id]}})
    thread = client.beta.threads.create(messages=[{"role": "user", "content": f"{marker} How many vacation days "
                                                   f"does an employee get? {SEARCH}"}])
    run = _run(client, thread.id, assistant.id)

    # the model received the matching chunk as the tool's output
    tool_messages = [m for r in model.find_requests(marker) for m in r["messages"] if m.get("role") == "tool"]
    assert tool_messages and "27 paid vacation days" in tool_messages[-1]["content"]

    text = _answer(client, thread.id, run.id).content[0]
    assert text.type == "text"
    assert "27 paid vacation days" in text.text.value
    citations = [a for a in text.text.annotations if a.type == "file_citation"]
    assert citations, text.text
    first = citations[0]
    assert first.file_citation.file_id == file_id
    assert text.text.value[first.start_index:first.end_index] == first.text
    assert re.fullmatch(r"【\d+:\d+†source】", first.text), "the hosted API's marker (code strips `†source】`)"
    assert "hr-policy.pdf" in tool_messages[-1]["content"], "the model still learns the file's name"

    call = _file_search_call(client, thread.id, run.id)
    assert call.file_search.results
    top = call.file_search.results[0]
    assert (top.file_id, top.file_name) == (file_id, "hr-policy.pdf")
    assert 0 < top.score <= 1
    assert top.content is None  # only with include[]

    with_content = _file_search_call(client, thread.id, run.id, include=[INCLUDE])
    chunk = with_content.file_search.results[0].content
    assert chunk and chunk[0].type == "text" and "27 paid vacation days" in (chunk[0].text or "")
    step_id = next(s.id for s in client.beta.threads.runs.steps.list(run_id=run.id, thread_id=thread.id)
                   if s.step_details.type == "tool_calls")
    retrieved = client.beta.threads.runs.steps.retrieve(step_id, thread_id=thread.id, run_id=run.id,
                                                        include=[INCLUDE])
    assert retrieved.step_details.type == "tool_calls"
    found = retrieved.step_details.tool_calls[0]
    assert isinstance(found, FileSearchToolCall) and found.file_search.results
    assert found.file_search.results[0].content


def test_an_assistants_helper_stores_do_not_expire(client: openai.OpenAI, marker: str) -> None:
    """The hosted 7-day default expiry is for the thread helpers (a thread's `vector_stores`, message attachments);
    an assistant's helper store kept it too, and once it expired every run of the assistant failed."""
    file_id = client.files.create(file=("hr-policy.pdf", docs.pdf()), purpose="assistants").id
    helper = {"file_search": {"vector_stores": [{"file_ids": [file_id]}]}}
    assistant = client.beta.assistants.create(model="gpt-4o", tools=[{"type": "file_search"}],
                                              tool_resources=helper, name=marker)
    updated = client.beta.assistants.update(assistant.id, tool_resources=helper)  # type: ignore[arg-type]
    for made in (assistant, updated):
        assert made.tool_resources is not None and made.tool_resources.file_search is not None
        [store_id] = made.tool_resources.file_search.vector_store_ids or []
        store = client.vector_stores.retrieve(store_id)
        assert store.expires_after is None and store.expires_at is None, store_id
    thread = client.beta.threads.create(tool_resources=helper)
    assert thread.tool_resources is not None and thread.tool_resources.file_search is not None
    [thread_store] = thread.tool_resources.file_search.vector_store_ids or []
    expires = client.vector_stores.retrieve(thread_store).expires_after
    assert expires is not None and (expires.anchor, expires.days) == ("last_active_at", 7)


def test_thread_tool_resources_and_vector_stores_helper(client: openai.OpenAI, marker: str) -> None:
    file_id = client.files.create(file=("hr-policy.pdf", docs.pdf()), purpose="assistants").id
    assistant = client.beta.assistants.create(model="gpt-4o", tools=[{"type": "file_search"}])
    thread = client.beta.threads.create(
        messages=[{"role": "user", "content": f"{marker} vacation? {SEARCH}"}],
        tool_resources={"file_search": {"vector_stores": [{"file_ids": [file_id], "metadata": {"from": "helper"}}]}})
    assert thread.tool_resources is not None and thread.tool_resources.file_search is not None
    [store_id] = thread.tool_resources.file_search.vector_store_ids or []
    store = client.vector_stores.retrieve(store_id)
    assert store.metadata == {"from": "helper"} and store.file_counts.total == 1
    assert store.expires_after is not None and store.expires_after.days == 7  # helper stores expire, as hosted
    assert client.vector_stores.files.poll(file_id, vector_store_id=store_id).status == "completed"

    run = _run(client, thread.id, assistant.id)
    text = _answer(client, thread.id, run.id).content[0]
    assert text.type == "text" and "27 paid vacation days" in text.text.value
    assert next(a.file_citation.file_id for a in text.text.annotations if a.type == "file_citation") == file_id


def test_file_search_honours_max_num_results_and_threshold(client: openai.OpenAI, hr_store: tuple[str, str],
                                                           marker: str) -> None:
    store_id, _ = hr_store
    assistant = client.beta.assistants.create(
        model="gpt-4o", tools=[{"type": "file_search", "file_search": {
            "max_num_results": 1, "ranking_options": {"score_threshold": 0.0, "ranker": "auto"}}}],
        tool_resources={"file_search": {"vector_store_ids": [store_id]}})
    thread = client.beta.threads.create(messages=[{"role": "user", "content": f"{marker} {SEARCH}"}])
    run = _run(client, thread.id, assistant.id)
    assert len(_file_search_call(client, thread.id, run.id).file_search.results or []) == 1

    strict = client.beta.assistants.create(
        model="gpt-4o", tools=[{"type": "file_search", "file_search": {
            "ranking_options": {"score_threshold": 0.99, "ranker": "auto"}}}],
        tool_resources={"file_search": {"vector_store_ids": [store_id]}})
    thread = client.beta.threads.create(messages=[{"role": "user", "content": f"{marker} {SEARCH}"}])
    run = _run(client, thread.id, strict.id)
    assert _file_search_call(client, thread.id, run.id).file_search.results == []
    answer = _answer(client, thread.id, run.id).content[0]
    assert answer.type == "text" and answer.text.annotations == []


def test_vector_store_search_matches_file_search(client: openai.OpenAI, hr_store: tuple[str, str]) -> None:
    store_id, file_id = hr_store
    page = client.vector_stores.search(store_id, query="vacation days")
    first = next(iter(page))
    assert first.file_id == file_id and "27 paid vacation days" in first.content[0].text
    raw = client.vector_stores.with_raw_response.search(store_id, query="vacation days").http_response.json()
    assert raw["object"] == "vector_store.search_results.page" and raw["search_query"] == ["vacation days"]
    assert json.dumps(raw)  # plain JSON


def test_a_rare_exact_term_is_found_first_by_hybrid_search(client: openai.OpenAI, model: ScriptedModelServer,
                                                           marker: str) -> None:
    """Search was semantic only: with the local embedding model, the one chunk naming part XJ-4471 came third for
    "which pump is XJ-4471", behind two pump chunks with look-alike codes (XJ-4470, XJ-4417), and a model given
    max_num_results 2 never saw it. Keyword search finds the exact term; the fused score ranks that chunk first."""
    store = client.vector_stores.create(name="parts")
    batch = client.vector_stores.file_batches.upload_and_poll(store.id, files=[
        (name, text.encode(), "text/plain") for name, text in docs.PARTS_CATALOGUE.items()])
    assert batch.file_counts.completed == len(docs.PARTS_CATALOGUE)
    question = "which pump is XJ-4471"

    results = list(client.vector_stores.search(store.id, query=question))
    assert [r.filename for r in results][:1] == ["valves.txt"]
    assert "XJ-4471" in results[0].content[0].text
    assert all(0 <= r.score <= 1 for r in results)
    assert [r.score for r in results] == sorted((r.score for r in results), reverse=True)
    two = list(client.vector_stores.search(store.id, query=question, max_num_results=2))
    assert len(two) == 2 and two[0].filename == "valves.txt"

    assistant = client.beta.assistants.create(
        model="gpt-4o", tools=[{"type": "file_search", "file_search": {"max_num_results": 2}}],
        tool_resources={"file_search": {"vector_store_ids": [store.id]}})
    thread = client.beta.threads.create(messages=[{"role": "user", "content": (
        f'{marker} [[call:file_search:{{"query": "{question}"}}]]')}])
    run = _run(client, thread.id, assistant.id)
    call = _file_search_call(client, thread.id, run.id)
    assert call.file_search.results and call.file_search.results[0].file_name == "valves.txt"
    tool_messages = [m for r in model.find_requests(marker) for m in r["messages"] if m.get("role") == "tool"]
    assert tool_messages and "Replacement part XJ-4471" in tool_messages[-1]["content"]


def _kiwi_store(client: openai.OpenAI, marker: str) -> str:
    """A vector store that expires after a day without activity, holding one small indexed file."""
    store = client.vector_stores.create(name="kiwis", expires_after={"anchor": "last_active_at", "days": 1})
    vs_file = client.vector_stores.files.upload_and_poll(vector_store_id=store.id, file=(
        "kiwi.txt", f"Kiwis are green inside. {marker}".encode(), "text/plain"))
    assert vs_file.status == "completed", vs_file.last_error
    return store.id


def test_only_files_ready_for_use_are_searched(client: openai.OpenAI, db: Db, marker: str) -> None:
    """A file still being indexed (or failed, or detached) already has points: searches returned its chunks, a
    half-indexed file was cited, while the store said nothing was ready (hosted: `completed` = ready for use)."""
    store_id = _kiwi_store(client, marker)
    assistant = client.beta.assistants.create(model="gpt-4o", tools=[{"type": "file_search"}],
                                              tool_resources={"file_search": {"vector_store_ids": [store_id]}})

    def found() -> tuple[list[str], list[str]]:
        page = [hit.content[0].text for hit in client.vector_stores.search(store_id, query="kiwis green")]
        thread = client.beta.threads.create(messages=[{"role": "user", "content": (
            f'{marker} [[call:file_search:{{"query": "kiwis green"}}]]')}])
        run = _run(client, thread.id, assistant.id)
        call = _file_search_call(client, thread.id, run.id, include=[INCLUDE])
        return page, [r.content[0].text for r in call.file_search.results if r.content]

    assert found() == ([f"Kiwis are green inside. {marker}"],) * 2
    db.execute("UPDATE vector_store_files SET status = 'in_progress' WHERE vector_store_id = $1", store_id)
    assert found() == ([], [])
    db.execute("UPDATE vector_store_files SET status = 'completed' WHERE vector_store_id = $1", store_id)


def test_a_file_being_indexed_leaves_the_ready_files_their_places(client: openai.OpenAI, db: Db,
                                                                  marker: str) -> None:
    """Qdrant was asked for the store's best chunks and those of files not ready were dropped afterwards: a file
    being indexed (or indexed again) whose chunks were closer took every place, and search found nothing."""
    store = client.vector_stores.create(name="fruit")
    ready = client.vector_stores.files.upload_and_poll(vector_store_id=store.id, file=(
        "fruit.txt", f"Bananas are a yellow fruit. {marker}".encode(), "text/plain"))
    busy = client.vector_stores.files.upload_and_poll(
        vector_store_id=store.id, file=("kiwis.txt", b"Kiwis are a green fruit. " * 100, "text/plain"),
        chunking_strategy={"type": "static", "static": {"max_chunk_size_tokens": 100, "chunk_overlap_tokens": 0}})
    assert (ready.status, busy.status) == ("completed", "completed")
    query = "kiwis green fruit"
    assert [r.file_id for r in client.vector_stores.search(store.id, query=query, max_num_results=3)] == [busy.id] * 3
    db.execute("UPDATE vector_store_files SET status = 'in_progress' WHERE vector_store_id = $1 AND file_id = $2",
               store.id, busy.id)  # as while it is indexed (again): its points are there, it is not ready
    try:
        assert [r.file_id for r in client.vector_stores.search(store.id, query=query, max_num_results=3)] == [ready.id]
        assistant = client.beta.assistants.create(
            model="gpt-4o", tools=[{"type": "file_search", "file_search": {"max_num_results": 3}}],
            tool_resources={"file_search": {"vector_store_ids": [store.id]}})  # the assistant's: no wait for it
        thread = client.beta.threads.create(messages=[{"role": "user", "content": (
            f'{marker} [[call:file_search:{{"query": "{query}"}}]]')}])
        run = _run(client, thread.id, assistant.id)
        assert [r.file_id for r in _file_search_call(client, thread.id, run.id).file_search.results] == [ready.id]
    finally:
        db.execute("UPDATE vector_store_files SET status = 'completed' WHERE vector_store_id = $1", store.id)


def test_the_default_score_threshold_applies_when_not_sent(client: openai.OpenAI, marker: str) -> None:
    """Sending `score_threshold: 0`, the documented default, dropped a chunk less similar to the query than
    unrelated text (negative cosine) that omitting it returned with score 0.0: the default is applied either way."""
    store = client.vector_stores.create(name="threshold")
    batch = client.vector_stores.file_batches.upload_and_poll(store.id, files=[
        ("paris.txt", b"Paris is the capital of France and the Eiffel Tower stands there.", "text/plain"),
        ("kiwi.txt", b"Kiwis are green inside.", "text/plain")])  # about -0.09 from "paris" (local embedder)
    assert batch.file_counts.completed == 2
    omitted = [(r.filename, r.score) for r in client.vector_stores.search(store.id, query="paris")]
    sent = [(r.filename, r.score) for r in client.vector_stores.search(store.id, query="paris",
                                                                         ranking_options={"score_threshold": 0})]
    assert omitted == sent and [name for name, _ in omitted] == ["paris.txt"] and omitted[0][1] > 0

    assistant = client.beta.assistants.create(model="gpt-4o", tools=[{"type": "file_search"}],
                                              tool_resources={"file_search": {"vector_store_ids": [store.id]}})
    thread = client.beta.threads.create(messages=[{"role": "user", "content": (
        f'{marker} [[call:file_search:{{"query": "paris"}}]]')}])
    run = _run(client, thread.id, assistant.id)
    call = _file_search_call(client, thread.id, run.id)
    assert [r.file_name for r in call.file_search.results] == ["paris.txt"]
    assert call.file_search.ranking_options.score_threshold == 0


def test_searching_an_expired_vector_store_is_refused(client: openai.OpenAI, db: Db, marker: str) -> None:
    """A search answered and made the store active again (its status back to completed, a new expires_at): as
    hosted, an expired store stays expired and is not searched, like the writes to it (the same 400)."""
    store_id = _kiwi_store(client, marker)
    _expire(db, store_id)
    expired = client.vector_stores.retrieve(store_id)
    assert expired.status == "expired"
    with pytest.raises(openai.BadRequestError) as refused:
        client.vector_stores.search(store_id, query="kiwis green")
    error = refused.value.response.json()["error"]
    assert error["param"] == "vector_store_id" and f"Vector store {store_id} has expired" in error["message"]
    assert client.vector_stores.retrieve(store_id) == expired


def _expire(db: Db, store_id: str) -> None:
    """As if the store's `expires_after` days had passed without activity."""
    db.execute("UPDATE vector_stores SET doc = jsonb_set(doc, '{expires_at}', to_jsonb($2::bigint)) WHERE id = $1",
               store_id, int(time.time()) - 1)


def _assert_failed_for_expiry(run: Run, store_id: str) -> None:
    assert run.status == "failed" and run.failed_at is not None and run.last_error is not None
    assert run.last_error.code == "server_error"
    assert f"vector store {store_id} has expired" in run.last_error.message
    assert "Recreate the vector store with the same files" in run.last_error.message


def test_run_on_an_expired_vector_store_fails(client: openai.OpenAI, model: ScriptedModelServer, db: Db,
                                              marker: str) -> None:
    store_id = _kiwi_store(client, marker)
    assistant = client.beta.assistants.create(model="gpt-4o", tools=[{"type": "file_search"}])
    thread = client.beta.threads.create(messages=[{"role": "user", "content": f"{marker} kiwis? {SEARCH}"}],
                                        tool_resources={"file_search": {"vector_store_ids": [store_id]}})
    _expire(db, store_id)
    assert client.vector_stores.retrieve(store_id).status == "expired"

    run = client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id,
                                                   poll_interval_ms=200)
    _assert_failed_for_expiry(run, store_id)
    assert model.find_requests(marker) == []  # failed before the model was asked: nothing was searched
    assert list(client.beta.threads.runs.steps.list(run.id, thread_id=thread.id)) == []

    # as hosted, any run on that thread fails, even one without file_search
    _assert_failed_for_expiry(client.beta.threads.runs.create_and_poll(
        thread_id=thread.id, assistant_id=assistant.id, tools=[], poll_interval_ms=200), store_id)

    # an assistant's expired store fails its runs that search; a run without file_search does not use it
    holder = client.beta.assistants.create(model="gpt-4o", tools=[{"type": "file_search"}],
                                           tool_resources={"file_search": {"vector_store_ids": [store_id]}})
    other = client.beta.threads.create(messages=[{"role": "user", "content": f"{marker} kiwis? {SEARCH}"}])
    _assert_failed_for_expiry(client.beta.threads.runs.create_and_poll(
        thread_id=other.id, assistant_id=holder.id, poll_interval_ms=200), store_id)
    plain = client.beta.threads.runs.create_and_poll(thread_id=other.id, assistant_id=holder.id, tools=[],
                                                     poll_interval_ms=200)
    assert plain.status == "completed", plain.last_error

    # the fix the message gives: a new store with the same files in place of the expired one
    fresh = _kiwi_store(client, marker)
    client.beta.threads.update(thread.id, tool_resources={"file_search": {"vector_store_ids": [fresh]}})
    run = _run(client, thread.id, assistant.id)
    text = _answer(client, thread.id, run.id).content[0]
    assert text.type == "text" and marker in text.text.value


def test_vector_store_expiring_during_the_search_fails_the_run(client: openai.OpenAI, model: ScriptedModelServer,
                                                               db: Db, marker: str) -> None:
    store_id = _kiwi_store(client, marker)
    assistant = client.beta.assistants.create(model="gpt-4o", tools=[{"type": "file_search"}])
    thread = client.beta.threads.create(messages=[{"role": "user", "content": f"{marker} kiwis? {SEARCH}"}],
                                        tool_resources={"file_search": {"vector_store_ids": [store_id]}})
    # the executor waits while a file of the thread's store is in progress: the store expires meanwhile
    db.execute("UPDATE vector_store_files SET status = 'in_progress' WHERE vector_store_id = $1", store_id)
    run = client.beta.threads.runs.create(thread_id=thread.id, assistant_id=assistant.id)
    deadline = time.monotonic() + 30
    while not [s for s in client.beta.threads.runs.steps.list(run.id, thread_id=thread.id)
               if s.type == "tool_calls"]:
        assert time.monotonic() < deadline, "the model never called file_search"
        time.sleep(0.1)
    _expire(db, store_id)
    db.execute("UPDATE vector_store_files SET status = 'completed' WHERE vector_store_id = $1", store_id)

    run = wait_for(client, thread.id, run.id, {"failed"})
    _assert_failed_for_expiry(run, store_id)
    assert len(model.find_requests(marker)) == 1  # the model was not asked again
    [step] = client.beta.threads.runs.steps.list(run.id, thread_id=thread.id)
    assert step.status == "failed" and step.step_details.type == "tool_calls"
    [call] = step.step_details.tool_calls
    assert isinstance(call, FileSearchToolCall) and call.file_search.results == []


def test_the_default_max_num_results_depends_on_the_model(client: openai.OpenAI, marker: str) -> None:
    """The contract: `max_num_results` "The default is 20 for gpt-4* models and 5 for gpt-3.5-turbo"; a run of a
    gpt-3.5-turbo model got 20 results as well."""
    store = client.vector_stores.create(name="kiwis")
    vs_file = client.vector_stores.files.upload_and_poll(
        vector_store_id=store.id, file=("kiwis.txt", b"Kiwis are a green fruit. " * 200, "text/plain"),
        chunking_strategy={"type": "static", "static": {"max_chunk_size_tokens": 100, "chunk_overlap_tokens": 0}})
    assert vs_file.status == "completed", vs_file.last_error
    chunks = len(list(client.vector_stores.search(store.id, query="kiwis", max_num_results=50)))
    assert chunks > 5

    def results(model: str, options: dict[str, Any] | None = None) -> int:
        tool: dict[str, Any] = {"type": "file_search", **({"file_search": options} if options else {})}
        assistant = client.beta.assistants.create(model=model, tools=[tool],  # type: ignore[list-item]
                                                  tool_resources={"file_search": {"vector_store_ids": [store.id]}})
        thread = client.beta.threads.create(messages=[{"role": "user", "content": (
            f'{marker} [[call:file_search:{{"query": "kiwis"}}]]')}])
        run = _run(client, thread.id, assistant.id)
        return len(_file_search_call(client, thread.id, run.id).file_search.results or [])

    assert results("gpt-3.5-turbo") == 5
    assert results("gpt-3.5-turbo-0125") == 5
    assert results("gpt-3.5-turbo", {"max_num_results": 7}) == 7  # a value sent wins
    assert results("gpt-4o") == min(chunks, 20)


def test_results_stop_at_the_token_budget(client: openai.OpenAI, marker: str) -> None:
    """The hosted docs: file_search outputs fewer than `max_num_results` when "the total token size of all the
    retrieved chunks exceeds the token budget": 4,000 tokens for gpt-3.5-turbo, 16,000 for gpt-4* models. Large
    chunks all went to the model, up to 20 of them (80,000 tokens of 4,096-token chunks)."""
    size = 1500
    store = client.vector_stores.create(name="budget")
    vs_file = client.vector_stores.files.upload_and_poll(
        vector_store_id=store.id, file=("kiwis.txt", b"Kiwis are a green fruit. " * 3000, "text/plain"),
        chunking_strategy={"type": "static", "static": {"max_chunk_size_tokens": size, "chunk_overlap_tokens": 0}})
    assert vs_file.status == "completed", vs_file.last_error
    chunks = len(list(client.vector_stores.search(store.id, query="kiwis", max_num_results=50)))
    assert chunks > 16000 // size + 1

    def results(model: str) -> int:
        assistant = client.beta.assistants.create(
            model=model, tools=[{"type": "file_search", "file_search": {"max_num_results": 50}}],
            tool_resources={"file_search": {"vector_store_ids": [store.id]}})
        thread = client.beta.threads.create(messages=[{"role": "user", "content": (
            f'{marker} [[call:file_search:{{"query": "kiwis"}}]]')}])
        run = _run(client, thread.id, assistant.id)
        return len(_file_search_call(client, thread.id, run.id).file_search.results or [])

    # full chunks of `size` tokens, and perhaps the file's shorter last one
    assert results("gpt-4o") in (16000 // size, 16000 // size + 1)
    assert results("gpt-3.5-turbo") in (4000 // size, 4000 // size + 1)


def test_a_run_makes_its_vector_stores_active(client: openai.OpenAI, db: Db, marker: str) -> None:
    """The hosted docs: a store expires days after it was "last active (defined as the last time the vector store
    was part of a run)". Only a search moved `last_active_at`: a thread whose runs did not search let its store
    expire, and its next run failed."""
    file_id = client.files.create(file=("kiwi.txt", b"Kiwis are green inside."), purpose="assistants").id
    days_ago = int(time.time()) - 3 * 86400

    def made_idle(store_id: str) -> None:  # as if last active three days ago
        db.execute("UPDATE vector_stores SET doc = doc || jsonb_build_object('last_active_at', $2::bigint,"
                   " 'expires_at', CASE WHEN doc->'expires_after' = 'null'::jsonb THEN NULL"
                   " ELSE $2::bigint + 7 * 86400 END) WHERE id = $1", store_id, days_ago)
        assert client.vector_stores.retrieve(store_id).last_active_at == days_ago

    thread = client.beta.threads.create(messages=[{"role": "user", "content": f"{marker} [[reply:hello]]",
                                                   "attachments": [{"file_id": file_id,
                                                                    "tools": [{"type": "file_search"}]}]}])
    assert thread.tool_resources is not None and thread.tool_resources.file_search is not None
    [thread_store] = thread.tool_resources.file_search.vector_store_ids or []
    assistant_store = client.vector_stores.create(name="kiwis", file_ids=[file_id],
                                                  expires_after={"anchor": "last_active_at", "days": 7}).id
    searching = client.beta.assistants.create(model="gpt-4o", tools=[{"type": "file_search"}], tool_resources={
        "file_search": {"vector_store_ids": [assistant_store]}})
    plain = client.beta.assistants.create(model="gpt-4o", tool_resources={
        "file_search": {"vector_store_ids": [assistant_store]}})  # no file_search tool: its store is not used

    for assistant, active, idle in ((plain, [thread_store], [assistant_store]),
                                    (searching, [thread_store, assistant_store], [])):
        for store_id in (thread_store, assistant_store):
            made_idle(store_id)
        client.beta.threads.messages.create(thread.id, role="user", content=f"{marker} [[reply:hello]]")
        run = _run(client, thread.id, assistant.id)
        assert _answer(client, thread.id, run.id).content[0].type == "text"
        assert not [s for s in client.beta.threads.runs.steps.list(run.id, thread_id=thread.id)
                    if s.type == "tool_calls"], "no search: the run alone makes the stores active"
        for store_id in active:
            store = client.vector_stores.retrieve(store_id)
            assert store.last_active_at >= run.created_at, store_id
            assert store.expires_at == store.last_active_at + 7 * 86400
        for store_id in idle:
            assert client.vector_stores.retrieve(store_id).last_active_at == days_ago
