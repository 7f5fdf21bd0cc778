"""One run at a time per output, and one model download per machine."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from pipeline.errors import LeaseLost, RunConflict
from pipeline.batch.run import run
from pipeline.output.verify import verify
from pipeline.storage import filesystem, part_files
from pipeline.storage.lock import LOCK_NAME, OutputLock, check_lease, live_holder

from s3_proxy import S3Proxy


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_two_runs_at_once_on_one_output_the_second_is_refused(ray_cluster, make_spec, prompts, tmp_path, wait_for):
    lines = (prompts / "partiprompts" / "PartiPrompts.tsv").read_text().splitlines()[1:41]
    pd.DataFrame({"prompt": [line.split("\t")[0] for line in lines]}).to_csv(tmp_path / "p.csv", index=False)
    # A lease far shorter than the run: the run lives on its renewals.
    spec = make_spec({"url": str(tmp_path / "p.csv")}, defaults={"width": 64, "height": 64, "steps": 4}, output={"lock_lease_s": 5})
    lock_file = Path(spec.output.url) / LOCK_NAME
    result: dict = {}
    first = threading.Thread(target=lambda: result.update(summary=run(spec)))
    first.start()
    wait_for(lock_file.exists, 60, "the first run's lock")
    seen = set()

    def renewed_twice():
        try:
            seen.add(json.loads(lock_file.read_text())["renewed_at"])
        except (OSError, ValueError, KeyError):
            pass
        return len(seen) >= 3

    wait_for(renewed_twice, 30, "two renewals of the first run's lease")
    holder = json.loads(lock_file.read_text())
    assert holder["expires_at"] > time.time()  # renewed past the first lease's end
    with pytest.raises(RunConflict, match=f"another run \\({holder['run_id']}, pid {os.getpid()}"):
        run(spec)
    first.join(timeout=240)
    assert result["summary"].images == 40 and not lock_file.exists()
    assert verify(spec.output.url, spec=spec).ok
    assert run(spec).images == 0  # the lock is free again


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    fs, root = filesystem.open_url(str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    stale = {"run_id": "crashed", "host": os.uname().nodename, "pid": int(dead), "expires_at": time.time() + 999}
    (tmp_path / LOCK_NAME).write_text(json.dumps(stale))
    lock = OutputLock.acquire(fs, root, "new-run", str(tmp_path))
    assert json.loads((tmp_path / LOCK_NAME).read_text())["run_id"] == lock.run_id
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_an_expired_lease_from_another_host_is_taken_over_a_live_one_is_not(tmp_path):
    fs, root = filesystem.open_url(str(tmp_path))
    other = {"run_id": "elsewhere", "host": "another-host", "pid": 1, "lease_s": 60}
    (tmp_path / LOCK_NAME).write_text(json.dumps(other))
    with pytest.raises(RunConflict, match="elsewhere"):
        OutputLock.acquire(fs, root, "mine", str(tmp_path))
    past = time.time() - 61  # not rewritten for longer than its lease
    os.utime(tmp_path / LOCK_NAME, (past, past))
    OutputLock.acquire(fs, root, "mine", str(tmp_path)).release()


def test_lock_on_s3_uses_a_conditional_put(s3):
    fs, bucket, _ = s3
    root = f"{bucket}/out"
    held = OutputLock.acquire(fs, root, "first", f"s3://{root}")
    with pytest.raises(RunConflict, match="first"):
        OutputLock.acquire(fs, root, "second", f"s3://{root}")
    held.release()
    OutputLock.acquire(fs, root, "second", f"s3://{root}").release()


def _fill_racer(target: str, log: str, arrived, first_started, announce: bool) -> None:
    def fill(staging: str) -> None:
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        first_started.set()
        # Hold the folder unfilled until the other process is at the door.
        arrived.wait(timeout=30)
        os.makedirs(staging)
        Path(staging, "done").write_text("ok")

    if announce:
        # Without the lock, this process would find the folder unfilled and fill it too:
        # the first one is still parked inside `fill`, waiting for this very signal.
        arrived.set()
    filesystem.fill_folder_once(target, fill, "done")


def test_two_processes_fill_a_folder_once(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    arrived, first_started = ctx.Event(), ctx.Event()
    target, log = str(tmp_path / "model"), str(tmp_path / "log")
    one = ctx.Process(target=_fill_racer, args=(target, log, arrived, first_started, False))
    one.start()
    assert first_started.wait(timeout=60)
    two = ctx.Process(target=_fill_racer, args=(target, log, arrived, first_started, True))
    two.start()
    one.join(60)
    two.join(60)
    assert one.exitcode == two.exitcode == 0
    assert len(Path(log).read_text().split()) == 1, "the folder must be filled by one process only"
    assert Path(target, "done").read_text() == "ok"


# -- the lease on S3, against real faults: a proxy in front of moto fails the lock's PUTs --

# One attempt per request: each injected failure reaches the lock itself, not botocore's retries.
NO_CLIENT_RETRIES = {"config_kwargs": {"retries": {"max_attempts": 1}}}


def lock_puts_fail(bucket: str, failures: int | None):
    """A proxy rule: the lock's first PUT (its exclusive create) goes through, the next
    ``failures`` PUTs of it (every one when None) fail with HTTP 500."""
    puts = {"n": 0}

    def rule(method: str, path: str):
        if method != "PUT" or not path.endswith(f"/{LOCK_NAME}"):
            return None
        puts["n"] += 1
        if puts["n"] == 1:
            return None
        return "500" if failures is None or puts["n"] <= 1 + failures else None

    return rule


def s3_lock_fs(options: dict, endpoint: str):
    import s3fs

    return s3fs.S3FileSystem(**{**options, **NO_CLIENT_RETRIES, "endpoint_url": endpoint}, skip_instance_cache=True)


def test_a_failed_heartbeat_write_is_retried_and_the_lease_holds(s3, s3_server, wait_for):
    direct, bucket, options = s3
    with S3Proxy(s3_server, lock_puts_fail(bucket, failures=4)) as proxy:
        fs = s3_lock_fs(options, proxy.url)
        lock = OutputLock.acquire(fs, f"{bucket}/out", "run-a", f"s3://{bucket}/out", lease_s=12)
        try:
            first = json.loads(direct.cat_file(f"{bucket}/out/{LOCK_NAME}"))
            # Renewals fail in a row (s3fs sends each twice); the heartbeat retries and one lands.
            wait_for(lambda: proxy.injected["500"] == 4 and json.loads(direct.cat_file(f"{bucket}/out/{LOCK_NAME}"))["expires_at"] > first["expires_at"],
                     20, "a renewal after failed ones", explain=lambda: f"injected {proxy.injected}, lost: {lock.lost()}")
            assert lock.lost() is None
            check_lease(fs, f"{bucket}/out", lock.run_id, "s3://x")  # a writer finds the lease live
        finally:
            lock.release()
    assert not direct.exists(f"{bucket}/out/{LOCK_NAME}")


def test_a_lease_that_cannot_be_renewed_is_lost_and_writers_stop(s3, s3_server, wait_for):
    direct, bucket, options = s3
    root, url = f"{bucket}/out", f"s3://{bucket}/out"
    with S3Proxy(s3_server, lock_puts_fail(bucket, failures=None)) as proxy:
        fs = s3_lock_fs(options, proxy.url)
        lock = OutputLock.acquire(fs, root, "run-a", url, lease_s=1.5)
        try:
            wait_for(lock.lost, 20, "the lease to be lost", explain=lambda: f"injected {proxy.injected}")
            assert "could not be renewed" in lock.lost()
            # The heartbeat gives up a margin before the lease's end: a writer sees it
            # expired once the lock's age (by the store's clock) passes the lease.
            wait_for(lambda: live_holder(direct, root) is None, 5, "the lost lease's end")
            with pytest.raises(LeaseLost, match="lease expired"):
                check_lease(fs, root, lock.run_id, url)
            # Another machine, with working storage, takes the expired lock over...
            other = OutputLock.acquire(direct, root, "run-b", url)
            with pytest.raises(LeaseLost, match=f"run {lock.run_id} lost its lock on .* run {other.run_id} .* holds it now"):
                check_lease(fs, root, lock.run_id, url)
            with pytest.raises(LeaseLost, match="run-a lost its lock"):
                lock.raise_if_lost()
        finally:
            lock.release()
        # ...and the first run's release leaves the new holder's lock alone.
        assert json.loads(direct.cat_file(f"{root}/{LOCK_NAME}"))["run_id"] == other.run_id
        other.release()


def _race(acquire_a, acquire_b) -> list:
    """Both acquisitions at the same moment; each outcome is a lock or the RunConflict."""
    barrier = threading.Barrier(2)
    outcomes: list = [None, None]

    def contender(i, acquire):
        barrier.wait()
        try:
            outcomes[i] = acquire()
        except RunConflict as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=contender, args=(i, a)) for i, a in enumerate((acquire_a, acquire_b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return outcomes


def test_two_s3_runs_racing_for_a_free_lock_exactly_one_wins(s3):
    direct, bucket, options = s3
    import s3fs

    for attempt in range(8):
        root = f"{bucket}/race-{attempt}"
        # Two machines: two clients, neither sharing the other's connection pool.
        fs_a, fs_b = (s3fs.S3FileSystem(**options, skip_instance_cache=True) for _ in range(2))
        outcomes = _race(lambda: OutputLock.acquire(fs_a, root, "run-a", "s3://x"), lambda: OutputLock.acquire(fs_b, root, "run-b", "s3://x"))
        winners = [o for o in outcomes if isinstance(o, OutputLock)]
        assert len(winners) == 1, outcomes
        assert json.loads(direct.cat_file(f"{root}/{LOCK_NAME}"))["run_id"] == winners[0].run_id
        check_lease(direct, root, winners[0].run_id, "s3://x")
        winners[0].release()


def _stale_lock(direct, root: str, wait_for) -> None:
    """A lock left by a run on another machine that died: one second of lease, run out."""
    direct.pipe_file(f"{root}/{LOCK_NAME}", json.dumps({"run_id": "dead", "host": "gone-host", "pid": 1, "lease_s": 1}).encode())
    wait_for(lambda: live_holder(direct, root) is None, 10, "the dead run's lease to run out")


def _lock_writes(proxy: S3Proxy) -> list[dict]:
    return [headers for method, path, headers in proxy.requests if method in ("PUT", "DELETE") and path.endswith(f"/{LOCK_NAME}")]


def test_two_runs_that_read_the_same_stale_lock_cannot_both_take_it_over(s3, s3_server, wait_for):
    """The order is forced, not hoped for: run A's takeover write is held at the proxy
    until run B, which read the same stale lock, has taken it over; A must then lose."""
    direct, bucket, options = s3
    root = f"{bucket}/out"
    _stale_lock(direct, root, wait_for)
    a_holds, b_done = threading.Event(), threading.Event()

    def gate(method: str, path: str, headers: dict) -> None:
        # A's first write to the lock is its create (refused: the lock exists); the next
        # one, after it read the stale lock, is its takeover.
        if method in ("PUT", "DELETE") and "_lock" in path and "if-none-match" not in headers:
            a_holds.set()
            assert b_done.wait(30)

    with S3Proxy(s3_server, gate=gate) as proxy:
        fs_a = s3_lock_fs(options, proxy.url)
        outcome: list = []

        def run_a():
            try:
                outcome.append(OutputLock.acquire(fs_a, root, "run-a", "s3://x"))
            except RunConflict as exc:
                outcome.append(exc)

        a = threading.Thread(target=run_a)
        a.start()
        assert a_holds.wait(30), "run A never tried to take the stale lock over"
        b = OutputLock.acquire(direct, root, "run-b", "s3://x")  # reads the same stale lock, takes it over
        b_done.set()
        a.join(30)
        assert isinstance(outcome[0], RunConflict), outcome
        assert json.loads(direct.cat_file(f"{root}/{LOCK_NAME}"))["run_id"] == b.run_id
        takeover = [h for h in _lock_writes(proxy) if "if-none-match" not in h]
        assert takeover and all(h.get("if-match") for h in takeover), "a takeover must be conditional on the lock it judged stale"
        check_lease(direct, root, b.run_id, "s3://x")
        b.release()


def test_a_renewal_is_conditional_and_a_late_one_never_overwrites_a_successor(s3, s3_server, wait_for):
    """Run A's renewal is held at the proxy until its lease ran out and run B took the
    output over; let through, it must fail (If-Match on A's last lock) and A know it lost."""
    direct, bucket, options = s3
    root, url = f"{bucket}/out", f"s3://{bucket}/out"
    holding, released = threading.Event(), threading.Event()

    def gate(method: str, path: str, headers: dict) -> None:
        if method == "PUT" and path.endswith(f"/{LOCK_NAME}") and "if-none-match" not in headers and not holding.is_set():
            holding.set()
            assert released.wait(30)

    with S3Proxy(s3_server, gate=gate) as proxy:
        lock = OutputLock.acquire(s3_lock_fs(options, proxy.url), root, "run-a", url, lease_s=1.5)
        try:
            assert holding.wait(10), "no renewal came"
            wait_for(lambda: live_holder(direct, root) is None, 10, "run A's lease to run out")
            other = OutputLock.acquire(direct, root, "run-b", url)
            released.set()
            wait_for(lock.lost, 20, "run A to learn it lost the lease")
            assert other.run_id in lock.lost()
            assert json.loads(direct.cat_file(f"{root}/{LOCK_NAME}"))["run_id"] == other.run_id
            renewals = [h for h in _lock_writes(proxy) if h.get("if-none-match") is None and "x-amz-copy-source" not in h]
            assert renewals and all(h.get("if-match") for h in renewals), renewals
        finally:
            released.set()
            lock.release()
        other.release()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_expiry_is_judged_by_the_lock_age_on_the_store_not_its_writer_clock(where, tmp_path, s3):
    """A live run on a machine whose clock is an hour behind wrote expires_at in the past:
    its lease holds (the store says the lock was just written). A lock whose writer's clock
    is ahead but that nobody rewrote for its lease is stale."""
    if where == "local":
        fs, root = filesystem.open_url(str(tmp_path))
    else:
        fs, root = s3[0], f"{s3[1]}/out"
    behind = time.time() - 3600
    holder = {"run_id": "slow-clock", "host": "laptop", "pid": 1, "lease_s": 30, "renewed_at": behind, "expires_at": behind + 30}
    fs.pipe_file(filesystem.join(root, LOCK_NAME), json.dumps(holder).encode())
    with pytest.raises(RunConflict, match="slow-clock"):
        OutputLock.acquire(fs, root, "mine", "x")
    check_lease(fs, root, "slow-clock", "x")  # its writers go on
    if where == "local":  # the store's clock: the file was last written a minute ago
        past = time.time() - 60
        os.utime(Path(root) / LOCK_NAME, (past, past))
        ahead = {**holder, "renewed_at": time.time() + 3600, "expires_at": time.time() + 3630}
        (Path(root) / LOCK_NAME).write_text(json.dumps(ahead))
        os.utime(Path(root) / LOCK_NAME, (past, past))
        with pytest.raises(LeaseLost, match="lease expired"):
            check_lease(fs, root, "slow-clock", "x")
        OutputLock.acquire(fs, root, "mine", "x").release()


def test_a_lock_that_does_not_read_is_not_taken_for_stale_while_fresh(tmp_path):
    """What a half-written lock looked like: a racer must not take it over at once (the
    lock is now linked into place whole, so only damage makes one unreadable)."""
    fs, root = filesystem.open_url(str(tmp_path))
    (tmp_path / LOCK_NAME).write_bytes(b"")
    with pytest.raises(RunConflict):
        OutputLock.acquire(fs, root, "mine", str(tmp_path))
    past = time.time() - 1000
    os.utime(tmp_path / LOCK_NAME, (past, past))
    OutputLock.acquire(fs, root, "mine", str(tmp_path)).release()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_lock_changes_only_from_the_version_its_writer_read(where, tmp_path, s3):
    if where == "local":
        fs, root = filesystem.open_url(str(tmp_path))
    else:
        fs, root = s3[0], f"{s3[1]}/out"
    path = filesystem.join(root, LOCK_NAME)
    first = filesystem.create_versioned(fs, path, b"first")
    assert filesystem.create_versioned(fs, path, b"again") is None
    second = filesystem.replace_versioned(fs, path, b"second", first)
    assert second and filesystem.replace_versioned(fs, path, b"late", first) is None
    assert not filesystem.remove_versioned(fs, path, first)
    assert filesystem.read_versioned(fs, path).data == b"second"
    assert filesystem.remove_versioned(fs, path, second) and filesystem.read_versioned(fs, path) is None


# -- order: "later" is a larger sequence number taken under the lock, never a clock --------


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_run_started_later_is_later_whatever_its_clock_says(where, tmp_path, s3):
    """Run B starts after run A, on a laptop whose clock is a year behind: B's image of a
    request that failed in A retires A's error row, A's manifest comes first, and runs from
    before numbering still come first in their old order."""
    from pipeline.storage import commit_protocol, part_files, supersede
    from test_durability import rid, stream_block

    if where == "local":
        fs, root = filesystem.open_url(str(tmp_path / "out"))
    else:
        fs, root = s3[0], f"{s3[1]}/out"
    url = "x"
    old = "20991231T235959Z-00000000"  # an unnumbered run, from a clock far ahead
    part_files.write_manifest(fs, root, old, {"run_id": old, "status": "complete", "parts": [], "counts": {}})
    a = OutputLock.acquire(fs, root, "20260601T000000Z-aaaaaaaa", url)
    block = part_files.write_block(fs, root, a.run_id, stream_block(range(0, 4), failed={2}))
    part_files.write_manifest(fs, root, a.run_id, {"run_id": a.run_id, "status": "complete", "parts": block.parts, "counts": {}})
    a.release()
    b = OutputLock.acquire(fs, root, "20250601T000000Z-bbbbbbbb", url)  # its clock: a year behind
    again = part_files.write_block(fs, root, b.run_id, stream_block(range(2, 3)))
    part_files.write_manifest(fs, root, b.run_id, {"run_id": b.run_id, "status": "complete", "parts": again.parts, "counts": {}})
    assert supersede.supersede_errors(fs, root).rows == 1  # B's image retires A's error row
    b.release()
    assert [m["run_id"] for m in commit_protocol.read_manifests(fs, root)] == [old, a.run_id, b.run_id]
    found = commit_protocol.read_commits(fs, root)
    assert [r.run_id for r in found.records] == [a.run_id, b.run_id]
    assert found.ids().contains([rid(2)])[0]
    assert b.sequence == a.sequence + 1


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_run_that_loses_its_lease_stops_writing_and_says_so(ray_cluster, make_spec, s3, s3_server, tmp_path, wait_for):
    direct, bucket, options = s3
    root = f"{bucket}/out"
    pd.DataFrame({"prompt": ["a kite", "a boat", "a fox"]}).to_parquet(tmp_path / "p.parquet")
    direct.put(str(tmp_path / "p.parquet"), f"{bucket}/in/p.parquet")
    lock_taken, taken_over = threading.Event(), threading.Event()
    renewals_fail = lock_puts_fail(bucket, failures=None)

    def rule(method: str, path: str):
        if method == "PUT" and path.endswith(f"/{LOCK_NAME}"):
            lock_taken.set()
            return renewals_fail(method, path)
        if method == "GET" and path.endswith("/in/p.parquet") and lock_taken.is_set():
            # Once the run holds the lock, its reads wait until another run has taken the
            # output over: every part it could write comes after it lost its lease.
            taken_over.wait(60)
        return None

    with S3Proxy(s3_server, rule) as proxy:
        flaky = {**options, **NO_CLIENT_RETRIES, "endpoint_url": proxy.url}
        spec = make_spec(
            {"url": f"s3://{bucket}/in/p.parquet", "storage_options": flaky},
            output={"url": f"s3://{root}", "storage_options": flaky, "rows_per_part": 1, "lock_lease_s": 2},
        )
        outcome: dict = {}

        def first_run():
            try:
                outcome["summary"] = run(spec)
            except Exception as exc:  # noqa: BLE001 - the test inspects it
                outcome["error"] = exc

        job = threading.Thread(target=first_run)
        job.start()

        def expired():
            return direct.exists(f"{root}/{LOCK_NAME}") and live_holder(direct, root) is None

        wait_for(expired, 120, "the first run's lease to run out")
        other = OutputLock.acquire(direct, root, "run-b", f"s3://{root}")
        taken_over.set()
        job.join(240)
    assert not job.is_alive()
    error = outcome.get("error")
    assert isinstance(error, LeaseLost), outcome
    assert f"lost its lock on s3://{root}" in str(error) and "rerun the same command" in str(error)
    assert not direct.exists(f"{root}/images") and not direct.exists(f"{root}/errors"), "no part after the lease was lost"
    # At most the manifest every run writes when it starts ("running"; none if the lease ran
    # out before its start-of-run repair, which checks it): it never completed.
    statuses = [json.loads(direct.cat_file(path))["status"] for path in direct.find(f"{root}/_runs")]
    assert statuses in ([], ["running"]), statuses
    assert not direct.exists(f"{root}/_commits"), "nothing committed after the lease was lost"
    assert json.loads(direct.cat_file(f"{root}/{LOCK_NAME}"))["run_id"] == other.run_id
    other.release()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_run_that_lost_its_lease_rewrites_no_error_part(where, tmp_path, s3):
    """The error-part rewrite deletes and rewrites committed files: it checks the lease
    before each step, so a run whose output was taken over leaves the files alone."""
    from pipeline.storage import supersede
    from test_durability import stream_block

    if where == "local":
        fs, root = filesystem.open_url(str(tmp_path / "out"))
    else:
        fs, root = s3[0], f"{s3[1]}/out"
    lock = OutputLock.acquire(fs, root, "run-a", "x")
    try:
        first, later = "20260101T000000Z-aaaaaaaa", lock.run_id
        block = part_files.write_block(fs, root, first, stream_block(range(0, 4), failed={2}))
        part_files.write_manifest(fs, root, first, {"run_id": first, "status": "complete", "parts": block.parts, "counts": {}})
        again = part_files.write_block(fs, root, later, stream_block(range(2, 3)))
        part_files.write_manifest(fs, root, later, {"run_id": later, "status": "complete", "parts": again.parts, "counts": {}})
        before = sorted(fs.find(filesystem.join(root, "errors")))
        fs.pipe_file(filesystem.join(root, LOCK_NAME), json.dumps({"run_id": "run-b", "host": "elsewhere", "pid": 1, "lease_s": 60}).encode())
        with pytest.raises(LeaseLost, match="run-b"):
            supersede.supersede_errors(fs, root, check=lambda: check_lease(fs, root, later, "x"))
        assert sorted(fs.find(filesystem.join(root, "errors"))) == before
    finally:
        lock.release()
