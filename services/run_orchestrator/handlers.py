"""Kafka consumers of the run-orchestrator service: run commands; requests for the model endpoint's models."""

import logging
import time
from datetime import UTC, datetime

from aiokafka import AIOKafkaProducer
from pydantic import ValidationError

from run_orchestrator.catalog import ModelCatalog, ModelsUnavailable
from run_orchestrator.service import RunService
from threadline_core.events import (
    EventEnvelope,
    ModelsRequested,
    ReplyError,
    RunCancelRequested,
    RunRequested,
    ServiceReplied,
    ToolCallCompleted,
    ToolOutputsSubmitted,
)
from threadline_core.metrics import ServedMetrics
from threadline_core.replies import send_reply
from threadline_core.topics import SEARCH_REPLIES

_log = logging.getLogger(__name__)


class Handlers:
    """Consumes RUN_COMMANDS; every command is applied idempotently by the service, and commands of different
    threads may be handled concurrently (the consumer keeps each thread's commands in order)."""

    def __init__(self, service: RunService) -> None:
        self._service = service

    async def handle(self, envelope: EventEnvelope) -> None:
        """Apply one command. Claims happen here (before the offset is committed); model calls run in tasks."""
        if envelope.type in (RunRequested.TYPE, ToolOutputsSubmitted.TYPE):
            await self._service.on_run_requested(RunRequested.parse(envelope).run_id)
        elif envelope.type == RunCancelRequested.TYPE:
            await self._service.on_cancel_requested(RunCancelRequested.parse(envelope).run_id)
        elif envelope.type == ToolCallCompleted.TYPE:
            await self._service.on_tool_call_completed(envelope)
        else:
            _log.debug("ignoring %s", envelope.type)


class ModelRequestHandlers:
    """Consumes MODEL_REQUESTS (group `models`, apart from the run commands so a list never waits behind a claim)
    and answers on SEARCH_REPLIES, keyed by the asker.

    Never raises, as the search handlers: a request past its deadline is skipped, a failure of the model server
    is an error reply (its 5xx), a reply the broker refuses is dropped (the asker times out). Reads only."""

    def __init__(self, catalog: ModelCatalog, producer: AIOKafkaProducer, metrics: ServedMetrics) -> None:
        self._catalog = catalog
        self._producer = producer
        self._metrics = metrics

    async def handle(self, envelope: EventEnvelope) -> None:
        """Answer one request unless its asker has given up."""
        started = time.monotonic()
        operation = ModelsRequested.OPERATION
        if envelope.type != ModelsRequested.TYPE:
            _log.warning("ignoring %s on the model requests topic", envelope.type)
            return
        try:
            request = ModelsRequested.parse(envelope)
        except ValidationError as exc:
            await self._refuse(envelope, exc, started)
            return
        if not request.reply_to:
            _log.warning("ignoring model request %s without reply_to", request.request_id)
            return
        if request.expired():
            self._metrics.requests.labels(operation=operation, outcome="expired").inc()
            _log.info("skipping model request %s: past its deadline", request.request_id)
            return
        within = None
        if request.deadline is not None:
            deadline = request.deadline if request.deadline.tzinfo else request.deadline.replace(tzinfo=UTC)
            within = (deadline - datetime.now(UTC)).total_seconds()
        try:
            if request.model is None:
                items = await self._catalog.models(within)
            else:
                found = await self._catalog.model(request.model, within)
                items = [found] if found is not None else []
            reply = ServiceReplied(request_id=request.request_id, items=items)
            outcome = "ok"
        except ModelsUnavailable as exc:
            _log.warning("model request %s: %s", request.request_id, exc.message)
            reply = ServiceReplied(request_id=request.request_id, error=ReplyError(status=exc.status,
                                                                                   message=exc.message))
            outcome = "error"
        except Exception as exc:
            _log.exception("model request %s failed", request.request_id)
            reply = ServiceReplied(request_id=request.request_id, error=ReplyError(
                status=502, message=f"Listing the models failed: {type(exc).__name__}: {str(exc)[:300]}"))
            outcome = "error"
        await self._send(envelope.project_id, request.reply_to, reply, outcome, started)

    async def _refuse(self, envelope: EventEnvelope, error: ValidationError, started: float) -> None:
        """A request this service cannot read: a 400 error reply when it says who asks, else dropped."""
        request_id, reply_to = envelope.data.get("request_id"), envelope.data.get("reply_to")
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        _log.warning("invalid model request %s: %s: %s", request_id, where, first["msg"])
        if isinstance(request_id, str) and isinstance(reply_to, str) and reply_to:
            reply = ServiceReplied(request_id=request_id, error=ReplyError(
                status=400, message=f"Invalid model request: {where}: {first['msg']}",
                type="invalid_request_error", param=where or None))
            await self._send(envelope.project_id, reply_to, reply, "error", started)

    async def _send(self, project_id: str, reply_to: str, reply: ServiceReplied, outcome: str,
                    started: float) -> None:
        operation = ModelsRequested.OPERATION
        try:
            await send_reply(self._producer, SEARCH_REPLIES, reply, project_id=project_id, reply_to=reply_to)
        except Exception:
            _log.exception("could not send the reply to model request %s", reply.request_id)
            outcome = "unsent"
        self._metrics.requests.labels(operation=operation, outcome=outcome).inc()
        self._metrics.duration.labels(operation=operation).observe(time.monotonic() - started)
