"""S3 that fails a fraction of requests (HTTP 500, 503, connection resets), through a small
fault-injecting proxy on 127.0.0.1 in front of moto's server: the job must retry its way
through and account for every row exactly once."""

from __future__ import annotations

import http.client
import itertools
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.job.run import run
from pipeline.output.verify import verify

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class FaultyS3Proxy(ThreadingHTTPServer):
    """Forwards to ``upstream``; request k (counting from 1) fails when k % every == 0,
    cycling through 500, 503 and a dropped connection."""

    daemon_threads = True

    def __init__(self, upstream: str, every: int):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.upstream = urlsplit(upstream)
        self.every = every
        self.counter = itertools.count(1)
        self.modes = itertools.cycle(["500", "503", "reset"])
        self.lock = threading.Lock()
        self.injected = {"500": 0, "503": 0, "reset": 0}
        self.forwarded = 0

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def next_fault(self) -> str | None:
        with self.lock:
            if next(self.counter) % self.every:
                self.forwarded += 1
                return None
            mode = next(self.modes)
            self.injected[mode] += 1
            return mode


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
        fault = self.server.next_fault()
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


@pytest.fixture
def faulty_s3(s3_server, s3):
    fs, bucket, options = s3
    proxy = FaultyS3Proxy(s3_server, every=3)  # a third of all requests fail
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    yield proxy, fs, bucket, options, {**options, "endpoint_url": proxy.url}
    proxy.shutdown()
    proxy.server_close()


def test_job_through_failing_s3(ray_cluster, make_spec, prompts, faulty_s3, tmp_path):
    proxy, direct, bucket, direct_options, flaky = faulty_s3
    lines = (prompts / "partiprompts" / "PartiPrompts.tsv").read_text().splitlines()[1:25]
    table = tmp_path / "p.parquet"
    pd.DataFrame({"prompt": [line.split("\t")[0] for line in lines]}).to_parquet(table)
    direct.put(str(table), f"{bucket}/in/p.parquet")

    spec = make_spec(
        {"url": f"s3://{bucket}/in/p.parquet", "storage_options": flaky},
        output={"url": f"s3://{bucket}/out", "storage_options": flaky, "rows_per_part": 4},
    )
    summary = run(spec)

    assert (summary.images, summary.errors) == (24, 0)
    assert all(n >= 1 for n in proxy.injected.values()), proxy.injected  # each kind of fault was met
    # Read back directly from moto: what landed is exactly the dataset, once.
    images = pq.read_table(f"{bucket}/out/images", filesystem=direct).to_pandas()
    assert len(images) == 24 and images["request_id"].is_unique
    report = verify(f"s3://{bucket}/out", direct_options, spec)
    assert report.ok, report.format()
