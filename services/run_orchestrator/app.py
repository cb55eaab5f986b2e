"""Wiring of the run-orchestrator service: runtime, consumers, ops server."""

from run_orchestrator.handlers import Handlers
from run_orchestrator.settings import RunOrchestratorSettings
from threadline_core.runtime import ServiceRuntime
from threadline_core.topics import RUN_COMMANDS

CONSUMER_GROUP = "run-orchestrator"


async def run(settings: RunOrchestratorSettings) -> None:
    """Run until SIGTERM/SIGINT, then stop taking work, commit offsets and exit."""
    async with ServiceRuntime(settings, "run-orchestrator") as runtime:
        handlers = Handlers()
        await runtime.add_consumer(group_id=CONSUMER_GROUP, topics=[RUN_COMMANDS], handler=handlers.handle)
        await runtime.serve_ops()
        await runtime.wait_for_stop()
