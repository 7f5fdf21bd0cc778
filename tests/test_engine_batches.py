"""How many images one diffusers call takes: a pixel budget per size, and what ran out of memory."""

import numpy as np
import torch

from pipeline.engine.engine import Engine
from pipeline.engine.requests import GenerationRequest
from pipeline.spec.model_config import EngineOptions, ModelConfig


def request(seed, width=32, height=32):
    return GenerationRequest("a red cube", "", seed, width, height, 2, 7.5)


class CallRecorder(Engine):
    """The real engine, recording each diffusers call's size; ``fits`` stands in for the
    memory of a GPU: a larger call raises CUDA's out-of-memory error before any work."""

    fits = 1 << 30

    def _call(self, batch):
        self.calls = getattr(self, "calls", []) + [len(batch)]
        if len(batch) > self.fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super()._call(batch)


def test_pixel_budget_sets_each_sizes_batch(model_cache):
    options = EngineOptions(max_batch_pixels=4 * 32 * 32)
    engine = CallRecorder(ModelConfig(ref="tiny", cache_dir=model_cache, engine=options))
    assert engine.call_size(request(0)) == 4 and engine.call_size(request(0, 64, 64)) == 1
    results = engine.generate([request(i) for i in range(6)] + [request(9, 64, 64), request(10, 64, 64)])
    assert all(r.ok for r in results)
    assert engine.calls == [4, 2, 1, 1]
    # Split calls change nothing about an image (beyond CPU kernel blocking).
    alone = Engine(ModelConfig(ref="tiny", cache_dir=model_cache)).generate([request(5)])[0].pixels
    assert np.abs(results[5].pixels.astype(int) - alone.astype(int)).max() <= 1


def test_out_of_memory_caps_that_sizes_calls_from_then_on(model_cache):
    engine = CallRecorder(ModelConfig(ref="tiny", cache_dir=model_cache))
    engine.fits = 2
    first = engine.generate([request(i) for i in range(4)])
    assert all(r.ok for r in first) and engine.calls == [4, 2, 2]
    assert engine.call_size(request(0)) == 2 and engine.call_size(request(0, 64, 64)) > 2
    engine.calls = []
    assert all(r.ok for r in engine.generate([request(i) for i in range(4)]))
    assert engine.calls == [2, 2]  # no second failed attempt at 4
