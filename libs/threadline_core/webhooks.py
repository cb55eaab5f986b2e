"""Webhook pieces shared by the gateway (registration, test sends) and the notifier (deliveries).

Signing follows the Standard Webhooks spec, which is what `client.webhooks.unwrap()` of the
official SDK verifies: `webhook-signature: v1,<base64 HMAC-SHA256(secret, "{id}.{timestamp}.{body}")>`,
several space-separated signatures while a rotated secret is still honoured.
"""

import base64
import hashlib
import hmac
import secrets
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

EVENT_TYPES: tuple[str, ...] = (
    "thread.run.created",
    "thread.run.queued",
    "thread.run.in_progress",
    "thread.run.requires_action",
    "thread.run.cancelling",
    "thread.run.cancelled",
    "thread.run.failed",
    "thread.run.completed",
    "thread.run.incomplete",
    "thread.run.expired",
    "thread.message.completed",
    "vector_store.file.completed",
    "vector_store.file.failed",
    "vector_store.file_batch.completed",
)
"""The webhook event-type catalogue (`GET /v1/webhook_event_types`)."""

SECRET_PREFIX = "whsec_"
_SUMMARY_KEYS = ("id", "object", "status", "thread_id", "run_id", "assistant_id", "vector_store_id",
                 "batch_id", "file_id", "last_error")


def generate_secret() -> str:
    """A fresh signing secret: `whsec_` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def secret_hint(secret: str) -> str:
    """A masked hint that identifies a secret without revealing it."""
    return f"{SECRET_PREFIX}...{secret[-4:]}"


def _key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX)) if secret.startswith(SECRET_PREFIX) \
        else secret.encode()


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """One `v1,<base64>` signature of `{id}.{timestamp}.{body}`."""
    mac = hmac.new(_key(secret), f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode("ascii")


def signature_headers(secrets_in_use: Iterable[str], message_id: str, timestamp: int,
                      body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers (one signature per active secret, newest first)."""
    signatures = " ".join(sign(s, message_id, timestamp, body) for s in secrets_in_use)
    return {"webhook-id": message_id, "webhook-timestamp": str(timestamp), "webhook-signature": signatures,
            "content-type": "application/json"}


def summarize(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The part of an API object a webhook carries: its id, object, status and the ids it hangs off."""
    return {k: obj[k] for k in _SUMMARY_KEYS if k in obj and obj[k] is not None}


def event_body(*, event_id: str, event_type: str, created_at: int, data: Mapping[str, Any]) -> bytes:
    """The exact bytes POSTed (kept, so every attempt signs and sends the same body)."""
    return orjson.dumps({"id": event_id, "object": "event", "type": event_type, "created_at": created_at,
                         "data": summarize(data)})
