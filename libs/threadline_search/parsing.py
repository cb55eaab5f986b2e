"""Files parsed and chunked in child processes, each file within a time budget and a token cap.

A parser can take minutes or gigabytes on a hostile or pathological file (spaCy's sentence splitter is quadratic
on a long run without spaces; a small .docx can expand to megabytes of text). In a child process such a file
holds neither the service's event loop nor its GIL, and when its budget is spent the child is killed and
replaced: the file fails with a last_error, the files behind it go on.
"""

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import resource
import signal
from dataclasses import dataclass
from multiprocessing.process import BaseProcess

from threadline_search.chunking import Chunk, ChunkingStrategy, chunk_spans, token_spans
from threadline_search.embeddings import TokenCounter
from threadline_search.extract import ErrorCode, ExtractionError, extract_text, warm_up

_log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1

START_SECONDS = 180.0
"""How long a new parser process may take to import the parsers and load spaCy before it counts as broken."""


@dataclass(frozen=True)
class ParseLimits:
    """What one file may cost: wall-clock seconds, extracted tokens, and the parser's memory (0 = no cap)."""

    seconds: float = 300.0
    max_tokens: int = 5_000_000
    memory_mb: int = 0


@dataclass(frozen=True)
class ParsedFile:
    """A file's chunks, what kind of file it was and how many tokens its text has."""

    kind: str
    chunks: list[Chunk]
    tokens: int


@dataclass(frozen=True)
class _Failure:
    """An ExtractionError on its way out of the child (exceptions with extra arguments do not unpickle)."""

    code: ErrorCode
    message: str


@dataclass(frozen=True)
class _Job:
    filename: str
    data: bytes
    strategy: ChunkingStrategy


def _parse(job: _Job, tokenizer: TokenCounter, limits: ParseLimits) -> ParsedFile:
    """Extract, count and chunk one file (in the child)."""
    extracted = extract_text(job.filename, job.data)
    spans = token_spans(extracted.text, tokenizer, limits.max_tokens)
    if len(spans) > limits.max_tokens:
        raise ExtractionError("invalid_file", f"The file's text has more than {limits.max_tokens:,} tokens; files "
                              f"may have at most {limits.max_tokens:,}.")
    return ParsedFile(kind=extracted.kind, chunks=chunk_spans(extracted.text, spans, job.strategy),
                      tokens=len(spans))


def _die_with(parent: int) -> None:
    """Have the kernel kill this child when the service dies: a SIGKILLed service leaves no parse running."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the line above
        os._exit(0)


def _serve(conn: multiprocessing.connection.Connection, limits: ParseLimits, parent: int) -> None:
    """The child: warm up, say so, then answer one job at a time until the parent hangs up."""
    _die_with(parent)
    if limits.memory_mb > 0:
        cap = limits.memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    warm_up()
    tokenizer = TokenCounter()
    with contextlib.suppress(OSError):
        conn.send("ready")
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        try:
            answer: ParsedFile | _Failure = _parse(job, tokenizer, limits)
        except ExtractionError as exc:
            answer = _Failure(exc.code, exc.message)
        except MemoryError:
            answer = _Failure("invalid_file", "Parsing the file needs more memory than the parser has"
                              + (f" ({limits.memory_mb} MB)." if limits.memory_mb else "."))
        except Exception as exc:
            answer = _Failure("server_error", f"The file could not be parsed: {type(exc).__name__}: {str(exc)[:300]}")
        try:
            conn.send(answer)
        except OSError:  # the service gave up on this file (its budget) or stopped
            return


class _ParserProcess:
    """One child and the parent's end of its pipe."""

    def __init__(self, process: BaseProcess, conn: multiprocessing.connection.Connection) -> None:
        self.process = process
        self.conn = conn

    def alive(self) -> bool:
        return self.process.is_alive()

    def exit_code(self) -> int | None:
        return self.process.exitcode

    def kill(self) -> None:
        """Kill and reap the child (a hung parse is abandoned mid-file)."""
        self.process.kill()
        self.process.join(5)
        self.conn.close()

    def close(self) -> None:
        """Hang up: the child returns from its loop and exits."""
        self.conn.close()
        self.process.join(5)
        if self.process.is_alive():
            self.kill()

    async def answer(self, within: float) -> object:
        """The child's next message; TimeoutError after `within` seconds, EOFError if it died."""
        loop = asyncio.get_running_loop()
        readable = asyncio.Event()
        fd = self.conn.fileno()
        loop.add_reader(fd, readable.set)
        try:
            async with asyncio.timeout(within):
                await readable.wait()
        finally:
            loop.remove_reader(fd)
        return await asyncio.to_thread(self.conn.recv)  # the whole message: it is already on its way


class ParserPool:
    """Up to `workers` files parsed at once, each in its own child process, warm between files."""

    def __init__(self, *, workers: int, limits: ParseLimits) -> None:
        self._limits = limits
        self._slots = asyncio.Semaphore(max(1, workers))
        self._workers = max(1, workers)
        self._idle: list[_ParserProcess] = []
        self._context = multiprocessing.get_context("spawn")  # forking a process with threads (the model's) is unsafe

    async def warm_up(self) -> None:
        """Start every child now, so the first files do not wait for the parsers to load."""
        started = await asyncio.gather(*(self._spawn() for _ in range(self._workers - len(self._idle))),
                                       return_exceptions=True)
        for child in started:
            if isinstance(child, _ParserProcess):
                await self._keep(child)
            else:
                _log.warning("parser warm-up failed (files will start one): %r", child)

    async def parse(self, filename: str, data: bytes, strategy: ChunkingStrategy) -> ParsedFile:
        """The file's chunks; ExtractionError (the file's last_error) when it cannot be, or not within limits."""
        async with self._slots:
            child = self._idle.pop() if self._idle else await self._spawn()
            try:
                await asyncio.to_thread(child.conn.send, _Job(filename, data, strategy))
                answer = await child.answer(self._limits.seconds)
            except TimeoutError:
                child.kill()
                raise ExtractionError("invalid_file", f"The file could not be parsed within "
                                      f"{self._limits.seconds:g} seconds.") from None
            except (EOFError, OSError):
                child.kill()
                raise ExtractionError("server_error", f"The parser stopped while reading the file (exit code "
                                      f"{child.exit_code()}); it may need more memory than it has.") from None
            except BaseException:
                child.kill()  # cancelled mid-file: the child's next answer would be this file's
                raise
            await self._keep(child)
        if isinstance(answer, _Failure):
            raise ExtractionError(answer.code, answer.message)
        assert isinstance(answer, ParsedFile), answer
        return answer

    async def _keep(self, child: _ParserProcess) -> None:
        """Keep a child warm for the next file, unless `workers` already are (files came during the warm-up)."""
        if len(self._idle) < self._workers:
            self._idle.append(child)
        else:
            await asyncio.to_thread(child.close)

    async def _spawn(self) -> _ParserProcess:
        parent, child_end = self._context.Pipe()
        process = self._context.Process(target=_serve, args=(child_end, self._limits, os.getpid()),
                                        name="threadline-parser", daemon=True)
        process.start()
        child_end.close()
        child = _ParserProcess(process, parent)
        try:
            ready = await child.answer(START_SECONDS)
        except BaseException:
            child.kill()
            raise
        if ready != "ready":
            child.kill()
            raise RuntimeError(f"the parser process said {ready!r} instead of ready")
        return child

    async def close(self) -> None:
        """Stop the idle children (a busy one is killed by its parse's cancellation)."""
        idle, self._idle = self._idle, []
        for child in idle:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(child.close)
