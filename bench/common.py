"""Shared helpers for the benches: the stack, a timed model server, CPU accounting, percentiles, tables.

A bench file (`bench/bench_<name>.py`) is a script: it starts what it needs through
`BenchStack`, measures, prints a table with `format_table` and writes `bench/results/<name>.md`
with `write_result`. `bench/run.py` runs them one after another.
"""

import contextlib
import datetime
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

import httpx  # noqa: E402

from threadline_devstack._proc import die_with_parent, free_port, terminate  # noqa: E402
from threadline_devstack.stack import Stack, StackConfig  # noqa: E402

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    """Progress lines go to stderr so stdout holds only the results."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- statistics and tables ---------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation between closest ranks; nan when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    """The 50th percentile."""
    return percentile(values, 50)


def ms(seconds: float) -> str:
    """Seconds as milliseconds with a sensible number of digits."""
    if seconds != seconds:  # nan
        return "-"
    value = seconds * 1000
    return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}" if abs(value) < 100 else f"{value:.0f}"


def format_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A Markdown table, columns padded so it also reads well on a terminal."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    out = [line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in cells[1:]]
    return "\n".join(out)


def machine_summary() -> str:
    """Cores, load, Python and commit: the context needed to read noisy numbers."""
    load = os.getloadavg()
    commit = "unknown"
    with contextlib.suppress(Exception):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                                text=True, timeout=5).stdout.strip() or commit
    return (f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, load average "
            f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} (1/5/15 min), Python {platform.python_version()}, "
            f"commit {commit} (+ working tree)")


def write_result(name: str, markdown: str) -> Path:
    """Write bench/results/<name>.md and return its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.md"
    path.write_text(markdown.rstrip() + "\n")
    return path


# --- CPU accounting ---------------------------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[int, list[str]] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return int(fields[1]), fields  # ppid, fields starting at `state`


def _children(pids: set[int]) -> set[int]:
    """`pids` and all their live descendants."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc_stat(int(entry))
            if stat is not None:
                parents.setdefault(stat[0], []).append(int(entry))
    found, todo = set(pids), list(pids)
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def cpu_seconds(root_pid: int) -> float:
    """CPU time of a process tree: the tree's live processes plus the reaped children of each."""
    total = 0
    for pid in _children({root_pid}):
        stat = _proc_stat(pid)
        if stat is None:
            continue
        fields = stat[1]
        # utime, stime, cutime, cstime are fields 14-17 of /proc/pid/stat (11-14 after `state`).
        total += sum(int(fields[i]) for i in (11, 12, 13, 14))
    return total / _CLK_TCK


@dataclass
class CpuMeter:
    """CPU seconds used by named process trees between `start()` and `stop()`."""

    pids: dict[str, int]
    before: dict[str, float] = field(default_factory=dict)
    used: dict[str, float] = field(default_factory=dict)
    wall: float = 0.0

    def start(self) -> None:
        """Snapshot now."""
        self.before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self.before["bench"] = _self_cpu()
        self.wall = time.perf_counter()

    def stop(self) -> dict[str, float]:
        """CPU seconds per tree since `start()` (plus `bench`: this process)."""
        self.wall = time.perf_counter() - self.wall
        now = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        now["bench"] = _self_cpu()
        self.used = {name: now[name] - self.before.get(name, 0.0) for name in now}
        return self.used


def _self_cpu() -> float:
    times = os.times()
    return times.user + times.system


# --- the stack --------------------------------------------------------------------------------------


class TimedModelServer:
    """`bench/timed_model_server.py` in its own process: the scripted model, timed as it sees requests."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", trust_env=False, timeout=30)

    @property
    def base_url(self) -> str:
        """For THREADLINE_MODEL_BASE_URL / the openai client."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def pid(self) -> int:
        """Its process id."""
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> None:
        """Start and wait until it answers."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, str(BENCH_DIR / "timed_model_server.py"), str(self.port)],
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         cwd=PROJECT_ROOT, start_new_session=True, preexec_fn=die_with_parent)
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if self.http.get("/healthz").status_code == 200:
                    return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"timed model server did not start; see {self.log_path}")
            time.sleep(0.05)

    def timings(self) -> dict[str, list[float]]:
        """Server-side seconds per marker token since the last call."""
        data: dict[str, list[float]] = self.http.get("/bench/timings").json()["timings"]
        return data

    def sample(self) -> dict[str, Any]:
        """The last request body the platform sent."""
        body: dict[str, Any] = self.http.get("/bench/sample").json()
        return body

    def stop(self) -> None:
        """SIGTERM and wait."""
        self.http.close()
        if self.proc is not None:
            terminate(self.proc, 10)


class BenchStack:
    """The local stack for a bench: a fresh test-mode stack (throw-away data) with the timed model server.

    `services` limits which service processes start (the runs bench needs no search workers).
    """

    def __init__(self, *, services: Sequence[str], name: str, env: dict[str, str] | None = None,
                 service_env: dict[str, dict[str, str]] | None = None) -> None:
        self.name = name
        self.services = tuple(services)
        self.extra_env = env or {}
        self.service_env = service_env or {}
        self.model: TimedModelServer | None = None
        self.stack: Stack | None = None

    def __enter__(self) -> Self:
        started = time.monotonic()
        config = StackConfig.from_env("test", services=self.services, common_env=dict(self.extra_env),
                                      service_env=dict(self.service_env))
        self.model = TimedModelServer(config.logs_dir / "timed_model_server.log")
        try:
            self.model.start()
            config.model_base_url = self.model.base_url
            config.model_api_key = "sk-bench"
            self.stack = Stack(config, report=lambda line: log(f"  {line}"))
            log(f"starting the stack for bench {self.name} ({', '.join(self.services)}) ...")
            self.stack.start()
        except BaseException:
            self.model.stop()
            raise
        log(f"stack ready in {time.monotonic() - started:.1f}s (logs in {config.logs_dir})")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.stack is not None:
            self.stack.stop()
        if self.model is not None:
            self.model.stop()

    @property
    def running(self) -> Stack:
        """The started stack."""
        assert self.stack is not None
        return self.stack

    @property
    def timed_model(self) -> TimedModelServer:
        """The started model server."""
        assert self.model is not None
        return self.model

    def component_pids(self) -> dict[str, int]:
        """Root pid of every component we can account CPU to (services, broker, Postgres, model server)."""
        stack = self.running
        pids = {proc.name: proc.pid for proc in stack.processes if proc.pid is not None}
        if stack.broker is not None and stack.broker.pid is not None:
            pids["tansu"] = stack.broker.pid
        data_dir = getattr(stack.database, "data_dir", None)
        if data_dir is not None:
            with contextlib.suppress(OSError, ValueError, IndexError):
                pids["postgres"] = int((Path(data_dir) / "postmaster.pid").read_text().splitlines()[0])
        pids["model_server"] = self.timed_model.pid
        return pids


@contextlib.contextmanager
def py_spy(pids: dict[str, int], out_dir: Path, *, rate: int = 200, native: bool = False) -> Iterator[list[Path]]:
    """Record py-spy profiles (speedscope-free: collapsed stacks) of `pids` while the block runs."""
    exe = Path(sys.executable).parent / "py-spy"
    procs: list[subprocess.Popen[bytes]] = []
    files: list[Path] = []
    if not exe.exists():
        log("py-spy is not installed (.venv/bin/pip install py-spy); profiling skipped")
        yield files
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, pid in pids.items():
        path = out_dir / f"{name}.collapsed"
        files.append(path)
        cmd = [str(exe), "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "--output", str(path),
               "--nonblocking"]
        if native:
            cmd.append("--native")
        procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
    time.sleep(1.0)  # let py-spy attach
    try:
        yield files
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(2)  # SIGINT: py-spy writes the profile and exits
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


_LINE = re.compile(r":\d+\)$")
_LOOP_FRAMES = ("Runner.run ", "run (uvloop", "BaseEventLoop.run_until_complete", "BaseEventLoop.run_forever",
                "BaseEventLoop._run_once", "Handle._run", "asyncio_run ")


def profile_summary(path: Path, limit: int = 15) -> list[tuple[str, float]]:
    """Share of samples per asyncio task entry point (the first frame under the event loop), inclusive.

    py-spy's leaf view is dominated by the event loop's native code; grouping by what the loop was
    running (a consumer, the model call, a request handler, the outbox relay) says where CPU goes.
    """
    counts: dict[str, int] = {}
    total = 0
    if not path.exists():
        return []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [_LINE.sub(")", f) for f in stack.split(";")]
        inside = [i for i, f in enumerate(frames) if f.startswith(_LOOP_FRAMES)]
        rest = frames[inside[-1] + 1:] if inside else frames
        key = rest[0] if rest else "(event loop, native code)"
        counts[key] = counts.get(key, 0) + int(count)
        total += int(count)
    ranked = sorted(counts.items(), key=lambda kv: kv[1], reverse=True)[:limit]
    return [(name, n / total) for name, n in ranked] if total else []
