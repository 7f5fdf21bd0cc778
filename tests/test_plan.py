"""`imagegen validate`: the plan of a job from the spec and the whole input, before any work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipeline.batch.plan import format_plan, make_plan, reason_of
from pipeline.batch.rates import DEFAULT_THROUGHPUT, rate_for
from pipeline.spec.config import ThroughputEntry

REPO = Path(__file__).resolve().parent.parent


def write_csv(path: Path, rows: list[dict]) -> str:
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


ROWS = [
    {"id": "a", "prompt": "a red cube", "width": "", "steps": "", "num_images": ""},
    {"id": "b", "prompt": "a blue ball", "width": "", "steps": "", "num_images": "3"},
    {"id": "c", "prompt": "a tall tower", "width": "48", "steps": "3", "num_images": ""},
    {"id": "d", "prompt": "", "width": "", "steps": "", "num_images": ""},
    {"id": "e", "prompt": "  ", "width": "", "steps": "", "num_images": ""},
    {"id": "f", "prompt": "a cat", "width": "", "steps": "2.5", "num_images": ""},
    {"id": "g", "prompt": "a dog", "width": "", "steps": "x", "num_images": ""},
    {"id": "a", "prompt": "same id again", "width": "", "steps": "", "num_images": ""},
]


def test_counts_reasons_buckets_and_estimate(make_spec, tmp_path):
    spec = make_spec(
        {"url": write_csv(tmp_path / "p.csv", ROWS), "id_column": "id"},
        plan={"throughput": [{"model": "tiny", "width": 32, "height": 32, "steps": 2, "images_per_s": 4.0}], "price_per_gpu_hour": 3.0},
    )
    plan = make_plan(spec)
    assert (plan.rows, plan.valid_rows, plan.rejected_rows) == (8, 3, 5)
    reasons = {r.text: (r.rows, r.example) for r in plan.reasons}
    assert reasons["prompt is empty"] == (2, "prompt is empty")
    assert reasons["steps must be a whole number"] == (2, "steps must be a whole number, got '2.5'")
    assert reasons["id '...' repeats the id of row p.csv#0; ids must be unique"][0] == 1

    buckets = {(b.model, b.width, b.height, b.steps): b for b in plan.buckets}
    assert set(buckets) == {("tiny", 32, 32, 2), ("tiny", 48, 32, 3)}
    small, large = buckets[("tiny", 32, 32, 2)], buckets[("tiny", 48, 32, 3)]
    assert (small.rows, small.images, large.rows, large.images) == (2, 4, 1, 1)
    assert small.rate.basis == "measured" and small.rate.images_per_s == 4.0
    # The nearest entry of the model, scaled by pixels x steps (2.25x the work of 32x32x2).
    assert large.rate.basis == "scaled from 32x32, 2 steps" and large.rate.images_per_s == pytest.approx(4.0 / 2.25)
    assert plan.images_to_make == 5
    assert plan.gpu_hours == pytest.approx((4 / 4.0 + 2.25 / 4.0) / 3600)
    assert plan.cost == pytest.approx(plan.gpu_hours * 3.0)

    text = format_plan(plan, "job.yaml")
    assert "rows       8: 3 valid, 5 rejected" in text
    assert "tiny / 48x32 / 3 steps: 1 rows, 1 images, 1.78 (scaled from 32x32, 2 steps)" in text
    assert "images     5 to make" in text and "cost       0.00 at 3 per GPU-hour" in text


def test_built_in_throughput_cites_the_benchmarks_and_unknown_models_say_what_to_add(make_spec, tmp_path):
    benchmarks = (REPO / "BENCHMARKS.md").read_text()
    assert "1.44" in benchmarks and "5.18" in benchmarks  # the figures DEFAULT_THROUGHPUT halves/takes
    assert rate_for(list(DEFAULT_THROUGHPUT), "tiny", 64, 64, 4).basis == "measured"
    assert rate_for(list(DEFAULT_THROUGHPUT), "org/other-model", 512, 512, 25) is None
    generic = [ThroughputEntry(width=512, height=512, steps=25, images_per_s=2.0)]
    assert rate_for(generic, "org/other-model", 512, 512, 50).images_per_s == pytest.approx(1.0)

    # A family without GPU figures (SD 1.x/XL get the H200's: tests/test_engine_options.py).
    spec = make_spec({"url": write_csv(tmp_path / "p.csv", ROWS[:2])}, model={"ref": "org/other-model", "family": "flux", "revision": "0" * 40})
    plan = make_plan(spec)
    assert plan.gpu_hours is None and plan.cost is None
    assert "unknown: add a plan.throughput entry" in format_plan(plan, "job.yaml")


def test_reasons_group_alike_messages():
    assert reason_of("seed must be a whole number, got 'abc'") == "seed must be a whole number"
    assert reason_of("prompt has 5000 characters, above limits.max_prompt_chars=4000") == reason_of(
        "prompt has 4100 characters, above limits.max_prompt_chars=4000"
    )
    assert reason_of("prompt contains control character U+0007 at position 5") == "prompt contains control character U+N at position N"


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_after_a_run_the_plan_has_nothing_left_to_make(ray_cluster, make_spec, tmp_path):
    from pipeline.batch.run import run

    table = tmp_path / "p.csv"
    spec = make_spec({"url": write_csv(table, ROWS[:3] + ROWS[4:5])}, defaults={"width": 16, "height": 16, "steps": 1})
    before = make_plan(spec)
    summary = run(spec)
    assert before.images_to_make == summary.images == 5
    after = make_plan(spec)
    assert (after.images_to_make, after.already_committed, after.rejected_rows) == (0, 5, 1)
    write_csv(table, ROWS[:3] + ROWS[4:5] + [{"prompt": "a new row"}])
    assert make_plan(spec).images_to_make == 1
    overwrite = spec.model_copy(update={"output": spec.output.model_copy(update={"mode": "overwrite"})})
    assert make_plan(overwrite).images_to_make == 6


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=120)


def test_validate_command_exit_codes(tmp_path):
    result = _cli("validate", "jobs/demo.yaml", "--set", f"output.url={tmp_path}/out", "--set", "plan.price_per_gpu_hour=2")
    assert result.returncode == 0, result.stderr
    assert "spec jobs/demo.yaml is valid" in result.stdout and "rows       64: 64 valid, 0 rejected" in result.stdout
    assert "tiny / 64x64 / 4 steps: 64 rows, 64 images, 5.18 (measured)" in result.stdout
    assert not (tmp_path / "out").exists(), "validate never writes the output"

    result = _cli("validate", "jobs/demo.yaml", "--set", "plan.throughput=[{width: 64, height: 64, steps: 4}]")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "plan.throughput.0.images_per_s: required field is missing" in result.stderr


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_the_plan_on_the_cluster_counts_what_the_local_pass_counts(ray_cluster, make_spec, tmp_path, monkeypatch):
    from pipeline.storage import units

    # Two files cut into units of 3 rows: the repeated id "a" is in another unit and file.
    folder = tmp_path / "t"
    folder.mkdir()
    write_csv(folder / "1.csv", ROWS[:5])
    write_csv(folder / "2.csv", ROWS[5:])
    monkeypatch.setattr(units, "UNIT_BYTES", 10)
    spec = make_spec({"url": str(folder), "format": "csv", "id_column": "id"})
    local, remote = make_plan(spec, on_cluster=False), make_plan(spec, on_cluster=True)
    assert len(units.plan_units(spec.input).units) == 2
    assert (remote.rows, remote.valid_rows, remote.rejected_rows) == (local.rows, local.valid_rows, local.rejected_rows) == (8, 3, 5)
    assert [(r.text, r.rows) for r in remote.reasons] == [(r.text, r.rows) for r in local.reasons]
    assert any(r.example == "id 'a' repeats the id of row 1.csv#0; ids must be unique" for r in remote.reasons)
    assert [(b.model, b.width, b.rows, b.images) for b in remote.buckets] == [(b.model, b.width, b.rows, b.images) for b in local.buckets]
    assert "every row checked, on the Ray cluster, 2 read task(s)" in format_plan(remote, "job.yaml")
    assert "every row checked, in this process" in format_plan(local, "job.yaml")
