"""The run orchestrator under bad input: a bad stored run, NUL characters or an enormous reply from the model.

The promise: neither wedges a run nor the service; a run always reaches a terminal state, with a clear
`last_error` when it cannot complete. Through the real stack (see tests/test_runs_flow.py) unless noted.
"""

import time
from typing import Any

import openai
import pytest
from openai.types.beta.threads import Run

from threadline_devstack.sql import Db

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TERMINAL = {"completed", "failed", "cancelled", "expired", "incomplete"}


def wait_for(client: openai.OpenAI, thread_id: str, run_id: str, statuses: set[str] = TERMINAL,
             timeout: float = 20.0) -> Run:
    """Poll the run until it reaches one of `statuses`."""
    deadline = time.monotonic() + timeout
    while True:
        run = client.beta.threads.runs.retrieve(run_id, thread_id=thread_id)
        if run.status in statuses:
            return run
        assert time.monotonic() < deadline, f"run stuck in {run.status}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def assistant_id(client: openai.OpenAI) -> str:
    """A plain assistant (no tools: its answers are text)."""
    return client.beta.assistants.create(model="gpt-4o-mini", instructions="You are terse.").id


def start(client: openai.OpenAI, assistant_id: str, text: str, **run_args: Any) -> tuple[str, Run]:
    """A new thread with one user message and a run on it."""
    thread = client.beta.threads.create(messages=[{"role": "user", "content": text}])
    run = client.beta.threads.runs.create(thread_id=thread.id, assistant_id=assistant_id, **run_args)
    return thread.id, run


# --- 1. one run the sweep cannot finish does not stop the others -------------------------------------------


def test_sweep_goes_on_past_a_run_it_cannot_finish(client: openai.OpenAI, db: Db, assistant_id: str,
                                                   marker: str) -> None:
    """Two orphaned cancellations, one of them with a broken stored doc: the other one is still cancelled."""
    runs = []
    for _ in range(2):
        thread_id, run = start(client, assistant_id, f"[[reply:done]] {marker}")
        assert wait_for(client, thread_id, run.id).status == "completed"
        runs.append((thread_id, run.id))
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
