"""A record a service's handler keeps failing on (bad data) is parked in `dead_letters`, and its partition moves on."""

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid

import openai
import pytest

from threadline_core.events import EventEnvelope
from threadline_core.kafka import create_producer
from threadline_core.topics import TOOL_REQUESTS
from threadline_devstack.sql import Db
from threadline_devstack.stack import Stack

pytestmark = pytest.mark.slow


async def publish(stack: Stack, envelope: EventEnvelope) -> None:
    producer = create_producer(stack.kafka_bootstrap_servers)
    await producer.start()
    try:
        await producer.send_and_wait(TOOL_REQUESTS, envelope.to_bytes(), key=envelope.key.encode())
    finally:
        await producer.stop()


def test_a_poisonous_tool_request_is_parked_and_the_thread_goes_on(stack: Stack, client: openai.OpenAI,
                                                                   db: Db) -> None:
    thread = client.beta.threads.create()
    poison = EventEnvelope(type="command.tool.call_requested", project_id="proj_local", key=thread.id,
                           thread_id=thread.id, data={"run_id": f"run_{uuid.uuid4().hex}"})  # fields missing
    asyncio.run(publish(stack, poison))
    # a real call of the same thread (same partition) right behind it still runs
    assistant = client.beta.assistants.create(model="gpt-4o", tools=[{"type": "code_interpreter"}])
    directive = json.dumps({"code": "print(6 * 7)"})
    client.beta.threads.messages.create(thread.id, role="user", content=f"[[call:code_interpreter:{directive}]]")
    run = client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id,
                                                   poll_interval_ms=200, timeout=120)
    assert run.status == "completed", run.last_error
    deadline = time.monotonic() + 30
    while not db.fetchval("SELECT count(*) FROM dead_letters WHERE event_id = $1", poison.event_id):
        assert time.monotonic() < deadline, "the poisonous record was not parked"
        time.sleep(0.2)
    row = db.fetchrow("SELECT id, consumer_group, topic, event_type, error, attempts FROM dead_letters"
                      " WHERE event_id = $1", poison.event_id)
    assert row is not None and row["consumer_group"] == "tool-executor" and row["topic"] == TOOL_REQUESTS
    assert row["event_type"] == "command.tool.call_requested"
    assert row["error"].startswith("ValidationError") and row["attempts"] >= 5

    # replayed (the data still fails): it goes back to its topic and is parked again at its new offset
    env = {**os.environ, "DATABASE_URL": stack.database_url, "KAFKA_BOOTSTRAP_SERVERS": stack.kafka_bootstrap_servers}
    admin = [sys.executable, "-m", "gateway", "dead-letters"]  # in the service image, as `gateway migrate`
    listed = subprocess.run([*admin, "list"], check=True, capture_output=True, text=True, env=env)
    assert f"{row['id']}  " in listed.stdout and "command.tool.call_requested" in listed.stdout
    replayed = subprocess.run([*admin, "replay", str(row["id"])], check=True, capture_output=True, text=True,
                              env=env)
    assert "1 replayed" in replayed.stdout
    deadline = time.monotonic() + 30
    while db.fetchval("SELECT count(*) FROM dead_letters WHERE event_id = $1", poison.event_id) < 2:
        assert time.monotonic() < deadline, "the replayed record was not handled again"
        time.sleep(0.2)
    assert db.fetchval("SELECT count(*) FROM dead_letters WHERE event_id = $1 AND replayed_at IS NOT NULL",
                       poison.event_id) == 1
