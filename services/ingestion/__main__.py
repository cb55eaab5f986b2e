"""Entry point: `python -m ingestion`."""

import asyncio

from ingestion.app import run
from ingestion.settings import IngestionSettings
from threadline_core.logging import configure_logging


def main() -> None:
    """Build the settings and run the service until SIGTERM."""
    settings = IngestionSettings()
    configure_logging("ingestion", settings.log_level)
    asyncio.run(run(settings))


if __name__ == "__main__":
    main()
