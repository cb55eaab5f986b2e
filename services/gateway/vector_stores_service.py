"""Vector stores, their files and file batches: request models, state changes with their events, search.

Every change commits with its events (outbox): `FileIngestionRequested` / `FileDetached` /
`VectorStoreDeleted` for the ingestion service (topic INGESTION_REQUESTS, key vector_store_id) and the public
`vector_store.file*` events. Search is answered by the ingestion service, the process that holds Qdrant, over
Kafka request/reply (see DESIGN.md, "Search"): SEARCH_REQUESTS out, SEARCH_REPLIES back through the ReplyClient.
"""

from collections.abc import Sequence
from typing import Annotated, Any, Literal

import asyncpg
from openai.types import VectorStore
from openai.types.vector_stores import VectorStoreFile, VectorStoreFileBatch
from pydantic import AfterValidator, Field, StringConstraints, ValidationError
from pydantic_core import PydanticCustomError

from gateway import files_repository as files_repo
from gateway import vector_stores_repository as repo
from gateway.errors import bad_request, echo, not_found, validation_error
from gateway.pagination import Conn, PageParams
from gateway.schemas import Metadata, Strict, ToolResourcesIn
from gateway.service_requests import ask
from gateway.settings import GatewaySettings
from threadline_core.events import (
    EventEnvelope,
    FileChunksRequested,
    FileDetached,
    FileIngestionRequested,
    ServiceReplied,
    ServiceRequest,
    VectorSearchRequested,
    VectorStoreDeleted,
)
from threadline_core.ids import new_id, now_seconds
from threadline_core.outbox import append_events
from threadline_core.replies import ReplyClient
from threadline_core.topics import EVENTS, INGESTION_REQUESTS
from threadline_search.chunking import ChunkingError, parse_chunking_strategy
from threadline_search.extract import SNIFFED_BYTES, extension, indexable
from threadline_search.filters import FilterError, matches, validate_filter
from threadline_search.rewrite import rewrite_query
from threadline_search.settings import MAX_QUERY_CHARS
from threadline_search.store import Conn as TxConn
from threadline_search.store import (
    batch_event,
    completed_files,
    empty_counts,
    expires_at_for,
    refresh_batch,
    refresh_batches,
    refresh_vector_store,
    render_vector_store,
    vector_store_file_doc,
)

Doc = dict[str, Any]
MAX_ATTRIBUTES = 16
MAX_STORE_FILE_IDS = 500
MAX_BATCH_FILES = 2000
HELPER_EXPIRES_AFTER = {"anchor": "last_active_at", "days": 7}
"""Stores made by the thread helpers (a thread's `tool_resources.file_search.vector_stores`, message attachments)
expire after 7 idle days, as hosted; an assistant's helper stores do not (its every run would fail once expired)."""
SUPPORTED_FILES_URL = "https://platform.openai.com/docs/assistants/tools/file-search#supported-files"
"""Where hosted's refusal of a file file_search cannot read sends the user."""
POLL_AFTER_MS = "200"
"""`openai-poll-after-ms` on objects still in progress: the SDK's *_and_poll helpers wait that long."""


def _check_attributes(value: dict[str, Any]) -> dict[str, Any]:
    if len(value) > MAX_ATTRIBUTES:
        raise PydanticCustomError("tl_object_above_max_properties",
                                  f"Invalid 'attributes': too many properties. Expected an object with at most "
                                  f"{MAX_ATTRIBUTES} properties, but got {len(value)} instead.")
    for key in value:
        if len(key) > 64:
            raise PydanticCustomError("tl_string_above_max_length", f"Invalid 'attributes': key too long. Expected "
                                      f"keys with maximum length 64, but got a key with length {len(key)} instead.")
    return value


Attributes = Annotated[
    dict[str, Annotated[str, StringConstraints(max_length=512)] | bool | int | float],
    AfterValidator(_check_attributes),
]


class HelperStoreMetadata(Strict):
    """The `metadata` of a `tool_resources.file_search.vector_stores` helper, checked as every other metadata."""

    metadata: Metadata | None = None


class ExpiresAfterIn(Strict):
    """`{"anchor": "last_active_at", "days": N}`."""

    anchor: Literal["last_active_at"]
    days: Annotated[int, Field(ge=1, le=365)]


class VectorStoreCreate(Strict):
    """POST /v1/vector_stores."""

    name: str | None = None
    description: str | None = None
    file_ids: Annotated[list[str], Field(max_length=MAX_STORE_FILE_IDS)] | None = None
    chunking_strategy: Any = None
    expires_after: ExpiresAfterIn | None = None
    metadata: Metadata | None = None


class VectorStoreUpdate(Strict):
    """POST /v1/vector_stores/{id}."""

    name: str | None = None
    expires_after: ExpiresAfterIn | None = None
    metadata: Metadata | None = None


class StoreFileCreate(Strict):
    """POST /v1/vector_stores/{id}/files."""

    file_id: Annotated[str, StringConstraints(min_length=1)]
    attributes: Attributes | None = None
    chunking_strategy: Any = None


class StoreFileUpdate(Strict):
    """POST /v1/vector_stores/{id}/files/{file_id}."""

    attributes: Attributes | None


class BatchFileIn(Strict):
    """One entry of `files` in a batch."""

    file_id: Annotated[str, StringConstraints(min_length=1)]
    attributes: Attributes | None = None
    chunking_strategy: Any = None


class BatchCreate(Strict):
    """POST /v1/vector_stores/{id}/file_batches."""

    file_ids: Annotated[list[str], Field(min_length=1, max_length=MAX_BATCH_FILES)] | None = None
    files: Annotated[list[BatchFileIn], Field(min_length=1, max_length=MAX_BATCH_FILES)] | None = None
    attributes: Attributes | None = None
    chunking_strategy: Any = None


class SearchRankingOptionsIn(Strict):
    """Ranking options of vector store search."""

    ranker: Literal["none", "auto", "default-2024-11-15"] | None = None
    score_threshold: Annotated[float, Field(ge=0, le=1)] | None = None


SearchQuery = Annotated[str, StringConstraints(min_length=1, max_length=MAX_QUERY_CHARS)]
"""A search query: bounded, as embedding one costs CPU by its length (a 1 MB query held search up for minutes)."""


class SearchIn(Strict):
    """POST /v1/vector_stores/{id}/search."""

    query: SearchQuery | Annotated[list[SearchQuery], Field(min_length=1, max_length=10)]
    max_num_results: Annotated[int, Field(ge=1, le=50)] = 10
    filters: dict[str, Any] | None = None
    ranking_options: SearchRankingOptionsIn | None = None
    rewrite_query: bool | None = None


# --- helpers ------------------------------------------------------------------------------------------------


def _strategy(raw: Any, param: str = "chunking_strategy") -> Doc:
    try:
        return parse_chunking_strategy(raw, param).to_api()
    except ChunkingError as exc:
        raise bad_request(exc.message, exc.param, exc.code) from None


def _given_strategy(raw: Any, param: str = "chunking_strategy") -> Doc | None:
    """The request's chunking strategy, None when it gives none (a file already attached keeps its own)."""
    return None if raw is None else _strategy(raw, param)


def vector_store_model(doc: Doc) -> VectorStore:
    """The API object as returned now (validated with the SDK model)."""
    return VectorStore.model_validate(render_vector_store(doc))


class StoreFileOut(VectorStoreFile):
    """The SDK's VectorStoreFile, except that whole numbers in `attributes` stay whole (its `float` makes 2 2.0)."""

    attributes: dict[str, str | bool | int | float] | None = None


def store_file_model(doc: Doc) -> VectorStoreFile:
    """A vector store file as returned."""
    return StoreFileOut.model_validate(doc)


def batch_model(doc: Doc) -> VectorStoreFileBatch:
    """A file batch as returned."""
    return VectorStoreFileBatch.model_validate(doc)


def _detached(project_id: str, vector_store_id: str, file_id: str) -> EventEnvelope:
    return FileDetached(vector_store_id=vector_store_id, file_id=file_id).envelope(project_id=project_id,
                                                                                  key=vector_store_id)


def _refuse_expired(doc: Doc) -> None:
    """400 once the store has expired: as hosted it stays expired, so it is neither changed nor searched (either
    would make it active again)."""
    if render_vector_store(doc)["status"] == "expired":
        raise bad_request(f"Vector store {doc['id']} has expired; it can no longer be used or modified.",
                          "vector_store_id")


async def _locked_store(conn: TxConn, project_id: str, vector_store_id: str, *, writable: bool = True) -> Doc:
    doc = await repo.get_vector_store(conn, project_id, vector_store_id, lock=True)
    if doc is None:
        raise not_found("vector store", vector_store_id)
    if writable:
        _refuse_expired(doc)
    return doc


async def attach_files(conn: TxConn, project_id: str, vector_store_id: str,
                       specs: Sequence[tuple[str, Doc | None, Doc | None]], *, batch_id: str | None = None,
                       files_param: str | Sequence[str] = "file_id", replace: bool = True) -> list[Doc]:
    """Attach files (file_id, attributes, chunking strategy; None: not given) and request their ingestion.

    A new, failed or cancelled file (re)starts as in_progress under a new request (the default strategy when
    none is given). One already attached and in progress or completed takes the attributes given, and is indexed
    again only if a different chunking strategy is given (a batch just counts it); what the request does not
    give, it keeps, so running an upload script again changes nothing. With `replace` False (files a message
    attaches) it is left as it is. Call inside a transaction holding the store's lock; returns the vector store
    file objects in `specs` order. An unknown file is a 404 naming `files_param` (one for all, or each spec's).
    """
    found = await require_files(conn, project_id, [s[0] for s in specs], files_param)
    await require_retrievable(conn, [found[s[0]] for s in specs], files_param)
    now = now_seconds()
    docs: list[Doc] = []
    commands: list[EventEnvelope] = []
    for file_id, attributes, strategy in specs:
        current = await repo.get_store_file(conn, vector_store_id, file_id, lock=True)
        if current is not None and current["status"] in ("in_progress", "completed") and (
                not replace or strategy is None or current.get("chunking_strategy") == strategy):
            if replace and attributes is not None and current.get("attributes") != attributes:
                current = await repo.set_store_file_attributes(conn, vector_store_id, file_id, attributes)
                assert current is not None  # row-locked above
            docs.append(current)
            continue
        if attributes is None and current is not None:
            attributes = current.get("attributes")
        strategy = strategy or _strategy(None)
        doc = vector_store_file_doc(file_id=file_id, vector_store_id=vector_store_id, created_at=now,
                                    status="in_progress", chunking_strategy=strategy, attributes=attributes)
        store_file_model(doc)
        command = FileIngestionRequested(vector_store_id=vector_store_id, file_id=file_id, batch_id=batch_id,
                                         chunking_strategy=strategy).envelope(project_id=project_id,
                                                                              key=vector_store_id)
        await repo.upsert_store_file(conn, project_id, doc, command.event_id, batch_id)
        commands.append(command)
        docs.append(doc)
    await append_events(conn, INGESTION_REQUESTS, commands)
    return docs


# --- vector stores --------------------------------------------------------------------------------------------


async def create_vector_store_in(conn: TxConn, project_id: str, *, name: str, file_ids: Sequence[str],
                                 chunking_strategy: Any, metadata: dict[str, str] | None,
                                 expires_after: Doc | None, strategy_param: str = "chunking_strategy",
                                 files_param: str = "file_id") -> Doc:
    """Create a store and attach `file_ids` inside the caller's transaction (also used for the
    `tool_resources.file_search.vector_stores` helper of assistants and threads)."""
    strategy = _strategy(chunking_strategy, strategy_param)
    now = now_seconds()
    doc: Doc = {"id": new_id("vs"), "object": "vector_store", "created_at": now, "name": name, "usage_bytes": 0,
                "file_counts": empty_counts(), "status": "completed", "last_active_at": now,
                "metadata": metadata or {}, "expires_after": expires_after,
                "expires_at": expires_at_for(expires_after, now)}
    VectorStore.model_validate(doc)
    await repo.insert_vector_store(conn, project_id, doc)
    if file_ids:
        await attach_files(conn, project_id, doc["id"], [(f, None, strategy) for f in dict.fromkeys(file_ids)],
                           files_param=files_param)
        refreshed = await refresh_vector_store(conn, doc["id"])
        assert refreshed is not None
        doc = refreshed
    return doc


async def create_vector_store(pool: asyncpg.Pool, project_id: str, body: VectorStoreCreate) -> VectorStore:
    """POST /v1/vector_stores."""
    expires = body.expires_after.model_dump() if body.expires_after else None
    async with pool.acquire() as conn, conn.transaction():
        doc = await create_vector_store_in(conn, project_id, name=body.name or "", file_ids=body.file_ids or [],
                                           chunking_strategy=body.chunking_strategy, metadata=body.metadata,
                                           expires_after=expires, files_param="file_ids")
    return vector_store_model(doc)


async def get_vector_store(pool: asyncpg.Pool, project_id: str, vector_store_id: str) -> VectorStore:
    """A vector store, or 404."""
    doc = await repo.get_vector_store(pool, project_id, vector_store_id)
    if doc is None:
        raise not_found("vector store", vector_store_id)
    return vector_store_model(doc)


async def update_vector_store(pool: asyncpg.Pool, project_id: str, vector_store_id: str,
                              body: VectorStoreUpdate) -> VectorStore:
    """Change name, metadata or the expiration policy (null removes it)."""
    given = body.model_fields_set
    async with pool.acquire() as conn, conn.transaction():
        doc = await _locked_store(conn, project_id, vector_store_id, writable=False)
        if "name" in given:
            doc["name"] = body.name or ""
        if "metadata" in given:
            doc["metadata"] = body.metadata or {}
        if "expires_after" in given:
            doc["expires_after"] = body.expires_after.model_dump() if body.expires_after else None
            doc["last_active_at"] = now_seconds()
            doc["expires_at"] = expires_at_for(doc["expires_after"], doc["last_active_at"])
        model = vector_store_model(doc)
        await repo.save_vector_store(conn, doc)
    return model


async def delete_vector_store(pool: asyncpg.Pool, project_id: str, vector_store_id: str) -> Doc:
    """Delete the store; the ingestion service removes its points."""
    async with pool.acquire() as conn, conn.transaction():
        if not await repo.delete_vector_store(conn, project_id, vector_store_id):
            raise not_found("vector store", vector_store_id)
        await append_events(conn, INGESTION_REQUESTS, [VectorStoreDeleted(vector_store_id=vector_store_id).envelope(
            project_id=project_id, key=vector_store_id)])
    return {"id": vector_store_id, "object": "vector_store.deleted", "deleted": True}


async def list_vector_stores(pool: asyncpg.Pool, project_id: str, page: PageParams) -> tuple[list[VectorStore], bool]:
    """A page of vector stores."""
    docs, has_more = await repo.list_vector_stores(pool, project_id, page)
    return [vector_store_model(d) for d in docs], has_more


# --- vector store files ---------------------------------------------------------------------------------------


async def create_store_file(pool: asyncpg.Pool, project_id: str, vector_store_id: str,
                            body: StoreFileCreate) -> VectorStoreFile:
    """Attach a file; attaching one already there applies the attributes and chunking strategy this request gives,
    as a new vector store file would have them."""
    strategy = _given_strategy(body.chunking_strategy)
    async with pool.acquire() as conn, conn.transaction():
        await _locked_store(conn, project_id, vector_store_id)
        [doc] = await attach_files(conn, project_id, vector_store_id, [(body.file_id, body.attributes, strategy)])
        await refresh_vector_store(conn, vector_store_id, touch=True)
    return store_file_model(doc)


async def get_store_file(pool: asyncpg.Pool, project_id: str, vector_store_id: str, file_id: str) -> VectorStoreFile:
    """A vector store file, or 404."""
    async with pool.acquire() as conn:
        if await repo.get_vector_store(conn, project_id, vector_store_id) is None:
            raise not_found("vector store", vector_store_id)
        doc = await repo.get_store_file(conn, vector_store_id, file_id)
    if doc is None:
        raise not_found("file", file_id)
    return store_file_model(doc)


async def update_store_file(pool: asyncpg.Pool, project_id: str, vector_store_id: str, file_id: str,
                            body: StoreFileUpdate) -> VectorStoreFile:
    """Replace the file's attributes (search filters read them from the database)."""
    async with pool.acquire() as conn, conn.transaction():
        await _locked_store(conn, project_id, vector_store_id, writable=False)
        doc = await repo.set_store_file_attributes(conn, vector_store_id, file_id, body.attributes or {})
    if doc is None:
        raise not_found("file", file_id)
    return store_file_model(doc)


async def detach_file(conn: TxConn, project_id: str, vector_store_id: str, file_id: str) -> bool:
    """Detach inside the caller's transaction (store locked): counters, batch events, FileDetached."""
    if not await repo.delete_store_file(conn, vector_store_id, file_id):
        return False
    await refresh_vector_store(conn, vector_store_id)
    completed = await refresh_batches(conn, vector_store_id, [file_id])
    await append_events(conn, EVENTS, [batch_event(project_id, b) for b in completed])
    await append_events(conn, INGESTION_REQUESTS, [_detached(project_id, vector_store_id, file_id)])
    return True


async def delete_store_file(pool: asyncpg.Pool, project_id: str, vector_store_id: str, file_id: str) -> Doc:
    """Detach a file from the store (the file itself stays); its points are removed by ingestion."""
    async with pool.acquire() as conn, conn.transaction():
        await _locked_store(conn, project_id, vector_store_id, writable=False)
        if not await detach_file(conn, project_id, vector_store_id, file_id):
            raise not_found("file", file_id)
    return {"id": file_id, "object": "vector_store.file.deleted", "deleted": True}


async def _cursor_position(conn: Conn, vector_store_id: str, file_id: str | None,
                           param: str) -> tuple[int, int] | None:
    """The list position of a cursor file, attached or detached since (a loop detaching what it lists); 400 if it never
    was in the store (the list is in attach order, so a file id alone places nothing)."""
    if file_id is None:
        return None
    position = await repo.store_file_position(conn, vector_store_id, file_id)
    if position is None:
        raise bad_request(f"Invalid '{param}': no file '{echo(file_id)}' in vector store {vector_store_id}.",
                          param, "invalid_value")
    return position


async def list_store_files(pool: asyncpg.Pool, project_id: str, vector_store_id: str, page: PageParams,
                           status: str | None, batch_id: str | None = None) -> tuple[list[VectorStoreFile], bool]:
    """A page of a store's (or a batch's) files."""
    if status is not None and status not in ("in_progress", "completed", "failed", "cancelled"):
        raise bad_request(f"Invalid value: '{echo(status)}'. Supported values are: 'in_progress', 'completed', "
                          "'failed' and 'cancelled'.", "filter", "invalid_value")
    async with pool.acquire() as conn:
        if await repo.get_vector_store(conn, project_id, vector_store_id) is None:
            raise not_found("vector store", vector_store_id)
        if batch_id is not None and await repo.get_batch(conn, vector_store_id, batch_id) is None:
            raise not_found("vector store file batch", batch_id)
        after = await _cursor_position(conn, vector_store_id, page.after, "after")
        before = await _cursor_position(conn, vector_store_id, page.before, "before")
        docs, has_more = await repo.list_store_files(conn, vector_store_id, page, status, batch_id, after=after,
                                                     before=before)
    return [store_file_model(d) for d in docs], has_more


# --- file batches ---------------------------------------------------------------------------------------------


async def create_batch(pool: asyncpg.Pool, project_id: str, vector_store_id: str,
                       body: BatchCreate) -> VectorStoreFileBatch:
    """Attach many files at once; the batch completes when none of them is in progress."""
    if body.file_ids is not None and body.files is not None:
        raise bad_request("'file_ids' and 'files' are mutually exclusive.", "files")
    if body.files is not None:
        specs = [(f.file_id, f.attributes, _given_strategy(f.chunking_strategy, f"files[{i}].chunking_strategy"))
                 for i, f in enumerate(body.files)]
    elif body.file_ids:
        strategy = _given_strategy(body.chunking_strategy)
        specs = [(f, body.attributes, strategy) for f in body.file_ids]
    else:
        raise bad_request("Missing required parameter: 'file_ids'.", "file_ids", "missing_required_parameter")
    specs = list({s[0]: s for s in specs}.values())
    files_param: str | list[str] = "file_ids"
    if body.files is not None:  # a 404 names the element, as other errors in files[] do
        first = {f.file_id: i for i, f in reversed(list(enumerate(body.files)))}
        files_param = [f"files[{first[s[0]]}].file_id" for s in specs]
    now = now_seconds()
    doc: Doc = {"id": new_id("vsfb"), "object": "vector_store.files_batch", "created_at": now,
                "vector_store_id": vector_store_id, "status": "in_progress", "file_counts": empty_counts()}
    async with pool.acquire() as conn, conn.transaction():
        await _locked_store(conn, project_id, vector_store_id)
        await attach_files(conn, project_id, vector_store_id, specs, batch_id=doc["id"], files_param=files_param)
        await repo.insert_batch(conn, project_id, doc, [s[0] for s in specs])
        doc = await refresh_batch(conn, doc["id"], doc)
        if doc["status"] == "completed":
            await append_events(conn, EVENTS, [batch_event(project_id, doc)])
        await refresh_vector_store(conn, vector_store_id, touch=True)
    return batch_model(doc)


async def get_batch(pool: asyncpg.Pool, project_id: str, vector_store_id: str, batch_id: str) -> VectorStoreFileBatch:
    """A batch, or 404."""
    async with pool.acquire() as conn:
        if await repo.get_vector_store(conn, project_id, vector_store_id) is None:
            raise not_found("vector store", vector_store_id)
        doc = await repo.get_batch(conn, vector_store_id, batch_id)
    if doc is None:
        raise not_found("vector store file batch", batch_id)
    return batch_model(doc)


async def cancel_batch(pool: asyncpg.Pool, project_id: str, vector_store_id: str,
                       batch_id: str) -> VectorStoreFileBatch:
    """Cancel the files still in progress (a finished batch is returned unchanged)."""
    async with pool.acquire() as conn, conn.transaction():
        await _locked_store(conn, project_id, vector_store_id, writable=False)
        doc = await repo.get_batch(conn, vector_store_id, batch_id, lock=True)
        if doc is None:
            raise not_found("vector store file batch", batch_id)
        if doc["status"] != "in_progress":
            return batch_model(doc)
        cancelled = await repo.cancel_batch_files(conn, vector_store_id, batch_id)
        doc["status"] = "cancelled"
        await repo.set_batch(conn, doc)
        doc = await refresh_batch(conn, batch_id, doc)
        await refresh_vector_store(conn, vector_store_id)
        others = await refresh_batches(conn, vector_store_id, [d["id"] for d in cancelled])
        await append_events(conn, EVENTS, [batch_event(project_id, b) for b in [doc, *others]])
        await append_events(conn, INGESTION_REQUESTS,
                            [_detached(project_id, vector_store_id, d["id"]) for d in cancelled])
    return batch_model(doc)


# --- search ---------------------------------------------------------------------------------------------------


async def ask_search(replies: ReplyClient, settings: GatewaySettings, project_id: str,
                     request: ServiceRequest) -> ServiceReplied:
    """Ask the ingestion service (it holds Qdrant) over Kafka; no answer or its error as the matching HTTP error."""
    return await ask(replies, request, project_id=project_id, wait_seconds=settings.search_timeout_seconds, late=(
        f"Search did not answer within {settings.search_timeout_seconds:g} seconds (the ingestion service is busy "
        "or unavailable); retry shortly."), unavailable=(
        "Search is unavailable right now (the message broker did not take the request); retry shortly."))


async def search(pool: asyncpg.Pool, replies: ReplyClient, settings: GatewaySettings, project_id: str,
                 vector_store_id: str, body: SearchIn) -> Doc:
    """POST /v1/vector_stores/{id}/search: the best chunks, as a `vector_store.search_results.page`."""
    if body.filters is not None:
        try:
            validate_filter(body.filters)
        except FilterError as exc:
            raise bad_request(exc.message, exc.param, exc.code) from None
    queries = [body.query] if isinstance(body.query, str) else list(body.query)
    if body.rewrite_query:
        queries = [rewrite_query(q) for q in queries]
    async with pool.acquire() as conn:
        store = await repo.get_vector_store(conn, project_id, vector_store_id)
        if store is None:
            raise not_found("vector store", vector_store_id)
        _refuse_expired(store)
        attributes = (await completed_files(conn, [vector_store_id])).get(vector_store_id, {})
    if body.filters is not None:
        attributes = {f: attrs for f, attrs in attributes.items() if matches(body.filters, attrs)}
    threshold = body.ranking_options.score_threshold if body.ranking_options else None
    data: list[Doc] = []
    if attributes:
        answer = await ask_search(replies, settings, project_id, VectorSearchRequested(
            vector_store_ids=[vector_store_id], query=queries, max_num_results=body.max_num_results,
            score_threshold=threshold, file_ids=sorted(attributes)))
        data = [{"file_id": r["file_id"], "filename": r["filename"], "score": r["score"],
                 "attributes": attributes[r["file_id"]], "content": [{"type": "text", "text": r["text"]}]}
                for r in answer.items if r["file_id"] in attributes]
    async with pool.acquire() as conn, conn.transaction():
        if await repo.get_vector_store(conn, project_id, vector_store_id, lock=True) is not None:
            await refresh_vector_store(conn, vector_store_id, touch=True)
    return {"object": "vector_store.search_results.page", "search_query": queries, "data": data,
            "has_more": False, "next_page": None}


async def file_content(pool: asyncpg.Pool, replies: ReplyClient, settings: GatewaySettings, project_id: str,
                       vector_store_id: str, file_id: str) -> Doc:
    """The parsed text of an indexed file, reassembled from its chunks."""
    await get_store_file(pool, project_id, vector_store_id, file_id)
    answer = await ask_search(replies, settings, project_id,
                              FileChunksRequested(vector_store_id=vector_store_id, file_id=file_id))
    text = ""
    end = 0
    for chunk in answer.items:
        start, stop, piece = int(chunk["start_char"]), int(chunk["end_char"]), str(chunk["text"])
        if stop <= end:
            continue
        text += ("\n\n" if text and start > end else "") + piece[max(0, end - start):]
        end = stop
    data = [{"type": "text", "text": text}] if text else []
    return {"object": "vector_store.file_content.page", "data": data, "has_more": False, "next_page": None}


# --- tool_resources.file_search.vector_stores ---------------------------------------------------------------


async def create_helper_vector_stores(conn: TxConn, project_id: str, specs: Sequence[Any],
                                      param: str = "tool_resources.file_search.vector_stores", *,
                                      expires_after: dict[str, Any] | None = HELPER_EXPIRES_AFTER) -> list[str]:
    """Create the stores described by `tool_resources.file_search.vector_stores` ({file_ids,
    chunking_strategy, metadata}) inside the caller's transaction, with `expires_after`; return their ids."""
    ids: list[str] = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict):
            raise bad_request(f"Invalid type for '{param}[{i}]': expected an object.", f"{param}[{i}]", "invalid_type")
        unknown = sorted(set(spec) - {"file_ids", "chunking_strategy", "metadata"})
        if unknown:
            raise bad_request(f"Unknown parameter: '{param}[{i}].{unknown[0]}'.", f"{param}[{i}].{unknown[0]}",
                              "unknown_parameter")
        file_ids = spec.get("file_ids") or []
        if not isinstance(file_ids, list) or not all(isinstance(f, str) for f in file_ids):
            raise bad_request(f"Invalid type for '{param}[{i}].file_ids': expected an array of strings.",
                              f"{param}[{i}].file_ids", "invalid_type")
        if len(file_ids) > 10000:
            raise bad_request(f"Invalid '{param}[{i}].file_ids': too many files.", f"{param}[{i}].file_ids")
        try:
            metadata = HelperStoreMetadata.model_validate({"metadata": spec.get("metadata")}).metadata
        except ValidationError as exc:
            where = (*param.split("."), i)
            raise validation_error([{**e, "loc": (*where, *e["loc"])} for e in exc.errors()]) from None
        doc = await create_vector_store_in(conn, project_id, name="", file_ids=file_ids,
                                           chunking_strategy=spec.get("chunking_strategy"), metadata=metadata,
                                           expires_after=dict(expires_after) if expires_after else None,
                                           strategy_param=f"{param}[{i}].chunking_strategy",
                                           files_param=f"{param}[{i}].file_ids")
        ids.append(doc["id"])
    return ids


async def check_tool_resources(pool: asyncpg.Pool, project_id: str, resources: ToolResourcesIn | None,
                               param: str = "tool_resources") -> None:
    """404 unless every vector store and file that `resources` names is the project's, as hosted: runs search and
    mount only the project's own, so an unknown id would be stored and then silently left out."""
    file_search = resources.file_search if resources is not None else None
    code_interpreter = resources.code_interpreter if resources is not None else None
    store_ids = list(file_search.vector_store_ids or []) if file_search is not None else []
    file_ids = list(code_interpreter.file_ids or []) if code_interpreter is not None else []
    if not store_ids and not file_ids:
        return
    async with pool.acquire() as conn:
        if store_ids:
            stores = await repo.existing_vector_stores(conn, project_id, store_ids)
            missing = [s for s in store_ids if s not in stores]
            if missing:
                raise not_found("vector store", missing[0], f"{param}.file_search.vector_store_ids")
        if file_ids:
            await require_files(conn, project_id, file_ids, f"{param}.code_interpreter.file_ids")


async def require_files(conn: Conn, project_id: str, file_ids: Sequence[str],
                        param: str | Sequence[str]) -> dict[str, Doc]:
    """404 naming the first of `file_ids` that is not a live file of the project (`param`: one for all, or each
    file id's own); else their file objects by id."""
    found = await files_repo.existing_files(conn, project_id, list(file_ids), now_seconds())
    for index, file_id in enumerate(file_ids):
        if file_id not in found:
            raise not_found("file", file_id, param if isinstance(param, str) else param[index])
    return found


async def require_retrievable(conn: Conn, files: Sequence[Doc], param: str | Sequence[str]) -> None:
    """400 `unsupported_file` when file_search cannot index some of `files` (`param`: one for all, or each file's
    own), as hosted refuses them when they are attached, rather than a vector store file that fails: ingestion's
    own rule (`indexable`), the first bytes read only of files whose name does not decide."""
    undecided = [f["id"] for f in files if not indexable(f["filename"], b"")]
    if not undecided:
        return
    heads = await files_repo.file_heads(conn, undecided, SNIFFED_BYTES)
    refused = [i for i, f in enumerate(files) if not indexable(f["filename"], heads.get(f["id"], b""))]
    if refused:
        extensions = ", ".join(dict.fromkeys(extension(files[i]["filename"]) or "none" for i in refused))
        raise bad_request(f"Files with extensions [{extensions}] are not supported for retrieval. See "
                          f"{SUPPORTED_FILES_URL}", param if isinstance(param, str) else param[refused[0]],
                          "unsupported_file")


async def checked_tool_resources(pool: asyncpg.Pool, project_id: str, resources: ToolResourcesIn | None,
                                 param: str = "tool_resources", *,
                                 expires_after: dict[str, Any] | None = HELPER_EXPIRES_AFTER) -> ToolResourcesIn | None:
    """`tool_resources` as stored: the ids it names checked (before any helper store is created, so a refused
    request leaves none behind), then `file_search.vector_stores` made into stores (expiring as `expires_after`:
    a thread's after 7 idle days, an assistant's never)."""
    await check_tool_resources(pool, project_id, resources, param)
    return await expand_vector_store_helpers(pool, project_id, resources, param, expires_after=expires_after)


async def expand_vector_store_helpers(pool: asyncpg.Pool, project_id: str, resources: ToolResourcesIn | None,
                                      param: str = "tool_resources", *,
                                      expires_after: dict[str, Any] | None = HELPER_EXPIRES_AFTER,
                                      ) -> ToolResourcesIn | None:
    """`tool_resources` with `file_search.vector_stores` replaced by the ids of stores created from them."""
    file_search = resources.file_search if resources is not None else None
    if resources is None or file_search is None or not file_search.vector_stores:
        return resources
    helpers_param = f"{param}.file_search.vector_stores"
    if file_search.vector_store_ids:
        raise bad_request("Only one of 'vector_store_ids' or 'vector_stores' may be given.", helpers_param,
                          "invalid_value")
    async with pool.acquire() as conn, conn.transaction():
        ids = await create_helper_vector_stores(conn, project_id, file_search.vector_stores, helpers_param,
                                                expires_after=expires_after)
    expanded = file_search.model_copy(update={"vector_store_ids": ids, "vector_stores": None})
    return resources.model_copy(update={"file_search": expanded})


# --- message attachments for file_search ---------------------------------------------------------------------


def file_search_attachment_ids(messages: Sequence[Doc]) -> list[str]:
    """The files that messages attach with the file_search tool, first mention first."""
    found: list[str] = []
    for message in messages:
        for attachment in message.get("attachments") or ():
            if any(tool.get("type") == "file_search" for tool in attachment.get("tools") or ()):
                if attachment["file_id"] not in found:
                    found.append(attachment["file_id"])
    return found


async def add_thread_files(conn: TxConn, project_id: str, store_ids: Sequence[str],
                           file_ids: Sequence[str]) -> str | None:
    """Put files attached to a thread's messages for file_search into the thread's vector store, as hosted.

    The files go into the thread's store (the first of `store_ids`); a thread without one gets a new store
    that expires 7 days after it was last active (the hosted default for stores made from attachments).
    Returns the id of the new store, None when an existing one took the files. Inside a transaction.
    """
    if not file_ids:
        return None
    if store_ids:
        await _locked_store(conn, project_id, store_ids[0])
        await attach_files(conn, project_id, store_ids[0], [(f, None, None) for f in file_ids], replace=False)
        await refresh_vector_store(conn, store_ids[0], touch=True)
        return None
    doc = await create_vector_store_in(conn, project_id, name="", file_ids=file_ids, chunking_strategy=None,
                                       metadata=None, expires_after=dict(HELPER_EXPIRES_AFTER))
    return str(doc["id"])
