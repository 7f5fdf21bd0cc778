"""A hub model's revision is resolved to its commit when the job starts: the fingerprint
(and so every request id) names the commit, the engine loads that commit, the manifest
records both. Offline, as in CI: a local huggingface_hub cache built the way
huggingface_hub lays it out (``models--org--name/refs/main`` -> a commit, whose files are
in ``snapshots/<commit>/``), and ``HF_HUB_OFFLINE=1`` for the processes that read it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
COMMIT_1, COMMIT_2 = "1" * 40, "2" * 40


def hub_cache(root: Path, model_folder: str, main: str) -> Path:
    """A hub cache holding org/tiny at COMMIT_1 and COMMIT_2, with ``main`` pointing at ``main``."""
    repo = root / "models--org--tiny"
    for commit in (COMMIT_1, COMMIT_2):
        if not (repo / "snapshots" / commit).exists():
            shutil.copytree(model_folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(main)
    return root


def run_cli(args: list[str], cache: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    # Ray's socket paths must stay under 107 characters: a short private folder in /tmp.
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray-", dir="/tmp")}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)


def test_hub_commit_comes_from_the_cache_offline_and_moves_with_main(model_cache, tmp_path):
    from pipeline.engine.tiny_models import ensure_tiny

    cache = hub_cache(tmp_path / "hub", ensure_tiny(model_cache), main=COMMIT_1)
    script = (
        "from pipeline.engine.resolve_catalog import build_catalog; from pipeline.spec.load import parse_spec; import json;"
        "e = build_catalog(parse_spec({'input': {'url': 'x.csv'}, 'model': {'ref': 'org/tiny'}})).models['org/tiny'];"
        "print(json.dumps([e.commit, e.fingerprint, e.family.name]))"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}

    def resolved():
        done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    commit, first, family = resolved()
    assert (commit, family) == (COMMIT_1, "sd") and first.startswith("hub-")
    hub_cache(cache, "", main=COMMIT_2)  # main moved
    commit, second, _ = resolved()
    assert commit == COMMIT_2 and second != first


def test_a_hub_revision_nothing_can_resolve_is_one_message(tmp_path):
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"}
    spec = tmp_path / "job.yaml"
    (tmp_path / "p.csv").write_text("prompt\na cat\n")
    spec.write_text(yaml.safe_dump({"input": {"url": str(tmp_path / "p.csv")}, "model": {"ref": "org/absent", "family": "sd"}}))
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "validate", str(spec)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "cannot resolve revision 'main' of hub model 'org/absent'" in done.stderr and "40-digit commit hash" in done.stderr


@pytest.mark.timeout(600)
def test_a_run_loads_the_resolved_commit_and_a_moved_main_makes_new_images(model_cache, tmp_path):
    from pipeline.engine.tiny_models import ensure_tiny

    cache = hub_cache(tmp_path / "hub", ensure_tiny(model_cache), main=COMMIT_1)
    pd.DataFrame({"prompt": ["a kite", "a boat"]}).to_csv(tmp_path / "p.csv", index=False)
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({
        "input": {"url": str(tmp_path / "p.csv")},
        "model": {"ref": "org/tiny", "cache_dir": model_cache},
        "defaults": {"width": 32, "height": 32, "steps": 2},
        "output": {"url": str(tmp_path / "out")},
        "runtime": {"num_actors": 1, "cpus_per_actor": 0.5, "task_cpus": 0.5},
    }))  # fmt: skip
    first = run_cli(["run", str(spec)], cache, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    (manifest,) = [json.loads(p.read_text()) for p in (tmp_path / "out" / "_runs").iterdir()]
    model = manifest["models"]["org/tiny"]
    assert (model["revision"], model["commit"], model["dtype"], model["device"]) == ("main", COMMIT_1, "float32", "cpu")

    hub_cache(cache, "", main=COMMIT_2)  # new weights pushed to main
    second = run_cli(["run", str(spec)], cache, tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    images = pd.read_parquet(tmp_path / "out" / "images")
    # Each commit has its own images: nothing of the first is reused under the moved branch.
    assert len(images) == 4 and images["model_fingerprint"].nunique() == 2 and images["request_id"].is_unique
    assert set(images["dtype"]) == {"float32"} and set(images["device"]) == {"cpu"}
