"""The mistakes a new user makes first, through the real `imagegen` command: each ends with
exit code 2 and one message saying what happened and what to do, never a traceback.

Already covered elsewhere, not repeated here: a missing prompt table and a bad field value
(tests/test_job.py), unknown fields, bad YAML and a missing spec file at the library level
(tests/test_config.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

IMAGEGEN = str(Path(sys.executable).with_name("imagegen"))

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def job(tmp_path, model_cache) -> Path:
    """A valid spec over a two-row CSV, writing into tmp_path/out."""
    (tmp_path / "prompts.csv").write_text("text,seed\na red kite,1\na blue boat,2\n")
    spec = tmp_path / "job.yaml"
    spec.write_text(
        f"input:\n  url: {tmp_path}/prompts.csv\n  prompt_column: text\n"
        f"model:\n  ref: tiny\n  cache_dir: {model_cache}\n"
        "defaults: {width: 16, height: 16, steps: 1}\n"
        f"output:\n  url: {tmp_path}/out\n"
        "runtime: {num_actors: 1, cpus_per_actor: 0.5, task_cpus: 0.5}\n"
    )
    return spec


def imagegen(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in (os.environ if env is None else env).items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    return subprocess.run([IMAGEGEN, *args], env=env, capture_output=True, text=True, timeout=150)


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr[-3000:]


def test_wrong_prompt_column(job, tmp_path):
    result = imagegen("run", str(job), "--set", "input.prompt_column=prompt")
    assert_user_error(
        result,
        "imagegen: error: input.prompt_column is 'prompt', but",
        "has no such column; its columns are ['text', 'seed']. Set input.prompt_column to one of them.",
    )
    assert not (tmp_path / "out").exists()


def test_bad_yaml(tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text("input:\n  url: prompts.csv\n   prompt_column: text\n")
    result = imagegen("run", str(spec))
    assert_user_error(result, f"imagegen: error: job spec '{spec}' is not valid YAML at line 3, column")


def test_unknown_model_ref(job, tmp_path):
    result = imagegen("run", str(job), "--set", f"model.ref={tmp_path}/no-such-model")
    assert_user_error(
        result,
        f"imagegen: error: model.ref '{tmp_path}/no-such-model' is not a tiny model (tiny, tiny-sdxl, tiny-sd3, tiny-flux), an existing local folder, "
        "an s3:// prefix, or a hub id like 'org/name'; check the path",
    )


@pytest.mark.ray
def test_gpu_asked_on_a_cluster_without_gpus(job, tmp_path, ray_cluster):
    if ray_cluster.cluster_resources().get("GPU", 0) > 0:
        pytest.skip("this machine has a GPU, so a local cluster does too")
    result = imagegen("run", str(job), "--set", "model.device=cuda")
    assert_user_error(
        result,
        "each engine actor needs 1 GPU(s) (model.device is cuda), but the Ray cluster has 0 GPU(s), so the job would wait forever.",
        "set model.device: cpu (or auto) and leave runtime.gpus_per_actor unset",
    )
    assert not (tmp_path / "out").exists(), "a job that cannot run must not touch its output"


def test_ray_address_where_nothing_listens(job, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        # The probe's message, not Ray's: the run never entered ray.init's minutes of retries.
        result = imagegen("run", str(job), "--set", f"runtime.address={address}")
        assert_user_error(
            result,
            f"imagegen: error: cannot reach Ray at {address}: Connection refused (nothing answers on port {port} of 127.0.0.1).",
            "Start a cluster with `ray start --head` and set runtime.address to the address it prints, or unset runtime.address",
        )
    assert not (tmp_path / "out").exists()


def test_dashboard_url_given_to_run(job, tmp_path):
    result = imagegen("run", str(job), "--set", "runtime.address=http://127.0.0.1:8265")
    assert_user_error(
        result,
        "runtime.address 'http://127.0.0.1:8265' is a dashboard URL, which only `imagegen submit` uses.",
        "imagegen submit SPEC --address URL",
    )
    assert not (tmp_path / "out").exists()


def test_s3_without_credentials(job, tmp_path, s3):
    fs, bucket, options = s3
    fs.pipe(f"{bucket}/prompts.csv", b"prompt\na red kite\n")
    # No credentials anywhere botocore looks (and no instance-metadata lookup).
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_EC2_METADATA_DISABLED="true")
    endpoint = options["endpoint_url"]
    for command in ("validate", "run"):
        result = imagegen(command, str(job), "--set", f"input.url=s3://{bucket}/prompts.csv", "--set", f"input.storage_options.endpoint_url={endpoint}", env=env)
        assert_user_error(result, f"cannot read 's3://{bucket}/prompts.csv': no S3 credentials were found", "storage_options")
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_not_what_its_name_says(job, tmp_path):
    (tmp_path / "mac.csv").write_bytes(b"text,seed\ra red kite,1\ra blue boat,2\r")  # classic Mac OS line ends
    (tmp_path / "photo.csv").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    for command, name, fragment in [
        ("validate", "mac.csv", "its lines end in CR alone (classic Mac OS line ends); save it with LF or CRLF line ends"),
        ("run", "mac.csv", "its lines end in CR alone"),
        ("validate", "photo.csv", "not a text file: it holds NUL bytes (binary data?)"),
    ]:
        result = imagegen(command, str(job), "--set", f"input.url={tmp_path}/{name}")
        assert_user_error(result, f"imagegen: error: {tmp_path}/{name}", fragment)
    assert not (tmp_path / "out").exists()
