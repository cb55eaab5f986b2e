"""The Qdrant collection of chunks: deterministic point ids, upsert, delete by file or vector store, search.

Calls are synchronous; async code runs them in a worker thread (`asyncio.to_thread`) so the event loop keeps
serving while Qdrant works. Local mode (no QDRANT_URL) is not safe from two threads at once, and one process may
hold one client for two services (ingestion + tool executor), so every ChunkIndex of a client holds that client's
lock (`client_lock`) around its calls: at most one call runs at a time, whichever thread makes it.
"""

import threading
import uuid
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from qdrant_client import QdrantClient, models

from threadline_core.settings import CoreSettings
from threadline_search.chunking import Chunk

POINT_NAMESPACE = uuid.UUID("6f1d4a52-2d0c-5b8e-9a57-3c1f1e0b7a10")
_UPSERT_BATCH = 128
_LOCK_ATTRIBUTE = "_threadline_calls_lock"


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
            return
        try:
            self.client.create_collection(self.collection, vectors_config=models.VectorParams(
                size=dim, distance=models.Distance.COSINE))
        except Exception:
            if not self.client.collection_exists(self.collection):
                raise
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # local mode: "payload indexes have no effect"
            for key in ("vector_store_id", "file_id"):
                self.client.create_payload_index(self.collection, key, models.PayloadSchemaType.KEYWORD)

    def upsert(self, *, vector_store_id: str, file_id: str, chunks: Sequence[Chunk],
               vectors: Sequence[Sequence[float]], payload: dict[str, Any]) -> None:
        """Write the chunks of one file (idempotent: same ids every time)."""
        points = [models.PointStruct(
            id=point_id(vector_store_id, file_id, chunk.index), vector=list(vector),
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
               ) -> list[models.ScoredPoint]:
        """Nearest chunks of the stores; with `file_ids`, of only those files of each store (none of a store it
        leaves out), inside Qdrant's query: filtering its top `limit` afterwards could leave nothing."""
        if file_ids is None:
            query_filter = models.Filter(must=[_match("vector_store_id", vector_store_ids)])
        else:
            query_filter = models.Filter(should=[
                models.Filter(must=[_match("vector_store_id", [store]), _match("file_id", file_ids[store])])
                for store in dict.fromkeys(vector_store_ids) if file_ids.get(store)])
            if not query_filter.should:
                return []
        with self._lock:
            return self.client.query_points(self.collection, query=list(vector), query_filter=query_filter,
                                            limit=limit, score_threshold=score_threshold, with_payload=True).points
