"""Runs and run steps: create (also with a new thread), list, retrieve, modify, cancel; steps list/retrieve."""

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from gateway import service
from gateway.api import streams
from gateway.deps import CallerDep, PoolDep
from gateway.errors import bad_request, echo
from gateway.http import json_response, model_doc, model_response, parse_body
from gateway.pagination import PageDep, list_body
from gateway.schemas import RunCreate, RunUpdate, ThreadAndRunCreate
from gateway.vector_stores_service import POLL_AFTER_MS

router = APIRouter(prefix="/v1", tags=["runs"])

RUN_POLLED_STATUSES = frozenset({"queued", "in_progress", "cancelling"})
"""The statuses the SDK's poll helpers wait out (they return at requires_action and every terminal status)."""
RUN_STEP_INCLUDES = (service.FILE_SEARCH_CONTENT_INCLUDE,)
"""What `include[]` may ask for (run create, run steps): the only value the hosted API knows."""


IncludeQuery = Annotated[list[str], Query(alias="include[]")]


def checked_include(values: list[str]) -> list[str]:
    """The `include[]` query values, each one of RUN_STEP_INCLUDES (else 400, as hosted), without repeats."""
    for index, value in enumerate(values):
        if value not in RUN_STEP_INCLUDES:
            supported = ", ".join(f"'{v}'" for v in RUN_STEP_INCLUDES)
            raise bad_request(f"Invalid value: '{echo(value)}'. Supported values are: {supported}.",
                              f"include[{index}]", "invalid_value")
    return list(dict.fromkeys(values))  # each once: the run keeps them, and a query may repeat one thousands of times


@router.post("/threads/runs")
async def create_thread_and_run(request: Request, caller: CallerDep, pool: PoolDep) -> Response:
    """Create a thread and run it."""
    body = await parse_body(request, ThreadAndRunCreate)
    run = await service.create_thread_and_run(pool, caller.project_id, body)
    if body.stream:  # SSE: thread.created, thread.run.created, ... then done (no `include[]` here, as hosted)
        return await streams.run_event_stream(request, project_id=caller.project_id, thread_id=run.thread_id,
                                              run_id=run.id, include_thread_created=True, search_content=False)
    return model_response(run)


@router.post("/threads/{thread_id}/runs")
async def create_run(thread_id: str, request: Request, caller: CallerDep, pool: PoolDep) -> Response:
    """Queue a run on a thread (`include[]` shapes the step events of its stream)."""
    include = checked_include(request.query_params.getlist("include[]"))  # read here: no dependency per call
    body = await parse_body(request, RunCreate)
    run = await service.create_run(pool, caller.project_id, thread_id, body, include)  # kept for later streams
    if body.stream:  # SSE: thread.run.created, thread.run.queued, ... then done
        return await streams.run_event_stream(
            request, project_id=caller.project_id, thread_id=thread_id, run_id=run.id,
            search_content=service.FILE_SEARCH_CONTENT_INCLUDE in include)
    return model_response(run)


@router.get("/threads/{thread_id}/runs")
async def list_runs(thread_id: str, caller: CallerDep, pool: PoolDep, page: PageDep) -> Response:
    """List a thread's runs."""
    items, has_more = await service.list_runs(pool, caller.project_id, thread_id, page)
    return json_response(list_body([model_doc(r) for r in items], has_more))


@router.get("/threads/{thread_id}/runs/{run_id}")
async def retrieve_run(thread_id: str, run_id: str, caller: CallerDep, pool: PoolDep) -> Response:
    """Retrieve a run; one still moving by itself says how soon to look again (`openai-poll-after-ms`, which the SDK's
    create_and_poll and submit_tool_outputs_and_poll wait between retrieves; without it they wait a whole second)."""
    run = await service.get_run(pool, caller.project_id, thread_id, run_id)
    response = model_response(run)
    if run.status in RUN_POLLED_STATUSES:
        response.headers["openai-poll-after-ms"] = POLL_AFTER_MS
    return response


@router.post("/threads/{thread_id}/runs/{run_id}")
async def modify_run(thread_id: str, run_id: str, request: Request, caller: CallerDep, pool: PoolDep) -> Response:
    """Modify a run's metadata."""
    body = await parse_body(request, RunUpdate)
    return model_response(await service.update_run(pool, caller.project_id, thread_id, run_id, body))


@router.post("/threads/{thread_id}/runs/{run_id}/cancel")
async def cancel_run(thread_id: str, run_id: str, caller: CallerDep, pool: PoolDep) -> Response:
    """Cancel a queued, in-progress or requires_action run."""
    return model_response(await service.cancel_run(pool, caller.project_id, thread_id, run_id))


@router.get("/threads/{thread_id}/runs/{run_id}/steps")
async def list_steps(thread_id: str, run_id: str, caller: CallerDep, pool: PoolDep, page: PageDep,
                     include: IncludeQuery = []) -> Response:  # noqa: B006 (FastAPI copies defaults)
    """List a run's steps."""
    items, has_more = await service.list_steps(pool, caller.project_id, thread_id, run_id, page,
                                               checked_include(include))
    return json_response(list_body([model_doc(s) for s in items], has_more))


@router.get("/threads/{thread_id}/runs/{run_id}/steps/{step_id}")
async def retrieve_step(thread_id: str, run_id: str, step_id: str, caller: CallerDep, pool: PoolDep,
                        include: IncludeQuery = []) -> Response:  # noqa: B006 (FastAPI copies defaults)
    """Retrieve a run step."""
    return model_response(await service.get_step(pool, caller.project_id, thread_id, run_id, step_id,
                                                 checked_include(include)))
