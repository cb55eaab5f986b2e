"""Entry point: `python -m notifier`."""

import uvloop

from notifier.app import run
from notifier.settings import NotifierSettings
from threadline_core.logging import configure_logging


def main() -> None:
    """Build the settings and run the service until SIGTERM."""
    settings = NotifierSettings()
    configure_logging("notifier", settings.log_level)
    uvloop.run(run(settings))


if __name__ == "__main__":
    main()
