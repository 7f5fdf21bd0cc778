"""``imagegen validate``: the plan of a job before any work, from the spec and the whole input.

Reads the table and validates every row exactly as the job would (same read units, same
:class:`~pipeline.spec.validate.Validator`, same duplicate-id record, same model
fingerprint, so the same request ids), then counts: valid and rejected rows with the most
common reasons, the buckets (model, width x height, steps) with their rows and images, the
images still to make (an incremental output skips what it already holds), and an estimate
of GPU-hours and cost from a per-bucket throughput table.

Every row is checked, never a sample: a sample cannot find a repeated id or count what an
output already holds. Where: a table of up to :data:`LOCAL_ROWS` rows (counted from
Parquet footers, or text up to the counting budget) in this process, unit after unit; a
larger one on the Ray cluster the spec names, one task per read unit, as the job's own
read tasks do (about 50 us a row on one core here, so 1M rows take a minute on one
process and seconds on a cluster).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import pyarrow as pa

from pipeline.errors import SpecError
from pipeline.batch.rates import Bucket, gpu_rate, rate_for, throughput_table
from pipeline.engine.resolve_catalog import build_catalog, place, recorded_models
from pipeline.output.ownership import ownership_warnings
from pipeline.spec import schema as S
from pipeline.spec.config import JobSpec
from pipeline.spec.duplicate_ids import SeenIds
from pipeline.spec.occurrences import Occurrences, identified_batches, needs_registry
from pipeline.spec.validate import PROBLEMS, Validator, identity_change, scheme_warning
from pipeline.storage import commit_protocol, filesystem, ownership_marker, part_files, tables
from pipeline.storage.skip_filter import CommittedIds
from pipeline.storage.units import ReadUnit, plan_units, read_unit, text_advice

# Tables up to this many rows are planned in this process; larger ones on the cluster.
LOCAL_ROWS = 200_000

TOP_REASONS = 5


@dataclass
class Reason:
    """One kind of rejection: how many rows it hit, and the first message of that kind."""

    text: str
    rows: int
    example: str


@dataclass
class Plan:
    """What a job would do. ``buckets`` count only the images still to make."""

    input_url: str
    rows: int = 0
    valid_rows: int = 0
    rejected_rows: int = 0
    reasons: list[Reason] = field(default_factory=list)
    buckets: list[Bucket] = field(default_factory=list)
    already_committed: int = 0
    num_actors: int = 1
    price_per_gpu_hour: Optional[float] = None
    warnings: list[str] = field(default_factory=list)
    checked: str = "in this process"  # where every row was validated
    skipped: list[str] = field(default_factory=list)  # files of the input folder not read, and why

    @property
    def images_to_make(self) -> int:
        return sum(b.images for b in self.buckets)

    @property
    def gpu_hours(self) -> Optional[float]:
        """Engine-actor hours over all buckets; None when any bucket has no throughput figure."""
        hours = [b.gpu_hours for b in self.buckets]
        return None if any(h is None for h in hours) else sum(hours) + self.compile_hours  # type: ignore[arg-type]

    @property
    def compile_hours(self) -> float:
        """Engine-actor hours compiling: every actor compiles each shape it makes once."""
        return sum(b.compile_seconds for b in self.buckets) * self.num_actors / 3600

    @property
    def cost(self) -> Optional[float]:
        hours = self.gpu_hours
        return None if hours is None or self.price_per_gpu_hour is None else hours * self.price_per_gpu_hour


def reason_of(message: str) -> str:
    """A rejection message without its row's own values, so alike rejections group:
    ``seed must be a whole number, got 'abc'`` -> ``seed must be a whole number``."""
    text = re.sub(r", got .*$", "", message)
    text = re.sub(r"'[^']*'", "'...'", text)
    text = re.sub(r"U\+[0-9A-F]{4,}", "U+N", text)
    return re.sub(r"\b(has|position) \d+\b", r"\1 N", text)


@dataclass
class Tally:
    """What validating some rows found: the parts of a :class:`Plan` that add up."""

    rows: int = 0
    valid_rows: int = 0
    rejected_rows: int = 0
    already_committed: int = 0
    reasons: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    buckets: dict[tuple, list[int]] = field(default_factory=dict)  # (model, w, h, steps) -> [rows, images]
    # Each distinct schema of the pass-through columns, with the first file that had it:
    # types that do not promote stop the job where they meet, so validate refuses them.
    column_types: list[tuple[str, pa.Schema]] = field(default_factory=list)

    def add(self, other: "Tally") -> None:
        """Add a later unit's tally (its examples count only for reasons new here)."""
        self.rows += other.rows
        self.valid_rows += other.valid_rows
        self.rejected_rows += other.rejected_rows
        self.already_committed += other.already_committed
        self.reasons.update(other.reasons)
        for text, example in other.examples.items():
            self.examples.setdefault(text, example)
        for key, (rows, images) in other.buckets.items():
            bucket = self.buckets.setdefault(key, [0, 0])
            bucket[0] += rows
            bucket[1] += images
        for where, schema in other.column_types:
            self.add_column_types(where, schema)

    def add_column_types(self, where: str, schema: pa.Schema) -> None:
        if all(schema != known for _, known in self.column_types):
            self.column_types.append((where, schema))


def tally_rows(validator: Validator, chunks: list, committed) -> Tally:
    """Validate raw rows as the job would and count them (``committed``: what the job skips)."""
    tally = Tally()
    for chunk in chunks:
        carried = S.passthrough_columns(validator.spec.input, chunk.column_names)
        if carried and chunk.num_rows:
            tally.add_column_types(chunk.column(S.INPUT_SOURCE)[0].as_py(), chunk.select(carried).schema)
        for raw in chunk.to_pylist():
            tally.rows += 1
            requests = validator.validate_row(raw)
            if requests[0].get(S.ERROR_STAGE):
                tally.rejected_rows += 1
                for _, message in requests[0][PROBLEMS]:
                    tally.reasons[reason_of(message)] += 1
                    tally.examples.setdefault(reason_of(message), message)
                continue
            tally.valid_rows += 1
            counted_row = False
            for request, done in zip(requests, is_committed(committed, [r[S.REQUEST_ID] for r in requests])):
                if done:
                    tally.already_committed += 1
                    continue
                bucket = tally.buckets.setdefault((request[S.MODEL], request[S.WIDTH], request[S.HEIGHT], request[S.STEPS]), [0, 0])
                bucket[1] += 1
                if not counted_row:
                    bucket[0] += 1
                    counted_row = True
    return tally


def is_committed(committed: CommittedIds, ids: list[str]) -> list[bool]:
    """Which of ``ids`` the output already holds (the job skips them): one vectorised
    lookup per chunk (asking id by id took 25 us a row, 50 times longer)."""
    return committed.contains(ids).tolist()


def make_plan(spec: JobSpec, on_cluster: Optional[bool] = None) -> Plan:
    """Plan ``spec`` without generating: the checks the job makes before any work (model
    reference, input columns; raising :class:`~pipeline.errors.ImagegenError` as the job
    would), then every row validated, with duplicate ids, in this process or on the cluster
    (``on_cluster``; by default by the table's size, see :data:`LOCAL_ROWS`). Reads the
    output only to learn what an incremental run would skip; never writes."""
    catalog = build_catalog(spec)
    skipped = tables.preflight(spec.input)
    inp = spec.input
    table = plan_units(inp)
    plan = Plan(input_url=inp.url, num_actors=spec.runtime.num_actors, price_per_gpu_hour=spec.plan.price_per_gpu_hour, skipped=skipped)
    out_fs, out_root = filesystem.open_url(spec.output.url, spec.output.storage_options)
    ownership_marker.check_output(out_fs, out_root, spec.output.url)  # the job refuses a folder it did not make
    plan.warnings += ownership_marker.card_warning(out_fs, out_root, spec.output.url)
    committed = _committed_ids(spec, plan)
    validator = Validator(spec, place(catalog, None, _recorded_models(spec, plan)))
    if on_cluster is None:
        on_cluster = table.rows is None or table.rows > LOCAL_ROWS
    tally = Tally()
    check_ownership = spec.output.mode == "incremental"  # an overwrite run owns nothing it finds
    if on_cluster:
        parts, warnings = _tally_on_cluster(spec, validator, table.units, committed, check_ownership)
        for part in parts:
            tally.add(part)
        plan.warnings += warnings
        plan.checked = f"on the Ray cluster, {len(table.units)} read task(s)"
    else:
        seen, counted = SeenIds(), Occurrences()
        for unit in table.units:
            batches = identified_batches(read_unit(inp, unit), inp, lambda ids, last: seen.register(*ids), lambda keys, last: counted.number(keys))
            for chunks, repeats in batches:
                tally.add(tally_rows(dataclasses.replace(validator, duplicates=repeats), chunks, committed))
        plan.warnings += ownership_warnings(spec) if check_ownership else []
    tables.check_column_types(tally.column_types)
    plan.warnings += text_advice(table, inp.format)
    plan.rows, plan.valid_rows, plan.rejected_rows = tally.rows, tally.valid_rows, tally.rejected_rows
    plan.already_committed = tally.already_committed
    plan.reasons = [Reason(text, n, tally.examples[text]) for text, n in tally.reasons.most_common(TOP_REASONS)]
    throughput = throughput_table(spec.plan)
    for key in sorted(tally.buckets):
        bucket = Bucket(*key, rows=tally.buckets[key][0], images=tally.buckets[key][1])
        # Throughput entries name a model by its ref; buckets by the spec's name for it.
        ref = catalog.models[bucket.model].config.ref
        bucket.rate = rate_for(throughput, ref, bucket.width, bucket.height, bucket.steps)
        if bucket.rate is None:
            bucket.rate, bucket.compile_seconds = gpu_rate(catalog.models[bucket.model], bucket, plan.num_actors)
        plan.buckets.append(bucket)
    return plan


def _tally_on_cluster(spec: JobSpec, validator: Validator, units: list[ReadUnit], committed, check_ownership: bool) -> tuple[list[Tally], list[str]]:
    """One task per read unit (each registering its ids in unit order, as the job's read
    tasks do): their tallies in unit order; and the ownership check's warnings, from a
    task of its own when ``check_ownership``."""
    import ray

    from pipeline.batch.connect import connect
    from pipeline.batch.dispatch import result
    from pipeline.batch.id_registry import start_registry

    connect(spec.runtime)
    registry = start_registry() if needs_registry(spec.input) else None
    shared, skip = ray.put(validator), ray.put(committed)
    task = ray.remote(_tally_unit).options(num_cpus=spec.runtime.task_cpus)
    try:
        ownership = ray.remote(ownership_warnings).options(num_cpus=spec.runtime.task_cpus).remote(spec) if check_ownership else None
        tallies = result([task.remote(spec, unit, shared, skip, registry) for unit in units])
        return tallies, result(ownership) if ownership is not None else []
    finally:
        if registry is not None:
            ray.kill(registry)


def _tally_unit(spec: JobSpec, unit: ReadUnit, validator: Validator, committed, registry) -> Tally:
    import ray

    tally = Tally()
    batches = itertools.count()

    def register(ids: tuple, last: bool) -> dict[str, str]:
        return ray.get(registry.register.remote(unit.seq, ids, last))

    def number(keys, last: bool):
        return ray.get(registry.number.remote(unit.seq, next(batches), keys, last))

    for chunks, repeats in identified_batches(read_unit(spec.input, unit), spec.input, register, number):
        tally.add(tally_rows(dataclasses.replace(validator, duplicates=repeats), chunks, committed))
    return tally


def _recorded_models(spec: JobSpec, plan: Plan) -> Optional[dict]:
    """The models of the output's latest run (how ``device: auto`` ran there; see
    :func:`~pipeline.engine.resolve_catalog.place`); warns when its request ids are of an older scheme."""
    if spec.output.mode == "overwrite":
        return None
    fs, root = filesystem.open_url(spec.output.url, spec.output.storage_options)
    with filesystem.storage_errors(spec.output.url, "read"):
        manifests = commit_protocol.read_manifests(fs, root)
    changed = identity_change(manifests, spec)
    if changed:
        raise SpecError(changed)  # as the job would, before any work
    older_ids = scheme_warning(manifests)
    if older_ids:
        plan.warnings.append(older_ids)
    return recorded_models(manifests)


def _committed_ids(spec: JobSpec, plan: Plan) -> CommittedIds:
    """Request ids the job would skip: those an incremental output already holds."""
    if spec.output.mode == "overwrite":
        return CommittedIds()
    fs, root = filesystem.open_url(spec.output.url, spec.output.storage_options)
    with filesystem.storage_errors(spec.output.url, "read"):
        committed = part_files.read_committed(fs, root)
    if committed.runs and spec.output.mode == "error_if_exists":
        plan.warnings.append(
            f"{spec.output.url} already holds {len(committed.runs)} run(s) and output.mode is error_if_exists: "
            "the job would refuse it; choose another output.url, or set output.mode to incremental or overwrite"
        )
        return CommittedIds()
    return committed.request_ids


def format_plan(plan: Plan, source: str) -> str:
    """The plan as the lines ``imagegen validate`` prints."""
    lines = [
        f"spec {source} is valid",
        f"input      {plan.input_url}",
        *(f"           {note}" for note in plan.skipped),
        f"rows       {plan.rows}: {plan.valid_rows} valid, {plan.rejected_rows} rejected (every row checked, {plan.checked})",
    ]
    if plan.reasons:
        lines.append("top reasons rows are rejected:")
        for reason in plan.reasons:
            lines.append(f"  {reason.rows:>7}  {reason.text}  (e.g. {reason.example!r})")
    lines.append(
        f"images     {plan.images_to_make} to make" + (f", {plan.already_committed} already in the output" if plan.already_committed else "")
    )
    if plan.buckets:
        lines.append("buckets    model / size / steps: rows, images, images/s per actor, GPU-hours")
        for b in plan.buckets:
            rate = f"{b.rate.images_per_s:.3g} ({b.rate.basis})" if b.rate else "unknown: add a plan.throughput entry"
            hours = f"{b.gpu_hours:.4g}" if b.gpu_hours is not None else "?"
            lines.append(f"  {b.model} / {b.width}x{b.height} / {b.steps} steps: {b.rows} rows, {b.images} images, {rate}, {hours}")
    hours = plan.gpu_hours
    if hours is None:
        lines.append("estimate   unknown: some buckets have no throughput figure (plan.throughput in the spec)")
    else:
        wall = hours * 3600 / plan.num_actors
        lines.append(
            f"estimate   {hours:.4g} GPU-hours (engine-actor hours), about {_duration(wall)} on {plan.num_actors} "
            "actor(s), start-up not included"
            + (f", compiling included ({plan.compile_hours:.3g} h)" if plan.compile_hours else "")
        )
        cost = plan.cost
        lines.append(f"cost       {cost:.2f} at {plan.price_per_gpu_hour:g} per GPU-hour" if cost is not None else "cost       set plan.price_per_gpu_hour to see one")
    lines += [f"warning    {w}" for w in plan.warnings]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
