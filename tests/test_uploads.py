"""Uploads API through the official SDK: create, parts, complete into a File, cancel, limits and errors."""

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from error_helpers import sdk_error
from openai.types import FileObject, Upload
from openai.types.uploads import UploadPart

from threadline_devstack.sql import Db
from threadline_devstack.stack import Stack

OTHER_KEY = "sk-threadline-other"  # project proj_other (tests/conftest.py)
MAX_UPLOAD_BYTES = 512 * 1024 * 1024  # THREADLINE_MAX_UPLOAD_BYTES of the test gateway (the default)
MAX_PART_BYTES = 64 * 1024 * 1024
UPLOAD_KEYS = {"id", "object", "bytes", "created_at", "filename", "purpose", "status", "expires_at", "file"}
FILE_KEYS = {"id", "object", "bytes", "created_at", "filename", "purpose", "status", "expires_at", "status_details"}


@pytest.fixture(scope="module")
def other_client(stack: Stack) -> Iterator[openai.OpenAI]:
    """A client of another project."""
    sdk = openai.OpenAI(base_url=stack.base_url, api_key=OTHER_KEY, max_retries=0, timeout=30)
    yield sdk
    sdk.close()


def _pending(client: openai.OpenAI, size: int, filename: str = "data.bin", **extra: Any) -> Upload:
    return client.uploads.create(bytes=size, filename=filename, mime_type="application/octet-stream",
                                 purpose="assistants", **extra)


def _parts_of(db: Db, upload_id: str) -> int:
    return int(db.fetchval("SELECT count(*) FROM upload_parts WHERE upload_id = $1", upload_id))


def test_parts_complete_in_part_ids_order(client: openai.OpenAI, db: Db) -> None:
    chunks = [b"alpha-" * 1000, b"beta-" * 700, b"gamma"]
    upload = _pending(client, sum(map(len, chunks)), "joined.txt")
    raw = client.uploads.with_raw_response.create(bytes=5, filename="shape.txt", mime_type="text/plain",
                                                  purpose="assistants").http_response.json()
    assert set(raw) == UPLOAD_KEYS and raw["file"] is None and raw["status"] == "pending"
    assert isinstance(upload, Upload) and upload.id.startswith("upload_")
    assert (upload.object, upload.status, upload.purpose, upload.filename) == ("upload", "pending", "assistants",
                                                                             "joined.txt")
    assert upload.expires_at == upload.created_at + 3600 and upload.file is None
    # parts created out of order: the completion's part_ids decide the order of the bytes
    last = client.uploads.parts.create(upload.id, data=chunks[2])
    first = client.uploads.parts.create(upload.id, data=chunks[0])
    middle = client.uploads.parts.create(upload.id, data=chunks[1])
    assert isinstance(first, UploadPart) and first.id.startswith("part_")
    assert (first.object, first.upload_id) == ("upload.part", upload.id)
    assert _parts_of(db, upload.id) == 3

    raw_done = client.uploads.with_raw_response.complete(upload.id, part_ids=[first.id, middle.id, last.id])
    body = raw_done.http_response.json()
    assert set(body) == UPLOAD_KEYS and set(body["file"]) == FILE_KEYS
    done = raw_done.parse()
    assert done.id == upload.id and done.status == "completed" and done.bytes == upload.bytes
    assert isinstance(done.file, FileObject) and done.file.id.startswith("file-")
    assert (done.file.filename, done.file.purpose, done.file.status, done.file.bytes) == (
        "joined.txt", "assistants", "processed", upload.bytes)
    assert client.files.retrieve(done.file.id) == done.file
    assert client.files.content(done.file.id).content == b"".join(chunks)
    assert done.file.id in [f.id for f in client.files.list(purpose="assistants")]
    assert _parts_of(db, upload.id) == 0  # the bytes live in the File now
    assert client.files.delete(done.file.id).deleted


def test_upload_file_chunked_from_bytes_and_path(client: openai.OpenAI, tmp_path: Path) -> None:
    data = os.urandom(300 * 1024 + 17)
    upload = client.uploads.upload_file_chunked(file=data, filename="random.bin", bytes=len(data),
                                                mime_type="application/octet-stream", purpose="user_data",
                                                part_size=64 * 1024, md5=hashlib.md5(data).hexdigest())
    assert upload.status == "completed" and upload.file is not None and upload.file.bytes == len(data)
    assert client.files.content(upload.file.id).content == data

    path = tmp_path / "notes.txt"
    path.write_bytes(b"".join(f"Threadline notes, line {i}.\n".encode() for i in range(12000)))
    from_path = client.uploads.upload_file_chunked(file=path, mime_type="text/plain", purpose="assistants",
                                                   part_size=100_000)
    assert from_path.status == "completed" and from_path.file is not None
    assert from_path.file.filename == "notes.txt" and from_path.bytes == path.stat().st_size
    assert client.files.content(from_path.file.id).content == path.read_bytes()


def test_completed_file_is_usable_in_a_vector_store(client: openai.OpenAI) -> None:
    text = b"Bike storage. Bicycles are kept in the basement room B12, open from 6 am to 10 pm."
    upload = client.uploads.upload_file_chunked(file=text, filename="bikes.txt", bytes=len(text),
                                                mime_type="text/plain", purpose="assistants", part_size=32)
    assert upload.file is not None
    store = client.vector_stores.create(name="uploads")
    attached = client.vector_stores.files.create_and_poll(file_id=upload.file.id, vector_store_id=store.id,
                                                          poll_interval_ms=100)
    assert attached.status == "completed", attached.last_error
    found = client.vector_stores.search(store.id, query="where are bicycles stored")
    assert any(r.file_id == upload.file.id for r in found)
    client.vector_stores.delete(store.id)


def test_expires_after_applies_to_the_file(client: openai.OpenAI) -> None:
    upload = _pending(client, 4, expires_after={"anchor": "created_at", "seconds": 7200})
    part = client.uploads.parts.create(upload.id, data=b"temp")
    done = client.uploads.complete(upload.id, part_ids=[part.id])
    assert done.file is not None and done.file.expires_at == done.file.created_at + 7200


def test_cancel_drops_parts_and_refuses_more(client: openai.OpenAI, db: Db) -> None:
    upload = _pending(client, 6)
    part = client.uploads.parts.create(upload.id, data=b"abc")
    cancelled = client.uploads.cancel(upload.id)
    assert cancelled.id == upload.id and cancelled.status == "cancelled" and cancelled.file is None
    assert _parts_of(db, upload.id) == 0
    with pytest.raises(openai.BadRequestError) as err:
        client.uploads.parts.create(upload.id, data=b"def")
    assert "cancelled" in sdk_error(err.value)["message"]
    with pytest.raises(openai.BadRequestError):
        client.uploads.complete(upload.id, part_ids=[part.id])
    with pytest.raises(openai.BadRequestError):
        client.uploads.cancel(upload.id)


def test_size_mismatch_is_400_and_leaves_the_upload_pending(client: openai.OpenAI, db: Db) -> None:
    upload = _pending(client, 10)
    short = client.uploads.parts.create(upload.id, data=b"12345")
    with pytest.raises(openai.BadRequestError) as err:
        client.uploads.complete(upload.id, part_ids=[short.id])
    error = sdk_error(err.value)
    assert error["param"] == "part_ids" and "5" in error["message"] and "10" in error["message"]
    extra = client.uploads.parts.create(upload.id, data=b"67890x")
    with pytest.raises(openai.BadRequestError):
        client.uploads.complete(upload.id, part_ids=[short.id, extra.id])  # 11 bytes
    rest = client.uploads.parts.create(upload.id, data=b"67890")
    done = client.uploads.complete(upload.id, part_ids=[short.id, rest.id])  # the unused part is dropped
    assert done.file is not None and client.files.content(done.file.id).content == b"1234567890"
    assert _parts_of(db, upload.id) == 0


def test_unknown_duplicate_and_foreign_part_ids_are_400(client: openai.OpenAI) -> None:
    upload = _pending(client, 4)
    other = _pending(client, 4)
    mine = client.uploads.parts.create(upload.id, data=b"four")
    foreign = client.uploads.parts.create(other.id, data=b"four")
    for part_ids in (["part_doesnotexist"], [foreign.id], [mine.id, mine.id], []):
        with pytest.raises(openai.BadRequestError) as err:
            client.uploads.complete(upload.id, part_ids=part_ids)
        assert sdk_error(err.value)["param"] == "part_ids", part_ids
    with pytest.raises(openai.BadRequestError) as err:
        client.uploads.complete(upload.id, part_ids=["part_doesnotexist"])
    assert "part_doesnotexist" in sdk_error(err.value)["message"]
    assert client.uploads.complete(upload.id, part_ids=[mine.id]).status == "completed"


def test_double_complete_is_400(client: openai.OpenAI) -> None:
    upload = _pending(client, 3)
    part = client.uploads.parts.create(upload.id, data=b"one")
    first = client.uploads.complete(upload.id, part_ids=[part.id])
    assert first.file is not None
    with pytest.raises(openai.BadRequestError) as err:
        client.uploads.complete(upload.id, part_ids=[part.id])
    assert "completed" in sdk_error(err.value)["message"]
    with pytest.raises(openai.BadRequestError):
        client.uploads.parts.create(upload.id, data=b"two")
    with pytest.raises(openai.BadRequestError):
        client.uploads.cancel(upload.id)
    assert client.files.content(first.file.id).content == b"one"


def test_md5_mismatch_is_400_and_stores_nothing(client: openai.OpenAI, db: Db) -> None:
    data = b"checksummed bytes"
    upload = _pending(client, len(data))
    part = client.uploads.parts.create(upload.id, data=data)
    files_before = db.fetchval("SELECT count(*) FROM files")
    with pytest.raises(openai.BadRequestError) as err:
        client.uploads.complete(upload.id, part_ids=[part.id], md5=hashlib.md5(b"other").hexdigest())
    assert sdk_error(err.value)["param"] == "md5"
    assert db.fetchval("SELECT count(*) FROM files") == files_before
    done = client.uploads.complete(upload.id, part_ids=[part.id], md5=hashlib.md5(data).hexdigest().upper())
    assert done.status == "completed" and done.file is not None


def test_unknown_or_foreign_upload_is_404(client: openai.OpenAI, other_client: openai.OpenAI) -> None:
    calls = [lambda c, i: c.uploads.parts.create(i, data=b"x"),
             lambda c, i: c.uploads.complete(i, part_ids=["part_x"]),
             lambda c, i: c.uploads.cancel(i)]
    for call in calls:
        with pytest.raises(openai.NotFoundError) as err:
            call(client, "upload_doesnotexist")
        assert sdk_error(err.value)["message"] == "No upload found with id 'upload_doesnotexist'."
    mine = _pending(client, 1)
    for call in calls:
        with pytest.raises(openai.NotFoundError):
            call(other_client, mine.id)
    assert client.uploads.cancel(mine.id).status == "cancelled"


@pytest.mark.parametrize(("fields", "param"), [
    ({"purpose": "nonsense"}, "purpose"),
    ({"bytes": 0}, "bytes"),
    ({"bytes": -1}, "bytes"),
    ({"bytes": MAX_UPLOAD_BYTES + 1}, "bytes"),
    ({"bytes": "10"}, "bytes"),
    ({"mime_type": None}, "mime_type"),
    ({"mime_type": ""}, "mime_type"),
    ({"filename": ""}, "filename"),
    ({"expires_after": {"anchor": "created_at", "seconds": 60}}, "expires_after.seconds"),
    ({"expires_after": {"anchor": "last_active_at", "seconds": 3600}}, "expires_after.anchor"),
    ({"unknown": 1}, "unknown"),
])
def test_bad_create_is_400(http: httpx.Client, fields: dict[str, Any], param: str) -> None:
    body = {"bytes": 10, "filename": "a.txt", "mime_type": "text/plain", "purpose": "assistants", **fields}
    body = {k: v for k, v in body.items() if v is not None}
    response = http.post("/uploads", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_largest_upload_is_accepted(client: openai.OpenAI) -> None:
    upload = _pending(client, MAX_UPLOAD_BYTES)
    assert upload.bytes == MAX_UPLOAD_BYTES
    client.uploads.cancel(upload.id)


def test_bad_parts_are_refused(client: openai.OpenAI, http: httpx.Client) -> None:
    upload = _pending(client, 10)
    with pytest.raises(openai.BadRequestError):
        client.uploads.parts.create(upload.id, data=b"")
    missing = http.post(f"/uploads/{upload.id}/parts", files={"other": ("x", b"abc")})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "data"
    not_multipart = http.post(f"/uploads/{upload.id}/parts", content=b"abc")
    assert not_multipart.status_code == 400
    extra = http.post(f"/uploads/{upload.id}/parts", files={"data": ("x", b"abc")}, data={"md5": "0" * 32})
    assert extra.status_code == 400 and extra.json()["error"]["code"] == "unknown_parameter"
    as_field = http.post(f"/uploads/{upload.id}/parts", files={"data": (None, b"plain")})  # no filename
    assert as_field.status_code == 200 and as_field.json()["object"] == "upload.part"
    client.uploads.cancel(upload.id)


@pytest.mark.slow
def test_a_64_mb_part_is_accepted_and_a_larger_one_is_413(client: openai.OpenAI, db: Db) -> None:
    data = os.urandom(1024) * (MAX_PART_BYTES // 1024)
    upload = _pending(client, MAX_PART_BYTES)
    with pytest.raises(openai.APIStatusError) as err:
        client.uploads.parts.create(upload.id, data=data + b"!")
    assert err.value.status_code == 413 and sdk_error(err.value)["param"] == "data"
    part = client.uploads.parts.create(upload.id, data=data)
    done = client.uploads.complete(upload.id, part_ids=[part.id], md5=hashlib.md5(data).hexdigest())
    assert done.file is not None and done.file.bytes == MAX_PART_BYTES
    assert db.fetchval("SELECT md5(content) FROM file_contents WHERE file_id = $1", done.file.id) == \
        hashlib.md5(data).hexdigest()
    client.files.delete(done.file.id)


def test_expired_upload_refuses_parts_and_completion(client: openai.OpenAI, db: Db) -> None:
    upload = _pending(client, 4)
    part = client.uploads.parts.create(upload.id, data=b"late")
    db.execute("UPDATE uploads SET expires_at = $2 WHERE id = $1", upload.id, upload.created_at - 1)
    with pytest.raises(openai.BadRequestError) as err:
        client.uploads.parts.create(upload.id, data=b"more")
    assert "expired" in sdk_error(err.value)["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.uploads.complete(upload.id, part_ids=[part.id])
    assert "expired" in sdk_error(err.value)["message"]
    with pytest.raises(openai.BadRequestError):
        client.uploads.cancel(upload.id)
    # the gateway's sweeper (every 0.5 s here) marks it expired and drops its parts
    deadline = time.monotonic() + 15
    while db.fetchval("SELECT status FROM uploads WHERE id = $1", upload.id) != "expired":
        assert time.monotonic() < deadline, "the expired upload was never swept"
        time.sleep(0.1)
    assert db.fetchval("SELECT doc->>'status' FROM uploads WHERE id = $1", upload.id) == "expired"
    assert _parts_of(db, upload.id) == 0


def test_json_bodies_keep_the_usual_limit(http: httpx.Client) -> None:
    """Only parts may be large: /v1/uploads/*/parts gets the upload body limit, create and complete the usual one."""
    padding = "x" * (3 * 1024 * 1024)  # above THREADLINE_MAX_BODY_BYTES (2 MB), far below the upload limit
    body = {"bytes": 10, "filename": padding, "mime_type": "text/plain", "purpose": "assistants"}
    response = http.post("/uploads", json=body)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    upload = http.post("/uploads", json={**body, "filename": "a.txt"}).json()
    chunked = http.post(f"/uploads/{upload['id']}/complete", content=iter([b'{"part_ids": ["', padding.encode(),
                                                                             b'"]}']))
    assert chunked.status_code == 413
    assert http.post(f"/uploads/{upload['id']}/cancel").json()["status"] == "cancelled"
