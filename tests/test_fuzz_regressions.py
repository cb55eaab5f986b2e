"""Regressions found by fuzzing the HTTP API: inputs the gateway accepted (or half-accepted) that then failed a
response, a stream, or a service downstream. Each test drives the real stack over HTTP; a broken platform shows
as a 5xx, an aborted stream or a run that never finishes."""

import json
import re
import socket
import time
from typing import Any

import httpx
import pytest
from error_helpers import http_error

from threadline_devstack.sql import Db
from threadline_devstack.stack import Stack

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TERMINAL = ("completed", "failed", "cancelled", "expired", "incomplete", "requires_action")


def _ok(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _run(http: httpx.Client, text: str, tools: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """Create an assistant with `tools` and a thread-and-run on `text`; wait until the run stops."""
    assistant = _ok(http.post("/assistants", json={"model": "m", "tools": tools}))
    run = _ok(http.post("/threads/runs", json={"assistant_id": assistant["id"], "thread": {
        "messages": [{"role": "user", "content": text}]}, **extra}))
    return _wait(http, run)


def _wait(http: httpx.Client, run: dict[str, Any], timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while run["status"] not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.2)
        run = _ok(http.get(f"/threads/{run['thread_id']}/runs/{run['id']}"))
    return run


def _tool_call(http: httpx.Client, run: dict[str, Any]) -> dict[str, Any]:
    steps = _ok(http.get(f"/threads/{run['thread_id']}/runs/{run['id']}/steps", params={
        "order": "asc", "include[]": "step_details.tool_calls[*].file_search.results[*].content"}))["data"]
    calls = [c for s in steps if s["type"] == "tool_calls" for c in s["step_details"]["tool_calls"]]
    assert len(calls) == 1, steps
    call: dict[str, Any] = calls[0]
    return call


def test_numbers_beyond_64_bits_read_back(http: httpx.Client) -> None:
    """1e20 in a function's schema came back from Postgres as the integer 100000000000000000000, which the gateway
    could not serialise (500 on retrieve and list) and the orchestrator could not put into an event (the run
    stayed queued, its command retried forever)."""
    parameters = {"type": "object", "properties": {"n": {"type": "number", "maximum": 1e20, "minimum": -1e300}}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": parameters}}]
    assistant = _ok(http.post("/assistants", json={"model": "m", "tools": tools}))
    assert _ok(http.get(f"/assistants/{assistant['id']}"))["tools"][0]["function"]["parameters"] == parameters
    listed = _ok(http.get("/assistants", params={"limit": 100}))["data"]
    assert any(a["id"] == assistant["id"] for a in listed)
    run = _ok(http.post("/threads/runs", json={"assistant_id": assistant["id"], "thread": {
        "messages": [{"role": "user", "content": "hi"}]}}))
    assert run["tools"][0]["function"]["parameters"] == parameters
    assert _wait(http, run)["status"] == "completed"

    store = _ok(http.post("/vector_stores", json={}))["id"]
    file_id = _ok(http.post("/files", files={"file": ("n.txt", b"numbers")}, data={"purpose": "assistants"}))["id"]
    attached = _ok(http.post(f"/vector_stores/{store}/files", json={"file_id": file_id,
                                                                      "attributes": {"big": 1e20, "neg": -1e300}}))
    assert attached["attributes"] == {"big": 1e20, "neg": -1e300}
    assert _ok(http.get(f"/vector_stores/{store}/files/{file_id}"))["attributes"] == {"big": 1e20, "neg": -1e300}
    assert _ok(http.get(f"/vector_stores/{store}/files"))["data"][0]["attributes"]["big"] == 1e20


def test_code_interpreter_output_with_nul_characters(http: httpx.Client) -> None:
    """A program printing chr(0): Postgres refuses NUL in jsonb, so the tool executor's answer could never be
    committed (retried forever, the run in progress for good). NULs are stored as U+FFFD."""
    code = json.dumps({"code": "print(chr(0) + 'x')"})
    run = _run(http, f"[[call:code_interpreter:{code}]]", [{"type": "code_interpreter"}])
    assert run["status"] == "completed", run
    outputs = _tool_call(http, run)["code_interpreter"]["outputs"]
    assert outputs == [{"type": "logs", "logs": "\ufffdx\n"}]


@pytest.mark.parametrize("tool", ["code_interpreter", "file_search"])
def test_tool_arguments_with_a_lone_surrogate(http: httpx.Client, tool: str) -> None:
    """Models sometimes send a broken escape (half of an emoji, `\\ud83d`, alone). Decoded, it could be neither
    stored (code_interpreter's input) nor put into an event (file_search's query): the run's driver crashed, the
    run was re-queued when its lease ran out, and crashed again until it expired. It is stored as U+FFFD."""
    argument = "code" if tool == "code_interpreter" else "query"
    run = _run(http, f'[[call:{tool}:{{"{argument}": "print(2)  # broken \\ud83d"}}]]', [{"type": tool}])
    assert run["status"] == "completed", run
    call = _tool_call(http, run)
    assert call["type"] == tool
    if tool == "code_interpreter":
        assert call["code_interpreter"] == {"input": "print(2)  # broken \ufffd",
                                            "outputs": [{"type": "logs", "logs": "2\n"}]}


def test_a_reply_with_a_lone_surrogate(http: httpx.Client) -> None:
    """The same broken escape in the model's text: orjson refuses it (the run failed on a "malformed chunk"), and
    Postgres would too. The reply keeps U+FFFD in its place, in the message and in its stream."""
    run = _run(http, '[[reply_json:"broken \\ud83d emoji"]]', [])
    assert run["status"] == "completed", run
    (reply,) = _ok(http.get(f"/threads/{run['thread_id']}/messages", params={"run_id": run["id"]}))["data"]
    assert reply["content"][0]["text"]["value"] == "broken \ufffd emoji"


def test_a_generated_file_whose_name_is_not_utf8(http: httpx.Client) -> None:
    """A program may name a file with any bytes; Python reads such a name back with surrogate escapes, which
    Postgres cannot store (the tool executor's answer failed every time). The file keeps U+FFFD in its name."""
    code = json.dumps({"code": "open(bytes([0x66, 0xff]) + b'.txt', 'wb').write(b'made')"})
    run = _run(http, f"[[call:code_interpreter:{code}]]", [{"type": "code_interpreter"}])
    assert run["status"] == "completed", run
    generated = _ok(http.get("/files", params={"purpose": "assistants_output", "limit": 20}))["data"]
    (file,) = [f for f in generated if f["created_at"] >= run["created_at"] and f["filename"].endswith(".txt")]
    assert file["filename"] == "/mnt/data/f\ufffd.txt"
    assert http.get(f"/files/{file['id']}/content").content == b"made"


def test_file_search_over_nul_text_and_one_unbroken_line(http: httpx.Client) -> None:
    """A text file holding NULs, and one 240 KB line without spaces: the tokenizer made a single token of the
    line, so the file was one 240 KB chunk; file_search answers carried NULs (never stored, as above) and chunks
    past Kafka's 1 MiB message limit (the outbox relay could not publish it, and every later event of every
    service waited behind it). Chunks are now bounded, and an answer's text is too."""
    store = _ok(http.post("/vector_stores", json={}))["id"]
    files = {"nul.txt": b"alpha\x00beta " * 200, "line.txt": b"word" * 60_000}
    ids = [_ok(http.post("/files", files={"file": (name, data)}, data={"purpose": "assistants"}))["id"]
           for name, data in files.items()]
    batch = _ok(http.post(f"/vector_stores/{store}/file_batches", json={"file_ids": ids}))
    deadline = time.monotonic() + 30
    while batch["status"] == "in_progress" and time.monotonic() < deadline:
        time.sleep(0.3)
        batch = _ok(http.get(f"/vector_stores/{store}/file_batches/{batch['id']}"))
    assert batch["file_counts"]["completed"] == 2, batch

    query = json.dumps({"query": "alpha beta word"})
    run = _run(http, f"[[call:file_search:{query}]]", [{"type": "file_search"}],
               tool_resources={"file_search": {"vector_store_ids": [store]}})
    assert run["status"] == "completed", run
    results = _tool_call(http, run)["file_search"]["results"]
    texts = [part["text"] for r in results for part in r["content"]]
    assert texts and all("\x00" not in t for t in texts)
    assert any("\ufffd" in t for t in texts)
    assert max(len(t) for t in texts) <= 800 * 32  # auto chunks: 800 tokens, a token at most 32 characters
    assert sum(len(t) for t in texts) <= 256 * 1024

    page = _ok(http.post(f"/vector_stores/{store}/search", json={"query": "word", "max_num_results": 50}))
    assert page["data"] and max(len(r["content"][0]["text"]) for r in page["data"]) <= 800 * 32
    assert _run(http, "still alive?", [])["status"] == "completed"  # the outbox relay is not held up


def test_event_too_large_for_kafka_is_refused(http: httpx.Client) -> None:
    """300,000 control characters are 1.8 MB as JSON: the message was stored, but its event could never be
    published, and no event of any service was published after it (every run stayed queued). Now: 413, and
    nothing is stored."""
    thread = _ok(http.post("/threads", json={}))["id"]
    # Text parts: a content string is refused (400) beyond 256,000 characters already.
    part = {"type": "text", "text": "\u0001" * 300_000}
    error = http_error(http.post(f"/threads/{thread}/messages", json={"role": "user", "content": [part]}), 413)
    assert re.fullmatch(r"Request too large: the object it creates or changes would be 1800\d{3} bytes as JSON; "
                        r"the maximum is 655360 bytes\.", error["message"]), error
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", None, "request_too_large")
    assert _ok(http.get(f"/threads/{thread}/messages"))["data"] == []
    message = {"role": "user", "content": [{"type": "text", "text": "x" * 700_000}]}
    error = http_error(http.post("/threads", json={"messages": [message]}), 413)
    assert error["code"] == "request_too_large"
    assert _run(http, "still alive?", [])["status"] == "completed"


def test_a_run_too_large_to_move_on_is_refused(http: httpx.Client) -> None:
    """A run whose created event just fit was accepted, but its in_progress event (a few fields more) did not: the
    orchestrator parked its command and the run stayed queued for good (its expired event did not fit either). A
    run must leave room to grow (64 KiB): 413 for this one; one within the room runs to its end."""
    assistant = _ok(http.post("/assistants", json={"model": "m"}))["id"]
    thread = {"messages": [{"role": "user", "content": "[[reply:ok]]"}]}
    error = http_error(http.post("/threads/runs", json={"assistant_id": assistant, "thread": thread,
                                                        "instructions": "\u20ac" * 210_000}), 413)
    assert re.fullmatch(r"Request too large: the object it creates or changes would be 630\d{3} bytes as JSON; "
                        r"the maximum is 589824 bytes\.", error["message"]), error
    run = _ok(http.post("/threads/runs", json={"assistant_id": assistant, "thread": thread,
                                               "instructions": "\u20ac" * 190_000}))
    assert _wait(http, run, timeout=60)["status"] == "completed"


def test_tool_outputs_too_large_together_are_refused(http: httpx.Client) -> None:
    """Two outputs within the limit of one, too large together for the step's completion event: accepted, then
    the run stayed queued for good (the command parked). Now 413, and the run still waits for its outputs."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    run = _run(http, "[[call:f:{}]] [[call:f:{}]]", tools)
    assert run["status"] == "requires_action", run
    calls = [c["id"] for c in run["required_action"]["submit_tool_outputs"]["tool_calls"]]
    path = f"/threads/{run['thread_id']}/runs/{run['id']}/submit_tool_outputs"
    error = http_error(http.post(path, json={"tool_outputs": [{"tool_call_id": c, "output": "o" * 400_000}
                                                              for c in calls]}), 413)
    assert error["code"] == "request_too_large"
    assert _ok(http.get(f"/threads/{run['thread_id']}/runs/{run['id']}"))["status"] == "requires_action"
    done = _ok(http.post(path, json={"tool_outputs": [{"tool_call_id": c, "output": "o" * 200_000} for c in calls]}))
    assert _wait(http, done, timeout=60)["status"] == "completed"


def test_stream_cursor_beyond_bigint(http: httpx.Client) -> None:
    """`after` / Last-Event-ID above 2**63 - 1 answered 200, then the stream broke (the query could not bind it)."""
    run = _run(http, "hello", [])
    path = f"/threads/{run['thread_id']}/runs/{run['id']}/events"
    expected = {"type": "invalid_request_error", "param": "Last-Event-ID", "code": "invalid_value"}
    for url, headers in ((f"{path}?after=9223372036854775808", {}), (path, {"Last-Event-ID": "9" * 30}),
                         (f"{path}?after={'9' * 5000}", {}), (f"{path}?after=1_0", {}),
                         ("/events?after=9223372036854775808", {}), ("/events?after=%2B5", {})):
        error = http_error(http.get(url, headers=headers), 400)
        assert {k: error[k] for k in expected} == expected, url
        assert error["message"].startswith("Invalid Last-Event-ID: '")
    assert http_error(http.get(f"{path}?after=-1"), 400)["message"] == "Invalid Last-Event-ID: must not be negative."
    largest = http_error(http.get(f"{path}?after=9223372036854775807"), 400)  # an id, but none was ever sent
    assert largest["message"].startswith("Invalid Last-Event-ID: '9223372036854775807' is after the last event.")


def test_client_leaving_mid_body_is_no_server_error(stack: Stack, http: httpx.Client) -> None:
    """A client that announces 1000 bytes, sends 20 and hangs up was logged as an unhandled error (a 500)."""
    port = stack.gateway.port
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"POST /v1/assistants HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + stack.api_key.encode()
                         + b"\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\": \"m\", \"na")
    time.sleep(0.5)
    assert _ok(http.get("/assistants", params={"limit": 1}))["object"] == "list"
    assert "ClientDisconnect" not in stack.gateway.log_tail(200)


def _indexed_store(http: httpx.Client, data: bytes) -> str:
    """A vector store holding one text file, its indexing finished."""
    file_id = _ok(http.post("/files", files={"file": ("fox.txt", data)}, data={"purpose": "assistants"}))["id"]
    store = _ok(http.post("/vector_stores", json={"file_ids": [file_id]}))
    deadline = time.monotonic() + 30
    while store["file_counts"]["in_progress"] and time.monotonic() < deadline:
        time.sleep(0.3)
        store = _ok(http.get(f"/vector_stores/{store['id']}"))
    assert store["file_counts"]["completed"] == 1, store
    return str(store["id"])


def test_search_query_length_is_bounded(http: httpx.Client) -> None:
    """A 1.5 MB query was a 503 'retry shortly' (the broker refused the request); a 900 KB one was embedded window
    by window for minutes, so it and every search after it got 504s. The API refuses queries over 4096 characters
    (400), and a file_search call's query (the model's) is embedded from its first 4096 characters only."""
    store = _indexed_store(http, b"The quick brown fox jumps over the lazy dog. " * 50)
    path = f"/vector_stores/{store}/search"
    for query, param in (("fox " * 400_000, "query"), ("x" * 4097, "query"), (["fox", "x" * 4097], "query[1]")):
        error = http_error(http.post(path, json={"query": query}), 400)
        assert (error["param"], error["code"]) == (param, "string_above_max_length"), error
        assert "Expected a string with maximum length 4096" in error["message"]
    assert _ok(http.post(path, json={"query": ["fox " * 1024] * 2}))["data"]
    started = time.monotonic()
    query = json.dumps({"query": "fox " * 60_000})
    run = _run(http, f"[[call:file_search:{query}]]", [{"type": "file_search"}],
               tool_resources={"file_search": {"vector_store_ids": [store]}})
    assert run["status"] == "completed", run
    assert _tool_call(http, run)["file_search"]["results"]
    assert time.monotonic() - started < 20
    assert _ok(http.post(path, json={"query": "fox"}))["data"]


def test_repeated_include_is_kept_once(http: httpx.Client, db: Db) -> None:
    """`include[]` repeated 500 times (a 34 KB query string) was stored with the run as 500 copies."""
    value = "step_details.tool_calls[*].file_search.results[*].content"
    assistant = _ok(http.post("/assistants", json={"model": "m"}))["id"]
    thread = _ok(http.post("/threads", json={}))["id"]
    query = "&".join([f"include[]={value}"] * 500)
    run = _ok(http.post(f"/threads/{thread}/runs?{query}", json={"assistant_id": assistant}))
    assert db.fetchval("SELECT step_include FROM runs WHERE id = $1", run["id"]) == [value]
    steps = http.get(f"/threads/{thread}/runs/{run['id']}/steps?{query}")
    assert steps.status_code == 200, steps.text


@pytest.mark.parametrize("tool,arguments", [
    ("file_search", r'{"query": "fox\u0000"}'), ("file_search", r'{"a": "\u0000b"}'),
    ("code_interpreter", r'{"code": "print(1)\u0000"}'), ("code_interpreter", r'{"a": "\u0000b"}'),
], ids=["search-query", "search-other", "code", "code-other"])
def test_server_tool_arguments_decoding_to_nul(http: httpx.Client, tool: str, arguments: str) -> None:
    """A model's call whose JSON arguments decode to a NUL (`\\u0000`): Postgres refused the tool request in the
    outbox (or the step's code_interpreter input), so the run's driver crashed, was re-queued and crashed again
    until the run expired. NULs are stored as U+FFFD; the run goes on."""
    run = _run(http, f"[[call:{tool}:{arguments}]]", [{"type": tool}])
    assert run["status"] == "completed", run
    call = _tool_call(http, run)
    assert call["type"] == tool and "\x00" not in json.dumps(call, ensure_ascii=False)


@pytest.mark.unit
def test_source_markers_with_huge_indexes_cite_nothing() -> None:
    """A reply holding `【<5000 digits>:0†a.txt】` (text a tool output or a file can hold): int() refused the
    index, so every text delta failed and the orchestrator's run driver crashed until the run expired."""
    from threadline_search.citations import citation_annotations, delta_annotations

    calls = [[{"file_id": "file-a", "file_name": "a.txt"}]]
    huge = "【" + "9" * 5000 + ":0†b.txt】 【0:" + "9" * 5000 + "†b.txt】 【" + "9" * 5000 + "†b.txt】 "
    text = huge + "【0:0†a.txt】"
    assert [a["start_index"] for a in citation_annotations(text, calls)] == [len(huge)]
    steps = [{"step_details": {"type": "tool_calls", "tool_calls": [
        {"type": "file_search", "file_search": {"results": calls[0]}}]}}]
    assert [a["index"] for a in delta_annotations(text, 0, steps)] == [0]
