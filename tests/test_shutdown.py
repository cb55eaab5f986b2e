"""SIGTERM each service in the middle of real work: it exits cleanly (code 0, by itself), and after a
restart nothing is lost: every accepted run completes exactly once, every file is indexed, every
webhook event is delivered.
"""

import contextlib
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types.beta.threads import Run
from sse_helpers import outbox_events, read_sse
from webhook_receiver import SlowReceiver

from threadline_devstack.stack import ServiceProcess, Stack

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

TERMINAL = {"completed", "failed", "cancelled", "expired", "incomplete"}
STOP_TIMEOUT = 60.0
"""How long the test waits for a SIGTERMed service before SIGKILL (far above the test grace of 5 s)."""


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.1,
               detail: Callable[[], str] = str) -> None:
    """Poll `check()` until it is true; fail after `timeout` seconds (with `detail()` in the message)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}\n{detail()}")
        time.sleep(interval)


def exited_gracefully(proc: ServiceProcess, code: int | None) -> None:
    """Exit code 0 (uvicorn, in the gateway, re-raises the SIGTERM it handled: -15) after a logged clean stop."""
    allowed = {0, -signal.SIGTERM} if proc.name == "gateway" else {0}
    log = proc.log_path.read_text(errors="replace")
    assert code in allowed, f"{proc.name} exited with {code}:\n{proc.log_tail(60)}"
    started = log.rfind(f" starting {proc.name}")  # the header ServiceProcess writes at each start
    assert started >= 0, f"no start header in {proc.log_path}"
    assert log.find(" stopped\"", started) > started, f"{proc.name} did not log a clean stop:\n{proc.log_tail(60)}"


@contextlib.contextmanager
def restarted_after(proc: ServiceProcess) -> Iterator[Callable[[], None]]:
    """Yield a function that SIGTERMs `proc` and checks it exits cleanly; the process is started again after."""
    try:
        yield lambda: exited_gracefully(proc, proc.stop(STOP_TIMEOUT))
    finally:
        if not proc.running():
            proc.start(timeout=180)


def wait_runs(client: openai.OpenAI, runs: list[Run], timeout: float = 180) -> list[Run]:
    """Poll every run until it is terminal."""
    done: dict[str, Run] = {}

    def all_done() -> bool:
        for run in runs:
            if run.id not in done:
                current = client.beta.threads.runs.retrieve(run.id, thread_id=run.thread_id)
                if current.status in TERMINAL:
                    done[run.id] = current
        return len(done) == len(runs)

    wait_until(all_done, timeout, f"{len(runs)} runs to finish", interval=0.2)
    return [done[run.id] for run in runs]


def assert_completed_once(client: openai.OpenAI, runs: list[Run]) -> None:
    """Every run completed, with exactly one assistant message (driven to the end once, not twice)."""
    for run in wait_runs(client, runs):
        assert run.status == "completed", (run.id, run.status, run.last_error)
        messages = client.beta.threads.messages.list(run.thread_id, order="asc")
        assistant = [m for m in messages.data if m.role == "assistant"]
        assert len(assistant) == 1, (run.id, [m.content for m in assistant])
        steps = client.beta.threads.runs.steps.list(run.id, thread_id=run.thread_id)
        assert [s.type for s in steps.data if s.type == "message_creation"] == ["message_creation"], run.id


@pytest.fixture(scope="module")
def assistant_id(client: openai.OpenAI) -> str:
    """A plain assistant for the runs of this module."""
    return client.beta.assistants.create(model="gpt-4o", name="shutdown tests").id


def start_slow_runs(client: openai.OpenAI, assistant_id: str, marker: str, count: int) -> list[Run]:
    """Runs whose model reply streams for a couple of seconds (so they are in flight when the signal comes)."""
    return [client.beta.threads.create_and_run(
        assistant_id=assistant_id,
        thread={"messages": [{"role": "user", "content": f"[[slow:0.2]][[tokens:12]] {marker} run {i}"}]})
        for i in range(count)]


def test_run_orchestrator_sigterm_mid_runs(stack: Stack, client: openai.OpenAI, assistant_id: str,
                                           marker: str) -> None:
    """Runs being driven when the orchestrator gets SIGTERM are finished or handed back, never lost."""
    runs = start_slow_runs(client, assistant_id, marker, 6)
    with restarted_after(stack.service("run_orchestrator")) as sigterm:
        wait_until(lambda: any(client.beta.threads.runs.retrieve(r.id, thread_id=r.thread_id).status == "in_progress"
                               for r in runs), 60, "a run in progress")
        sigterm()
    assert_completed_once(client, runs)


def test_gateway_sigterm_mid_requests(stack: Stack, assistant_id: str, marker: str) -> None:
    """Requests in flight are answered; every run the gateway accepted completes after its restart."""
    accepted: list[Run] = []
    stop = threading.Event()
    sdk = openai.OpenAI(base_url=stack.base_url, api_key=stack.api_key, max_retries=0, timeout=30)

    def load() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                accepted.append(sdk.beta.threads.create_and_run(
                    assistant_id=assistant_id,
                    thread={"messages": [{"role": "user", "content": f"[[tokens:3]] {marker} {i}"}]}))
            except (openai.APIConnectionError, openai.InternalServerError):
                time.sleep(0.05)  # the gateway is down: a refused request was never accepted

    worker = threading.Thread(target=load, name="gateway-load")
    worker.start()
    try:
        with restarted_after(stack.gateway) as sigterm:
            wait_until(lambda: len(accepted) >= 3, 60, "accepted requests")
            sigterm()
        count = len(accepted)
        wait_until(lambda: len(accepted) > count, 60, "requests accepted after the restart")
    finally:
        stop.set()
        worker.join(60)
        sdk.close()
    assert_completed_once(openai.OpenAI(base_url=stack.base_url, api_key=stack.api_key, max_retries=2),
                          accepted)


def test_gateway_sigterm_ends_project_streams(stack: Stack) -> None:
    """An endless `GET /v1/events` stream ends cleanly at SIGTERM (its client resumes elsewhere with
    Last-Event-ID) instead of being cut off when the gateway's grace period runs out."""
    outcome: list[object] = []
    opened = threading.Event()

    def listen() -> None:
        try:
            with httpx.stream("GET", f"{stack.base_url}/events", headers={"Authorization": f"Bearer {stack.api_key}"},
                              timeout=60, trust_env=False) as response:
                opened.set()
                for _ in response.iter_lines():  # heartbeats until the end
                    pass
            outcome.append("ended")
        except httpx.HTTPError as exc:
            outcome.append(exc)

    listener = threading.Thread(target=listen, name="project-stream")
    listener.start()
    with restarted_after(stack.gateway) as sigterm:
        assert opened.wait(30)
        time.sleep(0.5)  # the stream subscribes once its response started
        sigterm()
    listener.join(30)
    assert outcome == ["ended"]


def test_gateway_sigterm_ends_run_streams_cleanly_and_they_resume(stack: Stack, client: openai.OpenAI,
                                                                  assistant_id: str, marker: str) -> None:
    """A run's stream open at SIGTERM ends cleanly before the gateway's grace period is over, with an `error` event and
    no `done` (the run goes on; the SDK raises instead of taking the end for the run's) and with no error logged,
    instead of being cancelled by uvicorn with a traceback; resumed with Last-Event-ID on the restarted gateway it
    brings the rest of the run's events, each once and in order, up to its terminal event."""
    gateway = stack.gateway
    grace = float(gateway.env.get("THREADLINE_SHUTDOWN_GRACE_SECONDS", "20"))
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    thread = client.beta.threads.create(
        messages=[{"role": "user", "content": f"[[slow:0.25]][[tokens:40]] {marker} streamed through a restart"}])
    first: list[dict[str, str]] = []
    outcome: list[object] = []
    ended_at: list[float] = []

    def listen() -> None:
        try:
            with httpx.stream("POST", f"{stack.base_url}/threads/{thread.id}/runs", headers=headers,
                              json={"assistant_id": assistant_id, "stream": True}, timeout=60,
                              trust_env=False) as response:
                read_sse(response, into=first)
            outcome.append("ended")
        except httpx.HTTPError as exc:
            outcome.append(exc)
        ended_at.append(time.monotonic())

    sdk_thread = client.beta.threads.create(
        messages=[{"role": "user", "content": f"[[slow:0.25]][[tokens:40]] {marker} followed by the SDK"}])
    sdk_outcome: list[object] = []
    sdk_mid_run = threading.Event()

    class Handler(openai.AssistantEventHandler):
        def on_text_delta(self, delta: Any, snapshot: Any) -> None:
            sdk_mid_run.set()

    def follow_with_sdk() -> None:
        try:
            with client.beta.threads.runs.stream(thread_id=sdk_thread.id, assistant_id=assistant_id,
                                                 event_handler=Handler()) as stream:
                stream.until_done()
            sdk_outcome.append("ended")
        except openai.APIError as exc:
            sdk_outcome.append(exc)

    listener = threading.Thread(target=listen, name="run-stream")
    follower = threading.Thread(target=follow_with_sdk, name="sdk-run-stream")
    listener.start()
    follower.start()
    log_start = gateway.log_path.stat().st_size
    with restarted_after(gateway) as sigterm:
        wait_until(lambda: any(e["event"] == "thread.message.delta" for e in list(first)), 60, "a delta")
        assert sdk_mid_run.wait(60)
        signalled = time.monotonic()
        sigterm()
        listener.join(30)
        follower.join(30)
        log = gateway.log_path.read_text(errors="replace")[log_start:]
    assert outcome == ["ended"], outcome
    assert ended_at[0] - signalled < grace, f"the stream ended {ended_at[0] - signalled:.1f}s after SIGTERM"
    *before, last = first
    assert last["event"] == "error" and json.loads(last["data"])["error"]["code"] == "stream_interrupted", first[-3:]
    events = [event["event"] for event in before]
    assert "done" not in events and not TERMINAL & {e.removeprefix("thread.run.") for e in events}, events
    [raised] = sdk_outcome
    assert isinstance(raised, openai.APIError) and raised.code == "stream_interrupted", sdk_outcome
    assert "Traceback" not in log and '"level": "ERROR"' not in log, log[-4000:]
    run_id = json.loads(next(e["data"] for e in first if e["event"] == "thread.run.created"))["id"]
    sent = outbox_events(first)

    events_url = f"{stack.base_url}/threads/{thread.id}/runs/{run_id}/events"
    with httpx.stream("GET", events_url, headers={**headers, "Last-Event-ID": str(sent[-1][0])}, timeout=60,
                      trust_env=False) as response:
        assert response.status_code == 200
        rest = read_sse(response)
    assert [event["event"] for event in rest][-2:] == ["thread.run.completed", "done"], rest
    resumed = outbox_events(rest)
    assert [seq for seq, _ in resumed] == sorted({seq for seq, _ in resumed}) and resumed[0] > sent[-1], resumed
    with httpx.stream("GET", events_url, headers=headers, timeout=60, trust_env=False) as response:
        whole = outbox_events(read_sse(response))
    assert sent + resumed == whole  # every event once, in order


def test_notifier_sigterm_mid_deliveries(stack: Stack, client: openai.OpenAI, assistant_id: str,
                                         marker: str) -> None:
    """Deliveries leased when the notifier gets SIGTERM are sent or released; all arrive after the restart."""
    receiver = SlowReceiver(delay=0.3)
    endpoint = client.webhooks.create(url=receiver.url, name=f"shutdown {marker}",
                                      event_types=["thread.run.created", "thread.run.completed"])
    try:
        runs = [client.beta.threads.create_and_run(
            assistant_id=assistant_id, thread={"messages": [{"role": "user", "content": f"[[tokens:2]] {marker}"}]})
            for _ in range(8)]
        ids = {run.id for run in runs}
        with restarted_after(stack.service("notifier")) as sigterm:
            wait_until(lambda: bool(receiver.about("thread.run.created") & ids), 60, "a first delivery")
            sigterm()
        wait_runs(client, runs)
        wait_until(lambda: ids <= receiver.about("thread.run.completed") and ids <= receiver.about(
            "thread.run.created"), 120, "every event delivered after the restart")
    finally:
        with contextlib.suppress(openai.NotFoundError):
            client.webhooks.delete(endpoint.id)
        receiver.close()


def _search_workers(stack: Stack) -> ServiceProcess:
    """The process running the tool executor (with ingestion, in Qdrant local mode)."""
    return stack.service("tool_executor")


def test_tool_executor_sigterm_mid_tool_call(stack: Stack, client: openai.OpenAI, marker: str) -> None:
    """A code_interpreter call running at SIGTERM is finished or redelivered; its run completes."""
    code = "import time\ntime.sleep(2)\nprint('survived')"
    assistant = client.beta.assistants.create(model="gpt-4o", tools=[{"type": "code_interpreter"}])
    directive = f"[[call:code_interpreter:{json.dumps({'code': code})}]]"
    runs = [client.beta.threads.create_and_run(
        assistant_id=assistant.id, thread={"messages": [{"role": "user", "content": f"{marker} {i} {directive}"}]})
        for i in range(2)]

    def tool_call_running() -> bool:
        for run in runs:
            steps = client.beta.threads.runs.steps.list(run.id, thread_id=run.thread_id)
            if any(s.type == "tool_calls" and s.status == "in_progress" for s in steps.data):
                return True
        return False

    with restarted_after(_search_workers(stack)) as sigterm:
        wait_until(tool_call_running, 60, "a tool call in flight")
        sigterm()
    for run in wait_runs(client, runs):
        assert run.status == "completed", (run.id, run.last_error)
        steps = client.beta.threads.runs.steps.list(run.id, thread_id=run.thread_id)
        assert [s.status for s in steps.data if s.type == "tool_calls"] == ["completed"]


@pytest.mark.timeout(600)
def test_ingestion_sigterm_mid_files(stack: Stack, client: openai.OpenAI, marker: str) -> None:
    """Files being ingested at SIGTERM are indexed after the restart: none stays in_progress or fails."""
    text = "\n\n".join(f"Paragraph {i} of the {marker} handbook: shipping, returns and warranty terms."
                       for i in range(40))
    file_ids = [client.files.create(file=(f"{marker}-{i}.txt", text.encode()), purpose="assistants").id
                for i in range(3)]
    store = client.vector_stores.create(name=f"shutdown {marker}")
    batch = client.vector_stores.file_batches.create(store.id, file_ids=file_ids)
    with restarted_after(stack.service("ingestion")) as sigterm:
        sigterm()
    wait_until(lambda: client.vector_stores.file_batches.retrieve(batch.id, vector_store_id=store.id).status
               != "in_progress", 420, "the batch to finish", detail=lambda: stack.service("ingestion").log_tail(60))
    files = client.vector_stores.files.list(store.id, limit=100).data
    assert sorted(f.id for f in files) == sorted(file_ids)
    assert {f.status for f in files} == {"completed"}, [(f.id, f.status, f.last_error) for f in files]
