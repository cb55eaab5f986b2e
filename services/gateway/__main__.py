"""Entry point: `python -m gateway` serves the API; `python -m gateway migrate` applies migrations."""

import asyncio
import sys

import uvicorn

from gateway.app import create_app
from gateway.settings import GatewaySettings
from threadline_core.db import run_migrations
from threadline_core.logging import configure_logging


def main() -> None:
    """Build the settings and serve (or migrate and exit)."""
    settings = GatewaySettings()
    configure_logging("gateway", settings.log_level)
    if sys.argv[1:] == ["migrate"]:
        asyncio.run(run_migrations(settings.database_url))
        return
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="warning",
                access_log=False, loop="uvloop", http="httptools",
                timeout_graceful_shutdown=int(settings.shutdown_grace_seconds))


if __name__ == "__main__":
    main()
