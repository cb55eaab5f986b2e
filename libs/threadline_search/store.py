"""SQL shared by the gateway and the ingestion service: vector store file state and the derived counters.

`file_counts`, `usage_bytes` and `status` of a vector store and of its batches are derived from the
vector_store_files rows; every writer recomputes them in the same transaction as its change (holding the
store's row lock), then appends the public events with the new objects.
"""

from collections.abc import Sequence
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from threadline_core.events import EventEnvelope, public_event
from threadline_core.ids import now_seconds

Conn = asyncpg.Connection | PoolConnectionProxy
_STATUSES = ("in_progress", "completed", "failed", "cancelled")


def empty_counts() -> dict[str, int]:
    """file_counts with every status at zero."""
    return {"in_progress": 0, "completed": 0, "failed": 0, "cancelled": 0, "total": 0}


def vector_store_file_doc(*, file_id: str, vector_store_id: str, created_at: int, status: str,
                          chunking_strategy: dict[str, Any], attributes: dict[str, Any] | None,
                          usage_bytes: int = 0, last_error: dict[str, str] | None = None) -> dict[str, Any]:
    """A `vector_store.file` object."""
    return {"id": file_id, "object": "vector_store.file", "created_at": created_at, "usage_bytes": usage_bytes,
            "vector_store_id": vector_store_id, "status": status, "last_error": last_error,
            "chunking_strategy": chunking_strategy, "attributes": attributes or {}}


def render_vector_store(doc: dict[str, Any], now: int | None = None) -> dict[str, Any]:
    """The stored vector store as returned now: `expired` once expires_at has passed."""
    expires_at = doc.get("expires_at")
    if expires_at is not None and int(expires_at) <= (now if now is not None else now_seconds()):
        return {**doc, "status": "expired"}
    return doc


def expires_at_for(expires_after: dict[str, Any] | None, last_active_at: int) -> int | None:
    """expires_at from an `expires_after` policy anchored on last_active_at."""
    if not expires_after:
        return None
    return last_active_at + int(expires_after["days"]) * 86400


def expired_stores_message(vector_store_ids: Sequence[str]) -> str:
    """Why a run that would search expired vector stores fails, and the fix the hosted API documents."""
    if len(vector_store_ids) == 1:
        named = f"The vector store {vector_store_ids[0]} has"
    else:
        named = f"The vector stores {', '.join(vector_store_ids)} have"
    return (f"{named} expired and can no longer be searched by file_search. Recreate the vector store with the "
            "same files and attach the new one to the thread or assistant (tool_resources.file_search."
            "vector_store_ids) in place of the expired one.")


def _counts(rows: Sequence[asyncpg.Record]) -> dict[str, int]:
    counts = empty_counts()
    for row in rows:
        if row["status"] in _STATUSES:
            counts[row["status"]] += int(row["n"])
            counts["total"] += int(row["n"])
    return counts


async def lock_vector_store(conn: Conn, vector_store_id: str) -> dict[str, Any] | None:
    """The store's doc, row-locked until the transaction ends (None if deleted)."""
    doc = await conn.fetchval("SELECT doc FROM vector_stores WHERE id = $1 FOR UPDATE", vector_store_id)
    return dict(doc) if doc is not None else None


async def completed_files(conn: Conn, vector_store_ids: Sequence[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """The attributes of the stores' `completed` files, by store and file id: the files a search may return (one
    being indexed, failed or cancelled has points too, and is not ready for use), told to Qdrant with the query."""
    rows = await conn.fetch("SELECT vector_store_id, file_id, doc->'attributes' AS attributes FROM vector_store_files"
                            " WHERE vector_store_id = ANY($1::text[]) AND status = 'completed'", list(vector_store_ids))
    found: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        found.setdefault(row["vector_store_id"], {})[row["file_id"]] = dict(row["attributes"] or {})
    return found


async def refresh_vector_store(conn: Conn, vector_store_id: str, *, touch: bool = False,
                               ) -> dict[str, Any] | None:
    """Recompute file_counts, usage_bytes and status from the files (and last_active_at when touched, unless it has
    expired: an expired store stays expired, even if it expired while a search of it ran)."""
    doc = await lock_vector_store(conn, vector_store_id)
    if doc is None:
        return None
    rows = await conn.fetch("SELECT status, count(*) AS n, coalesce(sum(usage_bytes), 0) AS usage FROM"
                            " vector_store_files WHERE vector_store_id = $1 GROUP BY status", vector_store_id)
    doc["file_counts"] = _counts(rows)
    doc["usage_bytes"] = int(sum(int(r["usage"]) for r in rows if r["status"] == "completed"))
    doc["status"] = "in_progress" if doc["file_counts"]["in_progress"] else "completed"
    if touch and render_vector_store(doc)["status"] != "expired":
        doc["last_active_at"] = now_seconds()
        doc["expires_at"] = expires_at_for(doc.get("expires_after"), doc["last_active_at"])
    await conn.execute("UPDATE vector_stores SET doc = $2 WHERE id = $1", vector_store_id, doc)
    return doc


async def refresh_batches(conn: Conn, vector_store_id: str, file_ids: Sequence[str],
                          ) -> list[dict[str, Any]]:
    """Recompute the counts of the batches holding these files; return the batches that just completed."""
    batches = await conn.fetch(
        "SELECT id, status, doc FROM vector_store_file_batches WHERE vector_store_id = $1 AND id IN"
        " (SELECT batch_id FROM vector_store_file_batch_files WHERE vector_store_id = $1 AND file_id = ANY($2))"
        " ORDER BY id FOR UPDATE", vector_store_id, list(file_ids))
    completed: list[dict[str, Any]] = []
    for batch in batches:
        doc = await refresh_batch(conn, batch["id"], dict(batch["doc"]))
        if batch["status"] == "in_progress" and doc["status"] == "completed":
            completed.append(doc)
    return completed


async def refresh_batch(conn: Conn, batch_id: str, doc: dict[str, Any]) -> dict[str, Any]:
    """Recompute one batch's file_counts; an in_progress batch with nothing left in progress completes."""
    rows = await conn.fetch(
        "SELECT f.status, count(*) AS n FROM vector_store_file_batch_files bf JOIN vector_store_files f"
        " ON f.vector_store_id = bf.vector_store_id AND f.file_id = bf.file_id WHERE bf.batch_id = $1"
        " GROUP BY f.status", batch_id)
    doc["file_counts"] = _counts(rows)
    if doc["status"] == "in_progress" and doc["file_counts"]["in_progress"] == 0:
        doc["status"] = "completed"
    await conn.execute("UPDATE vector_store_file_batches SET status = $2, doc = $3 WHERE id = $1",
                       batch_id, doc["status"], doc)
    return doc


def file_event(project_id: str, doc: dict[str, Any]) -> EventEnvelope:
    """`vector_store.file.<status>` with the file object (key: the vector store)."""
    return public_event(type=f"vector_store.file.{doc['status']}", project_id=project_id,
                        key=doc["vector_store_id"], data=doc)


def batch_event(project_id: str, doc: dict[str, Any]) -> EventEnvelope:
    """`vector_store.file_batch.<status>` with the batch object (key: the vector store)."""
    return public_event(type=f"vector_store.file_batch.{doc['status']}", project_id=project_id,
                        key=doc["vector_store_id"], data=doc)
