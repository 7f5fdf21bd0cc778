"""How long ``imagegen serve`` takes to exit after SIGTERM with a request still running,
against ``serve.shutdown_grace_s`` and the margin the README states
(:data:`pipeline.serve.process.SHUTDOWN_MARGIN_S`).

Starts the real command on a free loopback port (tiny model), sends one request far longer
than the grace period, sends SIGTERM once it is in flight, and times the exit. Prints a
markdown row per run.

    .venv/bin/python benchmarks/serve_stop.py --grace 5 --runs 2

(``--repo DIR`` runs the command of another checkout of the project, e.g. an older one.)
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests
import yaml

from pipeline.serve.process import SHUTDOWN_MARGIN_S

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_run(grace: float, root: Path, repo: Path) -> float:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    spec = {
        "input": {"url": str(root / "unused.jsonl")},
        "model": {"ref": "tiny", "cache_dir": str(root / "models"), "device": "cpu"},
        "defaults": {"width": 64, "height": 64, "steps": 2, "seed": 1},
        "limits": {"max_steps": 500, "max_num_images": 8},
        "runtime": {"cpus_per_actor": 1},
        "serve": {"host": "127.0.0.1", "port": port, "shutdown_grace_s": grace},
    }
    (root / "serve.yaml").write_text(yaml.safe_dump(spec))
    server = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "serve", str(root / "serve.yaml")],
        cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        _until(lambda: requests.get(f"{url}/healthz", timeout=5).status_code == 200)
        slow = {"prompt": "far longer than the grace period", "n": 8, "steps": 500}
        threading.Thread(target=lambda: _ignore(lambda: requests.post(f"{url}/v1/images/generations", json=slow, timeout=3600)), daemon=True).start()
        _until(lambda: requests.get(f"{url}/healthz", timeout=5).json()["in_flight"] > 0)
        signalled = time.monotonic()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=grace + 600)
        return time.monotonic() - signalled
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)


def _until(condition, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise TimeoutError("the server did not get there")


def _ignore(call) -> None:
    try:
        call()
    except requests.RequestException:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grace", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose imagegen serve to run")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at start; shutdown_grace_s {args.grace:g}, margin {SHUTDOWN_MARGIN_S:g}\n")
    print("| run | SIGTERM to exit, s | past the grace, s |")
    print("|---|---|---|")
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="igstop") as root:
            seconds = one_run(args.grace, Path(root), args.repo.resolve())
        print(f"| {run + 1} | {seconds:.1f} | {seconds - args.grace:.1f} |", flush=True)


if __name__ == "__main__":
    main()
