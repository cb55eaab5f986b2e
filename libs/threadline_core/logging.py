"""JSON logs with the run, thread and event ids of the work in hand on every line."""

import contextlib
import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

_CONTEXT: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("threadline_log_context", default=None)
_SECRET_MARKERS = ("sk-", "whsec_", "Bearer ")


@contextlib.contextmanager
def log_context(**ids: str | None) -> Iterator[None]:
    """Attach ids such as run_id, thread_id, event_id to every log line inside the block."""
    merged = {**(_CONTEXT.get() or {}), **{k: v for k, v in ids.items() if v}}
    token = _CONTEXT.set(merged)
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def _redact(text: str) -> str:
    for marker in _SECRET_MARKERS:
        if marker in text:
            head, _, tail = text.partition(marker)
            rest = tail.split(" ", 1)
            text = head + marker + "***" + (" " + _redact(rest[1]) if len(rest) > 1 else "")
    return text


class JsonFormatter(logging.Formatter):
    """One JSON object per line; secrets that slip into a message are masked."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "service": self._service,
            "logger": record.name,
            "message": _redact(record.getMessage()),
            **(_CONTEXT.get() or {}),
        }
        if record.exc_info:
            entry["exc"] = _redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


def configure_logging(service: str, level: str = "INFO") -> None:
    """Route all logging to stderr as JSON lines for this service."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiokafka", "httpx", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
