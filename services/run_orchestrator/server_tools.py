"""Streaming of tool calls: the `thread.run.step.delta` events of a `tool_calls` step.

The SDK's streaming helpers learn about tool calls only from step deltas (`on_tool_call_created`,
`on_tool_call_delta`, `on_tool_call_done`, and the run-step snapshots of `get_final_run_steps`); it
concatenates delta strings onto its snapshot, so no delta repeats a string the streamed step has. As on the
hosted API, a step streams as the model writes its calls: it opens with `tool_calls: []`, each call is
announced whole (index, id, type, its strings empty: a function's name is in it), and a function call's
arguments or a code_interpreter call's code follow in pieces (`streamed_call_deltas`); a server-side call's
outputs (code_interpreter) or results and ranking_options (file_search) follow once its result is recorded
(`result_delta`). All go through the outbox with the step's events, in order: a stream ends at requires_action,
the code shows before it runs, and outputs never overtake the call they belong to.
"""

from typing import Any

_PIECE_CHARS = 64 * 1024
"""Most characters of arguments or code in one delta (an event has a size limit)."""
_EMPTY_SERVER_CALL: dict[str, dict[str, Any]] = {"code_interpreter": {"input": "", "outputs": []}, "file_search": {}}
_STREAMED_TEXT = {"function": "arguments", "code_interpreter": "input"}
"""The string of each call type that streams as the model writes it."""


def _step_delta(step_doc: dict[str, Any], call: dict[str, Any]) -> dict[str, Any]:
    return {"id": step_doc["id"], "object": "thread.run.step.delta",
            "delta": {"step_details": {"type": "tool_calls", "tool_calls": [call]}}}


def streamed_call_deltas(step_doc: dict[str, Any], sent: dict[str, int]) -> list[dict[str, Any]]:
    """The deltas of the step's calls as far as written: an announcement of each call not yet announced, and the
    part of each function call's arguments or code_interpreter call's code not yet sent. `sent` (call id:
    characters of that string sent; a key: announced) is brought up to date."""
    deltas: list[dict[str, Any]] = []
    for index, call in enumerate(step_doc["step_details"]["tool_calls"]):
        kind = call["type"]
        if call["id"] not in sent:
            body = ({"name": call["function"]["name"], "arguments": "", "output": None} if kind == "function"
                    else dict(_EMPTY_SERVER_CALL[kind]))
            deltas.append(_step_delta(step_doc, {"index": index, "id": call["id"], "type": kind, kind: body}))
            sent[call["id"]] = 0
        key = _STREAMED_TEXT.get(kind)
        if key is not None:
            text: str = call[kind][key] or ""
            for start in range(sent[call["id"]], len(text), _PIECE_CHARS):
                deltas.append(_step_delta(step_doc, {"index": index, "type": kind, kind: {
                    key: text[start:start + _PIECE_CHARS]}}))
            sent[call["id"]] = max(sent[call["id"]], len(text))
    return deltas


def result_delta(step_doc: dict[str, Any], step_call: dict[str, Any]) -> list[dict[str, Any]]:
    """The delta bringing a server-side call's outputs (code_interpreter) or results (file_search)."""
    calls = step_doc["step_details"]["tool_calls"]
    index = next((i for i, c in enumerate(calls) if c["id"] == step_call["id"]), None)
    kind = step_call["type"]
    if index is None or kind not in ("code_interpreter", "file_search"):
        return []
    if kind == "code_interpreter":
        outputs = step_call["code_interpreter"].get("outputs") or []
        result: dict[str, Any] = {"outputs": [{"index": i, **output} for i, output in enumerate(outputs)]}
    else:  # with its ranking_options, as hosted streams them: the SDK's snapshot equals the step retrieved
        result = {"results": list(step_call["file_search"].get("results") or [])}
        if step_call["file_search"].get("ranking_options") is not None:
            result["ranking_options"] = step_call["file_search"]["ranking_options"]
    return [_step_delta(step_doc, {"index": index, "type": kind, kind: result})]
