"""The output's ``README.md``: a Hugging Face dataset card, regenerated when a run completes.

It describes the complete runs (their manifests): what a crashed run committed is in the
output from the moment it is committed, and in the card once a later run has adopted it
and completed.

The YAML header names two configs, ``images`` (the default) and ``errors``, each with
its ``data_files`` and its features, so ``datasets.load_dataset(OUTPUT, "images")`` (or
the Hub's viewer) reads the right files with the image column as PIL images. The body
says how the data was made: model, parameters, counts over all runs, dates, and the
quality columns (safety checker setting per model, CLIP scorer, perceptual hash).

The features are those of the output's unified schema
(:mod:`pipeline.storage.dataset_schema`), so every part loads whatever columns it lacks.

Pure: reads the manifests through :mod:`pipeline.storage.filesystem`.
"""

from __future__ import annotations

import json
import posixpath
import time
from typing import Any, Optional

import fsspec
import pyarrow as pa
import yaml

from pipeline.output.duplicates import DEFAULT_DISTANCE
from pipeline.spec import schema as S
from pipeline.storage import commit_protocol, dataset_schema, filesystem, ownership_marker, part_files, record_format

CARD_NAME = ownership_marker.CARD_NAME


def write_card(fs: fsspec.AbstractFileSystem, root: str) -> str:
    """Regenerate ``root/README.md`` from every committed run; return its path. Called
    after each run's manifest, so the card always describes what is committed."""
    manifests = commit_protocol.read_manifests(fs, root)
    schemas = dataset_schema.latest(manifests)
    dataset_schema.publish(fs, root, schemas)
    # The unified schema of every part (outputs from before it was recorded: the newest part's).
    images_schema = schemas.get(record_format.IMAGES_DIR) or part_files.newest_part_schema(fs, root, manifests, record_format.IMAGES_DIR)
    # A README imagegen did not write stays; the card then goes beside it (ownership_marker).
    path = filesystem.join(root, ownership_marker.card_name(fs, root))
    filesystem.atomic_write(fs, path, card_text(manifests, images_schema, name=posixpath.basename(root.rstrip("/"))).encode())
    return path


def card_text(manifests: list[dict[str, Any]], images_schema: Optional[pa.Schema], name: str = "imagegen output") -> str:
    """The card for an output whose runs are ``manifests`` (oldest first) and whose images
    parts have ``images_schema`` (None when there are none)."""
    latest = manifests[-1] if manifests else {}
    spec = latest.get("spec", {})
    kinds = (record_format.IMAGES_DIR, record_format.ERRORS_DIR)
    in_parts = {kind: sum(p["rows"] for m in manifests for p in m["parts"] if p["path"].startswith(kind + "/")) for kind in kinds}
    part_bytes = {kind: sum(p["bytes"] for m in manifests for p in m["parts"] if p["path"].startswith(kind + "/")) for kind in kinds}
    header: dict[str, Any] = {
        "license": spec.get("output", {}).get("license", "other"),
        "pretty_name": name,
        "task_categories": ["text-to-image"],
        "tags": ["imagegen", "synthetic"],
    }
    configs, infos = [], []
    for kind, schema in ((record_format.IMAGES_DIR, images_schema), (record_format.ERRORS_DIR, S.ERRORS_SCHEMA)):
        if not in_parts[kind]:  # a config whose files do not exist would fail to load
            continue
        configs.append({"config_name": kind, "data_files": [{"split": "train", "path": f"{kind}/*.parquet"}]})
        features = hf_features(schema) if schema is not None else None
        # download_size changes with every commit, and with it the key under which
        # `datasets` caches a local folder's config: without it, load_dataset(OUTPUT) keeps
        # returning the rows of the first load after later runs add parts.
        infos.append({"config_name": kind, **({"features": features} if features else {}), "download_size": part_bytes[kind]})
    if configs:
        configs[0]["default"] = True
        header["configs"] = configs
    if infos:
        header["dataset_info"] = infos
    front = yaml.safe_dump(header, sort_keys=False, allow_unicode=True, width=1000)
    return f"---\n{front}---\n\n{ownership_marker.CARD_MARKER}\n\n" + _body(manifests, spec, in_parts, name)


def _run_models(manifest: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(ref, fingerprint, details) of each model a run used; runs before models were named
    recorded one model in their spec."""
    if manifest.get("models"):
        return [(info.get("ref"), info.get("fingerprint"), info) for info in manifest["models"].values()]
    return [(manifest.get("spec", {}).get("model", {}).get("ref"), manifest.get("model_fingerprint"), {})]


def _body(manifests: list[dict[str, Any]], spec: dict[str, Any], in_parts: dict[str, int], name: str) -> str:
    if not manifests:
        return f"# {name}\n\nNo run has committed into this output yet.\n"
    defaults, out = spec.get("defaults", {}), spec.get("output", {})
    models = sorted(
        {
            (ref, fp, info.get("family") or "?")
            for m in manifests
            for ref, fp, info in _run_models(m)
            if fp is not None  # a run interrupted before it recorded its models
        }
    )
    loras = sorted({(name, info.get("digest")) for m in manifests for name, info in m.get("loras", {}).items()})
    totals = {key: sum(m["counts"][key] for m in manifests) for key in ("input_rows", "images", "errors")}
    by_stage: dict[str, int] = {}
    for m in manifests:
        for stage, n in m["counts"].get("errors_by_stage", {}).items():
            by_stage[stage] = by_stage.get(stage, 0) + n
    stages = ", ".join(f"{stage}: {n}" for stage, n in sorted(by_stage.items())) or "none"
    lines = [
        f"# {name}",
        "",
        "Images generated from a prompt table by `imagegen` (batch image generation on Ray with diffusers).",
        "Every input row is in exactly one place: the `images` config (one row per image, with its prompt,",
        "seed, parameters, model and timings) or the `errors` config (the rows that could not be generated,",
        "with the stage, the reason and the raw row).",
        "",
        "```python",
        "from datasets import load_dataset",
        *(
            f'{kind} = load_dataset("path/to/{name}", "{kind}", split="train")' + ("  # image column as PIL images" if kind == record_format.IMAGES_DIR else "")
            for kind in (record_format.IMAGES_DIR, record_format.ERRORS_DIR)
            if in_parts[kind]
        ),
        "```",
        "",
        "## How it was generated",
        "",
        "| | |",
        "|---|---|",
        "| model | " + "; ".join(f"`{ref}` ({family}, fingerprint `{fp}`)" for ref, fp, family in models) + " |",
        *([("| LoRA adapters | " + "; ".join(f"`{n}` (digest `{d}`)" for n, d in loras) + " |")] if loras else []),
        f"| revision, dtype, scheduler | {_model_settings(spec)} |",
        f"| default size | {defaults.get('width')}x{defaults.get('height')} |",
        f"| default steps, guidance scale | {defaults.get('steps')}, {defaults.get('guidance_scale')} |",
        f"| default negative prompt | {_cell(defaults.get('negative_prompt') or '(none)')} |",
        f"| images per row, job seed | {defaults.get('num_images')}, {defaults.get('seed')} (a row without a seed gets one derived from this and its identity) |",
        f"| image format | {out.get('format')} |",
        f"| prompt table | {_cell(str(spec.get('input', {}).get('url')))} |",
        f"| runs | {len(manifests)}, from {_date(manifests[0].get('started_at'))} to {_date(manifests[-1].get('finished_at'))} |",
        f"| over all runs | {totals['input_rows']} input rows, {totals['images']} images, {totals['errors']} errors ({stages}) |",
        f"| in the dataset now | {in_parts[record_format.IMAGES_DIR]} images, {in_parts[record_format.ERRORS_DIR]} error rows |",
        "",
        "Rows may override the defaults above; each image records the parameters it was made with.",
        "Parameters and defaults are those of the latest run; each run's full spec is in `_runs/<run-id>.json`.",
        "",
        *_quality_section(manifests),
        "## Runs",
        "",
        "| run | finished (UTC) | input rows | images | errors | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for m in manifests:
        c = m["counts"]
        lines.append(f"| `{m['run_id']}` | {_date(m.get('finished_at'), time_of_day=True)} | {c['input_rows']} | {c['images']} | {c['errors']} | {m.get('wall_seconds', 0):.1f} |")
    lines.append("")
    return "\n".join(lines)


def _model_settings(spec: dict[str, Any]) -> str:
    """Revision, dtype and scheduler of the spec's model, or of each of its ``models`` by
    name: with ``models`` the ``model`` section is unused (its defaults say nothing)."""

    def settings(model: dict[str, Any]) -> str:
        return f"{model.get('revision')}, {model.get('dtype')}, {model.get('scheduler') or 'the model default'}"

    if spec.get("models"):
        return "; ".join(f"`{name}`: {settings(model)}" for name, model in spec["models"].items())
    return settings(spec.get("model", {}))


def _quality_section(manifests: list[dict[str, Any]]) -> list[str]:
    """The quality columns and how each run made them: the safety checker setting of each
    model, the CLIP scorer's ref and fingerprint, the phash and its near-duplicate threshold."""
    safety = []
    for name, info in sorted({(n, json.dumps(i, sort_keys=True)) for m in manifests for n, i in m.get("models", {}).items()}):
        info = json.loads(info)
        ref, mode, has = info.get("ref"), info.get("safety_checker"), info.get("has_safety_checker")
        if mode is None:
            verdict = "not recorded (a run from before imagegen kept safety verdicts)"
        elif mode == "off":
            verdict = "**off**: the model's safety checker was not run; its images were not checked (`nsfw_detected` null)"
        elif has is False:
            verdict = "the model has no safety checker (`nsfw_detected` null)"
        elif mode == "error":
            verdict = "error: flagged images became error rows (stage generate), none is in `images`"
        else:
            verdict = "flag: flagged images are kept as diffusers' black images, with `nsfw_detected` true"
        safety.append(f"`{name}`" + (f" (`{ref}`)" if ref != name else "") + f": {verdict}")
    scorers = sorted({(s["ref"], s["fingerprint"]) for m in manifests if (s := m.get("scoring"))})
    unscored = sum(1 for m in manifests if not m.get("scoring"))
    scoring = "; ".join(f"`{ref}` (fingerprint `{fp}`)" for ref, fp in scorers) or "none: no run had a `scoring` section"
    if scorers and unscored:
        scoring += f"; {unscored} run(s) without one left it null"
    return [
        "## Quality columns",
        "",
        "Each image row says what came out, so keeping the good rows is a query; a column is null where it was not computed.",
        "",
        "| column | what it holds | how it was made here |",
        "|---|---|---|",
        "| `nsfw_detected` | the model's safety checker flagged the image (diffusers replaces a flagged image with a black one) | "
        + (_cell("; ".join(safety)) or "no run recorded its models")
        + " |",
        "| `clip_score` | 100 x the cosine of the CLIP embeddings of the image and its prompt (not clipped at 0) | "
        + _cell(scoring)
        + "; the score of each row is made by the scorer its `clip_scorer` names |",
        "| `clip_scorer` | the fingerprint of the scorer that made the row's `clip_score` | changes when the scorer's weights do |",
        "| `clip_prompt_truncated` | the prompt was longer than the scorer's 77 tokens and was cut for scoring | the scorer's tokenizer |",
        "| `phash` | 64-bit perceptual hash (DCT) of the generated pixels, as an unsigned integer | `imagehash.phash` (8x8 bits); "
        f"near duplicates differ in at most {DEFAULT_DISTANCE} bits (`imagegen inspect --near-distance N`) |",
        "| `sha256` | digest of the image file | exact duplicates share it |",
        "",
        "```python",
        'good = images.filter(lambda r: not r["nsfw_detected"] and (r["clip_score"] or 0) >= 25)  # pick your own threshold',
        "```",
        "",
    ]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _date(epoch: Optional[float], time_of_day: bool = False) -> str:
    if epoch is None:
        return "?"
    return time.strftime("%Y-%m-%d %H:%M:%S" if time_of_day else "%Y-%m-%d", time.gmtime(epoch))


# -- Arrow schema -> the card's `features` (the YAML form `datasets` writes and reads) --------


def hf_features(schema: pa.Schema) -> Optional[list[dict[str, Any]]]:
    """The schema as dataset-card features, or None when a column has a type this does not
    map (the card then leaves features out and ``datasets`` takes them from the files)."""
    features = []
    for f in schema:
        if f.name == S.IMAGE:
            features.append({"name": f.name, "dtype": "image"})
            continue
        inner = _feature(f.type)
        if inner is None:
            return None
        features.append({"name": f.name, **inner})
    return features


def _feature(t: pa.DataType) -> Optional[dict[str, Any]]:
    if pa.types.is_struct(t):
        fields = [{"name": t.field(i).name, **(_feature(t.field(i).type) or {})} for i in range(t.num_fields)]
        return {"struct": fields} if all(len(f) > 1 for f in fields) else None
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        key = "list" if pa.types.is_list(t) else "large_list"
        inner = _feature(t.value_type)
        if inner is None or len(inner) != 1:
            return None
        ((kind, value),) = inner.items()
        if kind == "dtype":
            return {key: value}
        return {key: value} if kind == "struct" else None
    dtype = _dtype(t)
    return {"dtype": dtype} if dtype is not None else None


def _dtype(t: pa.DataType) -> Optional[str]:
    if pa.types.is_dictionary(t):
        return _dtype(t.value_type)
    if pa.types.is_timestamp(t):
        return f"timestamp[{t.unit}" + (f", tz={t.tz}" if t.tz else "") + "]"
    names = {
        pa.null(): "null",
        pa.bool_(): "bool",
        pa.float16(): "float16",
        pa.float32(): "float32",
        pa.float64(): "float64",
        pa.string(): "string",
        pa.large_string(): "large_string",
        pa.binary(): "binary",
        pa.large_binary(): "large_binary",
        pa.date32(): "date32",
        pa.date64(): "date64",
    }
    if pa.types.is_integer(t):
        return str(t)
    return names.get(t)
