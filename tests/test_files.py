"""Files API through the official SDK: upload, list (purpose, pagination), retrieve, content, delete, limits."""


import fixtures_docs as docs
import httpx
import openai
import pytest
from openai.types import FileDeleted, FileObject

from threadline_devstack.sql import Db
from threadline_devstack.stack import Stack

MAX_FILE_BYTES = 4 * 1024 * 1024  # THREADLINE_MAX_FILE_BYTES of the test gateway (tests/conftest.py)


def test_upload_retrieve_download_delete(client: openai.OpenAI, db: Db) -> None:
    data = docs.pdf()
    uploaded = client.files.create(file=("hr-policy.pdf", data, "application/pdf"), purpose="assistants")
    assert isinstance(uploaded, FileObject)
    assert uploaded.id.startswith("file-")
    assert (uploaded.object, uploaded.purpose, uploaded.status) == ("file", "assistants", "processed")
    assert uploaded.filename == "hr-policy.pdf"
    assert uploaded.bytes == len(data)

    raw = client.files.with_raw_response.retrieve(uploaded.id).http_response.json()
    assert set(raw) == {"id", "object", "bytes", "created_at", "filename", "purpose", "status", "expires_at",
                        "status_details"}
    assert client.files.retrieve(uploaded.id) == uploaded
    assert client.files.content(uploaded.id).content == data
    # stored in Postgres, where every service can read it
    assert bytes(db.fetchval("SELECT content FROM file_contents WHERE file_id = $1", uploaded.id)) == data

    deleted = client.files.delete(uploaded.id)
    assert deleted == FileDeleted(id=uploaded.id, object="file", deleted=True)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        client.files.content(uploaded.id)
    assert db.fetchval("SELECT count(*) FROM file_contents WHERE file_id = $1", uploaded.id) == 0


def test_list_filters_by_purpose_and_paginates(client: openai.OpenAI) -> None:
    ids = [client.files.create(file=(f"batch-{i}.jsonl", b'{"a": 1}\n'), purpose="batch").id for i in range(3)]
    user = client.files.create(file=("notes.txt", b"some notes"), purpose="user_data")
    batch_files = [f.id for f in client.files.list(purpose="batch", order="asc")]
    assert [i for i in batch_files if i in ids] == ids
    assert user.id not in batch_files
    page = client.files.list(purpose="batch", limit=2, order="desc")
    assert len(page.data) == 2 and page.has_more
    walked = [f.id for f in client.files.list(purpose="batch", limit=1, order="asc")]  # auto-paginates
    assert [i for i in walked if i in ids] == ids


def test_file_ids_are_project_scoped(client: openai.OpenAI, other_client: openai.OpenAI) -> None:
    mine = client.files.create(file=("mine.txt", b"private"), purpose="assistants")
    with pytest.raises(openai.NotFoundError):
        other_client.files.retrieve(mine.id)
    with pytest.raises(openai.NotFoundError):
        other_client.files.content(mine.id)
    assert mine.id not in [f.id for f in other_client.files.list()]


def test_too_large_is_413_in_openai_format(stack: Stack, client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as err:
        client.files.create(file=("big.bin", b"x" * (MAX_FILE_BYTES + 1)), purpose="assistants")
    assert err.value.status_code == 413
    body = err.value.response.json()["error"]
    assert body["type"] == "invalid_request_error" and str(MAX_FILE_BYTES) in body["message"]
    # the limit is inclusive: exactly MAX_FILE_BYTES passes
    ok = client.files.create(file=("edge.bin", b"x" * MAX_FILE_BYTES), purpose="assistants")
    assert ok.bytes == MAX_FILE_BYTES
    client.files.delete(ok.id)


@pytest.mark.parametrize(("fields", "param"), [
    ({"purpose": "nonsense"}, "purpose"),
    ({}, "purpose"),
])
def test_bad_upload_is_400(stack: Stack, fields: dict[str, str], param: str) -> None:
    response = httpx.post(f"{stack.base_url}/files", headers={"Authorization": f"Bearer {stack.api_key}"},
                          data=fields, files={"file": ("a.txt", b"hello")}, trust_env=False)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


def test_missing_file_part_is_400(stack: Stack) -> None:
    response = httpx.post(f"{stack.base_url}/files", headers={"Authorization": f"Bearer {stack.api_key}"},
                          data={"purpose": "assistants"}, files={"other": ("a.txt", b"x")}, trust_env=False)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "file"


def test_a_batch_file_must_be_jsonl(client: openai.OpenAI) -> None:
    """"The Batch API only supports `.jsonl` files" (the SDK's files.create docstring): hosted answered a batch
    file of another name 400 "Invalid file format for Batch API. Must be .jsonl" (param and code null, as quoted
    in BerriAI/litellm#37527); it was stored. An Upload of purpose batch becomes such a file, checked alike."""
    before = {f.id for f in client.files.list(purpose="batch")}
    for name in ("notes.txt", "requests.json", "jsonl"):
        with pytest.raises(openai.BadRequestError) as err:
            client.files.create(file=(name, b'{"custom_id": "1"}\n'), purpose="batch")
        assert err.value.response.json()["error"] == {
            "message": "Invalid file format for Batch API. Must be .jsonl", "type": "invalid_request_error",
            "param": None, "code": None}
    with pytest.raises(openai.BadRequestError) as err:
        client.uploads.create(bytes=10, filename="requests.csv", mime_type="text/csv", purpose="batch")
    assert err.value.response.json()["error"]["message"] == "Invalid file format for Batch API. Must be .jsonl"
    assert {f.id for f in client.files.list(purpose="batch")} == before
    named = client.files.create(file=("Requests.JSONL", b'{"custom_id": "1"}\n'), purpose="batch")
    assert named.purpose == "batch" and named.filename == "Requests.JSONL"
    assert client.uploads.create(bytes=10, filename="r.jsonl", mime_type="application/jsonl",
                                 purpose="batch").status == "pending"
    # other purposes take any name
    assert client.files.create(file=("notes.txt", b"notes"), purpose="user_data").filename == "notes.txt"


def test_unknown_file_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.files.retrieve("file-doesnotexist")
    assert "file-doesnotexist" in err.value.response.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        client.files.delete("file-doesnotexist")


def test_expires_after_sets_expires_at(client: openai.OpenAI) -> None:
    created = client.files.create(file=("tmp.txt", b"temporary"), purpose="user_data",
                                  expires_after={"anchor": "created_at", "seconds": 3600})
    assert created.expires_at == created.created_at + 3600


@pytest.mark.parametrize("seconds", ["\u0663\u0666\u0660\u0660", " 3600", "3_600", "+3600", "3600.0", ""])
def test_expires_after_seconds_must_be_plain_digits(http: httpx.Client, seconds: str) -> None:
    """Only ASCII digits make an integer form field (Python's int() also takes Arabic-Indic digits, spaces, _)."""
    response = http.post("/files", files={"file": ("tmp.txt", b"temporary")}, data={
        "purpose": "user_data", "expires_after[anchor]": "created_at", "expires_after[seconds]": seconds})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "expires_after.seconds"


@pytest.mark.parametrize(("fields", "param", "code"), [
    ({"expires_after": '{"anchor": "created_at", "seconds": 7200}'}, "expires_after", "unknown_parameter"),
    ({"purpose_": "assistants"}, "purpose_", "unknown_parameter"),
    ({"expires_after[anchor]": "created_at"}, "expires_after.seconds", "missing_required_parameter"),
    ({"expires_after[seconds]": "7200"}, "expires_after.anchor", "missing_required_parameter"),
])
def test_form_fields_the_upload_does_not_take_are_refused(client: openai.OpenAI, http: httpx.Client,
                                                          fields: dict[str, str], param: str, code: str) -> None:
    """As JSON bodies: an unknown field is a 400, not dropped (a JSON-encoded `expires_after`, which the SDK sends as
    `expires_after[anchor]` and `expires_after[seconds]`, would have made a file that never expires)."""
    before = {f.id for f in client.files.list()}
    response = http.post("/files", files={"file": ("tmp.txt", b"temporary")}, data={"purpose": "user_data", **fields})
    assert response.status_code == 400, response.text
    assert response.json()["error"] | {"message": ""} == {"message": "", "type": "invalid_request_error",
                                                          "param": param, "code": code}
    assert {f.id for f in client.files.list()} == before
