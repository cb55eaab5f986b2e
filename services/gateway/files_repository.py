"""All SQL of the Files API: metadata rows and their bytes (bytea, readable by every service)."""

from typing import Any

from gateway.pagination import Conn, PageParams, fetch_page

Doc = dict[str, Any]
_LIVE = "(doc->>'expires_at' IS NULL OR (doc->>'expires_at')::bigint > $2)"


async def insert_file(conn: Conn, project_id: str, doc: Doc, content: bytes) -> None:
    """Store a file's object and its bytes (same transaction)."""
    await insert_file_object(conn, project_id, doc)
    await conn.execute("INSERT INTO file_contents (file_id, content) VALUES ($1, $2)", doc["id"], content)


async def insert_file_object(conn: Conn, project_id: str, doc: Doc) -> None:
    """Store a file's object; its bytes go into file_contents in the same transaction."""
    await conn.execute("INSERT INTO files (id, project_id, purpose, filename, bytes, created_at, doc)"
                       " VALUES ($1, $2, $3, $4, $5, $6, $7)", doc["id"], project_id, doc["purpose"],
                       doc["filename"], doc["bytes"], doc["created_at"], doc)


async def get_file(conn: Conn, project_id: str, file_id: str, now: int) -> Doc | None:
    """The file object (None if unknown, of another project, or expired)."""
    doc = await conn.fetchval(f"SELECT doc FROM files WHERE id = $1 AND project_id = $3 AND {_LIVE}",
                              file_id, now, project_id)
    return dict(doc) if doc is not None else None


async def existing_files(conn: Conn, project_id: str, file_ids: list[str], now: int) -> dict[str, Doc]:
    """The objects of those of `file_ids` that exist in the project, by id. In a transaction they stay (KEY SHARE
    lock until it ends): a file deleted meanwhile was attached to a store after its removal from every store, and
    stayed `in_progress` there for good."""
    rows = await conn.fetch(f"SELECT id, doc FROM files WHERE id = ANY($1) AND project_id = $3 AND {_LIVE}"
                            " FOR KEY SHARE", file_ids, now, project_id)
    return {r["id"]: dict(r["doc"]) for r in rows}


async def file_heads(conn: Conn, file_ids: list[str], length: int) -> dict[str, bytes]:
    """The first `length` bytes of each of `file_ids` (only those are read: contents are stored uncompressed)."""
    rows = await conn.fetch("SELECT file_id, substring(content FROM 1 FOR $2) AS head FROM file_contents"
                            " WHERE file_id = ANY($1)", file_ids, length)
    return {r["file_id"]: bytes(r["head"]) for r in rows}


async def get_content(conn: Conn, project_id: str, file_id: str, now: int) -> tuple[Doc, bytes] | None:
    """The file object and its bytes."""
    row = await conn.fetchrow(f"SELECT f.doc, c.content FROM files f JOIN file_contents c ON c.file_id = f.id"
                              f" WHERE f.id = $1 AND f.project_id = $3 AND {_LIVE.replace('doc', 'f.doc')}",
                              file_id, now, project_id)
    return (dict(row["doc"]), bytes(row["content"])) if row is not None else None


async def delete_file(conn: Conn, project_id: str, file_id: str) -> bool:
    """Delete the file and its bytes; False if unknown."""
    return await conn.fetchval("DELETE FROM files WHERE id = $1 AND project_id = $2 RETURNING 1",
                               file_id, project_id) is not None


_CODE_FILE_IDS = "(doc -> 'tool_resources' -> 'code_interpreter' -> 'file_ids')"
"""The expression indexed by migration 0023 (a query must spell it the same to use the index)."""


async def forget_code_interpreter_file(conn: Conn, project_id: str, file_id: str) -> None:
    """Take the file's id out of the code_interpreter tool_resources of the project's assistants and threads (a
    deleted file leaves every code_interpreter configuration, as hosted)."""
    for table in ("assistants", "threads"):
        await conn.execute(
            f"UPDATE {table} SET doc = jsonb_set(doc, '{{tool_resources,code_interpreter,file_ids}}',"
            f" {_CODE_FILE_IDS} - $1::text) WHERE project_id = $2 AND {_CODE_FILE_IDS} ? $1", file_id, project_id)


async def expired_files(conn: Conn, now: int, limit: int) -> list[tuple[str, str]]:
    """(project_id, file id) of up to `limit` files past their expires_at, soonest expired first (the expression
    and predicate of the index of migration 0018)."""
    rows = await conn.fetch("SELECT project_id, id FROM files WHERE doc->>'expires_at' IS NOT NULL"
                            " AND (doc->>'expires_at')::bigint <= $1 ORDER BY (doc->>'expires_at')::bigint, id"
                            " LIMIT $2", now, limit)
    return [(r["project_id"], r["id"]) for r in rows]


async def attached_stores(conn: Conn, file_id: str) -> list[str]:
    """Vector stores the file is attached to (the caller locks each store before detaching)."""
    rows = await conn.fetch("SELECT vector_store_id FROM vector_store_files WHERE file_id = $1"
                            " ORDER BY vector_store_id", file_id)
    return [r["vector_store_id"] for r in rows]


async def list_files(conn: Conn, project_id: str, page: PageParams, purpose: str | None,
                     now: int) -> tuple[list[Doc], bool]:
    """A page of the project's files, optionally of one purpose."""
    where = f"project_id = $1 AND {_LIVE}"
    args: list[Any] = [project_id, now]
    if purpose:
        args.append(purpose)
        where += f" AND purpose = ${len(args)}"
    result = await fetch_page(conn, select="doc FROM files", where=where, args=args, page=page)
    return [dict(r["doc"]) for r in result.rows], result.has_more
