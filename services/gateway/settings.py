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

    def key_to_project(self) -> dict[str, str]:
        """Every accepted API key and the project it belongs to."""
        keys = {self.api_key: self.default_project_id}
        if self.api_keys:
            keys.update({str(k): str(v) for k, v in json.loads(self.api_keys).items()})
        return keys
