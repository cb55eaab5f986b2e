"""Assistants: create, retrieve, modify, delete, list."""

from fastapi import APIRouter, Request
from fastapi.responses import Response

from gateway import service
from gateway.deps import CallerDep, PoolDep
from gateway.http import json_response, model_doc, model_response, parse_body
from gateway.pagination import PageDep, list_body
from gateway.schemas import AssistantCreate, AssistantUpdate

router = APIRouter(prefix="/v1", tags=["assistants"])


@router.post("/assistants")
async def create_assistant(request: Request, caller: CallerDep, pool: PoolDep) -> Response:
    """Create an assistant."""
    body = await parse_body(request, AssistantCreate)
    return model_response(await service.create_assistant(pool, caller.project_id, body))


@router.get("/assistants")
async def list_assistants(caller: CallerDep, pool: PoolDep, page: PageDep) -> Response:
    """List assistants."""
    items, has_more = await service.list_assistants(pool, caller.project_id, page)
    return json_response(list_body([model_doc(a) for a in items], has_more))


@router.get("/assistants/{assistant_id}")
async def retrieve_assistant(assistant_id: str, caller: CallerDep, pool: PoolDep) -> Response:
    """Retrieve an assistant."""
    return model_response(await service.get_assistant(pool, caller.project_id, assistant_id))


@router.post("/assistants/{assistant_id}")
async def modify_assistant(assistant_id: str, request: Request, caller: CallerDep, pool: PoolDep) -> Response:
    """Modify an assistant."""
    body = await parse_body(request, AssistantUpdate)
    return model_response(await service.update_assistant(pool, caller.project_id, assistant_id, body))


@router.delete("/assistants/{assistant_id}")
async def delete_assistant(assistant_id: str, caller: CallerDep, pool: PoolDep) -> Response:
    """Delete an assistant."""
    return model_response(await service.delete_assistant(pool, caller.project_id, assistant_id))
