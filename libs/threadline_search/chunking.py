"""Chunking strategies as the hosted API validates them, and token-window chunking of extracted text."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

AUTO_MAX_TOKENS = 800
AUTO_OVERLAP_TOKENS = 400
MIN_CHUNK_TOKENS = 100
MAX_CHUNK_TOKENS = 4096
MAX_TOKEN_CHARS = 32
"""A token spanning more characters counts as one per MAX_TOKEN_CHARS: the tokenizer makes a single unknown
token of a long run without spaces (a 2 MB line was one 2 MB chunk), so a chunk never holds more than
max_chunk_size_tokens * MAX_TOKEN_CHARS characters."""


class ChunkingError(ValueError):
    """A chunking_strategy the hosted API would reject (message and param say which part)."""

    def __init__(self, message: str, param: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


@dataclass(frozen=True)
class ChunkingStrategy:
    """A resolved static strategy (auto resolves to 800/400, as the hosted API reports it)."""

    max_chunk_size_tokens: int = AUTO_MAX_TOKENS
    chunk_overlap_tokens: int = AUTO_OVERLAP_TOKENS

    def to_api(self) -> dict[str, Any]:
        """The `chunking_strategy` object of a vector store file."""
        return {"type": "static", "static": {"max_chunk_size_tokens": self.max_chunk_size_tokens,
                                             "chunk_overlap_tokens": self.chunk_overlap_tokens}}

    @classmethod
    def from_api(cls, raw: dict[str, Any] | None) -> "ChunkingStrategy":
        """Read back what `to_api` (or `parse_chunking_strategy`) produced."""
        static = (raw or {}).get("static") or {}
        return cls(int(static.get("max_chunk_size_tokens", AUTO_MAX_TOKENS)),
                   int(static.get("chunk_overlap_tokens", AUTO_OVERLAP_TOKENS)))


def _strict_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_keys(raw: dict[str, Any], allowed: set[str], param: str) -> None:
    """The contract's strategies take no other keys (`additionalProperties: false`): a typo is not ignored."""
    extra = sorted(set(raw) - allowed)
    if extra:
        raise ChunkingError(f"Unknown parameter: '{param}.{extra[0]}'.", f"{param}.{extra[0]}", "unknown_parameter")


def parse_chunking_strategy(raw: object, param: str = "chunking_strategy") -> ChunkingStrategy:
    """Validate a request's chunking_strategy (absent/None means auto) like the hosted API does."""
    if raw is None:
        return ChunkingStrategy()
    if not isinstance(raw, dict):
        raise ChunkingError(f"Invalid type for '{param}': expected an object, but got {type(raw).__name__} instead.",
                            param, "invalid_type")
    kind = raw.get("type")
    if kind == "auto":
        _check_keys(raw, {"type"}, param)
        return ChunkingStrategy()
    if kind != "static":
        raise ChunkingError(f"Invalid value for '{param}.type': expected one of 'auto' or 'static', "
                            f"but got {kind!r} instead.", f"{param}.type", "invalid_value")
    _check_keys(raw, {"type", "static"}, param)
    static = raw.get("static")
    if static is None:
        raise ChunkingError(f"Missing required parameter: '{param}.static'.", f"{param}.static",
                            "missing_required_parameter")
    if not isinstance(static, dict):
        raise ChunkingError(f"Invalid type for '{param}.static': expected an object.", f"{param}.static",
                            "invalid_type")
    _check_keys(static, {"max_chunk_size_tokens", "chunk_overlap_tokens"}, f"{param}.static")
    values: dict[str, int] = {}
    for name in ("max_chunk_size_tokens", "chunk_overlap_tokens"):
        sub = f"{param}.static.{name}"
        if name not in static:
            raise ChunkingError(f"Missing required parameter: '{sub}'.", sub, "missing_required_parameter")
        if not _strict_int(static[name]):
            raise ChunkingError(f"Invalid type for '{sub}': expected an integer, but got "
                                f"{type(static[name]).__name__} instead.", sub, "invalid_type")
        values[name] = int(static[name])
    size, overlap = values["max_chunk_size_tokens"], values["chunk_overlap_tokens"]
    size_param = f"{param}.static.max_chunk_size_tokens"
    overlap_param = f"{param}.static.chunk_overlap_tokens"
    if size < MIN_CHUNK_TOKENS:
        raise ChunkingError(f"Invalid '{size_param}': integer below minimum value. Expected a value >= "
                            f"{MIN_CHUNK_TOKENS}, but got {size} instead.", size_param, "integer_below_min_value")
    if size > MAX_CHUNK_TOKENS:
        raise ChunkingError(f"Invalid '{size_param}': integer above maximum value. Expected a value <= "
                            f"{MAX_CHUNK_TOKENS}, but got {size} instead.", size_param, "integer_above_max_value")
    if overlap < 0:
        raise ChunkingError(f"Invalid '{overlap_param}': integer below minimum value. Expected a value >= 0, "
                            f"but got {overlap} instead.", overlap_param, "integer_below_min_value")
    if overlap > size // 2:
        raise ChunkingError(f"Invalid '{overlap_param}': the overlap must not exceed half of "
                            f"max_chunk_size_tokens ({size // 2}), but got {overlap}.", overlap_param, "invalid_value")
    return ChunkingStrategy(size, overlap)


class TokenOffsets(Protocol):
    """Anything that splits text into tokens and tells where each token is in the text."""

    def offsets(self, text: str) -> Sequence[tuple[int, int]]:
        """(start, end) character span of every token, in order (no special tokens)."""
        ...


@dataclass(frozen=True)
class Chunk:
    """One window of a document: its text and where it sits in the extracted text."""

    index: int
    text: str
    start_char: int
    end_char: int
    tokens: int


TOKENIZE_SLICE_CHARS = 1 << 20
"""Text given to the tokenizer at once (its memory grows with it: about 70 bytes per character)."""


def _bounded(span: tuple[int, int]) -> list[tuple[int, int]]:
    """`span` cut into pieces of at most MAX_TOKEN_CHARS characters."""
    start, end = span
    return [(at, min(at + MAX_TOKEN_CHARS, end)) for at in range(start, end, MAX_TOKEN_CHARS)]


def token_spans(text: str, tokenizer: TokenOffsets, limit: int | None = None,
                slice_chars: int = TOKENIZE_SLICE_CHARS) -> list[tuple[int, int]]:
    """(start, end) of every token of `text`, a long one cut into MAX_TOKEN_CHARS pieces: what chunks count.

    Tokenized a slice at a time, cut at whitespace (where tokens end anyway): given a 21 MB text at once the
    tokenizer aborted its process for memory. With `limit`, it stops once past it (the caller refuses the file).
    """
    spans: list[tuple[int, int]] = []
    start = 0
    while start < len(text) and (limit is None or len(spans) <= limit):
        end = min(len(text), start + slice_chars)
        if end < len(text):
            cut = max(text.rfind(" ", start, end), text.rfind("\n", start, end))
            end = cut if cut > start else end
        spans += [piece for s in tokenizer.offsets(text[start:end]) if s[1] > s[0]
                  for piece in _bounded((s[0] + start, s[1] + start))]
        start = end
    return spans


def chunk_spans(text: str, spans: Sequence[tuple[int, int]], strategy: ChunkingStrategy) -> list[Chunk]:
    """Windows of at most max_chunk_size_tokens of `spans`, each overlapping the previous by chunk_overlap_tokens."""
    if not spans:
        return []
    size = strategy.max_chunk_size_tokens
    step = max(1, size - strategy.chunk_overlap_tokens)
    chunks: list[Chunk] = []
    start = 0
    while True:
        end = min(start + size, len(spans))
        first, last = spans[start][0], spans[end - 1][1]
        chunks.append(Chunk(len(chunks), text[first:last], first, last, end - start))
        if end >= len(spans):
            return chunks
        start += step


def chunk_text(text: str, tokenizer: TokenOffsets, strategy: ChunkingStrategy) -> list[Chunk]:
    """The chunks of `text` (`chunk_spans` of its `token_spans`)."""
    return chunk_spans(text, token_spans(text, tokenizer), strategy)
