"""Every family on its real tiny pipeline: loading, mixed batches, encode-once against the
plain path, and each family's own call conventions (SDXL's empty negative prompt, FLUX's
missing one, SD3/FLUX's T5 length), and tiny LoRA adapters."""

import json
from dataclasses import replace

import numpy as np
import pytest

from pipeline.engine import family_calls
from pipeline.engine.engine import Engine
from pipeline.engine.requests import GenerationRequest
from pipeline.engine.tiny_models import TINY_MODELS, build_tiny_lora
from pipeline.errors import ModelError
from pipeline.spec.model_config import EngineOptions, ModelConfig

TOLERANCE = 2  # steps of 255

FAMILIES = {
    "tiny": ("sd", "StableDiffusionPipeline"),
    "tiny-sdxl": ("sdxl", "StableDiffusionXLPipeline"),
    "tiny-sd3": ("sd3", "StableDiffusion3Pipeline"),
    "tiny-flux": ("flux", "FluxPipeline"),
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("family-models"))


@pytest.fixture(scope="module")
def engines(cache):
    """``engines(name, encode_once)``: one engine per tiny model and option, built on
    first use, so a test of one family never pays for the others."""
    built = {}

    def get(name: str, encode_once: bool = True) -> Engine:
        if (name, encode_once) not in built:
            options = EngineOptions(encode_prompts_once=encode_once)
            built[name, encode_once] = Engine(ModelConfig(ref=name, cache_dir=cache, engine=options))
        return built[name, encode_once]

    return get


def request(prompt="a red cube", negative="", seed=1, width=32, height=32, steps=2, guidance=5.0, **extra):
    return GenerationRequest(prompt, negative, seed, width, height, steps, guidance, **extra)


def mixed_requests():
    """Two sizes, repeated prompts, a repeated row, empty and non-empty negative prompts."""
    return [
        request(seed=1),
        request(seed=2),
        request("a blue ball", "blurry", seed=1, width=48),
        request(seed=1),
        request("a blue ball", "", seed=3, width=48),
        request("a red cube", "blurry", seed=4),
    ]


def assert_close(got, want, tolerance=TOLERANCE):
    assert np.abs(got.astype(int) - want.astype(int)).max() <= tolerance


def test_tiny_models_cover_every_family():
    assert set(TINY_MODELS) == set(FAMILIES)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_generates_mixed_batches_deterministically(engines, name):
    engine = engines(name)
    assert (engine.family.name, type(engine.pipe).__name__) == FAMILIES[name]
    first = engine.generate(mixed_requests())
    assert [r.pixels.shape for r in first] == [(32, 32, 3), (32, 32, 3), (32, 48, 3), (32, 32, 3), (32, 48, 3), (32, 32, 3)]
    assert all(r.ok and r.pixels.dtype == np.uint8 for r in first)
    assert np.array_equal(first[0].pixels, first[3].pixels)
    assert not np.array_equal(first[0].pixels, first[1].pixels)
    # The same rows in another batch: on CPU, batch composition moves a pixel by 1/255 at most.
    again = engine.generate(mixed_requests()[:3])
    for a, b in zip(first, again):
        assert_close(a.pixels, b.pixels, tolerance=1)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_encode_once_matches_the_plain_path(engines, name):
    once = engines(name, encode_once=True).generate(mixed_requests())
    plain = engines(name, encode_once=False).generate(mixed_requests())
    for got, want in zip(once, plain):
        assert_close(got.pixels, want.pixels)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_encode_once_encodes_each_distinct_text_once(engines, name):
    engine = engines(name)
    encoders = [m for key, m in engine.pipe.components.items() if key.startswith("text_encoder") and m is not None]
    rows = {id(m): [] for m in encoders}
    hooks = [m.register_forward_hook(lambda m, args, out: rows[id(m)].append(args[0].shape[0])) for m in encoders]
    try:
        engine.generate([request(seed=s, negative="blurry" if s % 2 else "") for s in range(4)] + [request("a blue ball", seed=9)])
    finally:
        for hook in hooks:
            hook.remove()
    # Prompts {red cube, blue ball}; negatives {"", blurry} except for FLUX, which has none.
    expected = [2] if name == "tiny-flux" else [2, 2]
    assert all(seen == expected for seen in rows.values()), rows


@pytest.mark.parametrize("encode_once", [True, False])
def test_flux_gets_no_negative_prompt(engines, encode_once):
    engine = engines("tiny-flux", encode_once)
    batch = [request(negative="blurry", guidance=3.5)]
    kwargs = family_calls.call_kwargs(engine.pipe, engine.family, batch, encode_once)
    assert not any(key.startswith("negative") or key == "true_cfg_scale" for key in kwargs)
    assert kwargs["guidance_scale"] == 3.5 and kwargs["max_sequence_length"] == 512


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_max_sequence_length_reaches_the_call(engines, name):
    engine = engines(name)
    long_prompt = "a very detailed painting of a red cube on a blue ball"
    short, long = engine.generate([request(long_prompt, max_sequence_length=16), request(long_prompt, max_sequence_length=128)])
    assert short.prompt_tokens == long.prompt_tokens and 16 < short.prompt_tokens <= 128
    assert short.prompt_truncated is True and long.prompt_truncated is False
    # The T5 sequence the transformer sees differs, so the image does.
    assert not np.array_equal(short.pixels, long.pixels)
    default = family_calls.call_kwargs(engine.pipe, engine.family, [request()], encode_once=False)
    assert default["max_sequence_length"] == engine.family.max_sequence_length


@pytest.mark.parametrize("name", ["tiny", "tiny-sdxl"])
def test_clip_families_truncate_at_77_tokens(engines, name):
    engine = engines(name)
    short, long = engine.generate([request("a cat"), request("a cat " * 40)])
    assert short.prompt_truncated is False and long.prompt_truncated is True
    assert long.prompt_tokens > engine.token_limit(request()) == 77


@pytest.mark.parametrize("encode_once", [True, False])
def test_sdxl_empty_negative_prompt_is_diffusers_no_negative_prompt(engines, encode_once):
    import torch

    engine = engines("tiny-sdxl", encode_once)
    row = request("a red cube", "", seed=5, guidance=6.0)
    with torch.inference_mode():
        own = engine.pipe(
            prompt=[row.prompt],
            width=row.width,
            height=row.height,
            num_inference_steps=row.steps,
            guidance_scale=row.guidance_scale,
            generator=[torch.Generator("cpu").manual_seed(row.seed)],
            output_type="np",
        ).images[0]
    alone = engine.generate([row])[0].pixels
    assert_close(alone, (own * 255).round().clip(0, 255).astype(np.uint8), tolerance=1)
    # Beside rows that do have a negative prompt, it still gets diffusers' zeros.
    among = engine.generate([replace(row, seed=1, negative_prompt="blurry"), row, replace(row, seed=2, negative_prompt="dark")])[1].pixels
    assert_close(among, alone, tolerance=1)


def test_unsupported_pipeline_class_is_refused_before_loading(tmp_path, cache):
    folder = tmp_path / "ddpm"
    folder.mkdir()
    index = {"_class_name": "DDPMPipeline", "_diffusers_version": "0.42.1", "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDPMScheduler"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="'DDPMPipeline' is not supported; supported text-to-image pipelines: StableDiffusionPipeline.*point model.ref"):
        Engine(ModelConfig(ref=str(folder), cache_dir=cache))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_tiny_lora_loads_and_changes_images(cache, tmp_path, name):
    from safetensors.torch import load_file

    path = build_tiny_lora(name, str(tmp_path / "lora"), seed=3)
    assert path.endswith(".safetensors")
    weights, again = load_file(path), load_file(build_tiny_lora(name, str(tmp_path / "again"), seed=3))
    assert weights.keys() == again.keys() and all(weights[k].equal(again[k]) for k in weights)
    engine = Engine(ModelConfig(ref=name, cache_dir=cache))
    rows = [request(seed=1), request("a blue ball", seed=2)]
    before = engine.generate(rows)
    engine.pipe.load_lora_weights(path, adapter_name="tiny")
    after = engine.generate(rows)
    assert all(np.abs(a.pixels.astype(int) - b.pixels.astype(int)).mean() > 1 for a, b in zip(before, after))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_driver_table_of_tiny_models_is_what_loads(engines, name):
    # The catalog learns a tiny model's scheduler and size rule without building it.
    from pipeline.engine.resolve_catalog import TINY_MODELS as KNOWN

    pipe = engines(name).pipe
    transformer = getattr(pipe, "transformer", None)
    patch_size = transformer.config.patch_size if transformer is not None else 1
    assert KNOWN[name] == (type(pipe).__name__, type(pipe.scheduler).__name__, pipe.vae_scale_factor, patch_size)


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_flow_matching_families_run_their_allowed_scheduler(cache, engines, name):
    engine = Engine(ModelConfig(ref=name, cache_dir=cache, scheduler="flow_euler"))
    assert engine.scheduler_name == "FlowMatchEulerDiscreteScheduler"
    (result,) = engine.generate([request()])
    assert result.ok
    assert_close(result.pixels, engines(name).generate([request()])[0].pixels)  # the model's own scheduler


def test_the_stage_refuses_an_image_whose_size_is_not_its_rows(engines):
    # Validation that did not know FLUX's rule: tiny-flux makes 12x12 for a 14x14 row.
    import dataclasses

    import pyarrow as pa

    from pipeline.engine.resident_models import ModelCache
    from pipeline.engine.resolve_catalog import build_catalog
    from pipeline.engine.table_generation import ImageEncoder, generate_table
    from pipeline.spec import schema as S
    from pipeline.spec.load import parse_spec
    from pipeline.spec.validate import Validator

    spec = parse_spec({"input": {"url": "t.csv"}, "model": {"ref": "tiny-flux"}, "defaults": {"steps": 2}, "limits": {"size_multiple": 2}})
    catalog = build_catalog(spec)
    lax = dataclasses.replace(catalog.models["tiny-flux"], size_multiple=2)
    catalog = dataclasses.replace(catalog, models={"tiny-flux": lax})
    rows = [{S.INPUT_SOURCE: "t.csv", S.INPUT_ROW: i, "prompt": "a cat", "width": w, "height": w} for i, w in enumerate((14, 16))]
    table = Validator(spec, catalog).validate_table(pa.Table.from_pylist(rows))
    assert table.column(S.ERROR_STAGE).to_pylist() == [None, None]
    cache = ModelCache(catalog, budget_bytes=0, load=lambda entry: engines("tiny-flux"))
    out = generate_table(cache, table, "actor", "node", ImageEncoder("png", 95))
    assert out.column(S.ERROR_STAGE).to_pylist() == ["generate", None]
    assert out.column(S.ERROR_TYPE).to_pylist()[0] == "SizeMismatch"
    assert "made a 12x12 image for a 14x14 request" in out.column(S.ERROR_MESSAGE).to_pylist()[0]
    assert out.column(S.IMAGE).to_pylist()[0] is None and out.column(S.IMAGE).to_pylist()[1] is not None
    assert out.column(S.SCHEDULER).to_pylist() == ["FlowMatchEulerDiscreteScheduler"] * 2
