"""A loopback HTTP/1.1 server that sends the exact bytes a test scripts, keeping each connection alive unless an
answer ends it: the guarded HTTP client's unit tests (webhook POSTs, image GETs)."""

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

Respond = Callable[[bytes, asyncio.StreamReader, int], Awaitable[bytes]]
"""The answer to one request, given its head, the reader (to take its body) and the server's port."""


@dataclass
class LoopbackServer:
    """The running server, its port and how many connections it took."""

    server: asyncio.Server
    port: int
    connections: int = 0


@asynccontextmanager
async def loopback_server(respond: Respond) -> AsyncIterator[LoopbackServer]:
    """Serve `respond`'s answers on 127.0.0.1, at a free port, until the block ends."""
    running: list[LoopbackServer] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state = running[0]
        state.connections += 1
        try:
            while True:
                answer = await respond(await reader.readuntil(b"\r\n\r\n"), reader, state.port)
                writer.write(answer)
                await writer.drain()
                if b"Connection: close" in answer or answer.startswith(b"HTTP/1.0"):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    running.append(LoopbackServer(server=server, port=int(server.sockets[0].getsockname()[1])))
    try:
        yield running[0]
    finally:
        server.close()
