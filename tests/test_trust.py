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
