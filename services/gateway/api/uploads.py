"""Uploads: create, add parts (multipart `data`), complete into a File, cancel."""

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.datastructures import UploadFile

from gateway import uploads_service as service
from gateway.deps import CallerDep, PoolDep, SettingsDep
from gateway.errors import bad_request, check_form_fields
from gateway.http import json_response, parse_body

router = APIRouter(prefix="/v1", tags=["uploads"])
_MULTIPART_SLACK = 1024 * 1024
"""Room for the multipart envelope beyond the part's bytes."""


@router.post("/uploads")
async def create_upload(request: Request, caller: CallerDep, pool: PoolDep, settings: SettingsDep) -> Response:
    """Create a pending upload that parts are added to."""
    body = await parse_body(request, service.UploadCreate)
    return json_response(await service.create_upload(pool, caller.project_id, body, settings.max_upload_bytes))


@router.post("/uploads/{upload_id}/parts")
async def add_upload_part(upload_id: str, request: Request, caller: CallerDep, pool: PoolDep,
                          settings: SettingsDep) -> Response:
    """Add a part (multipart: `data`, at most 64 MB)."""
    await service.check_pending(pool, caller.project_id, upload_id)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > service.MAX_PART_BYTES + _MULTIPART_SLACK:
        raise service.part_too_large(int(declared))
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise bad_request("The request must be multipart/form-data with a 'data' part.", "data", "invalid_request")
    form = await request.form(max_files=1, max_fields=20, max_part_size=service.MAX_PART_BYTES + 1)
    try:
        data = form.get("data")
        if isinstance(data, UploadFile):
            content = await data.read(service.MAX_PART_BYTES + 1)
        elif isinstance(data, str):
            content = data.encode()
        else:
            raise bad_request("Missing required parameter: 'data'.", "data", "missing_required_parameter")
        check_form_fields(form.keys(), ("data",))
    finally:
        await form.close()
    return json_response(await service.add_part(pool, caller.project_id, upload_id, content,
                                                settings.max_upload_bytes))


@router.post("/uploads/{upload_id}/complete")
async def complete_upload(upload_id: str, request: Request, caller: CallerDep, pool: PoolDep,
                          settings: SettingsDep) -> Response:
    """Complete the upload: its parts, in `part_ids` order, become a File."""
    body = await parse_body(request, service.UploadComplete)
    return json_response(await service.complete_upload(pool, caller.project_id, upload_id, body))


@router.post("/uploads/{upload_id}/cancel")
async def cancel_upload(upload_id: str, caller: CallerDep, pool: PoolDep) -> Response:
    """Cancel the upload (its parts are dropped)."""
    return json_response(await service.cancel_upload(pool, caller.project_id, upload_id))
