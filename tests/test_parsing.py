"""The parser pool: files parsed and chunked in child processes, within a time budget and a token cap."""

import asyncio
import multiprocessing
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from threadline_search.chunking import ChunkingStrategy
from threadline_search.extract import ExtractionError
from threadline_search.parsing import ParseLimits, ParserPool

pytestmark = pytest.mark.unit

SLOW_TEXT = ("\N{GRINNING FACE}" * 50_000).encode()
"""Minutes for spaCy's sentence splitter (quadratic on a long run without spaces)."""


def _parser_pids() -> set[int]:
    return {p.pid for p in multiprocessing.active_children() if p.name == "threadline-parser" and p.pid}


async def _failure(pool: ParserPool, filename: str, data: bytes) -> ExtractionError:
    with pytest.raises(ExtractionError) as caught:
        await pool.parse(filename, data, ChunkingStrategy())
    return caught.value


async def test_a_file_is_chunked_in_a_warm_child_and_the_token_cap_fails_it() -> None:
    pool = ParserPool(workers=1, limits=ParseLimits(seconds=60, max_tokens=2000))
    await pool.warm_up()
    try:
        (child,) = _parser_pids()
        parsed = await pool.parse("notes.md", b"# Notes\n\nThe roof garden is watered at dawn.",
                                  ChunkingStrategy(100, 0))
        assert parsed.kind == "md" and parsed.tokens > 5
        assert [c.text for c in parsed.chunks] == ["Notes\n\nThe roof garden is watered at dawn."]
        failure = await _failure(pool, "long.txt", b"word " * 2500)
        assert (failure.code, failure.message) == (
            "invalid_file", "The file's text has more than 2,000 tokens; files may have at most 2,000.")
        failure = await _failure(pool, "image.png", b"\x89PNG\r\n")
        assert failure.code == "unsupported_file"
        assert _parser_pids() == {child}  # files that fail in the parser do not cost it its warm-up
    finally:
        await pool.close()
    assert not _parser_pids()


async def test_a_parse_past_its_budget_is_killed_and_the_next_file_gets_a_new_child() -> None:
    pool = ParserPool(workers=1, limits=ParseLimits(seconds=2))
    await pool.warm_up()
    try:
        (first,) = _parser_pids()
        started = time.monotonic()
        failure = await _failure(pool, "emoji.txt", SLOW_TEXT)
        assert (failure.code, failure.message) == ("invalid_file", "The file could not be parsed within 2 seconds.")
        assert time.monotonic() - started < 10
        assert first not in _parser_pids()
        parsed = await pool.parse("after.txt", b"Parsed by a fresh child.", ChunkingStrategy())
        assert parsed.chunks[0].text == "Parsed by a fresh child."
        assert len(_parser_pids() - {first}) == 1
    finally:
        await pool.close()


async def test_a_parser_that_dies_mid_file_fails_the_file_as_a_server_error() -> None:
    pool = ParserPool(workers=1, limits=ParseLimits(seconds=60))
    await pool.warm_up()
    try:
        (child,) = [p for p in multiprocessing.active_children() if p.name == "threadline-parser"]
        parsing = asyncio.create_task(_failure(pool, "emoji.txt", SLOW_TEXT))
        await asyncio.sleep(1.0)
        child.kill()  # as the kernel's OOM killer would
        failure = await parsing
        assert failure.code == "server_error"
        assert failure.message.startswith("The parser stopped while reading the file (exit code -9)")
    finally:
        await pool.close()


def test_a_killed_service_leaves_no_parser_running(tmp_path: Path) -> None:
    """The kernel kills the parser processes of a service that was SIGKILLed (none is left parsing for minutes)."""
    script = tmp_path / "service.py"
    script.write_text(textwrap.dedent("""
        import asyncio, multiprocessing, sys, time
        from threadline_search.chunking import ChunkingStrategy
        from threadline_search.parsing import ParseLimits, ParserPool

        async def main() -> None:
            pool = ParserPool(workers=1, limits=ParseLimits(seconds=600))
            await pool.warm_up()
            print(*[p.pid for p in multiprocessing.active_children() if p.name == "threadline-parser"], flush=True)
            await pool.parse("emoji.txt", ("\\N{GRINNING FACE}" * 50_000).encode(), ChunkingStrategy())

        if __name__ == "__main__":
            asyncio.run(main())
    """))
    service = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert service.stdout is not None
        (parser,) = [int(pid) for pid in service.stdout.readline().split()]
        time.sleep(1.0)  # mid-file
        assert _alive(parser)
    finally:
        service.kill()
        service.wait()
    deadline = time.monotonic() + 10
    while _alive(parser) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(parser)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
