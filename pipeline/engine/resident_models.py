"""The engines one actor keeps resident: loaded on first use, least recently used out first.

A job with several models gives each engine actor a :class:`ModelCache`. Loading a model
is the slowest thing an actor does (seconds to minutes for real weights), so the cache
keeps every model that fits in its memory budget and evicts the least recently used
only when the next one would not fit. Rows reach actors sorted by model (see
:func:`pipeline.spec.bucketing.order_for_engine`), so an actor whose budget holds fewer models
than the job uses still swaps rarely; ``swaps`` counts the loads that had to evict.

Knows nothing of Ray. The size of a model before loading is estimated from its weight
files (an upper bound when the files are float32 and the engine runs float16); once
loaded, its resident size is measured from its tensors.
"""

from __future__ import annotations

import gc
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

from pipeline.engine.kernels import is_out_of_memory
from pipeline.spec.catalog import Catalog, ModelEntry

log = logging.getLogger(__name__)

# Without a budget in the spec: this share of the device's memory (GPU memory on CUDA, RAM
# on CPU) holds resident models; the rest is left to activations, which grow with batch size.
DEFAULT_BUDGET_SHARE = 0.5


@dataclass(frozen=True)
class CacheStats:
    """Loads (first loads and reloads) and swaps (loads that evicted a model)."""

    loads: int = 0
    swaps: int = 0


class ModelCache:
    """Engines by model name within ``budget_bytes``.

    ``load(entry)`` builds an engine (by default :class:`pipeline.engine.engine.Engine` of the
    entry's config, with the catalog's adapters); ``size(engine)`` is its resident bytes.
    A model that fails to load is remembered, and its rows fail with the same error,
    instead of being retried batch after batch.
    """

    def __init__(
        self,
        catalog: Catalog,
        budget_bytes: int,
        load: Optional[Callable[[ModelEntry], object]] = None,
        size: Optional[Callable[[object], int]] = None,
    ):
        self.catalog = catalog
        self.budget_bytes = budget_bytes
        self._load = load or _load_engine(catalog)
        self._size = size or resident_bytes
        self._engines: OrderedDict[str, tuple[object, int]] = OrderedDict()
        self._failed: dict[str, Exception] = {}
        self.stats = CacheStats()

    @property
    def resident(self) -> list[str]:
        """Names of the loaded models, least recently used first."""
        return list(self._engines)

    def get(self, name: str):
        """The engine of model ``name``, loading it (and evicting others) when needed.
        Raises the model's load error, the same one each time it is asked for."""
        if name in self._engines:
            self._engines.move_to_end(name)
            return self._engines[name][0]
        if name in self._failed:
            raise self._failed[name]
        entry = self.catalog.models[name]
        evicted = self._make_room(estimated_bytes(entry))
        try:
            engine = self._load_with_retry(entry)
        except Exception as exc:  # noqa: BLE001 - kept and re-raised for this model's rows
            self._failed[name] = exc
            raise
        self._engines[name] = (engine, self._size(engine))
        self.stats = CacheStats(self.stats.loads + 1, self.stats.swaps + (1 if evicted else 0))
        log.info("loaded model %s (%.0f MB resident; cache holds %s)", name, self._engines[name][1] / 1e6, self.resident)
        return engine

    def _load_with_retry(self, entry: ModelEntry):
        try:
            return self._load(entry)
        except Exception as exc:  # noqa: BLE001
            # Out of memory with others resident: the estimate was short; free them all and retry once.
            if not (is_out_of_memory(exc) and self._engines):
                raise
            log.warning("out of memory loading model %s; evicting %s and retrying", entry.name, self.resident)
            self._evict(len(self._engines))
            return self._load(entry)

    def _make_room(self, needed: int) -> bool:
        """Evict least recently used engines until ``needed`` more bytes fit (one model is
        always allowed, whatever its size). True if anything was evicted."""
        count = 0
        used = sum(size for _, size in self._engines.values())
        for _, size in self._engines.values():
            if used + needed <= self.budget_bytes:
                break
            used -= size
            count += 1
        self._evict(count)
        return count > 0

    def _evict(self, count: int) -> None:
        for _ in range(count):
            name, _ = self._engines.popitem(last=False)
            log.info("evicted model %s from the cache", name)
        if count:
            _free_memory()


def estimated_bytes(entry: ModelEntry) -> int:
    """The model's weight files' total size: what loading it will take, roughly. Zero
    when the files are not local yet (a hub model before its first download)."""
    from pipeline.engine import weight_sources

    try:
        location = weight_sources.materialize(entry.config)
    except Exception:  # noqa: BLE001 - the load itself will report the problem
        return 0
    if not os.path.isdir(location):
        return 0
    total = 0
    for folder, _, files in os.walk(location):
        total += sum(os.path.getsize(os.path.join(folder, f)) for f in files if f.endswith((".safetensors", ".bin")))
    return total


def resident_bytes(engine) -> int:
    """Bytes of every parameter and buffer of the engine's pipeline components."""
    import torch

    seen, total = set(), 0
    for component in engine.pipe.components.values():
        if not isinstance(component, torch.nn.Module):
            continue
        for tensor in (*component.parameters(), *component.buffers()):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


def default_budget(device: str) -> int:
    """:data:`DEFAULT_BUDGET_SHARE` of the device's memory."""
    if device == "cuda":
        import torch

        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    else:
        import psutil

        total = psutil.virtual_memory().total
    return int(total * DEFAULT_BUDGET_SHARE)


def _load_engine(catalog: Catalog) -> Callable[[ModelEntry], object]:
    def load(entry: ModelEntry):
        from pipeline.engine.engine import Engine

        return Engine(entry.loading_config(), adapters=catalog.by_digest())

    return load


def _free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
