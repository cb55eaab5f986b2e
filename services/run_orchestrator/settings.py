"""Settings of the run-orchestrator service."""

from threadline_core.settings import CoreSettings


class RunOrchestratorSettings(CoreSettings):
    """Environment-driven configuration (prefix THREADLINE_)."""

    port: int = 9101
