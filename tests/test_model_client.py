"""The orchestrator's model client against a scripted HTTP/1.1 server that sends exact bytes.

The client decodes the streamed chat completion itself (server-sent events, JSON chunks), so these
tests pin the wire cases: events split anywhere across reads, CRLF lines, chunked bodies, keep-alive,
status errors, in-stream errors, a server that stops answering or drops the connection mid-stream.
"""

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from pydantic import ValidationError

from run_orchestrator.images import ImageFetchError
from run_orchestrator.model import (
    IMAGE_FETCHES_AT_ONCE,
    ModelClient,
    ModelError,
    ModelTurn,
    PartialCall,
    ThinkingFilter,
)
from run_orchestrator.prompt import allowed_calls
from run_orchestrator.repository import RunRow
from run_orchestrator.service import RunService, Turn
from run_orchestrator.settings import RunOrchestratorSettings
from run_orchestrator.tools import ModelToolCall, code_so_far
from threadline_devstack.model_server import ScriptedModelServer

pytestmark = pytest.mark.unit

REQUEST = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True,
           "stream_options": {"include_usage": True}}

Reply = Callable[[asyncio.StreamWriter], Awaitable[None]]


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, usage: dict[str, int] | None = None) -> str:
    """One `chat.completion.chunk` as an SSE event."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return "data: " + json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                                  "choices": choices, "usage": usage}) + "\n\n"


def chunked(*pieces: bytes) -> bytes:
    """An HTTP/1.1 chunked body made of `pieces`."""
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def sse_reply(*pieces: bytes, pause: float = 0.0) -> Reply:
    """200 text/event-stream, each piece one chunk of the chunked body (a pause between them)."""
    async def reply(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for piece in pieces:
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(pause)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
    return reply


def status_reply(status: int, body: dict[str, Any]) -> Reply:
    """An error status with a JSON body."""
    async def reply(writer: asyncio.StreamWriter) -> None:
        data = json.dumps(body).encode()
        writer.write(b"HTTP/1.1 %d Err\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                     % (status, len(data), data))
        await writer.drain()
    return reply


class Server:
    """Answers each request with the next scripted reply; counts connections and requests."""

    def __init__(self, replies: list[Reply]) -> None:
        self.replies = replies
        self.connections = 0
        self.requests: list[dict[str, Any]] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve requests on one connection until the client closes it or a reply drops it."""
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                self.requests.append(json.loads(await reader.readexactly(length)))
                await self.replies.pop(0)(writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def serving(replies: list[Reply], *, model_timeout: float = 5.0, max_retries: int = 0,
                  aliases: dict[str, str] | None = None) -> AsyncIterator[tuple[Server, ModelClient]]:
    """A scripted server and a model client pointed at it."""
    server = Server(replies)
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    client = ModelClient(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", timeout=model_timeout,
                         max_retries=max_retries, retry_backoff=0.01, aliases=aliases)
    try:
        yield server, client
    finally:
        await client.close()
        listener.close()


async def collect(client: ModelClient, calls: list[tuple[int, str, str, str]] | None = None
                  ) -> tuple[ModelTurn, list[str]]:
    """Stream once; return the turn and the text pieces handed to the sink (`calls` gets each tool call's index,
    id, name and arguments each time it grows)."""
    pieces: list[str] = []

    async def sink(text: str) -> None:
        pieces.append(text)

    async def call_sink(index: int, call: PartialCall) -> None:
        if calls is not None:
            calls.append((index, call.id, call.name, call.arguments_text()))
    return await client.stream(REQUEST, sink, call_sink), pieces


async def test_text_split_across_reads_with_crlf_and_keep_alive() -> None:
    body = (chunk({"role": "assistant", "content": ""}) + chunk({"content": "Hel"}) + chunk({"content": "lo"})
            + chunk({}, "stop") + chunk(usage={"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})
            + "data: [DONE]\n\n").encode()
    crlf = body.replace(b"\n", b"\r\n")
    async with serving([sse_reply(*(body[i:i + 7] for i in range(0, len(body), 7))),
                        sse_reply(crlf[:3], crlf[3:50], crlf[50:])]) as (server, client):
        for _ in range(2):
            turn, pieces = await collect(client)
            assert turn.text == "Hello" and "".join(pieces) == "Hello"
            assert turn.finish_reason == "stop" and turn.tool_calls == []
            assert turn.usage == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        assert server.connections == 1  # the body was read to its end: the connection was reused
        assert server.requests[0] == REQUEST


async def test_tool_call_fragments_are_joined_in_index_order() -> None:
    body = (chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                                   "function": {"name": "g", "arguments": ""}}]})
            + chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                                     "function": {"name": "f", "arguments": '{"x"'}}]})
            + chunk({"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]})
            + chunk({"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]})
            + chunk({}, "tool_calls") + "data: [DONE]\n\n").encode()
    seen: list[tuple[int, str, str, str]] = []
    async with serving([sse_reply(body)]) as (_, client):
        turn, pieces = await collect(client, seen)
    assert pieces == [] and turn.finish_reason == "tool_calls"
    assert [(c.id, c.name, c.arguments) for c in turn.tool_calls] == [("call_a", "f", '{"x": 1}'),
                                                                       ("call_b", "g", "{}")]
    assert seen == [(1, "call_b", "g", ""), (0, "call_a", "f", '{"x"'), (0, "call_a", "f", '{"x": 1}'),
                    (1, "call_b", "g", "{}")]  # as the model writes them


async def test_a_call_without_id_gets_one_from_its_first_chunk_on() -> None:
    body = (chunk({"tool_calls": [{"index": 0, "type": "function", "function": {"name": "f", "arguments": "{"}}]})
            + chunk({"tool_calls": [{"index": 0, "function": {"arguments": "}"}}]})
            + chunk({}, "tool_calls") + "data: [DONE]\n\n").encode()
    seen: list[tuple[int, str, str, str]] = []
    async with serving([sse_reply(body)]) as (_, client):
        turn, _ = await collect(client, seen)
    assert turn.tool_calls[0].id.startswith("call_") and {s[1] for s in seen} == {turn.tool_calls[0].id}


async def test_a_failure_after_a_tool_call_began_is_not_retried() -> None:
    """Its step is open and showing the call: a second call would write other calls into it."""
    broken = sse_reply((chunk({"tool_calls": [{"index": 0, "id": "call_a", "function": {"name": "f"}}]})
                        + 'data: {"error": {"message": "overloaded"}}\n\n').encode())
    ok = sse_reply((chunk({"content": "ok"}) + chunk({}, "stop") + "data: [DONE]\n\n").encode())
    async with serving([broken, ok], max_retries=1) as (_, client):
        with pytest.raises(ModelError) as raised:
            await collect(client)
    assert "overloaded" in raised.value.message


@pytest.mark.parametrize(("status", "code", "words"), [(429, "rate_limit_exceeded", "rate limited: slow down"),
                                                       (503, "server_error", "HTTP 503: slow down"),
                                                       (400, "invalid_prompt", "HTTP 400: slow down")])
async def test_status_errors(status: int, code: str, words: str) -> None:
    async with serving([status_reply(status, {"error": {"message": "slow down"}})]) as (_, client):
        with pytest.raises(ModelError) as raised:
            await collect(client)
    assert raised.value.code == code and words in raised.value.message


@pytest.mark.parametrize(("body", "context", "prompt"), [
    ({"object": "error", "code": 400, "message": "This model's maximum context length is 4096 tokens. However, you"
      " requested 5024 tokens (4000 in the messages, 1024 in the completion). Please reduce the length of the messages"
      " or completion."}, 4096, 4000),  # vLLM before 0.10
    ({"object": "error", "code": 400, "message": "This model's maximum context length is 2048 tokens. However, your"
      " request has 3000 input tokens. Please reduce the length of the input messages."}, 2048, 3000),  # vLLM
    ({"error": {"message": "This model's maximum context length is 8192 tokens. However, your messages resulted in"
                " 9000 tokens. Please reduce the length of the messages.", "code": "context_length_exceeded"}},
     8192, 9000),  # OpenAI
    ({"error": {"code": 400, "type": "exceed_context_size_error", "n_prompt_tokens": 13392, "n_ctx": 8192,
                "message": "request (13392 tokens) exceeds the available context size (8192 tokens), try increasing"
                " it"}}, 8192, 13392),  # llama.cpp
    ({"error": {"code": 400, "message": "request (13392 tokens) exceeds the available context size (8192 tokens)"}},
     8192, 13392),  # llama.cpp's words without its fields
    ({"error": {"message": "This model's maximum context length is 128000 tokens."}}, 128000, None),
])
async def test_a_prompt_longer_than_the_context_says_how_long_the_context_is(
        body: dict[str, Any], context: int, prompt: int | None) -> None:
    async with serving([status_reply(400, body)]) as (_, client):
        with pytest.raises(ModelError) as raised:
            await collect(client)
    assert raised.value.code == "invalid_prompt"
    assert raised.value.overflow is not None
    assert (raised.value.overflow.context_tokens, raised.value.overflow.prompt_tokens) == (context, prompt)


async def test_other_refusals_say_nothing_of_the_context() -> None:
    async with serving([status_reply(400, {"error": {"message": "slow down"}})]) as (_, client):
        with pytest.raises(ModelError) as raised:
            await collect(client)
    assert raised.value.overflow is None


async def test_a_learnt_context_is_the_shorter_of_what_the_server_said() -> None:
    async with serving([], aliases={"gpt-4-turbo": "llama3.1:8b"}) as (_, client):
        assert client.context_tokens("gpt-4-turbo") == 0
        client.learn_context("gpt-4-turbo", 3000)
        assert client.context_tokens("gpt-4-turbo") == 3000
        assert client.context_tokens("llama3.1:8b") == 3000  # a property of the served model
        assert client.context_tokens("gpt-4o") == 0


async def test_failures_before_output_are_retried() -> None:
    ok = sse_reply((chunk({"content": "ok"}) + chunk({}, "stop") + "data: [DONE]\n\n").encode())
    async with serving([status_reply(500, {"error": {"message": "boom"}}), ok], max_retries=1) as (_, client):
        turn, _ = await collect(client)
    assert turn.text == "ok"


@pytest.mark.parametrize(("aliases", "asked", "sent"), [
    ({"gpt-4-turbo": "llama3.1:8b", "*": "qwen2.5"}, "gpt-4-turbo", "llama3.1:8b"),
    ({"gpt-4-turbo": "llama3.1:8b", "*": "qwen2.5"}, "o3-mini", "qwen2.5"),
    ({"gpt-4-turbo": "llama3.1:8b"}, "gpt-4o", "gpt-4o"),
    (None, "gpt-4-turbo", "gpt-4-turbo"),
])
async def test_the_model_name_sent_upstream_is_its_alias(aliases: dict[str, str] | None, asked: str,
                                                          sent: str) -> None:
    ok = sse_reply((chunk({"content": "ok"}) + chunk({}, "stop") + "data: [DONE]\n\n").encode())
    async with serving([ok], aliases=aliases) as (server, client):
        turn = await client.stream({**REQUEST, "model": asked}, _ignore_text, _ignore_call)
    assert turn.text == "ok"
    assert [r["model"] for r in server.requests] == [sent]


async def _ignore_text(_: str) -> None:
    return None


async def _ignore_call(_: int, __: PartialCall) -> None:
    return None


async def test_error_event_in_the_stream() -> None:
    body = b'data: {"error": {"message": "overloaded"}}\n\n'
    async with serving([sse_reply(body)]) as (_, client):
        with pytest.raises(ModelError) as raised:
            await collect(client)
    assert raised.value.code == "server_error" and "overloaded" in raised.value.message


async def test_silence_mid_stream_is_a_timeout() -> None:
    async with serving([sse_reply(chunk({"content": "a"}).encode(), chunk({}, "stop").encode(), pause=1.0)],
                       model_timeout=0.3) as (_, client):
        with pytest.raises(ModelError) as raised:
            await collect(client)
    assert raised.value.code == "server_error" and "did not answer within 0.3 seconds" in raised.value.message


async def test_no_answer_is_a_timeout() -> None:
    async def silent(writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(2)
    async with serving([silent], model_timeout=0.3) as (_, client):
        with pytest.raises(ModelError) as raised:
            await collect(client)
    assert "did not answer" in raised.value.message


async def test_connection_dropped_mid_stream() -> None:
    async def drop(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        piece = chunk({"content": "a"}).encode()
        writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        await writer.drain()
        raise ConnectionResetError
    async with serving([drop]) as (_, client):
        with pytest.raises(ModelError) as raised:
            await collect(client)
    assert raised.value.code == "server_error" and "Could not reach the model" in raised.value.message


async def test_nobody_listening() -> None:
    listener = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    listener.close()
    await listener.wait_closed()
    client = ModelClient(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", timeout=2, max_retries=0,
                         retry_backoff=0)
    try:
        with pytest.raises(ModelError) as raised:
            await collect(client)
    finally:
        await client.close()
    assert raised.value.code == "server_error" and "Could not reach the model" in raised.value.message


@pytest.mark.parametrize(("run_settings", "expected"), [
    ({"tool_choice": "auto", "parallel_tool_calls": True}, ["a", "b"]),
    ({"tool_choice": "auto", "parallel_tool_calls": False}, ["a"]),
    ({"tool_choice": "none", "parallel_tool_calls": True}, []),
    ({"tools": [], "tool_choice": "auto", "parallel_tool_calls": True}, []),
    ({"tool_choice": {"type": "function", "function": {"name": "b"}}, "parallel_tool_calls": True}, ["b"]),
    ({"tool_choice": {"type": "function", "function": {"name": "b"}}, "parallel_tool_calls": False}, ["b"]),
])
def test_calls_a_run_does_not_allow_are_dropped(run_settings: dict[str, Any], expected: list[str]) -> None:
    """A backend that ignores tool_choice "none", a named tool_choice (Ollama takes no tool_choice) or
    parallel_tool_calls false cannot put a run in requires_action with calls it was told not to make (under "none"
    its text answer is open already)."""
    run_doc = {"tools": [{"type": "function", "function": {"name": "a"}}, {"type": "function",
                                                                          "function": {"name": "b"}}], **run_settings}
    calls = [ModelToolCall(id="call_1", name="a", arguments="{}"), ModelToolCall(id="call_2", name="b", arguments="{}")]
    assert [c.name for c in allowed_calls(calls, run_doc)] == expected


@pytest.mark.parametrize("ensure_ascii", [True, False])
def test_the_code_of_a_call_being_written_is_always_a_prefix_of_its_code(ensure_ascii: bool) -> None:
    """Each piece of code streamed stays: escapes (a surrogate pair as one) are read only once complete."""
    code = 'print("h\u00e9llo\\n")\n\tx = 1  # \U0001f600 "quoted" \\ end'
    arguments = json.dumps({"code": code}, ensure_ascii=ensure_ascii)
    seen = [code_so_far(arguments[:end]) for end in range(len(arguments) + 1)]
    assert all(code.startswith(part) for part in seen) and seen[-1] == code
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(seen))


@pytest.mark.parametrize("arguments", ['{"x": 1, "code": "a"}', "print(1)", '{"code": 1}'])
def test_code_not_opening_the_arguments_shows_once_written(arguments: str) -> None:
    assert code_so_far(arguments) == ""


def test_a_call_is_written_into_its_step_once_its_name_is_whole() -> None:
    """A name may come in pieces: a call shows once its arguments, a later call or the turn's end began."""
    run = RunRow(id="run_1", project_id="proj", thread_id="thread_1", status="in_progress", lease_owner="me",
                 lease_expired=False, expires_at=None, doc={"id": "run_1", "tools": [
                     {"type": "function", "function": {"name": "get_weather"}}, {"type": "code_interpreter"}]})
    turn = Turn(run=run, request={}, prior_usage={})
    turn.calls[0] = PartialCall(id="call_a", name="get_")
    assert RunService.streamable_calls(turn) == []
    turn.calls[0].name += "weather"
    turn.calls[0].arguments.append('{"ci')
    assert RunService.streamable_calls(turn) == [
        {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"ci', "output": None}}]
    turn.calls[1] = PartialCall(id="call_b", name="code_interpreter", arguments=['{"code": "print(', "1"])
    assert [c["id"] for c in RunService.streamable_calls(turn)] == ["call_a", "call_b"]
    assert RunService.streamable_calls(turn)[1]["code_interpreter"] == {"input": "print(1", "outputs": []}
    turn.calls[2] = PartialCall(id="call_c", name="get_weather")
    assert len(RunService.streamable_calls(turn)) == 2
    turn.model_done = True
    assert len(RunService.streamable_calls(turn)) == 3


def test_model_aliases_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THREADLINE_MODEL_ALIASES", " gpt-4-turbo = meta-llama/Llama-3.1-8B-Instruct , *=llama3.1:8b ,")
    assert RunOrchestratorSettings().model_alias_map() == {
        "gpt-4-turbo": "meta-llama/Llama-3.1-8B-Instruct", "*": "llama3.1:8b"}


@pytest.mark.parametrize("value", ["gpt-4o", "gpt-4o=", "=llama3", "a=b,a=c"])
def test_model_aliases_that_say_nothing_clear_are_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("THREADLINE_MODEL_ALIASES", value)
    with pytest.raises(ValidationError, match="model_aliases"):
        RunOrchestratorSettings()


class FakeImages:
    """A fetcher that counts its calls and how many run at once; `missing` URLs fail as a 404 would."""

    def __init__(self, missing: frozenset[str] = frozenset()) -> None:
        self.fetched: list[str] = []
        self.cancelled: list[str] = []
        self.running = self.most_at_once = 0
        self._missing = missing

    async def data_url(self, url: str) -> str:
        self.fetched.append(url)
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            await asyncio.sleep(0.05 if url not in self._missing else 0.01)
            if url in self._missing:
                raise ImageFetchError(f"Could not fetch the image at {url} for the model: HTTP 404.")
            return f"data:image/png;base64,{url.rsplit('/', 1)[1]}"
        except asyncio.CancelledError:
            self.cancelled.append(url)
            raise
        finally:
            self.running -= 1


def linking(urls: list[str], ask: str) -> dict[str, Any]:
    """A request whose user message links to `urls` (asking the scripted server to refuse image URLs)."""
    return {"model": "llava", "stream": True, "messages": [{"role": "user", "content": [
        {"type": "text", "text": f"[[quirk:no_image_urls]] {ask}"},
        *({"type": "image_url", "image_url": {"url": url, "detail": "low"}} for url in urls)]}]}


async def _ignore(*_: Any) -> None:
    return None


async def test_linked_images_are_fetched_once_each_a_few_at_once() -> None:
    """A server that refuses image URLs gets them as data URLs: each distinct URL fetched once, at most
    IMAGE_FETCHES_AT_ONCE at a time; the next request to that model is inlined before its first try."""
    urls = [f"https://img.example/{i}" for i in range(10)]
    images = FakeImages()
    with ScriptedModelServer() as server:
        client = ModelClient(base_url=server.base_url, api_key="k", timeout=5, max_retries=0, retry_backoff=0,
                             fetch_image=images.data_url)
        try:
            turn = await client.stream(linking(urls + urls[:3], "first"), _ignore, _ignore)
            assert turn.text.startswith("Echo:")
            assert sorted(images.fetched) == sorted(urls) and images.most_at_once == IMAGE_FETCHES_AT_ONCE
            _, taken = server.find_requests("first")
            sent = [part["image_url"] for part in taken["messages"][0]["content"] if part["type"] == "image_url"]
            assert sent == [{"url": f"data:image/png;base64,{url.rsplit('/', 1)[1]}", "detail": "low"}
                            for url in urls + urls[:3]]
            await client.stream(linking(urls[:1], "second"), _ignore, _ignore)
            assert len(server.find_requests("second")) == 1
        finally:
            await client.close()


async def test_an_image_that_cannot_be_fetched_stops_the_others_and_is_the_prompts_fault() -> None:
    urls = [f"https://img.example/{i}" for i in range(4)]
    images = FakeImages(missing=frozenset({urls[2]}))
    with ScriptedModelServer() as server:
        client = ModelClient(base_url=server.base_url, api_key="k", timeout=5, max_retries=3, retry_backoff=0,
                             fetch_image=images.data_url)
        try:
            with pytest.raises(ModelError) as failed:
                await client.stream(linking(urls, "missing"), _ignore, _ignore)
        finally:
            await client.close()
    assert failed.value.code == "invalid_prompt"
    assert failed.value.message == f"Could not fetch the image at {urls[2]} for the model: HTTP 404."
    assert sorted(images.cancelled) == [urls[0], urls[1], urls[3]]
    assert len(server.find_requests("missing")) == 1  # not retried


def test_image_fetch_networks_that_are_no_networks_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THREADLINE_IMAGE_FETCH_ALLOWED_NETWORKS", "10.0.0.0/8, intranet")
    with pytest.raises(ValidationError, match="THREADLINE_IMAGE_FETCH_ALLOWED_NETWORKS: 'intranet'"):
        RunOrchestratorSettings()


THOUGHT = "<think>\nThe user greets me: <b>hi</b>.\n</think>\n\nHello!\nHow can I help?"


@pytest.mark.parametrize(("content", "answer"), [
    (THOUGHT, "Hello!\nHow can I help?"),
    ("\n<think>a</think>b", "b"),
    ("<think>only thinking, cut by the token limit", ""),
    ("<thi", "<thi"),
    ("<thinking is fun", "<thinking is fun"),
    ("  plain answer", "  plain answer"),
    ("Hello <think>x</think>", "Hello <think>x</think>"),
    ("", ""),
])
def test_reasoning_written_inline_is_not_the_answer(content: str, answer: str) -> None:
    """Split anywhere (into every pair of pieces and into single characters), the content gives the same answer."""
    splits = [[content[:i], content[i:]] for i in range(len(content) + 1)] + [list(content)]
    for pieces in splits:
        thinking = ThinkingFilter()
        assert "".join(thinking.feed(piece) for piece in pieces) + thinking.end() == answer, pieces


async def test_a_turn_shows_the_answer_after_its_inline_thinking() -> None:
    """DeepSeek-R1 on Ollama writes `<think>...</think>` into the content (fishjar/kiss-translator#219): the message
    got the model's thinking. The answer streams once its thinking ended; a failure during thinking can still be
    retried, as nothing was shown."""
    pieces = ["<think>", "Greeting. ", "</th", "ink>\n\n", "Hi", " there"]
    body = "".join(chunk({"content": piece}) for piece in pieces) + chunk({}, "stop") + "data: [DONE]\n\n"
    async with serving([sse_reply(body.encode())]) as (_, client):
        turn, shown = await collect(client)
    assert turn.text == "Hi there" and shown == ["Hi", " there"]


async def test_a_failure_while_the_model_thinks_is_retried() -> None:
    thinking = chunk({"content": "<think>hmm"}) + 'data: {"error": {"message": "overloaded"}}\n\n'
    ok = chunk({"content": "<think>ok</think>fine"}) + chunk({}, "stop") + "data: [DONE]\n\n"
    async with serving([sse_reply(thinking.encode()), sse_reply(ok.encode())], max_retries=1) as (server, client):
        turn, shown = await collect(client)
    assert turn.text == "fine" and shown == ["fine"] and len(server.requests) == 2
