"""A fault-injecting HTTP proxy on 127.0.0.1 in front of moto's S3 server: real requests,
real failures (HTTP 500, 503, dropped connections), chosen per request by a rule; a gate
may hold a request until the test lets it go (to force an interleaving of two clients),
and every request's method, path and headers are kept (to assert a condition header).
s3fs and botocore are never patched: they meet the faults over the wire."""

from __future__ import annotations

import http.client
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional
from urllib.parse import urlsplit

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}

# (method, path) -> None to forward, or "500", "503" or "reset".
FaultRule = Callable[[str, str], Optional[str]]
# (method, path, headers with lower-case names) -> None; may block to hold the request.
Gate = Callable[[str, str, dict], None]


def forward_all(method: str, path: str) -> Optional[str]:
    return None


class S3Proxy(ThreadingHTTPServer):
    """Forwards to ``upstream`` unless ``rule(method, path)`` names a fault; counts what
    it injected and forwarded. ``rule`` may be replaced while the proxy runs. ``gate``,
    when given, sees each request first, outside the proxy's own lock, and may block it;
    ``requests`` lists (method, path, headers) of every request in arrival order."""

    daemon_threads = True

    def __init__(self, upstream: str, rule: FaultRule = forward_all, gate: Optional[Gate] = None):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.upstream = urlsplit(upstream)
        self.rule = rule
        self.gate = gate
        self.requests: list[tuple[str, str, dict]] = []
        self.lock = threading.Lock()
        self.injected = {"500": 0, "503": 0, "reset": 0}
        self.forwarded = 0

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def next_fault(self, method: str, path: str, headers: dict) -> Optional[str]:
        with self.lock:
            self.requests.append((method, path, headers))
        if self.gate is not None:
            self.gate(method, path, headers)
        with self.lock:
            fault = self.rule(method, path)
            if fault is None:
                self.forwarded += 1
            else:
                self.injected[fault] += 1
            return fault

    def __enter__(self) -> "S3Proxy":
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _serve(self) -> None:
        body = self._body()
        fault = self.server.next_fault(self.command, urlsplit(self.path).path, {k.lower(): v for k, v in self.headers.items()})
        if fault == "reset":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault:
            message = b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"
            if fault == "503":
                message = b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>"
            self.send_response(int(fault))
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(message)))
            self.end_headers()
            self.wfile.write(message)
            return
        upstream = http.client.HTTPConnection(self.server.upstream.hostname, self.server.upstream.port, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        headers["Content-Length"] = str(len(body))
        upstream.request(self.command, self.path, body=body, headers=headers)
        response = upstream.getresponse()
        payload = response.read()
        self.send_response(response.status, response.reason)
        # A HEAD answer has no body but tells the object's size in Content-Length.
        dropped = _HOP_BY_HOP if self.command == "HEAD" else _HOP_BY_HOP | {"content-length"}
        for key, value in response.getheaders():
            if key.lower() not in dropped:
                self.send_header(key, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
        upstream.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _serve
