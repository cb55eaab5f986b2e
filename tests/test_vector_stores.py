"""Vector stores through the official SDK: CRUD, chunking validation, files, batches, polling helpers, search."""

import concurrent.futures
import contextlib
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import fixtures_docs as docs
import httpx
import openai
import pytest
from openai.types import VectorStore
from openai.types.vector_stores import VectorStoreFile, VectorStoreFileBatch
from run_helpers import poll

from threadline_devstack.sql import Db
from threadline_devstack.stack import Stack

OTHER_KEY = "sk-threadline-other"
VECTOR_STORE_KEYS = {"id", "object", "created_at", "name", "usage_bytes", "file_counts", "status", "last_active_at",
                     "metadata", "expires_after", "expires_at"}
AUTO = {"type": "static", "static": {"max_chunk_size_tokens": 800, "chunk_overlap_tokens": 400}}


@pytest.fixture(scope="module")
def other_client(stack: Stack) -> Iterator[openai.OpenAI]:
    """A client of another project."""
    sdk = openai.OpenAI(base_url=stack.base_url, api_key=OTHER_KEY, max_retries=0, timeout=30)
    yield sdk
    sdk.close()


def wait_for(check: Callable[[], Any], timeout: float = 120.0) -> Any:
    """Poll until `check()` is truthy (returns it) or fail after `timeout` seconds."""
    return poll(check, timeout=timeout, interval=0.2)


def upload(client: openai.OpenAI, name: str, data: bytes) -> str:
    """Upload a file for assistants; return its id."""
    return client.files.create(file=(name, data), purpose="assistants").id


def test_create_retrieve_modify_list_delete(client: openai.OpenAI) -> None:
    raw = client.vector_stores.with_raw_response.create(name="empty", metadata={"team": "hr"}).http_response.json()
    assert VECTOR_STORE_KEYS <= raw.keys()
    store = VectorStore.model_validate(raw)
    assert store.id.startswith("vs_") and store.object == "vector_store"
    assert store.status == "completed" and store.usage_bytes == 0
    assert store.file_counts.model_dump() == {"in_progress": 0, "completed": 0, "failed": 0, "cancelled": 0,
                                              "total": 0}
    assert store.metadata == {"team": "hr"} and store.expires_after is None and store.expires_at is None
    assert client.vector_stores.retrieve(store.id) == store

    updated = client.vector_stores.update(store.id, name="renamed",
                                          expires_after={"anchor": "last_active_at", "days": 7})
    assert updated.name == "renamed" and updated.metadata == {"team": "hr"}
    assert updated.expires_after is not None and updated.expires_after.days == 7
    assert updated.expires_at == updated.last_active_at + 7 * 86400  # type: ignore[operator]
    cleared = client.vector_stores.update(store.id, expires_after=None)
    assert cleared.expires_after is None and cleared.expires_at is None

    assert store.id in [v.id for v in client.vector_stores.list(limit=100)]
    deleted = client.vector_stores.delete(store.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (store.id, True, "vector_store.deleted")
    with pytest.raises(openai.NotFoundError):
        client.vector_stores.retrieve(store.id)


def test_vector_stores_are_project_scoped(client: openai.OpenAI, other_client: openai.OpenAI) -> None:
    store = client.vector_stores.create(name="mine")
    with pytest.raises(openai.NotFoundError):
        other_client.vector_stores.retrieve(store.id)
    with pytest.raises(openai.NotFoundError):
        other_client.vector_stores.search(store.id, query="anything")
    file_id = upload(client, "mine.txt", b"private text")
    with pytest.raises(openai.NotFoundError):  # another project's file cannot be attached
        other_client.vector_stores.files.create(vector_store_id=other_client.vector_stores.create().id,
                                                file_id=file_id)


@pytest.mark.parametrize(("strategy", "param"), [
    ({"type": "static", "static": {"max_chunk_size_tokens": 50, "chunk_overlap_tokens": 0}},
     "chunking_strategy.static.max_chunk_size_tokens"),
    ({"type": "static", "static": {"max_chunk_size_tokens": 5000, "chunk_overlap_tokens": 0}},
     "chunking_strategy.static.max_chunk_size_tokens"),
    ({"type": "static", "static": {"max_chunk_size_tokens": 200, "chunk_overlap_tokens": 101}},
     "chunking_strategy.static.chunk_overlap_tokens"),
    ({"type": "static", "static": {"max_chunk_size_tokens": 200, "chunk_overlap_tokens": -1}},
     "chunking_strategy.static.chunk_overlap_tokens"),
    ({"type": "static", "static": {"max_chunk_size_tokens": 200}}, "chunking_strategy.static.chunk_overlap_tokens"),
    ({"type": "static"}, "chunking_strategy.static"),
    ({"type": "semantic"}, "chunking_strategy.type"),
])
def test_invalid_chunking_strategy_is_400(client: openai.OpenAI, strategy: Any, param: str) -> None:
    file_id = upload(client, "c.txt", b"chunk me")
    with pytest.raises(openai.BadRequestError) as err:
        client.vector_stores.create(file_ids=[file_id], chunking_strategy=strategy)
    assert err.value.response.json()["error"]["param"] == param
    store = client.vector_stores.create()
    with pytest.raises(openai.BadRequestError) as err:
        client.vector_stores.files.create(vector_store_id=store.id, file_id=file_id, chunking_strategy=strategy)
    assert err.value.response.json()["error"]["param"] == param


def test_bad_requests(client: openai.OpenAI) -> None:
    store = client.vector_stores.create()
    # each 404 names the parameter that held the unknown id
    with pytest.raises(openai.NotFoundError) as caught:
        client.vector_stores.files.create(vector_store_id=store.id, file_id="file-nope")
    assert caught.value.response.json()["error"]["param"] == "file_id"
    with pytest.raises(openai.NotFoundError) as caught:
        client.vector_stores.create(file_ids=["file-nope"])
    assert caught.value.response.json()["error"]["param"] == "file_ids"
    with pytest.raises(openai.NotFoundError) as caught:
        client.vector_stores.file_batches.create(store.id, file_ids=["file-nope"])
    assert caught.value.response.json()["error"]["param"] == "file_ids"
    with pytest.raises(openai.NotFoundError) as caught:
        client.vector_stores.file_batches.create(store.id, files=[{"file_id": "file-nope"}])
    assert caught.value.response.json()["error"]["param"] == "files[0].file_id"
    known = upload(client, "known.txt", b"known")
    with pytest.raises(openai.NotFoundError) as caught:  # the element's own index, duplicates counted
        client.vector_stores.file_batches.create(store.id, files=[{"file_id": known}, {"file_id": known},
                                                                  {"file_id": "file-nope"}])
    assert caught.value.response.json()["error"]["param"] == "files[2].file_id"
    with pytest.raises(openai.BadRequestError):
        client.vector_stores.search(store.id, query="x", max_num_results=0)
    with pytest.raises(openai.BadRequestError):
        client.vector_stores.search(store.id, query="x", filters={"type": "zz", "key": "a", "value": 1})  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError):
        client.vector_stores.files.list(vector_store_id=store.id, filter="done")  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError):
        client.vector_stores.create(expires_after={"anchor": "created_at", "days": 1})  # type: ignore[typeddict-item]
    with pytest.raises(openai.NotFoundError):
        client.vector_stores.file_batches.retrieve("vsfb_nope", vector_store_id=store.id)


def test_upload_and_poll_completes_and_counts(client: openai.OpenAI, db: Db) -> None:
    store = client.vector_stores.create(name="handbook")
    vs_file = client.vector_stores.files.upload_and_poll(
        vector_store_id=store.id, file=("travel.md", docs.markdown("Travel policy", "Employees fly economy class "
                                                                   "on trips shorter than six hours.")))
    assert isinstance(vs_file, VectorStoreFile)
    assert vs_file.status == "completed", vs_file.last_error
    assert vs_file.last_error is None and vs_file.usage_bytes > 0
    assert vs_file.vector_store_id == store.id and vs_file.object == "vector_store.file"
    assert vs_file.chunking_strategy is not None and vs_file.chunking_strategy.model_dump() == AUTO

    again = client.vector_stores.retrieve(store.id)
    assert again.status == "completed"
    assert (again.file_counts.completed, again.file_counts.total, again.file_counts.in_progress) == (1, 1, 0)
    assert again.usage_bytes == vs_file.usage_bytes

    assert [f.id for f in client.vector_stores.files.list(vector_store_id=store.id, filter="completed")] == [
        vs_file.id]
    assert list(client.vector_stores.files.list(vector_store_id=store.id, filter="failed")) == []
    # the completed event was committed with the change (outbox), data = the API object
    row = wait_for(lambda: db.fetchrow("SELECT topic, key, envelope FROM events WHERE type ="
                                       " 'vector_store.file.completed' AND envelope->'data'->>'id' = $1"
                                       " AND key = $2", vs_file.id, store.id))
    assert row["topic"] == "threadline.events"
    assert VectorStoreFile.model_validate(row["envelope"]["data"]).status == "completed"

    given: dict[str, str | float | bool] = {"year": 2024, "rating": 4.5, "draft": False, "topic": "hr"}
    updated = client.vector_stores.files.with_raw_response.update(vs_file.id, vector_store_id=store.id,
                                                                  attributes=given)
    retrieved = client.vector_stores.files.with_raw_response.retrieve(vs_file.id, vector_store_id=store.id)
    listed = client.vector_stores.files.with_raw_response.list(vector_store_id=store.id)
    for attributes in (updated.http_response.json()["attributes"], retrieved.http_response.json()["attributes"],
                       listed.http_response.json()["data"][0]["attributes"]):
        # JSON numbers as given: a whole number stays whole (2024, not 2024.0), types included
        assert {k: type(v) for k, v in attributes.items()} == {k: type(v) for k, v in given.items()}
        assert attributes == given
    deleted = client.vector_stores.files.delete(vs_file.id, vector_store_id=store.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (vs_file.id, True, "vector_store.file.deleted")
    with pytest.raises(openai.NotFoundError):
        client.vector_stores.files.retrieve(vs_file.id, vector_store_id=store.id)
    emptied = client.vector_stores.retrieve(store.id)
    assert (emptied.file_counts.total, emptied.usage_bytes) == (0, 0)
    assert client.files.retrieve(vs_file.id).id == vs_file.id  # the file itself is kept


def test_file_batch_upload_and_poll_with_a_failure(client: openai.OpenAI, db: Db) -> None:
    store = client.vector_stores.create(name="batch")
    batch = client.vector_stores.file_batches.upload_and_poll(store.id, files=[
        ("policy.docx", docs.docx("Expenses", ["Meals are reimbursed up to 40 euros per day."])),
        ("notes.txt", docs.text("Parking is free in the east garage.")),
        ("broken.json", b'{"a": [1, 2'),
    ])
    assert isinstance(batch, VectorStoreFileBatch)
    assert batch.id.startswith("vsfb_") and batch.object == "vector_store.files_batch"
    assert batch.status == "completed"
    assert batch.file_counts.model_dump() == {"in_progress": 0, "completed": 2, "failed": 1, "cancelled": 0,
                                              "total": 3}
    failed = list(client.vector_stores.file_batches.list_files(batch.id, vector_store_id=store.id, filter="failed"))
    assert len(failed) == 1 and failed[0].last_error is not None
    assert failed[0].last_error.code == "invalid_file"
    assert len(list(client.vector_stores.file_batches.list_files(batch.id, vector_store_id=store.id))) == 3
    assert client.vector_stores.file_batches.retrieve(batch.id, vector_store_id=store.id) == batch
    final = client.vector_stores.retrieve(store.id)
    assert (final.file_counts.completed, final.file_counts.failed, final.status) == (2, 1, "completed")
    assert wait_for(lambda: db.fetchval("SELECT count(*) FROM events WHERE type = 'vector_store.file_batch.completed'"
                                        " AND envelope->'data'->>'id' = $1", batch.id)) == 1
    assert db.fetchval("SELECT count(*) FROM events WHERE type = 'vector_store.file.failed' AND key = $1",
                       store.id) == 1


def test_create_with_file_ids_and_static_chunking(client: openai.OpenAI) -> None:
    file_id = upload(client, "warehouse.txt", docs.long_text(30))
    strategy = {"type": "static", "static": {"max_chunk_size_tokens": 100, "chunk_overlap_tokens": 20}}
    store = client.vector_stores.create(name="static", file_ids=[file_id], chunking_strategy=strategy)  # type: ignore[arg-type]
    assert store.file_counts.total == 1
    vs_file = client.vector_stores.files.poll(file_id, vector_store_id=store.id)
    assert vs_file.status == "completed", vs_file.last_error
    assert vs_file.chunking_strategy is not None and vs_file.chunking_strategy.model_dump() == strategy
    content = client.vector_stores.files.content(file_id, vector_store_id=store.id)
    text = "".join(part.text or "" for part in content)
    assert "Paragraph 0:" in text and "Paragraph 29:" in text


def test_cancel_batch(client: openai.OpenAI) -> None:
    store = client.vector_stores.create(name="cancel")
    ids = [upload(client, f"big-{i}.txt", docs.long_text(40)) for i in range(3)]
    batch = client.vector_stores.file_batches.create(store.id, file_ids=ids)
    cancelled = client.vector_stores.file_batches.cancel(batch.id, vector_store_id=store.id)
    assert cancelled.status in ("cancelled", "completed")
    if cancelled.status == "cancelled":
        assert cancelled.file_counts.in_progress == 0
        assert cancelled.file_counts.cancelled >= 1
    def settled() -> list[VectorStoreFile] | None:
        files = list(client.vector_stores.files.list(vector_store_id=store.id))
        return files if all(f.status != "in_progress" for f in files) else None

    files = wait_for(settled)
    assert len(files) == 3
    if cancelled.status == "cancelled":
        assert any(f.status == "cancelled" for f in files)
    assert client.vector_stores.retrieve(store.id).file_counts.in_progress == 0


def test_search_ranks_and_filters(client: openai.OpenAI) -> None:
    store = client.vector_stores.create(name="search")
    travel = upload(client, "travel.docx", docs.docx("Travel policy", [
        "Employees book economy class flights for trips shorter than six hours.",
        "Hotel rooms are booked through the travel desk."]))
    kitchen = upload(client, "kitchen.html", docs.html("Office kitchen", "The coffee machine is descaled every "
                                                       "Friday and the fridge is emptied on Thursdays."))
    client.vector_stores.file_batches.create_and_poll(store.id, files=[
        {"file_id": travel, "attributes": {"topic": "travel", "year": 2024}},
        {"file_id": kitchen, "attributes": {"topic": "facilities", "year": 2023}}])

    page = client.vector_stores.search(store.id, query="Which class do we fly on short flights?")
    results = list(page)
    assert results and results[0].file_id == travel
    assert results[0].filename == "travel.docx"
    assert results[0].content[0].type == "text" and "economy" in results[0].content[0].text
    assert results[0].attributes == {"topic": "travel", "year": 2024}
    assert all(0 <= r.score <= 1 for r in results)
    assert [r.score for r in results] == sorted((r.score for r in results), reverse=True)

    only_kitchen = list(client.vector_stores.search(store.id, query="flights",
                                                    filters={"type": "eq", "key": "topic", "value": "facilities"}))
    assert {r.file_id for r in only_kitchen} == {kitchen}
    compound = list(client.vector_stores.search(store.id, query="coffee", filters={
        "type": "and", "filters": [{"type": "gte", "key": "year", "value": 2024},
                                   {"type": "ne", "key": "topic", "value": "facilities"}]}))
    assert {r.file_id for r in compound} == {travel}
    assert next(iter(client.vector_stores.search(store.id, query="coffee", max_num_results=1))).file_id == kitchen
    assert list(client.vector_stores.search(store.id, query="coffee",
                                            ranking_options={"score_threshold": 0.99})) == []
    several = list(client.vector_stores.search(store.id, query=["coffee machine", "economy flights"],
                                               rewrite_query=True))
    assert {r.file_id for r in several} == {travel, kitchen}


def test_expired_store_reads_as_expired_and_refuses_files(client: openai.OpenAI, db: Db) -> None:
    store = client.vector_stores.create(name="old", expires_after={"anchor": "last_active_at", "days": 1})
    assert store.status == "completed" and store.expires_at is not None
    db.execute("UPDATE vector_stores SET doc = jsonb_set(doc, '{expires_at}', to_jsonb(1)) WHERE id = $1", store.id)
    assert client.vector_stores.retrieve(store.id).status == "expired"
    file_id = upload(client, "late.txt", b"too late")
    with pytest.raises(openai.BadRequestError) as err:
        client.vector_stores.files.create(vector_store_id=store.id, file_id=file_id)
    assert "expired" in err.value.response.json()["error"]["message"]
    renewed = client.vector_stores.update(store.id, expires_after={"anchor": "last_active_at", "days": 2})
    assert renewed.status == "completed"  # a new policy counts from now


def test_a_file_deleted_while_it_is_attached_ends_up_in_no_store(client: openai.OpenAI, db: Db) -> None:
    """`files.delete` at the same moment as attaching the file: both answered 200 and the store kept the file
    `in_progress` for good (it was attached after its removal from every store; ingestion skipped it), so the
    store never finished and every file_search on it waited its full minute."""
    store = client.vector_stores.create(name="race")
    attached: list[str] = []
    for round_ in range(6):
        file_id = client.files.create(file=(f"race{round_}.txt", b"racing " * 20), purpose="assistants").id

        def attach(file_id: str = file_id) -> None:
            try:
                client.vector_stores.files.create(vector_store_id=store.id, file_id=file_id)
            except openai.NotFoundError:
                return  # deleted first: refused
            attached.append(file_id)

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            racing = [pool.submit(attach), pool.submit(client.files.delete, file_id)]
            for future in racing:
                future.result()  # neither is a 5xx
    deadline = time.monotonic() + 60
    while (left := db.fetchval("SELECT count(*) FROM vector_store_files WHERE vector_store_id = $1",
                               store.id)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == 0, f"deleted files still attached: {attached}"
    assert client.vector_stores.retrieve(store.id).status == "completed"


def test_a_loop_detaching_each_file_it_lists_detaches_them_all(client: openai.OpenAI) -> None:
    """The SDK's auto-pagination asks for the next page after the last file of the one before, which the usual cleanup
    loop has detached by then: that cursor was refused (400 "no file ... in vector store") once a store held more
    than a page. A detached file keeps its place as a cursor; one never in the store is still refused."""
    store = client.vector_stores.create(name="cleanup")
    attached = [upload(client, f"{n}.txt", f"file {n}".encode()) for n in range(5)]
    client.vector_stores.file_batches.create_and_poll(vector_store_id=store.id, file_ids=attached)
    detached = []
    for store_file in client.vector_stores.files.list(vector_store_id=store.id, limit=2):
        client.vector_stores.files.delete(file_id=store_file.id, vector_store_id=store.id)
        detached.append(store_file.id)
    assert sorted(detached) == sorted(attached)
    assert client.vector_stores.files.list(vector_store_id=store.id).data == []
    before = client.vector_stores.files.list(vector_store_id=store.id, before=detached[-1])
    assert before.data == []
    client.vector_stores.files.create_and_poll(vector_store_id=store.id, file_id=detached[0])  # a new place: last
    assert [f.id for f in client.vector_stores.files.list(vector_store_id=store.id, order="asc",
                                                           after=detached[-1])] == [detached[0]]
    never = upload(client, "never.txt", b"never attached")
    with pytest.raises(openai.BadRequestError) as refused:
        client.vector_stores.files.list(vector_store_id=store.id, after=never)
    assert refused.value.body["param"] == "after"  # type: ignore[index]


def test_store_files_list_in_attach_order(client: openai.OpenAI, http: httpx.Client) -> None:
    """Files listed by file id (the file's own creation): hosted lists a store's files by when they were attached
    (the vector store file's created_at), and its cursors are file ids."""
    store = client.vector_stores.create(name="order")
    first, second = upload(client, "a.txt", b"alpha"), upload(client, "b.txt", b"bravo")
    assert first < second
    for file_id in (second, first):
        client.vector_stores.files.create(vector_store_id=store.id, file_id=file_id)

    def page(**params: Any) -> dict[str, Any]:
        response = http.get(f"/vector_stores/{store.id}/files", params=params)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return {"ids": [f["id"] for f in body["data"]], "first_id": body["first_id"], "last_id": body["last_id"],
                "has_more": body["has_more"]}

    assert [f.id for f in client.vector_stores.files.list(vector_store_id=store.id, order="asc")] == [second, first]
    assert [f.id for f in client.vector_stores.files.list(vector_store_id=store.id)] == [first, second]  # desc
    assert page(order="asc", limit=1) == {"ids": [second], "first_id": second, "last_id": second, "has_more": True}
    assert page(order="asc", limit=1, after=second) == {"ids": [first], "first_id": first, "last_id": first,
                                                         "has_more": False}
    assert page(order="asc", limit=1, before=first) == {"ids": [second], "first_id": second, "last_id": second,
                                                         "has_more": False}
    assert page(order="desc", limit=1) == {"ids": [first], "first_id": first, "last_id": first, "has_more": True}
    assert page(order="desc", limit=1, after=first)["ids"] == [second]
    assert page(order="desc", limit=1, before=second)["ids"] == [first]
    assert page(order="asc", after=second, before=first)["ids"] == []
    auto = client.vector_stores.files.list(vector_store_id=store.id, order="asc", limit=1)
    assert [f.id for f in auto] == [second, first]  # the SDK's auto-pagination follows `after`

    third, fourth = upload(client, "c.txt", b"charlie"), upload(client, "d.txt", b"delta")
    batch = client.vector_stores.file_batches.create(store.id, file_ids=[fourth, third])  # attached in this order
    listed = client.vector_stores.file_batches.list_files(batch.id, vector_store_id=store.id, order="asc", limit=1)
    assert [f.id for f in listed] == [fourth, third]
    assert [f.id for f in client.vector_stores.files.list(vector_store_id=store.id, order="asc")] == [
        second, first, fourth, third]

    unknown = http.get(f"/vector_stores/{store.id}/files", params={"after": "file-nope"})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "after"


@contextlib.contextmanager
def ingestion_paused(stack: Stack) -> Iterator[None]:
    """Freeze the ingestion process (SIGSTOP) so attached files stay in progress; keep it short (the Kafka session
    times out after 10 s, and a rejoin after SIGCONT only delays the files)."""
    process = stack.service("ingestion")
    process.signal(signal.SIGSTOP)
    try:
        yield
    finally:
        process.signal(signal.SIGCONT)


def test_cancelling_a_batch_cancels_only_its_own_requests(client: openai.OpenAI, stack: Stack) -> None:
    """Cancelling a batch cancelled every file of its list still in progress, also those detached and attached
    again since, alone or by another batch: that later request is not the batch's, and was cancelled with it."""
    store = client.vector_stores.create(name="cancel-own")
    alone, rebatched, only_first = (upload(client, f"{name}.txt", docs.text(f"The {name} file."))
                                    for name in ("alone", "rebatched", "only-first"))
    with ingestion_paused(stack):
        first = client.vector_stores.file_batches.create(store.id, file_ids=[alone, rebatched, only_first])
        for file_id in (alone, rebatched):
            client.vector_stores.files.delete(file_id, vector_store_id=store.id)
        client.vector_stores.files.create(vector_store_id=store.id, file_id=alone)
        second = client.vector_stores.file_batches.create(store.id, file_ids=[rebatched])
        cancelled = client.vector_stores.file_batches.cancel(first.id, vector_store_id=store.id)
        statuses = {f.id: f.status for f in client.vector_stores.files.list(vector_store_id=store.id)}
    assert cancelled.status == "cancelled"
    assert statuses == {alone: "in_progress", rebatched: "in_progress", only_first: "cancelled"}
    assert client.vector_stores.file_batches.poll(second.id, vector_store_id=store.id,
                                                  poll_interval_ms=200).status == "completed"
    assert client.vector_stores.files.poll(alone, vector_store_id=store.id, poll_interval_ms=200).status == "completed"
    assert client.vector_stores.retrieve(store.id).file_counts.model_dump() == {
        "in_progress": 0, "completed": 2, "failed": 0, "cancelled": 1, "total": 3}


def test_attaching_a_file_again_applies_the_new_attributes_and_chunking(client: openai.OpenAI) -> None:
    """Attaching a file already in the store returned it unchanged: the new request's attributes (and chunking
    strategy) were dropped, so a search filtered on them never found the file."""
    store = client.vector_stores.create(name="reattach")
    file_id = upload(client, "rota.md", docs.markdown("Rota", "The night shift starts at ten in the evening."))
    first = client.vector_stores.files.create_and_poll(file_id, vector_store_id=store.id, attributes={"v": 1},
                                                       poll_interval_ms=200)
    assert first.status == "completed" and first.attributes == {"v": 1}

    again = client.vector_stores.files.create(vector_store_id=store.id, file_id=file_id, attributes={"v": 2})
    assert (again.attributes, again.status, again.created_at) == ({"v": 2}, "completed", first.created_at)
    assert client.vector_stores.files.retrieve(file_id, vector_store_id=store.id).attributes == {"v": 2}
    found = client.vector_stores.search(store.id, query="night shift", filters={"type": "eq", "key": "v", "value": 2})
    assert [r.file_id for r in found] == [file_id]

    batch = client.vector_stores.file_batches.create(store.id, files=[{"file_id": file_id, "attributes": {"v": 3}}])
    assert batch.status == "completed" and batch.file_counts.completed == 1  # nothing to index again
    assert client.vector_stores.files.retrieve(file_id, vector_store_id=store.id).attributes == {"v": 3}

    # what a request does not give stays: running an upload script again changes nothing, indexes nothing
    same = client.vector_stores.files.create(vector_store_id=store.id, file_id=file_id)
    assert (same.attributes, same.status, same.chunking_strategy) == ({"v": 3}, "completed", first.chunking_strategy)
    batch = client.vector_stores.file_batches.create(store.id, file_ids=[file_id])
    assert batch.status == "completed" and batch.file_counts.completed == 1
    assert client.vector_stores.files.retrieve(file_id, vector_store_id=store.id).attributes == {"v": 3}

    strategy = {"type": "static", "static": {"max_chunk_size_tokens": 100, "chunk_overlap_tokens": 0}}
    rechunked = client.vector_stores.files.create(vector_store_id=store.id, file_id=file_id,
                                                  chunking_strategy=strategy)  # type: ignore[arg-type]
    assert rechunked.status == "in_progress" and rechunked.attributes == {"v": 3}  # kept: none given
    done = client.vector_stores.files.poll(file_id, vector_store_id=store.id, poll_interval_ms=200)
    assert done.status == "completed", done.last_error
    assert done.chunking_strategy is not None and done.chunking_strategy.model_dump() == strategy
    final = client.vector_stores.retrieve(store.id)
    assert (final.file_counts.total, final.file_counts.completed) == (1, 1)
