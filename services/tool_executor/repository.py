"""All SQL of the tool executor: the call's context, input files, generated files and the answer."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from threadline_core.db import claim_event
from threadline_core.events import EventEnvelope
from threadline_core.ids import new_id, now_seconds
from threadline_core.outbox import append_events
from threadline_core.topics import RUN_COMMANDS
from threadline_sandbox.inputs import within_budget
from threadline_search.store import completed_files, expires_at_for, lock_vector_store, render_vector_store

CONSUMER_NAME = "tool-executor"
"""The consumer name under which requests are claimed (processed_events)."""


@dataclass(frozen=True)
class CallContext:
    """What a tool call needs to know about its run: state, tools and the resources it may use."""

    project_id: str
    run_status: str
    step_status: str | None
    thread_id: str
    run_doc: dict[str, Any]
    thread_doc: dict[str, Any]
    assistant_doc: dict[str, Any]

    @property
    def active(self) -> bool:
        """True while the run still waits for this step's results."""
        return self.run_status == "in_progress" and self.step_status in (None, "in_progress")


@dataclass(frozen=True)
class StoredFile:
    """An uploaded file's name and bytes."""

    id: str
    filename: str
    data: bytes


@dataclass(frozen=True)
class NewFile:
    """A file to create with the answer (`doc` is the FileObject)."""

    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int
    doc: dict[str, Any]


@dataclass(frozen=True)
class SessionCell:
    """A cell a code_interpreter session ran (replayed before the session's next cell)."""

    thread_id: str
    session_id: str
    tool_call_id: str
    code: str
    cpu_seconds: float


@dataclass(frozen=True)
class CodeSession:
    """A thread's current code_interpreter session: its id and cells, oldest first (none for a new session)."""

    id: str
    cells: list[SessionCell]

    @property
    def cpu_seconds(self) -> float:
        """What its cells took to run (replaying them takes about as much)."""
        return sum(cell.cpu_seconds for cell in self.cells)


class ToolRepository:
    """Reads what a tool call needs and writes its answer (with the generated files) in one transaction."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def answered(self, event_id: str) -> bool:
        """Whether this request was already answered (or skipped) by some executor."""
        return bool(await self._pool.fetchval(
            "SELECT 1 FROM processed_events WHERE consumer = $1 AND event_id = $2", CONSUMER_NAME, event_id))

    async def context(self, run_id: str, step_id: str) -> CallContext | None:
        """The run, its thread, its assistant and the step's status (None if the run is gone)."""
        row = await self._pool.fetchrow(
            "SELECT r.project_id, r.status, r.thread_id, r.doc AS run_doc, t.doc AS thread_doc,"
            " a.doc AS assistant_doc, s.status AS step_status"
            " FROM runs r JOIN threads t ON t.id = r.thread_id"
            " LEFT JOIN assistants a ON a.id = r.assistant_id"
            " LEFT JOIN run_steps s ON s.id = $2 AND s.run_id = r.id"
            " WHERE r.id = $1", run_id, step_id)
        if row is None:
            return None
        return CallContext(project_id=row["project_id"], run_status=row["status"], step_status=row["step_status"],
                           thread_id=row["thread_id"], run_doc=dict(row["run_doc"] or {}),
                           thread_doc=dict(row["thread_doc"] or {}), assistant_doc=dict(row["assistant_doc"] or {}))

    async def attachment_file_ids(self, thread_id: str, tool_type: str) -> list[str]:
        """Files attached to the thread's messages for `tool_type`, oldest message first."""
        rows = await self._pool.fetch(
            "SELECT doc->'attachments' AS attachments FROM messages WHERE thread_id = $1"
            " AND jsonb_typeof(doc->'attachments') = 'array' AND jsonb_array_length(doc->'attachments') > 0"
            " ORDER BY id", thread_id)
        found: list[str] = []
        for row in rows:
            for attachment in row["attachments"] or []:
                tools = attachment.get("tools") or [] if isinstance(attachment, dict) else []
                if any(isinstance(t, dict) and t.get("type") == tool_type for t in tools):
                    file_id = attachment.get("file_id")
                    if isinstance(file_id, str) and file_id not in found:
                        found.append(file_id)
        return found

    async def searchable_files(self, vector_store_ids: Sequence[str]) -> dict[str, list[str]]:
        """The ids of the stores' files ready for use (`completed`), by store: what file_search may search."""
        async with self._pool.acquire() as conn:
            found = await completed_files(conn, vector_store_ids)
        return {store: sorted(files) for store, files in found.items()}

    async def files_in_progress(self, project_id: str, vector_store_ids: Sequence[str]) -> int:
        """How many files of those of these vector stores that are the project's are still being ingested (another
        project's store, named by tool_resources stored before ids were checked, is never waited for: how long a
        call waits would tell what that project is ingesting)."""
        if not vector_store_ids:
            return 0
        return int(await self._pool.fetchval(
            "SELECT count(*) FROM vector_store_files WHERE vector_store_id = ANY($1::text[]) AND project_id = $2"
            " AND status = 'in_progress'", list(vector_store_ids), project_id) or 0)

    async def project_vector_stores(self, project_id: str, vector_store_ids: Sequence[str],
                                    now: int) -> tuple[list[str], list[str]]:
        """Those of `vector_store_ids` that are vector stores of the project, in that order, as (live, expired):
        another project's store must not be searched (tool_resources stored before ids were checked may name any),
        nor an expired one."""
        if not vector_store_ids:
            return [], []
        rows = await self._pool.fetch("SELECT id, doc FROM vector_stores WHERE id = ANY($1::text[])"
                                      " AND project_id = $2", list(vector_store_ids), project_id)
        expired = {r["id"]: render_vector_store(r["doc"], now)["status"] == "expired" for r in rows}
        return ([s for s in vector_store_ids if expired.get(s) is False],
                [s for s in vector_store_ids if expired.get(s) is True])

    async def touch_vector_stores(self, vector_store_ids: Sequence[str], now: int) -> None:
        """The stores a run searched were active now: `last_active_at`, and the `expires_at` anchored on it, move
        (as hosted: a store expires after days without being part of a run). Expired stores stay expired."""
        async with self._pool.acquire() as conn, conn.transaction():
            for store_id in sorted(set(vector_store_ids)):  # one lock order for every writer of several stores
                doc = await lock_vector_store(conn, store_id)
                if doc is None or render_vector_store(doc, now)["status"] == "expired":
                    continue
                doc["last_active_at"] = now
                doc["expires_at"] = expires_at_for(doc.get("expires_after"), now)
                await conn.execute("UPDATE vector_stores SET doc = $2 WHERE id = $1", store_id, doc)

    async def files_available(self) -> bool:
        """Whether the Files tables exist (migration 0003)."""
        return bool(await self._pool.fetchval(
            "SELECT to_regclass('files') IS NOT NULL AND to_regclass('file_contents') IS NOT NULL"))

    async def load_files(self, project_id: str, file_ids: Sequence[str], *, max_total_bytes: int) -> list[StoredFile]:
        """The project's files among `file_ids` (in that order) while their total size fits."""
        if not file_ids or not await self.files_available():
            return []
        rows = await self._pool.fetch(
            "SELECT f.id, f.filename, f.bytes FROM files f WHERE f.id = ANY($1::text[]) AND f.project_id = $2",
            list(file_ids), project_id)
        names = {r["id"]: r["filename"] for r in rows}
        chosen = within_budget(file_ids, {r["id"]: int(r["bytes"]) for r in rows}, max_total_bytes)
        if not chosen:
            return []
        contents = {r["file_id"]: bytes(r["content"]) for r in await self._pool.fetch(
            "SELECT file_id, content FROM file_contents WHERE file_id = ANY($1::text[])", chosen)}
        return [StoredFile(id=f, filename=names[f], data=contents[f]) for f in chosen if f in contents]

    async def file_search_call_index(self, run_id: str, tool_call_id: str) -> int:
        """Position of this call among the run's file_search calls (for the result markers)."""
        rows = await self._pool.fetch(
            "SELECT doc->'step_details'->'tool_calls' AS calls FROM run_steps WHERE run_id = $1"
            " AND doc->>'type' = 'tool_calls' ORDER BY id", run_id)
        index = 0
        for row in rows:
            for call in row["calls"] or []:
                if not isinstance(call, dict) or call.get("type") != "file_search":
                    continue
                if call.get("id") == tool_call_id:
                    return index
                index += 1
        return index

    async def skip(self, event_id: str) -> None:
        """Mark a request as handled without answering (its run no longer waits for it)."""
        async with self._pool.acquire() as conn, conn.transaction():
            await claim_event(conn, CONSUMER_NAME, event_id)

    async def code_session(self, thread_id: str, *, now: int, idle_seconds: float, max_cells: int) -> CodeSession:
        """The thread's session, if its last cell ran less than `idle_seconds` ago and it has room for one more
        cell; else a new one."""
        last = await self._pool.fetchrow(
            "SELECT session_id, executed_at FROM code_session_cells WHERE thread_id = $1 ORDER BY seq DESC LIMIT 1",
            thread_id)
        if last is not None and now - last["executed_at"] < idle_seconds:
            rows = await self._pool.fetch(
                "SELECT tool_call_id, code, cpu_seconds FROM code_session_cells WHERE thread_id = $1"
                " AND session_id = $2 ORDER BY seq", thread_id, last["session_id"])
            if len(rows) < max_cells:
                return CodeSession(id=last["session_id"], cells=[SessionCell(
                    thread_id=thread_id, session_id=last["session_id"], tool_call_id=row["tool_call_id"],
                    code=row["code"], cpu_seconds=row["cpu_seconds"]) for row in rows])
        return CodeSession(id=new_id("cis"), cells=[])

    async def answer(self, event_id: str, project_id: str, answer: EventEnvelope, files: Sequence[NewFile],
                     cell: SessionCell | None = None) -> bool:
        """Store the generated files and the session's new cell, and queue the answer, once per request; False
        if already answered."""
        async with self._pool.acquire() as conn, conn.transaction():
            if not await claim_event(conn, CONSUMER_NAME, event_id):
                return False
            if cell is not None:  # nothing when the thread was deleted meanwhile; older sessions' cells go
                await conn.execute(
                    "INSERT INTO code_session_cells (thread_id, session_id, tool_call_id, code, cpu_seconds,"
                    " executed_at) SELECT id, $2, $3, $4, $5, $6 FROM threads WHERE id = $1",
                    cell.thread_id, cell.session_id, cell.tool_call_id, cell.code, cell.cpu_seconds, now_seconds())
                await conn.execute("DELETE FROM code_session_cells WHERE thread_id = $1 AND session_id <> $2",
                                   cell.thread_id, cell.session_id)
            for new in files:
                await conn.execute(
                    "INSERT INTO files (id, project_id, purpose, filename, bytes, created_at, doc)"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    new.id, project_id, new.purpose, new.filename, len(new.data), new.created_at, new.doc)
                await conn.execute("INSERT INTO file_contents (file_id, content) VALUES ($1, $2)", new.id, new.data)
            await append_events(conn, RUN_COMMANDS, [answer])
            return True
