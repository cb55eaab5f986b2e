"""A short chaos trial of the central promise: SIGKILL the gateway, the run orchestrator and the notifier while runs
stream, clients follow them (cutting their streams and resuming with Last-Event-ID) and a webhook endpoint listens;
start them again as an operator would. Then nothing is lost and nothing is doubled:

- every run completes once: one assistant message with the whole text, usage equal to its steps' usage;
- each resumed stream yields every event of its run's event log exactly once, in id order, then `done`;
- every webhook-worthy event reached the receiver, signed, with one body per webhook id.

The longer trial (minutes of kills of every service and of Postgres under mixed load) found what
tests/test_errors.py::test_a_backend_terminated_inside_a_transaction_is_a_503 now covers.
"""

import random
import threading
import time

import httpx
import openai
import pytest
from webhook_receiver import SignedReceiver

from threadline_devstack.sql import Db
from threadline_devstack.stack import Stack

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
