"""HTTP plumbing shared by the routers: strict JSON bodies, orjson responses, the body-size limit."""

import asyncio
import uuid
from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import Any, TypeVar

import orjson
from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from gateway.errors import (
    MALFORMED_JSON,
    REQUEST_ID_SCOPE_KEY,
    ApiError,
    bad_request,
    error_body,
    error_response,
    validation_error,
)
from threadline_core.logging import log_context

M = TypeVar("M", bound=BaseModel)
MAX_JSON_DEPTH = 64
UNPARSABLE_REQUEST = "Invalid HTTP request received: its request line or headers could not be parsed."
MAX_URL_BYTES = 65535
"""The longest request target served: httptools.parse_url refuses longer ones (uvicorn answered those with a 400)."""
ERROR_LINGER_SECONDS = 2.0
"""How long a connection answered with a parse error keeps reading (and dropping) what the client still sends."""
URL_TOO_LONG = f"Request URL too long: the maximum is {MAX_URL_BYTES} bytes."


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def _deeper_than(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
    return False


def parse_json(raw: bytes) -> Any:
    """Parse a request body strictly (RFC 8259: no NaN, valid UTF-8, bounded nesting); empty is `{}`."""
    if not raw.strip():
        return {}
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise bad_request(MALFORMED_JSON) from None
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and _deeper_than(data, MAX_JSON_DEPTH):
        raise bad_request(f"Invalid request: JSON nested deeper than {MAX_JSON_DEPTH} levels.",
                          code="invalid_value")
    if b"\\u0000" in raw and _has_nul(data):
        raise bad_request("Invalid request: strings must not contain null characters (\\u0000).",
                          code="invalid_value")
    return data


def validate(model: type[M], data: Any) -> M:
    """Validate parsed JSON against a request model (strict types), with hosted-API error messages."""
    if not isinstance(data, dict):
        kind = "an array" if isinstance(data, list) else "a scalar value"
        raise bad_request(f"Invalid type for request body: expected an object, but got {kind} instead.",
                          code="invalid_type")
    try:
        return model.model_validate(data, strict=True)
    except ValidationError as exc:
        raise validation_error(exc.errors(include_url=False), data) from None


async def parse_body(request: Request, model: type[M]) -> M:
    """Read, parse and validate the JSON body of `request`."""
    return validate(model, parse_json(await request.body()))


def json_response(content: Any, status_code: int = 200) -> Response:
    """A JSON response serialised with orjson."""
    return Response(orjson.dumps(content), status_code=status_code, media_type="application/json")


def model_doc(model: BaseModel) -> dict[str, Any]:
    """An openai SDK model as the hosted API returns it: fields that were set (nulls included), wire names."""
    return model.model_dump(mode="json", exclude_unset=True, by_alias=True)


def model_response(model: BaseModel, status_code: int = 200) -> Response:
    """One openai SDK model as the response body."""
    return json_response(model_doc(model), status_code)


class RequestIdMiddleware:
    """Pure ASGI middleware: every response carries an `x-request-id` (`req_` and 32 hex digits), as hosted, since
    the SDK exposes it (`._request_id`, an error's `.request_id`) for users to quote; the request's log lines carry it.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = f"req_{uuid.uuid4().hex}"
        scope[REQUEST_ID_SCOPE_KEY] = request_id
        header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        with log_context(request_id=request_id):
            await self.app(scope, receive, send_with_id)


class BodyLimitMiddleware:
    """Refuse request bodies above a size limit with 413, by Content-Length and while streaming; `overrides` give
    other limits to paths matching their glob pattern (`*` spans path segments)."""

    def __init__(self, app: ASGIApp, *, limit: int, overrides: Sequence[tuple[str, int]] = ()) -> None:
        self._app = app
        self._limit = limit
        self._overrides = tuple(overrides)

    def _limit_for(self, path: str) -> int:
        for pattern, limit in self._overrides:
            if fnmatchcase(path, pattern):
                return limit
        return self._limit

    @staticmethod
    def _too_large(limit: int) -> ApiError:
        return ApiError(413, f"Request body too large: the maximum is {limit} bytes.", code="request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        limit = self._limit_for(scope["path"])
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await error_response(bad_request("Invalid Content-Length header."))(scope, receive, send)
                    return
                if declared > limit:
                    await error_response(self._too_large(limit))(scope, receive, send)
                    return
                break
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # An HTTPException passes through FastAPI's body reading to the error handlers.
                    raise StarletteHTTPException(413, detail=self._too_large(limit).message)
            return message

        await self._app(scope, limited_receive, send)


class UrlTooLong(Exception):
    """Raised from the parser's URL callback: the request line's target is longer than MAX_URL_BYTES."""


class JsonErrorHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol (the gateway's `http=`), whose 400 for a request it cannot parse (a control
    character in a header, a garbage request line) is an OpenAI-format JSON error, as every other error is, instead
    of plain text: SDK clients read the error body as JSON. A URL longer than MAX_URL_BYTES is a 414 (httptools
    cannot split a longer one, and uvicorn would buffer any length). Valid requests pipelined before the bad one
    get their own responses first (uvicorn wrote the 400 at once and closed, so a client took it for its valid
    request's)."""

    _answer_first: RequestResponseCycle | None = None
    """The last valid request still to be answered when a later one could not be parsed (the error waits for it)."""
    _url_too_long: bool = False
    """The request that could not be parsed had a URL over MAX_URL_BYTES: its error is a 414, not a 400."""
    _lingering: bool = False
    """The error is written and the connection half-closed: bytes that still arrive are dropped."""
    _linger_timer: asyncio.TimerHandle | None = None

    def on_url(self, url: bytes) -> None:
        if len(self.url) + len(url) > MAX_URL_BYTES:
            self._url_too_long = True
            raise UrlTooLong  # the parser stops with an error: send_400_response answers with the 414
        super().on_url(url)

    def send_400_response(self, msg: str) -> None:
        if self._answer_first is not None:  # already waiting to send it (more bytes after the bad ones)
            return
        if self.pipeline and self.cycle is self.pipeline[0][0] and self.cycle.more_body:
            self.pipeline.popleft()  # the bad request's own cycle, queued behind an earlier one: never run it
        waiting = self.pipeline[0][0] if self.pipeline else self.cycle
        if waiting is not None and not waiting.response_complete and not waiting.more_body:
            self._answer_first = waiting
            self.flow.pause_reading()
            return
        self._write_error()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if (self._answer_first is not None and self._answer_first.response_complete
                and not self.transport.is_closing()):
            if self.timeout_keep_alive_task is not None:
                self.timeout_keep_alive_task.cancel()
            self._write_error()

    def _write_error(self) -> None:
        status, message = (414, URL_TOO_LONG) if self._url_too_long else (400, UNPARSABLE_REQUEST)
        body = orjson.dumps(error_body(message))
        content = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend([b"content-type: application/json\r\n",
                        b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                        b"connection: close\r\n", b"\r\n", body])
        self.transport.write(b"".join(content))
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        # Closing with unread bytes (the rest of a 1 MB URL) resets the connection, and the client loses the answer
        # it has not read yet: end the response with EOF, drop what still arrives, close when the client does (or
        # after ERROR_LINGER_SECONDS).
        self.transport.write_eof()
        self._lingering = True
        self.flow.resume_reading()
        self._linger_timer = self.loop.call_later(ERROR_LINGER_SECONDS, self.transport.close)

    def data_received(self, data: bytes) -> None:
        if not self._lingering:
            super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        super().connection_lost(exc)
