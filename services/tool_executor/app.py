"""Wiring of the tool-executor service: runtime, consumers, ops server."""

from threadline_core.runtime import ServiceRuntime
from threadline_core.topics import TOOL_REQUESTS
from tool_executor.handlers import Handlers
from tool_executor.settings import ToolExecutorSettings

CONSUMER_GROUP = "tool-executor"


async def run(settings: ToolExecutorSettings) -> None:
    """Run until SIGTERM/SIGINT, then stop taking work, commit offsets and exit."""
    async with ServiceRuntime(settings, "tool-executor") as runtime:
        handlers = Handlers()
        await runtime.add_consumer(group_id=CONSUMER_GROUP, topics=[TOOL_REQUESTS], handler=handlers.handle)
        await runtime.serve_ops()
        await runtime.wait_for_stop()
