"""Wiring of the ingestion service: runtime, consumers, ops server."""

from ingestion.handlers import Handlers
from ingestion.settings import IngestionSettings
from threadline_core.runtime import ServiceRuntime
from threadline_core.topics import INGESTION_REQUESTS

CONSUMER_GROUP = "ingestion"


async def run(settings: IngestionSettings) -> None:
    """Run until SIGTERM/SIGINT, then stop taking work, commit offsets and exit."""
    async with ServiceRuntime(settings, "ingestion") as runtime:
        handlers = Handlers()
        await runtime.add_consumer(group_id=CONSUMER_GROUP, topics=[INGESTION_REQUESTS], handler=handlers.handle)
        await runtime.serve_ops()
        await runtime.wait_for_stop()
