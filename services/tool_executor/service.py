"""The server-side tools: code_interpreter (sandboxed Python) and file_search (vector store search)."""

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson
from openai.types import FileObject

from threadline_core.db import storable_text
from threadline_core.events import ToolCallRequested
from threadline_core.ids import new_id, now_seconds
from threadline_sandbox import Sandbox, SandboxLimits, SandboxResult
from threadline_sandbox.inputs import input_names
from threadline_sandbox.output import clip_text
from threadline_search.settings import SearchSettings
from threadline_search.store import expired_stores_message
from tool_executor.repository import CallContext, CodeSession, NewFile, SessionCell, ToolRepository

if TYPE_CHECKING:  # the search stack is imported on the first file_search call, not at start-up
    from qdrant_client import QdrantClient

    from threadline_search.embeddings import Embedder
    from threadline_search.search import FileSearcher, SearchResult

_log = logging.getLogger(__name__)

OUTPUT_PURPOSE = "assistants_output"
DEFAULT_RANKER = "default_2024_08_21"
_RETRYABLE = (asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError)
GPT_35_MAX_RESULTS = 5
"""file_search's default `max_num_results` for gpt-3.5-turbo models (the contract: "20 for gpt-4* models and 5 for
gpt-3.5-turbo"); other models get the tool executor's setting (20)."""
GPT_35_TOKEN_BUDGET = 4000
"""Tokens of chunk text one file_search call gives a gpt-3.5-turbo model at most (the hosted docs' "token budget":
4,000 tokens for gpt-3.5-turbo, 16,000 for gpt-4* models, the tool executor's setting for the others)."""
FILE_SEARCH_TEXT_BYTES = 256 * 1024
"""Chunk text (as JSON) one file_search answer carries at most; lower-ranked results beyond it are left out.

The answer holds each text twice (step results, model output) and is one Kafka message, whose limit is
1 MiB: a larger one could never be published, and every event committed after it would wait behind it."""


@dataclass
class ToolOutcome:
    """The answer to one call: `result` as the orchestrator stores it, an error, files to create, a metric label."""

    result: dict[str, Any]
    error: str | None = None
    files: list[NewFile] = field(default_factory=list)
    outcome: str = "completed"
    session_cell: SessionCell | None = None
    """A code_interpreter cell that ran (with or without an exception) joins its thread's session."""


def _tokens(result: "SearchResult") -> int:
    """The result's tokens: as chunking counted them, else estimated at four characters a token."""
    return result.tokens or max(1, len(result.text) // 4)


def within_budget(found: "Sequence[SearchResult]", budget: int = FILE_SEARCH_TEXT_BYTES,
                  token_budget: int | None = None) -> "list[SearchResult]":
    """The best results whose texts fit in `budget` bytes of JSON and `token_budget` tokens, as hosted file_search
    outputs fewer results than `max_num_results` past its token budget (the first one cut to fit if it alone
    does not)."""
    kept: list[SearchResult] = []
    left, tokens_left = budget, token_budget
    for result in found:
        size = len(orjson.dumps(result.text))
        tokens = _tokens(result)
        over_tokens = tokens_left is not None and tokens > tokens_left
        if size > left or over_tokens:
            if not kept:  # at most 6 bytes a character (\u00XX escapes of control characters)
                chars = min(left // 6, len(result.text) * tokens_left // tokens if tokens_left is not None
                            and over_tokens else len(result.text))
                kept.append(dataclasses.replace(result, text=result.text[:chars]))
            break
        kept.append(result)
        left -= size
        if tokens_left is not None:
            tokens_left -= tokens
    return kept


def default_max_results(model: object, default: int) -> int:
    """file_search's `max_num_results` when the tool does not set it: the contract's 5 for gpt-3.5-turbo models."""
    return GPT_35_MAX_RESULTS if isinstance(model, str) and model.startswith("gpt-3.5-turbo") else default


def token_budget(model: object, default: int) -> int:
    """Tokens of results one file_search call gives the model: the hosted 4,000 for gpt-3.5-turbo models."""
    return GPT_35_TOKEN_BUDGET if isinstance(model, str) and model.startswith("gpt-3.5-turbo") else default


def resource_ids(ctx: CallContext, tool: str, key: str) -> list[str]:
    """`tool_resources.<tool>.<key>` of the assistant, then of the thread, without duplicates."""
    found: list[str] = []
    for doc in (ctx.assistant_doc, ctx.thread_doc):
        resources = (doc.get("tool_resources") or {}).get(tool) or {}
        for value in resources.get(key) or []:
            if isinstance(value, str) and value not in found:
                found.append(value)
    return found


def file_object(file_id: str, filename: str, size: int, created_at: int) -> dict[str, Any]:
    """The FileObject of a generated file (validated against the SDK model)."""
    doc = {"id": file_id, "object": "file", "bytes": size, "created_at": created_at, "filename": filename,
           "purpose": OUTPUT_PURPOSE, "status": "processed", "status_details": None, "expires_at": None}
    return FileObject.model_validate(doc).model_dump(mode="json")


def code_model_output(result: SandboxResult, saved: list[tuple[str, str, bool]], *, max_chars: int,
                      files_note: str | None) -> str:
    """What the model reads back: the logs (cut to about `max_chars` as the sandbox cuts its output: their start and
    end, and a marker counting all that is left out, the sandbox's cut included), then the images and files produced."""
    text = clip_text(result.logs, max_chars)
    lines = [text.rstrip("\n")] if text.strip() else []
    if not lines and result.ok:
        lines.append("(the code ran without printing anything)")
    for name, file_id, is_image in saved:
        kind = "image" if is_image else "file"
        lines.append(f"[{kind} {name} saved as {file_id}]")
    if files_note:
        lines.append(files_note)
    return "\n".join(lines)


class SearcherProvider:
    """Builds the FileSearcher on first use (embedding model and Qdrant client are heavy or exclusive)."""

    def __init__(self, settings: SearchSettings, qdrant: "QdrantClient | None") -> None:
        self._settings = settings
        self._qdrant = qdrant
        self._own_qdrant: QdrantClient | None = None
        self._embedder: Embedder | None = None
        self._searcher: FileSearcher | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> "FileSearcher":
        """The searcher, created once."""
        from threadline_search.embeddings import create_embedder
        from threadline_search.index import open_qdrant
        from threadline_search.search import FileSearcher

        async with self._lock:
            if self._searcher is None:
                client = self._qdrant
                if client is None:
                    self._own_qdrant = client = await asyncio.to_thread(open_qdrant, self._settings)
                self._embedder = await create_embedder(self._settings)
                self._searcher = FileSearcher(client, self._embedder, collection=self._settings.qdrant_collection,
                                              keyword_weight=self._settings.file_search_keyword_weight)
            return self._searcher

    async def close(self) -> None:
        """Release the embedder and a Qdrant client opened here (an injected one belongs to the caller)."""
        if self._embedder is not None:
            from threadline_search.embeddings import close_embedder

            await close_embedder(self._embedder)
        if self._own_qdrant is not None:
            self._own_qdrant.close()


class ToolService:
    """Runs one server-side tool call for a run that still waits for it."""

    def __init__(self, *, repository: ToolRepository, sandbox: Sandbox, limits: SandboxLimits,
                 searchers: SearcherProvider, input_max_bytes: int, output_max_chars: int,
                 file_search_max_results: int, file_search_token_budget: int = 16000, watch_seconds: float = 1.0,
                 thread_store_wait_seconds: float = 60.0, session_idle_seconds: float = 3600.0,
                 session_max_cells: int = 50) -> None:
        self._repo = repository
        self._sandbox = sandbox
        self._limits = limits
        self._searchers = searchers
        self._input_max_bytes = input_max_bytes
        self._output_max_chars = output_max_chars
        self._file_search_max_results = file_search_max_results
        self._file_search_token_budget = file_search_token_budget
        self._watch_seconds = watch_seconds
        self._thread_store_wait_seconds = thread_store_wait_seconds
        self._session_idle_seconds = session_idle_seconds
        self._session_max_cells = session_max_cells

    async def execute(self, request: ToolCallRequested) -> ToolOutcome | None:
        """The call's outcome, or None when its run no longer waits for it (cancelled, failed, gone)."""
        ctx = await self._repo.context(request.run_id, request.step_id)
        if ctx is None or not ctx.active:
            return None
        try:
            if request.tool_type == "code_interpreter":
                return await self.code_interpreter(ctx, request)
            if request.tool_type == "file_search":
                return await self.file_search(ctx, request)
        except _RETRYABLE:
            raise
        except Exception as exc:
            _log.exception("%s call %s failed", request.tool_type, request.tool_call_id)
            return ToolOutcome(result={}, error=f"The {request.tool_type} tool failed: {type(exc).__name__}: {exc}",
                               outcome="failed")
        return ToolOutcome(result={}, error=f"Unsupported server-side tool {request.tool_type!r}",
                           outcome="unsupported")

    def _session_limits(self, session: CodeSession) -> SandboxLimits:
        """The call's limits, plus what replaying the session's cells should take (at most the limits again)."""
        replay = min(session.cpu_seconds * 1.25 + 0.05 * len(session.cells), self._limits.cpu_seconds)
        return dataclasses.replace(self._limits, cpu_seconds=self._limits.cpu_seconds + replay,
                                   wall_seconds=self._limits.wall_seconds + 2 * replay)

    async def _run_while_waited_for(self, ctx: CallContext, request: ToolCallRequested, code: str,
                                    inputs: dict[str, bytes], session: CodeSession) -> SandboxResult | None:
        """Run the sandbox; stop it (None) as soon as the run no longer waits (cancelled, expired, failed)."""
        task = asyncio.create_task(self._sandbox.run_python(
            code, inputs, self._session_limits(session), tenant=ctx.project_id,
            session=[cell.code for cell in session.cells]))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self._watch_seconds)
                if done:
                    return task.result()
                current = await self._repo.context(request.run_id, request.step_id)
                if current is None or not current.active:
                    _log.info("run %s no longer waits for %s: stopping its sandbox", request.run_id,
                              request.tool_call_id)
                    return None
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def code_interpreter(self, ctx: CallContext, request: ToolCallRequested) -> ToolOutcome | None:
        """Run the model's code in the sandbox with the run's files; images and files become Files."""
        code = request.arguments.get("code", request.arguments.get("input"))
        if not isinstance(code, str) or not code.strip():
            return ToolOutcome(result={}, error="code_interpreter needs a non-empty string argument 'code'",
                               outcome="invalid_arguments")
        file_ids = resource_ids(ctx, "code_interpreter", "file_ids")
        for file_id in await self._repo.attachment_file_ids(ctx.thread_id, "code_interpreter"):
            if file_id not in file_ids:
                file_ids.append(file_id)
        stored = await self._repo.load_files(ctx.project_id, file_ids, max_total_bytes=self._input_max_bytes)
        names = input_names([(stored_file.id, stored_file.filename) for stored_file in stored])
        inputs = dict(zip(names, (stored_file.data for stored_file in stored), strict=True))
        session = await self._repo.code_session(ctx.thread_id, now=now_seconds(),
                                                idle_seconds=self._session_idle_seconds,
                                                max_cells=self._session_max_cells)
        result = await self._run_while_waited_for(ctx, request, code, inputs, session)
        if result is None:
            return None
        outputs: list[dict[str, Any]] = []
        if result.logs:
            outputs.append({"type": "logs", "logs": result.logs})
        files: list[NewFile] = []
        saved: list[tuple[str, str, bool]] = []
        note = None
        if result.files and await self._repo.files_available():
            now = now_seconds()
            for produced in result.files:
                file_id = new_id("file").replace("file_", "file-", 1)
                # named by the path the code saw (`/mnt/data/<name>`), as hosted lists them; a figure by its own
                # name; a name that is not UTF-8 comes as surrogate escapes
                path = storable_text(f"/mnt/data/{produced.name}" if produced.kind == "file" else produced.basename)
                files.append(NewFile(id=file_id, filename=path, purpose=OUTPUT_PURPOSE, data=produced.data,
                                     created_at=now, doc=file_object(file_id, path, len(produced.data), now)))
                saved.append((path, file_id, produced.is_image))
                if produced.is_image:
                    outputs.append({"type": "image", "image": {"file_id": file_id}})
        elif result.files:
            note = f"[{len(result.files)} generated file(s) not saved: file storage is unavailable]"
        if result.files_skipped:
            extra = f"[{result.files_skipped} more generated file(s) were over the limits and not saved]"
            note = f"{note}\n{extra}" if note else extra
        model_output = code_model_output(result, saved, max_chars=self._output_max_chars, files_note=note)
        outcome = "completed" if result.ok else ("code_error" if result.error_kind == "exception"
                                                 else str(result.error_kind))
        generated = [{"path": path, "file_id": file_id, "image": is_image} for path, file_id, is_image in saved]
        ran = result.ok or result.error_kind == "exception"  # a cell that hit a limit would hit it again
        cell = SessionCell(thread_id=ctx.thread_id, session_id=session.id, tool_call_id=request.tool_call_id,
                           code=code, cpu_seconds=max(0.0, (result.cpu_seconds or 0.0) - session.cpu_seconds)
                           ) if ran else None
        return ToolOutcome(result={"outputs": outputs, "model_output": model_output, "files": generated},
                           files=files, outcome=outcome, session_cell=cell)

    async def _thread_stores_ready(self, ctx: CallContext, request: ToolCallRequested) -> bool:
        """Wait while files of the THREAD's vector stores (message attachments) are still being ingested, at
        most `thread_store_wait_seconds` (60 s, as hosted), so they are searchable; the assistant's stores are
        not waited for. False when the run stopped waiting for this call meanwhile."""
        resources = (ctx.thread_doc.get("tool_resources") or {}).get("file_search") or {}
        store_ids = [s for s in resources.get("vector_store_ids") or [] if isinstance(s, str)]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._thread_store_wait_seconds
        while await self._repo.files_in_progress(ctx.project_id, store_ids):
            if loop.time() >= deadline:
                _log.info("run %s: thread vector store files still in progress after %.0f s; searching what is "
                          "ready", request.run_id, self._thread_store_wait_seconds)
                return True
            await asyncio.sleep(0.25)
            current = await self._repo.context(request.run_id, request.step_id)
            if current is None or not current.active:
                return False
        return True

    async def file_search(self, ctx: CallContext, request: ToolCallRequested) -> ToolOutcome | None:
        """Search the assistant's and thread's vector stores; results carry their text for the run step."""
        from threadline_search.citations import render_for_model, step_results

        raw = request.arguments.get("query", request.arguments.get("queries", request.arguments.get("input")))
        queries = [raw] if isinstance(raw, str) else [q for q in raw or [] if isinstance(q, str)] \
            if isinstance(raw, list) else []
        if not any(q.strip() for q in queries):
            return ToolOutcome(result={}, error="file_search needs a non-empty string argument 'query'",
                               outcome="invalid_arguments")
        tool: dict[str, Any] = next((t for t in ctx.run_doc.get("tools") or [] if t.get("type") == "file_search"), {})
        options = tool.get("file_search") or {}
        ranking = options.get("ranking_options") or {}
        ranker = ranking.get("ranker") if ranking.get("ranker") not in (None, "auto") else DEFAULT_RANKER
        threshold = float(ranking.get("score_threshold") or 0.0)
        max_results = int(options.get("max_num_results")
                          or default_max_results(ctx.run_doc.get("model"), self._file_search_max_results))
        ranking_options = {"ranker": ranker, "score_threshold": threshold}
        if not await self._thread_stores_ready(ctx, request):
            return None
        store_ids, expired = await self._repo.project_vector_stores(  # after the wait: what holds when searching
            ctx.project_id, resource_ids(ctx, "file_search", "vector_store_ids"), now_seconds())
        if expired:  # expired since the run started: the orchestrator fails the run when it resumes
            return ToolOutcome(result={}, error=expired_stores_message(expired), outcome="expired_vector_store")
        if not store_ids:
            return ToolOutcome(result={"ranking_options": ranking_options, "results": [],
                                       "model_output": "No files are attached for file_search."})
        searcher = await self._searchers.get()
        hits = await searcher.search(store_ids, queries, max_num_results=max(1, min(50, max_results)),
                                     score_threshold=threshold,
                                     file_ids=await self._repo.searchable_files(store_ids))
        found = within_budget(hits, token_budget=token_budget(ctx.run_doc.get("model"),
                                                              self._file_search_token_budget))
        await self._repo.touch_vector_stores(store_ids, now_seconds())
        call_index = await self._repo.file_search_call_index(request.run_id, request.tool_call_id)
        return ToolOutcome(result={"ranking_options": ranking_options, "results": step_results(found),
                                   "model_output": render_for_model(found, call_index)})
