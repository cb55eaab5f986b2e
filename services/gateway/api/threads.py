"""Threads: create, retrieve, modify, delete."""

from fastapi import APIRouter, Request
from fastapi.responses import Response

from gateway import service
from gateway.deps import CallerDep, PoolDep
from gateway.http import model_response, parse_body
from gateway.schemas import ThreadCreate, ThreadUpdate

router = APIRouter(prefix="/v1", tags=["threads"])


@router.post("/threads")
async def create_thread(request: Request, caller: CallerDep, pool: PoolDep) -> Response:
    """Create a thread, optionally with messages."""
    body = await parse_body(request, ThreadCreate)
    return model_response(await service.create_thread(pool, caller.project_id, body))


@router.get("/threads/{thread_id}")
async def retrieve_thread(thread_id: str, caller: CallerDep, pool: PoolDep) -> Response:
    """Retrieve a thread."""
    return model_response(await service.get_thread(pool, caller.project_id, thread_id))


@router.post("/threads/{thread_id}")
async def modify_thread(thread_id: str, request: Request, caller: CallerDep, pool: PoolDep) -> Response:
    """Modify a thread's metadata or tool resources."""
    body = await parse_body(request, ThreadUpdate)
    return model_response(await service.update_thread(pool, caller.project_id, thread_id, body))


@router.delete("/threads/{thread_id}")
async def delete_thread(thread_id: str, caller: CallerDep, pool: PoolDep) -> Response:
    """Delete a thread."""
    return model_response(await service.delete_thread(pool, caller.project_id, thread_id))
