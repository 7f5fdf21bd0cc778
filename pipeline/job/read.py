"""The read side of the batch job on Ray Data: prompt-table files -> raw rows numbered
within their file -> validated request blocks, sorted for the engine.

Validation runs in the read tasks (fused), so bad rows never reach a GPU; each validated
block is sorted by model, adapter and bucket (:func:`~pipeline.spec.batching.order_for_engine`).
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

import pyarrow as pa
import ray
from ray.data.datasource import FileBasedDatasource

from pipeline.job import progress
from pipeline.spec.batching import order_for_engine
from pipeline.spec.config import JobSpec
from pipeline.spec.validate import Validator
from pipeline.storage import filesystem, tables

log = logging.getLogger(__name__)


class PromptTableDatasource(FileBasedDatasource):
    """Prompt-table files -> raw rows numbered within their file (see :mod:`pipeline.storage.tables`)."""

    def __init__(self, paths: list[str], fmt: str, base: str, **kwargs: Any):
        super().__init__(paths, **kwargs)
        self._format = fmt
        self._base = base

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        yield from tables.read_file(f, self._format, filesystem.relative_name(path, self._base))


def read_requests(spec: JobSpec, validator: Validator, counter: Any) -> ray.data.Dataset:
    fs, base, files = filesystem.list_table(spec.input.url, spec.input.storage_options)
    datasource = PromptTableDatasource(files, spec.input.format, base, filesystem=filesystem.arrow_filesystem(fs))
    task_cpus = {"num_cpus": spec.runtime.task_cpus}
    # One block per file chunk (tables.CHUNK_ROWS rows): Ray Data would otherwise split a
    # few files' blocks finer for parallelism, and each validated block is sorted by model
    # and bucket (order_for_engine) only within itself: bigger blocks, longer same-model runs.
    ds = ray.data.read_datasource(datasource, override_num_blocks=len(files), **task_cpus)
    kwargs = {"validator": validator, "counter": counter}
    return ds.map_batches(validate_counting, fn_kwargs=kwargs, batch_format="pyarrow", batch_size=None, zero_copy_batch=True, **task_cpus)




def validate_counting(table: pa.Table, validator: Validator, counter: Any) -> pa.Table:
    """Validation that also reports rows skipped as already committed (and the requests
    among them adopted from an interrupted run); the block leaves sorted for the engine
    (by model, adapter and bucket: see :func:`order_for_engine`)."""
    requests, skipped_ids = validator.validate_table_skipping(table)
    adopted = validator.skip.adopted(skipped_ids) if validator.skip is not None and len(skipped_ids) else 0
    counter.add.remote(skipped=progress.skipped(table, requests), adopted=adopted)
    return order_for_engine(requests)
