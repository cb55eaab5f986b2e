"""All SQL of the run orchestrator (plain asyncpg); every function runs on the caller's connection."""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson
from asyncpg.pool import PoolConnectionProxy

from threadline_core.db import with_as_sent
from threadline_core.events import EventEnvelope
from threadline_core.ids import now_seconds
from threadline_core.outbox import NOTIFY_CHANNEL, outbox_cte, outbox_param, outbox_statement
from threadline_core.topics import EVENTS

Conn = asyncpg.Connection | PoolConnectionProxy
"""A connection or one borrowed from the pool."""

_RUN_COLUMNS = ("id, project_id, thread_id, status, lease_owner, expires_at, doc, as_sent,"
                " (lease_expires_at IS NOT NULL AND lease_expires_at < now()) AS lease_expired")


@dataclass
class RunRow:
    """A run row: the API object plus the columns we lock and lease on."""

    id: str
    project_id: str
    thread_id: str
    status: str
    lease_owner: str | None
    lease_expired: bool
    expires_at: int | None
    doc: dict[str, Any]
    """As sent: the fields kept in `as_sent` (tools, response_format, metadata) laid over the stored `doc`."""


@dataclass
class StepRow:
    """A run step and the orchestrator's private tool-call bookkeeping."""

    id: str
    status: str
    doc: dict[str, Any]
    tool_state: dict[str, Any] | None


@dataclass
class MessageRow:
    """A thread message (the API object)."""

    id: str
    run_id: str | None
    doc: dict[str, Any]


def _run(row: asyncpg.Record) -> RunRow:
    return RunRow(id=row["id"], project_id=row["project_id"], thread_id=row["thread_id"], status=row["status"],
                  lease_owner=row["lease_owner"], lease_expired=row["lease_expired"],
                  expires_at=row["expires_at"], doc=with_as_sent(row["doc"], row["as_sent"]))


async def lock_run(conn: Conn, run_id: str) -> RunRow | None:
    """The run, locked for the rest of the transaction."""
    row = await conn.fetchrow(f"SELECT {_RUN_COLUMNS} FROM runs WHERE id = $1 FOR UPDATE", run_id)
    return _run(row) if row else None


_RUN_STORE_IDS = (
    "SELECT jsonb_path_query(o.doc, 'lax $.tool_resources.file_search.vector_store_ids[*]') #>> '{}'"
    " FROM (SELECT doc FROM threads WHERE id = r.thread_id"
    "  UNION ALL SELECT doc FROM assistants WHERE id = r.assistant_id"
    "   AND r.doc->'tools' @> '[{\"type\": \"file_search\"}]') AS o")
"""The vector stores a run `r` uses: its thread's, and its assistant's when it may search."""

_CODE_INTERPRETER_RUN = "r.doc->'tools' @> '[{\"type\": \"code_interpreter\"}]'"
"""The run `r` offers code_interpreter (its input files are looked up only then)."""

_RUN_CODE_FILE_IDS = (
    "SELECT jsonb_path_query(o.doc, 'lax $.tool_resources.code_interpreter.file_ids[*]') #>> '{}'"
    " FROM (SELECT doc FROM threads WHERE id = r.thread_id UNION ALL SELECT doc FROM assistants"
    "  WHERE id = r.assistant_id) AS o"
    " UNION ALL SELECT jsonb_path_query(m.doc, 'lax $.attachments[*] ? (@.tools[*].type == \"code_interpreter\")"
    ".file_id') #>> '{}' FROM messages m WHERE m.thread_id = r.thread_id")
"""The files a code_interpreter call of run `r` may get (a superset: `prompt.code_input_ids` orders them)."""

_FOR_TURN = (
    f"SELECT {_RUN_COLUMNS}, r.xmin AS version, c.messages, c.steps, c.expired_stores, c.live_stores,"
    " c.code_resources, c.code_files FROM runs r"
    " LEFT JOIN LATERAL (SELECT"
    "  (SELECT coalesce(jsonb_agg(jsonb_build_object('id', m.id, 'run_id', m.run_id, 'doc', m.doc)"
    "   ORDER BY m.id), '[]'::jsonb) FROM messages m WHERE m.thread_id = r.thread_id) AS messages,"
    "  (SELECT coalesce(jsonb_agg(jsonb_build_object('id', s.id, 'status', s.status, 'doc', s.doc,"
    "   'tool_state', s.tool_state) ORDER BY s.id), '[]'::jsonb) FROM run_steps s WHERE s.run_id = r.id) AS steps,"
    # the project's expired stores among the thread's file_search resources (as hosted: runs on that thread
    # fail) and, if the run searches, the assistant's; and those of them still live (the run makes them active)
    "  (SELECT array_agg(v.id ORDER BY v.id) FROM vector_stores v"
    "   WHERE v.project_id = r.project_id AND (v.doc->>'expires_at')::bigint <= $3"
    f"   AND v.id IN ({_RUN_STORE_IDS})) AS expired_stores,"
    "  (SELECT array_agg(v.id ORDER BY v.id) FROM vector_stores v"
    "   WHERE v.project_id = r.project_id AND coalesce((v.doc->>'expires_at')::bigint > $3, true)"
    f"   AND v.id IN ({_RUN_STORE_IDS})) AS live_stores,"
    # code_interpreter's input files: the assistant's and thread's tool_resources (in that order), and the project's
    # files among those and the thread's attachments, with their names and sizes
    f"  CASE WHEN {_CODE_INTERPRETER_RUN} THEN jsonb_build_array("
    "   (SELECT doc->'tool_resources' FROM assistants WHERE id = r.assistant_id),"
    "   (SELECT doc->'tool_resources' FROM threads WHERE id = r.thread_id)) END AS code_resources,"
    "  (SELECT jsonb_object_agg(f.id, jsonb_build_array(f.filename, f.bytes)) FROM files f"
    f"   WHERE {_CODE_INTERPRETER_RUN} AND f.project_id = r.project_id AND f.id = ANY(ARRAY({_RUN_CODE_FILE_IDS})))"
    "   AS code_files"
    "  WHERE r.status = 'queued' OR ($2 AND r.status = 'in_progress' AND r.lease_owner IS NULL)) c ON true"
    " WHERE r.id = $1")


@dataclass
class TurnState:
    """A run with the thread's messages and the run's steps, as one snapshot."""

    run: RunRow
    messages: list[MessageRow]
    steps: list[StepRow]
    version: int
    """The run row's version (xmin): a claim conditional on it fails if anyone wrote the run since."""
    expired_stores: list[str]
    """Expired vector stores of the thread, and of the assistant if the run searches (the run must fail instead)."""
    live_stores: list[str] = field(default_factory=list)
    """The others: a run that starts makes them active (hosted: "the last time the vector store was part of a run")."""
    code_resources: list[Any] = field(default_factory=list)
    """`tool_resources` of the assistant and of the thread when the run offers code_interpreter (else empty)."""
    code_files: dict[str, tuple[str, int]] = field(default_factory=dict)
    """Filename and size, by id, of the project's files those and the thread's code_interpreter attachments name."""


async def read_for_turn(conn: Conn, run_id: str, *, resume: bool, lock: bool) -> TurnState | None:
    """The run with the thread's messages, the run's steps and the expired stores that fail it (as of
    `now_seconds()`) when it can be claimed (one round trip); `lock`: locked for the rest of the transaction.

    Claimable: `queued`, or (`resume`) in progress with no driver (waiting for server-side tools).
    """
    row = await conn.fetchrow((_FOR_TURN + " FOR UPDATE OF r") if lock else _FOR_TURN, run_id, resume,
                              now_seconds())
    if row is None:
        return None
    messages = [MessageRow(id=m["id"], run_id=m["run_id"], doc=m["doc"]) for m in row["messages"] or ()]
    steps = [StepRow(id=s["id"], status=s["status"], doc=s["doc"], tool_state=s["tool_state"])
             for s in row["steps"] or ()]
    return TurnState(run=_run(row), messages=messages, steps=steps, version=row["version"],
                     expired_stores=list(row["expired_stores"] or ()), live_stores=list(row["live_stores"] or ()),
                     code_resources=list(row["code_resources"] or ()),
                     code_files={k: (str(v[0]), int(v[1])) for k, v in (row["code_files"] or {}).items()})


_TOUCH_STORES = (
    "WITH locked AS (SELECT id FROM vector_stores WHERE id = ANY($1::text[]) ORDER BY id FOR UPDATE)"
    " UPDATE vector_stores v SET doc = v.doc || jsonb_build_object('last_active_at', $2::bigint, 'expires_at',"
    "  CASE WHEN jsonb_typeof(v.doc->'expires_after') = 'object'"
    "  THEN $2::bigint + (v.doc->'expires_after'->>'days')::bigint * 86400 END)"
    " FROM locked WHERE v.id = locked.id AND coalesce((v.doc->>'expires_at')::bigint > $2, true)")


async def touch_vector_stores(conn: Conn, vector_store_ids: Sequence[str], now: int) -> None:
    """The stores of a run that started were active now: `last_active_at`, and the `expires_at` anchored on it,
    move (locked in id order, as every writer of several stores does); an expired store stays expired."""
    await conn.execute(_TOUCH_STORES, list(vector_store_ids), now)


# Run, the answer's step and message ($7 / $13 NULL: none) and the events, in one statement; with $16, only if
# the run row is still that version (a claim from an unlocked read).
_CLAIM = (
    "WITH claimed AS (UPDATE runs SET status = $2, doc = $3, expires_at = $4, lease_owner = $5,"
    "  lease_expires_at = now() + make_interval(secs => $6) WHERE id = $1 AND ($16::xid IS NULL OR xmin = $16::xid)"
    "  RETURNING 1),"
    " step AS (INSERT INTO run_steps (id, project_id, thread_id, run_id, status, created_at, doc)"
    "  SELECT $7::text, $8, $9, $1, $10::text, $11::bigint, $12::jsonb FROM claimed WHERE $7::text IS NOT NULL),"
    " message AS (INSERT INTO messages (id, project_id, thread_id, run_id, created_at, doc)"
    "  SELECT $13::text, $8, $9, $1, $14::bigint, $15::jsonb FROM claimed WHERE $13::text IS NOT NULL),"
    + outbox_cte("(SELECT $17::text::jsonb FROM claimed)")
    + f" SELECT EXISTS (SELECT 1 FROM claimed), pg_notify('{NOTIFY_CHANNEL}', '')")


async def claim_run(conn: Conn, run: RunRow, *, lease_seconds: float, events: Sequence[EventEnvelope],
                    step: dict[str, Any] | None, message: dict[str, Any] | None, version: int | None) -> bool:
    """Write the claimed run (and the answer's step and message when given) and its events in one statement;
    with `version`, only if nobody wrote the run since it was read (False: nothing written)."""
    step = step or {}
    message = message or {}
    claimed: bool = await conn.fetchval(
        _CLAIM, run.id, run.status, run.doc, run.expires_at, run.lease_owner, lease_seconds,
        step.get("id"), run.project_id, run.thread_id, step.get("status"), step.get("created_at"), step or None,
        message.get("id"), message.get("created_at"), message or None, version,
        outbox_param([(EVENTS, e) for e in events]))
    return claimed


# The answer's step and message with their events, if we (still) drive the run; the lock waits for a concurrent
# writer (a cancel) and re-checks, as a locking read in a transaction would.
_OPEN_ANSWER = (
    "WITH run AS (SELECT 1 FROM runs WHERE id = $1 AND status = 'in_progress' AND lease_owner = $2 FOR UPDATE),"
    " step AS (INSERT INTO run_steps (id, project_id, thread_id, run_id, status, created_at, doc)"
    "  SELECT $3::text, $4, $5, $1, $6::text, $7::bigint, $8::jsonb FROM run),"
    " message AS (INSERT INTO messages (id, project_id, thread_id, run_id, created_at, doc)"
    "  SELECT $9::text, $4, $5, $1, $10::bigint, $11::jsonb FROM run),"
    + outbox_cte("(SELECT $12::text::jsonb FROM run)")
    + f" SELECT EXISTS (SELECT 1 FROM run), pg_notify('{NOTIFY_CHANNEL}', '')")


async def open_answer(conn: Conn, run: RunRow, owner: str, step: dict[str, Any], message: dict[str, Any],
                      events: Sequence[EventEnvelope]) -> bool:
    """Add the answer's step and message and their events if `owner` drives the run (one statement); False if
    not (nothing written)."""
    opened: bool = await conn.fetchval(
        _OPEN_ANSWER, run.id, owner, step["id"], run.project_id, run.thread_id, step["status"], step["created_at"],
        step, message["id"], message["created_at"], message, outbox_param([(EVENTS, e) for e in events]))
    return opened


# A tool_calls step as far as the model has written its calls (added, or its document replaced while it is in
# progress) with its events, if we (still) drive the run.
_WRITE_STREAMED_CALLS = (
    "WITH run AS (SELECT 1 FROM runs WHERE id = $1 AND status = 'in_progress' AND lease_owner = $2 FOR UPDATE),"
    " step AS (INSERT INTO run_steps (id, project_id, thread_id, run_id, status, created_at, doc)"
    "  SELECT $3::text, $4, $5, $1, 'in_progress', $6::bigint, $7::jsonb FROM run"
    "  ON CONFLICT (id) DO UPDATE SET doc = EXCLUDED.doc WHERE run_steps.status = 'in_progress' RETURNING 1),"
    + outbox_cte("(SELECT $8::text::jsonb FROM step)")
    + f" SELECT EXISTS (SELECT 1 FROM step), pg_notify('{NOTIFY_CHANNEL}', '')")


async def write_streamed_calls(conn: Conn, run: RunRow, owner: str, step: dict[str, Any],
                               events: Sequence[EventEnvelope]) -> bool:
    """Add or update the step the model is writing its tool calls into, with its events, if `owner` drives the run
    (one statement); False if not (nothing written)."""
    written: bool = await conn.fetchval(
        _WRITE_STREAMED_CALLS, run.id, owner, step["id"], run.project_id, run.thread_id, step["created_at"], step,
        outbox_param([(EVENTS, e) for e in events]))
    return written


# The events of a finished answer carry the documents as the statement leaves them: each item of $10 is
# [topic, envelope, "run" | "message" | "step" (data: that document) or null (data as given)]; no row of r, m or
# s means no events at all.
_FINISH_ANSWER = (
    "WITH r AS (UPDATE runs SET status = $3, doc = doc || $4::jsonb, expires_at = NULL, lease_expires_at = NULL"
    "  WHERE id = $1 AND status = 'in_progress' AND lease_owner = $2"
    "  AND EXISTS (SELECT 1 FROM messages WHERE id = $5) AND EXISTS (SELECT 1 FROM run_steps WHERE id = $7)"
    "  RETURNING doc),"
    " m AS (UPDATE messages SET doc = doc || $6::jsonb WHERE id = $5 AND EXISTS (SELECT 1 FROM r) RETURNING doc),"
    " s AS (UPDATE run_steps SET status = $8, doc = doc || $9::jsonb WHERE id = $7 AND EXISTS (SELECT 1 FROM r)"
    "  RETURNING doc),"
    + outbox_cte("(SELECT jsonb_agg(jsonb_build_array(i->0, jsonb_set(i->1, '{data}', CASE i->>2"
                 " WHEN 'run' THEN r.doc WHEN 'message' THEN m.doc WHEN 'step' THEN s.doc ELSE i->1->'data' END))"
                 " ORDER BY n) FROM r, m, s, jsonb_array_elements($10::text::jsonb) WITH ORDINALITY AS o(i, n))")
    + f" SELECT EXISTS (SELECT 1 FROM r), pg_notify('{NOTIFY_CHANNEL}', '')")


async def finish_answer(conn: Conn, *, run_id: str, owner: str, status: str, run_patch: dict[str, Any],
                        message_id: str, message_patch: dict[str, Any], step_id: str, step_patch: dict[str, Any],
                        events: Sequence[tuple[EventEnvelope, str | None]]) -> bool:
    """Run, message and step finish together, with `events` ((envelope, "run" | "message" | "step": its data is
    that document as written, or None: as given), if we still drive the run and its message and step exist (one
    statement); False if not.

    Patches overwrite top-level fields only, so concurrent metadata edits are kept."""
    items = ",".join(f'["{EVENTS}",{e.model_dump_json()},{orjson.dumps(doc).decode()}]' for e, doc in events)
    done: bool = await conn.fetchval(
        _FINISH_ANSWER, run_id, owner, status, run_patch, message_id, message_patch, step_id, step_patch["status"],
        step_patch, f"[{items}]")
    return done


_SAVE_RUN = outbox_statement([
    "saved AS (UPDATE runs SET status = $2, doc = $3, expires_at = $4, lease_owner = $5,"
    " lease_expires_at = CASE WHEN $6::float8 IS NULL THEN NULL ELSE now() + make_interval(secs => $6) END"
    " WHERE id = $1)"], 7)


async def save_run(conn: Conn, run: RunRow, *, lease_seconds: float | None, events: Sequence[EventEnvelope]) -> None:
    """Write status, doc, expiry and lease (lease_seconds None clears the lease expiry) and `events` (one statement)."""
    await conn.execute(_SAVE_RUN, run.id, run.status, run.doc, run.expires_at, run.lease_owner, lease_seconds,
                       outbox_param([(EVENTS, e) for e in events]))


async def load_steps(conn: Conn, run_id: str) -> list[StepRow]:
    """The run's steps in creation order."""
    rows = await conn.fetch("SELECT id, status, doc, tool_state FROM run_steps WHERE run_id = $1 ORDER BY id",
                            run_id)
    return [StepRow(id=r["id"], status=r["status"], doc=r["doc"], tool_state=r["tool_state"]) for r in rows]


async def lock_step(conn: Conn, step_id: str) -> StepRow | None:
    """One step, locked."""
    r = await conn.fetchrow("SELECT id, status, doc, tool_state FROM run_steps WHERE id = $1 FOR UPDATE", step_id)
    return StepRow(id=r["id"], status=r["status"], doc=r["doc"], tool_state=r["tool_state"]) if r else None


async def file_contents(conn: Conn, project_id: str, file_ids: list[str], now: int) -> dict[str, tuple[str, bytes]]:
    """Filename and bytes of those of `file_ids` that are live files of the project, by id."""
    rows = await conn.fetch(
        "SELECT f.id, f.filename, c.content FROM files f JOIN file_contents c ON c.file_id = f.id"
        " WHERE f.id = ANY($1) AND f.project_id = $2"
        " AND (f.doc->>'expires_at' IS NULL OR (f.doc->>'expires_at')::bigint > $3)", file_ids, project_id, now)
    return {r["id"]: (str(r["filename"]), bytes(r["content"])) for r in rows}


async def in_progress_messages(conn: Conn, run_id: str) -> list[MessageRow]:
    """Messages of the run still being written."""
    rows = await conn.fetch(
        "SELECT id, run_id, doc FROM messages WHERE run_id = $1 AND doc->>'status' = 'in_progress' ORDER BY id",
        run_id)
    return [MessageRow(id=r["id"], run_id=r["run_id"], doc=r["doc"]) for r in rows]


async def get_message(conn: Conn, message_id: str) -> MessageRow | None:
    """One message."""
    r = await conn.fetchrow("SELECT id, run_id, doc FROM messages WHERE id = $1", message_id)
    return MessageRow(id=r["id"], run_id=r["run_id"], doc=r["doc"]) if r else None


async def insert_message(conn: Conn, project_id: str, doc: dict[str, Any]) -> None:
    """Add an assistant message."""
    await conn.execute(
        "INSERT INTO messages (id, project_id, thread_id, run_id, created_at, doc) VALUES ($1, $2, $3, $4, $5, $6)",
        doc["id"], project_id, doc["thread_id"], doc["run_id"], doc["created_at"], doc)


async def update_message(conn: Conn, doc: dict[str, Any]) -> None:
    """Replace a message's document."""
    await conn.execute("UPDATE messages SET doc = $2 WHERE id = $1", doc["id"], doc)


async def insert_step(conn: Conn, project_id: str, doc: dict[str, Any],
                      tool_state: dict[str, Any] | None = None) -> None:
    """Add a run step."""
    await conn.execute(
        "INSERT INTO run_steps (id, project_id, thread_id, run_id, status, created_at, doc, tool_state)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        doc["id"], project_id, doc["thread_id"], doc["run_id"], doc["status"], doc["created_at"], doc, tool_state)


async def update_step(conn: Conn, doc: dict[str, Any], tool_state: dict[str, Any] | None) -> None:
    """Replace a step's document, status and bookkeeping."""
    await conn.execute("UPDATE run_steps SET status = $2, doc = $3, tool_state = $4 WHERE id = $1",
                       doc["id"], doc["status"], doc, tool_state)


async def renew_leases(conn: Conn, run_ids: list[str], owner: str, seconds: float) -> list[str]:
    """Extend our leases; return the runs we no longer hold (cancelling, finished elsewhere, taken over)."""
    rows = await conn.fetch(
        "WITH renewed AS (UPDATE runs SET lease_expires_at = now() + make_interval(secs => $3)"
        " WHERE id = ANY($1::text[]) AND lease_owner = $2 AND status = 'in_progress' RETURNING id)"
        " SELECT t.id FROM unnest($1::text[]) AS t(id) WHERE t.id NOT IN (SELECT id FROM renewed)",
        run_ids, owner, seconds)
    return [r["id"] for r in rows]


async def requeue_dead_leases(conn: Conn, limit: int, max_driver_losses: int) -> list[RunRow]:
    """Runs in progress whose lease ran out (driver died, tool call overdue) go back to queued, counting a lost
    driver (the lease had an owner); not those whose driver is lost for the `max_driver_losses`th time."""
    rows = await conn.fetch(
        f"UPDATE runs SET status = 'queued', doc = jsonb_set(doc, '{{status}}', '\"queued\"'),"
        " driver_losses = driver_losses + (lease_owner IS NOT NULL)::int, lease_owner = NULL, lease_expires_at = NULL,"
        " announced_at = now()"
        " WHERE id IN (SELECT id FROM runs WHERE status = 'in_progress' AND lease_expires_at < now()"
        "  AND (lease_owner IS NULL OR driver_losses + 1 < $2)"
        "  ORDER BY lease_expires_at LIMIT $1 FOR UPDATE SKIP LOCKED)"
        f" RETURNING {_RUN_COLUMNS}", limit, max_driver_losses)
    return [_run(r) for r in rows]


async def lock_lost_for_good(conn: Conn, limit: int, max_driver_losses: int) -> list[RunRow]:
    """Runs in progress whose driver was just lost for the `max_driver_losses`th time, locked."""
    rows = await conn.fetch(
        f"SELECT {_RUN_COLUMNS} FROM runs WHERE status = 'in_progress' AND lease_expires_at < now()"
        " AND lease_owner IS NOT NULL AND driver_losses + 1 >= $2"
        " ORDER BY lease_expires_at LIMIT $1 FOR UPDATE SKIP LOCKED", limit, max_driver_losses)
    return [_run(r) for r in rows]


async def reannounce_unclaimed(conn: Conn, limit: int, older_than_seconds: float) -> list[RunRow]:
    """Queued runs whose command was sent longer ago than `older_than_seconds` and nobody claimed them: noted as
    sent again now (the caller sends it in the same transaction)."""
    rows = await conn.fetch(
        "UPDATE runs SET announced_at = now() WHERE id IN (SELECT id FROM runs WHERE status = 'queued'"
        "  AND announced_at < now() - make_interval(secs => $2) ORDER BY announced_at LIMIT $1 FOR UPDATE SKIP LOCKED)"
        f" RETURNING {_RUN_COLUMNS}", limit, float(older_than_seconds))
    return [_run(r) for r in rows]


async def requeue_owned(conn: Conn, run_ids: list[str], owner: str) -> list[RunRow]:
    """Hand runs we drive back to the group (graceful shutdown)."""
    rows = await conn.fetch(
        "UPDATE runs SET status = 'queued', doc = jsonb_set(doc, '{status}', '\"queued\"'),"
        " lease_owner = NULL, lease_expires_at = NULL, announced_at = now()"
        " WHERE id = ANY($1::text[]) AND lease_owner = $2 AND status = 'in_progress'"
        f" RETURNING {_RUN_COLUMNS}", run_ids, owner)
    return [_run(r) for r in rows]


async def lock_overdue_runs(conn: Conn, now: int, limit: int) -> list[RunRow]:
    """Active runs past `expires_at` (skipping rows someone else holds)."""
    rows = await conn.fetch(
        f"SELECT {_RUN_COLUMNS} FROM runs WHERE status IN ('queued', 'in_progress', 'requires_action')"
        " AND expires_at IS NOT NULL AND expires_at <= $1 ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED", now, limit)
    return [_run(r) for r in rows]


async def lock_orphaned_cancellations(conn: Conn, limit: int) -> list[RunRow]:
    """Runs left in `cancelling` with no live driver."""
    rows = await conn.fetch(
        f"SELECT {_RUN_COLUMNS} FROM runs WHERE status = 'cancelling'"
        " AND (lease_owner IS NULL OR lease_expires_at IS NULL OR lease_expires_at < now())"
        " ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED", limit)
    return [_run(r) for r in rows]
