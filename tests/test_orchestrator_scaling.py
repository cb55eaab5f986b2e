"""Several run-orchestrator instances in one consumer group: shared work, no run driven twice, hand-over
of runs when an instance stops (gracefully or by a crash).

Each run's user message carries its own marker, so the scripted model's recorded requests tell how
many times each run was driven; `runs.lease_owner` tells which instance drove it.
"""

import contextlib
import json
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import httpx
import openai
import pytest
from openai.types.beta.threads import Run

from threadline_devstack.model_server import ScriptedModelServer
from threadline_devstack.sql import Db
from threadline_devstack.stack import ServiceProcess, Stack

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.slow]

TERMINAL = {"completed", "failed", "cancelled", "expired", "incomplete"}
MAIN = "run_orchestrator-1"


def assigned_partitions(proc: ServiceProcess) -> int:
    """Partitions of the run-commands topic the instance owns (its /metrics)."""
    try:
        text = httpx.get(f"{proc.url}/metrics", timeout=2.0).text
    except httpx.HTTPError:
        return 0
    for line in text.splitlines():
        if line.startswith("threadline_orchestrator_assigned_partitions "):
            return int(float(line.split()[1]))
    return 0


def wait_until(check: object, timeout: float, what: str) -> None:
    """Poll `check()` until true."""
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def wait_all(client: openai.OpenAI, runs: list[Run], timeout: float) -> list[Run]:
    """Poll every run until terminal."""
    deadline = time.monotonic() + timeout
    done: dict[str, Run] = {}
    while len(done) < len(runs):
        for run in runs:
            if run.id not in done:
                current = client.beta.threads.runs.retrieve(run.id, thread_id=run.thread_id)
                if current.status in TERMINAL:
                    done[run.id] = current
        assert time.monotonic() < deadline, f"{len(runs) - len(done)} runs not finished"
        time.sleep(0.1)
    return [done[r.id] for r in runs]


@contextlib.contextmanager
def extra_instance(stack: Stack) -> Iterator[ServiceProcess]:
    """Another run-orchestrator process in the same group, once both own partitions; stopped afterwards."""
    extra = stack.start_extra("run_orchestrator")
    main = stack.service("run_orchestrator")
    try:
        wait_until(lambda: assigned_partitions(extra) > 0 and assigned_partitions(main) > 0, 90,
                   "both instances to own partitions")
        yield extra
    finally:
        extra.stop(timeout=20)
        wait_until(lambda: assigned_partitions(main) == 6, 90, "the main instance to own every partition")


@pytest.fixture(scope="module")
def second_instance(stack: Stack) -> Iterator[ServiceProcess]:
    """A second instance shared by the tests that stop it gracefully (or not at all)."""
    with extra_instance(stack) as extra:
        yield extra


@pytest.fixture
def doomed_instance(stack: Stack) -> Iterator[ServiceProcess]:
    """A second instance for a test that kills it."""
    with extra_instance(stack) as extra:
        yield extra


@pytest.fixture(scope="module")
def assistant_id(client: openai.OpenAI) -> str:
    """A plain assistant."""
    return client.beta.assistants.create(model="gpt-4o-mini").id


def create_runs(client: openai.OpenAI, assistant_id: str, texts: list[str]) -> list[Run]:
    """One thread and run per text."""
    runs = []
    for text in texts:
        thread = client.beta.threads.create(messages=[{"role": "user", "content": text}])
        runs.append(client.beta.threads.runs.create(thread_id=thread.id, assistant_id=assistant_id))
    return runs


def lease_owners(db: Db, runs: list[Run]) -> dict[str, str | None]:
    """Who holds (or last held) each run."""
    rows = db.fetch("SELECT id, lease_owner FROM runs WHERE id = ANY($1::text[])", [r.id for r in runs])
    return {r["id"]: r["lease_owner"] for r in rows}


def test_two_instances_share_50_runs(client: openai.OpenAI, model: ScriptedModelServer, db: Db,
                                     second_instance: ServiceProcess, assistant_id: str, marker: str) -> None:
    markers = [f"{marker}r{i}x" for i in range(50)]
    runs = create_runs(client, assistant_id, [f"run {m}" for m in markers])
    finished = wait_all(client, runs, timeout=120)
    assert {r.status for r in finished} == {"completed"}
    for run, m in zip(runs, markers, strict=True):
        assert len(model.find_requests(m)) == 1, f"run {run.id} was driven {len(model.find_requests(m))} times"
        reply = client.beta.threads.messages.list(thread_id=run.thread_id).data
        assert [msg.role for msg in reply] == ["assistant", "user"]
    owners = lease_owners(db, runs)
    assert set(owners.values()) == {MAIN, second_instance.name}, owners
    started = db.fetch("SELECT run_id, count(*) AS n FROM events WHERE run_id = ANY($1::text[])"
                       " AND type = 'thread.run.in_progress' GROUP BY run_id", [r.id for r in runs])
    assert len(started) == 50 and {r["n"] for r in started} == {1}


def streamed_text(stack: Stack, run: Run) -> str:
    """The text of the run's message deltas as a client subscribed to the run's stream from its start got it."""
    text = ""
    with httpx.Client(base_url=stack.base_url, headers={"Authorization": f"Bearer {stack.api_key}"},
                      trust_env=False, timeout=60) as http, \
            http.stream("GET", f"/threads/{run.thread_id}/runs/{run.id}/events") as response:
        event = ""
        for line in response.iter_lines():
            if line.startswith("event:"):
                event = line.partition(":")[2].strip()
            elif line.startswith("data:") and event == "thread.message.delta":
                for part in json.loads(line.partition(":")[2])["delta"]["content"]:
                    text += part["text"]["value"] if part["type"] == "text" else ""
            elif event == "done":
                break
    return text


def test_graceful_stop_hands_runs_back(client: openai.OpenAI, model: ScriptedModelServer, db: Db, stack: Stack,
                                       second_instance: ServiceProcess, assistant_id: str, marker: str) -> None:
    """SIGTERM while runs stream slowly (8 s; the drain time is 3 s): unfinished runs go back to the group, and
    a client that stayed subscribed gets each answer's text once, though its second driver streams it anew."""
    markers = [f"{marker}g{i}x" for i in range(12)]
    runs = create_runs(client, assistant_id, [f"[[slow:1]] [[tokens:8]] {m}" for m in markers])
    with ThreadPoolExecutor(len(runs)) as pool:
        streams: list[Future[str]] = [pool.submit(streamed_text, stack, run) for run in runs]
        wait_until(lambda: all(lease_owners(db, runs).values()), 60, "every run to be claimed")
        owned = [r for r in runs if lease_owners(db, [r])[r.id] == second_instance.name]
        assert owned, "the second instance drove none of the runs"
        second_instance.stop(timeout=30)
        finished = wait_all(client, runs, timeout=120)
        texts = [stream.result(timeout=60) for stream in streams]
    assert {r.status for r in finished} == {"completed"}
    owners = lease_owners(db, runs)
    handed_back = [r for r in owned if owners[r.id] == MAIN]
    assert handed_back, "no run was handed back"
    for run, m in zip(runs, markers, strict=True):
        driven = len(model.find_requests(m))
        assert driven == (2 if run in handed_back else 1), (run.id, driven)
        (reply, _) = client.beta.threads.messages.list(thread_id=run.thread_id).data
        assert reply.status == "completed" and reply.content[0].type == "text"
        assert reply.content[0].text.value == " ".join(f"word{i}" for i in range(1, 9))
    assert texts == [" ".join(f"word{i}" for i in range(1, 9))] * len(runs)


def test_crashed_instance_runs_are_requeued(client: openai.OpenAI, model: ScriptedModelServer, db: Db,
                                            doomed_instance: ServiceProcess, assistant_id: str, marker: str) -> None:
    """SIGKILL mid-run: the lease runs out, a sweeper re-queues the run, the other instance finishes it."""
    markers = [f"{marker}c{i}x" for i in range(12)]
    runs = create_runs(client, assistant_id, [f"[[slow:0.4]] [[tokens:10]] {m}" for m in markers])
    wait_until(lambda: all(lease_owners(db, runs).values()), 60, "every run to be claimed")
    owned = [r for r in runs if lease_owners(db, [r])[r.id] == doomed_instance.name]
    assert owned, "the second instance drove none of the runs"
    doomed_instance.kill()
    finished = wait_all(client, runs, timeout=120)
    assert {r.status for r in finished} == {"completed"}
    owners = lease_owners(db, runs)
    for run, m in zip(runs, markers, strict=True):
        driven = len(model.find_requests(m))
        if run in owned:
            assert owners[run.id] == MAIN and driven == 2
            (reply, _) = client.beta.threads.messages.list(thread_id=run.thread_id).data
            assert reply.status == "completed"
            assert reply.content[0].type == "text"
            assert reply.content[0].text.value == " ".join(f"word{i}" for i in range(1, 11))
        else:
            assert driven == 1
