"""Kafka consumers of the run-orchestrator service."""

import logging

from threadline_core.events import EventEnvelope

_log = logging.getLogger(__name__)


class Handlers:
    """Consumes RUN_COMMANDS (skeleton: logs what arrives; the service's issue fills it in)."""

    async def handle(self, envelope: EventEnvelope) -> None:
        """Apply one event idempotently."""
        _log.debug("received %s", envelope.type)
