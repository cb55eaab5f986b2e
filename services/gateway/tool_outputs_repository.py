"""SQL of submit_tool_outputs (plain asyncpg): the run waiting for outputs and its open tool_calls step."""

from dataclasses import dataclass
from typing import Any

from gateway.pagination import Conn
from threadline_core.db import with_as_sent

Doc = dict[str, Any]


@dataclass
class LockedRun:
    """A run locked for the rest of the transaction."""

    status: str
    doc: Doc
    step_include: list[str]
    """The `include[]` the run was created with (its streams' step events)."""


@dataclass
class LockedStep:
    """A run step locked for the rest of the transaction."""

    id: str
    doc: Doc
    tool_state: Doc | None
    """The run orchestrator's bookkeeping of its calls: which server-side ones are done, the model's usage."""


async def lock_run(conn: Conn, project_id: str, thread_id: str, run_id: str) -> LockedRun | None:
    """The run of the project and thread, locked."""
    row = await conn.fetchrow("SELECT status, doc, as_sent, step_include FROM runs WHERE id = $1 AND thread_id = $2"
                              " AND project_id = $3 FOR UPDATE", run_id, thread_id, project_id)
    if row is None:
        return None
    return LockedRun(status=row["status"], doc=with_as_sent(row["doc"], row["as_sent"]),
                     step_include=list(row["step_include"]))


async def lock_open_tool_step(conn: Conn, run_id: str) -> LockedStep | None:
    """The run's newest in-progress `tool_calls` step, locked."""
    row = await conn.fetchrow("SELECT id, doc, tool_state FROM run_steps WHERE run_id = $1 AND status = 'in_progress'"
                              " AND doc->>'type' = 'tool_calls' ORDER BY id DESC LIMIT 1 FOR UPDATE", run_id)
    return LockedStep(id=row["id"], doc=row["doc"], tool_state=row["tool_state"]) if row else None


async def save_step_doc(conn: Conn, step_id: str, doc: Doc) -> None:
    """Replace a step's document and status (`doc["status"]`)."""
    await conn.execute("UPDATE run_steps SET doc = $2, status = $3 WHERE id = $1", step_id, doc, doc["status"])


async def save_queued_run(conn: Conn, run_id: str, doc: Doc, expires_at: int) -> None:
    """The run goes back to `queued` for the orchestrator."""
    await conn.execute("UPDATE runs SET status = 'queued', doc = $2, expires_at = $3, announced_at = now()"
                       " WHERE id = $1", run_id, doc, expires_at)
