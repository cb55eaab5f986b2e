"""Search benchmark: hybrid file_search (semantic + keyword query) beside semantic-only search, in Qdrant local mode.

No stack: a local-mode Qdrant (`QdrantClient(path=...)` in a temp dir, what `make run` uses without QDRANT_URL) is
filled with a deterministic corpus of chunks (a Zipf-distributed vocabulary of made-up words, product codes and
names, about 300 terms per chunk, as a default 800-token chunk has), written by `ChunkIndex.upsert` as ingestion
writes them (so with their keyword terms). Vectors are seeded random unit vectors around a few topics, not the
embedding model's: the model embeds about 12 chunks/s here, too slow for thousands of chunks, and what is timed is
Qdrant's side. Queries get precomputed vectors the same way (embedding time is not in the figures).

For each corpus size, every query is run through `FileSearcher.search` (max_num_results 20, so 40 candidates of each
query) with the default keyword weight (hybrid) and with weight 0 (semantic only: one dense query, the baseline),
alternating, a few rounds, with `file_ids` naming every file of both stores as the tool executor does (its completed
files); p50 / p99 per query and the ratio hybrid / semantic are reported.

Usage: ``python bench/bench_search.py [--quick] [--sizes N,N,...] [--rounds N]``.
"""

import argparse
import asyncio
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Sequence

from common import format_table, log, machine_summary, ms, percentile, write_result
from qdrant_client import QdrantClient

from threadline_search.chunking import Chunk
from threadline_search.index import ChunkIndex
from threadline_search.search import FileSearcher
from threadline_search.settings import DEFAULT_KEYWORD_WEIGHT

os.environ.setdefault("DO_NOT_TRACK", "1")

DIM = 384  # all-MiniLM-L6-v2's
TOPICS = 12
TERMS_PER_CHUNK = 300
CHUNKS_PER_FILE = 25
STORES = ("vs_bench_a", "vs_bench_b")
COLLECTION = "bench_chunks"
QUERIES = [
    "XJ-4471", "which pump is XJ-4471", "ERR_SSL_PROTOCOL after the upgrade", "invoice for customer Okafor",
    "how do I bleed the air from the valve", "brass fitting torque", "what does the warranty cover",
    "Q07-0042 shipped to the depot", "report on the quarterly inspection", "pressure drops at night",
    "john.doe@example.com", "replacement seal for model v1.2.3",
]


def _unit(values: Sequence[float]) -> list[float]:
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


class Corpus:
    """Deterministic chunk texts and vectors: chunk i is the same in every run and at every size."""

    def __init__(self, seed: int = 7) -> None:
        rng = random.Random(seed)
        syllables = ["ka", "lo", "mi", "ter", "on", "ra", "vel", "us", "dri", "pen", "so", "gar", "li", "ne", "tho"]
        self.words = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))) for _ in range(6000)})
        rng.shuffle(self.words)
        self.words[:40] = ["pump", "valve", "seal", "brass", "pressure", "invoice", "customer", "warranty", "depot",
                           "report", "inspection", "upgrade", "fitting", "torque", "air", "night", "model",
                           "replacement", "shipped", "quarterly", "drops", "cover", "bleed", "water", "service",
                           "order", "delivery", "part", "error", "manual", "install", "flow", "filter", "motor",
                           "cable", "meter", "tank", "hose", "gasket", "bolt"]
        self.weights = [1 / (rank + 1) for rank in range(len(self.words))]  # Zipf
        self.codes = [f"XJ-{4400 + i}" for i in range(120)] + [f"Q{i % 20:02d}-{i:04d}" for i in range(200)] + [
            "ERR_SSL_PROTOCOL", "ERR_TIMEOUT", "v1.2.3", "v2.0.1", "john.doe@example.com", "Okafor", "Lindqvist"]
        centre_rng = random.Random(seed + 1)
        self.centres = [_unit([centre_rng.gauss(0, 1) for _ in range(DIM)]) for _ in range(TOPICS)]

    def text(self, i: int) -> str:
        """Chunk i: about TERMS_PER_CHUNK words, a few codes among them."""
        rng = random.Random(i * 7919 + 1)
        words = rng.choices(self.words, weights=self.weights, k=TERMS_PER_CHUNK)
        for _ in range(rng.randint(0, 4)):
            words[rng.randrange(len(words))] = rng.choice(self.codes)
        return " ".join(words)

    def vector(self, key: int, topic: int) -> list[float]:
        """A unit vector near topic `topic`'s centre."""
        rng = random.Random(key * 104729 + 3)
        centre = self.centres[topic % TOPICS]
        return _unit([c + rng.gauss(0, 0.06) for c in centre])


class FixedEmbedder:
    """The queries' precomputed vectors (the Embedder protocol without a model)."""

    model_id = "bench-fixed"
    dim = DIM

    def __init__(self, vectors: dict[str, list[float]]) -> None:
        self._vectors = vectors

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """The stored vector of each text."""
        return [self._vectors[t] for t in texts]


def fill(index: ChunkIndex, corpus: Corpus, start: int, stop: int) -> None:
    """Write chunks start..stop-1, a file of CHUNKS_PER_FILE at a time, files alternating between the stores."""
    for first in range(start - start % CHUNKS_PER_FILE, stop, CHUNKS_PER_FILE):
        numbers = [n for n in range(first, min(first + CHUNKS_PER_FILE, stop)) if n >= start]
        file_no = first // CHUNKS_PER_FILE
        chunks = []
        for n in numbers:
            text = corpus.text(n)
            chunks.append(Chunk(index=n - first, text=text, start_char=0, end_char=len(text), tokens=len(text) // 4))
        index.upsert(vector_store_id=STORES[file_no % len(STORES)], file_id=f"file-{file_no:05d}", chunks=chunks,
                     vectors=[corpus.vector(n, file_no) for n in numbers],
                     payload={"project_id": "proj_bench", "filename": f"file-{file_no:05d}.txt"})


def files_of(size: int) -> dict[str, list[str]]:
    """Every file of each store, as the tool executor passes them (a store's completed files)."""
    files: dict[str, list[str]] = {store: [] for store in STORES}
    for file_no in range((size + CHUNKS_PER_FILE - 1) // CHUNKS_PER_FILE):
        files[STORES[file_no % len(STORES)]].append(f"file-{file_no:05d}")
    return files


async def measure(hybrid: FileSearcher, semantic: FileSearcher, rounds: int,
                  file_ids: dict[str, list[str]]) -> dict[str, list[float]]:
    """Seconds per query of each searcher, alternating query by query (both see the same load)."""
    times: dict[str, list[float]] = {"hybrid": [], "semantic": []}
    for searcher in (hybrid, semantic):  # warm up
        await searcher.search(list(STORES), QUERIES[0], file_ids=file_ids)
    for _ in range(rounds):
        for query in QUERIES:
            for name, searcher in (("hybrid", hybrid), ("semantic", semantic)):
                started = time.perf_counter()
                await searcher.search(list(STORES), query, max_num_results=20, file_ids=file_ids)
                times[name].append(time.perf_counter() - started)
    return times


def main(argv: list[str]) -> int:
    """Measure, print the table, write bench/results/search.md."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller corpora, fewer rounds")
    parser.add_argument("--sizes", default=None, help="corpus sizes in chunks, comma-separated")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes.split(",")) if args.sizes else (
        [250, 1000] if args.quick else [500, 1500, 3000])
    rounds = args.rounds or (2 if args.quick else 4)
    corpus = Corpus()
    embedder = FixedEmbedder({q: corpus.vector(10_000_000 + i, i) for i, q in enumerate(QUERIES)})
    rows = []
    with tempfile.TemporaryDirectory(prefix="threadline-bench-search-") as path:
        client = QdrantClient(path=path, force_disable_check_same_thread=True)
        index = ChunkIndex(client, COLLECTION)
        index.ensure(DIM)
        hybrid = FileSearcher(client, embedder, collection=COLLECTION)
        semantic = FileSearcher(client, embedder, collection=COLLECTION, keyword_weight=0)
        written = 0
        for size in sizes:
            log(f"indexing chunks {written}..{size - 1} ...")
            started = time.perf_counter()
            fill(index, corpus, written, size)
            log(f"  {size - written} chunks in {time.perf_counter() - started:.1f}s")
            written = size
            log(f"{size} chunks: {rounds} rounds of {len(QUERIES)} queries, hybrid and semantic ...")
            times = asyncio.run(measure(hybrid, semantic, rounds, files_of(size)))
            h50, h99 = percentile(times["hybrid"], 50), percentile(times["hybrid"], 99)
            s50, s99 = percentile(times["semantic"], 50), percentile(times["semantic"], 99)
            rows.append([size, ms(h50), ms(h99), ms(s50), ms(s99), f"{h50 / s50:.1f}x",
                         f"{(h50 - s50) / size * 1000:.3f}"])  # seconds per chunk, as ms
        client.close()
    table = format_table(["chunks", "hybrid p50 ms", "hybrid p99 ms", "semantic p50 ms", "semantic p99 ms",
                          "hybrid / semantic (p50)", "hybrid extra ms per chunk"], rows)
    notes = (f"Qdrant local mode (path in a temp dir), chunks of about {TERMS_PER_CHUNK} terms in 2 stores, both "
             f"searched, every file named in file_ids (as the tool executor does); {len(QUERIES)} queries x {rounds} "
             f"rounds per size through `FileSearcher.search` (max_num_results 20), hybrid at keyword weight "
             f"{DEFAULT_KEYWORD_WEIGHT} against semantic only (weight 0) in the same run. Seeded random vectors "
             f"(dim {DIM}), not the embedding model's; embedding time is not included.")
    print(table)
    print()
    print(notes)
    path_written = write_result("search", f"# Search latency (local-mode Qdrant)\n\n{machine_summary()}\n\n{table}\n\n"
                                f"{notes}\n")
    log(f"wrote {path_written}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
