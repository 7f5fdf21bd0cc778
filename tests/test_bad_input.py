"""Bad input runs to completion: every row accounted for, each rejected row with its reason."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from pipeline.errors import InputError
from pipeline.batch.run import run
from pipeline.output.verify import verify

pytestmark = [pytest.mark.ray, pytest.mark.timeout(400)]

# (row, expected reason or None when the row must become an image)
CASES = [
    ({"id": "ok", "prompt": "a quiet harbour"}, None),
    ({"id": "cjk-emoji", "prompt": "一只猫 👩‍👩‍👧 кот"}, None),
    ({"id": "too-long-for-clip", "prompt": "a very detailed castle " * 40}, None),  # truncated, recorded
    ({"id": "null", "prompt": None}, "prompt is missing (null)"),
    ({"id": "empty", "prompt": ""}, "prompt is empty"),
    ({"id": "spaces", "prompt": "   \t "}, "prompt is empty"),
    ({"id": "too-many-chars", "prompt": "x" * 5000}, "prompt has 5000 characters"),
    ({"id": "bell", "prompt": "ring \x07 bell"}, "prompt contains control character U+0007"),
    ({"id": "seed-abc", "prompt": "p", "seed": "abc"}, "seed must be a whole number, got 'abc'"),
    ({"id": "steps-2.5", "prompt": "p", "steps": 2.5}, "steps must be a whole number, got 2.5"),
    ({"id": "huge-steps", "prompt": "p", "steps": 10**6}, "steps must be between 1 and 200"),
    ({"id": "huge-width", "prompt": "p", "width": 100000}, "width must be between 1 and 2048"),
    ({"id": "negative-height", "prompt": "p", "height": -16}, "height must be between 1 and 2048"),
    ({"id": "odd-size", "prompt": "p", "width": 36}, "width must be a multiple of 8, got 36"),
    ({"id": "many-images", "prompt": "p", "num_images": 10**6}, "num_images must be between 1 and 16"),
    ({"id": "huge-seed", "prompt": "p", "seed": 2**70}, "seed must be between 0 and 2**63-1"),
    ({"id": "ok", "prompt": "a repeated id"}, "id 'ok' repeats the id of row bad.jsonl#0"),
    ({"id": None, "prompt": "no id"}, "id column 'id' is empty"),
]


def test_a_table_with_every_kind_of_bad_row(ray_cluster, make_spec, tmp_path):
    lines = [json.dumps(row, ensure_ascii=False).encode() for row, _ in CASES]
    lines.append(b'{"id": "broken", "prompt": "no closing brace"')
    lines.append(b'{"id": "latin1", "prompt": "caf\xe9"}')
    (tmp_path / "bad.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    spec = make_spec({"url": str(tmp_path / "bad.jsonl"), "id_column": "id"}, defaults={"width": 16, "height": 16, "steps": 1})

    summary = run(spec)
    n_rows = len(CASES) + 2
    good = sum(1 for _, reason in CASES if reason is None)
    assert (summary.input_rows, summary.images, summary.errors) == (n_rows, good, n_rows - good)
    errors = pd.read_parquet(Path(spec.output.url) / "errors").sort_values("row_index")
    by_row = dict(zip(errors["row_index"], errors["error_message"]))
    for position, (row, reason) in enumerate(CASES):
        if reason is not None:
            assert reason in by_row[position], (row["id"], by_row.get(position))
    assert "line 19 is not valid JSON" in by_row[len(CASES)]
    assert "line 20 is not valid UTF-8" in by_row[len(CASES) + 1]
    assert set(errors["error_stage"]) == {"validate", "read"}

    images = pd.read_parquet(Path(spec.output.url) / "images").set_index("id")
    assert bool(images.loc["too-long-for-clip", "prompt_truncated"]) and not bool(images.loc["ok", "prompt_truncated"])
    assert verify(spec.output.url, spec=spec).ok


@pytest.mark.slow  # ten thousand real prompts through a job: half a minute on 2 cores
def test_ten_thousand_raw_user_prompts(ray_cluster, make_spec, prompts):
    spec = make_spec(
        {"url": str(prompts / "imagereward-diffusiondb" / "refl_data.json"), "prompt_column": "text"},
        defaults={"width": 8, "height": 8, "steps": 1},
        runtime={"batch_size": 128},
        output={"rows_per_part": 2000},
    )
    summary = run(spec)
    assert summary.input_rows == 10000
    assert summary.images + summary.errors == 10000
    images = pd.read_parquet(Path(spec.output.url) / "images", columns=["request_id", "input_image", "prompt_truncated"])
    assert images["request_id"].is_unique
    assert images["prompt_truncated"].any()  # prompts up to 504 CLIP tokens
    assert verify(spec.output.url, spec=spec).ok


def test_a_corrupt_file_stops_the_job_before_any_work(ray_cluster, make_spec, tmp_path):
    (tmp_path / "t.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(InputError, match="not a readable Parquet file"):
        run(make_spec({"url": str(tmp_path / "t.parquet")}))
    assert not (tmp_path / "out").exists()


def test_no_permission_on_the_output_stops_the_job_with_one_message(ray_cluster, make_spec, tmp_path):
    import shutil
    import subprocess

    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed")
    (tmp_path / "t.csv").write_text("prompt\na cat\n")
    out = tmp_path / "locked"
    out.mkdir()
    # Immutable: even root (which these tests run as) gets EPERM when writing inside it.
    if subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode != 0:
        pytest.skip("this filesystem does not support immutable folders")
    try:
        from pipeline.errors import StorageError

        with pytest.raises(StorageError, match="permission denied .*check the folder's permissions"):
            run(make_spec({"url": str(tmp_path / "t.csv")}, output={"url": str(out)}))
    finally:
        subprocess.run(["chattr", "-i", str(out)], check=True)
    assert list(out.iterdir()) == []
