"""Streaming of server-side tool results: `thread.run.step.delta` events for a finished call.

The SDK's streaming helpers learn about tool calls only from step deltas (`on_tool_call_created`,
`on_tool_call_delta`, `on_tool_call_done`, and the run-step snapshots of `get_final_run_steps`). The
SDK concatenates delta strings onto the snapshot, so no delta repeats a string the streamed step has.
As on the hosted API, a code_interpreter call's input and a function call's arguments reach a stream as
deltas: the `tool_calls` step's created and in_progress events carry them empty (`streamed_step`; the stored
step has them), so `on_tool_call_delta` sees them. A server-side call is opened by one delta that announces it
(index and type) and, for code_interpreter, one with its input; its outputs (code_interpreter) or results
(file_search) follow once its result is recorded. The call of a step that holds only it is opened with the
step (`opening_deltas`), so a stream shows the code while it runs; in a step of several calls each call is
opened when its result is recorded, as results come in any order and the SDK's created / delta / done
callbacks pair up only when a call's deltas are contiguous. Function calls are announced with the step
(`function_call_deltas`), each followed by its arguments.

A turn whose first call is a function call streams its calls as the model writes them, as hosted: the step
opens with `tool_calls: []`, each call is announced whole (index, id, type, its strings empty) and a function
call's arguments follow in pieces (`streamed_call_deltas`).
"""

import logging
from typing import Any

from aiokafka import AIOKafkaProducer

from threadline_core.events import EventEnvelope
from threadline_core.topics import MESSAGE_DELTAS

_log = logging.getLogger(__name__)
_ARGUMENT_CHARS = 64 * 1024
"""Most characters of arguments in one delta (an event has a size limit)."""


def _step_delta(step_doc: dict[str, Any], call: dict[str, Any]) -> dict[str, Any]:
    return {"id": step_doc["id"], "object": "thread.run.step.delta",
            "delta": {"step_details": {"type": "tool_calls", "tool_calls": [call]}}}


def _opening(step_doc: dict[str, Any], index: int, step_call: dict[str, Any]) -> list[dict[str, Any]]:
    """A server-side call's announcement (index and type), then a code_interpreter call's input."""
    kind = step_call["type"]
    announcement: dict[str, Any] = {"index": index, "type": kind}
    if kind == "file_search":
        announcement["file_search"] = {}  # required in a file_search call delta (always empty there)
    deltas = [_step_delta(step_doc, announcement)]
    if kind == "code_interpreter" and step_call["code_interpreter"].get("input"):
        deltas.append(_step_delta(step_doc, {"index": index, "type": kind, "code_interpreter": {
            "input": step_call["code_interpreter"]["input"]}}))
    return deltas


def _opened_with_step(step_doc: dict[str, Any]) -> bool:
    """Whether the step holds one server-side call and nothing else: that call is opened with the step."""
    calls = step_doc["step_details"]["tool_calls"]
    return len(calls) == 1 and calls[0]["type"] in ("code_interpreter", "file_search")


def opening_deltas(step_doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The opening deltas of a step whose only call is server-side, sent with the step."""
    if not _opened_with_step(step_doc):
        return []
    return _opening(step_doc, 0, step_doc["step_details"]["tool_calls"][0])


def tool_call_deltas(step_doc: dict[str, Any], step_call: dict[str, Any]) -> list[dict[str, Any]]:
    """The `thread.run.step.delta` objects for one server-side call whose result was just recorded: its outputs
    or results, after its opening unless the step was sent with it (`opening_deltas`)."""
    calls = step_doc["step_details"]["tool_calls"]
    index = next((i for i, c in enumerate(calls) if c["id"] == step_call["id"]), None)
    kind = step_call["type"]
    if index is None or kind not in ("code_interpreter", "file_search"):
        return []
    deltas = [] if _opened_with_step(step_doc) else _opening(step_doc, index, step_call)
    if kind == "code_interpreter":
        outputs = step_call["code_interpreter"].get("outputs") or []
        result: dict[str, Any] = {"outputs": [{"index": i, **output} for i, output in enumerate(outputs)]}
    else:
        result = {"results": list(step_call["file_search"].get("results") or [])}
    return [*deltas, _step_delta(step_doc, {"index": index, "type": kind, kind: result})]


def function_call_deltas(step_doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The `thread.run.step.delta` objects of a step's function calls: per call an announcement (index and type:
    the SDK's `on_tool_call_created`), then its arguments (`on_tool_call_delta`, as the hosted API streams them)."""
    deltas: list[dict[str, Any]] = []
    for index, call in enumerate(step_doc["step_details"]["tool_calls"]):
        if call["type"] != "function":
            continue
        pieces: list[dict[str, Any]] = [{"index": index, "type": "function"}]
        arguments = call["function"].get("arguments")
        if arguments:
            pieces.append({"index": index, "type": "function", "function": {"arguments": arguments}})
        deltas += [_step_delta(step_doc, piece) for piece in pieces]
    return deltas


_EMPTY_SERVER_CALL: dict[str, dict[str, Any]] = {"code_interpreter": {"input": "", "outputs": []}, "file_search": {}}


def streamed_call_deltas(step_doc: dict[str, Any], sent: dict[str, int]) -> list[dict[str, Any]]:
    """The deltas of a step whose calls stream as the model writes them: an announcement of each call not yet
    announced, and the part of each function call's arguments not yet sent. `sent` (call id: characters of its
    arguments sent; a key: announced) is brought up to date."""
    deltas: list[dict[str, Any]] = []
    for index, call in enumerate(step_doc["step_details"]["tool_calls"]):
        kind = call["type"]
        if call["id"] not in sent:
            body = ({"name": call["function"]["name"], "arguments": "", "output": None} if kind == "function"
                    else dict(_EMPTY_SERVER_CALL[kind]))
            deltas.append(_step_delta(step_doc, {"index": index, "id": call["id"], "type": kind, kind: body}))
            sent[call["id"]] = 0
        if kind == "function":
            arguments: str = call["function"]["arguments"] or ""
            for start in range(sent[call["id"]], len(arguments), _ARGUMENT_CHARS):
                deltas.append(_step_delta(step_doc, {"index": index, "type": kind, "function": {
                    "arguments": arguments[start:start + _ARGUMENT_CHARS]}}))
            sent[call["id"]] = len(arguments)
    return deltas


def streamed_step(step_doc: dict[str, Any]) -> dict[str, Any]:
    """The `tool_calls` step as its created and in_progress events show it: code_interpreter inputs and function
    arguments empty (their deltas bring them; the SDK appends delta strings to the snapshot)."""
    details = step_doc["step_details"]

    def shown(call: dict[str, Any]) -> dict[str, Any]:
        if call["type"] == "code_interpreter":
            return {**call, "code_interpreter": {**call["code_interpreter"], "input": ""}}
        if call["type"] == "function":
            return {**call, "function": {**call["function"], "arguments": ""}}
        return call

    return {**step_doc, "step_details": {**details, "tool_calls": [shown(call) for call in details["tool_calls"]]}}


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
