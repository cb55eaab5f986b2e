"""Helpers for tests that start runs and poll them as a user of the hosted API does."""

import time
from collections.abc import Callable
from typing import Any, TypeVar

import openai
import pytest
from openai import AssistantEventHandler
from openai.types.beta.threads import Run
from openai.types.beta.threads.runs import ToolCall, ToolCallDelta
from typing_extensions import override

TERMINAL = {"completed", "failed", "cancelled", "expired", "incomplete"}
T = TypeVar("T")


def poll(check: Callable[[], T], *, timeout: float, interval: float = 0.2, what: str = "condition") -> T:
    """`check()` once it returns something true, asked every `interval` seconds; the test fails after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not met within {timeout}s (last value {value!r})")
        time.sleep(interval)


def wait_for(client: openai.OpenAI, thread_id: str, run_id: str, statuses: set[str] = TERMINAL,
             timeout: float = 30.0) -> Run:
    """Poll the run until it reaches one of `statuses` (failing at once if it ends in another)."""
    deadline = time.monotonic() + timeout
    while True:
        run = client.beta.threads.runs.retrieve(run_id, thread_id=thread_id)
        if run.status in statuses:
            return run
        assert run.status not in TERMINAL, f"run ended {run.status}: {run.last_error}"
        assert time.monotonic() < deadline, f"run stuck in {run.status}"
        time.sleep(0.05)


def start(client: openai.OpenAI, assistant_id: str, text: str, **run_args: Any) -> tuple[str, Run]:
    """A new thread with one user message and a run on it."""
    thread = client.beta.threads.create(messages=[{"role": "user", "content": text}])
    run = client.beta.threads.runs.create(thread_id=thread.id, assistant_id=assistant_id, **run_args)
    return thread.id, run


def assistant_reply(client: openai.OpenAI, assistant_id: str, text: str) -> str:
    """The text the assistant answers `text` with, on a new thread, the run polled as the docs' flows poll it."""
    thread = client.beta.threads.create(messages=[{"role": "user", "content": text}])
    run = client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant_id,
                                                   poll_interval_ms=200)
    assert run.status == "completed", run.last_error
    [message] = client.beta.threads.messages.list(thread_id=thread.id, run_id=run.id).data
    assert message.content[0].type == "text"
    return message.content[0].text.value


class ToolCallRecorder(AssistantEventHandler):
    """Records what the SDK's streaming helpers report about tool calls (as handlers built on them see it)."""

    def __init__(self) -> None:
        super().__init__()
        self.created: list[str] = []
        self.arguments: dict[int, str] = {}
        self.inputs: list[str] = []
        self.logs: list[str] = []
        self.done: list[str] = []

    @override
    def on_tool_call_created(self, tool_call: ToolCall) -> None:
        self.created.append(tool_call.type)

    @override
    def on_tool_call_delta(self, delta: ToolCallDelta, snapshot: ToolCall) -> None:
        if delta.type == "function" and delta.function and delta.function.arguments:
            self.arguments[delta.index] = self.arguments.get(delta.index, "") + delta.function.arguments
        if delta.type == "code_interpreter" and delta.code_interpreter and delta.code_interpreter.input:
            self.inputs.append(delta.code_interpreter.input)
        if delta.type == "code_interpreter" and delta.code_interpreter and delta.code_interpreter.outputs:
            self.logs += [o.logs or "" for o in delta.code_interpreter.outputs if o.type == "logs"]

    @override
    def on_tool_call_done(self, tool_call: ToolCall) -> None:
        self.done.append(tool_call.type)
