"""Model references: what ``model.ref`` names, its fingerprint, and a loadable location.

Four kinds, all ending in the same ``from_pretrained`` call:

- ``tiny`` (also ``tiny-sdxl``, ``tiny-sd3``, ``tiny-flux``): a random-weight pipeline
  of :mod:`pipeline.engine.tiny_models`, built into the cache;
- a local diffusers folder;
- a remote prefix (``s3://bucket/prefix/`` or any fsspec URL), copied once into the cache;
- a Hugging Face hub id (``org/name``), at ``model.revision``.

The fingerprint goes into every request id, so it must change whenever the weights do:
file digests for a local folder, the store's listing (names, sizes, ETags) for a remote
prefix, id and the commit hash ``model.revision`` resolves to for the hub (a branch such as
``main`` moves; see :func:`hub_commit`), the builder version for ``tiny``. It is computed
on the driver without torch.

The same four kinds name the CLIP scorer (``scoring.ref``): every function takes the
:class:`WeightsKind` a ref is read as, :data:`PIPELINE` unless said otherwise.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from typing import Callable, Literal, Mapping, Union

from pipeline.engine.tiny_models import TINY_MODELS, ensure_tiny
from pipeline.errors import ModelError
from pipeline.spec.model_config import ModelConfig, ScoringConfig
from pipeline.storage import filesystem

# What names weights: ref, revision, storage_options and cache_dir (and allow_pickle for a pipeline).
WeightsConfig = Union[ModelConfig, ScoringConfig]


@dataclass(frozen=True)
class WeightsKind:
    """What a ref names: the spec field it comes from, the file that marks a saved folder of
    this kind, the tiny random-weight ones (name -> builder version) and how one is built
    into a cache folder (``build_tiny(cache_dir, name) -> folder``)."""

    field: str
    marker: str
    saved_by: str  # how such a folder is made, for messages
    tiny: Mapping[str, str]
    build_tiny: Callable[[str, str], str]


PIPELINE = WeightsKind("model.ref", "model_index.json", "a diffusers pipeline saved with save_pretrained", TINY_MODELS, ensure_tiny)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelRef:
    kind: Literal["tiny", "local", "remote", "hub"]
    location: str


def parse_ref(ref: str, kind: WeightsKind = PIPELINE) -> ModelRef:
    """Classify ``model.ref`` (or the ref of ``kind``); raise :class:`ModelError` saying
    which forms are accepted."""
    if ref in kind.tiny:
        return ModelRef("tiny", ref)
    if "://" in ref and not ref.startswith("file://"):
        return ModelRef("remote", ref.rstrip("/"))
    path = os.path.abspath(os.path.expanduser(ref.removeprefix("file://")))
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, kind.marker)):
            raise ModelError(f"{kind.field} {ref!r} is a folder without {kind.marker}; point it at {kind.saved_by}")
        return ModelRef("local", path)
    if _HUB_ID.match(ref) and not ref.startswith((".", "/", "~")):
        return ModelRef("hub", ref)
    raise ModelError(
        f"{kind.field} {ref!r} is not a tiny model ({', '.join(kind.tiny)}), an existing local folder, an s3:// prefix, or a hub id like 'org/name'; "
        f"check the path (relative paths are taken from the working directory), or set {kind.field} to one of those"
    )


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_weights_format(config: WeightsConfig, kind: WeightsKind = PIPELINE) -> None:
    """Refuse a local folder whose weights are pickles unless ``model.allow_pickle`` is set
    (a kind without that field, the scorer, never allows them): unpickling runs code from
    the file. Checked on the driver, before any actor loads it."""
    ref = parse_ref(config.ref, kind)
    if ref.kind != "local" or getattr(config, "allow_pickle", False):
        return
    files = _files_below(ref.location)
    safe_folders = {os.path.dirname(f) for f in files if f.endswith(".safetensors")}
    pickled = [f for f in files if f.endswith(_PICKLE_SUFFIXES) and os.path.dirname(f) not in safe_folders]
    if pickled:
        raise ModelError(
            f"{kind.field} {config.ref!r} holds pickle weights ({', '.join(pickled[:3])}), which can run code when loaded; convert them to safetensors"
            + (", or set model.allow_pickle: true if you trust their source" if hasattr(config, "allow_pickle") else "")
        )


_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def hub_commit(repo: str, revision: str) -> str:
    """The commit hash ``revision`` (a branch, tag or hash) of hub model ``repo`` names now.

    Asked of the hub first (one request, 10 s at most; skipped under ``HF_HUB_OFFLINE``),
    then read from the local hub cache (``refs/<revision>``, what huggingface_hub wrote
    when it last downloaded that revision): a driver without network access resolves what
    this machine would load. Raises :class:`ModelError` when neither knows it."""
    if _COMMIT.match(revision):
        return revision
    from huggingface_hub import HfApi, constants
    from huggingface_hub.file_download import repo_folder_name

    asked = ""
    if not constants.HF_HUB_OFFLINE:
        try:
            sha = HfApi().model_info(repo, revision=revision, timeout=10).sha
            if sha:
                return sha
        except Exception as exc:  # noqa: BLE001 - no network, no such repo...: try the cache
            asked = f" (the hub: {type(exc).__name__})"
    ref_file = os.path.join(constants.HF_HUB_CACHE, repo_folder_name(repo_id=repo, repo_type="model"), "refs", revision)
    try:
        with open(ref_file) as f:
            sha = f.read().strip()
    except OSError:
        sha = ""
    if _COMMIT.match(sha):
        return sha
    raise ModelError(
        f"cannot resolve revision {revision!r} of hub model {repo!r} to a commit{asked}, and the local hub cache "
        f"({constants.HF_HUB_CACHE}) does not hold it; give the driver network access to the hub, download the model "
        "into the cache first, or set model.revision to a 40-digit commit hash"
    )


def fingerprint(config: WeightsConfig, kind: WeightsKind = PIPELINE, commit: str | None = None) -> str:
    """A short digest that changes whenever the weights do (see module docstring). For a
    hub model, ``commit`` is its resolved revision (resolved here when not given)."""
    ref = parse_ref(config.ref, kind)
    h = hashlib.sha256()
    if ref.kind == "tiny":
        h.update(kind.tiny[ref.location].encode())
    elif ref.kind == "hub":
        h.update(f"hub:{ref.location}@{commit or hub_commit(ref.location, config.revision)}".encode())
    elif ref.kind == "local":
        for rel in _files_below(ref.location):
            h.update(rel.encode() + b"\0")
            with open(os.path.join(ref.location, rel), "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    else:
        fs, root = filesystem.open_url(ref.location, config.storage_options)
        with filesystem.storage_errors(ref.location, "list"):
            listing = fs.find(root, detail=True)
        if not listing:
            raise ModelError(f"{kind.field} {ref.location!r} holds no files; upload {kind.saved_by} there first")
        for name in sorted(listing):
            info = listing[name]
            etag = str(info.get("ETag") or info.get("etag") or info.get("mtime") or "")
            h.update(f"{name[len(root):]}\0{info.get('size')}\0{etag}\n".encode())
    return f"{ref.kind}-{h.hexdigest()[:16]}"


def materialize(config: WeightsConfig, kind: WeightsKind = PIPELINE) -> str:
    """A location ``from_pretrained`` can load: a local folder, or the hub id itself."""
    ref = parse_ref(config.ref, kind)
    if ref.kind == "tiny":
        return kind.build_tiny(config.cache_dir, ref.location)
    if ref.kind in ("local", "hub"):
        return ref.location
    fs, root = filesystem.open_url(ref.location, config.storage_options)

    def download(staging: str) -> None:
        with filesystem.storage_errors(ref.location, "download"):
            listing = fs.find(root, detail=True)
            fs.get(root + "/", staging + "/", recursive=True)
        # A truncated copy would load as corrupt weights, or not at all, on one node only.
        for name, info in listing.items():
            local = os.path.join(staging, name[len(root) :].lstrip("/"))
            size = os.path.getsize(local) if os.path.isfile(local) else None
            if size != info.get("size"):
                raise ModelError(f"downloading {ref.location}: {name} came out {size} bytes, the store says {info.get('size')}; retry the job")

    target = os.path.join(config.cache_dir, "remote", fingerprint(config, kind))
    return filesystem.fill_folder_once(target, download, kind.marker)


def _files_below(root: str) -> list[str]:
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(os.path.relpath(os.path.join(folder, f), root) for f in files if not f.startswith("."))
    return sorted(found)
