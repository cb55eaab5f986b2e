"""Catch-up from the event log: webhooks of events the notifier never consumed (a broker that lost acknowledged
records, as a restarted in-memory tansu does) are still sent, since every event is durable in Postgres.

A pass (one instance at a time: an advisory transaction lock) reads the events after its watermark, once they
have been in the log and published for a grace period (the live path handles an event in milliseconds), and
inserts the deliveries an endpoint lacks with the live path's own statement, in the transaction that moves the
watermark; the retry scheduler, woken after the commit, sends them. "Past the grace period" is tracked without
trusting the services' clocks: a horizon (the log's last seq, with the database time) becomes the settled limit
once it is a grace period old, so events of transactions still open when it was taken are waited for too, and a
pass that finds an event of the horizon still awaiting the relay starts a new one (after a broker outage the
relay's late records get their grace from when they were last seen unpublished).
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import asyncpg
from prometheus_client import Counter

from notifier import repository as repo
from notifier.handlers import new_event
from threadline_core.periodic import PeriodicPass
from threadline_core.topics import EVENTS
from threadline_core.webhooks import EVENT_TYPES

_log = logging.getLogger(__name__)


class FanOut(Protocol):
    """Handlers.fan_out: the live path's insertion of an event's missing deliveries."""

    async def __call__(self, conn: repo.Conn, event: repo.NewEvent, *, may_lease: bool) -> int:
        """Insert the deliveries; how many."""


@dataclass(frozen=True)
class CatchupPass:
    """What a pass did: its watermark (None: another instance held the lock), deliveries made, settled events left."""

    checked_seq: int | None = None
    created: int = 0
    more: bool = False


class WebhookCatchup:
    """Inserts the deliveries of events that are past the grace period and still lack one, every `interval`."""

    def __init__(self, *, pool: asyncpg.Pool, fan_out: FanOut, wake: Callable[[], None], grace_seconds: float,
                 interval_seconds: float, batch: int, created: Counter) -> None:
        self._pool = pool
        self._fan_out = fan_out
        self._wake = wake
        self._grace = grace_seconds
        self._batch = batch
        self._created = created
        self._periodic = PeriodicPass("webhook-catchup", self._pass, interval_seconds)

    async def start(self) -> None:
        """Check in the background."""
        await self._periodic.start()

    async def stop(self) -> None:
        """Stop checking (a pass cut short rolls back; the next one, here or elsewhere, does it again)."""
        await self._periodic.stop()

    async def run_pass(self) -> CatchupPass:
        """Check up to `batch` events after the watermark and insert their missing deliveries; wake the scheduler."""
        async with self._pool.acquire() as conn, conn.transaction():
            mark = await repo.lock_catchup(conn)
            if mark is None:
                return CatchupPass()
            settled, horizon_seq, horizon_at = mark.settled_seq, mark.horizon_seq, mark.horizon_at
            aged = mark.aged(self._grace)
            if aged and horizon_seq is not None:
                settled = max(settled, horizon_seq)
            # An event of the horizon (taken by an earlier pass) still unpublished means the relay is late: those
            # from it on wait for a new horizon, a grace period after now.
            watched = settled if aged or horizon_seq is None else max(settled, horizon_seq)
            blocked = await repo.first_unpublished(conn, after=mark.checked_seq, upto=watched)
            if blocked is not None:
                settled = min(settled, blocked - 1)
            if aged or blocked is not None or horizon_at is None:
                horizon_seq, horizon_at = mark.last_seq, mark.now
            end = await repo.catchup_end(conn, after=mark.checked_seq, upto=settled, limit=self._batch)
            created = 0
            for envelope in await repo.undelivered_events(conn, after=mark.checked_seq, upto=end, topic=EVENTS,
                                                          event_types=EVENT_TYPES):
                created += await self._fan_out(conn, new_event(envelope), may_lease=False)
            await repo.save_catchup(conn, checked_seq=end, settled_seq=settled, horizon_seq=horizon_seq,
                                    horizon_at=horizon_at)
        if created:
            self._created.inc(created)
            _log.warning("webhook catch-up: %d deliveries of events in the log the notifier never consumed (seq %d"
                         " to %d); a broker lost them", created, mark.checked_seq + 1, end)
            self._wake()
        return CatchupPass(checked_seq=end, created=created, more=end < settled)

    async def _pass(self) -> bool:
        return (await self.run_pass()).more
