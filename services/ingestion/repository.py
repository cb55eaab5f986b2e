"""All SQL of the ingestion service: the work item and its outcome (with events, in one transaction)."""

from dataclasses import dataclass
from typing import Any

import asyncpg

from threadline_core.outbox import append_events
from threadline_core.topics import EVENTS
from threadline_search.store import (
    batch_event,
    file_event,
    lock_vector_store,
    refresh_batches,
    refresh_vector_store,
)


@dataclass(frozen=True)
class WorkItem:
    """A vector store file waiting for ingestion, with what is needed to index it."""

    project_id: str
    vector_store_id: str
    file_id: str
    filename: str
    chunking_strategy: dict[str, Any]
    attributes: dict[str, Any]


class IngestionRepository:
    """Reads the work and records its outcome; every outcome commits with its public events."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def pending(self, vector_store_id: str, file_id: str, request_id: str) -> WorkItem | None:
        """The file if this request is the one in force and it is still in progress; else None (skip)."""
        row = await self._pool.fetchrow(
            "SELECT vf.project_id, vf.doc, coalesce(f.filename, '') AS filename FROM vector_store_files vf"
            " LEFT JOIN files f ON f.id = vf.file_id"  # a deleted file fails its store file (it was skipped: stuck)
            " WHERE vf.vector_store_id = $1 AND vf.file_id = $2 AND vf.status = 'in_progress'"
            " AND vf.request_id = $3", vector_store_id, file_id, request_id)
        if row is None:
            return None
        doc = row["doc"]
        return WorkItem(project_id=row["project_id"], vector_store_id=vector_store_id, file_id=file_id,
                        filename=row["filename"], chunking_strategy=dict(doc.get("chunking_strategy") or {}),
                        attributes=dict(doc.get("attributes") or {}))

    async def store_exists(self, vector_store_id: str) -> bool:
        """Whether the vector store is still there (deleted ones leave no row)."""
        return bool(await self._pool.fetchval("SELECT 1 FROM vector_stores WHERE id = $1", vector_store_id))

    async def still_pending(self, item: WorkItem, request_id: str) -> bool:
        """Whether the request is still in force (not cancelled, detached or superseded)."""
        return bool(await self._pool.fetchval(
            "SELECT 1 FROM vector_store_files WHERE vector_store_id = $1 AND file_id = $2"
            " AND status = 'in_progress' AND request_id = $3", item.vector_store_id, item.file_id, request_id))

    async def content(self, file_id: str) -> bytes | None:
        """The uploaded bytes (None if the file was deleted meanwhile)."""
        data = await self._pool.fetchval("SELECT content FROM file_contents WHERE file_id = $1", file_id)
        return bytes(data) if data is not None else None

    async def finish(self, item: WorkItem, request_id: str, *, usage_bytes: int,
                     last_error: dict[str, str] | None) -> bool:
        """completed (or failed with last_error), counters refreshed, events appended; False if no longer ours."""
        status = "failed" if last_error else "completed"
        async with self._pool.acquire() as conn, conn.transaction():
            if await lock_vector_store(conn, item.vector_store_id) is None:
                return False
            doc = await conn.fetchval(
                "UPDATE vector_store_files SET status = $4, usage_bytes = $5,"
                " doc = doc || jsonb_build_object('status', $4::text, 'usage_bytes', $5::bigint,"
                " 'last_error', $6::jsonb)"
                " WHERE vector_store_id = $1 AND file_id = $2 AND status = 'in_progress' AND request_id = $3"
                " RETURNING doc", item.vector_store_id, item.file_id, request_id, status, usage_bytes, last_error)
            if doc is None:
                return False
            await refresh_vector_store(conn, item.vector_store_id)
            completed = await refresh_batches(conn, item.vector_store_id, [item.file_id])
            await append_events(conn, EVENTS, [file_event(item.project_id, dict(doc)),
                                               *(batch_event(item.project_id, b) for b in completed)])
            return True
