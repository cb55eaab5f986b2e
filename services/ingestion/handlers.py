"""Kafka consumer of the ingestion service: file requests, detached files, deleted vector stores."""

import logging

from ingestion.service import IngestionService
from threadline_core.events import EventEnvelope, FileDetached, FileIngestionRequested, VectorStoreDeleted

_log = logging.getLogger(__name__)


class Handlers:
    """Consumes INGESTION_REQUESTS (key vector_store_id, so one store's commands arrive in order).

    Idempotent by state: a file request applies only while its vector store file is `in_progress` under that
    request id, and point ids are deterministic, so a redelivered or replayed command changes nothing.
    """

    def __init__(self, service: IngestionService) -> None:
        self._service = service

    async def handle(self, envelope: EventEnvelope) -> None:
        """Apply one command (the offset is committed only after this returns)."""
        if envelope.type == FileIngestionRequested.TYPE:
            request = FileIngestionRequested.parse(envelope)
            await self._service.ingest(request.vector_store_id, request.file_id, envelope.event_id)
        elif envelope.type == FileDetached.TYPE:
            detached = FileDetached.parse(envelope)
            self._service.detach(detached.vector_store_id, detached.file_id)
        elif envelope.type == VectorStoreDeleted.TYPE:
            self._service.delete_vector_store(VectorStoreDeleted.parse(envelope).vector_store_id)
        else:
            _log.debug("ignoring %s", envelope.type)
