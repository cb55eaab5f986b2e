"""Files: upload (multipart), list, retrieve, delete, download content."""

from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from starlette.datastructures import UploadFile

from gateway import files_service as service
from gateway.deps import CallerDep, PoolDep, SettingsDep
from gateway.errors import bad_request, check_form_fields, echo
from gateway.http import json_response
from gateway.pagination import PageParams, list_body

router = APIRouter(prefix="/v1", tags=["files"])
_MULTIPART_SLACK = 1024 * 1024
"""Room for the multipart envelope and form fields beyond the file itself."""
FORM_FIELDS = frozenset({"file", "purpose", "expires_after[anchor]", "expires_after[seconds]"})


@router.post("/files")
async def upload_file(request: Request, caller: CallerDep, pool: PoolDep, settings: SettingsDep) -> Response:
    """Upload a file (multipart: `file`, `purpose`, optional `expires_after[anchor|seconds]`)."""
    limit = settings.max_file_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + _MULTIPART_SLACK:
        raise service.too_large(int(declared), limit)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise bad_request("The request must be multipart/form-data with a 'file' part and a 'purpose' field.",
                          "file", "invalid_request")
    form = await request.form(max_files=1, max_fields=20)
    try:
        upload = form.get("file")
        purpose, filename, expires = service.check_upload(
            form.get("purpose"), upload.filename if isinstance(upload, UploadFile) else None,
            form.get("expires_after[anchor]"), form.get("expires_after[seconds]"))
        assert isinstance(upload, UploadFile)
        check_form_fields(form.keys(), FORM_FIELDS)
        content = await upload.read(limit + 1)
        if len(content) > limit:
            raise service.too_large(upload.size or len(content), limit)
    finally:
        await form.close()
    return json_response(await service.create_file(pool, caller.project_id, purpose=purpose, filename=filename,
                                                   content=content, expires_after_seconds=expires))


@router.get("/files")
async def list_files(caller: CallerDep, pool: PoolDep, purpose: Annotated[str | None, Query()] = None,
                     limit: Annotated[int, Query()] = 10000, order: Annotated[str, Query()] = "desc",
                     after: Annotated[str | None, Query()] = None) -> Response:
    """List files (limit 1..10000, default 10000, as hosted), optionally of one purpose."""
    if not 1 <= limit <= 10000:
        raise bad_request(f"Invalid 'limit': expected a value between 1 and 10000, but got {limit} instead.",
                          "limit", "invalid_value")
    if order not in ("asc", "desc"):
        raise bad_request(f"Invalid value: '{echo(order)}'. Supported values are: 'asc' and 'desc'.", "order",
                          "invalid_value")
    page = PageParams(limit=limit, order="asc" if order == "asc" else "desc", after=after or None)
    items, has_more = await service.list_files(pool, caller.project_id, page, purpose or None)
    return json_response(list_body(items, has_more))


@router.get("/files/{file_id}")
async def retrieve_file(file_id: str, caller: CallerDep, pool: PoolDep) -> Response:
    """Retrieve a file object."""
    return json_response(await service.get_file(pool, caller.project_id, file_id))


@router.delete("/files/{file_id}")
async def delete_file(file_id: str, caller: CallerDep, pool: PoolDep) -> Response:
    """Delete a file (and remove it from every vector store and code_interpreter configuration)."""
    return json_response(await service.delete_file(pool, caller.project_id, file_id))


@router.get("/files/{file_id}/content")
async def download_file(file_id: str, caller: CallerDep, pool: PoolDep) -> Response:
    """The file's bytes."""
    doc, content = await service.get_content(pool, caller.project_id, file_id)
    disposition = f"attachment; filename*=UTF-8''{quote(doc['filename'])}"
    return Response(content, media_type="application/octet-stream", headers={"content-disposition": disposition})
