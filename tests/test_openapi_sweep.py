"""Regressions of a sweep against OpenAI's published OpenAPI contract (openai/openai-openapi, openapi.yaml).

Each test pins a documented default the gateway did not apply: files of purpose `batch` expire after 30 days
(`FileExpirationAfter`), `json_schema.strict` is false (`ResponseFormatJsonSchema`), `code_interpreter.file_ids`
is `[]` (`tool_resources` of assistants, threads and create-thread-and-run), and an image part's `detail`, left
out or null, is "auto" (`MessageContentImageFileObject`, `MessageContentImageUrlObject`).
"""

import base64

import httpx
import openai
import pytest

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

THIRTY_DAYS = 30 * 24 * 3600
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAA"
                       "AABJRU5ErkJggg==")
BATCH_LINE = b'{"custom_id": "1", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n'


def test_batch_files_expire_after_30_days_unless_told_otherwise(client: openai.OpenAI) -> None:
    batch = client.files.create(file=("requests.jsonl", BATCH_LINE), purpose="batch")
    assert batch.expires_at == batch.created_at + THIRTY_DAYS
    assert client.files.retrieve(batch.id).expires_at == batch.expires_at
    told = client.files.create(file=("requests.jsonl", BATCH_LINE), purpose="batch",
                               expires_after={"anchor": "created_at", "seconds": 3600})
    assert told.expires_at == told.created_at + 3600
    kept = client.files.create(file=("notes.txt", b"kept"), purpose="assistants")
    assert kept.expires_at is None


def test_batch_uploads_make_files_that_expire_after_30_days(client: openai.OpenAI) -> None:
    upload = client.uploads.create(bytes=len(BATCH_LINE), filename="requests.jsonl", mime_type="application/jsonl",
                                   purpose="batch")
    part = client.uploads.parts.create(upload.id, data=BATCH_LINE)
    done = client.uploads.complete(upload.id, part_ids=[part.id])
    assert done.file is not None and done.file.expires_at == done.file.created_at + THIRTY_DAYS


def test_json_schema_strict_defaults_to_false(client: openai.OpenAI, http: httpx.Client) -> None:
    schema_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}}}
    assistant = client.beta.assistants.create(model="gpt-4o", response_format=schema_format)  # type: ignore[arg-type]
    assert not isinstance(assistant.response_format, str) and assistant.response_format is not None
    assert assistant.response_format.type == "json_schema" and assistant.response_format.json_schema.strict is False
    assert http.get(f"/assistants/{assistant.id}").json()["response_format"]["json_schema"]["strict"] is False
    modified = http.post(f"/assistants/{assistant.id}", json={"response_format": {
        "type": "json_schema", "json_schema": {"name": "other"}}}).json()
    assert modified["response_format"]["json_schema"] == {"name": "other", "strict": False}
    run = http.post("/threads/runs", json={"assistant_id": assistant.id, "response_format": schema_format,
                                           "thread": {"messages": [{"role": "user", "content": "hi"}]}}).json()
    assert run["response_format"]["json_schema"]["strict"] is False
    told = client.beta.assistants.create(model="gpt-4o", response_format={
        "type": "json_schema", "json_schema": {"name": "answer", "strict": True}})
    assert http.get(f"/assistants/{told.id}").json()["response_format"]["json_schema"]["strict"] is True


def test_code_interpreter_file_ids_default_to_empty(client: openai.OpenAI, http: httpx.Client) -> None:
    assistant = client.beta.assistants.create(model="gpt-4o", tools=[{"type": "code_interpreter"}],
                                              tool_resources={"code_interpreter": {}})
    assert assistant.tool_resources is not None and assistant.tool_resources.code_interpreter is not None
    assert assistant.tool_resources.code_interpreter.file_ids == []
    thread = http.post("/threads", json={"tool_resources": {"code_interpreter": {}}}).json()
    assert thread["tool_resources"] == {"code_interpreter": {"file_ids": []}}
    blank = http.post("/threads", json={}).json()
    modified = http.post(f"/threads/{blank['id']}", json={"tool_resources": {"code_interpreter": {}}}).json()
    assert modified["tool_resources"] == {"code_interpreter": {"file_ids": []}}
    run = http.post("/threads/runs", json={"assistant_id": assistant.id,
                                           "tool_resources": {"code_interpreter": {}}}).json()
    assert http.get(f"/threads/{run['thread_id']}").json()["tool_resources"] == {"code_interpreter": {"file_ids": []}}
    assert blank["tool_resources"] == {}


def test_image_parts_default_to_detail_auto(client: openai.OpenAI, http: httpx.Client) -> None:
    image = client.files.create(file=("dot.png", PNG, "image/png"), purpose="vision")
    thread = client.beta.threads.create()
    message = http.post(f"/threads/{thread.id}/messages", json={"role": "user", "content": [
        {"type": "image_file", "image_file": {"file_id": image.id}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/dog.png", "detail": "low"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/owl.png", "detail": None}}]}).json()
    assert [part[part["type"]].get("detail") for part in message["content"]] == ["auto", "auto", "low", "auto"]
    seeded = client.beta.threads.create(messages=[{"role": "user", "content": [
        {"type": "image_file", "image_file": {"file_id": image.id}}]}])
    [first] = client.beta.threads.messages.list(seeded.id).data
    assert first.content[0].type == "image_file" and first.content[0].image_file.detail == "auto"
