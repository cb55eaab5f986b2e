"""Kafka consumers of the run-orchestrator service."""

import logging

from run_orchestrator.service import RunService
from threadline_core.events import (
    EventEnvelope,
    RunCancelRequested,
    RunRequested,
    ToolCallCompleted,
    ToolOutputsSubmitted,
)

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
