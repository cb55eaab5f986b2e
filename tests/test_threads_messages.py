"""Threads and messages through the official SDK: shapes, content parts, pagination, events, isolation."""

from typing import Any

import openai
import pytest
from openai.types.beta import Thread, ThreadDeleted
from openai.types.beta.threads import Message, MessageDeleted

from threadline_devstack.sql import Db

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

MESSAGE_KEYS = {"id", "object", "created_at", "assistant_id", "thread_id", "run_id", "role", "content",
                "attachments", "metadata", "status"}


def test_create_empty_thread(client: openai.OpenAI) -> None:
    raw = client.beta.threads.with_raw_response.create().http_response.json()
    thread = Thread.model_validate(raw)
    assert thread.id.startswith("thread_") and thread.object == "thread"
    assert raw["metadata"] == {} and raw["tool_resources"] == {}
    assert client.beta.threads.messages.list(thread.id).data == []


def test_create_thread_with_messages(client: openai.OpenAI) -> None:
    doc = client.files.create(file=("doc.txt", b"a document", "text/plain"), purpose="assistants").id
    img = client.files.create(file=("img.png", b"\x89PNG\r\n\x1a\n", "image/png"), purpose="vision").id
    with pytest.raises(openai.NotFoundError) as unknown:  # as for attachments: an unknown file is refused
        client.beta.threads.create(messages=[{"role": "user", "content": [
            {"type": "text", "text": "look"}, {"type": "image_file", "image_file": {"file_id": "file-img"}}]}])
    assert isinstance(unknown.value.body, dict)
    assert unknown.value.body["param"] == "messages[0].content[1].image_file.file_id"
    thread = client.beta.threads.create(
        messages=[
            {"role": "user", "content": "first", "metadata": {"n": "1"}},
            {"role": "assistant", "content": "second"},
            {"role": "user", "content": [
                {"type": "text", "text": "look at this"},
                {"type": "image_file", "image_file": {"file_id": img, "detail": "low"}},
                {"type": "image_url", "image_url": {"url": "HTTPS://example.com/cat.png"}},
            ], "attachments": [{"file_id": doc, "tools": [{"type": "file_search"}]}]},
        ],
        metadata={"topic": "tests"},
        tool_resources={"code_interpreter": {"file_ids": [doc]}},
    )
    assert thread.metadata == {"topic": "tests"}
    assert thread.tool_resources is not None and thread.tool_resources.code_interpreter is not None
    assert thread.tool_resources.code_interpreter.file_ids == [doc]
    messages = client.beta.threads.messages.list(thread.id, order="asc").data
    assert [m.role for m in messages] == ["user", "assistant", "user"]
    first, _, third = messages
    assert first.content[0].type == "text" and first.content[0].text.value == "first"
    assert first.content[0].text.annotations == []
    assert first.metadata == {"n": "1"}
    assert first.thread_id == thread.id and first.run_id is None and first.assistant_id is None
    assert [c.type for c in third.content] == ["text", "image_file", "image_url"]
    assert third.content[1].type == "image_file" and third.content[1].image_file.file_id == img
    assert third.content[1].image_file.detail == "low"
    assert third.content[2].type == "image_url"
    assert third.content[2].image_url.url == "HTTPS://example.com/cat.png"  # a URL's scheme may be in any case
    assert third.attachments is not None and third.attachments[0].file_id == doc
    assert third.attachments[0].tools is not None and third.attachments[0].tools[0].type == "file_search"


def test_thread_retrieve_modify_delete(client: openai.OpenAI) -> None:
    thread = client.beta.threads.create(metadata={"a": "1"}, messages=[{"role": "user", "content": "hi"}])
    assert client.beta.threads.retrieve(thread.id) == thread
    store_id = client.vector_stores.create(name="thread docs").id
    updated = client.beta.threads.update(thread.id, metadata={"b": "2"},
                                         tool_resources={"file_search": {"vector_store_ids": [store_id]}})
    assert updated.metadata == {"b": "2"}
    assert updated.tool_resources is not None and updated.tool_resources.file_search is not None
    assert updated.tool_resources.file_search.vector_store_ids == [store_id]
    assert client.beta.threads.update(thread.id).metadata == {"b": "2"}
    raw = client.beta.threads.with_raw_response.delete(thread.id).http_response.json()
    assert raw == {"id": thread.id, "object": "thread.deleted", "deleted": True}
    assert ThreadDeleted.model_validate(raw).deleted
    for call in (lambda: client.beta.threads.retrieve(thread.id),
                 lambda: client.beta.threads.update(thread.id, metadata={}),
                 lambda: client.beta.threads.delete(thread.id),
                 lambda: client.beta.threads.messages.list(thread.id),
                 lambda: client.beta.threads.messages.create(thread.id, role="user", content="x")):
        with pytest.raises(openai.NotFoundError) as err:
            call()
        assert f"No thread found with id '{thread.id}'." in str(err.value)


def test_message_crud(client: openai.OpenAI, db: Db) -> None:
    thread = client.beta.threads.create()
    raw = client.beta.threads.messages.with_raw_response.create(
        thread.id, role="user", content="hello", metadata={"k": "v"}).http_response.json()
    assert MESSAGE_KEYS <= raw.keys()
    message = Message.model_validate(raw)
    assert message.id.startswith("msg_") and message.object == "thread.message"
    assert message.status == "completed" and message.role == "user"
    assert raw["attachments"] == []
    assert client.beta.threads.messages.retrieve(message.id, thread_id=thread.id) == message
    updated = client.beta.threads.messages.update(message.id, thread_id=thread.id, metadata={"k2": "v2"})
    assert updated.metadata == {"k2": "v2"} and updated.content == message.content
    # The creation was announced through the outbox.
    events = db.fetch("SELECT type, topic, key FROM events WHERE envelope->'data'->>'id' = $1", message.id)
    assert [(e["type"], e["topic"], e["key"]) for e in events] == [
        ("thread.message.created", "threadline.events", thread.id)]
    deleted = client.beta.threads.messages.with_raw_response.delete(message.id, thread_id=thread.id)
    raw_deleted = deleted.http_response.json()
    assert raw_deleted == {"id": message.id, "object": "thread.message.deleted", "deleted": True}
    assert MessageDeleted.model_validate(raw_deleted).deleted
    with pytest.raises(openai.NotFoundError) as err:
        client.beta.threads.messages.retrieve(message.id, thread_id=thread.id)
    assert f"No message found with id '{message.id}'." in str(err.value)
    with pytest.raises(openai.NotFoundError):
        client.beta.threads.messages.delete(message.id, thread_id=thread.id)


def test_message_of_another_thread_is_404(client: openai.OpenAI) -> None:
    one = client.beta.threads.create(messages=[{"role": "user", "content": "x"}])
    two = client.beta.threads.create()
    message = client.beta.threads.messages.list(one.id).data[0]
    with pytest.raises(openai.NotFoundError):
        client.beta.threads.messages.retrieve(message.id, thread_id=two.id)


def test_message_pagination(client: openai.OpenAI) -> None:
    thread = client.beta.threads.create(messages=[{"role": "user", "content": f"m{i}"} for i in range(7)])
    asc = client.beta.threads.messages.list(thread.id, order="asc", limit=100).data
    ids = [m.id for m in asc]
    assert [m.content[0].text.value for m in asc if m.content[0].type == "text"] == [f"m{i}" for i in range(7)]
    assert ids == sorted(ids)
    desc = client.beta.threads.messages.list(thread.id, limit=3)
    assert [m.id for m in desc.data] == ids[::-1][:3]
    assert desc.has_more and desc.model_extra == {"object": "list", "first_id": ids[6], "last_id": ids[4]}
    assert [m.id for m in client.beta.threads.messages.list(thread.id, limit=2)] == ids[::-1]
    assert [m.id for m in client.beta.threads.messages.list(thread.id, order="asc", limit=3)] == ids
    after = client.beta.threads.messages.list(thread.id, order="asc", after=ids[2], limit=2)
    assert [m.id for m in after.data] == ids[3:5] and after.has_more
    before = client.beta.threads.messages.list(thread.id, order="asc", before=ids[5], limit=2)
    assert [m.id for m in before.data] == ids[3:5] and before.has_more
    tail = client.beta.threads.messages.list(thread.id, order="asc", after=ids[4], limit=5)
    assert [m.id for m in tail.data] == ids[5:] and not tail.has_more


def test_message_run_id_filter(client: openai.OpenAI, db: Db) -> None:
    thread = client.beta.threads.create(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    first, second = client.beta.threads.messages.list(thread.id, order="asc").data
    assert client.beta.threads.messages.list(thread.id, run_id="run_none").data == []
    # Tag one message with a run id the way the orchestrator writes its messages.
    db.execute("UPDATE messages SET run_id = $2, doc = jsonb_set(doc, '{run_id}', to_jsonb($2::text)) WHERE id = $1",
               second.id, "run_tagged")
    tagged = client.beta.threads.messages.list(thread.id, run_id="run_tagged").data
    assert [m.id for m in tagged] == [second.id] and tagged[0].run_id == "run_tagged"
    assert first.id in {m.id for m in client.beta.threads.messages.list(thread.id)}


@pytest.mark.parametrize("body,param", [
    ({"content": "x"}, "role"),
    ({"role": "user"}, "content"),
    ({"role": "system", "content": "x"}, "role"),
    ({"role": "user", "content": 7}, "content"),
    ({"role": "user", "content": ""}, "content"),
    ({"role": "user", "content": []}, "content"),
    ({"role": "user", "content": [{"type": "text"}]}, "content[0].text"),
    ({"role": "user", "content": [{"type": "audio", "audio": {}}]}, "content[0].type"),
    ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x"}}]},
     "content[0].image_url.url"),
    ({"role": "user", "content": "x", "attachments": [{"tools": []}]}, "attachments[0].file_id"),
    ({"role": "user", "content": "x", "attachments": [{"file_id": "f", "tools": [{"type": "function"}]}]},
     "attachments[0].tools[0].type"),
    ({"role": "user", "content": "x", "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"role": "user", "content": "x", "file_ids": ["f"]}, "file_ids"),
])
def test_message_validation(client: openai.OpenAI, body: dict[str, Any], param: str) -> None:
    thread = client.beta.threads.create()
    with pytest.raises(openai.BadRequestError) as err:
        client.post(f"/threads/{thread.id}/messages", body=body, cast_to=Message)
    assert isinstance(err.value.body, dict) and err.value.body["param"] == param
    assert client.beta.threads.messages.list(thread.id).data == []


def test_thread_validation(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.beta.threads.create(messages=[{"role": "user", "content": "ok"}, {"role": "robot", "content": "x"}])  # type: ignore[typeddict-item]
    assert isinstance(err.value.body, dict) and err.value.body["param"] == "messages[1].role"
    with pytest.raises(openai.BadRequestError) as err:
        client.beta.threads.create(metadata={"k": "v" * 513})
    assert isinstance(err.value.body, dict) and err.value.body["param"] == "metadata.k"
    thread = client.beta.threads.create()
    with pytest.raises(openai.BadRequestError) as err:
        client.beta.threads.update(thread.id, extra_body={"messages": []})
    assert isinstance(err.value.body, dict) and err.value.body["code"] == "unknown_parameter"
    with pytest.raises(openai.BadRequestError):
        client.beta.threads.messages.update("msg_x", thread_id=thread.id, extra_body={"content": "new"})


def test_other_project_cannot_see_threads(client: openai.OpenAI, other_client: openai.OpenAI) -> None:
    thread = client.beta.threads.create(messages=[{"role": "user", "content": "secret"}])
    message = client.beta.threads.messages.list(thread.id).data[0]
    with pytest.raises(openai.NotFoundError):
        other_client.beta.threads.retrieve(thread.id)
    with pytest.raises(openai.NotFoundError):
        other_client.beta.threads.update(thread.id, metadata={"x": "y"})
    with pytest.raises(openai.NotFoundError):
        other_client.beta.threads.delete(thread.id)
    with pytest.raises(openai.NotFoundError):
        other_client.beta.threads.messages.list(thread.id)
    with pytest.raises(openai.NotFoundError):
        other_client.beta.threads.messages.create(thread.id, role="user", content="intrusion")
    with pytest.raises(openai.NotFoundError):
        other_client.beta.threads.messages.retrieve(message.id, thread_id=thread.id)
    with pytest.raises(openai.NotFoundError):
        other_client.beta.threads.messages.update(message.id, thread_id=thread.id, metadata={})
    with pytest.raises(openai.NotFoundError):
        other_client.beta.threads.messages.delete(message.id, thread_id=thread.id)
    assert [m.id for m in client.beta.threads.messages.list(thread.id).data] == [message.id]
    assert client.beta.threads.retrieve(thread.id).metadata == {}


def test_message_text_over_256000_characters_is_refused(client: openai.OpenAI) -> None:
    """Hosted refused a content string over 256,000 characters (a base64 image pasted in); it was stored."""
    thread = client.beta.threads.create()
    with pytest.raises(openai.BadRequestError) as err:
        client.beta.threads.messages.create(thread.id, role="user", content="x" * 256_001)
    assert err.value.body == {
        "message": "Invalid 'content': string too long. Expected a string with maximum length 256000, but got a "
                   "string with length 256001 instead.",
        "type": "invalid_request_error", "param": "content", "code": "string_above_max_length"}
    with pytest.raises(openai.BadRequestError) as err:
        client.beta.threads.create(messages=[{"role": "user", "content": "x" * 256_001}])
    assert isinstance(err.value.body, dict) and err.value.body["param"] == "messages[0].content"
    assert client.beta.threads.messages.list(thread.id).data == []
    client.beta.threads.messages.create(thread.id, role="user", content="x" * 256_000)
