"""`imagegen report`: one self-contained HTML page, checked as text and in headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image, ImageStat

from pipeline.cli import main
from pipeline.output.report import read_output, render_html, write_report

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def output(ray_cluster, model_cache, prompts, tmp_path_factory) -> Path:
    """A finished output of two runs: 12 prompts (one making 3 images) and 2 bad rows,
    then 3 more prompts."""
    from pipeline.batch.run import run
    from pipeline.spec.load import parse_spec

    work = tmp_path_factory.mktemp("report")
    lines = (prompts / "partiprompts" / "PartiPrompts.tsv").read_text().splitlines()[1:16]
    rows = [{"prompt": line.split("\t")[0], "num_images": ""} for line in lines]
    rows[0]["num_images"] = "3"
    table = work / "p.csv"
    first = rows[:12] + [{"prompt": "", "num_images": ""}, {"prompt": "a kite", "num_images": "99"}]
    pd.DataFrame(first).to_csv(table, index=False)
    spec = parse_spec(
        {
            "input": {"url": str(table)},
            "model": {"ref": "tiny", "cache_dir": model_cache},
            "defaults": {"width": 32, "height": 32, "steps": 1, "seed": 3},
            "output": {"url": str(work / "out"), "rows_per_part": 5},
            "runtime": {"num_actors": 2, "cpus_per_actor": 0.5, "task_cpus": 0.5, "batch_size": 2},
        }
    )
    assert run(spec).images == 14
    pd.DataFrame(first + rows[12:]).to_csv(table, index=False)
    assert run(spec).images == 3
    return work / "out"


def test_page_holds_sample_runs_chart_errors_and_spec(output, tmp_path):
    data = read_output(str(output), sample=6)
    assert len(data.images) == 17 and len(data.errors) == 2 and len(data.manifests) == 2
    page = render_html(data)
    assert page.count("<img") == 6
    assert len(set(re.findall(r'src="(data:image/png;base64,[^"]+)"', page))) == 6
    assert not re.search(r'(src|href)="(?!data:)', page), "the page must not reference anything outside itself"
    for run in data.manifests:
        assert run["run_id"] in page
    # One chart per run, one line per engine actor that made images in it.
    assert page.count("<svg") == 2
    actors = sum(len({r["actor_id"] for r in data.images if r["run_id"] == m["run_id"]}) for m in data.manifests)
    assert page.count("<polyline") == actors
    assert "prompt is empty" in page and "num_images must be between 1 and 16" in page
    assert "prompt_column: prompt" in page  # the spec, as YAML

    every = render_html(read_output(str(output)))  # default sample: up to 48
    assert every.count("<img") == 17


def test_report_command_writes_the_page(output, tmp_path, capsys):
    target = tmp_path / "page.html"
    assert main(["report", str(output), "--html", str(target), "--sample", "4"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert target.read_text().count("<img") == 4
    assert main(["report", str(tmp_path / "missing"), "--html", str(target)]) == 2
    assert "does not exist" in capsys.readouterr().err


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", *args,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it with apt-get)")
def test_page_renders_in_headless_chromium(output, tmp_path):
    page = tmp_path / "report.html"
    write_report(str(output), str(page), sample=8)
    shot = tmp_path / "shot.png"
    result = _chromium(f"--screenshot={shot}", "--window-size=1200,2000", page.as_uri(), profile=tmp_path / "profile-1")
    assert shot.is_file(), result.stderr[-2000:]
    with Image.open(shot) as image:
        assert image.size == (1200, 2000)
        spread = ImageStat.Stat(image.convert("L")).stddev[0]
    assert spread > 10, f"the screenshot looks blank (pixel stddev {spread:.1f})"

    dom = _chromium("--dump-dom", page.as_uri(), profile=tmp_path / "profile-2").stdout
    assert len(re.findall(r"<img\b", dom)) == 8
    assert len(re.findall(r"<polyline\b", dom)) >= 2
