"""A deterministic OpenAI-compatible chat-completions server: scripted for tests, offline model for make run.

Behaviour is chosen by directives in the LAST user message (a content string or its text parts):

- no directive: reply ``Echo: <last user text, directives removed>``, streamed word by word;
- ``[[reply:TEXT]]``: reply exactly TEXT (may contain spaces; ends at ``]]``);
- ``[[reply_json:"TEXT"]]``: reply exactly the JSON string literal (its escapes decoded, so a reply can hold
  characters a user message cannot, e.g. ``\\u0000``);
- ``[[status:CODE]]``: answer HTTP CODE with an OpenAI error body (500, 429, 400, ...);
- ``[[sleep:SECONDS]]``: wait before answering (timeouts, cancellation);
- ``[[slow:SECONDS]]``: wait between streamed chunks;
- ``[[call:NAME:JSON]]`` (repeatable: parallel calls): if the request offers tools and no ``role: tool``
  message follows the last user message, return these tool calls (ids ``call_<random>``);
- once tool results follow the last user message: reply ``Tool results: `` + their contents joined
  by `` | `` (whatever the directives say), unless ``tool_choice`` forces a call (``"required"``, a named tool): as
  OpenAI does, such a request is answered with the ``[[call]]``s it allows again;
- ``[[tokens:N]]``: reply N words (``word1 word2 ...``; at most MAX_SCRIPTED_WORDS);
- ``[[refusal:TEXT]]``: refuse with TEXT, as Structured Outputs does (``message.refusal``, streamed word by word in
  ``delta.refusal``, content null);
- ``[[finish:REASON]]``: end a text reply with that ``finish_reason`` (e.g. ``content_filter``, a provider's
  filter stopping the answer);
- ``[[unsupported:PARAM]]`` (repeatable): answer 400 ``unsupported_parameter`` naming PARAM when the request sets it,
  as OpenAI's reasoning models do for ``temperature`` and ``top_p``;
- ``[[quirk:NAME]]`` (repeatable): behave as a known OpenAI-compatible server does: ``tool_index_0`` streams each tool
  call whole in one chunk, all at ``index`` 0 (Ollama); ``no_tool_index`` streams tool calls without ``index``;
  ``no_json_object`` refuses ``response_format`` ``json_object`` as LM Studio does (400,
  ``{"error": "'response_format.type' must be ..."}``); ``error_field`` streams a failure as llama.cpp's server
  does, in an ``error:`` field (``error: {"code": 500, "message": ...}``) after a 200; ``no_usage`` streams no usage
  whatever ``stream_options`` asks (LM Studio before it took ``stream_options``); ``no_stream_tools`` refuses a
  streamed request with tools (500 "Cannot use tools with stream", llama.cpp's server before it streamed tool calls);
  ``no_required`` refuses ``tool_choice`` ``"required"`` as vLLM did before 0.8.3 (400, "... must either be a named
  tool, 'auto', or 'none'"); ``no_image_urls`` takes images as Ollama's /v1 does, only as data URLs of JPEG, PNG or
  WebP: an http(s) ``image_url`` is refused with its 400 (OLLAMA_IMAGE_URLS_REFUSED), any other with "invalid image
  input"; ``no_tool_choice`` ignores ``tool_choice`` as Ollama's /v1 does, with a small model that makes no call it is
  forced to make until told in words: unless the request's last message is a system message, the ``[[call]]``s
  ``tool_choice`` forces are not made (all of them for ``"required"``, those to the named tool for a named one), only
  the others (a call to another tool than the named one), and with none left it replies with text as if there were
  no ``[[call]]``; after a system message every ``[[call]]`` is made, whatever ``tool_choice`` names (with no
  ``[[call]]`` at all it answers with text even then);
- ``[[ignore:PARAM]]`` (repeatable): answer as if the request did not set PARAM, as Ollama does with
  ``max_completion_tokens``;
- ``[[forbid:PARAM]]`` (repeatable): refuse a request that sets PARAM as vLLM refused fields it did not know (400, its
  pydantic ``extra_forbidden`` error as the message);
- ``[[context:N:SERVER]]``: refuse a prompt of more than N tokens (usage's count, below) as SERVER does a prompt
  longer than its model's context (400): ``vllm`` ("This model's maximum context length is N tokens. However, your
  request has P input tokens. ..."), ``openai`` (the same numbers in OpenAI's words, code
  ``context_length_exceeded``), ``llamacpp`` ("request (P tokens) exceeds the available context size (N tokens),
  ..." with ``n_ctx`` and ``n_prompt_tokens`` fields); ``vllm`` also refuses a ``max_completion_tokens`` /
  ``max_tokens`` larger than the room the prompt leaves ("'max_tokens' or 'max_completion_tokens' is too large").

Every reply honours ``max_completion_tokens`` / ``max_tokens``: longer replies (tool calls too, mid-arguments)
are cut to that many words with ``finish_reason: "length"``. Usage counts whitespace-separated words: prompt =
words of all message contents and tool-call arguments; completion = words of the reply (or of the tool calls'
names and arguments). ``stream_options.include_usage`` adds the usage chunk when streaming.

Offline mode (``auto_tools=True``, what ``make run`` starts when no THREADLINE_MODEL_BASE_URL is set; a request
with ``[[mode:offline]]`` is answered so too): additionally, when tools are offered, no
``call``/``reply``/``refusal``/``tokens`` directive is given and no tool result follows the last user message, it
calls the FIRST offered tool with deterministic arguments, and unless ``parallel_tool_calls`` is false, in parallel,
every other function a word of whose name the message mentions (the docs' weather bot, asked of the weather and
"the likelihood it'll rain", calls get_current_temperature and get_rain_probability). ``code_interpreter`` gets
``{"code": "print('hello from the offline model')"}``, unless the user asks for a chart (chart, plot, graph, ...):
then code that plots the first CSV input file the run's system message names (else a sample series) and shows it
(an ``image_file`` in the reply), or to save, export or download: then code that writes a summary CSV to /mnt/data
and prints a ``sandbox:`` link to it (a ``file_path`` annotation in the reply), as hosted answers to such requests
had, or with an equation in backticks (the docs' math tutor): code that solves it with sympy (``offline_code``).
Other functions get their required JSON-schema properties filled with simple values (strings: the user's text).
After the tool results it replies with the ``Tool results: ...`` summary, where each file_search result is one line
of at most BRIEF_SOURCE_CHARS, its source marker first (``brief_sources``: the answer cites every result, not pages).
A request whose ``response_format`` asks JSON is answered with JSON (``json_answer``): an object its ``json_schema``
allows, ``{"answer": ...}`` in JSON mode, the echo or the summary in its strings.

Every request body is appended to ``server.requests``, refused ones too (tests inspect what the platform sent).

``GET /v1/models`` lists ``server.model_ids`` (MODELS unless a test changes it); ``server.models_status`` set to an
HTTP status makes it answer that status instead (an OpenAI error body; 404 as a server without the route).
``GET /v1/models/{id}`` answers any id.
"""

import asyncio
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

MODELS = ("gpt-4-turbo", "gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "threadline-scripted")
"""Model ids listed by GET /v1/models (any model name is accepted by chat completions)."""

OFFLINE_CODE = "print('hello from the offline model')"
_CHART_WORDS = re.compile(r"\b(?:chart|plot|graph|visuali[sz]|diagram|histogram)", re.IGNORECASE)
_SAVE_WORDS = re.compile(r"\b(?:download|save|export)", re.IGNORECASE)
_SOURCE_MARKER = re.compile(r"【\d+:\d+†[^】]*】")
"""A file_search result's source marker in the tool output (threadline_search.citations.render_for_model)."""
BRIEF_SOURCE_CHARS = 200
"""What the offline model quotes of each file_search result: a whole chunk each made answers of pages."""
_NAME_WORD = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+")
"""A word of a function's name (snake_case, camelCase)."""
_GENERIC_NAME_WORDS = frozenset({"get", "set", "fetch", "list", "find", "create", "update", "delete", "current",
                                 "info", "data", "tool", "function", "for", "the", "and"})
"""Words of function names that say nothing of what a message asks for."""
_EQUATION = re.compile(r"`([^`=]+=[^`=]+)`")
"""An equation in backticks, as the docs' math tutor is asked (`3x + 11 = 14`)."""
_CODE_FILE_LINE = re.compile(r"^- (/mnt/data/.+?)(?: \(uploaded as .*\))?$", re.MULTILINE)
"""A file of the run's note on code_interpreter's input files (run_orchestrator.prompt.code_files_note)."""
MAX_SCRIPTED_WORDS = 100_000
"""`[[tokens:N]]` replies at most this many words: `make run` hosts the offline model in its supervisor process,
which a reply of 10^20 words would take down (it did: out of memory)."""

_DIRECTIVE_START = re.compile(
    r"\[\[(reply_json|reply|refusal|finish|unsupported|quirk|ignore|forbid|context|status|sleep|slow|call|tokens|mode):")
_WORD = re.compile(r"\s*\S+\s*|\s+")
OLLAMA_IMAGE_URLS_REFUSED = "image URLs are not currently supported, please use base64 encoded data instead"
"""Ollama's /v1 message for an `image_url` holding an http(s) URL (400, an OpenAI error body)."""
OLLAMA_IMAGE_PREFIXES = ("data:image/jpeg;base64,", "data:image/jpg;base64,", "data:image/png;base64,",
                         "data:image/webp;base64,", "data:;base64,")
"""The data URLs Ollama's /v1 takes an image from (its decodeImageURL)."""
_STATUS_TEXT = {
    400: ("invalid_request_error", "scripted bad request"),
    401: ("invalid_request_error", "scripted invalid api key"),
    404: ("invalid_request_error", "scripted model not found"),
    429: ("rate_limit_exceeded", "scripted rate limit"),
}


@dataclass
class Directives:
    """What the last user message asks the scripted model to do."""

    text: str = ""
    reply: str | None = None
    status: int | None = None
    sleep: float = 0.0
    slow: float = 0.0
    calls: list[tuple[str, str]] = field(default_factory=list)
    tokens: int | None = None
    refusal: str | None = None
    finish: str | None = None
    unsupported: list[str] = field(default_factory=list)
    quirks: set[str] = field(default_factory=set)
    ignored: set[str] = field(default_factory=set)
    forbidden: set[str] = field(default_factory=set)
    context: tuple[int, str] | None = None
    """The context length a prompt must fit, and the server whose refusal to imitate."""
    offline: bool = False
    """Answer as the offline model does (`[[mode:offline]]`), whatever the server's mode."""


def parse_directives(text: str) -> Directives:
    """Extract the ``[[name:value]]`` directives; `text` keeps everything else (whitespace collapsed)."""
    found = Directives()
    kept: list[str] = []
    pos = 0
    while True:
        match = _DIRECTIVE_START.search(text, pos)
        if not match:
            kept.append(text[pos:])
            break
        end = _apply_directive(found, match.group(1), text, match.end())
        if end is None:  # malformed: keep it as plain text
            kept.append(text[pos:match.end()])
            pos = match.end()
            continue
        kept.append(text[pos:match.start()])
        pos = end
    found.text = " ".join("".join(kept).split())
    return found


def _apply_directive(found: Directives, name: str, text: str, start: int) -> int | None:
    """Record one directive whose value starts at `start`; return the index after its ``]]``."""
    if name == "call":
        colon = text.find(":", start)
        if colon < 0:
            return None
        tool = text[start:colon].strip()
        rest = len(text[colon + 1:]) - len(text[colon + 1:].lstrip())
        try:
            value, end = json.JSONDecoder().raw_decode(text, colon + 1 + rest)
        except json.JSONDecodeError:
            return None
        close = text.find("]]", end)
        if close < 0 or text[end:close].strip() or not tool:
            return None
        found.calls.append((tool, json.dumps(value)))
        return close + 2
    if name == "reply_json":
        blank = len(text[start:]) - len(text[start:].lstrip())
        try:
            value, end = json.JSONDecoder().raw_decode(text, start + blank)
        except json.JSONDecodeError:
            return None
        close = text.find("]]", end)
        if close < 0 or text[end:close].strip() or not isinstance(value, str):
            return None
        found.reply = value
        return close + 2
    close = text.find("]]", start)
    if close < 0:
        return None
    value = text[start:close]
    try:
        if name == "reply":
            found.reply = value
        elif name == "refusal":
            found.refusal = value
        elif name == "finish":
            found.finish = value
        elif name == "unsupported":
            found.unsupported.append(value)
        elif name == "quirk":
            found.quirks.add(value)
        elif name == "ignore":
            found.ignored.add(value)
        elif name == "forbid":
            found.forbidden.add(value)
        elif name == "context":
            length, _, server = value.partition(":")
            if server not in CONTEXT_REFUSALS:
                return None
            found.context = (int(length), server)
        elif name == "mode":
            if value != "offline":
                return None
            found.offline = True
        elif name == "status":
            found.status = int(value)
        elif name == "sleep":
            found.sleep = float(value)
        elif name == "slow":
            found.slow = float(value)
        elif name == "tokens":
            found.tokens = int(value)
    except ValueError:
        return None
    return close + 2


def content_text(content: Any) -> str:
    """The text of a message content: a string or a list of parts (text parts joined by newlines)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text"]
        return "\n".join(texts)
    return ""


def _words(text: str) -> int:
    return len(text.split())


def _prompt_tokens(messages: list[dict[str, Any]]) -> int:
    total = 0
    for message in messages:
        total += _words(content_text(message.get("content")))
        for call in message.get("tool_calls") or []:
            total += _words(str((call.get("function") or {}).get("arguments", "")))
    return total


def sample_arguments(schema: dict[str, Any], text: str) -> Any:
    """Deterministic, schema-valid-enough arguments: required properties with simple values."""
    if schema.get("enum"):
        return schema["enum"][0]
    if "default" in schema:
        return schema["default"]
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        props = schema.get("properties") or {}
        return {name: sample_arguments(props.get(name) or {}, text) for name in schema.get("required") or []}
    if kind == "array":
        return []
    if kind == "integer":
        return 1
    if kind == "number":
        return 1.0
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return text[:200] or "offline"


@dataclass
class Plan:
    """The answer decided for one request."""

    text: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str = "stop"
    completion_tokens: int = 0
    refusal: str | None = None


class ScriptedModelServer:
    """The model server on a loopback port, served by uvicorn in a background thread."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, auto_tools: bool = False) -> None:
        self.host = host
        self.auto_tools = auto_tools
        self.requests: list[dict[str, Any]] = []
        self.model_ids: list[str] = list(MODELS)
        """What GET /v1/models lists (tests may change it)."""
        self.model_context: dict[str, int] = {}
        """`max_model_len` GET /v1/models gives these models, as vLLM lists each model's context length."""
        self.models_status: int | None = None
        """An HTTP status GET /v1/models answers instead of the list (tests: a failing or older server)."""
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.port = int(self._sock.getsockname()[1])
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    api_key = "sk-scripted-model"
    """Any key is accepted; this one is handed to the services."""

    @property
    def base_url(self) -> str:
        """The value for THREADLINE_MODEL_BASE_URL / openai's base_url."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def description(self) -> str:
        """One line for humans."""
        kind = "offline model server (deterministic replies)" if self.auto_tools else "scripted model server"
        return f"{kind} at {self.base_url}"

    def find_requests(self, marker: str) -> list[dict[str, Any]]:
        """Requests whose messages contain `marker` anywhere (tests use a unique marker per test)."""
        return [r for r in list(self.requests) if marker in json.dumps(r.get("messages", []))]

    def app(self) -> Starlette:
        """The ASGI app (chat completions, models, health)."""
        return Starlette(routes=[
            Route("/v1/chat/completions", self._chat, methods=["POST"]),
            Route("/chat/completions", self._chat, methods=["POST"]),
            Route("/v1/models", self._models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", self._model, methods=["GET"]),
            Route("/healthz", self._health, methods=["GET"]),
        ])

    def start(self, timeout: float = 10.0) -> None:
        """Serve in a daemon thread; return once accepting requests."""
        if self._thread is not None:
            return
        config = uvicorn.Config(self.app(), log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=1, timeout_keep_alive=30)
        self._server = uvicorn.Server(config)
        self._sock.listen(2048)
        server, sock = self._server, self._sock
        self._thread = threading.Thread(target=lambda: server.run(sockets=[sock]), name="model-server",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("model server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        """Stop serving (open streams are cut after a second)."""
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(10)
        self._thread = None
        self._server = None
        self._sock.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    async def _health(self, _: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def _models(self, _: Request) -> Response:
        status = self.models_status
        if status is not None:
            return _error(status, "server_error" if status >= 500 else "invalid_request_error",
                          f"scripted GET /v1/models failure ({status})")
        return JSONResponse({"object": "list", "data": [
            {**_model_doc(m), **({"max_model_len": self.model_context[m]} if m in self.model_context else {})}
            for m in list(self.model_ids)]})

    async def _model(self, request: Request) -> Response:
        return JSONResponse(_model_doc(request.path_params["model_id"]))

    async def _chat(self, request: Request) -> Response:
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            return _error(400, "invalid_request_error", "request body is not valid JSON")
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return _error(400, "invalid_request_error", "'messages' is required", param="messages")
        self.requests.append(body)
        messages: list[dict[str, Any]] = [m for m in body["messages"] if isinstance(m, dict)]
        last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
        directives = parse_directives(content_text(messages[last_user].get("content")) if last_user >= 0 else "")
        if directives.sleep > 0 and not await _sleep_while_connected(request, directives.sleep):
            return Response(status_code=499)
        unsupported = next((name for name in directives.unsupported if name in body), None)
        if unsupported is not None:
            return _error(400, "invalid_request_error",
                          f"Unsupported parameter: '{unsupported}' is not supported with this model.",
                          param=unsupported, code="unsupported_parameter")
        forbidden = sorted(name for name in directives.forbidden if name in body)
        if forbidden:
            errors = [{"type": "extra_forbidden", "loc": ("body", name), "msg": "Extra inputs are not permitted",
                       "input": body[name]} for name in forbidden]
            return _vllm_error(str(errors))
        too_long = _context_refusal(directives.context, messages, body) if directives.context is not None else None
        if too_long is not None:
            return too_long
        if directives.status is not None and 400 <= directives.status <= 599:
            kind, message = _STATUS_TEXT.get(directives.status, ("server_error", "scripted server error"))
            return _error(directives.status, kind, message)
        if "no_json_object" in directives.quirks and (body.get("response_format") or {}).get("type") == "json_object":
            return JSONResponse({"error": "'response_format.type' must be 'json_schema' or 'text'"}, status_code=400)
        if "no_required" in directives.quirks and body.get("tool_choice") == "required":
            return _vllm_error("tool_choice must either be a named tool, 'auto', or 'none'.")
        if "no_image_urls" in directives.quirks:
            refusal = _ollama_image_refusal(messages)
            if refusal is not None:
                return _error(400, "invalid_request_error", refusal)
        if "no_stream_tools" in directives.quirks and body.get("stream") and body.get("tools"):
            return _error(500, "server_error", "Cannot use tools with stream")
        if "error_field" in directives.quirks:
            return Response(b'error: {"code": 500, "message": "scripted error event", "type": "server_error"}\n\n',
                            media_type="text/event-stream")
        body = {key: value for key, value in body.items() if key not in directives.ignored}
        if "no_tool_choice" in directives.quirks:
            directives.calls = _calls_made_ignoring_tool_choice(directives.calls, body, messages)
            body = {key: value for key, value in body.items() if key != "tool_choice"}
        plan = self._plan(body, messages[last_user + 1:] if last_user >= 0 else messages, directives)
        model = str(body.get("model") or "threadline-scripted")
        usage = {"prompt_tokens": _prompt_tokens(messages), "completion_tokens": plan.completion_tokens}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if body.get("stream"):
            include_usage = (bool((body.get("stream_options") or {}).get("include_usage"))
                             and "no_usage" not in directives.quirks)
            pieces, ending = _sse_events(plan, completion_id, model, usage if include_usage else None,
                                         directives.quirks)
            if directives.slow <= 0:  # nothing to pace: one body, the same bytes at a fraction of the cost
                return Response(b"".join(pieces + ending), media_type="text/event-stream",
                                headers={"cache-control": "no-cache"})
            return StreamingResponse(_paced(pieces, ending, directives.slow), media_type="text/event-stream",
                                     headers={"cache-control": "no-cache"})
        reply: dict[str, Any] = {"role": "assistant", "content": plan.text, "refusal": plan.refusal}
        if plan.tool_calls:
            reply["tool_calls"] = plan.tool_calls
        return Response(_json_bytes({
            "id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": reply, "logprobs": None, "finish_reason": plan.finish_reason}],
            "usage": usage,
        }), media_type="application/json")

    def _plan(self, body: dict[str, Any], after_user: list[dict[str, Any]], directives: Directives) -> Plan:
        plan = self._planned(body, after_user, directives)
        if directives.finish and plan.text is not None and plan.finish_reason == "stop":
            plan.finish_reason = directives.finish
        return plan

    def _planned(self, body: dict[str, Any], after_user: list[dict[str, Any]], directives: Directives) -> Plan:
        tools = _callable_tools(body)
        tool_results = [content_text(m.get("content")) for m in after_user if m.get("role") == "tool"]
        choice = body.get("tool_choice")
        named = isinstance(choice, dict)  # a named tool: calls to others are not made
        calls = [call for call in directives.calls if tools and (not named or call[0] == _tool_name(tools[0]))]
        # a forced tool_choice is a call whatever came before, as OpenAI makes it: tool results do not end the calls
        offline = self.auto_tools or directives.offline
        if tool_results and not (calls and (named or choice == "required")):
            if offline:
                tool_results = [brief_sources(result) for result in tool_results]
            summary = "Tool results: " + " | ".join(tool_results)
            return _text_plan(json_answer(body, summary) if offline else summary, body)
        if calls:  # one only when parallel_tool_calls is false
            return _calls_plan(calls[:1] if body.get("parallel_tool_calls") is False else calls, body)
        if directives.refusal is not None:
            return Plan(refusal=directives.refusal, completion_tokens=_words(directives.refusal))
        if (offline and tools and directives.reply is None and directives.tokens is None
                and not directives.calls):
            called = tools[:1] if body.get("parallel_tool_calls") is False else [
                tools[0], *(tool for tool in tools[1:] if _mentioned(tool, directives.text))]
            return _calls_plan([_auto_call(tool, directives.text, code_files(body)) for tool in called], body)
        if directives.reply is not None:
            return _text_plan(directives.reply, body)
        if directives.tokens is not None:
            count = min(directives.tokens, MAX_SCRIPTED_WORDS)
            return _text_plan(" ".join(f"word{i}" for i in range(1, count + 1)), body)
        echo = f"Echo: {directives.text}"
        return _text_plan(json_answer(body, echo) if offline else echo, body)


def _calls_made_ignoring_tool_choice(calls: list[tuple[str, str]], body: dict[str, Any],
                                     messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The `[[call]]`s of a model that takes no `tool_choice` and makes the calls it forces only when a system message
    ending the request tells it to (quirk ``no_tool_choice``)."""
    if messages and messages[-1].get("role") == "system":
        return calls
    choice = body.get("tool_choice")
    if choice == "required":
        return []
    if isinstance(choice, dict):
        return [call for call in calls if call[0] != (choice.get("function") or {}).get("name")]
    return calls


def _tool_name(tool: dict[str, Any]) -> str:
    """The name a call to `tool` carries (a function's name; the type of a tool offered without one)."""
    return str((tool.get("function") or {}).get("name") or tool.get("type") or "tool")


def _callable_tools(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The tools `tool_choice` lets the model call, as chat completions has it: none of them for "none",
    only the named one for a named function."""
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict)]
    choice = body.get("tool_choice")
    if choice == "none":
        return []
    if isinstance(choice, dict):
        named = (choice.get("function") or {}).get("name")
        return [t for t in tools if _tool_name(t) == named]
    return tools


def _mentioned(tool: dict[str, Any], text: str) -> bool:
    """A function (not code_interpreter or file_search) a word of whose name `text` mentions (`get_rain_probability`:
    "rain"), which the offline model calls beside the first tool, as a model asked two things calls two functions."""
    name = _tool_name(tool)
    if name in ("code_interpreter", "file_search"):
        return False
    words = {word.lower() for word in _NAME_WORD.findall(name)} - _GENERIC_NAME_WORDS
    return any(re.search(rf"\b{re.escape(word)}", text, re.IGNORECASE) for word in words if len(word) >= 3)


def _auto_call(tool: dict[str, Any], text: str, files: list[str]) -> tuple[str, str]:
    """The deterministic call the offline model makes to the first offered tool."""
    function = tool.get("function") or {}
    name = _tool_name(tool)
    if name == "code_interpreter":
        return name, json.dumps({"code": offline_code(text, files)})
    schema = function.get("parameters") or {"type": "object", "properties": {}}
    args = sample_arguments(schema, text)
    return name, json.dumps(args if isinstance(args, dict) else {})


def json_answer(body: dict[str, Any], text: str) -> str:
    """`text` as the offline model answers it when the request asks JSON (`response_format`): an object its
    `json_schema` allows (`sample_arguments`; strings hold `text`), `{"answer": text}` in JSON mode; else `text`."""
    response_format = body.get("response_format")
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "json_object":
        return json.dumps({"answer": text})
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema") if isinstance(response_format, dict) else None
        return json.dumps(sample_arguments(schema if isinstance(schema, dict) else {"type": "object"}, text))
    return text


def brief_sources(result: str) -> str:
    """A file_search output as the offline model quotes it: each result (its source marker, which the answer cites,
    then its file name and text) on a line, cut to BRIEF_SOURCE_CHARS; any other tool output as it is."""
    starts = [match.start() for match in _SOURCE_MARKER.finditer(result)]
    if not starts or result[:starts[0]].strip():
        return result
    lines = [" ".join(result[start:end].split()) for start, end in zip(starts, [*starts[1:], len(result)], strict=True)]
    return "\n".join(line if len(line) <= BRIEF_SOURCE_CHARS else line[:BRIEF_SOURCE_CHARS].rstrip() + "..."
                     for line in lines)


def code_files(body: dict[str, Any]) -> list[str]:
    """The paths of code_interpreter's input files, as the run's system message names them to the model."""
    paths: list[str] = []
    for message in body.get("messages") or []:
        if isinstance(message, dict) and message.get("role") in ("system", "developer"):
            paths += _CODE_FILE_LINE.findall(content_text(message.get("content")))
    return paths


def offline_code(text: str, files: list[str]) -> str:
    """The code the offline model runs: a chart asked for is plotted (from the first CSV input file, else a sample
    series) and shown, a file asked to be saved or exported is written and linked, as hosted answers made them
    (an image in the reply, a `file_path` annotation); an equation in backticks is solved; anything else prints a
    greeting."""
    chart, save = bool(_CHART_WORDS.search(text)), bool(_SAVE_WORDS.search(text))
    equation = _EQUATION.search(text)
    if not (chart or save):
        return OFFLINE_CODE if equation is None else _equation_code(equation.group(1).strip())
    csv = next((path for path in files if path.lower().endswith(".csv")), None)
    name = csv.rsplit("/", 1)[-1] if csv else "sample data"
    lines = [*(["import matplotlib.pyplot as plt"] if chart else []), "import pandas as pd", "",
             f"df = pd.read_csv({csv!r})" if csv else
             "df = pd.DataFrame({'x': range(1, 11), 'x squared': [n * n for n in range(1, 11)]})"]
    if chart:
        lines += ["x = df.columns[0] if len(df.columns) > 1 else None",
                  "y = [c for c in df.select_dtypes('number').columns if c != x]",
                  "if y:",
                  f"    df.plot(x=x, y=y, marker='o', title={name!r})",
                  "else:",
                  f"    df[df.columns[0]].value_counts().plot(kind='bar', title={name!r})",
                  "plt.show()",
                  f"print('Plotted', ', '.join(map(str, y)) or df.columns[0], 'from', {name!r})"]
    if save:
        out = re.sub(r"[^\w.-]", "_", name[:-4] if csv and len(name) > 4 else "data") + "_summary.csv"
        lines += [f"df.describe(include='all').to_csv('/mnt/data/{out}')",
                  f"print('[Download {out}](sandbox:/mnt/data/{out})')"]
    return "\n".join(lines) + "\n"


def _equation_code(equation: str) -> str:
    """Code that solves `equation` with sympy (`3x` read as `3*x`, `^` as a power), as a math tutor's would."""
    return "\n".join([
        "from sympy import Eq, solve",
        "from sympy.parsing.sympy_parser import (convert_xor, implicit_multiplication_application, parse_expr,",
        "                                        standard_transformations)",
        "",
        "transformations = standard_transformations + (implicit_multiplication_application, convert_xor)",
        f"left, right = (parse_expr(side, transformations=transformations) for side in {equation!r}.split('='))",
        "solutions = solve(Eq(left, right), dict=True)",
        f"print({equation + ':'!r}, '; '.join(', '.join(f'{{k}} = {{v}}' for k, v in s.items()) for s in solutions)"
        " or 'no solution')",
    ]) + "\n"


def _text_plan(text: str, body: dict[str, Any]) -> Plan:
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if isinstance(limit, int) and limit > 0 and _words(text) > limit:
        words = _WORD.findall(text)
        return Plan(text="".join(words[:limit]).rstrip(), finish_reason="length", completion_tokens=limit)
    return Plan(text=text, completion_tokens=_words(text))


def _calls_plan(calls: list[tuple[str, str]], body: dict[str, Any]) -> Plan:
    """The calls, cut off mid-arguments (finish_reason "length") where they hold more words than the limit."""
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    left = limit if isinstance(limit, int) and limit > 0 else None
    written: list[tuple[str, str]] = []
    for name, arguments in calls:
        if left is not None and _words(name) + _words(arguments) > left:
            cut = "".join(_WORD.findall(arguments)[:max(left - _words(name), 0)]).rstrip()
            return _tool_calls_plan([*written, (name, cut)], "length", int(limit or 0))
        written.append((name, arguments))
        left = None if left is None else left - _words(name) - _words(arguments)
    return _tool_calls_plan(written, "tool_calls", sum(_words(name) + _words(arguments) for name, arguments in calls))


def _tool_calls_plan(calls: list[tuple[str, str]], finish_reason: str, tokens: int) -> Plan:
    tool_calls = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                   "function": {"name": name, "arguments": arguments}} for name, arguments in calls]
    return Plan(text=None, tool_calls=tool_calls, finish_reason=finish_reason, completion_tokens=tokens)


async def _sleep_while_connected(request: Request, seconds: float) -> bool:
    """Sleep; stop early (False) when the client hangs up, so abandoned requests do not linger."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        await asyncio.sleep(min(left, 0.05))
        if await request.is_disconnected():
            return False
    return True


def _ollama_image_refusal(messages: list[dict[str, Any]]) -> str | None:
    """What Ollama's /v1 answers (400) to the messages' images, or None when it takes them all."""
    for message in messages:
        content = message.get("content")
        for part in content if isinstance(content, list) else ():
            if not isinstance(part, dict) or part.get("type") != "image_url":
                continue
            url = str((part.get("image_url") or {}).get("url") or "")
            if url.startswith(("http://", "https://")):
                return OLLAMA_IMAGE_URLS_REFUSED
            if not url.startswith(OLLAMA_IMAGE_PREFIXES):
                return "invalid image input"
    return None


def _model_doc(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 1_700_000_000, "owned_by": "threadline"}


def _error(status: int, kind: str, message: str, param: str | None = None, code: str | None = None) -> Response:
    headers = {"retry-after-ms": "10"} if status == 429 else None
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _vllm_error(message: str) -> Response:
    """A 400 in vLLM's error body (`object: error`, its exception's name as the type)."""
    return JSONResponse({"object": "error", "type": "BadRequestError", "param": None, "code": 400, "message": message},
                        status_code=400)


def _vllm_too_long(context: int, prompt: int) -> Response:
    return _vllm_error(f"This model's maximum context length is {context} tokens. However, your request has {prompt}"
                       " input tokens. Please reduce the length of the input messages.")


def _openai_too_long(context: int, prompt: int) -> Response:
    return _error(400, "invalid_request_error", (
        f"This model's maximum context length is {context} tokens. However, your messages resulted in {prompt}"
        " tokens. Please reduce the length of the messages."), param="messages", code="context_length_exceeded")


def _llamacpp_too_long(context: int, prompt: int) -> Response:
    return JSONResponse({"error": {
        "code": 400, "type": "exceed_context_size_error", "n_prompt_tokens": prompt, "n_ctx": context,
        "message": (f"request ({prompt} tokens) exceeds the available context size ({context} tokens),"
                    " try increasing it"),
    }}, status_code=400)


CONTEXT_REFUSALS = {"vllm": _vllm_too_long, "openai": _openai_too_long, "llamacpp": _llamacpp_too_long}
"""How each server refuses a prompt longer than its model's context (`[[context:N:SERVER]]`)."""


def _context_refusal(context: tuple[int, str], messages: list[dict[str, Any]], body: dict[str, Any]
                     ) -> Response | None:
    """The refusal of a request that does not fit the context (`[[context:N:SERVER]]`); vLLM also refuses a token
    limit larger than the room the prompt leaves."""
    length, server = context
    prompt = _prompt_tokens(messages)
    if prompt > length:
        return CONTEXT_REFUSALS[server](length, prompt)
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if server == "vllm" and isinstance(limit, int) and prompt + limit > length:
        return _vllm_error(f"'max_tokens' or 'max_completion_tokens' is too large: {limit}. This model's maximum"
                           f" context length is {length} tokens and your request has {prompt} input tokens ({limit} >"
                           f" {length} - {prompt}).")
    return None


def _json_bytes(doc: dict[str, Any]) -> bytes:
    """JSON of a reply; a lone surrogate (a `reply_json` with a broken escape, as models sometimes send) is escaped."""
    try:
        return orjson.dumps(doc)
    except TypeError:
        return json.dumps(doc).encode()


def _sse_events(plan: Plan, completion_id: str, model: str, usage: dict[str, int] | None,
                quirks: set[str]) -> tuple[list[bytes], list[bytes]]:
    """Server-sent events in the OpenAI chunk format (or a known server's variant of it, `quirks`): the content
    pieces, then the finish, usage and [DONE]."""
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        doc = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
               "system_fingerprint": None,
               "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        return b"data: " + _json_bytes(doc) + b"\n\n"

    pieces: list[bytes] = []
    if plan.tool_calls:
        pieces.append(chunk({"role": "assistant", "content": None}))
        for index, call in enumerate(plan.tool_calls):
            function = call["function"]
            if "tool_index_0" in quirks:
                pieces.append(chunk({"tool_calls": [{"index": 0, **call}]}))
                continue
            numbered = {} if "no_tool_index" in quirks else {"index": index}
            pieces.append(chunk({"tool_calls": [{**numbered, "id": call["id"], "type": "function",
                                                 "function": {"name": function["name"], "arguments": ""}}]}))
            arguments = function["arguments"]
            for start in range(0, len(arguments), 16):
                pieces.append(chunk({"tool_calls": [{**numbered,
                                                     "function": {"arguments": arguments[start:start + 16]}}]}))
    elif plan.refusal is not None:
        pieces.append(chunk({"role": "assistant", "content": None, "refusal": ""}))
        pieces.extend(chunk({"refusal": word}) for word in _WORD.findall(plan.refusal))
    else:
        pieces.append(chunk({"role": "assistant", "content": ""}))
        pieces.extend(chunk({"content": word}) for word in _WORD.findall(plan.text or ""))
    ending = [chunk({}, plan.finish_reason)]
    if usage is not None:
        doc = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
               "system_fingerprint": None, "choices": [], "usage": usage}
        ending.append(b"data: " + _json_bytes(doc) + b"\n\n")
    ending.append(b"data: [DONE]\n\n")
    return pieces, ending


async def _paced(pieces: list[bytes], ending: list[bytes], slow: float) -> AsyncIterator[bytes]:
    """The content pieces `slow` seconds apart, then the ending right after the last one."""
    for i, piece in enumerate(pieces):
        if i > 0:
            await asyncio.sleep(slow)
        yield piece
    for piece in ending:
        yield piece
