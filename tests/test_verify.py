"""`imagegen verify` passes on real runs and catches each kind of damage done on purpose."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.batch.run import run
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
    assert any(v.startswith("parts without a commit record (left by an interrupted run; the next run into this output sets them aside): images/part-copy.parquet") for v in report.violations)
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
    (violation,) = report.violations
    assert violation.startswith("input rows with no image and no error row: ") and violation.endswith("#0")  # its content, first of its kind
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


def test_a_row_fixed_later_leaves_the_errors(finished):
    """A rejected row made valid by a later run is in images/ only: its old error row is
    gone from the files every reader sees, and the card counts it once."""
    spec, out = finished
    table = Path(spec.input.url)
    table.write_text(table.read_text().replace("a boat,x", "a boat,2"))
    summary = run(spec)
    assert (summary.images, summary.errors) == (1, 0)
    errors = pd.read_parquet(out / "errors")
    assert errors["error_message"].tolist() == ["prompt is empty"]
    images = pd.read_parquet(out / "images")
    assert len(images) == 4 and "a boat" in images["prompt"].tolist()
    report = verify(str(out), spec=spec)
    assert report.ok, report.format()
    assert (report.images, report.errors) == (4, 1)
    assert "| in the dataset now | 4 images, 1 error rows |" in (out / "README.md").read_text()
    # The rewritten errors part is committed by its own record: the next run adopts the
    # output as it is, drops no record and makes nothing again.
    again = run(spec)
    assert (again.images, again.errors) == (0, 0) and not again.recovery, again.recovery
    assert verify(str(out), spec=spec).ok


def test_an_error_row_left_beside_its_later_image_is_a_violation(finished):
    spec, out = finished
    stale = next((out / "errors").iterdir())
    data = stale.read_bytes()
    table = Path(spec.input.url)
    table.write_text(table.read_text().replace("a boat,x", "a boat,2"))
    run(spec)
    assert not stale.exists()
    stale.write_bytes(data)  # the superseded part, back as if never removed
    report = verify(str(out))
    # The fixed row is a new row (its content changed): the old error row is of a row no
    # longer in the input, and its part has no commit record any more.
    assert any(v.startswith("parts without a commit record") and stale.name in v for v in report.violations), report.format()


def test_a_repeated_id_stays_an_error_when_its_first_row_is_fixed(ray_cluster, make_spec, tmp_path):
    table = tmp_path / "t.csv"
    pd.DataFrame({"id": ["a", "b", "a"], "prompt": ["", "a boat", "a kite"]}).to_csv(table, index=False)
    spec = make_spec({"url": str(table), "id_column": "id"})
    assert (run(spec).images, verify(spec.output.url, spec=spec).ok) == (1, True)
    pd.DataFrame({"id": ["a", "b", "a"], "prompt": ["a fox", "a boat", "a kite"]}).to_csv(table, index=False)
    summary = run(spec)
    assert (summary.images, summary.errors) == (1, 0)
    errors = pd.read_parquet(Path(spec.output.url) / "errors")
    # The first row's rejection is superseded by its image; the repeat is still rejected.
    assert errors[["id", "row_index", "error_type"]].values.tolist() == [["a", 2, "DuplicateId"]]
    report = verify(spec.output.url, spec=spec)
    assert report.ok, report.format()


def test_a_renamed_input_without_ids_is_reported_before_it_doubles_the_output(finished):
    from pipeline.batch.plan import make_plan
    from pipeline.batch.summary import format_summary

    spec, out = finished
    renamed = Path(spec.input.url).with_name("renamed.csv")
    Path(spec.input.url).rename(renamed)
    # By position (input.identity: position), a renamed file makes every row new.
    moved = spec.model_copy(update={"input": spec.input.model_copy(update={"url": str(renamed), "identity": "position"})})
    expected = f"{out} holds 3 image(s) that no row of the current input owns (made from t.csv (3))."
    # verify --input: a violation, though every current row is accounted for... once it has run.
    report = verify(str(out), spec=moved)
    assert any(v.startswith(expected) and "Set input.id_column" in v for v in report.violations), report.format()
    # validate: a warning before any work.
    assert any(w.startswith(expected) for w in make_plan(moved).warnings)
    # run: the same warning, in the summary; the images are made again beside the old ones.
    summary = run(moved)
    assert summary.images == 3 and any(w.startswith(expected) for w in summary.warnings)
    assert "warning      " + expected in format_summary(summary)


def test_images_of_ids_no_longer_in_the_input_are_reported(ray_cluster, make_spec, tmp_path):
    table = tmp_path / "t.csv"
    pd.DataFrame({"key": ["a", "b", "c"], "prompt": ["a kite", "a boat", "a fox"]}).to_csv(table, index=False)
    spec = make_spec({"url": str(table), "id_column": "key"})
    assert run(spec).images == 3
    assert verify(spec.output.url, spec=spec).ok
    # Converted to Parquet: ids keep the identity, nothing is unowned.
    pd.read_csv(table, dtype=str).to_parquet(tmp_path / "t.parquet")
    as_parquet = make_spec({"url": str(tmp_path / "t.parquet"), "id_column": "key"})
    assert verify(spec.output.url, spec=as_parquet).ok
    pd.DataFrame({"key": ["a", "b"], "prompt": ["a kite", "a boat"]}).to_csv(table, index=False)
    report = verify(spec.output.url, spec=spec)
    assert any("holds 1 image(s) that no row of the current input owns" in v and "Their ids are not in column 'key'" in v for v in report.violations)
