"""The crash harness: a run into an output stopped after its k-th change to storage, for
any k, then the same command run again; or the k-th change failing once (a flaky object
store) with the retries the job makes. Every change goes through the storage door
(:func:`pipeline.storage.filesystem.watching_changes`), so "the k-th change" is exact and
the same on every try.

A *command* is one run into the output, made of the storage functions the job calls, in
the job's order: take the lock; :func:`~pipeline.batch.output_tasks.prepare_output` (the
start-of-run repair, the purge of the trash, adopting and folding interrupted runs, the
"running" manifest); a part write per block of the rows not committed yet (a write that
fails is retried, as Ray retries the task); folds of the block records as groups fill
(retried likewise); at the end the leftovers of retried writes, the manifest, the
rewrite of superseded error rows, the card; release the lock. No Ray: the functions are
the ones the job's tasks call, so a step is a few milliseconds, not a Ray job.

After the stop and the rerun (which meets no fault), :func:`check` asserts what a user
relies on: ``imagegen verify`` finds nothing; every input row is in exactly one place
(an image, or an error row when its last verdict was an error); no image committed when
the first run stopped was made again, nor lost.

Used by tests/test_crash_steps.py (sampled steps) and benchmarks/crash_steps.py (every step).
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import pyarrow.parquet as pq

from pipeline.batch.output_tasks import prepare_output
from pipeline.output import card, verify
from pipeline.spec import schema as S
from pipeline.spec.load import parse_spec
from pipeline.spec.validate import REQUEST_ID_SCHEME
from pipeline.storage import commit_protocol, dataset_schema, filesystem, fold, part_files, supersede
from pipeline.storage.lock import LOCK_NAME, OutputLock
from test_durability import rid, stream_block

ROWS = 24
BLOCK = 4
GROUP_IDS = 8  # fold every two blocks: folds happen mid-run, as in a long run


class Stop(BaseException):
    """The process was killed here: nothing in the code under test may catch it."""


@dataclass
class Steps:
    """Counts the changes made through the door; stops before the ``stop_at``-th (so
    after ``stop_at - 1`` of them) or makes the ``fail_at``-th raise once."""

    stop_at: Optional[int] = None
    fail_at: Optional[int] = None
    count: int = 0
    log: list[tuple[str, str]] = field(default_factory=list)

    def __call__(self, action: str, path: str) -> None:
        self.count += 1
        self.log.append((action, path))
        if self.count == self.stop_at:
            raise Stop(f"stopped before change {self.count}: {action} {path}")
        if self.count == self.fail_at:
            raise OSError(f"injected failure of change {self.count}: {action} {path}")


@dataclass
class Output:
    url: str
    options: dict[str, Any]

    def open(self):
        return filesystem.open_url(self.url, self.options)


def _retried(action: Callable[[], Any], attempts: int = 3) -> Any:
    """As Ray retries a task that raised: up to ``attempts`` tries."""
    for attempt in range(attempts):
        try:
            return action()
        except Exception:  # noqa: BLE001 - a retried task fails with anything
            if attempt == attempts - 1:
                raise


def command(out: Output, run_id: str, failed: frozenset[int] = frozenset()) -> list[int]:
    """One run of the job into ``out`` over rows 0..ROWS-1, rows in ``failed`` failing in
    generation. Returns the rows it generated images for."""
    fs, root = out.open()
    spec = parse_spec({"input": {"url": "unused.csv"}, "model": {"ref": "tiny"}, "output": {"url": out.url, "storage_options": out.options}})
    lock = None
    groups_of, fold.FOLD_IDS = fold.FOLD_IDS, GROUP_IDS
    try:
        lock = OutputLock.acquire(fs, root, run_id, out.url, lease_s=spec.output.lock_lease_s)
        run_id = lock.run_id  # numbered under the lock, as the job's is
        started = time.time()
        _, skip = prepare_output(spec, run_id, started)
        todo = [i for i in range(ROWS) if not skip.contains([rid(i)])[0]]
        report = part_files.WriteReport()
        groups = fold.FoldGroups()
        made = []
        for at in range(0, len(todo), BLOCK):
            rows = todo[at : at + BLOCK]
            written = _retried(lambda: part_files.write_block(fs, root, run_id, stream_block(rows, failed=set(failed))))
            report.add(written)
            made += [i for i in rows if i not in failed]
            group = groups.add(written.records, written.images + written.errors)
            if group:
                _retried(lambda: fold.compact(fs, root, run_id, group))
        rest = groups.rest()
        _retried(lambda: fold.compact(fs, root, run_id, rest))
        fold.remove_leftovers(fs, root, run_id, set(report.records))
        part_files.write_manifest(
            fs,
            root,
            run_id,
            {
                "run_id": run_id,
                "status": "complete",
                "started_at": started,
                "finished_at": time.time(),
                "spec": spec.redacted(),
                "spec_fingerprint": spec.fingerprint(),
                "request_id_scheme": REQUEST_ID_SCHEME,
                "counts": {"input_rows": report.input_rows, "images": report.images, "errors": report.errors, "errors_by_stage": report.errors_by_stage},
                "parts": sorted(report.parts, key=lambda p: p["path"]),
                "schemas": dataset_schema.promote(fs, root, commit_protocol.read_manifests(fs, root), report.parts),
            },
        )
        _retried(lambda: supersede.supersede_errors(fs, root))
        card.write_card(fs, root)
        lock.release()
        return made
    except BaseException:
        if lock is not None:  # a killed process renews nothing and leaves its lock
            lock._stop.set()
        raise
    finally:
        fold.FOLD_IDS = groups_of


def _mark_holder_dead(fs, root: str) -> None:
    """The lock a killed run left names a process that is gone (a real kill's lock does);
    written past the door: it is the kill, not a step."""
    import json

    path = filesystem.join(root, LOCK_NAME)
    if not fs.exists(path):
        return
    holder = json.loads(fs.cat_file(path))
    gone = subprocess.Popen(["true"])
    gone.wait()
    fs.pipe_file(path, json.dumps({**holder, "pid": gone.pid}).encode())


def committed_images(out: Output) -> set[str]:
    """Request ids of the images the output's accepted records hold now (read only)."""
    fs, root = out.open()
    found = commit_protocol.read_commits(fs, root)
    ids = set()
    for part in found.parts.values():
        if part.kind == "images":
            with fs.open(filesystem.join(root, part.path), "rb") as f:
                ids.update(pq.read_table(f, columns=[S.REQUEST_ID]).column(S.REQUEST_ID).to_pylist())
    return ids


def rows_in_place(out: Output) -> dict[str, list[str]]:
    """Request id -> where its rows are ("images"/"errors"), over every part file present."""
    fs, root = out.open()
    where: dict[str, list[str]] = {}
    for kind in ("images", "errors"):
        folder = filesystem.join(root, kind)
        for path in sorted(fs.find(folder)) if fs.isdir(folder) else []:
            with fs.open(path, "rb") as f:
                for request in pq.read_table(f, columns=[S.REQUEST_ID]).column(S.REQUEST_ID).to_pylist():
                    where.setdefault(request, []).append(kind)
    return where


@dataclass
class Outcome:
    steps: int  # changes the first run made (all of them when it was not stopped)
    problems: list[str]


def try_step(out: Output, scenario: "Scenario", stop_at: Optional[int] = None, fail_at: Optional[int] = None) -> Outcome:
    """Set up ``scenario``'s output, run its command stopped (or failing) at one step,
    run it again with no fault, and say what is wrong (nothing, if all is well)."""
    scenario.setup(out)
    steps = Steps(stop_at=stop_at, fail_at=fail_at)
    try:
        with filesystem.watching_changes(steps):
            command(out, "20260201T000000Z-cccccccc", scenario.failed)
    except (Stop, Exception):  # noqa: BLE001 - a failed run is what the rerun must recover from
        pass
    _mark_holder_dead(*out.open())  # the first run's process is gone by now
    before = committed_images(out)
    try:
        made_again = command(out, "20260202T000000Z-dddddddd")
    except Exception as exc:  # noqa: BLE001 - the rerun must succeed: its failure is the finding
        return Outcome(steps.count, [f"the rerun failed: {type(exc).__name__}: {exc}"])
    return Outcome(steps.count, check(out, before, made_again))


def check(out: Output, before: set[str], made_again: list[int]) -> list[str]:
    problems = []
    report = verify.verify(out.url, out.options)
    if not report.ok:
        problems.append(f"verify: {report.format()}")
    where = rows_in_place(out)
    for i in range(ROWS):
        if where.get(rid(i)) != ["images"]:
            problems.append(f"row {i} is in {where.get(rid(i), [])}, not in one images part")
    again = {rid(i) for i in made_again} & before
    if again:
        problems.append(f"{len(again)} image(s) committed before the stop were made again")
    lost = before - committed_images(out)
    if lost:
        problems.append(f"{len(lost)} committed image(s) lost")
    return problems


@dataclass
class Scenario:
    """An output's state before the command (made with no fault), and the rows that fail
    in the command's first run (the rerun fails none: their images supersede error rows)."""

    name: str
    setup: Callable[[Output], None]
    failed: frozenset[int] = frozenset()


def _fresh(out: Output) -> None:
    fs, root = out.open()
    if fs.exists(root):
        filesystem.remove(fs, root, recursive=True)


def _earlier_run_with_errors(out: Output) -> None:
    """A complete earlier run whose rows 3, 9 and 17 failed in generation: the command
    makes them, so it rewrites that run's error parts (supersede)."""
    _fresh(out)
    command(out, "20260101T000000Z-aaaaaaaa", frozenset({3, 9, 17}))


def _interrupted_run_with_damage(out: Output) -> None:
    """An earlier run killed after 4 of 6 blocks, leaving: a part without a record, a
    truncated part in a record, an unreadable record and a stray temporary file. The
    command's start-of-run repair has all of it to do."""
    _fresh(out)
    fs, root = out.open()
    run = "20260101T000000Z-bbbbbbbb"
    # Its start manifest, written before any part as the job writes it.
    spec = parse_spec({"input": {"url": "unused.csv"}, "model": {"ref": "tiny"}, "output": {"url": out.url, "storage_options": out.options}})
    start = part_files.start_manifest(run, time.time(), spec.redacted(), spec.fingerprint())
    part_files.write_manifest(fs, root, run, {**start, "request_id_scheme": REQUEST_ID_SCHEME})
    written = [part_files.write_block(fs, root, run, stream_block(range(at, at + BLOCK), failed={at + 1})) for at in range(0, 16, BLOCK)]
    images, _ = part_files.split(stream_block(range(16, 20)), run)
    part_files.write_part(fs, root, "images", run, images)  # killed before its record
    damaged = filesystem.join(root, written[1].parts[0]["path"])
    fs.pipe_file(damaged, fs.cat_file(damaged)[:100])
    unreadable = filesystem.join(root, written[2].records[0])
    fs.pipe_file(unreadable, fs.cat_file(unreadable)[:-9])
    fs.pipe_file(filesystem.join(root, "_commits", run, ".x.commit.1234.tmp"), b"half")


SCENARIOS = [
    Scenario("fresh output", _fresh, frozenset({5, 11})),
    Scenario("rewrite of superseded error rows", _earlier_run_with_errors),
    Scenario("repair of an interrupted, damaged run", _interrupted_run_with_damage),
]


def count_steps(out: Output, scenario: Scenario) -> int:
    """How many changes the scenario's command makes when nothing goes wrong."""
    scenario.setup(out)
    steps = Steps()
    with filesystem.watching_changes(steps):
        command(out, "20260201T000000Z-cccccccc", scenario.failed)
    return steps.count
