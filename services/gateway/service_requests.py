"""Requests the gateway sends other services over Kafka and waits for (vector search, model lists)."""

from gateway.errors import ApiError
from threadline_core.events import ServiceReplied, ServiceRequest
from threadline_core.replies import ReplyClient, ReplyTimeout, RequestNotSent


async def ask(replies: ReplyClient, request: ServiceRequest, *, project_id: str, wait_seconds: float, late: str,
              unavailable: str) -> ServiceReplied:
    """The answer; no answer in time (504 `late`), a request the broker did not take (503 `unavailable`) or the
    service's own error as the matching HTTP error."""
    try:
        reply = await replies.call(request, project_id=project_id, wait_seconds=wait_seconds)
    except ReplyTimeout:
        raise ApiError(504, late, type="server_error") from None
    except RequestNotSent:
        raise ApiError(503, unavailable, type="server_error") from None
    if reply.error is not None:
        error = reply.error
        raise ApiError(error.status, error.message, param=error.param, code=error.code, type=error.type)
    return reply
