"""Progress while a job runs: the line's content, the live bar, and counts from a real job."""

from __future__ import annotations

import io
import re

import pandas as pd
import pyarrow as pa
import pytest

from pipeline.batch.progress import Counts, ProgressCounter, ProgressPrinter, RateMeter, finished, format_line, skipped


class Terminal(io.StringIO):
    """A stream that says it is a terminal, as sys.stderr does in an interactive shell."""

    def isatty(self) -> bool:
        return True


def test_line_with_and_without_a_total():
    counts = Counts(rows=30, images=28, errors=2, skipped=10)
    plain = format_line(counts, total=80, elapsed=75, images_per_s=1.5, eta=40, bar=False)
    assert plain == "progress: 40/80 rows  50%, 10 already in the output, 28 images, 2 errors, 1.50 images/s, ETA 0:40, elapsed 1:15"
    bar = format_line(counts, total=80, elapsed=3725, images_per_s=None, eta=None, bar=True)
    assert bar.startswith("[" + "#" * 12 + "." * 12 + "] 40/80 rows  50%")
    assert "-- images/s" in bar and "ETA --:--" in bar and "elapsed 1:02:05" in bar
    unknown = format_line(Counts(rows=5, images=5), total=None, elapsed=1, images_per_s=2.0, eta=None, bar=False)
    assert "5 rows," in unknown and "%" not in unknown and "ETA unknown (no row count)" in unknown


def test_rate_and_eta_from_the_trailing_window():
    meter = RateMeter(total=100, started=0.0)
    assert meter.add(5.0, Counts()) == (None, None)  # nothing finished yet: no rate
    rate, eta = meter.add(10.0, Counts(rows=10, images=20))
    assert rate == pytest.approx(2.0) and eta == pytest.approx(90 / 1.0)
    # Once the window has moved past start-up, only recent work sets the rate.
    meter.add(40.0, Counts(rows=40, images=80))
    rate, eta = meter.add(70.0, Counts(rows=70, images=140))
    assert rate == pytest.approx(2.0) and eta == pytest.approx(30.0)


def test_actor_start_up_and_utilization():
    counter = ProgressCounter()
    assert counter.snapshot().engine_utilization(end=100.0) is None  # no actor up yet
    counter.actor_ready(at=30.0)
    counter.actor_ready(at=10.0)  # reports can arrive out of order
    counter.add(engine_seconds=120.0)
    counts = counter.snapshot()
    assert (counts.actors_ready, counts.last_actor_ready_at) == (2, 30.0)
    # Up 90 s and 70 s until the end, 120 s of it generating.
    assert counts.engine_utilization(end=100.0) == pytest.approx(120 / 160)


def test_block_counts():
    table = pa.table(
        {
            "source": ["a", "a", "a", "b"],
            "row_index": [0, 0, 1, 0],
            "image_index": pa.array([0, 1, 0, 0], pa.int32()),
            "error_stage": [None, None, "validate", None],
        }
    )
    assert finished(table) == {"rows": 3, "images": 3, "errors": 1}
    raw = pa.table({"__source": ["a"] * 3 + ["b"] * 2, "__row": [0, 1, 2, 0, 1]})
    assert skipped(raw, table) == 2  # a#2 and b#1 left no request


def test_terminal_redraws_one_line_in_place(wait_for):
    counts = {"value": Counts()}
    stream = Terminal()
    with ProgressPrinter(lambda: counts["value"], total=4, interval_s=60, stream=stream) as printer:
        assert printer.live
        wait_for(lambda: stream.getvalue().count("\r") >= 2)
        counts["value"] = Counts(rows=4, images=4)
    text = stream.getvalue()
    assert "\n" not in text[:-1], "a live bar never starts a new line before the end"
    assert text.endswith("\n") and text.rstrip("\n").rsplit("\r", 1)[-1].startswith("[" + "#" * 24 + "] 4/4 rows 100%")


def test_log_stream_gets_a_line_every_interval_and_a_last_one(wait_for):
    polls = []

    def poll() -> Counts:
        polls.append(1)
        if len(polls) == 2:
            raise ConnectionError("counter actor restarting")  # skipped, not fatal
        return Counts(rows=len(polls), images=len(polls))

    stream = io.StringIO()
    with ProgressPrinter(poll, total=None, interval_s=0.05, stream=stream):
        wait_for(lambda: stream.getvalue().count("\n") >= 3)
    lines = stream.getvalue().splitlines()
    assert all(line.startswith("progress: ") for line in lines) and "\r" not in stream.getvalue()
    assert len(lines) == len(polls) - 1


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_real_job_reports_rows_images_errors_and_skips(ray_cluster, make_spec, prompts, tmp_path, capsys):
    lines = (prompts / "partiprompts" / "PartiPrompts.tsv").read_text().splitlines()[1:13]
    rows = [{"prompt": line.split("\t")[0]} for line in lines] + [{"prompt": ""}, {"prompt": "a kite", "seed": "x"}]
    pd.DataFrame(rows).to_csv(tmp_path / "p.csv", index=False)
    spec = make_spec({"url": str(tmp_path / "p.csv")}, defaults={"width": 16, "height": 16, "steps": 1}, runtime={"progress_interval_s": 0.2})
    from pipeline.batch.run import run

    summary = run(spec)
    first = capsys.readouterr().err
    progress = [line for line in first.splitlines() if line.startswith("progress: ")]
    assert len(progress) >= 2
    assert progress[-1].startswith("progress: 14/14 rows 100%, 12 images, 2 errors, ")
    assert (summary.images, summary.errors) == (12, 2)
    counts = [int(re.match(r"progress: (\d+)/14", line).group(1)) for line in progress]
    assert counts == sorted(counts), "the count only grows"

    # A rerun into the same output: every row is already there (rejected rows too: the
    # same input gets the same verdict), and the line says so.
    run(spec)
    again = [line for line in capsys.readouterr().err.splitlines() if line.startswith("progress: ")]
    assert again[-1].startswith("progress: 14/14 rows 100%, 14 already in the output, 0 images, 0 errors")
