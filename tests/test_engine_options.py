"""Engine options change speed, not images: each does what it says (a processor class, a
memory format, fused projections, chunked decodes, one encode per text, one compile per
image size whose graphs the next engine loads) and stays within the tolerance README's
"Engine options" states for CPU float32."""

import os

import numpy as np
import pytest

from pipeline.engine.engine import Engine
from pipeline.engine.requests import GenerationRequest
from pipeline.errors import ModelError, SpecError
from pipeline.spec.load import parse_spec
from pipeline.spec.model_config import EngineOptions, ModelConfig

TOLERANCE = 2  # steps of 255 on CPU float32; README's "Engine options" states the same


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


def attention_modules(engine):
    return [m for m in engine.pipe.unet.modules() if type(m).__name__ == "Attention"]


def test_each_option_changes_what_it_names(model_cache):
    """An option's effect on the loaded model, one engine per option: the tolerance test
    alone passes just as well when an option does nothing."""
    import torch

    def engine(**options):
        return Engine(ModelConfig(ref="tiny", cache_dir=model_cache, engine=EngineOptions(**options)))

    plain = engine()
    assert {type(m.processor).__name__ for m in attention_modules(plain)} == {"AttnProcessor2_0"}  # diffusers' SDPA processor
    assert {type(m.processor).__name__ for m in attention_modules(engine(attention="eager"))} == {"AttnProcessor"}

    fused = engine(fuse_qkv=True)
    assert all(m.fused_projections and hasattr(m, "to_kv" if m.is_cross_attention else "to_qkv") for m in attention_modules(fused))
    assert {type(m.processor).__name__ for m in attention_modules(fused)} == {"FusedAttnProcessor2_0"}  # the one that uses them
    assert not any(m.fused_projections for m in attention_modules(plain))

    convs = lambda e: [m.weight for m in (*e.pipe.unet.modules(), *e.pipe.vae.modules()) if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]  # noqa: E731
    assert all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs(engine(channels_last=True)))
    assert all(w.is_contiguous() for w in convs(plain))

    # flash: every attention call of a generate runs with SDPA held to FlashAttention.
    from torch.nn.attention import SDPBackend, _cur_sdpa_kernel_backends

    pinned = engine(attention="flash")
    seen = []
    hooks = [m.register_forward_pre_hook(lambda *_: seen.append(tuple(_cur_sdpa_kernel_backends()))) for m in attention_modules(pinned)]
    try:
        pinned.generate(requests()[:1])
    finally:
        for hook in hooks:
            hook.remove()
    assert seen and set(seen) == {(SDPBackend.FLASH_ATTENTION,)}


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


@pytest.mark.slow  # one cold inductor compile of the tiny UNet: about a minute on 2 CPU cores
@pytest.mark.timeout(900)
def test_one_compile_per_image_size_shared_with_the_next_engine(model_cache, plain, tmp_path):
    """Ragged calls (3, 4, 1 images: a bucket's last call, a batch halved) reuse one graph
    per image size; the graph goes to the shared store, and the next engine finds it there:
    traced, then loaded, not built."""
    import shutil

    import torch

    from pipeline.engine.kernels import CompileClock

    shared = str(tmp_path / "shared")
    options = {"compile": True, "encode_prompts_once": False, "compile_cache_url": shared}
    config = ModelConfig(ref="tiny", cache_dir=model_cache, engine=EngineOptions(**options))
    engine = Engine(config)
    assert (engine.compiles, engine.compile_seconds) == (0, 0)
    ragged = requests() + [GenerationRequest("a green cone", "", 20 + i, 32, 32, 3, 6.0) for i in range(4)]
    first = engine.generate(ragged[:3]) + engine.generate(ragged[3:7]) + engine.generate(ragged[7:8])
    assert_within_tolerance(first[:4], plain, options)
    assert (engine.compiles, engine.compiles_from_cache) == (1, 0)  # three batch sizes, one graph
    assert engine.compile_seconds > 0
    (store,) = os.listdir(shared)
    assert os.listdir(os.path.join(shared, store))  # the artifacts were shared

    # The next engine (a restarted actor, a later run): nothing compiled in this process's
    # memory and no graph in the node's cache, only what the store holds. (The node's C++
    # libraries stay: on a new node inductor's CPU kernels go through the C++ compiler
    # again, minutes here; on CUDA the Triton kernels travel inside the artifacts.)
    torch._dynamo.reset()
    for graphs in ("fxgraph", "aotautograd"):
        shutil.rmtree(os.path.join(model_cache, "inductor", graphs))
    other = Engine(config)
    assert_within_tolerance(other.generate(requests()), plain, options)
    assert (other.compiles, other.compiles_from_cache) == (1, 1)
    assert CompileClock.totals()[:2] == (2, 1)


def test_compile_auto_compiles_when_the_job_repays_it(tmp_path):
    """compile: auto on the driver: on CUDA when each actor's images of the shape repay the
    compile at the measured rates (fewer with a warm shared store); never on CPU or
    without a job (serve); an explicit setting is kept. The CUDA pixel budget default too."""
    from pipeline.engine import compile_cache
    from pipeline.engine.gpu_rates import GPU_MAX_BATCH_PIXELS, compile_choice
    from pipeline.engine.resolve_catalog import Workload, build_catalog, place

    def placed(gpus, images, **engine):
        model = {"ref": "tiny", "cache_dir": str(tmp_path / "cache"), "engine": engine}
        catalog = build_catalog(parse_spec({"input": {"url": str(tmp_path / "p.csv")}, "model": model}))
        work = Workload(512, 512, 25, images) if images != "serve" else None
        return place(catalog, gpus, work=work).models["tiny"].config

    cold = compile_choice("sd", 512, 512, 25, 1, warm=False).break_even_images
    assert 800 < cold < 1000  # 41.5 s at 0.173 s eager / 0.127 s compiled an image (H200)
    assert placed(1, cold * 0.9).engine.compile is False
    assert placed(1, cold * 1.1).engine.compile is True
    assert placed(0, cold * 10).engine.compile is False  # CPU
    assert placed(1, "serve").engine.compile is False
    assert placed(1, None).engine.compile is False  # the table's size is unknown
    assert placed(1, 1, compile=True).engine.compile is True

    # The shared store holds this model's graphs: far fewer images repay loading them.
    url, _ = compile_cache.location(placed(1, 1))
    os.makedirs(url)
    open(os.path.join(url, "host-1" + compile_cache.ARTIFACT_SUFFIX), "wb").close()
    assert placed(1, cold * 0.9).engine.compile is True

    assert placed(1, 1).engine.max_batch_pixels == GPU_MAX_BATCH_PIXELS
    assert placed(1, 1, max_batch_pixels=1024).engine.max_batch_pixels == 1024
    assert placed(0, 1).engine.max_batch_pixels is None


def test_validate_estimates_from_the_h200_rates_with_compile_time(tmp_path):
    """A Stable Diffusion bucket without a throughput entry: the measured H200 rate, eager
    for a short job, compiled for a long one, whose compile time the estimate includes."""
    from pipeline.batch.plan import Plan
    from pipeline.batch.rates import Bucket, gpu_rate
    from pipeline.engine.resolve_catalog import build_catalog

    spec = parse_spec({"input": {"url": str(tmp_path / "p.csv")}, "model": {"ref": "tiny", "cache_dir": str(tmp_path)}})
    entry = build_catalog(spec).models["tiny"]

    def plan(images: int) -> Plan:
        bucket = Bucket("tiny", 512, 512, 25, rows=images, images=images)
        bucket.rate, bucket.compile_seconds = gpu_rate(entry, bucket, num_actors=2)
        return Plan("p.csv", buckets=[bucket], num_actors=2)

    short, long = plan(200), plan(20_000)
    assert short.buckets[0].rate.basis == "H200 measured, eager" and short.compile_hours == 0
    assert long.buckets[0].rate.basis == "H200 measured, compiled"
    assert long.buckets[0].rate.images_per_s > short.buckets[0].rate.images_per_s
    assert long.compile_hours == 2 * long.buckets[0].compile_seconds / 3600 > 0  # each actor compiles once
    assert long.gpu_hours == long.buckets[0].gpu_hours + long.compile_hours


def test_summary_and_inspect_report_compile_seconds_apart_from_generation():
    from pipeline.batch.summary import RunSummary, format_summary
    from pipeline.output.inspect import Inspection, RunView, format_inspection

    counts = {"compile_seconds": 41.5, "compiles": 2, "compiles_from_cache": 1}
    summary = format_summary(RunSummary("r1", "/out", 10, 10, 0, {}, 90.0, engine_seconds=80.0, **counts))
    assert "compiling    41.5 s of the engines' 80.0 s (all actors): 2 graph(s), 1 compiled, 1 loaded from the compile cache" in summary
    assert "compiling" not in format_summary(RunSummary("r2", "/out", 10, 10, 0, {}, 90.0, engine_seconds=80.0))  # compile off: no line
    run = RunView("r1", "complete", 1.0, 91.0, 10, 0, 10, **counts)
    assert "compiling took 41.5 s of its engines' time, apart from generating: 2 graph(s), 1 compiled" in format_inspection(Inspection("/out", runs=[run]))
