"""Turning a run's database state into a chat-completions request (pure functions)."""

import base64
import json
import mimetypes
from dataclasses import dataclass
from typing import Any, TypeVar

from run_orchestrator.repository import MessageRow, StepRow
from run_orchestrator.tools import model_call_of, model_tool_choice, model_tools, tool_output_for_model
from threadline_sandbox.inputs import DATA_DIR, input_paths, within_budget

_Call = TypeVar("_Call")
_BYTES_PER_TOKEN = 4
_TOKENS_PER_MESSAGE = 4
CODE_FILES_LISTED = 50
"""Input files the code_interpreter note names at most (the rest are counted)."""
_SHOWN_NAME_CHARS = 100


@dataclass
class Prompt:
    """The chat messages for a turn, and whether truncation could make them fit."""

    messages: list[dict[str, Any]]
    estimated_tokens: int
    fits: bool


def estimate_tokens(message: dict[str, Any]) -> int:
    """A rough, tokenizer-free token count: about four bytes of UTF-8 a token, i.e. four characters of English,
    two of Cyrillic or Greek, one or so of Chinese or Japanese (as model tokenizers count them; four characters
    a token made a CJK prompt look a quarter of its size to max_prompt_tokens and context fitting)."""
    content = message.get("content")
    text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False) if content else ""
    calls = json.dumps(message.get("tool_calls"), ensure_ascii=False) if message.get("tool_calls") else ""
    size = len(text.encode()) + len(calls.encode())
    return _TOKENS_PER_MESSAGE + (size + _BYTES_PER_TOKEN - 1) // _BYTES_PER_TOKEN


def instructions_of(run_doc: dict[str, Any]) -> str:
    """The system prompt: the run's `instructions` (the gateway stores the run's override or the
    assistant's instructions there, with `additional_instructions` appended)."""
    return str(run_doc.get("instructions") or "").strip()


def code_input_ids(resources: list[Any], messages: list[MessageRow]) -> list[str]:
    """The files a code_interpreter call gets, in the tool executor's order: `tool_resources.code_interpreter.file_ids`
    of the assistant, then of the thread, then files attached to the thread's messages for code_interpreter (oldest
    message first), each once."""
    found: list[str] = []
    for doc_resources in resources:
        tool = (doc_resources if isinstance(doc_resources, dict) else {}).get("code_interpreter") or {}
        for value in tool.get("file_ids") or [] if isinstance(tool, dict) else []:
            if isinstance(value, str) and value not in found:
                found.append(value)
    for message in messages:
        attachments = message.doc.get("attachments")
        for attachment in attachments if isinstance(attachments, list) else ():
            tools = attachment.get("tools") or [] if isinstance(attachment, dict) else []
            if any(isinstance(t, dict) and t.get("type") == "code_interpreter" for t in tools):
                file_id = attachment.get("file_id")
                if isinstance(file_id, str) and file_id not in found:
                    found.append(file_id)
    return found


def _shown_name(filename: str) -> str:
    """An uploaded file's name as the note quotes it: a JSON string, not too long, what does not print escaped (it is
    the user's text, in a system message)."""
    name = filename if len(filename) <= _SHOWN_NAME_CHARS else filename[:_SHOWN_NAME_CHARS] + "..."
    return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in json.dumps(name, ensure_ascii=False))


def code_files_note(file_ids: list[str], files: dict[str, tuple[str, int]], max_total_bytes: int,
                    limit: int = CODE_FILES_LISTED) -> str | None:
    """What the model is told of code_interpreter's input files (None: there are none): their paths as the code sees
    them, named as the tool executor copies them (`threadline_sandbox.inputs`), and the uploaded name where it
    differs; a hosted model knew its files, one not told must guess their names or list the folder first."""
    chosen = within_budget(file_ids, {file_id: size for file_id, (_, size) in files.items()}, max_total_bytes)
    if not chosen:
        return None
    lines = ["The user's files for code_interpreter are in its working directory:"]
    for file_id, path in input_paths([(file_id, files[file_id][0]) for file_id in chosen])[:limit]:
        filename = files[file_id][0]
        lines.append(f"- {path}" if path == f"{DATA_DIR}/{filename}" else
                     f"- {path} (uploaded as {_shown_name(filename)})")
    listed = len(lines) - 1
    if len(chosen) > listed:
        lines.append(f"- and {len(chosen) - listed} more")
    return "\n".join(lines)


def content_for_model(doc: dict[str, Any]) -> str | list[dict[str, Any]]:
    """A message's content blocks as chat content: plain text, or parts when a user message carries images
    (chat completions take image parts in user messages only: an assistant's images, e.g. code_interpreter
    plots, are text notes)."""
    vision = doc.get("role") == "user"
    parts: list[dict[str, Any]] = []
    for block in doc.get("content") or []:
        kind = block.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": str((block.get("text") or {}).get("value", ""))})
        elif kind == "refusal":  # what the model answered when it refused: the next turn sees it as said
            parts.append({"type": "text", "text": str(block.get("refusal") or "")})
        elif kind == "image_url":
            image = block.get("image_url") or {}
            if vision:
                parts.append({"type": "image_url", "image_url": {k: v for k, v in image.items() if v is not None}})
            else:
                parts.append({"type": "text", "text": f"[image {image.get('url', '')}]"})
        elif kind == "image_file":
            image = block.get("image_file") or {}
            if vision:  # a placeholder until `with_image_files` puts the file's bytes in
                parts.append({"type": "image_file", "image_file": {k: v for k, v in image.items() if v is not None}})
            else:
                parts.append({"type": "text", "text": f"[image file {image.get('file_id', '')}]"})
    if all(p["type"] == "text" for p in parts):
        return "\n".join(p["text"] for p in parts)
    return parts


_IMAGE_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF87a", "image/gif"),
                     (b"GIF89a", "image/gif"))


IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})
"""The image types chat completions take (OpenAI's vision input: PNG, JPEG, GIF, WebP)."""


def sniffed_image_type(content: bytes) -> str | None:
    """The IMAGE_TYPES type the bytes start as (None: none of them)."""
    for signature, mime in _IMAGE_SIGNATURES:
        if content.startswith(signature):
            return mime
    if content[:4] == b"RIFF" and content[8:12] == b"WEBP":
        return "image/webp"
    return None


def _image_type(filename: str, content: bytes) -> str:
    """The MIME type of an uploaded image: by its first bytes, else by its name (png when unknown)."""
    guessed = sniffed_image_type(content) or mimetypes.guess_type(filename)[0]
    return guessed if guessed and guessed.startswith("image/") else "image/png"


def data_url(mime: str, content: bytes) -> str:
    """The bytes as a `data:` URL (how images reach a model that is not to fetch them)."""
    return f"data:{mime};base64,{base64.b64encode(content).decode('ascii')}"


def part_values(request: dict[str, Any], kind: str, key: str) -> list[str]:
    """The `key` of each `kind` content part in the request's messages (`image_file` ids, `image_url` URLs), each
    once, first mention first."""
    found: list[str] = []
    for message in request.get("messages") or ():
        content = message.get("content")
        for part in content if isinstance(content, list) else ():
            value = (part.get(kind) or {}).get(key) if part.get("type") == kind else None
            if isinstance(value, str) and value not in found:
                found.append(value)
    return found


def image_file_ids(request: dict[str, Any]) -> list[str]:
    """The files that `image_file` parts of the request's messages refer to, first mention first."""
    return part_values(request, "image_file", "file_id")


def with_image_files(request: dict[str, Any], files: dict[str, tuple[str, bytes]]) -> dict[str, Any]:
    """The request with each `image_file` part as the model's vision part: an `image_url` holding the file as a
    data URL (its `detail` kept), as the hosted API shows uploaded images to the model. A file that is gone
    (`files`: filename and bytes by id) becomes a text note."""
    messages: list[dict[str, Any]] = []
    for message in request.get("messages") or ():
        content = message.get("content")
        if not isinstance(content, list) or not any(p.get("type") == "image_file" for p in content):
            messages.append(message)
            continue
        parts: list[dict[str, Any]] = []
        for part in content:
            if part.get("type") != "image_file":
                parts.append(part)
                continue
            image = part.get("image_file") or {}
            found = files.get(str(image.get("file_id")))
            if found is None:
                parts.append({"type": "text", "text": f"[image file {image.get('file_id')} is no longer available]"})
                continue
            filename, data = found
            url = data_url(_image_type(filename, data), data)
            parts.append({"type": "image_url", "image_url": {"url": url, **({"detail": image["detail"]}
                                                                            if image.get("detail") else {})}})
        messages.append({**message, "content": parts})
    return {**request, "messages": messages}


def _sort_key(object_id: str) -> str:
    """Ids are `prefix_` + a time-ordered stamp: compare stamps across prefixes."""
    return object_id.split("_", 1)[1] if "_" in object_id else object_id


def _step_messages(step: StepRow) -> list[dict[str, Any]]:
    """A tool_calls step as the assistant's tool-call message and the tools' answers."""
    state_calls = {c["id"]: c for c in (step.tool_state or {}).get("calls", [])}
    step_calls = step.doc["step_details"]["tool_calls"]
    calls = [model_call_of(c, state_calls.get(c["id"])) for c in step_calls]
    out: list[dict[str, Any]] = [{"role": "assistant", "content": None, "tool_calls": [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]}]
    out += [{"role": "tool", "tool_call_id": c["id"], "content": tool_output_for_model(c, state_calls.get(c["id"]))}
            for c in step_calls]
    return out


def _context_window(run_doc: dict[str, Any], context_tokens: int) -> int | None:
    """What `auto` truncation leaves the prompt of a model with `context_tokens` (0: unknown): the window less
    room for the answer (`max_completion_tokens`, at most half the window; a quarter when unset)."""
    strategy = run_doc.get("truncation_strategy") or {"type": "auto"}
    if not context_tokens or strategy.get("type") != "auto":
        return None
    answer = run_doc.get("max_completion_tokens") or context_tokens // 4
    return context_tokens - min(int(answer), context_tokens // 2)


def build_prompt(run_doc: dict[str, Any], messages: list[MessageRow], steps: list[StepRow],
                 spent_prompt_tokens: int = 0, context_tokens: int = 0, files_note: str | None = None) -> Prompt:
    """System instructions (with `files_note` after them: `code_files_note`), the (truncated) thread, then this run's
    own messages and tool calls, in order.

    `max_prompt_tokens` bounds the whole run, as hosted: a turn gets what the earlier turns left of it
    (`spent_prompt_tokens`, as the model counted them), the thread's messages dropped from its middle to fit;
    a prompt that cannot fit ends the run incomplete. With `auto` truncation the thread is also cut to the
    model's context length when it is known (`context_tokens`), best effort."""
    run_id = run_doc["id"]
    history = [m for m in messages if m.run_id != run_id]
    own: list[tuple[str, list[dict[str, Any]]]] = []
    for m in messages:
        if m.run_id == run_id and m.doc.get("content") and m.doc.get("status") != "in_progress":  # not the answer
            own.append((_sort_key(m.id), [{"role": m.doc["role"], "content": content_for_model(m.doc)}]))
    for step in steps:
        if step.doc["type"] == "tool_calls" and step.status in ("in_progress", "completed"):
            own.append((_sort_key(step.id), _step_messages(step)))
    own.sort(key=lambda item: item[0])

    strategy = run_doc.get("truncation_strategy") or {"type": "auto"}
    if strategy.get("type") == "last_messages" and strategy.get("last_messages") is not None:
        keep = int(strategy["last_messages"])
        history = history[-keep:] if keep > 0 else []
    head: list[dict[str, Any]] = []
    system = "\n\n".join(part for part in (instructions_of(run_doc), files_note) if part)
    if system:  # one system message, first: some chat templates take no other
        head.append({"role": "system", "content": system})
    # an answer that never got a word (its run failed or was cancelled first) is no turn the model took: sent as an
    # empty assistant message it misleads the model, and servers that take a last assistant message as a prefill
    # (llama.cpp) or refuse empty content fail the run again
    chat_history = [{"role": m.doc["role"], "content": content} for m in history
                    if (content := content_for_model(m.doc)) or m.doc["role"] != "assistant"]
    tail = _merge_tool_turns([msg for _, group in own for msg in group])

    limit = run_doc.get("max_prompt_tokens")
    budget = None if limit is None else int(limit) - spent_prompt_tokens
    window = _context_window(run_doc, context_tokens)
    target = min((b for b in (budget, window) if b is not None), default=None)
    total = sum(estimate_tokens(m) for m in head + chat_history + tail)
    while target is not None and total > target and len(chat_history) > 1:  # the middle first, as hosted
        total -= estimate_tokens(chat_history.pop(1 if len(chat_history) > 2 else 0))
    fits = budget is None or total <= budget
    return Prompt(messages=head + chat_history + tail, estimated_tokens=total, fits=fits)


def _merge_tool_turns(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fold an assistant text message into the tool-call message that follows it (one model turn)."""
    out: list[dict[str, Any]] = []
    for msg in messages:
        prev = out[-1] if out else None
        if (msg.get("tool_calls") and prev is not None and prev["role"] == "assistant"
                and not prev.get("tool_calls") and isinstance(prev.get("content"), str)):
            prev["tool_calls"] = msg["tool_calls"]
            continue
        out.append(msg)
    return out


def chat_request(run_doc: dict[str, Any], prompt: Prompt, *, max_completion_tokens: int | None,
                 called: bool = False) -> dict[str, Any]:
    """The body of a streamed chat-completions request (with usage); `called`: the run made a tool call already
    (`made_tool_call`), so a forced tool_choice is over (`turn_tool_choice`)."""
    request: dict[str, Any] = {"model": run_doc["model"], "messages": prompt.messages, "stream": True,
                               "stream_options": {"include_usage": True}}
    for name in ("temperature", "top_p", "reasoning_effort"):  # reasoning_effort: only when the run has one
        if run_doc.get(name) is not None:
            request[name] = run_doc[name]
    if max_completion_tokens is not None:
        request["max_completion_tokens"] = max_completion_tokens
    tools = model_tools(run_doc.get("tools") or [])
    if tools:
        request["tools"] = tools
        choice = turn_tool_choice(run_doc, called)
        if choice is not None:
            request["tool_choice"] = model_tool_choice(choice)
        if run_doc.get("parallel_tool_calls") is not None:
            request["parallel_tool_calls"] = bool(run_doc["parallel_tool_calls"])
    response_format = run_doc.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") in ("json_object", "json_schema"):
        request["response_format"] = response_format
    return request


def can_call_tools(run_doc: dict[str, Any]) -> bool:
    """False when the model cannot answer with tool calls (no tools, or tool_choice none)."""
    return bool(model_tools(run_doc.get("tools") or [])) and run_doc.get("tool_choice") != "none"


def made_tool_call(steps: list[StepRow]) -> bool:
    """The run's model made a tool call that was answered (a completed tool_calls step)."""
    return any(s.doc["type"] == "tool_calls" and s.status == "completed" for s in steps)


def turn_tool_choice(run_doc: dict[str, Any], called: bool) -> Any:
    """The run's tool_choice for a model turn: a forced one ("required" or a named tool) asks for a call before the
    answer, as the contract says ("must call one or more tools before responding to the user"), so once the run made
    one the turn is "auto": sent again, a server that enforces it (OpenAI, vLLM) calls again after every tool output
    and the run never answers."""
    choice = run_doc.get("tool_choice")
    return "auto" if called and (choice == "required" or isinstance(choice, dict)) else choice


def forces_tool_call(run_doc: dict[str, Any], steps: list[StepRow]) -> bool:
    """The run's model must call a tool before it answers (tool_choice "required" or a named tool) and has not yet: a
    server that does not enforce tool_choice (Ollama ignores it, vLLM before 0.8.3 is sent "auto") lets a small model
    answer in text, so its text is held and it is asked again (`tool_call_reminder`)."""
    choice = run_doc.get("tool_choice")
    return (choice == "required" or isinstance(choice, dict)) and can_call_tools(run_doc) and not made_tool_call(steps)


def tool_call_reminder(run_doc: dict[str, Any]) -> dict[str, Any]:
    """The system message that ends the request asked again of a model that answered without the tool call its run
    forces: what tool_choice asks, said plainly (a model that ignores tool_choice may still follow its prompt)."""
    choice = model_tool_choice(run_doc.get("tool_choice"))
    if isinstance(choice, dict):
        wanted = f"the tool named {(choice.get('function') or {}).get('name')}"
    else:
        wanted = "one or more of the tools offered to you"
    return {"role": "system", "content": f"You must call {wanted} now. Answer with the tool call only, not with text."}


def allowed_calls(calls: list[_Call], run_doc: dict[str, Any], called: bool = False) -> list[_Call]:
    """The calls the run lets the model make: none where it cannot call tools (its answer is open already), those of
    the tool `tool_choice` names (until the run made a call: `turn_tool_choice`), the first only with
    parallel_tool_calls false. A backend that ignores those settings (Ollama takes no `tool_choice`) cannot break the
    run."""
    if not can_call_tools(run_doc):
        return []
    choice = model_tool_choice(turn_tool_choice(run_doc, called))
    if isinstance(choice, dict):
        calls = [c for c in calls if _call_name(c) == (choice.get("function") or {}).get("name")]
    return calls[:1] if run_doc.get("parallel_tool_calls") is False else calls


def _call_name(call: object) -> str:
    """The function a call calls: a ModelToolCall's name, or a step tool call's (its type for a server tool)."""
    if isinstance(call, dict):
        return str((call.get("function") or {}).get("name") if call.get("type") == "function" else call.get("type"))
    return str(getattr(call, "name", ""))
