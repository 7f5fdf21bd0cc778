"""Shared fixtures: one local Ray per test session, the tiny model cached once, an S3
server on 127.0.0.1, and a helper to build job specs."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

from polling import free_port

REPO = Path(__file__).resolve().parent.parent
PROMPTS = REPO / "tests" / "data" / "prompts"


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> str:
    """A model cache folder with the tiny model already built in it."""
    from pipeline.engine.tiny_models import ensure_tiny

    cache = str(tmp_path_factory.mktemp("model-cache"))
    ensure_tiny(cache)
    return cache


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session: its cold start is the slowest thing here."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    # Short and private: Ray's socket paths must stay under 107 characters.
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray.init(num_cpus=2, _temp_dir=temp_dir, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def make_spec(model_cache, tmp_path):
    """Build a valid JobSpec from a few fields; the rest are fast test defaults."""
    from pipeline.spec.load import parse_spec

    def build(input: dict[str, Any], **sections: dict[str, Any]):
        data: dict[str, Any] = {
            "input": input,
            "model": {"ref": "tiny", "cache_dir": model_cache},
            "defaults": {"width": 32, "height": 32, "steps": 2, "seed": 7},
            "output": {"url": str(tmp_path / "out")},
            "runtime": {"num_actors": 1, "cpus_per_actor": 0.5, "task_cpus": 0.5, "batch_size": 4},
        }
        if "models" in sections:  # several models replace the one
            data.pop("model")
        for name, values in sections.items():
            data[name] = {**data.get(name, {}), **values}
        return parse_spec(data)

    return build


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1, spoken to over real HTTP by s3fs."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server):
    """A fresh bucket and the storage options that reach it."""
    import uuid

    import s3fs

    options = {"key": "testing", "secret": "testing", "endpoint_url": s3_server}
    fs = s3fs.S3FileSystem(**options)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)  # no region: moto refuses us-east-1 as a location constraint
    return fs, bucket, options


@pytest.fixture(scope="session")
def prompts() -> Path:
    """The real public prompt tables copied into tests/data/prompts (each with its SOURCE.txt)."""
    if not PROMPTS.is_dir():
        pytest.fail(f"the prompt tables are missing at {PROMPTS}")
    return PROMPTS


@pytest.fixture
def wait_for():
    """The suite's one poller (tests/polling.py), for tests that take it as a fixture."""
    from polling import wait_for

    return wait_for


def pytest_collection_modifyitems(config, items):
    """The `gpu` marker's promise: a test that needs a CUDA GPU is skipped, saying so, on a
    machine without one (torch is imported only when such a test is collected)."""
    needing = [item for item in items if item.get_closest_marker("gpu")]
    if not needing:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marker gpu); this machine has none")
    for item in needing:
        item.add_marker(skip)
