"""API objects the orchestrator writes (messages, run steps) and the public events that carry them."""

from typing import Any

import orjson
from openai.types.beta.threads import Message, Run
from openai.types.beta.threads.runs import RunStep

from threadline_core.events import EventEnvelope, public_event
from threadline_core.ids import new_id

_MODELS: dict[str, type[Run] | type[Message] | type[RunStep]] = {
    "thread.run": Run, "thread.message": Message, "thread.run.step": RunStep}


def event(type: str, doc: dict[str, Any], *, project_id: str) -> EventEnvelope:
    """A public event whose data is `doc`, checked against the openai SDK model of its object."""
    return events_for((type,), doc, project_id=project_id)[0]


def events_for(types: tuple[str, ...], doc: dict[str, Any], *, project_id: str) -> list[EventEnvelope]:
    """Several events carrying the same object state (checked and copied once)."""
    _MODELS[doc["object"]].model_validate(doc)
    data = orjson.loads(orjson.dumps(doc))  # a snapshot: later changes to `doc` must not leak into the event
    return [_envelope(t, doc, data, project_id) for t in types]


def event_without_data(type: str, doc: dict[str, Any], *, project_id: str) -> EventEnvelope:
    """The event of `doc` (checked) for a statement that writes `doc` and puts it into the event's data itself:
    no copy of a document the database has anyway."""
    _MODELS[doc["object"]].model_validate(doc)
    return _envelope(type, doc, {}, project_id)


def _envelope(type: str, doc: dict[str, Any], data: dict[str, Any], project_id: str) -> EventEnvelope:
    run_id = doc["id"] if doc["object"] == "thread.run" else doc.get("run_id")
    return public_event(type=type, project_id=project_id, key=doc["thread_id"], data=data, thread_id=doc["thread_id"],
                        run_id=run_id)


def new_message(run_doc: dict[str, Any], now: int) -> dict[str, Any]:
    """The assistant message a run writes into, empty and in progress."""
    return {"id": new_id("msg"), "object": "thread.message", "created_at": now, "thread_id": run_doc["thread_id"],
            "role": "assistant", "content": [], "assistant_id": run_doc["assistant_id"], "run_id": run_doc["id"],
            "attachments": [], "metadata": {}, "status": "in_progress", "completed_at": None,
            "incomplete_at": None, "incomplete_details": None}


def text_content(text: str) -> list[dict[str, Any]]:
    """Message content for plain text."""
    return [{"type": "text", "text": {"value": text, "annotations": []}}] if text else []


def refusal_content(refusal: str) -> list[dict[str, Any]]:
    """Message content for a model's refusal (the contract's MessageContentRefusalObject)."""
    return [{"type": "refusal", "refusal": refusal}] if refusal else []


def image_parts(file_ids: list[str]) -> list[dict[str, Any]]:
    """Message content showing images (generated files) by file id (no `detail`, as hosted: null is not a
    value the contract allows)."""
    return [{"type": "image_file", "image_file": {"file_id": file_id}} for file_id in file_ids]


def _new_step(run_doc: dict[str, Any], now: int, kind: str, details: dict[str, Any]) -> dict[str, Any]:
    return {"id": new_id("step"), "object": "thread.run.step", "created_at": now, "run_id": run_doc["id"],
            "assistant_id": run_doc["assistant_id"], "thread_id": run_doc["thread_id"], "type": kind,
            "status": "in_progress", "cancelled_at": None, "completed_at": None, "expired_at": None,
            "failed_at": None, "last_error": None, "step_details": details, "usage": None, "metadata": {}}


def new_message_step(run_doc: dict[str, Any], message_id: str, now: int) -> dict[str, Any]:
    """A `message_creation` step for `message_id`."""
    return _new_step(run_doc, now, "message_creation",
                     {"type": "message_creation", "message_creation": {"message_id": message_id}})


def new_tool_calls_step(run_doc: dict[str, Any], now: int) -> dict[str, Any]:
    """A `tool_calls` step as it opens: no calls yet (`with_tool_calls`)."""
    return _new_step(run_doc, now, "tool_calls", {"type": "tool_calls", "tool_calls": []})


def with_tool_calls(step_doc: dict[str, Any], tool_calls: list[dict[str, Any]]) -> dict[str, Any]:
    """The `tool_calls` step holding `tool_calls` (as opened it holds none: its deltas announce them)."""
    return {**step_doc, "step_details": {"type": "tool_calls", "tool_calls": tool_calls}}
