"""Issue #24: a dataset that stays right through what users do between runs. A run never
touches files imagegen did not write; a row keeps its identity through table edits; a row
is in exactly one place whatever changed between runs. Each through the real job."""

from __future__ import annotations

import pytest

from pipeline.errors import ForeignOutput
from pipeline.storage import filesystem


def _foreign_folder(fs, root: str) -> dict[str, bytes]:
    """What a mistyped output.url may point at: another dataset, a photo, a README."""
    files = {
        "images/holiday.jpg": b"\xff\xd8\xff a photo",
        "images/part-0.parquet": b"PAR1 another dataset",
        "errors/notes.parquet": b"PAR1 more of it",
        "README.md": b"# my dataset\n",
    }
    for name, data in files.items():
        filesystem.atomic_write(fs, filesystem.join(root, name), data)
    return files


@pytest.mark.ray
@pytest.mark.timeout(300)
@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("mode", ["incremental", "overwrite"])
def test_a_run_refuses_a_folder_imagegen_did_not_write(where, mode, ray_cluster, make_spec, tmp_path, request):
    from pipeline.batch.plan import make_plan
    from pipeline.batch.run import run

    (tmp_path / "p.csv").write_text("prompt\na cat\n")
    if where == "s3":
        fs, bucket, options = request.getfixturevalue("s3")
        root, output = f"{bucket}/out", {"url": f"s3://{bucket}/out", "storage_options": options}
    else:
        fs, root = filesystem.open_url(str(tmp_path / "out"))
        output = {"url": str(tmp_path / "out")}
    files = _foreign_folder(fs, root)
    spec = make_spec({"url": str(tmp_path / "p.csv")}, output={**output, "mode": mode})
    for attempt in (lambda: make_plan(spec, on_cluster=False), lambda: run(spec)):
        with pytest.raises(ForeignOutput) as caught:
            attempt()
        assert "is not an imagegen output" in str(caught.value) and "README.md, errors, images" in str(caught.value)
    left = {p[len(root) + 1 :]: filesystem.read_bytes(fs, p) for p in fs.find(root)}
    assert left == files, "nothing removed, replaced or added (not even a lock)"


def test_a_first_run_killed_while_writing_the_marker_leaves_a_folder_the_next_run_takes(tmp_path):
    """Found by the crash enumeration: a run killed between the marker's temporary write and
    its rename left only that file, and every later run refused the folder as foreign."""
    from pipeline.storage import ownership_marker

    out = tmp_path / "out"
    out.mkdir()
    (out / "._imagegen.json.0f1e2d3c4b5a69788796a5b4c3d2e1f0.tmp").write_bytes(b'{"imagegen_out')
    fs, root = filesystem.open_url(str(out))
    ownership_marker.check_output(fs, root, str(out))  # ours: nothing to refuse
    (out / ".notes.tmp").write_text("a user's file")
    with pytest.raises(ForeignOutput, match=r"\.notes\.tmp"):
        ownership_marker.check_output(fs, root, str(out))


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_the_card_never_replaces_a_readme_imagegen_did_not_write(ray_cluster, make_spec, tmp_path):
    from pipeline.batch.run import run

    (tmp_path / "p.csv").write_text("prompt\na cat\n")
    spec = make_spec({"url": str(tmp_path / "p.csv")})
    run(spec)
    out = tmp_path / "out"
    assert (out / "README.md").read_text().count("imagegen dataset card") == 1
    (out / "README.md").write_text("# our team's notes on this dataset\n")
    (out / "images" / "holiday.jpg").write_bytes(b"a photo")  # a foreign file in an output of ours
    with pytest.raises(ForeignOutput, match="images/holiday.jpg"):
        run(spec)
    (out / "images" / "holiday.jpg").unlink()
    summary = run(spec)
    assert (out / "README.md").read_text() == "# our team's notes on this dataset\n"
    assert "imagegen dataset card" in (out / "IMAGEGEN_CARD.md").read_text()
    assert any("README.md was not written by imagegen" in w for w in summary.warnings)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_row_made_once_and_rejected_later_stays_in_one_place(ray_cluster, make_spec, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.batch.run import run
    from pipeline.engine.resolve_catalog import build_catalog, place
    from pipeline.output.verify import verify
    from pipeline.spec import schema as S
    from pipeline.spec.occurrences import numbered
    from pipeline.spec.validate import Validator
    from pipeline.storage import part_files, tables

    (tmp_path / "p.csv").write_text("prompt,width\na wide cat,64\na small dog,32\n")
    first = make_spec({"url": str(tmp_path / "p.csv")})
    assert run(first).images == 2
    tightened = make_spec({"url": str(tmp_path / "p.csv")}, limits={"max_width": 32})
    summary = run(tightened)
    assert summary.errors == 1  # the run's verdict on the wide row, under today's spec...

    def ids(kind: str) -> list[str]:
        folder = tmp_path / "out" / kind
        return pq.read_table(folder).column(S.ID).to_pylist() if folder.is_dir() and any(folder.iterdir()) else []

    assert len(ids("images")) == 2 and not set(ids("images")) & set(ids("errors"))  # ...but its image stands
    report = verify(tightened.output.url, spec=tightened)
    assert report.ok, report.format()
    # verify sees an error row of a row with an image, whichever run wrote it.
    fs, root = filesystem.open_url(tightened.output.url)
    validator = Validator(tightened, place(build_catalog(tightened), None))
    rejected = validator.validate_table(next(numbered(tables.read_input(tightened.input), tightened.input)).slice(0, 1))
    for f in [*S.ENCODE_FIELDS, *S.GENERATION_FIELDS, *S.QUALITY_FIELDS]:  # as the engine hands it on
        rejected = rejected.append_column(f, pa.nulls(rejected.num_rows, f.type))
    part_files.write_block(fs, root, "run-later", rejected)
    report = verify(tightened.output.url)
    assert [v for v in report.violations if v.startswith("input rows both in the images and in the errors")], report.format()


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_row_keeps_its_identity_when_other_rows_are_inserted_reordered_or_the_file_renamed(ray_cluster, make_spec, tmp_path):
    import pyarrow.parquet as pq

    from pipeline.batch.plan import make_plan
    from pipeline.batch.run import run
    from pipeline.output.ownership import prune
    from pipeline.output.verify import verify
    from pipeline.spec import schema as S

    table = tmp_path / "table"
    table.mkdir()
    (table / "p.csv").write_text("prompt,width\na cat,32\na dog,\na cat,32\n")
    spec = make_spec({"url": str(table), "format": "csv"})
    assert run(spec).images == 3
    before = pq.read_table(tmp_path / "out" / "images").select([S.ID, S.SEED, S.SHA256]).to_pylist()
    # Another file name, a row inserted at the top, the rows reordered, a width written as 32.0.
    (table / "p.csv").unlink()
    (table / "renamed.csv").write_text("prompt,width\na new bird,\na cat,32.0\na cat,32\na dog,\n")
    summary = run(spec)
    assert summary.images == 1, "only the new row is made"
    after = pq.read_table(tmp_path / "out" / "images").select([S.ID, S.SEED, S.SHA256]).to_pylist()
    assert len(after) == 4 and all(image in after for image in before)
    report = verify(spec.output.url, spec=spec)
    assert report.ok, report.format()
    # A row removed leaves its image owned by no row: validate says so, prune removes it (a dry run first).
    (table / "renamed.csv").write_text("prompt,width\na new bird,\na cat,32.0\na dog,\n")
    assert any("1 image(s) that no row of the current input owns" in w for w in make_plan(spec, on_cluster=False).warnings)
    assert prune(spec, dry_run=True).images == 1 and pq.read_table(tmp_path / "out" / "images").num_rows == 4
    assert prune(spec).images == 1
    kept = pq.read_table(tmp_path / "out" / "images").select([S.ID, S.SEED, S.SHA256]).to_pylist()
    assert len(kept) == 3 and all(image in after for image in kept)
    report = verify(spec.output.url, spec=spec)
    assert report.ok, report.format()


def test_an_output_made_by_position_is_not_made_again_by_content(make_spec, tmp_path):
    import json

    from pipeline.batch.plan import make_plan
    from pipeline.errors import SpecError

    (tmp_path / "p.csv").write_text("prompt\na cat\n")
    runs = tmp_path / "out" / "_runs"
    runs.mkdir(parents=True)
    manifest = {"run_id": "r1", "status": "complete", "request_id_scheme": 2, "spec": {"input": {"url": str(tmp_path / "p.csv")}},
                "parts": [{"path": "images/part-r1-a-b.parquet", "rows": 5, "bytes": 1, "sha256": "0"}]}  # fmt: skip
    (runs / "r1.json").write_text(json.dumps(manifest))
    with pytest.raises(SpecError, match=r"identified by file and position .* none of its 5 image\(s\) would be recognised"):
        make_plan(make_spec({"url": str(tmp_path / "p.csv")}), on_cluster=False)
    kept = make_spec({"url": str(tmp_path / "p.csv"), "identity": "position"})
    assert make_plan(kept, on_cluster=False).rows == 1  # the choice that keeps extending it as it was made


def test_a_rows_content_is_the_same_in_every_format_and_counts_in_table_order():
    import pyarrow as pa

    from pipeline.spec import schema as S
    from pipeline.spec.config import InputConfig
    from pipeline.spec.occurrences import Occurrences, content_digest, content_keys, numbered

    inp = InputConfig(url="t.csv", columns={"steps": "n_steps"})
    as_csv = {"prompt": "a cat", "width": "64", "n_steps": " 4 ", "negative_prompt": "", "note": "kept apart"}
    as_parquet = {"prompt": "a cat", "width": 64.0, "n_steps": 4, "note": "another note"}
    assert content_digest(as_csv, inp) == content_digest(as_parquet, inp)  # text, float, int; empty = absent; pass-through not content
    assert content_digest({**as_parquet, "width": 65}, inp) != content_digest(as_parquet, inp)
    assert content_digest({"prompt": "a cat "}, inp) != content_digest({"prompt": "a cat"}, inp)  # a prompt's text is kept exactly
    counter = Occurrences()
    d3, d7, d9 = (f"{n:032x}" for n in (3, 7, 9))
    assert counter.number(content_keys([d7, d3, d7, d7])).tolist() == [0, 0, 1, 2]
    assert counter.number(content_keys([d3, d9, d7])).tolist() == [1, 0, 3]  # counts go on across batches
    chunks = [pa.Table.from_pylist([{"prompt": p, S.INPUT_SOURCE: "t.csv", S.INPUT_ROW: i} for i, p in enumerate(["a", "b", "a"])])]
    out = pa.concat_tables(numbered(chunks, inp))
    assert out.column(S.INPUT_OCCURRENCE).to_pylist() == [0, 0, 1]
