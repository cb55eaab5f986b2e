"""Wiring of the run-orchestrator service: runtime, model client (and the guarded client that fetches linked images),
service, consumers (run commands, model lists), ops server."""

import asyncio
import contextlib
from collections.abc import Callable

from run_orchestrator.catalog import ModelCatalog
from run_orchestrator.handlers import Handlers, ModelRequestHandlers
from run_orchestrator.images import LinkedImages
from run_orchestrator.metrics import OrchestratorMetrics
from run_orchestrator.model import ModelClient
from run_orchestrator.service import RunService
from run_orchestrator.settings import RunOrchestratorSettings
from threadline_core.kafka import EventConsumer
from threadline_core.runtime import ServiceRuntime
from threadline_core.ssrf import GuardedHttpClient, SsrfPolicy
from threadline_core.topics import MODEL_REQUESTS, RUN_COMMANDS

CONSUMER_GROUP = "run-orchestrator"
MODELS_CONSUMER_GROUP = "models"
"""Its own group: a model list never waits behind run claims; every instance shares the requests."""
MODEL_REQUEST_CONCURRENCY = 8
"""Model list requests answered at once (from the cache; one list call to the server at a time)."""


async def run(settings: RunOrchestratorSettings) -> None:
    """Run until SIGTERM/SIGINT, then stop taking work, finish or hand back runs in hand, and exit."""
    async with ServiceRuntime(settings, "run-orchestrator") as runtime:
        metrics = OrchestratorMetrics(runtime.registry)
        image_http = GuardedHttpClient(SsrfPolicy.from_setting(settings.image_fetch_allowed_networks,
                                                               setting="THREADLINE_IMAGE_FETCH_ALLOWED_NETWORKS"),
                                       user_agent="Threadline-Images/1.0")
        images = LinkedImages(image_http, max_bytes=settings.image_fetch_max_bytes,
                              timeout=settings.image_fetch_timeout_seconds)
        model = ModelClient(base_url=settings.model_base_url, api_key=settings.model_api_key,
                            timeout=settings.model_timeout_seconds, max_retries=settings.model_max_retries,
                            retry_backoff=settings.model_retry_backoff_seconds,
                            aliases=settings.model_alias_map(), fetch_image=images.data_url,
                            on_workaround=metrics.count_workaround)
        service = RunService(pool=runtime.pool, producer=runtime.producer, settings=settings,
                             instance_id=runtime.instance_id, model=model, metrics=metrics,
                             service_metrics=runtime.metrics)
        await service.start()
        consumer: EventConsumer | None = None
        catalog = ModelCatalog(model.list_models, ttl_seconds=settings.model_list_cache_seconds,
                               timeout_seconds=settings.model_list_timeout_seconds, aliases=settings.model_alias_map())
        endpoint_report = asyncio.create_task(catalog.report(settings.model_base_url), name="model-endpoint-report")
        try:
            consumer = await runtime.add_consumer(group_id=CONSUMER_GROUP, topics=[RUN_COMMANDS],
                                                  handler=Handlers(service).handle,
                                                  key_concurrency=settings.command_concurrency,
                                                  commit_interval=settings.command_commit_interval_seconds)
            metrics.assigned_partitions.set_function(_assignment_size(consumer))
            models = ModelRequestHandlers(catalog, runtime.producer, runtime.metrics.models_served)
            await runtime.add_consumer(group_id=MODELS_CONSUMER_GROUP, topics=[MODEL_REQUESTS], handler=models.handle,
                                       independent_keys=True, key_concurrency=MODEL_REQUEST_CONCURRENCY)
            await runtime.serve_ops()
            await runtime.wait_for_stop()
        finally:
            # No new claims first, then finish (or hand back) the runs in hand, then the runtime closes.
            endpoint_report.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await endpoint_report
            if consumer is not None:
                await consumer.stop()
            await service.stop()
            await image_http.aclose()


def _assignment_size(consumer: EventConsumer) -> Callable[[], float]:
    """Partitions the consumer owns right now (for the metrics gauge)."""
    return lambda: float(len(consumer.consumer.assignment()))
