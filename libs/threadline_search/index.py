"""The Qdrant collection of chunks: deterministic point ids, upsert, delete by file or vector store, search.

Calls are synchronous; async code runs them in a worker thread (`asyncio.to_thread`) so the event loop keeps
serving while Qdrant works. Local mode (no QDRANT_URL) is not safe from two threads at once, and one process may
hold one client for two services (ingestion + tool executor), so every ChunkIndex of a client holds that client's
lock (`client_lock`) around its calls: at most one call runs at a time, whichever thread makes it.

Each point holds two vectors: the chunk's embedding (the unnamed dense vector, cosine) and its keyword terms (the
sparse vector `keywords.KEYWORD_VECTOR`, BM25 term weights, with Qdrant's IDF modifier), so `search` runs a semantic
and a keyword query over the same filter. A collection created before keyword search has no sparse vector: `ensure`
adds it where Qdrant can (1.18 or later, and local mode), and until then search is semantic only (logged once).
"""

import logging
import re
import threading
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qdrant_client import QdrantClient, models

from threadline_core.settings import CoreSettings
from threadline_search.chunking import Chunk
from threadline_search.keywords import KEYWORD_VECTOR, SparseTerms, document_terms, keyword_score

_log = logging.getLogger(__name__)

POINT_NAMESPACE = uuid.UUID("6f1d4a52-2d0c-5b8e-9a57-3c1f1e0b7a10")
_UPSERT_BATCH = 128
_LOCK_ATTRIBUTE = "_threadline_calls_lock"
SCOPED_IDF_VERSION = (1, 19)
"""Qdrant from which a query may compute IDF over a corpus filter (`SearchParams.idf`); older servers use the whole
collection's statistics, every project's chunks included."""


@dataclass(frozen=True)
class Hit:
    """A chunk a search found: its payload, its cosine similarity (-1..1) and its keyword score (0..1, 0 when no term
    of the query is in it or the collection has no keyword vector)."""

    payload: dict[str, Any]
    semantic: float
    keyword: float = 0.0


def point_id(vector_store_id: str, file_id: str, chunk_index: int) -> str:
    """uuid5 of vector_store_id/file_id/chunk_index: reprocessing a file overwrites, never duplicates."""
    return str(uuid.uuid5(POINT_NAMESPACE, f"{vector_store_id}/{file_id}/{chunk_index}"))


def open_qdrant(settings: CoreSettings) -> QdrantClient:
    """A client for QDRANT_URL, or local mode at THREADLINE_QDRANT_PATH (one process only)."""
    if settings.qdrant_url:
        return QdrantClient(url=settings.qdrant_url, timeout=30)
    # Worker threads write to the SQLite file opened here: safe, as client_lock serialises every call.
    return QdrantClient(path=settings.qdrant_path, force_disable_check_same_thread=True)


def client_lock(client: QdrantClient) -> "threading.RLock":
    """The one lock of `client` that every ChunkIndex over it holds around its calls (kept on the client, so two
    services sharing a client share it too)."""
    lock: threading.RLock | None = getattr(client, _LOCK_ATTRIBUTE, None)
    if lock is None:
        lock = threading.RLock()
        setattr(client, _LOCK_ATTRIBUTE, lock)
    return lock


def _match(key: str, values: Sequence[str]) -> models.FieldCondition:
    if len(values) == 1:
        return models.FieldCondition(key=key, match=models.MatchValue(value=values[0]))
    return models.FieldCondition(key=key, match=models.MatchAny(any=list(values)))


class ChunkIndex:
    """One collection holding the chunks of every vector store (payload says which store and file)."""

    def __init__(self, client: QdrantClient, collection: str) -> None:
        self.client = client
        self.collection = collection
        self._lock = client_lock(client)
        self._keywords = False  # the collection has KEYWORD_VECTOR (once seen, kept: nothing removes it)
        self._scoped_idf: bool | None = None
        self._warned: set[str] = set()  # the collection-state warnings given: each once, not on every call
        options = client.init_options
        self._local = options.get("location") == ":memory:" or options.get("path") is not None
        # local mode (no server) scores and filters every point in Python: `_hybrid_local` asks it as little as it can

    def exists(self) -> bool:
        """Whether the collection exists (nothing was ever indexed when it does not)."""
        with self._lock:
            return self.client.collection_exists(self.collection)

    def ensure(self, dim: int) -> None:
        """Create the collection (cosine, `dim`) and its payload indexes if missing; refuse another size."""
        with self._lock:
            self._ensure(dim)

    def _ensure(self, dim: int) -> None:
        if self.client.collection_exists(self.collection):
            vectors = self.client.get_collection(self.collection).config.params.vectors
            size = getattr(vectors, "size", None)
            if size is not None and size != dim:
                raise RuntimeError(f"Qdrant collection {self.collection!r} has vectors of size {size}, but the "
                                   f"embedding model gives {dim}; set THREADLINE_QDRANT_COLLECTION to another name")
            if not self._has_keywords():
                self._add_keywords()
            return
        try:
            self.client.create_collection(
                self.collection, vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE),
                sparse_vectors_config={KEYWORD_VECTOR: models.SparseVectorParams(modifier=models.Modifier.IDF)})
        except Exception:
            if not self.client.collection_exists(self.collection):
                raise
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # local mode: "payload indexes have no effect"
            for key in ("vector_store_id", "file_id"):
                self.client.create_payload_index(self.collection, key, models.PayloadSchemaType.KEYWORD)

    def upsert(self, *, vector_store_id: str, file_id: str, chunks: Sequence[Chunk],
               vectors: Sequence[Sequence[float]], payload: dict[str, Any]) -> None:
        """Write the chunks of one file (idempotent: same ids every time), with their keyword terms when the
        collection has the keyword vector (a point written again replaces both vectors)."""
        with self._lock:
            keywords = bool(self._has_keywords())
        points = [models.PointStruct(
            id=point_id(vector_store_id, file_id, chunk.index), vector=self._vectors(chunk, vector, keywords),
            payload={**payload, "vector_store_id": vector_store_id, "file_id": file_id,
                     "chunk_index": chunk.index, "text": chunk.text, "start_char": chunk.start_char,
                     "end_char": chunk.end_char, "tokens": chunk.tokens})
            for chunk, vector in zip(chunks, vectors, strict=True)]
        for b in range(0, len(points), _UPSERT_BATCH):
            with self._lock:  # per batch: a search waits for one batch at most
                self.client.upsert(self.collection, points=points[b:b + _UPSERT_BATCH], wait=True)

    def delete_file(self, vector_store_id: str, file_id: str, *, from_chunk: int = 0) -> None:
        """Remove the file's points in that store (from chunk index `from_chunk` on: stale tails)."""
        must: list[models.Condition] = [_match("vector_store_id", [vector_store_id]), _match("file_id", [file_id])]
        if from_chunk > 0:
            must.append(models.FieldCondition(key="chunk_index", range=models.Range(gte=from_chunk)))
        with self._lock:
            self.client.delete(self.collection, wait=True,
                               points_selector=models.FilterSelector(filter=models.Filter(must=must)))

    def delete_vector_store(self, vector_store_id: str) -> None:
        """Remove every point of the store."""
        with self._lock:
            self.client.delete(self.collection, points_selector=models.FilterSelector(
                filter=models.Filter(must=[_match("vector_store_id", [vector_store_id])])), wait=True)

    def count(self, *, vector_store_id: str | None = None, file_id: str | None = None) -> int:
        """Exact number of points, optionally of one store and/or file (0 while the collection does not exist)."""
        must: list[models.Condition] = []
        if vector_store_id:
            must.append(_match("vector_store_id", [vector_store_id]))
        if file_id:
            must.append(_match("file_id", [file_id]))
        with self._lock:
            if not self.client.collection_exists(self.collection):
                return 0
            return self.client.count(self.collection, count_filter=models.Filter(must=must) if must else None,
                                     exact=True).count

    def chunks(self, vector_store_id: str, file_id: str) -> list[dict[str, Any]]:
        """Payloads of the file's chunks in order (for the file content endpoint)."""
        flt = models.Filter(must=[_match("vector_store_id", [vector_store_id]), _match("file_id", [file_id])])
        out: list[dict[str, Any]] = []
        offset: Any = None
        with self._lock:  # the whole scroll: no write between its pages
            while True:
                points, offset = self.client.scroll(self.collection, scroll_filter=flt, limit=256, offset=offset,
                                                    with_payload=True, with_vectors=False)
                out.extend(dict(p.payload or {}) for p in points)
                if offset is None:
                    break
        return sorted(out, key=lambda p: int(p.get("chunk_index", 0)))

    def search(self, vector: Sequence[float], *, vector_store_ids: Sequence[str], limit: int,
               score_threshold: float | None = None, file_ids: Mapping[str, Sequence[str]] | None = None,
               keywords: SparseTerms | None = None) -> list[Hit]:
        """Chunks of the stores nearest to `vector` and, with `keywords` on a collection that has the keyword vector,
        those best matching the terms: the union of both top `limit`s, each with both of its scores. `file_ids`: only
        those files of each store (none of a store it leaves out), inside Qdrant's queries: filtering their top
        `limit` afterwards could leave nothing. `score_threshold` bounds the semantic query only (a keyword match may
        lift a chunk less similar than it above it: the caller applies it to the fused score)."""
        if file_ids is None:
            query_filter = models.Filter(must=[_match("vector_store_id", vector_store_ids)])
        else:
            query_filter = models.Filter(should=[
                models.Filter(must=[_match("vector_store_id", [store]), _match("file_id", file_ids[store])])
                for store in dict.fromkeys(vector_store_ids) if file_ids.get(store)])
            if not query_filter.should:
                return []
        with self._lock:
            if not keywords or not self._has_keywords():
                points = self.client.query_points(self.collection, query=list(vector), query_filter=query_filter,
                                                  limit=limit, score_threshold=score_threshold,
                                                  with_payload=True).points
                return [Hit(dict(p.payload or {}), float(p.score)) for p in points]
            return self._hybrid(vector, keywords, query_filter, vector_store_ids, limit, score_threshold)

    def keyword_search_ready(self) -> bool | None:
        """Whether searches use keywords too: None while the collection does not exist (nothing was indexed)."""
        with self._lock:
            return self._has_keywords()

    def _warn_once(self, key: str, message: str, *args: object) -> None:
        """Warn about the collection's state once, not on every search or ingestion."""
        if key not in self._warned:
            self._warned.add(key)
            _log.warning(message, *args)

    # --- keyword vector (callers hold the lock) -----------------------------------------------------------------

    def _has_keywords(self) -> bool | None:
        """Whether the collection has the keyword vector (None: no collection). Its config is read until it has it."""
        if not self.client.collection_exists(self.collection):
            return None
        if self._keywords:
            return True
        sparse = self.client.get_collection(self.collection).config.params.sparse_vectors or {}
        self._keywords = KEYWORD_VECTOR in sparse
        return self._keywords

    def _add_keywords(self) -> None:
        """Give a collection from before keyword search its keyword vector (Qdrant 1.18+, local mode). Its points
        gain terms as their files are indexed again; until then they are found by their embedding alone."""
        try:
            self.client.create_vector_name(self.collection, KEYWORD_VECTOR, models.SparseVectorNameConfig(
                sparse=models.SparseVectorConfig(modifier=models.Modifier.IDF)))
        except Exception as exc:
            self._warn_once("no-keywords", "Qdrant collection %r has no keyword vector and Qdrant could not add one "
                            "(%s: %s; it needs 1.18 or later): file_search stays semantic only. Point "
                            "THREADLINE_QDRANT_COLLECTION at a new collection and add the files again for hybrid "
                            "search.", self.collection, type(exc).__name__, str(exc)[:200])
            return
        self._keywords = True
        _log.warning("added the keyword vector to Qdrant collection %r: files indexed before are found by keywords "
                     "too once they are indexed again (until then by their embedding alone)", self.collection)

    @staticmethod
    def _vectors(chunk: Chunk, vector: Sequence[float], keywords: bool) -> models.VectorStruct:
        """The point's dense vector, and its keyword terms when the collection has them and the chunk has any."""
        terms = document_terms(chunk.text) if keywords else None
        if not terms:
            return list(vector)
        return {"": list(vector), KEYWORD_VECTOR: models.SparseVector(indices=terms.indices, values=terms.values)}

    def _idf_scoped(self) -> bool:
        """Whether Qdrant computes IDF over a corpus filter (1.19+; local mode of a client that knows the param)."""
        if self._scoped_idf is None:
            try:
                version = self.client.info().version
            except Exception:
                version = "unknown"
            numbers = tuple(int(n) for n in re.findall(r"\d+", version)[:2])
            self._scoped_idf = hasattr(models, "IdfCorpusParams") and numbers >= SCOPED_IDF_VERSION
            if not self._scoped_idf:
                self._warn_once("global-idf", "Qdrant %s computes keyword IDF over the whole collection "
                                "(1.19 or later: over the vector stores searched)", version)
        return self._scoped_idf

    def _hybrid(self, vector: Sequence[float], keywords: SparseTerms, query_filter: models.Filter,
                vector_store_ids: Sequence[str], limit: int, score_threshold: float | None) -> list[Hit]:
        """Both queries, then the score each candidate lacks (its cosine when only the keyword query found it, its
        keyword score when only the semantic one did and the keyword query filled its `limit`)."""
        sparse = models.SparseVector(indices=keywords.indices, values=keywords.values)
        corpus: models.Filter | None = None
        params: models.SearchParams | None = None
        if self._idf_scoped():  # IDF of the stores searched: never other projects' chunks, nor stale counts
            corpus = models.Filter(must=[_match("vector_store_id", list(dict.fromkeys(vector_store_ids)))])
            params = models.SearchParams(idf=models.IdfCorpusParams(corpus=corpus))
        if self._local:
            return self._hybrid_local(vector, sparse, query_filter, corpus, params, limit, score_threshold)

        def dense(flt: models.Filter, n: int, threshold: float | None) -> models.QueryRequest:
            return models.QueryRequest(query=list(vector), filter=flt, limit=n, score_threshold=threshold,
                                       with_payload=True)

        def keyword(flt: models.Filter, n: int) -> models.QueryRequest:
            return models.QueryRequest(query=sparse, using=KEYWORD_VECTOR, filter=flt, limit=n, params=params,
                                       with_payload=True)

        semantic_answer, keyword_answer = self.client.query_batch_points(self.collection, requests=[
            dense(query_filter, limit, score_threshold), keyword(query_filter, limit)])
        payloads = {p.id: dict(p.payload or {}) for p in (*semantic_answer.points, *keyword_answer.points)}
        semantic = {p.id: float(p.score) for p in semantic_answer.points}
        bm25 = {p.id: float(p.score) for p in keyword_answer.points}
        no_cosine = [i for i in bm25 if i not in semantic]
        unscored = [i for i in semantic if i not in bm25] if len(bm25) >= limit else []  # else: no term in them
        fill: list[models.QueryRequest] = []
        if no_cosine:
            fill.append(dense(models.Filter(must=[models.HasIdCondition(has_id=no_cosine)]), len(no_cosine), None))
        if unscored:
            fill.append(keyword(models.Filter(must=[models.HasIdCondition(has_id=unscored)]), len(unscored)))
        answers = self.client.query_batch_points(self.collection, requests=fill) if fill else []
        if no_cosine:
            semantic.update((p.id, float(p.score)) for p in answers[0].points)
        if unscored:
            bm25.update((p.id, float(p.score)) for p in answers[-1].points)
        corpus_size = self.client.count(self.collection, count_filter=corpus, exact=True).count if bm25 else 0
        return [Hit(payloads[i], semantic[i], keyword_score(bm25.get(i, 0.0), corpus_size))
                for i in payloads if i in semantic]

    def _hybrid_local(self, vector: Sequence[float], sparse: models.SparseVector, query_filter: models.Filter,
                      corpus: models.Filter | None, params: models.SearchParams | None, limit: int,
                      score_threshold: float | None) -> list[Hit]:
        """`_hybrid`'s answer in two queries: local mode scores every point in Python for each query (a keyword one
        costs ~0.1 ms per chunk) and evaluates a filter point by point however few points it selects, so a dense and
        a keyword query each return every point of the filter (ids and scores, best first, as the limited queries
        rank them) and the top `limit`s, the scores a candidate lacks and the corpus size are read from them."""
        everything = self.client.count(self.collection, exact=True).count + 1  # no filter: no scan; beyond any match
        dense_all, keyword_all = self.client.query_batch_points(self.collection, requests=[
            models.QueryRequest(query=list(vector), filter=query_filter, limit=everything, with_payload=False),
            models.QueryRequest(query=sparse, using=KEYWORD_VECTOR, filter=query_filter, limit=everything,
                                params=params, with_payload=False)])
        top: list[models.ExtendedPointId] = []
        for p in dense_all.points:  # what the query with `limit` and `score_threshold` returns: the same walk
            if len(top) >= limit or (score_threshold is not None and p.score <= score_threshold):
                break  # (local mode's cosine is a float64 of the float64 query, compared as here: a test pins it)
            top.append(p.id)
        ids = list(dict.fromkeys([*top, *(p.id for p in keyword_all.points[:limit])]))
        payloads = {r.id: dict(r.payload or {}) for r in self.client.retrieve(self.collection, ids=ids)}
        cosine = {p.id: float(p.score) for p in dense_all.points}
        bm25 = {p.id: float(p.score) for p in keyword_all.points}
        if corpus is None:
            corpus_size = everything - 1
        elif query_filter == corpus:  # every point has the dense vector: the dense query returned the corpus
            corpus_size = len(dense_all.points)
        else:
            corpus_size = self.client.count(self.collection, count_filter=corpus, exact=True).count
        return [Hit(payloads[i], cosine[i], keyword_score(bm25.get(i, 0.0), corpus_size))
                for i in ids if i in payloads and i in cosine]
