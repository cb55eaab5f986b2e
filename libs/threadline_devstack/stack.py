"""The whole local stack: broker, Postgres, Qdrant location, model server, and the five service processes."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

import httpx

from threadline_devstack._proc import (
    PROJECT_ROOT,
    STATE_DIR,
    die_with_parent,
    free_port,
    pid_alive,
    port_open,
    run_async,
    tail,
    terminate,
)
from threadline_devstack.broker import TansuBroker, wait_groups_settled
from threadline_devstack.model_server import ScriptedModelServer
from threadline_devstack.postgres import (
    TEST_TUNING,
    Database,
    EmbeddedPostgres,
    ExternalPostgres,
    stop_stale_server,
)

SERVICES = ("gateway", "run_orchestrator", "tool_executor", "ingestion", "notifier")
"""The five services, each run as `python -m <name>`."""

DEFAULT_PORTS = {"gateway": 8080, "run_orchestrator": 9101, "tool_executor": 9102, "ingestion": 9103,
                 "notifier": 9104}
"""Ports `make run` uses (the gateway's API port; the ops port of the others)."""

CONSUMER_GROUPS = {"run_orchestrator": ("run-orchestrator", "models"), "tool_executor": ("tool-executor",),
                   "ingestion": ("ingestion", "search"), "notifier": ("notifier",)}
"""The Kafka consumer groups each service joins (`CONSUMER_GROUP`s in services/*/app.py)."""

GROUP_SETTLE_TIMEOUT = 60.0
"""How long a stopped instance's consumer groups may take to rebalance among the instances left."""

SEARCH_WORKERS = "search_workers"
"""Name of the single process running tool_executor and ingestion together (Qdrant local mode)."""

DEFAULT_API_KEY = "sk-threadline-local"

Mode = Literal["run", "test"]


class StackError(RuntimeError):
    """A component of the stack failed to start."""


def _noop(_: str) -> None:
    return None


class ServiceProcess:
    """One service instance as a child process, with its log file and readiness probe."""

    def __init__(self, *, name: str, command: list[str], env: dict[str, str], port: int, log_path: Path,
                 ready_ports: Iterable[int] | None = None, aliases: Iterable[str] = (),
                 after_stop: Callable[[], None] | None = None) -> None:
        """`after_stop` runs after each graceful stop of the running process (see `stop`)."""
        self.name = name
        self.command = command
        self.env = env
        self.port = port
        self.ready_ports = list(ready_ports or [port])
        self.aliases = tuple(aliases)
        self.log_path = log_path
        self.after_stop = after_stop
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """Pid of the running process (None if never started)."""
        return self.proc.pid if self.proc else None

    @property
    def returncode(self) -> int | None:
        """Exit code once it exited, else None."""
        return self.proc.poll() if self.proc else None

    @property
    def url(self) -> str:
        """http://127.0.0.1:<port> (API for the gateway, ops server for the others)."""
        return f"http://127.0.0.1:{self.port}"

    def running(self) -> bool:
        """True while the process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def start(self, *, wait: bool = True, timeout: float = 60.0) -> None:
        """Spawn the process (output appended to its log) and, by default, wait until /readyz is 200.

        The process is SIGTERMed when the thread that calls this ends (`die_with_parent`): start from a thread that
        outlives it (a chaos or rolling-restart driver in a short-lived thread stops what it restarted)."""
        if self.running():
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {self.name}: "
                      f"{' '.join(self.command)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env, cwd=PROJECT_ROOT, start_new_session=True,
                                         preexec_fn=die_with_parent)
        if wait:
            self.wait_ready(timeout)

    def is_ready(self, client: httpx.Client | None = None) -> bool:
        """True when every /readyz of this process answers 200 (from this pid: a port may have been taken since)."""
        own = client or httpx.Client(trust_env=False, timeout=2.0)
        try:
            return all(self._answers_ready(own.get(f"http://127.0.0.1:{p}/readyz")) for p in self.ready_ports)
        except httpx.HTTPError:
            return False
        finally:
            if client is None:
                own.close()

    def _answers_ready(self, response: httpx.Response) -> bool:
        try:
            return response.status_code == 200 and response.json().get("pid") == self.pid
        except ValueError:  # not JSON: some other program holds the port
            return False

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Poll /readyz until 200; raise StackError (with the log tail) if it exits or times out."""
        deadline = time.monotonic() + timeout
        with httpx.Client(trust_env=False, timeout=2.0) as client:
            while True:
                if not self.running():
                    raise StackError(f"{self.name} exited with code {self.returncode} before it was ready; "
                                     f"log {self.log_path}:\n{self.log_tail()}")
                if self.is_ready(client):
                    return
                if time.monotonic() > deadline:
                    raise StackError(f"{self.name} not ready after {timeout:.0f}s; log {self.log_path}:\n"
                                     f"{self.log_tail()}")
                time.sleep(0.1)

    def signal(self, sig: signal.Signals) -> None:
        """Send a signal to the process (if alive)."""
        if self.running() and self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0, *, settle: bool = True) -> int | None:
        """Graceful stop: SIGTERM, wait up to `timeout`, then SIGKILL. Returns the exit code.

        `settle`: then run `after_stop` (the stack waits there until the instances left have rebalanced)."""
        if self.proc is None:
            return None
        was_running = self.proc.poll() is None
        started = time.monotonic()
        code = terminate(self.proc, timeout)
        if was_running and code == -signal.SIGKILL:
            self._note(f"did not exit within {timeout:.0f}s of SIGTERM; killed")
        elif was_running:
            self._note(f"exited with code {code} {time.monotonic() - started:.1f}s after SIGTERM")
        if was_running and settle and self.after_stop is not None:
            self.after_stop()
        return code

    def _note(self, text: str) -> None:
        with contextlib.suppress(OSError), self.log_path.open("a") as log:
            log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {self.name} {text}\n")

    def kill(self) -> int | None:
        """Crash it: SIGKILL and reap. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        return self.proc.wait()

    def restart(self, *, wait: bool = True, timeout: float = 60.0) -> None:
        """Graceful stop, then start again with the same command, env and port."""
        self.stop()
        self.start(wait=wait, timeout=timeout)

    def log_tail(self, lines: int = 60) -> str:
        """The last lines of the process log."""
        return tail(self.log_path, lines)

    def __repr__(self) -> str:
        return f"ServiceProcess({self.name!r}, pid={self.pid}, port={self.port})"


@dataclass
class StackConfig:
    """What to start and where; `from_env` fills it for make run or a test session."""

    mode: Mode
    state_dir: Path
    logs_dir: Path
    api_key: str = DEFAULT_API_KEY
    gateway_port: int | None = None
    fixed_ports: bool = False
    database_url: str | None = None
    kafka_bootstrap_servers: str | None = None
    qdrant_url: str | None = None
    model_base_url: str | None = None
    model_api_key: str | None = None
    services: tuple[str, ...] = SERVICES
    common_env: dict[str, str] = field(default_factory=dict)
    service_env: dict[str, dict[str, str]] = field(default_factory=dict)
    topic_partitions: int = 6
    ready_timeout: float = 180.0
    stop_timeout: float = 30.0
    cleanup_state: bool = False

    @classmethod
    def from_env(cls, mode: Mode, environ: Mapping[str, str] | None = None, **overrides: object) -> "StackConfig":
        """make run: fixed ports, persistent data under .threadline/; tests: free ports, a throw-away dir."""
        env = dict(os.environ if environ is None else environ)
        if mode == "run":
            base: dict[str, object] = {
                "state_dir": STATE_DIR, "logs_dir": STATE_DIR / "logs", "fixed_ports": True,
                "gateway_port": int(env.get("THREADLINE_PORT") or DEFAULT_PORTS["gateway"]),
                "model_base_url": env.get("THREADLINE_MODEL_BASE_URL") or None,
                "model_api_key": env.get("THREADLINE_MODEL_API_KEY") or None,
                # Local development: webhooks may reach receivers on this machine (production refuses loopback).
                "common_env": {"THREADLINE_WEBHOOK_ALLOWED_NETWORKS":
                               env.get("THREADLINE_WEBHOOK_ALLOWED_NETWORKS") or "127.0.0.0/8,::1/128"},
                # ... and images that messages link to may be served from it (for a model server that takes data URLs).
                "service_env": {"run_orchestrator": {"THREADLINE_IMAGE_FETCH_ALLOWED_NETWORKS":
                                                     env.get("THREADLINE_IMAGE_FETCH_ALLOWED_NETWORKS")
                                                     or "127.0.0.0/8,::1/128"}},
            }
        else:
            session = f"test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
            base = {"state_dir": STATE_DIR / "tmp" / session, "logs_dir": STATE_DIR / "test-logs" / session,
                    "cleanup_state": True, "stop_timeout": 15.0}
        base.update({
            "api_key": env.get("THREADLINE_API_KEY") or DEFAULT_API_KEY,
            "database_url": env.get("DATABASE_URL") or None,
            "kafka_bootstrap_servers": env.get("KAFKA_BOOTSTRAP_SERVERS") or None,
            "qdrant_url": env.get("QDRANT_URL") or None,
            "topic_partitions": int(env.get("THREADLINE_TOPIC_PARTITIONS") or 6),
        })
        base.update(overrides)
        return cls(mode=mode, **base)  # type: ignore[arg-type]


class Stack:
    """Starts everything in order and stops it in reverse; every child dies with it (no orphans)."""

    def __init__(self, config: StackConfig, *, report: Callable[[str], None] = _noop) -> None:
        self.config = config
        self.report = report
        self.broker: TansuBroker | None = None
        self.database: Database | None = None
        self.model: ScriptedModelServer | None = None
        self.processes: list[ServiceProcess] = []
        self.services: dict[str, ServiceProcess] = {}
        self.kafka_bootstrap_servers = config.kafka_bootstrap_servers or ""
        self.database_url = ""
        self.qdrant_url = config.qdrant_url or ""
        self.qdrant_path = "" if config.qdrant_url else str(config.state_dir / "qdrant")
        self.model_base_url = config.model_base_url or ""
        self.model_api_key = config.model_api_key or ""
        self._extra_count: dict[str, int] = {}
        self._started = False

    # --- public facts -------------------------------------------------------------------------

    @property
    def api_key(self) -> str:
        """The bearer key the gateway accepts (project proj_local)."""
        return self.config.api_key

    @property
    def gateway(self) -> ServiceProcess:
        """The gateway process."""
        return self.services["gateway"]

    @property
    def gateway_url(self) -> str:
        """http://127.0.0.1:<port> of the gateway (no /v1)."""
        return self.gateway.url

    @property
    def base_url(self) -> str:
        """The API base URL for the openai SDK (http://127.0.0.1:<port>/v1)."""
        return f"{self.gateway_url}/v1"

    @property
    def logs_dir(self) -> Path:
        """Where each process writes <name>.log."""
        return self.config.logs_dir

    def service(self, name: str) -> ServiceProcess:
        """The process running `name` (tool_executor and ingestion may share one: search_workers)."""
        return self.services[name]

    # --- start / stop -------------------------------------------------------------------------

    def start(self) -> Self:
        """Start every component; on any failure stop what was started and raise StackError."""
        self._started = True
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        cfg = self.config
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        cfg.logs_dir.mkdir(parents=True, exist_ok=True)
        if cfg.mode == "test":
            sweep_stale_sessions()
        if cfg.fixed_ports:
            self._check_ports_free()
        if not cfg.kafka_bootstrap_servers:
            self.broker = TansuBroker(log_path=cfg.logs_dir / "broker.log")
            self.broker.start()
            self.kafka_bootstrap_servers = self.broker.bootstrap_servers
            self.report(f"broker            tansu (Kafka protocol) at {self.kafka_bootstrap_servers}")
        else:
            self.report(f"broker            Kafka at {self.kafka_bootstrap_servers} (KAFKA_BOOTSTRAP_SERVERS)")
        self.database = self._make_database()
        self.database.start()
        self.database_url = self.database.dsn
        self.report(f"postgres          {self.database.description}")
        self.report(f"qdrant            {self.qdrant_url or 'local mode at ' + self.qdrant_path}")
        if not cfg.model_base_url:
            self.model = ScriptedModelServer(auto_tools=cfg.mode == "run")
            self.model.start()
            self.model_base_url = self.model.base_url
            self.model_api_key = self.model.api_key
            self.report(f"model             {self.model.description}")
        else:
            self.report(f"model             {self.model_base_url} (THREADLINE_MODEL_BASE_URL)")
        self._prepare_data()
        self._build_processes()
        for proc in self.processes:
            proc.start(wait=False)
        self._wait_all_ready(self.processes, cfg.ready_timeout)
        for proc in self.processes:
            self.report(f"{proc.name:<17} pid {proc.pid}, port {','.join(map(str, proc.ready_ports))}, "
                        f"log {proc.log_path}")

    def revive_broker(self) -> bool:
        """Start our tansu again on its port, with the topics, if it died; True if it had.

        Its storage is memory: topics, committed offsets and every record not yet consumed died with it. The
        services reconnect by themselves, and the outbox keeps what was not yet published, but events the broker
        had acknowledged and nobody had consumed are gone (`scripts/run_local.py` says what recovers)."""
        if self.broker is None or self.broker.running():
            return False
        self.broker.start()
        from threadline_core.kafka import ensure_topics
        from threadline_core.topics import ALL_TOPICS

        run_async(ensure_topics(self.kafka_bootstrap_servers, ALL_TOPICS, self.config.topic_partitions))
        return True

    def _check_ports_free(self) -> None:
        busy = [f"{name} {port}" for name, port in self._fixed_ports().items() if port_open("127.0.0.1", port)]
        if busy:
            raise StackError("ports already in use (is another `make run` running?): " + ", ".join(busy))

    def _fixed_ports(self) -> dict[str, int]:
        ports = {name: DEFAULT_PORTS[name] for name in self.config.services}
        if "gateway" in ports and self.config.gateway_port:
            ports["gateway"] = self.config.gateway_port
        return ports

    def _make_database(self) -> Database:
        cfg = self.config
        if cfg.database_url:
            return ExternalPostgres(cfg.database_url, fresh_database=cfg.mode == "test")
        if cfg.mode == "run":
            return EmbeddedPostgres(cfg.state_dir / "pgdata")
        return EmbeddedPostgres(cfg.state_dir / "pgdata", settings=TEST_TUNING)

    def _prepare_data(self) -> None:
        """Migrations and topics exist before any service starts."""
        from threadline_core.db import run_migrations
        from threadline_core.kafka import ensure_topics
        from threadline_core.topics import ALL_TOPICS

        applied = run_async(run_migrations(self.database_url))
        if applied:
            self.report(f"migrations        applied {', '.join(applied)}")
        run_async(ensure_topics(self.kafka_bootstrap_servers, ALL_TOPICS, self.config.topic_partitions))

    def _port_for(self, name: str) -> int:
        if self.config.fixed_ports:
            return self._fixed_ports()[name]
        return free_port()

    def service_env(self, name: str, port: int, instance: str) -> dict[str, str]:
        """The environment of one service process."""
        cfg = self.config
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
        env.update({
            "PYTHONUNBUFFERED": "1",
            "DO_NOT_TRACK": "1",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
            "DATABASE_URL": self.database_url,
            "KAFKA_BOOTSTRAP_SERVERS": self.kafka_bootstrap_servers,
            "QDRANT_URL": self.qdrant_url,
            "THREADLINE_QDRANT_PATH": self.qdrant_path,
            "THREADLINE_MODEL_BASE_URL": self.model_base_url,
            "THREADLINE_API_KEY": cfg.api_key,
            "THREADLINE_HOST": "127.0.0.1",
            "THREADLINE_PORT": str(port),
            "THREADLINE_INSTANCE_ID": instance,
            "THREADLINE_TOPIC_PARTITIONS": str(cfg.topic_partitions),
        })
        if self.model_api_key:
            env["THREADLINE_MODEL_API_KEY"] = self.model_api_key
        env.update(cfg.common_env)
        env.update(cfg.service_env.get(name, {}))
        return env

    def _build_processes(self) -> None:
        python = sys.executable
        names = list(self.config.services)
        combined = not self.qdrant_url and "tool_executor" in names and "ingestion" in names
        for name in names:
            if combined and name == "ingestion":
                continue
            if combined and name == "tool_executor":
                te_port, in_port = self._port_for("tool_executor"), self._port_for("ingestion")
                env = {**self.service_env("tool_executor", te_port, "search-workers-1"),
                       **self.config.service_env.get("ingestion", {}),
                       "THREADLINE_TOOL_EXECUTOR_PORT": str(te_port), "THREADLINE_INGESTION_PORT": str(in_port)}
                proc = ServiceProcess(name=SEARCH_WORKERS, command=[python, str(PROJECT_ROOT / "scripts" /
                                                                                "search_workers.py")],
                                      env=env, port=te_port, ready_ports=[te_port, in_port],
                                      log_path=self.logs_dir / f"{SEARCH_WORKERS}.log",
                                      aliases=("tool_executor", "ingestion"),
                                      after_stop=self._settler("tool_executor", "ingestion"))
            else:
                port = self._port_for(name)
                proc = ServiceProcess(name=name, command=[python, "-m", name],
                                      env=self.service_env(name, port, f"{name}-1"), port=port,
                                      log_path=self.logs_dir / f"{name}.log", after_stop=self._settler(name))
            self.processes.append(proc)
            self.services[proc.name] = proc
            for alias in proc.aliases:
                self.services[alias] = proc

    def start_extra(self, name: str, *, env: Mapping[str, str] | None = None, wait: bool = True) -> ServiceProcess:
        """Start one more instance of a service on its own free port (e.g. a second run_orchestrator)."""
        if name not in SERVICES:
            raise ValueError(f"unknown service {name!r}")
        if name in ("tool_executor", "ingestion") and not self.qdrant_url:
            raise StackError("Qdrant local mode is single-process: a second instance needs QDRANT_URL")
        count = self._extra_count.get(name, 1) + 1
        self._extra_count[name] = count
        port = free_port()
        proc = ServiceProcess(name=f"{name}-{count}", command=[sys.executable, "-m", name],
                              env={**self.service_env(name, port, f"{name}-{count}"), **(env or {})},
                              port=port, log_path=self.logs_dir / f"{name}-{count}.log",
                              after_stop=self._settler(name))
        self.processes.append(proc)
        proc.start(wait=wait, timeout=self.config.ready_timeout)
        return proc

    @contextlib.contextmanager
    def extra_instance(self, name: str, *, env: Mapping[str, str] | None = None) -> Iterator[ServiceProcess]:
        """`start_extra` for a `with` block: stopped at its end and forgotten, so what runs later sees only the
        stack's own services."""
        proc = self.start_extra(name, env=env)
        try:
            yield proc
        finally:
            proc.stop()
            self.processes.remove(proc)

    def _settler(self, *services: str) -> Callable[[], None]:
        """After an instance of `services` leaves its consumer groups, wait until the instances left rebalanced.

        Another instance leaving meanwhile would meet tansu's trap (`wait_groups_settled`)."""
        groups = [group for service in services for group in CONSUMER_GROUPS.get(service, ())]

        def settle() -> None:
            if groups and self.kafka_bootstrap_servers:
                run_async(wait_groups_settled(self.kafka_bootstrap_servers, groups, GROUP_SETTLE_TIMEOUT))
        return settle

    def _wait_all_ready(self, procs: list[ServiceProcess], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = list(procs)
        with httpx.Client(trust_env=False, timeout=2.0) as client:
            while pending:
                for proc in list(pending):
                    if not proc.running():
                        raise StackError(f"{proc.name} exited with code {proc.returncode} during start-up; "
                                         f"log {proc.log_path}:\n{proc.log_tail()}")
                    if proc.is_ready(client):
                        pending.remove(proc)
                if pending and time.monotonic() > deadline:
                    details = "\n".join(f"--- {p.name} ({p.log_path}):\n{p.log_tail()}" for p in pending)
                    raise StackError(f"not ready after {timeout:.0f}s: "
                                     f"{', '.join(p.name for p in pending)}\n{details}")
                if pending:
                    time.sleep(0.1)

    def stop(self) -> None:
        """Stop services (SIGTERM together, then wait), then the model server, broker and database."""
        for proc in self.processes:
            proc.signal(signal.SIGTERM)
        deadline = time.monotonic() + self.config.stop_timeout
        for proc in self.processes:
            proc.stop(max(0.5, deadline - time.monotonic()), settle=False)
        if self.model is not None:
            with contextlib.suppress(Exception):
                self.model.stop()
            self.model = None
        if self.broker is not None:
            self.broker.stop()
            self.broker = None
        if self.database is not None:
            database, self.database = self.database, None
            try:
                database.stop()
            except Exception as exc:
                self.report(f"postgres did not stop cleanly: {exc}")
        if self.config.cleanup_state and self._started:
            shutil.rmtree(self.config.state_dir, ignore_errors=True)
            prune_test_logs()
        self._started = False

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def sweep_stale_sessions() -> None:
    """Remove test state dirs whose pytest process died without cleaning up (stop their Postgres)."""
    root = STATE_DIR / "tmp"
    if not root.is_dir():
        return
    for path in root.iterdir():
        parts = path.name.split("-")
        if len(parts) < 3 or parts[0] != "test" or not parts[1].isdigit():
            continue
        if pid_alive(int(parts[1])):
            continue
        stop_stale_server(path / "pgdata")
        shutil.rmtree(path, ignore_errors=True)


def prune_test_logs(keep: int = 10) -> None:
    """Keep the logs of the last `keep` test sessions."""
    root = STATE_DIR / "test-logs"
    if not root.is_dir():
        return
    sessions = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in sessions[keep:]:
        shutil.rmtree(old, ignore_errors=True)
