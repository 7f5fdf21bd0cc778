"""Load test of the online front against the same engine called directly.

Starts a local Ray and the Serve app of a job spec on 127.0.0.1, sends a fixed number of
single-image requests from 16 and 64 concurrent HTTP clients, then (with Serve shut down)
generates the same number of images by calling the engine in-process, in batches of 1 and
of ``serve.max_batch_size``, with the replica's thread count. Prints a markdown table:
requests/s, p50/p99 latency, and the mean Serve batch size each image was made in.

With ``--abandoners K``, each concurrency level runs a second time beside K careless
clients: each sends a heavy request (``--abandon-n`` images of ``--abandon-steps`` steps)
and hangs up after ``--abandon-after-s``, again and again, until the well-behaved load is
done (an SDK that times out and retries). Their rows give the well-behaved requests'
latency beside that mix, and the images the replica dropped (never started) and
discarded (made for a client that had left) meanwhile, from ``/healthz``.

    .venv/bin/python benchmarks/serve_load.py jobs/serve.yaml --requests 64 \\
        --set serve.min_replicas=1 --set serve.max_replicas=1 --abandoners 4
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone

import ray
import requests
from ray import serve

from pipeline.engine.image_encoding import encode_image
from pipeline.engine.engine import Engine
from pipeline.engine.requests import GenerationRequest
from pipeline.serve.app import start
from pipeline.spec.load import load_spec


@dataclass
class Row:
    mode: str
    clients: int
    requests: int
    ok: int
    seconds: float
    latencies: list[float]
    mean_batch: float
    abandoned: str = "-"

    def cells(self) -> list[str]:
        ordered = sorted(self.latencies)
        p50 = statistics.median(ordered) if ordered else float("nan")
        p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))] if ordered else float("nan")
        return [
            self.mode,
            str(self.clients),
            f"{self.ok}/{self.requests}",
            f"{self.ok / self.seconds:.2f}",
            f"{p50 * 1000:.0f}",
            f"{p99 * 1000:.0f}",
            f"{self.mean_batch:.1f}",
            self.abandoned,
        ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not become healthy in {timeout:.0f} s")


def http_load(url: str, clients: int, count: int, offset: int) -> Row:
    """``count`` single-image requests from ``clients`` threads, each with its own session."""
    local = threading.local()

    def one(i: int) -> tuple[float, int, int]:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        began = time.perf_counter()
        response = session.post(f"{url}/v1/images/generations", json={"prompt": f"benchmark prompt {offset + i}", "seed": offset + i}, timeout=600)
        elapsed = time.perf_counter() - began
        batch = response.json()["data"][0]["batch_size"] if response.status_code == 200 else 0
        return elapsed, response.status_code, batch

    began = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = list(pool.map(one, range(count)))
    seconds = time.perf_counter() - began
    ok = [r for r in results if r[1] == 200]
    return Row(
        mode="serve (HTTP)",
        clients=clients,
        requests=count,
        ok=len(ok),
        seconds=seconds,
        latencies=[r[0] for r in ok],
        mean_batch=statistics.mean(r[2] for r in ok) if ok else 0.0,
    )


def with_abandoners(url: str, clients: int, count: int, offset: int, abandoners: int, body: dict, after_s: float) -> Row:
    """:func:`http_load` beside ``abandoners`` clients that each send ``body`` and hang up
    after ``after_s``, over and over until the load is done."""
    stop = threading.Event()
    sent = [0] * abandoners

    def careless(i: int) -> None:
        while not stop.is_set():
            sent[i] += 1
            try:
                requests.post(f"{url}/v1/images/generations", json={**body, "seed": sent[i], "prompt": f"abandoned {i}"}, timeout=(5, after_s))
            except requests.RequestException:
                pass  # gave up: what it came for

    before = requests.get(f"{url}/healthz", timeout=60).json()["replica"]
    threads = [threading.Thread(target=careless, args=(i,), daemon=True) for i in range(abandoners)]
    for thread in threads:
        thread.start()
    try:
        row = http_load(url, clients, count, offset)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    _wait_idle(url)
    after = requests.get(f"{url}/healthz", timeout=60).json()["replica"]
    dropped = after["images_dropped"] - before["images_dropped"]
    discarded = after["images_discarded"] - before["images_discarded"]
    row.mode = f"serve + {abandoners} abandoning"
    row.abandoned = f"{sum(sent)} sent, {dropped} img dropped, {discarded} discarded"
    return row


def _wait_idle(url: str, timeout: float = 600.0) -> None:
    """Until the replica holds nothing (abandoned work included), so rows do not overlap."""
    deadline = time.monotonic() + timeout
    while requests.get(f"{url}/healthz", timeout=60).json()["replica"]["in_flight"]:
        if time.monotonic() > deadline:
            raise TimeoutError("the replica still holds requests")
        time.sleep(0.2)


def direct(engine: Engine, spec, count: int, batch: int, fmt: str, quality: int) -> Row:
    """The engine in-process: ``count`` images in calls of ``batch``, each encoded. A call's
    latency is every one of its images' latency."""
    d = spec.defaults
    made = [
        GenerationRequest(f"benchmark prompt {i}", d.negative_prompt, i, d.width, d.height, d.steps, d.guidance_scale)
        for i in range(count)
    ]
    latencies: list[float] = []
    began = time.perf_counter()
    for start_at in range(0, count, batch):
        group = made[start_at : start_at + batch]
        call = time.perf_counter()
        for result in engine.generate(group):
            encode_image(result.pixels, fmt, quality)
        latencies += [time.perf_counter() - call] * len(group)
    seconds = time.perf_counter() - began
    return Row(f"engine direct, batch {batch}", 1, count, count, seconds, latencies, float(batch))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", nargs="?", default="jobs/serve.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    parser.add_argument("--clients", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--abandoners", type=int, default=0, help="careless clients beside each level (0: none)")
    parser.add_argument("--abandon-n", type=int, default=4, help="images per abandoned request")
    parser.add_argument("--abandon-steps", type=int, default=0, help="steps per abandoned image (0: 4x defaults.steps)")
    parser.add_argument("--abandon-after-s", type=float, default=0.5, help="seconds before a careless client hangs up")
    args = parser.parse_args()

    spec = load_spec(args.spec, [*args.overrides, "serve.host=127.0.0.1", f"serve.port={_free_port()}", "model.device=cpu"])
    threads = max(1, int(spec.runtime.cpus_per_actor))  # as the replica (and batch actor) sets it
    temp_dir = tempfile.mkdtemp(prefix="igb", dir="/tmp")
    rows: list[Row] = []
    try:
        ray.init(num_cpus=os.cpu_count(), _temp_dir=temp_dir, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        url = start(spec)
        _wait_healthy(url)
        http_load(url, clients=4, count=8, offset=10_000)  # warm-up: first calls pay lazy init
        heavy = {"n": args.abandon_n, "steps": args.abandon_steps or 4 * spec.defaults.steps}
        for n, clients in enumerate(args.clients):
            rows.append(http_load(url, clients, args.requests, offset=n * args.requests))
            if args.abandoners:
                offset = (len(args.clients) + n) * args.requests
                rows.append(with_abandoners(url, clients, args.requests, offset, args.abandoners, heavy, args.abandon_after_s))
        serve.shutdown()
        ray.shutdown()

        import torch

        torch.set_num_threads(threads)
        engine = Engine(spec.model)
        direct(engine, spec, 4, 1, spec.output.format, spec.output.quality)  # warm-up
        for batch in sorted({1, spec.serve.max_batch_size}):
            rows.append(direct(engine, spec, args.requests, batch, spec.output.format, spec.output.quality))
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)

    d, sv = spec.defaults, spec.serve
    print(
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPU cores, torch threads per engine {threads}; model {spec.model.ref}, "
        f"{d.width}x{d.height}, {d.steps} steps; serve max_batch_size {sv.max_batch_size}, "
        f"batch_wait_timeout_s {sv.batch_wait_timeout_s}, max_ongoing_requests {sv.max_ongoing_requests}, "
        f"replicas {sv.min_replicas}-{sv.max_replicas}\n"
    )
    header = ["mode", "clients", "ok", "requests/s", "p50 ms", "p99 ms", "mean batch", "abandoned requests"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row.cells()) + " |")


if __name__ == "__main__":
    main()
