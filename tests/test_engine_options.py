"""Engine options change speed, not images: each stays within 2/255 of the plain path."""

import numpy as np
import pytest

from pipeline.engine.engine import Engine
from pipeline.engine.requests import GenerationRequest
from pipeline.errors import ModelError, SpecError
from pipeline.spec.load import parse_spec
from pipeline.spec.model_config import EngineOptions, ModelConfig

TOLERANCE = 2  # steps of 255; EngineOptions' docstring states the same


def requests():
    # Repeated prompts and a shared negative prompt: what encode_prompts_once saves on.
    prompts = ["a red cube", "a red cube", "a blue ball", "a red cube"]
    return [GenerationRequest(p, "blurry" if i % 2 else "", 10 + i, 32, 32, 3, 6.0) for i, p in enumerate(prompts)]


def assert_within_tolerance(results, plain, options):
    for got, want in zip(results, plain, strict=True):
        assert got.ok, (options, got.error_message)
        assert np.abs(got.pixels.astype(int) - want.astype(int)).max() <= TOLERANCE, options


@pytest.fixture(scope="module")
def plain(model_cache):
    engine = Engine(ModelConfig(ref="tiny", cache_dir=model_cache, engine=EngineOptions(encode_prompts_once=False)))
    return [r.pixels for r in engine.generate(requests())]


@pytest.mark.parametrize(
    "options",
    [
        {"encode_prompts_once": True},
        {"attention": "eager"},
        {"attention": "flash"},  # torch has a CPU FlashAttention kernel; efficient and cudnn are CUDA-only
        {"channels_last": True},
        {"fuse_qkv": True},
        {"vae_chunk_size": 1},
        {"vae_chunk_size": 3},  # a last chunk shorter than the others
        {"encode_prompts_once": True, "attention": "flash", "channels_last": True, "fuse_qkv": True, "vae_chunk_size": 2},
    ],
)
def test_option_keeps_images_within_tolerance(model_cache, plain, options):
    engine = Engine(ModelConfig(ref="tiny", cache_dir=model_cache, engine=EngineOptions(**{"encode_prompts_once": False, **options})))
    assert_within_tolerance(engine.generate(requests()), plain, options)


def test_vae_chunks_bound_the_images_per_decode(model_cache):
    engine = Engine(ModelConfig(ref="tiny", cache_dir=model_cache, engine=EngineOptions(vae_chunk_size=3)))
    seen = []
    hook = engine.pipe.vae.decoder.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[0]))
    try:
        engine.generate(requests())
    finally:
        hook.remove()
    assert seen == [3, 1]


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


@pytest.mark.parametrize("kernel", ["efficient", "cudnn"])
def test_a_kernel_this_device_lacks_is_a_model_error_at_load(model_cache, kernel):
    with pytest.raises(ModelError, match=rf"attention: {kernel} cannot run this model on cpu.*attention: sdpa"):
        Engine(ModelConfig(ref="tiny", device="cpu", cache_dir=model_cache, engine=EngineOptions(attention=kernel)))


def test_an_unknown_attention_kernel_is_a_spec_error_naming_the_allowed_ones(tmp_path):
    with pytest.raises(SpecError, match=r"model\.engine\.attention.*'sdpa', 'flash', 'efficient', 'cudnn' or 'eager'.*got 'flash2'"):
        parse_spec({"input": {"url": str(tmp_path / "p.csv")}, "model": {"engine": {"attention": "flash2"}}})


def test_vae_slicing_from_an_older_spec_says_what_replaced_it(tmp_path):
    with pytest.raises(SpecError, match=r"model\.engine: vae_slicing is now vae_chunk_size: write vae_chunk_size: 1"):
        parse_spec({"input": {"url": str(tmp_path / "p.csv")}, "model": {"engine": {"vae_slicing": True}}})


def test_fused_projections_need_an_sdpa_kernel(tmp_path):
    with pytest.raises(SpecError, match=r"fuse_qkv needs an SDPA attention kernel"):
        parse_spec({"input": {"url": str(tmp_path / "p.csv")}, "model": {"engine": {"fuse_qkv": True, "attention": "eager"}}})


@pytest.mark.slow  # about a minute on 2 CPU cores: a cold inductor compile of the tiny UNet
@pytest.mark.timeout(600)
def test_compiled_denoiser_keeps_images_within_tolerance_and_caches_its_graphs(model_cache, plain, tmp_path):
    import torch

    options = {"compile": True, "encode_prompts_once": False, "attention": "flash", "channels_last": True, "fuse_qkv": True}
    config = ModelConfig(ref="tiny", cache_dir=str(tmp_path), engine=EngineOptions(**options))
    engine = Engine(config)
    assert engine.compile_seconds == 0
    assert_within_tolerance(engine.generate(requests()), plain, options)
    assert engine.compile_seconds > 0  # the first call compiled, and was timed apart

    # A restarted actor: nothing compiled in memory, the same cache_dir on disk.
    torch._dynamo.reset()
    hits = _compile_cache_hits()
    assert_within_tolerance(Engine(config).generate(requests()), plain, options)
    assert _compile_cache_hits() > hits


def _compile_cache_hits() -> int:
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]
