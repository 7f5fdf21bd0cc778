"""The engine on the real tiny pipeline: seeds, sizes, batching, and failures per row."""

import numpy as np
import pytest

from pipeline.engine.engine import Engine
from pipeline.engine.requests import GenerationRequest
from pipeline.spec.model_config import ModelConfig


@pytest.fixture(scope="module")
def engine(model_cache):
    return Engine(ModelConfig(ref="tiny", cache_dir=model_cache))


def request(seed=1, prompt="a red cube", width=32, height=32, steps=2, guidance_scale=7.5):
    return GenerationRequest(prompt, "", seed, width, height, steps, guidance_scale)


def test_sizes_and_dtype(engine):
    results = engine.generate([request(width=32, height=48), request(width=64, height=32, steps=3)])
    assert [r.pixels.shape for r in results] == [(48, 32, 3), (32, 64, 3)]
    assert all(r.pixels.dtype == np.uint8 and r.seconds > 0 for r in results)


def test_same_seed_same_pixels_other_seed_other_pixels(engine):
    a, b, c = engine.generate([request(seed=5), request(seed=5), request(seed=6)])
    assert np.array_equal(a.pixels, b.pixels)
    assert not np.array_equal(a.pixels, c.pixels)


def test_image_does_not_depend_on_its_batch_neighbours(engine):
    alone = engine.generate([request(seed=9)])[0].pixels
    in_batch = engine.generate([request(seed=1, prompt="x"), request(seed=9), request(seed=3, prompt="y")])[1].pixels
    # On CPU, batch composition may move a pixel by one step of 255 at most.
    assert np.abs(alone.astype(int) - in_batch.astype(int)).max() <= 1


def test_a_failing_row_fails_alone(engine):
    # A seed past 64 bits makes torch.Generator raise for that row only.
    results = engine.generate([request(seed=1), request(seed=2**64), request(seed=3)])
    assert results[0].ok and results[2].ok
    assert not results[1].ok and results[1].error_type == "ValueError" and "Overflow" in results[1].error_message
    assert np.array_equal(results[2].pixels, engine.generate([request(seed=3)])[0].pixels)


def test_prompt_tokens_and_truncation(engine):
    short, long = engine.generate([request(prompt="a cat"), request(prompt="a cat " * 40)])
    assert short.prompt_tokens < engine.token_limit(request()) and short.prompt_truncated is False
    assert long.prompt_tokens > engine.token_limit(request()) and long.prompt_truncated is True
    assert long.ok


def test_saved_pipeline_loads_through_the_same_path(engine, tmp_path, model_cache):
    engine.pipe.save_pretrained(tmp_path / "saved", safe_serialization=True)
    reloaded = Engine(ModelConfig(ref=str(tmp_path / "saved"), cache_dir=model_cache))
    assert np.array_equal(reloaded.generate([request(seed=4)])[0].pixels, engine.generate([request(seed=4)])[0].pixels)


def test_named_scheduler_is_applied(model_cache):
    euler = Engine(ModelConfig(ref="tiny", cache_dir=model_cache, scheduler="euler"))
    assert euler.scheduler_name == "EulerDiscreteScheduler"
    assert euler.generate([request()])[0].ok
