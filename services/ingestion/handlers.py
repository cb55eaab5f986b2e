"""Kafka consumers of the ingestion service: file requests, detached files, deleted vector stores; search requests."""

import logging
import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from aiokafka import AIOKafkaProducer
from pydantic import ValidationError

from ingestion.service import IngestionService
from threadline_core.events import (
    EventEnvelope,
    FileChunksRequested,
    FileDetached,
    FileIngestionRequested,
    PointCountRequested,
    ReplyError,
    ServiceReplied,
    ServiceRequest,
    VectorSearchRequested,
    VectorStoreDeleted,
)
from threadline_core.metrics import SearchServedMetrics
from threadline_core.replies import REPLY_PART_BYTES, send_reply
from threadline_core.topics import SEARCH_REPLIES

_log = logging.getLogger(__name__)

SEARCH_REQUEST_TYPES: Mapping[str, type[ServiceRequest]] = MappingProxyType({
    model.TYPE: model for model in (VectorSearchRequested, FileChunksRequested, PointCountRequested)})
"""The requests SEARCH_REQUESTS carries, by envelope type (read-only)."""


class Handlers:
    """Consumes INGESTION_REQUESTS (Kafka key vector_store_id). Each file's commands run in order
    (`ordering_key`), the files of one store at once, as the hosted API indexes a batch.

    Idempotent by state: a file request applies only while its vector store file is `in_progress` under that
    request id, and point ids are deterministic, so a redelivered or replayed command changes nothing. A store
    deleted while one of its files is indexed loses that file's points too: the file's finish finds no row and
    removes them, and a retry finds no store and removes them.
    """

    def __init__(self, service: IngestionService) -> None:
        self._service = service

    @staticmethod
    def ordering_key(event: dict[str, Any]) -> str | None:
        """A file's commands (store and file id), apart from its store's other files; None for store-wide ones."""
        data = event.get("data")
        if isinstance(data, dict) and isinstance(data.get("vector_store_id"), str) \
                and isinstance(data.get("file_id"), str):
            return f"{data['vector_store_id']}/{data['file_id']}"
        return None

    async def handle(self, envelope: EventEnvelope) -> None:
        """Apply one command (the offset is committed only after this returns)."""
        if envelope.type == FileIngestionRequested.TYPE:
            request = FileIngestionRequested.parse(envelope)
            await self._service.ingest(request.vector_store_id, request.file_id, request.request(envelope))
        elif envelope.type == FileDetached.TYPE:
            detached = FileDetached.parse(envelope)
            await self._service.detach(detached.vector_store_id, detached.file_id)
        elif envelope.type == VectorStoreDeleted.TYPE:
            await self._service.delete_vector_store(VectorStoreDeleted.parse(envelope).vector_store_id)
        else:
            _log.debug("ignoring %s", envelope.type)


class SearchHandlers:
    """Consumes SEARCH_REQUESTS (group `search`, apart from the files so a long parse never delays a search) and
    answers on SEARCH_REPLIES, keyed by the asker.

    Never raises, so a request is never retried and never holds up the others: one past its deadline is skipped
    (nobody waits), a failure becomes an error reply, and a reply the broker refuses is dropped (the asker times
    out). Reads only: a request handled twice answers twice, and the asker keeps the first answer.
    """

    def __init__(self, service: IngestionService, producer: AIOKafkaProducer, metrics: SearchServedMetrics, *,
                 part_bytes: int = REPLY_PART_BYTES) -> None:
        self._service = service
        self._producer = producer
        self._metrics = metrics
        self._part_bytes = part_bytes

    async def handle(self, envelope: EventEnvelope) -> None:
        """Answer one request unless its asker has given up."""
        started = time.monotonic()
        model = SEARCH_REQUEST_TYPES.get(envelope.type)
        if model is None:
            _log.warning("ignoring %s on the search requests topic", envelope.type)
            return
        try:
            request = model.parse(envelope)
        except ValidationError as exc:
            await self._refuse(envelope, model.OPERATION, exc, started)
            return
        if not request.reply_to:
            _log.warning("ignoring search request %s without reply_to", request.request_id)
            return
        if request.expired():
            self._metrics.requests.labels(operation=model.OPERATION, outcome="expired").inc()
            _log.info("skipping %s request %s: past its deadline", model.OPERATION, request.request_id)
            return
        try:
            reply = await self._answer(request)
            outcome = "ok"
        except Exception as exc:
            _log.exception("%s request %s failed", model.OPERATION, request.request_id)
            reply = ServiceReplied(request_id=request.request_id, error=ReplyError(
                status=500, message=f"Search failed: {type(exc).__name__}: {str(exc)[:300]}"))
            outcome = "error"
        await self._send(envelope.project_id, request.reply_to, reply, model.OPERATION, outcome, started)

    async def _answer(self, request: ServiceRequest) -> ServiceReplied:
        if isinstance(request, VectorSearchRequested):
            file_ids = None if request.file_ids is None else dict.fromkeys(request.vector_store_ids, request.file_ids)
            results = await self._service.search(request.vector_store_ids, request.query,
                                                 max_num_results=request.max_num_results,
                                                 score_threshold=request.score_threshold, file_ids=file_ids)
            return ServiceReplied(request_id=request.request_id, items=[r.to_dict() for r in results])
        if isinstance(request, FileChunksRequested):
            return ServiceReplied(request_id=request.request_id,
                                  items=await self._service.chunks(request.vector_store_id, request.file_id))
        if isinstance(request, PointCountRequested):
            count = await self._service.count(vector_store_id=request.vector_store_id, file_id=request.file_id)
            return ServiceReplied(request_id=request.request_id, result={"count": count})
        raise TypeError(f"unsupported search request {type(request).__name__}")

    async def _refuse(self, envelope: EventEnvelope, operation: str, error: ValidationError, started: float) -> None:
        """A request this service cannot read: a 400 error reply when it says who asks, else dropped."""
        request_id, reply_to = envelope.data.get("request_id"), envelope.data.get("reply_to")
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        _log.warning("invalid %s request %s: %s: %s", operation, request_id, where, first["msg"])
        if isinstance(request_id, str) and isinstance(reply_to, str) and reply_to:
            reply = ServiceReplied(request_id=request_id, error=ReplyError(
                status=400, message=f"Invalid search request: {where}: {first['msg']}",
                type="invalid_request_error", param=where or None))
            await self._send(envelope.project_id, reply_to, reply, operation, "error", started)

    async def _send(self, project_id: str, reply_to: str, reply: ServiceReplied, operation: str, outcome: str,
                    started: float) -> None:
        try:
            await send_reply(self._producer, SEARCH_REPLIES, reply, project_id=project_id, reply_to=reply_to,
                             part_bytes=self._part_bytes)
        except Exception:
            _log.exception("could not send the reply to %s request %s", operation, reply.request_id)
            outcome = "unsent"
        self._metrics.requests.labels(operation=operation, outcome=outcome).inc()
        self._metrics.duration.labels(operation=operation).observe(time.monotonic() - started)
