"""The output's README.md: a Hugging Face dataset card, regenerated at each commit, that
`datasets.load_dataset(OUTPUT)` follows."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from pipeline.output.card import card_text, hf_features
from pipeline.spec import schema as S

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def header_and_body(path: Path) -> tuple[dict, str]:
    text = path.read_text()
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(front), body


def test_card_loads_with_datasets_and_follows_each_run(ray_cluster, make_spec, tmp_path):
    import datasets
    from PIL.Image import Image as PILImage

    from pipeline.batch.run import run

    rows = [
        {"prompt": "a red kite", "tags": ["sky", "red"], "meta": {"source": "test", "score": 0.5}},
        {"prompt": "a green field", "tags": [], "meta": {"source": "test", "score": 1.5}},
        {"prompt": "", "tags": ["empty"], "meta": {"source": "test", "score": 0.0}},
    ]
    table = tmp_path / "p.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = make_spec({"url": str(table)}, defaults={"width": 16, "height": 16, "steps": 1}, output={"license": "cc-by-4.0"})
    run(spec)
    out = Path(spec.output.url)
    header, body = header_and_body(out / "README.md")
    assert header["license"] == "cc-by-4.0"
    configs = {c["config_name"]: c for c in header["configs"]}
    assert configs["images"]["data_files"] == [{"split": "train", "path": "images/*.parquet"}] and configs["images"]["default"]
    assert configs["errors"]["data_files"] == [{"split": "train", "path": "errors/*.parquet"}]
    features = {info["config_name"]: {f["name"]: f for f in info["features"]} for info in header["dataset_info"]}
    assert features["images"]["image"] == {"name": "image", "dtype": "image"}
    assert features["images"]["tags"] == {"name": "tags", "list": "string"}  # pass-through columns keep their types
    assert features["errors"]["error_message"] == {"name": "error_message", "dtype": "string"}
    assert "`tiny` (sd, fingerprint `tiny-" in body and "| default size | 16x16 |" in body
    assert "| over all runs | 3 input rows, 2 images, 1 errors (validate: 1) |" in body

    images = datasets.load_dataset(str(out), "images", split="train")
    assert len(images) == 2 and isinstance(images[0]["image"], PILImage) and images[0]["image"].size == (16, 16)
    assert sorted(images["prompt"]) == ["a green field", "a red kite"]
    assert images.features["meta"]["score"].dtype == "float64"
    assert datasets.load_dataset(str(out), split="train").num_rows == 2  # images is the default config
    errors = datasets.load_dataset(str(out), "errors", split="train")
    assert errors["error_message"] == ["prompt is empty"]

    # A second run adds a row; the card now counts both runs.
    table.write_text(table.read_text() + json.dumps({"prompt": "a blue lake", "tags": ["lake"], "meta": {"source": "x", "score": 2.0}}) + "\n")
    run(spec)
    _, body = header_and_body(out / "README.md")
    assert "| runs | 2," in body and "| in the dataset now | 3 images, 1 error rows |" in body
    assert len(datasets.load_dataset(str(out), "images", split="train")) == 3


def test_card_of_an_output_without_errors_names_only_images():
    schema = S.images_schema([pa.field("Category", pa.string())])
    manifest = {
        "run_id": "r1", "started_at": 0, "finished_at": 60, "wall_seconds": 60.0, "model_fingerprint": "tiny-x",
        "spec": {"model": {"ref": "tiny"}, "defaults": {"width": 64, "height": 64}, "output": {"license": "other"}},
        "counts": {"input_rows": 2, "images": 2, "errors": 0, "errors_by_stage": {}},
        "parts": [{"path": "images/part-a.parquet", "rows": 2, "bytes": 10}],
    }  # fmt: skip
    header = yaml.safe_load(card_text([manifest], schema).split("---\n")[1])
    assert [c["config_name"] for c in header["configs"]] == ["images"]
    assert header["license"] == "other"
    # A type the card cannot describe leaves features to the files rather than guess.
    assert hf_features(pa.schema([pa.field("x", pa.month_day_nano_interval())])) is None


def test_columns_that_differ_between_runs_read_everywhere(ray_cluster, make_spec, tmp_path):
    """Run 1's table has `tag` and `score`; run 2's has `tag` all empty, no `score`, and a
    new `extra`. Every reader the README shows gets every column of every part."""
    import datasets
    import duckdb
    import pandas as pd
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from pipeline.batch.run import run

    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first.write_text("".join(json.dumps({"prompt": p, "tag": t, "score": s}) + "\n" for p, t, s in [("a kite", "sky", 1), ("a boat", "sea", 2)]))
    second.write_text("".join(json.dumps({"prompt": p, "tag": None, "extra": e}) + "\n" for p, e in [("a fox", "x"), ("a hill", "y")]))
    small = {"width": 16, "height": 16, "steps": 1}
    run(make_spec({"url": str(first)}, defaults=small))
    run(make_spec({"url": str(second)}, defaults=small))
    out = Path(make_spec({"url": str(first)}).output.url)
    wanted = {"tag", "score", "extra"}

    manifest = json.loads(sorted((out / "_runs").iterdir())[-1].read_text())
    recorded = {c["name"]: c["type"] for c in manifest["schemas"]["images"]["columns"]}
    assert recorded["tag"] == "string" and recorded["score"] == "int64" and recorded["extra"] == "string"
    header, _ = header_and_body(out / "README.md")
    images_features = next(info["features"] for info in header["dataset_info"] if info["config_name"] == "images")
    assert wanted <= {f["name"] for f in images_features}

    loaded = datasets.load_dataset(str(out), "images", split="train")
    assert len(loaded) == 4 and wanted <= set(loaded.column_names)
    assert sorted(loaded["score"], key=lambda v: (v is None, v)) == [1, 2, None, None]

    schema = pq.read_schema(out / "_schema" / "images.parquet")  # the README's snippets
    frame = pd.read_parquet(out / "images", schema=schema)
    assert len(frame) == 4 and wanted <= set(frame.columns) and sorted(frame["extra"].dropna()) == ["x", "y"]
    table = pads.dataset(out / "images", schema=schema).to_table()
    assert table.num_rows == 4 and wanted <= set(table.column_names)
    through_ray = ray_cluster.data.read_parquet(str(out / "images"), schema=schema).to_pandas()
    assert len(through_ray) == 4 and wanted <= set(through_ray.columns)
    rows = duckdb.sql(f"select tag, score, extra from read_parquet('{out}/images/*.parquet', union_by_name=true) order by prompt").fetchall()
    assert sorted(rows, key=str) == sorted([("sky", 1, None), ("sea", 2, None), (None, None, "x"), (None, None, "y")], key=str)


def test_card_of_a_models_spec_shows_each_model_not_the_unused_model_section():
    manifest = {
        "run_id": "r1", "started_at": 0, "finished_at": 60, "wall_seconds": 60.0,
        "spec": {
            "model": {"ref": "tiny", "revision": "main", "dtype": "auto", "scheduler": None},  # the unused default section
            "models": {
                "sd": {"ref": "tiny", "revision": "main", "dtype": "float32", "scheduler": "euler"},
                "flux": {"ref": "tiny-flux", "revision": "main", "dtype": "bfloat16", "scheduler": "flow_euler"},
            },
            "defaults": {"width": 64, "height": 64}, "output": {"license": "other"},
        },
        "models": {"sd": {"ref": "tiny", "fingerprint": "a", "family": "sd"}, "flux": {"ref": "tiny-flux", "fingerprint": "b", "family": "flux"}},
        "counts": {"input_rows": 2, "images": 2, "errors": 0, "errors_by_stage": {}},
        "parts": [{"path": "images/part-a.parquet", "rows": 2, "bytes": 10}],
    }  # fmt: skip
    (line,) = [line for line in card_text([manifest], None).splitlines() if line.startswith("| revision, dtype, scheduler |")]
    assert line == "| revision, dtype, scheduler | `sd`: main, float32, euler; `flux`: main, bfloat16, flow_euler |"
