"""Files API logic: store uploads in Postgres, list/retrieve/delete them, detach deleted files from stores."""

import re
from typing import Any

import asyncpg
from openai.types import FileObject

from gateway import files_repository as repo
from gateway.errors import ApiError, bad_request, echo, not_found
from gateway.pagination import PageParams
from gateway.vector_stores_service import detach_file
from threadline_core.ids import new_id, now_seconds
from threadline_search.store import Conn, lock_vector_store

Doc = dict[str, Any]
PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
"""What `purpose` an upload may have (the hosted API's list)."""
BATCH_FILE_TTL_SECONDS = 30 * 24 * 3600
"""Files of purpose `batch` without `expires_after` expire after 30 days (the contract's default)."""
_MODEL_PURPOSES = ("assistants", "assistants_output", "batch", "batch_output", "fine-tune", "fine-tune-results",
                   "vision", "user_data")


def file_id() -> str:
    """A new `file-…` id (time-ordered like every id)."""
    return new_id("file").replace("file_", "file-", 1)


def file_model(doc: Doc) -> Doc:
    """The file object as returned (validated with the SDK model where the SDK knows the purpose)."""
    if doc["purpose"] in _MODEL_PURPOSES:
        FileObject.model_validate(doc)
    return doc


def too_large(size: int, limit: int) -> ApiError:
    """413 in the OpenAI format."""
    return ApiError(413, f"File is too large: {size} bytes. The maximum file size is {limit} bytes.",
                    param="file", code="file_too_large")


def check_upload(purpose: object, filename: str | None, expires_anchor: object, expires_seconds: object,
                 ) -> tuple[str, str, int | None]:
    """Validate the form fields; return (purpose, filename, expires_after seconds, defaulted for batch files). A
    batch file must be named `.jsonl`, as hosted ("The Batch API only supports `.jsonl` files")."""
    if purpose is None or purpose == "":
        raise bad_request("Missing required parameter: 'purpose'.", "purpose", "missing_required_parameter")
    if not isinstance(purpose, str) or purpose not in PURPOSES:
        raise bad_request(f"Invalid value: '{echo(purpose)}'. Supported values are: "
                          f"{', '.join(repr(p) for p in PURPOSES)}.", "purpose", "invalid_value")
    if not filename:
        raise bad_request("Missing required parameter: 'file' (a file part with a filename).", "file",
                          "missing_required_parameter")
    if purpose == "batch" and not filename.lower().endswith(".jsonl"):  # hosted's words, param and code null
        raise bad_request("Invalid file format for Batch API. Must be .jsonl")
    seconds: int | None = None
    if expires_anchor is not None or expires_seconds is not None:
        for field, value in (("anchor", expires_anchor), ("seconds", expires_seconds)):
            if value is None:
                raise bad_request(f"Missing required parameter: 'expires_after.{field}'.", f"expires_after.{field}",
                                  "missing_required_parameter")
        if expires_anchor != "created_at":
            raise bad_request("Invalid value for 'expires_after.anchor': expected 'created_at'.",
                              "expires_after.anchor", "invalid_value")
        text = str(expires_seconds)
        if not re.fullmatch(r"-?[0-9]+", text):  # int() would also take " 3600", "3_600" and non-ASCII digits
            raise bad_request("Invalid type for 'expires_after.seconds': expected an integer.",
                              "expires_after.seconds", "invalid_type")
        seconds = int(text)
        if not 3600 <= seconds <= 2592000:
            raise bad_request("Invalid 'expires_after.seconds': expected a value between 3600 and 2592000.",
                              "expires_after.seconds", "invalid_value")
    elif purpose == "batch":
        seconds = BATCH_FILE_TTL_SECONDS
    return purpose, filename, seconds


def new_file_doc(*, purpose: str, filename: str, size: int, expires_after_seconds: int | None, now: int) -> Doc:
    """The object of a new file (a direct upload or a completed Upload), validated."""
    return file_model({"id": file_id(), "object": "file", "bytes": size, "created_at": now, "filename": filename,
                       "purpose": purpose, "status": "processed",
                       "expires_at": now + expires_after_seconds if expires_after_seconds else None,
                       "status_details": None})


async def create_file(pool: asyncpg.Pool, project_id: str, *, purpose: str, filename: str, content: bytes,
                      expires_after_seconds: int | None) -> Doc:
    """Store the upload (object and bytes in one transaction)."""
    doc = new_file_doc(purpose=purpose, filename=filename, size=len(content),
                       expires_after_seconds=expires_after_seconds, now=now_seconds())
    async with pool.acquire() as conn, conn.transaction():
        await repo.insert_file(conn, project_id, doc, content)
    return doc


async def get_file(pool: asyncpg.Pool, project_id: str, file_id: str) -> Doc:
    """A file object, or 404."""
    doc = await repo.get_file(pool, project_id, file_id, now_seconds())
    if doc is None:
        raise not_found("file", file_id)
    return file_model(doc)


async def get_content(pool: asyncpg.Pool, project_id: str, file_id: str) -> tuple[Doc, bytes]:
    """A file's bytes, or 404."""
    found = await repo.get_content(pool, project_id, file_id, now_seconds())
    if found is None:
        raise not_found("file", file_id)
    return found


async def _detach_everywhere(conn: Conn, project_id: str, file_id: str) -> None:
    """Take the file out of every store it is in (their points go with it)."""
    for vector_store_id in await repo.attached_stores(conn, file_id):
        await lock_vector_store(conn, vector_store_id)
        await detach_file(conn, project_id, vector_store_id, file_id)


async def _delete(conn: Conn, project_id: str, file_id: str) -> None:
    """Delete a file after taking it out of every store (their points go with it), in the caller's transaction;
    its id leaves the code_interpreter tool_resources of assistants and threads too, as hosted ("removes the file
    from all vector_store and code_interpreter configurations across all assistants and threads")."""
    await _detach_everywhere(conn, project_id, file_id)
    await repo.delete_file(conn, project_id, file_id)  # waits for attaches in flight (they share-lock the file)
    await _detach_everywhere(conn, project_id, file_id)  # and detaches what they attached
    await repo.forget_code_interpreter_file(conn, project_id, file_id)


async def delete_file(pool: asyncpg.Pool, project_id: str, file_id: str) -> Doc:
    """Delete a file and remove it from every vector store (their points go with it) and code_interpreter
    configuration."""
    async with pool.acquire() as conn, conn.transaction():
        if await repo.get_file(conn, project_id, file_id, now_seconds()) is None:
            raise not_found("file", file_id)
        await _delete(conn, project_id, file_id)
    return {"id": file_id, "object": "file", "deleted": True}


async def delete_expired_files(pool: asyncpg.Pool, limit: int) -> int:
    """Delete up to `limit` files past their expires_at as `files.delete` does, one transaction each: hidden from
    the API, they stayed attached (counted in file_counts, their points searched). Returns how many were found."""
    expired = await repo.expired_files(pool, now_seconds(), limit)
    for project_id, file_id in expired:
        async with pool.acquire() as conn, conn.transaction():
            await _delete(conn, project_id, file_id)
    return len(expired)


async def list_files(pool: asyncpg.Pool, project_id: str, page: PageParams,
                     purpose: str | None) -> tuple[list[Doc], bool]:
    """A page of files."""
    return await repo.list_files(pool, project_id, page, purpose, now_seconds())
