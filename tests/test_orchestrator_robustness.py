"""The run orchestrator under bad input: a bad stored run, NUL characters or an enormous reply from the model.

The promise: neither wedges a run nor the service; a run always reaches a terminal state, with a clear
`last_error` when it cannot complete. Through the real stack (see tests/test_runs_flow.py) unless noted.
"""

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from prometheus_client import CollectorRegistry
from run_helpers import start, wait_for

from run_orchestrator.metrics import OrchestratorMetrics
from run_orchestrator.model import ModelError, ModelTurn, PartialCall, _apply_chunk
from run_orchestrator.repository import RunRow
from run_orchestrator.service import RunService, Turn
from run_orchestrator.settings import RunOrchestratorSettings
from threadline_devstack.model_server import parse_directives
from threadline_devstack.sql import Db

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def assistant_id(client: openai.OpenAI) -> str:
    """A plain assistant (no tools: its answers are text)."""
    return client.beta.assistants.create(model="gpt-4o-mini", instructions="You are terse.").id


def _completed_run(client: openai.OpenAI, assistant_id: str, marker: str) -> tuple[str, str]:
    """(thread id, run id) of a run that completed, for a test to put back into another state."""
    thread_id, run = start(client, assistant_id, f"[[reply:done]] {marker}")
    assert wait_for(client, thread_id, run.id).status == "completed"
    return thread_id, run.id


# --- 1. one run the sweep cannot finish does not stop the others -------------------------------------------


def test_sweep_goes_on_past_a_run_it_cannot_finish(client: openai.OpenAI, db: Db, assistant_id: str,
                                                   marker: str) -> None:
    """Two orphaned cancellations, one of them with a broken stored doc: the other one is still cancelled."""
    runs = [_completed_run(client, assistant_id, marker) for _ in range(2)]
    (_, bad), (good_thread, good) = runs
    orphan = ("UPDATE runs SET status = 'cancelling', lease_owner = NULL, lease_expires_at = NULL,"
              " doc = doc || '{\"status\": \"cancelling\"}'::jsonb WHERE id = $1")
    try:
        # a doc without created_at makes finishing it raise (the sweep failed as a whole on every pass)
        db.execute("UPDATE runs SET doc = doc - 'created_at' WHERE id = $1", bad)
        db.execute(orphan, bad)
        db.execute(orphan, good)
        assert wait_for(client, good_thread, good, timeout=10).status == "cancelled"
        time.sleep(1.5)  # a few more passes: the bad run is tried again each time, and stays as it was
        assert db.fetchval("SELECT status FROM runs WHERE id = $1", bad) == "cancelling"
    finally:  # leave no run the session's sweeps keep failing on
        db.execute("UPDATE runs SET status = 'completed', doc = doc || jsonb_build_object('status', 'completed',"
                   " 'created_at', extract(epoch FROM now())::bigint) WHERE id = $1", bad)


def test_a_queued_run_whose_command_was_lost_is_driven(client: openai.OpenAI, db: Db, assistant_id: str,
                                                       marker: str) -> None:
    """A queued run nobody claimed for THREADLINE_UNCLAIMED_RUN_SECONDS (its command lost with a broker that lost
    acknowledged records) gets its command again from the sweep and is answered, instead of expiring queued."""
    thread_id, run_id = _completed_run(client, assistant_id, marker)
    db.execute("UPDATE runs SET status = 'queued', doc = doc || '{\"status\": \"queued\", \"completed_at\": null}'"
               "::jsonb, expires_at = extract(epoch FROM now())::bigint + 600,"
               " announced_at = now() - interval '1 hour' WHERE id = $1", run_id)
    assert wait_for(client, thread_id, run_id, timeout=20).status == "completed"
    commands = db.fetchval("SELECT count(*) FROM events WHERE run_id = $1 AND topic = 'threadline.run.commands'",
                           run_id)
    assert commands == 2  # the original and the one sent again


_LOSE_DRIVER = ("UPDATE runs SET status = 'in_progress',"
                " doc = doc || '{\"status\": \"in_progress\", \"completed_at\": null}'::jsonb,"
                " lease_owner = 'run_orchestrator-gone', lease_expires_at = now() - interval '1 second',"
                " expires_at = extract(epoch FROM now())::bigint + 600, driver_losses = $2 WHERE id = $1")
"""A finished run made to look like one whose driver died mid-turn for the ($2 + 1)th time."""


def test_a_run_whose_driver_keeps_getting_lost_fails(client: openai.OpenAI, db: Db, assistant_id: str,
                                                     marker: str) -> None:
    """A lost driver (crash, kill) re-queues its run, counted; the third loss fails the run with server_error
    instead (a run that crashed its driver each time was re-queued, and the model called, until it expired)."""
    runs = [_completed_run(client, assistant_id, marker) for _ in range(2)]
    (again_thread, again), (doomed_thread, doomed) = runs
    db.execute(_LOSE_DRIVER, again, 0)
    db.execute(_LOSE_DRIVER, doomed, 2)
    failed = wait_for(client, doomed_thread, doomed, {"failed"}, timeout=15)
    assert failed.last_error is not None and failed.last_error.code == "server_error"
    assert failed.last_error.message == ("The server had an error while processing the run: it was interrupted 3 "
                                         "times.")
    assert wait_for(client, again_thread, again, {"completed"}, timeout=15).status == "completed"
    assert db.fetchval("SELECT driver_losses FROM runs WHERE id = $1", again) == 1


# --- 2. NUL characters from the model ------------------------------------------------------------------------


@pytest.mark.unit
def test_scripted_model_reply_json_directive_decodes_escapes() -> None:
    """`[[reply_json:"..."]]` lets a test script a reply holding characters a user message cannot."""
    found = parse_directives('x [[reply_json: "a\\u0000b ]] c"]] y')
    assert (found.reply, found.text) == ("a\x00b ]] c", "x y")
    assert parse_directives("[[reply_json:5]]").reply is None  # not a string: kept as text


def test_nul_in_model_reply_is_stored_as_replacement_character(client: openai.OpenAI, assistant_id: str,
                                                               marker: str) -> None:
    """Postgres refuses U+0000: a reply holding one was never written and the run retried forever."""
    thread = client.beta.threads.create(
        messages=[{"role": "user", "content": f'[[reply_json:"nul\\u0000here and\\u0000 there"]] {marker}'}])
    deltas: list[str] = []
    with client.beta.threads.runs.stream(thread_id=thread.id, assistant_id=assistant_id) as stream:
        for item in stream:
            if item.event == "thread.message.delta":
                deltas += [p.text.value or "" for p in item.data.delta.content or [] if p.type == "text" and p.text]
    run = stream.current_run
    assert run is not None
    run = wait_for(client, thread.id, run.id)
    assert run.status == "completed", run.last_error
    expected = "nul\ufffdhere and\ufffd there"
    messages = client.beta.threads.messages.list(thread_id=thread.id, order="asc").data
    texts = [b.text.value for m in messages if m.role == "assistant" for b in m.content if b.type == "text"]
    assert texts == [expected]
    assert "".join(deltas) == expected


@pytest.mark.unit
def test_nul_in_streamed_tool_calls_and_errors_is_replaced() -> None:
    """Tool call ids, names and arguments, and a model's error text, never carry a NUL into storage."""
    turn = ModelTurn()
    calls: dict[int, PartialCall] = {}
    chunk = {"choices": [{"index": 0, "delta": {"content": "a\x00", "tool_calls": [{
        "index": 0, "id": "call_\x00", "function": {"name": "f\x00n", "arguments": '{"x": "\x00"}'}}]}}]}
    assert _apply_chunk(json.dumps(chunk).encode(), turn, calls) == ("a\ufffd", [0])
    assert (calls[0].id, calls[0].name, calls[0].arguments) == ("call_\ufffd", "f\ufffdn", ['{"x": "\ufffd"}'])
    with pytest.raises(ModelError) as failed:
        _apply_chunk(json.dumps({"error": {"message": "bad\x00"}}).encode(), turn, calls)
    assert "\x00" not in failed.value.message and "bad\ufffd" in failed.value.message


# --- 3. a reply too large to record ---------------------------------------------------------------------------


def test_reply_too_large_to_record_fails_the_run(client: openai.OpenAI, db: Db, assistant_id: str,
                                                 marker: str) -> None:
    """~750 KB of text: its message event would be over the outbox's limit, so the run fails (trimmed message)."""
    thread_id, run = start(client, assistant_id, f"[[tokens:70000]] {marker}")
    run = wait_for(client, thread_id, run.id, timeout=30)
    assert run.status == "failed"
    assert run.last_error is not None and run.last_error.code == "server_error"
    assert "too large" in run.last_error.message
    messages = [m for m in client.beta.threads.messages.list(thread_id=thread_id).data if m.role == "assistant"]
    assert len(messages) == 1 and messages[0].status == "incomplete"
    text = "".join(b.text.value for b in messages[0].content if b.type == "text")
    assert text.startswith("word1 word2 ") and len(text) < 700_000
    steps = client.beta.threads.runs.steps.list(run_id=run.id, thread_id=thread_id).data
    assert [s.status for s in steps] == ["failed"]
    sizes = db.fetch("SELECT type, length(envelope::text) AS size FROM events WHERE run_id = $1", run.id)
    assert sizes and max(r["size"] for r in sizes) < 700_000


def test_tool_call_too_large_to_record_fails_the_run(client: openai.OpenAI, marker: str) -> None:
    """Tool call arguments whose step event would be over the outbox's limit: the run fails, no retry loop."""
    assistant = client.beta.assistants.create(model="gpt-4o-mini", tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {}}}}])
    arguments = "[" + ",".join(['""'] * 120_000) + "]"  # escaped twice in the step's event: over 640 KiB
    # A text part: a content string is refused (400) beyond 256,000 characters.
    thread = client.beta.threads.create(messages=[{"role": "user", "content": [
        {"type": "text", "text": f"[[call:f:{arguments}]] {marker}"}]}])
    run = client.beta.threads.runs.create(thread_id=thread.id, assistant_id=assistant.id)
    run = wait_for(client, thread.id, run.id, timeout=30)
    assert run.status == "failed"
    assert run.last_error is not None and run.last_error.code == "server_error"
    assert "too large" in run.last_error.message


# --- 4. a database lost during the model turn is an outage, not the run's failure (unit) ---------------------


class _PoolLostOnce:
    """A pool whose first acquisition finds the database gone; later ones succeed and record what they run."""

    def __init__(self) -> None:
        self.acquisitions = 0
        self.statements: list[str] = []

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator["_PoolLostOnce"]:
        self.acquisitions += 1
        if self.acquisitions == 1:
            raise ConnectionRefusedError("the database is away")
        yield self

    def transaction(self) -> contextlib.AbstractAsyncContextManager[None]:
        self.statements.append("BEGIN")
        return contextlib.nullcontext()

    def __getattr__(self, name: str) -> Any:
        async def run(*args: Any) -> None:
            self.statements.append(name)
        return run


class _ModelThatWrites:
    """Streams one piece of text (the answer's message is opened then) and the turn's end."""

    async def stream(self, request: dict[str, Any], on_text: Any, on_call: Any) -> ModelTurn:
        await on_text("Hello")
        return ModelTurn(text="Hello", usage={"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2})


def test_database_lost_while_the_answer_opens_leaves_the_run_to_its_lease() -> None:
    """The run is not failed when the database comes back in time for the failure to be written: it is re-queued
    once its lease runs out (a driver loss, bounded by THREADLINE_MAX_DRIVER_LOSSES) and answered then."""
    pool = _PoolLostOnce()
    service = RunService(pool=pool, producer=None, settings=RunOrchestratorSettings(),  # type: ignore[arg-type]
                         instance_id="orch-test", model=_ModelThatWrites(),  # type: ignore[arg-type]
                         metrics=OrchestratorMetrics(CollectorRegistry()))
    doc = {"id": "run_x", "thread_id": "thread_x", "assistant_id": "asst_x", "model": "m", "tools": []}
    run = RunRow(id="run_x", project_id="proj_x", thread_id="thread_x", status="in_progress", lease_owner="orch-test",
                 lease_expired=False, expires_at=None, doc=doc)
    asyncio.run(service._drive(Turn(run=run, request={"stream": True}, prior_usage={})))
    assert pool.acquisitions == 1, f"the turn wrote after the outage: {pool.statements}"
