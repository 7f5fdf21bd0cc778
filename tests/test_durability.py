"""Durable progress, on the storage side: each block committed by a record as it lands,
and what a rerun adopts, drops or removes. Real files, real Parquet; no Ray except where a
Ray task reads the shared skip filter."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipeline.spec import schema as S
from pipeline.storage import filesystem, fold, part_files, record_format, skip_filter
from pipeline.storage.commit_protocol import read_commits
from pipeline.storage.repair import Recovery, repair
from pipeline.storage.skip_filter import CommittedIds, SkipFilter

RUN = "20260101T000000Z-aaaaaaaa"


def rid(i: int) -> str:
    return hashlib.sha256(f"request {i}".encode()).hexdigest()[:32]


def stream_block(ids: range, failed: set[int] = frozenset(), stage: str = S.STAGE_GENERATE) -> pa.Table:
    """A block as the datasink receives it: request, error, encode and generation columns."""
    n = len(ids)
    fields = [*S.REQUEST_FIELDS, *S.ERROR_FIELDS, *S.ENCODE_FIELDS, *S.GENERATION_FIELDS, *S.QUALITY_FIELDS]
    columns = {f.name: pa.nulls(n, f.type) for f in fields}
    columns[S.REQUEST_ID] = pa.array([rid(i) for i in ids])
    columns[S.ID] = pa.array([str(i) for i in ids])
    columns[S.IMAGE_INDEX] = pa.array([0] * n, pa.int32())
    columns[S.PROMPT] = pa.array([f"prompt {i}" for i in ids])
    columns[S.ERROR_STAGE] = pa.array([stage if i in failed else None for i in ids], pa.string())
    images = [None if i in failed else {"bytes": f"png {i}".encode(), "path": None} for i in ids]
    columns[S.IMAGE] = pa.array(images, S.IMAGE_TYPE)
    columns[S.SHA256] = pa.array([None if i in failed else hashlib.sha256(f"png {i}".encode()).hexdigest() for i in ids])
    return pa.table(columns, schema=pa.schema(fields))


@pytest.fixture
def out(tmp_path):
    fs, root = filesystem.open_url(str(tmp_path / "out"))
    return fs, root


def images_on_disk(root: str) -> pd.DataFrame:
    return pd.read_parquet(Path(root) / "images")


def test_a_block_is_committed_by_its_record_and_read_back(out):
    fs, root = out
    report = part_files.write_block(fs, root, RUN, stream_block(range(0, 16), failed={3}))
    assert len(report.records) == 1 and len(report.parts) == 2
    found = read_commits(fs, root)
    assert [r.name for r in found.records] == report.records
    assert not (found.orphans or found.dropped or found.superseded)
    assert found.runs()[RUN].images == 15 and found.runs()[RUN].errors == 1
    ids = found.ids()
    # Images are skipped by a rerun; a row that failed in generation is tried again.
    assert ids.contains([rid(0), rid(3), rid(15), rid(16)]).tolist() == [True, False, True, False]


def test_a_part_written_without_its_record_is_removed_and_made_again(out):
    """A kill between a part and its record: the part is an orphan, never adopted."""
    fs, root = out
    part_files.write_block(fs, root, RUN, stream_block(range(0, 16)))
    images, _ = part_files.split(stream_block(range(16, 32)), RUN)
    orphan = part_files.write_part(fs, root, record_format.IMAGES_DIR, RUN, images)  # the kill lands here
    half = Path(root) / "_commits" / RUN / ".record.commit.0123.tmp"  # or here, mid-record
    half.write_bytes(b"IGCOMMIT2 ")
    found = read_commits(fs, root)
    assert found.orphans == [orphan.path]
    assert not found.ids().contains([rid(20)])[0]
    recovery = repair(fs, root, found)
    assert recovery.removed_parts == [orphan.path]
    assert len(images_on_disk(root)) == 16 and not half.exists()


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_damaged_part_costs_its_own_rows_never_its_records_other_parts(out, damage):
    fs, root = out
    part_files.write_block(fs, root, RUN, stream_block(range(0, 16)))
    hurt = part_files.write_block(fs, root, RUN, stream_block(range(16, 32), failed={20}))
    path = Path(root) / hurt.parts[0]["path"]
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    else:
        path.unlink()
    found = read_commits(fs, root)
    ((part, reason),) = found.damaged
    assert part == hurt.parts[0]["path"]
    assert ("has 100 bytes" if damage == "truncate" else "is missing") in reason
    assert found.dropped_rows == 15 and not found.dropped
    recovery = repair(fs, root, found)
    # The damaged part's 15 rows are made again; the record's errors part stays committed,
    # under a record rewritten without the damaged part.
    assert recovery.rows_made_again == 15
    assert (Path(root) / hurt.parts[1]["path"]).exists()
    assert not (Path(root) / hurt.records[0]).exists()
    assert not path.exists()
    again = read_commits(fs, root)
    assert not (again.dropped or again.orphans or again.damaged) and len(again.ids()) == 16
    assert hurt.parts[1]["path"] in again.parts


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_a_corrupt_record_is_dropped_and_its_parts_removed(out, damage):
    fs, root = out
    good = part_files.write_block(fs, root, RUN, stream_block(range(0, 16)))
    bad = part_files.write_block(fs, root, RUN, stream_block(range(16, 32)))
    path = Path(root) / bad.records[0]
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) - 9], "flip": data[:-1] + bytes([data[-1] ^ 1]), "empty": b""}[damage])
    found = read_commits(fs, root)
    assert [n for n, _ in found.dropped] == bad.records
    assert [r.name for r in found.records] == good.records
    assert sorted(found.orphans) == sorted(p["path"] for p in bad.parts)
    repair(fs, root, found)
    assert len(images_on_disk(root)) == 16
    assert read_commits(fs, root).dropped == []


def test_a_retried_write_with_another_block_composition_counts_once(out):
    """Ray retried a write and the retry's blocks hold other rows: the records overlap. On
    read the first record wins whole; the end of the run keeps the one that succeeded."""
    fs, root = out
    first = part_files.write_block(fs, root, RUN, stream_block(range(0, 16)))
    retry = part_files.write_block(fs, root, RUN, stream_block(range(8, 24)))
    other = part_files.write_block(fs, root, RUN, stream_block(range(24, 40)))
    found = read_commits(fs, root)
    winner = min(first.records + retry.records, key=lambda n: (n.rsplit("/", 1)[-1]))
    loser = ({*first.records, *retry.records} - {winner}).pop()
    assert found.superseded == [loser]
    committed = [p for r in found.records for p in r.parts]
    assert sum(p.rows for p in committed) == 32  # 16 of the winner, 16 of the other block
    all_ids = np.concatenate([p.final for p in committed])
    assert len(np.unique(all_ids)) == len(all_ids)
    repair(fs, root, found)
    on_disk = images_on_disk(root)
    assert on_disk["request_id"].is_unique and len(on_disk) == 32  # pandas sees each id once

    # The same state, but the run finished: the writes Ray reported (retry, other) count.
    fs2, root2 = filesystem.open_url(root + "-finished")
    first = part_files.write_block(fs2, root2, RUN, stream_block(range(0, 16)))
    retry = part_files.write_block(fs2, root2, RUN, stream_block(range(8, 24)))
    other = part_files.write_block(fs2, root2, RUN, stream_block(range(24, 40)))
    merged = fold.compact(fs2, root2, RUN, retry.records + other.records)
    assert {p.path for p in merged.parts} == {p["path"] for p in retry.parts + other.parts}
    assert fold.remove_leftovers(fs2, root2, RUN, set(retry.records + other.records)) == first.records
    found = read_commits(fs2, root2)
    assert [r.name for r in found.records] == [merged.name] and not found.orphans
    on_disk = images_on_disk(root2)
    assert sorted(on_disk["id"].astype(int)) == list(range(8, 40))


def test_a_long_run_is_folded_in_groups_and_its_retried_writes_leftovers_go_at_its_end(out, monkeypatch):
    """Records are folded FOLD_IDS ids at a time as the run goes (each fold reading only its
    own records), so a long run's records stay few and no fold holds the whole run."""
    fs, root = out
    monkeypatch.setattr(fold, "FOLD_IDS", 40)
    groups, folded, kept = fold.FoldGroups(), [], []
    for k in range(0, 160, 16):  # ten block writes of 16 ids
        report = part_files.write_block(fs, root, RUN, stream_block(range(k, k + 16)))
        kept += report.records
        full = groups.add(report.records, report.images + report.errors)
        assert len(full) in (0, 3)  # a group is full at 48 >= 40 ids
        folded.append(fold.compact(fs, root, RUN, full))
    folded.append(fold.compact(fs, root, RUN, groups.rest()))
    merged = [r for r in folded if r is not None]
    assert [sum(p.rows for p in r.parts) for r in merged] == [48, 48, 48, 16]
    # The first attempt of a retried write, which Ray never reported: its ids are in the third group.
    leftover = part_files.write_block(fs, root, RUN, stream_block(range(100, 108)))
    assert fold.remove_leftovers(fs, root, RUN, set(kept)) == leftover.records
    assert fold.remove_leftovers(fs, root, RUN, set(kept)) == []
    found = read_commits(fs, root)
    assert sorted(r.name for r in found.records) == sorted(r.name for r in merged)
    assert len(found.ids()) == 160 and not (found.orphans or found.superseded or found.redundant)
    assert sorted(images_on_disk(root)["id"].astype(int)) == list(range(160))


def test_a_crash_during_compaction_leaves_redundant_records_only(out):
    fs, root = out
    blocks = [part_files.write_block(fs, root, RUN, stream_block(range(k, k + 16))) for k in (0, 16)]
    names = [n for b in blocks for n in b.records]
    merged = fold.compact(fs, root, RUN, names)
    # Put a block record back: as if the driver died between the compacted record and the removals.
    fs.pipe_file(filesystem.join(root, names[0]), record_format.encode_record(record_format.Record(names[0], RUN, 0.0, merged.parts[:1], {})))
    found = read_commits(fs, root)
    assert found.redundant == [names[0]] and [r.name for r in found.records] == [merged.name]
    assert len(found.ids()) == 32 and not found.orphans


def test_an_output_from_before_commit_records_is_adopted_not_deleted(out):
    """Parts listed only by a run manifest (the old layout) stay committed, and get records."""
    fs, root = out
    report = part_files.write_block(fs, root, RUN, stream_block(range(0, 16)))
    for name in report.records:
        fs.rm(filesystem.join(root, name))
    part_files.write_manifest(fs, root, RUN, {"run_id": RUN, "status": "complete", "parts": report.parts, "counts": {"images": 16}})
    found = read_commits(fs, root)
    assert not found.orphans and len(found.ids()) == 16 and found.legacy
    recovery = repair(fs, root, found)
    assert recovery.migrated_runs == [RUN] and not recovery.removed_parts
    again = read_commits(fs, root)
    assert not again.legacy and len(again.ids()) == 16


def test_the_skip_filter_holds_100k_committed_ids_whole_in_16_bytes_each(out):
    fs, root = out
    for start in range(0, 100_000, 25_000):
        part_files.write_block(fs, root, RUN, stream_block(range(start, start + 25_000)))
    found = read_commits(fs, root)
    skip = found.ids()
    assert len(skip) == 100_000 and skip.nbytes == 1_600_000 and skip.keys.dtype == np.dtype("S16")
    probe = pa.array([rid(i) for i in range(50_000, 150_000)])
    held = skip.contains(probe)
    assert held[:50_000].all() and not held[50_000:].any()
    assert rid(99_999) in skip and rid(100_000) not in skip


def test_id_keys_are_the_request_ids_own_bytes_and_other_strings_are_hashed_whole():
    ids = pa.array([rid(1), "not-a-request-id", None, rid(2), "0" * 31 + "1", "0" * 32])
    keys = skip_filter.id_keys(ids)
    assert keys.view(np.uint8).reshape(-1, 16)[0].tobytes() == bytes.fromhex(rid(1))
    assert keys.view(np.uint8).reshape(-1, 16)[5].tobytes() == bytes(16)  # all zero bytes is a key too
    assert len(set(keys.tolist())) == 6
    assert (skip_filter.id_keys(pa.chunked_array([ids.slice(0, 2), ids.slice(2)])) == keys).all()
    assert skip_filter.key_prefixes(keys)[0] == int(rid(1)[:16], 16)


def test_the_shared_skip_filter_reaches_ray_tasks_as_a_reference(ray_cluster):
    import pickle

    import ray

    from pipeline.batch.shared_skip_filter import SharedSkipFilter

    committed = CommittedIds.from_ids([rid(i) for i in range(100_000)])
    shared = SharedSkipFilter.put(SkipFilter(committed, skip_filter.key_prefixes(skip_filter.id_keys([rid(7)]))))
    assert len(pickle.dumps(shared)) < 2_000  # two object refs, not 1.6 MB of ids

    @ray.remote(num_cpus=0.1)
    def probe(skip, ids):
        return skip.contains(ids).tolist(), skip.adopted(ids), skip.committed.keys.flags.writeable

    held, adopted, writeable = ray.get(probe.remote(shared, [rid(7), rid(99_999), rid(100_000)]))
    assert held == [True, True, False] and adopted == 1
    assert not writeable  # a read-only view of the object store's copy


def test_the_job_prepares_its_output_in_a_task_and_keeps_the_skipped_ids_off_the_driver(ray_cluster, make_spec, out):
    """A rerun after a crash: the prepare task adopts the dead run and removes its orphan
    part; the driver logs what it did, and gets the ids to skip as object refs only."""
    import ray

    from pipeline.engine.resolve_catalog import build_catalog
    from pipeline.batch.run import prepare
    from pipeline.storage.lock import OutputLock

    fs, root = out
    for start in range(0, 32, 16):
        part_files.write_block(fs, root, RUN, stream_block(range(start, start + 16)))
    images, _ = part_files.split(stream_block(range(32, 48)), RUN)
    part_files.write_part(fs, root, record_format.IMAGES_DIR, RUN, images)  # the crash came before its record
    spec = make_spec({"url": "unused.csv"}, output={"mode": "incremental"})
    logged = logging.Handler()
    logged.emit = lambda record: said.append(record.getMessage())
    said: list[str] = []
    logging.getLogger("pipeline.batch.run").addHandler(logged)
    held = OutputLock.acquire(fs, root, "20260102T000000Z-bbbbbbbb", spec.output.url)  # as the job holds it
    try:
        prepared, skip = prepare(spec, held.run_id, 0.0, build_catalog(spec))
    finally:
        held.release()
        logging.getLogger("pipeline.batch.run").removeHandler(logged)
    assert prepared.interrupted == [RUN] and len(prepared.recovery.removed_parts) == 1
    assert f"adopting what interrupted run(s) {RUN} committed" in said
    assert "set aside 1 part(s) without a commit record, left by an interrupted run (_trash/, deleted after output.retention_hours)" in said
    assert len(skip) == 32 and skip.committed is None  # nothing of the ids was read here

    @ray.remote(num_cpus=0.1)
    def probe(skip, ids):
        return skip.contains(ids).tolist(), skip.adopted(ids)

    assert ray.get(probe.remote(skip, [rid(0), rid(31), rid(32)])) == ([True, True, False], 2)


def test_inspect_shows_runs_running_and_interrupted_from_their_commit_records(out):
    from pipeline.output.inspect import format_inspection, inspect_output

    fs, root = out
    dead, live = "20260101T000000Z-dead0000", "20260101T010000Z-live0000"
    part_files.write_manifest(fs, root, dead, part_files.start_manifest(dead, 1000.0, {}, "f"))
    part_files.write_block(fs, root, dead, stream_block(range(0, 16)))
    part_files.write_manifest(fs, root, live, part_files.start_manifest(live, 2000.0, {}, "f"))
    for start in (16, 32):
        part_files.write_block(fs, root, live, stream_block(range(start, start + 16), failed={start}))
    images, _ = part_files.split(stream_block(range(48, 64)), live)
    part_files.write_part(fs, root, record_format.IMAGES_DIR, live, images)  # in flight: no record yet
    lock = {"run_id": live, "host": "elsewhere", "pid": 1, "acquired_at": 2000.0, "expires_at": 9e12}
    fs.pipe_file(filesystem.join(root, "_lock.json"), json.dumps(lock).encode())

    found = inspect_output(root)
    assert [(r.run_id, r.status, r.images, r.errors) for r in found.runs] == [(dead, "interrupted", 16, 0), (live, "running", 30, 2)]
    assert (found.images, found.errors, found.uncommitted_parts) == (46, 2, 1)
    running = found.running
    assert running.images_per_second() == pytest.approx(30 / (running.last_commit_at - 2000.0))
    text = format_inspection(found)
    assert "runs       2 (1 running, 1 interrupted)" in text
    assert "the next run into this output adopts its committed parts" in text
    assert f"running    {live}: " in text and "images/s committed" in text and "ETA: give --spec SPEC" in text
    assert "1 without a commit record" in text


def test_verify_names_what_a_crash_left_and_is_clean_once_a_run_repaired_it(out):
    from pipeline.output.verify import verify

    fs, root = out
    part_files.write_block(fs, root, RUN, stream_block(range(0, 16)))
    part_files.write_block(fs, root, RUN, stream_block(range(8, 24)))  # a retried write, other composition
    images, _ = part_files.split(stream_block(range(24, 40)), RUN)
    part_files.write_part(fs, root, record_format.IMAGES_DIR, RUN, images)  # killed before its record
    report = verify(root)
    problems = " | ".join(report.violations)
    assert "commit records superseded by an earlier one" in problems
    assert "parts without a commit record" in problems
    assert "request ids with more than one image" in problems  # what pandas would read now

    repair(fs, root, read_commits(fs, root))
    report = verify(root)
    assert report.ok, report.format()
    assert report.images == 16


def test_verify_finds_a_committed_part_whose_bytes_changed_at_the_same_size(out):
    """Adoption checks a part's size (what a crash damages); verify also checks its digest."""
    from pipeline.output.verify import verify

    fs, root = out
    block = part_files.write_block(fs, root, RUN, stream_block(range(0, 16)))
    path = Path(root) / block.parts[0]["path"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert not read_commits(fs, root).dropped  # same size: adopted as it is
    assert "parts whose bytes do not match their commit record's sha256" in " ".join(verify(root).violations)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_spec_changed_after_a_crash_adopts_only_what_it_would_make(ray_cluster, make_spec, tmp_path):
    """Rows 0-3 set their own steps, rows 4-7 take the default. The first run committed all
    eight and died before finishing; the rerun's spec changes the default steps: it adopts
    rows 0-3 (same request ids), makes 4-7 anew, and the first run's 4-7 stay its data."""
    from pipeline.batch.run import run
    from pipeline.output.inspect import inspect_output
    from pipeline.output.verify import verify

    rows = [{"prompt": f"a lighthouse number {i}", "steps": 2 if i < 4 else None} for i in range(8)]
    pd.DataFrame(rows).to_csv(tmp_path / "t.csv", index=False)
    first = make_spec({"url": str(tmp_path / "t.csv")}, output={"rows_per_part": 2, "mode": "incremental"})
    crashed = run(first)
    out = Path(first.output.url)
    manifest_path = out / "_runs" / f"{crashed.run_id}.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "status": "running"}))  # as a killed run leaves it

    changed = make_spec({"url": str(tmp_path / "t.csv")}, defaults={"steps": 3}, output={"rows_per_part": 2, "mode": "incremental"})
    rerun = run(changed)
    assert (rerun.images, rerun.adopted, rerun.adopted_from) == (4, 4, [crashed.run_id])
    manifests = {p.stem: json.loads(p.read_text()) for p in (out / "_runs").glob("*.json")}
    assert manifests[crashed.run_id]["status"] == "interrupted" and manifests[crashed.run_id]["adopted_by"] == rerun.run_id
    assert manifests[crashed.run_id]["counts"]["images"] == 8  # its data, kept as its own
    assert manifests[rerun.run_id]["counts"]["images"] == 4
    assert manifests[rerun.run_id]["adopted"] == {"requests": 4, "from_runs": [crashed.run_id]}
    report = verify(str(out), spec=changed)
    assert report.ok, report.format()
    on_disk = images_on_disk(str(out))
    assert len(on_disk) == 12 and on_disk["request_id"].is_unique
    assert inspect_output(str(out), spec=changed).spec_left == 0
    # A later run finds nothing to adopt: the rerun completed and took the crashed run over.
    assert run(changed).adopted_from == []


def test_the_run_summary_says_what_was_adopted_and_what_was_set_aside():
    from pipeline.batch.summary import RunSummary, format_summary

    recovery = Recovery(
        removed_parts=["images/part-x.parquet"], dropped_records=[("_commits/r/a.commit", "its part images/y is missing")], rows_made_again=16
    )
    summary = RunSummary("run2", "out", 10, 10, 0, {}, 1.0, adopted=288, adopted_from=["run1"], recovery=recovery)
    text = format_summary(summary)
    assert "adopted      288 request(s) committed by interrupted run(s) run1: not made again" in text
    assert "set aside 1 part(s) without a commit record (_trash/); dropped 1 damaged commit record(s) (16 rows made again)" in text
    assert "adopted" not in format_summary(RunSummary("run3", "out", 0, 0, 0, {}, 1.0))


def test_an_error_part_rewritten_by_supersede_stays_committed(out):
    """A later run makes an image for a request that failed before: the error part is
    rewritten without it, and the rewrite is committed (not an orphan the next run removes)."""
    from pipeline.storage import supersede

    fs, root = out
    first, later = RUN, "20260102T000000Z-bbbbbbbb"
    block = part_files.write_block(fs, root, first, stream_block(range(0, 8), failed={2, 5}))
    part_files.write_manifest(fs, root, first, {"run_id": first, "status": "complete", "parts": block.parts, "counts": {"images": 6}})
    again = part_files.write_block(fs, root, later, stream_block(range(2, 3)))  # row 2 made this time
    part_files.write_manifest(fs, root, later, {"run_id": later, "status": "complete", "parts": again.parts, "counts": {"images": 1}})
    done = supersede.supersede_errors(fs, root)
    assert done.rows == 1
    found = read_commits(fs, root)
    assert not (found.orphans or found.dropped or found.superseded)
    errors = pd.read_parquet(Path(root) / "errors")
    assert errors["id"].tolist() == ["5"]
    assert found.ids().contains([rid(2)])[0] and not found.ids().contains([rid(5)])[0]
    assert sum(r.errors for r in found.runs().values()) == 1
