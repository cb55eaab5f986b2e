"""Tools: what the model is offered, how its tool calls are split, and the server-side tool hook.

A model turn that ends in tool calls is split by `split_tool_calls`:
- function calls (the user's `function` tools) are answered by the user: the run goes to
  `requires_action` and `submit_tool_outputs` resumes it;
- server-side calls (`code_interpreter`, `file_search`, offered to the model as functions of those
  names) go to the tool executor through `dispatch_server_tool`; the step and the run stay
  `in_progress` until a `ToolCallCompleted` has arrived for every one of them (`apply_server_result`
  records each), then the run continues from the database state.
Both kinds are kept in one `tool_calls` run step; server calls are resolved before function calls.
"""

import json
import re
from dataclasses import dataclass
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from threadline_core.db import storable, storable_text
from threadline_core.events import ToolCallCompleted, ToolCallRequested
from threadline_core.outbox import append_events
from threadline_core.topics import TOOL_REQUESTS

SERVER_TOOLS = ("code_interpreter", "file_search")
"""Tool types the platform runs itself (on the tool executor)."""

_SERVER_TOOL_FUNCTIONS: dict[str, dict[str, Any]] = {
    "code_interpreter": {
        "name": "code_interpreter",
        "description": "Run Python code in a sandbox and get its printed output. Files the user shared are in "
                       "the working directory.",
        "parameters": {"type": "object", "properties": {"code": {"type": "string",
                                                                  "description": "Python source to run"}},
                       "required": ["code"]},
    },
    "file_search": {
        "name": "file_search",
        "description": "Search the files the user shared for passages relevant to a query.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string",
                                                                   "description": "what to look for"}},
                       "required": ["query"]},
    },
}
_SERVER_ARGUMENT = {"code_interpreter": "code", "file_search": "query"}
_CODE_OPENING = re.compile(r'\s*\{\s*"code"\s*:\s*"')
_STRING_PREFIX = re.compile(r'(?:[^"\\]+|\\["\\/bfnrt]|\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}'
                            r'|\\u(?![dD][89abAB])[0-9a-fA-F]{4})*')
"""A JSON string's body up to its closing quote or an escape not yet complete."""


@dataclass
class ModelToolCall:
    """One tool call as the model made it (chat-completions shape)."""

    id: str
    name: str
    arguments: str


@dataclass
class SplitCalls:
    """A turn's tool calls by who answers them."""

    function: list[ModelToolCall]
    server: list[ModelToolCall]


def server_tool_types(run_tools: list[dict[str, Any]]) -> set[str]:
    """Server-side tool types enabled on the run."""
    return {str(t.get("type")) for t in run_tools if t.get("type") in SERVER_TOOLS}


def model_tools(run_tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chat-completions `tools` for the run: function tools as-is, server tools as functions."""
    out: list[dict[str, Any]] = []
    for tool in run_tools:
        kind = tool.get("type")
        if kind == "function":
            function = {k: v for k, v in (tool.get("function") or {}).items() if v is not None}
            out.append({"type": "function", "function": function})
        elif kind in _SERVER_TOOL_FUNCTIONS:
            out.append({"type": "function", "function": dict(_SERVER_TOOL_FUNCTIONS[str(kind)])})
    return out


def model_tool_choice(choice: Any) -> Any:
    """The run's `tool_choice` in chat-completions terms (server tools are functions there)."""
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind in SERVER_TOOLS:
            return {"type": "function", "function": {"name": kind}}
        if kind == "function":
            return {"type": "function", "function": {"name": (choice.get("function") or {}).get("name")}}
    return choice


def split_tool_calls(calls: list[ModelToolCall], run_tools: list[dict[str, Any]]) -> SplitCalls:
    """Function calls for the user, server-side calls for the tool executor."""
    server_types = server_tool_types(run_tools)
    split = SplitCalls(function=[], server=[])
    for call in calls:
        (split.server if call.name in server_types else split.function).append(call)
    return split


def parse_arguments(arguments: str) -> dict[str, Any]:
    """The call's JSON arguments as an object (a bare value or broken JSON becomes {"input": text}; control
    characters in strings are taken as written, as `code_so_far` reads them)."""
    try:
        value = json.loads(arguments, strict=False) if arguments.strip() else {}
    except json.JSONDecodeError:
        return {"input": arguments}
    return value if isinstance(value, dict) else {"input": value}


def step_tool_call(call: ModelToolCall, server: bool) -> dict[str, Any]:
    """The call as it appears in a `tool_calls` step (openai.types.beta.threads.runs.ToolCall)."""
    if not server:
        return {"id": call.id, "type": "function",
                "function": {"name": call.name, "arguments": call.arguments, "output": None}}
    if call.name == "code_interpreter":
        args = parse_arguments(call.arguments)
        code = args.get("code", args.get("input", call.arguments))
        code = storable_text(code if isinstance(code, str) else json.dumps(code))  # the model may decode \u0000
        return {"id": call.id, "type": "code_interpreter", "code_interpreter": {"input": code, "outputs": []}}
    return {"id": call.id, "type": "file_search",
            "file_search": {"ranking_options": {"ranker": "default_2024_08_21", "score_threshold": 0.0},
                            "results": []}}


def code_so_far(arguments: str) -> str:
    """The code of a code_interpreter call whose JSON arguments the model is still writing, as far as it reads for
    sure: when they open with `code` (else "": the code shows once written whole), up to the string's end or an
    escape not yet complete (a surrogate pair counts as one)."""
    opening = _CODE_OPENING.match(arguments)
    if opening is None:
        return ""
    body = _STRING_PREFIX.match(arguments, opening.end())
    text = arguments[opening.end():body.end() if body else opening.end()]
    try:
        return storable_text(json.loads(f'"{text}"', strict=False))
    except ValueError:
        return ""


def written_tool_call(call: ModelToolCall, server: bool) -> dict[str, Any]:
    """The call as far as the model has written it into its step: a function's arguments so far, the code so far."""
    if server and call.name == "code_interpreter":
        return {"id": call.id, "type": "code_interpreter",
                "code_interpreter": {"input": code_so_far(call.arguments), "outputs": []}}
    return step_tool_call(call, server)


def tool_state(calls: SplitCalls, usage: dict[str, int] | None) -> dict[str, Any]:
    """The orchestrator's bookkeeping for a `tool_calls` step (not part of the API object)."""
    entries = [{"id": c.id, "name": c.name, "arguments": c.arguments, "server": False} for c in calls.function]
    entries += [{"id": c.id, "name": c.name, "arguments": c.arguments, "server": True, "done": False,
                 "attempt": 1, "model_output": None} for c in calls.server]
    return {"calls": entries, "usage": usage}


def required_action(step_doc: dict[str, Any]) -> dict[str, Any]:
    """`required_action` for the function calls of a step (openai ...threads.run.RequiredAction)."""
    calls = [{"id": c["id"], "type": "function",
              "function": {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}}
             for c in step_doc["step_details"]["tool_calls"] if c["type"] == "function"]
    return {"type": "submit_tool_outputs", "submit_tool_outputs": {"tool_calls": calls}}


def pending_server_calls(state: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Server-side calls of a step still waiting for the tool executor."""
    return [c for c in (state or {}).get("calls", []) if c.get("server") and not c.get("done")]


def pending_function_calls(step_doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Function calls of a step the user has not answered yet."""
    return [c for c in step_doc["step_details"]["tool_calls"]
            if c["type"] == "function" and c["function"].get("output") is None]


def tool_request(*, run_id: str, thread_id: str, step_id: str, call: dict[str, Any]) -> ToolCallRequested:
    """The `ToolCallRequested` for one server-side call of a step's bookkeeping entry (NULs its arguments decode to
    as U+FFFD: Postgres refuses them in the outbox, so the run's driver crashed on every retry)."""
    args = storable(parse_arguments(str(call.get("arguments", ""))))
    key = _SERVER_ARGUMENT.get(str(call["name"]))
    if key and key not in args and "input" in args:
        args = {key: args["input"]}
    return ToolCallRequested(run_id=run_id, thread_id=thread_id, step_id=step_id, tool_call_id=str(call["id"]),
                             tool_type=str(call["name"]), arguments=args, attempt=int(call.get("attempt", 1)))


async def dispatch_server_tool(conn: asyncpg.Connection | PoolConnectionProxy, *, project_id: str,
                               request: ToolCallRequested) -> None:
    """HOOK (tool executor): send one server-side call, inside the orchestrator's transaction.

    Called for every server-side call of a turn (and again with `attempt` + 1 when a call was not
    answered within THREADLINE_TOOL_CALL_TIMEOUT_SECONDS). The executor answers with
    `ToolCallCompleted` (same run_id/step_id/tool_call_id) on RUN_COMMANDS.
    """
    envelope = request.envelope(project_id=project_id, key=request.thread_id, thread_id=request.thread_id,
                                run_id=request.run_id)
    await append_events(conn, TOOL_REQUESTS, [envelope])


def apply_server_result(step_call: dict[str, Any], state_call: dict[str, Any], done: ToolCallCompleted) -> None:
    """HOOK (tool executor): record a `ToolCallCompleted` on the step's tool call and bookkeeping.

    `result` for code_interpreter: {"outputs": [{"type": "logs", "logs": str} | {"type": "image",
    "image": {"file_id": str}}], "files": [{"path": str, "file_id": str, "image": bool}]} (`files`: what
    the code generated, kept in the bookkeeping only: the answer shows them, see `generated_files`); for
    file_search: {"results": [FileSearchResult...], "ranking_options": {...}}. Either may add
    "model_output": the text the model sees as the tool's answer (otherwise derived from the outputs).
    `error` set: the call failed; the model sees the error.
    """
    result = done.result or {}
    if step_call["type"] == "code_interpreter":
        outputs = list(result.get("outputs") or [])
        if done.error and not outputs:
            outputs = [{"type": "logs", "logs": done.error}]
        step_call["code_interpreter"]["outputs"] = outputs
        state_call["files"] = _generated(result.get("files"))
    elif step_call["type"] == "file_search":
        if result.get("ranking_options"):
            step_call["file_search"]["ranking_options"] = result["ranking_options"]
        step_call["file_search"]["results"] = list(result.get("results") or [])
    model_output = result.get("model_output")
    if not isinstance(model_output, str):
        model_output = f"Error: {done.error}" if done.error else _derived_output(step_call)
    state_call["done"] = True
    state_call["model_output"] = model_output


def _generated(raw: Any) -> list[dict[str, Any]]:
    """The well-formed entries of a code_interpreter result's `files`."""
    files: list[dict[str, Any]] = []
    for entry in raw if isinstance(raw, list) else ():
        if isinstance(entry, dict) and isinstance(entry.get("file_id"), str) and entry["file_id"]:
            path = entry.get("path")
            files.append({"path": path if isinstance(path, str) else None, "file_id": entry["file_id"],
                          "image": bool(entry.get("image"))})
    return files


@dataclass
class GeneratedFiles:
    """What the run's code_interpreter calls generated, for the answer message: `images` (file ids, made since
    the run's previous assistant message) become `image_file` parts; `paths` (path as the code saw it ->
    file id, all of the run) become `file_path` annotations where the text links them."""

    images: list[str]
    paths: dict[str, str]


def generated_files(steps: list[tuple[dict[str, Any], dict[str, Any] | None]],
                    answer_step_id: str | None = None) -> GeneratedFiles:
    """The generated files of a run's steps ((doc, tool_state) in creation order). A `message_creation` step
    other than `answer_step_id` (the answer being written) starts the images over: they were shown there."""
    found = GeneratedFiles(images=[], paths={})
    for doc, state in steps:
        if doc.get("type") == "message_creation":
            if doc.get("id") != answer_step_id:
                found.images = []
            continue
        if doc.get("type") != "tool_calls" or doc.get("status") not in ("in_progress", "completed"):
            continue
        state_calls = {c.get("id"): c for c in (state or {}).get("calls", []) if isinstance(c, dict)}
        for call in doc["step_details"]["tool_calls"]:
            if call.get("type") != "code_interpreter":
                continue
            state_call = state_calls.get(call["id"]) or {}
            if "files" in state_call:
                files = _generated(state_call["files"])
            else:  # recorded before the executor reported its files: the images of the step's outputs
                files = [{"path": None, "file_id": o["image"]["file_id"], "image": True}
                         for o in call["code_interpreter"].get("outputs") or []
                         if o.get("type") == "image" and (o.get("image") or {}).get("file_id")]
            for entry in files:
                if entry["image"] and entry["file_id"] not in found.images:
                    found.images.append(entry["file_id"])
                if entry["path"]:
                    found.paths[entry["path"]] = entry["file_id"]
    return found


def _derived_output(step_call: dict[str, Any]) -> str:
    if step_call["type"] == "code_interpreter":
        parts = []
        for output in step_call["code_interpreter"]["outputs"]:
            if output.get("type") == "logs":
                parts.append(str(output.get("logs", "")))
            elif output.get("type") == "image":
                parts.append(f"[image {output.get('image', {}).get('file_id', '')}]")
        return "\n".join(parts)
    results = step_call.get("file_search", {}).get("results") or []
    texts = []
    for found in results:
        content = " ".join(str(c.get("text") or "") for c in found.get("content") or [])
        texts.append(f"[{found.get('file_name', found.get('file_id', ''))}] {content}".strip())
    return "\n\n".join(texts) if texts else "No results."


def tool_output_for_model(step_call: dict[str, Any], state_call: dict[str, Any] | None) -> str:
    """What the model sees as the answer to one call of a step."""
    if step_call["type"] == "function":
        return str(step_call["function"].get("output") or "")
    if state_call and isinstance(state_call.get("model_output"), str):
        return str(state_call["model_output"])
    return _derived_output(step_call)


def model_call_of(step_call: dict[str, Any], state_call: dict[str, Any] | None) -> ModelToolCall:
    """The call as the model made it (for replaying the conversation)."""
    if state_call:
        return ModelToolCall(id=step_call["id"], name=str(state_call["name"]), arguments=str(state_call["arguments"]))
    if step_call["type"] == "function":
        return ModelToolCall(id=step_call["id"], name=step_call["function"]["name"],
                             arguments=step_call["function"]["arguments"])
    if step_call["type"] == "code_interpreter":
        return ModelToolCall(id=step_call["id"], name="code_interpreter",
                             arguments=json.dumps({"code": step_call["code_interpreter"]["input"]}))
    return ModelToolCall(id=step_call["id"], name="file_search", arguments=json.dumps({"query": ""}))
