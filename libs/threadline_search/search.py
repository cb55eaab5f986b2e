"""Hybrid search over vector stores: what the file_search tool and POST /v1/vector_stores/{id}/search run.

Each query runs as a semantic query (its embedding against the chunks', cosine) and a keyword query (its terms
against the chunks', BM25 with IDF over the stores searched; `keywords`) over the same stores and files; every chunk
either found is ranked by one score, `keywords.fuse(cosine, keyword score, weight)`: the cosine itself when no term
of the query is in the chunk, raised toward 1 by a keyword match, never above 1. `score_threshold` applies to it.
"""

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from qdrant_client import QdrantClient

from threadline_search.embeddings import Embedder
from threadline_search.index import ChunkIndex
from threadline_search.keywords import fuse, query_terms
from threadline_search.settings import DEFAULT_COLLECTION, DEFAULT_KEYWORD_WEIGHT, MAX_QUERY_CHARS

DEFAULT_MAX_RESULTS = 20
MIN_CANDIDATES = 20
MAX_CANDIDATES = 100
"""Each of the two queries brings up to twice `max_num_results` chunks (within these bounds) for the fused ranking:
a chunk just outside the semantic top few may be the keyword match that ranks first."""


@dataclass(frozen=True)
class SearchResult:
    """One matching chunk: its file, its score (0..1, higher is closer: the fused score) and its text and position."""

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
    """Embeds the query and returns the best chunks of the given vector stores, by meaning and by keywords.

    `keyword_weight` (THREADLINE_FILE_SEARCH_KEYWORD_WEIGHT): how far a perfect keyword match closes the gap between a
    chunk's cosine and 1; 0 searches by meaning alone (no keyword query)."""

    def __init__(self, qdrant: QdrantClient, embedder: Embedder, *, collection: str = DEFAULT_COLLECTION,
                 keyword_weight: float = DEFAULT_KEYWORD_WEIGHT) -> None:
        self._index = ChunkIndex(qdrant, collection)
        self._embedder = embedder
        self._keyword_weight = min(1.0, max(0.0, keyword_weight))

    async def search(self, vector_store_ids: Sequence[str], query: str | Sequence[str], *,
                     max_num_results: int = DEFAULT_MAX_RESULTS, score_threshold: float | None = None,
                     file_ids: Mapping[str, Sequence[str]] | None = None) -> list[SearchResult]:
        """Best chunks first; several queries are merged (best score per chunk). Scores are clamped to 0..1.
        `file_ids`: the files of each store to search (its completed ones: only files ready for use are searched).
        `score_threshold` None is the contract's default 0, applied as if sent: a chunk less similar than unrelated
        text (negative cosine) and matching no keyword is never a result, not one reported as 0.0 to fill the page."""
        queries = [query] if isinstance(query, str) else [q for q in query]
        queries = [q[:MAX_QUERY_CHARS] for q in queries if q.strip()]  # a model's query is cut, never refused
        if not vector_store_ids or not queries or max_num_results < 1 or (
                file_ids is not None and not any(file_ids.get(s) for s in vector_store_ids)):
            return []
        keywords_ready = await asyncio.to_thread(self._index.keyword_search_ready)  # Qdrant off the loop (index.py)
        if keywords_ready is None:  # no collection: nothing was ever indexed
            return []
        hybrid = bool(keywords_ready) and self._keyword_weight > 0
        threshold = score_threshold or 0.0
        candidates = min(MAX_CANDIDATES, max(MIN_CANDIDATES, 2 * max_num_results)) if hybrid else max_num_results
        vectors = await self._embedder.embed(queries)
        best: dict[tuple[str, str, int], SearchResult] = {}
        for text, vector in zip(queries, vectors, strict=True):
            terms = query_terms(text) if hybrid else None
            hits = await asyncio.to_thread(self._index.search, vector, vector_store_ids=list(vector_store_ids),
                                           limit=candidates, score_threshold=threshold, file_ids=file_ids,
                                           keywords=terms)
            for hit in hits:
                score = fuse(hit.semantic, hit.keyword, self._keyword_weight)
                if score < threshold:
                    continue
                p = hit.payload
                result = SearchResult(
                    file_id=str(p.get("file_id", "")), filename=str(p.get("filename", "")),
                    score=round(min(1.0, max(0.0, score)), 6), text=str(p.get("text", "")),
                    vector_store_id=str(p.get("vector_store_id", "")), chunk_index=int(p.get("chunk_index", 0)),
                    start_char=int(p.get("start_char", 0)), end_char=int(p.get("end_char", 0)),
                    tokens=int(p.get("tokens") or 0))
                key = (result.vector_store_id, result.file_id, result.chunk_index)
                if key not in best or best[key].score < result.score:
                    best[key] = result
        ranked = sorted(best.values(), key=lambda r: (-r.score, r.file_id, r.chunk_index))
        return ranked[:max_num_results]
