"""Start the sandbox supervisor in its namespaces, stream its output under limits, collect its results."""

import asyncio
import contextlib
import fcntl
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
from threadline_sandbox import output
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
_READ_BYTES = 1 << 20
_STREAM_BUFFER = 1 << 19
"""Output a stream reader holds: it stops reading the pipe at twice this (asyncio's flow control)."""
_PIPE_BYTES = 1 << 20
_SMALL_READ = 1 << 16
_PAST_LIMIT_PAUSE = 0.02
"""Pause of the reading of a stream past the output limit, after each MiB or once the pipe is drained: the code's
writes then wait on the full pipe, so a flood (`while True: print(...)`) costs neither side a CPU core, and output
is drained in large reads at up to ~50 MB/s a stream."""
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


class _Capture:
    """One stream's output in bounded memory: its first `limit` bytes, the last `limit` bytes after them, and how many
    bytes and lines it wrote in all (what `output.clip_bytes` needs to keep its start and end within any budget up to
    `limit`)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0
        self.lines = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        self.lines += chunk.count(b"\n")
        room = self.limit - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        if len(chunk) >= self.limit:
            self.tail = bytearray(chunk[len(chunk) - self.limit:])
        elif chunk:
            self.tail += chunk
            if len(self.tail) > self.limit:
                del self.tail[:len(self.tail) - self.limit]


async def _read_output(fd: int, capture: _Capture) -> None:
    """Read a pipe's read end to EOF into `capture` (which keeps what the output limit allows): the code runs on
    however much it writes, as a notebook cell does. Past the limit, reading pauses between reads (the pipe fills and
    the code's writes wait): a flood costs neither side a CPU core (`_PAST_LIMIT_PAUSE`)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=_STREAM_BUFFER)
    pipe = os.fdopen(fd, "rb", buffering=0)
    transport: asyncio.ReadTransport | None = None
    try:
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
        since_pause = 0
        while chunk := await reader.read(_READ_BYTES):
            capture.add(chunk)
            since_pause += len(chunk)
            if capture.total > capture.limit and (since_pause >= _READ_BYTES or len(chunk) < _SMALL_READ):
                transport.pause_reading()
                await asyncio.sleep(_PAST_LIMIT_PAUSE)
                transport.resume_reading()
                since_pause = 0
    finally:
        if transport is not None:
            transport.close()
        else:
            pipe.close()


def _output_pipe() -> tuple[int, int]:
    """A pipe for the code's stdout or stderr, of 1 MiB where the host allows (64 KiB otherwise): more output per
    read once past the limit."""
    read_end, write_end = os.pipe()
    with contextlib.suppress(OSError):
        fcntl.fcntl(read_end, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
    return read_end, write_end


def _kept_output(captures: Sequence[_Capture], limit: int) -> tuple[list[str], int]:
    """Each stream's text within `limit` bytes in all, and the bytes left out. A stream that needs less than an even
    share keeps all of it (a traceback on stderr after a flood on stdout); one that needs more keeps its start and its
    end, with a marker between them saying how much was left out (`output.clip_bytes`)."""
    budgets = [0] * len(captures)
    remaining = limit
    order = sorted(range(len(captures)), key=lambda i: captures[i].total)
    for position, index in enumerate(order):
        budgets[index] = min(captures[index].total, remaining // (len(order) - position))
        remaining -= budgets[index]
    texts: list[str] = []
    left_out = 0
    for capture, budget in zip(captures, budgets, strict=True):
        head, tail, left, lines = output.clip_bytes(bytes(capture.head), bytes(capture.tail), capture.total,
                                                    capture.lines, budget)
        texts.append(output.join(head.decode("utf-8", "replace"), left, lines, tail.decode("utf-8", "replace")))
        left_out += left
    return texts, left_out


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
        (out_r, out_w), (err_r, err_w) = _output_pipe(), _output_pipe()
        try:
            command, _ = await asyncio.to_thread(self._layout, base, files, limits, isolation, program, status_w)
            env = {"PATH": _SAFE_PATH, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "OPENBLAS_NUM_THREADS": "1",
                   "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NUMEXPR_NUM_THREADS": "1"}
            started = time.monotonic()
            proc = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.DEVNULL, stdout=out_w, stderr=err_w, pass_fds=(status_w,),
                start_new_session=True, env=env, cwd=str(base))
        except BaseException:
            for fd in (status_r, out_r, err_r):
                os.close(fd)
            raise
        finally:
            for fd in (status_w, out_w, err_w):
                os.close(fd)
        status_task = asyncio.create_task(_read_pipe(status_r))
        captures = [_Capture(limits.output_bytes), _Capture(limits.output_bytes)]
        readers = [asyncio.create_task(_read_output(out_r, captures[0])),
                   asyncio.create_task(_read_output(err_r, captures[1]))]
        try:
            return await self._supervise(proc, status_task, readers, captures, base, limits, isolation, started)
        finally:
            _kill_group(proc.pid)
            for task in (status_task, *readers):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, OSError):
                        await task

    async def _supervise(self, proc: asyncio.subprocess.Process, status_task: "asyncio.Task[bytes]",
                         readers: "list[asyncio.Task[None]]", captures: list[_Capture], base: Path,
                         limits: SandboxLimits, isolation: Isolation, started: float) -> SandboxResult:
        """Enforce the wall clock while the output streams in, then read the status and files."""
        waiter = asyncio.create_task(proc.wait())
        deadline_hit = False
        try:
            done, _ = await asyncio.wait({waiter}, timeout=limits.wall_seconds + _GRACE_SECONDS)
            if waiter not in done:
                deadline_hit = True
                _kill_group(proc.pid)
            await _reaped(proc, waiter)
        finally:
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
        (stdout, stderr), left_out = _kept_output(captures, limits.output_bytes)
        return _result(status, stdout, stderr, left_out, deadline_hit, wall, limits, isolation, collected)


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


def _result(status: dict[str, Any], stdout: str, stderr: str, left_out: int, deadline_hit: bool,
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
        stdout=stdout, stderr=stderr, exit_code=exit_code, signal=sig, error=message, error_kind=kind,
        files=tuple(files), files_skipped=_int(status.get("files_skipped")), output_truncated=left_out > 0,
        output_left_out=left_out, wall_seconds=round(wall, 4),
        cpu_seconds=cpu, isolation=isolation)


async def run_python(code: str, files: dict[str, bytes] | None = None,
                     limits: SandboxLimits | None = None) -> SandboxResult:
    """One-off convenience: probe the isolation and run `code` (services keep one `Sandbox` instead)."""
    return await Sandbox().run_python(code, files, limits)
