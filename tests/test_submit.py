"""`imagegen submit`, `status` and `logs` against a real Ray cluster started with `ray start`.

The module's cluster is two `ray start --block` processes, each in a session of its own:
a head (2 CPUs, dashboard on 127.0.0.1, token authentication on, as Ray 2.60 turns it on
for a head when a token exists) and a worker node with one logical GPU, so the engine
actor (`gpus_per_actor: 1`, `device: cpu`) must land on the worker while the job's driver
runs on the head. Teardown ends exactly those sessions' processes by pid: `ray stop`
would kill every Ray on the machine, other people's test clusters included.

Waits are polls with a deadline, never bare sleeps.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from pipeline.cli import _parser
from pipeline.remote import dashboard, submit
from pipeline.errors import ClusterError, SpecError
from pipeline.spec.load import load_spec, parse_spec

from polling import free_port, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
ROWS = 16


@dataclass
class LocalCluster:
    address: str  # the dashboard URL
    env: dict[str, str]  # what a client needs: the venv first on PATH, the cluster's token
    worker_node_id: str  # the one node with a (logical) GPU


def _api(cluster_address: str, token: str, path: str) -> object:
    request = urllib.request.Request(f"{cluster_address}{path}", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=5) as answer:
        return json.loads(answer.read())


def _alive_nodes(address: str, token: str) -> list[dict]:
    try:
        data = _api(address, token, "/api/v0/nodes?limit=100")
    except OSError:
        return []
    return [n for n in data["data"]["result"]["result"] if n["state"] == "ALIVE"]


def _process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, session id, state) of every process, from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # ended meanwhile
            continue
        # The command name may hold spaces and parentheses: the fields follow the last ')'.
        state, ppid, _pgrp, sid = stat.rsplit(")", 1)[1].split()[:4]
        table[int(entry)] = (int(ppid), int(sid), state)
    return table


def _session_processes(sessions: set[int]) -> list[int]:
    """Live processes in `sessions` (those `ray start` made) and all their descendants,
    which include job drivers: Ray starts those in sessions of their own."""
    table = _process_table()
    ours = {pid for pid, (_, sid, _) in table.items() if sid in sessions}
    grew = True
    while grew:
        children = {pid for pid, (ppid, _, _) in table.items() if ppid in ours} - ours
        ours |= children
        grew = bool(children)
    return sorted(pid for pid in ours if table[pid][2] != "Z")


def _stop_cluster(starters: list[subprocess.Popen]) -> None:
    """End the cluster's processes by pid: `ray start --block` first (it stops what it
    started), then, past a grace period, SIGKILL whatever of its sessions is left."""
    sessions = {p.pid for p in starters}
    for starter in starters:
        if starter.poll() is None:
            starter.send_signal(signal.SIGTERM)
    try:
        wait_for(lambda: not _session_processes(sessions), 20, "a graceful stop")
    except AssertionError:
        for pid in _session_processes(sessions):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for starter in starters:
        starter.wait(timeout=10)
    wait_for(lambda: not _session_processes(sessions), 20, "the cluster's processes to end", lambda: f"left: {_session_processes(sessions)}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    token = secrets.token_hex(32)
    # Short: Ray's socket paths must stay under 107 characters.
    temp_dir = tempfile.mkdtemp(prefix="rs-", dir="/tmp")
    logs = tmp_path_factory.mktemp("ray-start")
    env = {
        **os.environ,
        # `python` in a job's entrypoint is whatever the cluster's PATH finds first.
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        # On SIGTERM a node first drains (for Serve) for up to 30 s, held up by the
        # detached actors Ray Data leaves on the head; this cluster has nothing to drain.
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    }
    env.pop("RAY_ADDRESS", None)
    gcs_port, dashboard_port = free_port(), free_port()
    address = f"http://127.0.0.1:{dashboard_port}"
    common = ["--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats", "--object-store-memory=200000000"]
    head_args = [
        "--head", f"--port={gcs_port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
        "--num-cpus=2", "--num-gpus=0", f"--temp-dir={temp_dir}",
        f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
    ]
    worker_args = [f"--address=127.0.0.1:{gcs_port}", "--num-cpus=1", "--num-gpus=1", f"--dashboard-agent-listen-port={free_port()}"]
    starters: list[subprocess.Popen] = []

    def start(name: str, args: list[str]) -> subprocess.Popen:
        with open(logs / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                [str(VENV_BIN / "ray"), "start", *common, *args], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        starters.append(proc)
        return proc

    def explain() -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logs.iterdir()))

    try:
        head = start("head", head_args)

        def head_up() -> bool:
            assert head.poll() is None, f"ray start --head exited with {head.returncode}. {explain()}"
            return bool(_alive_nodes(address, token))

        wait_for(head_up, 90, "the head node", explain)
        start("worker", worker_args)
        nodes = wait_for(lambda: len(_alive_nodes(address, token)) == 2 and _alive_nodes(address, token), 90, "the worker node", explain)
        (worker,) = [n for n in nodes if not n["is_head_node"]]
        yield LocalCluster(address=address, env=env, worker_node_id=worker["node_id"])
    finally:
        _stop_cluster(starters)
        shutil.rmtree(temp_dir, ignore_errors=True)


def imagegen(*args: str, env: dict[str, str], timeout: float = 200) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VENV_BIN / "imagegen"), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def _prompt_table(prompts: Path, path: Path) -> str:
    lines = (prompts / "partiprompts" / "PartiPrompts.tsv").read_text().splitlines()
    path.write_text("\n".join(lines[: ROWS + 1]) + "\n")
    return str(path)


def _job_overrides(table: str, output: Path, model_cache: str) -> list[str]:
    settings = {
        "input.url": table,
        "output.url": str(output),
        "model.cache_dir": model_cache,
        "model.device": "cpu",  # a CPU engine on the worker's logical GPU
        "defaults.width": 16,
        "defaults.height": 16,
        "defaults.steps": 1,
        "runtime.num_actors": 1,
        "runtime.gpus_per_actor": 1,
        "runtime.cpus_per_actor": 0.5,
        "runtime.task_cpus": 0.25,
        "runtime.batch_size": 8,
    }
    return [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]


# -- against the cluster --------------------------------------------------------------------


def test_submit_runs_the_job_on_the_cluster_and_status_and_logs_report_it(cluster, prompts, model_cache, tmp_path):
    table = _prompt_table(prompts, tmp_path / "parti-16.tsv")
    out = tmp_path / "out"
    result = imagegen("submit", "jobs/demo.yaml", "--address", cluster.address, *_job_overrides(table, out, model_cache), env=cluster.env)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    job_id = result.stdout.splitlines()[0]
    assert re.fullmatch(r"raysubmit_\w+", job_id), result.stdout[:500]
    assert f"images out   {ROWS}" in result.stdout  # the driver's summary, streamed back
    assert f"job {job_id} SUCCEEDED" in result.stderr

    images = pd.read_parquet(out / "images")
    assert len(images) == ROWS and images["request_id"].is_unique
    assert set(images["width"]) == {16} and set(images["steps"]) == {1}
    # The one engine actor needed the one (logical) GPU: it ran on the worker node.
    assert set(images["node_id"]) == {cluster.worker_node_id}
    (manifest,) = (out / "_runs").iterdir()
    counts = json.loads(manifest.read_text())["counts"]
    assert (counts["input_rows"], counts["images"], counts["errors"]) == (ROWS, ROWS, 0)

    status = imagegen("status", job_id, "--address", cluster.address, env=cluster.env, timeout=60)
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines()[0] == f"{job_id} SUCCEEDED"
    assert "python jobs/generate.py jobs/demo.yaml --set" in status.stdout

    for follow in ([], ["--follow"]):
        logs = imagegen("logs", job_id, "--address", cluster.address, *follow, env=cluster.env, timeout=60)
        assert logs.returncode == 0, logs.stderr
        assert f"images out   {ROWS}" in logs.stdout and str(out) in logs.stdout


def test_a_failing_job_fails_submit_and_status(cluster, model_cache, tmp_path):
    missing = tmp_path / "missing.tsv"  # the spec is valid; only the cluster finds no table
    result = imagegen(
        "submit", "jobs/demo.yaml", "--address", cluster.address, *_job_overrides(str(missing), tmp_path / "out", model_cache), env=cluster.env
    )
    assert result.returncode == 1, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    job_id = result.stdout.splitlines()[0]
    assert "does not exist" in result.stdout  # the driver's own message, streamed back
    assert f"job {job_id} FAILED" in result.stderr
    status = imagegen("status", job_id, "--address", cluster.address, env=cluster.env, timeout=60)
    assert status.returncode == 1 and status.stdout.startswith(f"{job_id} FAILED"), status.stdout + status.stderr
    assert "exit code    2" in status.stdout

    # --no-wait: the id alone on stdout, at once; `logs --follow` then follows the job to its end.
    detached = imagegen(
        "submit", "jobs/demo.yaml", "--address", cluster.address, "--no-wait",
        *_job_overrides(str(missing), tmp_path / "out", model_cache), env=cluster.env,
    )
    assert detached.returncode == 0, detached.stderr
    (job_id,) = detached.stdout.split()
    followed = imagegen("logs", job_id, "--address", cluster.address, "--follow", env=cluster.env, timeout=120)
    assert followed.returncode == 0 and "does not exist" in followed.stdout, followed.stdout + followed.stderr
    final = imagegen("status", job_id, "--address", cluster.address, env=cluster.env, timeout=60)
    assert final.stdout.startswith(f"{job_id} FAILED"), final.stdout


def test_no_job_wait_unknown_job_and_missing_token_are_clear(cluster, model_cache, tmp_path):
    unknown = imagegen("status", "raysubmit_nosuchjob", "--address", cluster.address, env=cluster.env, timeout=60)
    assert unknown.returncode == 2 and "there is no job 'raysubmit_nosuchjob'" in unknown.stderr, unknown.stderr
    assert "Traceback" not in unknown.stderr

    # Ray's client sends a token only with RAY_AUTH_MODE=token, whatever ~/.ray holds.
    without_token = {k: v for k, v in cluster.env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    refused = imagegen("status", "raysubmit_x", "--address", cluster.address, env=without_token, timeout=60)
    assert refused.returncode == 2 and "RAY_AUTH_MODE=token" in refused.stderr and "Traceback" not in refused.stderr, refused.stderr


# -- no cluster needed ----------------------------------------------------------------------


def test_bad_addresses_fail_within_seconds_with_one_message(tmp_path):
    env = {**os.environ}
    env.pop("RAY_ADDRESS", None)

    class NotRay(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the handler's API
            self.send_error(404)

        def log_message(self, *args):
            pass

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotRay)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    attempts: list[socket.socket] = []  # held open, never answered: one per connection the client made

    def accept_and_hold() -> None:
        while True:
            try:
                attempts.append(silent.accept()[0])
            except OSError:  # closed at the end of the test
                return

    threading.Thread(target=accept_and_hold, daemon=True).start()
    closed = free_port()
    cases = {
        f"http://127.0.0.1:{closed}": "cannot reach the Ray dashboard",
        f"http://127.0.0.1:{web.server_address[1]}": "answered HTTP 404",
        f"http://127.0.0.1:{silent.getsockname()[1]}": f"no answer within {dashboard.PROBE_TIMEOUT_S:g} s",
        "ray://127.0.0.1:10001": "is not a Ray dashboard URL",
        "127.0.0.1:6379": "is not a Ray dashboard URL",
    }
    try:
        for address, message in cases.items():
            # Each message is the probe's own (timeout, refusal, wrong answer): the command
            # gave up at its first answer rather than in a client's retry loop.
            result = imagegen("status", "raysubmit_x", "--address", address, env=env, timeout=60)
            assert result.returncode == 2 and message in result.stderr, (address, result.stderr)
            assert "Traceback" not in result.stderr
        assert len(attempts) == 1, f"the silent dashboard was tried {len(attempts)} times: the probe must not retry"
        result = imagegen("submit", "jobs/demo.yaml", env=env, timeout=60)
        assert result.returncode == 2 and "pass --address http://HEAD:8265" in result.stderr, result.stderr
    finally:
        web.shutdown()
        silent.close()


def test_job_request_carries_the_repository_and_a_spec_under_it(tmp_path):
    request = submit.job_request(REPO / "jobs" / "demo.yaml", ["output.url=s3://bucket/run 1", "runtime.num_actors=4"])
    assert request.runtime_env == {"working_dir": str(REPO)}
    assert request.arguments == [
        "python", "jobs/generate.py", "jobs/demo.yaml", "--set", "output.url=s3://bucket/run 1", "--set", "runtime.num_actors=4",
    ]
    # The entrypoint's arguments are `imagegen run`'s, and name a spec that loads.
    script = REPO / request.arguments[1]
    namespace = _parser().parse_args(["run", *request.arguments[2:]])
    assert script.is_file() and namespace.overrides == ["output.url=s3://bucket/run 1", "runtime.num_actors=4"]
    assert load_spec(REPO / namespace.spec, namespace.overrides).runtime.num_actors == 4

    outside = tmp_path / "spec.yaml"
    shutil.copy(REPO / "jobs" / "demo.yaml", outside)
    with pytest.raises(SpecError, match="is outside .* Copy it under"):
        submit.job_request(outside, [])


def test_dashboard_address_comes_from_the_flag_or_an_http_runtime_address():
    spec = parse_spec({"input": {"url": "x.csv"}, "runtime": {"address": "http://head:8265/"}})
    assert dashboard.dashboard_address(None, spec) == "http://head:8265"
    assert dashboard.dashboard_address("https://ray.example.com/", spec) == "https://ray.example.com"
    for address in ("auto", "ray://head:10001", None):
        other = parse_spec({"input": {"url": "x.csv"}, "runtime": {"address": address}})
        with pytest.raises(ClusterError, match="pass --address http://HEAD:8265"):
            dashboard.dashboard_address(None, other)
