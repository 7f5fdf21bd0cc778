"""What ``imagegen run`` prints off a terminal: our progress lines, warnings and the
summary, and nothing of Ray's but its warnings."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


REPO = Path(__file__).resolve().parent.parent


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_run_off_a_terminal_prints_our_progress_lines_and_summary(tmp_path, model_cache):
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
    assert re.search(r"^progress: 8/8 rows 100%", out, re.M), out
    assert re.search(r"^run \S+ finished in", out, re.M), out
