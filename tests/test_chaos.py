"""A short chaos trial of the central promise: SIGKILL the gateway, the run orchestrator and the notifier while runs
stream, clients follow them (cutting their streams and resuming with Last-Event-ID) and a webhook endpoint listens;
start them again as an operator would. Then nothing is lost and nothing is doubled:

- every run completes once: one assistant message with the whole text, usage equal to its steps' usage;
- each resumed stream yields every event of its run's event log exactly once, in id order, then `done`;
- every webhook-worthy event reached the receiver, signed, with one body per webhook id.

The longer trial (minutes of kills of every service and of Postgres under mixed load) found what
tests/test_errors.py::test_a_backend_terminated_inside_a_transaction_is_a_503 now covers.
"""

import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import TEST_SERVICE_ENV, TEST_SERVICE_ENV_BY_SERVICE
from webhook_receiver import SignedReceiver

from threadline_devstack._proc import wait_until
from threadline_devstack.sql import Db
from threadline_devstack.stack import Stack, StackConfig

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

TERMINAL_EVENTS = frozenset({"thread.run.completed", "thread.run.failed", "thread.run.cancelled",
                             "thread.run.expired", "thread.run.incomplete"})
WORDS = 15


class Follower:
    """Follows one run's stream until `done`, cutting it at random and resuming with Last-Event-ID (also across a
    gateway that is down), as an SSE client does."""

    def __init__(self, stack: Stack, thread_id: str, run_id: str, seed: int) -> None:
        self.stack = stack
        self.path = f"/threads/{thread_id}/runs/{run_id}/events"
        self.ids: list[int] = []
        self.types: list[str] = []
        self.done = False
        self.cuts = 0
        self._random = random.Random(seed)

    def follow(self, deadline: float) -> None:
        """Read, cut, resume, until `done` or the deadline."""
        headers = {"Authorization": f"Bearer {self.stack.api_key}"}
        with httpx.Client(base_url=self.stack.base_url, headers=headers, trust_env=False,
                          timeout=httpx.Timeout(10, read=30)) as http:
            while not self.done and time.monotonic() < deadline:
                resume = {"Last-Event-ID": str(self.ids[-1])} if self.ids else {}
                try:
                    with http.stream("GET", self.path, headers=resume) as response:
                        if response.status_code == 200:
                            self._read(response)
                        else:
                            time.sleep(0.2)
                except httpx.TransportError:
                    time.sleep(0.2)  # the gateway is down: try again

    def _read(self, response: httpx.Response) -> None:
        event, seq = "", None
        for line in response.iter_lines():
            if line.startswith("id: "):
                seq = int(line[4:])
            elif line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                if event == "done":
                    self.done = True
                    return
                if seq is not None:
                    self.ids.append(seq)
                    self.types.append(event)
                    if self._random.random() < 0.2:
                        self.cuts += 1
                        return  # disconnect; resume after the last id
            elif not line:
                event, seq = "", None


def _events_of(db: Db, run_id: str) -> list[int]:
    rows = db.fetch("SELECT seq FROM events WHERE run_id = $1 AND topic = 'threadline.events' ORDER BY seq", run_id)
    return [row["seq"] for row in rows]


def test_kill_gateway_orchestrator_and_notifier_mid_runs(stack: Stack, client: openai.OpenAI, db: Db,
                                                         marker: str) -> None:
    receiver = SignedReceiver()
    endpoint = client.webhooks.create(url=receiver.url, name=f"chaos {marker}",
                                      event_types=["thread.run.created", "thread.run.queued",
                                                   "thread.run.in_progress", "thread.run.completed",
                                                   "thread.message.completed"])
    receiver.secret = endpoint.signing_secret
    victims = [stack.service(name) for name in ("run_orchestrator", "notifier", "gateway")]
    try:
        assistant = client.beta.assistants.create(model="gpt-4o", name="chaos")
        runs = []
        for i in range(6):
            thread = client.beta.threads.create(
                messages=[{"role": "user", "content": f"[[slow:0.3]][[tokens:{WORDS}]] {marker} run {i}"}])
            runs.append(client.beta.threads.runs.create(thread_id=thread.id, assistant_id=assistant.id))
        followers = [Follower(stack, run.thread_id, run.id, seed) for seed, run in enumerate(runs)]
        deadline = time.monotonic() + 150
        threads = [threading.Thread(target=f.follow, args=(deadline,), daemon=True) for f in followers]
        for thread in threads:
            thread.start()
        time.sleep(1.5)  # the answers are streaming
        for victim in victims:
            victim.kill()
        for victim in victims:
            victim.start(wait=False)
        for victim in victims:
            victim.wait_ready(180)
        for thread in threads:
            thread.join(max(1.0, deadline - time.monotonic()))
    finally:
        for victim in victims:
            if not victim.running():
                victim.start(timeout=180)

    expected = " ".join(f"word{i}" for i in range(1, WORDS + 1))
    for run, follower in zip(runs, followers, strict=True):
        done = client.beta.threads.runs.retrieve(run.id, thread_id=run.thread_id)
        assert done.status == "completed", (run.id, done.status, done.last_error)
        messages = client.beta.threads.messages.list(thread_id=run.thread_id, order="asc").data
        answers = [m for m in messages if m.role == "assistant"]
        assert len(answers) == 1, (run.id, [m.content for m in answers])
        assert answers[0].content[0].type == "text" and answers[0].content[0].text.value == expected
        steps = client.beta.threads.runs.steps.list(run.id, thread_id=run.thread_id).data
        assert [s.type for s in steps] == ["message_creation"], run.id
        assert done.usage is not None and steps[0].usage is not None
        assert done.usage.total_tokens == steps[0].usage.total_tokens, run.id
        assert follower.done, (run.id, follower.types[-3:])
        assert follower.ids == _events_of(db, run.id), (run.id, follower.cuts)
        assert follower.types[-1] in TERMINAL_EVENTS

    deadline = time.monotonic() + 60
    wanted: list[str] = []
    while time.monotonic() < deadline:
        wanted = [row["event_id"] for row in db.fetch(
            "SELECT event_id FROM events WHERE run_id = ANY($1) AND type = ANY($2)", [r.id for r in runs],
            ["thread.run.created", "thread.run.queued", "thread.run.in_progress", "thread.run.completed",
             "thread.message.completed"])]
        if all(event_id in receiver.bodies for event_id in wanted):
            break
        time.sleep(0.2)
    missing = [event_id for event_id in wanted if event_id not in receiver.bodies]
    assert not missing, f"{len(missing)} of {len(wanted)} events never reached the webhook"
    assert receiver.unsigned == 0
    assert all(len(bodies) == 1 for bodies in receiver.bodies.values()), "one webhook id, several bodies"
    client.webhooks.delete(endpoint.id)
    receiver.close()


class ProjectFollower:
    """Follows the project stream (`/v1/events`) for the run ids of the completions it gets, reconnecting with
    Last-Event-ID when the stream breaks."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.completed: list[str] = []
        self.stop = threading.Event()
        self.subscribed = threading.Event()
        self._last = ""

    def follow(self) -> None:
        """Collect `thread.run.completed` run ids until told to stop."""
        headers = {"Authorization": f"Bearer {self.stack.api_key}"}
        with httpx.Client(base_url=self.stack.base_url, headers=headers, trust_env=False,
                          timeout=httpx.Timeout(10, read=5)) as http:
            while not self.stop.is_set():
                resume = {"Last-Event-ID": self._last} if self._last else {}
                try:
                    with http.stream("GET", "/events", params={"types": "thread.run.completed"},
                                     headers=resume) as response:
                        self.subscribed.set()
                        for line in response.iter_lines():
                            if self.stop.is_set():
                                return
                            if line.startswith("id: "):
                                self._last = line[4:]
                            elif line.startswith("data: "):
                                self.completed.append(json.loads(line[6:])["id"])
                except httpx.TransportError:
                    time.sleep(0.2)


def test_a_broker_that_loses_every_record_mid_load_loses_nothing(tmp_path: Path, marker: str) -> None:
    """The orchestrator, ingestion and the notifier are stopped while runs are created and files attached, so their
    records wait in the local in-memory broker; the broker is SIGKILLed with them and started again empty (as
    `make run` does), then the services. Every run still completes once, every file is indexed, every
    webhook-worthy event reaches the endpoint once and the project stream gets every completion once: what the
    broker lost comes from the database (the orchestrator's and ingestion's re-send of unclaimed work, the
    notifier's catch-up from the event log)."""
    service_env = {name: dict(env) for name, env in TEST_SERVICE_ENV_BY_SERVICE.items()}
    service_env["run_orchestrator"]["THREADLINE_UNCLAIMED_RUN_SECONDS"] = "3"
    stack = Stack(StackConfig.from_env("test", common_env=dict(TEST_SERVICE_ENV), service_env=service_env,
                                       state_dir=tmp_path / "state", logs_dir=tmp_path / "logs"))
    stack.start()
    receiver = SignedReceiver()
    follower = ProjectFollower(stack)
    stopped = [stack.service(name) for name in ("run_orchestrator", "ingestion", "notifier")]
    try:
        client = openai.OpenAI(base_url=stack.base_url, api_key=stack.api_key, max_retries=5)
        wanted_types = ["thread.run.created", "thread.run.completed", "thread.message.completed",
                        "vector_store.file.completed"]
        endpoint = client.webhooks.create(url=receiver.url, name=f"broker loss {marker}", event_types=wanted_types)
        receiver.secret = endpoint.signing_secret
        listener = threading.Thread(target=follower.follow, daemon=True)
        listener.start()
        assert follower.subscribed.wait(10)
        assistant = client.beta.assistants.create(model="gpt-4o", name="broker loss")
        store = client.vector_stores.create(name=f"broker loss {marker}")
        files = [client.files.create(file=(f"note{i}.txt", f"Note {i}: {marker} keeps lighthouse {i}.".encode()),
                                     purpose="assistants").id for i in range(3)]
        db = Db(stack.database_url)
        for proc in stopped:
            proc.stop(settle=False)
        try:
            runs = [client.beta.threads.create_and_run(
                assistant_id=assistant.id,
                thread={"messages": [{"role": "user", "content": f"[[tokens:{WORDS}]] {marker} {i}"}]})
                for i in range(4)]
            for file_id in files:
                client.vector_stores.files.create(vector_store_id=store.id, file_id=file_id)
            assert wait_until(lambda: db.fetchval("SELECT count(*) FROM outbox_pending") == 0, timeout=10)
            assert stack.broker is not None and stack.broker.pid is not None
            os.kill(stack.broker.pid, signal.SIGKILL)  # with every record the stopped services had not consumed
            assert wait_until(lambda: stack.broker is not None and not stack.broker.running(), timeout=5)
            assert stack.revive_broker()
        finally:
            for proc in stopped:
                proc.start(wait=False)
            for proc in stopped:
                proc.wait_ready(120)
        runs += [client.beta.threads.create_and_run(  # and the stack takes new work
            assistant_id=assistant.id, thread={"messages": [{"role": "user", "content": f"{marker} after"}]})]

        deadline = time.monotonic() + 120
        for run in runs:
            done = client.beta.threads.runs.retrieve(run.id, thread_id=run.thread_id)
            while done.status in ("queued", "in_progress") and time.monotonic() < deadline:
                time.sleep(0.2)
                done = client.beta.threads.runs.retrieve(run.id, thread_id=run.thread_id)
            assert done.status == "completed", (run.id, done.status, done.last_error)
            answers = [m for m in client.beta.threads.messages.list(thread_id=run.thread_id).data
                       if m.role == "assistant"]
            assert len(answers) == 1, run.id
        for file_id in files:
            attached = client.vector_stores.files.retrieve(file_id, vector_store_id=store.id)
            while attached.status == "in_progress" and time.monotonic() < deadline:
                time.sleep(0.2)
                attached = client.vector_stores.files.retrieve(file_id, vector_store_id=store.id)
            assert attached.status == "completed", (file_id, attached.status, attached.last_error)

        wanted = [row["event_id"] for row in db.fetch(
            "SELECT event_id FROM events WHERE type = ANY($1) AND topic = 'threadline.events'", wanted_types)]
        assert len(wanted) == 3 * len(runs) + len(files)
        while time.monotonic() < deadline and not (set(wanted) <= set(receiver.bodies)
                                                   and {r.id for r in runs} <= set(follower.completed)):
            time.sleep(0.2)
        missing = [event_id for event_id in wanted if event_id not in receiver.bodies]
        assert not missing, f"{len(missing)} of {len(wanted)} events never reached the webhook"
        assert receiver.unsigned == 0 and set(receiver.received.values()) == {1}, "an event delivered twice"
        assert sorted(follower.completed) == sorted(r.id for r in runs), "the project stream missed or doubled one"
    finally:
        follower.stop.set()
        receiver.close()
        stack.stop()
