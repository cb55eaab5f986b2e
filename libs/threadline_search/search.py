"""Semantic search over vector stores: what the file_search tool and POST /v1/vector_stores/{id}/search run."""

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from qdrant_client import QdrantClient

from threadline_search.embeddings import Embedder
from threadline_search.index import ChunkIndex
from threadline_search.settings import DEFAULT_COLLECTION, MAX_QUERY_CHARS

DEFAULT_MAX_RESULTS = 20


@dataclass(frozen=True)
class SearchResult:
    """One matching chunk: its file, its score (0..1, higher is closer) and its text and position."""

    file_id: str
    filename: str
    score: float
    text: str
    vector_store_id: str
    chunk_index: int
    start_char: int
    end_char: int
    tokens: int = 0
    """The chunk's tokens as chunking counted them (0: not known, a point written without it)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (internal search endpoint)."""
        return asdict(self)

    def to_step_result(self, *, include_content: bool = True) -> dict[str, Any]:
        """A `file_search.results[]` entry of a run step (content only when asked for with include[])."""
        result: dict[str, Any] = {"file_id": self.file_id, "file_name": self.filename, "score": self.score}
        if include_content:
            result["content"] = [{"type": "text", "text": self.text}]
        return result


class FileSearcher:
    """Embeds the query and returns the nearest chunks of the given vector stores."""

    def __init__(self, qdrant: QdrantClient, embedder: Embedder, *, collection: str = DEFAULT_COLLECTION) -> None:
        self._index = ChunkIndex(qdrant, collection)
        self._embedder = embedder

    async def search(self, vector_store_ids: Sequence[str], query: str | Sequence[str], *,
                     max_num_results: int = DEFAULT_MAX_RESULTS, score_threshold: float | None = None,
                     file_ids: Mapping[str, Sequence[str]] | None = None) -> list[SearchResult]:
        """Best chunks first; several queries are merged (best score per chunk). Scores are clamped to 0..1.
        `file_ids`: the files of each store to search (its completed ones: only files ready for use are searched).
        `score_threshold` None is the contract's default 0, applied as if sent: a chunk less similar than unrelated
        text (negative cosine) is never a result, not one reported as 0.0 to fill the page."""
        queries = [query] if isinstance(query, str) else [q for q in query]
        queries = [q[:MAX_QUERY_CHARS] for q in queries if q.strip()]  # a model's query is cut, never refused
        if not vector_store_ids or not queries or max_num_results < 1 or (
                file_ids is not None and not any(file_ids.get(s) for s in vector_store_ids)):
            return []
        if not await asyncio.to_thread(self._index.exists):  # Qdrant off the event loop (see index.py)
            return []
        vectors = await self._embedder.embed(queries)
        best: dict[tuple[str, str, int], SearchResult] = {}
        for vector in vectors:
            points = await asyncio.to_thread(self._index.search, vector, vector_store_ids=list(vector_store_ids),
                                             limit=max_num_results, score_threshold=score_threshold or 0.0,
                                             file_ids=file_ids)
            for point in points:
                p = point.payload or {}
                result = SearchResult(
                    file_id=str(p.get("file_id", "")), filename=str(p.get("filename", "")),
                    score=round(min(1.0, max(0.0, float(point.score))), 6), text=str(p.get("text", "")),
                    vector_store_id=str(p.get("vector_store_id", "")), chunk_index=int(p.get("chunk_index", 0)),
                    start_char=int(p.get("start_char", 0)), end_char=int(p.get("end_char", 0)),
                    tokens=int(p.get("tokens") or 0))
                key = (result.vector_store_id, result.file_id, result.chunk_index)
                if key not in best or best[key].score < result.score:
                    best[key] = result
        ranked = sorted(best.values(), key=lambda r: (-r.score, r.file_id, r.chunk_index))
        return ranked[:max_num_results]
