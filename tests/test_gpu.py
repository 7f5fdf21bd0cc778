"""On a CUDA GPU: `dtype: auto` runs float16 and the rows say so; the engine options take
their measured CUDA defaults. Skipped without a GPU by
the `gpu` marker's hook in conftest.py, which the last test checks on a CPU machine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.gpu
def test_auto_precision_on_cuda_is_float16_and_recorded(model_cache):
    import torch

    from pipeline.engine.engine import Engine
    from pipeline.engine.requests import GenerationRequest
    from pipeline.engine.resolve_catalog import build_catalog, place
    from pipeline.spec.load import parse_spec
    from pipeline.spec.validate import Validator

    spec = parse_spec({"input": {"url": "t.csv"}, "model": {"ref": "tiny", "cache_dir": model_cache}, "defaults": {"width": 32, "height": 32, "steps": 2}})
    catalog = place(build_catalog(spec), gpus=1)
    (row,) = Validator(spec, catalog).validate_row({"__source": "t.csv", "__row": 0, "prompt": "a cat"})
    assert (row["dtype"], row["device"]) == ("float16", "cuda")
    config = catalog.models["tiny"].loading_config()
    # The measured CUDA defaults (BENCHMARKS.md, H200): 16 images of 512x512 a call, no channels_last.
    assert (config.engine.max_batch_pixels, config.engine.channels_last, config.engine.compile) == (16 * 512 * 512, False, False)
    engine = Engine(config)
    assert engine.dtype == torch.float16 and engine.device == "cuda"
    assert engine.call_size(GenerationRequest("a cat", "", 1, 512, 512, 2, 7.5)) == 16
    (result,) = engine.generate([GenerationRequest("a cat", "", 1, 32, 32, 2, 7.5)])
    assert result.ok and result.pixels.shape == (32, 32, 3)


def test_the_gpu_marker_skips_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the gpu test runs instead")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", f"{__file__}::test_auto_precision_on_cuda_is_float16_and_recorded", "-q", "-rs", "-p", "no:cacheprovider"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0 and "1 skipped" in done.stdout and "needs a CUDA GPU" in done.stdout, done.stdout[-2000:]
