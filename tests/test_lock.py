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

from pipeline.errors import RunConflict
from pipeline.job.run import run
from pipeline.output.verify import verify
from pipeline.storage import filesystem
from pipeline.storage.lock import LOCK_NAME, OutputLock


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_two_runs_at_once_on_one_output_the_second_is_refused(ray_cluster, make_spec, prompts, tmp_path, wait_for):
    lines = (prompts / "partiprompts" / "PartiPrompts.tsv").read_text().splitlines()[1:41]
    pd.DataFrame({"prompt": [line.split("\t")[0] for line in lines]}).to_csv(tmp_path / "p.csv", index=False)
    spec = make_spec({"url": str(tmp_path / "p.csv")}, defaults={"width": 64, "height": 64, "steps": 4})
    lock_file = Path(spec.output.url) / LOCK_NAME
    result: dict = {}
    first = threading.Thread(target=lambda: result.update(summary=run(spec)))
    first.start()
    wait_for(lock_file.exists, 60, "the first run's lock")
    holder = json.loads(lock_file.read_text())
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
    assert json.loads((tmp_path / LOCK_NAME).read_text())["run_id"] == "new-run"
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_an_expired_lease_from_another_host_is_taken_over_a_live_one_is_not(tmp_path):
    fs, root = filesystem.open_url(str(tmp_path))
    other = {"run_id": "elsewhere", "host": "another-host", "pid": 1, "expires_at": time.time() + 60}
    (tmp_path / LOCK_NAME).write_text(json.dumps(other))
    with pytest.raises(RunConflict, match="elsewhere"):
        OutputLock.acquire(fs, root, "mine", str(tmp_path))
    (tmp_path / LOCK_NAME).write_text(json.dumps({**other, "expires_at": time.time() - 1}))
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
