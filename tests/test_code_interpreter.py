"""code_interpreter end to end through the official SDK: the model's code runs on the tool executor."""

import json
from typing import Any

import openai
import pytest
from openai.types.beta.threads import Run
from openai.types.beta.threads.runs import CodeInterpreterToolCall, RunStep

from threadline_devstack.sql import Db
from threadline_devstack.stack import Stack

pytestmark = pytest.mark.slow


def call_directive(code: str) -> str:
    """The scripted model's directive to call code_interpreter with `code`."""
    return f"[[call:code_interpreter:{json.dumps({'code': code})}]]"


def run_code(client: openai.OpenAI, marker: str, code: str, *, text: str = "",
             tool_resources: dict[str, Any] | None = None) -> tuple[Run, list[RunStep]]:
    assistant = client.beta.assistants.create(model="gpt-4o", tools=[{"type": "code_interpreter"}])
    thread = client.beta.threads.create(tool_resources=tool_resources) if tool_resources else \
        client.beta.threads.create()
    client.beta.threads.messages.create(thread.id, role="user", content=f"{marker} {text} {call_directive(code)}")
    run = client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id,
                                                   poll_interval_ms=200, timeout=120)
    steps = list(client.beta.threads.runs.steps.list(run.id, thread_id=thread.id, order="asc"))
    return run, steps


def code_call(steps: list[RunStep]) -> CodeInterpreterToolCall:
    tool_steps = [s for s in steps if s.type == "tool_calls"]
    assert len(tool_steps) == 1, steps
    assert tool_steps[0].status == "completed"
    details = tool_steps[0].step_details
    assert details.type == "tool_calls"
    (call,) = details.tool_calls
    assert isinstance(call, CodeInterpreterToolCall), call
    return call


def logs_of(call: CodeInterpreterToolCall) -> str:
    return "".join(o.logs for o in call.code_interpreter.outputs if o.type == "logs")


def last_reply(client: openai.OpenAI, run: Run) -> str:
    messages = client.beta.threads.messages.list(run.thread_id, order="desc", limit=1)
    content = messages.data[0].content[0]
    assert content.type == "text"
    return content.text.value


def test_code_interpreter_solves_an_equation(client: openai.OpenAI, marker: str) -> None:
    code = "x = (15 - 5) / 2\nprint(f'x = {x:g}')"
    run, steps = run_code(client, marker, code, text="Solve 2x + 5 = 15.")
    assert run.status == "completed", run.last_error
    call = code_call(steps)
    assert call.code_interpreter.input == code
    assert [o.type for o in call.code_interpreter.outputs] == ["logs"]
    assert logs_of(call) == "x = 5\n"
    assert [s.type for s in steps] == ["tool_calls", "message_creation"]
    assert last_reply(client, run) == "Tool results: x = 5"


def test_step_events_flow_and_the_step_is_retrievable(client: openai.OpenAI, marker: str) -> None:
    code = "print(sum(range(10)))"
    run, steps = run_code(client, marker, code)
    assert run.status == "completed", run.last_error
    tool_step = next(s for s in steps if s.type == "tool_calls")
    again = client.beta.threads.runs.steps.retrieve(tool_step.id, thread_id=run.thread_id, run_id=run.id)
    assert again.model_dump() == tool_step.model_dump()
    assert logs_of(code_call([again])) == "45\n"
    assert again.completed_at is not None and again.completed_at >= again.created_at


def test_images_become_output_files(client: openai.OpenAI, db: Db, marker: str) -> None:
    code = ("import matplotlib.pyplot as plt\nplt.plot([1, 4, 9])\nplt.title('squares')\nplt.show()\n"
            "open('squares.csv', 'w').write('1,4,9')\nprint('plotted')")
    run, steps = run_code(client, marker, code)
    assert run.status == "completed", run.last_error
    call = code_call(steps)
    kinds = [o.type for o in call.code_interpreter.outputs]
    assert kinds == ["logs", "image"], kinds
    assert logs_of(call) == "plotted\n"
    image = next(o for o in call.code_interpreter.outputs if o.type == "image")
    file_id = image.image.file_id
    assert file_id.startswith("file-")
    row = db.fetchrow("SELECT f.purpose, f.filename, f.doc, c.content FROM files f JOIN file_contents c"
                      " ON c.file_id = f.id WHERE f.id = $1", file_id)
    assert row is not None
    assert row["purpose"] == "assistants_output"
    assert bytes(row["content"]).startswith(b"\x89PNG")
    assert row["doc"]["bytes"] == len(bytes(row["content"]))
    csv = db.fetchrow("SELECT f.id, c.content FROM files f JOIN file_contents c ON c.file_id = f.id"
                      " WHERE f.filename = 'squares.csv' AND f.created_at >= $1", run.created_at)
    assert csv is not None and bytes(csv["content"]) == b"1,4,9"
    reply = last_reply(client, run)
    assert file_id in reply and csv["id"] in reply  # the model is told which files were saved


def test_thread_files_are_available_to_the_code(client: openai.OpenAI, marker: str) -> None:
    uploaded = client.files.create(file=("numbers.csv", b"n\n3\n4\n5\n"), purpose="assistants")
    code = "import pandas as pd\ndf = pd.read_csv('numbers.csv')\nprint('total', df['n'].sum())"
    run, steps = run_code(client, marker, code,
                          tool_resources={"code_interpreter": {"file_ids": [uploaded.id]}})
    assert run.status == "completed", run.last_error
    assert logs_of(code_call(steps)) == "total 12\n"


def test_code_errors_are_outputs_and_the_run_goes_on(client: openai.OpenAI, marker: str) -> None:
    run, steps = run_code(client, marker, "print('before')\n1 / 0")
    assert run.status == "completed", run.last_error
    logs = logs_of(code_call(steps))
    assert logs.startswith("before\nTraceback (most recent call last):")
    assert logs.endswith("ZeroDivisionError: division by zero\n")
    assert "ZeroDivisionError" in last_reply(client, run)


@pytest.mark.parametrize(("code", "expected"), [
    ("block = bytearray(10 * 1024 ** 3)", "MemoryError"),
    ("import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)", "Network is unreachable"),
    ("import os\nwhile True:\n    os.fork()", "Resource temporarily unavailable"),
], ids=["memory", "network", "fork-bomb"])
def test_sandbox_limits_end_in_an_error_output(client: openai.OpenAI, stack: Stack, marker: str, code: str,
                                               expected: str) -> None:
    port = stack.gateway.port  # a listening loopback server the sandbox must not reach
    run, steps = run_code(client, marker, code.format(port=port))
    assert run.status == "completed", run.last_error
    logs = logs_of(code_call(steps))
    assert expected in logs, logs
    assert expected in last_reply(client, run)
