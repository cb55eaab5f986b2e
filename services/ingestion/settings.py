"""Settings of the ingestion service."""

from threadline_core.settings import CoreSettings


class IngestionSettings(CoreSettings):
    """Environment-driven configuration (prefix THREADLINE_)."""

    port: int = 9103
