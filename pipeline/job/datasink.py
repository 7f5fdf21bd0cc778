"""The write side of the batch job: a Ray Data datasink that writes each block as atomic
parts (:mod:`pipeline.storage.sink`), then the run manifest and the dataset card; and
preparing the output (``output.mode``) before a run."""

from __future__ import annotations

import logging
import time
from typing import Any, Iterable, Optional

import pyarrow as pa
from ray.data.block import BlockAccessor
from ray.data.datasource import Datasink
from ray.data.datasource.datasink import WriteResult

from pipeline.errors import ImagegenError
from pipeline.job.actors import final_counts
from pipeline.output import card
from pipeline.spec.catalog import Catalog
from pipeline.spec.config import JobSpec
from pipeline.storage import filesystem, sink

log = logging.getLogger(__name__)


class DatasetSink(Datasink[sink.WriteReport]):
    """Writes each block as atomic parts; on completion writes the run manifest, then
    regenerates the dataset card (README.md) over all the output's runs."""

    def __init__(self, spec: JobSpec, run_id: str, catalog: Catalog, started: float, counter: Any):
        self._output = spec.output
        self._spec = spec
        self._run_id = run_id
        self._catalog = catalog
        self._started = started
        self._counter = counter
        self.report: sink.WriteReport | None = None

    def write(self, blocks: Iterable[pa.Table], ctx: Any) -> sink.WriteReport:
        fs, root = filesystem.open_url(self._output.url, self._output.storage_options)
        report = sink.WriteReport()
        for block in blocks:
            table = BlockAccessor.for_block(block).to_arrow()
            if table.num_rows:
                report.add(sink.write_block(fs, root, self._run_id, table))
        return report

    def on_write_complete(self, write_result: WriteResult[sink.WriteReport]) -> None:
        report = sink.WriteReport()
        for part in write_result.write_returns:
            report.add(part)
        finished = time.time()
        counts = final_counts(self._counter)
        fs, root = filesystem.open_url(self._output.url, self._output.storage_options)
        sink.write_manifest(
            fs,
            root,
            self._run_id,
            {
                "run_id": self._run_id,
                "status": "complete",
                "started_at": self._started,
                "finished_at": finished,
                "wall_seconds": finished - self._started,
                "spec": self._spec.redacted(),
                "spec_fingerprint": self._spec.fingerprint(),
                "model_fingerprint": self._catalog.models[self._catalog.default_model].fingerprint,
                "models": {
                    name: {
                        "ref": m.config.ref,
                        "fingerprint": m.fingerprint,
                        "family": m.family.name,
                        "pipeline_class": m.pipeline_class,
                        # flag | error | off, and whether the model ships a checker (null: unknown)
                        "safety_checker": m.config.safety_checker,
                        "has_safety_checker": m.has_safety_checker,
                    }
                    for name, m in self._catalog.models.items()
                },
                "scoring": _scoring(self._catalog, counts),
                "loras": {name: {"url": a.config.url, "digest": a.digest} for name, a in self._catalog.loras.items()},
                "versions": sink.library_versions(),
                "counts": {
                    "input_rows": report.input_rows,
                    "images": report.images,
                    "errors": report.errors,
                    "errors_by_stage": report.errors_by_stage,
                    "model_loads": counts.model_loads,
                    "model_swaps": counts.model_swaps,
                },
                "parts": sorted(report.parts, key=lambda p: p["path"]),
            },
        )
        card.write_card(fs, root)
        self.report = report


def _scoring(catalog: Catalog, counts) -> Optional[dict[str, Any]]:
    """The manifest's record of the CLIP scorer: what made ``clip_score`` and what it cost."""
    if catalog.scorer is None:
        return None
    return {"ref": catalog.scorer.config.ref, "fingerprint": catalog.scorer.fingerprint, "seconds": counts.scoring_seconds}


def prepare_output(spec: JobSpec) -> sink.Committed:
    """Apply ``output.mode`` and return what earlier runs committed there."""
    fs, root = filesystem.open_url(spec.output.url, spec.output.storage_options)
    with filesystem.storage_errors(spec.output.url, "prepare"):
        if spec.output.mode == "overwrite":
            sink.clear_output(fs, root)
        committed = sink.read_committed(fs, root)
        if committed.runs and spec.output.mode == "error_if_exists":
            raise ImagegenError(
                f"{spec.output.url} already holds {len(committed.runs)} run(s) and output.mode is error_if_exists; "
                "choose another output.url, or set output.mode to incremental or overwrite"
            )
        removed = sink.remove_uncommitted(fs, root, committed)
    if removed:
        log.warning("removed %d part(s) left uncommitted by an interrupted run", len(removed))
    return committed
