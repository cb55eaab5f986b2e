"""A loopback webhook receiver for tests that need deliveries to be slow (queues build, work is in flight)."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class SlowReceiver:
    """Answers every POST after `delay` seconds and keeps the decoded bodies."""

    def __init__(self, delay: float) -> None:
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                time.sleep(delay)
                with receiver._lock:
                    receiver.events.append(json.loads(body))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, name="webhook-receiver", daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"

    @property
    def count(self) -> int:
        """Deliveries received so far."""
        with self._lock:
            return len(self.events)

    def about(self, event_type: str) -> set[str]:
        """Ids of the objects of the received events of this type."""
        with self._lock:
            return {e["data"]["id"] for e in self.events if e["type"] == event_type}

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()
