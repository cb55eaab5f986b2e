"""Error messages quote at most the start of a value the client sent, and an over-long request line gets a JSON
414: both were answered, but in ways a client could not use (a 100 KB id sent back whole, a 400)."""

import json
import re
import socket
from typing import Any

import httpx
import openai
import pytest

from threadline_devstack.stack import Stack

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

HUGE = "x" * 100_000
"""A client-supplied value far longer than any real one (bodies carry it; URLs carry LONG)."""
LONG = "y" * 50_000
"""As long a value as a URL may carry and still be served (the request line limit is 64 KiB)."""
ECHO_CAP = 400
"""An error message quoting a capped value stays well below this many characters."""


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    error: dict[str, Any] = body["error"]
    return error


def _assert_capped(message: str, value: str, before: str) -> None:
    """`message` quotes the start of `value`, right after `before`, cut with an ellipsis."""
    assert len(message) < ECHO_CAP, message[:500]
    assert re.search(re.escape(before) + re.escape(value[:64]) + "[^ ]*…", message), message


# --- 3. client-supplied values in error messages ----------------------------------------------------------


def test_unknown_huge_id_in_the_path_is_quoted_capped(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.beta.assistants.retrieve("asst_" + LONG)
    error: dict[str, Any] = caught.value.body  # type: ignore[assignment]
    _assert_capped(error["message"], "asst_" + LONG, "No assistant found with id '")
    thread = client.beta.threads.create()
    with pytest.raises(openai.NotFoundError) as caught:
        client.beta.threads.runs.retrieve("run_" + LONG, thread_id=thread.id)
    error = caught.value.body  # type: ignore[assignment]
    _assert_capped(error["message"], "run_" + LONG, "No run found with id '")


def test_unknown_huge_ids_in_the_body_are_quoted_capped(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.beta.assistants.create(model="gpt-4o", tool_resources={"code_interpreter": {"file_ids": [HUGE]}})
    error: dict[str, Any] = caught.value.body  # type: ignore[assignment]
    _assert_capped(error["message"], HUGE, "No file found with id '")
    assert error["param"] == "tool_resources.code_interpreter.file_ids"
    with pytest.raises(openai.NotFoundError) as caught:
        client.beta.threads.create(messages=[{"role": "user", "content": "x", "attachments": [
            {"file_id": HUGE, "tools": [{"type": "file_search"}]}]}])
    _assert_capped(caught.value.body["message"], HUGE, "No file found with id '")  # type: ignore[index]
    with pytest.raises(openai.NotFoundError) as caught:
        client.beta.threads.create_and_run(assistant_id="asst_" + HUGE)
    _assert_capped(caught.value.body["message"], "asst_" + HUGE, "No assistant found with id '")  # type: ignore[index]


def test_invalid_huge_values_are_quoted_capped(http: httpx.Client) -> None:
    """Validation errors quote the bad value (and the name of an unknown parameter) the same way."""
    error = _error(http.post("/assistants", json={"model": "m", "tools": [{"type": HUGE}]}), 400)
    _assert_capped(error["message"], HUGE, "Invalid value: '")
    error = _error(http.post("/assistants", json={"model": "m", HUGE: 1}), 400)
    _assert_capped(error["message"], HUGE, "Unknown parameter: '")
    assert len(error["param"]) < 5000
    error = _error(http.get("/assistants", params={"order": LONG}), 400)
    _assert_capped(error["message"], LONG, "Invalid value: '")
    assert error["param"] == "order"


def test_unknown_huge_url_is_quoted_capped(http: httpx.Client) -> None:
    error = _error(http.get(f"/nothing/{LONG}"), 404)
    _assert_capped(error["message"], f"/v1/nothing/{LONG}", "Invalid URL (GET ")


def test_short_values_are_quoted_whole(client: openai.OpenAI) -> None:
    """The cap leaves every ordinary id alone: no ellipsis, the id as sent."""
    with pytest.raises(openai.NotFoundError) as caught:
        client.beta.assistants.retrieve("asst_" + "z" * 90)
    assert caught.value.body["message"] == f"No assistant found with id 'asst_{'z' * 90}'."  # type: ignore[index]


# --- 4. over-long request lines --------------------------------------------------------------------------


def _exchange(port: int, raw: bytes) -> bytes:
    """Send `raw` as it is and read until the gateway closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def _response(raw: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    return status, {n.strip().lower(): v.strip() for n, _, v in (line.partition(":") for line in lines)}, body


@pytest.mark.parametrize("length", [70_000, 1_000_000])
def test_over_long_url_is_a_json_414(stack: Stack, http: httpx.Client, length: int) -> None:
    """uvicorn's parser refused the line with a 400 (a client error that says nothing of what was wrong)."""
    auth = f"Authorization: Bearer {stack.api_key}\r\n".encode()
    raw = b"GET /v1/assistants/asst_" + b"a" * length + b" HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n"
    status, headers, body = _response(_exchange(stack.gateway.port, raw))
    assert status.startswith("HTTP/1.1 414 "), status
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and set(error) == {"message", "type", "param", "code"}
    assert "URL" in error["message"] and len(error["message"]) < ECHO_CAP
    assert http.get("/assistants", params={"limit": 1}).status_code == 200  # the gateway still serves


def test_requests_pipelined_before_an_over_long_url_get_their_own_responses(stack: Stack) -> None:
    """As with any unparsable request: the valid ones before it are answered, in order, and the 414 comes last."""
    auth = f"Authorization: Bearer {stack.api_key}\r\nOpenAI-Beta: assistants=v2\r\n".encode()
    good = b"GET /v1/assistants?limit=1 HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n"
    long = b"GET /v1/assistants/asst_" + b"c" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n"
    received = _exchange(stack.gateway.port, good + good + long + good)
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", received) == [b"200", b"200", b"414"], received[-500:]
    assert received.endswith(b"}}"), received[-500:]
