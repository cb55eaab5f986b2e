"""JSON logs with the run, thread and event ids of the work in hand on every line; secrets never logged."""

import contextlib
import contextvars
import json
import logging
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

_CONTEXT: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("threadline_log_context", default=None)
_REQUEST_PARAMS: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar(
    "threadline_log_request_scope", default=None)

CONTEXT_KEYS_FROM_PATH = ("thread_id", "run_id", "step_id", "message_id", "assistant_id", "file_id",
                          "vector_store_id", "batch_id")
"""Path parameters of an HTTP request that are logged as ids on every line of that request."""

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\b(sk-|whsec_)[A-Za-z0-9_\-+/=.]{3,}"), r"\1***"),
    (re.compile(r"\b(Bearer|Basic)\s+[^\s\"',;]+", re.IGNORECASE), r"\1 ***"),
    (re.compile(r"(\b[a-z][a-z0-9+.\-]*://[^:/@\s\"']+):[^@\s\"']+@", re.IGNORECASE), r"\1:***@"),
    (re.compile(r"((?:api[_-]?key|secret|password|passwd|token|authorization)[\"']?\s*[:=]\s*[\"']?)"
                r"(?!\*\*\*|Bearer\b|Basic\b)[^\s\"',;}]+", re.IGNORECASE), r"\1***"),
)
_STANDARD_ATTRS = frozenset(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None).__dict__) | {
    "message", "asctime", "taskName", "color_message"}


@contextlib.contextmanager
def log_context(**ids: str | None) -> Iterator[None]:
    """Attach ids such as run_id, thread_id, event_id to every log line inside the block."""
    merged = {**(_CONTEXT.get() or {}), **{k: v for k, v in ids.items() if v}}
    token = _CONTEXT.set(merged)
    try:
        yield
    finally:
        _CONTEXT.reset(token)


@contextlib.contextmanager
def request_log_context(scope: Mapping[str, Any]) -> Iterator[None]:
    """Log the ids in an HTTP request's path (`thread_id`, `run_id`, ...) on every line it writes.

    `scope` is the ASGI scope; the router fills in `path_params` later, so it is read when a line is
    written, not now.
    """
    token = _REQUEST_PARAMS.set(scope)
    try:
        yield
    finally:
        _REQUEST_PARAMS.reset(token)


def current_context() -> dict[str, str]:
    """The ids that a log line written here would carry."""
    ids: dict[str, str] = {}
    scope = _REQUEST_PARAMS.get()
    if scope is not None:
        params = scope.get("path_params") or {}
        ids.update({k: str(params[k]) for k in CONTEXT_KEYS_FROM_PATH if params.get(k)})
    ids.update(_CONTEXT.get() or {})
    return ids


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Mask known secret values and anything shaped like a key, token, password or credential."""
    for secret in secrets:
        if secret and secret in text:
            text = text.replace(secret, "***")
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _redact_value(value: Any, secrets: Iterable[str]) -> Any:
    if isinstance(value, str):
        return redact(value, secrets)
    if isinstance(value, Mapping):
        return {k: _redact_value(v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(v, secrets) for v in value]
    return value


class JsonFormatter(logging.Formatter):
    """One JSON object per line; secrets that slip into a message, an exception or an extra are masked."""

    def __init__(self, service: str, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._service = service
        self._secrets: list[str] = []
        self.add_secrets(secrets)

    def add_secrets(self, secrets: Iterable[str]) -> None:
        """Mask these exact values wherever they appear (longest first, so no prefix leaks the rest)."""
        known = set(self._secrets) | {s for s in secrets if s and len(s) >= 4}
        self._secrets = sorted(known, key=len, reverse=True)

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "service": self._service,
            "logger": record.name,
            "message": redact(record.getMessage(), self._secrets),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_") and key not in entry:
                entry[key] = _redact_value(value, self._secrets)
        entry.update(current_context())
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info), self._secrets)
        return json.dumps(entry, default=str)


def secret_values(settings: Any) -> list[str]:
    """Secret strings in a settings object: key/secret/password/token fields, API key maps, DSN passwords."""
    values: list[str] = []
    for name in type(settings).model_fields:
        value = getattr(settings, name, None)
        reveal = getattr(value, "get_secret_value", None)
        if callable(reveal):
            value = reveal()
        if not isinstance(value, str) or not value:
            continue
        lowered = name.lower()
        if lowered.endswith("_keys") and value.strip().startswith("{"):
            with contextlib.suppress(ValueError, AttributeError):
                values += [str(k) for k in json.loads(value)]
        elif any(marker in lowered for marker in ("key", "secret", "password", "token")):
            values.append(value)
        if "://" in value:
            with contextlib.suppress(ValueError):
                password = urlsplit(value).password
                if password:
                    values.append(password)
    return values


def register_secrets(secrets: Iterable[str]) -> None:
    """Tell the JSON log handlers installed by `configure_logging` to mask these values."""
    values = list(secrets)
    for handler in logging.getLogger().handlers:
        if isinstance(handler.formatter, JsonFormatter):
            handler.formatter.add_secrets(values)


def configure_logging(service: str, level: str = "INFO") -> None:
    """Route all logging to stderr as JSON lines for this service."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiokafka", "httpx", "httpx2", "httpcore", "httpcore2", "uvicorn.access", "openai", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
