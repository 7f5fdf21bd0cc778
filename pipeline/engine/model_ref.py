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
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from typing import Literal

from pipeline.engine.tiny_models import TINY_MODELS
from pipeline.errors import ModelError
from pipeline.spec.model_config import ModelConfig
from pipeline.storage import filesystem

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelRef:
    kind: Literal["tiny", "local", "remote", "hub"]
    location: str


def parse_ref(ref: str) -> ModelRef:
    """Classify ``model.ref``; raise :class:`ModelError` saying which forms are accepted."""
    if ref in TINY_MODELS:
        return ModelRef("tiny", ref)
    if "://" in ref and not ref.startswith("file://"):
        return ModelRef("remote", ref.rstrip("/"))
    path = os.path.abspath(os.path.expanduser(ref.removeprefix("file://")))
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise ModelError(f"model.ref {ref!r} is a folder without model_index.json; point it at a diffusers pipeline saved with save_pretrained")
        return ModelRef("local", path)
    if _HUB_ID.match(ref) and not ref.startswith((".", "/", "~")):
        return ModelRef("hub", ref)
    raise ModelError(
        f"model.ref {ref!r} is not a tiny model ({', '.join(TINY_MODELS)}), an existing local folder, an s3:// prefix, or a hub id like 'org/name'; "
        "check the path (relative paths are taken from the working directory), or set model.ref to one of those"
    )


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_weights_format(config: ModelConfig) -> None:
    """Refuse a local folder whose weights are pickles unless ``model.allow_pickle`` is set:
    unpickling runs code from the file. Checked on the driver, before any actor loads it."""
    ref = parse_ref(config.ref)
    if ref.kind != "local" or config.allow_pickle:
        return
    files = _files_below(ref.location)
    safe_folders = {os.path.dirname(f) for f in files if f.endswith(".safetensors")}
    pickled = [f for f in files if f.endswith(_PICKLE_SUFFIXES) and os.path.dirname(f) not in safe_folders]
    if pickled:
        raise ModelError(
            f"model.ref {config.ref!r} holds pickle weights ({', '.join(pickled[:3])}), which can run code when loaded; "
            "convert them to safetensors, or set model.allow_pickle: true if you trust their source"
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


def fingerprint(config: ModelConfig, commit: str | None = None) -> str:
    """A short digest that changes whenever the weights do (see module docstring). For a
    hub model, ``commit`` is its resolved revision (resolved here when not given)."""
    ref = parse_ref(config.ref)
    h = hashlib.sha256()
    if ref.kind == "tiny":
        h.update(TINY_MODELS[ref.location].encode())
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
            raise ModelError(f"model.ref {ref.location!r} holds no files; upload a diffusers folder there first")
        for name in sorted(listing):
            info = listing[name]
            etag = str(info.get("ETag") or info.get("etag") or info.get("mtime") or "")
            h.update(f"{name[len(root):]}\0{info.get('size')}\0{etag}\n".encode())
    return f"{ref.kind}-{h.hexdigest()[:16]}"


def materialize(config: ModelConfig) -> str:
    """A location ``from_pretrained`` can load: a local folder, or the hub id itself."""
    ref = parse_ref(config.ref)
    if ref.kind == "tiny":
        from pipeline.engine.tiny_models import ensure_tiny

        return ensure_tiny(config.cache_dir, ref.location)
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

    target = os.path.join(config.cache_dir, "remote", fingerprint(config))
    return filesystem.fill_folder_once(target, download, "model_index.json")


def _files_below(root: str) -> list[str]:
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(os.path.relpath(os.path.join(folder, f), root) for f in files if not f.startswith("."))
    return sorted(found)
