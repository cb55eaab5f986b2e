"""Settings of the ingestion service."""

from pydantic import Field

from threadline_search.settings import SearchSettings


class IngestionSettings(SearchSettings):
    """Environment-driven configuration (prefix THREADLINE_)."""

    port: int = 9103
    search_advertised_url: str = Field(default="", description="URL the gateway uses to reach this ops server; "
                                       "default http://<host>:<port> (the hostname when bound to 0.0.0.0)")
    ingestion_max_attempts: int = 3
    ingestion_warm_up: bool = True
