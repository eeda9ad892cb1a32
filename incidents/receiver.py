"""A reference webhook receiver: verifies genmon's signature and drops resent deliveries
by their signed id (``webhook-id``).

Useful as a template for your own endpoint, and used by genmon's tests and benchmark as
a real HTTP server on loopback. It runs a ``ThreadingHTTPServer`` in a background thread,
so it can be stopped and started again on the same port to play an outage.

>>> from genmon.incidents.signing import signed_headers
>>> import httpx
>>> with WebhookReceiver(secret="s3cret") as receiver:
...     body = b'{"event": "trigger"}'
...     headers = signed_headers("s3cret", "k1", body)
...     first = httpx.post(receiver.url, content=body, headers=headers).status_code
...     again = httpx.post(receiver.url, content=body, headers=headers).status_code
...     forged = httpx.post(receiver.url, content=body + b" ", headers=headers).status_code
...     replayed = httpx.post(receiver.url, content=body, headers={**headers, "webhook-id": "k2"})
>>> (first, again, forged, replayed.status_code, list(receiver.unique), receiver.duplicates)
(200, 200, 401, 401, ['k1'], 1)
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from genmon.incidents.destinations import IDEMPOTENCY_HEADER
from genmon.incidents.signing import ID_HEADER, verify_signature


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    received_at: float = field(default_factory=time.time)

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def idempotency_key(self) -> str | None:
        """The delivery's id: the signed ``webhook-id``, else ``Idempotency-Key``."""
        return self.headers.get(ID_HEADER) or self.headers.get(IDEMPOTENCY_HEADER.lower())


class WebhookReceiver:
    """Records every POST; answers 401 to a bad signature, else the next scripted status.

    ``script`` holds ``(status, headers)`` answers given before the normal 200, e.g.
    ``[(429, {"Retry-After": "1"})]``. ``unique`` keeps the first accepted delivery of
    each delivery id (the signed ``webhook-id``, else ``Idempotency-Key``), in arrival
    order; ``duplicates`` counts the others.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        secret: str | None = None,
        tolerance_s: float = 300,
    ) -> None:
        self.host = host
        self.port = port
        self.secret = secret
        self.tolerance_s = tolerance_s
        self.requests: list[Received] = []
        self.unique: dict[str, Received] = {}
        self.duplicates = 0
        self.rejected = 0
        self.script: deque[tuple[int, dict[str, str]]] = deque()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.arrived = threading.Condition(self._lock)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/hook"

    def start(self) -> WebhookReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            # Keep-alive, like real endpoints: clients reuse their connections.
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                status, extra = receiver._handle(
                    self.path, {k.lower(): v for k, v in self.headers.items()}, body
                )
                self.send_response(status)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return None

        server = ThreadingHTTPServer((self.host, self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close the port: deliveries now fail to connect, like an endpoint that is down."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> WebhookReceiver:
        return self.start() if self._server is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _handle(
        self, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str]]:
        with self._lock:
            if self.secret is not None and not verify_signature(
                self.secret, headers, body, self.tolerance_s
            ):
                self.rejected += 1
                return 401, {}
            if self.script:
                return self.script.popleft()
            received = Received(path, headers, body)
            self.requests.append(received)
            key = received.idempotency_key or f"no-key-{len(self.requests)}"
            if key in self.unique:
                self.duplicates += 1
            else:
                self.unique[key] = received
            self.arrived.notify_all()
            return 200, {}

    def wait_for(self, count: int, timeout_s: float = 10.0) -> bool:
        """Block until ``count`` unique deliveries arrived (or the timeout passed)."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while len(self.unique) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.arrived.wait(left)
            return True
