"""Messages of a thread: create, list, retrieve, modify, delete."""

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from gateway import service
from gateway.deps import CallerDep, PoolDep
from gateway.http import json_response, model_doc, model_response, parse_body
from gateway.pagination import PageDep, list_body
from gateway.schemas import MessageIn, MessageUpdate

router = APIRouter(prefix="/v1", tags=["messages"])


@router.post("/threads/{thread_id}/messages")
async def create_message(thread_id: str, request: Request, caller: CallerDep, pool: PoolDep) -> Response:
    """Add a message to a thread."""
    body = await parse_body(request, MessageIn)
    return model_response(await service.create_message(pool, caller.project_id, thread_id, body))


@router.get("/threads/{thread_id}/messages")
async def list_messages(thread_id: str, caller: CallerDep, pool: PoolDep, page: PageDep,
                        run_id: Annotated[str | None, Query()] = None) -> Response:
    """List a thread's messages, optionally those of one run."""
    items, has_more = await service.list_messages(pool, caller.project_id, thread_id, page, run_id or None)
    return json_response(list_body([model_doc(m) for m in items], has_more))


@router.get("/threads/{thread_id}/messages/{message_id}")
async def retrieve_message(thread_id: str, message_id: str, caller: CallerDep, pool: PoolDep) -> Response:
    """Retrieve a message."""
    return model_response(await service.get_message(pool, caller.project_id, thread_id, message_id))


@router.post("/threads/{thread_id}/messages/{message_id}")
async def modify_message(thread_id: str, message_id: str, request: Request, caller: CallerDep,
                         pool: PoolDep) -> Response:
    """Modify a message's metadata."""
    body = await parse_body(request, MessageUpdate)
    return model_response(await service.update_message(pool, caller.project_id, thread_id, message_id, body))


@router.delete("/threads/{thread_id}/messages/{message_id}")
async def delete_message(thread_id: str, message_id: str, caller: CallerDep, pool: PoolDep) -> Response:
    """Delete a message."""
    return model_response(await service.delete_message(pool, caller.project_id, thread_id, message_id))
