"""submit_tool_outputs: answer a run's function calls and hand it back to the run orchestrator."""

from typing import Annotated

import asyncpg
from fastapi import APIRouter, Request
from fastapi.responses import Response
from openai.types.beta.threads import Run
from pydantic import StringConstraints

from gateway import tool_outputs_repository as repo
from gateway.api import streams
from gateway.deps import CallerDep, PoolDep
from gateway.errors import bad_request, echo
from gateway.http import model_response, parse_body
from gateway.schemas import Strict
from gateway.service import FILE_SEARCH_CONTENT_INCLUDE, RUN_TTL_SECONDS, STEP_GROWTH_BYTES, missing_in_thread
from threadline_core.events import EventEnvelope, ToolOutputsSubmitted, public_event
from threadline_core.ids import now_seconds
from threadline_core.outbox import append_events, ensure_room
from threadline_core.topics import EVENTS, RUN_COMMANDS
from threadline_core.usage import add_usage

router = APIRouter(prefix="/v1", tags=["runs"])

MAX_OUTPUT_CHARS = 512_000


class ToolOutputIn(Strict):
    """One function call's answer."""

    tool_call_id: Annotated[str, StringConstraints(min_length=1)]
    output: Annotated[str, StringConstraints(max_length=MAX_OUTPUT_CHARS)]


class SubmitToolOutputs(Strict):
    """The request body."""

    tool_outputs: list[ToolOutputIn]
    stream: bool | None = None


@router.post("/threads/{thread_id}/runs/{run_id}/submit_tool_outputs")
async def submit_tool_outputs_route(thread_id: str, run_id: str, request: Request, caller: CallerDep,
                                    pool: PoolDep) -> Response:
    """Store the outputs on the run's tool_calls step and queue the run again."""
    body = await parse_body(request, SubmitToolOutputs)
    run, cursor, include = await submit_tool_outputs(pool, caller.project_id, thread_id, run_id, body)
    if body.stream:  # SSE: thread.run.step.completed, thread.run.queued, thread.run.in_progress, ... then done
        return await streams.run_event_stream(request, project_id=caller.project_id, thread_id=thread_id,
                                              run_id=run_id, after_seq=cursor, resumed=False,
                                              search_content=FILE_SEARCH_CONTENT_INCLUDE in include)
    return model_response(run)


async def submit_tool_outputs(pool: asyncpg.Pool, project_id: str, thread_id: str, run_id: str,
                              body: SubmitToolOutputs) -> tuple[Run, int, list[str]]:
    """Validate against `required_action`, then in one transaction: outputs on the step (which they complete, with
    `thread.run.step.completed` before `thread.run.queued`, as hosted streams them), run `queued`, event
    `thread.run.queued`, command `ToolOutputsSubmitted`. Any error leaves the run as it was.

    Returns the run, the seq of its last event before the submission (where a stream starts) and the
    `include[]` the run was created with (what its stream's step events show, as on its first stream)."""
    async with pool.acquire() as conn:
        async with conn.transaction():
            run = await repo.lock_run(conn, project_id, thread_id, run_id)
            if run is None:
                raise await missing_in_thread(conn, project_id, thread_id, "run", run_id)
            if run.status != "requires_action" or not run.doc.get("required_action"):
                raise bad_request(f'Runs in status "{run.status}" do not accept tool outputs.')
            cursor = await streams.run_cursor(conn, run_id)
            expected = [c["id"] for c in run.doc["required_action"]["submit_tool_outputs"]["tool_calls"]]
            outputs = _check_outputs(body, expected)
            step = await repo.lock_open_tool_step(conn, run_id)
            if step is None:
                raise bad_request(f'Runs in status "{run.status}" do not accept tool outputs.')
            for call in step.doc["step_details"]["tool_calls"]:
                if call["type"] == "function" and call["id"] in outputs:
                    call["function"]["output"] = outputs[call["id"]]
            completes = _complete_step(step)
            # 413 for outputs too large together: the step's completion event could never be published.
            ensure_room(public_event(type="thread.run.step.completed", project_id=project_id, key=thread_id,
                                     data=step.doc, thread_id=thread_id, run_id=run_id), STEP_GROWTH_BYTES)
            doc = run.doc
            # The answered run gets a fresh window: it must not expire between this commit and its pick-up.
            expires_at = max(int(doc.get("expires_at") or 0), now_seconds() + RUN_TTL_SECONDS)
            doc.update(status="queued", required_action=None, expires_at=expires_at)
            validated = Run.model_validate(doc)
            await repo.save_step_doc(conn, step.id, step.doc)
            await repo.save_queued_run(conn, run_id, doc, expires_at)
            events = [public_event(type="thread.run.step.completed", project_id=project_id, key=thread_id,
                                   data=step.doc, thread_id=thread_id, run_id=run_id)] if completes else []
            events.append(public_event(type="thread.run.queued", project_id=project_id, key=thread_id, data=doc,
                                       thread_id=thread_id, run_id=run_id))
            await append_events(conn, EVENTS, events)
            command: EventEnvelope = ToolOutputsSubmitted(run_id=run_id, thread_id=thread_id).envelope(
                project_id=project_id, key=thread_id, thread_id=thread_id, run_id=run_id)
            await append_events(conn, RUN_COMMANDS, [command])
    return validated, cursor, run.step_include


def _complete_step(step: repo.LockedStep) -> bool:
    """Complete the step its outputs answered (status, completed_at, the usage of the model turn that wrote its calls,
    as the run orchestrator would on picking the run up), unless a server-side call of it is still running (the
    orchestrator completes it once that call is in). True if it completed."""
    state = step.tool_state or {}
    if any(call.get("server") and not call.get("done") for call in state.get("calls") or ()):
        return False
    step.doc.update(status="completed", completed_at=now_seconds(), usage=add_usage(state.get("usage")))
    return True


def _check_outputs(body: SubmitToolOutputs, expected: list[str]) -> dict[str, str]:
    """Every pending call answered exactly once, nothing else."""
    outputs: dict[str, str] = {}
    for index, item in enumerate(body.tool_outputs):
        param = f"tool_outputs[{index}].tool_call_id"
        if item.tool_call_id not in expected:
            raise bad_request(f"No tool call found with id '{echo(item.tool_call_id)}'. Expected one of "
                              f"{expected}.", param, "invalid_value")
        if item.tool_call_id in outputs:
            raise bad_request(f"Duplicate tool output for tool call '{echo(item.tool_call_id)}'.", param,
                              "invalid_value")
        outputs[item.tool_call_id] = item.output
    if len(outputs) != len(expected):
        raise bad_request(f"Expected tool outputs for call_ids {expected}, got {list(outputs)}.", "tool_outputs",
                          "invalid_value")
    return outputs
