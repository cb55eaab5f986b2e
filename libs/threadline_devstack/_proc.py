"""Small process and network helpers shared by the devstack modules."""

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

PROJECT_ROOT = Path(__file__).resolve().parents[2]
"""The project folder (libs/threadline_devstack/ is two levels below it)."""

STATE_DIR = PROJECT_ROOT / ".threadline"
"""Everything the local stack writes (data, logs, temp dirs) lives here, never under /tmp or $HOME."""

_PR_SET_PDEATHSIG = 1
T = TypeVar("T")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(check: Callable[[], bool], *, timeout: float, interval: float = 0.05,
               alive: Callable[[], bool] | None = None) -> bool:
    """Poll `check` until it is true (True), the deadline passes or `alive` turns false (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        if alive is not None and not alive():
            return False
        time.sleep(interval)
    return check()


def die_with_parent() -> None:
    """preexec_fn: have the kernel SIGTERM the child when the spawning thread dies (no orphans on kill -9)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def terminate(proc: "subprocess.Popen[bytes]", timeout: float) -> int | None:
    """SIGTERM the process, SIGKILL it after `timeout`; return its exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
    return proc.returncode


def tail(path: Path, lines: int = 40) -> str:
    """The last lines of a log file (empty if missing)."""
    try:
        data = path.read_bytes()[-20000:]
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_async(coro: "Coroutine[Any, Any, T]") -> T:
    """Run a coroutine to completion on a private loop in a helper thread (safe inside a running loop)."""
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(coro))
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target, name="devstack-async")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
