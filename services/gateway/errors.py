"""Errors in the OpenAI format: {"error": {"message", "type", "param", "code"}}."""

import logging
from collections.abc import Collection, Iterable, Sequence
from typing import Any

import asyncpg
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from threadline_core.db import DATABASE_UNAVAILABLE, database_lost
from threadline_core.logging import log_context
from threadline_core.outbox import EventTooLarge

_log = logging.getLogger(__name__)

MALFORMED_JSON = ("We could not parse the JSON body of your request. (HINT: This likely means you aren't using "
                  "your HTTP library correctly. The API expects a JSON payload, but what was sent was not "
                  "valid JSON.)")
MAX_ECHO_CHARS = 100
"""How much of a client-supplied value (an id, a path, a parameter name) an error message quotes."""
MAX_PARAM_ECHO_CHARS = 256
"""How much of a parameter's name a message quotes (real ones are shorter; a client's dict key need not be)."""
MAX_MESSAGE_CHARS = 4096
"""The longest error message (or param) sent: a safety net for values quoted without `echo`."""


def echo(value: object, limit: int = MAX_ECHO_CHARS) -> str:
    """A client-supplied value as an error message quotes it: its start only, so a 100 KB id is not sent back."""
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[:limit] + "…"


class ApiError(Exception):
    """An error the client caused (or a server error), rendered in the OpenAI format."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        message = echo(message, MAX_MESSAGE_CHARS)
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = None if param is None else echo(param, MAX_MESSAGE_CHARS)
        self.code = code
        self.type = type


def not_found(kind: str, object_id: str, param: str | None = None) -> ApiError:
    """The hosted API's 404 for an unknown id."""
    return ApiError(404, f"No {kind} found with id '{echo(object_id)}'.", param=param)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400 invalid_request_error."""
    return ApiError(400, message, param=param, code=code)


def check_form_fields(names: Iterable[str], accepted: Collection[str]) -> None:
    """Refuse a multipart field the endpoint does not take, as JSON bodies refuse unknown parameters: a misspelt or
    JSON-encoded `expires_after` would otherwise be dropped without a word."""
    for name in names:
        if name not in accepted:
            raise bad_request(f"Unknown parameter: '{echo(name)}'.", echo(name), "unknown_parameter")


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, object]:
    """The JSON body of an error."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


REQUEST_ID_SCOPE_KEY = "threadline.request_id"
"""Where `gateway.http.RequestIdMiddleware` leaves the request's id in the ASGI scope (for the 500 handler, which
answers outside the middleware)."""

def error_response(error: ApiError) -> Response:
    """An ApiError as an HTTP response."""
    body = error_body(error.message, type=error.type, param=error.param, code=error.code)
    return Response(orjson.dumps(body), status_code=error.status, media_type="application/json")


# --- pydantic validation errors -> the hosted API's wording -----------------------------------------

_EXPECTED = {
    "string_type": "a string", "str_type": "a string",
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number",
    "bool_type": "a boolean", "bool_parsing": "a boolean",
    "list_type": "an array", "tuple_type": "an array",
    "dict_type": "an object", "model_type": "an object", "model_attributes_type": "an object",
    "none_required": "null",
}
_SCALAR_LABELS = frozenset({"str", "int", "float", "bool", "none", "dict", "list"})


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "an unsupported value"


def _is_label(part: str) -> bool:
    """Union member labels that pydantic puts into `loc` (they are not request fields)."""
    return part in _SCALAR_LABELS or "[" in part or part.startswith(("<", "constrained-"))


def loc_to_param(loc: Sequence[int | str], body: Any = None) -> str | None:
    """`('tools', 0, '<function>', 'function', 'name')` -> `tools[0].function.name` (labels dropped)."""
    parts: list[int | str] = []
    node = body
    for part in loc:
        if isinstance(part, int):
            parts.append(part)
            node = node[part] if isinstance(node, list) and 0 <= part < len(node) else None
            continue
        if isinstance(node, dict) and part in node:
            parts.append(part)
            node = node[part]
        elif not _is_label(part):
            parts.append(part)
            node = None
    if not parts:
        return None
    out = str(parts[0])
    for p in parts[1:]:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


def _quote(value: Any) -> str:
    if isinstance(value, str):
        return f"'{echo(value)}'"
    return echo(orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()) if value is not None else "null"


def _pick(errors: Sequence[Any]) -> dict[str, Any]:
    """The most specific error: the deepest `loc`, then not a type mismatch (another union member's, such as an
    object where a member is a string literal: `response_format` "auto"), first."""

    def rank(err: Any) -> tuple[int, int]:
        mismatch = err.get("type") in _EXPECTED or (
            err.get("type") == "literal_error" and isinstance(err.get("input"), (dict, list)))
        return len(err.get("loc", ())), 0 if mismatch else 1

    best: dict[str, Any] = dict(errors[0])
    for err in errors[1:]:
        if rank(err) > rank(best):
            best = dict(err)
    return best


def validation_error(errors: Sequence[Any], body: Any = None, *, sourced: bool = False) -> ApiError:
    """Turn pydantic/FastAPI validation errors into one 400 in the hosted API's words.

    `sourced`: the errors are FastAPI's, whose `loc` starts with where the value came from (`query`, `body`,
    ...). A body model's own errors start with the field name, which may be one of those words (`query`).
    """
    if not errors:
        return bad_request("Invalid request.")
    err = _pick(errors)
    loc = tuple(err.get("loc", ()))
    if sourced and loc and loc[0] in ("body", "query", "path", "header", "cookie"):  # FastAPI's source prefix
        loc = loc[1:]
    param = loc_to_param(loc, body)
    kind = str(err.get("type", ""))
    ctx: dict[str, Any] = dict(err.get("ctx") or {})
    value = err.get("input")
    name = echo(param, MAX_PARAM_ECHO_CHARS) if param else "body"
    if kind == "json_invalid":
        return bad_request(MALFORMED_JSON)
    if kind == "missing":
        return bad_request(f"Missing required parameter: '{name}'.", param, "missing_required_parameter")
    if kind == "extra_forbidden":
        return bad_request(f"Unknown parameter: '{name}'.", param, "unknown_parameter")
    if kind in ("union_tag_not_found", "union_tag_invalid"):
        if not isinstance(value, dict):
            return bad_request(f"Invalid type for '{name}': expected an object, but got {_json_kind(value)} "
                               "instead.", param, "invalid_type")
        tag_param = f"{name}.type"
        if "type" not in value:
            return bad_request(f"Missing required parameter: '{tag_param}'.", tag_param,
                               "missing_required_parameter")
        if not isinstance(value["type"], str):
            return bad_request(f"Invalid type for '{tag_param}': expected a string, but got "
                               f"{_json_kind(value['type'])} instead.", tag_param, "invalid_type")
        expected = str(ctx.get("expected_tags", "")).replace("<", "").replace(">", "")
        return bad_request(f"Invalid value: {_quote(value.get('type'))}. Supported values are: {expected}.",
                           tag_param, "invalid_value")
    if kind in _EXPECTED:
        return bad_request(f"Invalid type for '{name}': expected {_EXPECTED[kind]}, but got {_json_kind(value)} "
                           "instead.", param, "invalid_type")
    if kind in ("literal_error", "enum"):
        return bad_request(f"Invalid value: {_quote(value)}. Supported values are: {ctx.get('expected', '')}.",
                           param, "invalid_value")
    if kind == "string_too_long":
        return bad_request(f"Invalid '{name}': string too long. Expected a string with maximum length "
                           f"{ctx.get('max_length')}, but got a string with length {len(str(value))} instead.",
                           param, "string_above_max_length")
    if kind == "string_too_short":
        return bad_request(f"Invalid '{name}': string too short. Expected a string with minimum length "
                           f"{ctx.get('min_length')}, but got a string with length {len(str(value))} instead.",
                           param, "string_below_min_length")
    if kind == "too_long":
        return bad_request(f"Invalid '{name}': array too long. Expected an array with maximum length "
                           f"{ctx.get('max_length')}, but got an array with length {ctx.get('actual_length')} "
                           "instead.", param, "array_above_max_length")
    if kind == "too_short":
        return bad_request(f"Invalid '{name}': array too short. Expected an array with minimum length "
                           f"{ctx.get('min_length')}, but got an array with length {ctx.get('actual_length')} "
                           "instead.", param, "array_below_min_length")
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        below = kind.startswith("greater")
        bound = ctx.get("ge", ctx.get("gt")) if below else ctx.get("le", ctx.get("lt"))
        # The field's type names the number, as hosted (`temperature: 3` is a decimal): pydantic gives a float
        # field's bound as a float. Hosted writes a whole bound without ".0" (`<= 2`).
        number = "decimal" if isinstance(bound, float) else "integer"
        if isinstance(bound, float) and bound.is_integer():
            bound = int(bound)
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[kind]
        return bad_request(f"Invalid '{name}': {number} {'below minimum' if below else 'above maximum'} value. "
                           f"Expected a value {op} {bound}, but got {value} instead.", param,
                           f"{number}_{'below_min' if below else 'above_max'}_value")
    if kind == "string_pattern_mismatch":
        return bad_request(f"Invalid '{name}': string does not match pattern. Expected a string that matches "
                           f"the pattern '{ctx.get('pattern')}'.", param, "invalid_value")
    if kind.startswith("tl_"):  # our own PydanticCustomError types carry the final message
        return bad_request(str(err.get("msg", "Invalid value.")), param, kind.removeprefix("tl_"))
    return bad_request(f"Invalid value for '{name}': {err.get('msg', 'invalid value')}.", param, "invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    """Render every error, including FastAPI's own, in the OpenAI format."""

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def request_validation_error(_: Request, exc: RequestValidationError) -> Response:
        return error_response(validation_error(exc.errors(), getattr(exc, "body", None), sourced=True))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            message = f"Invalid URL ({echo(request.method)} {echo(request.url.path)})"
        elif exc.status_code == 405:
            message = f"Method {echo(request.method)} not allowed for {echo(request.url.path)}"
        else:
            message = str(exc.detail)
        code = "request_too_large" if exc.status_code == 413 else None
        return error_response(ApiError(exc.status_code, message, code=code))

    @app.exception_handler(asyncpg.DataError)
    async def data_error(_: Request, exc: asyncpg.DataError) -> Response:
        # Values the database refuses (NUL characters, out-of-range numbers) are the client's input.
        _log.warning("database refused a value: %s", exc)
        if isinstance(exc, asyncpg.CharacterNotInRepertoireError):  # from a path, a query or a file name
            return error_response(bad_request("Invalid value in request: text may not contain the NUL character "
                                              "(\\u0000).", code="invalid_value"))
        return error_response(bad_request(f"Invalid value in request: {exc}", code="invalid_value"))

    @app.exception_handler(ClientDisconnect)
    async def client_disconnect(_: Request, __: ClientDisconnect) -> Response:
        # The client left while sending its body: nobody reads this answer, and it is no server error.
        return Response(status_code=499)

    @app.exception_handler(EventTooLarge)
    async def event_too_large(_: Request, exc: EventTooLarge) -> Response:
        # Nothing was stored: the transaction adding the event rolled back.
        return error_response(ApiError(413, f"Request too large: the object it creates or changes would be "
                                       f"{exc.size} bytes as JSON; the maximum is {exc.limit} bytes.",
                                       code="request_too_large"))

    async def database_unavailable(_: Request, exc: Exception) -> Response:
        # The database is down, restarting or full: nothing was changed, and a retry soon will likely work.
        _log.warning("database unavailable: %r", exc)
        response = error_response(ApiError(503, "The server is temporarily unable to handle your request (its "
                                           "database is unavailable). Please retry shortly.", type="server_error",
                                           code="service_unavailable"))
        response.headers["Retry-After"] = "1"
        return response

    for unavailable in DATABASE_UNAVAILABLE:
        app.add_exception_handler(unavailable, database_unavailable)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> Response:
        if database_lost(exc):  # a connection lost mid-request that asyncpg reports otherwise: the same outage
            return await database_unavailable(request, exc)
        request_id = request.scope.get(REQUEST_ID_SCOPE_KEY)
        with log_context(request_id=request_id):
            _log.exception("unhandled error")
        response = error_response(ApiError(500, "The server had an error while processing your request.",
                                           type="server_error"))
        response.headers["Connection"] = "close"  # Starlette re-raises after sending, and uvicorn then closes
        if request_id:  # this answer leaves through Starlette's outermost middleware, not RequestIdMiddleware
            response.headers["x-request-id"] = request_id
        return response
