"""Raw prompt-table row -> generation requests, or one rejected row with its reasons.

Pure: no Ray, no torch. The batch job and the online front call the same
:class:`Validator`, so a row and the equivalent HTTP request get the same checks, the
same seed and the same request id.

Contracts (see ARCHITECTURE.md):

- **Identity**: the row's ``id`` column value when ``input.id_column`` is set, else its
  content and its occurrence among identical rows (:mod:`pipeline.spec.occurrences`;
  ``id`` is ``<digest>#<n>``), or with ``input.identity: position`` its file and position
  (``source#row``).
- **Seed**: the row's own ``seed`` when given; otherwise derived from the job seed and
  the identity, never from batch position. Image ``k`` of a row uses ``base + k``.
- **Request id**: a digest of the identity, the image index and everything that decides
  the pixels (prompt, negative prompt, seed, size, steps, guidance, scheduler, model
  fingerprint (a hub model's at its resolved commit), the model's resolved dtype and
  device class, and when set the T5 sequence length, the LoRA digest and scale, and
  ``model.safety_checker: off``, which keeps pixels a checker would black out).
  Change any of them and the id changes; rerun the same spec and it does not. How ids
  are made is versioned (:data:`REQUEST_ID_SCHEME`, in every manifest): an output made
  under an older scheme gets new ids, and a run into it says so (:func:`scheme_warning`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import numpy as np
import pyarrow as pa

from pipeline.spec import cells
from pipeline.spec import schema as S
from pipeline.spec.catalog import AdapterEntry, Catalog, ModelEntry
from pipeline.spec.config import JobSpec
from pipeline.spec.occurrences import content_digest, numbered
from pipeline.spec.schema import READ_ERROR, READ_TEXT

# How request ids are made. 1: until dtype, device class and the hub commit entered them;
# 2: with them; 3: a row without an id column is its content and occurrence
# (input.identity: content), no longer its file and position (ids of rows with an id
# column, or with input.identity: position, are those of 2). Recorded in every run
# manifest as ``request_id_scheme``.
REQUEST_ID_SCHEME = 3
REQUEST_SCHEMA = pa.schema([*S.REQUEST_FIELDS, *S.ERROR_FIELDS])
# Key of a rejected row's (parameter, message) pairs; parameter is None for a read error.
PROBLEMS = "problems"


def derive_seed(job_seed: int, identity: str) -> int:
    """The seed of a row that has none: a function of the job seed and the row identity only."""
    digest = hashlib.sha256(f"{job_seed}\x00{identity}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % cells.SEED_SPACE


def request_id(identity: str, image_index: int, params: dict[str, Any], model_fingerprint: str) -> str:
    """Stable id of one image: identity + image index + every pixel-deciding parameter."""
    payload = {"identity": identity, "image_index": image_index, "model": model_fingerprint, **params}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def scheme_warning(manifests: list[dict[str, Any]]) -> Optional[str]:
    """What to tell a run into an output whose latest run made its ids under an older
    :data:`REQUEST_ID_SCHEME` (None when they agree or the output is new): its images
    will not be recognised, so every row is made again beside them."""
    if not manifests:
        return None
    old = manifests[-1].get("request_id_scheme", 1)
    if old >= 2:  # 2 -> 3 changed identities only: identity_change decides
        return None
    return (
        f"this output's images were made under request-id scheme {old}, this version makes scheme {REQUEST_ID_SCHEME} "
        "ids (the model's dtype, device class and a hub model's commit now enter them): its rows are not recognised "
        "as made and will be generated again beside the old images. To keep the datasets apart, set output.url to a "
        "new output (or output.mode: overwrite); see the README's upgrade notes"
    )


def made_by_position(manifest: dict[str, Any]) -> bool:
    """Whether the run of ``manifest`` identified rows by file and position: no id column,
    and a scheme before 3 or ``input.identity: position``."""
    inp = manifest.get("spec", {}).get("input", {})
    if inp.get("id_column"):
        return False
    return manifest.get("request_id_scheme", 1) < 3 or inp.get("identity") == "position"


def identity_change(manifests: list[dict[str, Any]], spec: JobSpec) -> Optional[str]:
    """Why a run of ``spec`` must not go into an output whose runs ``manifests`` are
    (oldest first), or None: an incremental run that identifies rows by content into an
    output whose latest run identified them by position would recognise none of its rows
    and make every one again beside the old images. Said before any work (``run`` and
    ``validate`` stop with it), with the two ways on."""
    if not manifests or spec.output.mode != "incremental" or spec.input.id_column or spec.input.identity != "content":
        return None
    if not made_by_position(manifests[-1]):
        return None
    images = sum(p.get("rows", 0) for m in manifests for p in m.get("parts", []) if p.get("path", "").startswith("images/"))
    return (
        f"{spec.output.url} was made with rows identified by file and position (no input.id_column; request-id scheme "
        f"{manifests[-1].get('request_id_scheme', 1)}), and this version identifies them by content (input.identity: content), "
        f"so none of its {images} image(s) would be recognised and every row would be made again beside them. "
        "Set input.identity: position to keep extending this output as it was made, or set input.id_column, "
        "or write to a new output.url (or output.mode: overwrite) to make it with content identity"
    )


@dataclass(frozen=True)
class Validator:
    """Checks rows against one job spec. Build once per job (or per actor) and reuse.

    ``catalog`` holds the spec's models and adapters as resolved on the driver (see
    :mod:`pipeline.engine.resolve_catalog`): a row's model decides which parameters it may set (its
    family), and the model's fingerprint and the adapter's digest go into every request
    id, so a different model or adapter never reuses an image. Requests whose id ``skip``
    holds (committed by an earlier run: anything with ``contains(ids) -> bool array``, such
    as :class:`~pipeline.storage.commit_protocol.SkipFilter`) are dropped from the stream. ``duplicates``
    maps the position (``source#row``) of each repeat of an id to the id's first position
    (see :mod:`pipeline.spec.duplicate_ids`); a repeat is rejected, the first occurrence is not.
    """

    spec: JobSpec
    catalog: Catalog
    skip: Any = None
    duplicates: Mapping[str, str] = field(default_factory=dict)

    # -- one row -----------------------------------------------------------------------

    def validate_row(self, raw: dict[str, Any]) -> list[dict[str, Any]]:
        """One raw row (with ``__source``/``__row``) -> its image requests, or a single
        row whose ``error_stage`` is set and whose ``error_message`` lists every problem.
        A rejected row also carries :data:`PROBLEMS`: ``(parameter, message)`` pairs, for
        fronts that report each field on its own (not written to the dataset)."""
        inp = self.spec.input
        source, row = str(raw.get(S.INPUT_SOURCE, "")), int(raw.get(S.INPUT_ROW) or 0)
        problems: list[tuple[str | None, str]] = []
        model = self._model(raw.get(inp.column_for("model")), problems)
        base = {S.SOURCE: source, S.ROW_INDEX: row, S.IMAGE_INDEX: 0, **_model_columns(model)}
        if raw.get(READ_ERROR):
            return [self._reject(base, raw, f"{source}#{row}", S.STAGE_READ, "ReadError", [(None, raw[READ_ERROR])])]

        repeated = False
        reject_identity = None
        if inp.id_column:
            try:
                display_id = cells.id_text(raw.get(inp.id_column))
                if display_id is None:
                    problems.append(("id", f"id column {inp.id_column!r} is empty"))
            except cells.RowError as exc:
                problems.append(("id", str(exc)))
                display_id = None
            if display_id is None:
                display_id = f"{source}#{row}"
            else:
                first = self.duplicates.get(f"{source}#{row}")
                if first is not None:
                    repeated = True
                    problems.append(("id", f"id {display_id!r} repeats the id of row {first}; ids must be unique"))
                    # Repeats of one id share its identity: their error rows need their own ids.
                    reject_identity = f"id:{display_id}@{source}#{row}"
            identity = f"id:{display_id}"
        elif inp.identity == "content":
            # Digest and occurrence come from the reader's numbering (pipeline.spec.occurrences):
            # every path that validates a table without an id column numbers it first; a row
            # given alone is the only row of its table.
            content = raw.get(S.INPUT_CONTENT) or content_digest(raw, inp)
            display_id = f"{content}#{raw.get(S.INPUT_OCCURRENCE, 0)}"
            identity = f"content:{display_id}"
        else:
            display_id = f"{source}#{row}"
            identity = f"row:{display_id}"
        base[S.ID] = display_id

        params = self._params(raw, model, problems)
        adapter, lora_scale = self._adapter(raw, problems)
        if problems:
            # A repeated id names another row's identity, not this row's: superseding
            # (pipeline.storage.supersede) keys such rejections on their position instead.
            error_type = S.ERROR_TYPE_DUPLICATE_ID if repeated else "InvalidRow"
            return [self._reject(base, raw, reject_identity or identity, S.STAGE_VALIDATE, error_type, problems)]

        num_images = params.pop("num_images")
        seed = params.pop("seed")
        if seed is None:
            seed = derive_seed(self.spec.defaults.seed, identity)
        # Keys enter the id only when set, so ids of rows without them stay what they were.
        extra = {}
        if params[S.MAX_SEQUENCE_LENGTH] is not None:
            extra[S.MAX_SEQUENCE_LENGTH] = params[S.MAX_SEQUENCE_LENGTH]
        if adapter is not None:
            extra.update({"lora": adapter.digest, S.LORA_SCALE: lora_scale})
        if model.config.safety_checker == "off":
            extra["safety_checker"] = "off"
        extra.update({S.DTYPE: base[S.DTYPE], S.DEVICE: base[S.DEVICE]})  # resolved: see resolve.place
        columns = {
            S.LORA: adapter.name if adapter else None,
            S.LORA_SCALE: lora_scale,
            S.LORA_DIGEST: adapter.digest if adapter else None,
        }
        identifying = {k: v for k, v in params.items() if k != S.MAX_SEQUENCE_LENGTH}
        requests = []
        for k in range(num_images):
            image = {**identifying, "seed": (seed + k) % cells.SEED_SPACE}
            # The spec's scheduler name (or "default"), not the column's class: ids made
            # before the column named the class stay what they were.
            rid = request_id(identity, k, {**image, "scheduler": model.config.scheduler or "default", **extra}, model.fingerprint)
            requests.append({**base, **params, **image, **columns, S.REQUEST_ID: rid, S.IMAGE_INDEX: k})
        return requests

    def _model(self, value: Any, problems: list[tuple[str | None, str]]) -> ModelEntry:
        """The row's model; the default one (for the error row's columns) when it names none known."""
        models = self.catalog.models
        if cells.missing(value):
            return models[self.catalog.default_model]
        if isinstance(value, str) and value in models:
            return models[value]
        problems.append(("model", f"model {value!r} is not one of this spec's models; allowed: {', '.join(models)}"))
        return models[self.catalog.default_model]

    def _adapter(self, raw: dict[str, Any], problems: list[tuple[str | None, str]]) -> tuple[Optional[AdapterEntry], Optional[float]]:
        """The row's LoRA adapter and its scale, or (None, None)."""
        inp, loras = self.spec.input, self.catalog.loras
        name, scale = raw.get(inp.column_for("lora")), raw.get(inp.column_for("lora_scale"))
        if cells.missing(name):
            name = self.spec.defaults.lora
        if name is None:
            if not cells.missing(scale):
                problems.append(("lora_scale", "lora_scale is set but the row names no lora; give a lora or leave lora_scale empty"))
            return None, None
        if not isinstance(name, str) or name not in loras:
            allowed = ", ".join(loras) or "none: the spec has no loras section"
            problems.append(("lora", f"lora {name!r} is not one of this spec's loras; allowed: {allowed}"))
            return None, None
        entry = loras[name]
        try:
            return entry, cells.number(scale, "lora_scale", entry.config.scale, -10.0, 10.0)
        except cells.RowError as exc:
            problems.append(("lora_scale", str(exc)))
            return None, None

    def _params(self, raw: dict[str, Any], model: ModelEntry, problems: list[tuple[str | None, str]]) -> dict[str, Any]:
        inp, d, lim = self.spec.input, self.spec.defaults, self.spec.limits
        family = model.family

        def cell(parameter: str) -> Any:
            return raw.get(inp.column_for(parameter))

        def check(parse, parameter: str, *args):
            try:
                return parse(cell(parameter), parameter, *args)
            except cells.RowError as exc:
                problems.append((parameter, str(exc)))
                return None

        def not_taken(parameter: str) -> None:
            # A default the family cannot use is not applied; the row's own value is an error.
            value = cell(parameter)
            if not cells.missing(value):
                problems.append(
                    (parameter, f"{parameter}: model {model.name!r} ({family.label}) does not take {parameter}; leave it empty for this model's rows")
                )
            return None

        prompt = None
        if inp.prompt_column not in raw:
            problems.append(("prompt", f"no prompt column {inp.prompt_column!r} in this row's file"))
        else:
            try:
                prompt = cells.prompt(raw.get(inp.prompt_column), "prompt", lim.max_prompt_chars)
            except cells.RowError as exc:
                problems.append(("prompt", str(exc)))
        if family.takes_parameter("negative_prompt"):
            negative = check(cells.optional_text, "negative_prompt", d.negative_prompt, lim.max_prompt_chars)
        else:
            negative = not_taken("negative_prompt")
        if family.takes_parameter("max_sequence_length"):
            limit = family.max_sequence_length_limit
            default = d.max_sequence_length or family.max_sequence_length
            max_sequence_length = check(cells.bounded_int, "max_sequence_length", default, 1, limit)
        else:
            max_sequence_length = not_taken("max_sequence_length")
        return {
            "prompt": prompt,
            "negative_prompt": negative,
            "width": check(cells.size, "width", d.width, lim.max_width, lim.size_multiple, model),
            "height": check(cells.size, "height", d.height, lim.max_height, lim.size_multiple, model),
            "steps": check(cells.bounded_int, "steps", d.steps, 1, lim.max_steps),
            "guidance_scale": check(cells.number, "guidance_scale", d.guidance_scale, 0.0, lim.max_guidance_scale),
            S.MAX_SEQUENCE_LENGTH: max_sequence_length,
            "num_images": check(cells.bounded_int, "num_images", d.num_images, 1, lim.max_num_images),
            "seed": check(cells.seed, "seed"),
        }

    def _reject(self, base, raw, identity, stage, error_type, problems) -> dict[str, Any]:
        return {
            **base,
            S.REQUEST_ID: request_id(identity, 0, {"rejected": _raw_json(raw)}, base[S.MODEL_FINGERPRINT]),
            S.ERROR_STAGE: stage,
            S.ERROR_TYPE: error_type,
            S.ERROR_MESSAGE: "; ".join(message for _, message in problems),
            S.RAW: _raw_json(raw),
            PROBLEMS: problems,
        }

    # -- a table -----------------------------------------------------------------------

    def passthrough_columns(self, column_names: list[str]) -> list[str]:
        """Input columns that are carried to the output as they are: all but the prompt,
        the id, the parameter columns and the reader's own (:func:`~pipeline.spec.schema.passthrough_columns`)."""
        return S.passthrough_columns(self.spec.input, column_names)

    def validate_table(self, table: pa.Table) -> pa.Table:
        """A table of raw rows -> one row per image request (or per rejected row), with
        the request columns first and the pass-through columns after, types kept."""
        return self.validate_table_skipping(table)[0]

    def validate_table_skipping(self, table: pa.Table) -> tuple[pa.Table, pa.Array]:
        """:meth:`validate_table`, and the request ids it dropped because ``skip`` holds them.

        Without an id column, content identity needs the rows numbered in table order
        (:mod:`pipeline.spec.occurrences`): the job, ``validate`` and ``verify`` number the
        whole table first; a table given here unnumbered is taken as the whole table."""
        inp = self.spec.input
        if not inp.id_column and inp.identity == "content" and S.INPUT_CONTENT not in table.column_names:
            table = pa.concat_tables(list(numbered([table], inp)))
        origin: list[int] = []
        requests: list[dict[str, Any]] = []
        for i, raw in enumerate(table.to_pylist()):
            for request in self.validate_row(raw):
                requests.append(request)
                origin.append(i)
        skipped = pa.array([], pa.string())
        if self.skip is not None and requests:
            ids = pa.array([r[S.REQUEST_ID] for r in requests], pa.string())
            held = np.asarray(self.skip.contains(ids), dtype=bool)
            if held.any():
                skipped = ids.filter(pa.array(held))
                keep = np.flatnonzero(~held).tolist()
                requests, origin = [requests[k] for k in keep], [origin[k] for k in keep]
        result = pa.Table.from_pylist(requests, schema=REQUEST_SCHEMA)
        carried = table.select(self.passthrough_columns(table.column_names)).take(pa.array(origin, pa.int64()))
        for name, column in zip(carried.column_names, carried.columns):
            result = result.append_column(S.passthrough_name(name), column)
        return result, skipped


# -- cell parsers: value -> clean value, or cells.RowError with a reason a user understands ---------


def _model_columns(model: ModelEntry) -> dict[str, Any]:
    return {
        S.MODEL: model.name,
        S.MODEL_FINGERPRINT: model.fingerprint,
        S.MODEL_FAMILY: model.family.name,
        S.PIPELINE_CLASS: model.pipeline_class,
        S.DTYPE: model.config.dtype,
        S.DEVICE: model.config.device,
        # The class the engine runs: a saved model's own when the spec names none.
        S.SCHEDULER: model.scheduler_class or model.config.scheduler or "default",
    }


def _raw_json(raw: dict[str, Any]) -> str:
    if raw.get(READ_TEXT) is not None:  # a line the reader could not parse: the line is the row
        return raw[READ_TEXT]
    visible = {k: v for k, v in raw.items() if k not in (S.INPUT_SOURCE, S.INPUT_ROW, S.INPUT_CONTENT, S.INPUT_OCCURRENCE, READ_ERROR, READ_TEXT)}
    return json.dumps(visible, ensure_ascii=False, default=str, sort_keys=True)
