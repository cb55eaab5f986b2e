"""Pure parts of the search library: chunking strategies and windows, filters, citations, point ids, and
the offline guarantee (parsing and embedding every format with no network at all); the ingestion service's
ordering key and its clean-up after a deleted store (an in-memory Qdrant)."""

import asyncio
import json
import re
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
from prometheus_client import CollectorRegistry
from qdrant_client import QdrantClient

from ingestion.handlers import Handlers
from ingestion.repository import HELD, Held, IngestionRepository, WorkItem
from ingestion.service import IngestionService
from threadline_core.events import FileDetached, FileIngestionRequested, VectorStoreDeleted
from threadline_core.metrics import IngestionMetrics
from threadline_search.chunking import (
    Chunk,
    ChunkingError,
    ChunkingStrategy,
    chunk_text,
    parse_chunking_strategy,
    token_spans,
)
from threadline_search.citations import annotate_content, citation_annotations, render_for_model
from threadline_search.embeddings import Embedder
from threadline_search.extract import ExtractionError, detect_kind, extract_text
from threadline_search.filters import FilterError, matches, validate_filter
from threadline_search.index import ChunkIndex, point_id
from threadline_search.parsing import ParserPool
from threadline_search.search import SearchResult

pytestmark = pytest.mark.unit


class WordTokens:
    """A stand-in tokenizer: one token per whitespace-separated word."""

    def offsets(self, text: str) -> list[tuple[int, int]]:
        spans, start = [], None
        for i, ch in enumerate(text + " "):
            if ch.isspace() and start is not None:
                spans.append((start, i))
                start = None
            elif not ch.isspace() and start is None:
                start = i
        return spans


def test_auto_and_static_strategies() -> None:
    assert parse_chunking_strategy(None) == ChunkingStrategy(800, 400)
    assert parse_chunking_strategy({"type": "auto"}).to_api() == {
        "type": "static", "static": {"max_chunk_size_tokens": 800, "chunk_overlap_tokens": 400}}
    static = {"type": "static", "static": {"max_chunk_size_tokens": 100, "chunk_overlap_tokens": 50}}
    assert parse_chunking_strategy(static) == ChunkingStrategy(100, 50)
    assert ChunkingStrategy.from_api(static) == ChunkingStrategy(100, 50)


@pytest.mark.parametrize(("raw", "param"), [
    ({"type": "static", "static": {"max_chunk_size_tokens": 99, "chunk_overlap_tokens": 0}},
     "chunking_strategy.static.max_chunk_size_tokens"),
    ({"type": "static", "static": {"max_chunk_size_tokens": 4097, "chunk_overlap_tokens": 0}},
     "chunking_strategy.static.max_chunk_size_tokens"),
    ({"type": "static", "static": {"max_chunk_size_tokens": 100, "chunk_overlap_tokens": 51}},
     "chunking_strategy.static.chunk_overlap_tokens"),
    ({"type": "static", "static": {"max_chunk_size_tokens": 100.5, "chunk_overlap_tokens": 0}},
     "chunking_strategy.static.max_chunk_size_tokens"),
    ({"type": "static", "static": {"max_chunk_size_tokens": True, "chunk_overlap_tokens": 0}},
     "chunking_strategy.static.max_chunk_size_tokens"),
    ({"type": "auto", "static": {}}, "chunking_strategy.static"),
    ({"type": "other"}, "chunking_strategy.type"),
    ("auto", "chunking_strategy"),
])
def test_invalid_strategies(raw: object, param: str) -> None:
    with pytest.raises(ChunkingError) as err:
        parse_chunking_strategy(raw)
    assert err.value.param == param


def test_chunk_windows_overlap_and_positions() -> None:
    text = " ".join(f"w{i}" for i in range(250))
    chunks = chunk_text(text, WordTokens(), ChunkingStrategy(100, 40))
    assert [c.tokens for c in chunks] == [100, 100, 100, 70]
    assert [c.text.split()[0] for c in chunks] == ["w0", "w60", "w120", "w180"]
    assert all(text[c.start_char:c.end_char] == c.text for c in chunks)
    assert chunks[-1].text.endswith("w249")
    assert [c.index for c in chunks] == [0, 1, 2, 3]
    assert chunk_text("   ", WordTokens(), ChunkingStrategy()) == []
    assert len(chunk_text("one two", WordTokens(), ChunkingStrategy())) == 1


def test_point_ids_are_deterministic() -> None:
    assert point_id("vs_1", "file-1", 0) == point_id("vs_1", "file-1", 0)
    assert len({point_id("vs_1", "file-1", 0), point_id("vs_1", "file-1", 1), point_id("vs_2", "file-1", 0)}) == 3


def test_filters() -> None:
    attrs = {"topic": "travel", "year": 2024, "draft": False}
    assert matches({"type": "eq", "key": "topic", "value": "travel"}, attrs)
    assert not matches({"type": "eq", "key": "topic", "value": "hr"}, attrs)
    assert matches({"type": "gte", "key": "year", "value": 2024}, attrs)
    assert not matches({"type": "gt", "key": "year", "value": 2024}, attrs)
    assert matches({"type": "in", "key": "topic", "value": ["hr", "travel"]}, attrs)
    assert matches({"type": "nin", "key": "missing", "value": ["x"]}, attrs)
    assert not matches({"type": "lt", "key": "topic", "value": 3}, attrs)  # no cross-type ordering
    assert matches({"type": "or", "filters": [{"type": "eq", "key": "draft", "value": True},
                                              {"type": "lt", "key": "year", "value": 2030}]}, attrs)
    assert not matches({"type": "and", "filters": [{"type": "eq", "key": "draft", "value": True},
                                                   {"type": "lt", "key": "year", "value": 2030}]}, attrs)
    for bad in ({"type": "eq", "key": "a"}, {"type": "like", "key": "a", "value": 1},
                {"type": "and", "filters": []}, {"type": "in", "key": "a", "value": 1}, []):
        with pytest.raises(FilterError):
            validate_filter(bad)


def test_filters_tell_booleans_from_numbers() -> None:
    """Attributes are typed JSON values: `true` is not `1` (Python's `True == 1` made `eq 1` match `true`)."""
    flagged, counted = {"public": True}, {"n": 1}
    assert not matches({"type": "eq", "key": "public", "value": 1}, flagged)
    assert not matches({"type": "eq", "key": "n", "value": True}, counted)
    assert not matches({"type": "in", "key": "public", "value": [1]}, flagged)
    assert matches({"type": "nin", "key": "public", "value": [1]}, flagged)
    assert matches({"type": "ne", "key": "n", "value": True}, counted)
    assert matches({"type": "eq", "key": "public", "value": True}, flagged)
    assert matches({"type": "in", "key": "n", "value": [1.0, 2]}, counted)


@pytest.mark.parametrize(("raw", "param", "code"), [
    ({"type": "eq", "key": "a", "value": "x", "extra": 1}, "filters.extra", "unknown_parameter"),
    ({"type": "and", "filters": [{"type": "eq", "key": "a", "value": 1}], "key": "x"}, "filters.key",
     "unknown_parameter"),
    ({"type": "or", "filters": [{"type": "eq", "key": "a", "vaule": 1}]}, "filters.filters[0].vaule",
     "unknown_parameter"),
    ({"type": "in", "key": "a", "value": [{"a": 1}]}, "filters.value[0]", "invalid_type"),
    ({"type": "eq", "key": "a"}, "filters.value", "missing_required_parameter"),
])
def test_filters_refuse_what_the_contract_does(raw: dict[str, Any], param: str, code: str) -> None:
    """ComparisonFilter and CompoundFilter are `additionalProperties: false`; `in` arrays hold strings or numbers."""
    with pytest.raises(FilterError) as err:
        validate_filter(raw)
    assert (err.value.param, err.value.code) == (param, code)


@pytest.mark.parametrize(("raw", "param"), [
    ({"type": "static", "static": {"max_chunk_size_tokens": 800, "chunk_overlap_tokens": 400, "x": 1}},
     "chunking_strategy.static.x"),
    ({"type": "static", "static": {"max_chunk_size_tokens": 800, "chunk_overlap_tokens": 400}, "y": 1},
     "chunking_strategy.y"),
    ({"type": "auto", "z": 1}, "chunking_strategy.z"),
])
def test_chunking_strategies_take_no_unknown_keys(raw: dict[str, Any], param: str) -> None:
    with pytest.raises(ChunkingError) as err:
        parse_chunking_strategy(raw)
    assert (err.value.param, err.value.code) == (param, "unknown_parameter")


def test_citations_from_markers() -> None:
    result = SearchResult("file-a", "hr.pdf", 0.8, "27 vacation days", "vs_1", 0, 0, 16)
    output = render_for_model([result], call_index=1)
    assert output == "【1:0†source】 hr.pdf: 27 vacation days", "hosted markers (code strips `†source】`)"
    assert render_for_model([]) == "No results found in the attached files."
    calls = [[{"file_id": "file-x", "file_name": "x.txt"}], [{"file_id": "file-a", "file_name": "hr.pdf"}]]
    text = "Answer: 【1:0†source】 and again 【0†hr.pdf】 and 【9:9†unknown.txt】"
    notes = citation_annotations(text, calls)
    assert [(n["file_citation"]["file_id"], text[n["start_index"]:n["end_index"]]) for n in notes] == [
        ("file-a", "【1:0†source】"), ("file-a", "【0†hr.pdf】")]
    content = [{"type": "text", "text": {"value": text, "annotations": []}}]
    steps = [{"step_details": {"type": "message_creation"}},
             {"step_details": {"type": "tool_calls", "tool_calls": [
                 {"type": "file_search", "file_search": {"results": calls[0]}},
                 {"type": "code_interpreter"},
                 {"type": "file_search", "file_search": {"results": calls[1]}}]}}]
    annotate_content(content, steps)
    assert len(content[0]["text"]["annotations"]) == 2  # type: ignore[index]


def test_extraction_errors_without_parsing() -> None:
    with pytest.raises(ExtractionError) as err:
        extract_text("empty.pdf", b"")
    assert err.value.code == "invalid_file"
    with pytest.raises(ExtractionError) as err:
        extract_text("image.png", b"\x89PNG\r\n")
    assert err.value.code == "unsupported_file"
    assert detect_kind("report.PDF", b"") == "pdf"
    assert detect_kind("noextension", b"%PDF-1.4") == "pdf"
    assert detect_kind("main.py", b"print(1)") == "text"


def test_a_json_file_with_a_lone_surrogate_escape_is_indexed() -> None:
    """JSON allows `\\ud800` alone; read, it is a lone surrogate, which the tokenizer refused (the file failed with
    a server_error). It is indexed with U+FFFD instead."""
    text = extract_text("broken.json", b'{"a": "lone \\ud800 half", "b": "pair \\ud83d\\ude00"}').text
    assert text == '{\n  "a": "lone \ufffd half",\n  "b": "pair \U0001f600"\n}'


def test_utf16_text_without_a_byte_order_mark_is_read_as_utf16() -> None:
    """The hosted file search took text files in "utf-8, utf-16, or ASCII"; UTF-16 saved without a byte order mark
    read as UTF-8 (its NUL bytes are valid there) and was indexed as "T\ufffdh\ufffde...", matching no query."""
    words = "The secret word is quince. Ünïcödé too.\n\nA second paragraph."
    for encoding in ("utf-16-le", "utf-16-be", "utf-16", "utf-8"):
        assert extract_text("notes.txt", words.encode(encoding)).text == words, encoding
    with pytest.raises(ExtractionError) as err:  # NULs, but not where UTF-16 text has them: still binary
        extract_text("data.txt", bytes(range(256)) * 4)
    assert err.value.code == "invalid_file"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1) for a network namespace")
def test_parsing_and_embedding_need_no_network() -> None:
    """Every format parses and embeds in a process inside an empty network namespace (no route anywhere)."""
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("cannot create a network namespace here")
    tests_dir = Path(__file__).resolve().parent
    script = textwrap.dedent(f"""
        import sys, socket
        sys.path.insert(0, {str(tests_dir)!r})
        try:
            socket.create_connection(("1.1.1.1", 443), timeout=2)
            raise SystemExit("network is reachable: the check proves nothing")
        except OSError:
            pass
        import fixtures_docs as d
        from threadline_search.extract import extract_text
        from threadline_search.embeddings import LocalEmbedder
        files = {{"a.pdf": d.pdf(), "b.docx": d.docx("T", ["para"]), "c.pptx": d.pptx("T", "body"),
                  "d.html": d.html("T", "body"), "e.md": d.markdown("T", "body"), "f.txt": d.text("body"),
                  "g.csv": d.csv([("a", "b"), ("1", "2")]), "h.json": d.json_doc({{"k": "v"}})}}
        texts = [extract_text(name, data).text for name, data in files.items()]
        vectors = LocalEmbedder().embed_sync(texts)
        assert len(vectors) == 8 and len(vectors[0]) == 384
        print("offline ok")
    """)
    done = subprocess.run(["unshare", "-n", sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600, env={"PATH": "/usr/bin:/bin", "DO_NOT_TRACK": "1", "HOME": "/nonexistent"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "offline ok" in done.stdout


async def test_remote_embedder_batches_and_normalises() -> None:
    """THREADLINE_EMBEDDINGS_BASE_URL: an OpenAI-compatible /embeddings endpoint, called in batches."""
    import httpx2

    from threadline_search.embeddings import RemoteEmbedder

    calls: list[list[str]] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        body = json.loads(request.content)
        assert request.url.path == "/v1/embeddings" and body["model"] == "emb-test"
        calls.append(body["input"])
        data = [{"object": "embedding", "index": i, "embedding": [3.0, 4.0, float(len(text))]}
                for i, text in reversed(list(enumerate(body["input"])))]  # out of order on purpose
        return httpx2.Response(200, json={"object": "list", "data": data, "model": "emb-test",
                                         "usage": {"prompt_tokens": 1, "total_tokens": 1}})

    client = httpx2.AsyncClient(transport=httpx2.MockTransport(handler))
    embedder = RemoteEmbedder(base_url="http://embeddings.test/v1", api_key="k", model="emb-test", batch_size=2,
                              http_client=client)
    await embedder.start()
    assert embedder.dim == 3
    vectors = await embedder.embed(["a", "bb", "ccc"])
    assert calls[1:] == [["a", "bb"], ["ccc"]]
    assert [round(sum(x * x for x in v), 6) for v in vectors] == [1.0, 1.0, 1.0]
    assert vectors[0][2] < vectors[1][2] < vectors[2][2]  # order kept despite the shuffled response
    await embedder.close()


async def test_remote_embeddings_of_texts_too_long_for_the_server_are_made_in_halves() -> None:
    """llama.cpp's server refuses an embedding input longer than its physical batch (512 tokens by default) with 500
    "input is too large to process. increase the physical batch size"; chunks hold 800 tokens, so every file failed
    to index. A refused batch is sent text by text and a refused text in halves, their vectors averaged; any other
    error still fails."""
    import httpx2
    import openai

    from threadline_search.embeddings import RemoteEmbedder

    sent: list[list[str]] = []
    embedded: list[str] = []
    too_large = "input is too large to process. increase the physical batch size"

    def handler(request: httpx2.Request) -> httpx2.Response:
        body = json.loads(request.content)
        sent.append(body["input"])
        if body["model"] == "gone":
            return httpx2.Response(404, json={"error": {"code": 404, "message": "model not found"}})
        if any(len(text) > 100 for text in body["input"]):
            return httpx2.Response(500, json={"error": {"code": 500, "type": "server_error", "message": too_large}})
        embedded.extend(body["input"])
        data = [{"object": "embedding", "index": i, "embedding": [1.0, float(len(text)), 0.0]}
                for i, text in enumerate(body["input"])]
        return httpx2.Response(200, json={"object": "list", "data": data, "model": body["model"]})

    client = httpx2.AsyncClient(transport=httpx2.MockTransport(handler))
    embedder = RemoteEmbedder(base_url="http://embeddings.test/v1", api_key="k", model="emb", http_client=client,
                              max_retries=0)
    long_text = " ".join(f"word{i}" for i in range(40))  # 269 characters: halved twice
    vectors = await embedder.embed(["short", long_text])
    assert sent[0] == ["short", long_text] and sent[1:3] == [["short"], [long_text]]
    assert embedded[0] == "short" and "".join(embedded[1:]) == long_text and len(embedded) == 5  # 4 quarters
    assert [round(sum(x * x for x in v), 6) for v in vectors] == [1.0, 1.0]
    assert vectors[1][1] > vectors[0][1] > 0  # the long text's parts are longer than "short"
    gone = RemoteEmbedder(base_url="http://embeddings.test/v1", api_key="k", model="gone", http_client=client,
                          max_retries=0)
    with pytest.raises(openai.NotFoundError):
        await gone.embed([long_text])
    await embedder.close()


def test_ingestion_commands_are_ordered_per_file() -> None:
    """A file's commands share a key, apart from its store's other files; store-wide commands keep the Kafka key."""
    attach = FileIngestionRequested(vector_store_id="vs_a", file_id="file-1").envelope(project_id="p", key="vs_a")
    detach = FileDetached(vector_store_id="vs_a", file_id="file-1").envelope(project_id="p", key="vs_a")
    other = FileIngestionRequested(vector_store_id="vs_a", file_id="file-2").envelope(project_id="p", key="vs_a")
    deleted = VectorStoreDeleted(vector_store_id="vs_a").envelope(project_id="p", key="vs_a")
    keys = [Handlers.ordering_key(json.loads(e.to_bytes())) for e in (attach, detach, other, deleted)]
    assert keys == ["vs_a/file-1", "vs_a/file-1", "vs_a/file-2", None]


class _GoneOrKept:
    """An ingestion repository whose requests are all out of force; only `vs_kept` still exists."""

    async def claim(self, vector_store_id: str, file_id: str, request_id: str, *, owner: str,
                    lease_seconds: float) -> None:
        return None

    async def store_exists(self, vector_store_id: str) -> bool:
        return vector_store_id == "vs_kept"


async def test_a_request_out_of_force_removes_points_only_when_its_store_is_gone() -> None:
    """A store deleted while its file was indexed (and the attempt failed after an upsert): the retry finds no
    store and removes what that attempt wrote. A store that still exists keeps the points (a newer request's)."""
    index = ChunkIndex(QdrantClient(":memory:"), "chunks")
    index.ensure(4)
    chunk = Chunk(index=0, text="part", start_char=0, end_char=4, tokens=1)
    for store in ("vs_gone", "vs_kept"):
        index.upsert(vector_store_id=store, file_id="file-a", chunks=[chunk], vectors=[[1.0, 0.0, 0.0, 0.0]],
                     payload={"project_id": "p", "filename": "a.txt"})
    service = IngestionService(repository=cast(IngestionRepository, _GoneOrKept()), index=index,
                               embedder=cast(Embedder, None), parsers=cast(ParserPool, None),
                               metrics=IngestionMetrics(CollectorRegistry()))
    await service.ingest("vs_gone", "file-a", "evt_old")
    await service.ingest("vs_kept", "file-a", "evt_old")
    assert index.count(vector_store_id="vs_gone") == 0
    assert index.count(vector_store_id="vs_kept") == 1


class _WithdrawnAfterAFailure:
    """A request in force for its first attempt only (its file detached during the back-off)."""

    def __init__(self) -> None:
        self.attempts = 0

    async def claim(self, vector_store_id: str, file_id: str, request_id: str, *, owner: str,
                    lease_seconds: float) -> WorkItem | None:
        self.attempts += 1
        if self.attempts > 1:
            return None
        return WorkItem(project_id="p", vector_store_id=vector_store_id, file_id=file_id, filename="a.txt",
                        chunking_strategy={}, attributes={})

    async def content(self, file_id: str) -> bytes:
        return b"some text"

    async def release(self, item: WorkItem, request_id: str, *, owner: str) -> None:
        return None

    async def store_exists(self, vector_store_id: str) -> bool:
        return True


class _Parsed:
    def __init__(self) -> None:
        self.chunks = [Chunk(index=0, text="some text", start_char=0, end_char=9, tokens=2)]


class _Parsers:
    async def parse(self, filename: str, data: bytes, strategy: object) -> _Parsed:
        return _Parsed()


class _BrokenEmbedder:
    dim = 4

    async def embed(self, texts: list[str]) -> list[list[float]]:
        raise ConnectionError("embeddings endpoint down")


async def test_a_request_withdrawn_between_attempts_leaves_no_failure_count() -> None:
    """The failure count of a request kept for its retry is forgotten when the retry finds it withdrawn: it was
    kept for the life of the process, one entry per such request."""
    service = IngestionService(repository=cast(IngestionRepository, _WithdrawnAfterAFailure()),
                               index=ChunkIndex(QdrantClient(":memory:"), "chunks"),
                               embedder=cast(Embedder, _BrokenEmbedder()), parsers=cast(ParserPool, _Parsers()),
                               metrics=IngestionMetrics(CollectorRegistry()))
    with pytest.raises(ConnectionError):
        await service.ingest("vs_a", "file-a", "evt_1")
    assert service._failures == {"evt_1": 1}  # the consumer retries it
    await service.ingest("vs_a", "file-a", "evt_1")
    assert service._failures == {}


class _OneFile:
    """One vector store file under one request, in memory, with the repository's claim and finish rules."""

    def __init__(self, *, claims_lapse: bool = False) -> None:
        self.status = "in_progress"
        self.owner: str | None = None
        self.expires = 0.0
        self.claims_lapse = claims_lapse  # every claim lapses at once (its holder lost the database for a while)
        self.completions = 0

    async def claim(self, vector_store_id: str, file_id: str, request_id: str, *, owner: str,
                    lease_seconds: float) -> WorkItem | Held | None:
        if self.status != "in_progress":
            return None
        if self.owner not in (None, owner) and not self.claims_lapse and time.monotonic() < self.expires:
            return HELD
        self.owner, self.expires = owner, time.monotonic() + lease_seconds
        return WorkItem(project_id="p", vector_store_id=vector_store_id, file_id=file_id, filename="a.txt",
                        chunking_strategy={}, attributes={})

    async def renew(self, item: WorkItem, request_id: str, *, owner: str, lease_seconds: float) -> bool:
        return self.owner == owner and self.status == "in_progress"

    async def release(self, item: WorkItem, request_id: str, *, owner: str) -> None:
        if self.owner == owner:
            self.owner = None

    async def request_status(self, vector_store_id: str, file_id: str, request_id: str) -> str:
        return self.status

    async def store_exists(self, vector_store_id: str) -> bool:
        return True

    async def content(self, file_id: str) -> bytes:
        return b"one two three"

    async def finish(self, item: WorkItem, request_id: str, *, usage_bytes: int,
                     last_error: dict[str, str] | None) -> bool:
        if self.status != "in_progress":
            return False
        self.status, self.owner = ("failed" if last_error else "completed"), None
        self.completions += 1
        return True


@dataclass
class _Chunked:
    chunks: list[Chunk]
    tokens: int = 3
    kind: str = "text"


class _GatedParsers:
    """Parses into three chunks once the gate opens, counting the files it was asked for."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()
        self.entered_twice = asyncio.Event()
        self.calls = 0

    async def parse(self, filename: str, data: bytes, strategy: object) -> _Chunked:
        self.calls += 1
        (self.entered_twice if self.calls > 1 else self.entered).set()
        await self.gate.wait()
        return _Chunked([Chunk(index=i, text=word, start_char=0, end_char=len(word), tokens=1)
                         for i, word in enumerate(data.decode().split())])


class _UnitEmbedder:
    dim = 4

    async def embed(self, texts: list[str]) -> list[list[float]]:
        return [[1.0, 0.0, 0.0, 0.0] for _ in texts]


def _twin_services(repository: _OneFile, parsers: _GatedParsers) -> tuple[IngestionService, IngestionService,
                                                                          ChunkIndex]:
    """Two instances (claim owners) sharing one database and one index, embedding one chunk at a time."""
    index = ChunkIndex(QdrantClient(":memory:"), "chunks")
    index.ensure(4)
    services = [IngestionService(repository=cast(IngestionRepository, repository), index=index,
                                 embedder=cast(Embedder, _UnitEmbedder()), parsers=cast(ParserPool, parsers),
                                 metrics=IngestionMetrics(CollectorRegistry()), embed_batch_size=1, owner=owner,
                                 claim_seconds=0.5) for owner in ("ingestion-a", "ingestion-b")]
    return services[0], services[1], index


async def test_a_second_delivery_of_a_request_being_indexed_waits_and_changes_nothing() -> None:
    """A request delivered again while another instance indexes it (a rebalance, the sweep's re-send of a request
    that was only late) waits for that claim instead of indexing the file at the same time; once the first one
    completed the file, it changes nothing: one completion, one set of chunks, the file parsed once."""
    repository, parsers = _OneFile(), _GatedParsers()
    first, second, index = _twin_services(repository, parsers)
    indexing = asyncio.create_task(first.ingest("vs_a", "file-a", "evt_1"))
    await parsers.entered.wait()
    duplicate = asyncio.create_task(second.ingest("vs_a", "file-a", "evt_1"))
    await asyncio.sleep(0.3)  # the first one renews its claim meanwhile
    assert not duplicate.done() and parsers.calls == 1
    parsers.gate.set()
    await asyncio.gather(indexing, duplicate)
    assert (repository.status, repository.completions, parsers.calls) == ("completed", 1, 1)
    assert index.count(vector_store_id="vs_a", file_id="file-a") == 3
    await second.ingest("vs_a", "file-a", "evt_1")  # delivered once more, after the end: skipped
    assert (repository.completions, parsers.calls) == (1, 1)
    assert index.count(vector_store_id="vs_a", file_id="file-a") == 3


async def test_two_deliveries_indexing_at_once_still_complete_once_with_their_chunks() -> None:
    """If both deliveries do index at once (a claim lapsed while its holder could not reach the database), the one
    that finishes second neither completes the file again nor removes the points the first one completed with:
    they are the same points (same ids, same chunks)."""
    repository, parsers = _OneFile(claims_lapse=True), _GatedParsers()
    first, second, index = _twin_services(repository, parsers)
    both = [asyncio.create_task(service.ingest("vs_a", "file-a", "evt_1")) for service in (first, second)]
    await parsers.entered_twice.wait()
    parsers.gate.set()
    await asyncio.gather(*both)
    assert (repository.status, repository.completions) == ("completed", 1)
    assert index.count(vector_store_id="vs_a", file_id="file-a") == 3


class _Words:
    """Tokens at the words (a stand-in for the real tokenizer, which pre-splits on whitespace too)."""

    def offsets(self, text: str) -> list[tuple[int, int]]:
        return [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]


def test_token_spans_a_slice_at_a_time_match_the_whole_and_stop_past_the_limit() -> None:
    """A 21 MB text given to the tokenizer at once aborted the parser (1.4 GB for its offsets): slices cut at
    whitespace give the same spans; past the file limit it stops (the file fails as invalid_file)."""
    text = " ".join(f"w{i}" for i in range(3000)) + "\n" + "x" * 50 + " tail"
    whole = token_spans(text, _Words(), slice_chars=len(text) + 1)
    assert token_spans(text, _Words(), slice_chars=97) == whole and len(whole) >= 3002
    assert 1000 < len(token_spans(text, _Words(), limit=1000, slice_chars=97)) < 1040
