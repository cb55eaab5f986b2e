"""Streaming of server-side tool results: `thread.run.step.delta` events for a finished call.

The SDK's streaming helpers learn about tool calls only from step deltas (`on_tool_call_created`,
`on_tool_call_delta`, `on_tool_call_done`, and the run-step snapshots of `get_final_run_steps`). The
`tool_calls` step is created with every call's input already in place, so the deltas never repeat
strings the snapshot has (the SDK concatenates them): one delta announces the call (index and type)
and a second carries its outputs (code_interpreter) or results (file_search).
"""

import logging
from typing import Any

from aiokafka import AIOKafkaProducer

from threadline_core.events import EventEnvelope
from threadline_core.topics import MESSAGE_DELTAS

_log = logging.getLogger(__name__)


def tool_call_deltas(step_doc: dict[str, Any], step_call: dict[str, Any]) -> list[dict[str, Any]]:
    """The `thread.run.step.delta` objects for one server-side call whose result was just recorded."""
    calls = step_doc["step_details"]["tool_calls"]
    index = next((i for i, c in enumerate(calls) if c["id"] == step_call["id"]), None)
    if index is None or step_call["type"] not in ("code_interpreter", "file_search"):
        return []
    kind = step_call["type"]
    detail: dict[str, Any] = {"index": index, "type": kind}
    if kind == "code_interpreter":
        outputs = step_call["code_interpreter"].get("outputs") or []
        detail["code_interpreter"] = {"outputs": [{"index": i, **output} for i, output in enumerate(outputs)]}
    else:
        detail["file_search"] = {"results": list(step_call["file_search"].get("results") or [])}

    def delta(call: dict[str, Any]) -> dict[str, Any]:
        return {"id": step_doc["id"], "object": "thread.run.step.delta",
                "delta": {"step_details": {"type": "tool_calls", "tool_calls": [call]}}}

    announcement: dict[str, Any] = {"index": index, "type": kind}
    if kind == "file_search":
        announcement["file_search"] = {}  # required in a file_search call delta (always empty there)
    return [delta(announcement), delta(detail)]


async def publish_tool_call_deltas(producer: AIOKafkaProducer, *, project_id: str, thread_id: str, run_id: str,
                                   step_doc: dict[str, Any], step_call: dict[str, Any]) -> None:
    """Enqueue the deltas (ephemeral, not in the outbox) before the step's result commits, as message deltas are."""
    for data in tool_call_deltas(step_doc, step_call):
        envelope = EventEnvelope(type="thread.run.step.delta", project_id=project_id, key=thread_id,
                                 thread_id=thread_id, run_id=run_id, data=data)
        try:
            await producer.send(MESSAGE_DELTAS, envelope.to_bytes(), key=thread_id.encode())
        except Exception:
            _log.warning("a tool call delta of %s was not published", run_id, exc_info=True)
            return
