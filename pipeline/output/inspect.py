"""``imagegen inspect``: what an output holds, and where a long run stands, on one screen.

Runs with their status (complete; running, when a live run holds the output's lock;
interrupted, and which run adopted what it committed), what each has committed (from
the commit records, :mod:`pipeline.storage.commit_protocol`), totals, what a crash left for the
next run to remove, the images table's schema, the size on disk, and a few rows. For a
run still going: its throughput and, with ``--spec``, an ETA, both from its commit
records' times. With ``--spec``: how many of the requests that spec makes are not in
the output yet. Exact and near duplicates among the images (:mod:`pipeline.output.duplicates`). Named
``inspect_output`` because a module named ``inspect`` would shadow the standard library's.

Pure: reads commit records, manifests, the lock, one part's schema and the first rows of
one part through :mod:`pipeline.storage.filesystem`, and with a spec the prompt table;
never starts Ray.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.engine.resolve_catalog import build_catalog, place, recorded_models
from pipeline.output.duplicates import DEFAULT_DISTANCE, Duplicates, find_duplicates, format_duplicates
from pipeline.spec import schema as S
from pipeline.spec.config import JobSpec
from pipeline.spec.occurrences import numbered
from pipeline.spec.validate import Validator
from pipeline.storage import commit_protocol, filesystem, part_files, record_format, skip_filter, tables, trash
from pipeline.storage.lock import live_holder

_ROW_COLUMNS = [S.PROMPT, S.SEED, S.WIDTH, S.HEIGHT, S.SHA256]


@dataclass
class RunView:
    """One run as ``inspect`` shows it. ``images``/``errors``: rows its commit records hold."""

    run_id: str
    status: str  # complete | running | interrupted
    started_at: Optional[float] = None
    finished_at: Optional[float] = None
    images: int = 0
    errors: int = 0
    input_rows: int = 0
    adopted: Optional[int] = None  # requests it took over from interrupted runs
    adopted_by: Optional[str] = None  # for an interrupted run: the run that took its parts over
    last_commit_at: Optional[float] = None
    # torch.compile on its engine actors (its manifest's counts; None before it finished)
    compile_seconds: Optional[float] = None
    compiles: int = 0
    compiles_from_cache: int = 0

    def images_per_second(self) -> Optional[float]:
        """Images committed per second since the run started, up to its last commit."""
        if self.started_at is None or self.last_commit_at is None or self.last_commit_at <= self.started_at:
            return None
        return self.images / (self.last_commit_at - self.started_at)


@dataclass
class Inspection:
    """An output at a glance. ``images``/``errors`` count the rows of committed parts."""

    url: str
    runs: list[RunView] = field(default_factory=list)
    images: int = 0
    errors: int = 0
    parts: int = 0
    uncommitted_parts: int = 0  # without a commit record: the next run removes them
    dropped_records: list[tuple[str, str]] = field(default_factory=list)
    superseded_records: int = 0
    damaged_parts: list[tuple[str, str]] = field(default_factory=list)
    waiting: Optional[trash.Waiting] = None  # files set aside, waiting out output.retention_hours
    size_bytes: int = 0
    schema: Optional[pa.Schema] = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    spec_requests: Optional[int] = None  # with a spec: requests it makes (images and rejected rows)
    spec_left: Optional[int] = None  # ... of which the output does not hold yet
    now: float = field(default_factory=time.time)
    duplicates: Optional[Duplicates] = None

    @property
    def running(self) -> Optional[RunView]:
        return next((r for r in self.runs if r.status == "running"), None)

    def eta_seconds(self) -> Optional[float]:
        """Seconds until the running run is done at its rate so far (needs a spec)."""
        run = self.running
        rate = run.images_per_second() if run else None
        if not rate or self.spec_left is None:
            return None
        return self.spec_left / rate


def inspect_output(
    url: str, storage_options: dict | None = None, rows: int = 5, spec: Optional[JobSpec] = None, near_distance: int = DEFAULT_DISTANCE
) -> Inspection:
    """Read what the output at ``url`` holds; ``rows`` sample rows from its newest images part;
    duplicates (perceptual hashes within ``near_distance`` bits count as near duplicates).
    With ``spec``, also count what that spec would still make (a pass over its table).
    An output with no run gives an empty :class:`Inspection`, not an error."""
    fs, root = filesystem.open_url(url, storage_options)
    found = Inspection(url)
    with filesystem.storage_errors(url, "read"):
        if not fs.exists(root):
            raise FileNotFoundError(root)
        state = commit_protocol.read_commits(fs, root)
        manifests = commit_protocol.read_manifests(fs, root)
        found.size_bytes = int(fs.du(root, total=True))
        found.schema = part_files.newest_part_schema(fs, root, manifests, record_format.IMAGES_DIR)
        holder = live_holder(fs, root)
        found.runs = _runs(state, manifests, holder.get("run_id") if holder else None)
        for part in state.parts.values():
            found.parts += 1
            if part.kind == record_format.IMAGES_DIR:
                found.images += part.rows
            else:
                found.errors += part.rows
        found.uncommitted_parts = len(state.orphans)
        found.dropped_records = list(state.dropped)
        found.superseded_records = len(state.superseded)
        found.damaged_parts = list(state.damaged)
        found.waiting = trash.waiting(fs, root)
        newest = next((p["path"] for m in reversed(manifests) for p in m.get("parts", []) if p["path"].startswith(record_format.IMAGES_DIR + "/")), None)
        if newest is not None and rows > 0:
            with fs.open(filesystem.join(root, newest), "rb") as f:
                found.rows = pq.ParquetFile(f).read_row_group(0, columns=_ROW_COLUMNS).slice(0, rows).to_pylist()
        if manifests:
            found.duplicates = find_duplicates(fs, root, manifests, near_distance)
    if spec is not None:
        found.spec_requests, found.spec_left = left_to_make(spec, state.ids(), manifests)
    return found


def _runs(state: commit_protocol.Commits, manifests: list[dict[str, Any]], holder: Optional[str]) -> list[RunView]:
    by_id = {m.get("run_id"): m for m in manifests}
    committed = state.runs()
    views = []
    for run_id in sorted(set(by_id) | set(committed)):
        m, c = by_id.get(run_id, {}), committed.get(run_id, commit_protocol.RunCommits(run_id))
        status = m.get("status", "running")
        if status == "running" and run_id != holder:
            status = "interrupted"  # no live run holds the lock: it died; the next run adopts it
        adopted = m.get("adopted", {}).get("requests") if isinstance(m.get("adopted"), dict) else None
        counts = m.get("counts") or {}
        views.append(
            RunView(
                run_id, status, m.get("started_at") or c.first_written_at, m.get("finished_at"), c.images, c.errors,
                c.input_rows, adopted, m.get("adopted_by"), c.last_written_at,
                counts.get("compile_seconds"), counts.get("compiles", 0), counts.get("compiles_from_cache", 0),
            )
        )
    return views


def left_to_make(spec: JobSpec, committed: skip_filter.CommittedIds, manifests: list[dict]) -> tuple[int, int]:
    """``(requests, not yet committed)`` for ``spec``'s table: each row's image requests (or
    its one rejected row) as the spec's validator makes them, against ``committed``, with
    ``device: auto`` taken as the output's latest run (``manifests``) ran it. Reads the
    table on this machine. Rows whose id repeats another's count as requests."""
    validator = Validator(spec, place(build_catalog(spec), None, recorded_models(manifests)), skip=committed)
    total = left = 0
    for chunk in numbered(tables.read_input(spec.input), spec.input):
        requests, skipped = validator.validate_table_skipping(chunk)
        total += requests.num_rows + len(skipped)
        left += requests.num_rows
    return total, left


def format_inspection(found: Inspection) -> str:
    """The lines ``imagegen inspect`` prints."""
    lines = [f"output     {found.url}"]
    if not found.runs:
        lines.append("no committed run yet (no _runs/ or _commits/)")
        return "\n".join(lines)
    by_status = {s: sum(1 for r in found.runs if r.status == s) for s in ("running", "interrupted")}
    extra = ", ".join(f"{n} {s}" for s, n in by_status.items() if n)
    lines += [
        f"runs       {len(found.runs)}" + (f" ({extra})" if extra else ""),
        f"images     {found.images} committed",
        f"errors     {found.errors}",
        f"parts      {found.parts} committed"
        + (f", {found.uncommitted_parts} without a commit record (left by an interrupted run; the next run removes them)" if found.uncommitted_parts else ""),
    ]
    for name, why in found.dropped_records:
        lines.append(f"damaged    commit record {name}: {why} (the next run drops it and makes its rows again)")
    for path, why in found.damaged_parts:
        lines.append(f"damaged    part {path}: {why} (the next run makes its rows again)")
    if found.superseded_records:
        lines.append(f"superseded {found.superseded_records} commit record(s) of retried writes (the next run removes them)")
    if found.waiting is not None and found.waiting.files:
        lines.append(
            f"trash      {len(found.waiting.files)} file(s), {_size(found.waiting.bytes)} set aside since {_time(found.waiting.oldest)} "
            "(deleted after output.retention_hours; `imagegen vacuum` deletes them now)"
        )
    lines += [
        f"on disk    {_size(found.size_bytes)}",
        "",
        "run                         status       started (UTC)        images   errors  adopted",
    ]
    for run in found.runs:
        adopted = str(run.adopted) if run.adopted else "-"
        lines.append(f"{run.run_id:<27} {run.status:<12} {_time(run.started_at):<20} {run.images:>6} {run.errors:>8}  {adopted}")
        if run.compiles:
            lines.append(
                f"  compiling took {run.compile_seconds:.1f} s of its engines' time, apart from generating: {run.compiles} graph(s), "
                f"{run.compiles - run.compiles_from_cache} compiled, {run.compiles_from_cache} loaded from the compile cache"
            )
        if run.status == "interrupted":
            lines.append(
                f"  interrupted after its commit at {_time(run.last_commit_at)}; "
                + (f"run {run.adopted_by} adopted its {run.images} images" if run.adopted_by else "the next run into this output adopts its committed parts")
            )
    if found.spec_left is not None:
        lines.append("")
        lines.append(f"left       {found.spec_left} of the spec's {found.spec_requests} requests are not in the output yet")
    running = found.running
    if running is not None:
        rate = running.images_per_second()
        since = f", last commit {found.now - running.last_commit_at:.0f} s ago" if running.last_commit_at else ", nothing committed yet"
        eta = found.eta_seconds()
        lines.append(
            f"running    {running.run_id}: "
            + (f"{rate:.2f} images/s committed" if rate else "no throughput yet")
            + since
            + (f"; ETA {_duration(eta)}" if eta is not None else ("; ETA: give --spec SPEC" if found.spec_left is None else ""))
        )
    if found.schema is not None:
        lines += ["", "images schema:"]
        lines += [f"  {f.name}: {'image {bytes, path}' if f.name == S.IMAGE else f.type}" for f in found.schema]
    if found.rows:
        lines += ["", "first rows of the newest images part:"]
        for row in found.rows:
            prompt = row[S.PROMPT] if len(row[S.PROMPT]) <= 60 else row[S.PROMPT][:57] + "..."
            lines.append(f"  {row[S.SHA256][:12]}  seed {row[S.SEED]:<20} {row[S.WIDTH]}x{row[S.HEIGHT]:<5} {prompt}")
    if found.duplicates is not None:
        lines += format_duplicates(found.duplicates)
    return "\n".join(lines)


def _time(epoch: Optional[float]) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(epoch)) if epoch else "?"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
