"""Error handling of the gateway at the HTTP level: auth, malformed and oversized bodies, routing, and a
barrage of bad inputs that must all get a 4xx in the OpenAI error format, never a 500."""

import asyncio
import itertools
import json
import re
import socket
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import httpx
import openai
import pytest
from error_helpers import http_error, lost_in_transaction
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.settings import GatewaySettings
from threadline_devstack.stack import Stack

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

MAX_BODY = 2 * 1024 * 1024  # GatewaySettings.max_body_bytes default


def _assert_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return error


def test_missing_or_wrong_api_key(stack: Stack) -> None:
    with httpx.Client(base_url=stack.base_url, trust_env=False, timeout=10) as raw:
        error = _assert_error(raw.get("/assistants"), 401)
        assert error["type"] == "invalid_request_error"
        error = _assert_error(raw.get("/assistants", headers={"Authorization": "Bearer sk-wrong"}), 401)
        assert error["code"] == "invalid_api_key"
        _assert_error(raw.get("/assistants", headers={"Authorization": "Basic abc"}), 401)
    sdk = openai.OpenAI(base_url=stack.base_url, api_key="sk-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        sdk.beta.assistants.list()


def test_malformed_json(http: httpx.Client) -> None:
    for raw in (b"{", b"{'model': 'x'}", b'{"model": "x",}', b"\xff\xfe", b'{"model": NaN}', b'{"a": "\\ud800"}'):
        error = _assert_error(http.post("/assistants", content=raw, headers={"content-type": "application/json"}),
                              400)
        assert "could not parse the JSON body" in error["message"]


def test_body_must_be_an_object(http: httpx.Client) -> None:
    for raw in (b"[]", b'"text"', b"42", b"null"):
        _assert_error(http.post("/assistants", content=raw, headers={"content-type": "application/json"}), 400)


def test_null_characters_are_refused(http: httpx.Client) -> None:
    error = _assert_error(http.post("/assistants", json={"model": "m", "name": "a\u0000b"}), 400)
    assert "null characters" in error["message"]
    _assert_error(http.post("/threads", json={"metadata": {"k\u0000": "v"}}), 400)


def test_deeply_nested_json_is_refused(http: httpx.Client) -> None:
    for depth in (100, 300, 2000):
        deep = "[" * depth + "]" * depth
        raw = ('{"model": "m", "tools": [{"type": "function", "function": {"name": "f", "parameters": {"a": '
               + deep + "}}}]}").encode()
        _assert_error(http.post("/assistants", content=raw, headers={"content-type": "application/json"}), 400)
    shallow = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "string"}}}}}
    ok = http.post("/assistants", json={"model": "m", "tools": [{"type": "function", "function": {
        "name": "f", "parameters": shallow}}]})
    assert ok.status_code == 200, ok.text
    assert ok.json()["tools"][0]["function"]["parameters"] == shallow


def test_oversized_body_by_content_length(http: httpx.Client) -> None:
    big = b'{"model": "m", "instructions": "' + b"x" * (MAX_BODY + 10) + b'"}'
    error = _assert_error(http.post("/assistants", content=big, headers={"content-type": "application/json"}), 413)
    assert str(MAX_BODY) in error["message"]


def test_oversized_body_streamed(http: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "m", "instructions": "'
        for _ in range(40):
            yield b"x" * 65536
        yield b'"}'

    response = http.post("/assistants", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in {k.lower() for k in response.request.headers}
    _assert_error(response, 413)


def test_body_just_under_the_limit_is_accepted(http: httpx.Client) -> None:
    response = http.post("/assistants", json={"model": "m", "instructions": "y" * 200_000})
    assert response.status_code == 200, response.text


def test_unknown_route_and_wrong_method(http: httpx.Client) -> None:
    error = _assert_error(http.get("/nothing/here"), 404)
    assert error["message"] == "Invalid URL (GET /v1/nothing/here)"
    _assert_error(http.put("/assistants", json={}), 405)
    _assert_error(http.patch("/threads/thread_x", json={}), 405)
    _assert_error(http.delete("/threads/thread_x/runs"), 405)


def test_a_trailing_slash_is_an_unknown_route_not_a_redirect(http: httpx.Client, client: openai.OpenAI) -> None:
    """Paths ending in "/" were redirected (307) to the path without it, and the SDK follows redirects: updating
    the thread "/" created a new thread, and "thread_x/" updated thread_x."""
    thread = client.beta.threads.create()
    for path in ("/threads/", f"/threads/{thread.id}/", "/threads/%2F", "/assistants/", "/threads/runs/"):
        response = http.post(path, json={"metadata": {"k": "v"}})
        error = _assert_error(response, 404)
        assert error["message"].startswith("Invalid URL (POST /v1/threads/") or \
            error["message"] == "Invalid URL (POST /v1/assistants/)", error
        assert "location" not in response.headers
    with pytest.raises(openai.NotFoundError):
        client.beta.threads.update("/", metadata={"k": "v"})
    assert client.beta.threads.retrieve(thread.id).metadata == {}


def test_bad_query_parameters(http: httpx.Client) -> None:
    for query in ({"limit": "ten"}, {"limit": "0"}, {"limit": "1000"}, {"order": "random"}, {"limit": "1.5"}):
        _assert_error(http.get("/assistants", params=query), 400)


# --- the barrage ------------------------------------------------------------------------------------------

BAD_VALUES: list[Any] = [None, 0, -1, 1.5, 10**30, True, "", "x" * 300, "🙂", [], [1], ["a"], {}, {"a": 1},
                         {"type": "nope"}, [{}], [{"type": "function"}], [None]]


def _bodies(fields: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A valid body, then every field swapped for every bad value, removed, and some extras."""
    yield dict(fields)
    for name, value in itertools.product(fields, BAD_VALUES):
        yield {**fields, name: value}
    for name in fields:
        yield {k: v for k, v in fields.items() if k != name}
    yield {**fields, "unexpected": 1}
    yield {**fields, "metadata": {f"k{i}": "v" for i in range(20)}}


def test_unknown_response_format_type_names_the_supported_ones(http: httpx.Client) -> None:
    """An object of an unknown type is refused on its `type`, listing the object types (it once listed only
    'auto', the string member of the union)."""
    response = http.post("/assistants", json={"model": "m", "response_format": {"type": "yaml"}})
    error = http_error(response, 400)
    assert error["param"] == "response_format.type" and error["code"] == "invalid_value"
    assert all(kind in error["message"] for kind in ("'text'", "'json_object'", "'json_schema'")), error


def test_a_type_that_is_not_a_string_is_named_as_such(http: httpx.Client) -> None:
    """`{"type": null}` in a list of tools said "Supported values are: ." (no tag to compare, none listed)."""
    for value, kind in ((None, "null"), (3, "an integer"), (["function"], "an array")):
        error = http_error(http.post("/assistants", json={"model": "m", "tools": [{"type": value}]}), 400)
        assert error["message"] == f"Invalid type for 'tools[0].type': expected a string, but got {kind} instead."
        assert (error["param"], error["code"]) == ("tools[0].type", "invalid_type")


@pytest.mark.parametrize("body,message,code", [
    # A whole number sent for a decimal field was called an integer, and the bound printed as 2.0.
    ({"model": "m", "temperature": 3}, "Invalid 'temperature': decimal above maximum value. Expected a value <= 2, "
     "but got 3 instead.", "decimal_above_max_value"),
    ({"model": "m", "top_p": -0.5}, "Invalid 'top_p': decimal below minimum value. Expected a value >= 0, but got "
     "-0.5 instead.", "decimal_below_min_value"),
    ({"model": "m", "tools": [{"type": "file_search", "file_search": {"max_num_results": 51}}]},
     "Invalid 'tools[0].file_search.max_num_results': integer above maximum value. Expected a value <= 50, but got "
     "51 instead.", "integer_above_max_value"),
])
def test_number_bounds_are_worded_by_the_fields_type(http: httpx.Client, body: dict[str, Any], message: str,
                                                     code: str) -> None:
    """As hosted: "decimal" for a number field whatever the JSON sent (`temperature: 3`), a whole bound as `2`."""
    error = http_error(http.post("/assistants", json=body), 400)
    assert (error["message"], error["code"]) == (message, code)

def test_barrage_of_bad_inputs_never_500(http: httpx.Client) -> None:
    assistant = http.post("/assistants", json={"model": "m"}).json()
    thread = http.post("/threads", json={}).json()
    message = http.post(f"/threads/{thread['id']}/messages", json={"role": "user", "content": "x"}).json()
    asst, th, msg = assistant["id"], thread["id"], message["id"]
    targets: list[tuple[str, dict[str, Any]]] = [
        ("/assistants", {"model": "m", "name": "n", "tools": [{"type": "code_interpreter"}], "temperature": 1,
                         "response_format": "auto", "tool_resources": {}, "metadata": {}}),
        (f"/assistants/{asst}", {"name": "n", "instructions": "i", "top_p": 1, "tools": []}),
        ("/threads", {"messages": [{"role": "user", "content": "hi"}], "metadata": {}, "tool_resources": {}}),
        (f"/threads/{th}", {"metadata": {"a": "b"}, "tool_resources": {}}),
        (f"/threads/{th}/messages", {"role": "user", "content": "hi", "attachments": [], "metadata": {}}),
        (f"/threads/{th}/messages/{msg}", {"metadata": {"a": "b"}}),
        ("/threads/runs", {"assistant_id": asst, "thread": {"messages": []}, "tool_choice": "auto",
                           "truncation_strategy": {"type": "auto"}}),
        (f"/threads/{th}/runs", {"assistant_id": asst, "model": "m", "additional_messages": [],
                                 "max_completion_tokens": 500, "parallel_tool_calls": True}),
        (f"/threads/{th}/runs/run_missing", {"metadata": {}}),
    ]
    seen = 0
    for path, fields in targets:
        for body in _bodies(fields):
            response = http.post(path, json=body)
            assert response.status_code < 500, (path, body, response.text)
            if response.status_code >= 400:
                _assert_error(response, response.status_code)
            seen += 1
    for path in ("/assistants/%00", "/threads/%00/messages", f"/threads/{th}/runs/%00/steps",
                 "/assistants/" + "a" * 5000, f"/threads/{th}/messages?limit=5&after=%00",
                 f"/threads/{th}/messages?run_id=%00"):
        response = http.get(path)
        assert 400 <= response.status_code < 500, (path, response.text)
        error = _assert_error(response, response.status_code)
        if "%00" in path:
            assert error["message"] == "Invalid value in request: text may not contain the NUL character (\\u0000).", \
                (path, error)
    for path in (f"/threads/{th}/runs/run_x/cancel", "/assistants/asst_x", f"/threads/{th}/messages/msg_x"):
        assert 400 <= http.post(path, json={}).status_code < 500
        assert 400 <= http.delete(path).status_code < 500
    assert seen > 500


def _raw_exchange(port: int, raw: bytes) -> tuple[str, dict[str, str], bytes]:
    """Send bytes as they are and read until the gateway closes: (status line, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return status, headers, body


@pytest.mark.parametrize("raw", [
    b"GET /v1/assistants HTTP/1.1\r\nHost: x\r\nX-Note: a\x01b\r\n\r\n",  # a control character in a header
    b"GET /v1/assistants HTTP/1.1\r\nHost: x\r\nBad Name: v\r\n\r\n",  # a space in a header name
    b"\x16\x03\x01\x02\x00 not http\r\n\r\n",  # no request line at all (TLS to the plain port)
    b"GET /v1/assistants HTTP/9.9.9\r\nHost: x\r\n\r\n",  # a garbage version
], ids=["control-char-in-header", "space-in-header-name", "tls-bytes", "bad-version"])
def test_unparsable_http_gets_a_json_400(stack: Stack, http: httpx.Client, raw: bytes) -> None:
    """uvicorn answered these with a plain-text 400; SDK clients parse error bodies as JSON."""
    status, headers, body = _raw_exchange(stack.gateway.port, raw)
    assert status.startswith("HTTP/1.1 400 "), status
    assert headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(body) and headers["connection"] == "close"
    assert json.loads(body) == {"error": {
        "message": "Invalid HTTP request received: its request line or headers could not be parsed.",
        "type": "invalid_request_error", "param": None, "code": None}}
    assert http.get("/assistants", params={"limit": 1}).status_code == 200  # the gateway still serves


def test_requests_pipelined_before_an_unparsable_one_get_their_own_responses(stack: Stack) -> None:
    """A valid request followed on its connection by bytes that cannot be parsed: the 400 was written at once and
    the connection closed, so the valid request's response was lost and the client read the 400 as its answer.
    Now each valid request is answered, in order, and the 400 comes last."""
    auth = f"Authorization: Bearer {stack.api_key}\r\nOpenAI-Beta: assistants=v2\r\n".encode()
    good = b"GET /v1/assistants?limit=1 HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n"
    body = b'{"model": "m", "name": "pipelined"}'
    create = (b"POST /v1/assistants HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Type: application/json\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    for bad in (b"GARBAGE\r\n\r\n", b"GET /v1/assistants HTTP/1.1\r\nBad Name: v\r\n\r\n",
                b"POST /v1/assistants HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"):
        with socket.create_connection(("127.0.0.1", stack.gateway.port), timeout=10) as sock:
            sock.sendall(good + create + bad + good)
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
        statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", received)
        assert statuses == [b"200", b"200", b"400"], received
        assert b'"name":"pipelined"' in received and received.endswith(b'"param":null,"code":null}}'), received


def test_an_idle_connection_outlives_the_clients_keep_alive(stack: Stack) -> None:
    """The gateway closed idle connections after 5 s, the SDK's own keep-alive expiry, so a request sent on a
    connection just as the server closed it failed (APIConnectionError in the bench). It keeps them 65 s now."""
    request = (b"GET /v1/assistants?limit=1 HTTP/1.1\r\nHost: x\r\n"
               b"Authorization: Bearer " + stack.api_key.encode() + b"\r\n\r\n")

    def exchange(sock: socket.socket) -> bytes:
        sock.sendall(request)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            assert chunk, "the gateway closed the connection"
            received += chunk
        head, body = received.split(b"\r\n\r\n", 1)
        length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
        while len(body) < length:
            body += sock.recv(65536)
        return head

    with socket.create_connection(("127.0.0.1", stack.gateway.port), timeout=10) as sock:
        assert exchange(sock).startswith(b"HTTP/1.1 200 ")
        time.sleep(6)  # past the SDK's (and uvicorn's default) 5 s
        assert exchange(sock).startswith(b"HTTP/1.1 200 ")


@pytest.mark.unit
def test_an_unexpected_error_is_a_json_500_that_closes_the_connection() -> None:
    """A bug (never bad input) answers in the OpenAI format and says that the connection ends (Starlette re-raises
    after the response, and uvicorn then closes the connection)."""
    app = create_app(GatewaySettings())

    @app.get("/v1/boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    response = TestClient(app, raise_server_exceptions=False).get("/v1/boom")
    assert response.status_code == 500 and response.headers["connection"] == "close"
    assert response.json() == {"error": {"message": "The server had an error while processing your request.",
                                         "type": "server_error", "param": None, "code": None}}
    assert re.fullmatch(r"req_[0-9a-f]{32}", response.headers["x-request-id"])  # answered outside the middleware


@pytest.mark.unit
@pytest.mark.parametrize("lost", [ConnectionRefusedError(111, "Connection refused"),
                                  asyncpg.ConnectionDoesNotExistError("connection was closed mid-operation"),
                                  asyncpg.CannotConnectNowError("the database system is starting up")],
                         ids=["refused", "closed", "starting"])
def test_a_database_outage_is_a_503_to_retry(lost: Exception) -> None:
    """Postgres stopped for a few seconds: every request was a 500 with a traceback in the log; it is a 503 with
    Retry-After (the SDK retries it), and the connection stays open."""
    app = create_app(GatewaySettings())

    @app.get("/v1/lost")
    async def lost_database() -> None:
        raise lost

    response = TestClient(app, raise_server_exceptions=False).get("/v1/lost")
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert "connection" not in response.headers
    assert response.json()["error"] == {
        "message": "The server is temporarily unable to handle your request (its database is unavailable). Please "
                   "retry shortly.", "type": "server_error", "param": None, "code": "service_unavailable"}


@pytest.mark.unit
@pytest.mark.parametrize("lost", [lost_in_transaction(),
                                  asyncpg.InternalClientError("cannot switch to state 12; another operation (2) is "
                                                              "in progress")],
                         ids=["closed-in-transaction", "server-left-mid-operation"])
def test_a_connection_lost_mid_request_is_a_503(lost: Exception) -> None:
    """The chaos trial killed Postgres under load: requests in flight were 500s, because asyncpg reports a connection
    lost inside a transaction as an InterfaceError (from the transaction's exit, the loss as its context) and one
    whose server sent its farewell between two operations as an InternalClientError. Both are the outage's 503."""
    app = create_app(GatewaySettings())

    @app.get("/v1/lost")
    async def lost_database() -> None:
        raise lost

    response = TestClient(app, raise_server_exceptions=False).get("/v1/lost")
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "service_unavailable"


def _bug_while_handling_a_reset() -> Exception:
    """A bug of our own raised while an OSError (here a reset connection) was being handled."""
    try:
        try:
            raise ConnectionResetError("peer reset")
        finally:
            raise KeyError("bug")
    except KeyError as exc:
        return exc


@pytest.mark.unit
@pytest.mark.parametrize("bug", [asyncpg.InterfaceError("cannot perform operation: another operation is in progress"),
                                 _bug_while_handling_a_reset()], ids=["interface-misuse", "bug-in-oserror-handling"])
def test_other_errors_stay_500(bug: Exception) -> None:
    """An InterfaceError with no lost connection behind it, or any other error raised while a lost connection was
    being handled, is a bug, not an outage: still a 500."""
    app = create_app(GatewaySettings())

    @app.get("/v1/misuse")
    async def misuse() -> None:
        raise bug

    response = TestClient(app, raise_server_exceptions=False).get("/v1/misuse")
    assert response.status_code == 500


async def test_a_backend_terminated_inside_a_transaction_is_a_503(stack: Stack, client: openai.OpenAI) -> None:
    """Through the real stack: submit_tool_outputs waits for the run's row lock inside its transaction when its
    database session is terminated (as when Postgres crashes): a 503 to retry, not a 500."""
    tool: Any = {"type": "function", "function": {"name": "ping", "parameters": {"type": "object"}}}
    assistant = client.beta.assistants.create(model="gpt-4o", tools=[tool])
    thread = client.beta.threads.create(messages=[{"role": "user", "content": "[[call:ping:{}]]"}])
    run = client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id,
                                                   poll_interval_ms=100)
    assert run.status == "requires_action" and run.required_action is not None
    outputs = [{"tool_call_id": c.id, "output": "pong"} for c in run.required_action.submit_tool_outputs.tool_calls]
    holder = await asyncpg.connect(stack.database_url)
    try:
        async with holder.transaction():
            await holder.execute("SELECT 1 FROM runs WHERE id = $1 FOR UPDATE", run.id)
            with httpx.Client(base_url=stack.base_url, headers={"Authorization": f"Bearer {stack.api_key}"},
                              timeout=30, trust_env=False) as http:
                submit = asyncio.create_task(asyncio.to_thread(
                    http.post, f"/threads/{thread.id}/runs/{run.id}/submit_tool_outputs",
                    json={"tool_outputs": outputs}))
                waiting = None
                deadline = time.monotonic() + 60
                while waiting is None and time.monotonic() < deadline and not submit.done():
                    waiting = await holder.fetchval("SELECT pid FROM pg_stat_activity"
                                                    " WHERE pg_backend_pid() = ANY(pg_blocking_pids(pid))")
                    await asyncio.sleep(0.05)
                assert waiting is not None, "the submission never waited for the run's lock"
                await holder.execute("SELECT pg_terminate_backend($1)", waiting)
                response = await submit
    finally:
        await holder.close()
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "service_unavailable"
