"""Start the sandbox supervisor in its namespaces, stream its output under limits, collect its results."""

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from threadline_core.slots import FairSlots
from threadline_sandbox.inputs import sandbox_names
from threadline_sandbox.models import ErrorKind, Isolation, SandboxFile, SandboxLimits, SandboxResult

_log = logging.getLogger(__name__)

_SUPERVISOR = Path(__file__).with_name("_supervisor.py")
_UNSHARE_FLAGS = ("--net", "--pid", "--ipc", "--uts", "--fork", "--kill-child", "--mount", "--propagation",
                  "private", "--mount-proc")
_SANDBOX_UID_BASE = 200_000
_SANDBOX_UID_SPAN = 800_000
_GRACE_SECONDS = 5.0
_MAX_STATUS_BYTES = 1 << 20
_CHUNK = 65536
_SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
_SCRATCH_PREFIX = "threadline-sandbox-"
_STRENGTH = {Isolation.PROCESS: 0, Isolation.USER_NAMESPACES: 1, Isolation.NAMESPACES: 2}
_UNSAFE_IN_NAMES = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")
"""Replaced by U+FFFD in generated names (as storable_text marks what it cannot store): control characters start
terminal escape sequences or forge lines, and bidi controls show a name reversed (`\u202etxt.exe` reads `exe.txt`)."""


def stronger_or_equal(have: Isolation, want: Isolation) -> bool:
    """True when `have` isolates at least as much as `want`."""
    return _STRENGTH[have] >= _STRENGTH[want]


def sweep_scratch(root: str | None, max_age_seconds: float = 3600.0) -> int:
    """Remove scratch folders left by a killed process (older than any run can last); return how many."""
    folder = root or tempfile.gettempdir()
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    now = time.time()
    for entry in entries:
        if not entry.name.startswith(_SCRATCH_PREFIX):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        stale = now - info.st_mtime > max_age_seconds
        if stale and entry.is_dir(follow_symlinks=False) and info.st_uid == os.geteuid():
            shutil.rmtree(entry.path, ignore_errors=True)
            removed += 1
    return removed


def _unshare_command(isolation: Isolation) -> list[str]:
    unshare = shutil.which("unshare") or "unshare"
    user = ["--user", "--map-root-user"] if isolation is Isolation.USER_NAMESPACES else []
    return [unshare, *user, *_UNSHARE_FLAGS, "--"]


def probe_isolation() -> Isolation:
    """The strongest isolation this host allows (runs `unshare ... true` once or twice)."""
    if shutil.which("unshare") is None:
        return Isolation.PROCESS
    candidates = [Isolation.NAMESPACES] if os.geteuid() == 0 else []
    candidates.append(Isolation.USER_NAMESPACES)
    for isolation in candidates:
        try:
            done = subprocess.run([*_unshare_command(isolation), "true"], stdin=subprocess.DEVNULL,
                                  capture_output=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return isolation
        _log.info("sandbox isolation %s unavailable: %s", isolation.value, done.stderr.decode(errors="replace")[:200])
    return Isolation.PROCESS


def _safe_names(files: dict[str, bytes]) -> dict[str, bytes]:
    """Input file names reduced to a unique, harmless basename each (`sandbox_names`)."""
    return dict(zip(sandbox_names(files), files.values(), strict=True))


def _interpreter_paths() -> list[str]:
    """Folders the sandboxed interpreter reads (stdlib, venv, site-packages, editable installs)."""
    paths = {sys.base_prefix, sys.prefix, sys.exec_prefix, sys.base_exec_prefix}
    paths.update(p for p in sys.path if p and os.path.isabs(p))
    return sorted(paths)


def _reachable(paths: list[str]) -> bool:
    """True when another uid can search every directory on the way to each path."""
    for path in paths:
        current = "/"
        for part in os.path.realpath(path).strip("/").split("/"):
            current = os.path.join(current, part)
            try:
                mode = os.stat(current).st_mode
            except OSError:
                break
            if os.path.isdir(current) and not mode & 0o001:
                return False
    return True


def _count_tasks(uid: int) -> int:
    """Tasks (threads included) that the real uid owns right now: RLIMIT_NPROC counts them all."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status") as handle:
                fields = dict(line.split(":", 1) for line in handle if ":" in line)
        except OSError:
            continue
        if int(fields.get("Uid", "-1").split()[0]) == uid:
            total += int(fields.get("Threads", "1").strip() or 1)
    return total


async def _read_limited(stream: asyncio.StreamReader, sink: bytearray, budget: list[int],
                        overflow: asyncio.Event) -> None:
    """Append what the stream produces while the shared budget lasts; flag what goes beyond it, and read (dropping
    it) to the end: a pipe nobody reads keeps the event loop from seeing the killed child's exit, which held the
    call (and its sandbox slot) for seconds."""
    while chunk := await stream.read(_CHUNK):
        keep = min(len(chunk), budget[0])
        sink.extend(chunk[:keep])
        budget[0] -= keep
        if keep < len(chunk):
            overflow.set()


async def _read_pipe(fd: int) -> bytes:
    """Read a pipe's read end until EOF without blocking the loop; nothing when it holds more than 1 MiB: no status
    is that long, and the first MiB of a longer stream was taken for the whole (a status padded past it parsed)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=_MAX_STATUS_BYTES)
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                                os.fdopen(fd, "rb", buffering=0))
    try:
        data = b""
        while chunk := await reader.read(_CHUNK):
            data += chunk
            if len(data) > _MAX_STATUS_BYTES:
                return b""
        return data
    finally:
        transport.close()


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


@dataclass(frozen=True)
class _Program:
    """The code to run, after the session's earlier cells."""

    code: str
    session: tuple[str, ...]


class Sandbox:
    """Runs untrusted Python in a separate, limited, network-less process; one instance per service."""

    def __init__(self, *, scratch_root: str | None = None, isolation: Isolation | None = None,
                 python: str | None = None, max_concurrency: int = 2, max_per_tenant: int | None = None) -> None:
        """`max_concurrency` sandboxes at once, at most `max_per_tenant` of them one tenant's (default: no cap)."""
        self._scratch_root = os.path.abspath(scratch_root) if scratch_root else None
        self._isolation = isolation
        self._python = python or sys.executable
        self._slots = FairSlots(max_concurrency, max_per_tenant)
        self._probe_lock = asyncio.Lock()
        self._swept = False

    async def isolation(self) -> Isolation:
        """The isolation used (probed once, on first use)."""
        async with self._probe_lock:
            if not self._swept:
                self._swept = True
                removed = await asyncio.to_thread(sweep_scratch, self._scratch_root)
                if removed:
                    _log.info("removed %d stale sandbox scratch folder(s)", removed)
            if self._isolation is None:
                self._isolation = await asyncio.to_thread(probe_isolation)
                _log.info("sandbox isolation: %s", self._isolation.value)
            return self._isolation

    async def run_python(self, code: str, files: dict[str, bytes] | None = None,
                         limits: SandboxLimits | None = None, *, tenant: str = "",
                         session: Sequence[str] = ()) -> SandboxResult:
        """Run `code` with `files` in its working directory; never raises for anything the code does. `session`:
        earlier cells run silently first, so their variables and files are there (a stateful session). Slots are
        shared fairly between tenants (see `FairSlots`)."""
        limits = limits or SandboxLimits()
        isolation = await self.isolation()
        async with self._slots.slot(tenant):
            if self._scratch_root:
                await asyncio.to_thread(os.makedirs, self._scratch_root, exist_ok=True)
            base = await asyncio.to_thread(tempfile.mkdtemp, prefix=_SCRATCH_PREFIX,
                                          dir=self._scratch_root)
            try:
                return await self._run(Path(base), _Program(code, tuple(session)), files or {}, limits, isolation)
            finally:
                await asyncio.to_thread(shutil.rmtree, base, ignore_errors=True)

    def _layout(self, base: Path, files: dict[str, bytes], limits: SandboxLimits, isolation: Isolation,
                program: _Program, status_fd: int) -> tuple[list[str], int | None]:
        """Write inputs and the supervisor's config; return the command and the sandbox uid (if any)."""
        drop_uid = os.geteuid() == 0 and (isolation is Isolation.NAMESPACES or _reachable(_interpreter_paths()))
        uid = _SANDBOX_UID_BASE + secrets.randbelow(_SANDBOX_UID_SPAN) if drop_uid else None
        in_dir, out_dir = base / "in", base / "out"
        in_dir.mkdir(mode=0o700)
        out_dir.mkdir(mode=0o700)
        for name, data in _safe_names(files).items():
            (in_dir / name).write_bytes(data)
        namespaced = isolation is not Isolation.PROCESS
        if uid is not None:
            os.chown(out_dir, uid, uid)
        if not namespaced and uid is not None:
            base.chmod(0o711)
        if uid is not None or isolation is Isolation.USER_NAMESPACES:
            nproc = limits.max_processes + 1
        else:
            nproc = _count_tasks(os.getuid()) + limits.max_processes + 1
        config: dict[str, Any] = {
            "code": program.code,
            "session_cells": list(program.session),
            "status_fd": status_fd,
            "uid": uid,
            "gid": uid,
            "mounts": namespaced,
            "in_dir": str(in_dir),
            "out_dir": str(out_dir),
            "data_dir": "/mnt/data" if namespaced else str(base / "work"),
            "ctl_dir": "/tmp/.threadline" if namespaced else str(base / "ctl"),
            "tmp_dir": "/tmp" if namespaced else str(base / "ctl"),
            "block_network_in_process": not namespaced,
            "nproc": nproc,
            "expose_paths": _interpreter_paths(),
            "limits": asdict(limits),
        }
        config_path = base / "config.json"
        config_path.write_text(json.dumps(config))
        command = [self._python, "-I", "-B", "-u", str(_SUPERVISOR), str(config_path)]
        if namespaced:
            command = [*_unshare_command(isolation), *command]
        return command, uid

    async def _run(self, base: Path, program: _Program, files: dict[str, bytes], limits: SandboxLimits,
                   isolation: Isolation) -> SandboxResult:
        status_r, status_w = os.pipe()
        try:
            command, _ = await asyncio.to_thread(self._layout, base, files, limits, isolation, program, status_w)
            env = {"PATH": _SAFE_PATH, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "OPENBLAS_NUM_THREADS": "1",
                   "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NUMEXPR_NUM_THREADS": "1"}
            started = time.monotonic()
            proc = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, pass_fds=(status_w,), start_new_session=True, env=env,
                cwd=str(base))
        except BaseException:
            os.close(status_r)
            raise
        finally:
            os.close(status_w)
        status_task = asyncio.create_task(_read_pipe(status_r))
        try:
            return await self._supervise(proc, status_task, base, limits, isolation, started)
        finally:
            _kill_group(proc.pid)
            if not status_task.done():
                status_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await status_task

    async def _supervise(self, proc: asyncio.subprocess.Process, status_task: "asyncio.Task[bytes]", base: Path,
                         limits: SandboxLimits, isolation: Isolation, started: float) -> SandboxResult:
        """Stream the output under the limits, enforce the wall clock, then read the status and files."""
        assert proc.stdout is not None and proc.stderr is not None
        stdout, stderr = bytearray(), bytearray()
        budget = [limits.output_bytes]
        overflow = asyncio.Event()
        readers = [asyncio.create_task(_read_limited(proc.stdout, stdout, budget, overflow)),
                   asyncio.create_task(_read_limited(proc.stderr, stderr, budget, overflow))]
        waiter = asyncio.create_task(proc.wait())
        overflow_waiter = asyncio.create_task(overflow.wait())
        deadline_hit = False
        try:
            done, _ = await asyncio.wait({waiter, overflow_waiter}, timeout=limits.wall_seconds + _GRACE_SECONDS,
                                         return_when=asyncio.FIRST_COMPLETED)
            if waiter not in done:
                deadline_hit = not overflow.is_set()
                _kill_group(proc.pid)
            await _reaped(proc, waiter)
        finally:
            overflow_waiter.cancel()
            _kill_group(proc.pid)
            if not waiter.done():
                waiter.cancel()
            _, pending = await asyncio.wait(readers, timeout=2.0)
            for task in pending:
                task.cancel()
        wall = time.monotonic() - started
        try:
            raw_status = await asyncio.wait_for(asyncio.shield(status_task), 2.0)
        except (TimeoutError, OSError):
            raw_status = b""
        try:
            parsed = json.loads(raw_status) if raw_status else {}
        except ValueError:
            parsed = {}
        status: dict[str, Any] = parsed if isinstance(parsed, dict) else {}
        manifest = status.get("files") if isinstance(status.get("files"), list) else []
        collected = await asyncio.to_thread(_read_outputs, base / "out", manifest or [], limits)
        return _result(status, stdout, stderr, overflow.is_set(), deadline_hit, wall, limits, isolation,
                       collected)


async def _reaped(proc: asyncio.subprocess.Process, waiter: "asyncio.Task[int]") -> None:
    """Wait for the killed child, bounded: a child watcher that misses the exit must not hang the call."""
    try:
        async with asyncio.timeout(_GRACE_SECONDS + 3.0):
            await asyncio.shield(waiter)
    except TimeoutError:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(proc.pid, os.WNOHANG)  # noqa: ASYNC222 (WNOHANG never blocks)
        _log.warning("sandbox child %s: exit not reported by the event loop; reaped directly", proc.pid)


def _read_outputs(out_dir: Path, manifest: list[dict[str, Any]], limits: SandboxLimits) -> list[SandboxFile]:
    """Read the files the supervisor copied out (regular files only, never following links)."""
    files: list[SandboxFile] = []
    total = 0
    for entry in manifest[:limits.max_files]:
        if not isinstance(entry, dict):
            continue
        path = str(entry.get("path", ""))
        if not path.startswith("out_") or "/" in path:
            continue
        try:
            fd = os.open(out_dir / path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        with os.fdopen(fd, "rb") as handle:
            data = handle.read(limits.max_file_bytes + 1)
        if len(data) > limits.max_file_bytes or total + len(data) > limits.max_total_file_bytes:
            continue
        total += len(data)
        name = _UNSAFE_IN_NAMES.sub("\ufffd", str(entry.get("name", path)))[:512]
        if entry.get("kind") == "figure":
            files.append(SandboxFile(name=name, data=data, kind="figure"))
        else:
            files.append(SandboxFile(name=name, data=data, kind="file"))
    return files


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0


def _result(status: dict[str, Any], stdout: bytearray, stderr: bytearray, overflow: bool, deadline_hit: bool,
            wall: float, limits: SandboxLimits, isolation: Isolation, files: list[SandboxFile]) -> SandboxResult:
    exit_code = status.get("exit_code") if isinstance(status.get("exit_code"), int) else None
    sig = status.get("signal") if isinstance(status.get("signal"), int) else None
    raw_cpu = status.get("cpu_seconds")
    cpu = float(raw_cpu) if isinstance(raw_cpu, float | int) else None
    raw_error = status.get("error")
    worker_error: dict[str, Any] = raw_error if isinstance(raw_error, dict) else {}
    kind: ErrorKind | None = None
    message: str | None = None
    if status.get("setup_error"):
        kind, message = "sandbox_error", f"Sandbox error: {status['setup_error']}"
    elif overflow:
        kind = "output_limit"
        message = f"Output limit exceeded: more than {limits.output_bytes} bytes written; execution stopped"
    elif deadline_hit or status.get("timed_out"):
        kind, message = "timeout", f"Execution timed out after {limits.wall_seconds:g} seconds"
    elif not status:
        kind, message = "sandbox_error", "Sandbox error: the sandbox process ended without a status"
    elif sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu is not None and cpu >= limits.cpu_seconds):
        kind, message = "cpu_limit", f"CPU time limit exceeded ({limits.cpu_seconds:g} seconds)"
    elif sig is not None:
        kind, message = "killed", f"Execution killed by signal {_signal_name(sig)}"
    elif exit_code not in (0, None):
        error_type = str(worker_error.get("type", ""))
        text = str(worker_error.get("message") or f"Execution failed with exit code {exit_code}")
        if error_type == "MemoryError" or error_type.endswith("MemoryError"):
            kind = "memory_limit"
            message = f"{text} (memory limit {limits.memory_bytes // (1 << 20)} MB)"
        elif error_type == "BlockingIOError" or "can't start new thread" in text:
            kind = "process_limit"
            message = f"{text} (process limit {limits.max_processes} processes and threads)"
        else:
            kind, message = "exception", text
    return SandboxResult(
        stdout=stdout.decode("utf-8", "replace"), stderr=stderr.decode("utf-8", "replace"),
        exit_code=exit_code, signal=sig, error=message, error_kind=kind, files=tuple(files),
        files_skipped=_int(status.get("files_skipped")), output_truncated=overflow, wall_seconds=round(wall, 4),
        cpu_seconds=cpu, isolation=isolation)


async def run_python(code: str, files: dict[str, bytes] | None = None,
                     limits: SandboxLimits | None = None) -> SandboxResult:
    """One-off convenience: probe the isolation and run `code` (services keep one `Sandbox` instead)."""
    return await Sandbox().run_python(code, files, limits)
