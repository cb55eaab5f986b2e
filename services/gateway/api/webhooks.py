"""Webhook endpoints (the SDK's `client.webhooks.*`), the event-type catalogue, and the delivery log.

Compatible routes: `POST/GET /v1/webhook_endpoints`, `GET/POST/DELETE /v1/webhook_endpoints/{id}`,
`POST /v1/webhook_endpoints/{id}/rotate_secret`, `POST /v1/webhook_endpoints/{id}/test`,
`GET /v1/webhook_event_types`. Threadline additions: `GET .../{id}/deliveries`, `GET .../{id}/attempts`,
`POST .../{id}/events/{event_id}/resend`, `POST .../{id}/recover` and `status` on update (re-enable).
"""

import time
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from openai.types.webhooks import (
    DeletedWebhookEndpoint,
    WebhookEndpoint,
    WebhookEndpointTestResult,
    WebhookEndpointWithSecret,
    WebhookEventTypeList,
)
from pydantic import Field, StringConstraints

from gateway import webhook_repository as repo
from gateway.deps import CallerDep, PoolDep, SettingsDep
from gateway.errors import ApiError, bad_request, echo, not_found
from gateway.http import json_response, parse_body
from gateway.pagination import PageDep, list_body
from gateway.schemas import Strict
from gateway.settings import GatewaySettings
from threadline_core.ids import new_id, now_seconds
from threadline_core.ssrf import GuardedHttpClient, SsrfError, SsrfPolicy
from threadline_core.webhooks import EVENT_TYPES, generate_secret, secret_hint, signature_headers

router = APIRouter(prefix="/v1", tags=["webhooks"])

ROTATION_OVERLAP_SECONDS = 24 * 3600.0
_SAMPLE_IDS = {"thread.run": "run_test", "thread.message": "msg_test", "vector_store.file": "file-test",
               "vector_store.file_batch": "vsfb_test"}

Url = Annotated[str, StringConstraints(min_length=1, max_length=2048)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=256)]
EventTypes = Annotated[list[str], Field(min_length=1, max_length=len(EVENT_TYPES))]


class WebhookCreate(Strict):
    """Body of `POST /v1/webhook_endpoints`."""

    url: Url
    name: Name
    event_types: EventTypes


class WebhookUpdate(Strict):
    """Body of `POST /v1/webhook_endpoints/{id}` (`status` is a Threadline addition: re-enable/disable)."""

    url: Url | None = None
    name: Name | None = None
    event_types: EventTypes | None = None
    status: Literal["enabled", "disabled"] | None = None


class RotateSecret(Strict):
    """Body of `POST /v1/webhook_endpoints/{id}/rotate_secret`."""

    keep_old_secret_active_for_24_hours: bool | None = None


class WebhookTest(Strict):
    """Body of `POST /v1/webhook_endpoints/{id}/test`."""

    event_type: str


LAST_UNIX_SECOND = 253_402_300_799
"""9999-12-31T23:59:59Z: the last second a timestamp can name (Python's datetime ends there)."""


class Recover(Strict):
    """Body of `POST /v1/webhook_endpoints/{id}/recover`: failed deliveries of events in [since, until)."""

    since: Annotated[int, Field(ge=0, le=LAST_UNIX_SECOND)]
    until: Annotated[int, Field(ge=0, le=LAST_UNIX_SECOND)] | None = None


def _check_event_types(values: list[str], param: str = "event_types") -> list[str]:
    """Known types only, duplicates dropped, order kept."""
    for index, value in enumerate(values):
        if value not in EVENT_TYPES:
            supported = ", ".join(f"'{t}'" for t in EVENT_TYPES)
            raise bad_request(f"Invalid value: '{echo(value)}'. Supported values are: {supported}.",
                              f"{param}[{index}]", "invalid_value")
    return list(dict.fromkeys(values))


def _policy(settings: GatewaySettings) -> SsrfPolicy:
    return SsrfPolicy.from_setting(settings.webhook_allowed_networks)


async def _check_url(settings: GatewaySettings, url: str) -> None:
    """Refuse URLs whose host is, or resolves to, an address webhooks may not reach, and URLs with credentials
    (`user:password@`): the endpoint object shows its URL, and logs name it."""
    try:
        parts = _policy(settings).parse_url(url)
        if "@" in parts.netloc:
            raise SsrfError("The URL must not include a user name or password; authenticate deliveries with the "
                            "endpoint's signing secret.")
        await _policy(settings).check_url(url)
    except SsrfError as exc:
        raise bad_request(f"Invalid 'url': {exc}", "url", "invalid_url") from None


def _endpoint_doc(record: repo.EndpointRecord) -> dict[str, Any]:
    doc = WebhookEndpoint(id=record.id, object="webhook_endpoint", created_at=record.created_at,
                          updated_at=record.updated_at, name=record.name, url=record.url,
                          event_types=record.event_types, signing_secret_hint=secret_hint(record.secret))
    return {**doc.model_dump(mode="json"), "status": record.status, "disabled_reason": record.disabled_reason}


def _with_secret(record: repo.EndpointRecord) -> dict[str, Any]:
    doc = WebhookEndpointWithSecret(id=record.id, object="webhook_endpoint", created_at=record.created_at,
                                    updated_at=record.updated_at, name=record.name, url=record.url,
                                    event_types=record.event_types, signing_secret=record.secret,
                                    signing_secret_hint=secret_hint(record.secret))
    return {**doc.model_dump(mode="json"), "status": record.status, "disabled_reason": record.disabled_reason}


def _epoch(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value is not None else None


def _delivery_doc(record: repo.DeliveryRecord) -> dict[str, Any]:
    return {"id": record.id, "object": "webhook_endpoint.delivery", "webhook_endpoint_id": record.endpoint_id,
            "event_id": record.event_id, "event_type": record.event_type, "status": record.status,
            "attempts": record.attempts,
            "next_attempt_at": _epoch(record.next_attempt_at) if record.status == "pending" else None,
            "last_status_code": record.last_status_code, "last_error": record.last_error,
            "event_created_at": _epoch(record.event_created_at), "created_at": _epoch(record.created_at),
            "completed_at": _epoch(record.completed_at)}


def _attempt_doc(record: repo.AttemptRecord) -> dict[str, Any]:
    return {"id": record.id, "object": "webhook_endpoint.delivery_attempt", "webhook_endpoint_id": record.endpoint_id,
            "delivery_id": record.delivery_id, "event_id": record.event_id, "attempt": record.attempt,
            "status_code": record.status_code, "success": record.success,
            "latency_ms": round(record.latency_ms, 3), "error": record.error,
            "response_body": record.response_body, "created_at": _epoch(record.created_at)}


async def _endpoint_or_404(pool: PoolDep, project_id: str, endpoint_id: str) -> repo.EndpointRecord:
    async with pool.acquire() as conn:
        record = await repo.get_endpoint(conn, project_id, endpoint_id)
    if record is None:
        raise not_found("webhook endpoint", endpoint_id)
    return record


@router.get("/webhook_event_types")
async def list_event_types(caller: CallerDep) -> Response:
    """The event types an endpoint can subscribe to."""
    return json_response(WebhookEventTypeList(object="list", data=list(EVENT_TYPES)).model_dump(mode="json"))


@router.post("/webhook_endpoints")
async def create_endpoint(request: Request, caller: CallerDep, pool: PoolDep, settings: SettingsDep) -> Response:
    """Register an endpoint; its signing secret is in this response and never again."""
    body = await parse_body(request, WebhookCreate)
    event_types = _check_event_types(body.event_types)
    await _check_url(settings, body.url)
    async with pool.acquire() as conn:
        record = await repo.insert_endpoint(conn, endpoint_id=new_id("we"), project_id=caller.project_id,
                                            url=body.url, name=body.name, event_types=event_types,
                                            secret=generate_secret(), created_at=now_seconds())
    return json_response(_with_secret(record))


@router.get("/webhook_endpoints")
async def list_endpoints(caller: CallerDep, pool: PoolDep, page: PageDep) -> Response:
    """The project's endpoints, newest first."""
    async with pool.acquire() as conn:
        records, has_more = await repo.list_endpoints(conn, caller.project_id, page)
    return json_response(list_body([_endpoint_doc(r) for r in records], has_more))


@router.get("/webhook_endpoints/{endpoint_id}")
async def retrieve_endpoint(endpoint_id: str, caller: CallerDep, pool: PoolDep) -> Response:
    """One endpoint (without its secret)."""
    return json_response(_endpoint_doc(await _endpoint_or_404(pool, caller.project_id, endpoint_id)))


@router.post("/webhook_endpoints/{endpoint_id}")
async def update_endpoint(endpoint_id: str, request: Request, caller: CallerDep, pool: PoolDep,
                          settings: SettingsDep) -> Response:
    """Change url, name, event types (the complete new set) or, as an addition, status."""
    body = await parse_body(request, WebhookUpdate)
    changes: dict[str, Any] = {}
    if body.url is not None:
        await _check_url(settings, body.url)
        changes["url"] = body.url
    if body.name is not None:
        changes["name"] = body.name
    if body.event_types is not None:
        changes["event_types"] = _check_event_types(body.event_types)
    if body.status is not None:
        changes["status"] = body.status
    async with pool.acquire() as conn, conn.transaction():
        record = await repo.update_endpoint(conn, caller.project_id, endpoint_id, changes, now_seconds())
    if record is None:
        raise not_found("webhook endpoint", endpoint_id)
    return json_response(_endpoint_doc(record))


@router.delete("/webhook_endpoints/{endpoint_id}")
async def delete_endpoint(endpoint_id: str, caller: CallerDep, pool: PoolDep) -> Response:
    """Delete an endpoint (pending deliveries are dropped with it)."""
    async with pool.acquire() as conn:
        deleted = await repo.delete_endpoint(conn, caller.project_id, endpoint_id)
    if not deleted:
        raise not_found("webhook endpoint", endpoint_id)
    return json_response(DeletedWebhookEndpoint(id=endpoint_id, object="webhook_endpoint.deleted",
                                                deleted=True).model_dump(mode="json"))


@router.post("/webhook_endpoints/{endpoint_id}/rotate_secret")
async def rotate_secret(endpoint_id: str, request: Request, caller: CallerDep, pool: PoolDep) -> Response:
    """New signing secret; the old one stops at once (the SDK's documented default), or signs alongside it for
    24 h with keep_old_secret_active_for_24_hours."""
    body = await parse_body(request, RotateSecret)
    keep = ROTATION_OVERLAP_SECONDS if body.keep_old_secret_active_for_24_hours else None
    async with pool.acquire() as conn:
        record = await repo.rotate_secret(conn, caller.project_id, endpoint_id, secret=generate_secret(),
                                          keep_old_for=keep, updated_at=now_seconds())
    if record is None:
        raise not_found("webhook endpoint", endpoint_id)
    return json_response(_with_secret(record))


@router.post("/webhook_endpoints/{endpoint_id}/test")
async def test_endpoint(endpoint_id: str, request: Request, caller: CallerDep, pool: PoolDep,
                        settings: SettingsDep) -> Response:
    """Send a signed sample event now and report the endpoint's HTTP status."""
    body = await parse_body(request, WebhookTest)
    event_type = _check_event_types([body.event_type], "event_type")[0]
    record = await _endpoint_or_404(pool, caller.project_id, endpoint_id)
    async with pool.acquire() as conn:
        secrets = await repo.active_secrets(conn, caller.project_id, endpoint_id)
    obj, status = event_type.rsplit(".", 1)
    event_id = new_id("evt")
    payload = {"id": event_id, "object": "event", "type": event_type, "created_at": now_seconds(),
               "data": {"id": _SAMPLE_IDS.get(obj, "obj_test"), "object": obj, "status": status}}
    content = orjson.dumps(payload)
    client = GuardedHttpClient(_policy(settings))
    try:
        result = await client.post(record.url, content=content,
                                   headers=signature_headers(secrets, event_id, int(time.time()), content),
                                   time_limit=settings.webhook_timeout_seconds)
    finally:
        await client.aclose()
    if result.status_code is None:
        raise ApiError(400, f"The test event could not be delivered to {record.url}: {result.error}",
                       param="url", code="webhook_test_failed")
    return json_response(WebhookEndpointTestResult(
        object="webhook_endpoint.test", event_type=event_type, status_code=result.status_code, success=True,
        webhook_endpoint_id=endpoint_id).model_dump(mode="json"))


DeliveryStatus = Annotated[Literal["pending", "succeeded", "failed"] | None, Query()]


@router.get("/webhook_endpoints/{endpoint_id}/deliveries")
async def list_deliveries(endpoint_id: str, caller: CallerDep, pool: PoolDep, page: PageDep,
                          status: DeliveryStatus = None,
                          event_id: Annotated[str | None, Query()] = None) -> Response:
    """An endpoint's deliveries (one per event), newest first; filter by status or event."""
    await _endpoint_or_404(pool, caller.project_id, endpoint_id)
    async with pool.acquire() as conn:
        records, has_more = await repo.list_deliveries(conn, endpoint_id, page, status=status, event_id=event_id)
    return json_response(list_body([_delivery_doc(r) for r in records], has_more))


@router.get("/webhook_endpoints/{endpoint_id}/attempts")
async def list_attempts(endpoint_id: str, caller: CallerDep, pool: PoolDep, page: PageDep,
                        delivery_id: Annotated[str | None, Query()] = None,
                        event_id: Annotated[str | None, Query()] = None) -> Response:
    """The delivery log: every attempt (status code, latency, error, start of the response), newest first."""
    await _endpoint_or_404(pool, caller.project_id, endpoint_id)
    async with pool.acquire() as conn:
        records, has_more = await repo.list_attempts(conn, endpoint_id, page, delivery_id=delivery_id,
                                                     event_id=event_id)
    return json_response(list_body([_attempt_doc(r) for r in records], has_more))


@router.post("/webhook_endpoints/{endpoint_id}/events/{event_id}/resend")
async def resend_event(endpoint_id: str, event_id: str, caller: CallerDep, pool: PoolDep) -> Response:
    """Deliver one event to this endpoint again (same webhook-id), whatever happened to it before."""
    await _endpoint_or_404(pool, caller.project_id, endpoint_id)
    async with pool.acquire() as conn, conn.transaction():
        record = await repo.resend(conn, caller.project_id, endpoint_id, event_id, delivery_id=new_id("whd"),
                                   allowed_types=EVENT_TYPES)
    if record is None:
        raise not_found("event", event_id)
    return json_response(_delivery_doc(record))


@router.post("/webhook_endpoints/{endpoint_id}/recover")
async def recover(endpoint_id: str, request: Request, caller: CallerDep, pool: PoolDep) -> Response:
    """Deliver again every failed event since a timestamp (`since`, optional `until`, unix seconds)."""
    body = await parse_body(request, Recover)
    await _endpoint_or_404(pool, caller.project_id, endpoint_id)
    since = datetime.fromtimestamp(body.since, UTC)
    until = datetime.fromtimestamp(body.until, UTC) if body.until is not None else None
    async with pool.acquire() as conn, conn.transaction():
        count = await repo.recover(conn, caller.project_id, endpoint_id, since=since, until=until)
    return json_response({"object": "webhook_endpoint.recovery", "webhook_endpoint_id": endpoint_id,
                          "since": body.since, "until": body.until, "recovered": count})
