"""Streaming of tool calls: the `thread.run.step.delta` events of a `tool_calls` step.

The SDK's streaming helpers learn about tool calls only from step deltas (`on_tool_call_created`,
`on_tool_call_delta`, `on_tool_call_done`, and the run-step snapshots of `get_final_run_steps`); it
concatenates delta strings onto its snapshot, so no delta repeats a string the streamed step has. As on the
hosted API, a step streams as the model writes its calls: it opens with `tool_calls: []`, each call is
announced whole (index, id, type, its strings empty: a function's name is in it), and a function call's
arguments or a code_interpreter call's code follow in pieces; a server-side call's outputs (code_interpreter) or
results and ranking_options (file_search) follow once its result is recorded. All go through the outbox with the
step's events, in order: a stream ends at requires_action, the code shows before it runs, and outputs never overtake
the call they belong to.

The step streams call by call (`call_deltas`): every delta of call n comes before the first of call n + 1, as
hosted streams a step. The SDK follows one call at a time: a delta whose `index` is not the last one it saw ends
that call (`on_tool_call_done`) and creates the other (`on_tool_call_created`), even one it created before. So a
server-side call holds back the calls after it until its result was streamed: the calls run in parallel, their
deltas come one call after the other (the model writes them in that order, and a later call's result waits for the
earlier ones'). What was sent is kept in the step's bookkeeping (`streamed`), for the results recorded later.
"""

from collections.abc import Collection
from typing import Any

_PIECE_CHARS = 64 * 1024
"""Most characters of arguments or code in one delta (an event has a size limit)."""
_EMPTY_SERVER_CALL: dict[str, dict[str, Any]] = {"code_interpreter": {"input": "", "outputs": []}, "file_search": {}}
_STREAMED_TEXT = {"function": "arguments", "code_interpreter": "input"}
"""The string of each call type that streams as the model writes it."""


def _step_delta(step_doc: dict[str, Any], call: dict[str, Any]) -> dict[str, Any]:
    return {"id": step_doc["id"], "object": "thread.run.step.delta",
            "delta": {"step_details": {"type": "tool_calls", "tool_calls": [call]}}}


def _streamed_text(call: dict[str, Any]) -> str:
    key = _STREAMED_TEXT.get(call["type"])
    return str(call[call["type"]][key] or "") if key is not None else ""


def _result(call: dict[str, Any]) -> dict[str, Any]:
    """A server-side call's outputs (code_interpreter) or results with their ranking_options (file_search, as hosted
    streams them: the SDK's snapshot equals the step retrieved)."""
    if call["type"] == "code_interpreter":
        outputs = call["code_interpreter"].get("outputs") or []
        return {"outputs": [{"index": i, **output} for i, output in enumerate(outputs)]}
    result = {"results": list(call["file_search"].get("results") or [])}
    if call["file_search"].get("ranking_options") is not None:
        result["ranking_options"] = call["file_search"]["ranking_options"]
    return result


def call_deltas(step_doc: dict[str, Any], sent: dict[str, int], results: list[str], done: Collection[str], *,
                ending: bool = False) -> list[dict[str, Any]]:
    """The step's deltas that may go now and have not: for each call in the step's order, its announcement, the part
    of its arguments or code not sent yet and, for a server-side call whose result is in (id in `done`), that result.
    A server-side call whose result is not in yet holds back the calls after it (unless the step is `ending`: it
    closes without them). `sent` (call id: characters of that string sent; a key: announced) and `results` (ids of
    the calls whose result was sent) are brought up to date."""
    deltas: list[dict[str, Any]] = []
    for index, call in enumerate(step_doc["step_details"]["tool_calls"]):
        kind, call_id = call["type"], call["id"]
        if call_id not in sent:
            body = ({"name": call["function"]["name"], "arguments": "", "output": None} if kind == "function"
                    else dict(_EMPTY_SERVER_CALL[kind]))
            deltas.append(_step_delta(step_doc, {"index": index, "id": call_id, "type": kind, kind: body}))
            sent[call_id] = 0
        key = _STREAMED_TEXT.get(kind)
        if key is not None:
            text = _streamed_text(call)
            for start in range(sent[call_id], len(text), _PIECE_CHARS):
                deltas.append(_step_delta(step_doc, {"index": index, "type": kind, kind: {
                    key: text[start:start + _PIECE_CHARS]}}))
            sent[call_id] = max(sent[call_id], len(text))
        if kind not in _EMPTY_SERVER_CALL:
            continue
        if call_id in done:
            if call_id not in results:
                deltas.append(_step_delta(step_doc, {"index": index, "type": kind, kind: _result(call)}))
                results.append(call_id)
        elif not ending:
            break
    return deltas


def done_calls(tool_state: dict[str, Any] | None) -> set[str]:
    """Ids of the server-side calls of a step whose result is recorded."""
    return {str(c["id"]) for c in (tool_state or {}).get("calls", []) if c.get("server") and c.get("done")}


def streamed(step_doc: dict[str, Any], tool_state: dict[str, Any] | None) -> tuple[dict[str, int], list[str]]:
    """What the step's deltas brought so far (`call_deltas`' `sent` and `results`), as its bookkeeping keeps it. A
    step whose bookkeeping does not say (written before it did, or still being written by the model) is taken as
    streamed whole as far as it is recorded: nothing is sent twice."""
    kept = (tool_state or {}).get("streamed")
    if isinstance(kept, dict):
        return {str(k): int(v) for k, v in (kept.get("sent") or {}).items()}, [str(i) for i in kept.get("results")
                                                                               or []]
    calls = step_doc["step_details"]["tool_calls"]
    return {c["id"]: len(_streamed_text(c)) for c in calls}, sorted(done_calls(tool_state))


def keep_streamed(tool_state: dict[str, Any], sent: dict[str, int], results: list[str]) -> None:
    """Record in the step's bookkeeping what its deltas brought (`streamed` reads it)."""
    tool_state["streamed"] = {"sent": sent, "results": results}
