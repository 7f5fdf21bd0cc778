"""The prompt tables users actually have: multi-line prompts, folders with stray files, a
pandas index, JSON ids of mixed types, unencodable text. The job, `validate` and `verify`
read them one way, and nothing is read or skipped without a word."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.batch.plan import format_plan, make_plan
from pipeline.batch.run import run
from pipeline.errors import InputError
from pipeline.output.verify import verify
from pipeline.spec.config import InputConfig
from pipeline.storage.tables import list_input, preflight
from test_tables import csv_bytes, multiline_prompts

FAST = {"width": 16, "height": 16, "steps": 1}


def stray_files_folder(folder: Path, part_1: bytes) -> None:
    """A folder as users keep one: the table, a hidden copy, a Spark-style marker, a backup."""
    folder.mkdir()
    (folder / "part-1.csv").write_bytes(part_1)
    for name in ("_part-2.csv", ".part-3.csv", "part-4.csv.bak"):
        (folder / name).write_bytes(part_1)
    (folder / ".ipynb_checkpoints").mkdir()
    (folder / ".ipynb_checkpoints" / "part-1-checkpoint.csv").write_bytes(part_1)


def test_every_file_of_an_input_folder_is_read_or_named_with_why(tmp_path):
    stray_files_folder(tmp_path / "t", b"prompt\na cat\n")
    listing = list_input(InputConfig(url=str(tmp_path / "t"), format="csv"))
    assert [Path(p).name for p in listing.files] == ["part-1.csv"]
    skipped = dict(listing.skipped)
    assert set(skipped) == {"_part-2.csv", ".part-3.csv", "part-4.csv.bak", ".ipynb_checkpoints/part-1-checkpoint.csv"}
    assert "starts with '.' or '_'" in skipped["_part-2.csv"] and "starts with '.' or '_'" in skipped[".part-3.csv"]
    assert skipped["part-4.csv.bak"].startswith("not a csv file by its name")
    # A file named in the URL is read whatever its name; a folder of nothing readable says why.
    assert len(list_input(InputConfig(url=str(tmp_path / "t" / "part-4.csv.bak"), format="csv")).files) == 1
    (tmp_path / "t" / "part-1.csv").unlink()
    with pytest.raises(InputError, match=r"no prompt-table files at .*skipped .*part-4.csv.bak: not a csv file"):
        list_input(InputConfig(url=str(tmp_path / "t"), format="csv"))


def test_a_pass_through_column_of_two_types_in_two_parquet_files_is_refused_before_any_work(tmp_path):
    (tmp_path / "t").mkdir()
    pq.write_table(pa.table({"prompt": ["a"], "tag": [1], "seed": [1]}), tmp_path / "t" / "a.parquet")
    pq.write_table(pa.table({"prompt": ["b"], "tag": ["x"], "seed": ["2"]}), tmp_path / "t" / "b.parquet")
    inp = InputConfig(url=str(tmp_path / "t"), format="parquet")
    with pytest.raises(InputError, match=r"column 'tag' is int64 in a.parquet but string in b.parquet"):
        preflight(inp)
    # A parameter column is parsed per row: its types may differ.
    pq.write_table(pa.table({"prompt": ["b"], "tag": [2], "seed": ["2"]}), tmp_path / "t" / "b.parquet")
    assert preflight(inp) == []


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_multiline_prompts_and_stray_files_read_alike_by_validate_the_job_and_verify(ray_cluster, make_spec, tmp_path):
    # Over 1 MB of csv.writer output whose quoted prompts hold LF, CRLF and CR: every row
    # but three is rejected (width), so the job stays small while reading it all.
    prompts = multiline_prompts(700)
    made = {5, 350, 699}
    rows = [[p, "16" if i in made else "wide"] for i, p in enumerate(prompts)]
    part_1 = csv_bytes([["prompt", "width"], *rows])
    assert len(part_1) > 1 << 20
    stray_files_folder(tmp_path / "t", part_1)
    spec = make_spec({"url": str(tmp_path / "t"), "format": "csv"}, defaults=FAST, runtime={"batch_size": 64}, output={"rows_per_part": 1000})

    plan = make_plan(spec)
    assert (plan.rows, plan.valid_rows) == (len(prompts), len(made))
    text = format_plan(plan, "job.yaml")
    for name in ("_part-2.csv", ".part-3.csv", "part-4.csv.bak", ".ipynb_checkpoints/part-1-checkpoint.csv"):
        assert f"skipped {name}: " in text

    heard: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: heard.append(record.getMessage())
    logging.getLogger("pipeline.batch.run").addHandler(handler)
    try:
        summary = run(spec)
    finally:
        logging.getLogger("pipeline.batch.run").removeHandler(handler)
    first = heard[:4]
    assert sorted(m.split(":")[0] for m in first) == sorted(f"skipped {n}" for n in ("_part-2.csv", ".part-3.csv", "part-4.csv.bak", ".ipynb_checkpoints/part-1-checkpoint.csv"))
    assert (summary.input_rows, summary.images, summary.errors) == (len(prompts), len(made), len(prompts) - len(made))
    images = pd.read_parquet(Path(spec.output.url) / "images")
    assert sorted(images["prompt"]) == sorted(prompts[i] for i in made)  # CR, CRLF and LF kept as written
    assert set(images["source"]) == {"part-1.csv"}
    assert verify(spec.output.url, spec=spec).ok


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_json_ids_keep_their_identity_when_a_text_id_row_is_added_and_a_surrogate_is_an_error_row(ray_cluster, make_spec, tmp_path):
    table = tmp_path / "t.jsonl"
    table.write_text('{"id": 1.0, "prompt": "a red kite"}\n{"id": 2.0, "prompt": "a blue boat"}\n{"id": 3.0, "prompt": "x\\ud800y"}\n')
    spec = make_spec({"url": str(table), "id_column": "id"}, defaults=FAST)
    first = run(spec)
    assert (first.images, first.errors) == (2, 1)
    errors = pd.read_parquet(Path(spec.output.url) / "errors")
    assert errors["error_message"].tolist() == ["line 3 holds a lone surrogate U+D800, which is not text (no encoder can write it)"]
    assert make_plan(spec).rejected_rows == 1  # validate reads it as the job does

    with table.open("a") as f:  # one text id: the chunk's id column is no longer all floats
        f.write('{"id": "kite-2", "prompt": "a green kite"}\n')
    second = run(spec)
    assert second.images == 1  # not 3: the rows before keep their ids
    images = pd.read_parquet(Path(spec.output.url) / "images")
    assert sorted(images["id"]) == ["1", "2", "kite-2"]
    assert verify(spec.output.url, spec=spec).ok

    # A pass-through column of two types: validate refuses it, as the job would where they meet.
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "a.jsonl").write_text('{"prompt": "a", "tag": 1}\n')
    (tmp_path / "two" / "b.jsonl").write_text('{"prompt": "b", "tag": "x"}\n')
    with pytest.raises(InputError, match=r"column 'tag' is int64 in a.jsonl but string in b.jsonl"):
        make_plan(make_spec({"url": str(tmp_path / "two"), "format": "jsonl"}, defaults=FAST))


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_a_pandas_index_never_reaches_the_output(ray_cluster, make_spec, tmp_path):
    frame = pd.DataFrame({"prompt": ["a red kite", "", "a blue boat", "a green kite"], "n": [1, 2, 3, 4]})
    frame[frame["n"] != 3].to_parquet(tmp_path / "t.parquet")  # index 0, 1, 3: stored as __index_level_0__
    assert "__index_level_0__" in pq.read_schema(tmp_path / "t.parquet").names
    spec = make_spec({"url": str(tmp_path / "t.parquet")}, defaults=FAST)
    summary = run(spec)
    assert (summary.images, summary.errors) == (2, 1)
    out = Path(spec.output.url)
    for written in [*(out / "images").glob("*.parquet"), *(out / "errors").glob("*.parquet"), out / "_schema" / "images.parquet"]:
        assert "__index_level_0__" not in pq.read_schema(written).names, written
    assert json.loads(pd.read_parquet(Path(spec.output.url) / "errors")["raw"][0]) == {"n": 2, "prompt": ""}
    assert verify(spec.output.url, spec=spec).ok  # the rejected row's request id is the one verify computes
