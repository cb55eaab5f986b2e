"""All SQL of the ingestion service: the work item and its outcome (with events, in one transaction)."""

from dataclasses import dataclass
from enum import Enum
from typing import Any, Final

import asyncpg

from threadline_core.events import FileIngestionRequested
from threadline_core.outbox import append_events
from threadline_core.topics import EVENTS, INGESTION_REQUESTS
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


class Held(Enum):
    """Another instance holds a live claim on the request (it is indexing it): wait for it to end or lapse."""

    HELD = "held"


HELD: Final = Held.HELD


class IngestionRepository:
    """Reads the work and records its outcome; every outcome commits with its public events."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def claim(self, vector_store_id: str, file_id: str, request_id: str, *, owner: str,
                    lease_seconds: float) -> WorkItem | Held | None:
        """Start (or resume) the request for `owner` with a claim lasting `lease_seconds`: the file if the request is
        in force and nobody else holds a live claim on it; HELD if somebody does (wait); None if the request is not
        in force (skip). The first claim records when ingestion started the request (the sweep leaves it alone)."""
        row = await self._pool.fetchrow(
            "UPDATE vector_store_files vf SET started_at = coalesce(vf.started_at, now()), claimed_by = $4,"
            " claim_expires_at = now() + make_interval(secs => $5)"
            " WHERE vf.vector_store_id = $1 AND vf.file_id = $2 AND vf.status = 'in_progress' AND vf.request_id = $3"
            " AND (vf.claimed_by IS NULL OR vf.claimed_by = $4 OR vf.claim_expires_at < now())"
            # a deleted file fails its store file (it was skipped: stuck)
            " RETURNING vf.project_id, vf.doc, coalesce((SELECT f.filename FROM files f WHERE f.id = vf.file_id), '')"
            " AS filename", vector_store_id, file_id, request_id, owner, float(lease_seconds))
        if row is None:
            status = await self.request_status(vector_store_id, file_id, request_id)
            return HELD if status == "in_progress" else None
        doc = row["doc"]
        return WorkItem(project_id=row["project_id"], vector_store_id=vector_store_id, file_id=file_id,
                        filename=row["filename"], chunking_strategy=dict(doc.get("chunking_strategy") or {}),
                        attributes=dict(doc.get("attributes") or {}))

    async def renew(self, item: WorkItem, request_id: str, *, owner: str, lease_seconds: float) -> bool:
        """Extend our claim while we index; False if it is no longer ours (lapsed and taken, or the request ended)."""
        return bool(await self._pool.fetchval(
            "UPDATE vector_store_files SET claim_expires_at = now() + make_interval(secs => $5)"
            " WHERE vector_store_id = $1 AND file_id = $2 AND status = 'in_progress' AND request_id = $3"
            " AND claimed_by = $4 RETURNING 1", item.vector_store_id, item.file_id, request_id, owner,
            float(lease_seconds)))

    async def release(self, item: WorkItem, request_id: str, *, owner: str) -> None:
        """Give up our claim on a request we did not finish (a retry, another instance's delivery may take it)."""
        await self._pool.execute(
            "UPDATE vector_store_files SET claimed_by = NULL, claim_expires_at = NULL"
            " WHERE vector_store_id = $1 AND file_id = $2 AND request_id = $3 AND claimed_by = $4",
            item.vector_store_id, item.file_id, request_id, owner)

    async def store_exists(self, vector_store_id: str) -> bool:
        """Whether the vector store is still there (deleted ones leave no row)."""
        return bool(await self._pool.fetchval("SELECT 1 FROM vector_stores WHERE id = $1", vector_store_id))

    async def request_status(self, vector_store_id: str, file_id: str, request_id: str) -> str | None:
        """The file's status while this request is the one in force (in_progress, or completed / failed by it);
        None once it was withdrawn (cancelled, detached, superseded, store deleted)."""
        status = await self._pool.fetchval(
            "SELECT status FROM vector_store_files WHERE vector_store_id = $1 AND file_id = $2 AND request_id = $3",
            vector_store_id, file_id, request_id)
        return str(status) if status is not None else None

    async def resend_unstarted(self, limit: int, older_than_seconds: float) -> list[str]:
        """Send again the requests in force that ingestion has not started `older_than_seconds` after they were
        sent (the broker lost them), under their own request ids, noted as sent now; return their request ids.
        Several instances share the work (SKIP LOCKED); a request still on its way is just delivered twice. The wait
        doubles with every re-send (it is at least as long as the file has waited since it was attached), so files
        queued behind a long backlog get a few duplicates, not one per interval."""
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "UPDATE vector_store_files vf SET announced_at = now() FROM (SELECT vector_store_id, file_id"
                "  FROM vector_store_files WHERE status = 'in_progress' AND started_at IS NULL"
                "  AND request_id IS NOT NULL AND announced_at < now() - make_interval(secs => $2)"
                "  AND announced_at < now() - make_interval(secs => extract(epoch FROM announced_at) - created_at)"
                "  ORDER BY announced_at LIMIT $1 FOR UPDATE SKIP LOCKED) due"
                " WHERE vf.vector_store_id = due.vector_store_id AND vf.file_id = due.file_id"
                " RETURNING vf.project_id, vf.vector_store_id, vf.file_id, vf.request_id, vf.request_batch_id,"
                " vf.doc -> 'chunking_strategy' AS chunking_strategy", limit, float(older_than_seconds))
            await append_events(conn, INGESTION_REQUESTS, [
                FileIngestionRequested(vector_store_id=r["vector_store_id"], file_id=r["file_id"],
                                       batch_id=r["request_batch_id"], chunking_strategy=r["chunking_strategy"] or {},
                                       request_id=r["request_id"]).envelope(project_id=r["project_id"],
                                                                            key=r["vector_store_id"])
                for r in rows])
        return [str(r["request_id"]) for r in rows]

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
                "UPDATE vector_store_files SET status = $4, usage_bytes = $5, claimed_by = NULL,"
                " claim_expires_at = NULL, doc = doc || jsonb_build_object('status', $4::text,"
                " 'usage_bytes', $5::bigint, 'last_error', $6::jsonb)"
                " WHERE vector_store_id = $1 AND file_id = $2 AND status = 'in_progress' AND request_id = $3"
                " RETURNING doc", item.vector_store_id, item.file_id, request_id, status, usage_bytes, last_error)
            if doc is None:
                return False
            await refresh_vector_store(conn, item.vector_store_id)
            completed = await refresh_batches(conn, item.vector_store_id, [item.file_id])
            await append_events(conn, EVENTS, [file_event(item.project_id, dict(doc)),
                                               *(batch_event(item.project_id, b) for b in completed)])
            return True
