"""Prometheus metrics every service exposes; each service owns its registry (no globals).

`ServiceMetrics` holds what every service has (Kafka traffic, consumer lag, the outbox, process
stats) and creates a shared feature's metrics the first time a service asks for them, so a service
only exposes what it does: `metrics.http` (gateway), `metrics.ingestion` (ingestion), `metrics.tools`
(tool executor, run orchestrator), `metrics.search_requests` (gateway: search asked over Kafka) and
`metrics.search_served` (ingestion: search answered), `metrics.model_requests` and `metrics.models_served` (the same
for model lists: gateway, run orchestrator). Service-only metrics live in the service
(run_orchestrator/metrics.py, notifier/service.py). Names and labels are the contract of
deploy/observability (dashboard, alerts).
"""

import asyncio
from functools import cached_property
from importlib import metadata
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.process_collector import ProcessCollector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Seconds; for HTTP requests."""

LONG_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
"""Seconds; for work that takes a while (tool calls, file ingestion)."""

def _asyncio_task_count() -> float:
    """Tasks of the running event loop (NaN when collected outside it): a count that keeps growing while the work
    in hand does not is a leak no other metric shows."""
    try:
        return float(len(asyncio.all_tasks()))
    except RuntimeError:
        return float("nan")


def _version() -> str:
    try:
        return metadata.version("threadline")
    except metadata.PackageNotFoundError:
        return "unknown"


class HttpMetrics:
    """HTTP requests by method, route template (never the raw path) and status."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("threadline_http_requests_total", "HTTP requests answered",
                                ["method", "route", "status"], registry=registry)
        self.duration = Histogram("threadline_http_request_duration_seconds",
                                  "Time from request to response headers (streams: until the stream opens)",
                                  ["method", "route", "status"], registry=registry, buckets=LATENCY_BUCKETS)
        self.in_flight = Gauge("threadline_http_requests_in_flight", "Requests being handled, open streams included",
                               registry=registry)


class IngestionMetrics:
    """Files parsed, chunked, embedded and indexed."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.files = Counter("threadline_ingestion_files_total", "Files ingested, by outcome (completed, failed)",
                             ["outcome"], registry=registry)
        self.chunks = Counter("threadline_ingestion_chunks_total", "Chunks embedded and indexed", registry=registry)
        self.bytes = Counter("threadline_ingestion_bytes_total", "Bytes of files ingested", registry=registry)
        self.file_seconds = Histogram("threadline_ingestion_file_seconds", "Time to ingest one file",
                                      ["outcome"], registry=registry, buckets=LONG_BUCKETS)
        self.requests_resent = Counter("threadline_ingestion_requests_resent_total", "File ingestion requests sent "
                                       "again because ingestion had not started them (lost by the broker)",
                                       registry=registry)


class ToolMetrics:
    """Tool calls by type (function, code_interpreter, file_search) and outcome (completed, failed, ...)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.calls = Counter("threadline_tool_calls_total", "Tool calls finished", ["type", "outcome"],
                             registry=registry)
        self.duration = Histogram("threadline_tool_call_seconds", "Time to run one tool call", ["type"],
                                  registry=registry, buckets=LONG_BUCKETS)


class RequestMetrics(Protocol):
    """What an asker over Kafka request/reply (`replies.ReplyClient`) counts: search and model lists, each under
    names of its own."""

    requests: Counter
    duration: Histogram
    pending: Gauge
    late_replies: Counter


class ServedMetrics(Protocol):
    """What an answerer of such requests counts."""

    requests: Counter
    duration: Histogram


class SearchRequestMetrics:
    """Search requests sent over Kafka and how they ended, as the asker (the gateway) saw them."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("threadline_search_requests_total", "Search requests sent over Kafka, by operation "
                                "(search, chunks, count) and outcome (ok, error, timeout)", ["operation", "outcome"],
                                registry=registry)
        self.duration = Histogram("threadline_search_request_seconds", "Time from sending a search request to its "
                                  "whole reply", ["operation"], registry=registry, buckets=LATENCY_BUCKETS)
        self.pending = Gauge("threadline_search_requests_pending", "Search requests waiting for their reply",
                             registry=registry)
        self.late_replies = Counter("threadline_search_late_replies_total", "Reply records for requests nobody "
                                    "waits for any more (timed out, or answered twice)", registry=registry)


class SearchServedMetrics:
    """Search requests answered by the process that holds Qdrant (ingestion)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("threadline_search_served_total", "Search requests handled, by operation and "
                                "outcome (ok, error, expired: past its deadline, skipped; unsent: reply not "
                                "produced)", ["operation", "outcome"], registry=registry)
        self.duration = Histogram("threadline_search_serve_seconds", "Time to answer one search request",
                                  ["operation"], registry=registry, buckets=LATENCY_BUCKETS)


class ModelRequestMetrics:
    """Model list requests (`GET /v1/models`) sent over Kafka and how they ended, as the gateway saw them."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("threadline_models_requests_total", "Model list requests sent over Kafka, by "
                                "operation (models) and outcome (ok, error, timeout)", ["operation", "outcome"],
                                registry=registry)
        self.duration = Histogram("threadline_models_request_seconds", "Time from sending a model list request to "
                                  "its whole reply", ["operation"], registry=registry, buckets=LATENCY_BUCKETS)
        self.pending = Gauge("threadline_models_requests_pending", "Model list requests waiting for their reply",
                             registry=registry)
        self.late_replies = Counter("threadline_models_late_replies_total", "Model list reply records for requests "
                                    "nobody waits for any more (timed out, or answered twice)", registry=registry)


class ModelsServedMetrics:
    """Model list requests answered by the run orchestrator (it talks to the model endpoint)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("threadline_models_served_total", "Model list requests handled, by operation and "
                                "outcome (ok, error, expired: past its deadline, skipped; unsent: reply not "
                                "produced)", ["operation", "outcome"], registry=registry)
        self.duration = Histogram("threadline_models_serve_seconds", "Time to answer one model list request",
                                  ["operation"], registry=registry, buckets=LATENCY_BUCKETS)


class ServiceMetrics:
    """The metrics common to all services (Kafka traffic, lag, the outbox) and the features' groups."""

    def __init__(self, registry: CollectorRegistry, service: str) -> None:
        self.registry = registry
        self.service = service
        self.events_produced = Counter("threadline_events_produced_total", "Events produced to Kafka",
                                       ["topic"], registry=registry)
        self.events_consumed = Counter("threadline_events_consumed_total", "Events consumed from Kafka",
                                       ["topic"], registry=registry)
        self.consumer_lag = Gauge("threadline_consumer_lag", "Messages behind the end of the partition "
                                  "(high watermark minus position)", ["group", "topic", "partition"],
                                  registry=registry)
        self.consumer_retries = Counter("threadline_consumer_retries_total", "Handler failures that will be retried",
                                        ["topic"], registry=registry)
        self.dead_letters = Counter("threadline_dead_letters_total", "Records parked in dead_letters after "
                                    "their handler kept failing on their data", ["topic"], registry=registry)
        self.outbox_publish_seconds = Histogram(
            "threadline_outbox_publish_seconds", "Time from commit to Kafka acknowledgement",
            registry=registry, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5))
        self.pruned_rows = Counter("threadline_event_log_pruned_rows_total", "Events and idempotency claims "
                                   "forgotten past THREADLINE_EVENT_RETENTION_DAYS", ["table"], registry=registry)
        self.build_info = Gauge("threadline_build_info", "Always 1: the service and version of this process",
                                ["service", "version"], registry=registry)
        self.build_info.labels(service=service, version=_version()).set(1)
        self.asyncio_tasks = Gauge("threadline_asyncio_tasks", "Asyncio tasks alive in this process's event loop "
                                   "(services sharing a process count the same tasks)", registry=registry)
        self.asyncio_tasks.set_function(_asyncio_task_count)
        ProcessCollector(registry=registry)

    @cached_property
    def http(self) -> HttpMetrics:
        """HTTP request metrics (registered on first use)."""
        return HttpMetrics(self.registry)

    @cached_property
    def ingestion(self) -> IngestionMetrics:
        """Ingestion metrics (registered on first use)."""
        return IngestionMetrics(self.registry)

    @cached_property
    def tools(self) -> ToolMetrics:
        """Tool call metrics (registered on first use)."""
        return ToolMetrics(self.registry)

    @cached_property
    def search_requests(self) -> SearchRequestMetrics:
        """Search requests this process sent (registered on first use)."""
        return SearchRequestMetrics(self.registry)

    @cached_property
    def search_served(self) -> SearchServedMetrics:
        """Search requests this process answered (registered on first use)."""
        return SearchServedMetrics(self.registry)

    @cached_property
    def model_requests(self) -> ModelRequestMetrics:
        """Model list requests this process sent (registered on first use)."""
        return ModelRequestMetrics(self.registry)

    @cached_property
    def models_served(self) -> ModelsServedMetrics:
        """Model list requests this process answered (registered on first use)."""
        return ModelsServedMetrics(self.registry)
