"""Ingestion logic: a file of a vector store becomes chunks in Qdrant, then completed (or failed) with events."""

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client import Counter

from ingestion.repository import Held, IngestionRepository, WorkItem
from threadline_core.metrics import IngestionMetrics
from threadline_core.periodic import PeriodicPass
from threadline_search.chunking import Chunk, ChunkingStrategy
from threadline_search.embeddings import Embedder
from threadline_search.extract import ExtractionError
from threadline_search.index import ChunkIndex
from threadline_search.parsing import ParserPool
from threadline_search.search import FileSearcher, SearchResult
from threadline_search.settings import DEFAULT_KEYWORD_WEIGHT

_log = logging.getLogger(__name__)

CLAIM_SECONDS = 30.0
"""How long an instance's claim on the request it indexes lasts without renewal (renewed every third of it): a
second delivery of the request waits this long at most for an instance that died mid-file."""


class IngestionService:
    """Parses, chunks, embeds and indexes files; removes the points of detached files and deleted stores."""

    def __init__(self, *, repository: IngestionRepository, index: ChunkIndex, embedder: Embedder,
                 parsers: ParserPool, metrics: IngestionMetrics, embed_batch_size: int = 32,
                 max_attempts: int = 3, owner: str = "ingestion", claim_seconds: float = CLAIM_SECONDS,
                 keyword_weight: float = DEFAULT_KEYWORD_WEIGHT) -> None:
        self._repo = repository
        self._index = index
        self._embedder = embedder
        self._parsers = parsers
        self._metrics = metrics
        self._searcher = FileSearcher(index.client, embedder, collection=index.collection,
                                      keyword_weight=keyword_weight)
        self._batch = max(1, embed_batch_size)
        self._max_attempts = max_attempts
        self._owner = owner
        self._claim_seconds = claim_seconds
        self._failures: dict[str, int] = {}
        self._embed_lock = asyncio.Lock()  # one file's batch at a time: the model already uses every core

    async def ingest(self, vector_store_id: str, file_id: str, request_id: str) -> None:
        """Index one file for the request in force; duplicates and stale requests change nothing."""
        await self._ingest(vector_store_id, file_id, request_id)
        # Handled, however it ended (indexed, failed, withdrawn between attempts): no retry counts on it any more.
        self._failures.pop(request_id, None)

    async def _ingest(self, vector_store_id: str, file_id: str, request_id: str) -> None:
        item = await self._claim(vector_store_id, file_id, request_id)
        if item is None:
            _log.info("skipping %s/%s: request %s is not in force", vector_store_id, file_id, request_id)
            if not await self._repo.store_exists(vector_store_id):  # deleted mid-file: an earlier attempt's points
                await asyncio.to_thread(self._index.delete_file, vector_store_id, file_id)
            return
        keeper = asyncio.create_task(self._keep_claim(item, request_id), name=f"claim-{vector_store_id}/{file_id}")
        try:
            await self._index_file(item, request_id)
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            try:  # a no-op once finished; otherwise a retry (or another instance) may take it at once
                await self._repo.release(item, request_id, owner=self._owner)
            except Exception:
                _log.warning("could not release the claim on %s/%s; it lapses by itself", vector_store_id, file_id)

    async def _claim(self, vector_store_id: str, file_id: str, request_id: str) -> WorkItem | None:
        """Claim the request, waiting while another delivery of it is being indexed (by another instance: a
        rebalance, a re-send) until that one ends or its claim lapses; None if it is not in force."""
        waited = False
        while True:
            claim = await self._repo.claim(vector_store_id, file_id, request_id, owner=self._owner,
                                           lease_seconds=self._claim_seconds)
            if not isinstance(claim, Held):
                return claim
            if not waited:
                _log.info("waiting for %s/%s: request %s is being indexed elsewhere", vector_store_id, file_id,
                          request_id)
                waited = True
            await asyncio.sleep(min(1.0, self._claim_seconds / 10))

    async def _keep_claim(self, item: WorkItem, request_id: str) -> None:
        """Renew our claim while we index; a claim we lost (lapsed while the database was away) is let go."""
        while True:
            await asyncio.sleep(self._claim_seconds / 3)
            try:
                if not await self._repo.renew(item, request_id, owner=self._owner, lease_seconds=self._claim_seconds):
                    _log.info("no longer holding the claim on %s/%s (withdrawn, or lapsed and taken)",
                              item.vector_store_id, item.file_id)
                    return
            except Exception:
                _log.warning("could not renew the claim on %s/%s", item.vector_store_id, item.file_id)

    async def _index_file(self, item: WorkItem, request_id: str) -> None:
        """Parse, chunk, embed and index the file, then finish it (completed or failed) with its events."""
        vector_store_id, file_id = item.vector_store_id, item.file_id
        started = time.monotonic()
        data = await self._repo.content(file_id)
        if data is None:
            await self._fail(item, request_id, started, "invalid_file", "The file was deleted before it was indexed.")
            return
        try:
            parsed = await self._parsers.parse(item.filename, data, ChunkingStrategy.from_api(item.chunking_strategy))
        except ExtractionError as exc:
            await self._fail(item, request_id, started, exc.code, exc.message)
            return
        try:
            indexed = await self._index_chunks(item, request_id, parsed.chunks)
        except Exception as exc:
            attempts = self._failures.get(request_id, 0) + 1
            self._failures[request_id] = attempts
            if attempts < self._max_attempts:
                raise  # the consumer retries with back-off
            _log.exception("giving up on %s/%s after %d attempts", vector_store_id, file_id, attempts)
            self._failures.pop(request_id, None)
            await self._fail(item, request_id, started, "server_error",
                             f"The file could not be indexed: {type(exc).__name__}: {str(exc)[:300]}")
            return
        if not indexed:
            return
        chunks = parsed.chunks
        usage = sum(len(c.text.encode()) + 4 * self._embedder.dim for c in chunks)
        if await self._repo.finish(item, request_id, usage_bytes=usage, last_error=None):
            self._metrics.files.labels(outcome="completed").inc()
            self._metrics.chunks.inc(len(chunks))
            self._metrics.bytes.inc(len(data))
            self._metrics.file_seconds.labels(outcome="completed").observe(time.monotonic() - started)
            _log.info("indexed %s/%s: %d chunks, %d tokens from %s (%d bytes)", vector_store_id, file_id,
                      len(chunks), parsed.tokens, parsed.kind, len(data))
        else:
            await self._drop_points_unless_completed(item, request_id)

    async def _drop_points_unless_completed(self, item: WorkItem, request_id: str) -> bool:
        """After the request stopped being ours to finish: remove the file's points, unless another delivery of
        the same request completed it (its points are these very ones: same ids, same chunks). True if removed."""
        if await self._repo.request_status(item.vector_store_id, item.file_id, request_id) == "completed":
            _log.info("%s/%s was completed by another delivery of request %s", item.vector_store_id, item.file_id,
                      request_id)
            return False
        await asyncio.to_thread(self._index.delete_file, item.vector_store_id, item.file_id)
        return True

    async def _index_chunks(self, item: WorkItem, request_id: str, chunks: Sequence[Chunk]) -> bool:
        """Embed and upsert batch by batch; False if the request ended meanwhile (withdrawn: points removed)."""
        payload: dict[str, Any] = {"project_id": item.project_id, "filename": item.filename}
        for b in range(0, len(chunks), self._batch):
            if b and await self._repo.request_status(item.vector_store_id, item.file_id, request_id) != "in_progress":
                if await self._drop_points_unless_completed(item, request_id):
                    _log.info("stopped %s/%s: cancelled or detached", item.vector_store_id, item.file_id)
                return False
            batch = chunks[b:b + self._batch]
            async with self._embed_lock:
                vectors = await self._embedder.embed([c.text for c in batch])
            await asyncio.to_thread(self._index.upsert, vector_store_id=item.vector_store_id, file_id=item.file_id,
                                    chunks=batch, vectors=vectors, payload=payload)
        await asyncio.to_thread(self._index.delete_file, item.vector_store_id, item.file_id, from_chunk=len(chunks))
        return True

    async def _fail(self, item: WorkItem, request_id: str, started: float, code: str, message: str) -> None:
        if await self._repo.finish(item, request_id, usage_bytes=0, last_error={"code": code, "message": message}):
            self._metrics.files.labels(outcome="failed").inc()
            self._metrics.file_seconds.labels(outcome="failed").observe(time.monotonic() - started)
            _log.info("failed %s/%s: %s: %s", item.vector_store_id, item.file_id, code, message)
            await asyncio.to_thread(self._index.delete_file, item.vector_store_id, item.file_id)
        else:
            await self._drop_points_unless_completed(item, request_id)

    async def detach(self, vector_store_id: str, file_id: str) -> None:
        """Remove a detached file's points."""
        await asyncio.to_thread(self._index.delete_file, vector_store_id, file_id)

    async def delete_vector_store(self, vector_store_id: str) -> None:
        """Remove a deleted store's points."""
        await asyncio.to_thread(self._index.delete_vector_store, vector_store_id)

    async def search(self, vector_store_ids: Sequence[str], query: str | Sequence[str], *, max_num_results: int,
                     score_threshold: float | None, file_ids: Mapping[str, Sequence[str]] | None,
                     ) -> list[SearchResult]:
        """Search on behalf of the gateway, which asks over Kafka (it cannot open a local-mode Qdrant)."""
        return await self._searcher.search(vector_store_ids, query, max_num_results=max_num_results,
                                           score_threshold=score_threshold, file_ids=file_ids)

    async def chunks(self, vector_store_id: str, file_id: str) -> list[dict[str, Any]]:
        """The indexed chunks of one file, in order (read in a worker thread: a long scroll never holds the loop)."""
        return await asyncio.to_thread(self._index.chunks, vector_store_id, file_id)

    async def count(self, *, vector_store_id: str | None = None, file_id: str | None = None) -> int:
        """How many points the index holds (of a store and/or file): for tests and operators."""
        return await asyncio.to_thread(self._index.count, vector_store_id=vector_store_id, file_id=file_id)


class UnstartedRequestResender:
    """Sends again, every `interval_seconds`, the file requests ingestion has not started `older_than_seconds` after
    they were sent: a broker that loses acknowledged records (tansu restarted) lost them, and nothing else would
    send them, leaving their files in_progress for good. Same request id, so a late original changes nothing."""

    def __init__(self, *, repository: IngestionRepository, older_than_seconds: float, interval_seconds: float,
                 resent: Counter, batch: int = 500) -> None:
        self._repo = repository
        self._older_than = older_than_seconds
        self._resent = resent
        self._batch = batch
        self._periodic = PeriodicPass("ingestion-resend-unstarted", self._pass, interval_seconds, wait_first=True)

    async def start(self) -> None:
        """Sweep in the background."""
        await self._periodic.start()

    async def stop(self) -> None:
        """Stop sweeping (what a pass committed is sent by the outbox relay)."""
        await self._periodic.stop()

    async def sweep(self) -> int:
        """One pass (batch after batch); how many requests it sent again."""
        total = 0
        while True:
            resent = await self._repo.resend_unstarted(self._batch, self._older_than)
            total += len(resent)
            self._resent.inc(len(resent))
            if len(resent) < self._batch:
                return total

    async def _pass(self) -> bool:
        resent = await self.sweep()
        if resent:
            _log.warning("sent again the ingestion requests of %d vector store files nobody started", resent)
        return False
