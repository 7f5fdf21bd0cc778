"""The batch job end to end on a local Ray cluster, the tiny model, real files and S3."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.engine.image_encoding import sha256_hex
from pipeline.errors import ImagegenError, InputError, StorageError
from pipeline.batch.run import run
from pipeline.batch.summary import format_summary
from pipeline.spec.load import load_spec

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]
REPO = Path(__file__).resolve().parent.parent


def images_of(output: str | Path) -> pd.DataFrame:
    return pd.read_parquet(Path(output) / "images")


def errors_of(output: str | Path) -> pd.DataFrame:
    folder = Path(output) / "errors"
    return pd.read_parquet(folder) if folder.is_dir() else pd.DataFrame(columns=["request_id"])


def write_csv(path: Path, rows: list[dict]) -> str:
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


def parti_rows(prompts: Path, n: int) -> list[dict]:
    lines = (prompts / "partiprompts" / "PartiPrompts.tsv").read_text().splitlines()[1 : n + 1]
    return [{"prompt": line.split("\t")[0]} for line in lines]


def test_demo_spec_end_to_end(ray_cluster, model_cache, tmp_path):
    out = tmp_path / "demo"
    spec = load_spec(REPO / "jobs" / "demo.yaml", [f"output.url={out}", f"model.cache_dir={model_cache}"])
    summary = run(spec)

    assert (summary.input_rows, summary.images, summary.errors) == (64, 64, 0)
    df = images_of(out)
    assert len(df) == 64 and df["request_id"].is_unique
    assert df["actor_id"].nunique() == 2, "both engine actors should have received work"
    # Start-up (cluster, both actors' model loads) is within the run and before its end.
    assert 0 < summary.startup_seconds < summary.wall_seconds
    assert set(df["Category"]) >= {"Abstract", "Animals"}  # pass-through columns kept
    for _, row in df.head(3).iterrows():
        assert sha256_hex(row["image"]["bytes"]) == row["sha256"]
        assert Image.open(io.BytesIO(row["image"]["bytes"])).size == (64, 64)

    manifest = json.loads((out / "_runs" / f"{summary.run_id}.json").read_text())
    assert manifest["counts"] == {
        "input_rows": 64, "images": 64, "errors": 0, "errors_by_stage": {}, "model_loads": 2, "model_swaps": 0,
        "compile_seconds": 0.0, "compiles": 0, "compiles_from_cache": 0,  # compile: auto is off on CPU
    }  # fmt: skip
    # How the images were made: the engine options as resolved for the device.
    assert manifest["models"]["tiny"]["engine"]["compile"] is False and manifest["models"]["tiny"]["engine"]["channels_last"] is False
    listed = {p["path"] for p in manifest["parts"]}
    assert listed == {f"images/{p.name}" for p in (out / "images").iterdir()}
    assert manifest["versions"]["ray"].startswith("2.60")

    # The dataset opens directly in the readers users reach for.
    assert pads.dataset(out / "images", format="parquet").count_rows() == 64
    import datasets
    import duckdb

    loaded = datasets.load_dataset("parquet", data_dir=str(out / "images"), split="train")
    assert loaded[0]["image"].size == (64, 64)
    assert duckdb.sql(f"select count(distinct request_id) from '{out}/images/*.parquet'").fetchall() == [(64,)]


def test_same_spec_same_images_other_seed_other_images(ray_cluster, make_spec, prompts, tmp_path):
    table = write_csv(tmp_path / "p.csv", parti_rows(prompts, 10))
    first = make_spec({"url": table}, output={"url": str(tmp_path / "a")})
    run(first)
    run(first.model_copy(update={"output": first.output.model_copy(update={"url": str(tmp_path / "b")})}))
    reseeded = make_spec({"url": table}, output={"url": str(tmp_path / "c")}, defaults={"seed": 8})
    run(reseeded)

    a, b, c = (images_of(tmp_path / name).set_index("request_id").sort_index() for name in "abc")
    assert list(a.index) == list(b.index)
    assert list(a["sha256"]) == list(b["sha256"]), "same spec twice must give identical pixels"
    assert not set(a.index) & set(c.index)
    assert not set(a["sha256"]) & set(c["sha256"])


def test_mixed_per_row_sizes_and_steps(ray_cluster, make_spec, tmp_path):
    rows = [
        {"prompt": "a red cube", "width": 32, "height": 48, "steps": 2},
        {"prompt": "a blue ball", "width": 64, "height": 32, "steps": 3},
        {"prompt": "a green tree", "width": "", "height": "", "steps": ""},  # defaults
        {"prompt": "a cat", "width": 48, "height": 48, "steps": 1, "num_images": 2},
    ]
    spec = make_spec({"url": write_csv(tmp_path / "mixed.csv", rows)})
    summary = run(spec)
    assert (summary.input_rows, summary.images, summary.errors) == (4, 5, 0)
    df = images_of(spec.output.url).sort_values(["row_index", "image_index"])
    sizes = [Image.open(io.BytesIO(b["bytes"])).size for b in df["image"]]
    assert sizes == [(32, 48), (64, 32), (32, 32), (48, 48), (48, 48)]
    assert list(df["steps"]) == [2, 3, 2, 1, 1]
    assert list(df["width"]) == [w for w, _ in sizes] and list(df["height"]) == [h for _, h in sizes]
    cat = df[df["prompt"] == "a cat"]
    assert list(cat["seed"].diff().dropna()) == [1]


def test_bad_rows_become_error_rows_and_the_rest_is_generated(ray_cluster, make_spec, tmp_path):
    rows = [
        {"id": "ok-1", "prompt": "a castle", "seed": "3", "steps": ""},
        {"id": "bad-seed", "prompt": "a castle", "seed": "abc", "steps": ""},
        {"id": "empty", "prompt": "   ", "seed": "", "steps": ""},
        {"id": "steps", "prompt": "a castle", "seed": "", "steps": "2.5"},
        {"id": "ok-2", "prompt": "a tower", "seed": "", "steps": "1"},
    ]
    spec = make_spec({"url": write_csv(tmp_path / "bad.csv", rows), "id_column": "id"})
    summary = run(spec)
    assert (summary.input_rows, summary.images, summary.errors) == (5, 2, 3)
    assert summary.errors_by_stage == {"validate": 3}
    images, errors = images_of(spec.output.url), errors_of(spec.output.url)
    assert set(images["id"]) == {"ok-1", "ok-2"}
    reasons = dict(zip(errors["id"], errors["error_message"]))
    assert reasons["bad-seed"] == "seed must be a whole number, got 'abc'"
    assert reasons["empty"] == "prompt is empty"
    assert reasons["steps"] == "steps must be a whole number, got '2.5'"
    assert json.loads(errors.set_index("id").loc["bad-seed", "raw"])["seed"] == "abc"


def test_rerun_resumes_and_grown_table_adds_only_new_rows(ray_cluster, make_spec, prompts, tmp_path):
    table = tmp_path / "grow.csv"
    write_csv(table, parti_rows(prompts, 6))
    spec = make_spec({"url": str(table)})
    assert run(spec).images == 6
    again = run(spec)
    assert (again.images, again.errors) == (0, 0)
    # A rerun that makes nothing still read every row: it says so, not "rows in 0".
    assert (again.input_rows, again.skipped) == (0, 6)
    assert "rows in      6  (0 made this run, 6 already in the output)" in format_summary(again)
    write_csv(table, parti_rows(prompts, 9))
    grown = run(spec)
    assert grown.images == 3
    df = images_of(spec.output.url)
    assert len(df) == 9 and df["request_id"].is_unique
    assert len(list((Path(spec.output.url) / "_runs").iterdir())) == 3

    strict = spec.model_copy(update={"output": spec.output.model_copy(update={"mode": "error_if_exists"})})
    with pytest.raises(ImagegenError, match="already holds 3 run"):
        run(strict)
    fresh = spec.model_copy(update={"output": spec.output.model_copy(update={"mode": "overwrite"})})
    assert run(fresh).images == 9
    assert len(images_of(spec.output.url)) == 9


def test_parts_without_a_commit_record_are_not_kept(ray_cluster, make_spec, prompts, tmp_path):
    spec = make_spec({"url": write_csv(tmp_path / "p.csv", parti_rows(prompts, 4))})
    run(spec)
    out = Path(spec.output.url)
    # What a run killed after writing a part and before its commit record leaves behind.
    (orphan,) = (out / "images").iterdir()
    orphan.rename(out / "images" / "part-crashed-run.parquet")
    shutil.rmtree(out / "_commits")
    for manifest in (out / "_runs").iterdir():
        manifest.unlink()
    assert run(spec).images == 4
    df = images_of(out)
    assert len(df) == 4 and df["request_id"].is_unique


def test_model_folder_saved_with_save_pretrained(ray_cluster, make_spec, model_cache, tmp_path):
    from pipeline.engine.tiny_models import build_tiny_sd

    build_tiny_sd().save_pretrained(tmp_path / "my-model", safe_serialization=True)
    rows = [{"prompt": "a lighthouse", "seed": 1}]
    tiny = make_spec({"url": write_csv(tmp_path / "p.csv", rows)}, output={"url": str(tmp_path / "tiny")})
    saved = make_spec(
        {"url": write_csv(tmp_path / "p.csv", rows)},
        model={"ref": str(tmp_path / "my-model")},
        output={"url": str(tmp_path / "saved")},
    )
    run(tiny)
    run(saved)
    a, b = images_of(tmp_path / "tiny").iloc[0], images_of(tmp_path / "saved").iloc[0]
    assert b["model_fingerprint"].startswith("local-") and a["model_fingerprint"] != b["model_fingerprint"]
    assert a["request_id"] != b["request_id"]  # another model is another request
    assert a["sha256"] == b["sha256"]  # same weights, same loading path, same pixels


def test_s3_in_and_out(ray_cluster, make_spec, prompts, s3):
    fs, bucket, options = s3
    local = Path(tempfile.mkdtemp()) / "p.parquet"
    pd.DataFrame(parti_rows(prompts, 8)).assign(extra=range(8)).to_parquet(local)
    fs.put(str(local), f"{bucket}/tables/p.parquet")
    spec = make_spec(
        {"url": f"s3://{bucket}/tables/p.parquet", "storage_options": options},
        output={"url": f"s3://{bucket}/out", "storage_options": options},
    )
    summary = run(spec)
    assert summary.images == 8
    table = pq.read_table(f"{bucket}/out/images", filesystem=fs)
    assert table.num_rows == 8 and sorted(table.column("extra").to_pylist()) == list(range(8))
    (manifest,) = fs.ls(f"{bucket}/out/_runs")
    text = fs.cat_file(manifest).decode()
    assert json.loads(text)["counts"]["images"] == 8
    assert "testing" not in text  # credentials never reach the manifest


def test_table_level_problems_stop_before_any_work(ray_cluster, make_spec, tmp_path):
    wrong_column = make_spec({"url": write_csv(tmp_path / "p.csv", [{"text": "a"}])})
    with pytest.raises(InputError, match="input.prompt_column is 'prompt', but .* has no such column; its columns are \\['text'\\]"):
        run(wrong_column)
    with pytest.raises(StorageError, match="does not exist"):
        run(make_spec({"url": str(tmp_path / "missing.csv")}))
    (tmp_path / "empty.csv").write_text("prompt\n")
    with pytest.raises(InputError, match="has no rows"):
        run(make_spec({"url": str(tmp_path / "empty.csv")}))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.parquet"))


def _cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray-", dir="/tmp")}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


def test_cli_user_errors_are_one_message_without_traceback(tmp_path):
    result = _cli("run", "jobs/demo.yaml", "--set", "output.format=gif")
    assert result.returncode == 2
    assert "output.format: Input should be 'png', 'webp' or 'jpeg' (got 'gif')" in result.stderr
    assert "Traceback" not in result.stderr
    result = _cli("run", "jobs/demo.yaml", "--set", f"input.url={tmp_path}/nope.tsv")
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_cli_runs_the_demo(model_cache, tmp_path):
    result = _cli("run", "jobs/demo.yaml", "--set", f"output.url={tmp_path}/out", "--set", f"model.cache_dir={model_cache}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "images out   64" in result.stdout and f"{tmp_path}/out" in result.stdout
    assert len(images_of(tmp_path / "out")) == 64
    # Ray core's error lines ("[date time E pid tid] file.cc:line: ..."): none in a healthy run.
    # Engine actors with arguments in the object store printed one (ray-project/ray#53727).
    core_errors = re.findall(r"^\[[\d-]+ [\d:,]+ E \d+ \d+\] .*$", result.stderr, re.MULTILINE)
    assert not core_errors, core_errors


def test_model_from_an_s3_prefix(make_spec, model_cache, s3, tmp_path):
    import numpy as np

    from pipeline.engine.engine import Engine
    from pipeline.engine.weight_sources import fingerprint
    from pipeline.engine.requests import GenerationRequest
    from pipeline.engine.tiny_models import ensure_tiny
    from pipeline.spec.model_config import ModelConfig

    fs, bucket, options = s3
    fs.put(ensure_tiny(model_cache), f"{bucket}/models/tiny", recursive=True)
    remote = ModelConfig(ref=f"s3://{bucket}/models/tiny", storage_options=options, cache_dir=str(tmp_path / "cache"))
    assert fingerprint(remote).startswith("remote-")
    request = GenerationRequest("a harbour at dusk", "", 5, 32, 32, 2, 7.5)
    from_s3 = Engine(remote).generate([request])[0].pixels
    local = Engine(ModelConfig(ref="tiny", cache_dir=model_cache)).generate([request])[0].pixels
    assert np.array_equal(from_s3, local)
    assert (tmp_path / "cache" / "remote" / fingerprint(remote) / "model_index.json").is_file()
    spec = make_spec({"url": "x.csv"}, model={"ref": remote.ref, "storage_options": {"secret": "s3cr3t"}})
    assert "s3cr3t" not in str(spec.redacted())
