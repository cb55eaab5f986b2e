"""Observability: metrics exposed and moving with real work, health/readiness, JSON logs without secrets.

Unit tests (marked `unit`) check the shared pieces on their own; the others drive the real stack.
"""

import ast
import asyncio
import contextlib
import io
import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import promql_parser
import pytest
import yaml
from aiokafka import AIOKafkaProducer
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from webhook_receiver import SlowReceiver

from threadline_core.events import EventEnvelope
from threadline_core.kafka import EventConsumer, ensure_topics
from threadline_core.logging import JsonFormatter, log_context, register_secrets, secret_values
from threadline_core.metrics import ServiceMetrics
from threadline_core.ops import UNMATCHED_ROUTE, HttpMetricsMiddleware
from threadline_devstack.broker import TansuBroker
from threadline_devstack.postgres import ExternalPostgres
from threadline_devstack.stack import ServiceProcess, Stack, free_port

ROOT = Path(__file__).resolve().parents[1]
OBSERVABILITY = ROOT / "deploy" / "observability"
TARGET_LABELS = {"job", "instance", "namespace", "pod", "le"}
"""Labels Prometheus adds when scraping (and `le` of histogram buckets)."""

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------


def scrape(url: str) -> Samples:
    """GET <url>/metrics and return {(sample name, sorted labels): value}."""
    response = httpx.get(f"{url}/metrics", timeout=5, trust_env=False)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels`."""
    return sum(value for (sample, sample_labels), value in samples.items()
               if sample == name and set(labels.items()) <= set(sample_labels))


def wait_for(check: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Poll until `check()` is true; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


async def eventually(check: Callable[[], bool], what: str, seconds: float = 20.0) -> None:
    """Async poll until `check()` is true; fail with `what` after `seconds`."""
    for _ in range(int(seconds / 0.05)):
        if check():
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def code_metrics() -> dict[str, set[str]]:
    """Every metric sample name the code defines (libs/ and services/) -> its label names."""
    suffixes = {"Counter": ("_total", "_created"), "Histogram": ("_bucket", "_sum", "_count", "_created"),
                "Gauge": ("",), "Summary": ("", "_sum", "_count", "_created")}
    found: dict[str, set[str]] = {}
    for path in [*(ROOT / "libs").rglob("*.py"), *(ROOT / "services").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in suffixes):
                continue
            if not node.args or not isinstance(node.args[0], ast.Constant) or not isinstance(node.args[0].value, str):
                continue
            name = node.args[0].value
            label_node = node.args[2] if len(node.args) > 2 else next(
                (k.value for k in node.keywords if k.arg == "labelnames"), None)
            labels = {e.value for e in getattr(label_node, "elts", []) if isinstance(e, ast.Constant)}
            base = name.removesuffix("_total") if node.func.id == "Counter" else name
            for suffix in suffixes[node.func.id]:
                found[base + suffix] = labels
    registry = CollectorRegistry()
    ServiceMetrics(registry, "check")  # process collector metrics
    for family in registry.collect():
        if family.name.startswith("process_"):
            names = [family.name + "_total"] if family.type == "counter" else [family.name]
            for name in names:
                found[name] = set()
    found["up"] = set()
    return found


_METRIC = re.compile(r"\b((?:threadline|process)_[a-z0-9_]+|up)\b(\{[^}]*\})?")
_BY = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")


_GRAFANA_RANGES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
"""Grafana's range variables, replaced by a duration before the expression is parsed."""


def check_expression(expr: str, defined: dict[str, set[str]]) -> None:
    """The PromQL expression parses, and every metric in it exists in the code with the labels it uses."""
    parsable = expr
    for variable, duration in _GRAFANA_RANGES.items():
        parsable = parsable.replace(variable, duration)
    try:
        promql_parser.parse(parsable)
    except ValueError as error:
        raise AssertionError(f"{expr!r} is not PromQL: {error}") from None
    used = _METRIC.findall(expr)
    assert used, f"no Threadline metric in {expr!r}"
    labels_in_expr: set[str] = set(TARGET_LABELS)
    for name, matchers in used:
        assert name in defined, f"{name} (in {expr!r}) is not defined in the code"
        labels_in_expr |= defined[name]
        for label in _MATCHER.findall(matchers or ""):
            assert label in defined[name] | TARGET_LABELS, f"{name} has no label {label!r} (in {expr!r})"
    for group in _BY.findall(expr):
        for label in filter(None, (g.strip() for g in group.split(","))):
            assert label in labels_in_expr, f"label {label!r} of `by` is on none of the metrics in {expr!r}"


# ---------------------------------------------------------------------------------------------------
# unit: dashboard, alert rules, middleware, logs, lag
# ---------------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_alert_rules_reference_only_defined_metrics() -> None:
    """alerts.yaml is a valid rule file and every metric and label it uses exists in the code."""
    rules = yaml.safe_load((OBSERVABILITY / "alerts.yaml").read_text())
    defined = code_metrics()
    names = []
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert {"alert", "expr", "labels", "annotations"} <= set(rule), rule
            assert rule["labels"]["severity"] in ("critical", "warning", "info")
            check_expression(rule["expr"], defined)
            names.append(rule["alert"])
    assert len(names) == len(set(names))
    config = yaml.safe_load((OBSERVABILITY / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yaml"]
    assert all(job["job_name"].startswith("threadline") for job in config["scrape_configs"])


@pytest.mark.unit
def test_dashboard_references_only_defined_metrics() -> None:
    """The Grafana dashboard is valid JSON and every panel query uses metrics the code defines."""
    dashboard = json.loads((OBSERVABILITY / "grafana-dashboard.json").read_text())
    defined = code_metrics()
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert panels and len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    referenced: set[str] = set()
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            check_expression(target["expr"], defined)
            referenced |= {name for name, _ in _METRIC.findall(target["expr"])}
    for required in ("threadline_http_request_duration_seconds_bucket", "threadline_runs_finished_total",
                     "threadline_run_duration_seconds_bucket", "threadline_events_produced_total",
                     "threadline_events_consumed_total", "threadline_consumer_lag",
                     "threadline_webhook_attempts_total", "threadline_webhook_queue_depth",
                     "threadline_webhook_attempt_seconds_bucket",
                     "threadline_ingestion_files_total", "threadline_ingestion_chunks_total",
                     "threadline_tool_calls_total"):
        assert required in referenced, f"the dashboard has no panel for {required}"


@pytest.mark.unit
def test_operators_guide_lists_every_metric() -> None:
    """deploy/README.md's metrics table names every Threadline metric the code defines (it had missed five)."""
    documented = set(re.findall(r"threadline_[a-z0-9_]+", (ROOT / "deploy" / "README.md").read_text()))
    defined = {name.removesuffix("_bucket") for name in code_metrics()
               if name.startswith("threadline_") and not name.endswith(("_created", "_sum", "_count"))}
    assert defined - documented == set()


@pytest.mark.unit
def test_expression_check_catches_unknown_metrics_and_labels() -> None:
    """The checker above can fail."""
    defined = {"threadline_x_total": {"topic"}}
    check_expression('sum by (topic) (rate(threadline_x_total{topic="a"}[5m]))', defined)
    with pytest.raises(AssertionError):
        check_expression("rate(threadline_y_total[5m])", defined)
    with pytest.raises(AssertionError):
        check_expression('rate(threadline_x_total{status="a"}[5m])', defined)
    with pytest.raises(AssertionError):
        check_expression("sum by (status) (rate(threadline_x_total[5m]))", defined)
    with pytest.raises(AssertionError):
        check_expression("sum by (topic) rate(threadline_x_total[5m])", defined)
    with pytest.raises(AssertionError):
        check_expression("rate(threadline_x_total[5m]) >", defined)


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """Capture root logging as the services write it (JSON lines)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("test"))
    root = logging.getLogger()
    old_handlers, old_level = root.handlers[:], root.level
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.handlers[:] = old_handlers
        root.setLevel(old_level)


@pytest.mark.unit
async def test_asyncio_task_gauge_counts_the_loops_tasks() -> None:
    """threadline_asyncio_tasks follows the tasks alive in the loop that serves /metrics (leaks show as growth)."""
    registry = CollectorRegistry()
    ServiceMetrics(registry, "test")
    before = registry.get_sample_value("threadline_asyncio_tasks")
    assert before is not None and before >= 1
    parked = [asyncio.create_task(asyncio.sleep(10)) for _ in range(3)]
    try:
        during = registry.get_sample_value("threadline_asyncio_tasks")
        assert during == before + 3  # nothing awaited since `before`: no other task could start or end
    finally:
        for task in parked:
            task.cancel()
        await asyncio.gather(*parked, return_exceptions=True)
    after = registry.get_sample_value("threadline_asyncio_tasks")  # other tasks of the loop may have ended meanwhile
    assert after is not None and after == len(asyncio.all_tasks()) and after <= during - 3


@pytest.mark.unit
async def test_http_middleware_labels_routes_statuses_and_log_ids(json_log: io.StringIO) -> None:
    """Route templates (not raw paths), statuses incl. 404 and 500, in-flight back to 0, path ids in logs."""
    metrics = ServiceMetrics(CollectorRegistry(), "gateway")
    app = FastAPI()

    @app.get("/v1/threads/{thread_id}/runs/{run_id}")
    async def get_run(thread_id: str, run_id: str) -> dict[str, str]:
        logging.getLogger("test.gateway").info("looking up the run")
        return {"id": run_id}

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    app.add_middleware(HttpMetricsMiddleware, metrics=metrics.http)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for run in ("run_1", "run_2"):
            assert (await client.get(f"/v1/threads/thread_a/runs/{run}")).status_code == 200
        assert (await client.get("/no/such/path")).status_code == 404
        assert (await client.get("/boom")).status_code == 500
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in metrics.registry.collect() for s in f.samples}
    route = "/v1/threads/{thread_id}/runs/{run_id}"
    assert total(samples, "threadline_http_requests_total", route=route, status="200", method="GET") == 2
    assert total(samples, "threadline_http_request_duration_seconds_count", route=route, status="200") == 2
    assert total(samples, "threadline_http_requests_total", route=UNMATCHED_ROUTE, status="404") == 1
    assert total(samples, "threadline_http_requests_total", route="/boom", status="500") == 1
    assert not any("run_1" in dict(labels).get("route", "") for _, labels in samples)
    assert total(samples, "threadline_http_requests_in_flight") == 0
    lines = [json.loads(line) for line in json_log.getvalue().splitlines()]
    lookup = [line for line in lines if line["message"] == "looking up the run"]
    assert [(line["thread_id"], line["run_id"]) for line in lookup] == [("thread_a", "run_1"), ("thread_a", "run_2")]


@pytest.mark.unit
def test_json_logs_carry_ids_and_mask_secrets(json_log: io.StringIO) -> None:
    """run_id/thread_id/event_id on every line in a context; configured and key-shaped secrets masked."""
    from gateway.settings import GatewaySettings

    settings = GatewaySettings(api_key="custom-key-1234567", api_keys='{"other-key-7654321": "proj_b"}',
                               database_url="postgresql://svc:pg-pass-42@db:5432/x")
    register_secrets(secret_values(settings))
    log = logging.getLogger("test.secrets")
    with log_context(run_id="run_x", thread_id="thread_x", event_id="evt_x"):
        log.info("auth with custom-key-1234567 and other-key-7654321 to %s", settings.database_url)
        log.info("header Authorization: Bearer sk-live-abcdef", extra={"detail": {"token": "sk-nested-secret"}})
        try:
            raise ValueError("model key sk-model-secret-99 rejected")
        except ValueError:
            log.exception("model call failed")
    log.info("outside any context")
    text = json_log.getvalue()
    for secret in ("custom-key-1234567", "other-key-7654321", "pg-pass-42", "sk-live-abcdef", "sk-nested-secret",
                   "sk-model-secret-99"):
        assert secret not in text, secret
    lines = [json.loads(line) for line in text.splitlines()]
    assert all(line["service"] == "test" and line["level"] for line in lines)
    in_context = [line for line in lines if line["message"] != "outside any context"]
    assert len(in_context) == 3
    assert all((line["run_id"], line["thread_id"], line["event_id"]) == ("run_x", "thread_x", "evt_x")
               for line in in_context)
    assert "run_id" not in lines[-1]
    assert "ValueError" in in_context[-1]["exc"]


@pytest.mark.unit
def test_json_logs_escape_control_characters(json_log: io.StringIO) -> None:
    """A name a user chose (a generated file's), in a message, an extra or an exception, adds no line and runs no
    terminal escape: each line is printable ASCII (json escapes the rest), and reads back as it was."""
    name = "a\x1b[2J\r\nforged line\x07\x9b\u2028\u202etxt.exe"
    log = logging.getLogger("test.names")
    log.info("saved %s", name, extra={"path": name})
    try:
        raise ValueError(name)
    except ValueError:
        log.exception("failed on %s", name)
    lines = json_log.getvalue().splitlines()
    assert len(lines) == 2
    assert all(line.isascii() and line.isprintable() for line in lines)
    saved, failed = (json.loads(line) for line in lines)
    assert saved["message"] == f"saved {name}" and saved["path"] == name
    assert name in failed["exc"]


@pytest.fixture(scope="module")
def private_broker() -> Iterator[TansuBroker]:
    """A tansu broker of this module's own (cheap: it starts in milliseconds)."""
    with TansuBroker() as broker:
        yield broker


@pytest.mark.unit
async def test_consumer_lag_counts_records_not_yet_handled(private_broker: TansuBroker) -> None:
    """threadline_consumer_lag = fetched high watermark minus the next offset to handle (works on tansu)."""
    topic = f"lag-test-{time.monotonic_ns()}"
    bootstrap = private_broker.bootstrap_servers
    await ensure_topics(bootstrap, [topic], 1)
    metrics = ServiceMetrics(CollectorRegistry(), "test")
    release = asyncio.Event()
    handled: list[str] = []

    async def handler(envelope: EventEnvelope) -> None:
        await release.wait()
        handled.append(envelope.event_id)

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False)
    await producer.start()
    consumer = EventConsumer(bootstrap=bootstrap, group_id=None, topics=[topic], handler=handler, metrics=metrics)
    try:
        for i in range(5):
            envelope = EventEnvelope(event_id=f"evt_{i}", type="test", project_id="p", key="k", data={})
            await producer.send_and_wait(topic, envelope.to_bytes(), key=b"k")
        await consumer.start()

        def lag() -> float:
            return metrics.consumer_lag.labels("", topic, "0")._value.get()  # type: ignore[no-any-return]

        await eventually(lambda: lag() == 5, "lag of 5 while the handler is blocked")
        release.set()
        await eventually(lambda: len(handled) == 5 and lag() == 0, "lag back to 0 once handled")
        assert metrics.events_consumed.labels(topic=topic)._value.get() == 5
    finally:
        release.set()
        await consumer.stop(grace=5)
        await producer.stop()
    assert not [s for f in metrics.registry.collect() if f.name == "threadline_consumer_lag" for s in f.samples], \
        "a stopped consumer leaves no lag series behind"


# ---------------------------------------------------------------------------------------------------
# the real stack
# ---------------------------------------------------------------------------------------------------


def _ops_urls(stack: Stack) -> dict[str, str]:
    """Service name -> base URL of its /healthz /readyz /metrics."""
    return {name: f"http://127.0.0.1:{port}" for name, port in _ports(stack).items()}


def _ports(stack: Stack) -> dict[str, int]:
    ports: dict[str, int] = {}
    for name in ("gateway", "run_orchestrator", "tool_executor", "ingestion", "notifier"):
        proc = stack.service(name)
        ports[name] = proc.ready_ports[1] if name == "ingestion" and len(proc.ready_ports) > 1 else proc.port
    return ports


def test_every_service_serves_health_readiness_and_metrics(stack: Stack) -> None:
    """/healthz alive, /readyz with broker, database and consumers (and Qdrant where used), /metrics in text format."""
    for name, url in _ops_urls(stack).items():
        assert httpx.get(f"{url}/healthz", timeout=5, trust_env=False).json() == {"status": "ok"}, name
        ready = httpx.get(f"{url}/readyz", timeout=5, trust_env=False)
        assert ready.status_code == 200, (name, ready.text)
        checks = ready.json()["checks"]
        assert checks["broker"] is True and checks["database"] is True, (name, checks)
        if name != "gateway":  # the others consume in a group they joined, and each of their partitions was fetched
            assert checks.get("consumers_joined") is True and checks.get("consumers") is True, (name, checks)
        if name in ("tool_executor", "ingestion"):
            assert checks.get("qdrant") is True, (name, checks)
        samples = scrape(url)
        assert total(samples, "threadline_build_info") == 1, name
        assert total(samples, "process_resident_memory_bytes") > 0, name


def test_http_and_run_metrics_move_with_runs(stack: Stack, client: openai.OpenAI, marker: str) -> None:
    """Creating and completing runs moves HTTP, run, event and consumer metrics."""
    urls = _ops_urls(stack)
    before = {name: scrape(url) for name, url in urls.items()}
    assistant = client.beta.assistants.create(model="gpt-4o", name=f"obs {marker}")
    with pytest.raises(openai.NotFoundError):
        client.beta.threads.retrieve(f"thread_missing{marker}")
    runs = [client.beta.threads.create_and_run_poll(
        assistant_id=assistant.id, thread={"messages": [{"role": "user", "content": f"hello {marker} {i}"}]})
        for i in range(2)]
    assert [run.status for run in runs] == ["completed", "completed"]
    after = {name: scrape(url) for name, url in urls.items()}

    def moved(service: str, name: str, by: float = 1, **labels: str) -> None:
        delta = total(after[service], name, **labels) - total(before[service], name, **labels)
        assert delta >= by, f"{service}: {name}{labels} moved by {delta}, expected >= {by}"

    moved("gateway", "threadline_http_requests_total", route="/v1/assistants", method="POST", status="200")
    moved("gateway", "threadline_http_requests_total", status="404")
    moved("gateway", "threadline_http_request_duration_seconds_count", route="/v1/threads/runs", status="200", by=2)
    moved("run_orchestrator", "threadline_events_consumed_total", topic="threadline.run.commands", by=2)
    moved("run_orchestrator", "threadline_runs_finished_total", status="completed", by=2)
    moved("run_orchestrator", "threadline_run_duration_seconds_count", status="completed", by=2)
    moved("run_orchestrator", "threadline_model_call_seconds_count", by=2)
    moved("notifier", "threadline_events_consumed_total", topic="threadline.events", by=2)
    # Whichever service's outbox relay holds the lock publishes, so production is summed over services.
    for topic, count in (("threadline.run.commands", 2), ("threadline.events", 6)):
        produced = sum(total(after[n], "threadline_events_produced_total", topic=topic)
                       - total(before[n], "threadline_events_produced_total", topic=topic) for n in urls)
        assert produced >= count, f"{topic}: {produced} events produced"
    outbox = sum(total(after[n], "threadline_outbox_publish_seconds_count")
                 - total(before[n], "threadline_outbox_publish_seconds_count") for n in urls)
    assert outbox >= 8
    lag = [labels for (name, labels), _ in after["run_orchestrator"].items() if name == "threadline_consumer_lag"]
    assert any(dict(labels)["group"] == "run-orchestrator" for labels in lag), "orchestrator reports its lag"


def test_model_server_workarounds_are_counted(stack: Stack, client: openai.OpenAI, marker: str) -> None:
    """An operator sees what the model server needed worked around, each a call asked again (to fix at the server or
    in the settings): a parameter it refused, a prompt longer than its context."""
    url = _ops_urls(stack)["run_orchestrator"]
    before = scrape(url)
    assistant = client.beta.assistants.create(model=f"workarounds-{marker}")  # learnt per model: a name of its own
    refused = client.beta.threads.create_and_run_poll(assistant_id=assistant.id, thread={"messages": [
        {"role": "user", "content": f"{marker} [[unsupported:temperature]]"}]})
    history = [{"role": "user", "content": f"{marker} message {i}: " + "lorem ipsum " * 40} for i in range(8)]
    too_long = client.beta.threads.create_and_run_poll(assistant_id=assistant.id, thread={"messages": [
        *history, {"role": "user", "content": f"{marker} [[context:300:vllm]]"}]})  # type: ignore[list-item]
    assert (refused.status, too_long.status) == ("completed", "completed"), (refused.last_error, too_long.last_error)
    after = scrape(url)
    for workaround in ("temperature", "context"):
        moved = (total(after, "threadline_model_workarounds_total", workaround=workaround)
                 - total(before, "threadline_model_workarounds_total", workaround=workaround))
        assert moved == 1, f"{workaround}: {moved}"


def test_no_secret_is_ever_logged(stack: Stack, client: openai.OpenAI) -> None:
    """After real traffic (and a rejected key), no service log contains the API key or the model key."""
    client.beta.assistants.list(limit=1)
    bad = openai.OpenAI(base_url=stack.base_url, api_key="sk-wrong-key-for-log-test", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.beta.assistants.list()
    bad.close()
    logs = list(stack.logs_dir.glob("*.log"))
    assert logs, "the services write logs"
    secrets = [stack.api_key, "sk-wrong-key-for-log-test"]
    if len(stack.model_api_key) >= 8:
        secrets.append(stack.model_api_key)
    json_lines = 0
    for path in logs:
        text = path.read_text(errors="replace")
        for secret in secrets:
            assert secret not in text, f"{secret[:6]}… found in {path.name}"
        for line in text.splitlines():
            if line.startswith("{"):
                entry = json.loads(line)
                assert {"ts", "level", "service", "message"} <= set(entry)
                json_lines += 1
    assert json_lines > 0, "services log JSON lines"


# ---------------------------------------------------------------------------------------------------
# readiness follows the broker
# ---------------------------------------------------------------------------------------------------


def _admin_url(stack: Stack) -> str:
    url = httpx.URL(stack.database_url)
    return str(url.copy_with(path="/postgres"))


@pytest.mark.slow
@pytest.mark.parametrize("service", ["notifier"])
def test_readiness_turns_false_without_the_broker_and_back(stack: Stack, service: str) -> None:
    """A service of its own (own broker, own database) reports not ready while its broker is down.

    The tansu dev broker keeps topics in memory, so after its restart the service re-creates them
    (readiness stays false until they exist again) and becomes ready.
    """
    database = ExternalPostgres(_admin_url(stack), fresh_database=True)
    database.start()
    broker = TansuBroker(log_path=stack.logs_dir / f"readiness-broker-{service}.log")
    broker.start()
    proc = None
    try:
        port = free_port()
        env = {**stack.service_env(service, port, f"{service}-readiness"),
               "DATABASE_URL": database.dsn, "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers}
        proc = ServiceProcess(name=f"{service}-readiness", command=[sys.executable, "-m", service], env=env,
                              port=port, log_path=stack.logs_dir / f"{service}-readiness.log")
        proc.start(timeout=60)
        url = f"http://127.0.0.1:{port}/readyz"

        def readiness() -> dict[str, Any]:
            try:
                response = httpx.get(url, timeout=5, trust_env=False)
            except httpx.HTTPError as exc:  # pragma: no cover - reported by the assertion below
                return {"error": str(exc)}
            return {"status": response.status_code, **response.json()}

        assert readiness()["status"] == 200
        broker.stop()
        wait_for(lambda: readiness().get("status") == 503, 30, f"{service} to report not ready")
        state = readiness()
        assert state["checks"]["broker"] is False and state["checks"]["database"] is True, state
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5, trust_env=False).status_code == 200, \
            "liveness does not depend on the broker"
        broker.start()
        wait_for(lambda: readiness().get("status") == 200, 60, f"{service} to become ready again")
        assert proc.running()
    finally:
        if proc is not None:
            proc.stop(20)
        broker.stop()
        database.stop()


@pytest.mark.slow
def test_worker_metrics_move_with_files_tools_and_webhooks(stack: Stack, client: openai.OpenAI,
                                                           marker: str) -> None:
    """Ingestion (files, chunks), tool calls (type, outcome) and webhooks (per endpoint) move with real work."""
    urls = _ops_urls(stack)
    before = {name: scrape(urls[name]) for name in ("ingestion", "tool_executor", "notifier")}
    receiver = SlowReceiver(delay=0.5)
    endpoint = client.webhooks.create(url=receiver.url, name=f"metrics {marker}",
                                      event_types=["thread.run.created", "thread.run.queued",
                                                   "thread.run.in_progress", "thread.run.completed"])
    depth_seen: list[float] = [0.0]
    sampling = threading.Event()

    def sample_queue_depth() -> None:  # deliveries are held ~0.5 s each: sampling every 50 ms sees them
        while not sampling.is_set():
            with contextlib.suppress(httpx.HTTPError):
                samples = scrape(urls["notifier"])
                depth_seen.append(total(samples, "threadline_webhook_queue_depth", endpoint=endpoint.id))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample_queue_depth, name="queue-depth-sampler", daemon=True)
    sampler.start()
    try:
        store = client.vector_stores.create(name=f"metrics {marker}")
        file_id = client.files.create(file=(f"{marker}.md", f"# Metrics {marker}\n\nChunks to count.".encode()),
                                      purpose="assistants").id
        vs_file = client.vector_stores.files.create_and_poll(file_id, vector_store_id=store.id)
        assert vs_file.status == "completed", vs_file.last_error
        assistant = client.beta.assistants.create(model="gpt-4o", tools=[{"type": "code_interpreter"}])
        code = json.dumps({"code": "print(6 * 7)"})
        run = client.beta.threads.create_and_run_poll(
            assistant_id=assistant.id,
            thread={"messages": [{"role": "user", "content": f"{marker} [[call:code_interpreter:{code}]]"}]})
        assert run.status == "completed", run.last_error
        wait_for(lambda: receiver.count >= 4, 60, "the webhooks of the run")
        after = {name: scrape(urls[name]) for name in ("ingestion", "tool_executor", "notifier")}
    finally:
        sampling.set()
        sampler.join(10)
        client.webhooks.delete(endpoint.id)
        receiver.close()
    assert max(depth_seen) >= 1, "threadline_webhook_queue_depth never showed the endpoint's held deliveries"

    def moved(service: str, name: str, by: float = 1, **labels: str) -> None:
        delta = total(after[service], name, **labels) - total(before[service], name, **labels)
        assert delta >= by, f"{service}: {name}{labels} moved by {delta}, expected >= {by}"

    moved("ingestion", "threadline_ingestion_files_total", outcome="completed")
    moved("ingestion", "threadline_ingestion_chunks_total")
    moved("ingestion", "threadline_ingestion_file_seconds_count", outcome="completed")
    moved("ingestion", "threadline_events_consumed_total", topic="threadline.ingestion.requests")
    moved("tool_executor", "threadline_tool_calls_total", type="code_interpreter", outcome="completed")
    moved("tool_executor", "threadline_tool_call_seconds_count", type="code_interpreter")
    moved("tool_executor", "threadline_events_consumed_total", topic="threadline.tool.requests")
    moved("notifier", "threadline_webhook_attempts_total", by=4, endpoint=endpoint.id, outcome="succeeded")
    moved("notifier", "threadline_webhook_attempt_seconds_count", by=4, endpoint=endpoint.id)
