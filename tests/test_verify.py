"""`imagegen verify` passes on real runs and catches each kind of damage done on purpose."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.job.run import run
from pipeline.output.verify import verify

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


@pytest.fixture
def finished(ray_cluster, make_spec, tmp_path):
    """A finished run over a table with good and bad rows: (spec, output folder)."""
    table = tmp_path / "t.csv"
    pd.DataFrame({"prompt": ["a kite", "a boat", "", "a fox", "a hill"], "seed": ["1", "x", "", "", ""]}).to_csv(table, index=False)
    spec = make_spec({"url": str(table)}, output={"rows_per_part": 2})
    summary = run(spec)
    assert (summary.images, summary.errors) == (3, 2)
    return spec, Path(spec.output.url)


def test_a_finished_run_verifies(finished):
    spec, out = finished
    report = verify(str(out), spec=spec)
    assert report.ok, report.format()
    assert (report.images, report.errors, report.input_rows, report.runs) == (3, 2, 5, 1)
    assert "OK" in report.format()


def test_a_copied_part_is_a_duplicate_and_uncommitted(finished):
    _, out = finished
    part = sorted((out / "images").iterdir())[0]
    shutil.copy(part, out / "images" / "part-copy.parquet")
    report = verify(str(out))
    assert any(v.startswith("parts without a commit record (left by an interrupted run; the next run into this output removes them): images/part-copy.parquet") for v in report.violations)
    assert any(v.startswith("request ids with more than one image") for v in report.violations)


def test_a_deleted_part_is_missing_and_rows_unaccounted(finished):
    spec, out = finished
    sorted((out / "images").iterdir())[0].unlink()
    report = verify(str(out), spec=spec)
    assert any(v.startswith("parts listed by a manifest but missing") for v in report.violations)
    assert any(v.startswith("input rows with no image and no error row") for v in report.violations)


def test_altered_image_bytes_fail_the_digest(finished):
    _, out = finished
    part = sorted((out / "images").iterdir())[0]
    table = pq.read_table(part)
    images = table.column("image").to_pylist()
    images[0] = {"bytes": images[0]["bytes"][:-1] + b"\x00", "path": images[0]["path"]}
    pq.write_table(table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, table.schema.field("image").type)), part)
    report = verify(str(out))
    assert any(v.startswith("images whose sha256 does not match their bytes") for v in report.violations)


def test_a_row_added_to_the_input_is_unaccounted_until_the_next_run(finished):
    spec, out = finished
    table = Path(spec.input.url)
    table.write_text(table.read_text() + "a new row,\n")
    report = verify(str(out), spec=spec)
    assert report.violations == ["input rows with no image and no error row: t.csv#5"]
    run(spec)
    assert verify(str(out), spec=spec).ok


def test_verify_command_exit_codes(finished, tmp_path):
    import subprocess
    import sys

    import yaml

    spec, out = finished
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    command = [sys.executable, "-m", "pipeline.cli", "verify", str(out), "--input", str(spec_path)]
    good = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert good.returncode == 0 and "OK: the output keeps the contract" in good.stdout and "input rows 5" in good.stdout
    sorted((out / "images").iterdir())[0].unlink()
    bad = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "FAILED" in bad.stdout and "parts listed by a manifest but missing" in bad.stdout
