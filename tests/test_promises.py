"""What the README promises about a whole run, each run for real: the default
``runtime.batch_size: auto``, a broken default model stopping the job with one message,
parts written atomically under names that make a retried write idempotent, and the row
total read from Parquet footers alone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.errors import StorageError
from pipeline.spec import schema as S
from pipeline.storage import filesystem, part_files, record_format

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_the_default_batch_size_auto_end_to_end(ray_cluster, make_spec, tmp_path):
    from pipeline.batch.run import run
    from pipeline.output.verify import verify
    from pipeline.spec.bucketing import block_rows
    from pipeline.spec.config import RuntimeConfig

    pd.DataFrame({"prompt": [f"a kite number {i}" for i in range(10)]}).to_csv(tmp_path / "p.csv", index=False)
    spec = make_spec({"url": str(tmp_path / "p.csv")}, runtime={"batch_size": "auto"}, defaults={"width": 16, "height": 16, "steps": 1})
    assert RuntimeConfig().batch_size == "auto"  # what a spec that says nothing gets
    summary = run(spec)
    assert (summary.images, summary.errors) == (10, 0)
    assert summary.block_rows == block_rows("auto", 10, 1) and summary.block_rows >= 10  # a small table: one block per actor
    report = verify(spec.output.url, spec=spec)
    assert report.ok, report.format()


@pytest.mark.timeout(400)
def test_a_broken_default_model_stops_the_job_with_one_message(model_cache, tmp_path):
    from pipeline.engine.tiny_models import ensure_tiny

    model = tmp_path / "model"
    shutil.copytree(ensure_tiny(model_cache), model)
    weights = next((model / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut short
    (tmp_path / "p.csv").write_text("prompt\na cat\na dog\n")
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({
        "input": {"url": str(tmp_path / "p.csv")},
        "model": {"ref": str(model), "cache_dir": model_cache},
        "defaults": {"width": 32, "height": 32, "steps": 2},
        "output": {"url": str(tmp_path / "out")},
        "runtime": {"num_actors": 1, "cpus_per_actor": 0.5, "task_cpus": 0.5},
    }))  # fmt: skip
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray-", dir="/tmp")}
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(spec)], cwd=REPO, env=env, capture_output=True, text=True, timeout=360)
    assert done.returncode == 2, done.stderr[-3000:]
    # Ray may still forward the actor's own log lines after ours: find our message, once.
    ours = [line for line in done.stderr.splitlines() if line.startswith("imagegen: error:")]
    assert len(ours) == 1, done.stderr[-3000:]
    assert ours[0].startswith(f"imagegen: error: the default model '{model}' cannot be loaded on the engine actors: OSError: Unable to load weights")
    assert "check model.ref" in ours[0]
    assert not (tmp_path / "out" / "images").exists()
    manifests = [json.loads(p.read_text()) for p in (tmp_path / "out" / "_runs").glob("*.json")]
    assert all(m.get("status") != "complete" for m in manifests)  # a run that started, nothing committed


def _images_table(n: int) -> pa.Table:
    rows = [{S.REQUEST_ID: f"{i:032x}", S.ID: f"t.csv#{i}", S.PROMPT: f"p{i}"} for i in range(n)]
    return pa.Table.from_pylist(rows)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_retried_part_write_rewrites_the_same_file(where, tmp_path, request):
    if where == "s3":
        fs, bucket, _ = request.getfixturevalue("s3")
        root = f"{bucket}/out"
    else:
        fs, root = filesystem.open_url(str(tmp_path / "out"))
    table = _images_table(5)
    first = part_files.write_part(fs, root, record_format.IMAGES_DIR, "run-1", table)
    again = part_files.write_part(fs, root, record_format.IMAGES_DIR, "run-1", table)  # what a task Ray retried does
    assert (first.path, first.bytes, first.sha256) == (again.path, again.bytes, again.sha256)
    assert first.path.startswith("images/part-run-1-")
    names = [p.rsplit("/", 1)[-1] for p in fs.find(filesystem.join(root, record_format.IMAGES_DIR))]
    assert names == [first.path.split("/")[-1]], "one file, no temporary left beside it"
    with fs.open(filesystem.join(root, first.path), "rb") as f:
        assert pq.read_table(f).equals(table)
    # Other request ids make another part.
    other = part_files.write_part(fs, root, record_format.IMAGES_DIR, "run-1", _images_table(6))
    assert other.path != first.path


def test_an_atomic_write_that_fails_leaves_nothing(tmp_path):
    fs, root = filesystem.open_url(str(tmp_path))
    (tmp_path / "images").mkdir()
    target = filesystem.join(root, "images", "part-x.parquet")
    os.mkdir(target)  # the rename onto it fails after the data is written
    with pytest.raises(StorageError, match="part-x.parquet"):
        filesystem.atomic_write(fs, target, b"data")
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["part-x.parquet"], "no temporary left"


def test_the_row_total_comes_from_parquet_footers_only(tmp_path):
    from pipeline.spec.config import InputConfig
    from pipeline.storage import tables

    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": [f"prompt number {i}" for i in range(1000)]}), path, compression="none")
    data = bytearray(path.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little") + 8
    middle = len(data) // 2
    assert middle < len(data) - footer
    data[100:middle] = b"\xff" * (middle - 100)  # the data pages ruined, the footer intact
    path.write_bytes(bytes(data))
    with pytest.raises(OSError, match="Invalid"):
        pq.read_table(path)  # reading the rows fails...
    assert tables.count_rows(InputConfig(url=str(path))) == 1000  # ...counting them does not
