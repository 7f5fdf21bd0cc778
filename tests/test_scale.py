"""A job of any size: read units, duplicate ids across files and units, one set of engine
actors for all units, the same output however the table is cut."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.spec import schema as S
from pipeline.spec.duplicate_ids import SeenIds, find_duplicate_ids, unit_ids
from pipeline.storage import units

PARTI = Path(__file__).resolve().parent / "data" / "prompts" / "partiprompts" / "PartiPrompts.tsv"


def parti(n: int) -> list[str]:
    lines = PARTI.read_text().splitlines()[1:]
    return [lines[i % len(lines)].split("\t")[0] for i in range(n)]


def write_parquet(path: Path, frame: pd.DataFrame, row_group_size: int) -> str:
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path, row_group_size=row_group_size)
    return str(path)


def raw(ids: list, source: str = "t.csv", first: int = 0) -> pa.Table:
    return pa.table({"id": ids, S.INPUT_SOURCE: [source] * len(ids), S.INPUT_ROW: list(range(first, first + len(ids)))})


# -- pure parts ------------------------------------------------------------------------------


def test_seen_ids_name_the_first_row_across_units_and_a_retry_gets_the_same_answer():
    seen = SeenIds()
    assert seen.register(*unit_ids([raw(["a", "b", "a", None, ""])], "id")) == {"t.csv#2": "t.csv#0"}
    second = unit_ids([raw(["c", "b"], "u.csv"), raw(["a", "c"], "v.csv", 5)], "id")
    expected = {"u.csv#1": "t.csv#1", "v.csv#5": "t.csv#0", "v.csv#6": "u.csv#0"}
    assert seen.register(*second) == expected
    assert seen.register(*second) == expected  # a retried read task registers again
    assert len(seen) == 3


def test_seen_ids_stay_exact_over_many_units():
    rng = np.random.default_rng(0)
    ids = [f"id-{v}" for v in rng.integers(0, 20_000, 30_000)]
    whole = find_duplicate_ids([raw(ids)], "id")
    seen, found = SeenIds(), {}
    for start in range(0, len(ids), 700):  # 43 units: the levels merge many times
        found.update(seen.register(*unit_ids([raw(ids[start : start + 700], first=start)], "id")))
    assert found == whole
    first = {}
    for row, value in enumerate(ids):
        first.setdefault(value, row)
    assert whole == {f"t.csv#{row}": f"t.csv#{first[v]}" for row, v in enumerate(ids) if first[v] != row}


def test_a_streamed_unit_registers_its_ids_in_batches_and_repeats_stay_exact(tmp_path):
    import json

    from pipeline.spec.config import InputConfig
    from pipeline.spec.duplicate_ids import id_batches

    rng = np.random.default_rng(1)
    ids = [f"id-{v}" for v in rng.integers(0, 6000, 10_000)]
    (tmp_path / "big.jsonl").write_text("".join(json.dumps({"prompt": "p", "id": i}) + "\n" for i in ids))
    inp = InputConfig(url=str(tmp_path / "big.jsonl"), id_column="id")
    (unit,) = units.plan_units(inp).units
    whole = find_duplicate_ids(units.read_unit(inp, unit), "id")
    seen, calls, found, rows = SeenIds(), [], {}, 0

    def register(unit_ids_, last):
        calls.append(last)
        return seen.register(*unit_ids_)

    for chunks, repeats in id_batches(units.read_unit(inp, unit, chunk_rows=500), "id", register, batch_rows=1500):
        found.update(repeats)
        rows += sum(c.num_rows for c in chunks)
    assert rows == 10_000 and calls == [False] * 6 + [True]  # 7 batches, the last one says so
    assert found == whole and len(whole) > 3000  # repeats across batches name the first row
    calls.clear()
    assert list(id_batches(iter([]), "id", register)) == [] and calls == [True]  # an empty unit ends too
    assert [r for _, r in id_batches(units.read_unit(inp, unit), None, register)] == [{}] and calls == [True]


def test_the_registry_holds_a_unit_until_every_earlier_unit_registered_its_last_batch():
    import asyncio

    from pipeline.batch.id_registry import IdRegistry

    async def scenario() -> list[str]:
        registry, answered = IdRegistry(), []

        async def register(name: str, seq: int, ids: list, last: bool, first: int = 0):
            repeats = await registry.register(seq, unit_ids([raw(ids, f"u{seq}", first)], "id"), last)
            answered.append(name)
            return repeats

        # Unit 1 asks first, but its answer must wait for both of unit 0's batches.
        later = asyncio.ensure_future(register("u1", 1, ["b", "z"], True))
        await register("u0 batch 1", 0, ["a", "b"], False)
        await register("u0 batch 2", 0, ["b", "c"], True, first=2)
        assert await later == {"u1#0": "u0#1"}
        return answered

    assert asyncio.run(scenario()) == ["u0 batch 1", "u0 batch 2", "u1"]


def test_units_split_big_parquet_by_row_groups_and_group_small_files(tmp_path):
    from pipeline.spec.config import InputConfig

    write_parquet(tmp_path / "a.parquet", pd.DataFrame({"prompt": parti(100)}), row_group_size=10)
    write_parquet(tmp_path / "b.parquet", pd.DataFrame({"prompt": parti(5)}), row_group_size=10)
    write_parquet(tmp_path / "c.parquet", pd.DataFrame({"prompt": parti(5)}), row_group_size=10)
    plan = units.plan_units(InputConfig(url=str(tmp_path), format="parquet"), unit_rows=30)
    assert plan.rows == 110
    shapes = [[(Path(p.path).name, p.row_groups, p.first_row) for p in u.pieces] for u in plan.units]
    assert shapes == [
        [("a.parquet", (0, 1, 2), 0)],
        [("a.parquet", (3, 4, 5), 30)],
        [("a.parquet", (6, 7, 8), 60)],
        [("a.parquet", (9,), 90), ("b.parquet", (0,), 0), ("c.parquet", (0,), 0)],
    ]
    assert [u.seq for u in plan.units] == [0, 1, 2, 3] and [u.rows for u in plan.units] == [30, 30, 30, 20]
    read = [t for u in plan.units for t in units.read_unit(InputConfig(url=str(tmp_path), format="parquet"), u)]
    rows = pa.concat_tables(read)
    assert rows.column(S.INPUT_ROW).to_pylist() == list(range(100)) + list(range(5)) * 2
    assert rows.column("prompt").to_pylist()[:100] == parti(100)


def test_validate_warns_about_a_large_text_file_and_says_how_to_shard(tmp_path, monkeypatch):
    from pipeline.spec.config import InputConfig

    pd.DataFrame({"prompt": parti(2000)}).to_csv(tmp_path / "big.csv", index=False)
    monkeypatch.setattr(units, "LARGE_TEXT_BYTES", 1000)
    plan = units.plan_units(InputConfig(url=str(tmp_path / "big.csv")))
    (advice,) = units.text_advice(plan, "csv")
    assert "big.csv is 0 MB of CSV: one task reads it as a stream" in advice
    assert "split it into files of about 16 MB" in advice and "input.id_column" in advice and "Parquet" in advice
    (advice,) = units.text_advice(plan, "json")
    assert "reads this JSON array whole" in advice and "write it as JSONL" in advice


# -- the job ---------------------------------------------------------------------------------




@pytest.mark.ray
@pytest.mark.timeout(400)
def test_duplicate_ids_across_files_and_units_name_the_first_row(ray_cluster, make_spec, tmp_path, monkeypatch):
    # Three files; row groups of 4 rows and units of 4 rows: every repeat below is in
    # another unit than its first row, one in another file too.
    folder = tmp_path / "table"
    folder.mkdir()
    prompts = parti(12)
    write_parquet(folder / "a.parquet", pd.DataFrame({"id": ["a0", "a1", "a2", "a3", "a4", "a1"], "prompt": prompts[:6]}), 4)
    write_parquet(folder / "b.parquet", pd.DataFrame({"id": ["b0", "a3", "b2", "b0"], "prompt": prompts[6:10]}), 4)
    write_parquet(folder / "c.parquet", pd.DataFrame({"id": ["c0", "a0"], "prompt": prompts[10:12]}), 4)
    monkeypatch.setattr(units, "UNIT_ROWS", 4)
    spec = make_spec({"url": str(folder), "format": "parquet", "id_column": "id"}, defaults={"width": 16, "height": 16, "steps": 1})
    assert len(units.plan_units(spec.input).units) >= 4

    from pipeline.batch.run import run

    summary = run(spec)
    assert (summary.input_rows, summary.images, summary.errors) == (12, 8, 4)
    errors = pd.read_parquet(Path(spec.output.url) / "errors")
    reasons = {f"{s}#{r}": m for s, r, m in zip(errors["source"], errors["row_index"], errors["error_message"])}
    assert reasons == {
        "a.parquet#5": "id 'a1' repeats the id of row a.parquet#1; ids must be unique",  # across units
        "b.parquet#1": "id 'a3' repeats the id of row a.parquet#3; ids must be unique",  # across files
        "b.parquet#3": "id 'b0' repeats the id of row b.parquet#0; ids must be unique",
        "c.parquet#1": "id 'a0' repeats the id of row a.parquet#0; ids must be unique",
    }


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_many_units_make_the_same_output_as_one_with_the_same_engine_actors(ray_cluster, make_spec, tmp_path, monkeypatch):
    from pipeline.batch.run import run

    n = 48
    table = write_parquet(tmp_path / "p.parquet", pd.DataFrame({"prompt": parti(n), "k": range(n)}), row_group_size=8)

    def one_run(name: str):
        spec = make_spec(
            {"url": table, "format": "parquet"},
            defaults={"width": 16, "height": 16, "steps": 1},
            output={"url": str(tmp_path / name), "rows_per_part": 12},
            runtime={"num_actors": 2, "batch_size": 4},
        )
        return spec, run(spec)

    whole_spec, whole = one_run("whole")
    monkeypatch.setattr(units, "UNIT_ROWS", 8)
    cut_spec, cut = one_run("cut")
    assert len(units.plan_units(cut_spec.input).units) == 6 and len(units.plan_units(whole_spec.input, unit_rows=10**6).units) == 1

    assert whole.images == cut.images == n
    a = pd.read_parquet(tmp_path / "whole" / "images").set_index("request_id").sort_index()
    b = pd.read_parquet(tmp_path / "cut" / "images").set_index("request_id").sort_index()
    assert list(a.index) == list(b.index) and a.index.is_unique
    assert list(a["sha256"]) == list(b["sha256"]), "the same rows must give the same pixels however the table is cut"
    assert list(a["k"]) == list(b["k"])
    # Six units, one pool of two engine actors: made once, used for every unit.
    assert b["actor_id"].nunique() <= 2
    # Parts hold rows_per_part rows: 48 rows in parts of 12.
    sizes = sorted(pq.read_metadata(p).num_rows for p in (tmp_path / "cut" / "images").iterdir())
    assert sizes == [12, 12, 12, 12]


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_a_run_folds_its_commit_records_in_groups_as_it_goes(ray_cluster, make_spec, tmp_path, monkeypatch):
    """A long run's block records become compacted records of about FOLD_IDS ids each (so
    no fold holds the whole run); the output reads exactly once and a rerun skips it all."""
    from pipeline.batch.run import run
    from pipeline.output.verify import verify
    from pipeline.storage import fold

    monkeypatch.setattr(fold, "FOLD_IDS", 20)  # groups are gathered on the driver
    n = 48
    table = write_parquet(tmp_path / "p.parquet", pd.DataFrame({"prompt": parti(n), "id": [f"r{i}" for i in range(n)]}), row_group_size=16)
    spec = make_spec(
        {"url": table, "format": "parquet", "id_column": "id"},
        defaults={"width": 16, "height": 16, "steps": 1},
        output={"url": str(tmp_path / "out"), "rows_per_part": 8},
        runtime={"num_actors": 2, "batch_size": 4},
    )
    assert run(spec).images == n
    (folder,) = (tmp_path / "out" / "_commits").iterdir()
    records = sorted(p.name for p in folder.iterdir())
    assert len(records) == 2 and all(name.startswith("compacted-") for name in records)  # 48 ids in parts of 8: 24 + 24
    report = verify(str(tmp_path / "out"))
    assert report.ok and report.images == n, report.format()
    assert run(spec).images == 0  # the rerun skips every id the folded records hold
