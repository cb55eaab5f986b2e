"""Checks that an error answer has the OpenAI shape, for tests that provoke errors through the SDK or raw HTTP; the
errors asyncpg raises when the database goes away, for tests of outage handling."""

from typing import Any

import asyncpg
import httpx
import openai

ERROR_FIELDS = {"message", "type", "param", "code"}


def _error_object(body: Any) -> dict[str, Any]:
    assert isinstance(body, dict) and set(body) == {"error"} and set(body["error"]) == ERROR_FIELDS, body
    error: dict[str, Any] = body["error"]
    return error


def http_error(response: httpx.Response, status: int) -> dict[str, Any]:
    """The `error` object of a raw JSON error answer with `status`."""
    assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"].startswith("application/json")
    return _error_object(response.json())


def sdk_error(exc: openai.APIStatusError) -> dict[str, Any]:
    """The `error` object of an SDK error, an `invalid_request_error`."""
    error = _error_object(exc.response.json())
    assert error["type"] == "invalid_request_error"
    return error


def lost_in_transaction() -> Exception:
    """What `async with conn.transaction()` raises when the connection died inside it: its exit fails too, with the
    loss as the context (as the chaos trial saw when Postgres was killed)."""
    try:
        try:
            raise asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation")
        finally:
            raise asyncpg.InterfaceError("cannot call Transaction.__aexit__(): the underlying connection is closed")
    except asyncpg.InterfaceError as exc:
        return exc
