"""Quality columns end to end on a local Ray: safety verdicts per model and mode, CLIP
scores beside the images, perceptual hashes; and what inspect, report, the card and a
user's filtering query make of them."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.engine.tiny_clip import save_tiny_sd_with_safety_checker
from pipeline.spec import schema as S

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

LONG = "a very long prompt about a red kite flying over a grey sea at dawn " * 3  # over 77 tokens


def base_spec(table: Path, out: Path, model_cache: str, models: dict, **sections) -> dict:
    return {
        "input": {"url": str(table)},
        "models": {name: {"cache_dir": model_cache, **m} for name, m in models.items()},
        "defaults": {"width": 32, "height": 32, "steps": 2, "seed": 7, "model": next(iter(models))},
        "output": {"url": str(out)},
        "runtime": {"num_actors": 1, "cpus_per_actor": 0.5, "task_cpus": 0.5, "batch_size": 4},
        **sections,
    }


def request_ids(spec) -> set[str]:
    """The request ids the spec's validator gives the table's rows (what a run would make)."""
    from pipeline.engine.resolve_catalog import build_catalog, place
    from pipeline.spec.validate import Validator
    from pipeline.storage.tables import read_input

    validator = Validator(spec, place(build_catalog(spec), gpus=0))  # the CPU actors these runs use
    return {rid for chunk in read_input(spec.input) for rid in validator.validate_table(chunk).column(S.REQUEST_ID).to_pylist()}


@pytest.fixture(scope="module")
def checker_model(tmp_path_factory) -> str:
    """The tiny SD with a safety checker that flags every image."""
    return save_tiny_sd_with_safety_checker(str(tmp_path_factory.mktemp("sd-flags-all")), -2.0)


@pytest.fixture(scope="module")
def scored(ray_cluster, model_cache, checker_model, tmp_path_factory):
    """One run: 7 rows for the tiny model (a long prompt, and two rows with the same prompt
    and seed), 3 for the model whose checker flags everything; scored by tiny-clip."""
    from pipeline.batch.run import run
    from pipeline.spec.load import parse_spec

    work = tmp_path_factory.mktemp("quality")
    rows = [{"prompt": p, "model": "plain", "seed": ""} for p in ["a red cube", "a green field", LONG, "a fox", "a boat"]]
    rows += [{"prompt": "the same twice", "model": "plain", "seed": "5"}] * 2
    rows += [{"prompt": f"flagged {i}", "model": "checked", "seed": ""} for i in range(3)]
    pd.DataFrame(rows).to_csv(work / "p.csv", index=False)
    data = base_spec(
        work / "p.csv", work / "out", model_cache, {"plain": {"ref": "tiny"}, "checked": {"ref": checker_model}},
        scoring={"ref": "tiny-clip", "cache_dir": model_cache},
    )  # fmt: skip
    spec = parse_spec(data)
    summary = run(spec)
    return spec, summary, work / "out", data


def images_table(out: Path) -> list[dict]:
    return pq.read_table(out / "images").to_pylist()


def pixels(row: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB"))


def test_images_carry_verdicts_scores_and_hashes(scored, model_cache):
    import imagehash

    from pipeline.engine.clip_scorer import ClipScorer, scorer_fingerprint
    from pipeline.batch.summary import format_summary
    from pipeline.spec.load import parse_spec

    spec, summary, out, data = scored
    assert (summary.images, summary.errors) == (10, 0)
    assert summary.scoring_seconds > 0 and "s scoring images with CLIP" in format_summary(summary)
    schema = pq.read_schema(next((out / "images").glob("*.parquet")))
    assert [schema.field(f.name).type for f in S.QUALITY_FIELDS] == [f.type for f in S.QUALITY_FIELDS]

    rows = images_table(out)
    checked = [r for r in rows if r["model"] == "checked"]
    plain = [r for r in rows if r["model"] == "plain"]
    assert len(checked) == 3 and all(r["nsfw_detected"] is True and not pixels(r).any() for r in checked)
    assert all(r["nsfw_detected"] is None for r in plain), "a model without a checker has no verdict"

    config = spec.scoring
    fingerprint = scorer_fingerprint(config)
    assert {r["clip_scorer"] for r in rows} == {fingerprint}
    assert [r["clip_prompt_truncated"] for r in plain] == [r["prompt"] == LONG for r in plain]
    scorer = ClipScorer(config, "cpu", fingerprint)
    for row in plain[:3] + checked[:1]:
        assert row["clip_score"] == pytest.approx(scorer.score([pixels(row)], [row["prompt"]]).clip_scores[0], abs=1e-3)
        assert row["phash"] == int(str(imagehash.phash(Image.open(io.BytesIO(row["image"]["bytes"])))), 16)

    # A score never changes a request id: the same spec without scoring names the same images.
    unscored = parse_spec({k: v for k, v in data.items() if k != "scoring"})
    assert {r["request_id"] for r in rows} == request_ids(unscored) == request_ids(spec)

    manifest = json.loads((out / "_runs" / f"{summary.run_id}.json").read_text())
    assert manifest["scoring"]["ref"] == "tiny-clip" and manifest["scoring"]["fingerprint"] == fingerprint
    assert manifest["scoring"]["seconds"] == pytest.approx(summary.scoring_seconds)
    models = manifest["models"]
    assert (models["checked"]["safety_checker"], models["checked"]["has_safety_checker"]) == ("flag", True)
    assert models["plain"]["has_safety_checker"] is False

    card = (out / "README.md").read_text()
    assert "## Quality columns" in card and f"`tiny-clip` (fingerprint `{fingerprint}`)" in card
    assert "flag: flagged images are kept as diffusers' black images" in card and "the model has no safety checker" in card
    header = card.split("---\n")[1]
    for name in ("nsfw_detected", "clip_score", "phash"):
        assert f"name: {name}" in header


def test_inspect_counts_exact_and_near_duplicates(scored, capsys):
    from pipeline.cli import main
    from pipeline.output.inspect import inspect_output

    _, _, out, _ = scored
    found = inspect_output(str(out)).duplicates
    assert (found.images, found.hashed) == (10, 10)
    # The three black images are one file; the two rows of one prompt and seed are the same
    # image (to within a step of 255 from batching: near, if not exact).
    assert found.exact_groups >= 1 and found.exact_redundant >= 2
    assert found.near_redundant >= 3
    assert found.worst[0].size == 3 and found.worst[0].kind == "exact"
    assert {m["prompt"] for m in found.worst[0].members} == {"flagged 0", "flagged 1", "flagged 2"}
    assert any({m["prompt"] for m in g.members} == {"the same twice"} for g in found.worst)

    assert main(["inspect", str(out), "--near-distance", "0"]) == 0
    text = capsys.readouterr().out
    assert "duplicates among 10 images:" in text and "near (phash within 0 bits)" in text and "3 images, identical files:" in text


def test_report_shows_scores_and_flagged_share_and_sorts_by_score(scored, tmp_path):
    from pipeline.cli import main
    from pipeline.output.report import read_output, render_html

    _, _, out, _ = scored
    data = read_output(str(out), sample=4, order="score")
    lowest = sorted(r["clip_score"] for r in images_table(out))[:4]
    assert [s["clip_score"] for s in data.samples] == pytest.approx(lowest)
    page = render_html(data)
    assert "Images (4 of 10, lowest clip_score first)" in page
    assert "<h2>Quality</h2>" in page and "3 of 3 (100.0%)" in page and "no checker run" in page
    assert page.count("clip_score of ") == 2  # a histogram per model

    target = tmp_path / "page.html"
    assert main(["report", str(out), "--html", str(target), "--sort", "score", "--sample", "2"]) == 0
    assert "Images (2 of 10, lowest clip_score first)" in target.read_text()


def test_filtering_is_a_query(scored):
    """The README's three ways of keeping the good rows agree."""
    import datasets
    import duckdb

    _, _, out, _ = scored
    threshold = float(np.median([r["clip_score"] for r in images_table(out)]))
    df = pd.read_parquet(out / "images")
    by_pandas = set(df[(df["nsfw_detected"] != True) & (df["clip_score"] >= threshold)]["request_id"])  # noqa: E712
    by_duckdb = {
        r[0]
        for r in duckdb.sql(
            f"select request_id from '{out}/images/*.parquet' where not coalesce(nsfw_detected, false) and clip_score >= {threshold}"
        ).fetchall()
    }
    images = datasets.load_dataset("parquet", data_dir=str(out / "images"), split="train")
    by_datasets = set(images.filter(lambda r: not r["nsfw_detected"] and r["clip_score"] >= threshold)["request_id"])
    expected = {r["request_id"] for r in images_table(out) if r["model"] == "plain" and r["clip_score"] >= threshold}
    assert by_pandas == by_duckdb == by_datasets == expected and expected


def test_error_and_off_modes(ray_cluster, model_cache, checker_model, tmp_path):
    from pipeline.batch.run import run
    from pipeline.output.verify import verify
    from pipeline.spec.load import parse_spec

    rows = [{"prompt": f"strict {i}", "model": "strict"} for i in range(2)] + [{"prompt": f"open {i}", "model": "unchecked"} for i in range(2)]
    pd.DataFrame(rows).to_csv(tmp_path / "p.csv", index=False)
    models = {"strict": {"ref": checker_model, "safety_checker": "error"}, "unchecked": {"ref": checker_model, "safety_checker": "off"}}
    data = base_spec(tmp_path / "p.csv", tmp_path / "out", model_cache, models)
    spec = parse_spec(data)
    summary = run(spec)
    assert (summary.images, summary.errors, summary.errors_by_stage) == (2, 2, {"generate": 2})
    assert summary.scoring_seconds is None

    errors = pq.read_table(tmp_path / "out" / "errors").to_pylist()
    assert {(e["error_stage"], e["error_type"]) for e in errors} == {("generate", "ImageFlagged")}
    assert all("safety checker flagged this image" in e["error_message"] for e in errors)
    images = images_table(tmp_path / "out")
    assert {r["model"] for r in images} == {"unchecked"}
    assert all(r["nsfw_detected"] is None and pixels(r).any() for r in images), "off: the checker did not black them out"
    assert all(r["clip_score"] is None and r["phash"] is not None for r in images)

    # off keeps pixels the checker would black out: its ids are not those of a checked run.
    data["models"]["unchecked"]["safety_checker"] = "flag"
    flagged_ids = request_ids(parse_spec(data))
    assert not {r["request_id"] for r in images} & flagged_ids

    manifest = json.loads((tmp_path / "out" / "_runs" / f"{summary.run_id}.json").read_text())
    assert manifest["models"]["unchecked"]["safety_checker"] == "off" and manifest["scoring"] is None
    card = (tmp_path / "out" / "README.md").read_text()
    assert "**off**: the model's safety checker was not run" in card and "flagged images became error rows" in card
    assert "none: no run had a `scoring` section" in card
    assert verify(str(tmp_path / "out"), spec=spec).ok
