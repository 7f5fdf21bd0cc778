"""The write side of the batch job: the output writer that part write tasks call to write
each slice of generated rows as atomic parts and commit it with a record at once (:mod:`pipeline.storage.part_files`); the folding of
those records as the run goes (:class:`RecordFolder`); at the end, the run manifest and
the dataset card. And
preparing the output before a run: ``output.mode``, adopting what interrupted runs
committed, removing what they left half-done (:func:`prepare_output`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

import pyarrow as pa
import ray

from pipeline.errors import ImagegenError, SpecError
from pipeline.batch.engine_actors import final_counts
from pipeline.batch.dispatch import result
from pipeline.output import card
from pipeline.spec.catalog import Catalog, ModelEntry
from pipeline.spec.config import JobSpec, OutputConfig
from pipeline.spec.validate import REQUEST_ID_SCHEME, identity_change, scheme_warning
from pipeline.storage import commit_protocol, dataset_schema, filesystem, fold, lock, ownership_marker, part_files, repair, skip_filter, supersede, trash


class OutputWriter:
    """Writes generated rows as atomic parts (:meth:`write`, in the part write tasks); once
    every write returned, the run manifest, then the dataset card (README.md) over all the
    output's runs (:meth:`finish`, on the driver). Plain data: pickled to the write tasks
    once, by ref."""

    def __init__(self, spec: JobSpec, run_id: str, catalog: Catalog, started: float, counter: Any, prepared: Optional["Prepared"] = None):
        self._prepared = prepared or Prepared()
        self._output = spec.output
        self._spec = spec
        self._run_id = run_id
        self._catalog = catalog
        self._started = started
        self._counter = counter
        self.report: part_files.WriteReport | None = None

    def write(self, table: pa.Table) -> part_files.WriteReport:
        """Write ``table``'s rows as parts and their commit record; an empty table writes nothing."""
        fs, root = filesystem.open_url(self._output.url, self._output.storage_options)
        report = part_files.WriteReport()
        if table.num_rows:
            lock.check_lease(fs, root, self._run_id, self._output.url)  # no part after a lost lease
            report.add(part_files.write_block(fs, root, self._run_id, table))
        return report

    def finish(self, report: part_files.WriteReport, registry: Any = None) -> None:
        """The run's end, given the sum of every write's report: leftovers of retried writes
        go, then the manifest, the superseded error rows and the card. ``registry`` (the
        job's id registry, every unit read) says which error rows' content ids are gone
        from the input (content identity: their rows were edited or removed)."""
        finished = time.time()
        counts = final_counts(self._counter)
        fs, root = filesystem.open_url(self._output.url, self._output.storage_options)
        lock.check_lease(fs, root, self._run_id, self._output.url)  # a run that lost its lease removes nothing
        # The records are folded (RecordFolder); the first attempts of retried writes go.
        fold.remove_leftovers(fs, root, self._run_id, set(report.records))
        prepared = self._prepared
        part_files.write_manifest(
            fs,
            root,
            self._run_id,
            {
                "run_id": self._run_id,
                "adopted": {"requests": counts.adopted, "from_runs": prepared.interrupted},
                "recovery": prepared.recovery.as_dict(),
                "status": "complete",
                "started_at": self._started,
                "finished_at": finished,
                "wall_seconds": finished - self._started,
                "spec": self._spec.redacted(),
                "spec_fingerprint": self._spec.fingerprint(),
                "model_fingerprint": self._catalog.models[self._catalog.default_model].fingerprint,
                "models": model_details(self._catalog),
                "request_id_scheme": REQUEST_ID_SCHEME,
                "scoring": _scoring(self._catalog, counts),
                "loras": {name: {"url": a.config.url, "digest": a.digest} for name, a in self._catalog.loras.items()},
                "versions": part_files.library_versions(),
                "counts": {
                    "input_rows": report.input_rows,
                    "images": report.images,
                    "errors": report.errors,
                    "errors_by_stage": report.errors_by_stage,
                    "model_loads": counts.model_loads,
                    "model_swaps": counts.model_swaps,
                    "compile_seconds": counts.compile_seconds,
                    "compiles": counts.compiles,
                    "compiles_from_cache": counts.compiles_from_cache,
                },
                "parts": sorted(report.parts, key=lambda p: p["path"]),
                "schemas": dataset_schema.promote(fs, root, commit_protocol.read_manifests(fs, root), report.parts),
            },
        )
        # Retried and fixed rows leave errors/. A task: with error parts present it reads the
        # output's commit records (16 bytes an image), which the driver must not hold.
        gone = registry if not self._spec.input.id_column and self._spec.input.identity == "content" else None
        result(superseding.options(num_cpus=self._spec.runtime.task_cpus).remote(self._output, self._run_id, gone))
        lock.check_lease(fs, root, self._run_id, self._output.url)  # the card replaces README.md
        card.write_card(fs, root)
        self.report = report


class RecordFolder:
    """Folds the run's block records as its writes complete, :data:`~pipeline.storage.fold.FOLD_IDS`
    request ids at a time, each fold a task: a long run's records stay few and small, and
    the driver holds record names, never request ids (folding a 10M-image run at its end
    on the driver took its peak memory from 270 to 590 MB)."""

    def __init__(self, spec: JobSpec, run_id: str):
        self._output, self._run_id = spec.output, run_id
        self._task = fold_records.options(num_cpus=spec.runtime.task_cpus)
        self._groups = fold.FoldGroups()
        self._folds: list[Any] = []

    def add(self, report: part_files.WriteReport) -> None:
        """One write's report: its records join the group being gathered."""
        self._fold(self._groups.add(report.records, report.images + report.errors))

    def finish(self) -> None:
        """Fold what is left and wait for every fold; raises what a fold raised."""
        self._fold(self._groups.rest())
        result(self._folds)

    def _fold(self, names: list[str]) -> None:
        if names:
            self._folds.append(self._task.remote(self._output, self._run_id, names))


@ray.remote
def superseding(output: OutputConfig, run_id: str, registry: Any = None) -> None:
    """The end-of-run task that removes superseded error rows (:mod:`pipeline.storage.supersede`),
    and with ``registry`` those of rows no longer in the input; each rewrite after a check
    that run ``run_id`` still holds the lease."""
    fs, root = filesystem.open_url(output.url, output.storage_options)
    gone = (lambda ids: ray.get(registry.absent.remote(ids))) if registry is not None else None
    with filesystem.storage_errors(output.url, "write"):
        supersede.supersede_errors(fs, root, gone, check=lambda: lock.check_lease(fs, root, run_id, output.url))


@ray.remote
def fold_records(output: OutputConfig, run_id: str, names: list[str]) -> None:
    """A fold task: the block records ``names`` become one compacted record. Ray may retry
    it (a worker lost part-way): :func:`~pipeline.storage.fold.compact` is idempotent."""
    fs, root = filesystem.open_url(output.url, output.storage_options)
    with filesystem.storage_errors(output.url, "write"):
        lock.check_lease(fs, root, run_id, output.url)  # a run that lost its lease folds nothing
        fold.compact(fs, root, run_id, names)


def model_details(catalog: Catalog) -> dict[str, dict[str, Any]]:
    """What a manifest records of each model a run uses."""
    return {name: model_record(m) for name, m in catalog.models.items()}


def model_record(m: ModelEntry) -> dict[str, Any]:
    """What a manifest records of one model: how it was resolved and run."""
    return {
        "ref": m.config.ref,
        "fingerprint": m.fingerprint,
        "family": m.family.name,
        "pipeline_class": m.pipeline_class,
        "dtype": m.config.dtype,
        "device": m.config.device,
        **({"revision": m.config.revision, "commit": m.commit} if m.commit else {}),
        # flag | error | off, and whether the model ships a checker (null: unknown)
        "safety_checker": m.config.safety_checker,
        "has_safety_checker": m.has_safety_checker,
        # How the engine ran it (speed options, resolved for the device): within their
        # measured tolerance of the plain path, not bit-identical (README, "Engine options").
        "engine": m.config.engine.model_dump(mode="json"),
    }


def _scoring(catalog: Catalog, counts) -> Optional[dict[str, Any]]:
    """The manifest's record of the CLIP scorer: what made ``clip_score`` and what it cost."""
    if catalog.scorer is None:
        return None
    return {"ref": catalog.scorer.config.ref, "fingerprint": catalog.scorer.fingerprint, "seconds": counts.scoring_seconds}


@dataclass
class Prepared:
    """What :func:`prepare_output` found and did: the interrupted runs whose committed parts
    this run adopts, what it removed, and the warnings for the user. The ids the run skips
    travel apart (a :class:`~pipeline.storage.skip_filter.SkipFilter`): 16 bytes an image."""

    interrupted: list[str] = field(default_factory=list)
    recovery: repair.Recovery = field(default_factory=repair.Recovery)
    warnings: list[str] = field(default_factory=list)
    committed: int = 0  # the ids the skip filter holds


def prepare_output(spec: JobSpec, run_id: str = "", started: float = 0.0, catalog: Optional[Catalog] = None) -> tuple[Prepared, skip_filter.SkipFilter]:
    """Apply ``output.mode``; adopt what earlier runs committed (see
    :mod:`pipeline.storage.commit_protocol`): remove parts without a record, records whose parts are
    damaged or that a retried write superseded; mark runs that never finished as
    interrupted; then write this run's "running" manifest. Returns what it did, and the ids
    the run skips. The caller holds the lock.

    It reads every commit record of the output: ~24 bytes an image at its peak (a 10M-image
    output took a driver from 280 to 640 MB; see BENCHMARKS.md), so the job runs it as a task
    (:func:`preparing`); warnings are returned, not logged, for the caller to log."""
    fs, root = filesystem.open_url(spec.output.url, spec.output.storage_options)
    ownership_marker.check_output(fs, root, spec.output.url)  # nothing removed or replaced that is not ours
    with filesystem.storage_errors(spec.output.url, "read"):
        changed = identity_change(commit_protocol.read_manifests(fs, root), spec)
    if changed:
        raise SpecError(changed)
    with filesystem.storage_errors(spec.output.url, "prepare"):
        if run_id:
            ownership_marker.mark_output(fs, root)
        if spec.output.mode == "overwrite":
            part_files.clear_output(fs, root)
        found = commit_protocol.read_commits(fs, root)
        manifests = commit_protocol.read_manifests(fs, root)
        runs = {m.get("run_id") for m in manifests} | set(found.runs())
        if runs and spec.output.mode == "error_if_exists":
            raise ImagegenError(
                f"{spec.output.url} already holds {len(runs)} run(s) and output.mode is error_if_exists; "
                "choose another output.url, or set output.mode to incremental or overwrite"
            )
        if run_id:  # the repair deletes: only under a live lease
            lock.check_lease(fs, root, run_id, spec.output.url)
        recovery = repair.repair(fs, root, found)
        purged = trash.purge(fs, root, older_than_s=spec.output.retention_hours * 3600)
        older_ids = scheme_warning(manifests) if spec.output.mode == "incremental" else None
        interrupted = part_files.interrupted_runs(manifests, found)
        if interrupted:
            part_files.adopt_interrupted(fs, root, found, interrupted, adopted_by=run_id)
            for run in interrupted:  # their block records are folded, as a finished run's
                groups = fold.FoldGroups()
                for record in (r for r in found.records if r.run_id == run and not r.compacted):
                    fold.compact(fs, root, run, groups.add([record.name], sum(p.rows for p in record.parts)))
                fold.compact(fs, root, run, groups.rest())
        if run_id:
            start = part_files.start_manifest(run_id, started, spec.redacted(), spec.fingerprint())
            # The scheme from the start: a run that crashes must not read as one from before it.
            start["request_id_scheme"] = REQUEST_ID_SCHEME
            if catalog is not None:
                start.update(models=model_details(catalog), model_fingerprint=catalog.models[catalog.default_model].fingerprint)
            part_files.write_manifest(fs, root, run_id, start)
    warnings = [f"{spec.output.url}: {older_ids}"] if older_ids else []
    warnings += ownership_marker.card_warning(fs, root, spec.output.url)
    if recovery.removed_parts:
        warnings.append(
            f"set aside {len(recovery.removed_parts)} part(s) without a commit record, left by an interrupted run "
            f"({trash.TRASH_DIR}/, deleted after output.retention_hours)"
        )
    warnings += [f"dropped commit record {name}: {why}; its rows are made again" for name, why in recovery.dropped_records]
    warnings += [f"part {path} is damaged: {why}; its rows are made again" for path, why in recovery.damaged_parts]
    if purged:
        warnings.append(f"deleted {len(purged)} file(s) set aside more than output.retention_hours ago ({trash.TRASH_DIR}/)")
    if interrupted:
        warnings.append(f"adopting what interrupted run(s) {', '.join(interrupted)} committed")
    skip = found.skip_filter(interrupted, release=True)
    return Prepared(interrupted, recovery, warnings, committed=len(skip)), skip


@ray.remote(num_returns=3)
def preparing(spec: JobSpec, run_id: str, started: float, catalog: Catalog) -> tuple[Prepared, Any, Any]:
    """:func:`prepare_output` as a task: what it did, then the skip filter's two sorted
    arrays (committed keys, adoptable prefixes) as returns of their own. Those stay in the object store,
    owned by the caller, who hands their refs to the read tasks and never reads them."""
    prepared, skip = prepare_output(spec, run_id, started, catalog)
    return prepared, skip.committed.keys, skip.adoptable
