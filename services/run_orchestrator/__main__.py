"""Entry point: `python -m run_orchestrator`."""

import uvloop

from run_orchestrator.app import run
from run_orchestrator.settings import RunOrchestratorSettings
from threadline_core.logging import configure_logging


def main() -> None:
    """Build the settings and run the service until SIGTERM."""
    settings = RunOrchestratorSettings()
    configure_logging("run-orchestrator", settings.log_level)
    uvloop.run(run(settings))


if __name__ == "__main__":
    main()
