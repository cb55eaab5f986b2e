"""Streaming chat completions from the configured OpenAI-compatible endpoint, with retries."""

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx2
import openai
import orjson

from run_orchestrator.images import ImageFetchError
from run_orchestrator.prompt import estimate_tokens, part_values
from run_orchestrator.tools import ModelToolCall
from threadline_core.db import storable_text
from threadline_core.ids import new_id

_log = logging.getLogger(__name__)

TextSink = Callable[[str], Awaitable[None]]
ImageFetcher = Callable[[str], Awaitable[str]]
WorkaroundSink = Callable[[str], None]
"""Told each time a model server's shortcoming is worked around (the ADAPTATIONS name, LINKED_IMAGES)."""
"""The data URL of the image at an http(s) URL (`images.LinkedImages.data_url`); ImageFetchError when it cannot be."""
MAX_ERROR_CHARS = 2000
"""A failed model call's message is cut to this in the run's `last_error` (the run's events must keep fitting)."""


DEFAULT_VALUES: dict[str, object] = {"temperature": 1.0, "top_p": 1.0, "parallel_tool_calls": True}
"""Request parameters a run always sends (its assistant's defaults) that some models refuse to be sent at all:
OpenAI's reasoning models answer 400 `unsupported_parameter` to `temperature` and `top_p`, even at 1. Hosted runs
on them worked; a refused parameter holding this value is left out and the call made again."""


NO_STREAMED_TOOLS = "Cannot use tools with stream"
"""llama.cpp's server before it streamed tool calls refused a streamed request with tools, in these words."""
JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "json_schema", "json_schema": {"name": "json_object",
                                                                         "schema": {"type": "object"}}}
"""JSON mode said as Structured Outputs (any object), for servers that take only `json_schema` (LM Studio)."""


def _json_mode(request: dict[str, Any]) -> bool:
    """The request asks JSON mode (`response_format` `json_object`)."""
    response_format = request.get("response_format")
    return isinstance(response_format, dict) and response_format.get("type") == "json_object"


def _unstreamed(request: dict[str, Any]) -> dict[str, Any]:
    """The request asking for its answer whole (no `stream`, no `stream_options`)."""
    return {key: value for key, value in request.items() if key not in ("stream", "stream_options")}


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class ThinkingFilter:
    """The answer without the reasoning a model wrote inline before it (`<think>...</think>` opening the content:
    DeepSeek-R1 or Qwen3 on Ollama, LM Studio, vLLM without a reasoning parser): hosted reasoning models never showed
    their thinking in a message. Text is held while it may still open such a block; thinking cut short by the
    token limit leaves no answer."""

    def __init__(self) -> None:
        self._state = "start"  # start -> answer, or start -> thinking -> after -> answer
        self._held = ""

    def feed(self, text: str) -> str:
        """What of `text` (the next piece of the content) is answer."""
        if self._state == "answer":
            return text
        self._held += text
        if self._state == "start":
            opening = self._held.lstrip()
            if len(opening) < len(THINK_OPEN) and THINK_OPEN.startswith(opening):
                return ""  # nothing yet, or the start of the tag
            if not opening.startswith(THINK_OPEN):
                return self._answer(self._held)
            self._state, self._held = "thinking", opening[len(THINK_OPEN):]
        if self._state == "thinking":
            end = self._held.find(THINK_CLOSE)
            if end < 0:
                self._held = self._held[-len(THINK_CLOSE):]  # enough to find the closing tag split over pieces
                return ""
            self._state, self._held = "after", self._held[end + len(THINK_CLOSE):]
        answer = self._held.lstrip()  # "after": the blank lines between the thinking and the answer
        self._held = ""
        return self._answer(answer) if answer else ""

    def end(self) -> str:
        """The answer still held when the content ends (a start that only looked like the tag)."""
        held, self._held = (self._held if self._state == "start" else ""), ""
        return held

    def _answer(self, text: str) -> str:
        self._state, self._held = "answer", ""
        return text


@dataclass(frozen=True)
class Adaptation:
    """How to ask a server again that refused (or ignored) what a request holds: `applies` to a request that holds it,
    `adapt` returns the request in the form the server takes (to which it no longer applies)."""

    applies: Callable[[dict[str, Any]], bool]
    adapt: Callable[[dict[str, Any]], dict[str, Any]]


def _left_out(name: str) -> Adaptation:
    """A DEFAULT_VALUES parameter left out when it holds its default (a value the user set stays, and fails)."""
    return Adaptation(lambda request: request.get(name) == DEFAULT_VALUES[name],
                      lambda request: {key: value for key, value in request.items() if key != name})


ADAPTATIONS: dict[str, Adaptation] = {
    **{name: _left_out(name) for name in DEFAULT_VALUES},
    # Ollama ignores max_completion_tokens (`_check_limit`), vLLM 0.5.x refused it: the older max_tokens.
    "max_completion_tokens": Adaptation(
        lambda request: "max_completion_tokens" in request,
        lambda request: {**{k: v for k, v in request.items() if k != "max_completion_tokens"},
                         "max_tokens": request["max_completion_tokens"]}),
    # LM Studio takes no json_object: JSON mode as a schema of any object.
    "response_format": Adaptation(_json_mode, lambda request: {**request, "response_format": JSON_OBJECT_SCHEMA}),
    # vLLM before 0.8.3 took no "required": "auto", not enforced there (a call answered in text is asked for again:
    # RunService._call_model).
    "tool_choice": Adaptation(lambda request: request.get("tool_choice") == "required",
                              lambda request: {**request, "tool_choice": "auto"}),
    # llama.cpp before it streamed tool calls (NO_STREAMED_TOOLS): the answer whole.
    "stream": Adaptation(lambda request: bool(request.get("stream") and request.get("tools")), _unstreamed),
}
"""What a model's server is asked instead, by the parameter it refused (`ModelError.unsupported`)."""

LINKED_IMAGES = "image_url"
"""`ModelError.unsupported` for a server that takes no image URLs (IMAGE_URLS_REFUSED): asked again with each linked
image fetched here and sent as a data URL. Not in ADAPTATIONS: fetching is asynchronous (`ModelClient._adapt`)."""
IMAGE_URLS_REFUSED = "image URLs are not currently supported"
"""Ollama's 400 to an `image_url` part holding a URL ("..., please use base64 encoded data instead")."""
IMAGE_FETCHES_AT_ONCE = 4
"""Linked images of one request fetched at once."""


def linked_image_urls(request: dict[str, Any]) -> list[str]:
    """The http(s) URLs of the request's `image_url` parts, each once, first mention first."""
    return [url for url in part_values(request, "image_url", "url") if url.lower().startswith(("http://", "https://"))]


def _with_image_urls(request: dict[str, Any], replaced: Mapping[str, str]) -> dict[str, Any]:
    """The request with the URL of each `image_url` part that `replaced` names swapped for its value (`detail` kept)."""
    def part_of(part: dict[str, Any]) -> dict[str, Any]:
        image = (part.get("image_url") or {}) if part.get("type") == "image_url" else {}
        url = image.get("url")
        if not isinstance(url, str) or url not in replaced:
            return part
        return {**part, "image_url": {**image, "url": replaced[url]}}

    return {**request, "messages": [
        {**message, "content": [part_of(part) for part in message["content"]]}
        if isinstance(message.get("content"), list) else message for message in request.get("messages") or ()]}


@dataclass(frozen=True)
class ContextOverflow:
    """A server's refusal of a prompt longer than its model's context: the context length it named, and how many
    tokens it counted in the prompt when it said (None: it did not)."""

    context_tokens: int
    prompt_tokens: int | None


_CONTEXT_LENGTH = (re.compile(r"maximum context length is (\d+) tokens"),  # OpenAI, vLLM
                   re.compile(r"exceeds the available context size \((\d+) tokens\)"))  # llama.cpp
_PROMPT_LENGTH = (re.compile(r"(\d+) in the messages"),  # vLLM before 0.10
                  re.compile(r"has (\d+) input tokens"),  # vLLM
                  re.compile(r"messages resulted in (\d+) tokens"),  # OpenAI
                  re.compile(r"request \((\d+) tokens\)"))  # llama.cpp


def context_overflow(exc: openai.APIStatusError) -> ContextOverflow | None:
    """What a 400 refusing a prompt too long for the model says of the context (OpenAI's, vLLM's and llama.cpp's
    wording; llama.cpp's `n_ctx` and `n_prompt_tokens` fields first)."""
    if exc.status_code != 400:
        return None
    error = exc.body.get("error", exc.body) if isinstance(exc.body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("n_ctx"), int) and error["n_ctx"] > 0:
        prompt = error.get("n_prompt_tokens")
        return ContextOverflow(error["n_ctx"], prompt if isinstance(prompt, int) and prompt > 0 else None)
    detail = error_detail(exc)
    context = next((int(m.group(1)) for pattern in _CONTEXT_LENGTH if (m := pattern.search(detail))), 0)
    if context <= 0:
        return None
    prompt = next((int(m.group(1)) for pattern in _PROMPT_LENGTH if (m := pattern.search(detail))), 0)
    return ContextOverflow(context, prompt or None)


class ModelError(Exception):
    """The model call failed for good; `code` is the run's `last_error.code`; `unsupported`: the request parameter
    the model refused (`_unsupported_parameter`: OpenAI's 400 `unsupported_parameter`, or a server's own refusal;
    LINKED_IMAGES for image URLs); `overflow`: the prompt was longer than the model's context, as the server said."""

    def __init__(self, code: str, message: str, *, unsupported: str | None = None,
                 overflow: ContextOverflow | None = None) -> None:
        # It becomes the run's last_error: a model's error text may hold NULs, or be a proxy's whole page.
        message = storable_text(message[:MAX_ERROR_CHARS])
        super().__init__(message)
        self.code = code
        self.message = message
        self.unsupported = unsupported
        self.overflow = overflow


@dataclass
class ModelTurn:
    """What one model call produced."""

    text: str = ""
    refusal: str = ""
    """What the model wrote in `refusal` (Structured Outputs' refusal, sent instead of content): the message's
    `refusal` part, as hosted. Not streamed to a sink: it reaches clients with the completed message."""
    tool_calls: list[ModelToolCall] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    streamed: bool = False
    """Some of it reached a sink: the call cannot be made again without showing its output twice."""


@dataclass
class PartialCall:
    """A tool call as far as the model has written it (its id is ours when the model sends none)."""

    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)
    model_index: int | None = None
    """The `index` the model gave the call's chunks (None: it gave none)."""
    model_id: str | None = None
    """The id the model gave the call (None: it gave none, `id` is ours)."""

    def arguments_text(self) -> str:
        """The arguments written so far."""
        return "".join(self.arguments)


CallSink = Callable[[int, PartialCall], Awaitable[None]]
"""Told the model's index and state of a tool call each time a chunk adds to it."""


class ModelClient:
    """One `openai.AsyncOpenAI` client (connection pool) shared by every run of the instance."""

    def __init__(self, *, base_url: str, api_key: str, timeout: float, max_retries: int,
                 retry_backoff: float, aliases: Mapping[str, str] | None = None,
                 fetch_image: ImageFetcher | None = None, on_workaround: WorkaroundSink | None = None) -> None:
        self._client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key or "sk-no-key", max_retries=0,
                                          timeout=timeout)
        self._timeout = timeout
        self._max_retries = max_retries
        self._retry_backoff = retry_backoff
        self._aliases = dict(aliases or {})
        """The model name sent upstream for the name a run asks for (`*`: any other), as configured."""
        self._adapted: dict[str, set[str]] = {}
        """Per model, the ADAPTATIONS its server needed: later calls are adapted at once."""
        self._context: dict[str, int] = {}
        """Per model, the context length its server listed last (vLLM's `max_model_len`)."""
        self._learnt_context: dict[str, int] = {}
        """Per model, the context length learnt from the server's refusal of a longer prompt (`learn_context`)."""
        self._fetch_image = fetch_image
        self._on_workaround = on_workaround or (lambda _workaround: None)
        """How a linked image becomes a data URL for a server that takes no image URLs (None: it is not fetched)."""

    async def close(self) -> None:
        """Close the connection pool."""
        await self._client.close()

    async def list_models(self, seconds: float) -> list[dict[str, Any]]:
        """The endpoint's `GET /models`, as sent (SDK errors raised), on the runs' connection pool but within `seconds`
        of its own: a list waits for no model to think."""
        page = await self._client.with_options(timeout=seconds).models.list()
        self._context = {model.id: length for model in page.data
                         if isinstance(length := getattr(model, "max_model_len", None), int) and length > 0}
        return [model.to_dict(warnings=False) for model in page.data]

    def context_tokens(self, model: str) -> int:
        """The context length of the model a run names: the shorter of what its server listed (vLLM lists
        `max_model_len`: at the orchestrator's start and for `GET /v1/models`) and what its refusal of a longer
        prompt taught (`learn_context`); 0: unknown."""
        upstream = self._upstream_name(model)
        known = [n for n in (self._context.get(upstream, 0), self._learnt_context.get(upstream, 0)) if n > 0]
        return min(known, default=0)

    def learn_context(self, model: str, tokens: int) -> None:
        """Remember the context length of the model a run names, as its server's refusal of a prompt showed it (in
        the orchestrator's own token estimate): later runs' prompts are cut to fit before they are sent."""
        self._learnt_context[self._upstream_name(model)] = tokens

    async def stream(self, request: dict[str, Any], on_text: TextSink, on_call: CallSink) -> ModelTurn:
        """Call the model, streaming text to `on_text` and tool calls to `on_call`; retry failures that happened
        before any output."""
        attempt = 0
        request = await self._as_taken(self._upstream(request))
        while True:
            turn = ModelTurn()
            try:
                await self._stream_once(request, turn, on_text, on_call)
                self._check_limit(request, turn)
                if turn.usage is None:  # LM Studio streamed none (before it took stream_options)
                    turn.usage = _estimated_usage(request, turn)
                return turn
            except ModelError as error:
                refused = error.unsupported or ""
                if self._applies(refused, request) and not turn.streamed:
                    _log.warning("model %s refused %s: asked again in the form it takes", request.get("model"), refused)
                    self._adapted.setdefault(str(request.get("model")), set()).add(refused)
                    self._on_workaround(refused)
                    request = await self._adapt(refused, request)
                    continue  # at most once per adaptation: it no longer applies to the request
                retryable = error.code != "invalid_prompt" and not turn.streamed
                if not retryable or attempt >= self._max_retries:
                    raise
                attempt += 1
                _log.warning("model call failed (%s), retry %d/%d", error.message, attempt, self._max_retries)
                await asyncio.sleep(self._retry_backoff * 2 ** (attempt - 1))

    def _upstream(self, request: dict[str, Any]) -> dict[str, Any]:
        """The request naming the model its server serves for the run's model (runs keep the name they were given)."""
        name = str(request.get("model"))
        upstream = self._upstream_name(name)
        return request if upstream == name else {**request, "model": upstream}

    def _upstream_name(self, model: str) -> str:
        return self._aliases.get(model, self._aliases.get("*", model))

    async def _as_taken(self, request: dict[str, Any]) -> dict[str, Any]:
        """The request in the form its model's server took before (every adaptation it needed that applies)."""
        needed = self._adapted.get(str(request.get("model")), set())
        for name in (*ADAPTATIONS, LINKED_IMAGES):
            if name in needed and self._applies(name, request):
                request = await self._adapt(name, request)
        return request

    def _applies(self, refused: str, request: dict[str, Any]) -> bool:
        """The request holds what a server refused, in a form it can be asked without (ADAPTATIONS, LINKED_IMAGES)."""
        if refused == LINKED_IMAGES:
            return self._fetch_image is not None and bool(linked_image_urls(request))
        adaptation = ADAPTATIONS.get(refused)
        return adaptation is not None and adaptation.applies(request)

    async def _adapt(self, refused: str, request: dict[str, Any]) -> dict[str, Any]:
        """The request as a server that refused `refused` takes it (`_applies` said it can be)."""
        if refused == LINKED_IMAGES:
            return await self._inline_images(request)
        return ADAPTATIONS[refused].adapt(request)

    async def _inline_images(self, request: dict[str, Any]) -> dict[str, Any]:
        """The request with every linked image as a data URL, each URL fetched once (IMAGE_FETCHES_AT_ONCE at a time);
        the first that cannot be fetched stops the others and fails the call as the prompt's fault (no retry)."""
        fetch, urls = self._fetch_image, linked_image_urls(request)
        if fetch is None or not urls:
            return request
        slots = asyncio.Semaphore(IMAGE_FETCHES_AT_ONCE)

        async def fetched(url: str) -> str:
            async with slots:
                return await fetch(url)

        try:
            async with asyncio.TaskGroup() as group:
                fetches = [group.create_task(fetched(url)) for url in urls]
        except ExceptionGroup as failed:
            first = failed.exceptions[0]
            if isinstance(first, ImageFetchError):
                raise ModelError("invalid_prompt", str(first)) from first
            raise
        return _with_image_urls(request, {url: task.result() for url, task in zip(urls, fetches, strict=True)})

    def _check_limit(self, request: dict[str, Any], turn: ModelTurn) -> None:
        """A model that wrote more tokens than the request allowed ignored the limit (Ollama takes `max_tokens` only,
        ollama/ollama#7125): the turn ends as cut at the limit would (`length`: the run is incomplete), and later
        calls to that model send `max_tokens`."""
        limit = request.get("max_completion_tokens", request.get("max_tokens"))
        if (isinstance(limit, int) and turn.usage is not None and turn.usage["completion_tokens"] > limit
                and turn.finish_reason != "length"):
            _log.warning("model %s wrote %d tokens past a limit of %d: it ignores %s", request.get("model"),
                         turn.usage["completion_tokens"], limit,
                         "max_completion_tokens" if "max_completion_tokens" in request else "max_tokens")
            self._adapted.setdefault(str(request.get("model")), set()).add("max_completion_tokens")
            self._on_workaround("max_completion_tokens")
            turn.finish_reason = "length"

    async def _stream_once(self, request: dict[str, Any], turn: ModelTurn, on_text: TextSink,
                           on_call: CallSink) -> None:
        calls: dict[int, PartialCall] = {}
        thinking = ThinkingFilter()
        try:
            # The raw response, its server-sent events decoded here: the SDK's chunk models and request
            # transformation cost more CPU than the rest of a run's model call (status errors still raise).
            response = await self._client.post("/chat/completions", body=request, cast_to=httpx2.Response,
                                               stream=True)
            try:
                if response.headers.get("content-type", "").startswith("application/json"):  # a whole completion
                    payloads: AsyncIterator[bytes] = _completion_as_chunk(await response.aread())
                else:
                    payloads = _sse_data(response.aiter_bytes())
                async for data in payloads:
                    text, touched = _apply_chunk(data, turn, calls)
                    await _show(thinking.feed(text), turn, on_text)
                    for index in touched:
                        turn.streamed = True
                        await on_call(index, calls[index])
                await _show(thinking.end(), turn, on_text)
            finally:
                await response.aclose()
        except (openai.APITimeoutError, httpx2.TimeoutException) as exc:
            raise ModelError("server_error", f"The model did not answer within {self._timeout:g} seconds.") from exc
        except openai.RateLimitError as exc:
            raise ModelError("rate_limit_exceeded", f"The model is rate limited: {error_detail(exc)}") from exc
        except openai.APIStatusError as exc:
            code = "invalid_prompt" if exc.status_code in (400, 413, 422) else "server_error"
            message = f"The model returned HTTP {exc.status_code}: {error_detail(exc)}"
            if exc.status_code == 404:  # a server of other models than the code names (Ollama, vLLM), or no such URL
                message = (f"{message.rstrip('.')}. Check that the model server serves '{request.get('model')}'"
                           " (THREADLINE_MODEL_ALIASES maps the model names runs ask for to the ones it serves) and"
                           " that THREADLINE_MODEL_BASE_URL is its OpenAI-compatible base URL.")
            raise ModelError(code, message, unsupported=_unsupported_parameter(exc),
                             overflow=context_overflow(exc)) from exc
        except (openai.APIConnectionError, httpx2.HTTPError) as exc:
            raise ModelError("server_error", f"Could not reach the model: {exc}") from exc
        turn.tool_calls = [ModelToolCall(id=p.id, name=p.name, arguments=p.arguments_text())
                           for _, p in sorted(calls.items())]


async def _show(text: str, turn: ModelTurn, on_text: TextSink) -> None:
    """Add answer text to the turn and hand it to the sink."""
    if text:
        turn.text += text
        turn.streamed = True
        await on_text(text)


async def _sse_data(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The `data` of each server-sent event (lines end in LF or CRLF), up to `[DONE]`; the body is read to
    its end so the connection can be reused. An `error` field (llama.cpp's server streams a failure as
    `error: {...}`) is data `{"error": {...}}`."""
    buffer = b""
    data: list[bytes] = []
    done = False
    async for chunk in chunks:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line.startswith((b"data:", b"error:")):
                value = line[line.index(b":") + 1:].removesuffix(b"\r")
                value = value[1:] if value.startswith(b" ") else value
                data.append(value if line.startswith(b"data:") else b'{"error": ' + value + b"}")
            elif data and line in (b"", b"\r"):
                payload = b"\n".join(data)
                data.clear()
                done = done or payload.startswith(b"[DONE]")
                if not done:
                    yield payload
    if data and not done:  # the last event lacked its blank line
        yield b"\n".join(data)


async def _completion_as_chunk(body: bytes) -> AsyncIterator[bytes]:
    """A `chat.completion` (an answer not streamed) as the one chunk that says all of it: each choice's message as its
    delta, its tool calls numbered; anything else (an error body) as it is."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        yield body  # _apply_chunk reports it as malformed
        return
    if isinstance(doc, dict) and isinstance(doc.get("choices"), list):
        choices = []
        for choice in doc["choices"]:
            message = dict(choice.get("message") or {}) if isinstance(choice, dict) else {}
            if isinstance(message.get("tool_calls"), list):
                message["tool_calls"] = [{**call, "index": i} for i, call in enumerate(message["tool_calls"])
                                         if isinstance(call, dict)]
            choices.append({"index": 0, "delta": message,
                            "finish_reason": choice.get("finish_reason") if isinstance(choice, dict) else None})
        doc = {**doc, "choices": choices}
    yield orjson.dumps(doc)


def _apply_chunk(data: bytes, turn: ModelTurn, calls: dict[int, PartialCall]) -> tuple[str, list[int]]:
    """Fold one `chat.completion.chunk` into the turn and its tool calls; return its text and the indexes of the
    calls it added to."""
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        try:  # orjson refuses what JSON allows: a lone surrogate's escape (a model's broken emoji)
            chunk = json.loads(data)
        except ValueError as exc:
            raise ModelError("server_error", f"The model sent a malformed chunk: {data[:200]!r}") from exc
    if not isinstance(chunk, dict):
        raise ModelError("server_error", f"The model sent a malformed chunk: {data[:200]!r}")
    error = chunk.get("error")
    if error:
        message = error.get("message") if isinstance(error, dict) else None
        raise ModelError("server_error", f"The model failed while streaming: {message or error}")
    usage = chunk.get("usage")
    if usage:
        turn.usage = {"prompt_tokens": usage.get("prompt_tokens") or 0,
                      "completion_tokens": usage.get("completion_tokens") or 0,
                      "total_tokens": usage.get("total_tokens") or 0}
    text = ""
    touched: list[int] = []
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        content = delta.get("content")
        if content:
            text += storable_text(content)
        refusal = delta.get("refusal")
        if refusal and isinstance(refusal, str):
            turn.refusal += storable_text(refusal)
        for call in delta.get("tool_calls") or ():
            index = _call_slot(call, calls)
            partial = calls.get(index)
            if partial is None:  # the id is known from the call's first chunk on: its deltas show it
                model_id = storable_text(str(call["id"])) if call.get("id") else None
                model_index = call.get("index") if isinstance(call.get("index"), int) else None
                partial = calls[index] = PartialCall(id=model_id or new_id("call"), model_index=model_index,
                                                     model_id=model_id)
            if index not in touched:
                touched.append(index)
            function = call.get("function") or {}
            if function.get("name"):
                partial.name += storable_text(function["name"])
            if function.get("arguments"):
                partial.arguments.append(storable_text(function["arguments"]))
        if choice.get("finish_reason"):
            turn.finish_reason = choice["finish_reason"]
    return text, touched


def _call_slot(call: dict[str, Any], calls: dict[int, PartialCall]) -> int:
    """Which of the turn's calls a tool-call delta adds to: the latest one with its `index` (the latest of all when it
    has none) unless the delta names another id; else a new one, numbered by its index when that is free, after the
    others otherwise. Ollama streams each of parallel calls whole at index 0, with its own id; some servers send no
    index at all."""
    index: int | None = call["index"] if isinstance(call.get("index"), int) else None
    latest = next((slot for slot in sorted(calls, reverse=True)
                   if index is None or calls[slot].model_index == index), None)
    if latest is not None and (not call.get("id") or calls[latest].model_id in (None, storable_text(str(call["id"])))):
        return latest
    if index is not None and index not in calls:
        return index
    return max(calls, default=-1) + 1


def _estimated_usage(request: dict[str, Any], turn: ModelTurn) -> dict[str, int]:
    """The turn's usage as `estimate_tokens` counts it (text only, images not counted), for a server that reports none:
    zero would leave max_prompt_tokens and max_completion_tokens unspent over a run's turns."""
    prompt = 0
    for message in request.get("messages") or ():
        content = message.get("content")
        if isinstance(content, list):
            message = {**message, "content": [part for part in content if part.get("type") == "text"]}
        prompt += estimate_tokens(message)
    calls = [{"function": {"name": call.name, "arguments": call.arguments}} for call in turn.tool_calls]
    completion = estimate_tokens({"content": turn.text + turn.refusal, "tool_calls": calls}) - estimate_tokens({})
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _unsupported_parameter(exc: openai.APIStatusError) -> str | None:
    """The parameter a 400 `unsupported_parameter` names (OpenAI's wording for a parameter a model does not take);
    `response_format` for a 400 about its type (LM Studio: "'response_format.type' must be 'json_schema' or 'text'",
    lmstudio-ai/lmstudio-bug-tracker#189); `stream` for NO_STREAMED_TOOLS (llama.cpp's 500); LINKED_IMAGES for
    IMAGE_URLS_REFUSED (Ollama's 400)."""
    detail = error_detail(exc)
    if NO_STREAMED_TOOLS in detail:
        return "stream"
    if exc.status_code == 400 and IMAGE_URLS_REFUSED in detail:
        return LINKED_IMAGES  # Ollama takes images as data URLs only
    if exc.status_code == 400 and "'response_format.type'" in detail:
        return "response_format"
    if exc.status_code == 400 and "'max_completion_tokens')" in detail and "extra_forbidden" in detail:
        return "max_completion_tokens"  # vLLM 0.5.x refused every field it did not know
    if exc.status_code == 400 and "tool_choice" in detail and "must either be a named tool" in detail:
        return "tool_choice"  # vLLM before 0.8.3 took no "required"
    error = exc.body.get("error", exc.body) if isinstance(exc.body, dict) else None
    if exc.status_code != 400 or not isinstance(error, dict) or error.get("code") != "unsupported_parameter":
        return None
    param = error.get("param")
    return param if isinstance(param, str) else None


def error_detail(exc: openai.APIStatusError) -> str:
    """The server's own error message (OpenAI's `error.message`, or a plain text body), else the SDK's."""
    body = exc.body
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
    if isinstance(body, str) and body.strip():  # `{"error": "text"}` (LM Studio): the SDK hands over the text
        return body.strip()
    return exc.message
