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
    # SIGTERM: uvicorn stops accepting and lets requests (and open streams) finish for half the grace
    # period; the lifespan's runtime shutdown gets the other half. log_config=None keeps JSON logs.
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="warning",
                access_log=False, loop="uvloop", http="httptools", log_config=None,
                timeout_graceful_shutdown=max(1, int(settings.shutdown_grace_seconds / 2)))


if __name__ == "__main__":
    main()
