"""All SQL of the gateway's Assistants API objects (plain asyncpg); reads return openai SDK models.

New threads, messages and runs are written with their outbox events in ONE statement (data-modifying CTEs,
`outbox_statement`): atomic without BEGIN/COMMIT, one round trip instead of four or five. The columns beside
`doc` are read from `doc` in that statement.

Documents go in as json and `as_sent` keeps the fields whose key order is the user's as sent (`doc_as_sent`,
migration 0016); every read lays them over `doc` (`with_as_sent`).
"""

from collections.abc import Sequence
from typing import Any

from openai.types.beta import Assistant, Thread
from openai.types.beta.threads import Message, Run
from openai.types.beta.threads.runs import RunStep

from gateway.pagination import Conn, PageParams, fetch_page
from threadline_core.db import with_as_sent
from threadline_core.events import EventEnvelope
from threadline_core.outbox import outbox_param, outbox_statement

Doc = dict[str, Any]
Outbox = Sequence[tuple[str, EventEnvelope]]

ACTIVE_RUN_STATUSES = ("queued", "in_progress", "requires_action", "cancelling")
CANCELLABLE_RUN_STATUSES = ("queued", "in_progress", "requires_action")
_ACTIVE = "status IN ('queued', 'in_progress', 'requires_action', 'cancelling')"

# Inserts of new objects as CTEs; $1 is always the project id, `{doc}` / `{docs}` a json parameter.
_THREAD = ("t AS (INSERT INTO threads (id, project_id, created_at, doc, as_sent)"
           " SELECT d->>'id', $1, (d->>'created_at')::bigint, d::jsonb, doc_as_sent(d)"
           " FROM (SELECT {doc}::json) AS x(d))")
_MESSAGES = ("m AS (INSERT INTO messages (id, project_id, thread_id, run_id, created_at, doc, as_sent)"
             " SELECT d->>'id', $1, d->>'thread_id', d->>'run_id', (d->>'created_at')::bigint, d::jsonb,"
             " doc_as_sent(d) FROM json_array_elements({docs}::json) AS d)")
_RUN = ("r AS (INSERT INTO runs (id, project_id, thread_id, assistant_id, status, created_at, expires_at,"
        " step_include, doc, as_sent) SELECT d->>'id', $1, d->>'thread_id', d->>'assistant_id', d->>'status',"
        " (d->>'created_at')::bigint, (d->>'expires_at')::bigint, {include}::text[], d::jsonb, doc_as_sent(d)"
        " FROM (SELECT {doc}::json) AS x(d))")
# Replacing top-level fields ($3, a json object): `||` for `doc`, the same for the fields kept as sent.
_PATCH = "doc = doc || $3::json::jsonb, as_sent = json_overlay(as_sent, doc_as_sent($3::json))"
# Replacing the metadata ($4, a json object) of a message or run.
_SET_METADATA = ("doc = jsonb_set(doc, '{metadata}', $4::json::jsonb),"
                 " as_sent = json_overlay(as_sent, json_build_object('metadata', $4::json))")
_CREATE_THREAD = outbox_statement([_THREAD.format(doc="$2"), _MESSAGES.format(docs="$3")], 4)
_ADD_MESSAGES = outbox_statement([_MESSAGES.format(docs="$2")], 3)
_CREATE_RUN = outbox_statement([_MESSAGES.format(docs="$2"), _RUN.format(doc="$3", include="$5")], 4)
_CREATE_THREAD_AND_RUN = outbox_statement([_THREAD.format(doc="$2"), _MESSAGES.format(docs="$3"),
                                           _RUN.format(doc="$4", include="'{}'")], 5)


def _doc(row: Any) -> Any:
    """The document of a row read with its `as_sent` column, as it was sent."""
    return with_as_sent(row["doc"], row["as_sent"])


# --- assistants -------------------------------------------------------------------------------------------


_TOOL_RESOURCE_LISTS = {"code_interpreter": "file_ids", "file_search": "vector_store_ids"}
"""The resource list of each tool that has one (tool type -> field of `tool_resources.<type>`)."""


def assistant_model(doc: Doc) -> Assistant:
    """The stored assistant as the API shows it: a tool it has but no resources for shows empty ones, as hosted
    (the cookbook's `tool_resources.code_interpreter.file_ids + [...]` needs the list)."""
    resources = dict(doc.get("tool_resources") or {})
    for tool in doc.get("tools") or []:
        kind = tool.get("type", "") if isinstance(tool, dict) else ""
        if kind in _TOOL_RESOURCE_LISTS and resources.get(kind) is None:
            resources[kind] = {_TOOL_RESOURCE_LISTS[kind]: []}
    return Assistant.model_validate({**doc, "tool_resources": resources})


async def insert_assistant(conn: Conn, project_id: str, doc: Doc) -> None:
    """Store a new assistant."""
    await conn.execute("INSERT INTO assistants (id, project_id, created_at, doc, as_sent)"
                       " SELECT $1, $2, $3, d::jsonb, doc_as_sent(d) FROM (SELECT $4::json) AS x(d)",
                       doc["id"], project_id, doc["created_at"], doc)


async def get_assistant(conn: Conn, project_id: str, assistant_id: str) -> Assistant | None:
    """One assistant of the project."""
    row = await conn.fetchrow("SELECT doc, as_sent FROM assistants WHERE id = $1 AND project_id = $2",
                              assistant_id, project_id)
    return assistant_model(_doc(row)) if row is not None else None


async def patch_assistant(conn: Conn, project_id: str, assistant_id: str, patch: Doc) -> Assistant | None:
    """Replace the given top-level fields in one statement."""
    row = await conn.fetchrow(f"UPDATE assistants SET {_PATCH} WHERE id = $1 AND project_id = $2"
                              " RETURNING doc, as_sent", assistant_id, project_id, patch)
    return assistant_model(_doc(row)) if row is not None else None


async def delete_assistant(conn: Conn, project_id: str, assistant_id: str) -> bool:
    """Delete an assistant; False if the project has none with that id."""
    deleted = await conn.fetchval("DELETE FROM assistants WHERE id = $1 AND project_id = $2 RETURNING 1",
                                  assistant_id, project_id)
    return deleted is not None


async def list_assistants(conn: Conn, project_id: str, page: PageParams) -> tuple[list[Assistant], bool]:
    """A page of the project's assistants."""
    result = await fetch_page(conn, select="doc, as_sent FROM assistants", where="project_id = $1",
                              args=[project_id], page=page)
    return [assistant_model(_doc(r)) for r in result.rows], result.has_more


# --- threads -------------------------------------------------------------------------------------------------


async def create_thread(conn: Conn, project_id: str, thread: Doc, messages: Sequence[Doc], outbox: Outbox) -> None:
    """Store a new thread with its messages and their events (one statement)."""
    await conn.execute(_CREATE_THREAD, project_id, thread, messages, outbox_param(outbox))


async def get_thread(conn: Conn, project_id: str, thread_id: str) -> Thread | None:
    """One thread of the project."""
    row = await conn.fetchrow("SELECT doc, as_sent FROM threads WHERE id = $1 AND project_id = $2", thread_id,
                              project_id)
    return Thread.model_validate(_doc(row)) if row is not None else None


async def thread_exists(conn: Conn, project_id: str, thread_id: str) -> bool:
    """Whether the project has this thread."""
    found = await conn.fetchval("SELECT 1 FROM threads WHERE id = $1 AND project_id = $2", thread_id, project_id)
    return found is not None


async def lock_thread(conn: Conn, project_id: str, thread_id: str) -> Doc | None:
    """A thread's doc, its row locked until the caller's transaction ends."""
    row = await conn.fetchrow("SELECT doc, as_sent FROM threads WHERE id = $1 AND project_id = $2 FOR UPDATE",
                              thread_id, project_id)
    return _doc(row) if row is not None else None


async def patch_thread(conn: Conn, project_id: str, thread_id: str, patch: Doc) -> Thread | None:
    """Replace the given top-level fields in one statement."""
    row = await conn.fetchrow(f"UPDATE threads SET {_PATCH} WHERE id = $1 AND project_id = $2"
                              " RETURNING doc, as_sent", thread_id, project_id, patch)
    return Thread.model_validate(_doc(row)) if row is not None else None


async def delete_thread(conn: Conn, project_id: str, thread_id: str) -> bool:
    """Delete a thread with its messages, runs and steps (cascade)."""
    deleted = await conn.fetchval("DELETE FROM threads WHERE id = $1 AND project_id = $2 RETURNING 1",
                                  thread_id, project_id)
    return deleted is not None


async def thread_and_active_run(conn: Conn, project_id: str, thread_id: str) -> tuple[bool, str | None]:
    """(thread exists in the project, id of its active run if any) in one round trip."""
    row = await conn.fetchrow(
        "SELECT EXISTS (SELECT 1 FROM threads WHERE id = $1 AND project_id = $2) AS found,"
        f" (SELECT id FROM runs WHERE thread_id = $1 AND {_ACTIVE} LIMIT 1) AS active_run_id",
        thread_id, project_id)
    assert row is not None
    return bool(row["found"]), row["active_run_id"]


# --- messages ------------------------------------------------------------------------------------------------


async def add_messages(conn: Conn, project_id: str, messages: Sequence[Doc], outbox: Outbox) -> None:
    """Store new messages of an existing thread with their events (one statement; ForeignKeyViolationError
    if the thread is gone)."""
    await conn.execute(_ADD_MESSAGES, project_id, messages, outbox_param(outbox))


async def get_message(conn: Conn, project_id: str, thread_id: str, message_id: str) -> Message | None:
    """One message of a thread of the project."""
    row = await conn.fetchrow("SELECT doc, as_sent FROM messages WHERE id = $1 AND thread_id = $2"
                              " AND project_id = $3", message_id, thread_id, project_id)
    return Message.model_validate(_doc(row)) if row is not None else None


async def set_message_metadata(conn: Conn, project_id: str, thread_id: str, message_id: str,
                               metadata: dict[str, str]) -> Message | None:
    """Replace a message's metadata."""
    row = await conn.fetchrow(
        f"UPDATE messages SET {_SET_METADATA} WHERE id = $1 AND thread_id = $2 AND project_id = $3"
        " RETURNING doc, as_sent", message_id, thread_id, project_id, metadata)
    return Message.model_validate(_doc(row)) if row is not None else None


async def delete_message(conn: Conn, project_id: str, thread_id: str, message_id: str) -> bool:
    """Delete a message; False if there is none."""
    deleted = await conn.fetchval(
        "DELETE FROM messages WHERE id = $1 AND thread_id = $2 AND project_id = $3 RETURNING 1",
        message_id, thread_id, project_id)
    return deleted is not None


async def list_messages(conn: Conn, project_id: str, thread_id: str, page: PageParams,
                        run_id: str | None = None) -> tuple[list[Message], bool]:
    """A page of a thread's messages, optionally only those of one run."""
    where, args = "thread_id = $1 AND project_id = $2", [thread_id, project_id]
    if run_id is not None:
        where += " AND run_id = $3"
        args.append(run_id)
    result = await fetch_page(conn, select="doc, as_sent FROM messages", where=where, args=args, page=page)
    return [Message.model_validate(_doc(r)) for r in result.rows], result.has_more


# --- runs --------------------------------------------------------------------------------------------------------


async def run_context(conn: Conn, project_id: str, thread_id: str | None,
                      assistant_id: str) -> tuple[bool, Doc | None]:
    """(thread exists, assistant doc) for creating a run, in one round trip."""
    row = await conn.fetchrow(
        "SELECT EXISTS (SELECT 1 FROM threads WHERE id = $1 AND project_id = $2) AS thread_found,"
        " a.doc, a.as_sent FROM (SELECT 1) AS one"
        " LEFT JOIN assistants a ON a.id = $3 AND a.project_id = $2",
        thread_id or "", project_id, assistant_id)
    assert row is not None
    assistant: Doc | None = _doc(row)
    return bool(row["thread_found"]), assistant


async def create_run(conn: Conn, project_id: str, run: Doc, messages: Sequence[Doc], outbox: Outbox,
                     step_include: Sequence[str] = ()) -> None:
    """Store a new run on an existing thread with its additional messages and the events (one statement), with
    the `include[]` its step events are shaped by (its streams, including submit_tool_outputs').

    Raises UniqueViolationError if the thread already has an active run, ForeignKeyViolationError if it is gone.
    """
    await conn.execute(_CREATE_RUN, project_id, messages, run, outbox_param(outbox), list(step_include))


async def create_thread_and_run(conn: Conn, project_id: str, thread: Doc, messages: Sequence[Doc], run: Doc,
                                outbox: Outbox) -> None:
    """Store a new thread, its messages, a run on it and the events (one statement)."""
    await conn.execute(_CREATE_THREAD_AND_RUN, project_id, thread, messages, run, outbox_param(outbox))


async def active_run_id(conn: Conn, thread_id: str) -> str | None:
    """The thread's active run, if any."""
    found: str | None = await conn.fetchval(f"SELECT id FROM runs WHERE thread_id = $1 AND {_ACTIVE} LIMIT 1",
                                            thread_id)
    return found


async def get_run(conn: Conn, project_id: str, thread_id: str, run_id: str) -> Run | None:
    """One run of a thread of the project."""
    row = await conn.fetchrow("SELECT doc, as_sent FROM runs WHERE id = $1 AND thread_id = $2 AND project_id = $3",
                              run_id, thread_id, project_id)
    return Run.model_validate(_doc(row)) if row is not None else None


async def set_run_metadata(conn: Conn, project_id: str, thread_id: str, run_id: str,
                           metadata: dict[str, str]) -> Run | None:
    """Replace a run's metadata without touching what the orchestrator writes."""
    row = await conn.fetchrow(
        f"UPDATE runs SET {_SET_METADATA} WHERE id = $1 AND thread_id = $2 AND project_id = $3"
        " RETURNING doc, as_sent", run_id, thread_id, project_id, metadata)
    return Run.model_validate(_doc(row)) if row is not None else None


async def mark_run_cancelling(conn: Conn, project_id: str, thread_id: str, run_id: str) -> Doc | None:
    """queued/in_progress/requires_action -> cancelling; None if the run is not in one of those."""
    row = await conn.fetchrow(
        "UPDATE runs SET status = 'cancelling', doc = jsonb_set(doc, '{status}', '\"cancelling\"')"
        " WHERE id = $1 AND thread_id = $2 AND project_id = $3"
        " AND status IN ('queued', 'in_progress', 'requires_action') RETURNING doc, as_sent",
        run_id, thread_id, project_id)
    return _doc(row) if row is not None else None


async def run_status(conn: Conn, project_id: str, thread_id: str, run_id: str) -> str | None:
    """The status column of a run, None if the project has no such run on that thread."""
    status: str | None = await conn.fetchval(
        "SELECT status FROM runs WHERE id = $1 AND thread_id = $2 AND project_id = $3", run_id, thread_id,
        project_id)
    return status


async def list_runs(conn: Conn, project_id: str, thread_id: str, page: PageParams) -> tuple[list[Run], bool]:
    """A page of a thread's runs."""
    result = await fetch_page(conn, select="doc, as_sent FROM runs", where="thread_id = $1 AND project_id = $2",
                              args=[thread_id, project_id], page=page)
    return [Run.model_validate(_doc(r)) for r in result.rows], result.has_more


# --- run steps ------------------------------------------------------------------------------------------------


async def get_step(conn: Conn, project_id: str, thread_id: str, run_id: str, step_id: str) -> RunStep | None:
    """One step of a run."""
    doc = await conn.fetchval(
        "SELECT doc FROM run_steps WHERE id = $1 AND run_id = $2 AND thread_id = $3 AND project_id = $4",
        step_id, run_id, thread_id, project_id)
    return RunStep.model_validate(doc) if doc is not None else None


async def list_steps(conn: Conn, project_id: str, thread_id: str, run_id: str,
                     page: PageParams) -> tuple[list[RunStep], bool]:
    """A page of a run's steps."""
    result = await fetch_page(conn, select="doc FROM run_steps",
                              where="run_id = $1 AND thread_id = $2 AND project_id = $3",
                              args=[run_id, thread_id, project_id], page=page)
    return [RunStep.model_validate(r["doc"]) for r in result.rows], result.has_more
