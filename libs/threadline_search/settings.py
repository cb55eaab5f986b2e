"""Settings of everything that embeds or searches (ingestion, tool executor), on top of the core ones."""

from pydantic import Field

from threadline_core.settings import CoreSettings

DEFAULT_COLLECTION = "threadline_chunks"
DEFAULT_KEYWORD_WEIGHT = 0.6
"""file_search's keyword weight unless THREADLINE_FILE_SEARCH_KEYWORD_WEIGHT says otherwise (see keywords.fuse)."""
MAX_QUERY_CHARS = 4096
"""Longest search query embedded: CPU grows with its length, so a megabyte query would hold search up for minutes."""


class SearchSettings(CoreSettings):
    """Where embeddings come from and which Qdrant collection holds the chunks (prefix THREADLINE_)."""

    embeddings_base_url: str = Field(default="", description="OpenAI-compatible endpoint; empty = local ONNX")
    embeddings_api_key: str = "sk-none"
    embeddings_model: str = "text-embedding-3-small"
    embeddings_batch_size: int = 32
    embeddings_window_batch: int = Field(default=8, ge=1, description="Local model: 256-token windows per onnxruntime "
                                         "call; its memory arena keeps the peak (32: ~1.6 GB, 8: ~0.5 GB), and on "
                                         "a CPU 8 is no slower")
    embeddings_threads: int = Field(default=0, description="onnxruntime intra-op threads; 0 = its default")
    fair_window_records: int = Field(default=2000, ge=1, description="Tool requests or file requests of one "
                                     "partition fetched and waiting for a slot, which goes to the project holding "
                                     "the fewest; a burst beyond this (one project's batches of files) waits in the "
                                     "partition, and other projects' requests behind it wait too")
    qdrant_collection: str = DEFAULT_COLLECTION
    file_search_keyword_weight: float = Field(
        default=DEFAULT_KEYWORD_WEIGHT, ge=0.0, le=1.0, description="Hybrid file_search: how far a chunk's keyword "
        "match (0..1, BM25 with IDF, saturated) raises its cosine toward 1 (score = cos + (1 - cos) * weight * "
        "keyword); 0 = semantic search only")
