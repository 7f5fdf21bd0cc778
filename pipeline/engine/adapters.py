"""LoRA adapter files: their content digest and a local copy the engine can load.

The digest goes into the request id of every image made with the adapter, so it is taken
over the file's bytes (not a name, a path or an ETag): the same file anywhere gives the
same ids, and a replaced file gives new ones. Computed on the driver before the job.
"""

from __future__ import annotations

import hashlib
import os

from pipeline.errors import ModelError
from pipeline.spec.model_config import LoraConfig
from pipeline.storage import filesystem

ADAPTER_FILE = "adapter.safetensors"


def digest(name: str, config: LoraConfig) -> str:
    """sha256 (first 16 hex digits) of the adapter file; :class:`ModelError` when it cannot
    be read or is not a safetensors file."""
    if not config.url.endswith(".safetensors"):
        raise ModelError(
            f"loras.{name}.url {config.url!r} is not a .safetensors file; point it at a LoRA saved in diffusers' format "
            "(save_lora_weights writes pytorch_lora_weights.safetensors)"
        )
    fs, path = filesystem.open_url(config.url, config.storage_options)
    h = hashlib.sha256()
    try:
        with filesystem.storage_errors(config.url, "read"), fs.open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except FileNotFoundError:
        raise ModelError(f"loras.{name}.url {config.url!r} does not exist; check the path, or upload the adapter there first") from None
    return h.hexdigest()[:16]


def materialize(config: LoraConfig, adapter_digest: str, cache_dir: str) -> str:
    """A local path of the adapter: the file itself when local, else a copy made once per
    node under ``cache_dir`` (named by digest, so a changed file is fetched again)."""
    fs, path = filesystem.open_url(config.url, config.storage_options)
    if filesystem.is_local(fs):
        return path

    def download(staging: str) -> None:
        os.makedirs(staging)
        with filesystem.storage_errors(config.url, "download"):
            fs.get(path, os.path.join(staging, ADAPTER_FILE))

    folder = filesystem.fill_folder_once(os.path.join(cache_dir, "loras", adapter_digest), download, ADAPTER_FILE)
    return os.path.join(folder, ADAPTER_FILE)
