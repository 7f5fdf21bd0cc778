"""The skip filter, shared: put into Ray's object store once, read zero-copy by every task.

A rerun skips the request ids its output already holds. They are held as sorted 16-byte
keys (:class:`~pipeline.storage.skip_filter.CommittedIds`, 16 bytes an id); this wrapper
pickles as two object refs, so a validation task receives a few bytes and maps the arrays
from the node's shared memory on first use, instead of a copy of a Python set per task.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import ray

from pipeline.storage.skip_filter import CommittedIds, SkipFilter


class SharedSkipFilter(SkipFilter):
    """A :class:`SkipFilter` whose arrays live in the object store: ``committed`` and
    ``adoptable`` are refs to its sorted arrays (keys, and 8-byte prefixes; the job's are returns of its
    prepare task, so the driver never holds them), ``size`` the committed count. Pass it
    anywhere, e.g. as a Validator's ``skip``; it reads the arrays where first used."""

    def __init__(self, committed: ray.ObjectRef, adoptable: ray.ObjectRef, size: int):
        super().__init__()
        self.committed = self.adoptable = None  # type: ignore[assignment]
        self._refs = (committed, adoptable)
        self._size = size

    @classmethod
    def put(cls, skip: SkipFilter) -> "SharedSkipFilter":
        """``skip``'s arrays put into the object store (one ``ray.put`` each)."""
        return cls(ray.put(skip.committed.keys), ray.put(skip.adoptable), len(skip))

    def __getstate__(self) -> dict[str, Any]:
        return {"_refs": self._refs, "_size": self._size}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.committed: Optional[CommittedIds] = None  # type: ignore[assignment]
        self.adoptable: Optional[np.ndarray] = None  # type: ignore[assignment]

    def _resolve(self) -> None:
        if self.committed is None:
            committed, adoptable = ray.get(list(self._refs))  # zero-copy, read-only views
            self.committed = CommittedIds(committed, sorted_unique=True)
            self.adoptable = adoptable

    def contains(self, ids: Any) -> np.ndarray:
        self._resolve()
        return super().contains(ids)

    def adopted(self, ids: Any) -> int:
        self._resolve()
        return super().adopted(ids)

    def __len__(self) -> int:
        return self._size
