"""The ingestion service on the real stack: every format, failures with reasons, idempotent reprocessing,
deletion removing points, metrics. Points are counted by asking the service over Kafka, as the gateway asks it to
search (the test process cannot open a local-mode Qdrant that the service holds)."""

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import fixtures_docs as docs
import httpx
import openai
import pytest
from aiokafka.partitioner import DefaultPartitioner
from run_helpers import poll

from threadline_core.events import FileChunksRequested, PointCountRequested, ServiceReplied, ServiceRequest
from threadline_core.replies import ask_once
from threadline_devstack.sql import Db
from threadline_devstack.stack import Stack

FORMATS: dict[str, tuple[bytes, str]] = {
    "handbook.pdf": (docs.pdf(), "How many paid vacation days does a full-time employee get?"),
    "travel.docx": (docs.docx("Travel policy", ["Employees book economy class flights for trips shorter than six "
                                                "hours."]), "Which class do we book for short flights?"),
    "results.pptx": (docs.pptx("Quarterly results", "Revenue of the lighthouse division grew by 12 percent."),
                     "How much did lighthouse revenue grow?"),
    "kitchen.html": (docs.html("Office kitchen", "The espresso machine is descaled every Friday afternoon."),
                     "When is the espresso machine descaled?"),
    "garden.md": (docs.markdown("Roof garden", "Tomatoes on the roof garden are watered at dawn by the "
                                "facilities team."), "Who waters the tomatoes?"),
    "parking.txt": (docs.text("Bicycles must be parked in the basement racks next to the showers."),
                    "Where do I park my bicycle?"),
    "prices.csv": (docs.csv([("fruit", "price_per_kilo"), ("mango", "4.20"), ("banana", "1.10")]),
                   "What does a kilo of mango cost?"),
    "servers.json": (docs.json_doc({"datacenter": "Reykjavik", "servers": [{"name": "glacier", "cores": 64}]}),
                     "Which datacenter hosts the glacier server?"),
}


def wait_for(check: Callable[[], Any], timeout: float = 180.0) -> Any:
    """Poll until `check()` is truthy (returns it) or fail after `timeout` seconds."""
    return poll(check, timeout=timeout, interval=0.25)


def ingestion_url(stack: Stack) -> str:
    """The ingestion service's ops server (its own port when it shares a process with the tool executor)."""
    return f"http://127.0.0.1:{stack.service('ingestion').ready_ports[-1]}"


def ask(stack: Stack, request: ServiceRequest) -> ServiceReplied:
    """Ask the ingestion service over Kafka (SEARCH_REQUESTS / SEARCH_REPLIES) and wait for its answer."""
    reply = asyncio.run(ask_once(stack.kafka_bootstrap_servers, request, project_id="proj_local"))
    assert reply.error is None, reply.error
    return reply


def point_count(stack: Stack, **where: str) -> int:
    """Points in Qdrant for a vector store and/or file."""
    return int(ask(stack, PointCountRequested(**where)).result["count"])


def upload(client: openai.OpenAI, name: str, data: bytes) -> str:
    """Upload for assistants; return the file id."""
    return client.files.create(file=(name, data), purpose="assistants").id


def test_every_format_is_indexed_and_findable(client: openai.OpenAI) -> None:
    store = client.vector_stores.create(name="formats")
    ids = {name: upload(client, name, data) for name, (data, _) in FORMATS.items()}
    batch = client.vector_stores.file_batches.create_and_poll(store.id, file_ids=list(ids.values()))
    files = {f.id: f for f in client.vector_stores.files.list(vector_store_id=store.id, limit=100)}
    for name, file_id in ids.items():
        assert files[file_id].status == "completed", (name, files[file_id].last_error)
        assert files[file_id].usage_bytes > 0
    assert batch.file_counts.completed == len(FORMATS)
    for name, (_, question) in FORMATS.items():
        top = list(client.vector_stores.search(store.id, query=question, max_num_results=3))
        assert top and top[0].file_id == ids[name], (name, [(r.filename, r.score) for r in top])


@pytest.mark.parametrize(("name", "data", "code", "reason"), [
    ("corrupt.pdf", docs.corrupt_pdf(), "invalid_file", "corrupt"),
    ("locked.pdf", docs.encrypted_pdf(), "invalid_file", "encrypted"),
    ("empty.txt", b"", "invalid_file", "empty"),
    ("broken.json", b'{"a": [1, 2', "invalid_file", "JSON"),
    ("garbage.docx", b"PK\x03\x04 not really a zip archive", "invalid_file", "DOCX"),
])
def test_bad_files_fail_with_a_reason(client: openai.OpenAI, db: Db, stack: Stack, name: str, data: bytes, code: str,
                                      reason: str) -> None:
    store = client.vector_stores.create(name=f"bad {name}")
    good = upload(client, "good.md", docs.markdown("Fine", "This document is perfectly fine."))
    bad = upload(client, name, data)
    batch = client.vector_stores.file_batches.create_and_poll(store.id, file_ids=[bad, good])
    assert batch.file_counts.failed == 1 and batch.file_counts.completed == 1  # the other file goes on
    failed = client.vector_stores.files.retrieve(bad, vector_store_id=store.id)
    assert failed.status == "failed" and failed.last_error is not None
    assert failed.last_error.code == code
    assert reason.lower() in failed.last_error.message.lower()
    assert failed.usage_bytes == 0
    assert point_count(stack, vector_store_id=store.id, file_id=bad) == 0
    assert point_count(stack, vector_store_id=store.id, file_id=good) >= 1
    event = wait_for(lambda: db.fetchrow("SELECT envelope FROM events WHERE type = 'vector_store.file.failed'"
                                         " AND key = $1", store.id))
    assert event["envelope"]["data"]["last_error"]["code"] == code


def test_reprocessing_never_duplicates_points(client: openai.OpenAI, db: Db, stack: Stack) -> None:
    strategy = {"type": "static", "static": {"max_chunk_size_tokens": 100, "chunk_overlap_tokens": 30}}
    store = client.vector_stores.create(name="replay")
    file_id = upload(client, "warehouse.txt", docs.long_text(12))
    first = client.vector_stores.files.create_and_poll(file_id, vector_store_id=store.id,
                                                       chunking_strategy=strategy)  # type: ignore[arg-type]
    assert first.status == "completed", first.last_error
    points = point_count(stack, vector_store_id=store.id, file_id=file_id)
    assert points > 3  # static chunking: many small chunks
    # Simulate a crash after indexing and before the commit: the same request is delivered again (the
    # relay republishes the very same outbox row) while the file is back in progress.
    request_id = db.fetchval("SELECT request_id FROM vector_store_files WHERE vector_store_id = $1 AND file_id = $2",
                             store.id, file_id)
    db.execute("UPDATE vector_store_files SET status = 'in_progress', doc = doc || '{\"status\": \"in_progress\"}'"
               " WHERE vector_store_id = $1 AND file_id = $2", store.id, file_id)
    db.execute("INSERT INTO outbox_pending (seq) SELECT seq FROM events WHERE event_id = $1", request_id)
    db.execute("SELECT pg_notify('threadline_outbox', '')")
    wait_for(lambda: db.fetchval("SELECT count(*) FROM events WHERE type = 'vector_store.file.completed'"
                                 " AND key = $1", store.id) == 2)
    assert client.vector_stores.files.retrieve(file_id, vector_store_id=store.id).status == "completed"
    assert point_count(stack, vector_store_id=store.id, file_id=file_id) == points
    # a duplicate of a request that is no longer in force changes nothing
    db.execute("INSERT INTO outbox_pending (seq) SELECT seq FROM events WHERE event_id = $1", request_id)
    db.execute("SELECT pg_notify('threadline_outbox', '')")
    wait_for(lambda: db.fetchval("SELECT NOT EXISTS (SELECT 1 FROM outbox_pending JOIN events USING (seq)"
                                 " WHERE event_id = $1)", request_id))
    assert point_count(stack, vector_store_id=store.id, file_id=file_id) == points


def _consumed_requests(stack: Stack) -> float:
    """Records of threadline.ingestion.requests the ingestion service has handled (its metric)."""
    text = httpx.get(f"{ingestion_url(stack)}/metrics", trust_env=False, timeout=30).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("threadline_events_consumed_total{") and "threadline.ingestion.requests" in line)


def test_a_file_whose_ingestion_request_was_lost_completes(client: openai.OpenAI, db: Db, stack: Stack) -> None:
    """A vector store file whose ingestion request the broker lost (tansu restarted before ingestion read it) does
    not stay in_progress: THREADLINE_UNCLAIMED_INGESTION_SECONDS (3 in tests) after the request was sent with
    nobody starting it, the ingestion sweep sends it again, under the same request id, and the file completes,
    once. A further delivery of that request changes nothing."""
    store = client.vector_stores.create(name="lost request")
    first = upload(client, "garden.md", docs.markdown("Roof garden", "Tomatoes are watered at dawn."))
    assert client.vector_stores.files.create_and_poll(first, vector_store_id=store.id).status == "completed"
    lost = upload(client, "keeper.txt", docs.text("The lighthouse keeper winds the clock every Sunday evening."))
    # What an attach commits (the file in progress under a new request), its request's record never delivered.
    request_id = f"evt_lost{uuid.uuid4().hex}"
    db.execute("INSERT INTO vector_store_files (vector_store_id, file_id, project_id, status, created_at,"
               " usage_bytes, request_id, doc) SELECT vector_store_id, $2, project_id, 'in_progress', created_at, 0,"
               " $3, doc || jsonb_build_object('id', $2::text, 'status', 'in_progress', 'usage_bytes', 0,"
               " 'last_error', null) FROM vector_store_files WHERE vector_store_id = $1 AND file_id = $4",
               store.id, lost, request_id, first)
    assert client.vector_stores.files.retrieve(lost, vector_store_id=store.id).status == "in_progress"

    done = wait_for(lambda: (f := client.vector_stores.files.retrieve(lost, vector_store_id=store.id))
                    .status != "in_progress" and f, timeout=60)
    assert done.status == "completed", done.last_error
    assert done.usage_bytes > 0
    assert client.vector_stores.retrieve(store.id).file_counts.completed == 2
    points = point_count(stack, vector_store_id=store.id, file_id=lost)
    assert points >= 1
    resent = db.fetch("SELECT seq FROM events WHERE type = 'command.ingestion.file_requested'"
                      " AND envelope->'data'->>'request_id' = $1", request_id)
    assert len(resent) == 1  # started by the first one sent again: never sent again after that
    completions = ("SELECT count(*) FROM events WHERE type = 'vector_store.file.completed' AND key = $1"
                   " AND envelope->'data'->>'id' = $2")
    assert db.fetchval(completions, store.id, lost) == 1

    # The request delivered once more (a late original, a redelivery): skipped, nothing changes.
    consumed = _consumed_requests(stack)
    db.execute("INSERT INTO outbox_pending (seq) VALUES ($1)", resent[0]["seq"])
    db.execute("SELECT pg_notify('threadline_outbox', '')")
    wait_for(lambda: _consumed_requests(stack) > consumed, timeout=30)
    assert db.fetchval(completions, store.id, lost) == 1
    assert client.vector_stores.files.retrieve(lost, vector_store_id=store.id).status == "completed"
    assert point_count(stack, vector_store_id=store.id, file_id=lost) == points


def test_a_file_long_queued_is_sent_again_only_after_waiting_as_long_again(
        client: openai.OpenAI, db: Db) -> None:
    """The wait before a re-send doubles: a file that has waited 1000 s since it was attached (queued behind a
    backlog, or already sent again) is not sent again after the minimum wait (3 s in tests) but after as long as it
    has waited; so a long backlog gets a few duplicates per file, not one every interval."""
    store = client.vector_stores.create(name="backoff")
    first = upload(client, "bells.md", docs.markdown("Bells", "The bells ring at noon."))
    assert client.vector_stores.files.create_and_poll(first, vector_store_id=store.id).status == "completed"
    waiting, request_id = f"file-waiting{uuid.uuid4().hex[:12]}", f"evt_waiting{uuid.uuid4().hex}"
    db.execute("INSERT INTO vector_store_files (vector_store_id, file_id, project_id, status, created_at,"
               " usage_bytes, request_id, doc, announced_at) SELECT vector_store_id, $2, project_id, 'in_progress',"
               " extract(epoch FROM now())::bigint - 1010, 0, $3, doc || jsonb_build_object('id', $2::text, 'status',"
               " 'in_progress'), now() - interval '10 seconds' FROM vector_store_files"
               " WHERE vector_store_id = $1 AND file_id = $4", store.id, waiting, request_id, first)
    resends = ("SELECT count(*) FROM events WHERE type = 'command.ingestion.file_requested'"
               " AND envelope->'data'->>'request_id' = $1")
    time.sleep(5)  # several sweeps (every 0.75 s in tests)
    assert db.fetchval(resends, request_id) == 0
    db.execute("UPDATE vector_store_files SET created_at = extract(epoch FROM announced_at)::bigint"
               " WHERE vector_store_id = $1 AND file_id = $2", store.id, waiting)  # now it has waited long enough
    wait_for(lambda: db.fetchval(resends, request_id) == 1, timeout=30)
    client.vector_stores.files.delete(waiting, vector_store_id=store.id)


def test_deleting_removes_points(client: openai.OpenAI, stack: Stack) -> None:
    store = client.vector_stores.create(name="deletions")
    keep = upload(client, "keep.md", docs.markdown("Keep", "This file stays in the store."))
    detach = upload(client, "detach.md", docs.markdown("Detach", "This file is detached from the store."))
    gone = upload(client, "gone.md", docs.markdown("Gone", "This file is deleted entirely."))
    client.vector_stores.file_batches.create_and_poll(store.id, file_ids=[keep, detach, gone])
    for file_id in (keep, detach, gone):
        assert point_count(stack, vector_store_id=store.id, file_id=file_id) >= 1

    client.vector_stores.files.delete(detach, vector_store_id=store.id)
    wait_for(lambda: point_count(stack, vector_store_id=store.id, file_id=detach) == 0)
    client.files.delete(gone)  # removes it from every vector store, too
    wait_for(lambda: point_count(stack, vector_store_id=store.id, file_id=gone) == 0)
    assert client.vector_stores.retrieve(store.id).file_counts.total == 1
    assert point_count(stack, vector_store_id=store.id, file_id=keep) >= 1

    client.vector_stores.delete(store.id)
    wait_for(lambda: point_count(stack, vector_store_id=store.id) == 0)


def test_an_expired_file_leaves_its_stores_as_a_deleted_one(client: openai.OpenAI, db: Db, stack: Stack) -> None:
    """A file past its expires_at was only hidden: it stayed attached to its vector stores, counted in their
    file_counts and its points searched. The gateway's sweeper (every 0.5 s in tests) deletes it as
    `files.delete` does."""
    store = client.vector_stores.create(name="expiry")
    keep = upload(client, "keep.md", docs.markdown("Keep", "This file does not expire."))
    brief = client.files.create(file=("brief.md", docs.markdown("Brief", "This file expires after an hour.")),
                                purpose="assistants", expires_after={"anchor": "created_at", "seconds": 3600}).id
    batch = client.vector_stores.file_batches.create_and_poll(store.id, file_ids=[keep, brief])
    assert batch.file_counts.completed == 2
    assert point_count(stack, vector_store_id=store.id, file_id=brief) >= 1
    time.sleep(1.5)  # a few sweeps: an hour to go, it stays
    assert client.vector_stores.retrieve(store.id).file_counts.total == 2

    db.execute("UPDATE files SET doc = jsonb_set(doc, '{expires_at}', to_jsonb(created_at)) WHERE id = $1", brief)
    counts = wait_for(lambda: (c := client.vector_stores.retrieve(store.id).file_counts).total == 1 and c,
                      timeout=30)
    assert (counts.total, counts.completed) == (1, 1)
    with pytest.raises(openai.NotFoundError):
        client.vector_stores.files.retrieve(brief, vector_store_id=store.id)
    assert db.fetchval("SELECT count(*) FROM files WHERE id = $1", brief) == 0  # deleted, bytes and all
    assert [f.id for f in client.vector_stores.files.list(vector_store_id=store.id)] == [keep]
    wait_for(lambda: point_count(stack, vector_store_id=store.id, file_id=brief) == 0)
    assert point_count(stack, vector_store_id=store.id, file_id=keep) >= 1
    assert db.fetchval("SELECT count(*) FROM events WHERE type = 'command.ingestion.file_detached'"
                       " AND envelope->'data'->>'file_id' = $1", brief) == 1


def test_ingestion_metrics(client: openai.OpenAI, stack: Stack) -> None:
    store = client.vector_stores.create(name="metrics")
    client.vector_stores.files.upload_and_poll(vector_store_id=store.id,
                                               file=("m.md", docs.markdown("Metrics", "Counted.")))
    text = httpx.get(f"{ingestion_url(stack)}/metrics", trust_env=False, timeout=30).text
    completed = [line for line in text.splitlines()
                 if line.startswith('threadline_ingestion_files_total{outcome="completed"}')]
    chunks = [line for line in text.splitlines() if line.startswith("threadline_ingestion_chunks_total ")]
    assert completed and float(completed[0].split()[-1]) >= 1
    assert chunks and float(chunks[0].split()[-1]) >= 1


def chunk_indexes(stack: Stack, vector_store_id: str, file_id: str) -> list[int]:
    """The chunk indexes stored in Qdrant for one file."""
    chunks = ask(stack, FileChunksRequested(vector_store_id=vector_store_id, file_id=file_id)).items
    return sorted(int(c["chunk_index"]) for c in chunks)


@pytest.mark.slow
def test_killed_mid_file_loses_nothing(client: openai.OpenAI, db: Db, stack: Stack) -> None:
    """SIGKILL the ingestion process while it works on a file: after a restart the file is processed again
    (offsets were not committed) and completes once, with each chunk stored exactly once."""
    strategy = {"type": "static", "static": {"max_chunk_size_tokens": 100, "chunk_overlap_tokens": 0}}
    store = client.vector_stores.create(name="crash")
    small = upload(client, "small.md", docs.markdown("First", "Processed before the crash."))
    big = upload(client, "big.txt", docs.long_text(100))
    batch = client.vector_stores.file_batches.create(store.id, file_ids=[small, big],
                                                     chunking_strategy=strategy)  # type: ignore[arg-type]
    wait_for(lambda: client.vector_stores.files.retrieve(small, vector_store_id=store.id).status == "completed")
    process = stack.service("ingestion")
    assert client.vector_stores.files.retrieve(big, vector_store_id=store.id).status == "in_progress"
    process.kill()
    process.start(wait=True, timeout=180)

    done = wait_for(lambda: (b := client.vector_stores.file_batches.retrieve(batch.id, vector_store_id=store.id))
                    .status == "completed" and b, timeout=300)
    assert done.file_counts.completed == 2, done.file_counts
    for file_id in (small, big):
        indexes = chunk_indexes(stack, store.id, file_id)
        assert indexes == list(range(len(indexes))), "each chunk exactly once, none missing"
        assert db.fetchval("SELECT count(*) FROM events WHERE type = 'vector_store.file.completed' AND key = $1"
                           " AND envelope->'data'->>'id' = $2", store.id, file_id) == 1
    assert len(chunk_indexes(stack, store.id, big)) > 20  # static 100-token chunks of ~4500 tokens


def _partition(stack: Stack, vector_store_id: str) -> int:
    """The INGESTION_REQUESTS partition of a store's commands (keyed by its id, default partitioner)."""
    partitions = list(range(stack.config.topic_partitions))
    return int(DefaultPartitioner()(vector_store_id.encode(), partitions, partitions))


@pytest.mark.slow
def test_a_file_that_parses_too_long_fails_and_holds_up_no_other_store(client: openai.OpenAI, stack: Stack) -> None:
    """spaCy splits a long run without spaces into sentences in quadratic time: minutes for this file. Its parser
    is killed at the test stack's 30 s budget and the file fails; meanwhile another file of the same store, and a
    file of another store on the same partition of the ingestion topic, get indexed."""
    slow_store = client.vector_stores.create(name="slow")
    quick_store = client.vector_stores.create(name="quick")
    while _partition(stack, quick_store.id) != _partition(stack, slow_store.id):
        client.vector_stores.delete(quick_store.id)
        quick_store = client.vector_stores.create(name="quick")
    slow_file = upload(client, "emoji.txt", ("\N{GRINNING FACE}" * 50_000).encode())
    client.vector_stores.files.create(vector_store_id=slow_store.id, file_id=slow_file)
    for store in (quick_store, slow_store):
        quick = client.vector_stores.files.create_and_poll(
            vector_store_id=store.id, file_id=upload(client, "quick.md", docs.markdown("Quick", "Indexed at once.")),
            poll_interval_ms=200)
        assert quick.status == "completed", quick.last_error
    assert client.vector_stores.files.retrieve(slow_file, vector_store_id=slow_store.id).status == "in_progress"

    slow = wait_for(lambda: (f := client.vector_stores.files.retrieve(slow_file, vector_store_id=slow_store.id))
                    .status != "in_progress" and f, timeout=120)
    assert slow.status == "failed" and slow.last_error is not None
    assert (slow.last_error.code, slow.last_error.message) == (
        "invalid_file", "The file could not be parsed within 30 seconds.")
    after = client.vector_stores.files.create_and_poll(
        vector_store_id=slow_store.id, file_id=upload(client, "after.txt", docs.text("The parser was replaced.")),
        poll_interval_ms=200)
    assert after.status == "completed", after.last_error
    assert point_count(stack, vector_store_id=slow_store.id) == 2  # the quick file's and this one's
