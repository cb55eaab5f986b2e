"""Runs benchmark: runs completed per second and the platform's own time per run, at 1, 10 and 100 concurrent runs.

For each concurrency level, N workers each take a fresh thread (created beforehand, one user
message ``[[reply:ok]] bench:<token>``: the scripted model answers ``ok`` at once), call
``client.beta.threads.runs.create`` with the async ``openai`` client (keep-alive), and wait until the
run is observed terminal. Completion is observed by a Kafka consumer in this process on
``threadline.events`` (all partitions, no group, the services' default ``fetch_max_wait_ms``): the run's
``thread.run.completed`` event, so the time includes commit -> outbox relay -> Kafka -> consumer.

Model time is what the model server itself measures for each run's chat-completions request (request
received -> last byte handed to the socket), matched by the ``bench:<token>`` marker; platform time =
end to end - model time. The baseline replays the platform's own chat-completions request (captured
by the model server) directly against the model server with the same client, at the same concurrency.

Usage: ``python bench/bench_runs.py [--quick] [--runs 1=300,10=600,100=2000] [--profile]``.
"""

import argparse
import asyncio
import contextlib
import inspect
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import openai
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from common import (
    PROJECT_ROOT,
    BenchStack,
    CpuMeter,
    format_table,
    log,
    machine_summary,
    median,
    ms,
    percentile,
    profile_summary,
    py_spy,
    write_result,
)

from threadline_core.kafka import create_producer, ensure_topics
from threadline_core.settings import CoreSettings
from threadline_core.topics import EVENTS

SERVICES = ("gateway", "run_orchestrator", "notifier")
TERMINAL = {"thread.run.completed", "thread.run.failed", "thread.run.cancelled", "thread.run.expired",
            "thread.run.incomplete"}
DEFAULT_RUNS = {1: 300, 10: 600, 100: 2000}
QUICK_RUNS = {1: 60, 10: 200, 100: 500}
MARKER = re.compile(r"bench:[A-Za-z0-9_.-]+")
IDLE_SECONDS = 5.0
FETCH_WAIT_MS: int = CoreSettings.model_fields["kafka_fetch_max_wait_ms"].default
"""The bench's consumers poll like the services' (THREADLINE_KAFKA_FETCH_MAX_WAIT_MS's default)."""
TARGET_P50_1, TARGET_P99_1, TARGET_RPS_100 = 0.005, 0.025, 200.0


# --- observing runs through Kafka ------------------------------------------------------------------


@dataclass
class RunTrace:
    """What the bench saw of one run (wall-clock seconds; occurred_at comes from the services)."""

    thread_id: str
    created_at: float | None = None
    in_progress_at: float | None = None
    terminal_at: float | None = None
    observed_wall: float | None = None
    observed_perf: float | None = None
    status: str | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


def _occurred(envelope: dict[str, Any]) -> float:
    return datetime.fromisoformat(envelope["occurred_at"]).timestamp()


class RunObserver:
    """Reads every partition of threadline.events from its end; resolves runs by thread id."""

    def __init__(self, bootstrap: str) -> None:
        self._consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                          fetch_max_wait_ms=FETCH_WAIT_MS, auto_offset_reset="latest")
        self.traces: dict[str, RunTrace] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Assign all partitions at their end and start reading."""
        await self._consumer.start()
        await self._consumer.topics()
        partitions = self._consumer.partitions_for_topic(EVENTS) or set()
        if not partitions:
            raise RuntimeError(f"topic {EVENTS} has no partitions")
        self._consumer.assign([TopicPartition(EVENTS, p) for p in sorted(partitions)])
        await self._consumer.seek_to_end()
        self._task = asyncio.create_task(self._loop(), name="run-observer")

    async def stop(self) -> None:
        """Stop reading."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._consumer.stop()

    def watch(self, thread_id: str) -> RunTrace:
        """Start tracing the run of this thread (call before creating the run)."""
        trace = RunTrace(thread_id)
        self.traces[thread_id] = trace
        return trace

    async def _loop(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=200)
            perf, wall = time.perf_counter(), time.time()
            for records in batches.values():
                for record in records:
                    self._on_record(record.value, perf, wall)

    def _on_record(self, raw: bytes, perf: float, wall: float) -> None:
        if b'"thread.run.' not in raw:
            return
        envelope = orjson.loads(raw)
        trace = self.traces.get(envelope.get("thread_id") or "")
        if trace is None:
            return
        kind = envelope["type"]
        if kind == "thread.run.created":
            trace.created_at = _occurred(envelope)
        elif kind == "thread.run.in_progress":
            trace.in_progress_at = _occurred(envelope)
        elif kind in TERMINAL and trace.status is None:
            trace.terminal_at = _occurred(envelope)
            trace.status = kind.rsplit(".", 1)[1]
            trace.observed_perf, trace.observed_wall = perf, wall
            trace.done.set()


async def broker_hop(bootstrap: str, fetch_wait_ms: int = FETCH_WAIT_MS, count: int = 300) -> list[float]:
    """Seconds from a produce call to the record being fetched, one at a time, on a bench-only topic.

    The services' producer settings (acks=all, no linger) and a consumer with `fetch_wait_ms`: with the
    services' default bound, the floor of one Kafka hop as they run; with 1 ms (the least that works: tansu 0.6
    answers a fetch that may wait 0 ms with no records, ever), the floor of any setting on this broker. A run needs
    two hops on its critical path (the run command to the orchestrator, the terminal event to whoever waits)."""
    topic = "threadline.bench.hop"
    await ensure_topics(bootstrap, [topic], 1)
    producer = create_producer(bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                fetch_max_wait_ms=fetch_wait_ms, auto_offset_reset="latest")
    await producer.start()
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, 0)])
        await consumer.seek_to_end()
        await consumer.getmany(timeout_ms=50)
        samples: list[float] = []
        for i in range(count):
            started = time.perf_counter()
            await producer.send(topic, b"hop", key=str(i).encode())
            while not await consumer.getmany(timeout_ms=1000):
                pass
            samples.append(time.perf_counter() - started)
        return samples[min(20, count // 10):]
    finally:
        await consumer.stop()
        await producer.stop()


# --- measuring ----------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One measured run (or one direct model request)."""

    token: str
    start_perf: float
    start_wall: float
    end_perf: float = 0.0
    create_seconds: float = 0.0
    status: str = ""
    trace: RunTrace | None = None

    @property
    def e2e(self) -> float:
        """Seconds from the create call to the terminal state observed."""
        return self.end_perf - self.start_perf


@dataclass
class LevelResult:
    """Everything measured at one concurrency."""

    concurrency: int
    samples: list[Sample]
    wall: float
    model_seconds: dict[str, float]
    cpu: dict[str, float]
    failures: int
    direct: list[Sample] = field(default_factory=list)
    direct_wall: float = 0.0
    direct_model_seconds: dict[str, float] = field(default_factory=dict)
    database: dict[str, float] = field(default_factory=dict)

    def platform(self) -> list[float]:
        """End to end minus the model server's time, per run that has both."""
        return [s.e2e - self.model_seconds[s.token] for s in self.samples
                if s.status == "completed" and s.token in self.model_seconds]

    def completed(self) -> list[Sample]:
        """Runs that completed."""
        return [s for s in self.samples if s.status == "completed"]


async def closed_loop(concurrency: int, items: list[Any], work: Callable[[Any], Awaitable[object]]) -> float:
    """`concurrency` workers take items in order until none is left; returns the wall time."""
    queue = list(reversed(items))

    async def worker() -> None:
        while queue:
            await work(queue.pop())

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started


class RunsBench:
    """Drives one stack through the levels."""

    def __init__(self, bench: BenchStack, runs: dict[int, int], *, warmup: int, profile: bool,
                 baseline: bool, timeout: float) -> None:
        self.bench = bench
        self.runs = runs
        self.warmup = warmup
        self.profile = profile
        self.baseline = baseline
        self.timeout = timeout
        stack = bench.running
        self.client = openai.AsyncOpenAI(base_url=stack.base_url, api_key=stack.api_key, max_retries=0,
                                         timeout=60)
        self.model_client = openai.AsyncOpenAI(base_url=bench.timed_model.base_url, api_key="sk-bench",
                                               max_retries=0, timeout=60)
        self.observer = RunObserver(stack.kafka_bootstrap_servers)
        self.assistant_id = ""
        self.threads: dict[int, list[tuple[str, str]]] = {}
        self.profiles: dict[int, dict[str, list[tuple[str, float]]]] = {}
        self.idle: dict[str, float] = {}
        self.hop: list[float] = []
        self.busy_hop: list[float] = []

    async def prepare(self) -> None:
        """The assistant and one thread (with its user message) per run to come."""
        await self.observer.start()
        assistant = await self.client.beta.assistants.create(
            model="gpt-4o-mini", name="bench", instructions="You are a benchmark. Answer briefly.")
        self.assistant_id = assistant.id
        total = sum(self.runs.values()) + self.warmup * len(self.runs)
        log(f"creating {total} threads ...")
        started = time.perf_counter()
        created: list[tuple[str, str]] = []

        async def make(token: str) -> None:
            thread = await self.client.beta.threads.create(
                messages=[{"role": "user", "content": f"[[reply:ok]] bench:{token}"}])
            created.append((thread.id, token))

        tokens = [f"c{level}w{i}" for level in self.runs for i in range(self.warmup)]
        tokens += [f"c{level}r{i}" for level, count in self.runs.items() for i in range(count)]
        await closed_loop(20, tokens, make)
        by_token = dict((t, th) for th, t in created)
        for level, count in self.runs.items():
            self.threads[level] = [(by_token[f"c{level}w{i}"], f"c{level}w{i}") for i in range(self.warmup)]
            self.threads[level] += [(by_token[f"c{level}r{i}"], f"c{level}r{i}") for i in range(count)]
        log(f"threads created in {time.perf_counter() - started:.1f}s")
        await asyncio.sleep(3.0)  # thread/message events drain; consumers fall back to their idle polling
        meter = CpuMeter(self.bench.component_pids())
        meter.start()
        await asyncio.sleep(IDLE_SECONDS)
        self.idle = {name: used / meter.wall for name, used in meter.stop().items()}
        log("idle CPU (% of a core): " + ", ".join(f"{k} {v * 100:.1f}" for k, v in sorted(self.idle.items())))
        self.hop = await broker_hop(self.bench.running.kafka_bootstrap_servers)
        log(f"one broker hop: p50 {ms(median(self.hop))} ms, p99 {ms(percentile(self.hop, 99))} ms")
        self.busy_hop = await broker_hop(self.bench.running.kafka_bootstrap_servers, fetch_wait_ms=1)
        log(f"one broker hop, fetch bound 1 ms: p50 {ms(median(self.busy_hop))} ms")

    async def db_counters(self) -> dict[str, float]:
        """Transactions and rows of the stack's database so far (pg_stat_database)."""
        conn = await asyncpg.connect(self.bench.running.database_url)
        try:
            row = await conn.fetchrow(
                "SELECT xact_commit, xact_rollback, tup_inserted, tup_updated, tup_deleted, tup_returned,"
                " tup_fetched FROM pg_stat_database WHERE datname = current_database()")
            await conn.execute("SELECT pg_stat_clear_snapshot()")
        finally:
            await conn.close()
        return {k: float(v) for k, v in dict(row or {}).items()}

    async def one_run(self, thread_id: str, token: str) -> Sample:
        """Create a run on the thread and wait until it is observed terminal."""
        trace = self.observer.watch(thread_id)
        sample = Sample(token=token, start_perf=time.perf_counter(), start_wall=time.time(), trace=trace)
        try:
            await self.client.beta.threads.runs.create(thread_id=thread_id, assistant_id=self.assistant_id)
            sample.create_seconds = time.perf_counter() - sample.start_perf
            await asyncio.wait_for(trace.done.wait(), self.timeout)
            sample.end_perf = trace.observed_perf or time.perf_counter()
            sample.status = trace.status or "unknown"
        except (openai.OpenAIError, TimeoutError) as exc:
            sample.end_perf = time.perf_counter()
            sample.status = f"error: {type(exc).__name__}"
        return sample

    async def level(self, concurrency: int) -> LevelResult:
        """Warm up, then measure `runs[concurrency]` runs with `concurrency` in flight."""
        items = self.threads[concurrency]
        warm, measured = items[:self.warmup], items[self.warmup:]
        await closed_loop(min(concurrency, len(warm)) or 1, warm, lambda it: self.one_run(*it))
        self.bench.timed_model.timings()  # forget the warm-up
        samples: list[Sample] = []

        async def work(item: tuple[str, str]) -> None:
            samples.append(await self.one_run(*item))

        meter = CpuMeter(self.bench.component_pids())
        profile_dir = PROJECT_ROOT / ".threadline" / "bench-profiles" / f"runs-c{concurrency}"
        targets = {k: v for k, v in meter.pids.items() if k in ("gateway", "run_orchestrator", "notifier")}
        profiling: contextlib.AbstractContextManager[list[Path]] = (
            py_spy(targets, profile_dir) if self.profile else contextlib.nullcontext([]))
        with profiling as files:
            before = await self.db_counters()
            meter.start()
            wall = await closed_loop(concurrency, measured, work)
            cpu = meter.stop()
            await asyncio.sleep(1.0)  # backends report their counters at most once a second
            after = await self.db_counters()
        if files:
            self.profiles[concurrency] = {f.stem: profile_summary(f) for f in files}
        timings = self.bench.timed_model.timings()
        model_seconds = {token: sum(values) for token, values in timings.items()}
        failures = sum(1 for s in samples if s.status != "completed")
        result = LevelResult(concurrency, samples, wall, model_seconds, cpu, failures,
                             database={k: (after[k] - before[k]) / max(1, len(samples)) for k in after})
        if self.baseline:
            await self.direct(result, len(measured))
        return result

    async def direct(self, result: LevelResult, count: int) -> None:
        """The platform's own model request, sent straight to the model server at the same concurrency."""
        body = self.bench.timed_model.sample()
        if "messages" not in body:
            log("no platform request captured; baseline skipped")
            return
        raw = orjson.dumps(body).decode()
        known = set(inspect.signature(self.model_client.chat.completions.create).parameters)

        def request(token: str) -> dict[str, Any]:
            doc = orjson.loads(MARKER.sub(f"bench:{token}", raw))
            kwargs = {k: v for k, v in doc.items() if k in known}
            extra = {k: v for k, v in doc.items() if k not in known}
            if extra:
                kwargs["extra_body"] = extra
            return kwargs

        async def call(token: str) -> Sample:
            kwargs = request(token)
            sample = Sample(token=token, start_perf=time.perf_counter(), start_wall=time.time())
            try:
                stream = await self.model_client.chat.completions.create(**kwargs)
                async for _ in stream:
                    pass
                sample.status = "completed"
            except openai.OpenAIError as exc:
                sample.status = f"error: {type(exc).__name__}"
            sample.end_perf = time.perf_counter()
            return sample

        c = result.concurrency
        await closed_loop(c, [f"directw{c}x{i}" for i in range(min(self.warmup, 20))], call)
        self.bench.timed_model.timings()
        samples: list[Sample] = []

        async def work(token: str) -> None:
            samples.append(await call(token))

        result.direct_wall = await closed_loop(c, [f"direct{c}x{i}" for i in range(count)], work)
        result.direct = samples
        result.direct_model_seconds = {t: sum(v) for t, v in self.bench.timed_model.timings().items()}

    async def close(self) -> None:
        """Close clients and the observer."""
        await self.observer.stop()
        await self.client.close()
        await self.model_client.close()


# --- reporting ------------------------------------------------------------------------------------


def _rate(n: int, wall: float) -> str:
    return f"{n / wall:.0f}" if wall > 0 else "-"


def _net_cpu_ms(r: LevelResult, idle: dict[str, float]) -> dict[str, float]:
    """CPU ms per run of each component at one level, less what it burns when idle."""
    n = max(1, len(r.samples))
    return {name: max(0.0, used - idle.get(name, 0.0) * r.wall) / n * 1000 for name, used in r.cpu.items()}


def headroom(by_level: dict[int, LevelResult], idle: dict[str, float], busy_hop: list[float]) -> str:
    """What the targets leave to the platform once the parts it cannot avoid are paid, from this run's numbers."""
    lines = []
    one = by_level.get(1)
    direct = [s.e2e for s in one.direct if s.status == "completed"] if one else []
    if one and direct and busy_hop:
        exchange = median(direct) - median(list(one.direct_model_seconds.values()))
        bound = exchange + 2 * median(busy_hop)
        lines.append(
            f"- **1 at a time, p50 <= {TARGET_P50_1 * 1000:.0f} ms.** A run's platform time holds at least the "
            f"client's own `runs.create` exchange through the SDK and two broker hops. One SDK exchange with a "
            f"server that answers at once costs {ms(exchange)} ms here (direct p50 minus its model time). The "
            f"fastest hop this broker gives, to a consumer whose fetches wait at most 1 ms (tansu 0.6 answers a "
            f"0 ms fetch with no records, ever), is "
            f"{ms(median(busy_hop))} ms (p50). Together: {ms(bound)} ms "
            f"({'above' if bound > TARGET_P50_1 else 'within'} the target), before the orchestrator's own "
            f"model exchange and the database commits.")
    hundred = by_level.get(100)
    if hundred and hundred.cpu:
        net = _net_cpu_ms(hundred, idle)
        cores = os.cpu_count() or 1
        budget = cores * 1000 / TARGET_RPS_100
        harness = net.get("bench", 0.0) + net.get("model_server", 0.0)
        platform = sum(v for name, v in net.items() if name not in ("bench", "model_server"))
        direct_ok = [s for s in hundred.direct if s.status == "completed"]
        direct_rate = (f" The same client, sending only the model requests straight to the model server, reached "
                       f"{_rate(len(direct_ok), hundred.direct_wall)} req/s.") if direct_ok else ""
        lines.append(
            f"- **100 at a time, >= {TARGET_RPS_100:.0f} runs/s.** On {cores} cores that is {budget:.0f} ms of CPU "
            f"per run for everything. The bench client (the `openai` SDK) and the scripted model server took "
            f"{harness:.1f} ms per run, leaving {budget - harness:.1f} ms for the platform (gateway, orchestrator, "
            f"notifier, Postgres, broker), which used {platform:.1f} ms.{direct_rate}")
    return "\n".join(lines)


def report(results: list[LevelResult], *, postgres: str, services: tuple[str, ...],
           profiles: dict[int, dict[str, list[tuple[str, float]]]], idle: dict[str, float],
           hop: list[float], busy_hop: list[float]) -> str:
    """The Markdown report: main table, breakdown, CPU per run, targets, method."""
    main_rows = []
    for r in results:
        done = r.completed()
        platform = r.platform()
        model = [r.model_seconds[s.token] for s in done if s.token in r.model_seconds]
        direct_ok = [s.e2e for s in r.direct if s.status == "completed"]
        main_rows.append([
            r.concurrency, f"{len(done)}/{len(r.samples)}", _rate(len(done), r.wall),
            ms(median([s.e2e for s in done])), ms(percentile([s.e2e for s in done], 99)),
            ms(median(model)), ms(median(platform)), ms(percentile(platform, 99)),
            _rate(len(direct_ok), r.direct_wall) if r.direct else "-",
            ms(median(direct_ok)), ms(percentile(direct_ok, 99)),
            ms(median(list(r.direct_model_seconds.values()))),
        ])
    main = format_table(["concurrent", "completed", "runs/s", "e2e p50 ms", "e2e p99 ms", "model p50 ms",
                         "platform p50 ms", "platform p99 ms", "direct req/s", "direct p50 ms", "direct p99 ms",
                         "direct model p50 ms"], main_rows)

    breakdown_rows = []
    for r in results:
        done = [s for s in r.completed() if s.trace and s.trace.created_at and s.trace.in_progress_at
                and s.trace.terminal_at and s.trace.observed_wall]
        traces = [s.trace for s in done if s.trace is not None]
        create_http = [s.create_seconds for s in done]
        queued = [t.in_progress_at - t.created_at for t in traces]  # type: ignore[operator]
        driving = [s.trace.terminal_at - s.trace.in_progress_at - r.model_seconds.get(s.token, 0.0)  # type: ignore[union-attr,operator]
                   for s in done]
        observe = [t.observed_wall - t.terminal_at for t in traces]  # type: ignore[operator]
        before_created = [s.trace.created_at - s.start_wall for s in done]  # type: ignore[union-attr,operator]
        breakdown_rows.append([r.concurrency, ms(median(create_http)), ms(median(before_created)),
                               ms(median(queued)), ms(percentile(queued, 99)), ms(median(driving)),
                               ms(percentile(driving, 99)), ms(median(observe)), ms(percentile(observe, 99))])
    breakdown = format_table(["concurrent", "runs.create HTTP p50", "create -> created event p50",
                              "created -> in_progress p50", "p99", "in_progress -> completed minus model p50",
                              "p99", "completed -> observed p50", "p99"], breakdown_rows)

    names = sorted({name for r in results for name in r.cpu})
    cpu_rows = []
    for r in results:
        net = _net_cpu_ms(r, idle)
        total = sum(r.cpu.values())
        cpu_rows.append([r.concurrency] + [f"{net.get(name, 0.0):.2f}" for name in names]
                        + [f"{sum(net.values()):.2f}", f"{total / max(1, len(r.samples)) * 1000:.2f}",
                           f"{total / r.wall * 100:.0f}%" if r.wall else "-"])
    cpu = format_table(["concurrent", *names, "net total", "gross total", "stack CPU busy (% of a core)"],
                       cpu_rows)
    db_rows = [[r.concurrency, *(f"{r.database.get(k, 0.0):.1f}" for k in
                                 ("xact_commit", "tup_inserted", "tup_updated", "tup_fetched"))]
               for r in results if r.database]
    db_table = format_table(["concurrent", "transactions", "rows inserted", "rows updated", "rows fetched"], db_rows)
    idle_table = format_table(["component", "idle CPU (% of a core)"],
                              [[name, f"{value * 100:.1f}"] for name, value in sorted(idle.items())])

    by_level = {r.concurrency: r for r in results}
    verdicts = []
    if 1 in by_level:
        p = by_level[1].platform()
        verdicts.append(f"- 1 at a time: platform p50 {ms(median(p))} ms (target <= 5: "
                        f"{'met' if median(p) <= TARGET_P50_1 else 'NOT met'}), p99 {ms(percentile(p, 99))} ms "
                        f"(target <= 25: {'met' if percentile(p, 99) <= TARGET_P99_1 else 'NOT met'})")
    if 100 in by_level:
        r = by_level[100]
        rps = len(r.completed()) / r.wall if r.wall else 0.0
        verdicts.append(f"- 100 at a time: {rps:.0f} runs/s (target >= 200: "
                        f"{'met' if rps >= TARGET_RPS_100 else 'NOT met'})")
    failures = sum(r.failures for r in results)
    outcomes = Counter(s.status for r in results for s in r.samples if s.status != "completed")
    failure_detail = f" ({', '.join(f'{n} {status}' for status, n in outcomes.most_common())})" if outcomes else ""

    prof = ""
    for level, per_proc in sorted(profiles.items()):
        for proc, frames in per_proc.items():
            rows = [[f"{share * 100:.1f}%", name] for name, share in frames[:15]]
            prof += f"\npy-spy, {proc}, {level} concurrent (share of samples per task entry point):\n\n"
            prof += format_table(["share", "function (file)"], rows) + "\n"

    return f"""# Runs benchmark

{machine_summary()}.
Stack: tansu, {postgres}, services {', '.join(services)} (one process each), scripted model server
in its own process (`[[reply:ok]]`: answers `ok` at once, streamed).

## Runs completed per second and time per run

{main}

- **platform** = end to end (from `client.beta.threads.runs.create` to the run observed terminal)
  minus the model server's own time for that run's chat-completions request.
- Completion observed by a Kafka consumer in the bench process on `threadline.events` (all
  partitions, no group, `fetch_max_wait_ms={FETCH_WAIT_MS}`): the `thread.run.completed` event, so the time
  includes commit -> outbox relay -> Kafka -> consumer. No polling of the API.
- **direct**: the platform's own chat-completions request (captured by the model server) sent
  straight to the model server with the same async `openai` client, same concurrency, same count.
- Closed loop: N workers, each creates a run on a fresh thread (1 user message) and waits for it.
  Failed or timed-out runs: {failures}{failure_detail}.

{chr(10).join(verdicts)}

Floor of the broker, measured in the same run: one Kafka hop (produce with the services' producer
settings -> fetched by a consumer with `fetch_max_wait_ms={FETCH_WAIT_MS}`, one record at a time) takes p50
{ms(median(hop))} ms, p99 {ms(percentile(hop, 99))} ms. A run has two hops on its critical path (the
run command to the orchestrator, the terminal event to whoever waits): p50 {ms(2 * median(hop))} ms of
the platform time is the broker's.

## What the targets leave to the platform (this run's numbers)

{headroom(by_level, idle, busy_hop)}

## Where the time goes (medians, ms; occurred_at stamps from the services' clocks)

{breakdown}

CPU per run, ms (all processes of each component during the measured window; "net" subtracts what
the component burns when idle, measured for {IDLE_SECONDS:.0f} s before the levels):

{cpu}

Postgres work per run (pg_stat_database; statements outside a transaction count as one each; the
counters are reported by the server with a small delay, so treat them as approximate):

{db_table}

Idle stack (no runs; Kafka consumers polling with `fetch_max_wait_ms`):

{idle_table}
{prof}
Noise: the machine is 2 cores shared with other engineers' test runs; compare medians across
repeated `make bench` runs, not single numbers.
"""


def parse_runs(text: str) -> dict[int, int]:
    """'1=300,10=1000' -> {1: 300, 10: 1000}."""
    out: dict[int, int] = {}
    for part in text.split(","):
        level, _, count = part.partition("=")
        out[int(level)] = int(count)
    return out


def main(argv: list[str] | None = None) -> int:
    """Start the stack, run the levels, print and write the report."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer runs per level")
    parser.add_argument("--runs", type=parse_runs, help="runs per level, e.g. 1=300,10=600,100=2000")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured runs before each level")
    parser.add_argument("--profile", action="store_true", help="py-spy the gateway and orchestrator per level")
    parser.add_argument("--no-baseline", action="store_true", help="skip the direct model-server baseline")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for one run")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment of every service (e.g. THREADLINE_KAFKA_FETCH_MAX_WAIT_MS=5)")
    parser.add_argument("--output", default="runs", help="write bench/results/<OUTPUT>.md")
    args = parser.parse_args(argv)
    runs = args.runs or (QUICK_RUNS if args.quick else DEFAULT_RUNS)
    env = dict(item.split("=", 1) for item in args.env)

    with BenchStack(services=SERVICES, name="runs", env=env) as bench:
        postgres = (bench.running.database.description if bench.running.database else "Postgres")
        postgres = postgres.split(" (data")[0]
        if "embedded" in postgres:
            postgres += " (throw-away, synchronous_commit=off)"
        results, driver = asyncio.run(_measure(bench, runs, args))
    markdown = report(results, postgres=postgres, services=SERVICES, profiles=driver.profiles, idle=driver.idle,
                      hop=driver.hop, busy_hop=driver.busy_hop)
    path = write_result(args.output, markdown)
    print(markdown)
    log(f"written {path.relative_to(PROJECT_ROOT)}")
    return 0


async def _measure(bench: BenchStack, runs: dict[int, int],
                   args: argparse.Namespace) -> tuple[list[LevelResult], RunsBench]:
    driver = RunsBench(bench, runs, warmup=args.warmup, profile=args.profile, baseline=not args.no_baseline,
                       timeout=args.timeout)
    results: list[LevelResult] = []
    try:
        await driver.prepare()
        for level in runs:
            log(f"measuring {runs[level]} runs, {level} at a time ...")
            result = await driver.level(level)
            done = result.completed()
            log(f"  {len(done)}/{len(result.samples)} completed, {len(done) / result.wall:.0f} runs/s, "
                f"platform p50 {ms(median(result.platform()))} ms")
            results.append(result)
    finally:
        await driver.close()
    return results, driver


if __name__ == "__main__":
    sys.exit(main())
