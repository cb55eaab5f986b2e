"""Settings of the run-orchestrator service."""

from pydantic import Field, field_validator

from threadline_core.settings import CoreSettings
from threadline_core.ssrf import parse_networks


class RunOrchestratorSettings(CoreSettings):
    """Environment-driven configuration (prefix THREADLINE_)."""

    port: int = 9101
    db_pool_max_size: int = 20
    model_base_url: str = "https://api.openai.com/v1"
    model_api_key: str = "sk-no-key"
    model_aliases: str = Field(default="", description=(
        "NAME=UPSTREAM pairs, comma separated: the model name sent upstream for runs whose model is NAME (`*`: any"
        " other name), so code written for OpenAI's names runs unchanged on a server that serves other models"))
    model_timeout_seconds: float = 300.0
    """Longest wait for the model's first byte and between streamed chunks: reasoning models may think for minutes
    before their first token (60 s failed such runs after 3 minutes; hosted waits until the run expires)."""
    model_max_retries: int = 2
    """Retries of a model call that failed before any token arrived (5xx, 429, timeout, connection)."""
    model_retry_backoff_seconds: float = 0.25
    model_context_tokens: int = Field(default=0, ge=0)
    """The model's context length in tokens (0: unknown; a shorter one the server lists or names in a refusal wins).
    With `auto` truncation a thread is then cut from its middle until the prompt (estimated at four bytes of UTF-8 a
    token) leaves room for the answer (`max_completion_tokens`, at most half the window; a quarter when unset), as
    hosted: a long thread failed at a model that refuses it, or was cut from its start (instructions first) by one
    that truncates."""
    max_concurrent_runs: int = 256
    """Runs this instance drives at once; the consumer waits (back-pressure) when all slots are busy."""
    command_concurrency: int = 8
    """Run commands of different threads handled at once (claims are transactions: serial claims made runs
    wait behind each other); one thread's commands stay in order."""
    command_commit_interval_seconds: float = 0.1
    """Handled run commands are committed at most this often (a crash redelivers them; claims are idempotent)."""
    lease_seconds: float = 30.0
    """How long a driver's claim on a run lasts without renewal (renewed every third of it)."""
    sweep_interval_seconds: float = 5.0
    """How often every instance re-queues runs with a dead driver and expires overdue runs."""
    run_timeout_seconds: int = 600
    """A run started (or resumed) expires if it is still active this long after."""
    requires_action_timeout_seconds: int = 600
    """How long a run waits in requires_action before it expires."""
    tool_call_timeout_seconds: float = 300.0
    """How long a server-side tool call (tool executor) may take before it is dispatched again."""
    max_tool_attempts: int = 2
    """Dispatches of one server-side tool call before the run fails."""
    max_driver_losses: int = Field(default=3, ge=1)
    """Times a run's driver may be lost (its lease ran out while an instance held it: a crash, a kill) before the
    sweep fails the run with server_error instead of re-queueing it."""
    unclaimed_run_seconds: float = Field(default=60.0, gt=0)
    """A queued run nobody claimed this long after its command was sent gets its command again (a broker that lost
    acknowledged records lost it; a second one is harmless: claims are conditional)."""
    delta_flush_seconds: float = 0.02
    """Streamed tokens are coalesced into one thread.message.delta at most this often."""
    shutdown_drain_seconds: float = 10.0
    """On SIGTERM, wait this long for runs in hand before handing them back to the group."""
    model_list_cache_seconds: float = Field(default=60.0, ge=0)
    """`GET /v1/models` is answered from the model endpoint's last list for this long (0: asked every time)."""
    model_list_timeout_seconds: float = Field(default=10.0, gt=0)
    """Longest wait for the model endpoint's list of models (less than the gateway's wait, so its error reaches the
    client instead of a 504)."""

    sandbox_input_max_mb: int = Field(default=256, ge=0)
    """The tool executor's setting of the same name (give both the same value): the model is told of the
    code_interpreter input files that fit in it, as only those are copied into the sandbox."""

    image_fetch_allowed_networks: str = Field(default="", description=(
        "CIDRs that linked images (an http(s) `image_url` a model server takes only as data) may be fetched from"
        " although private/loopback (make run: loopback); cloud metadata addresses never"))
    image_fetch_max_bytes: int = Field(default=20 * 1024 * 1024, gt=0)
    """A linked image larger than this fails its run (`invalid_prompt`): OpenAI's limit for an image."""
    image_fetch_timeout_seconds: float = Field(default=10.0, gt=0)
    """Longest wait for a linked image, redirects included."""

    @field_validator("image_fetch_allowed_networks")
    @classmethod
    def _check_networks(cls, value: str) -> str:
        parse_networks(value, "THREADLINE_IMAGE_FETCH_ALLOWED_NETWORKS")
        return value

    @field_validator("model_aliases")
    @classmethod
    def _check_aliases(cls, value: str) -> str:
        parse_aliases(value)
        return value

    def model_alias_map(self) -> dict[str, str]:
        """NAME -> UPSTREAM of `model_aliases`."""
        return parse_aliases(self.model_aliases)


def parse_aliases(value: str) -> dict[str, str]:
    """`NAME=UPSTREAM,...` as a mapping; a pair without both halves, or a name given twice, is an error."""
    aliases: dict[str, str] = {}
    for pair in filter(None, (item.strip() for item in value.split(","))):
        name, _, upstream = (part.strip() for part in pair.partition("="))
        if not name or not upstream:
            raise ValueError(f"model_aliases: {pair!r} is not NAME=UPSTREAM")
        if name in aliases:
            raise ValueError(f"model_aliases: {name!r} is given twice")
        aliases[name] = upstream
    return aliases
