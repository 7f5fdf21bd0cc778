"""The job spec: what a user types, and the message they get when it is wrong."""

import pytest

from pipeline.errors import SpecError
from pipeline.spec.load import load_spec, parse_spec


def write(tmp_path, text):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


def test_demo_spec_loads_with_overrides():
    spec = load_spec("jobs/demo.yaml", ["runtime.num_actors=3", "output.format=webp", "defaults.guidance_scale=2"])
    assert spec.runtime.num_actors == 3
    assert spec.output.format == "webp"
    assert spec.defaults.guidance_scale == 2.0
    assert spec.input.format == "tsv"
    assert spec.input.url.endswith("jobs/data/partiprompts-64.tsv") and spec.input.url.startswith("/")


@pytest.mark.parametrize(
    "url, fmt", [("a.parquet", "parquet"), ("s3://b/x.csv", "csv"), ("t.tsv", "tsv"), ("p.jsonl", "jsonl"), ("p.json", "json")]
)
def test_format_from_extension(url, fmt):
    assert parse_spec({"input": {"url": url}}).input.format == fmt


def test_remote_urls_are_kept_local_paths_made_absolute():
    spec = parse_spec({"input": {"url": "s3://bucket/p.csv"}, "output": {"url": "out"}})
    assert spec.input.url == "s3://bucket/p.csv"
    assert spec.output.url.startswith("/") and spec.output.url.endswith("/out")


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"input": {"url": "a.csv"}, "output": {"format": "gif"}}, "output.format: Input should be 'png', 'webp' or 'jpeg' (got 'gif')"),
        ({"input": {"url": "a.csv", "promt_column": "x"}}, "input.promt_column: unknown field 'promt_column'; allowed here: url, format,"),
        ({"input": {"url": "a.csv"}, "runtim": {}}, "runtim: unknown field 'runtim'; allowed here: input, model,"),
        ({"input": {"url": "prompts"}}, "cannot tell the format of"),
        ({}, "input: required field is missing"),
        ({"input": {"url": "a.csv"}, "defaults": {"width": 100000}}, "defaults.width=100000 is above limits.max_width=2048"),
        ({"input": {"url": "a.csv"}, "defaults": {"width": 100}}, "defaults.width=100 is not a multiple of limits.size_multiple=8"),
        ({"input": {"url": "a.csv"}, "runtime": {"num_actors": 0}}, "runtime.num_actors: Input should be greater than or equal to 1"),
        ({"input": {"url": "a.csv"}, "runtime": {"batch_size": "big"}}, "runtime.batch_size: should be auto or a whole number of rows >= 1 (got 'big')"),
        ({"input": {"url": "a.csv"}, "runtime": {"batch_size": 0}}, "runtime.batch_size: should be auto or a whole number of rows >= 1 (got 0)"),
        ({"input": {"url": "a.csv", "columns": {"wdth": "w"}}}, "unknown parameter(s) ['wdth']; allowed: width,"),
        ({"input": {"url": "a.csv"}, "model": {"device": "cuda"}, "runtime": {"gpus_per_actor": 0}}, "model.device is cuda but runtime.gpus_per_actor is 0"),
        ({"input": {"url": "a.csv"}, "output": {"mode": "append"}}, "output.mode: Input should be 'incremental', 'overwrite' or 'error_if_exists'"),
    ],
)
def test_invalid_spec_names_field_and_allowed_values(data, expected):
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    assert expected in str(info.value)


def test_missing_file_and_bad_yaml_are_spec_errors(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")
    with pytest.raises(SpecError, match="not valid YAML at line 3"):
        load_spec(write(tmp_path, "input:\n  url: a.csv\n bad: indent\n"))


def test_bad_override_is_explained(tmp_path):
    path = write(tmp_path, "input:\n  url: a.csv\n")
    with pytest.raises(SpecError, match="expected key.path=value"):
        load_spec(path, ["runtime.num_actors"])
    with pytest.raises(SpecError, match="runtime.num_actors"):
        load_spec(path, ["runtime.num_actors=many"])


def test_credentials_never_leave_the_spec():
    spec = parse_spec({"input": {"url": "s3://b/a.csv", "storage_options": {"secret": "hunter2"}}})
    assert "hunter2" not in str(spec.redacted())
    other = parse_spec({"input": {"url": "s3://b/a.csv", "storage_options": {"secret": "other"}}})
    assert spec.fingerprint() == other.fingerprint()
    assert spec.fingerprint() != parse_spec({"input": {"url": "s3://b/b.csv"}}).fingerprint()
