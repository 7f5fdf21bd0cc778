"""`imagegen inspect`: runs, counts, schema, size on disk and a few rows of an output."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import pytest

from pipeline.cli import main
from pipeline.output.inspect import format_inspection, inspect_output

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def test_inspect_a_finished_output(ray_cluster, make_spec, tmp_path, capsys):
    from pipeline.batch.run import run

    pd.DataFrame({"prompt": ["a kite", "a boat", "", "a fox"], "topic": ["sky", "sea", "none", "wood"]}).to_csv(tmp_path / "p.csv", index=False)
    spec = make_spec({"url": str(tmp_path / "p.csv")}, defaults={"width": 16, "height": 24, "steps": 1})
    summary = run(spec)
    out = Path(spec.output.url)

    found = inspect_output(str(out), rows=2)
    assert [(r.run_id, r.status) for r in found.runs] == [(summary.run_id, "complete")]
    assert (found.images, found.errors, found.parts) == (3, 1, 2)
    assert found.runs[0].input_rows == 4
    assert found.size_bytes == sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert "topic" in found.schema.names and "image" in found.schema.names
    assert len(found.rows) == 2
    images = pd.read_parquet(out / "images").set_index("sha256")
    for row in found.rows:
        assert images.loc[row["sha256"], "prompt"] == row["prompt"]
        assert hashlib.sha256(images.loc[row["sha256"], "image"]["bytes"]).hexdigest() == row["sha256"]

    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert text == format_inspection(inspect_output(str(out))) + "\n"
    assert "runs       1" in text and "images     3" in text and "errors     1" in text
    assert "  topic: string" in text and "  image: image {bytes, path}" in text
    first = found.rows[0]
    assert f"  {first['sha256'][:12]}  seed {first['seed']:<20} 16x24 " in text


def test_inspect_empty_and_missing_outputs(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["inspect", str(tmp_path / "empty")]) == 0
    assert "no committed run yet" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "does not exist; check the path" in capsys.readouterr().err
