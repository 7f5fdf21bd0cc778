"""Nothing committed is lost at any step: the crash harness (tests/crash_steps.py) at a
sample of steps, and the crashes that used to lose images, each on local disk and on S3
(moto through s3fs). Every step is tried by benchmarks/crash_steps.py."""

from __future__ import annotations

import random

import pytest
import s3fs

import crash_steps as C
from crash_steps import Output, stream_block
from pipeline.output import verify
from pipeline.storage import commit_protocol, filesystem, fold, part_files, repair, supersede, trash

RUN_A = "20260101T000000Z-aaaaaaaa"
RUN_B = "20260102T000000Z-bbbbbbbb"
# Steps tried in the suite (the benchmark tries all): on local disk a few per scenario and
# mode; on S3 (a try is a few hundred requests to moto) one, on the scenario that rewrites.
SAMPLES = {"local": 2, "s3": 1}


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path) -> Output:
    if request.param == "local":
        return Output(str(tmp_path / "out"), {})
    fs, bucket, options = request.getfixturevalue("s3")
    return Output(f"s3://{bucket}/out", options)


SAMPLED = [
    *((backend, s, mode) for backend in ("local",) for s in C.SCENARIOS for mode in ("stop", "fail once")),
    ("s3", C.SCENARIOS[1], "stop"),
]


@pytest.mark.parametrize("backend,scenario,mode", SAMPLED, ids=lambda v: getattr(v, "name", v))
def test_a_run_stopped_or_failing_at_a_step_loses_nothing_when_run_again(request, tmp_path, backend, scenario, mode):
    if backend == "local":
        output = Output(str(tmp_path / "out"), {})
    else:
        _, bucket, options = request.getfixturevalue("s3")
        output = Output(f"s3://{bucket}/out", options)
    steps = C.count_steps(output, scenario)
    # Seeded by the scenario: the same steps on every run of the suite, different across scenarios.
    for k in random.Random(f"{scenario.name}/{mode}").sample(range(1, steps + 1), SAMPLES[backend]):
        outcome = C.try_step(output, scenario, **({"stop_at": k} if mode == "stop" else {"fail_at": k}))
        assert outcome.problems == [], f"step {k} of {steps}"


def _files(fs, root: str) -> dict[str, bytes]:
    prefix = root.rstrip("/") + "/"
    return {p[len(prefix) :]: fs.cat_file(p) for p in fs.find(root)}


def _restore(fs, root: str, files: dict[str, bytes]) -> None:
    for relative, data in files.items():
        path = filesystem.join(root, relative)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, data)


def _images_committed(fs, root: str) -> int:
    found = commit_protocol.read_commits(fs, root)
    return sum(p.rows for p in found.parts.values() if p.kind == "images")


def _next_run(fs, root: str) -> None:
    """What the next run does to the output before and after its own rows: repair, rewrite."""
    repair.repair(fs, root, commit_protocol.read_commits(fs, root))
    supersede.supersede_errors(fs, root)
    repair.repair(fs, root, commit_protocol.read_commits(fs, root))


def _run(fs, root: str, run_id: str, blocks: list[range], failed: set[int] = frozenset()) -> None:
    """A complete run: its blocks, each committed, then its manifest."""
    written = part_files.WriteReport()
    for rows in blocks:
        written.add(part_files.write_block(fs, root, run_id, stream_block(rows, failed=set(failed))))
    part_files.write_manifest(fs, root, run_id, {"run_id": run_id, "status": "complete", "parts": written.parts, "counts": {}})


def test_item1_a_rewrite_of_error_parts_stopped_before_the_old_part_goes_loses_no_image(output):
    """Issue 26, item 1: an error-part rewrite stopped after its old record went but
    before its old part did (or that delete failing once on S3), with the manifests still
    listing the old part. The next run must keep every committed image, in every variant
    of names (which decide the order records are read in)."""
    fs, root = output.open()
    for variant in range(4) if output.url.startswith("/") else [0]:
        base = filesystem.join(root, str(variant))
        run_a, run_b = f"20260101T000000Z-{variant:08x}", f"20260102T000000Z-{variant:08x}"
        # Two failed rows a block, one of which run B makes: the rewritten error parts keep a row.
        _run(fs, base, run_a, [range(variant * 100 + at, variant * 100 + at + 8) for at in (0, 8)], failed={variant * 100 + r for r in (3, 5, 10, 12)})
        _run(fs, base, run_b, [range(variant * 100 + 3, variant * 100 + 4), range(variant * 100 + 10, variant * 100 + 11)])
        before = _files(fs, base)
        supersede.supersede_errors(fs, base)
        after = _files(fs, base)
        # The state the old order left: the new parts and records written, the old record gone,
        # the old error part and the old manifests still there.
        old_records = [n for n in before if n.startswith("_commits/") and n not in after]
        fs.rm(base, recursive=True)
        _restore(fs, base, {**before, **{n: d for n, d in after.items() if n not in before and not n.startswith(trash.TRASH_DIR)}})
        for name in old_records:
            fs.rm(filesystem.join(base, name))
        _next_run(fs, base)
        assert _images_committed(fs, base) == 14, variant  # 12 of run A, 2 of run B
        assert verify.verify(f"{output.url}/{variant}", output.options).ok, variant


def test_item2_a_repair_stopped_between_record_and_parts_leaves_a_usable_output(output):
    """Issue 26, item 2: a truncated part; the repair removed its record and was stopped
    before the part. Every later run and ``verify`` must still read the output (no raw
    ArrowInvalid), and the next run makes only that part's rows again."""
    fs, root = output.open()
    _run(fs, root, RUN_A, [range(0, 8), range(8, 16)])
    found = commit_protocol.read_commits(fs, root)
    victim = found.records[-1]
    part = victim.parts[0].path
    fs.pipe_file(filesystem.join(root, part), fs.cat_file(filesystem.join(root, part))[:100])
    fs.rm(filesystem.join(root, victim.name))  # the repair's first step, then the kill
    again = commit_protocol.read_commits(fs, root)  # raised ArrowInvalid
    assert not verify.verify(output.url, output.options).ok  # a finding, not a crash
    repair.repair(fs, root, again)
    assert len(commit_protocol.read_commits(fs, root).ids()) == 8
    assert verify.verify(output.url, output.options).ok


def test_item4_one_missing_part_costs_its_rows_never_its_folded_records_other_parts(output):
    """Issue 26, item 4: block records folded into one, one part file removed: the next
    run keeps the 9 healthy parts (and makes 16 rows again), never all 160."""
    fs, root = output.open()
    names = [part_files.write_block(fs, root, RUN_A, stream_block(range(at, at + 16))).records[0] for at in range(0, 160, 16)]
    folded = fold.compact(fs, root, RUN_A, names)
    fs.rm(filesystem.join(root, folded.parts[7].path))
    found = commit_protocol.read_commits(fs, root)
    assert found.dropped_rows == 16
    repair.repair(fs, root, found)
    after = commit_protocol.read_commits(fs, root)
    assert len(after.ids()) == 144 and len(after.parts) == 9
    assert all(fs.exists(filesystem.join(root, p.path)) for p in folded.parts if p.path != folded.parts[7].path)
    assert verify.verify(output.url, output.options).ok


def test_item5_a_fold_retried_after_a_partial_removal_loses_no_image(output):
    """Issue 26, item 5: a fold whose worker died after writing the folded record and
    removing one of the records it folded, retried by Ray; then a later run retries the
    failed rows and rewrites the error parts; then the run after. No image is lost and no
    two accepted records share a part, in every variant of names (which decide the order
    records are read in)."""
    fs, root = output.open()
    for variant in range(4) if output.url.startswith("/") else [2]:  # variant 2's records shared parts before
        base = filesystem.join(root, str(variant))
        run_a, run_b = f"20260101T000000Z-{variant:08x}", f"20260102T000000Z-{variant:08x}"
        reports = [part_files.write_block(fs, base, run_a, stream_block(range(at, at + 8), failed={at + 2})) for at in range(0, 32, 8)]
        names = [r.records[0] for r in reports]
        inputs = {n: fs.cat_file(filesystem.join(base, n)) for n in names}
        fold.compact(fs, base, run_a, names)
        _restore(fs, base, {n: d for n, d in inputs.items() if n != names[0]})  # died after removing the first
        fold.compact(fs, base, run_a, names)  # Ray's retry
        part_files.write_manifest(fs, base, run_a, {"run_id": run_a, "status": "complete", "parts": [p for r in reports for p in r.parts], "counts": {}})
        found = commit_protocol.read_commits(fs, base)
        listed = [p.path for r in found.records for p in r.parts]
        assert len(listed) == len(set(listed)), f"accepted records share a part (variant {variant})"
        _run(fs, base, run_b, [range(2, 3), range(10, 11), range(18, 19), range(26, 27)])
        for _ in range(2):
            _next_run(fs, base)
        assert _images_committed(fs, base) == 32, variant
        assert verify.verify(f"{output.url}/{variant}", output.options).ok, variant


def test_item8_a_listing_seen_earlier_in_the_process_does_not_decide_a_removal(s3):
    """Issue 26, item 8: s3fs answered ``isdir`` from the listing an earlier
    ``read_commits`` cached, so the removal of a retried write's leftover saw nothing.
    The leftover must go whatever this process listed before."""
    _, bucket, options = s3
    url = f"s3://{bucket}/out"
    fs, root = filesystem.open_url(url, options)
    _run(fs, root, RUN_A, [range(0, 4)])
    commit_protocol.read_commits(fs, root)  # lists the output: RUN_B has no records yet
    other = s3fs.S3FileSystem(**options, skip_instance_cache=True)  # the write tasks' processes
    first = part_files.write_block(other, root, RUN_B, stream_block(range(4, 8)))  # its attempt Ray retried
    kept = part_files.write_block(other, root, RUN_B, stream_block(range(4, 12)))
    fold.compact(other, root, RUN_B, kept.records)
    assert fold.remove_leftovers(fs, root, RUN_B, set(kept.records)) == first.records
    assert not fs.exists(filesystem.join(root, first.records[0]))


def test_what_a_repair_sets_aside_waits_in_the_trash_until_vacuumed(output):
    """Deletion is deferred: a part without a record goes to ``_trash/``, shown by
    ``verify``; ``purge`` (``imagegen vacuum``) deletes it, a dry run only says what."""
    fs, root = output.open()
    _run(fs, root, RUN_A, [range(0, 4)])
    images, _ = part_files.split(stream_block(range(4, 8)), RUN_A)
    orphan = part_files.write_part(fs, root, "images", RUN_A, images)
    repair.repair(fs, root, commit_protocol.read_commits(fs, root))
    waiting = trash.waiting(fs, root)
    assert [f.split("/", 2)[2] for f in waiting.files] == [orphan.path]
    report = verify.verify(output.url, output.options)
    assert report.ok and report.trash_files == 1
    assert trash.purge(fs, root, older_than_s=3600) == []  # younger than the retention
    assert trash.purge(fs, root, dry_run=True) == waiting.files and trash.waiting(fs, root).files == waiting.files
    assert trash.purge(fs, root) == waiting.files and trash.waiting(fs, root).files == []


def test_imagegen_vacuum_deletes_what_waits_in_the_trash(tmp_path, capsys):
    from pipeline.cli import main

    fs, root = filesystem.open_url(str(tmp_path / "out"))
    _run(fs, root, RUN_A, [range(0, 4)])
    images, _ = part_files.split(stream_block(range(4, 8)), RUN_A)
    part_files.write_part(fs, root, "images", RUN_A, images)
    repair.repair(fs, root, commit_protocol.read_commits(fs, root))
    assert main(["vacuum", root, "--dry-run"]) == 0
    assert "would delete 1 file(s)" in capsys.readouterr().out and len(trash.waiting(fs, root).files) == 1
    assert main(["vacuum", root]) == 0
    assert "deleted 1 file(s)" in capsys.readouterr().out and trash.waiting(fs, root).files == []
