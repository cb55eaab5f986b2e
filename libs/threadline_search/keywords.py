"""Keyword side of hybrid file_search: a chunk's terms as a BM25-weighted sparse vector, a query's terms, and how a
keyword score joins the semantic one.

Pure functions (no Qdrant, no model): `index` writes `document_terms` of each chunk as the named sparse vector
KEYWORD_VECTOR of its point, with Qdrant's IDF modifier, and searches it with `query_terms`; Qdrant answers with the
BM25 score sum(idf(t) * tf_part(t)) over the query's terms found in the chunk, which `keyword_score` saturates into
0..1 and `fuse` adds to the cosine similarity.

Terms: NFKC-normalised, case-folded words (letters and digits, with inner apostrophes and `. @ / - _`), each
compound word (`XJ-4471`, `ERR_SSL_PROTOCOL`, `v1.2.3`, `john.doe@example.com`) also as its parts, so `XJ-4471`
finds a chunk saying `XJ-4471` best and one saying `xj 4471` too; English function words are dropped (the list query
rewriting uses), and IDF makes what is left but common in the searched stores count for little.
No stemming: keyword search is for the exact terms (product codes, names, error codes) that the embedding model
blurs; the semantic side finds the rest.
"""

import hashlib
import math
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass

from threadline_search.rewrite import STOP_WORDS

KEYWORD_VECTOR = "keywords"
"""Name of the sparse vector of each point (the dense one stays the unnamed default vector)."""
K1 = 1.2
"""BM25 term-frequency saturation: a term's weight approaches K1 + 1 as it repeats."""
B = 0.75
"""BM25 length normalisation: how much a chunk longer than AVERAGE_TERMS is discounted."""
AVERAGE_TERMS = 256
"""The chunk length (in terms) BM25 normalises against. A constant, not the corpus mean, so a point's weights never
change once written (a default 800-token chunk has about 300-450 terms; a short file's single chunk far fewer)."""
PART_WEIGHT = 0.5
"""Query weight of a compound word's parts, against 1 for whole words."""
MAX_TERM_CHARS = 128
"""Longer runs (base64, minified code) are not terms; a SHA-256 in hex (64) or a UUID (36) still is."""

_WORD = re.compile(r"[^\W_](?:[\w'\u2019.@/-]*[^\W_])?")
_PART = re.compile(r"[^\W_]+")


@dataclass(frozen=True)
class SparseTerms:
    """A sparse vector: uint32 term indices (sorted, unique) and their weights."""

    indices: list[int]
    values: list[float]

    def __bool__(self) -> bool:
        return bool(self.indices)


def terms(text: str) -> list[str]:
    """The text's terms in order, repeats kept: each word, then a compound word's parts; function words dropped."""
    return [term for term, _ in _query_words(text)]


def _query_words(text: str) -> list[tuple[str, bool]]:
    """(term, is a part of a compound word) in order; function words and over-long runs left out."""
    out: list[tuple[str, bool]] = []
    for match in _WORD.finditer(unicodedata.normalize("NFKC", text).casefold()):
        word = match.group()
        if len(word) > MAX_TERM_CHARS:
            continue
        parts = _PART.findall(word)
        if word not in STOP_WORDS:
            out.append((word, False))
        if len(parts) > 1:
            out.extend((part, True) for part in parts if part not in STOP_WORDS)
    return out


def term_index(term: str) -> int:
    """A deterministic uint32 for the term (BLAKE2b, 4 bytes): the same in every process and release."""
    return int.from_bytes(hashlib.blake2b(term.encode(), digest_size=4).digest(), "big")


def tf_weight(count: int, length: int) -> float:
    """BM25's term-frequency part for a term seen `count` times in a chunk of `length` terms (0 < w < K1 + 1)."""
    return count * (K1 + 1) / (count + K1 * (1 - B + B * length / AVERAGE_TERMS))


def document_terms(text: str) -> SparseTerms:
    """A chunk's sparse vector: each term's BM25 term-frequency weight (Qdrant's IDF modifier supplies the IDF)."""
    found = terms(text)
    counts: Counter[int] = Counter(term_index(t) for t in found)
    indices = sorted(counts)
    return SparseTerms(indices, [tf_weight(counts[i], len(found)) for i in indices])


def query_terms(text: str) -> SparseTerms:
    """A query's sparse vector: each distinct term once (BM25 ignores repeats in the query), weight 1, or PART_WEIGHT
    for a part of a compound word: `XJ-4471` asks for `xj-4471` first and for `xj` and `4471` less, so a chunk naming
    a sibling code (`XJ-4470`) gains less from the shared `xj` than the chunk naming the code itself."""
    weights: dict[int, float] = {}
    for word, is_part in _query_words(text):
        index = term_index(word)
        weights[index] = max(weights.get(index, 0.0), PART_WEIGHT if is_part else 1.0)
    indices = sorted(weights)
    return SparseTerms(indices, [weights[i] for i in indices])


def idf(document_frequency: int, corpus_size: int) -> float:
    """Qdrant's IDF: ln(1 + (N - n + 0.5) / (n + 0.5)), for a term in n of N chunks."""
    return math.log(1 + (corpus_size - document_frequency + 0.5) / (document_frequency + 0.5))


def keyword_score(bm25: float, corpus_size: int) -> float:
    """A BM25 score as 0..1: 1 - exp(-bm25 / idf(1, N)).

    The unit is the IDF of a term found in only one of the N chunks searched, the rarest a term can be: a rare term
    found once in an average-length chunk scores about 0.63 (three times: 0.8), two of them about 0.86, while a
    term found in every chunk adds about nothing, and none found is 0. Saturating rather than dividing by the query's
    best possible score means a long question is not penalised for the words of it that no chunk holds."""
    if bm25 <= 0 or corpus_size < 1:
        return 0.0
    return min(1.0, max(0.0, 1.0 - math.exp(-bm25 / idf(1, corpus_size))))


def fuse(semantic: float, keyword: float, weight: float) -> float:
    """The hybrid score: keyword evidence closes `weight * keyword` of the gap between the cosine similarity and 1.

    semantic + (1 - semantic) * weight * keyword: never below the semantic score, exactly it without a keyword
    match (or with weight 0), at most 1, and increasing in both scores, so a threshold on it keeps its meaning."""
    return semantic + (1.0 - semantic) * weight * keyword
