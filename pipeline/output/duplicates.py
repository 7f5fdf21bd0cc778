"""Exact and near duplicates among an output's images, for ``imagegen inspect``.

Exact duplicates share their ``sha256`` (the same file bytes). Near duplicates have
perceptual hashes (``phash``, 64 bits) within ``distance`` bits of each other (Hamming
distance); groups are the connected components of that relation, so a chain of close
pairs makes one group even when its ends are further apart, and exact copies are near
duplicates too (their hashes are equal).

The search is exact, not sampled: distinct hashes are split into ``distance + 1`` bit
blocks, and two hashes within ``distance`` bits agree on at least one whole block
(pigeonhole), so only hashes sharing a block value are compared. Its cost grows with
the images per block value: about ``n^2 / 2^(64 / (distance + 1))`` comparisons per
block: at the default distance about a second for 100,000 images and about a minute for
a million on a 2-core VM (``benchmarks/duplicate_search.py``), more for a larger distance.

Pure: reads four columns of each committed images part through :mod:`pipeline.storage`;
parts written before ``phash`` existed count as not hashed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.spec import schema as S
from pipeline.storage import filesystem, record_format

# Bits two perceptual hashes may differ in and still count as near duplicates. Re-encoded
# or resized copies land within a few bits, unrelated images around 32.
DEFAULT_DISTANCE = 6
_COLUMNS = [S.ID, S.PROMPT, S.SHA256, S.PHASH]
_SHOWN_GROUPS = 5
_SHOWN_MEMBERS = 3


@dataclass
class Group:
    """A set of duplicate images: their rows' ``id`` and ``prompt``, and (near groups) the
    most bits any member's hash differs from the first member's."""

    kind: str  # "exact" or "near"
    size: int
    members: list[dict[str, Any]]  # the first few: id, prompt
    spread: int = 0


@dataclass
class Duplicates:
    """Duplicate counts over an output's committed images. ``redundant`` counts the images
    beyond the first of each group: what deduplicating would drop."""

    images: int = 0
    hashed: int = 0  # images with a phash
    distance: int = DEFAULT_DISTANCE
    exact_groups: int = 0
    exact_redundant: int = 0
    near_groups: int = 0
    near_redundant: int = 0
    worst: list[Group] = field(default_factory=list)


def near_groups(hashes: np.ndarray, distance: int) -> np.ndarray:
    """A group label per hash (``uint64`` array): hashes within ``distance`` bits of each
    other, directly or through a chain, share a label (the smallest index in the group)."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    unique, inverse = np.unique(hashes, return_inverse=True)
    parent = np.arange(len(unique))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for lo, hi in _blocks(distance):
        keys = (unique >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)
        order = np.argsort(keys, kind="stable")
        bounds = [0, *(np.flatnonzero(np.diff(keys[order])) + 1), len(order)]
        for start, end in zip(bounds[:-1], bounds[1:]):
            for a, b in _close_pairs(unique, order[start:end], distance):
                ra, rb = root(a), root(b)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([root(i) for i in range(len(unique))], dtype=np.int64)
    # Label each input by the smallest input index in its group.
    first = np.full(len(unique), len(hashes), dtype=np.int64)
    np.minimum.at(first, roots[inverse], np.arange(len(hashes)))
    return first[roots[inverse]]


def _close_pairs(unique: np.ndarray, members: np.ndarray, distance: int, chunk: int = 1024):
    """Pairs ``(i, j)``, ``i < j``, of ``members`` (indices into ``unique``) whose hashes
    are within ``distance`` bits; compared ``chunk`` rows at a time to bound memory."""
    values = unique[members]
    for start in range(0, len(members) - 1, chunk):
        rows = values[start : start + chunk]
        rest = values[start + 1 :]  # only later members: each pair once, no self pairs
        close = np.bitwise_count(rows[:, None] ^ rest[None, :]) <= distance
        for r, c in zip(*np.nonzero(close)):
            if r <= c:  # column c is member start + 1 + c, after row r's start + r
                yield int(members[start + r]), int(members[start + 1 + c])


def _blocks(distance: int) -> list[tuple[int, int]]:
    """``distance + 1`` bit ranges ``[lo, hi)`` covering the 64 bits (at most 64 blocks)."""
    count = min(64, distance + 1)
    edges = [round(64 * k / count) for k in range(count + 1)]
    return list(zip(edges[:-1], edges[1:]))


def find_duplicates(fs, root: str, manifests: list[dict[str, Any]], distance: int = DEFAULT_DISTANCE) -> Duplicates:
    """Count exact and near duplicates among the committed images of the output at
    ``root`` whose runs are ``manifests``; keep the largest groups as examples."""
    tables = []
    for manifest in manifests:
        for part in manifest["parts"]:
            if part["path"].startswith(record_format.IMAGES_DIR + "/"):
                with fs.open(filesystem.join(root, part["path"]), "rb") as f:
                    parquet = pq.ParquetFile(f)
                    present = [c for c in _COLUMNS if c in parquet.schema_arrow.names]
                    table = parquet.read(columns=present)
                for name in _COLUMNS:
                    if name not in present:
                        table = table.append_column(name, pa.nulls(table.num_rows, pa.uint64() if name == S.PHASH else pa.string()))
                tables.append(table.select(_COLUMNS).cast(pa.schema([(n, pa.uint64() if n == S.PHASH else pa.string()) for n in _COLUMNS])))
    found = Duplicates(distance=distance)
    if not tables:
        return found
    rows = pa.concat_tables(tables)
    found.images = rows.num_rows
    digests = rows.column(S.SHA256).to_pylist()
    exact = Counter(digests)
    found.exact_groups = sum(1 for n in exact.values() if n > 1)
    found.exact_redundant = sum(n - 1 for n in exact.values() if n > 1)
    hashed = np.flatnonzero(rows.column(S.PHASH).is_valid().to_numpy(zero_copy_only=False))
    found.hashed = len(hashed)
    groups: list[Group] = []
    if len(hashed):
        values = rows.column(S.PHASH).take(pa.array(hashed)).to_numpy()
        labels = near_groups(values, distance)
        sizes = Counter(labels.tolist())
        found.near_groups = sum(1 for n in sizes.values() if n > 1)
        found.near_redundant = sum(n - 1 for n in sizes.values() if n > 1)
        for label, size in sizes.most_common(_SHOWN_GROUPS):
            if size < 2:
                break
            positions = np.flatnonzero(labels == label)
            spread = int(np.bitwise_count(values[positions] ^ values[positions[0]]).max())
            kind = "exact" if len({digests[hashed[p]] for p in positions}) == 1 else "near"
            groups.append(Group(kind, size, _members(rows, hashed[positions[:_SHOWN_MEMBERS]]), spread))
    else:  # no phash anywhere (an output made before it existed): the exact groups alone
        for digest, size in exact.most_common(_SHOWN_GROUPS):
            if size < 2:
                break
            positions = [i for i, d in enumerate(digests) if d == digest][:_SHOWN_MEMBERS]
            groups.append(Group("exact", size, _members(rows, np.array(positions))))
    found.worst = groups
    return found


def _members(rows: pa.Table, positions: np.ndarray) -> list[dict[str, Any]]:
    return rows.select([S.ID, S.PROMPT]).take(pa.array(positions, pa.int64())).to_pylist()


def format_duplicates(found: Duplicates) -> list[str]:
    """The duplicates section of ``imagegen inspect``."""
    lines = [
        "",
        f"duplicates among {found.images} images:",
        f"  exact (same sha256)        {found.exact_groups} group(s), {found.exact_redundant} image(s) beyond the first of each",
    ]
    if found.hashed:
        lines.append(
            f"  near (phash within {found.distance} bits) {found.near_groups} group(s), {found.near_redundant} image(s) beyond the first of each"
            + (f" ({found.images - found.hashed} image(s) without a phash not compared)" if found.hashed < found.images else "")
        )
    else:
        lines.append("  near                       not computed: no image has a phash (made before imagegen recorded one)")
    if found.worst:
        lines.append("  largest groups:")
        for group in found.worst:
            how = "identical files" if group.kind == "exact" else f"hashes within {group.spread} bits of the first"
            lines.append(f"    {group.size} images, {how}:")
            for member in group.members:
                prompt = member[S.PROMPT] or ""
                lines.append(f"      id {member[S.ID]}  {prompt if len(prompt) <= 60 else prompt[:57] + '...'}")
    return lines
