"""Settings of the tool-executor service."""

from pydantic import Field

from threadline_sandbox import SandboxLimits
from threadline_search.settings import SearchSettings


class ToolExecutorSettings(SearchSettings):
    """Environment-driven configuration (prefix THREADLINE_); embeddings and Qdrant as for ingestion."""

    port: int = 9102
    max_concurrent_tool_calls: int = Field(default=2, description="code_interpreter sandboxes run at once")
    max_concurrent_tool_calls_per_project: int | None = Field(
        default=None, ge=1, description="of those, at most this many one project's (default: no cap); free slots "
        "always go first to the waiting project that holds the fewest")
    tool_request_concurrency: int = Field(default=16, ge=1, description="Tool requests of different threads "
                                          "handled at once (sandboxes further limited by max_concurrent_tool_calls)")
    sandbox_dir: str = Field(default="", description="where sandbox scratch folders go; empty = the system temp dir")
    sandbox_isolation: str = Field(default="auto", description="auto | namespaces | user_namespaces | process")
    sandbox_cpu_seconds: float = 20.0
    sandbox_wall_seconds: float = 30.0
    sandbox_memory_mb: int = 1024
    sandbox_output_bytes: int = 100_000
    """stdout + stderr a code_interpreter call keeps: a cell that prints more runs to its end, and keeps the start and
    the end of its output with a marker saying how much was left out between them."""
    sandbox_max_processes: int = 32
    sandbox_max_files: int = 20
    sandbox_max_file_mb: int = 32
    sandbox_disk_mb: int = 128
    sandbox_input_max_mb: int = 256
    """Total size of the tool_resources files copied into a sandbox; larger sets are cut (oldest first kept)."""
    code_output_max_chars: int = 20_000
    """Logs beyond this are cut from what the model reads, as the sandbox cuts them (their start and end, one marker
    counting all that is left out); the run step keeps the sandbox's output limit."""
    code_session_idle_seconds: float = Field(default=3600.0, gt=0)
    """A thread's code_interpreter session (its variables, imports and /mnt/data files, rebuilt by replaying its
    earlier cells) lasts while calls come less than this apart: hosted sessions are active for an hour."""
    code_session_max_cells: int = Field(default=50, ge=1)
    """A session with this many cells ends; the next call starts a new one (bounds the replay)."""
    file_search_max_results: int = 20
    file_search_token_budget: int = Field(default=16000, ge=1)
    """Tokens of chunk text one file_search call gives the model at most (hosted: 16,000 for gpt-4* models; runs of
    gpt-3.5-turbo models get 4,000): lower-ranked results past it are left out."""
    file_search_thread_store_wait_seconds: float = 60.0
    """file_search waits at most this long for files of the thread's vector stores (message attachments) still
    being ingested, as the hosted API does (the assistant's stores are not waited for)."""

    def sandbox_limits(self) -> SandboxLimits:
        """The limits of one code_interpreter call."""
        return SandboxLimits(
            cpu_seconds=self.sandbox_cpu_seconds, wall_seconds=self.sandbox_wall_seconds,
            memory_bytes=self.sandbox_memory_mb << 20, output_bytes=self.sandbox_output_bytes,
            max_processes=self.sandbox_max_processes, max_files=self.sandbox_max_files,
            max_file_bytes=self.sandbox_max_file_mb << 20, max_total_file_bytes=2 * (self.sandbox_max_file_mb << 20),
            disk_bytes=self.sandbox_disk_mb << 20)
