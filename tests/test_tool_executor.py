"""The tool-executor service: events, metrics, cancellation and crash recovery of server-side tool calls."""

import asyncio
import inspect
import json
import os
import time
import uuid
from collections.abc import Callable

import httpx
import openai
import pytest
from aiokafka import TopicPartition
from openai.types.beta.threads import Run
from openai.types.beta.threads.runs import CodeInterpreterToolCall, FileSearchToolCall

from threadline_core.events import EventEnvelope
from threadline_core.kafka import EventConsumer, create_producer, ensure_topics
from threadline_devstack.sql import Db
from threadline_devstack.stack import ServiceProcess, Stack

pytestmark = pytest.mark.slow

TERMINAL = ("completed", "failed", "cancelled", "expired", "incomplete", "requires_action")


def call_directive(code: str) -> str:
    return f"[[call:code_interpreter:{json.dumps({'code': code})}]]"


def start_run(client: openai.OpenAI, content: str) -> Run:
    assistant = client.beta.assistants.create(model="gpt-4o", tools=[{"type": "code_interpreter"}])
    thread = client.beta.threads.create(messages=[{"role": "user", "content": content}])
    return client.beta.threads.runs.create(thread_id=thread.id, assistant_id=assistant.id)


def wait_terminal(client: openai.OpenAI, run: Run, timeout: float = 120.0) -> Run:
    deadline = time.monotonic() + timeout
    while run.status not in TERMINAL:
        assert time.monotonic() < deadline, f"run {run.id} still {run.status} after {timeout}s (hung)"
        time.sleep(0.2)
        run = client.beta.threads.runs.retrieve(run.id, thread_id=run.thread_id)
    return run


def sandboxes_of(pid: int) -> list[int]:
    """Sandbox processes (unshare / supervisor) started by the process `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                cmdline = handle.read()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and b"_supervisor.py" in cmdline:
            found.append(int(entry))
    return found


def wait_for(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def code_call_of(client: openai.OpenAI, run: Run) -> CodeInterpreterToolCall:
    steps = client.beta.threads.runs.steps.list(run.id, thread_id=run.thread_id, order="asc")
    tool_step = next(s for s in steps if s.type == "tool_calls")
    assert tool_step.step_details.type == "tool_calls"
    call = tool_step.step_details.tool_calls[0]
    assert isinstance(call, CodeInterpreterToolCall)
    return call


def test_tool_call_step_events_in_order(client: openai.OpenAI, db: Db, marker: str) -> None:
    run = wait_terminal(client, start_run(client, f"{marker} {call_directive('print(6 * 7)')}"))
    assert run.status == "completed", run.last_error
    rows = db.fetch("SELECT type, envelope->'data' AS data FROM events WHERE run_id = $1 AND topic = $2"
                    " ORDER BY seq", run.id, "threadline.events")
    steps = client.beta.threads.runs.steps.list(run.id, thread_id=run.thread_id)
    tool_step_id = next(s.id for s in steps if s.type == "tool_calls")
    step_events = [(r["type"], r["data"].get("status")) for r in rows if r["data"].get("id") == tool_step_id]
    assert step_events[:2] == [("thread.run.step.created", "in_progress"),
                               ("thread.run.step.in_progress", "in_progress")]
    assert step_events[-1] == ("thread.run.step.completed", "completed")
    deltas = [r["data"]["delta"]["step_details"]["tool_calls"][0] for r in rows
              if r["data"].get("id") == tool_step_id and r["type"] == "thread.run.step.delta"]
    assert len(deltas) == len(step_events) - 3  # the call, its code in pieces, its outputs
    assert deltas[0]["code_interpreter"] == {"input": "", "outputs": []}
    assert "".join(d["code_interpreter"]["input"] for d in deltas[1:-1]) == "print(6 * 7)"
    assert deltas[-1]["code_interpreter"] == {"outputs": [{"index": 0, "type": "logs", "logs": "42\n"}]}
    completed = next(r["data"] for r in rows if r["type"] == "thread.run.step.completed"
                     and r["data"]["id"] == tool_step_id)
    outputs = completed["step_details"]["tool_calls"][0]["code_interpreter"]["outputs"]
    assert outputs == [{"type": "logs", "logs": "42\n"}]
    requests = db.fetch("SELECT envelope->'data' AS data FROM events WHERE run_id = $1 AND topic = $2",
                        run.id, "threadline.tool.requests")
    answers = db.fetch("SELECT envelope->'data' AS data FROM events WHERE run_id = $1 AND topic = $2 AND type = $3",
                       run.id, "threadline.run.commands", "command.run.tool_call_completed")
    assert len(requests) == 1 and len(answers) == 1
    assert answers[0]["data"]["tool_call_id"] == requests[0]["data"]["tool_call_id"]


def test_file_search_call_runs_on_the_executor(client: openai.OpenAI, marker: str) -> None:
    text = (b"Atlantis travel notes.\n\nThe capital of Atlantis is Poseidonia, a harbour city of white stone.\n\n"
            b"The currency of Atlantis is the orichalcum crown.\n")
    uploaded = client.files.create(file=("atlantis.txt", text), purpose="assistants")
    store = client.vector_stores.create(name=f"kb {marker}")
    client.vector_stores.files.create_and_poll(file_id=uploaded.id, vector_store_id=store.id, poll_interval_ms=200)
    store = client.vector_stores.retrieve(store.id)
    assert store.file_counts.completed == 1, store.file_counts
    assistant = client.beta.assistants.create(model="gpt-4o", tools=[{"type": "file_search"}],
                                              tool_resources={"file_search": {"vector_store_ids": [store.id]}})
    query = json.dumps({"query": "What is the capital of Atlantis?"})
    thread = client.beta.threads.create(messages=[{"role": "user",
                                                   "content": f"{marker} [[call:file_search:{query}]]"}])
    run = client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id,
                                                   poll_interval_ms=200, timeout=120)
    assert run.status == "completed", run.last_error
    steps = client.beta.threads.runs.steps.list(
        run.id, thread_id=thread.id, include=["step_details.tool_calls[*].file_search.results[*].content"])
    tool_step = next(s for s in steps if s.type == "tool_calls")
    assert tool_step.step_details.type == "tool_calls"
    call = tool_step.step_details.tool_calls[0]
    assert isinstance(call, FileSearchToolCall)
    assert call.file_search.ranking_options is not None
    results = call.file_search.results or []
    assert results and results[0].file_id == uploaded.id and results[0].file_name == "atlantis.txt"
    assert "Poseidonia" in "".join(c.text or "" for c in results[0].content or [])
    reply = client.beta.threads.messages.list(thread.id, order="desc", limit=1).data[0].content[0]
    assert reply.type == "text"
    assert "Poseidonia" in reply.text.value and "atlantis.txt" in reply.text.value


def test_tool_call_metrics(client: openai.OpenAI, stack: Stack, marker: str) -> None:
    run = wait_terminal(client, start_run(client, f"{marker} {call_directive('print(1)')}"))
    assert run.status == "completed", run.last_error
    metrics = httpx.get(f"{stack.service('tool_executor').url}/metrics", timeout=5).text
    completed = [line for line in metrics.splitlines()
                 if line.startswith("threadline_tool_calls_total{") and 'type="code_interpreter"' in line
                 and 'outcome="completed"' in line]
    assert completed and float(completed[0].rsplit(" ", 1)[1]) >= 1
    assert 'threadline_tool_call_seconds_count{type="code_interpreter"}' in metrics


def test_cancel_while_the_code_runs_stops_the_sandbox(client: openai.OpenAI, stack: Stack, marker: str) -> None:
    executor = stack.service("tool_executor")
    wait_for(lambda: not sandboxes_of(executor.pid or 0), 60, "earlier sandboxes to finish")
    run = start_run(client, f"{marker} {call_directive('import time; time.sleep(25); print(1)')}")
    wait_for(lambda: sandboxes_of(executor.pid or 0), 60, "the sandbox to start")
    client.beta.threads.runs.cancel(run.id, thread_id=run.thread_id)
    run = wait_terminal(client, run, timeout=60)
    assert run.status == "cancelled"
    # the executor notices and kills the sandbox instead of running the code to its end
    wait_for(lambda: not sandboxes_of(executor.pid or 0), 15, "the sandbox of the cancelled run to be stopped")


def test_executor_killed_mid_call_is_redelivered(client: openai.OpenAI, stack: Stack, marker: str) -> None:
    executor: ServiceProcess = stack.service("tool_executor")
    wait_for(lambda: not sandboxes_of(executor.pid or 0), 60, "earlier sandboxes to finish")
    code = "import time\ntime.sleep(3)\nprint('slept')"
    run = start_run(client, f"{marker} {call_directive(code)}")
    wait_for(lambda: sandboxes_of(executor.pid or 0), 60, "the sandbox to start")
    executor.kill()
    executor.start(timeout=300)  # a loaded machine can take a while to import and join the group
    run = wait_terminal(client, run, timeout=150)  # never hung
    assert run.status == "completed", run.last_error  # the request was delivered again and answered
    call = code_call_of(client, run)
    assert [o.logs for o in call.code_interpreter.outputs if o.type == "logs"] == ["slept\n"]


async def eventually(check: Callable[[], object], what: str, *, expect: object = True,
                     within: float = 60.0) -> None:
    """Poll `check` (sync or async) until it returns `expect`."""
    deadline = time.monotonic() + within
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value == expect:
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what} (last: {value!r})"
        await asyncio.sleep(0.05)


async def test_a_slow_call_holds_back_only_its_own_thread(stack: Stack) -> None:
    """The executor's consumer handles each key (thread) on its own: a long sandbox call does not stop the
    requests of other threads on the same partition, even those fetched after it began, from being handled;
    the partition is committed only up to the slow call, and past it once it ends."""
    suffix = uuid.uuid4().hex[:8]
    topic, group = f"test.independent.{suffix}", f"test-independent-{suffix}"
    await ensure_topics(stack.kafka_bootstrap_servers, [topic], 1)
    release = asyncio.Event()
    handled: list[str] = []

    async def handler(envelope: EventEnvelope) -> None:
        if envelope.key == "slow" and "first" in envelope.data:
            await release.wait()
        handled.append(envelope.type)

    consumer = EventConsumer(bootstrap=stack.kafka_bootstrap_servers, group_id=group, topics=[topic],
                             handler=handler, independent_keys=True, key_concurrency=4, fetch_max_wait_ms=5)
    producer = create_producer(stack.kafka_bootstrap_servers)
    await producer.start()
    await consumer.start()

    async def send(key: str, name: str, **data: str) -> None:
        envelope = EventEnvelope(type=name, project_id="proj_test", key=key, data=data)
        await producer.send_and_wait(topic, envelope.to_bytes(), key=key.encode(), partition=0)

    async def committed() -> int | None:
        offset: int | None = await consumer.consumer.committed(TopicPartition(topic, 0))
        return offset

    try:
        await send("slow", "slow-1", first="yes")
        await send("fast-a", "fast-a")
        await eventually(lambda: handled == ["fast-a"], "a record behind the slow one, same partition")
        await send("slow", "slow-2")  # fetched while slow-1 runs: waits for it (same thread)
        await send("fast-b", "fast-b")  # fetched while slow-1 runs: does not
        await eventually(lambda: handled == ["fast-a", "fast-b"], "a record fetched after the slow one began")
        assert await committed() in (None, 0)  # not past the unfinished slow-1
        release.set()
        await eventually(lambda: committed(), "the partition committed past everything", expect=4)
        assert handled == ["fast-a", "fast-b", "slow-1", "slow-2"]  # the slow thread's records in order
    finally:
        release.set()
        await consumer.stop()
        await producer.stop()
