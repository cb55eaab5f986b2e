"""Wiring of the notifier service: runtime, consumers, ops server."""

from notifier.handlers import Handlers
from notifier.settings import NotifierSettings
from threadline_core.runtime import ServiceRuntime
from threadline_core.topics import EVENTS

CONSUMER_GROUP = "notifier"


async def run(settings: NotifierSettings) -> None:
    """Run until SIGTERM/SIGINT, then stop taking work, commit offsets and exit."""
    async with ServiceRuntime(settings, "notifier") as runtime:
        handlers = Handlers()
        await runtime.add_consumer(group_id=CONSUMER_GROUP, topics=[EVENTS], handler=handlers.handle)
        await runtime.serve_ops()
        await runtime.wait_for_stop()
