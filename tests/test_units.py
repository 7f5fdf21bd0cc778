"""Bucketing, encoding and model references."""

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.engine.image_encoding import encode_image, sha256_hex
from pipeline.engine.weight_sources import ModelRef, fingerprint, parse_ref
from pipeline.engine.requests import GenerationRequest
from pipeline.errors import ModelError
from pipeline.spec.bucketing import block_rows, group_by_bucket, halves, order_for_engine
from pipeline.spec.model_config import ModelConfig


def req(w, h, steps=4, g=7.5, **more):
    return GenerationRequest("p", "", 0, w, h, steps, g, **more)


def test_groups_are_uniform_and_in_first_seen_order():
    requests = [req(64, 64), req(32, 64), req(64, 64), req(64, 64, steps=2), req(32, 64)]
    assert group_by_bucket(requests) == [[0, 2], [1, 4], [3]]
    assert halves([1, 2, 3]) == ([1, 2], [3])


def test_one_call_shares_one_adapter_setting_and_one_t5_length():
    requests = [req(64, 64), req(64, 64, lora="d1"), req(64, 64, lora="d1", lora_scale=0.5), req(64, 64, lora="d1"), req(64, 64, max_sequence_length=77)]
    assert group_by_bucket(requests) == [[0], [1, 3], [2], [4]]


def test_rows_are_ordered_by_model_then_adapter_then_bucket_stably():
    table = pa.table({
        "model": ["b", "a", "b", "a", "a"],
        "lora_digest": [None, "x", None, None, "x"],
        "lora_scale": [None, 1.0, None, None, 1.0],
        "width": [64, 64, 32, 64, 64],
        "height": [64] * 5,
        "steps": [4] * 5,
        "guidance_scale": [7.5] * 5,
        "max_sequence_length": pa.array([None] * 5, pa.int32()),
        "row": [0, 1, 2, 3, 4],
    })
    assert order_for_engine(table).column("row").to_pylist() == [3, 1, 4, 2, 0]


def test_block_size_auto_gives_each_actor_about_8_blocks_within_bounds():
    assert block_rows(64, total_rows=100_000, num_actors=64) == 64  # an explicit size is kept
    assert block_rows("auto", total_rows=100_000, num_actors=64) == 196  # 511 blocks: 8 per actor
    assert block_rows("auto", total_rows=10_000, num_actors=64) == 64  # not 20: Ray's cost per block
    assert block_rows("auto", total_rows=64, num_actors=2) == 32  # a small table: one block per actor
    assert block_rows("auto", total_rows=10_000_000, num_actors=8) == 256  # no blocks of an hour's work
    assert block_rows("auto", total_rows=None, num_actors=8) == 128  # a table too big to count first
    # Whole diffusers calls at the default size, at least one.
    assert block_rows("auto", total_rows=100_000, num_actors=64, rows_per_call=16) == 192
    assert block_rows("auto", total_rows=500, num_actors=64, rows_per_call=16) == 16
    assert block_rows("auto", total_rows=10_000_000, num_actors=8, rows_per_call=512) == 512
    assert block_rows(100, total_rows=100_000, num_actors=64, rows_per_call=16) == 100  # explicit: kept


def test_png_is_lossless_and_lossy_formats_decode():
    pixels = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    png = encode_image(pixels, "png")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), pixels)
    for fmt in ("jpeg", "webp"):
        decoded = Image.open(io.BytesIO(encode_image(pixels, fmt, quality=80)))
        assert decoded.size == (40, 24) and decoded.format == fmt.upper()
    assert sha256_hex(png) == sha256_hex(bytes(png)) and len(sha256_hex(png)) == 64
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        encode_image(pixels.astype(np.float32), "png")


def test_model_refs(tmp_path):
    assert parse_ref("tiny").kind == "tiny"
    assert parse_ref("tiny-flux") == ModelRef("tiny", "tiny-flux")
    tiny_prints = {fingerprint(ModelConfig(ref=name)) for name in ("tiny", "tiny-sdxl", "tiny-sd3", "tiny-flux")}
    assert len(tiny_prints) == 4
    assert parse_ref("s3://bucket/models/sd/").kind == "remote"
    assert parse_ref("stabilityai/stable-diffusion-2-1").kind == "hub"
    with pytest.raises(ModelError, match="not a tiny model \\(tiny, tiny-sdxl, tiny-sd3, tiny-flux\\), an existing local folder"):
        parse_ref("./no/such/folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="without model_index.json"):
        parse_ref(str(tmp_path / "empty"))


def test_local_fingerprint_follows_file_contents(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "unet").mkdir()
    weights = tmp_path / "unet" / "w.safetensors"
    weights.write_bytes(b"1")
    config = ModelConfig(ref=str(tmp_path))
    first = fingerprint(config)
    assert first.startswith("local-") and fingerprint(config) == first
    weights.write_bytes(b"2")
    assert fingerprint(config) != first
    # A hub model at a commit hash needs no lookup; another commit is other weights.
    hub = fingerprint(ModelConfig(ref="org/model", revision="a" * 40))
    assert hub != fingerprint(ModelConfig(ref="org/model", revision="b" * 40))


def test_pickle_weights_need_an_explicit_opt_in(tmp_path):
    from pipeline.engine.weight_sources import check_weights_format

    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelError, match="holds pickle weights .*unet/diffusion_pytorch_model.bin.*allow_pickle"):
        check_weights_format(ModelConfig(ref=str(tmp_path)))
    check_weights_format(ModelConfig(ref=str(tmp_path), allow_pickle=True))
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"safe")
    check_weights_format(ModelConfig(ref=str(tmp_path)))  # safetensors beside it: loaded instead
