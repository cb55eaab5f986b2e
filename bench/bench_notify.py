"""Notify benchmark: how late a client learns that a run changed state, pushed (webhook, SSE) versus polled.

Setup: gateway + notifier only (no run orchestrator), so the bench itself is the run driver: it
creates queued runs through the API, then commits their state changes the way the orchestrator does
(one transaction: the `runs` row + the `thread.run.in_progress` / `thread.run.completed` outbox
event) and notes the time just before COMMIT. Everything downstream is the real path: NOTIFY ->
outbox relay -> Kafka -> notifier -> signed HTTP POST, and Kafka -> gateway fan-out -> SSE.

An observer process (this file with ``--observer``) runs the webhook receiver (a minimal asyncio
HTTP server) and one SSE client on ``GET /v1/events``; it timestamps arrivals, so the bench process
(which writes) does not share an event loop with what it measures.

1. push latency: N transitions, one at a time 8-16 ms apart, one healthy endpoint; commit ->
   webhook received and commit -> SSE event received, p50/p99/max.
2. polling: a client per watched run calling ``runs.retrieve`` every 1 s / every 100 ms while the
   bench commits transitions after random waits (uniform 0-2 s, a stand-in for model time); latency
   = commit -> the poll response that shows the new status; requests counted.
3. throughput: transitions committed as fast as the writers go to 4 healthy endpoints, without and
   then with one more endpoint that accepts connections and never answers; deliveries/s to the
   healthy ones (first commit -> last healthy delivery).

Usage: ``python bench/bench_notify.py [--quick] [--transitions N] [--poll-transitions N]``.
"""

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import openai
from common import BenchStack, format_table, log, machine_summary, ms, percentile, write_result

from threadline_core.db import connect
from threadline_core.events import public_event
from threadline_core.ids import now_seconds
from threadline_core.outbox import append_events
from threadline_core.topics import EVENTS

SERVICES = ("gateway", "notifier")
TYPES = ("thread.run.in_progress", "thread.run.completed")
STATES = (("in_progress", "thread.run.in_progress", "started_at"), ("completed", "thread.run.completed",
                                                                   "completed_at"))
Key = tuple[str, str]  # (run id, event type): one transition


# --- observer process: webhook receiver + SSE client -----------------------------------------------------


class Observer:
    """Timestamps every webhook and SSE event it receives, keyed by (run id, event type)."""

    def __init__(self, base_url: str, api_key: str) -> None:
        self.base_url = base_url
        self.api_key = api_key
        self.webhooks: dict[str, list[tuple[str, str, float]]] = {}
        self.sse: list[tuple[str, str, float]] = []
        self.hang = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A minimal HTTP/1.1 server: keep-alive, Content-Length bodies; /hook/<name> records, /results dumps."""
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                _, path, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                at = time.time()
                if path.startswith("/hook/"):
                    name = path.removeprefix("/hook/")
                    if name == "dead":
                        await self.hang.wait()
                        return
                    event = json.loads(body)
                    self.webhooks.setdefault(name, []).append((event["data"]["id"], event["type"], at))
                    payload = b""
                elif path == "/results":
                    payload = json.dumps({"webhooks": self.webhooks, "sse": self.sse}).encode()
                elif path == "/reset":
                    self.webhooks, self.sse = {}, []
                    payload = b"{}"
                else:
                    payload = b"{}"
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                             + str(len(payload)).encode() + b"\r\n\r\n" + payload)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def follow_sse(self) -> None:
        """One client on GET /v1/events for the two transition types."""
        headers = {"Authorization": f"Bearer {self.api_key}"}
        async with httpx.AsyncClient(base_url=self.base_url, headers=headers, trust_env=False,
                                     timeout=httpx.Timeout(None)) as client:
            async with client.stream("GET", "/events", params={"types": ",".join(TYPES)}) as response:
                event = ""
                async for line in response.aiter_lines():
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: "):
                        at = time.time()
                        self.sse.append((json.loads(line[6:])["id"], event, at))


async def observer_main(base_url: str, api_key: str) -> None:
    """Serve on a free port, print it, follow SSE, run until SIGTERM."""
    observer = Observer(base_url, api_key)
    server = await asyncio.start_server(observer.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sse = asyncio.create_task(observer.follow_sse())
    print(f"PORT {port}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    observer.hang.set()
    sse.cancel()
    server.close()


class ObserverProcess:
    """The observer in its own process."""

    def __init__(self, base_url: str, api_key: str, log_path: Path) -> None:
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen([sys.executable, __file__, "--observer", base_url, api_key],
                                     stdout=subprocess.PIPE, stderr=self._log, start_new_session=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("PORT "):
            raise RuntimeError(f"observer did not start; see {log_path}")
        self.port = int(line.split()[1])
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", trust_env=False, timeout=30)

    def url(self, name: str) -> str:
        """Webhook URL of one receiving path."""
        return f"http://127.0.0.1:{self.port}/hook/{name}"

    def results(self) -> dict[str, Any]:
        """Everything recorded so far."""
        data: dict[str, Any] = self.http.get("/results").json()
        return data

    def reset(self) -> None:
        """Forget what was recorded."""
        self.http.get("/reset")

    def stop(self) -> None:
        """SIGTERM and wait."""
        self.http.close()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


# --- the run driver -----------------------------------------------------------------------------------


@dataclass
class QueuedRun:
    """A run the bench drives (created queued through the API)."""

    id: str
    thread_id: str


async def create_runs(client: openai.AsyncOpenAI, assistant_id: str, count: int,
                      concurrency: int = 8) -> list[QueuedRun]:
    """Queued runs, each on its own thread (nothing drives them but the bench)."""
    runs: list[QueuedRun] = []
    semaphore = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with semaphore:
            run = await client.beta.threads.create_and_run(
                assistant_id=assistant_id, thread={"messages": [{"role": "user", "content": "bench"}]})
            runs.append(QueuedRun(run.id, run.thread_id))

    await asyncio.gather(*(one() for _ in range(count)))
    return runs


async def transition(conn: asyncpg.Connection, run: QueuedRun, status: str, event_type: str,
                     stamp_field: str) -> float:
    """Commit one state change the way the orchestrator does; return the time just before COMMIT."""
    async with conn.transaction():
        doc = await conn.fetchval(
            "UPDATE runs SET status = $2, doc = doc || jsonb_build_object('status', $2::text, $3::text, $4::bigint)"
            " WHERE id = $1 RETURNING doc", run.id, status, stamp_field, now_seconds())
        await append_events(conn, EVENTS, [public_event(type=event_type, project_id="proj_local", key=run.thread_id,
                                                        data=doc, thread_id=run.thread_id, run_id=run.id)])
        committing = time.time()
    return committing


# --- phases -------------------------------------------------------------------------------------------------


@dataclass
class Latencies:
    """One row of the latency table."""

    name: str
    values: list[float]
    expected: int
    requests: int | None = None
    note: str = ""

    def row(self) -> list[object]:
        """Table cells."""
        per = f"{self.requests / len(self.values):.1f}" if self.requests is not None and self.values else "-"
        return [self.name, f"{len(self.values)}/{self.expected}", ms(percentile(self.values, 50)),
                ms(percentile(self.values, 99)), ms(max(self.values) if self.values else float("nan")),
                "-" if self.requests is None else self.requests, per, self.note]


async def wait_for(check: Callable[[], bool], limit: float) -> bool:
    """Poll a condition (bench bookkeeping only)."""
    deadline = time.monotonic() + limit
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


async def push_phase(dsn: str, observer: ObserverProcess, runs: list[QueuedRun]) -> tuple[Latencies, Latencies]:
    """Transitions one by one; latency to the webhook receiver and to the SSE client."""
    observer.reset()
    commits: dict[Key, float] = {}
    conn = await connect(dsn)
    try:
        for state in STATES:
            for run in runs:
                commits[(run.id, state[1])] = await transition(conn, run, *state)
                await asyncio.sleep(random.uniform(0.008, 0.016))
    finally:
        await conn.close()

    def seen() -> dict[str, Any]:
        return observer.results()

    await wait_for(lambda: len(seen()["webhooks"].get("main", [])) >= len(commits) and
                   len(seen()["sse"]) >= len(commits), 60)
    data = seen()
    webhook = [at - commits[(rid, typ)] for rid, typ, at in data["webhooks"].get("main", [])
               if (rid, typ) in commits]
    sse = [at - commits[(rid, typ)] for rid, typ, at in data["sse"] if (rid, typ) in commits]
    return (Latencies("webhook (push)", webhook, len(commits), 0, "1 POST per transition, server to client"),
            Latencies("SSE GET /v1/events", sse, len(commits), 0, "1 open connection"))


async def poll_phase(dsn: str, client: openai.AsyncOpenAI, runs: list[QueuedRun], interval: float,
                     slots: int) -> Latencies:
    """A poller per watched run; the bench changes the run's state after random waits."""
    order = {"queued": 0, **{state[0]: i + 1 for i, state in enumerate(STATES)}}
    latencies: list[float] = []
    requests = 0
    queue = list(runs)

    async def watch(run: QueuedRun) -> None:
        nonlocal requests
        first_seen: dict[int, float] = {}  # transition index -> when a poll first showed it

        async def poller() -> None:
            nonlocal requests
            while len(first_seen) < len(STATES):
                started = time.monotonic()
                current = await client.beta.threads.runs.retrieve(run.id, thread_id=run.thread_id)
                requests += 1
                seen_at = time.time()
                for index in range(order.get(current.status, 0)):
                    first_seen.setdefault(index, seen_at)
                await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

        commits: list[float] = []
        conn = await connect(dsn)
        task = asyncio.create_task(poller())
        try:
            for state in STATES:
                await asyncio.sleep(random.uniform(0, 2.0))
                commits.append(await transition(conn, run, *state))
            await task
        finally:
            await conn.close()
        latencies.extend(first_seen[i] - commits[i] for i in range(len(STATES)))

    async def slot() -> None:
        while queue:
            await watch(queue.pop())

    started = time.monotonic()
    await asyncio.gather(*(slot() for _ in range(slots)))
    elapsed = time.monotonic() - started
    name = f"poll runs.retrieve every {interval * 1000:.0f} ms"
    return Latencies(name, latencies, len(runs) * len(STATES), requests,
                     f"{slots} runs watched at a time, {requests / elapsed:.0f} req/s")


@dataclass
class Throughput:
    """One row of the throughput table."""

    name: str
    events: int
    deliveries: int
    expected: int
    seconds: float

    def row(self) -> list[object]:
        """Table cells."""
        return [self.name, self.events, f"{self.deliveries}/{self.expected}", f"{self.seconds:.2f}",
                f"{self.deliveries / self.seconds:.0f}" if self.seconds > 0 else "-"]


async def throughput_phase(dsn: str, client: openai.AsyncOpenAI, observer: ObserverProcess,
                           runs: list[QueuedRun], *, dead: bool, healthy: int = 4, writers: int = 4) -> Throughput:
    """Commit every transition as fast as `writers` connections go; count deliveries to healthy endpoints."""
    observer.reset()
    names = [f"h{i}" for i in range(healthy)] + (["dead"] if dead else [])
    endpoints = [await client.webhooks.create(url=observer.url(n), name=n, event_types=list(TYPES))  # type: ignore[arg-type]
                 for n in names]
    work = [(run, state) for state in STATES for run in runs]
    first_commit: list[float] = []

    async def writer(share: list[tuple[QueuedRun, tuple[str, str, str]]]) -> None:
        conn = await connect(dsn)
        try:
            for run, state in share:
                first_commit.append(await transition(conn, run, *state))
        finally:
            await conn.close()

    await asyncio.gather(*(writer(work[i::writers]) for i in range(writers)))
    expected = len(work) * healthy

    def delivered() -> list[float]:
        hooks = observer.results()["webhooks"]
        return [at for name, items in hooks.items() if name != "dead" for _, _, at in items]

    await wait_for(lambda: len(delivered()) >= expected, 120)
    times = delivered()
    for endpoint in endpoints:
        await client.webhooks.delete(endpoint.id)
    label = f"{healthy} healthy endpoints" + (" + 1 never answering" if dead else "")
    return Throughput(label, len(work), len(times), expected, max(times) - min(first_commit) if times else 0.0)


# --- main -------------------------------------------------------------------------------------------------


async def measure(bench: BenchStack, args: argparse.Namespace) -> tuple[list[Latencies], list[Throughput]]:
    """All phases against one stack."""
    stack = bench.running
    dsn = stack.database_url
    client = openai.AsyncOpenAI(base_url=stack.base_url, api_key=stack.api_key, max_retries=0,
                                http_client=openai.DefaultAsyncHttpxClient(trust_env=False))
    observer = ObserverProcess(stack.base_url, stack.api_key, stack.logs_dir / "bench_observer.log")
    try:
        assistant = await client.beta.assistants.create(model="gpt-4o-mini")
        main_hook = await client.webhooks.create(url=observer.url("main"), name="bench",
                                                 event_types=list(TYPES))  # type: ignore[arg-type]
        push_runs = args.transitions // len(STATES)
        log(f"creating {push_runs} queued runs for the push phase ...")
        runs = await create_runs(client, assistant.id, push_runs)
        await asyncio.sleep(2.0)  # the SSE client is connected, notifier has joined its group
        log("warm-up ...")
        await push_phase(dsn, observer, await create_runs(client, assistant.id, 20))
        log(f"push phase: {len(runs) * len(STATES)} transitions ...")
        webhook, sse = await push_phase(dsn, observer, runs)
        await client.webhooks.delete(main_hook.id)
        rows = [webhook, sse]
        poll_runs = args.poll_transitions // len(STATES)
        for interval, slots in ((1.0, 50), (0.1, 25)):
            runs = await create_runs(client, assistant.id, poll_runs)
            log(f"poll phase every {interval * 1000:.0f} ms: {poll_runs * len(STATES)} transitions ...")
            rows.append(await poll_phase(dsn, client, runs, interval, slots))
        throughput: list[Throughput] = []
        for dead in (False, True):
            runs = await create_runs(client, assistant.id, args.throughput_transitions // len(STATES))
            log(f"throughput phase ({'with' if dead else 'without'} a never-answering endpoint) ...")
            throughput.append(await throughput_phase(dsn, client, observer, runs, dead=dead))
        return rows, throughput
    finally:
        observer.stop()
        await client.close()


def report(rows: list[Latencies], throughput: list[Throughput], args: argparse.Namespace) -> str:
    """The Markdown written to bench/results/notify.md."""
    latency = format_table(["client learns of a run state change by", "transitions", "p50 ms", "p99 ms", "max ms",
                            "client requests", "requests/transition", "notes"], [r.row() for r in rows])
    tput = format_table(["webhook endpoints", "transitions", "healthy deliveries", "seconds", "deliveries/s"],
                        [t.row() for t in throughput])
    push_p99 = max(percentile(rows[0].values, 99), percentile(rows[1].values, 99))
    push_p50 = max(percentile(rows[0].values, 50), percentile(rows[1].values, 50))
    poll = rows[2].values if len(rows) > 2 else []

    def times(mine: float, theirs: float) -> str:
        return f"{theirs / mine:.0f}x" if mine > 0 and theirs == theirs else "-"

    return "\n".join([
        "# Notify benchmark: webhooks and SSE versus polling", "",
        f"Machine: {machine_summary()}.", "",
        "Latency = time from just before the COMMIT of a run's state change (runs row + outbox event, the way the "
        "run orchestrator writes it) to the moment the client has it: the webhook request read by a local "
        "receiver, the SSE event parsed by a client of `GET /v1/events`, or the `runs.retrieve` response that "
        "first shows the new status. Receiver and SSE client run in their own process. Stack: gateway + "
        "notifier, tansu, embedded PostgreSQL, all on this machine's loopback.", "",
        latency, "",
        f"Target: push p99 < 20 ms (measured: {ms(push_p99)} ms, the slower of webhook and SSE) and at least 50x "
        f"below 1 s polling (1 s polling is {times(push_p50, percentile(poll, 50))} slower at p50 and "
        f"{times(push_p99, percentile(poll, 99))} at p99).", "",
        "Transitions came 8-16 ms apart, so consumers were busy: tansu answers a fetch at once when records "
        "are there, but holds an empty fetch for its whole long-poll bound, which is 6 ms while records flow "
        "(`THREADLINE_KAFKA_FETCH_MAX_WAIT_MS`). Without records the notifier's bound grows to 50 ms over 2 s "
        "(`THREADLINE_KAFKA_IDLE_FETCH_MAX_WAIT_MS`), so the first webhook after a quiet spell can take up to "
        "~50 ms longer; the gateway's SSE fan-out reads only while a client is connected. Apache Kafka "
        "answers fetches as soon as data arrives.", "",
        "Polling costs requests while nothing happens: the pollers above watched runs whose transitions came "
        "after random waits of 0-2 s (a stand-in for model time); longer runs cost proportionally more "
        "requests per transition. Push costs no client requests (webhook: one POST from the server per "
        "transition and endpoint; SSE: one long-lived connection).", "",
        "## Webhook throughput with a dead endpoint", "",
        "Transitions committed by 4 writer connections as fast as they go, each delivered to every endpoint "
        "subscribed; the never-answering endpoint accepts the TCP connection and never replies (15 s timeout, "
        "then retries): it must not slow the healthy ones.", "",
        tput, "",
        f"Parameters: {args.transitions} push transitions, {args.poll_transitions} per polling mode, "
        f"{args.throughput_transitions} per throughput run.",
    ])


def main(argv: list[str] | None = None) -> int:
    """Run the bench and write bench/results/notify.md."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--observer"]:
        asyncio.run(observer_main(argv[1], argv[2]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer transitions (a smoke run)")
    parser.add_argument("--transitions", type=int, default=1200)
    parser.add_argument("--poll-transitions", type=int, default=1000)
    parser.add_argument("--throughput-transitions", type=int, default=1000)
    args = parser.parse_args(argv)
    if args.quick:
        args.transitions, args.poll_transitions, args.throughput_transitions = 200, 100, 200
    env = {"THREADLINE_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8", "THREADLINE_LOG_LEVEL": "WARNING"}
    with BenchStack(services=SERVICES, name="notify", env=env) as bench:
        rows, throughput = asyncio.run(measure(bench, args))
    markdown = report(rows, throughput, args)
    print(markdown)
    path = write_result("notify", markdown)
    log(f"wrote {path}")
    with contextlib.suppress(Exception):
        os.sync()
    return 0


if __name__ == "__main__":
    sys.exit(main())

