"""code_interpreter end to end through the official SDK: the model's code runs on the tool executor."""

import json
import re
import struct
import zlib

import openai
import pytest
from openai import AssistantEventHandler
from openai.types.beta import thread_create_params
from openai.types.beta.threads import (
    FilePathAnnotation,
    ImageFile,
    ImageFileContentBlock,
    Message,
    MessageDelta,
    Run,
    Text,
    TextContentBlock,
    TextDelta,
)
from openai.types.beta.threads.runs import CodeInterpreterToolCall, RunStep
from run_helpers import ToolCallRecorder
from typing_extensions import override

from run_orchestrator.prompt import build_prompt, code_files_note, estimate_tokens
from run_orchestrator.repository import MessageRow
from threadline_devstack.model_server import ScriptedModelServer
from threadline_devstack.sql import Db
from threadline_devstack.stack import Stack

pytestmark = pytest.mark.slow


def call_directive(code: str) -> str:
    """The scripted model's directive to call code_interpreter with `code`."""
    return f"[[call:code_interpreter:{json.dumps({'code': code})}]]"


def run_code(client: openai.OpenAI, marker: str, code: str, *, text: str = "",
             tool_resources: thread_create_params.ToolResources | None = None) -> tuple[Run, list[RunStep]]:
    assistant = client.beta.assistants.create(model="gpt-4o", tools=[{"type": "code_interpreter"}])
    thread = client.beta.threads.create(tool_resources=tool_resources) if tool_resources else \
        client.beta.threads.create()
    client.beta.threads.messages.create(thread.id, role="user", content=f"{marker} {text} {call_directive(code)}")
    run = client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id,
                                                   poll_interval_ms=200, timeout=120)
    steps = list(client.beta.threads.runs.steps.list(run.id, thread_id=thread.id, order="asc"))
    return run, steps


def run_attached(client: openai.OpenAI, assistant_id: str, content: str, file_id: str) -> tuple[Run, list[RunStep]]:
    """A completed run on a new thread whose one message attaches `file_id` for code_interpreter, and its steps."""
    thread = client.beta.threads.create()
    client.beta.threads.messages.create(thread.id, role="user", content=content,
                                        attachments=[{"file_id": file_id, "tools": [{"type": "code_interpreter"}]}])
    run = client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant_id,
                                                   poll_interval_ms=200, timeout=120)
    assert run.status == "completed", run.last_error
    return run, list(client.beta.threads.runs.steps.list(run.id, thread_id=thread.id, order="asc"))


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
    content = messages.data[0].content[-1]  # after the image_file parts of generated images
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


def test_a_forced_code_interpreter_call_runs_once(client: openai.OpenAI, marker: str) -> None:
    """tool_choice {"type": "code_interpreter"} forces the run's first call: after its outputs the model answers (sent
    the forced choice again, a model that obeys it ran the code again and again until the run ran out of time)."""
    assistant = client.beta.assistants.create(model="gpt-4o", tools=[{"type": "code_interpreter"}])
    text = f"{marker} {call_directive('print(6 * 7)')}"
    thread = client.beta.threads.create(messages=[{"role": "user", "content": text}])
    run = client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id, timeout=120,
                                                   tool_choice={"type": "code_interpreter"})
    assert run.status == "completed", run.last_error
    steps = list(client.beta.threads.runs.steps.list(run.id, thread_id=thread.id, order="asc"))
    assert logs_of(code_call(steps)) == "42\n"
    assert last_reply(client, run) == "Tool results: 42"


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
    image_file = client.files.retrieve(file_id)
    assert image_file.purpose == "assistants_output"
    png = client.files.content(file_id).read()
    assert png.startswith(b"\x89PNG") and image_file.bytes == len(png)
    csv_id = db.fetchval("SELECT id FROM files WHERE filename = '/mnt/data/squares.csv'"  # the path, as hosted
                         " AND purpose = 'assistants_output' AND created_at >= $1 ORDER BY id DESC LIMIT 1",
                         run.created_at)
    assert csv_id is not None and client.files.content(csv_id).read() == b"1,4,9"
    reply = last_reply(client, run)
    assert file_id in reply and csv_id in reply  # the model is told which files were saved
    (message,) = client.beta.threads.messages.list(run.thread_id, order="desc", limit=1).data
    assert message.content[0].type == "image_file" and message.content[0].image_file.file_id == file_id
    assert "detail" not in message.content[0].image_file.model_fields_set  # not null: the contract's enum


def test_thread_files_are_available_to_the_code(client: openai.OpenAI, marker: str) -> None:
    uploaded = client.files.create(file=("numbers.csv", b"n\n3\n4\n5\n"), purpose="assistants")
    code = "import pandas as pd\ndf = pd.read_csv('numbers.csv')\nprint('total', df['n'].sum())"
    run, steps = run_code(client, marker, code,
                          tool_resources={"code_interpreter": {"file_ids": [uploaded.id]}})
    assert run.status == "completed", run.last_error
    assert logs_of(code_call(steps)) == "total 12\n"


def test_message_attachments_are_available_to_the_code(client: openai.OpenAI, marker: str) -> None:
    uploaded = client.files.create(file=("words.txt", b"alpha beta gamma"), purpose="assistants")
    assistant = client.beta.assistants.create(model="gpt-4o", tools=[{"type": "code_interpreter"}])
    code = "print(len(open('words.txt').read().split()))"
    _, steps = run_attached(client, assistant.id, f"{marker} {call_directive(code)}", uploaded.id)
    assert logs_of(code_call(steps)) == "3\n"


FILES_NOTE = "The user's files for code_interpreter are in its working directory:"


def test_the_model_is_told_its_input_files(client: openai.OpenAI, model: ScriptedModelServer, marker: str) -> None:
    """Every model turn of a run with code_interpreter names its input files as the code finds them (the assistant's,
    then the thread's attachments; a repeated name is the file id's), after the instructions: a model not told
    must guess the names of the files it is asked about or list the folder first."""
    first = client.files.create(file=("sales.csv", b"month,amount\n1,10\n2,32\n"), purpose="assistants")
    second = client.files.create(file=("sales.csv", b"month,amount\n3,5\n"), purpose="assistants")
    assistant = client.beta.assistants.create(model="gpt-4o", instructions="Answer briefly.",
                                              tools=[{"type": "code_interpreter"}],
                                              tool_resources={"code_interpreter": {"file_ids": [first.id]}})
    code = ("import pandas as pd\nprint(pd.read_csv('/mnt/data/sales.csv')['amount'].sum(),"
            f" pd.read_csv('/mnt/data/{second.id}_sales.csv')['amount'].sum())")
    _, steps = run_attached(client, assistant.id, f"{marker} Sum the sales. {call_directive(code)}", second.id)
    assert logs_of(code_call(steps)) == "42 5\n"
    requests = model.find_requests(marker)
    assert len(requests) == 2  # the call, then the answer
    note = f'{FILES_NOTE}\n- /mnt/data/sales.csv\n- /mnt/data/{second.id}_sales.csv (uploaded as "sales.csv")'
    for request in requests:
        assert request["messages"][0] == {"role": "system", "content": f"Answer briefly.\n\n{note}"}
        assert [m["role"] for m in request["messages"]].count("system") == 1

    # without files, or without code_interpreter, the request is what it was
    bare = client.beta.assistants.create(model="gpt-4o", instructions="Answer briefly.",
                                         tools=[{"type": "code_interpreter"}])
    other = client.beta.assistants.create(model="gpt-4o", instructions="Answer briefly.")
    for assistant_id, resources in ((bare.id, None), (other.id, {"code_interpreter": {"file_ids": [first.id]}})):
        text = f"{marker}-{assistant_id} hello"
        quiet = client.beta.threads.create(tool_resources=resources) if resources else client.beta.threads.create()
        client.beta.threads.messages.create(quiet.id, role="user", content=text)
        plain = client.beta.threads.runs.create_and_poll(thread_id=quiet.id, assistant_id=assistant_id,
                                                         poll_interval_ms=200, timeout=120)
        assert plain.status == "completed", plain.last_error
        (request,) = model.find_requests(f"{marker}-{assistant_id}")
        assert request["messages"] == [{"role": "system", "content": "Answer briefly."},
                                       {"role": "user", "content": text}]


def test_the_files_the_model_is_told_of_are_those_in_the_sandbox(client: openai.OpenAI, model: ScriptedModelServer,
                                                                  marker: str) -> None:
    """Names that are not safe basenames are listed as the sandbox makes them (with the uploaded name), and so is a
    name two files reduce to; at most 50 files are named, the others counted."""
    names = [".env", "in/data.json", "out/data.json", "\u202etxt.exe"] + [f"part{n:02d}.txt" for n in range(50)]
    uploaded = [client.files.create(file=(name, name.encode()), purpose="assistants") for name in names]
    assistant = client.beta.assistants.create(model="gpt-4o", tools=[{"type": "code_interpreter"}])
    code = "import os\nprint('\\n'.join(sorted(os.listdir('/mnt/data'))))"
    thread = client.beta.threads.create(messages=[{
        "role": "user", "content": f"{marker} {call_directive(code)}",
        "attachments": [{"file_id": f.id, "tools": [{"type": "code_interpreter"}]} for f in uploaded]}])
    run = client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id,
                                                   poll_interval_ms=200, timeout=120)
    assert run.status == "completed", run.last_error
    steps = list(client.beta.threads.runs.steps.list(run.id, thread_id=thread.id, order="asc"))
    in_sandbox = logs_of(code_call(steps)).split()
    system = model.find_requests(marker)[0]["messages"][0]
    assert system["role"] == "system"
    lines = system["content"].split("\n")
    assert lines[:5] == [FILES_NOTE, '- /mnt/data/env (uploaded as ".env")',
                         '- /mnt/data/data.json (uploaded as "in/data.json")',
                         '- /mnt/data/data_1.json (uploaded as "out/data.json")',
                         '- /mnt/data/_txt.exe (uploaded as "\\u202etxt.exe")']
    assert lines[5:] == [f"- /mnt/data/part{n:02d}.txt" for n in range(46)] + ["- and 4 more"]
    assert len(in_sandbox) == len(names)
    assert {line.split(" ")[1].removeprefix("/mnt/data/") for line in lines[1:-1]} <= set(in_sandbox)


@pytest.mark.unit
def test_the_files_note_names_only_what_fits_in_the_sandbox() -> None:
    """As the tool executor, files over THREADLINE_SANDBOX_INPUT_MAX_MB in all are left out (a later, smaller one still
    goes in), and so are files that are gone; no file left, no note."""
    files = {"file-a": ("a.csv", 60), "file-b": ("b.csv", 50), "file-c": ("a.csv", 40)}
    note = code_files_note(["file-a", "file-b", "file-gone", "file-c"], files, max_total_bytes=100)
    assert note == f'{FILES_NOTE}\n- /mnt/data/a.csv\n- /mnt/data/file-c_a.csv (uploaded as "a.csv")'
    assert code_files_note(["file-b", "file-gone"], files, max_total_bytes=49) is None


@pytest.mark.unit
def test_the_files_note_survives_truncation_and_is_counted() -> None:
    """The note is in the prompt's head: a thread cut to fit `max_prompt_tokens` loses messages from its middle, never
    the note, and the note's tokens count against the budget."""
    note = code_files_note(["file-a"], {"file-a": ("a.csv", 1)}, max_total_bytes=10)
    run_doc = {"id": "run_1", "model": "gpt-4o", "instructions": "Be brief."}
    thread = [MessageRow(id=f"msg_{n}", run_id=None, doc={"role": "user", "content": [
        {"type": "text", "text": {"value": f"{n}" * 400}}]}) for n in range(5)]
    full = build_prompt(run_doc, thread, [], files_note=note)
    assert full.messages[0] == {"role": "system", "content": f"Be brief.\n\n{note}"}
    assert full.estimated_tokens == sum(estimate_tokens(m) for m in full.messages)
    budget = estimate_tokens(full.messages[0]) + 2 * estimate_tokens(full.messages[1]) - 1
    cut = build_prompt({**run_doc, "max_prompt_tokens": budget}, thread, [], files_note=note)
    assert cut.fits and cut.messages == [full.messages[0], full.messages[-1]]


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


def test_parallel_code_calls_in_one_step(client: openai.OpenAI, marker: str) -> None:
    assistant = client.beta.assistants.create(model="gpt-4o", tools=[{"type": "code_interpreter"}])
    thread = client.beta.threads.create()
    client.beta.threads.messages.create(
        thread.id, role="user", content=f"{marker} {call_directive('print(2 + 2)')} {call_directive('print(3 * 3)')}")
    run = client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id,
                                                   poll_interval_ms=200, timeout=120)
    assert run.status == "completed", run.last_error
    steps = list(client.beta.threads.runs.steps.list(run.id, thread_id=thread.id, order="asc"))
    (tool_step,) = [s for s in steps if s.type == "tool_calls"]
    assert tool_step.step_details.type == "tool_calls"
    calls = tool_step.step_details.tool_calls
    assert [c.type for c in calls] == ["code_interpreter", "code_interpreter"]
    assert [logs_of(c) for c in calls if isinstance(c, CodeInterpreterToolCall)] == ["4\n", "9\n"]
    assert last_reply(client, run) == "Tool results: 4 | 9"


def run_calls(client: openai.OpenAI, assistant_id: str, thread_id: str, marker: str,
              *codes: str) -> list[CodeInterpreterToolCall]:
    """One run of the thread whose model makes these code_interpreter calls (in one step); their calls."""
    directives = " ".join(call_directive(code) for code in codes)
    client.beta.threads.messages.create(thread_id, role="user", content=f"{marker} {directives}")
    run = client.beta.threads.runs.create_and_poll(thread_id=thread_id, assistant_id=assistant_id,
                                                   poll_interval_ms=200, timeout=120)
    assert run.status == "completed", run.last_error
    steps = client.beta.threads.runs.steps.list(run.id, thread_id=thread_id, order="asc")
    (tool_step,) = [s for s in steps if s.type == "tool_calls"]
    assert tool_step.step_details.type == "tool_calls"
    return [c for c in tool_step.step_details.tool_calls if isinstance(c, CodeInterpreterToolCall)]


def test_a_thread_keeps_its_code_session(client: openai.OpenAI, marker: str) -> None:
    """As hosted, code_interpreter is a stateful session per thread: variables, imports and /mnt/data files of
    earlier calls (of this run or an earlier one) are there for the next call; another thread has its own."""
    assistant = client.beta.assistants.create(model="gpt-4o", tools=[{"type": "code_interpreter"}])
    thread = client.beta.threads.create()
    first = run_calls(client, assistant.id, thread.id, marker,
                      "import os\nx = 41\nprint('loaded')\nsize = open('a.txt', 'w').write('hello')",
                      "print(x + 1)")
    assert [logs_of(c) for c in first] == ["loaded\n", "42\n"]
    (later,) = run_calls(client, assistant.id, thread.id, marker,
                         "print(x, open('a.txt').read(), sorted(os.listdir('/mnt/data')))")
    assert logs_of(later) == "41 hello ['a.txt']\n", "the earlier cells' output is not shown again"
    assert [o.type for o in later.code_interpreter.outputs] == ["logs"], "a.txt is not reported again"
    other = client.beta.threads.create()
    (elsewhere,) = run_calls(client, assistant.id, other.id, marker, "print('x' in dir(), os.listdir('.'))")
    assert "NameError: name 'os' is not defined" in logs_of(elsewhere)


def test_a_code_session_ends_when_idle_and_skips_cells_that_hit_a_limit(client: openai.OpenAI, db: Db,
                                                                         marker: str) -> None:
    assistant = client.beta.assistants.create(model="gpt-4o", tools=[{"type": "code_interpreter"}])
    thread = client.beta.threads.create()
    run_calls(client, assistant.id, thread.id, marker, "kept = 1",
              "stopped = True\nblock = bytearray(10 * 1024 ** 3)")  # hits the memory limit: not replayed
    (later,) = run_calls(client, assistant.id, thread.id, marker, "print(kept, 'stopped' in dir())")
    assert logs_of(later) == "1 False\n"
    db.execute("UPDATE code_session_cells SET executed_at = executed_at - 3600 WHERE thread_id = $1", thread.id)
    (fresh,) = run_calls(client, assistant.id, thread.id, marker, "print('kept' in dir())")
    assert logs_of(fresh) == "False\n", "an hour without a call ends the session"
    assert db.fetchval("SELECT count(DISTINCT session_id) FROM code_session_cells WHERE thread_id = $1",
                       thread.id) == 1, "the ended session's cells are gone"
    client.beta.threads.delete(thread.id)
    assert db.fetchval("SELECT count(*) FROM code_session_cells WHERE thread_id = $1", thread.id) == 0


def test_streaming_helpers_see_the_code_interpreter_call(client: openai.OpenAI, db: Db, marker: str) -> None:
    """The code streams as the model writes it (the docs' handler prints it from its deltas), before it runs."""
    assistant = client.beta.assistants.create(model="gpt-4o", tools=[{"type": "code_interpreter"}])
    code = "numbers = [40, 2]\nprint(sum(numbers))  # the answer"
    thread = client.beta.threads.create(
        messages=[{"role": "user", "content": f"{marker} [[slow:0.1]] {call_directive(code)}"}])
    recorder = ToolCallRecorder()
    with client.beta.threads.runs.stream(thread_id=thread.id, assistant_id=assistant.id,
                                         event_handler=recorder) as stream:
        stream.until_done()
        steps = stream.get_final_run_steps()
        text = stream.get_final_messages()[-1].content[0]
    assert recorder.created == ["code_interpreter"]
    assert len(recorder.inputs) >= 3 and "".join(recorder.inputs) == code  # in the pieces the model wrote
    assert recorder.done and set(recorder.done) == {"code_interpreter"}  # the SDK repeats it for later steps
    assert recorder.logs == ["42\n"]
    (tool_step,) = [s for s in steps if s.type == "tool_calls"]
    assert tool_step.step_details.type == "tool_calls"
    (call,) = tool_step.step_details.tool_calls
    assert isinstance(call, CodeInterpreterToolCall)
    assert call.code_interpreter.input == code  # the snapshot: created step + deltas, nothing doubled
    assert logs_of(call) == "42\n"
    assert text.type == "text" and text.text.value == "Tool results: 42"
    # The code is streamed with its step, before the tool executor is asked to run it (it shows while it runs).
    logged = db.fetch("SELECT type, envelope FROM events WHERE run_id = $1 ORDER BY seq", tool_step.run_id)
    types = [r["type"] for r in logged]
    opened = [(json.loads(r["envelope"]) if isinstance(r["envelope"], str) else r["envelope"])["data"]["delta"]
              ["step_details"]["tool_calls"][0] for r in logged if r["type"] == "thread.run.step.delta"]
    assert opened[0] == {"index": 0, "id": call.id, "type": "code_interpreter",
                         "code_interpreter": {"input": "", "outputs": []}}
    assert "".join(o["code_interpreter"]["input"] for o in opened[1:-1]) == code
    assert opened[-1]["code_interpreter"] == {"outputs": [{"index": 0, "type": "logs", "logs": "42\n"}]}
    deltas = [i for i, t in enumerate(types) if t == "thread.run.step.delta"]
    assert types.index("thread.run.step.created") < deltas[0]
    assert deltas[-2] < types.index("command.tool.call_requested") < deltas[-1]  # the code, the run, its outputs


def tiny_png() -> bytes:
    """A valid 2x1 RGB PNG, built by hand (the test compares the downloaded bytes with these)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = b"\x00\xff\x00\x00\x00\x00\xff"  # one scanline: filter 0, a red and a blue pixel
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 1, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


CSV = b"x,y\n1,1\n2,4\n3,9\n"
REPORT_LINK = "[Download the data](sandbox:/mnt/data/squares.csv)"
CHART_LINK = "[the chart](/mnt/data/chart.png)"


def files_code(png: bytes) -> str:
    """Code writing an image and a CSV into /mnt/data and printing links to them, as the docs' answers do."""
    return (f"open('chart.png', 'wb').write({png!r})\nopen('squares.csv', 'wb').write({CSV!r})\n"
            f"print({REPORT_LINK!r}, 'and', {CHART_LINK!r}, 'or sandbox:/mnt/data/missing.csv.')")


def check_reply_shows_files(client: openai.OpenAI, message: Message, steps: list[RunStep], png: bytes) -> None:
    """The reply as the hosted API writes it: the image as an `image_file` part, then the text whose links to
    generated files carry `file_path` annotations."""
    call = code_call(steps)
    assert [o.type for o in call.code_interpreter.outputs] == ["logs", "image"]  # the step keeps its SDK shape
    (image_output,) = [o for o in call.code_interpreter.outputs if o.type == "image"]
    assert [c.type for c in message.content] == ["image_file", "text"], message.content
    image, text = message.content
    assert isinstance(image, ImageFileContentBlock) and isinstance(text, TextContentBlock)
    assert image.image_file.file_id == image_output.image.file_id
    assert client.files.content(image.image_file.file_id).read() == png
    value = text.text.value
    assert REPORT_LINK in value and CHART_LINK in value
    annotations = text.text.annotations
    assert all(isinstance(a, FilePathAnnotation) for a in annotations), annotations
    assert [value[a.start_index:a.end_index] for a in annotations] == \
        ["sandbox:/mnt/data/squares.csv", "/mnt/data/chart.png"]  # missing.csv was not generated
    report, chart = (a for a in annotations if isinstance(a, FilePathAnnotation))
    assert report.text == "sandbox:/mnt/data/squares.csv" and chart.text == "/mnt/data/chart.png"
    assert client.files.content(report.file_path.file_id).read() == CSV
    assert client.files.retrieve(report.file_path.file_id).purpose == "assistants_output"
    assert chart.file_path.file_id == image.image_file.file_id


def test_generated_files_show_in_the_reply(client: openai.OpenAI, marker: str) -> None:
    png = tiny_png()
    run, steps = run_code(client, marker, files_code(png), text="Plot the squares and export them.")
    assert run.status == "completed", run.last_error
    (reply,) = client.beta.threads.messages.list(run.thread_id, order="desc", limit=1).data
    assert reply.role == "assistant" and reply.run_id == run.id
    check_reply_shows_files(client, reply, steps, png)
    again = client.beta.threads.messages.retrieve(reply.id, thread_id=run.thread_id)
    assert again.model_dump() == reply.model_dump()


def test_images_are_shown_once_per_run_reply(client: openai.OpenAI, marker: str) -> None:
    """A second code call in a later run of the thread makes no image: that reply shows none of the first's."""
    png = tiny_png()
    run, _ = run_code(client, marker, files_code(png))
    assert run.status == "completed", run.last_error
    client.beta.threads.messages.create(run.thread_id, role="user",
                                        content=f"{marker} again {call_directive('print(6 * 7)')}")
    again = client.beta.threads.runs.create_and_poll(thread_id=run.thread_id, assistant_id=run.assistant_id,
                                                     poll_interval_ms=200, timeout=120)
    assert again.status == "completed", again.last_error
    (reply,) = client.beta.threads.messages.list(run.thread_id, order="desc", limit=1).data
    assert [c.type for c in reply.content] == ["text"]
    (first,) = client.beta.threads.messages.list(run.thread_id, run_id=run.id).data
    assert [c.type for c in first.content] == ["image_file", "text"]


class ReplyRecorder(AssistantEventHandler):
    """Records what the SDK's streaming helpers report about the reply's content."""

    def __init__(self) -> None:
        super().__init__()
        self.images_done: list[str] = []
        self.text_created = 0
        self.text_deltas: list[str] = []
        self.texts_done: list[str] = []
        self.delta_parts: list[tuple[int, str]] = []

    @override
    def on_image_file_done(self, image_file: ImageFile) -> None:
        self.images_done.append(image_file.file_id)

    @override
    def on_message_delta(self, delta: MessageDelta, snapshot: Message) -> None:
        self.delta_parts += [(part.index, part.type) for part in delta.content or []]

    @override
    def on_text_created(self, text: Text) -> None:
        self.text_created += 1

    @override
    def on_text_delta(self, delta: TextDelta, snapshot: Text) -> None:
        self.text_deltas.append(delta.value or "")

    @override
    def on_text_done(self, text: Text) -> None:
        self.texts_done.append(text.value)


def test_streamed_reply_shows_generated_files(client: openai.OpenAI, marker: str) -> None:
    png = tiny_png()
    assistant = client.beta.assistants.create(model="gpt-4o", tools=[{"type": "code_interpreter"}])
    thread = client.beta.threads.create(
        messages=[{"role": "user", "content": f"{marker} {call_directive(files_code(png))}"}])
    recorder = ReplyRecorder()
    with client.beta.threads.runs.stream(thread_id=thread.id, assistant_id=assistant.id,
                                         event_handler=recorder) as stream:
        stream.until_done()
        snapshot = stream.get_final_messages()[-1]
        run = stream.get_final_run()
    assert run.status == "completed", run.last_error
    steps = list(client.beta.threads.runs.steps.list(run.id, thread_id=thread.id, order="asc"))
    retrieved = client.beta.threads.messages.retrieve(snapshot.id, thread_id=thread.id)
    assert snapshot.model_dump() == retrieved.model_dump()
    check_reply_shows_files(client, retrieved, steps, png)
    image, text = retrieved.content
    assert isinstance(image, ImageFileContentBlock) and isinstance(text, TextContentBlock)
    assert recorder.images_done == [image.image_file.file_id]
    assert recorder.text_created == 1
    assert "".join(recorder.text_deltas) == text.text.value  # the deltas add up to the text at its index
    assert recorder.texts_done == [text.text.value]
    assert {index for index, kind in recorder.delta_parts if kind == "text"} == {1}
    assert recorder.delta_parts[0] == (0, "image_file")


def test_file_path_annotations_unit() -> None:
    from threadline_search.citations import annotate_content, file_path_annotations

    files = {"/mnt/data/out.csv": "file-csv", "/mnt/data/my report.txt": "file-txt"}
    text = ("Get [it](sandbox:/mnt/data/out.csv), sandbox:/mnt/data/out.csv. or [the report](/mnt/data/my%20report.txt)"
            " but not /mnt/data/out.csv, sandbox:/mnt/data/other.csv or [x](/mnt/data/other.csv)")
    found = file_path_annotations(text, files)
    assert [(text[a["start_index"]:a["end_index"]], a["file_path"]["file_id"]) for a in found] == [
        ("sandbox:/mnt/data/out.csv", "file-csv"), ("sandbox:/mnt/data/out.csv", "file-csv"),
        ("/mnt/data/my%20report.txt", "file-txt")]
    assert all(a["text"] == text[a["start_index"]:a["end_index"]] for a in found)
    content = [{"type": "image_file", "image_file": {"file_id": "file-img", "detail": None}},
               {"type": "text", "text": {"value": text, "annotations": []}}]
    annotate_content(content, [], files)
    annotations = content[1]["text"]["annotations"]
    assert [a["start_index"] for a in annotations] == sorted(a["start_index"] for a in found)
    FilePathAnnotation.model_validate(annotations[0])


def test_notebook_display_imports_work(client: openai.OpenAI, marker: str) -> None:
    """Code written for a notebook imports display, HTML, Markdown and Image from IPython (not installed: the call
    failed with ModuleNotFoundError): HTML and Markdown show their text in the logs, an Image is an image output."""
    code = ("from IPython.display import display, HTML, Markdown, Image\nfrom IPython import get_ipython\n"
            "import matplotlib.pyplot as plt\nplt.plot([1, 4, 9])\nplt.savefig('/tmp/chart.png')\n"
            "display(HTML('<p><b>Total</b>: 42 &gt; 40</p>'), Markdown('# Report'))\nprint(get_ipython())\n"
            "display(Image(filename='/tmp/chart.png'))")
    run, steps = run_code(client, marker, code)
    assert run.status == "completed", run.last_error
    call = code_call(steps)
    assert [o.type for o in call.code_interpreter.outputs] == ["logs", "image"]
    assert logs_of(call) == "Total: 42 > 40\n# Report\nNone\n"
    (image,) = [o for o in call.code_interpreter.outputs if o.type == "image"]
    assert client.files.content(image.image.file_id).read().startswith(b"\x89PNG")


CUT = re.compile(r"\[\.\.\. output truncated: ([\d,]+) bytes \(([\d,]+) lines?\) left out \.\.\.\]\n")


def test_output_past_the_limit_is_cut_and_the_cell_runs_on(client: openai.OpenAI, model: ScriptedModelServer,
                                                           marker: str) -> None:
    """A cell printing more than the sandbox keeps (THREADLINE_SANDBOX_OUTPUT_BYTES, 100,000) runs to its end: it was
    stopped there, and left out of the session. The step's logs keep its start and end with a marker saying how much
    was left out; the model reads them cut to its own limit (20,000 characters) with one marker counting all that is
    missing; the cell's later effects happen (a file, a variable the next call uses)."""
    import pandas as pd

    code = ("import pandas as pd\npd.set_option('display.max_rows', None)\nframe = pd.DataFrame({'n': range(30000)})\n"
            "print(frame)\ntotal = int(frame['n'].sum())\nsize = open('total.txt', 'w').write(str(total))\n"
            "print('total', total)")
    with pd.option_context("display.max_rows", None):
        written = repr(pd.DataFrame({"n": range(30000)})) + "\ntotal 449985000\n"
    assistant = client.beta.assistants.create(model="gpt-4o", tools=[{"type": "code_interpreter"}])
    thread = client.beta.threads.create()
    (call,) = run_calls(client, assistant.id, thread.id, marker, code)
    logs = logs_of(call)
    assert logs.startswith(written[:1000]) and logs.endswith(written[-1000:])
    ((left, lines),) = CUT.findall(logs)
    assert len(CUT.sub("", logs)) + int(left.replace(",", "")) == len(written)
    assert CUT.sub("", logs).count("\n") + int(lines.replace(",", "")) == written.count("\n")
    assert len(logs) < 100_100
    tool_message = next(m for m in model.find_requests(marker)[-1]["messages"] if m["role"] == "tool")
    seen, saved = tool_message["content"].rsplit("\n", 1)
    assert saved.startswith("[file /mnt/data/total.txt saved as file-")
    assert len(seen) < 20_100 and seen.startswith(written[:1000]) and seen.endswith(written[-1000:].rstrip("\n"))
    ((left, lines),) = CUT.findall(seen)
    assert len(CUT.sub("", seen)) + 1 + int(left.replace(",", "")) == len(written)  # all that is missing, counted
    (after,) = run_calls(client, assistant.id, thread.id, marker, "print(total, open('total.txt').read())")
    assert logs_of(after) == "449985000 449985000\n"
