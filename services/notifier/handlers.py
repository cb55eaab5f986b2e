"""Kafka consumer of the notifier: one delivery row per subscribed endpoint, then an immediate attempt."""

import logging
from collections.abc import Callable
from typing import Any

import asyncpg

from notifier import repository as repo
from notifier.service import Dispatcher, RetryPolicy
from notifier.subscriptions import Subscriptions
from threadline_core.events import EventEnvelope, WebhookDeliveriesDue
from threadline_core.ids import new_id
from threadline_core.webhooks import EVENT_TYPES, event_body

_log = logging.getLogger(__name__)
_IDS_PER_ROUND = 4
"""Delivery ids generated per insert round; a project with more subscribed endpoints takes several rounds."""


class Handlers:
    """Consumes EVENTS (webhook-worthy events become deliveries) and WEBHOOK_COMMANDS (wake-ups), group `notifier`."""

    def __init__(self, *, pool: asyncpg.Pool, subscriptions: Subscriptions, dispatcher: Dispatcher,
                 policy: RetryPolicy, owner: str, lease_seconds: float, wake: Callable[[], None]) -> None:
        self._pool = pool
        self._subscriptions = subscriptions
        self._dispatcher = dispatcher
        self._policy = policy
        self._owner = owner
        self._lease_seconds = lease_seconds
        self._wake = wake
        self._types = frozenset(EVENT_TYPES)
        self._accepted = self._types | {WebhookDeliveriesDue.TYPE}

    def wants(self, event: dict[str, Any]) -> bool:
        """The consumer's pre-filter: only webhook event types and wake-ups are worth building an envelope for."""
        return event.get("type") in self._accepted

    async def handle(self, envelope: EventEnvelope) -> None:
        """Insert deliveries idempotently (one per endpoint and event) and attempt them right away.

        Events no endpoint can want (most) stop at the subscription cache: no body, no database work.
        A wake-up only wakes the scheduler (the deliveries are in Postgres: a redelivered one is harmless).
        """
        if envelope.type == WebhookDeliveriesDue.TYPE:
            _log.debug("deliveries of %s are due", WebhookDeliveriesDue.parse(envelope).endpoint_id)
            self._wake()
            return
        if envelope.type not in self._types or not await self._subscriptions.may_match(
                envelope.project_id, envelope.type, envelope.occurred_at):
            return
        accepting = self._dispatcher.accepting  # shutting down: leave new deliveries to the scheduler
        async with self._pool.acquire() as conn:
            await self.fan_out(conn, new_event(envelope), may_lease=accepting)

    async def fan_out(self, conn: repo.Conn, event: repo.NewEvent, *, may_lease: bool) -> int:
        """Insert an event's missing deliveries and dispatch ours: one rule for the live path and the catch-up."""
        offset = inserted = 0
        while True:
            queued, matched = await repo.insert_deliveries(
                conn, event, ids=[new_id("whd") for _ in range(_IDS_PER_ROUND)],
                first_delay=self._policy.first_delay, owner=self._owner, lease_seconds=self._lease_seconds,
                no_lease=self._dispatcher.saturated(), may_lease=may_lease, offset=offset)
            inserted += len(queued)
            for item in queued:
                if item.leased:
                    self._dispatcher.submit(item.endpoint_id, item.ordering_key, item.id, item.ready)
            offset += _IDS_PER_ROUND
            if matched <= offset:
                return inserted


def new_event(envelope: EventEnvelope) -> repo.NewEvent:
    """The delivery-to-be of a webhook-worthy event: the exact body every attempt sends."""
    return repo.NewEvent(project_id=envelope.project_id, event_id=envelope.event_id, event_type=envelope.type,
                         ordering_key=envelope.key, seq=envelope.sequence or 0,
                         body=event_body(event_id=envelope.event_id, event_type=envelope.type,
                                         created_at=int(envelope.occurred_at.timestamp()),
                                         data=envelope.data).decode(),
                         occurred_at=envelope.occurred_at)
