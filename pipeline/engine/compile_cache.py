"""The shared store of ``torch.compile`` artifacts: what one engine compiled, every other
engine (another actor, another node, a later run) loads instead of compiling again.

An engine that compiled a new graph saves the process's artifacts
(``torch.compiler.save_cache_artifacts()``: inductor's FX graphs and AOT-autograd entries,
with the Triton kernels bundled into them on CUDA) as one file per process under
:func:`location`; an engine starting with ``compile`` loads every file there
(``torch.compiler.load_cache_artifacts``) into its local inductor cache, so its first call
at a shape finds the graph there (an FX-graph cache hit) instead of compiling it.

Trade-offs worth knowing:

- **Scoped by model and torch, guarded by inductor.** The folder's name is a digest of the
  model reference, revision, dtype and torch version: engines of the same model share it.
  Whether a stored graph fits a call (device, shapes, options) is decided by inductor's own
  cache keys, so a file made on another GPU model or with other options is loaded and
  simply never hit.
- **On CPU a hit still builds C++.** Inductor's CPU kernels are C++ compiled into shared
  libraries on the machine that runs them; the artifacts carry their source, not the
  libraries, so a CPU engine on a new machine skips tracing and code generation but still
  runs the C++ compiler. Actors of one node share the libraries through the node's
  ``model.cache_dir``/inductor.
- **The driver sees the store it can reach.** ``compile: auto`` counts a warm store from the
  driver (:func:`is_warm`): with the default store (``model.cache_dir``/compiled, local to
  each node) a driver on another node sees it cold and decides as for an empty cache;
  ``compile_cache_url`` on object storage is the same store for all.
- **Engines starting together each compile.** The store shares what is finished; engines
  that reach a new shape at the same moment (a job's first minute) compile it side by side.
  Restarted actors, later shapes reached after the first save, and later runs load.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from importlib import metadata
from typing import Any, Optional

from pipeline.errors import ImagegenError
from pipeline.storage import filesystem

log = logging.getLogger(__name__)

ARTIFACT_SUFFIX = ".artifacts"


def location(config) -> tuple[str, dict[str, Any]]:
    """``(URL, storage options)`` of the store folder for ``config`` (a ModelConfig):
    ``engine.compile_cache_url`` (object storage shared by every node; reached with
    ``model.storage_options``), else ``model.cache_dir``/compiled on this node."""
    base = config.engine.compile_cache_url or os.path.join(config.cache_dir, "compiled")
    scope = "\0".join([config.ref, config.revision, config.dtype, metadata.version("torch")])
    options = config.storage_options if config.engine.compile_cache_url else {}
    return filesystem.join(base, hashlib.sha256(scope.encode()).hexdigest()[:16]), options


def is_warm(config) -> bool:
    """Whether the store holds artifacts for ``config``'s model: what the driver's
    ``compile: auto`` decision counts as a warm cache. False when it cannot be read."""
    url, options = location(config)
    try:
        fs, root = filesystem.open_url(url, options)
        return bool(_artifacts(fs, root))
    except (OSError, ImagegenError):  # an unreadable store is a cold one
        return False


def _artifacts(fs, root: str) -> list[str]:
    """The store's artifact files, sorted; none when the folder does not exist yet."""
    with filesystem.storage_errors(root, "read"):
        return sorted(p for p in fs.find(root) if p.endswith(ARTIFACT_SUFFIX)) if fs.isdir(root) else []


def load(config) -> int:
    """Load every artifact file of ``config``'s store into this process's compile caches;
    returns how many files were loaded. A file that cannot be read is skipped (logged):
    the engine compiles instead."""
    import torch

    url, options = location(config)
    loaded = 0
    try:
        fs, root = filesystem.open_url(url, options)
        names = _artifacts(fs, root)
    except (OSError, ImagegenError) as exc:  # no store yet, or unreachable: compile
        log.info("torch.compile: no shared artifacts read from %s (%s)", url, exc)
        return 0
    for name in names:
        try:
            torch.compiler.load_cache_artifacts(filesystem.read_bytes(fs, name))
            loaded += 1
        except Exception as exc:  # noqa: BLE001 - a damaged or foreign file: compile instead
            log.warning("torch.compile: skipped shared artifacts %s (%s: %s)", name, type(exc).__name__, exc)
    log.info("torch.compile: loaded %d shared artifact file(s) from %s", loaded, url)
    return loaded


def save(config) -> Optional[str]:
    """Write this process's compile artifacts into ``config``'s store, one file per process
    (rewritten: torch's serialisation holds everything compiled so far). Returns its path,
    None when there was nothing to save or the write failed (logged: the next engine
    compiles, no image is lost)."""
    import torch

    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return None
    url, options = location(config)
    try:
        fs, root = filesystem.open_url(url, options)
        path = filesystem.join(root, f"{socket.gethostname()}-{os.getpid()}{ARTIFACT_SUFFIX}")
        filesystem.atomic_write(fs, path, saved[0])
    except Exception as exc:  # noqa: BLE001 - sharing is an optimisation
        log.warning("torch.compile: could not share compiled artifacts in %s (%s: %s)", url, type(exc).__name__, exc)
        return None
    log.info("torch.compile: shared %d bytes of compiled artifacts in %s", len(saved[0]), path)
    return path
