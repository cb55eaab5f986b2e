"""Entry point: `python -m gateway` serves the API; `python -m gateway migrate` applies migrations;
`python -m gateway dead-letters list|replay ID...` shows or replays parked records."""

import asyncio
import contextlib
import socket
import sys

import uvicorn
from fastapi import FastAPI

from gateway.app import create_app
from gateway.fanout import EventFanout
from gateway.http import JsonErrorHttpToolsProtocol
from gateway.settings import GatewaySettings
from threadline_core import dead_letters
from threadline_core.db import run_migrations
from threadline_core.logging import configure_logging
from threadline_core.runtime import ServiceRuntime

RUN_STREAM_SHARE = 0.5
"""Share of uvicorn's graceful period during which run streams open at SIGTERM keep streaming (a short run ends on
its own connection) before they end, well before uvicorn cancels what still runs (an ERROR and a traceback)."""


class GatewayServer(uvicorn.Server):
    """uvicorn that ends the project event streams (`GET /v1/events`, endless) as it starts shutting down, and run
    streams a little later: their clients resume on another instance with Last-Event-ID instead of holding this one
    for the grace period or being cut off by it."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        runtime: ServiceRuntime | None = getattr(self._app.state, "runtime", None)
        if runtime is not None:
            runtime.request_stop()  # the grace period starts now, as in the other services, not after the drain
        fanout: EventFanout | None = getattr(self._app.state, "fanout", None)
        if fanout is not None:
            fanout.end_project_streams()
            fanout.end_run_streams(after=(self.config.timeout_graceful_shutdown or 0) * RUN_STREAM_SHARE)
        await super().shutdown(sockets)


def main() -> None:
    """Build the settings and serve (or run one of the admin commands and exit)."""
    settings = GatewaySettings()
    configure_logging("gateway", settings.log_level)
    if sys.argv[1:] == ["migrate"]:
        asyncio.run(run_migrations(settings.database_url))
        return
    if sys.argv[1:2] == ["dead-letters"]:
        asyncio.run(dead_letters.command(settings, sys.argv[2:]))
        return
    # SIGTERM: uvicorn stops accepting, ends the project event streams and lets requests finish for half the grace
    # period (run streams: half of that, then they end); the lifespan's runtime shutdown gets the other half.
    # log_config=None keeps JSON logs. httptools, whose 400 for an unparsable request is a JSON error like every other.
    app = create_app(settings)
    server = GatewayServer(uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level="warning", access_log=False, loop="uvloop",
        http=JsonErrorHttpToolsProtocol, log_config=None, timeout_keep_alive=settings.http_keep_alive_seconds,
        timeout_graceful_shutdown=max(1, int(settings.shutdown_grace_seconds / 2))), app)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if not server.started:
        sys.exit(3)  # as uvicorn.run: the app did not start


if __name__ == "__main__":
    main()
