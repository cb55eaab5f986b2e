"""Settings of the tool-executor service."""

from threadline_core.settings import CoreSettings


class ToolExecutorSettings(CoreSettings):
    """Environment-driven configuration (prefix THREADLINE_)."""

    port: int = 9102
