"""Settings of the gateway."""

import json

from pydantic import Field

from threadline_core.settings import CoreSettings


class GatewaySettings(CoreSettings):
    """Environment-driven configuration (prefix THREADLINE_)."""

    port: int = 8080
    api_key: str = "sk-threadline-local"
    api_keys: str = Field(default="", description='JSON object {"api key": "project id"}')
    default_project_id: str = "proj_local"
    max_body_bytes: int = 2 * 1024 * 1024
    http_keep_alive_seconds: int = 65
    """How long an idle client connection stays open. Longer than clients keep theirs (the SDK's httpx: 5 s) and
    than load balancers' idle timeouts (often 60 s): a server closing first races a request sent on the
    connection at that moment, which then fails (seen in the bench as APIConnectionError)."""
    max_upload_bytes: int = 512 * 1024 * 1024
    upload_sweep_interval_seconds: float = Field(
        default=60.0, gt=0, description="How often uploads that expired pending are marked and their parts dropped,"
        " and files past their expires_at deleted (out of their vector stores)")
    upload_paths: tuple[str, ...] = Field(default=("/v1/files", "/v1/uploads/*/parts"),
                                          description="Glob patterns of the paths whose bodies may be max_upload_bytes")
    webhook_allowed_networks: str = Field(
        default="", description="CIDRs webhooks may reach although private/loopback (make run: loopback)")
    webhook_timeout_seconds: float = 15.0
    sse_heartbeat_seconds: float = Field(default=15.0, gt=0, description="Comment line on idle SSE streams")
    sse_queue_size: int = Field(default=10000, description="Events buffered per SSE client before it is cut off")
    search_timeout_seconds: float = Field(default=30.0, gt=0)
    """How long a search (or a file's content) waits for the ingestion service's reply before a 504."""
    max_file_bytes: int = 100 * 1024 * 1024
    models_timeout_seconds: float = Field(default=20.0, gt=0)
    """How long `GET /v1/models` waits for the run orchestrator's reply before a 504 (longer than the orchestrator's
    THREADLINE_MODEL_LIST_TIMEOUT_SECONDS, so a model server that does not answer is reported as such)."""

    def key_to_project(self) -> dict[str, str]:
        """Every accepted API key and the project it belongs to."""
        keys = {self.api_key: self.default_project_id}
        if self.api_keys:
            keys.update({str(k): str(v) for k, v in json.loads(self.api_keys).items()})
        return keys
