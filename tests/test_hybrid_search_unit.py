"""Hybrid file_search without the stack: the keyword terms and scores (`threadline_search.keywords`), the index's two
queries on a local-mode Qdrant, and FileSearcher ranking a chunk with a rare exact term first where search by
meaning alone did not."""

import logging
import math
from collections.abc import Sequence
from typing import Any, cast

import fixtures_docs as docs
import pytest
from qdrant_client import QdrantClient, models

from threadline_search import keywords
from threadline_search.chunking import Chunk
from threadline_search.embeddings import Embedder
from threadline_search.index import ChunkIndex
from threadline_search.keywords import (
    K1,
    KEYWORD_VECTOR,
    PART_WEIGHT,
    document_terms,
    fuse,
    keyword_score,
    query_terms,
    term_index,
    terms,
)
from threadline_search.search import FileSearcher

pytestmark = pytest.mark.unit

# --- terms ---------------------------------------------------------------------------------------------------------


def test_terms_are_case_folded_words_with_compound_parts_and_no_function_words() -> None:
    assert terms("Part XJ-4471 is the brass valve.") == ["part", "xj-4471", "xj", "4471", "brass", "valve"]
    assert terms("ERR_SSL_PROTOCOL at v1.2.3") == ["err_ssl_protocol", "err", "ssl", "protocol", "v1.2.3", "v1", "2",
                                                   "3"]
    full_width = "".join(chr(ord(c) + 0xFEE0) for c in "XJ4471")  # NFKC makes them plain letters and digits
    assert terms(f"Müller's {full_width}") == ["müller's", "müller", "s", "xj4471"]
    assert terms("STRASSE Straße") == ["strasse", "strasse"]  # case folding
    assert terms("What is it and where are they?") == []
    assert terms("a" * 129 + " ok") == ["ok"]  # a run of 129 characters is no term


def test_term_indices_are_deterministic_uint32() -> None:
    """The same in every process and release: the points written before a restart must match queries after it."""
    assert term_index("xj-4471") == term_index("xj-4471") == 3473044255  # pinned: a change orphans every indexed term
    assert all(0 <= term_index(t) < 2 ** 32 for t in ("", "a", "ü" * 100))
    assert len({term_index(f"t{i}") for i in range(10000)}) == 10000


def test_document_weights_are_bm25_term_frequencies() -> None:
    weights = dict(zip(*(lambda t: (t.indices, t.values))(document_terms("kiwi kiwi kiwi apple")), strict=True))
    kiwi, apple = weights[term_index("kiwi")], weights[term_index("apple")]
    assert apple < kiwi < K1 + 1  # repeats count, saturating
    assert math.isclose(kiwi, keywords.tf_weight(3, 4)) and math.isclose(apple, keywords.tf_weight(1, 4))
    # the same term once in a long chunk weighs less than once in a short one
    assert keywords.tf_weight(1, 500) < keywords.tf_weight(1, 10)
    assert keywords.tf_weight(1000, 256) < K1 + 1
    assert not document_terms("the and of")


def test_query_terms_weigh_a_compound_words_parts_less_and_each_term_once() -> None:
    query = query_terms("XJ-4471 xj-4471 valve")
    weights = dict(zip(query.indices, query.values, strict=True))
    assert weights == {term_index("xj-4471"): 1.0, term_index("xj"): PART_WEIGHT, term_index("4471"): PART_WEIGHT,
                       term_index("valve"): 1.0}
    assert query.indices == sorted(query.indices)
    assert dict(zip(*(lambda t: (t.indices, t.values))(query_terms("xj 4471")), strict=True)) == {
        term_index("xj"): 1.0, term_index("4471"): 1.0}  # typed as words: whole words
    assert not query_terms("what is it?")


# --- scores --------------------------------------------------------------------------------------------------------


def test_keyword_score_saturates_in_units_of_the_rarest_terms_idf() -> None:
    n = 1000
    rarest = keywords.idf(1, n)
    assert keyword_score(0.0, n) == 0.0 == keyword_score(5.0, 0)
    assert math.isclose(keyword_score(rarest, n), 1 - math.exp(-1))  # a unique term once in an average chunk
    common = keyword_score(keywords.idf(n, n) * (K1 + 1), n)  # in every chunk, as often as can be
    assert common < 0.001
    scores = [keyword_score(x, n) for x in (0.1, 1, 5, 20, 100, 1e6)]
    assert scores == sorted(scores) and all(0 <= s <= 1 for s in scores)


@pytest.mark.parametrize("semantic", [-1.0, -0.2, 0.0, 0.3, 0.8, 1.0])
def test_fused_score_is_the_semantic_one_raised_toward_one(semantic: float) -> None:
    assert fuse(semantic, 0.0, 0.6) == semantic  # no keyword match: exactly the semantic score
    assert fuse(semantic, 0.9, 0.0) == semantic  # weight 0: semantic search
    previous = semantic
    for keyword in (0.1, 0.5, 0.9, 1.0):
        fused = fuse(semantic, keyword, 0.6)
        assert previous <= fused <= 1.0
        previous = fused
    assert fuse(0.5, 1.0, 0.6) == pytest.approx(0.8)  # closes 60 % of the gap to 1
    assert fuse(0.4, 0.5, 0.6) < fuse(0.5, 0.5, 0.6)  # increasing in the semantic score too


# --- the index on local-mode Qdrant --------------------------------------------------------------------------------

DIM = 4


def _unit(*values: float) -> list[float]:
    norm = math.sqrt(sum(v * v for v in values))
    return [v / norm for v in values]


def _put(index: ChunkIndex, store: str, file_id: str, texts_and_vectors: Sequence[tuple[str, list[float]]]) -> None:
    chunks = [Chunk(index=i, text=text, start_char=0, end_char=len(text), tokens=len(text.split()))
              for i, (text, _) in enumerate(texts_and_vectors)]
    index.upsert(vector_store_id=store, file_id=file_id, chunks=chunks, vectors=[v for _, v in texts_and_vectors],
                 payload={"project_id": "p", "filename": f"{file_id}.txt"})


def _by_text(hits: Sequence[Any]) -> dict[str, tuple[float, float]]:
    return {hit.payload["text"]: (round(hit.semantic, 4), round(hit.keyword, 4)) for hit in hits}


@pytest.fixture
def index() -> ChunkIndex:
    chunks = ChunkIndex(QdrantClient(":memory:"), "chunks")
    chunks.ensure(DIM)
    return chunks


def test_a_new_collection_has_the_keyword_vector_and_points_are_written_with_it(index: ChunkIndex) -> None:
    sparse = index.client.get_collection("chunks").config.params.sparse_vectors or {}
    assert sparse[KEYWORD_VECTOR].modifier == models.Modifier.IDF
    _put(index, "vs_a", "f", [("Part XJ-4471 is a valve.", _unit(1, 0, 0, 0)), ("the and of", _unit(0, 1, 0, 0))])
    points, _ = index.client.scroll("chunks", with_vectors=True, limit=10)
    vectors = {p.payload["text"]: p.vector for p in points if p.payload}
    written = cast(dict[str, Any], vectors["Part XJ-4471 is a valve."])[KEYWORD_VECTOR]
    assert written.indices == document_terms("Part XJ-4471 is a valve.").indices
    assert KEYWORD_VECTOR not in cast(dict[str, Any], vectors["the and of"])  # no terms: dense vector only
    assert index.keyword_search_ready() is True


def test_search_takes_the_union_of_both_queries_with_both_scores(index: ChunkIndex) -> None:
    query = _unit(1, 0, 0, 0)
    _put(index, "vs_a", "f", [
        ("Pumps move water.", _unit(1, 0.1, 0, 0)),
        ("Pumps are loud.", _unit(1, 0.3, 0, 0)),
        ("Replacement part XJ-4471 is the brass valve.", _unit(0.2, 1, 0, 0)),  # far from the query's meaning
        ("Unrelated text.", _unit(0, 0, 1, 0))])
    semantic = index.search(query, vector_store_ids=["vs_a"], limit=2)
    assert [h.payload["text"] for h in semantic] == ["Pumps move water.", "Pumps are loud."]
    assert all(h.keyword == 0 for h in semantic)

    hybrid = _by_text(index.search(query, vector_store_ids=["vs_a"], limit=2, keywords=query_terms("XJ-4471 pumps")))
    valve = hybrid.pop("Replacement part XJ-4471 is the brass valve.")
    assert valve[0] == pytest.approx(0.1961, abs=1e-3) and valve[1] > 0.6  # its cosine filled in, keyword found
    assert set(hybrid) == {"Pumps move water.", "Pumps are loud."}
    assert all(0 < kw < valve[1] for _, kw in hybrid.values())  # "pumps" is in half the chunks: it counts less


def test_the_keyword_score_of_a_semantic_candidate_outside_the_keyword_top_is_filled_in(index: ChunkIndex) -> None:
    _put(index, "vs_a", "f", [(f"kiwi number {i} kiwi", _unit(0, 1, 0, 0)) for i in range(3)]
         + [("kiwi once", _unit(1, 0, 0, 0))])
    hits = _by_text(index.search(_unit(1, 0, 0, 0), vector_store_ids=["vs_a"], limit=1, keywords=query_terms("kiwi")))
    assert hits["kiwi once"][0] == 1.0 and hits["kiwi once"][1] > 0


def test_keyword_statistics_are_those_of_the_stores_searched(index: ChunkIndex) -> None:
    """IDF over the searched stores only (Qdrant 1.19+ and local mode): another project's chunks change nothing."""
    _put(index, "vs_a", "f", [("invoice 42 for XJ-4471", _unit(1, 0, 0, 0)), ("invoice 43", _unit(0, 1, 0, 0))])
    before = _by_text(index.search(_unit(1, 0, 0, 0), vector_store_ids=["vs_a"], limit=5,
                                   keywords=query_terms("XJ-4471 invoice")))
    _put(index, "vs_other", "g", [(f"XJ-4471 note {i}", _unit(0, 0, 1, 0)) for i in range(20)])
    after = _by_text(index.search(_unit(1, 0, 0, 0), vector_store_ids=["vs_a"], limit=5,
                                  keywords=query_terms("XJ-4471 invoice")))
    assert after == before
    assert before["invoice 42 for XJ-4471"][1] > before["invoice 43"][1] > 0


def test_on_a_qdrant_before_scoped_idf_the_whole_collections_statistics_are_used(
        index: ChunkIndex, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index.client, "info", lambda: models.VersionInfo(title="qdrant", version="1.13.6"))
    _put(index, "vs_a", "f", [("invoice 42 for XJ-4471", _unit(1, 0, 0, 0)), ("invoice 43", _unit(0, 1, 0, 0))])
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            hits = _by_text(index.search(_unit(1, 0, 0, 0), vector_store_ids=["vs_a"], limit=5,
                                         keywords=query_terms("XJ-4471")))
    assert hits["invoice 42 for XJ-4471"][1] > 0 and hits["invoice 43"][1] == 0
    assert sum("whole collection" in r.getMessage() for r in caplog.records) <= 1


def test_reprocessing_a_file_rewrites_its_keywords(index: ChunkIndex) -> None:
    _put(index, "vs_a", "f", [("old code ZQ-1000", _unit(1, 0, 0, 0))])
    _put(index, "vs_a", "f", [("new code QX-2000", _unit(1, 0, 0, 0))])  # same point id
    assert index.count() == 1
    old = index.search(_unit(0, 1, 0, 0), vector_store_ids=["vs_a"], limit=5, keywords=query_terms("ZQ-1000"))
    new = index.search(_unit(0, 1, 0, 0), vector_store_ids=["vs_a"], limit=5, keywords=query_terms("QX-2000"))
    assert [h.keyword for h in old] == [0.0] and new[0].keyword > 0


def _reference(index: ChunkIndex, vector: list[float], *, vector_store_ids: list[str], limit: int,
               keywords: keywords.SparseTerms, score_threshold: float | None = None,
               file_ids: dict[str, list[str]] | None = None) -> list[tuple[Any, ...]]:
    """Hybrid search spelled out, one plain Qdrant query per step: the semantic top `limit`, the keyword top `limit`,
    the candidates' missing scores by a query of their ids (every keyword score asked for, even with fewer keyword
    matches than `limit`), the corpus size by a count."""
    client, name = index.client, index.collection
    stores = list(dict.fromkeys(vector_store_ids))
    if file_ids is None:
        flt = models.Filter(must=[models.FieldCondition(key="vector_store_id", match=models.MatchAny(any=stores))])
    else:
        flt = models.Filter(should=[models.Filter(must=[
            models.FieldCondition(key="vector_store_id", match=models.MatchValue(value=s)),
            models.FieldCondition(key="file_id", match=models.MatchAny(any=file_ids[s]))])
            for s in stores if file_ids.get(s)])
    corpus = models.Filter(must=[models.FieldCondition(key="vector_store_id", match=models.MatchAny(any=stores))])
    params = models.SearchParams(idf=models.IdfCorpusParams(corpus=corpus))
    sparse = models.SparseVector(indices=keywords.indices, values=keywords.values)

    def of(ids: list[Any]) -> models.Filter:
        return models.Filter(must=[models.HasIdCondition(has_id=ids)])

    dense = client.query_points(name, query=vector, query_filter=flt, limit=limit, score_threshold=score_threshold,
                                with_payload=True).points
    kw = client.query_points(name, query=sparse, using=KEYWORD_VECTOR, query_filter=flt, limit=limit,
                             search_params=params, with_payload=True).points
    payloads = {p.id: p.payload for p in (*dense, *kw)}
    cosine = {p.id: p.score for p in dense}
    bm25 = {p.id: p.score for p in kw}
    if lacking := [i for i in payloads if i not in cosine]:
        cosine.update((p.id, p.score) for p in client.query_points(name, query=vector, query_filter=of(lacking),
                                                                   limit=len(lacking)).points)
    if lacking := [i for i in payloads if i not in bm25]:
        bm25.update((p.id, p.score) for p in client.query_points(name, query=sparse, using=KEYWORD_VECTOR, limit=len(
            lacking), query_filter=of(lacking), search_params=params).points)
    size = client.count(name, count_filter=corpus, exact=True).count
    return [(point_id, payloads[point_id], cosine[point_id], keyword_score(bm25.get(point_id, 0.0), size))
            for point_id in payloads]


def _ties_corpus(index: ChunkIndex) -> None:
    """Three stores of short chunks over a small vocabulary and a few distinct vectors: many equal scores of both
    kinds, and most chunks match any query's terms (the keyword query finds far more than its limit)."""
    words = ["kiwi", "apple", "pump", "valve", "XJ-4471", "brass", "the", "seal", "ZQ-9"]
    vectors = [_unit(1, 0, 0, 0), _unit(1, 1, 0, 0), _unit(0, 1, 0.5, 0), _unit(0, 0, 1, 1), _unit(-1, 0, 0, 1)]
    for s, store in enumerate(["vs_a", "vs_b", "vs_c"]):
        for f in range(3):
            texts = [" ".join(words[(s + f + i * k) % len(words)] for k in range(1 + (i * 7 + f) % 5))
                     for i in range(12)]
            _put(index, store, f"file{f}", [(t, vectors[(i + s * f) % len(vectors)]) for i, t in enumerate(texts)])


@pytest.mark.parametrize("local", [True, False])
def test_hybrid_search_gives_what_the_plain_queries_give(index: ChunkIndex, local: bool) -> None:
    """The index asks Qdrant fewer, larger questions (local mode: one keyword query for every match); ids, payloads,
    scores and order are those of the step-by-step queries, also where the keyword query finds more than its limit.
    `local` False runs the path a Qdrant server takes."""
    _ties_corpus(index)
    index._local = local  # the server path, on the local client
    cases: list[dict[str, Any]] = [
        {"vector_store_ids": ["vs_a"], "limit": 1},
        {"vector_store_ids": ["vs_a", "vs_b"], "limit": 3},
        {"vector_store_ids": ["vs_a", "vs_b", "vs_c"], "limit": 5, "score_threshold": 0.2},
        {"vector_store_ids": ["vs_b", "vs_c"], "limit": 20},
        {"vector_store_ids": ["vs_a", "vs_b", "vs_c"], "limit": 200},  # more than the stores hold
        {"vector_store_ids": ["vs_a", "vs_c"], "limit": 4, "file_ids": {"vs_a": ["file0", "file2"], "vs_c": ["file1"]}},
    ]
    queries = ["kiwi", "XJ-4471 pump", "the brass seal valve apple", "ZQ-9", "nothing matches this"]
    vectors = [_unit(1, 0.2, 0, 0), _unit(0.3, -1, 0.2, 1)]
    exceeded = 0
    for case in cases:
        for q in queries:
            for vector in vectors:
                terms_ = query_terms(q)
                expected = _reference(index, vector, keywords=terms_, **case)
                hits = index.search(vector, keywords=terms_, **case)
                assert [(h.payload, h.semantic, h.keyword) for h in hits] == [e[1:] for e in expected], (case, q)
                flt_ids = case.get("file_ids")
                matches = index.client.query_points(
                    "chunks", query=models.SparseVector(indices=terms_.indices, values=terms_.values),
                    using=KEYWORD_VECTOR, limit=1000, query_filter=models.Filter(must=[models.FieldCondition(
                        key="vector_store_id", match=models.MatchAny(any=case["vector_store_ids"]))]),
                ).points if flt_ids is None and terms_ else []
                exceeded += len(matches) > case["limit"]
    assert exceeded > 10  # the keyword query's candidates exceeded its limit in many of them
    # a threshold at a score, or a hair either side: the index walks the ranking as Qdrant's thresholded query does
    middle = index.client.query_points("chunks", query=vectors[0], limit=20).points[10].score
    for threshold in (middle, middle + 1e-12, middle - 1e-12):
        case = {"vector_store_ids": ["vs_a", "vs_b", "vs_c"], "limit": 30, "score_threshold": threshold}
        expected = _reference(index, vectors[0], keywords=query_terms("kiwi"), **case)
        hits = index.search(vectors[0], keywords=query_terms("kiwi"), **case)
        assert [(h.payload, h.semantic, h.keyword) for h in hits] == [e[1:] for e in expected], threshold


def test_local_mode_runs_one_keyword_query_per_search(index: ChunkIndex, monkeypatch: pytest.MonkeyPatch) -> None:
    """Local mode scores a keyword query over every point: a search asks one batch, with one keyword query (the scores
    of candidates outside either top come from it), even where the keyword query finds more than its limit."""
    _ties_corpus(index)
    asked: list[int] = []
    batch = index.client.query_batch_points

    def counting(collection: str, requests: Sequence[models.QueryRequest], **kwargs: Any) -> Any:
        asked.append(sum(isinstance(r.query, models.SparseVector) for r in requests))
        return batch(collection, requests=requests, **kwargs)

    monkeypatch.setattr(index.client, "query_batch_points", counting)
    for limit in (1, 3, 200):
        asked.clear()
        hits = index.search(_unit(1, 0.2, 0, 0), vector_store_ids=["vs_a", "vs_b"], limit=limit,
                            keywords=query_terms("kiwi the pump"))
        assert asked == [1] and any(h.keyword > 0 for h in hits)  # one batch: nothing filled in afterwards


def _old_collection(client: QdrantClient) -> ChunkIndex:
    """A collection as ingestion created it before keyword search, with one indexed point."""
    client.create_collection("chunks", vectors_config=models.VectorParams(size=DIM, distance=models.Distance.COSINE))
    client.upsert("chunks", points=[models.PointStruct(id=1, vector=_unit(1, 0, 0, 0), payload={
        "vector_store_id": "vs_a", "file_id": "old", "chunk_index": 0, "text": "legacy XJ-4471"})])
    return ChunkIndex(client, "chunks")


def test_a_collection_from_before_gets_the_keyword_vector_and_keeps_its_points() -> None:
    index = _old_collection(QdrantClient(":memory:"))
    assert index.keyword_search_ready() is False
    index.ensure(DIM)  # ingestion's start-up: adds the vector (Qdrant 1.18+, local mode)
    assert index.keyword_search_ready() is True
    legacy = index.search(_unit(1, 0, 0, 0), vector_store_ids=["vs_a"], limit=5, keywords=query_terms("XJ-4471"))
    assert [(h.payload["text"], h.semantic, h.keyword) for h in legacy] == [("legacy XJ-4471", 1.0, 0.0)]
    _put(index, "vs_a", "new", [("fresh XJ-4471", _unit(0, 1, 0, 0))])  # indexed (again): with keywords
    hits = _by_text(index.search(_unit(1, 0, 0, 0), vector_store_ids=["vs_a"], limit=5,
                                 keywords=query_terms("XJ-4471")))
    assert hits["legacy XJ-4471"] == (1.0, 0.0) and hits["fresh XJ-4471"][1] > 0


def test_a_collection_qdrant_cannot_add_keywords_to_stays_semantic(caplog: pytest.LogCaptureFixture,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    client = QdrantClient(":memory:")
    index = _old_collection(client)

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("404 Not Found")  # a Qdrant before 1.18

    monkeypatch.setattr(client, "create_vector_name", refuse)
    with caplog.at_level(logging.WARNING):
        index.ensure(DIM)
        index.ensure(DIM)  # said once, not at every call
    assert sum("semantic only" in r.getMessage() for r in caplog.records) == 1
    _put(index, "vs_a", "new", [("fresh XJ-4471", _unit(0, 1, 0, 0))])  # dense only: the upsert is accepted
    hits = _by_text(index.search(_unit(1, 0, 0, 0), vector_store_ids=["vs_a"], limit=5,
                                 keywords=query_terms("XJ-4471")))
    assert hits == {"legacy XJ-4471": (1.0, 0.0), "fresh XJ-4471": (0.0, 0.0)}


# --- FileSearcher --------------------------------------------------------------------------------------------------

PARTS = docs.PARTS_CATALOGUE


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    from threadline_search.embeddings import LocalEmbedder

    return LocalEmbedder()


@pytest.fixture(scope="module")
def catalogue(embedder: Any) -> QdrantClient:
    client = QdrantClient(":memory:")
    index = ChunkIndex(client, "chunks")
    index.ensure(embedder.dim)
    for name, text in PARTS.items():
        _put(index, "vs_parts", name.removesuffix(".txt"), [(text, embedder.embed_sync([text])[0])])
    return client


@pytest.mark.parametrize("question", ["which pump is XJ-4471", "XJ-4471 pump"])
async def test_a_rare_exact_term_ranks_first_where_meaning_alone_ranked_it_lower(
        catalogue: QdrantClient, embedder: Embedder, question: str) -> None:
    semantic = await FileSearcher(catalogue, embedder, collection="chunks", keyword_weight=0).search(
        ["vs_parts"], question)
    hybrid = await FileSearcher(catalogue, embedder, collection="chunks").search(["vs_parts"], question)
    assert [r.filename for r in semantic].index("valves.txt") == 2, "by meaning, two pump chunks come first"
    assert hybrid[0].filename == "valves.txt"
    assert {r.filename for r in hybrid} == set(PARTS)
    by_name = {r.filename: r.score for r in semantic}
    for result in hybrid:  # never lower than by meaning, never above 1
        assert by_name[result.filename] <= result.score <= 1


async def test_without_a_keyword_match_a_chunk_keeps_its_semantic_score_and_threshold(
        catalogue: QdrantClient, embedder: Embedder) -> None:
    question = "how do I stop a pump rattling"  # no chunk holds "stop" or "rattling"; "pump" is in most
    semantic = await FileSearcher(catalogue, embedder, collection="chunks", keyword_weight=0).search(
        ["vs_parts"], "brass")
    hybrid = await FileSearcher(catalogue, embedder, collection="chunks").search(["vs_parts"], "brass")
    unmatched = {r.filename: r.score for r in hybrid if r.filename != "valves.txt"}
    assert unmatched == {r.filename: r.score for r in semantic if r.filename != "valves.txt"}
    assert hybrid[0].filename == "valves.txt"

    ranked = await FileSearcher(catalogue, embedder, collection="chunks").search(["vs_parts"], question)
    assert ranked[0].filename == "noise.txt"  # meaning still leads where keywords do not tell chunks apart
    top = ranked[0].score
    above = await FileSearcher(catalogue, embedder, collection="chunks").search(
        ["vs_parts"], question, score_threshold=top - 1e-6)
    assert [r.filename for r in above] == ["noise.txt"]  # the threshold applies to the fused score
    assert await FileSearcher(catalogue, embedder, collection="chunks").search(
        ["vs_parts"], question, score_threshold=min(1.0, top + 1e-3)) == []


async def test_several_queries_merge_by_the_best_fused_score(catalogue: QdrantClient, embedder: Embedder) -> None:
    searcher = FileSearcher(catalogue, embedder, collection="chunks")
    one = {r.filename: r.score for r in await searcher.search(["vs_parts"], "XJ-4471")}
    other = {r.filename: r.score for r in await searcher.search(["vs_parts"], "bleed the air")}
    both = {r.filename: r.score for r in await searcher.search(["vs_parts"], ["XJ-4471", "bleed the air"])}
    assert both == {name: max(one.get(name, 0), other.get(name, 0)) for name in both}
    assert set(both) == set(one) | set(other)
