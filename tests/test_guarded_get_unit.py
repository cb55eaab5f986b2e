"""Unit tests (no stack) of `GuardedHttpClient.get` against a loopback HTTP/1.1 server that sends exact bytes: whole
bodies (content-length, chunked, to the end of the connection), the byte limit, redirects checked again, statuses."""

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
from loopback_http import LoopbackServer, loopback_server

from threadline_core.ssrf import (
    GuardedHttpClient,
    HttpFetchError,
    ResponseTooLarge,
    SsrfError,
    SsrfPolicy,
    parse_networks,
)

pytestmark = pytest.mark.unit

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


def answers(port: int) -> dict[str, bytes]:
    """What the server sends for each path."""
    return {
        "/image.png": b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: %d\r\n\r\n%s" % (len(PNG), PNG),
        "/chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        "/until-close": b"HTTP/1.0 200 OK\r\n\r\n" + b"c" * 100,
        "/missing": b"HTTP/1.1 404 Not Found\r\nContent-Type: text/html\r\nContent-Length: 9\r\n\r\nnot here!",
        "/big": b"HTTP/1.1 200 OK\r\nContent-Length: 101\r\n\r\n" + b"b" * 101,
        "/big-chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n40\r\n" + b"x" * 64 + b"\r\n40\r\n"
                        + b"y" * 64 + b"\r\n0\r\n\r\n",
        "/big-until-close": b"HTTP/1.0 200 OK\r\n\r\n" + b"z" * 101,
        "/cut": b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nConnection: close\r\n\r\nabc",
        "/elsewhere": b"HTTP/1.1 302 Found\r\nLocation: /image.png\r\nContent-Length: 0\r\n\r\n",
        "/by-name": b"HTTP/1.1 301 Moved\r\nLocation: http://images.example:%d/image.png\r\nContent-Length: 0\r\n\r\n"
                    % port,
        "/inside": b"HTTP/1.1 307 Temporary\r\nLocation: http://internal.example:%d/image.png\r\nContent-Length: 0"
                   b"\r\n\r\n" % port,
        "/silent": b"",
    }


def redirect_chain(path: str) -> bytes | None:
    """`/hops/N` redirects N times (relative `Location`s, 308 and 303 in turn) before the image."""
    if not path.startswith("/hops/"):
        return None
    left = int(path.removeprefix("/hops/"))
    if left == 0:
        return b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: %d\r\n\r\n%s" % (len(PNG), PNG)
    status = b"308 Permanent Redirect" if left % 2 else b"303 See Other"
    return b"HTTP/1.1 %s\r\nLocation: %d\r\nContent-Length: 2\r\n\r\nok" % (status, left - 1)


Server = tuple[int, list[str], LoopbackServer]
"""Port, the request heads seen, and the server (how many connections it took)."""


@asynccontextmanager
async def image_server() -> AsyncIterator[Server]:
    """A loopback server answering `answers` (keep-alive unless the answer ends its connection)."""
    seen: list[str] = []

    async def respond(head: bytes, _: asyncio.StreamReader, port: int) -> bytes:
        seen.append(head.decode("latin-1"))
        path = seen[-1].split(" ")[1]
        answer = redirect_chain(path) or answers(port)[path]
        if not answer:
            await asyncio.sleep(10)
        return answer

    async with loopback_server(respond) as server:
        yield server.port, seen, server


def resolver(answers: dict[str, list[str]]) -> Callable[[str, int], Awaitable[list[str]]]:
    """A DNS of fixed answers."""
    async def resolve(host: str, port: int) -> list[str]:
        if host not in answers:
            raise OSError("no such host")
        return answers[host]
    return resolve


@asynccontextmanager
async def loopback_client() -> AsyncIterator[GuardedHttpClient]:
    """A client whose policy allows loopback (images.example is 127.0.0.1; internal.example a private address)."""
    names = {"images.example": ["127.0.0.1"], "internal.example": ["10.0.0.5"]}
    client = GuardedHttpClient(SsrfPolicy(parse_networks("127.0.0.0/8"), resolver=resolver(names)))
    try:
        yield client
    finally:
        await client.aclose()


async def test_get_reads_whole_bodies_on_kept_alive_connections() -> None:
    """Content-length, chunked and connection-delimited bodies are read whole; the Host header keeps the name."""
    async with loopback_client() as client, image_server() as (port, seen, server):
        image = await client.get(f"http://images.example:{port}/image.png", time_limit=5, max_bytes=len(PNG),
                                 headers={"Accept": "image/*"})
        assert (image.status_code, image.headers["content-type"], image.content) == (200, "image/png", PNG)
        assert seen[0].startswith("GET /image.png HTTP/1.1\r\n") and f"Host: images.example:{port}" in seen[0]
        assert "Accept: image/*" in seen[0] and "Content-Length" not in seen[0]
        for _ in range(2):
            chunked = await client.get(f"http://127.0.0.1:{port}/chunked", time_limit=5, max_bytes=11)
            assert chunked.content == b"hello world"
        assert server.connections == 2  # one per host name, kept alive
        until_close = await client.get(f"http://127.0.0.1:{port}/until-close", time_limit=5, max_bytes=100)
        assert until_close.content == b"c" * 100


async def test_get_refuses_a_body_larger_than_its_limit() -> None:
    """A body over the limit is an error whatever frames it, not a body silently cut short."""
    async with loopback_client() as client, image_server() as (port, _, _):
        for path in ("/big", "/big-chunked", "/big-until-close"):
            with pytest.raises(ResponseTooLarge, match="larger than 100 bytes"):
                await client.get(f"http://127.0.0.1:{port}{path}", time_limit=5, max_bytes=100)
        exact = await client.get(f"http://127.0.0.1:{port}/big", time_limit=5, max_bytes=101)
        assert exact.content == b"b" * 101
        with pytest.raises(HttpFetchError, match="cut short"):
            await client.get(f"http://127.0.0.1:{port}/cut", time_limit=5, max_bytes=100)


async def test_get_follows_redirects_and_checks_each_url() -> None:
    """Relative and absolute `Location`s are followed; a redirect to a refused address is refused before anything is
    sent to it."""
    async with loopback_client() as client, image_server() as (port, seen, _):
        moved = await client.get(f"http://127.0.0.1:{port}/elsewhere", time_limit=5, max_bytes=len(PNG))
        assert (moved.status_code, moved.content, moved.url) == (200, PNG, f"http://127.0.0.1:{port}/image.png")
        named = await client.get(f"http://127.0.0.1:{port}/by-name", time_limit=5, max_bytes=len(PNG))
        assert named.url == f"http://images.example:{port}/image.png" and named.content == PNG
        assert f"Host: images.example:{port}" in seen[-1]
        sent = len(seen)
        with pytest.raises(SsrfError, match=r"10\.0\.0\.5.*private"):
            await client.get(f"http://127.0.0.1:{port}/inside", time_limit=5, max_bytes=len(PNG))
        assert len(seen) == sent + 1  # the redirect only


async def test_get_follows_at_most_max_redirects() -> None:
    async with loopback_client() as client, image_server() as (port, _, _):
        five = await client.get(f"http://127.0.0.1:{port}/hops/5", time_limit=5, max_bytes=len(PNG))
        assert five.content == PNG and five.url == f"http://127.0.0.1:{port}/hops/0"
        with pytest.raises(HttpFetchError, match="more than 5 redirects"):
            await client.get(f"http://127.0.0.1:{port}/hops/6", time_limit=5, max_bytes=len(PNG))
        with pytest.raises(HttpFetchError, match="more than 1 redirects"):
            await client.get(f"http://127.0.0.1:{port}/hops/2", time_limit=5, max_bytes=len(PNG), max_redirects=1)


async def test_get_answers_any_status_and_fails_without_one() -> None:
    """A 404 is an answer (the caller judges it); a refused first URL, a silent server and a closed port are not."""
    async with loopback_client() as client:
        async with image_server() as (port, seen, _):
            missing = await client.get(f"http://127.0.0.1:{port}/missing", time_limit=5, max_bytes=100)
            assert (missing.status_code, missing.headers["content-type"], missing.content) == (404, "text/html",
                                                                                                b"not here!")
            with pytest.raises(SsrfError, match="loopback"):
                strict = GuardedHttpClient(SsrfPolicy())
                await strict.get(f"http://127.0.0.1:{port}/image.png", time_limit=5, max_bytes=len(PNG))
            assert len(seen) == 1
            with pytest.raises(HttpFetchError, match=r"timed out after 0\.3s"):
                await client.get(f"http://127.0.0.1:{port}/silent", time_limit=0.3, max_bytes=100)
        with pytest.raises(HttpFetchError, match="ConnectionRefusedError"):
            await client.get(f"http://127.0.0.1:{port}/image.png", time_limit=5, max_bytes=100)
