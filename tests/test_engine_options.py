"""Engine options change speed, not images: each stays within 2/255 of the plain path."""

import numpy as np
import pytest

from pipeline.config import EngineOptions, ModelConfig
from pipeline.engine import Engine, GenerationRequest

TOLERANCE = 2  # steps of 255


def requests():
    # Repeated prompts and a shared negative prompt: what encode_prompts_once saves on.
    prompts = ["a red cube", "a red cube", "a blue ball", "a red cube"]
    return [GenerationRequest(p, "blurry" if i % 2 else "", 10 + i, 32, 32, 3, 6.0) for i, p in enumerate(prompts)]


@pytest.fixture(scope="module")
def plain(model_cache):
    engine = Engine(ModelConfig(ref="tiny", cache_dir=model_cache, engine=EngineOptions(encode_prompts_once=False)))
    return [r.pixels for r in engine.generate(requests())]


@pytest.mark.parametrize(
    "options",
    [
        {"encode_prompts_once": True},
        {"channels_last": True},
        {"fuse_qkv": True},
        {"vae_slicing": True},
        {"channels_last": True, "fuse_qkv": True, "vae_slicing": True},
    ],
)
def test_option_keeps_images_within_tolerance(model_cache, plain, options):
    engine = Engine(ModelConfig(ref="tiny", cache_dir=model_cache, engine=EngineOptions(**{"encode_prompts_once": False, **options})))
    results = engine.generate(requests())
    for got, want in zip(results, plain):
        assert got.ok
        assert np.abs(got.pixels.astype(int) - want.astype(int)).max() <= TOLERANCE, options


def test_encode_once_calls_the_text_encoder_once_per_distinct_text(model_cache):
    engine = Engine(ModelConfig(ref="tiny", cache_dir=model_cache))
    seen = []
    encoder = engine.pipe.text_encoder
    hook = encoder.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[0]))
    try:
        engine.generate(requests())
    finally:
        hook.remove()
    assert seen == [2, 2]  # prompts: {red cube, blue ball}; negatives: {"", blurry}


@pytest.mark.timeout(600)
def test_compiled_denoiser_keeps_images_within_tolerance(model_cache, plain, tmp_path):
    engine = Engine(ModelConfig(ref="tiny", cache_dir=str(tmp_path), engine=EngineOptions(compile=True, encode_prompts_once=False)))
    results = engine.generate(requests())
    for got, want in zip(results, plain):
        assert np.abs(got.pixels.astype(int) - want.astype(int)).max() <= TOLERANCE
