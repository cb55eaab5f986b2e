"""All SQL of vector stores, their files and file batches (derived counters: threadline_search.store)."""

from typing import Any

from gateway.pagination import Conn, PageParams, fetch_keyed_page, fetch_page

Doc = dict[str, Any]


async def insert_vector_store(conn: Conn, project_id: str, doc: Doc) -> None:
    """Store a new vector store."""
    await conn.execute("INSERT INTO vector_stores (id, project_id, created_at, doc) VALUES ($1, $2, $3, $4)",
                       doc["id"], project_id, doc["created_at"], doc)


async def get_vector_store(conn: Conn, project_id: str, vector_store_id: str, *, lock: bool = False) -> Doc | None:
    """The stored vector store (row-locked with `lock`)."""
    doc = await conn.fetchval("SELECT doc FROM vector_stores WHERE id = $1 AND project_id = $2"
                              + (" FOR UPDATE" if lock else ""), vector_store_id, project_id)
    return dict(doc) if doc is not None else None


async def existing_vector_stores(conn: Conn, project_id: str, vector_store_ids: list[str]) -> set[str]:
    """Which of `vector_store_ids` are vector stores of the project (expired ones included)."""
    rows = await conn.fetch("SELECT id FROM vector_stores WHERE id = ANY($1::text[]) AND project_id = $2",
                            vector_store_ids, project_id)
    return {r["id"] for r in rows}


async def save_vector_store(conn: Conn, doc: Doc) -> None:
    """Replace the stored doc."""
    await conn.execute("UPDATE vector_stores SET doc = $2 WHERE id = $1", doc["id"], doc)


_STORE_IDS = "(doc -> 'tool_resources' -> 'file_search' -> 'vector_store_ids')"
"""The expression indexed by migration 0014 (a query must spell it the same to use the index)."""


async def delete_vector_store(conn: Conn, project_id: str, vector_store_id: str) -> bool:
    """Delete the store (its files and batches cascade) and its id from the tool_resources of the project's
    assistants and threads, as hosted; False if unknown."""
    if await conn.fetchval("DELETE FROM vector_stores WHERE id = $1 AND project_id = $2 RETURNING 1",
                           vector_store_id, project_id) is None:
        return False
    for table in ("assistants", "threads"):
        await conn.execute(
            f"UPDATE {table} SET doc = jsonb_set(doc, '{{tool_resources,file_search,vector_store_ids}}',"
            f" {_STORE_IDS} - $1::text) WHERE project_id = $2 AND {_STORE_IDS} ? $1", vector_store_id, project_id)
    return True


async def list_vector_stores(conn: Conn, project_id: str, page: PageParams) -> tuple[list[Doc], bool]:
    """A page of the project's vector stores."""
    result = await fetch_page(conn, select="doc FROM vector_stores", where="project_id = $1", args=[project_id],
                              page=page)
    return [dict(r["doc"]) for r in result.rows], result.has_more


# --- vector store files ---------------------------------------------------------------------------------


async def get_store_file(conn: Conn, vector_store_id: str, file_id: str, *, lock: bool = False) -> Doc | None:
    """The `vector_store.file` object."""
    doc = await conn.fetchval("SELECT doc FROM vector_store_files WHERE vector_store_id = $1 AND file_id = $2"
                              + (" FOR UPDATE" if lock else ""), vector_store_id, file_id)
    return dict(doc) if doc is not None else None


async def upsert_store_file(conn: Conn, project_id: str, doc: Doc, request_id: str, batch_id: str | None) -> None:
    """Attach (or re-attach) a file as in_progress under a new ingestion request (of `batch_id`, if a batch's),
    announced now and not started (the ingestion sweep sends it again if nobody starts it); a re-attach lists as
    attached now (its created_at and place in the store's list are the new ones)."""
    await conn.execute(
        "INSERT INTO vector_store_files (vector_store_id, file_id, project_id, status, created_at, usage_bytes,"
        " request_id, request_batch_id, doc) VALUES ($1, $2, $3, $4, $5, 0, $6, $7, $8)"
        " ON CONFLICT (vector_store_id, file_id) DO UPDATE SET status = EXCLUDED.status, usage_bytes = 0,"
        " request_id = EXCLUDED.request_id, request_batch_id = EXCLUDED.request_batch_id, doc = EXCLUDED.doc,"
        " created_at = EXCLUDED.created_at, attached_seq = EXCLUDED.attached_seq, announced_at = now(),"
        " started_at = NULL, claimed_by = NULL, claim_expires_at = NULL",
        doc["vector_store_id"], doc["id"], project_id, doc["status"], doc["created_at"], request_id, batch_id, doc)


async def set_store_file_attributes(conn: Conn, vector_store_id: str, file_id: str,
                                    attributes: dict[str, Any]) -> Doc | None:
    """Replace a file's attributes."""
    doc = await conn.fetchval(
        "UPDATE vector_store_files SET doc = jsonb_set(doc, '{attributes}', $3::jsonb)"
        " WHERE vector_store_id = $1 AND file_id = $2 RETURNING doc", vector_store_id, file_id, attributes)
    return dict(doc) if doc is not None else None


async def delete_store_file(conn: Conn, vector_store_id: str, file_id: str) -> bool:
    """Detach a file, keeping its place in the list as a cursor; False if it was not attached."""
    return await conn.fetchval(
        "WITH detached AS (DELETE FROM vector_store_files WHERE vector_store_id = $1 AND file_id = $2"
        " RETURNING vector_store_id, file_id, created_at, attached_seq)"
        " INSERT INTO vector_store_file_cursors (vector_store_id, file_id, created_at, attached_seq)"
        " SELECT * FROM detached ON CONFLICT (vector_store_id, file_id)"
        " DO UPDATE SET created_at = EXCLUDED.created_at, attached_seq = EXCLUDED.attached_seq RETURNING 1",
        vector_store_id, file_id) is not None


_FILE_ORDER = ("created_at", "attached_seq")
"""The order of a store's files: attach order, as hosted (created_at is whole seconds: attached_seq within one)."""


async def store_file_position(conn: Conn, vector_store_id: str, file_id: str) -> tuple[int, int] | None:
    """Where the file is in the store's list (a pagination cursor), or was when it was detached; None if it never was
    in the store."""
    columns = ", ".join(_FILE_ORDER)
    row = await conn.fetchrow(f"SELECT {columns} FROM (SELECT 0 AS detached, {columns} FROM vector_store_files"
                              " WHERE vector_store_id = $1 AND file_id = $2"
                              f" UNION ALL SELECT 1, {columns} FROM vector_store_file_cursors"
                              " WHERE vector_store_id = $1 AND file_id = $2) AS places ORDER BY detached LIMIT 1",
                              vector_store_id, file_id)
    return (int(row[0]), int(row[1])) if row is not None else None


async def list_store_files(conn: Conn, vector_store_id: str, page: PageParams, status: str | None,
                           batch_id: str | None = None, *, after: tuple[int, int] | None = None,
                           before: tuple[int, int] | None = None) -> tuple[list[Doc], bool]:
    """A page of a store's files (or of one batch's) in attach order, optionally with one status; the cursors are
    the positions (`store_file_position`) of the page's `after`/`before` files."""
    where = "vector_store_id = $1"
    args: list[Any] = [vector_store_id]
    if status:
        args.append(status)
        where += f" AND status = ${len(args)}"
    if batch_id:
        args.append(batch_id)
        where += (f" AND file_id IN (SELECT file_id FROM vector_store_file_batch_files WHERE batch_id = ${len(args)})")
    result = await fetch_keyed_page(conn, select="doc FROM vector_store_files", where=where, args=args, page=page,
                                    keys=_FILE_ORDER, after=after, before=before)
    return [dict(r["doc"]) for r in result.rows], result.has_more


# --- file batches ---------------------------------------------------------------------------------------


async def insert_batch(conn: Conn, project_id: str, doc: Doc, file_ids: list[str]) -> None:
    """Store a batch and which files it holds."""
    await conn.execute("INSERT INTO vector_store_file_batches (id, vector_store_id, project_id, status, created_at,"
                       " doc) VALUES ($1, $2, $3, $4, $5, $6)", doc["id"], doc["vector_store_id"], project_id,
                       doc["status"], doc["created_at"], doc)
    await conn.executemany("INSERT INTO vector_store_file_batch_files (batch_id, vector_store_id, file_id)"
                           " VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                           [(doc["id"], doc["vector_store_id"], f) for f in file_ids])


async def get_batch(conn: Conn, vector_store_id: str, batch_id: str, *, lock: bool = False) -> Doc | None:
    """The batch object."""
    doc = await conn.fetchval("SELECT doc FROM vector_store_file_batches WHERE id = $1 AND vector_store_id = $2"
                              + (" FOR UPDATE" if lock else ""), batch_id, vector_store_id)
    return dict(doc) if doc is not None else None


async def cancel_batch_files(conn: Conn, vector_store_id: str, batch_id: str) -> list[Doc]:
    """Mark the files still in progress under this batch's requests as cancelled; return their new objects. A file
    of the batch re-attached since (alone or by another batch) is not the batch's to cancel."""
    rows = await conn.fetch(
        "UPDATE vector_store_files SET status = 'cancelled', request_id = NULL, request_batch_id = NULL,"
        " doc = doc || jsonb_build_object('status', 'cancelled')"
        " WHERE vector_store_id = $1 AND request_batch_id = $2 AND status = 'in_progress' RETURNING doc",
        vector_store_id, batch_id)
    return [dict(r["doc"]) for r in rows]


async def set_batch(conn: Conn, doc: Doc) -> None:
    """Replace a batch's doc and status."""
    await conn.execute("UPDATE vector_store_file_batches SET status = $2, doc = $3 WHERE id = $1",
                       doc["id"], doc["status"], doc)
