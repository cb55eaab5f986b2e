"""Settings of the ingestion service."""

from pydantic import Field

from threadline_search.parsing import ParseLimits
from threadline_search.settings import SearchSettings


class IngestionSettings(SearchSettings):
    """Environment-driven configuration (prefix THREADLINE_)."""

    port: int = 9103
    search_concurrency: int = Field(default=8, ge=1, description="Search requests answered at once (each one "
                                    "embeds its query, then reads Qdrant)")
    ingestion_max_attempts: int = 3
    ingestion_warm_up: bool = True
    ingestion_file_concurrency: int = Field(default=4, ge=1, description="Files ingested at once, of one "
                                            "vector store or several (parsing also limited by ingestion_parse_workers)")
    ingestion_parse_workers: int = Field(default=2, ge=1, description="Files parsed at once, each in its own "
                                         "child process")
    ingestion_parse_timeout_seconds: float = Field(default=300.0, gt=0, description="A file not parsed and "
                                                   "chunked within this fails (invalid_file)")
    ingestion_max_file_tokens: int = Field(default=5_000_000, ge=1, description="A file whose text has more "
                                           "tokens fails (invalid_file); the hosted API's limit")
    unclaimed_ingestion_seconds: float = Field(default=60.0, gt=0, description="A vector store file whose "
                                               "ingestion request in force was sent this long ago and not started "
                                               "gets it again (a broker that lost acknowledged records lost it; a "
                                               "second delivery is harmless: ingestion claims the request)")
    ingestion_parse_memory_mb: int = Field(default=4096, ge=0, description="Address-space cap of a parser "
                                           "process in MB (a warm one maps ~1.2 GB); 0 = none")

    def unclaimed_sweep_interval_seconds(self) -> float:
        """How often the sweep looks for unstarted requests: a quarter of the wait, at most every 15 s."""
        return min(15.0, max(0.1, self.unclaimed_ingestion_seconds / 4))

    def parse_limits(self) -> ParseLimits:
        """What one file may cost its parser."""
        return ParseLimits(seconds=self.ingestion_parse_timeout_seconds, max_tokens=self.ingestion_max_file_tokens,
                           memory_mb=self.ingestion_parse_memory_mb)
