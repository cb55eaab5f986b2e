"""Webhook delivery: the attempt itself, per-endpoint lanes that keep per-thread order, and the retry scheduler.

Hot path (no timers): the Kafka handler inserts the delivery rows leased to this instance and hands
them to the `Dispatcher`, which attempts them at once. Each endpoint has its own concurrency limit and
each (endpoint, ordering key) its own serial lane, so a slow or dead endpoint only ever waits on
itself. A failed attempt is rescheduled in Postgres; the `RetryScheduler` leases due retries with
`FOR UPDATE SKIP LOCKED` (several notifiers share them) and feeds them back to the dispatcher.
"""

import asyncio
import collections
import contextlib
import enum
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

import asyncpg
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from notifier import repository as repo
from notifier.settings import NotifierSettings
from threadline_core.db import database_lost
from threadline_core.ids import new_id
from threadline_core.logging import log_context
from threadline_core.ssrf import GuardedHttpClient, HttpResult
from threadline_core.webhooks import signature_headers

_log = logging.getLogger(__name__)
_OUTAGE_RETRY_SECONDS = 0.5
_OUTAGE_RETRY_MAX_SECONDS = 10.0
"""A delivery that met a database outage goes again after 0.5 s, doubling up to this."""


class Outcome(enum.Enum):
    """What became of one delivery attempt."""

    SUCCEEDED = "succeeded"
    RETRY = "retry"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class AttemptResult:
    """The outcome, the attempt number (1 = first attempt) it was, and whether it disabled the endpoint."""

    outcome: Outcome
    attempt: int = 0
    disabled: bool = False


class NotifierMetrics:
    """Webhook-specific metrics, in the service's own registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.attempts = Counter("threadline_webhook_attempts_total", "Webhook delivery attempts by endpoint and "
                                "outcome (retry and failed are the failures)", ["endpoint", "outcome"],
                                registry=registry)
        self.delivery_seconds = Histogram(
            "threadline_webhook_delivery_seconds", "Event commit to the endpoint's 2xx (successful deliveries)",
            registry=registry, buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1, 5, 30, 300, 3600))
        self.attempt_seconds = Histogram(
            "threadline_webhook_attempt_seconds", "Duration of one HTTP attempt", ["endpoint"], registry=registry,
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 15))
        self.in_flight = Gauge("threadline_webhook_in_flight", "Attempts in progress", registry=registry)
        self.held = Gauge("threadline_webhook_held", "Deliveries queued or in flight in this instance",
                          registry=registry)
        self.queue_depth = Gauge("threadline_webhook_queue_depth", "Deliveries queued or in flight in this "
                                 "instance, per endpoint", ["endpoint"], registry=registry)
        self.endpoints_disabled = Counter("threadline_webhook_endpoints_disabled_total",
                                          "Endpoints disabled (410 Gone, or failing for too long)", ["reason"],
                                          registry=registry)
        self.catchup_deliveries = Counter(
            "threadline_webhook_catchup_deliveries_total", "Deliveries the catch-up from the event log created: "
            "events the notifier never consumed (a broker lost them)", registry=registry)
        self._endpoints: set[str] = set()

    def attempted(self, endpoint_id: str, outcome: Outcome, seconds: float) -> None:
        """Count one attempt and its duration under its endpoint's series."""
        self._endpoints.add(endpoint_id)
        self.attempt_seconds.labels(endpoint=endpoint_id).observe(seconds)
        self.attempts.labels(endpoint=endpoint_id, outcome=outcome.value).inc()

    @property
    def endpoints(self) -> frozenset[str]:
        """Endpoints that have series of their own."""
        return frozenset(self._endpoints)

    def forget_endpoints(self, endpoint_ids: Iterable[str]) -> None:
        """Drop the series of deleted endpoints: each endpoint ever deleted otherwise kept about twenty for the life
        of the process (and of every scrape)."""
        for endpoint_id in endpoint_ids:
            self._endpoints.discard(endpoint_id)
            with contextlib.suppress(KeyError):
                self.attempt_seconds.remove(endpoint_id)
            for outcome in Outcome:
                with contextlib.suppress(KeyError):
                    self.attempts.remove(endpoint_id, outcome.value)


class RetryPolicy:
    """The persisted retry schedule: delay before attempt n+1, jittered; Retry-After is a lower bound."""

    def __init__(self, schedule: Sequence[float], *, jitter: float = 0.1, max_retry_after: float = 86400.0,
                 rng: Callable[[], float] = random.random) -> None:
        if not schedule:
            raise ValueError("the retry schedule needs at least one entry")
        self.schedule = tuple(float(s) for s in schedule)
        self._jitter = jitter
        self._max_retry_after = max_retry_after
        self._rng = rng

    @property
    def first_delay(self) -> float:
        """Delay before the first attempt (0: attempt as soon as the event arrives)."""
        return self.schedule[0]

    def next_delay(self, attempts_made: int, retry_after: float | None = None) -> float | None:
        """Seconds until the next attempt, or None when the schedule is used up."""
        if attempts_made >= len(self.schedule):
            return None
        base = self.schedule[attempts_made]
        delay = base * (1.0 + self._jitter * (2.0 * self._rng() - 1.0))
        if retry_after is not None:
            delay = max(delay, min(retry_after, self._max_retry_after))
        return max(0.0, delay)


class DeliveryService:
    """Claims, signs, sends and records one delivery attempt."""

    def __init__(self, *, pool: asyncpg.Pool, http: GuardedHttpClient, policy: RetryPolicy,
                 settings: NotifierSettings, owner: str, instance_id: str, metrics: NotifierMetrics) -> None:
        self._pool = pool
        self._http = http
        self._policy = policy
        self._settings = settings
        self._owner = owner
        self._instance_id = instance_id
        self._metrics = metrics

    async def deliver(self, delivery_id: str, gate: asyncio.Semaphore,
                      ready: repo.ClaimedDelivery | None = None) -> AttemptResult:
        """One attempt of one delivery (if it is ours to make now); `gate` bounds the endpoint's open requests.

        `ready`: a delivery just inserted and leased to us, with what is needed to send it (no claim needed).
        """
        claimed = ready
        if claimed is None:
            async with self._pool.acquire() as conn:
                claimed = await repo.claim(conn, delivery_id, owner=self._owner,
                                           lease_seconds=self._settings.webhook_lease_seconds)
                if claimed is None:
                    _log.debug("delivery %s is not ours to attempt now", delivery_id)
                    await repo.release(conn, [delivery_id], owner=self._owner)
                    return AttemptResult(Outcome.SKIPPED)
        with log_context(event_id=claimed.event_id):
            headers = signature_headers(claimed.secrets, claimed.event_id, int(time.time()), claimed.body)
            self._metrics.in_flight.inc()
            try:
                async with gate:
                    result = await self._http.post(claimed.url, content=claimed.body, headers=headers,
                                                   time_limit=self._settings.webhook_timeout_seconds,
                                                   max_response_bytes=self._settings.webhook_response_excerpt_bytes)
            finally:
                self._metrics.in_flight.dec()
            try:
                outcome, disabled = await self._record(claimed, result)
            except asyncpg.ForeignKeyViolationError:
                return AttemptResult(Outcome.SKIPPED, claimed.attempt)  # the endpoint was deleted meanwhile
            self._metrics.attempted(claimed.endpoint_id, outcome, result.latency_ms / 1000.0)
            _log.debug("attempt %s of %s: %s", claimed.attempt, claimed.id, outcome.value)
            if outcome is Outcome.SUCCEEDED:
                self._metrics.delivery_seconds.observe(max(0.0, time.time() - claimed.event_created_at.timestamp()))
            elif outcome is not Outcome.SKIPPED:
                _log.info("webhook attempt %s to %s failed (%s): %s", claimed.attempt, claimed.endpoint_id,
                          result.status_code, result.error or "non-2xx")
            return AttemptResult(outcome, claimed.attempt, disabled)

    async def _record(self, claimed: repo.ClaimedDelivery, result: HttpResult) -> tuple[Outcome, bool]:
        """Log the attempt and move the delivery on (one statement; a 410 also disables the endpoint); True with
        the outcome when the endpoint was disabled."""
        gone = result.status_code == 410
        retry_in = None if result.success or gone else self._policy.next_delay(claimed.attempt, result.retry_after)
        if result.success:
            outcome, error = Outcome.SUCCEEDED, None
        else:
            outcome = Outcome.RETRY if retry_in is not None else Outcome.FAILED
            error = "410 Gone: endpoint disabled" if gone else result.error or f"HTTP {result.status_code}"
        async with self._pool.acquire() as conn:
            expired = await repo.record_attempt(
                conn, claimed, attempt_id=new_id("whatt"), owner=self._owner, instance_id=self._instance_id,
                status_code=result.status_code, latency_ms=result.latency_ms, error=error,
                response_body=result.response_excerpt, outcome=outcome.value, retry_in=retry_in,
                disable_after_seconds=self._settings.webhook_disable_after_seconds, transport_error=result.error)
            if gone:
                await repo.disable_endpoint(conn, claimed.endpoint_id, "The endpoint answered 410 Gone.")
                self._metrics.endpoints_disabled.labels(reason="gone").inc()
            elif expired:
                days = self._settings.webhook_disable_after_seconds / 86400.0
                await repo.disable_endpoint(conn, claimed.endpoint_id, f"Every delivery failed for {days:g} days.")
                self._metrics.endpoints_disabled.labels(reason="failing").inc()
        return outcome, gone or expired

    async def release(self, delivery_ids: Sequence[str]) -> None:
        """Give leases back (shutdown, or successors of a delivery that must be retried first)."""
        async with self._pool.acquire() as conn:
            await repo.release(conn, delivery_ids, owner=self._owner)

    async def lease_successors(self, endpoint_id: str, ordering_key: str) -> list[repo.QueuedDelivery]:
        """Deliveries of the same lane that were waiting (in Postgres) for the one just finished."""
        async with self._pool.acquire() as conn:
            return await repo.lease_key(conn, endpoint_id=endpoint_id, ordering_key=ordering_key, owner=self._owner,
                                        lease_seconds=self._settings.webhook_lease_seconds, limit=100)


Deliver = Callable[[str, asyncio.Semaphore, repo.ClaimedDelivery | None], Awaitable[AttemptResult]]
Release = Callable[[Sequence[str]], Awaitable[None]]
Successors = Callable[[str, str], Awaitable[list[repo.QueuedDelivery]]]
Lane = tuple[str, str]


class Dispatcher:
    """In-memory lanes: one serial queue per (endpoint, ordering key), a concurrency limit per endpoint."""

    def __init__(self, *, deliver: Deliver, release: Release, successors: Successors, concurrency: int,
                 backlog: int, metrics: NotifierMetrics | None = None, ready_seconds: float = 1.0) -> None:
        self._deliver = deliver
        self._ready_seconds = ready_seconds
        self._ready: dict[str, tuple[repo.ClaimedDelivery, float]] = {}
        self._release = release
        self._successors = successors
        self._concurrency = concurrency
        self._backlog = backlog
        self._metrics = metrics
        self._queues: dict[Lane, collections.deque[str]] = {}
        self._runners: dict[Lane, asyncio.Task[None]] = {}
        self._semaphores: dict[str, asyncio.Semaphore] = {}
        self._held: collections.Counter[str] = collections.Counter()
        self._known: set[str] = set()
        self._gauged: set[str] = set()
        self._disabled: set[str] = set()
        """Endpoints an attempt here disabled: their deliveries are claimed (which checks the endpoint is enabled)
        instead of sent as they came, so nothing more goes out unless they were enabled again meanwhile."""
        self._closing = False

    @property
    def accepting(self) -> bool:
        """False once stopping: new deliveries are left unleased for the scheduler (here or elsewhere)."""
        return not self._closing

    def saturated(self) -> list[str]:
        """Endpoints holding as much as they may; the scheduler and the hot path leave them to others."""
        return [endpoint for endpoint, count in self._held.items() if count >= self._backlog]

    @property
    def disabled(self) -> frozenset[str]:
        """Endpoints an attempt here disabled (their deliveries are claimed before they are sent)."""
        return frozenset(self._disabled)

    def forget_disabled(self, endpoint_ids: Iterable[str]) -> None:
        """These endpoints were enabled again or deleted: their deliveries may go as they come again."""
        self._disabled.difference_update(endpoint_ids)

    def is_saturated(self, endpoint_id: str) -> bool:
        """True when this endpoint already holds its backlog here."""
        return self._held.get(endpoint_id, 0) >= self._backlog

    def submit(self, endpoint_id: str, ordering_key: str, delivery_id: str,
               ready: repo.ClaimedDelivery | None = None) -> bool:
        """Queue a delivery leased to us; False if it is already queued or we are shutting down.

        `ready` (fresh inserts): sent without a claim if its turn comes within `ready_seconds`, else claimed
        (the endpoint's URL or secret may have changed while it waited behind others).
        """
        if self._closing or delivery_id in self._known:
            return False
        self._known.add(delivery_id)
        if ready is not None:
            self._ready[delivery_id] = (ready, time.monotonic())
        self._held[endpoint_id] += 1
        self._set_gauge()
        lane = (endpoint_id, ordering_key)
        self._queues.setdefault(lane, collections.deque()).append(delivery_id)
        if lane not in self._runners:
            self._runners[lane] = asyncio.create_task(self._run(lane), name=f"webhook-lane-{endpoint_id}")
        return True

    def _forget(self, endpoint_id: str, delivery_id: str) -> None:
        self._known.discard(delivery_id)
        self._ready.pop(delivery_id, None)
        self._held[endpoint_id] -= 1
        if self._held[endpoint_id] <= 0:
            del self._held[endpoint_id]
        self._set_gauge()

    def _set_gauge(self) -> None:
        if self._metrics:
            self._metrics.held.set(len(self._known))
            for endpoint in self._gauged - set(self._held):
                self._metrics.queue_depth.remove(endpoint)
            for endpoint, count in self._held.items():
                self._metrics.queue_depth.labels(endpoint=endpoint).set(count)
            self._gauged = set(self._held)

    async def _run(self, lane: Lane) -> None:
        endpoint_id, ordering_key = lane
        queue = self._queues[lane]
        semaphore = self._semaphores.setdefault(endpoint_id, asyncio.Semaphore(self._concurrency))
        outage = 0.0
        try:
            while queue and not self._closing:
                delivery_id = queue[0]
                ready, since = self._ready.pop(delivery_id, (None, 0.0))
                if ready is not None and (time.monotonic() - since > self._ready_seconds
                                          or endpoint_id in self._disabled):
                    ready = None
                try:
                    result = await self._deliver(delivery_id, semaphore, ready)
                except Exception as exc:
                    if not database_lost(exc):
                        _log.exception("webhook delivery %s failed unexpectedly; its lease will expire", delivery_id)
                        result = AttemptResult(Outcome.RETRY)
                    else:
                        # Still leased to us: it stays first in its lane and goes again once the database is back,
                        # so the thread's later events wait behind it (forgotten here, they overtook it).
                        outage = min(outage * 2, _OUTAGE_RETRY_MAX_SECONDS) if outage else _OUTAGE_RETRY_SECONDS
                        _log.warning("webhook delivery %s: database unavailable (%r); again in %.1f s", delivery_id,
                                     exc, outage)
                        await asyncio.sleep(outage)
                        continue
                outage = 0.0
                queue.popleft()
                self._forget(endpoint_id, delivery_id)
                if result.disabled:
                    self._disabled.add(endpoint_id)
                if result.outcome in (Outcome.RETRY, Outcome.SKIPPED) or result.disabled:
                    # Order within the lane: whatever follows waits for this one (the scheduler resumes it).
                    waiting = list(queue)
                    queue.clear()
                    for other in waiting:
                        self._forget(endpoint_id, other)
                    with contextlib.suppress(Exception):
                        await self._release(waiting)
                    continue
                if not queue and (result.attempt > 1 or result.outcome is Outcome.FAILED):
                    # A retried delivery finished: successors may be parked in Postgres behind it.
                    try:
                        for item in await self._successors(endpoint_id, ordering_key):
                            if item.id not in self._known and not self._closing:
                                self._known.add(item.id)
                                self._held[endpoint_id] += 1
                                queue.append(item.id)
                    except Exception:
                        _log.exception("could not look up deliveries waiting behind %s", delivery_id)
        finally:
            self._runners.pop(lane, None)
            if queue and not self._closing:
                self._runners[lane] = asyncio.create_task(self._run(lane), name=f"webhook-lane-{endpoint_id}")
            elif not queue:
                self._queues.pop(lane, None)
                if not any(key[0] == endpoint_id for key in self._runners):
                    self._semaphores.pop(endpoint_id, None)

    async def stop(self, grace: float = 2.0) -> None:
        """Stop taking work, let attempts in flight finish for `grace` seconds, give every lease back."""
        self._closing = True
        runners = list(self._runners.values())
        if runners:
            _, pending = await asyncio.wait(runners, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        held = list(self._known)
        self._known.clear()
        self._held.clear()
        self._queues.clear()
        if held:
            with contextlib.suppress(Exception):
                await self._release(held)


class RetryScheduler:
    """Leases due retries (timer plus `wake()` on WebhookDeliveriesDue) and gives them to the dispatcher."""

    def __init__(self, *, pool: asyncpg.Pool, dispatcher: Dispatcher, owner: str, settings: NotifierSettings,
                 metrics: NotifierMetrics | None = None) -> None:
        self._pool = pool
        self._metrics = metrics
        self._dispatcher = dispatcher
        self._owner = owner
        self._settings = settings
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the loop (its timer is the fallback when no wake-up comes)."""
        self._task = asyncio.create_task(self._loop(), name="webhook-retry-scheduler")

    async def stop(self) -> None:
        """Stop the loop."""
        self._stopping = True
        self._wake.set()
        if self._task:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def wake(self) -> None:
        """Lease due deliveries now instead of at the next timer tick (resend, recover, re-enable made some due)."""
        self._wake.set()

    async def tick(self) -> tuple[int, float | None]:
        """Lease and dispatch one batch of due deliveries; return how many and when the next is due."""
        async with self._pool.acquire() as conn:
            due = await repo.lease_due(conn, owner=self._owner, lease_seconds=self._settings.webhook_lease_seconds,
                                       limit=self._settings.webhook_scheduler_batch,
                                       skip_endpoints=self._dispatcher.saturated())
            next_in = await repo.next_due_in(conn)
        for item in due:
            self._dispatcher.submit(item.endpoint_id, item.ordering_key, item.id)
        if due:
            _log.debug("leased %d due deliveries", len(due))
        return len(due), next_in

    async def purge(self) -> int:
        """Forget finished deliveries (and their attempts) older than the retention period, the metrics of
        endpoints deleted since the last pass, and which endpoints were disabled here if no longer so."""
        labelled = self._metrics.endpoints if self._metrics is not None else frozenset()
        disabled = self._dispatcher.disabled
        async with self._pool.acquire() as conn:
            purged = await repo.purge_finished(conn, older_than_seconds=self._settings.webhook_retention_days * 86400)
            live = await repo.existing_endpoints(conn, sorted(labelled)) if labelled else set()
            still = await repo.still_disabled(conn, sorted(disabled)) if disabled else set()
        if self._metrics is not None:
            self._metrics.forget_endpoints(labelled - live)
        self._dispatcher.forget_disabled(disabled - still)
        return purged

    async def _loop(self) -> None:
        interval = self._settings.webhook_scheduler_interval_seconds
        next_purge = time.monotonic() + 60.0
        while not self._stopping:
            self._wake.clear()
            wait = interval
            try:
                if time.monotonic() >= next_purge:
                    next_purge = time.monotonic() + 600.0
                    await self.purge()
                count, next_in = await self.tick()
                if count >= self._settings.webhook_scheduler_batch:
                    wait = 0.0
                elif next_in is not None:
                    wait = min(interval, max(0.02, next_in + 0.005))
            except Exception:
                _log.exception("webhook scheduler tick failed")
            if wait > 0 and not self._stopping:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
