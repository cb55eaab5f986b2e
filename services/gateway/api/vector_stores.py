"""Vector stores, their files and file batches, and vector store search."""

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from gateway import vector_stores_service as service
from gateway.deps import CallerDep, PoolDep, SearchDep, SettingsDep
from gateway.http import json_response, model_response, parse_body
from gateway.pagination import PageDep, list_body

router = APIRouter(prefix="/v1", tags=["vector_stores"])
_POLL = {"openai-poll-after-ms": service.POLL_AFTER_MS}


def _polled(response: Response, in_progress: bool) -> Response:
    """Tell the SDK's *_and_poll helpers how soon to look again."""
    if in_progress:
        response.headers.update(_POLL)
    return response


@router.post("/vector_stores")
async def create_vector_store(request: Request, caller: CallerDep, pool: PoolDep) -> Response:
    """Create a vector store (optionally with files)."""
    body = await parse_body(request, service.VectorStoreCreate)
    return model_response(await service.create_vector_store(pool, caller.project_id, body))


@router.get("/vector_stores")
async def list_vector_stores(caller: CallerDep, pool: PoolDep, page: PageDep) -> Response:
    """List vector stores."""
    items, has_more = await service.list_vector_stores(pool, caller.project_id, page)
    return json_response(list_body([v.model_dump(mode="json") for v in items], has_more))


@router.get("/vector_stores/{vector_store_id}")
async def retrieve_vector_store(vector_store_id: str, caller: CallerDep, pool: PoolDep) -> Response:
    """Retrieve a vector store."""
    store = await service.get_vector_store(pool, caller.project_id, vector_store_id)
    return _polled(model_response(store), store.status == "in_progress")


@router.post("/vector_stores/{vector_store_id}")
async def modify_vector_store(vector_store_id: str, request: Request, caller: CallerDep, pool: PoolDep) -> Response:
    """Modify name, metadata or expires_after."""
    body = await parse_body(request, service.VectorStoreUpdate)
    return model_response(await service.update_vector_store(pool, caller.project_id, vector_store_id, body))


@router.delete("/vector_stores/{vector_store_id}")
async def delete_vector_store(vector_store_id: str, caller: CallerDep, pool: PoolDep) -> Response:
    """Delete a vector store (its points are removed by the ingestion service)."""
    return json_response(await service.delete_vector_store(pool, caller.project_id, vector_store_id))


@router.post("/vector_stores/{vector_store_id}/search")
async def search_vector_store(vector_store_id: str, request: Request, caller: CallerDep, pool: PoolDep,
                              search: SearchDep, settings: SettingsDep) -> Response:
    """Search the store's chunks (answered by the ingestion service, over Kafka)."""
    body = await parse_body(request, service.SearchIn)
    return json_response(await service.search(pool, search, settings, caller.project_id, vector_store_id, body))


# --- files of a vector store ------------------------------------------------------------------------------------


@router.post("/vector_stores/{vector_store_id}/files")
async def create_store_file(vector_store_id: str, request: Request, caller: CallerDep, pool: PoolDep) -> Response:
    """Attach a file to the store."""
    body = await parse_body(request, service.StoreFileCreate)
    return model_response(await service.create_store_file(pool, caller.project_id, vector_store_id, body))


@router.get("/vector_stores/{vector_store_id}/files")
async def list_store_files(vector_store_id: str, caller: CallerDep, pool: PoolDep, page: PageDep,
                           filter: Annotated[str | None, Query()] = None) -> Response:
    """List the store's files, optionally with one status."""
    items, has_more = await service.list_store_files(pool, caller.project_id, vector_store_id, page, filter or None)
    return json_response(list_body([f.model_dump(mode="json") for f in items], has_more))


@router.get("/vector_stores/{vector_store_id}/files/{file_id}")
async def retrieve_store_file(vector_store_id: str, file_id: str, caller: CallerDep, pool: PoolDep) -> Response:
    """Retrieve a vector store file (its status, last_error)."""
    found = await service.get_store_file(pool, caller.project_id, vector_store_id, file_id)
    return _polled(model_response(found), found.status == "in_progress")


@router.post("/vector_stores/{vector_store_id}/files/{file_id}")
async def update_store_file(vector_store_id: str, file_id: str, request: Request, caller: CallerDep,
                            pool: PoolDep) -> Response:
    """Replace the file's attributes."""
    body = await parse_body(request, service.StoreFileUpdate)
    return model_response(await service.update_store_file(pool, caller.project_id, vector_store_id, file_id, body))


@router.delete("/vector_stores/{vector_store_id}/files/{file_id}")
async def delete_store_file(vector_store_id: str, file_id: str, caller: CallerDep, pool: PoolDep) -> Response:
    """Detach the file (the file itself is kept)."""
    return json_response(await service.delete_store_file(pool, caller.project_id, vector_store_id, file_id))


@router.get("/vector_stores/{vector_store_id}/files/{file_id}/content")
async def store_file_content(vector_store_id: str, file_id: str, caller: CallerDep, pool: PoolDep,
                             search: SearchDep, settings: SettingsDep) -> Response:
    """The parsed text of an indexed file (its chunks, from the ingestion service over Kafka)."""
    return json_response(await service.file_content(pool, search, settings, caller.project_id, vector_store_id,
                                                    file_id))


# --- file batches -----------------------------------------------------------------------------------------------


@router.post("/vector_stores/{vector_store_id}/file_batches")
async def create_batch(vector_store_id: str, request: Request, caller: CallerDep, pool: PoolDep) -> Response:
    """Attach many files at once."""
    body = await parse_body(request, service.BatchCreate)
    return model_response(await service.create_batch(pool, caller.project_id, vector_store_id, body))


@router.get("/vector_stores/{vector_store_id}/file_batches/{batch_id}")
async def retrieve_batch(vector_store_id: str, batch_id: str, caller: CallerDep, pool: PoolDep) -> Response:
    """Retrieve a batch (its file_counts)."""
    batch = await service.get_batch(pool, caller.project_id, vector_store_id, batch_id)
    return _polled(model_response(batch), batch.file_counts.in_progress > 0)


@router.post("/vector_stores/{vector_store_id}/file_batches/{batch_id}/cancel")
async def cancel_batch(vector_store_id: str, batch_id: str, caller: CallerDep, pool: PoolDep) -> Response:
    """Cancel the batch's files still in progress."""
    return model_response(await service.cancel_batch(pool, caller.project_id, vector_store_id, batch_id))


@router.get("/vector_stores/{vector_store_id}/file_batches/{batch_id}/files")
async def list_batch_files(vector_store_id: str, batch_id: str, caller: CallerDep, pool: PoolDep, page: PageDep,
                           filter: Annotated[str | None, Query()] = None) -> Response:
    """List the batch's files, optionally with one status."""
    items, has_more = await service.list_store_files(pool, caller.project_id, vector_store_id, page, filter or None,
                                                     batch_id)
    return json_response(list_body([f.model_dump(mode="json") for f in items], has_more))
