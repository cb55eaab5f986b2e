"""The scripted model server in its own process, timing every chat completion as the server sees it.

Run by `bench/common.py` (`python bench/timed_model_server.py PORT`): the benches subtract the
model's own time (request received -> last byte of the response handed to the socket) from the
platform's end-to-end time. Requests are matched to runs by a ``bench:<token>`` marker in the
messages. Extra routes:

- ``GET /bench/timings``: ``{token: [seconds, ...]}`` for every marked request since the last call
  (the returned entries are forgotten);
- ``GET /bench/sample``: the last chat-completions body received without a ``direct:`` marker (what
  the platform sends), so the baseline replays exactly that request;
- ``GET /bench/cpu``: the process CPU time (seconds), to report the model server's CPU share.
"""

import os
import re
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson
import uvicorn
import uvloop

from threadline_devstack.model_server import ScriptedModelServer

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MARKER = re.compile(rb"bench:([A-Za-z0-9_.-]+)")


class TimingApp:
    """ASGI wrapper: times chat completions and keeps the platform's last request body."""

    def __init__(self, inner: ASGIApp) -> None:
        self._inner = inner
        self.timings: dict[str, list[float]] = {}
        self.sample: bytes = b"{}"
        self.unmarked = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith(("/bench/", "/v1/chat/completions",
                                                             "/chat/completions")):
            await self._inner(scope, receive, send)
            return
        if path.startswith("/bench/"):
            await self._bench_route(path, send)
            return
        started = time.perf_counter()
        body = bytearray()
        finished = 0.0

        async def timed_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                body.extend(message.get("body", b""))
            return message

        async def timed_send(message: Message) -> None:
            nonlocal finished
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                finished = time.perf_counter()

        await self._inner(scope, timed_receive, timed_send)
        elapsed = (finished or time.perf_counter()) - started
        match = MARKER.search(body)
        if match is None:
            self.unmarked += 1
            return
        token = match.group(1).decode()
        self.timings.setdefault(token, []).append(elapsed)
        if not token.startswith("direct"):
            self.sample = bytes(body)

    async def _bench_route(self, path: str, send: Send) -> None:
        if path == "/bench/timings":
            payload, self.timings = self.timings, {}
            data = orjson.dumps({"timings": payload, "unmarked": self.unmarked})
        elif path == "/bench/sample":
            data = self.sample
        elif path == "/bench/cpu":
            times = os.times()
            data = orjson.dumps({"cpu_seconds": times.user + times.system})
        else:
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": data})


def main() -> None:
    """Serve on 127.0.0.1:PORT until SIGTERM."""
    port = int(sys.argv[1])
    scripted = ScriptedModelServer(port=0)
    scripted.requests = _Discard()  # never grows during long benches
    app = TimingApp(scripted.app())
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                            lifespan="off", timeout_keep_alive=60, backlog=2048, http="httptools")
    uvloop.run(uvicorn.Server(config).serve())


class _Discard(list[Any]):
    """A list that forgets what is appended (the scripted server records every request)."""

    def append(self, _: Any) -> None:
        return None


if __name__ == "__main__":
    main()
