"""What a sandbox run is allowed to use and what it reports back."""

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

ErrorKind = Literal["exception", "timeout", "cpu_limit", "memory_limit", "process_limit", "killed", "sandbox_error"]
"""Why a run did not end normally: the code raised, or a limit (or the sandbox itself) stopped it."""

_IMAGE_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


class Isolation(StrEnum):
    """How strongly the child is isolated (chosen by probing what the host allows)."""

    NAMESPACES = "namespaces"
    """Root host: new PID, network and mount namespaces, private tmpfs, a throw-away unprivileged uid."""
    USER_NAMESPACES = "user_namespaces"
    """Unprivileged host with user namespaces: the same namespaces, but no uid of its own."""
    PROCESS = "process"
    """No namespaces available: rlimits and a Python audit hook refusing sockets (best effort)."""


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one run (all enforced by the kernel except where noted)."""

    cpu_seconds: float = 20.0
    """RLIMIT_CPU of the code's process (SIGXCPU, then SIGKILL one second later)."""
    wall_seconds: float = 30.0
    """Wall-clock deadline; the whole namespace (every process the code started) is killed after it."""
    memory_bytes: int = 1 << 30
    """RLIMIT_AS (address space) of the code's process; allocations beyond it raise MemoryError."""
    output_bytes: int = 100_000
    """stdout + stderr kept. The code runs on whatever it writes, as a notebook cell does: beyond this, each stream
    keeps its start and its end, with a marker saying how much was left out between them (`output_truncated`)."""
    max_processes: int = 32
    """RLIMIT_NPROC for the sandbox uid (threads count too): a fork bomb hits it."""
    max_file_bytes: int = 32 << 20
    """RLIMIT_FSIZE (largest file the code can write) and largest generated file collected."""
    max_files: int = 20
    """Generated files (and figures) collected at most."""
    max_total_file_bytes: int = 64 << 20
    """Total bytes of generated files collected."""
    disk_bytes: int = 128 << 20
    """Size of the private /mnt/data tmpfs beyond the input files (namespaces modes)."""
    tmp_bytes: int = 64 << 20
    """Size of the private /tmp tmpfs (namespaces modes)."""
    open_files: int = 256
    """RLIMIT_NOFILE."""


@dataclass(frozen=True)
class SandboxFile:
    """A file the code generated (new or changed in the data dir) or a figure it displayed."""

    name: str
    """Its path under the data dir (a figure's: its own name), control characters replaced by U+FFFD."""
    data: bytes
    kind: Literal["file", "figure"] = "file"

    @property
    def mime_type(self) -> str | None:
        """The image type recognised from the content, else None."""
        for signature, mime in _IMAGE_SIGNATURES:
            if self.data.startswith(signature):
                return mime
        if self.data[:4] == b"RIFF" and self.data[8:12] == b"WEBP":
            return "image/webp"
        return None

    @property
    def is_image(self) -> bool:
        """True for PNG, JPEG, GIF and WebP content."""
        return self.mime_type is not None

    @property
    def basename(self) -> str:
        """The last path component of the name."""
        return self.name.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class SandboxResult:
    """Everything one run produced: logs, status, error, generated files, timings."""

    stdout: str
    stderr: str
    exit_code: int | None
    signal: int | None
    error: str | None
    error_kind: ErrorKind | None
    files: tuple[SandboxFile, ...] = ()
    files_skipped: int = 0
    output_truncated: bool = False
    """More than `SandboxLimits.output_bytes` was written: `stdout`/`stderr` hold a marker where output was left out."""
    output_left_out: int = 0
    """Bytes of output left out."""
    wall_seconds: float = 0.0
    cpu_seconds: float | None = None
    isolation: Isolation = Isolation.PROCESS

    @property
    def ok(self) -> bool:
        """True when the code ran to the end without an error."""
        return self.error is None

    @property
    def logs(self) -> str:
        """stdout, then stderr, then the error summary when a limit stopped the run (what a user reads)."""
        parts = [self.stdout, self.stderr]
        if self.error and self.error_kind != "exception":
            parts.append(self.error + "\n")
        text = ""
        for part in parts:
            if not part:
                continue
            if text and not text.endswith("\n"):
                text += "\n"
            text += part
        return text

    @property
    def images(self) -> tuple[SandboxFile, ...]:
        """Figures and generated image files."""
        return tuple(f for f in self.files if f.is_image)
