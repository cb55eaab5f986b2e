"""Loopback webhook receivers for tests: a slow one (queues build, work is in flight) and a signature-checking one."""

import json
import threading
import time
from collections import Counter, defaultdict
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import openai


class LoopbackReceiver:
    """Serves POSTs on a loopback port in a thread; `receive` answers each with a status code."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                self.send_response(receiver.receive(self.headers, body))
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, name="webhook-receiver", daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"

    def receive(self, headers: Message, body: bytes) -> int:
        """Handle one delivery; the status code to answer."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()


class SlowReceiver(LoopbackReceiver):
    """Answers every POST after `delay` seconds and keeps the decoded bodies."""

    def __init__(self, delay: float) -> None:
        self.events: list[dict[str, Any]] = []
        self._delay = delay
        super().__init__()

    def receive(self, headers: Message, body: bytes) -> int:
        time.sleep(self._delay)
        with self._lock:
            self.events.append(json.loads(body))
        return 200

    @property
    def count(self) -> int:
        """Deliveries received so far."""
        with self._lock:
            return len(self.events)

    def about(self, event_type: str) -> set[str]:
        """Ids of the objects of the received events of this type."""
        with self._lock:
            return {e["data"]["id"] for e in self.events if e["type"] == event_type}


class SignedReceiver(LoopbackReceiver):
    """Verifies each delivery with the SDK (Standard Webhooks) and keeps every body by webhook id."""

    def __init__(self) -> None:
        self.secret = ""
        self.bodies: dict[str, set[bytes]] = defaultdict(set)
        self.received: Counter[str] = Counter()  # signed deliveries per webhook id (a repeat is one more)
        self.unsigned = 0
        self._sdk = openai.OpenAI(api_key="unused", base_url="http://127.0.0.1:9/v1")
        super().__init__()

    def receive(self, headers: Message, body: bytes) -> int:
        try:
            self._sdk.webhooks.verify_signature(body, dict(headers.items()), secret=self.secret)
        except openai.InvalidWebhookSignatureError:
            with self._lock:
                self.unsigned += 1
            return 400
        with self._lock:
            self.bodies[headers["webhook-id"]].add(body)
            self.received[headers["webhook-id"]] += 1
        return 200
