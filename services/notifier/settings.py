"""Settings of the notifier service."""

from threadline_core.settings import CoreSettings


class NotifierSettings(CoreSettings):
    """Environment-driven configuration (prefix THREADLINE_)."""

    port: int = 9104
