"""``imagegen serve`` as a real process, stopped the ways operators stop it: SIGTERM to the
process (Kubernetes), SIGTERM to its whole process group (systemd, ``kill -TERM -PGID``),
and SIGINT (Ctrl-C) with a grace period shorter than the request in flight.

Each test starts the real command (its own local Ray) on a free loopback port. Waits are
polls with a deadline on what the server says (/healthz's in-flight count, its exit),
never bare sleeps.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from polling import free_port, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parent.parent






def _serving(condition, what: str, timeout: float = 240.0):
    """Poll a server until ``condition`` holds; connection errors while it starts count as not yet."""
    return wait_for(condition, timeout, what, ignore=(requests.RequestException, OSError))


class Server:
    """A running ``imagegen serve`` in a process group of its own (so that signalling the
    group cannot reach pytest)."""

    def __init__(self, tmp_path: Path, grace_s: float, **serve: Any):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        spec = {
            "input": {"url": str(tmp_path / "unused.jsonl")},
            "model": {"ref": "tiny", "cache_dir": str(tmp_path / "models"), "device": "cpu"},
            "defaults": {"width": 64, "height": 64, "steps": 2, "seed": 1},
            "limits": {"max_steps": 400, "max_num_images": 8},
            "runtime": {"cpus_per_actor": 1},
            "serve": {"host": "127.0.0.1", "port": self.port, "max_batch_size": 8, "shutdown_grace_s": grace_s, **serve},
        }
        (tmp_path / "serve.yaml").write_text(yaml.safe_dump(spec))
        self.log = tmp_path / "serve.log"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "serve", str(tmp_path / "serve.yaml")],
            cwd=REPO,
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        _serving(lambda: self.process.poll() is not None or self.health().status_code == 200, "the server to answer /healthz")
        assert self.process.poll() is None, self.output()

    def health(self) -> requests.Response:
        return requests.get(f"{self.url}/healthz", timeout=10)

    def generate(self, body: dict[str, Any]) -> requests.Response:
        return requests.post(f"{self.url}/v1/images/generations", json=body, timeout=400)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def _server_session_members(server: Server) -> set[int]:
    """Processes in the session of the server child (the supervisor starts it with setsid)."""
    sessions: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            sessions[int(entry)] = int(fields[3])  # ppid, pgrp, session -> index 3 is session
    children = [pid for pid in sessions if _parent(pid) == server.process.pid]
    return {pid for pid, sid in sessions.items() for child in children if sid == child}


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper that is not pytest's does not count)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return -1


# The signal to the process runs in every suite; the group's and the supervisor's death take
# a minute each (a server start and three long requests) and run in the slow tier.
@pytest.mark.parametrize(
    "target", ["process", pytest.param("process group", marks=pytest.mark.slow), pytest.param("supervisor killed", marks=pytest.mark.slow)]
)
def test_sigterm_finishes_requests_in_flight_refuses_new_ones_and_exits_0(tmp_path, target):
    server = Server(tmp_path, grace_s=300)
    try:
        ray_processes = _server_session_members(server)
        assert ray_processes, "the server and its Ray run in a session of their own"
        bodies = [{"prompt": f"a slow lighthouse {i}", "steps": 300, "seed": i} for i in range(3)]
        with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
            futures = [pool.submit(server.generate, body) for body in bodies]
            _serving(lambda: server.health().json().get("in_flight") == len(bodies), "the requests to be in flight")
            if target == "process":
                server.process.send_signal(signal.SIGTERM)
            elif target == "process group":
                os.killpg(server.process.pid, signal.SIGTERM)
            else:  # SIGKILL the command itself: the kernel sends its server SIGTERM
                server.process.kill()
            draining = _serving(lambda: server.health().status_code == 503 and server.health().json(), "/healthz to say draining")
            assert draining["status"] == "draining"
            late = server.generate({"prompt": "too late"})
            assert late.status_code == 503 and late.json()["error"]["code"] == "server_shutting_down", late.text
            assert late.headers.get("Retry-After")
            answers = [future.result() for future in futures]
        assert [a.status_code for a in answers] == [200, 200, 200], [a.text[:300] for a in answers]
        assert all(len(a.json()["data"]) == 1 for a in answers)
        expected = -signal.SIGKILL if target == "supervisor killed" else 0
        assert server.process.wait(timeout=120) == expected, server.output()
        _serving(lambda: "imagegen: shutting down" in server.output(), "the server to shut down", timeout=120)
        assert "for 3 in flight" in server.output() and "no request in flight" in server.output()
        # Nothing of the server's Ray is left behind.
        _serving(lambda: not any(_alive(pid) for pid in ray_processes), "Ray's processes to exit", timeout=60)
    finally:
        server.stop()


def test_sigint_stops_waiting_at_the_grace_period(tmp_path):
    server = Server(tmp_path, grace_s=2)
    try:
        ray_processes = _server_session_members(server)
        with ThreadPoolExecutor(max_workers=1) as pool:
            slow = pool.submit(server.generate, {"prompt": "a very slow lighthouse", "steps": 400, "n": 8})
            _serving(lambda: server.health().json().get("in_flight") == 1, "the request to be in flight")
            server.process.send_signal(signal.SIGINT)
            # Exits once the grace period is over, not when the request would have finished:
            # the running generation is cut off with the server's Ray, not waited for.
            assert server.process.wait(timeout=120) == 0, server.output()
            assert "still in flight: they are cut off" in server.output()
            assert "did not finish within" not in server.output()  # no need for the watchdog
            assert not any(_alive(pid) for pid in ray_processes), "the server's Ray went with it"
            try:
                answered = slow.result().status_code == 200
            except requests.RequestException:
                answered = False
            assert not answered, "the request outlived the grace period, so the server did not stop at it"
    finally:
        server.stop()


def test_listening_beyond_loopback_without_keys_is_refused_before_ray_starts(tmp_path):
    (tmp_path / "serve.yaml").write_text(
        yaml.safe_dump({"input": {"url": "unused.jsonl"}, "model": {"ref": "tiny"}, "serve": {"host": "0.0.0.0", "port": free_port()}})
    )
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "serve", str(tmp_path / "serve.yaml")],
        cwd=REPO, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2, result.stderr
    assert "serve.allow_unauthenticated: true" in result.stderr and "serve.api_keys_file" in result.stderr
    assert "Traceback" not in result.stderr and "Started a local Ray" not in result.stderr
