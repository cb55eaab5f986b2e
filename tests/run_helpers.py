"""Helpers for tests that start runs and poll them as a user of the hosted API does."""

import time
from typing import Any

import openai
from openai.types.beta.threads import Run

TERMINAL = {"completed", "failed", "cancelled", "expired", "incomplete"}


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
