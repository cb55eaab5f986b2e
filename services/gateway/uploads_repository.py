"""All SQL of the Uploads API: uploads, their parts (bytea until completed or cancelled), the File they become."""

from dataclasses import dataclass
from typing import Any, Literal

from gateway.files_repository import insert_file_object
from gateway.pagination import Conn

Doc = dict[str, Any]
Lock = Literal["", "FOR SHARE", "FOR UPDATE"]


@dataclass(frozen=True)
class UploadRow:
    """An upload as stored: its object and the columns requests check."""

    doc: Doc
    status: str
    bytes: int
    expires_at: int
    file_expires_after: int | None


async def insert_upload(conn: Conn, project_id: str, doc: Doc, file_expires_after: int | None) -> None:
    """Store a new (pending) upload."""
    await conn.execute("INSERT INTO uploads (id, project_id, status, bytes, created_at, expires_at,"
                       " file_expires_after, doc) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                       doc["id"], project_id, doc["status"], doc["bytes"], doc["created_at"], doc["expires_at"],
                       file_expires_after, doc)


async def get_upload(conn: Conn, project_id: str, upload_id: str, lock: Lock = "") -> UploadRow | None:
    """The project's upload (None if unknown or another project's), optionally locked for the transaction."""
    row = await conn.fetchrow("SELECT doc, status, bytes, expires_at, file_expires_after FROM uploads"
                              f" WHERE id = $1 AND project_id = $2 {lock}", upload_id, project_id)
    if row is None:
        return None
    return UploadRow(doc=dict(row["doc"]), status=row["status"], bytes=row["bytes"], expires_at=row["expires_at"],
                     file_expires_after=row["file_expires_after"])


async def parts_bytes(conn: Conn, upload_id: str) -> int:
    """How many bytes the upload's parts hold together."""
    total = await conn.fetchval("SELECT coalesce(sum(bytes), 0) FROM upload_parts WHERE upload_id = $1", upload_id)
    return int(total)


async def insert_part(conn: Conn, part_id: str, upload_id: str, created_at: int, content: bytes) -> None:
    """Store one part's bytes."""
    await conn.execute("INSERT INTO upload_parts (id, upload_id, created_at, bytes, content)"
                       " VALUES ($1, $2, $3, $4, $5)", part_id, upload_id, created_at, len(content), content)


async def part_sizes(conn: Conn, upload_id: str, part_ids: list[str]) -> dict[str, int]:
    """The size of each of `part_ids` that is a part of this upload, by id."""
    rows = await conn.fetch("SELECT id, bytes FROM upload_parts WHERE upload_id = $1 AND id = ANY($2::text[])",
                            upload_id, part_ids)
    return {r["id"]: int(r["bytes"]) for r in rows}


async def insert_file_from_parts(conn: Conn, project_id: str, file_doc: Doc, upload_id: str,
                                 part_ids: list[str]) -> str:
    """Store the File (same rows as the Files API) with the parts concatenated in order; return the bytes' md5.

    The bytes are joined inside Postgres: a large upload never passes through the gateway's memory.
    """
    await insert_file_object(conn, project_id, file_doc)
    digest: str = await conn.fetchval(
        "INSERT INTO file_contents (file_id, content)"
        " SELECT $1, string_agg(p.content, ''::bytea ORDER BY o.ord)"
        " FROM unnest($3::text[]) WITH ORDINALITY AS o (id, ord)"
        " JOIN upload_parts p ON p.id = o.id AND p.upload_id = $2"
        " RETURNING md5(content)", file_doc["id"], upload_id, part_ids)
    return digest


async def finish_upload(conn: Conn, upload_id: str, doc: Doc, file_id: str | None) -> None:
    """Record a completed or cancelled upload and drop its parts (their bytes are in the File, or unwanted)."""
    await conn.execute("UPDATE uploads SET status = $2, doc = $3, file_id = $4 WHERE id = $1",
                       upload_id, doc["status"], doc, file_id)
    await conn.execute("DELETE FROM upload_parts WHERE upload_id = $1", upload_id)


async def expire_stale(conn: Conn, now: int, limit: int) -> int:
    """Mark up to `limit` pending uploads past their expiry as expired and drop their parts; return how many."""
    count = await conn.fetchval(
        "WITH gone AS (UPDATE uploads SET status = 'expired', doc = jsonb_set(doc, '{status}', '\"expired\"')"
        "   WHERE id IN (SELECT id FROM uploads WHERE status = 'pending' AND expires_at <= $1"
        "                ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED) RETURNING id),"
        " dropped AS (DELETE FROM upload_parts WHERE upload_id IN (SELECT id FROM gone))"
        " SELECT count(*) FROM gone", now, limit)
    return int(count)
