"""Quality columns without a cluster: safety checker verdicts from the engine, CLIP scores
against transformers, the perceptual hash against imagehash, near-duplicate groups."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from PIL import Image

from pipeline.engine.engine import Engine
from pipeline.engine.requests import GenerationRequest
from pipeline.engine.tiny_clip import save_tiny_sd_with_safety_checker, tiny_safety_checker
from pipeline.spec import schema as S
from pipeline.spec.model_config import ModelConfig, ScoringConfig

EVERY, NONE = -2.0, 2.0  # checker thresholds: every image flagged, none


def requests(n: int = 6) -> list[GenerationRequest]:
    return [GenerationRequest(f"a photo of thing {i}", "", 100 + i, 32, 32, 2, 7.5) for i in range(n)]


@pytest.fixture(scope="module")
def plain(model_cache) -> list[np.ndarray]:
    """The tiny model's images (no checker): the pixels a checker that flags nothing keeps."""
    return [r.pixels for r in Engine(ModelConfig(ref="tiny", cache_dir=model_cache)).generate(requests())]


def checked(tmp_path_factory, model_cache, threshold: float, mode: str) -> Engine:
    folder = tmp_path_factory.mktemp("sd-checker")
    return Engine(ModelConfig(ref=save_tiny_sd_with_safety_checker(str(folder), threshold), cache_dir=model_cache, safety_checker=mode))


def test_a_model_without_a_checker_records_no_verdict(model_cache, plain):
    results = Engine(ModelConfig(ref="tiny", cache_dir=model_cache)).generate(requests(2))
    assert [r.nsfw_detected for r in results] == [None, None]


def test_flag_keeps_diffusers_black_image_and_says_so(tmp_path_factory, model_cache, plain):
    flagged = checked(tmp_path_factory, model_cache, EVERY, "flag").generate(requests())
    assert all(r.ok and r.nsfw_detected is True for r in flagged)
    assert all(not r.pixels.any() for r in flagged), "diffusers blacks out what its checker flags"

    passed = checked(tmp_path_factory, model_cache, NONE, "flag").generate(requests())
    assert all(r.ok and r.nsfw_detected is False for r in passed)
    assert all(np.array_equal(r.pixels, p) for r, p in zip(passed, plain))


def test_error_makes_flagged_images_error_rows_without_pixels(tmp_path_factory, model_cache):
    results = checked(tmp_path_factory, model_cache, EVERY, "error").generate(requests(3))
    assert all(not r.ok and r.pixels is None for r in results)
    assert {r.error_type for r in results} == {"ImageFlagged"}
    assert "safety checker flagged this image" in results[0].error_message and "model.safety_checker: flag" in results[0].error_message


def test_off_does_not_load_or_run_the_checker(tmp_path_factory, model_cache, plain):
    engine = checked(tmp_path_factory, model_cache, EVERY, "off")
    assert engine.pipe.safety_checker is None
    results = engine.generate(requests())
    assert all(r.ok and r.nsfw_detected is None for r in results)
    assert all(np.array_equal(r.pixels, p) for r, p in zip(results, plain)), "the checker would have blacked these out"


def test_each_image_gets_its_own_verdict(tmp_path_factory, model_cache, plain):
    """A threshold between the images' cosines with the checker's concept flags some and
    not others; each verdict is the checker's own for that image, in request order."""
    import torch

    checker, extractor = tiny_safety_checker(0.0)  # the same weights at every threshold
    with torch.no_grad():
        pooled = checker.vision_model(extractor(images=plain, return_tensors="pt")["pixel_values"])[1]
        embeds = torch.nn.functional.normalize(checker.visual_projection(pooled), dim=-1)
        cosines = (embeds @ torch.nn.functional.normalize(checker.concept_embeds[0], dim=0)).tolist()
    ordered = sorted(cosines)
    gap, low = max((b - a, a) for a, b in zip(ordered, ordered[1:]))
    assert gap > 0.002, "the images' cosines are too close to split them reliably"
    threshold = low + gap / 2
    expected = [c > threshold for c in cosines]
    assert any(expected) and not all(expected)

    flag = checked(tmp_path_factory, model_cache, threshold, "flag").generate(requests())
    assert [r.nsfw_detected for r in flag] == expected
    for result, pixels, flagged in zip(flag, plain, expected):
        assert (not result.pixels.any()) if flagged else np.array_equal(result.pixels, pixels)

    error = checked(tmp_path_factory, model_cache, threshold, "error").generate(requests())
    assert [not r.ok for r in error] == expected
    assert all(np.array_equal(r.pixels, p) for r, p, f in zip(error, plain, expected) if not f)


# -- CLIP scores -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scorer(model_cache):
    from pipeline.engine.clip_scorer import ClipScorer, scorer_fingerprint

    config = ScoringConfig(ref="tiny-clip", cache_dir=model_cache)
    return ClipScorer(config, "cpu", scorer_fingerprint(config))


def test_clip_score_matches_transformers(scorer, plain, model_cache):
    import torch
    from transformers import CLIPModel, CLIPProcessor

    from pipeline.engine.tiny_clip import ensure_tiny_clip

    long = "a very long prompt about a red kite over the sea " * 4  # well over 77 byte tokens
    prompts = ["a cat", long, "a cat", "a boat on a lake", "", "a cat"]
    images = [plain[0], plain[1], plain[2], np.zeros((48, 64, 3), np.uint8), plain[3], plain[4]]
    scores = scorer.score(images, prompts)
    assert scores.prompt_truncated == [False, True, False, False, False, False]
    assert scores.seconds > 0

    folder = ensure_tiny_clip(model_cache)
    model, processor = CLIPModel.from_pretrained(folder), CLIPProcessor.from_pretrained(folder)
    for image, prompt, score in zip(images, prompts, scores.clip_scores):
        inputs = processor(text=[prompt], images=[image], return_tensors="pt", truncation=True, max_length=77, padding=True)
        with torch.no_grad():
            out = model(**inputs)
        expected = 100 * torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds).item()
        assert score == pytest.approx(expected, abs=1e-4)
    assert len(set(round(s, 3) for s in scores.clip_scores)) > 3, "different images and prompts score differently"


def test_scorer_refs_take_the_forms_model_refs_do(scorer, model_cache, tmp_path, plain):
    from pipeline.engine.clip_scorer import ClipScorer, scorer_fingerprint
    from pipeline.engine.tiny_clip import ensure_tiny_clip
    from pipeline.errors import ModelError

    local = tmp_path / "clip"
    shutil.copytree(ensure_tiny_clip(model_cache), local)
    config = ScoringConfig(ref=str(local), cache_dir=model_cache)
    fingerprint = scorer_fingerprint(config)
    assert fingerprint.startswith("local-") and fingerprint != scorer.fingerprint
    again = ClipScorer(config, "cpu", fingerprint).score(plain[:2], ["a", "b"])
    assert again.clip_scores == pytest.approx(scorer.score(plain[:2], ["a", "b"]).clip_scores, abs=1e-5)

    (local / "model.safetensors").rename(local / "pytorch_model.bin")
    with pytest.raises(ModelError, match=r"scoring.ref .* holds pickle weights \(pytorch_model.bin\).*convert them to safetensors$"):
        scorer_fingerprint(config)
    (local / "config.json").unlink()
    with pytest.raises(ModelError, match=r"scoring.ref .* is a folder without config.json; point it at a CLIP model saved"):
        scorer_fingerprint(config)
    with pytest.raises(ModelError, match=r"scoring.ref 'tiny' is not a tiny model \(tiny-clip\)"):
        scorer_fingerprint(ScoringConfig(ref="tiny", cache_dir=model_cache))


# -- perceptual hash and near duplicates -------------------------------------------------------


def test_phash_is_imagehash_of_the_stored_image(plain):
    import imagehash

    from pipeline.engine.image_encoding import encode_image
    from pipeline.engine.perceptual_hash import phash64

    for pixels in plain[:3]:
        stored = Image.open(io.BytesIO(encode_image(pixels, "png")))
        assert phash64(pixels) == int(str(imagehash.phash(stored)), 16)
        assert 0 <= phash64(pixels) < 2**64
    assert phash64(plain[0]) != phash64(plain[1])


def test_near_groups_are_the_components_of_close_pairs():
    from pipeline.output.duplicates import near_groups

    base = np.uint64(0xF0F0_0F0F_1234_5678)
    hashes = np.array(
        [base, base ^ np.uint64(0b11), base ^ np.uint64(0b11 << 40), ~base, ~base ^ np.uint64(1 << 63), base, np.uint64(0)], dtype=np.uint64
    )  # fmt: skip
    # 1 and 2 are 4 bits apart, each 2 from 0: one chain at distance 2, separate at 1.
    assert near_groups(hashes, 2).tolist() == [0, 0, 0, 3, 3, 0, 6]
    assert near_groups(hashes, 1).tolist() == [0, 1, 2, 3, 3, 0, 6]
    assert near_groups(hashes, 0).tolist() == [0, 1, 2, 3, 4, 0, 6]

    rng = np.random.default_rng(0)
    many = rng.integers(0, 2**63, 400, dtype=np.uint64)
    many[1::2] = many[0::2] ^ (np.uint64(1) << rng.integers(0, 64, 200).astype(np.uint64))  # a 1-bit neighbour each
    for distance in (1, 6):
        labels = near_groups(many, distance)
        brute = np.bitwise_count(many[:, None] ^ many[None, :]) <= distance
        # Random 64-bit hashes are ~32 bits apart: the pairs are the only links.
        assert (brute.sum() - len(many)) // 2 == 200
        assert all(labels[i] == labels[i + 1] == i for i in range(0, 400, 2))


def test_outputs_from_before_the_quality_columns_still_inspect_and_report(tmp_path, plain):
    """Parts written before these columns existed: inspect counts exact duplicates and says
    near ones were not computed; the report reads them as nulls; the card says so."""
    import hashlib
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.engine.image_encoding import encode_image
    from pipeline.output.card import card_text
    from pipeline.output.inspect import format_inspection, inspect_output
    from pipeline.output.report import read_output, render_html

    old = pa.schema([f for f in S.images_schema([]) if f.name not in {q.name for q in S.QUALITY_FIELDS}])
    data = [encode_image(plain[0], "png")] * 2 + [encode_image(plain[1], "png")]
    rows = [
        {f.name: None for f in old}
        | {S.IMAGE: {"bytes": d, "path": f"r{i}.png"}, S.REQUEST_ID: f"r{i}", S.ID: f"p.csv#{i}", S.SOURCE: "p.csv", S.ROW_INDEX: i,
           S.IMAGE_INDEX: 0, S.PROMPT: f"prompt {i}", S.NEGATIVE_PROMPT: "", S.SEED: i, S.WIDTH: 32, S.HEIGHT: 32, S.STEPS: 2,
           S.GUIDANCE_SCALE: 7.5, S.MODEL: "tiny", S.IMAGE_FORMAT: "png", S.SHA256: hashlib.sha256(d).hexdigest(),
           S.RUN_ID: "r1"}
        for i, d in enumerate(data)
    ]  # fmt: skip
    (tmp_path / "images").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, old), tmp_path / "images" / "part-old.parquet")
    manifest = {
        "run_id": "r1", "started_at": 0, "finished_at": 1, "wall_seconds": 1.0, "model_fingerprint": "tiny-x",
        "spec": {"model": {"ref": "tiny"}, "defaults": {}, "output": {}},
        "counts": {"input_rows": 3, "images": 3, "errors": 0, "errors_by_stage": {}},
        "parts": [{"path": "images/part-old.parquet", "rows": 3, "bytes": 1}],
    }  # fmt: skip
    (tmp_path / "_runs").mkdir()
    (tmp_path / "_runs" / "r1.json").write_text(json.dumps(manifest))

    found = inspect_output(str(tmp_path))
    assert (found.duplicates.exact_groups, found.duplicates.exact_redundant, found.duplicates.hashed) == (1, 1, 0)
    text = format_inspection(found)
    assert "near                       not computed: no image has a phash" in text and "2 images, identical files:" in text
    report = read_output(str(tmp_path), order="score")
    assert report.order == "spread" and all(r[S.CLIP_SCORE] is None for r in report.images)
    assert "No image has a clip_score or a safety verdict" in render_html(report)
    card = card_text([manifest], old)
    assert "no run recorded its models" in card and "none: no run had a `scoring` section" in card


def test_scoring_overlaps_the_next_diffusers_call(tmp_path, model_cache):
    """A call's images are scored on the encoder's threads: the next diffusers call starts
    while the last one is still being scored, and the block waits for scores only at its end.
    The scorer below holds its first call until the engine's second call has started (an
    event, not a sleep): inline scoring would never see it and fail."""
    import threading

    import pandas as pd

    from pipeline.engine.requests import GenerationResult
    from pipeline.engine.resolve_catalog import build_catalog
    from pipeline.engine.clip_scorer import Scores
    from pipeline.engine.table_generation import BlockTimes, ImageEncoder, generate_table
    from pipeline.spec.load import parse_spec
    from pipeline.spec.validate import Validator
    from pipeline.storage.tables import read_input

    pd.DataFrame({"prompt": [f"p{i}" for i in range(4)]}).to_csv(tmp_path / "p.csv", index=False)
    spec = parse_spec({
        "input": {"url": str(tmp_path / "p.csv")},
        "model": {"ref": "tiny", "cache_dir": model_cache, "engine": {"max_batch_pixels": 2 * 32 * 32}},
        "defaults": {"width": 32, "height": 32, "steps": 1},
    })  # fmt: skip
    catalog = build_catalog(spec)
    table = Validator(spec, catalog).validate_table(next(read_input(spec.input)))
    second_call_started = threading.Event()
    calls: list[int] = []

    class Engine:
        scheduler_name = "DDIMScheduler"  # recorded on each image row by generate_table

        def call_size(self, request):
            return 2

        def generate(self, requests):
            calls.append(len(requests))
            if len(calls) == 2:
                second_call_started.set()
            return [GenerationResult(pixels=np.full((32, 32, 3), 40 * len(calls), np.uint8), seconds=0.1) for _ in requests]

    class Models:
        def get(self, name):
            return Engine()

    class Scorer:
        fingerprint = "test-scorer"
        overlapped: list[bool] = []

        def score(self, images, prompts):
            self.overlapped.append(second_call_started.wait(timeout=60))
            return Scores([float(len(p)) for p in prompts], [False] * len(prompts), 0.5)

    times = BlockTimes()
    out = generate_table(Models(), table, "actor", "node", ImageEncoder("png", 95, threads=1, scorer=Scorer()), times)
    assert calls == [2, 2] and Scorer.overlapped == [True, True]
    assert out.column(S.CLIP_SCORE).to_pylist() == [2.0] * 4 and set(out.column(S.CLIP_SCORER).to_pylist()) == {"test-scorer"}
    assert times.scoring == 1.0
