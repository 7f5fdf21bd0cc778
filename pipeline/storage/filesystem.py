"""The one door to storage: URL + options -> filesystem, listing, reading, atomic writes.

Local paths, ``s3://`` (through s3fs) and any other fsspec URL are handled alike. Errors
from the filesystem become :class:`StorageError` messages that name the URL and say what
to check, never a botocore traceback.
"""

from __future__ import annotations

import fcntl
import os
import posixpath
import shutil
import uuid
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import StorageError

try:  # botocore comes with s3fs; it raises this one outside the OSError family
    from botocore.exceptions import NoCredentialsError
except ImportError:  # no s3fs, so no S3 to ask: nothing to catch
    NoCredentialsError = ()


def open_url(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Resolve ``url`` to ``(filesystem, path)``. ``storage_options`` go to the filesystem
    (for s3fs: ``key``, ``secret``, ``endpoint_url``, ``client_kwargs``...)."""
    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    except (ImportError, ValueError) as exc:
        raise StorageError(f"cannot open {url!r}: {exc}") from None
    return fs, path


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def join(path: str, *parts: str) -> str:
    return posixpath.join(path, *parts)


@contextmanager
def storage_errors(url: str, action: str) -> Iterator[None]:
    """Turn a filesystem exception into a StorageError naming ``url`` and what to check."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError:
        raise StorageError(f"cannot {action} {url!r}: it does not exist; check the path or bucket name") from None
    except PermissionError as exc:
        raise StorageError(
            f"cannot {action} {url!r}: permission denied ({exc}); check the folder's permissions, "
            "or for object storage the credentials in storage_options"
        ) from None
    except NoCredentialsError:
        raise StorageError(
            f"cannot {action} {url!r}: no S3 credentials were found; give this machine credentials "
            "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, an instance role) or set key and secret "
            "in the section's storage_options, or anon: true for a public bucket"
        ) from None
    except OSError as exc:
        raise StorageError(f"cannot {action} {url!r}: {exc}") from None


def relative_name(path: str, base: str) -> str:
    """``path`` relative to ``base``: independent of where the table is stored."""
    return path[len(base) + 1 :] if path.startswith(base + "/") else posixpath.basename(path)


def read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    with storage_errors(path, "read"):
        return fs.cat_file(path)


def atomic_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Make ``data`` visible at ``path`` all at once; a reader never sees part of it.

    Local: written to a hidden temporary name in the same folder, then renamed over
    ``path`` (atomic within a filesystem). Object stores: one PUT (or one completed
    multipart upload), which S3 makes visible atomically.
    """
    with storage_errors(path, "write"):
        parent = posixpath.dirname(path)
        if is_local(fs):
            os.makedirs(parent, exist_ok=True)
            tmp = posixpath.join(parent, f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        else:
            fs.pipe_file(path, data)


def fill_folder_once(target: str, fill: Callable[[str], None], marker: str) -> str:
    """Make the local folder ``target`` exist with its contents complete, filling it at most
    once per machine: ``fill(staging)`` writes into a private staging folder that is renamed
    into place. ``marker`` is a file whose presence means the folder is complete.

    Processes on one machine (two engine actors on a node, say) take an exclusive file lock
    beside the folder, so one fills it while the others wait and then use it. The lock is
    ``flock``: reliable on local disks, not on every network filesystem, where the rename
    still keeps a reader from ever seeing a half-filled folder.
    """
    ready = os.path.join(target, marker)
    if os.path.isfile(ready):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(f"{target}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isfile(ready):
            return target
        staging = f"{target}.{uuid.uuid4().hex}.tmp"
        try:
            fill(staging)
            os.rename(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Write ``path`` only if it does not exist yet; False if it does. Atomic on local
    disks (``O_EXCL``) and on S3 (a conditional PUT, ``If-None-Match: *``)."""
    with storage_errors(path, "create"):
        try:
            if is_local(fs):
                os.makedirs(posixpath.dirname(path), exist_ok=True)
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            else:
                fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
    return True


def arrow_filesystem(fs: fsspec.AbstractFileSystem):
    """A pyarrow filesystem over ``fs``, for Ray Data readers (which take pyarrow's)."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(fs))
