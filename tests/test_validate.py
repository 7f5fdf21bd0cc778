"""Rows -> requests: per-row parameters, seeds, request ids, and the reasons bad rows get."""

import dataclasses

import pyarrow as pa
import pytest

from pipeline.engine.resolve_catalog import build_catalog, place
from pipeline.spec import schema as S
from pipeline.spec.load import parse_spec
from pipeline.spec.occurrences import content_digest
from pipeline.spec.validate import REQUEST_ID_SCHEME, Validator, derive_seed, scheme_warning


def with_fingerprint(v, fingerprint):
    """``v`` with its default model's fingerprint replaced (as if the weights changed)."""
    catalog = v.catalog
    entry = dataclasses.replace(catalog.models[catalog.default_model], fingerprint=fingerprint)
    return dataclasses.replace(v, catalog=dataclasses.replace(catalog, models={entry.name: entry}))


def validator(**sections):
    data = {"input": {"url": "t.csv", "identity": "position", **sections.pop("input", {})}, "defaults": {"width": 64, "height": 64, "steps": 4, "seed": 11}}
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    spec = parse_spec(data)
    return with_fingerprint(Validator(spec, place(build_catalog(spec), gpus=0)), "fp-1")


def row(position=0, **cells):
    return {S.INPUT_SOURCE: "t.csv", S.INPUT_ROW: position, **cells}


def one(v, raw):
    (request,) = v.validate_row(raw)
    return request


def test_defaults_fill_and_columns_override_per_row():
    v = validator()
    plain = one(v, row(prompt="a cat"))
    assert (plain["width"], plain["height"], plain["steps"], plain["guidance_scale"]) == (64, 64, 4, 7.5)
    custom = one(v, row(prompt="a cat", width="128", steps=8, guidance_scale="3.5", negative_prompt="blurry"))
    assert (custom["width"], custom["steps"], custom["guidance_scale"], custom["negative_prompt"]) == (128, 8, 3.5, "blurry")


def test_mapped_columns():
    v = validator(input={"prompt_column": "Prompt", "columns": {"seed": "my_seed"}})
    assert one(v, row(Prompt="a cat", my_seed="42"))["seed"] == 42


def test_seed_derived_from_job_seed_and_identity_not_position_in_batch():
    v = validator()
    alone = one(v, row(5, prompt="a cat"))
    batch = v.validate_table(pa.Table.from_pylist([row(4, prompt="x"), row(5, prompt="a cat")]))
    assert batch.column("seed").to_pylist()[1] == alone["seed"] == derive_seed(11, "row:t.csv#5")
    assert one(v, row(6, prompt="a cat"))["seed"] != alone["seed"]
    assert one(validator(defaults={"seed": 12}), row(5, prompt="a cat"))["seed"] != alone["seed"]


def test_explicit_seed_is_the_one_applied_and_num_images_expands():
    requests = validator().validate_row(row(prompt="a cat", seed=100, num_images=3))
    assert [r["seed"] for r in requests] == [100, 101, 102]
    assert [r["image_index"] for r in requests] == [0, 1, 2]
    assert len({r["request_id"] for r in requests}) == 3


def test_request_id_is_stable_and_covers_what_decides_pixels():
    v = validator()
    base = one(v, row(prompt="a cat", seed=1))["request_id"]
    assert one(v, row(prompt="a cat", seed=1))["request_id"] == base
    for change in ({"prompt": "a dog"}, {"seed": 2}, {"width": 128}, {"steps": 5}, {"guidance_scale": 1}, {"negative_prompt": "x"}):
        assert one(v, row(**{"prompt": "a cat", "seed": 1, **change}))["request_id"] != base, change
    assert one(with_fingerprint(v, "fp-2"), row(prompt="a cat", seed=1))["request_id"] != base
    scheduled = validator(model={"scheduler": "euler"})
    assert one(scheduled, row(prompt="a cat", seed=1))["request_id"] != base


def test_request_ids_are_stable_within_a_scheme():
    # Request-id scheme 3 (a row without an id column is its content and occurrence; with
    # input.identity: position, ids are scheme 2's, which put dtype and device class in the
    # id). Scheme 1 gave this row 2f3f6029dcdab561a268445f24226078; a change here needs a new
    # REQUEST_ID_SCHEME and an upgrade note, or outputs made before it are regenerated without a word.
    assert REQUEST_ID_SCHEME == 3
    v = validator()
    assert one(v, row(prompt="a cat", negative_prompt="blurry"))["request_id"] == "029555d7aaca58a8653e91d554be358b"
    by_content = validator(input={"identity": "content"})
    raw = row(prompt="a cat", negative_prompt="blurry")
    numbered = {**raw, S.INPUT_CONTENT: content_digest(raw, by_content.spec.input), S.INPUT_OCCURRENCE: 0}
    assert numbered[S.INPUT_CONTENT] == "04ccf8202b99daf34786e37984e759eb"
    assert one(by_content, numbered)["request_id"] == "1377532ff71952f046b9490a77c22cc8"


def test_dtype_and_device_class_are_in_the_request_id_and_on_the_row():
    cpu = one(validator(), row(prompt="a cat", seed=1))
    assert (cpu["dtype"], cpu["device"]) == ("float32", "cpu")  # auto on CPU
    data = {"input": {"url": "t.csv", "identity": "position"}, "defaults": {"width": 64, "height": 64, "steps": 4, "seed": 11}}
    spec = parse_spec(data)
    on_gpu = with_fingerprint(Validator(spec, place(build_catalog(spec), gpus=1)), "fp-1")
    gpu = one(on_gpu, row(prompt="a cat", seed=1))
    assert (gpu["dtype"], gpu["device"]) == ("float16", "cuda")  # auto on a GPU actor
    assert gpu["request_id"] != cpu["request_id"]  # resuming a CPU run on a GPU makes new images
    bf16 = one(validator(model={"dtype": "bfloat16"}), row(prompt="a cat", seed=1))
    assert bf16["dtype"] == "bfloat16" and bf16["request_id"] not in (cpu["request_id"], gpu["request_id"])
    # verify and validate start no actors: auto follows what the output's last run recorded.
    recorded = place(build_catalog(spec), None, {"tiny": {"device": "cuda"}})
    assert recorded.models["tiny"].config.device == "cuda" and recorded.models["tiny"].config.dtype == "float16"


def test_an_output_of_an_older_request_id_scheme_is_named():
    assert scheme_warning([]) is None and scheme_warning([{"request_id_scheme": REQUEST_ID_SCHEME}]) is None
    message = scheme_warning([{"run_id": "r1"}])  # written before schemes were recorded
    assert "request-id scheme 1" in message and f"scheme {REQUEST_ID_SCHEME}" in message and "output.url" in message


def test_id_column_is_the_identity():
    v = validator(input={"id_column": "key"})
    first = one(v, row(0, prompt="a cat", key="k1"))
    moved = one(v, row(99, prompt="a cat", key="k1"))
    assert first["id"] == "k1" and first["request_id"] == moved["request_id"] and first["seed"] == moved["seed"]


@pytest.mark.parametrize(
    "cells, reason",
    [
        ({"prompt": None}, "prompt is missing (null)"),
        ({"prompt": "   "}, "prompt is empty"),
        ({"prompt": 42}, "prompt must be text, got int 42"),
        ({"prompt": "a\x00b"}, "prompt contains control character U+0000 at position 1"),
        ({"prompt": "x" * 5000}, "prompt has 5000 characters, above limits.max_prompt_chars=4000"),
        ({"prompt": "ok", "seed": "abc"}, "seed must be a whole number, got 'abc'"),
        ({"prompt": "ok", "steps": 2.5}, "steps must be a whole number, got 2.5"),
        ({"prompt": "ok", "steps": 10**6}, "steps must be between 1 and 200, got 1000000"),
        ({"prompt": "ok", "width": 100000}, "width must be between 1 and 2048, got 100000"),
        ({"prompt": "ok", "width": 100}, "width must be a multiple of 8, got 100"),
        ({"prompt": "ok", "height": -64}, "height must be between 1 and 2048, got -64"),
        ({"prompt": "ok", "num_images": 10**6}, "num_images must be between 1 and 16, got 1000000"),
        ({"prompt": "ok", "seed": -1}, "seed must be between 0 and 2**63-1, got -1"),
        ({"prompt": "ok", "guidance_scale": "nan"}, "guidance_scale must be between 0 and 50"),
        ({"prompt": "ok", "guidance_scale": True}, "guidance_scale must be a number, got True"),
    ],
)
def test_bad_rows_become_error_rows_with_a_reason(cells, reason):
    rejected = one(validator(), row(**cells))
    assert rejected["error_stage"] == "validate"
    assert reason in rejected["error_message"]
    assert rejected["raw"] and rejected["request_id"]


def test_every_problem_of_a_row_is_reported():
    rejected = one(validator(), row(prompt="", seed="x", steps=0))
    assert rejected["error_message"].count(";") == 2


def test_table_keeps_passthrough_columns_with_types_and_renames_collisions():
    table = pa.table({
        "prompt": ["a", "b", None],
        "category": ["x", "y", "z"],
        "score": [1.5, 2.5, 3.5],
        "image": ["i1", "i2", "i3"],  # collides with the output's image column
        S.INPUT_SOURCE: ["t.csv"] * 3,
        S.INPUT_ROW: [0, 1, 2],
    })
    out = validator().validate_table(table)
    assert out.num_rows == 3
    assert out.column("category").to_pylist() == ["x", "y", "z"]
    assert out.schema.field("score").type == pa.float64()
    assert out.column("input_image").to_pylist() == ["i1", "i2", "i3"]
    assert out.column("error_stage").to_pylist() == [None, None, "validate"]


def test_committed_requests_are_skipped():
    v = validator()
    done = one(v, row(0, prompt="a"))["request_id"]
    from pipeline.storage.skip_filter import CommittedIds

    skipping = dataclasses.replace(v, skip=CommittedIds.from_ids([done]))
    out, skipped = skipping.validate_table_skipping(pa.Table.from_pylist([row(0, prompt="a"), row(1, prompt="b")]))
    assert out.column("row_index").to_pylist() == [1]
    assert skipped.to_pylist() == [done]


def test_repeated_ids_are_rejected_after_their_first_row():
    from pipeline.spec.duplicate_ids import find_duplicate_ids

    table = pa.table({
        "key": ["a", "b", "a", None, "a"],
        "prompt": ["p1", "p2", "p1", "p4", "other"],
        S.INPUT_SOURCE: ["t.csv"] * 5,
        S.INPUT_ROW: list(range(5)),
    })
    duplicates = find_duplicate_ids([table], "key")
    assert duplicates == {"t.csv#2": "t.csv#0", "t.csv#4": "t.csv#0"}
    v = validator(input={"id_column": "key"})
    out = dataclasses.replace(v, duplicates=duplicates).validate_table(table)
    messages = out.column("error_message").to_pylist()
    assert messages[0] is None and messages[1] is None
    assert messages[2] == messages[4] == "id 'a' repeats the id of row t.csv#0; ids must be unique"
    assert messages[3] == "id column 'key' is empty"
    assert len(set(out.column("request_id").to_pylist())) == 5


def test_a_bad_jsonl_line_is_an_error_row_without_adding_a_column():
    import io

    from pipeline.storage.tables import read_file

    data = b'{"prompt": "a cat", "style": "x"}\nnot json {\n{"prompt": "a dog", "style": "y"}\n'
    (table,) = read_file(io.BytesIO(data), "jsonl", "t.jsonl")
    out = validator().validate_table(table)
    assert "line" not in out.column_names and not any(c.startswith("__") for c in out.column_names)
    assert out.column("style").to_pylist() == ["x", None, "y"]
    assert out.column("raw").to_pylist()[1] == "not json {\n"
    assert "line 2 is not valid JSON" in out.column("error_message").to_pylist()[1]


def _read(data: bytes, fmt: str, source: str) -> pa.Table:
    import io

    from pipeline.storage.tables import read_file

    return pa.concat_tables(list(read_file(io.BytesIO(data), fmt, source)))


def _parquet_bytes(table: pa.Table) -> bytes:
    import io

    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def test_float_seeds_that_may_have_been_rounded_are_error_rows():
    import pandas as pd

    # pandas makes an int column with a missing value float64: 1234567890123456789 -> ...768.
    frame = pd.DataFrame({"prompt": ["a", "b", "c"], "seed": [1234567890123456789, None, 12]})
    assert frame["seed"].dtype == "float64"
    table = _read(_parquet_bytes(pa.Table.from_pandas(frame, preserve_index=False)), "parquet", "t.parquet")
    out = validator().validate_table(table)
    messages = out.column("error_message").to_pylist()
    assert "seed 1.2345678901234568e+18 is a float at or above 2**53" in messages[0]
    assert messages[1] is None and messages[2] is None  # null: derived; 12.0: exactly 12
    assert out.column("seed").to_pylist()[2] == 12
    assert out.column("seed").to_pylist()[1] == derive_seed(11, "row:t.parquet#1")
    # The same number as an integer is taken exactly.
    assert one(validator(), row(prompt="a", seed=1234567890123456789))["seed"] == 1234567890123456789
    for bad, reason in ((float("nan"), "seed is NaN"), (float("inf"), "whole number"), (2.5, "whole number"), ("1.2345678901234568e18", "above 2**53")):
        assert reason in one(validator(), row(prompt="a", seed=bad))["error_message"], bad


def test_empty_cells_mean_the_default_in_every_format():
    # One rule: an empty CSV/TSV cell and a null in Parquet/JSONL both take the default.
    v = validator(defaults={"negative_prompt": "blurry", "guidance_scale": 5.0})
    rows = [{"prompt": "a cat", "negative_prompt": None, "guidance_scale": None}, {"prompt": "a dog", "negative_prompt": "dark", "guidance_scale": 2.0}]
    csv_text = "prompt,negative_prompt,guidance_scale\na cat,,\na dog,dark,2.0\n"
    tables = {
        "csv": _read(csv_text.encode(), "csv", "t"),
        "tsv": _read(csv_text.replace(",", "\t").encode(), "tsv", "t"),
        "parquet": _read(_parquet_bytes(pa.Table.from_pylist(rows)), "parquet", "t"),
        "jsonl": _read("\n".join(__import__("json").dumps(r) for r in rows).encode(), "jsonl", "t"),
    }
    results = {fmt: v.validate_table(t).select(["request_id", "negative_prompt", "guidance_scale"]).to_pylist() for fmt, t in tables.items()}
    assert results["csv"][0]["negative_prompt"] == "blurry" and results["csv"][0]["guidance_scale"] == 5.0
    assert results["csv"][1]["negative_prompt"] == "dark"
    assert results["csv"] == results["tsv"] == results["parquet"] == results["jsonl"]


def test_float_ids_read_as_csv_does_and_nan_ids_are_empty():
    v = validator(input={"id_column": "key"})
    from_csv = one(v, row(0, prompt="a cat", key="1"))
    from_float = one(v, row(0, prompt="a cat", key=1.0))
    assert from_float["id"] == "1" and from_float["request_id"] == from_csv["request_id"]
    assert one(v, row(0, prompt="a", key=2.5))["id"] == "2.5"
    assert "float at or above 2**53" in one(v, row(0, prompt="a", key=2.0**60))["error_message"]
    # NaN ids are empty ids: rejected, each row its own request id.
    table = pa.table({
        "key": pa.array([1.0, float("nan"), float("nan"), 1.0]),
        "prompt": ["a", "b", "b", "a"],
        S.INPUT_SOURCE: ["t.parquet"] * 4,
        S.INPUT_ROW: list(range(4)),
    })
    from pipeline.spec.duplicate_ids import find_duplicate_ids

    duplicates = find_duplicate_ids([table], "key")
    assert duplicates == {"t.parquet#3": "t.parquet#0"}
    out = dataclasses.replace(v, duplicates=duplicates).validate_table(table)
    messages = out.column("error_message").to_pylist()
    assert messages[0] is None and messages[1] == messages[2] == "id column 'key' is empty"
    assert messages[3] == "id '1' repeats the id of row t.parquet#0; ids must be unique"
    assert len(set(out.column("request_id").to_pylist())) == 4


def test_identical_repeated_rows_get_their_own_error_row_ids():
    from pipeline.spec.duplicate_ids import find_duplicate_ids

    table = pa.table({"key": ["a"] * 3, "prompt": ["p"] * 3, S.INPUT_SOURCE: ["t.csv"] * 3, S.INPUT_ROW: [0, 1, 2]})
    v = validator(input={"id_column": "key"})
    out = dataclasses.replace(v, duplicates=find_duplicate_ids([table], "key")).validate_table(table)
    assert out.column("error_stage").to_pylist() == [None, "validate", "validate"]
    assert len(set(out.column("request_id").to_pylist())) == 3


@pytest.mark.parametrize(
    "ref, width, reason",
    [
        # FLUX would round 14 down to 12 and the row would record 14.
        ("tiny-flux", 14, "width must be a multiple of 4 for model 'tiny-flux' (FLUX.1 packs latents in 2x2 patches: the VAE's 2x downsampling times 2), got 14"),
        ("tiny-sd3", 6, "width must be a multiple of 4 for model 'tiny-sd3' (Stable Diffusion 3: the VAE's 2x downsampling times the transformer's patch size 2), got 6"),
        ("tiny", 36, "width must be a multiple of 8 for model 'tiny' (Stable Diffusion 1.x/2.x pipelines take multiples of 8), got 36"),
    ],
)
def test_each_family_size_rule_is_a_row_error_naming_it(ref, width, reason):
    v = validator(model={"ref": ref}, limits={"size_multiple": 2})
    rejected = one(v, row(prompt="a cat", width=width))
    assert rejected["error_stage"] == "validate" and rejected["error_message"] == reason
    good = width + 2 if ref != "tiny" else 40
    assert one(v, row(prompt="a cat", width=good))["width"] == good


def test_real_family_size_multiples():
    from pipeline.spec.families import FAMILIES

    # FLUX.1 and SD3 (VAE 8x, patch 2 / packed 2x2): 1920x1080 is not a size they make.
    assert FAMILIES["flux"].size_multiple(8, 1)[0] == 16 and 1080 % 16
    assert FAMILIES["sd3"].size_multiple(8, 2)[0] == 16
    assert FAMILIES["sdxl"].size_multiple(8, 1)[0] == 8


@pytest.mark.parametrize(
    "model, setting, allowed",
    [
        ({"ref": "tiny-sd3", "scheduler": "ddim"}, "model.scheduler", "allowed: flow_euler"),
        ({"ref": "tiny-flux", "scheduler": "euler"}, "model.scheduler", "allowed: flow_euler"),
        ({"ref": "tiny", "scheduler": "flow_euler"}, "model.scheduler", "allowed: ddim, pndm, euler, euler_a, dpmpp_2m, lms, unipc"),
    ],
)
def test_a_scheduler_the_family_cannot_use_is_a_spec_error(model, setting, allowed):
    from pipeline.errors import SpecError

    spec = parse_spec({"input": {"url": "t.csv"}, "model": model})
    with pytest.raises(SpecError, match=rf"^{setting}: '{model['scheduler']}' cannot run model .*{allowed}"):
        build_catalog(spec)
    several = parse_spec({"input": {"url": "t.csv"}, "models": {"m": model}})
    with pytest.raises(SpecError, match=r"^models\.m\.scheduler: "):
        build_catalog(several)


def test_scheduler_names_are_the_family_table_s():
    import typing

    from pipeline.spec.families import SCHEDULER_CLASSES
    from pipeline.spec.model_config import SchedulerName

    assert list(typing.get_args(SchedulerName)) == list(SCHEDULER_CLASSES)


def test_scheduler_column_names_the_class_and_the_request_id_keeps_the_spec_name():
    assert one(validator(), row(prompt="a"))["scheduler"] == "DDIMScheduler"
    assert one(validator(model={"ref": "tiny-flux"}), row(prompt="a"))["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    assert one(validator(model={"scheduler": "euler"}), row(prompt="a"))["scheduler"] == "EulerDiscreteScheduler"


def test_a_default_size_the_model_cannot_make_is_a_spec_error():
    from pipeline.errors import SpecError

    spec = parse_spec({"input": {"url": "t.csv"}, "model": {"ref": "tiny-flux"}, "defaults": {"width": 64, "height": 34}, "limits": {"size_multiple": 2}})
    with pytest.raises(SpecError, match=r"^defaults\.height=34 is not a multiple of 4, which model 'tiny-flux' needs \(FLUX\.1 packs"):
        build_catalog(spec)
