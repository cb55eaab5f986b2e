"""Prometheus metrics of the run orchestrator (registered on the service's own registry)."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class OrchestratorMetrics:
    """Runs claimed and finished, model time, runs in hand."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.runs_claimed = Counter("threadline_runs_claimed_total", "Model turns this instance claimed",
                                    registry=registry)
        self.runs_finished = Counter("threadline_runs_finished_total", "Runs that reached a state here",
                                     ["status"], registry=registry)
        self.run_duration = Histogram("threadline_run_duration_seconds",
                                      "From run creation to the state it reached here", ["status"],
                                      registry=registry,
                                      buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800))
        self.model_seconds = Histogram("threadline_model_call_seconds", "Duration of model calls",
                                       registry=registry,
                                       buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.model_workarounds = Counter(
            "threadline_model_workarounds_total",
            "Model server shortcomings worked around: a call asked again in a form the server takes (the refused"
            " parameter, image_url, context, answer_limit, tool_call_reminder) or a limit it ignored",
            ["workaround"], registry=registry)
        self.sweep_failures = Counter("threadline_sweep_failures_total",
                                      "Runs the sweeper could not expire or cancel (tried again next pass)",
                                      registry=registry)
        self.runs_in_flight = Gauge("threadline_runs_in_flight", "Runs this instance is driving now",
                                    registry=registry)
        self.assigned_partitions = Gauge("threadline_orchestrator_assigned_partitions",
                                         "Partitions of the run-commands topic assigned to this instance",
                                         registry=registry)

    def count_workaround(self, workaround: str) -> None:
        """One more model call the server needed worked around (what operators may fix at the server instead)."""
        self.model_workarounds.labels(workaround=workaround).inc()
