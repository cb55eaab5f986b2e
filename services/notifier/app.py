"""Wiring of the notifier service: runtime, delivery dispatcher, retry scheduler, consumer, ops server."""

import uuid

from notifier.catchup import WebhookCatchup
from notifier.handlers import Handlers
from notifier.service import DeliveryService, Dispatcher, NotifierMetrics, RetryPolicy, RetryScheduler
from notifier.settings import NotifierSettings
from notifier.subscriptions import Subscriptions
from threadline_core.runtime import ServiceRuntime
from threadline_core.ssrf import GuardedHttpClient, SsrfPolicy
from threadline_core.topics import EVENTS, WEBHOOK_COMMANDS

CONSUMER_GROUP = "notifier"


async def run(settings: NotifierSettings) -> None:
    """Run until SIGTERM/SIGINT; on the way out hand every leased delivery back, then commit offsets."""
    async with ServiceRuntime(settings, "notifier") as runtime:
        owner = f"{runtime.instance_id}:{uuid.uuid4().hex[:8]}"  # a crashed predecessor's leases must expire
        metrics = NotifierMetrics(runtime.registry)
        policy = RetryPolicy(settings.retry_schedule(), jitter=settings.webhook_retry_jitter,
                             max_retry_after=settings.webhook_max_retry_after_seconds)
        http = GuardedHttpClient(SsrfPolicy.from_setting(settings.webhook_allowed_networks))
        service = DeliveryService(pool=runtime.pool, http=http, policy=policy, settings=settings, owner=owner,
                                  instance_id=runtime.instance_id, metrics=metrics)
        dispatcher = Dispatcher(deliver=service.deliver, release=service.release, successors=service.lease_successors,
                                concurrency=settings.webhook_endpoint_concurrency,
                                backlog=settings.webhook_endpoint_backlog, metrics=metrics)
        scheduler = RetryScheduler(pool=runtime.pool, dispatcher=dispatcher, owner=owner, settings=settings,
                                   metrics=metrics)
        subscriptions = Subscriptions(pool=runtime.pool, dsn=settings.database_url)
        handlers = Handlers(pool=runtime.pool, subscriptions=subscriptions, dispatcher=dispatcher, policy=policy,
                            owner=owner, lease_seconds=settings.webhook_lease_seconds, wake=scheduler.wake)
        catchup = WebhookCatchup(pool=runtime.pool, fan_out=handlers.fan_out, wake=scheduler.wake,
                                 grace_seconds=settings.webhook_catchup_grace_seconds,
                                 interval_seconds=settings.webhook_catchup_interval_seconds,
                                 batch=settings.webhook_catchup_batch, created=metrics.catchup_deliveries)
        # Shutdown hooks run last-added first: catch-up, scheduler, then dispatcher (leases back), then HTTP pools and
        # the subscription cache (events still handled meanwhile take the database path).
        runtime.on_shutdown(subscriptions.stop)
        runtime.on_shutdown(http.aclose)
        runtime.on_shutdown(dispatcher.stop)
        runtime.on_shutdown(scheduler.stop)
        runtime.on_shutdown(catchup.stop)
        await subscriptions.start()
        await scheduler.start()
        await catchup.start()
        # Handling is at most one INSERT per event (attempts run in the dispatcher), so the default batch loop fits.
        # Offsets are committed at most every webhook_commit_interval_seconds (redelivered events insert nothing
        # twice); the fetch bound stays the short one, a webhook's latency (push p99 < 20 ms) includes it.
        # WEBHOOK_COMMANDS (the gateway's wake-ups) rides on the same consumer: one group member, one fetch loop.
        await runtime.add_consumer(group_id=CONSUMER_GROUP, topics=[EVENTS, WEBHOOK_COMMANDS], handler=handlers.handle,
                                   commit_interval=settings.webhook_commit_interval_seconds, accept=handlers.wants)
        await runtime.serve_ops()
        await runtime.wait_for_stop()
