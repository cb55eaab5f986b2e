"""Entry point: `python -m tool_executor`."""

import asyncio

from threadline_core.logging import configure_logging
from tool_executor.app import run
from tool_executor.settings import ToolExecutorSettings


def main() -> None:
    """Build the settings and run the service until SIGTERM."""
    settings = ToolExecutorSettings()
    configure_logging("tool-executor", settings.log_level)
    asyncio.run(run(settings))


if __name__ == "__main__":
    main()
