"""Settings of the ingestion service."""

from pydantic import Field

from threadline_search.settings import SearchSettings


class IngestionSettings(SearchSettings):
    """Environment-driven configuration (prefix THREADLINE_)."""

    port: int = 9103
    search_concurrency: int = Field(default=8, ge=1, description="Search requests answered at once (each one "
                                    "embeds its query, then reads Qdrant)")
    ingestion_max_attempts: int = 3
    ingestion_warm_up: bool = True
