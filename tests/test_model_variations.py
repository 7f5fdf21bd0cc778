"""One job, several model families and LoRA adapters: rows pick a model and an adapter,
each family's parameters are checked per row, the adapter's digest is in the request id,
and every image row says how it was made."""

import hashlib
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.engine.resolve_catalog import build_catalog
from pipeline.engine.tiny_models import build_tiny_lora
from pipeline.spec import schema as S
from pipeline.spec.validate import Validator

PARTI = Path(__file__).resolve().parent / "data" / "prompts" / "partiprompts" / "PartiPrompts.tsv"


def parti(n):
    return [line.split("\t")[0] for line in PARTI.read_text().splitlines()[1 : n + 1]]


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    return {"sd_a": build_tiny_lora("tiny", str(folder), seed=0), "sd_b": build_tiny_lora("tiny", str(folder), seed=1)}


def family_spec(make_spec, model_cache, url, **sections):
    models = {name: {"ref": ref, "cache_dir": model_cache} for name, ref in (("sd", "tiny"), ("xl", "tiny-sdxl"), ("sd3", "tiny-sd3"), ("flux", "tiny-flux"))}
    return make_spec({"url": url}, models=models, defaults={"model": "sd", "negative_prompt": "blurry"}, **sections)


def validate(spec, **cells):
    return Validator(spec, build_catalog(spec)).validate_row({S.INPUT_SOURCE: "p.csv", S.INPUT_ROW: 0, "prompt": "a cat", **cells})


def test_each_family_takes_its_own_parameters(make_spec, model_cache, loras, tmp_path):
    spec = family_spec(make_spec, model_cache, str(tmp_path / "p.csv"), loras={"style": {"url": loras["sd_a"]}})
    (sd,) = validate(spec)
    assert (sd[S.MODEL_FAMILY], sd[S.PIPELINE_CLASS], sd[S.NEGATIVE_PROMPT], sd[S.MAX_SEQUENCE_LENGTH]) == ("sd", "StableDiffusionPipeline", "blurry", None)
    # FLUX takes no negative prompt: the spec's default is not applied, the row's own is an error.
    (flux,) = validate(spec, model="flux")
    assert S.ERROR_STAGE not in flux and flux[S.NEGATIVE_PROMPT] is None and flux[S.MAX_SEQUENCE_LENGTH] == 512
    (bad,) = validate(spec, model="flux", negative_prompt="ugly")
    assert bad[S.ERROR_STAGE] == "validate" and "does not take negative_prompt" in bad[S.ERROR_MESSAGE]
    # T5 length: SD3 and FLUX only, within the family's bound.
    (sd3,) = validate(spec, model="sd3", max_sequence_length=77)
    assert sd3[S.MAX_SEQUENCE_LENGTH] == 77 and sd3[S.PIPELINE_CLASS] == "StableDiffusion3Pipeline"
    assert "between 1 and 512" in validate(spec, model="sd3", max_sequence_length=1000)[0][S.ERROR_MESSAGE]
    assert "does not take max_sequence_length" in validate(spec, model="xl", max_sequence_length=77)[0][S.ERROR_MESSAGE]
    # The T5 length is in the request id; rows without one keep the ids they had.
    assert sd3[S.REQUEST_ID] != validate(spec, model="sd3", max_sequence_length=78)[0][S.REQUEST_ID]


def test_lora_columns_are_checked_and_the_digest_is_in_the_request_id(make_spec, model_cache, loras, tmp_path):
    spec = family_spec(make_spec, model_cache, str(tmp_path / "p.csv"), loras={"a": {"url": loras["sd_a"], "scale": 0.8}, "b": {"url": loras["sd_b"]}})
    (plain,) = validate(spec)
    (a,) = validate(spec, lora="a")
    digest = hashlib.sha256(Path(loras["sd_a"]).read_bytes()).hexdigest()[:16]
    assert (a[S.LORA], a[S.LORA_SCALE], a[S.LORA_DIGEST]) == ("a", 0.8, digest)
    assert (plain[S.LORA], plain[S.LORA_SCALE], plain[S.LORA_DIGEST]) == (None, None, None)
    ids = {plain[S.REQUEST_ID], a[S.REQUEST_ID], validate(spec, lora="b")[0][S.REQUEST_ID], validate(spec, lora="a", lora_scale=0.5)[0][S.REQUEST_ID]}
    assert len(ids) == 4
    assert "lora 'c' is not one of this spec's loras; allowed: a, b" in validate(spec, lora="c")[0][S.ERROR_MESSAGE]
    assert "lora_scale is set but the row names no lora" in validate(spec, lora_scale=0.5)[0][S.ERROR_MESSAGE]
    assert "lora_scale must be between -10 and 10" in validate(spec, lora="a", lora_scale=11)[0][S.ERROR_MESSAGE]


@pytest.mark.ray
def test_one_job_four_families_and_adapters_local_and_on_s3(ray_cluster, make_spec, model_cache, loras, s3, tmp_path):
    from pipeline.batch.run import run

    fs, bucket, options = s3
    fs.put(loras["sd_b"], f"{bucket}/adapters/b.safetensors")
    prompts = parti(3)
    rows = []
    for model in ("sd", "xl", "sd3", "flux"):
        for prompt in prompts:
            rows.append({"prompt": prompt, "model": model, "lora": "", "seed": 5})
    # Same prompt and seed with and without adapters, and an adapter made for SD on FLUX.
    rows += [
        {"prompt": prompts[0], "model": "sd", "lora": "local", "seed": 5},
        {"prompt": prompts[0], "model": "sd", "lora": "remote", "seed": 5},
        {"prompt": prompts[1], "model": "flux", "lora": "local", "seed": 5},
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "p.csv", index=False)
    spec = family_spec(
        make_spec,
        model_cache,
        str(tmp_path / "p.csv"),
        loras={"local": {"url": loras["sd_a"]}, "remote": {"url": f"s3://{bucket}/adapters/b.safetensors", "storage_options": options}},
    )
    summary = run(spec)
    assert (summary.images, summary.errors, summary.errors_by_stage) == (14, 1, {"generate": 1})
    images = pd.read_parquet(tmp_path / "out" / "images")
    by_model = images.groupby("model")
    assert dict(by_model["model_family"].first()) == {"sd": "sd", "xl": "sdxl", "sd3": "sd3", "flux": "flux"}
    assert dict(by_model["pipeline_class"].first())["xl"] == "StableDiffusionXLPipeline"
    assert images["model_fingerprint"].nunique() == 4
    for _, row in images.iterrows():
        assert Image.open(io.BytesIO(row["image"]["bytes"])).size == (32, 32)

    def pixels(model, lora):
        (match,) = images[(images["model"] == model) & (images["prompt"] == prompts[0]) & (images["lora"].fillna("") == lora)]["image"]
        return np.asarray(Image.open(io.BytesIO(match["bytes"])), dtype=int)

    plain, local, remote = pixels("sd", ""), pixels("sd", "local"), pixels("sd", "remote")
    assert np.abs(plain - local).mean() > 1 and np.abs(plain - remote).mean() > 1 and np.abs(local - remote).mean() > 1
    with_lora = images[images["lora"].notna()]
    assert set(with_lora["lora_digest"]) == {hashlib.sha256(Path(p).read_bytes()).hexdigest()[:16] for p in (loras["sd_a"], loras["sd_b"])}
    # An adapter made for the SD UNet does not fit FLUX's transformer: its row fails, with why.
    (error,) = pd.read_parquet(tmp_path / "out" / "errors").itertuples()
    assert error.error_type == "AdapterError" and "tiny-flux" in error.error_message and "trained for this model family" in error.error_message


def test_adapter_is_switched_off_and_on_between_calls(model_cache, loras):
    from pipeline.engine.engine import Engine
    from pipeline.engine.requests import GenerationRequest
    from pipeline.spec.model_config import LoraConfig, ModelConfig

    digest = hashlib.sha256(Path(loras["sd_a"]).read_bytes()).hexdigest()[:16]
    engine = Engine(ModelConfig(ref="tiny", cache_dir=model_cache), adapters={digest: LoraConfig(url=loras["sd_a"])})

    def image(lora=None, scale=1.0):
        (result,) = engine.generate([GenerationRequest("a red cube", "", 3, 32, 32, 2, 5.0, lora=lora, lora_scale=scale)])
        return result.pixels.astype(int)

    before = image()
    full, half, again = image(digest), image(digest, 0.5), image(digest)
    after = image()
    assert np.array_equal(before, after)  # no adapter left active
    assert np.array_equal(full, again)
    assert np.abs(full - before).mean() > np.abs(half - before).mean() > 0  # the scale weighs the adapter


def test_the_families_example_spec_plans_every_row_onto_its_model(tmp_path):
    from pipeline.batch.plan import make_plan
    from pipeline.spec.load import load_spec

    repo = Path(__file__).resolve().parents[1]
    spec = load_spec(repo / "jobs" / "models.yaml", [f"output.url={tmp_path}/out"])
    plan = make_plan(spec)
    assert (plan.rows, plan.valid_rows) == (16, 16)
    assert {bucket.model: bucket.images for bucket in plan.buckets} == {"sd": 4, "sdxl": 4, "sd3": 4, "flux": 4}
