"""What ``imagegen run`` prints off a terminal: our progress lines, warnings and the
summary; Ray Data's operator progress only in Ray's log folder, unless ``--verbose``."""

from __future__ import annotations

import io
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.batch.logs import RAY_DATA_LOGGER, route_ray_data_logs

REPO = Path(__file__).resolve().parent.parent
# What Ray Data writes at INFO while a dataset runs (its operator table, plan, start, end).
RAY_DATA_INFO = re.compile(r"logging_progress\.py|streaming_executor\.py|Execution plan|Running Dataset|Total Progress")


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_run_off_a_terminal_prints_ours_and_leaves_ray_datas_progress_in_its_log_folder(tmp_path, model_cache):
    (tmp_path / "prompts.jsonl").write_text("".join(f'{{"prompt": "a lighthouse number {i}"}}\n' for i in range(8)))
    spec = {
        "input": {"url": str(tmp_path / "prompts.jsonl")},
        "model": {"ref": "tiny", "cache_dir": str(model_cache), "device": "cpu"},
        "defaults": {"width": 32, "height": 32, "steps": 2},
        "output": {"url": str(tmp_path / "out"), "mode": "overwrite"},
        "runtime": {"num_actors": 1, "cpus_per_actor": 0.5, "task_cpus": 0.25, "progress_interval_s": 1},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    # stdout and stderr to pipes: no terminal, as in a pod's or CI's log.
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", str(tmp_path / "spec.yaml")],
        cwd=REPO, capture_output=True, text=True, timeout=280, stdin=subprocess.DEVNULL,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert not RAY_DATA_INFO.search(out), out
    assert re.search(r"^progress: 8/8 rows 100%", out, re.M), out
    assert re.search(r"^run \S+ finished in", out, re.M), out
    # The job is its own loop over Ray tasks and actors (pipeline/batch/dispatch.py), not a Ray
    # Data pipeline: Ray Data has nothing to log, so no line names its log folder either.
    assert "Ray Data" not in out, out


def test_verbose_keeps_ray_datas_console_as_it_is():
    import ray.data  # noqa: F401 - importing it sets up the logger's handlers

    console = next(h for h in logging.getLogger(RAY_DATA_LOGGER).handlers if h.get_name() == "console")
    before = list(console.filters)
    info = logging.LogRecord("ray.data._internal.execution", logging.INFO, __file__, 1, "Total Progress: 8/8", None, None)
    warning = logging.LogRecord("ray.data._internal.execution", logging.WARNING, __file__, 1, "a warning", None, None)
    try:
        route_ray_data_logs(verbose=True)
        assert console.filter(info) and console.filter(warning)
        route_ray_data_logs(verbose=False, stream=io.StringIO())
        route_ray_data_logs(verbose=False, stream=io.StringIO())  # idempotent: one filter
        assert len(console.filters) == len(before) + 1
        assert not console.filter(info) and console.filter(warning)
    finally:
        console.filters[:] = before
