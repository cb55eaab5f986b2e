"""Less common Assistants API behaviours, checked through the real stack and the official SDK.

The scripted model server records every request (tests find theirs by a marker in the user message).
"""

import base64
import time

import httpx
import openai
import pytest
from openai.types.beta import FileSearchToolParam
from openai.types.beta.threads.message_create_params import Attachment

from threadline_devstack.model_server import ScriptedModelServer
from threadline_devstack.sql import Db
from threadline_devstack.stack import Stack

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5E"
                       "rkJggg==")
"""A 1x1 PNG."""


def reply_text(client: openai.OpenAI, thread_id: str) -> str:
    """The text of the thread's newest message."""
    block = client.beta.threads.messages.list(thread_id=thread_id).data[0].content[0]
    assert block.type == "text"
    return block.text.value


@pytest.fixture(scope="module")
def assistant_id(client: openai.OpenAI) -> str:
    """A plain assistant."""
    return client.beta.assistants.create(model="gpt-4o", instructions="Look closely.").id


def test_image_file_parts_reach_the_model_as_images(client: openai.OpenAI, model: ScriptedModelServer,
                                                     assistant_id: str, marker: str) -> None:
    image = client.files.create(file=("dot.png", PNG, "image/png"), purpose="vision")
    gone = client.files.create(file=("gone.png", PNG, "image/png"), purpose="vision")
    thread = client.beta.threads.create(messages=[{"role": "assistant", "content": [
        {"type": "text", "text": "Here is a plot."}, {"type": "image_file", "image_file": {"file_id": image.id}},
        {"type": "image_url", "image_url": {"url": "https://example.com/plot.png"}}]}, {"role": "user", "content": [
        {"type": "text", "text": f"What is in these images? {marker}"},
        {"type": "image_file", "image_file": {"file_id": image.id, "detail": "high"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        {"type": "image_file", "image_file": {"file_id": gone.id}}]}])
    client.files.delete(gone.id)
    run = client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant_id)
    assert run.status == "completed", run.last_error
    [request] = model.find_requests(marker)
    parts = request["messages"][-1]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url", "image_url", "text"]
    # the uploaded image as a vision part: its bytes as a data URL, its detail kept (as the hosted API shows it)
    assert parts[1]["image_url"] == {"url": "data:image/png;base64," + base64.b64encode(PNG).decode(),
                                     "detail": "high"}
    assert parts[2]["image_url"] == {"url": "https://example.com/cat.png", "detail": "auto"}  # the default, stored
    assert gone.id in parts[3]["text"]
    # chat completions take images in user messages only: an assistant's images are text notes
    assert request["messages"][-2] == {"role": "assistant", "content": f"Here is a plot.\n[image file {image.id}]\n"
                                                                      "[image https://example.com/plot.png]"}
    # the stored message is unchanged
    stored = client.beta.threads.messages.list(thread_id=thread.id, order="asc").data[1]
    assert [c.type for c in stored.content] == ["text", "image_file", "image_url", "image_file"]


def test_file_search_ranking_options_without_ranker(client: openai.OpenAI, stack: Stack) -> None:
    tool: FileSearchToolParam = {"type": "file_search", "file_search": {
        "max_num_results": 3, "ranking_options": {"score_threshold": 0.5}}}
    assistant = client.beta.assistants.create(model="gpt-4o", tools=[tool])
    raw = httpx.get(f"{stack.base_url}/assistants/{assistant.id}", trust_env=False,
                    headers={"Authorization": f"Bearer {stack.api_key}"}).json()
    # the ranker is never null: unspecified, it is the `auto` ranker (as the API reference has it)
    assert raw["tools"][0]["file_search"] == {"max_num_results": 3,
                                              "ranking_options": {"ranker": "auto", "score_threshold": 0.5}}
    thread = client.beta.threads.create()
    run = client.beta.threads.runs.create(thread_id=thread.id, assistant_id=assistant.id, tools=[tool])
    assert run.tools[0].type == "file_search" and run.tools[0].file_search is not None
    assert run.tools[0].file_search.ranking_options is not None
    assert run.tools[0].file_search.ranking_options.ranker == "auto"


def test_file_search_keeps_its_stores_active_and_its_project(client: openai.OpenAI, other_client: openai.OpenAI,
                                                              db: Db, marker: str) -> None:
    store = client.vector_stores.create(name="kiwis", expires_after={"anchor": "last_active_at", "days": 1})
    client.vector_stores.files.upload_and_poll(vector_store_id=store.id, file=(
        "kiwi.txt", f"Kiwis are green inside. {marker}".encode(), "text/plain"))
    before = client.vector_stores.retrieve(store.id)
    time.sleep(1.1)
    assistant = client.beta.assistants.create(model="gpt-4o", tools=[{"type": "file_search"}],
                                              tool_resources={"file_search": {"vector_store_ids": [store.id]}})
    search = '[[call:file_search:{"query": "kiwi colour"}]]'
    thread = client.beta.threads.create(messages=[{"role": "user", "content": f"Kiwis? {search}"}])
    run = client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id)
    assert run.status == "completed", run.last_error
    assert marker in reply_text(client, thread.id)
    # a store that is part of a run is active: last_active_at, and the expiry anchored on it, move (as hosted)
    after = client.vector_stores.retrieve(store.id)
    assert after.last_active_at is not None and before.last_active_at is not None
    assert after.last_active_at > before.last_active_at
    assert after.expires_at == after.last_active_at + 86400

    # another project cannot name this store in its tool_resources (404), and one named before ids were
    # checked is not searched
    with pytest.raises(openai.NotFoundError):
        other_client.beta.assistants.create(model="gpt-4o", tools=[{"type": "file_search"}],
                                            tool_resources={"file_search": {"vector_store_ids": [store.id]}})
    intruder = other_client.beta.assistants.create(model="gpt-4o", tools=[{"type": "file_search"}])
    db.execute("UPDATE assistants SET doc = jsonb_set(doc, '{tool_resources}', $2::jsonb) WHERE id = $1",
               intruder.id, {"file_search": {"vector_store_ids": [store.id]}})
    thread = other_client.beta.threads.create(messages=[{"role": "user", "content": f"Kiwis? {search}"}])
    run = other_client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=intruder.id)
    assert run.status == "completed", run.last_error
    assert marker not in reply_text(other_client, thread.id)
    [step] = [s for s in other_client.beta.threads.runs.steps.list(run.id, thread_id=thread.id).data
              if s.type == "tool_calls"]
    assert step.step_details.type == "tool_calls"
    [call] = step.step_details.tool_calls
    assert call.type == "file_search" and call.file_search.results == []


def test_reasoning_effort_reaches_the_model(client: openai.OpenAI, model: ScriptedModelServer,
                                            marker: str) -> None:
    assistant = client.beta.assistants.create(model="o3-mini", reasoning_effort="high")
    thread = client.beta.threads.create(messages=[{"role": "user", "content": f"Think. {marker}-a"}])
    run = client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id)
    assert (run.status, run.model_dump()["reasoning_effort"]) == ("completed", "high")
    run = client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id,
                                                   reasoning_effort="low",
                                                   additional_messages=[{"role": "user", "content": f"{marker}-b"}])
    assert (run.status, run.model_dump()["reasoning_effort"]) == ("completed", "low")
    assert model.find_requests(f"{marker}-a")[0]["reasoning_effort"] == "high"
    assert model.find_requests(f"{marker}-b")[0]["reasoning_effort"] == "low"
    plain = client.beta.assistants.create(model="gpt-4o")
    thread = client.beta.threads.create(messages=[{"role": "user", "content": f"{marker}-c"}])
    assert client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=plain.id).status == "completed"
    assert "reasoning_effort" not in model.find_requests(f"{marker}-c")[0]


def test_code_interpreter_attachment_of_an_unknown_file_is_refused(client: openai.OpenAI,
                                                                    assistant_id: str) -> None:
    missing: list[Attachment] = [{"file_id": "file-missing", "tools": [{"type": "code_interpreter"}]}]
    thread = client.beta.threads.create()
    with pytest.raises(openai.NotFoundError) as caught:
        client.beta.threads.messages.create(thread_id=thread.id, role="user", content="x", attachments=missing)
    assert caught.value.body == {"message": "No file found with id 'file-missing'.", "type": "invalid_request_error",
                                 "param": "attachments[0].file_id", "code": None}
    with pytest.raises(openai.NotFoundError) as caught:
        client.beta.threads.runs.create(thread_id=thread.id, assistant_id=assistant_id, additional_messages=[
            {"role": "user", "content": "x", "attachments": missing}])
    assert caught.value.body["param"] == "additional_messages[0].attachments[0].file_id"
    assert client.beta.threads.messages.list(thread_id=thread.id).data == []
    assert client.beta.threads.runs.list(thread_id=thread.id).data == []
    with pytest.raises(openai.NotFoundError) as caught:
        client.beta.threads.create(messages=[{"role": "user", "content": "x"},
                                             {"role": "user", "content": "x", "attachments": missing}])
    assert caught.value.body["param"] == "messages[1].attachments[0].file_id"
    with pytest.raises(openai.NotFoundError) as caught:
        client.beta.threads.create_and_run(assistant_id=assistant_id, thread={"messages": [
            {"role": "user", "content": "x", "attachments": missing}]})
    assert caught.value.body["param"] == "thread.messages[0].attachments[0].file_id"
    real = client.files.create(file=("data.csv", b"a,b\n1,2\n", "text/csv"), purpose="assistants")
    message = client.beta.threads.messages.create(thread_id=thread.id, role="user", content="x", attachments=[
        {"file_id": real.id, "tools": [{"type": "code_interpreter"}]}])
    assert message.attachments is not None and message.attachments[0].file_id == real.id
