"""Several models in one job: a model column picks each row's, actors keep an LRU of
loaded models within a memory budget, and rows reach them grouped so swaps are rare."""

import shutil
from pathlib import Path

import pandas as pd
import pytest

from pipeline.engine.resident_models import ModelCache
from pipeline.engine.resolve_catalog import build_catalog

pytestmark = pytest.mark.ray

PARTI = Path(__file__).resolve().parent / "data" / "prompts" / "partiprompts" / "PartiPrompts.tsv"


def parti(n):
    return [line.split("\t")[0] for line in PARTI.read_text().splitlines()[1 : n + 1]]


def two_models(model_cache):
    # Two names for the tiny weights under different schedulers: two models as far as the
    # job is concerned (different fingerprints do not matter here; different images do).
    return {
        "ddim": {"ref": "tiny", "cache_dir": model_cache},
        "euler": {"ref": "tiny", "scheduler": "euler", "cache_dir": model_cache},
    }


def test_rows_pick_their_model_and_one_slot_cache_swaps_once(ray_cluster, make_spec, model_cache, tmp_path):
    from pipeline.batch.run import run

    prompts = parti(24)
    # Interleaved models: unsorted, every batch of 4 would hold both and swap twice.
    models = ["euler" if i % 2 else "" for i in range(24)]
    pd.DataFrame({"prompt": prompts, "model": models}).to_csv(tmp_path / "p.csv", index=False)
    spec = make_spec(
        {"url": str(tmp_path / "p.csv")},
        models=two_models(model_cache),
        defaults={"model": "ddim"},
        runtime={"model_memory_gb": 1e-6},  # room for one model at a time
    )
    summary = run(spec)
    assert (summary.images, summary.errors) == (24, 0)
    # The actor loads ddim at start, then euler once (evicting ddim), and never swaps back.
    assert (summary.model_loads, summary.model_swaps) == (2, 1)
    df = pd.read_parquet(tmp_path / "out" / "images").sort_values("row_index")
    assert df["model"].tolist() == ["euler" if i % 2 else "ddim" for i in range(24)]
    # The scheduler column names the class each image was made with, not the spec's word.
    assert set(df[df["model"] == "euler"]["scheduler"]) == {"EulerDiscreteScheduler"}
    assert set(df[df["model"] == "ddim"]["scheduler"]) == {"DDIMScheduler"}
    assert set(df["model_family"]) == {"sd"} and set(df["pipeline_class"]) == {"StableDiffusionPipeline"}


def test_a_model_that_cannot_load_fails_its_rows_not_the_job(ray_cluster, make_spec, model_cache, tmp_path):
    from pipeline.engine.tiny_models import ensure_tiny
    from pipeline.batch.run import run

    broken = tmp_path / "broken"
    shutil.copytree(ensure_tiny(model_cache), broken)
    (weights,) = (broken / "unet").glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:1000])  # a truncated download
    pd.DataFrame({"prompt": parti(6), "model": ["broken", "", "broken", "", "", ""]}).to_csv(tmp_path / "p.csv", index=False)
    spec = make_spec(
        {"url": str(tmp_path / "p.csv")},
        models={"good": {"ref": "tiny", "cache_dir": model_cache}, "broken": {"ref": str(broken), "cache_dir": model_cache}},
        defaults={"model": "good"},
    )
    summary = run(spec)
    assert (summary.images, summary.errors, summary.errors_by_stage) == (4, 2, {"generate": 2})
    errors = pd.read_parquet(tmp_path / "out" / "errors")
    assert sorted(errors["row_index"]) == [0, 2]
    assert all("broken" in m or "safetensors" in m.lower() for m in errors["error_message"]), errors["error_message"].tolist()


def test_unknown_model_name_is_a_row_error_naming_the_models(make_spec, model_cache, tmp_path):
    from pipeline.spec import schema as S
    from pipeline.spec.validate import Validator

    spec = make_spec({"url": str(tmp_path / "p.csv")}, models=two_models(model_cache), defaults={"model": "ddim"})
    validator = Validator(spec, build_catalog(spec))
    (row,) = validator.validate_row({S.INPUT_SOURCE: "p.csv", S.INPUT_ROW: 0, "prompt": "a cat", "model": "sdxl"})
    assert row[S.ERROR_STAGE] == "validate"
    assert "model 'sdxl' is not one of this spec's models; allowed: ddim, euler" in row[S.ERROR_MESSAGE]


def test_cache_evicts_least_recently_used_within_budget(model_cache, make_spec, tmp_path):
    spec = make_spec(
        {"url": str(tmp_path / "p.csv")},
        models={**two_models(model_cache), "unipc": {"ref": "tiny", "scheduler": "unipc", "cache_dir": model_cache}},
        defaults={"model": "ddim"},
    )
    catalog = build_catalog(spec)
    one = ModelCache(catalog, budget_bytes=0)
    for name in ("ddim", "euler", "ddim", "ddim"):
        one.get(name)
    assert one.resident == ["ddim"] and (one.stats.loads, one.stats.swaps) == (3, 2)

    # Room for two (the tiny model is ~8 MB): the least recently used of three goes.
    two = ModelCache(catalog, budget_bytes=2 * 10**7)
    two.get("ddim"), two.get("euler"), two.get("ddim")
    assert two.resident == ["euler", "ddim"] and two.stats.swaps == 0
    two.get("unipc")
    assert two.resident == ["ddim", "unipc"] and (two.stats.loads, two.stats.swaps) == (3, 1)
