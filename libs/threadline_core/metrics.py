"""Prometheus metrics every service exposes; each service owns its registry (no globals)."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class ServiceMetrics:
    """The metrics common to all services: Kafka traffic and the outbox."""

    def __init__(self, registry: CollectorRegistry, service: str) -> None:
        self.registry = registry
        self.service = service
        self.events_produced = Counter("threadline_events_produced_total", "Events produced to Kafka",
                                       ["topic"], registry=registry)
        self.events_consumed = Counter("threadline_events_consumed_total", "Events consumed from Kafka",
                                       ["topic"], registry=registry)
        self.consumer_lag = Gauge("threadline_consumer_lag", "Messages behind the end of the partition",
                                  ["topic", "partition"], registry=registry)
        self.outbox_publish_seconds = Histogram(
            "threadline_outbox_publish_seconds", "Time from commit to Kafka acknowledgement",
            registry=registry, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5))
