"""Kafka consumers of the tool-executor service."""

import logging
import time

from threadline_core.db import storable
from threadline_core.events import EventEnvelope, ToolCallCompleted, ToolCallRequested
from threadline_core.metrics import ToolMetrics
from tool_executor.repository import ToolRepository
from tool_executor.service import ToolService

_log = logging.getLogger(__name__)


class Handlers:
    """Consumes TOOL_REQUESTS: runs the call, then answers once with ToolCallCompleted through the outbox.

    The offset is committed only after the answer is committed, so a request whose executor dies is
    delivered again (to this group's next owner of the partition); a request already answered is skipped.
    """

    def __init__(self, *, service: ToolService, repository: ToolRepository, metrics: ToolMetrics) -> None:
        self._service = service
        self._repo = repository
        self._metrics = metrics

    async def handle(self, envelope: EventEnvelope) -> None:
        """Run and answer one ToolCallRequested (idempotent per event id)."""
        if envelope.type != ToolCallRequested.TYPE:
            _log.debug("ignoring %s", envelope.type)
            return
        request = ToolCallRequested.parse(envelope)
        if await self._repo.answered(envelope.event_id):
            return
        started = time.monotonic()
        outcome = await self._service.execute(request)
        if outcome is None:
            await self._repo.skip(envelope.event_id)
            self._metrics.calls.labels(type=request.tool_type, outcome="skipped").inc()
            _log.info("%s call %s skipped: run %s no longer waits for it", request.tool_type,
                      request.tool_call_id, request.run_id)
            return
        done = ToolCallCompleted(run_id=request.run_id, thread_id=request.thread_id, step_id=request.step_id,
                                 tool_call_id=request.tool_call_id, tool_type=request.tool_type,
                                 result=storable(outcome.result), error=storable(outcome.error))
        answer = done.envelope(project_id=envelope.project_id, key=request.thread_id, thread_id=request.thread_id,
                               run_id=request.run_id)
        if await self._repo.answer(envelope.event_id, envelope.project_id, answer, outcome.files,
                                   outcome.session_cell):
            elapsed = time.monotonic() - started
            self._metrics.calls.labels(type=request.tool_type, outcome=outcome.outcome).inc()
            self._metrics.duration.labels(type=request.tool_type).observe(elapsed)
            _log.info("%s call %s answered (%s) in %.2fs (attempt %d)", request.tool_type, request.tool_call_id,
                      outcome.outcome, elapsed, request.attempt)
