"""Uploads API logic: a large file sent in parts (each its own request), assembled into a File on completion."""

import asyncio
import contextlib
import logging
from typing import Annotated, Any

import asyncpg
from openai.types import Upload
from openai.types.uploads import UploadPart
from pydantic import Field

from gateway import uploads_repository as repo
from gateway.errors import ApiError, bad_request, echo, not_found
from gateway.files_service import check_upload, delete_expired_files, new_file_doc
from gateway.pagination import Conn
from gateway.schemas import Strict
from threadline_core.ids import new_id, now_seconds

_log = logging.getLogger(__name__)

Doc = dict[str, Any]
UPLOAD_TTL_SECONDS = 3600
"""A pending upload takes parts for an hour after its creation, as hosted."""
MAX_PART_BYTES = 64 * 1024 * 1024
"""The largest part, as hosted (64 MB)."""
MAX_ASSEMBLED_BYTES = 1024 * 1024 * 1024 - 1
"""The largest bytea Postgres builds: an upload can never be bigger, whatever THREADLINE_MAX_UPLOAD_BYTES says."""
STALE_SWEEP_BATCH = 100
"""Expired uploads marked (and their parts dropped) per statement of a sweep, and expired files deleted per round."""


class UploadExpiresAfterIn(Strict):
    """`{"anchor": "created_at", "seconds": N}`: when the File the upload becomes expires."""

    anchor: str
    seconds: int


class UploadCreate(Strict):
    """POST /v1/uploads."""

    bytes: int
    filename: str
    mime_type: str
    purpose: str
    expires_after: UploadExpiresAfterIn | None = None


class UploadComplete(Strict):
    """POST /v1/uploads/{upload_id}/complete."""

    part_ids: Annotated[list[str], Field(min_length=1)]
    md5: str | None = None


def upload_limit(max_upload_bytes: int) -> int:
    """The largest upload this gateway takes: its upload limit, within what Postgres can assemble."""
    return min(max_upload_bytes, MAX_ASSEMBLED_BYTES)


def part_too_large(size: int) -> ApiError:
    """413 in the OpenAI format, as the Files API answers an oversized file."""
    return ApiError(413, f"Part is too large: {size} bytes. The maximum part size is {MAX_PART_BYTES} bytes.",
                    param="data", code="request_too_large")


def _status(row: repo.UploadRow, now: int) -> str:
    """The status as clients see it: a pending upload past its expiry is expired, swept or not."""
    return "expired" if row.status == "pending" and row.expires_at <= now else row.status


def _require_pending(row: repo.UploadRow, upload_id: str, now: int, action: str) -> None:
    """400 unless the upload still takes parts (or a completion, or a cancellation)."""
    status = _status(row, now)
    if status != "pending":
        raise bad_request(f"Cannot {action} upload '{upload_id}': its status is '{status}' (only a pending "
                          "upload can be changed).", code="invalid_upload_status")


async def _get(conn: Conn, project_id: str, upload_id: str, lock: repo.Lock = "") -> repo.UploadRow:
    row = await repo.get_upload(conn, project_id, upload_id, lock)
    if row is None:
        raise not_found("upload", upload_id)
    return row


async def create_upload(pool: asyncpg.Pool, project_id: str, body: UploadCreate, max_upload_bytes: int) -> Doc:
    """Create a pending upload (the Files API's checks of purpose and expires_after; size within our limit)."""
    if not body.filename.strip():
        raise bad_request("Missing required parameter: 'filename'.", "filename", "missing_required_parameter")
    if not body.mime_type.strip():
        raise bad_request("Missing required parameter: 'mime_type'.", "mime_type", "missing_required_parameter")
    expires = body.expires_after
    purpose, filename, file_expires = check_upload(
        body.purpose, body.filename, expires.anchor if expires else None, expires.seconds if expires else None)
    limit = upload_limit(max_upload_bytes)
    if body.bytes < 1:
        raise bad_request(f"Invalid 'bytes': integer below minimum value. Expected a value >= 1, but got "
                          f"{body.bytes} instead.", "bytes", "integer_below_min_value")
    if body.bytes > limit:
        raise bad_request(f"Invalid 'bytes': integer above maximum value. Expected a value <= {limit} (the largest "
                          f"upload this server accepts), but got {body.bytes} instead.", "bytes",
                          "integer_above_max_value")
    now = now_seconds()
    doc: Doc = {"id": new_id("upload"), "object": "upload", "bytes": body.bytes, "created_at": now,
                "filename": filename, "purpose": purpose, "status": "pending",
                "expires_at": now + UPLOAD_TTL_SECONDS, "file": None}
    Upload.model_validate(doc)
    await repo.insert_upload(pool, project_id, doc, file_expires)
    return doc


async def check_pending(pool: asyncpg.Pool, project_id: str, upload_id: str) -> None:
    """404 or 400 before a part's bytes are read, when no part could be added anyway."""
    _require_pending(await _get(pool, project_id, upload_id), upload_id, now_seconds(), "add a part to")


async def add_part(pool: asyncpg.Pool, project_id: str, upload_id: str, content: bytes,
                   max_upload_bytes: int) -> Doc:
    """Store a part (parts of one upload may arrive concurrently; completion and cancellation wait for them)."""
    if not content:
        raise bad_request("Invalid 'data': a part must not be empty.", "data", "invalid_value")
    if len(content) > MAX_PART_BYTES:
        raise part_too_large(len(content))
    now = now_seconds()
    doc: Doc = {"id": new_id("part"), "object": "upload.part", "created_at": now, "upload_id": upload_id}
    UploadPart.model_validate(doc)
    limit = upload_limit(max_upload_bytes)
    async with pool.acquire() as conn, conn.transaction():
        row = await _get(conn, project_id, upload_id, "FOR SHARE")
        _require_pending(row, upload_id, now, "add a part to")
        held = await repo.parts_bytes(conn, upload_id)
        if held + len(content) > limit:
            raise bad_request(f"Upload '{upload_id}' already holds {held} bytes of parts; with this part of "
                              f"{len(content)} bytes it would exceed {limit} bytes, the largest upload this server "
                              "accepts.", "data", "upload_too_large")
        await repo.insert_part(conn, doc["id"], upload_id, now, content)
    return doc


async def complete_upload(pool: asyncpg.Pool, project_id: str, upload_id: str, body: UploadComplete) -> Doc:
    """Join the parts in `part_ids` order into a File, exactly as the Files API stores one, in one transaction."""
    part_ids = body.part_ids
    async with pool.acquire() as conn, conn.transaction():
        now = now_seconds()
        row = await _get(conn, project_id, upload_id, "FOR UPDATE")
        _require_pending(row, upload_id, now, "complete")
        seen: set[str] = set()
        for part_id in part_ids:
            if part_id in seen:
                raise bad_request(f"Invalid 'part_ids': part '{echo(part_id)}' is listed more than once.",
                                  "part_ids", "invalid_value")
            seen.add(part_id)
        sizes = await repo.part_sizes(conn, upload_id, part_ids)
        unknown = [p for p in part_ids if p not in sizes]
        if unknown:
            raise bad_request(f"Invalid 'part_ids': '{echo(unknown[0])}' is not a part of upload '{upload_id}'.",
                              "part_ids", "invalid_value")
        total = sum(sizes.values())
        if total != row.bytes:
            raise bad_request(f"The parts hold {total} bytes, but upload '{upload_id}' was created with bytes="
                              f"{row.bytes}: the sizes must match.", "part_ids", "invalid_value")
        doc = row.doc
        file_doc = new_file_doc(purpose=doc["purpose"], filename=doc["filename"], size=total,
                                expires_after_seconds=row.file_expires_after, now=now)
        digest = await repo.insert_file_from_parts(conn, project_id, file_doc, upload_id, part_ids)
        if body.md5 is not None and body.md5.strip().lower() != digest:
            raise bad_request(f"The md5 checksum of the parts' bytes is '{digest}', not the '{echo(body.md5)}' "
                              "given: nothing was stored and the upload is still pending.", "md5", "invalid_value")
        completed = {**doc, "status": "completed", "file": file_doc}
        Upload.model_validate(completed)
        await repo.finish_upload(conn, upload_id, completed, file_doc["id"])
    return completed


async def cancel_upload(pool: asyncpg.Pool, project_id: str, upload_id: str) -> Doc:
    """Cancel a pending upload: no part can be added afterwards, and the parts' bytes are dropped."""
    async with pool.acquire() as conn, conn.transaction():
        row = await _get(conn, project_id, upload_id, "FOR UPDATE")
        _require_pending(row, upload_id, now_seconds(), "cancel")
        cancelled = {**row.doc, "status": "cancelled"}
        await repo.finish_upload(conn, upload_id, cancelled, None)
    return cancelled


class ExpirySweeper:
    """Every `interval` seconds, marks uploads that expired while pending as expired and drops their parts, so
    abandoned parts never stay in the database, and deletes files past their expires_at as `files.delete` does,
    so none stays in a vector store (every gateway sweeps; SKIP LOCKED and idempotent deletes keep them apart)."""

    def __init__(self, pool: asyncpg.Pool, interval: float) -> None:
        self._pool = pool
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> "ExpirySweeper":
        self._task = asyncio.create_task(self._loop(), name="expiry-sweeper")
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                async with self._pool.acquire() as conn:
                    while await repo.expire_stale(conn, now_seconds(), STALE_SWEEP_BATCH) == STALE_SWEEP_BATCH:
                        pass
            except Exception:  # the database away or a bug: the sweeper must outlive it
                _log.exception("sweeping expired uploads failed; retrying at the next interval")
            try:
                while await delete_expired_files(self._pool, STALE_SWEEP_BATCH) == STALE_SWEEP_BATCH:
                    pass
            except Exception:
                _log.exception("deleting expired files failed; retrying at the next interval")
