"""Logic of the Assistants API: building objects as the hosted API does, transactions, outbox events."""

import contextlib
from collections.abc import Sequence
from typing import Any

import asyncpg
import orjson
from openai.types.beta import Assistant, AssistantDeleted, Thread, ThreadDeleted
from openai.types.beta.threads import Message, MessageDeleted, Run
from openai.types.beta.threads.runs import RunStep

from gateway import repository as repo
from gateway.errors import ApiError, bad_request, echo, not_found
from gateway.pagination import Conn, PageParams
from gateway.repository import Outbox
from gateway.schemas import (
    AssistantCreate,
    AssistantUpdate,
    ImageFilePartIn,
    ImageUrlPartIn,
    MessageIn,
    MessageUpdate,
    RunCreate,
    RunOptions,
    RunUpdate,
    TextPartIn,
    ThreadAndRunCreate,
    ThreadCreate,
    ThreadUpdate,
    ToolChoiceIn,
    ToolIn,
    ToolResourcesIn,
)
from gateway.strict_schemas import check_strict_functions, check_strict_response_format
from gateway.vector_stores_service import (
    HELPER_EXPIRES_AFTER,
    add_thread_files,
    checked_tool_resources,
    file_search_attachment_ids,
    require_files,
    require_retrievable,
)
from threadline_core.events import EventEnvelope, RunCancelRequested, RunRequested, public_event
from threadline_core.ids import new_id, now_seconds
from threadline_core.outbox import EventTooLarge, append_outbox, ensure_room
from threadline_core.topics import EVENTS, RUN_COMMANDS
from threadline_search.store import Conn as TxConn

Doc = dict[str, Any]
RUN_TTL_SECONDS = 600
RUN_GROWTH_BYTES = 64 * 1024
"""What a run's JSON may gain after it is created: its metadata replaced by the largest allowed (16 keys of 64
and values of 512 characters, up to 6 bytes each as JSON), timestamps, usage, a `last_error` (model errors are
cut to 2000 characters). A run created within MAX_EVENT_BYTES less this always fits in its events: one that did
not could never be moved on by the orchestrator, nor expired."""
STEP_GROWTH_BYTES = 4 * 1024
"""What a tool_calls step's JSON gains once its outputs are in: completion time, status, usage."""
DEFAULT_RANKING_OPTIONS = {"ranker": "default_2024_08_21", "score_threshold": 0.0}
FILE_SEARCH_CONTENT_INCLUDE = "step_details.tool_calls[*].file_search.results[*].content"


# --- documents, shaped as the hosted API returns them ------------------------------------------------------


def tool_doc(tool: ToolIn) -> Doc:
    """A tool as stored and returned (file_search gets its default ranking options, functions `strict`)."""
    doc = tool.model_dump(mode="json", exclude_unset=True)
    if doc["type"] == "file_search":
        options = dict(doc.get("file_search") or {})
        if options.get("ranking_options") is None:
            options["ranking_options"] = dict(DEFAULT_RANKING_OPTIONS)
        elif options["ranking_options"].get("ranker") is None:  # "If not specified will use the auto ranker"
            options["ranking_options"] = {**options["ranking_options"], "ranker": "auto"}
        doc["file_search"] = options
    elif doc["type"] == "function":
        doc["function"].setdefault("strict", False)
    return doc


def tools_doc(tools: Sequence[ToolIn] | None) -> list[Doc]:
    """Tools as stored (strict functions' parameters checked)."""
    docs = [tool_doc(t) for t in tools or ()]
    check_strict_functions(docs)
    return docs


def tool_resources_doc(resources: ToolResourcesIn | None) -> Doc:
    """Tool resources as stored (`{}` when none)."""
    if resources is None:
        return {}
    doc = resources.model_dump(mode="json", exclude_none=True)
    if "code_interpreter" in doc:  # the contract's default, echoed as hosted: `{"file_ids": []}`
        doc["code_interpreter"].setdefault("file_ids", [])
    if "vector_stores" in doc.get("file_search", {}):
        raise bad_request("Creating vector stores through 'tool_resources.file_search.vector_stores' is not "
                          "supported; create the vector store first and pass 'vector_store_ids'.",
                          "tool_resources.file_search.vector_stores", "unsupported_parameter")
    return doc


def response_format_doc(value: Any) -> Any:
    """`"auto"` or the format object (`schema` under its JSON name; `json_schema.strict` defaults to false)."""
    if value is None or isinstance(value, str):
        return value or "auto"
    doc: Doc = value.model_dump(mode="json", by_alias=True, exclude_unset=True)
    if doc["type"] == "json_schema":
        doc["json_schema"].setdefault("strict", False)
    check_strict_response_format(doc)
    return doc


def tool_choice_doc(value: ToolChoiceIn | None) -> Any:
    """`"auto"` by default, else the string or the object."""
    if value is None:
        return "auto"
    if isinstance(value, str):
        return value
    return value.model_dump(mode="json", exclude_unset=True)


def check_tool_choice(choice: Any, tools: Sequence[Doc]) -> None:
    """400 for a `tool_choice` forcing a tool the run does not have: the run would only fail later, at the model,
    or end without the tool call it demands."""
    if choice == "required" and not tools:
        raise bad_request("Invalid value for 'tool_choice': 'required' needs at least one tool, and the run has "
                          "none.", "tool_choice", "invalid_value")
    if not isinstance(choice, dict):
        return
    kind = choice.get("type")
    if kind == "function":
        name = choice["function"]["name"]
        if not any(t.get("type") == "function" and t["function"].get("name") == name for t in tools):
            raise bad_request(f"Invalid value for 'tool_choice': no function named '{echo(name)}' is among the "
                              "run's tools.", "tool_choice", "invalid_value")
    elif not any(t.get("type") == kind for t in tools):
        raise bad_request(f"Invalid value for 'tool_choice': the '{kind}' tool is not among the run's tools.",
                          "tool_choice", "invalid_value")


def content_doc(content: str | Sequence[TextPartIn | ImageFilePartIn | ImageUrlPartIn]) -> list[Doc]:
    """Message content parts as stored: text becomes `{"value", "annotations"}`, images get `detail` "auto"."""
    if isinstance(content, str):
        return [{"type": "text", "text": {"value": content, "annotations": []}}]
    parts: list[Doc] = []
    for part in content:
        if isinstance(part, TextPartIn):
            parts.append({"type": "text", "text": {"value": part.text, "annotations": []}})
        else:
            doc = part.model_dump(mode="json", exclude_unset=True)
            image = doc[doc["type"]]
            if image.get("detail") is None:  # left out or null: the contract's default
                image["detail"] = "auto"
            parts.append(doc)
    return parts


def message_doc(message: MessageIn, thread_id: str, created_at: int) -> Doc:
    """A message created through the API (user or seeded assistant message), complete at once."""
    attachments = [
        {"file_id": a.file_id, "tools": [t.model_dump(mode="json") for t in a.tools or ()]}
        for a in message.attachments or ()
    ]
    return {
        "id": new_id("msg"),
        "object": "thread.message",
        "created_at": created_at,
        "assistant_id": None,
        "thread_id": thread_id,
        "run_id": None,
        "role": message.role,
        "content": content_doc(message.content),
        "attachments": attachments,
        "metadata": message.metadata or {},
        "status": "completed",
        "incomplete_details": None,
        "completed_at": created_at,
        "incomplete_at": None,
    }


def assistant_doc(body: AssistantCreate, created_at: int) -> Doc:
    """A new assistant with the hosted API's defaults."""
    return {
        "id": new_id("asst"),
        "object": "assistant",
        "created_at": created_at,
        "name": body.name,
        "description": body.description,
        "model": body.model,
        "instructions": body.instructions,
        "tools": tools_doc(body.tools),
        "tool_resources": tool_resources_doc(body.tool_resources),
        "metadata": body.metadata or {},
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "response_format": response_format_doc(body.response_format),
        "reasoning_effort": body.reasoning_effort,
    }


def assistant_patch(body: AssistantUpdate) -> Doc:
    """The top-level fields a modify request replaces (explicit nulls reset to the defaults)."""
    patch: Doc = {}
    for field in body.model_fields_set:
        value = getattr(body, field)
        if field == "model":
            if value is not None:
                patch["model"] = value
        elif field == "tools":
            patch["tools"] = tools_doc(value)
        elif field == "tool_resources":
            patch["tool_resources"] = tool_resources_doc(value)
        elif field == "metadata":
            patch["metadata"] = value or {}
        elif field in ("temperature", "top_p"):
            patch[field] = 1.0 if value is None else value
        elif field == "response_format":
            patch["response_format"] = response_format_doc(value)
        else:
            patch[field] = value
    return patch


def thread_doc(body: ThreadCreate | None, created_at: int,
               tool_resources: ToolResourcesIn | None = None) -> Doc:
    """A new thread."""
    resources = body.tool_resources if body is not None and body.tool_resources is not None else tool_resources
    return {
        "id": new_id("thread"),
        "object": "thread",
        "created_at": created_at,
        "metadata": (body.metadata if body is not None else None) or {},
        "tool_resources": tool_resources_doc(resources),
    }


def _joined_instructions(base: str | None, additional: str | None) -> str:
    base = base or ""
    if not additional:
        return base
    return f"{base}\n\n{additional}" if base else additional


def run_doc(body: RunOptions, assistant: Doc, thread_id: str, created_at: int,
            additional_instructions: str | None = None) -> Doc:
    """A queued run: the request's overrides over the assistant's defaults, as the hosted API copies them."""
    instructions = body.instructions if body.instructions is not None else assistant.get("instructions")
    tools = tools_doc(body.tools) if body.tools is not None else assistant.get("tools") or []
    tool_choice = tool_choice_doc(body.tool_choice)
    check_tool_choice(tool_choice, tools)
    return {
        "id": new_id("run"),
        "object": "thread.run",
        "created_at": created_at,
        "assistant_id": assistant["id"],
        "thread_id": thread_id,
        "status": "queued",
        "started_at": None,
        "expires_at": created_at + RUN_TTL_SECONDS,
        "cancelled_at": None,
        "failed_at": None,
        "completed_at": None,
        "required_action": None,
        "last_error": None,
        "model": body.model or assistant["model"],
        "instructions": _joined_instructions(instructions, additional_instructions),
        "tools": tools,
        "metadata": body.metadata or {},
        "usage": None,
        "temperature": body.temperature if body.temperature is not None else assistant.get("temperature"),
        "top_p": body.top_p if body.top_p is not None else assistant.get("top_p"),
        "max_prompt_tokens": body.max_prompt_tokens,
        "max_completion_tokens": body.max_completion_tokens,
        "truncation_strategy": (body.truncation_strategy.model_dump(mode="json")
                                if body.truncation_strategy is not None
                                else {"type": "auto", "last_messages": None}),
        "incomplete_details": None,
        "response_format": (response_format_doc(body.response_format) if body.response_format is not None
                            else assistant.get("response_format") or "auto"),
        "tool_choice": tool_choice,
        "parallel_tool_calls": True if body.parallel_tool_calls is None else body.parallel_tool_calls,
        "reasoning_effort": body.reasoning_effort or assistant.get("reasoning_effort"),
    }


def _event(type_: str, project_id: str, data: Doc, thread_id: str, run_id: str | None = None) -> EventEnvelope:
    return public_event(type=type_, project_id=project_id, key=thread_id, data=data, thread_id=thread_id,
                        run_id=run_id)


def _run_created_events(project_id: str, run: Doc) -> Outbox:
    """The public events that announce a new queued run, then the command for the orchestrator; 413 for a run
    too large to keep in its events as it goes on (RUN_GROWTH_BYTES)."""
    thread_id, run_id = run["thread_id"], run["id"]
    command = RunRequested(run_id=run_id, thread_id=thread_id).envelope(
        project_id=project_id, key=thread_id, thread_id=thread_id, run_id=run_id)
    created = _event("thread.run.created", project_id, run, thread_id, run_id)
    ensure_room(created, RUN_GROWTH_BYTES)
    return [(EVENTS, created), (EVENTS, _event("thread.run.queued", project_id, run, thread_id, run_id)),
            (RUN_COMMANDS, command)]


def _message_events(project_id: str, messages: Sequence[Doc]) -> Outbox:
    return [(EVENTS, _event("thread.message.created", project_id, m, m["thread_id"])) for m in messages]


async def _attach_thread_files(conn: TxConn, project_id: str, thread: Doc, file_ids: Sequence[str]) -> bool:
    """Files that messages attach for file_search go into the thread's vector store, as hosted: its first
    store, else a new one, recorded in `thread["tool_resources"]`. True if the thread doc changed."""
    resources = thread.get("tool_resources") or {}
    file_search = resources.get("file_search") or {}
    new_store = await add_thread_files(conn, project_id, file_search.get("vector_store_ids") or [], file_ids)
    if new_store is None:
        return False
    thread["tool_resources"] = {**resources, "file_search": {**file_search, "vector_store_ids": [new_store]}}
    return True


async def _attach_to_existing_thread(conn: TxConn, project_id: str, thread_id: str, file_ids: Sequence[str]) -> None:
    """`_attach_thread_files` for a stored thread (row locked; 404 if gone). Inside a transaction."""
    thread = await repo.lock_thread(conn, project_id, thread_id)
    if thread is None:
        raise not_found("thread", thread_id)
    if await _attach_thread_files(conn, project_id, thread, file_ids):
        await repo.patch_thread(conn, project_id, thread_id, {"tool_resources": thread["tool_resources"]})


async def _check_attached_files(conn: Conn, project_id: str, messages: Sequence[Doc], messages_param: str) -> None:
    """404 unless every file the messages attach (for any tool) or show (`image_file` parts) is a file of the
    project, as for file_search attachments (a code_interpreter attachment of an unknown file was stored, and the
    sandbox never got it). The 404 names the attachment (`{messages_param}[i].attachments[j].file_id`; no index
    for a single message) or the part (`...content[k].image_file.file_id`). A file attached for file_search that it
    cannot index is a 400 naming its attachment, as hosted."""
    params: dict[str, str] = {}
    searched: dict[str, str] = {}
    for i, message in enumerate(messages):
        prefix = f"{messages_param}[{i}]." if messages_param else ""
        for j, attachment in enumerate(message.get("attachments") or ()):
            params.setdefault(attachment["file_id"], f"{prefix}attachments[{j}].file_id")
            if any(tool.get("type") == "file_search" for tool in attachment.get("tools") or ()):
                searched.setdefault(attachment["file_id"], f"{prefix}attachments[{j}].file_id")
        content = message.get("content")
        for k, part in enumerate(content if isinstance(content, list) else ()):
            if part.get("type") == "image_file":
                params.setdefault(part["image_file"]["file_id"], f"{prefix}content[{k}].image_file.file_id")
    if params:
        found = await require_files(conn, project_id, list(params), list(params.values()))
        if searched:
            await require_retrievable(conn, [found[f] for f in searched], list(searched.values()))


def _transaction(conn: TxConn, needed: bool) -> contextlib.AbstractAsyncContextManager[object]:
    """A transaction only when several statements must commit together (attachments for file_search)."""
    return conn.transaction() if needed else contextlib.nullcontext()


def _active_run_error(thread_id: str, active: str | None) -> Exception:
    suffix = f" {active}" if active else ""
    return bad_request(f"Thread {thread_id} already has an active run{suffix}.")


# --- assistants ----------------------------------------------------------------------------------------------


def _check_runnable(assistant: Doc, given: Sequence[str] = ("instructions", "tools")) -> None:
    """400 for an assistant whose runs could not hold it (its instructions and tools are copied into each run,
    whose events must keep room to grow): stored, it would have every run refused with a 413. The error names
    the larger of the fields `given` in the request."""
    run = run_doc(RunOptions(assistant_id=assistant["id"]), assistant, new_id("thread"), assistant["created_at"])
    try:
        ensure_room(_event("thread.run.created", "", run, run["thread_id"], run["id"]), RUN_GROWTH_BYTES)
    except EventTooLarge as exc:
        sizes = {name: len(orjson.dumps(assistant.get(name))) for name in ("instructions", "tools")}
        raise bad_request(f"The assistant is too large to run: a run copies its instructions and tools, and would be "
                          f"{exc.size} bytes as JSON; at most {exc.limit} bytes fit (instructions "
                          f"{sizes['instructions']} bytes, tools {sizes['tools']} bytes).",
                          max(given, key=lambda name: sizes[name]), "request_too_large") from None


async def create_assistant(pool: asyncpg.Pool, project_id: str, body: AssistantCreate) -> Assistant:
    """Create and store an assistant."""
    body.tool_resources = await checked_tool_resources(pool, project_id, body.tool_resources, expires_after=None)
    doc = assistant_doc(body, now_seconds())
    _check_runnable(doc)
    assistant = repo.assistant_model(doc)
    await repo.insert_assistant(pool, project_id, doc)
    return assistant


async def get_assistant(pool: asyncpg.Pool, project_id: str, assistant_id: str) -> Assistant:
    """An assistant of the project, or 404."""
    found = await repo.get_assistant(pool, project_id, assistant_id)
    if found is None:
        raise not_found("assistant", assistant_id)
    return found


async def _check_given_tool_resources(pool: asyncpg.Pool, project_id: str,
                                      body: AssistantUpdate | ThreadUpdate) -> None:
    """An update's `tool_resources` as stored, only when given: assigning the field marks it as set, and an update
    that does not name it must leave the stored one as it is."""
    if "tool_resources" in body.model_fields_set:
        expires_after = None if isinstance(body, AssistantUpdate) else HELPER_EXPIRES_AFTER
        body.tool_resources = await checked_tool_resources(pool, project_id, body.tool_resources,
                                                           expires_after=expires_after)


async def update_assistant(pool: asyncpg.Pool, project_id: str, assistant_id: str,
                           body: AssistantUpdate) -> Assistant:
    """Replace the fields given."""
    await _check_given_tool_resources(pool, project_id, body)
    patch = assistant_patch(body)
    if not patch:
        return await get_assistant(pool, project_id, assistant_id)
    async with pool.acquire() as conn, conn.transaction():  # rolled back if the result is too large to run
        found = await repo.patch_assistant(conn, project_id, assistant_id, patch)
        if found is None:
            raise not_found("assistant", assistant_id)
        if given := sorted(patch.keys() & {"instructions", "tools"}):
            _check_runnable(found.model_dump(mode="json"), given)
    return found


async def delete_assistant(pool: asyncpg.Pool, project_id: str, assistant_id: str) -> AssistantDeleted:
    """Delete an assistant (its past runs keep their copy of its settings)."""
    if not await repo.delete_assistant(pool, project_id, assistant_id):
        raise not_found("assistant", assistant_id)
    return AssistantDeleted(id=assistant_id, object="assistant.deleted", deleted=True)


async def list_assistants(pool: asyncpg.Pool, project_id: str, page: PageParams) -> tuple[list[Assistant], bool]:
    """A page of assistants."""
    return await repo.list_assistants(pool, project_id, page)


# --- threads -------------------------------------------------------------------------------------------------


async def create_thread(pool: asyncpg.Pool, project_id: str, body: ThreadCreate) -> Thread:
    """Create a thread with its initial messages, announcing them, in one statement."""
    body.tool_resources = await checked_tool_resources(pool, project_id, body.tool_resources)
    now = now_seconds()
    doc = thread_doc(body, now)
    messages = [message_doc(m, doc["id"], now) for m in body.messages or ()]
    for m in messages:
        Message.model_validate(m)
    file_ids = file_search_attachment_ids(messages)
    async with pool.acquire() as conn, _transaction(conn, bool(file_ids)):
        await _check_attached_files(conn, project_id, messages, "messages")
        if file_ids:
            await _attach_thread_files(conn, project_id, doc, file_ids)
        thread = Thread.model_validate(doc)
        await repo.create_thread(conn, project_id, doc, messages,
                                 [(EVENTS, _event("thread.created", project_id, doc, doc["id"])),
                                  *_message_events(project_id, messages)])
    return thread


async def get_thread(pool: asyncpg.Pool, project_id: str, thread_id: str) -> Thread:
    """A thread of the project, or 404."""
    found = await repo.get_thread(pool, project_id, thread_id)
    if found is None:
        raise not_found("thread", thread_id)
    return found


async def update_thread(pool: asyncpg.Pool, project_id: str, thread_id: str, body: ThreadUpdate) -> Thread:
    """Replace metadata and/or tool resources."""
    await _check_given_tool_resources(pool, project_id, body)
    patch: Doc = {}
    if "metadata" in body.model_fields_set:
        patch["metadata"] = body.metadata or {}
    if "tool_resources" in body.model_fields_set:
        patch["tool_resources"] = tool_resources_doc(body.tool_resources)
    if not patch:
        return await get_thread(pool, project_id, thread_id)
    found = await repo.patch_thread(pool, project_id, thread_id, patch)
    if found is None:
        raise not_found("thread", thread_id)
    return found


async def delete_thread(pool: asyncpg.Pool, project_id: str, thread_id: str) -> ThreadDeleted:
    """Delete a thread with everything in it."""
    if not await repo.delete_thread(pool, project_id, thread_id):
        raise not_found("thread", thread_id)
    return ThreadDeleted(id=thread_id, object="thread.deleted", deleted=True)


# --- messages ------------------------------------------------------------------------------------------------


async def create_message(pool: asyncpg.Pool, project_id: str, thread_id: str, body: MessageIn) -> Message:
    """Add a message (refused while a run is active, as hosted) and announce it."""
    doc = message_doc(body, thread_id, now_seconds())
    message = Message.model_validate(doc)
    file_ids = file_search_attachment_ids([doc])
    async with pool.acquire() as conn:
        found, active = await repo.thread_and_active_run(conn, project_id, thread_id)
        if not found:
            raise not_found("thread", thread_id)
        if active is not None:
            raise bad_request(f"Can't add messages to {thread_id} while a run {active} is active.")
        await _check_attached_files(conn, project_id, [doc], "")
        try:
            async with _transaction(conn, bool(file_ids)):
                if file_ids:
                    await _attach_to_existing_thread(conn, project_id, thread_id, file_ids)
                await repo.add_messages(conn, project_id, [doc], _message_events(project_id, [doc]))
        except asyncpg.ForeignKeyViolationError:
            raise not_found("thread", thread_id) from None
    return message


async def missing_in_thread(conn: Conn, project_id: str, thread_id: str, kind: str, object_id: str,
                            run_id: str | None = None) -> ApiError:
    """The 404 for an object of a thread that was not found: it names the thread, or the run, when that is what is
    missing, as hosted (a deleted thread's messages and runs are "No thread found")."""
    if not await repo.thread_exists(conn, project_id, thread_id):
        return not_found("thread", thread_id)
    if run_id is not None and await repo.run_status(conn, project_id, thread_id, run_id) is None:
        return not_found("run", run_id)
    return not_found(kind, object_id)


async def get_message(pool: asyncpg.Pool, project_id: str, thread_id: str, message_id: str) -> Message:
    """A message, or 404."""
    found = await repo.get_message(pool, project_id, thread_id, message_id)
    if found is None:
        raise await missing_in_thread(pool, project_id, thread_id, "message", message_id)
    return found


async def update_message(pool: asyncpg.Pool, project_id: str, thread_id: str, message_id: str,
                         body: MessageUpdate) -> Message:
    """Replace a message's metadata."""
    if "metadata" not in body.model_fields_set:
        return await get_message(pool, project_id, thread_id, message_id)
    found = await repo.set_message_metadata(pool, project_id, thread_id, message_id,
                                            body.metadata or {})
    if found is None:
        raise await missing_in_thread(pool, project_id, thread_id, "message", message_id)
    return found


async def delete_message(pool: asyncpg.Pool, project_id: str, thread_id: str, message_id: str) -> MessageDeleted:
    """Delete a message."""
    if not await repo.delete_message(pool, project_id, thread_id, message_id):
        raise await missing_in_thread(pool, project_id, thread_id, "message", message_id)
    return MessageDeleted(id=message_id, object="thread.message.deleted", deleted=True)


async def list_messages(pool: asyncpg.Pool, project_id: str, thread_id: str, page: PageParams,
                        run_id: str | None) -> tuple[list[Message], bool]:
    """A page of a thread's messages (404 for an unknown thread)."""
    async with pool.acquire() as conn:
        items, has_more = await repo.list_messages(conn, project_id, thread_id, page, run_id)
        if not items and not await repo.thread_exists(conn, project_id, thread_id):
            raise not_found("thread", thread_id)
    return items, has_more


# --- runs ------------------------------------------------------------------------------------------------------


async def _load_assistant(conn: Conn, project_id: str, thread_id: str | None, assistant_id: str) -> Doc:
    thread_found, assistant = await repo.run_context(conn, project_id, thread_id, assistant_id)
    if thread_id is not None and not thread_found:
        raise not_found("thread", thread_id)
    if assistant is None:
        raise not_found("assistant", assistant_id, "assistant_id")
    return assistant


async def create_run(pool: asyncpg.Pool, project_id: str, thread_id: str, body: RunCreate,
                     include: Sequence[str] = ()) -> Run:
    """Queue a run: the run (with its `include[]`), its additional messages, its events and the RunRequested
    command, one transaction."""
    now = now_seconds()
    async with pool.acquire() as conn:
        assistant = await _load_assistant(conn, project_id, thread_id, body.assistant_id)
        messages = [message_doc(m, thread_id, now) for m in body.additional_messages or ()]
        doc = run_doc(body, assistant, thread_id, now, body.additional_instructions)
        run = Run.model_validate(doc)
        await _check_attached_files(conn, project_id, messages, "additional_messages")
        file_ids = file_search_attachment_ids(messages)
        try:
            async with _transaction(conn, bool(file_ids)):
                if file_ids:
                    await _attach_to_existing_thread(conn, project_id, thread_id, file_ids)
                await repo.create_run(conn, project_id, doc, messages,
                                      [*_message_events(project_id, messages), *_run_created_events(project_id, doc)],
                                      include)
        except asyncpg.UniqueViolationError:
            raise _active_run_error(thread_id, await repo.active_run_id(conn, thread_id)) from None
        except asyncpg.ForeignKeyViolationError:
            raise not_found("thread", thread_id) from None
    return run


async def create_thread_and_run(pool: asyncpg.Pool, project_id: str, body: ThreadAndRunCreate) -> Run:
    """Create a thread (with messages) and queue a run on it, in one transaction."""
    body.tool_resources = await checked_tool_resources(pool, project_id, body.tool_resources)
    if body.thread is not None:
        body.thread.tool_resources = await checked_tool_resources(pool, project_id, body.thread.tool_resources,
                                                                  "thread.tool_resources")
    now = now_seconds()
    async with pool.acquire() as conn:
        assistant = await _load_assistant(conn, project_id, None, body.assistant_id)
        thread = thread_doc(body.thread, now, body.tool_resources)
        thread_id = thread["id"]
        messages = [message_doc(m, thread_id, now) for m in (body.thread.messages if body.thread else None) or ()]
        doc = run_doc(body, assistant, thread_id, now)
        run = Run.model_validate(doc)
        await _check_attached_files(conn, project_id, messages, "thread.messages")
        file_ids = file_search_attachment_ids(messages)
        async with _transaction(conn, bool(file_ids)):
            if file_ids:
                await _attach_thread_files(conn, project_id, thread, file_ids)
            await repo.create_thread_and_run(conn, project_id, thread, messages, doc,
                                             [(EVENTS, _event("thread.created", project_id, thread, thread_id)),
                                              *_message_events(project_id, messages),
                                              *_run_created_events(project_id, doc)])
    return run


async def get_run(pool: asyncpg.Pool, project_id: str, thread_id: str, run_id: str) -> Run:
    """A run, or 404."""
    found = await repo.get_run(pool, project_id, thread_id, run_id)
    if found is None:
        raise await missing_in_thread(pool, project_id, thread_id, "run", run_id)
    return found


async def update_run(pool: asyncpg.Pool, project_id: str, thread_id: str, run_id: str, body: RunUpdate) -> Run:
    """Replace a run's metadata."""
    if "metadata" not in body.model_fields_set:
        return await get_run(pool, project_id, thread_id, run_id)
    found = await repo.set_run_metadata(pool, project_id, thread_id, run_id,
                                        body.metadata or {})
    if found is None:
        raise await missing_in_thread(pool, project_id, thread_id, "run", run_id)
    return found


async def cancel_run(pool: asyncpg.Pool, project_id: str, thread_id: str, run_id: str) -> Run:
    """Move an active run to `cancelling` and ask the orchestrator to stop it, in one transaction."""
    async with pool.acquire() as conn:
        async with conn.transaction():
            doc = await repo.mark_run_cancelling(conn, project_id, thread_id, run_id)
            if doc is not None:
                command = RunCancelRequested(run_id=run_id, thread_id=thread_id).envelope(
                    project_id=project_id, key=thread_id, thread_id=thread_id, run_id=run_id)
                await append_outbox(conn, [
                    (EVENTS, _event("thread.run.cancelling", project_id, doc, thread_id, run_id)),
                    (RUN_COMMANDS, command)])
                return Run.model_validate(doc)
        status = await repo.run_status(conn, project_id, thread_id, run_id)
        if status is None:
            raise await missing_in_thread(conn, project_id, thread_id, "run", run_id)
    raise bad_request(f"Cannot cancel run with status '{status}'.")


async def list_runs(pool: asyncpg.Pool, project_id: str, thread_id: str,
                    page: PageParams) -> tuple[list[Run], bool]:
    """A page of a thread's runs (404 for an unknown thread)."""
    async with pool.acquire() as conn:
        items, has_more = await repo.list_runs(conn, project_id, thread_id, page)
        if not items and not await repo.thread_exists(conn, project_id, thread_id):
            raise not_found("thread", thread_id)
    return items, has_more


# --- run steps --------------------------------------------------------------------------------------------------


def apply_step_include(step: RunStep, include: Sequence[str]) -> RunStep:
    """File search result contents are returned only when `include[]` asks for them, as hosted."""
    if FILE_SEARCH_CONTENT_INCLUDE in include or step.type != "tool_calls":
        return step
    doc = step.model_dump(mode="json", exclude_unset=True)
    changed = False
    for call in doc.get("step_details", {}).get("tool_calls") or ():
        for result in (call.get("file_search") or {}).get("results") or ():
            if "content" in result:
                result.pop("content")
                changed = True
    return RunStep.model_validate(doc) if changed else step


async def get_step(pool: asyncpg.Pool, project_id: str, thread_id: str, run_id: str, step_id: str,
                   include: Sequence[str]) -> RunStep:
    """A run step, or 404."""
    found = await repo.get_step(pool, project_id, thread_id, run_id, step_id)
    if found is None:
        raise await missing_in_thread(pool, project_id, thread_id, "run step", step_id, run_id)
    return apply_step_include(found, include)


async def list_steps(pool: asyncpg.Pool, project_id: str, thread_id: str, run_id: str, page: PageParams,
                     include: Sequence[str]) -> tuple[list[RunStep], bool]:
    """A page of a run's steps (404 for an unknown run)."""
    async with pool.acquire() as conn:
        items, has_more = await repo.list_steps(conn, project_id, thread_id, run_id, page)
        if not items and await repo.run_status(conn, project_id, thread_id, run_id) is None:
            raise await missing_in_thread(conn, project_id, thread_id, "run", run_id)
    return [apply_step_include(s, include) for s in items], has_more
